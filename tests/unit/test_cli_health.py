"""`data-manager health` reads any failure of the check itself as unhealthy (exit 2, one
line), never as "degraded" (exit 1) with a traceback: a container probe acts on the code."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
from typer.testing import CliRunner

from data_manager import cli

if TYPE_CHECKING:
    from data_manager.router import DataRouter


def broken_router(_settings: object = None) -> DataRouter:
    msg = "bad engine argument\nsecond line"
    raise TypeError(msg)


@pytest.mark.parametrize("as_json", [False, True])
def test_an_unexpected_error_in_the_health_check_is_unhealthy(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    monkeypatch.setattr(cli, "_router", broken_router)
    result = CliRunner().invoke(cli.app, ["health", *(["--json"] if as_json else [])])
    assert result.exit_code == cli.HEALTH_EXIT["unhealthy"], result.output
    reason = "TypeError: bad engine argument"
    if as_json:
        assert json.loads(result.stdout) == {"status": "unhealthy", "reason": reason}
    else:
        assert result.output.strip().splitlines() == [f"unhealthy: {reason}"]
