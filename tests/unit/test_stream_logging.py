"""The small pieces behind the backup stream's error reports and loss counts."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from data_manager.models import TickData
from data_manager.stream import (
    _add_range,
    _BackupStreamBase,
    _captures,
    _describe_item,
    _lsn_ranges,
)
from tests.unit.test_journal import over_small_segments

T0: Final = 1_727_996_400_000


def test_an_item_is_described_in_a_line_whatever_it_holds() -> None:
    tick = TickData(symbol="EUR/USD", timestamp=T0, bid=1.1, ask=1.1002, source="t")
    bulky = TickData.model_construct(
        **(tick.__dict__ | {"source": "s" * 100_000, "symbol": "X" * 1000})
    )
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


def test_add_range_counts_only_new_lsns_and_merges() -> None:
    ranges: list[tuple[int, int]] = []
    assert _add_range(ranges, 5, 9) == 5
    assert _add_range(ranges, 7, 12) == 3
    assert _add_range(ranges, 1, 3) == 3
    assert ranges == [(1, 3), (5, 12)]
    assert _add_range(ranges, 4, 4) == 1
    assert ranges == [(1, 12)]
    assert _add_range(ranges, 2, 11) == 0


async def test_spooled_records_skipped_on_a_later_read_are_counted_too(tmp_path: Path) -> None:
    # A chunk skips segment A (deleted) and returns B's records; its publish fails, and B
    # is deleted before the next attempt: B's records are lost too and must be counted.
    class Drain:
        _count_lost = _BackupStreamBase._count_lost

        def __init__(self) -> None:
            self._lost_counted: dict[str, list[tuple[int, int]]] = {}

    spool = await over_small_segments(tmp_path, "sp", 60, sync="thread")
    files = sorted(spool.path.glob("*.seg"))
    assert len(files) >= 3
    a, b, c = files[:3]
    b_lsns = list(range(int(b.stem), int(c.stem)))
    drain = Drain()
    a.unlink()
    chunk = await spool.read(spool.stored_lsn, max_records=len(b_lsns))
    assert [lsn for lsn, _ in chunk.records] == b_lsns
    counted = _BackupStreamBase._newly_skipped(drain, spool, chunk)  # type: ignore[arg-type]
    assert counted == int(b.stem) - 1  # A's records
    b.unlink()  # the publish failed: nothing stored; B goes too
    chunk = await spool.read(spool.stored_lsn, max_records=len(b_lsns))
    counted += _BackupStreamBase._newly_skipped(drain, spool, chunk)  # type: ignore[arg-type]
    assert counted == chunk.end_lsn - len(chunk.records)  # every record skipped, once
    assert counted >= int(c.stem) - 1
    await spool.close()
