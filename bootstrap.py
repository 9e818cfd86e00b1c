#!/usr/bin/env python3
"""Run data_manager's demo, tests or benchmarks on a machine that has only Python 3.11+.

    python3 bootstrap.py demo  [args...]   # data-manager demo
    python3 bootstrap.py test  [args...]   # pytest (starts its own PostgreSQL and Redis)
    python3 bootstrap.py bench [args...]   # python -m benchmarks

The first run creates .venv next to this file and installs the project with its test extra;
later runs reinstall only when pyproject.toml has changed. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
# Holds the hash of the pyproject.toml that .venv was installed from.
MARKER = VENV / ".bootstrap-pyproject-sha256"


def ensure_venv() -> None:
    """Create .venv and install the project into it, unless it is already up to date."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if PYTHON.exists() and MARKER.exists() and MARKER.read_text().strip() == digest:
        return
    if not PYTHON.exists():
        print("bootstrap: creating .venv ...", flush=True)
        if subprocess.call([sys.executable, "-m", "venv", str(VENV)]) != 0:
            sys.exit("bootstrap: could not create .venv (Debian/Ubuntu: apt install python3-venv)")
    print("bootstrap: installing data_manager[test] into .venv (takes a minute) ...", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if subprocess.call([*pip, "-e", ".[test]"], cwd=ROOT) != 0:
        sys.exit("bootstrap: pip install failed (see above)")
    MARKER.write_text(digest + "\n")


def command(name: str, args: list[str]) -> list[str]:
    """The command line that runs ``name`` in .venv."""
    if name == "demo":
        if (ROOT / "data_manager" / "cli.py").exists():
            return [str(BIN / "data-manager"), "demo", *args]
        return [str(PYTHON), "-m", "data_manager", "demo", *args]
    if name == "test":
        return [str(PYTHON), "-m", "pytest", *args]
    return [str(PYTHON), "-m", "benchmarks", *args]


def main() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - run by whatever python3 the machine has
        sys.exit(f"bootstrap: Python 3.11+ required, this is {sys.version.split()[0]}")
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "bench"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    ensure_venv()
    cmd = command(sys.argv[1], sys.argv[2:])
    os.chdir(ROOT)
    if os.name == "posix":
        # Replace this process: Ctrl-C reaches only the command, which can then shut down its
        # test servers cleanly, and its exit status (pytest's 5 included) is ours unchanged.
        os.execv(cmd[0], cmd)
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
