"""``python -m data_manager ...`` runs the ``data-manager`` CLI."""

from data_manager.cli import main

main()
