"""The small pieces behind the backup stream's error reports (pure functions, no I/O)."""

from __future__ import annotations

from typing import Final

import pytest

from data_manager.models import TickData
from data_manager.stream import _captures, _describe_item, _lsn_ranges

T0: Final = 1_727_996_400_000


def test_an_item_is_described_in_a_line_whatever_it_holds() -> None:
    tick = TickData(symbol="EUR/USD", timestamp=T0, bid=1.1, ask=1.1002, source="t")
    bulky = tick.model_copy(update={"source": "s" * 100_000, "symbol": "X" * 1000})
    assert _describe_item(tick) == f"TickData 'EUR/USD' at {T0}"
    assert len(_describe_item(bulky)) < 100
    other = _describe_item(["x" * 1000])
    assert other.startswith("list: ['xxx")
    assert len(other) == 200
    assert other.endswith("...")


def test_lsn_ranges() -> None:
    assert _lsn_ranges([6]) == "6"
    assert _lsn_ranges([3, 7, 8, 9, 12]) == "3, 7-9, 12"
    assert _lsn_ranges(list(range(0, 40, 2)), most=3) == "0, 2, 4, ..."


@pytest.mark.parametrize(
    ("pattern", "subject", "captured"),
    [
        ("dm.backup.>", "dm.backup.tick", True),
        ("dm.>", "dm.backup.tick", True),
        ("dm.backup.*", "dm.backup.tick", True),
        ("dm.*.tick", "dm.backup.tick", True),
        ("dm.backup.tick", "dm.backup.tick", True),
        ("dm.backup.>", "dm.backup", False),
        ("dm.backup.*", "dm.backup.tick.x", False),
        ("dm.backup.candle", "dm.backup.tick", False),
        ("dm.backupx.>", "dm.backup.tick", False),
        ("dm.backup.tick.x", "dm.backup.tick", False),
    ],
)
def test_captures_follows_nats_subject_wildcards(
    pattern: str, subject: str, captured: bool
) -> None:
    assert _captures(pattern, subject) is captured
