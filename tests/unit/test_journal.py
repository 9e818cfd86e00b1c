"""The local journal: records, torn tails, group fsync, segments, locks and orphans."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest

import data_manager.journal as journal_module
from data_manager.errors import ValidationError
from data_manager.journal import (
    DEAD_LETTER_DIR,
    MAGIC,
    DeadLetterFile,
    IngestItem,
    Journal,
    JournalError,
    JournalLockedError,
    decode_item,
    encode_item,
    find_orphans,
    new_instance_id,
)
from data_manager.models import CandleData, OrderFlowMetrics, TickData
from tests.unit.conftest import WAIT
from tests.unit.test_journal_committer import seqs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from data_manager.settings import JournalSync

T0 = 1_727_996_400_000
ROOT = Path(__file__).resolve().parents[2]


def failing_once(
    real: Callable[..., Any], failures: dict[str, int], key: str, code: int = errno.EIO
) -> Callable[..., Any]:
    """``real``, except that it raises ``OSError(code)`` while ``failures[key]`` counts down."""

    def call(*args: Any) -> Any:
        if failures[key]:
            failures[key] -= 1
            raise OSError(code, os.strerror(code))
        return real(*args)

    return call


def tick(seq: int) -> TickData:
    return TickData(
        symbol="EUR/USD",
        timestamp=T0 + seq,
        bid=1.1,
        ask=1.1002,
        source="test",
        seq=seq,
        bid_size=1.5,
        aggressor="buy",
        received_at=T0 + seq + 1,
    )


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


@pytest.fixture(params=["thread", "loop", "aio"])
async def journal(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Journal]:
    j = Journal(tmp_path, instance_id="me", sync=request.param)
    await j.open()
    yield j
    await j.close()


# --------------------------------------------------------------------------- records


def test_records_round_trip_every_kind() -> None:
    items: list[IngestItem] = [
        tick(1),
        CandleData(
            symbol="EURUSD",
            timeframe="5m",
            timestamp=T0,
            open=1.0,
            high=1.2,
            low=0.9,
            close=1.1,
            source="agg",
            is_closed=False,
        ),
        OrderFlowMetrics(symbol="EUR/USD", timestamp=T0, window_ms=1000, toxicity=0.5),
    ]
    for item in items:
        payload = encode_item(item)
        assert decode_item(payload) == item
    # Derived fields are not written (they are recomputed).
    assert b"mid" not in encode_item(items[0])


@pytest.mark.parametrize(
    "over", [{"use_case": "x\ud800"}, {"seq": 2**70}], ids=["lone-surrogate", "beyond-64-bits"]
)
def test_what_orjson_refuses_is_still_journaled_and_refused_on_reading(
    over: dict[str, object],
) -> None:
    # Validation refuses both; a model built without it is kept all the same (the write path
    # then dead-letters it with its bytes instead of wedging on it).
    unchecked = TickData.model_construct(**{**tick(1).__dict__, **over})
    payload = encode_item(unchecked)
    with pytest.raises(ValidationError):
        decode_item(payload)


def test_a_value_that_is_not_json_is_refused_with_the_sdks_error() -> None:
    bad = TickData.model_construct(**{**tick(1).__dict__, "use_case": object()})
    with pytest.raises(ValidationError, match="cannot journal this TickData"):
        encode_item(bad)


async def test_a_record_above_the_read_limit_is_refused_before_it_is_acknowledged(
    tmp_path: Path,
) -> None:
    # Reading takes a length above MAX_RECORD_BYTES for a torn record, so writing one would
    # acknowledge it and then lose it with the rest of its segment. Only a model built
    # without validation can be that large (text fields are bounded).
    big = TickData.model_construct(
        **{**tick(2).__dict__, "use_case": "x" * journal_module.MAX_RECORD_BYTES}
    )
    with pytest.raises(ValidationError, match="record limit"):
        encode_item(big)
    j = Journal(tmp_path, instance_id="big")
    await j.open()
    assert await j.append([tick(1)]) == 1
    with pytest.raises(ValidationError, match="record limit"):
        await j.append([tick(2), big])
    assert await j.append([tick(3)]) == 2  # nothing of the refused call was written
    records = (await j.read(0)).records
    assert [decode_item(p).seq for _, p in records] == [1, 3]  # type: ignore[union-attr]
    await j.close()
    again = Journal(tmp_path, instance_id="big")
    await again.open()
    assert [item.seq for _, item in again.replay()] == [1, 3]  # type: ignore[union-attr]
    assert again.problems == []
    await again.mark_stored(again.last_lsn)
    await again.close()


def test_records_written_without_null_fields_still_read() -> None:
    # Records written before nulls were: pydantic's JSON without None fields and derived ones.
    item = tick(1)
    old = b"t" + item.__pydantic_serializer__.to_json(
        item, exclude={"mid", "spread"}, exclude_none=True
    )
    assert b"null" not in old
    assert decode_item(old) == item


def test_decoding_revalidates_data_from_disk() -> None:
    payload = encode_item(tick(1))
    data = orjson.loads(payload[1:])
    data["ask"] = 1.0  # below the bid
    with pytest.raises(ValidationError, match="below bid"):
        decode_item(b"t" + orjson.dumps(data))
    with pytest.raises(ValidationError, match="unknown kind"):
        decode_item(b"x{}")
    with pytest.raises(ValidationError):
        encode_item("nope")  # type: ignore[arg-type]


def test_instance_id_must_be_a_plain_folder_name(tmp_path: Path) -> None:
    for bad in ("", "../escape", "a/b", DEAD_LETTER_DIR, ".hidden"):
        with pytest.raises(ValidationError):
            Journal(tmp_path, instance_id=bad)
    Journal(tmp_path, instance_id=new_instance_id())


# --------------------------------------------------------------------------- append / read


async def test_append_then_read_and_replay(journal: Journal) -> None:
    first = await journal.append([tick(0), tick(1)])
    second = await journal.append([tick(2)])
    assert (first, second, journal.last_lsn) == (2, 3, 3)
    batch = await journal.read(0)
    assert [lsn for lsn, _ in batch.records] == [1, 2, 3]
    assert batch.end_lsn == 3
    assert [decode_item(p) for _, p in batch.records] == [tick(0), tick(1), tick(2)]
    assert list(journal.replay()) == [(1, tick(0)), (2, tick(1)), (3, tick(2))]
    part = await journal.read(1, max_records=1)
    assert [lsn for lsn, _ in part.records] == [2]


async def test_replay_below_a_held_checkpoint_yields_only_ticks(tmp_path: Path) -> None:
    # As the write path replays it: the upserts stored below the hold may have a newer
    # version stored since; the ticks are stored again (the data derived from them is
    # rebuilt from them).
    flow = OrderFlowMetrics(symbol="EUR/USD", timestamp=T0, window_ms=1000, toxicity=0.5)
    dead = Journal(tmp_path, instance_id="dead")
    await dead.open()
    dead.hold_checkpoint(0)
    await dead.append([tick(1), flow, tick(2)])
    await dead.mark_stored(3, durable=True)
    await dead.append([flow])  # not stored: replayed whatever its kind
    await dead.close()
    again = Journal(tmp_path, instance_id="dead")
    await again.open()
    try:
        assert again.upserts_stored_lsn == 3
        assert list(again.replay()) == [(1, tick(1)), (3, tick(2)), (4, flow)]
    finally:
        await again.close()


async def test_concurrent_appends_share_one_fsync(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = 0
    real_sync = journal_module._sync

    def counting_sync(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        time.sleep(0.002)  # a realistic sync takes a while: appenders pile up behind it
        real_sync(fd)

    monkeypatch.setattr(journal_module, "_sync", counting_sync)
    order: list[int] = []

    def on_durable(first: int, items: Sequence[object]) -> None:
        order.append(first)

    lsns = await asyncio.gather(
        *(journal.append([tick(i)], on_durable=on_durable) for i in range(64))
    )
    assert sorted(lsns) == list(range(1, 65))
    assert order == sorted(order)  # callbacks run in LSN order
    stats = journal.stats()
    if journal.sync == "aio":  # groups are synced by the kernel, not through _sync
        assert syncs == 1  # the segment creation's own sync
    else:
        assert stats.fsyncs == syncs - 1  # the segment creation's own sync is not counted
    assert 1 <= stats.fsyncs < 64
    assert stats.records_appended == 64


async def test_callbacks_name_each_items_own_lsn_when_appends_share_them(
    journal: Journal,
) -> None:
    # Neighbouring appends with one callback are reported together; another callback, or
    # none, in between starts a new report, so every reported item's LSN stays its own.
    reported: dict[str, dict[int, int | None]] = {"a": {}, "b": {}}

    def recorder(name: str) -> Callable[[int, Sequence[TickData]], None]:
        def on_durable(first: int, items: Sequence[TickData]) -> None:
            for offset, item in enumerate(items):
                reported[name][first + offset] = item.seq

        return on_durable

    a, b = recorder("a"), recorder("b")
    plan = [a, a, None, a, b, b, a, None, None, b]
    lsns = await asyncio.gather(
        *(journal.append([tick(i)], on_durable=cb) for i, cb in enumerate(plan))
    )
    assert reported["a"] == {lsns[i]: i for i, cb in enumerate(plan) if cb is a}
    assert reported["b"] == {lsns[i]: i for i, cb in enumerate(plan) if cb is b}


def fail_the_next_sync(journal: Journal, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Make the next group's sync fail with ``code``, whichever committer syncs it."""
    if journal.sync == "aio":  # the kernel reports it in the completion: -errno
        committer = journal._committer
        real = committer._ctx  # type: ignore[union-attr]

        class FailingOnce:
            failed = False

            def submit(self, blocks: list[object]) -> int:
                return int(real.submit(blocks))

            def getEvents(self, **kwargs: object) -> list[tuple[object, int, int]]:
                events: list[tuple[object, int, int]] = real.getEvents(**kwargs)
                if events and not self.failed:
                    self.failed = True
                    (block, _, res2), *rest = events
                    return [(block, -code, res2), *rest]
                return events

            def close(self) -> None:
                real.close()

        monkeypatch.setattr(committer, "_ctx", FailingOnce())
        return
    real_sync = journal_module._sync
    calls = 0

    def failing_once(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(code, os.strerror(code))
        real_sync(fd)

    monkeypatch.setattr(journal_module, "_sync", failing_once)


async def test_a_failed_write_is_undone_and_the_journal_goes_on(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    await journal.append([tick(0)])
    fail_the_next_sync(journal, monkeypatch, errno.ENOSPC)
    with pytest.raises(JournalError, match="No space"):
        await journal.append([tick(1)])
    assert journal.last_lsn == 1
    await journal.append([tick(2)])
    assert [item.seq for _, item in journal.replay()] == [0, 2]  # type: ignore[union-attr]


async def test_a_new_segment_whose_failed_write_cannot_be_undone_is_replaced(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first write to a fresh segment fails, and so does cutting it off: the segment is
    # abandoned with nothing acknowledged in it, under the name the next segment needs.
    failures = {"write": 1, "truncate": 1}
    monkeypatch.setattr(
        journal_module,
        "_write_at",
        failing_once(journal_module._write_at, failures, "write", errno.ENOSPC),
    )
    monkeypatch.setattr(os, "ftruncate", failing_once(os.ftruncate, failures, "truncate"))
    with pytest.raises(JournalError, match="No space"):
        await journal.append([tick(1)])
    assert failures == {"write": 0, "truncate": 0}
    assert await journal.append([tick(2)]) == 1
    assert await journal.append([tick(3)]) == 2
    assert [item.seq for _, item in journal.replay()] == [2, 3]  # type: ignore[union-attr]
    assert len(segments(journal.path)) == 1


@pytest.mark.parametrize("sync", ["thread", "loop"])
async def test_a_failed_group_left_in_an_abandoned_segment_is_not_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str
) -> None:
    # The sync of a written group fails and cutting it off fails too: its records stay in
    # the abandoned segment, and the next segment takes the same LSNs. Reopened, the
    # acknowledged records must win and the refused one must not come back.
    j = Journal(tmp_path, instance_id="ab", sync=sync)
    await j.open()
    assert await j.append([tick(0)]) == 1
    failures = {"sync": 1, "truncate": 1}
    monkeypatch.setattr(
        journal_module, "_sync", failing_once(journal_module._sync, failures, "sync")
    )
    monkeypatch.setattr(os, "ftruncate", failing_once(os.ftruncate, failures, "truncate"))
    with pytest.raises(JournalError):
        await j.append([tick(1)])  # refused: its caller is told it is not kept
    monkeypatch.undo()
    assert failures == {"sync": 0, "truncate": 0}
    assert await j.append([tick(2)]) == 2  # in a new segment, the refused one's LSN
    assert await j.append([tick(3)]) == 3
    await j.close()
    again = Journal(tmp_path, instance_id="ab", sync=sync)
    await again.open()
    assert [item.seq for _, item in again.replay()] == [0, 2, 3]  # type: ignore[union-attr]
    assert any("overlapping the next segment" in problem for problem in again.problems)
    await again.mark_stored(again.last_lsn)
    await again.close()


async def test_segments_rotate_and_stored_ones_are_deleted(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="seg", segment_bytes=2048)
    await j.open()
    for i in range(0, 60, 3):
        await j.append([tick(i), tick(i + 1), tick(i + 2)])
    files = segments(j.path)
    assert len(files) > 3
    batch = await j.read(0, max_records=1000)
    assert [lsn for lsn, _ in batch.records] == list(range(1, 61))
    await j.mark_stored(30)
    remaining = segments(j.path)
    assert len(remaining) < len(files)
    assert j.pending_records == 30
    assert (j.path / "checkpoint").read_text().strip() == "30"
    await j.close()  # pending records: the folder stays
    assert j.path.is_dir()

    again = Journal(tmp_path, instance_id="seg", segment_bytes=2048)
    await again.open()
    assert (again.stored_lsn, again.last_lsn) == (30, 60)
    assert [lsn for lsn, _ in again.replay()] == list(range(31, 61))
    await again.append([tick(1000)])
    assert again.last_lsn == 61
    await again.mark_stored(61)
    await again.close()
    assert not again.path.exists()  # fully stored: removed


async def test_stored_segments_are_deleted_even_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path, instance_id="full", segment_bytes=2048)
    await j.open()
    for i in range(0, 60, 3):
        await j.append([tick(i), tick(i + 1), tick(i + 2)])
    before = len(segments(j.path))
    real_checkpoint = Journal._write_checkpoint

    def needs_space(journal: Journal) -> None:
        if len(segments(journal.path)) == before:  # no room for a new file until some goes
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_checkpoint(journal)

    monkeypatch.setattr(Journal, "_write_checkpoint", needs_space)
    await j.mark_stored(30)
    assert len(segments(j.path)) < before
    assert (j.path / "checkpoint").read_text().strip() == "30"
    monkeypatch.undo()
    await j.close()
    again = Journal(tmp_path, instance_id="full", segment_bytes=2048)
    await again.open()
    assert [lsn for lsn, _ in again.replay()] == list(range(31, 61))
    await again.close()


def record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record every ``os.fsync`` and ``os.replace`` from now on, in order, as ``("fsync",
    inode synced)`` and ``("replace", inode renamed)``."""
    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


async def checkpointing_every_record(tmp_path: Path, *ticks: TickData) -> Journal:
    """An open journal that rewrites its checkpoint at every mark_stored, holding ``ticks``."""
    j = Journal(tmp_path, instance_id="cp", checkpoint_every=1)
    await j.open()
    await j.append(list(ticks))
    return j


async def test_the_checkpoint_is_synced_before_it_replaces_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = await checkpointing_every_record(tmp_path, tick(1), tick(2))
    events = record_syncs(monkeypatch)
    await j.mark_stored(1)
    monkeypatch.undo()
    checkpoint = (j.path / "checkpoint").stat().st_ino
    replaced = events.index(("replace", checkpoint))
    assert ("fsync", checkpoint) in events[:replaced]  # its bytes, before it takes the name
    assert ("fsync", j.path.stat().st_ino) in events[replaced:]  # then the rename
    await j.close()


class _ContendedLock:
    """A lock that reports when a second caller has to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


async def test_close_waits_for_a_checkpoint_a_cancelled_mark_stored_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mark_stored's worker thread goes on after its caller is cancelled (a close stopping
    # the writer); the close must not rewrite the checkpoint or remove the files meanwhile.
    j = await checkpointing_every_record(tmp_path, tick(1), tick(2))
    gate, inside = threading.Event(), threading.Event()
    lock = j._checkpointing = _ContendedLock()  # type: ignore[assignment]
    real_write = Journal._write_checkpoint
    close_saw_gate: list[bool] = []

    def held_write(self: Journal) -> None:
        inside.set()
        gate.wait(WAIT)
        real_write(self)

    def release_active(self: Journal, real: Any = Journal._release_active) -> None:
        close_saw_gate.append(gate.is_set())  # the close's file work begins...
        lock.contended.set()  # ...or goes ahead without waiting (what must not happen)
        real(self)

    monkeypatch.setattr(Journal, "_write_checkpoint", held_write)
    monkeypatch.setattr(Journal, "_release_active", release_active)
    marking = asyncio.create_task(j.mark_stored(2))
    await asyncio.to_thread(inside.wait, WAIT)
    marking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await marking
    closing = asyncio.create_task(j.close())
    await asyncio.to_thread(lock.contended.wait, WAIT)  # the close waits for the lock...
    gate.set()
    await closing
    assert close_saw_gate == [True]
    assert not j.path.exists()  # everything stored: the folder is removed


async def test_a_checkpoint_worker_that_close_overtook_writes_nothing(tmp_path: Path) -> None:
    # A mark_stored worker thread that reaches the lock only after the close finished must
    # not write its (older) checkpoint over what the close left, nor into a removed folder.
    j = await checkpointing_every_record(tmp_path, tick(1))
    await j.mark_stored(1)
    await j.close()
    assert not j.path.exists()
    await asyncio.to_thread(j._checkpoint_and_delete, [])
    assert not j.path.exists()


async def test_a_new_journal_root_is_durable_at_every_level_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "a" / "b" / "journal"
    events = record_syncs(monkeypatch)
    j = Journal(root, instance_id="deep")
    await j.open()
    monkeypatch.undo()
    synced = {inode for kind, inode in events if kind == "fsync"}
    for parent in (tmp_path, tmp_path / "a", tmp_path / "a" / "b", root):
        assert parent.stat().st_ino in synced, parent
    await j.close()


async def test_a_new_dead_letter_folder_is_durable_at_every_level_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = DeadLetterFile(tmp_path / "a" / "b" / "x.jsonl")
    events = record_syncs(monkeypatch)
    await dead.write([(encode_item(tick(7)), "refused")], time_ms=T0)
    monkeypatch.undo()
    synced = {inode for kind, inode in events if kind == "fsync"}
    for parent in (tmp_path, tmp_path / "a", tmp_path / "a" / "b", dead.path):
        assert parent.stat().st_ino in synced, parent


# --------------------------------------------------------------------------- damage


async def test_torn_tail_is_cut_off_and_kept_aside(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="torn")
    await j.open()
    await j.append([tick(0), tick(1), tick(2)])
    await j.close()
    (seg,) = segments(j.path)
    good_size = seg.stat().st_size
    frame = journal_module._frame(encode_item(tick(3)))
    with seg.open("ab") as fh:
        fh.write(frame[: len(frame) // 2])  # a crash in the middle of a write

    again = Journal(tmp_path, instance_id="torn")
    await again.open()
    assert [lsn for lsn, _ in again.replay()] == [1, 2, 3]
    assert len(again.problems) == 1
    assert "torn record" in again.problems[0]
    assert seg.stat().st_size == good_size
    (aside,) = again.path.glob("*.corrupt-*")
    assert aside.read_bytes() == frame[: len(frame) // 2]
    await again.append([tick(4)])  # appends go on after the last good record
    assert [lsn for lsn, _ in again.replay()] == [1, 2, 3, 4]
    await again.close()


def first_lsn(segment: Path) -> int:
    return int(segment.name.removesuffix(".seg"))


async def over_small_segments(
    root: Path, instance_id: str, records: int, **options: Any
) -> Journal:
    """An open journal holding ``records`` ticks appended three at a time over 1 KiB
    segments (several segments to delete from)."""
    j = Journal(root, instance_id=instance_id, segment_bytes=1024, **options)
    await j.open()
    for i in range(0, records, 3):
        await j.append([tick(i), tick(i + 1), tick(i + 2)])
    return j


async def test_a_segment_file_deleted_while_open_is_skipped_and_the_rest_read(
    tmp_path: Path,
) -> None:
    j = await over_small_segments(tmp_path, "gone", 60)
    files = segments(j.path)
    assert len(files) >= 4
    lost = range(first_lsn(files[1]), first_lsn(files[2]))
    kept = [lsn for lsn in range(1, 61) if lsn not in lost]
    files[1].unlink()  # a person's or a cleanup script's doing

    async with asyncio.timeout(WAIT):
        batch = await j.read(0, max_records=1_000)
    assert [lsn for lsn, _ in batch.records] == kept
    assert [decode_item(p).seq for _, p in batch.records] == [lsn - 1 for lsn in kept]  # type: ignore[union-attr]
    assert batch.end_lsn == 60
    (problem,) = j.problems
    assert files[1].name in problem
    assert f"records {lost[0]}..{lost[-1]} are lost" in problem
    assert j.stats().problems == 1
    await j.read(0, max_records=1_000)  # found again: reported once
    assert len(j.problems) == 1

    # Chunk by chunk, as the write path replays: the read moves past the gap.
    replayed: list[int] = []
    async with asyncio.timeout(WAIT):
        while j.stored_lsn < j.last_lsn:
            chunk = await j.read(j.stored_lsn, max_records=4)
            replayed += [lsn for lsn, _ in chunk.records]
            await j.mark_stored(chunk.end_lsn)  # deletes the missing segment too
    assert replayed == kept
    assert len(j.problems) == 1
    assert segments(j.path) == [files[-1]]  # the active one stays until the close
    assert j.stats().segments == 1
    await j.close()
    assert not j.path.exists()  # everything stored (or lost, and reported): removed


@pytest.mark.parametrize("found_by", ["checkpoint", "read", "roll", "close"])
@pytest.mark.parametrize("sync", ["thread", "loop", "aio"])
async def test_an_active_segment_deleted_while_open_is_reported_and_replaced(
    tmp_path: Path, sync: JournalSync, found_by: str
) -> None:
    j = Journal(tmp_path, instance_id="active", segment_bytes=1024, sync=sync)
    await j.open()
    await j.append([tick(0), tick(1), tick(2)])
    (deleted,) = segments(j.path)
    deleted.unlink()  # appends would go on into the deleted file and vanish with it
    if found_by == "close":
        await j.close()
        (problem,) = j.problems
        assert deleted.name in problem
        assert "records 1..3 are lost" in problem
        again = Journal(tmp_path, instance_id="active")
        await again.open()
        assert list(again.replay()) == []
        await again.close()
        return
    if found_by == "checkpoint":
        await j.mark_stored(1, durable=True)
        lost = "records 2..3 are lost"
    elif found_by == "read":
        async with asyncio.timeout(WAIT):
            batch = await j.read(0)
        assert (batch.records, batch.end_lsn) == ([], 3)
        lost = "records 1..3 are lost"
    else:  # found when the segment is full: what went into it meanwhile is lost too
        for i in range(3, 50):
            await j.append([tick(i)])
            if segments(j.path):
                break
        lost = f"records 1..{j.last_lsn - 1} are lost"
    (problem,) = j.problems
    assert deleted.name in problem
    assert lost in problem
    if found_by != "roll":
        await j.append([tick(100)])  # the next group starts a new segment
    (fresh,) = segments(j.path)
    assert first_lsn(fresh) == j.last_lsn
    async with asyncio.timeout(WAIT):
        batch = await j.read(0)
    assert [lsn for lsn, _ in batch.records] == [j.last_lsn]
    assert len(j.problems) == 1  # found again by the read and the roll: reported once
    await j.mark_stored(batch.end_lsn)
    await j.close()
    assert not j.path.exists()


def logical_size(*items: TickData) -> int:
    """Bytes of a segment holding ``items``: the magic, then one record each."""
    return len(MAGIC) + sum(len(journal_module._frame(encode_item(item))) for item in items)


async def test_segment_is_extended_with_zeros_ahead_and_trimmed_on_close(
    journal: Journal,
) -> None:
    await journal.append([tick(0), tick(1)])
    (seg,) = segments(journal.path)
    logical = logical_size(tick(0), tick(1))
    assert journal.stats().size_bytes == logical
    assert seg.stat().st_size == logical + journal_module.PREALLOCATE_BYTES
    assert seg.read_bytes()[logical:] == bytes(journal_module.PREALLOCATE_BYTES)
    await journal.append([tick(2)])  # fits in the zeros: the file does not grow
    assert seg.stat().st_size == logical + journal_module.PREALLOCATE_BYTES
    await journal.close()  # records not stored: the segment stays, without the zeros
    assert seg.stat().st_size == logical_size(tick(0), tick(1), tick(2))


async def test_a_group_larger_than_the_zeros_ahead_extends_past_it(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="big")
    await j.open()
    big = [tick(i) for i in range(journal_module.PREALLOCATE_BYTES // 100)]
    await j.append(big)
    (seg,) = segments(j.path)
    assert seg.stat().st_size == logical_size(*big) + journal_module.PREALLOCATE_BYTES
    await j.close()
    again = Journal(tmp_path, instance_id="big")
    await again.open()
    assert [item for _, item in again.replay()] == big
    await again.close()


def copy_segments(source: Path, target: Path) -> None:
    """What an owner killed mid-run leaves: its segments as they are, never closed."""
    target.mkdir()
    for seg in segments(source):
        (target / seg.name).write_bytes(seg.read_bytes())


async def test_zeros_after_the_last_record_are_not_damage(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="live")
    await j.open()
    await j.append([tick(0), tick(1), tick(2)])
    copy_segments(j.path, tmp_path / "dead")
    await j.close()

    again = Journal(tmp_path, instance_id="dead")
    await again.open()
    assert [lsn for lsn, _ in again.replay()] == [1, 2, 3]
    assert again.problems == []
    assert list(again.path.glob("*.corrupt-*")) == []
    await again.append([tick(3)])  # a new segment after the old one's records
    assert [lsn for lsn, _ in again.replay()] == [1, 2, 3, 4]
    await again.close()


async def test_a_record_inside_the_zeros_is_damage_kept_aside(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="live")
    await j.open()
    await j.append([tick(0), tick(1)])
    copy_segments(j.path, tmp_path / "dead")
    await j.close()
    (seg,) = segments(tmp_path / "dead")
    data = bytearray(seg.read_bytes())
    end = logical_size(tick(0), tick(1))
    stray = journal_module._frame(encode_item(tick(9)))
    data[end + 4096 : end + 4096 + len(stray)] = stray  # a record after a gap of zeros
    seg.write_bytes(bytes(data))

    again = Journal(tmp_path, instance_id="dead")
    await again.open()
    assert [item.seq for _, item in again.replay()] == [0, 1]  # type: ignore[union-attr]
    assert "invalid record length 0" in again.problems[0]
    (aside,) = again.path.glob("*.corrupt-*")
    assert aside.name.endswith(f".corrupt-{end}")
    assert stray in aside.read_bytes()  # kept for a person
    assert seg.stat().st_size == end
    await again.close()


async def test_crc_mismatch_stops_the_segment_there(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="crc")
    await j.open()
    await j.append([tick(i) for i in range(5)])
    await j.close()
    (seg,) = segments(j.path)
    data = bytearray(seg.read_bytes())
    record = len(journal_module._frame(encode_item(tick(0))))
    data[len(MAGIC) + 2 * record + 20] ^= 0xFF  # damage the third record's payload
    seg.write_bytes(bytes(data))

    again = Journal(tmp_path, instance_id="crc")
    await again.open()
    assert [item.seq for _, item in again.replay()] == [0, 1]  # type: ignore[union-attr]
    assert "CRC mismatch" in again.problems[0]
    (aside,) = again.path.glob("*.corrupt-*")
    assert len(aside.read_bytes()) == 3 * record  # kept for a person, not deleted
    assert zlib.crc32(aside.read_bytes()) != 0
    await again.close()


async def test_unknown_segment_format_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "fmt").mkdir()
    (tmp_path / "fmt" / f"{1:020d}.seg").write_bytes(b"NOTMAGIC" + b"x" * 40)
    again = Journal(tmp_path, instance_id="fmt")
    await again.open()
    assert again.pending_records == 0
    assert "unknown segment format" in again.problems[0]
    assert list(again.path.glob("*.corrupt-0"))
    await again.close()


# --------------------------------------------------------------------------- locks & orphans


async def test_a_held_journal_cannot_be_opened_twice(journal: Journal, tmp_path: Path) -> None:
    other = Journal(tmp_path, instance_id="me")
    with pytest.raises(JournalLockedError):
        await other.open()
    assert find_orphans(tmp_path) == []  # alive: not an orphan


async def test_an_owner_waits_out_another_routers_probe_of_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Journal(tmp_path, instance_id="fixed")
    await first.open()
    await first.append([tick(1)])
    await first.close()  # a restart with a fixed instance id: the journal is still there
    probe = journal_module._FileLock(first.path / journal_module.LOCK_NAME)
    assert probe.try_acquire(create=False)  # find_orphans in another router, mid-probe
    real = journal_module._FileLock.try_acquire
    attempts: list[bool] = []

    def try_acquire(lock: Any, *, create: bool = True) -> bool:
        got = real(lock, create=create)
        attempts.append(got)
        if not got:
            probe.release()  # the probe lets go right after its check
        return got

    monkeypatch.setattr(journal_module._FileLock, "try_acquire", try_acquire)
    again = Journal(tmp_path, instance_id="fixed")
    await again.open()
    assert attempts == [False, True]
    assert [item.seq for _, item in again.replay()] == [1]  # type: ignore[union-attr]
    await again.close()


class _SlowLoad:
    """Hold ``Journal._load`` (in the open's worker thread) until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.release, self.loaded = (threading.Event() for _ in range(3))
        real = Journal._load

        def slow_load(journal: Journal) -> None:
            self.entered.set()
            assert self.release.wait(WAIT)
            try:
                real(journal)
            finally:
                self.loaded.set()

        monkeypatch.setattr(Journal, "_load", slow_load)


async def orphan_with_one_record(root: Path) -> None:
    first = Journal(root, instance_id="orphan")
    await first.open()
    await first.append([tick(1)])
    await first.close()


async def assert_adoptable(root: Path) -> None:
    other = Journal(root, instance_id="orphan")
    await other.open(create=False)  # JournalLockedError if a lost open still held it
    assert [item.seq for _, item in other.replay()] == [1]  # type: ignore[union-attr]
    await other.mark_stored(other.last_lsn)
    await other.close()


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_cancelled_open_gives_back_the_lock_its_thread_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cancels: int
) -> None:
    await orphan_with_one_record(tmp_path)
    slow = _SlowLoad(monkeypatch)
    adopter = Journal(tmp_path, instance_id="orphan")
    opening = asyncio.ensure_future(adopter.open(create=False))
    assert await asyncio.to_thread(slow.entered.wait, WAIT)  # the lock is taken by now
    for _ in range(cancels):
        opening.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
    assert not opening.done()  # waits for the thread, whatever it is told
    slow.release.set()
    with pytest.raises(asyncio.CancelledError):
        await opening
    monkeypatch.undo()
    assert not adopter.is_open
    await assert_adoptable(tmp_path)


async def test_a_journal_closed_while_its_open_runs_ends_closed_and_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await orphan_with_one_record(tmp_path)
    slow = _SlowLoad(monkeypatch)
    adopter = Journal(tmp_path, instance_id="orphan")
    opening = asyncio.ensure_future(adopter.open(create=False))
    assert await asyncio.to_thread(slow.entered.wait, WAIT)
    await adopter.close()
    slow.release.set()
    with pytest.raises(JournalError, match="closed while it was being opened"):
        await opening
    monkeypatch.undo()
    assert not adopter.is_open
    await assert_adoptable(tmp_path)


async def test_a_closed_journal_leaves_the_folder_its_adopter_now_owns_alone(
    tmp_path: Path,
) -> None:
    old = await over_small_segments(tmp_path, "x", 30)
    await old.close()  # 30 records pending: the folder stays, unlocked (an orphan)
    adopter = Journal(tmp_path, instance_id="x", segment_bytes=1024)
    await adopter.open(create=False)
    with pytest.raises(JournalError, match="not open"):
        await old.mark_stored(30)  # a late call on the stale object
    assert [lsn for lsn, _ in adopter.replay()] == list(range(1, 31))
    await adopter.mark_stored(adopter.last_lsn)
    await adopter.close()


async def test_a_short_write_to_the_dead_letter_file_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls: list[int] = []

    def short_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:  # what write(2) may do as the disk fills up
            return real_write(fd, bytes(data)[: len(data) // 2])
        return real_write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", short_write)
    dead = DeadLetterFile(tmp_path / DEAD_LETTER_DIR / "x.jsonl")
    await dead.write([(encode_item(tick(i)), "refused") for i in range(4)], time_ms=T0)
    await dead.write([(encode_item(tick(9)), "refused")], time_ms=T0)
    monkeypatch.undo()
    lines = dead.path.read_bytes().splitlines()
    assert [orjson.loads(line)["data"]["seq"] for line in lines] == [0, 1, 2, 3, 9]
    assert len(calls) == 3  # the first write was finished by a second one


_CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from data_manager.journal import Journal
    from data_manager.models import TickData

    async def main() -> None:
        j = Journal(sys.argv[1], instance_id="child")
        await j.open()
        for i in range(10):
            await j.append([TickData(symbol="EUR/USD", timestamp=1_727_996_400_000 + i,
                                     bid=1.1, ask=1.2, source="child", seq=i)])
        print("ready", flush=True)
        time.sleep(600)

    asyncio.run(main())
    """
)


async def test_orphan_of_a_killed_process_is_found_and_adopted(tmp_path: Path) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line.strip() == b"ready"
        assert find_orphans(tmp_path) == []  # the lock is held while it lives
        with pytest.raises(JournalLockedError):
            await Journal(tmp_path, instance_id="child").open(create=False)
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()

    (orphan,) = find_orphans(tmp_path)
    assert orphan.name == "child"
    adopted = Journal(tmp_path, instance_id="child")
    await adopted.open(create=False)
    assert [item.seq for _, item in adopted.replay()] == list(range(10))  # type: ignore[union-attr]
    assert find_orphans(tmp_path) == []  # now held by us
    await adopted.mark_stored(adopted.last_lsn)
    await adopted.close()
    assert not orphan.exists()
    with pytest.raises(JournalLockedError):  # gone: nothing to adopt, nothing recreated
        await Journal(tmp_path, instance_id="child").open(create=False)


async def test_find_orphans_skips_dead_letters_and_cleans_interrupted_creations(
    tmp_path: Path,
) -> None:
    (tmp_path / DEAD_LETTER_DIR).mkdir()
    interrupted = tmp_path / ".tmp-x-1234"
    interrupted.mkdir()
    (interrupted / "lock").write_text("")
    (tmp_path / "not-a-journal").mkdir()
    assert find_orphans(tmp_path) == []
    assert interrupted.exists()  # fresh: may belong to a router starting right now
    old = time.time() - 3600
    os.utime(interrupted, (old, old))
    assert find_orphans(tmp_path) == []
    assert not interrupted.exists()
    assert find_orphans(tmp_path / "missing") == []


async def test_closed_journal_with_records_is_an_orphan_for_the_next_one(
    tmp_path: Path,
) -> None:
    j = Journal(tmp_path, instance_id="old")
    await j.open()
    await j.append([tick(1)])
    await j.close()
    assert find_orphans(tmp_path, exclude={"new"}) == [j.path]
    assert find_orphans(tmp_path, exclude={"old"}) == []


async def test_appends_racing_close_are_kept_or_refused(journal: Journal) -> None:
    # Producers keep appending while close() runs: each append is either acknowledged and
    # then on disk, or refused with JournalError; none is acknowledged and then lost.
    acked: list[int] = []
    refused: list[JournalError] = []
    going = asyncio.Event()

    async def produce(first: int) -> None:
        seq = first
        try:
            while True:
                await journal.append([tick(seq)])
                acked.append(seq)
                if len(acked) >= 200:
                    going.set()
                seq += 4
        except JournalError as exc:
            refused.append(exc)

    producers = [asyncio.create_task(produce(k)) for k in range(4)]
    await asyncio.wait_for(going.wait(), WAIT)
    await journal.close()
    await asyncio.wait_for(asyncio.gather(*producers), WAIT)
    assert len(refused) == 4
    assert "closing" in str(refused[0]) or "not open" in str(refused[0])
    reopened = Journal(journal.root, instance_id=journal.instance_id, sync="loop")
    await reopened.open()
    try:
        assert sorted(seqs(reopened)) == sorted(acked)
    finally:
        await reopened.close()


# --------------------------------------------------------------------------- dead letters


async def test_dead_letter_file_keeps_refused_items(tmp_path: Path) -> None:
    dead = DeadLetterFile(tmp_path / DEAD_LETTER_DIR / "x.jsonl")
    await dead.write([(encode_item(tick(7)), "refused"), (b"t{broken", "bad")], time_ms=T0)
    lines = [orjson.loads(line) for line in dead.path.read_bytes().splitlines()]
    assert lines[0]["data"]["seq"] == 7
    assert lines[0]["kind"] == "tick"
    assert lines[1]["raw"] == "t{broken"
    assert lines[1]["reason"] == "bad"
    assert dead.count == 2


async def test_a_deleted_active_segment_is_reported_from_its_own_first_record(
    tmp_path: Path,
) -> None:
    j = await over_small_segments(tmp_path, "a", 30, sync="thread")
    files = segments(j.path)
    assert len(files) >= 2
    active_first = first_lsn(files[-1])
    last = j.last_lsn
    files[-1].unlink()
    await j.mark_stored(1, durable=True)  # the checkpoint finds the active file gone
    (problem,) = j.problems
    # The records of the intact segments before it are not lost: they are read back.
    batch = await j.read(1, max_records=1_000)
    assert [lsn for lsn, _ in batch.records] == list(range(2, active_first))
    assert f"records {active_first}..{last} are lost" in problem
    await j.close()
    assert len(j.problems) == 1


async def test_a_segment_deleted_while_the_journal_was_closed_is_reported_at_open(
    tmp_path: Path,
) -> None:
    j = await over_small_segments(tmp_path, "c", 60, sync="thread")
    files = segments(j.path)
    lost = range(first_lsn(files[1]), first_lsn(files[2]))
    files[1].unlink()
    await j.close()  # records pending: the folder stays for the next router
    again = Journal(tmp_path, instance_id="c", segment_bytes=1024)
    await again.open()
    got = [lsn for lsn, _ in again.replay()]
    assert got == [lsn for lsn in range(1, j.last_lsn + 1) if lsn not in lost]
    (problem,) = again.problems
    assert f"records {lost[0]}..{lost[-1]} are missing" in problem
    await again.close()


async def test_a_checkpoint_behind_the_oldest_segment_leaves_no_gap_to_replay(
    tmp_path: Path,
) -> None:
    # A crash between deleting stored segments and rewriting the checkpoint leaves the
    # checkpoint behind the oldest segment: those records were stored, not lost.
    j = await over_small_segments(tmp_path, "ck", 60, sync="thread")
    files = segments(j.path)
    await j.mark_stored(first_lsn(files[1]) - 1)  # deletes the first segment
    await j.close()
    (j.path / "checkpoint").write_text("0\n")  # the older checkpoint a crash leaves
    again = Journal(tmp_path, instance_id="ck", segment_bytes=1024)
    await again.open()
    assert again.stored_lsn == first_lsn(files[1]) - 1
    assert again.pending_records == j.last_lsn - again.stored_lsn
    batch = await again.read(again.stored_lsn, max_records=1_000)
    assert batch.records[0][0] == again.stored_lsn + 1
    assert again.problems == []
    await again.close()
