"""The journal's committer thread: group commit, ordering, failures, close, fork, loops.

A :class:`SyncGate` replaces the journal's ``_sync`` so a test can hold the committer thread
inside one group's sync while more appends queue up behind it: what forms the next group is
then decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import data_manager.journal as journal_module
from data_manager.journal import Journal, JournalError, find_orphans
from data_manager.models import TickData
from tests.unit.conftest import WAIT

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from tests.unit.conftest import LoopThread

T0 = 1_727_996_400_000


def tick(seq: int) -> TickData:
    return TickData(
        symbol="EUR/USD", timestamp=T0 + seq, bid=1.1, ask=1.1002, source="test", seq=seq
    )


def seqs(journal: Journal) -> list[int]:
    out: list[int] = []
    for _, item in journal.replay():
        assert isinstance(item, TickData)
        assert item.seq is not None
        out.append(item.seq)
    return out


class Hold:
    """One sync the committer thread will be kept in until the test releases it."""

    def __init__(self, *, fail: bool) -> None:
        self.fail = fail
        self.entered = threading.Event()
        self.release = threading.Event()

    async def reached(self) -> None:
        """Wait until the committer thread sits in this sync."""
        assert await asyncio.to_thread(self.entered.wait, WAIT)


class SyncGate:
    """Stands in for ``journal._sync``: counts syncs and holds the ones asked for, in order."""

    def __init__(self, real: Callable[[int], None]) -> None:
        self._real = real
        self._holds: list[Hold] = []
        self.calls = 0

    def hold(self, *, fail: bool = False) -> Hold:
        """Hold the next sync not already held (and fail it afterwards, if asked)."""
        hold = Hold(fail=fail)
        self._holds.append(hold)
        return hold

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self._holds:
            hold = self._holds.pop(0)
            hold.entered.set()
            if not hold.release.wait(WAIT):
                msg = "the test never released the sync"
                raise RuntimeError(msg)
            if hold.fail:
                raise OSError(5, "Input/output error")
        self._real(fd)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> SyncGate:
    g = SyncGate(journal_module._sync)
    monkeypatch.setattr(journal_module, "_sync", g)
    return g


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = Journal(tmp_path, instance_id="committer", sync="thread")
    await j.open()
    yield j
    await j.close()


async def queued(journal: Journal, count: int) -> None:
    """Wait until ``count`` appends wait in the committer's queue (not yet taken)."""
    committer = journal._committer
    assert isinstance(committer, journal_module._Committer)
    deadline = time.monotonic() + WAIT
    while True:
        with committer._mutex:
            if len(committer._queue) >= count:
                return
        assert time.monotonic() < deadline
        await asyncio.sleep(0)


async def hold_one_group(
    journal: Journal, gate: SyncGate, seq: int
) -> tuple[asyncio.Task[int], Hold]:
    """Start an append and keep the committer inside its sync."""
    hold = gate.hold()
    first = asyncio.create_task(journal.append([tick(seq)]))
    await hold.reached()
    return first, hold


def committer_thread(journal: Journal) -> threading.Thread:
    committer = journal._committer
    assert committer is not None
    assert committer.thread is not None
    return committer.thread


# --------------------------------------------------------------------------- group commit


async def test_appends_arriving_during_a_sync_share_the_next_one(
    journal: Journal, gate: SyncGate
) -> None:
    await journal.append([tick(0)])  # creates the segment (a sync of its own)
    before = journal.stats()
    first, hold = await hold_one_group(journal, gate, 1)
    rest = [asyncio.create_task(journal.append([tick(i)])) for i in range(2, 22)]
    await queued(journal, len(rest))
    hold.release.set()
    lsns = [await first] + [await task for task in rest]
    assert lsns == list(range(2, 23))
    after = journal.stats()
    assert after.fsyncs - before.fsyncs == 2  # the held group, then all 20 in one
    assert after.appends - before.appends == 2
    assert after.records_appended - before.records_appended == 21
    assert seqs(journal) == list(range(22))


async def test_a_synced_group_is_acknowledged_while_the_next_one_syncs(
    journal: Journal, gate: SyncGate
) -> None:
    await journal.append([tick(0)])
    first, hold = await hold_one_group(journal, gate, 1)
    second = asyncio.create_task(journal.append([tick(2)]))
    await queued(journal, 1)
    next_hold = gate.hold()
    hold.release.set()
    await next_hold.reached()  # the committer now syncs the second group ...
    assert (await first) == 2  # ... and the first one's appender has resumed meanwhile
    assert not second.done()
    next_hold.release.set()
    assert (await second) == 3
    assert seqs(journal) == [0, 1, 2]


async def test_lsns_follow_the_order_of_the_calls_and_callbacks_come_first(
    journal: Journal, gate: SyncGate
) -> None:
    await journal.append([tick(0)])
    events: list[tuple[str, int] | tuple[str, int, list[int | None]]] = []

    def on_durable(first: int, items: Sequence[TickData]) -> None:
        events.append(("durable", first, [t.seq for t in items]))

    async def append(batch: list[int]) -> None:
        last = await journal.append([tick(s) for s in batch], on_durable=on_durable)
        events.append(("resumed", last))

    first, hold = await hold_one_group(journal, gate, 1)
    batches = [[2, 3], [4], [5, 6, 7], [8]]
    tasks = [asyncio.create_task(append(b)) for b in batches]
    await queued(journal, len(tasks))
    hold.release.set()
    await asyncio.gather(first, *tasks)
    # One group: its appends, one after the other with one callback, are reported in one
    # call (from the first one's LSN, in order), before any appender resumed.
    assert events == [
        ("durable", 3, [2, 3, 4, 5, 6, 7, 8]),
        ("resumed", 4),
        ("resumed", 5),
        ("resumed", 8),
        ("resumed", 9),
    ]
    assert seqs(journal) == list(range(9))


async def test_concurrent_appenders_get_consecutive_lsns_without_a_gate(
    journal: Journal,
) -> None:
    seen: list[int] = []

    def on_durable(first: int, items: Sequence[object]) -> None:
        seen.extend(range(first, first + len(items)))

    async def producer(k: int) -> list[int]:
        return [
            await journal.append([tick(1000 * k + i)], on_durable=on_durable) for i in range(50)
        ]

    results = await asyncio.gather(*(producer(k) for k in range(8)))
    for lsns in results:
        assert lsns == sorted(lsns)
    assert sorted(lsn for lsns in results for lsn in lsns) == list(range(1, 401))
    assert seen == list(range(1, 401))  # callbacks in LSN order across groups
    stats = journal.stats()
    assert stats.records_appended == 400
    assert 1 <= stats.fsyncs <= 400
    by_lsn = dict(journal.replay())
    for k, lsns in enumerate(results):
        assert [by_lsn[lsn].seq for lsn in lsns] == [1000 * k + i for i in range(50)]  # type: ignore[union-attr]


# --------------------------------------------------------------------------- failures


async def test_a_failed_group_fails_only_its_appenders(journal: Journal, gate: SyncGate) -> None:
    await journal.append([tick(0)])
    hold = gate.hold(fail=True)
    doomed = asyncio.create_task(journal.append([tick(1), tick(2)]))
    await hold.reached()
    survivors = [asyncio.create_task(journal.append([tick(i)])) for i in (3, 4, 5)]
    await queued(journal, len(survivors))
    hold.release.set()
    with pytest.raises(JournalError, match="Input/output error"):
        await doomed
    assert [await task for task in survivors] == [2, 3, 4]  # right after the last good one
    assert seqs(journal) == [0, 3, 4, 5]
    assert (await journal.append([tick(6)])) == 5  # and the journal goes on
    size = journal.size_bytes
    await journal.close()

    again = Journal(journal.root, instance_id=journal.instance_id, sync="thread")
    await again.open()
    assert seqs(again) == [0, 3, 4, 5, 6]  # the failed bytes were cut off, not left torn
    assert again.problems == []
    assert again.size_bytes == size
    await again.mark_stored(again.last_lsn)
    await again.close()


async def test_a_cancelled_appender_does_not_cancel_the_write(
    journal: Journal, gate: SyncGate
) -> None:
    await journal.append([tick(0)])
    durable: list[int] = []
    hold = gate.hold()
    task = asyncio.create_task(
        journal.append([tick(1)], on_durable=lambda first, items: durable.append(first))
    )
    await hold.reached()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    hold.release.set()
    await journal.wait_idle()
    assert durable == [2]
    assert journal.last_lsn == 2
    assert seqs(journal) == [0, 1]


# --------------------------------------------------------------------------- lifecycle


async def test_committer_thread_lives_from_open_to_close(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="life", sync="thread")
    assert j._committer is None
    await j.open()
    thread = committer_thread(j)
    assert thread.is_alive()
    assert thread.daemon
    assert thread.name == "journal-commit-life"
    await j.append([tick(0)])
    await j.close()
    assert not thread.is_alive()
    assert j._committer is None


async def test_close_waits_for_pending_groups(tmp_path: Path, gate: SyncGate) -> None:
    j = Journal(tmp_path, instance_id="closing", sync="thread")
    await j.open()
    await j.append([tick(0)])
    held, hold = await hold_one_group(j, gate, 1)
    queued_appends = [asyncio.create_task(j.append([tick(i)])) for i in (2, 3)]
    await queued(j, len(queued_appends))
    closing = asyncio.create_task(j.close())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not closing.done()  # held by the sync in progress
    assert j.is_open
    hold.release.set()
    await closing
    assert [await held] + [await t for t in queued_appends] == [2, 3, 4]
    assert not j.is_open
    with pytest.raises(JournalError, match="not open"):
        await j.append([tick(5)])

    again = Journal(tmp_path, instance_id="closing", sync="thread")  # not stored: kept for replay
    await again.open()
    assert seqs(again) == [0, 1, 2, 3]
    await again.mark_stored(again.last_lsn)
    await again.close()


async def test_concurrent_closes_both_return_once_closed(tmp_path: Path, gate: SyncGate) -> None:
    j = Journal(tmp_path, instance_id="twice", sync="thread")
    await j.open()
    hold = gate.hold()
    pending = asyncio.create_task(j.append([tick(1)]))
    assert await asyncio.to_thread(hold.entered.wait, WAIT)  # close() must wait for it
    closes = asyncio.gather(j.close(), j.close())
    await asyncio.sleep(0)
    hold.release.set()
    await asyncio.wait_for(closes, WAIT)
    assert await pending == 1
    assert not j.is_open
    assert j.path.is_dir()  # one record not stored: kept for the next router


async def test_a_cancelled_close_still_closes_and_unlocks(tmp_path: Path, gate: SyncGate) -> None:
    j = Journal(tmp_path, instance_id="cancelled", sync="thread")
    await j.open()
    held, hold = await hold_one_group(j, gate, 1)
    closing = asyncio.create_task(j.close())
    for _ in range(20):
        await asyncio.sleep(0)
    closing.cancel()  # while close() waits for the group in its sync
    hold.release.set()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert await held == 1
    assert not j.is_open
    again = Journal(tmp_path, instance_id="cancelled", sync="thread")
    await again.open(create=False)  # unlocked: the next router adopts it
    assert seqs(again) == [1]
    await again.mark_stored(again.last_lsn)
    await again.close()


async def test_append_before_open_or_after_close_raises(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="states", sync="thread")
    with pytest.raises(JournalError, match="not open"):
        await j.append([tick(0)])
    await j.open()
    await j.append([tick(0)])
    await j.mark_stored(j.last_lsn)
    await j.close()
    with pytest.raises(JournalError, match="not open"):
        await j.append([tick(1)])
    await j.wait_idle()  # nothing to wait for, and no committer to ask
    await j.close()  # idempotent


async def test_wait_idle_returns_once_earlier_appends_are_settled(
    journal: Journal, gate: SyncGate
) -> None:
    await journal.append([tick(0)])
    held, hold = await hold_one_group(journal, gate, 1)
    idle = asyncio.create_task(journal.wait_idle())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not idle.done()
    hold.release.set()
    await idle
    assert held.done()
    assert held.result() == 2


async def test_an_unclosed_journal_is_collected_and_its_thread_ends(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="dropped", sync="thread")
    await j.open()
    await j.append([tick(0)])
    thread = committer_thread(j)
    del j
    gc.collect()
    thread.join(WAIT)
    assert not thread.is_alive()


def wait_for_child(pid: int) -> int | None:
    """The child's exit code; ``None`` (and the child killed) if it hangs."""
    deadline = time.monotonic() + WAIT
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(waited[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
async def test_a_forked_child_forgets_the_journal_and_the_parent_keeps_it(
    journal: Journal,
) -> None:
    await journal.append([tick(0)])
    # Fork while the lock the committer shares with the event loop is held, as the
    # committer may hold it at any fork: the child must not inherit it held.
    pid = -1
    journal._io.acquire()
    try:
        with warnings.catch_warnings():  # 3.12+ warns about forking a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    finally:
        if pid != 0:
            journal._io.release()  # the parent's; the child keeps its copy as it was
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:

            async def child() -> bool:
                try:
                    await journal.append([tick(99)])
                except JournalError:
                    return True
                return False

            refused = asyncio.run(child())
            stats = journal.stats()  # takes the journal's lock
            if refused and not journal.is_open and journal._committer is None and stats:
                code = 0
        finally:
            os._exit(code)
    status = await asyncio.to_thread(wait_for_child, pid)
    assert status == 0
    # The child closed its copies without unlocking: the parent still owns and uses it.
    assert not journal_module._lock_is_free(journal.path / journal_module.LOCK_NAME)
    assert (await journal.append([tick(1)])) == 2
    assert committer_thread(journal).is_alive()
    assert seqs(journal) == [0, 1]


# --------------------------------------------------------------------------- several loops


def test_one_group_from_two_event_loops_settles_on_each_loop(
    tmp_path: Path, gate: SyncGate, loops: tuple[LoopThread, LoopThread]
) -> None:
    one, two = loops
    j = Journal(tmp_path, instance_id="loops", sync="thread")
    one.run(j.open()).result(WAIT)
    one.run(j.append([tick(0)])).result(WAIT)
    calls: list[tuple[int, asyncio.AbstractEventLoop, list[int | None]]] = []

    def on_durable(first: int, items: Sequence[TickData]) -> None:
        calls.append((first, asyncio.get_running_loop(), [t.seq for t in items]))

    hold = gate.hold()
    held = one.run(j.append([tick(1)]))
    assert hold.entered.wait(WAIT)
    committer = j._committer
    assert isinstance(committer, journal_module._Committer)
    futures = []
    for i, lt in enumerate([one, two, two, one, two], start=2):
        futures.append(lt.run(j.append([tick(i)], on_durable=on_durable)))
        deadline = time.monotonic() + WAIT
        while True:  # queued in this order: wait for each before the next
            with committer._mutex:
                if len(committer._queue) == len(futures):
                    break
            assert time.monotonic() < deadline
            time.sleep(0.001)
    hold.release.set()
    assert held.result(WAIT) == 2
    assert [f.result(WAIT) for f in futures] == [3, 4, 5, 6, 7]
    assert sorted(calls, key=lambda c: c[0]) == [
        (3, one.loop, [2]),
        (4, two.loop, [3, 4]),  # neighbours on one loop: one call
        (6, one.loop, [5]),
        (7, two.loop, [6]),
    ]
    assert gate.calls >= 3
    one.run(j.mark_stored(7)).result(WAIT)
    one.run(j.close()).result(WAIT)
    assert not j.path.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
async def test_a_child_forked_during_an_orphan_probe_does_not_keep_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = Journal(tmp_path, instance_id="dead", sync="loop")
    await dead.open()
    await dead.append([tick(1)])
    await dead.close()  # an orphan

    probing, forked = threading.Event(), threading.Event()
    real_release = journal_module._FileLock.release

    def release(lock: journal_module._FileLock) -> None:
        if lock.path.parent.name == "dead" and not probing.is_set():
            probing.set()
            assert forked.wait(WAIT)  # another thread forks while the probe holds the lock
        real_release(lock)

    monkeypatch.setattr(journal_module._FileLock, "release", release)
    scan = asyncio.ensure_future(asyncio.to_thread(find_orphans, tmp_path))
    assert await asyncio.to_thread(probing.wait, WAIT)
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child: a long-lived worker that knows nothing of journals
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        forked.set()
        assert [p.name for p in await scan] == ["dead"]
        monkeypatch.undo()
        adopter = Journal(tmp_path, instance_id="dead", sync="loop")
        await adopter.open(create=False)  # JournalLockedError while the child lives
        assert [i.seq for _, i in adopter.replay()] == [1]
        await adopter.close()
    finally:
        os.write(w, b"x")
        os.close(w)
        await asyncio.to_thread(wait_for_child, pid)
