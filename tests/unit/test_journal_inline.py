"""The journal with ``sync="loop"``: groups written and synced by the event loop itself.

The behaviour both committers share (records, failures, segments, orphans) runs against
both in ``test_journal.py``; this module covers what only the in-loop committer does.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import data_manager.journal as journal_module
from data_manager.errors import JournalError, ValidationError
from data_manager.journal import Journal
from data_manager.models import TickData
from tests.unit.conftest import WAIT
from tests.unit.test_journal_committer import seqs, tick

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from tests.unit.conftest import LoopThread


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = Journal(tmp_path, instance_id="inline", sync="loop")
    await j.open()
    yield j
    await j.close()


def test_sync_must_be_a_known_committer(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="'auto', 'thread', 'loop' or 'aio'"):
        Journal(tmp_path, instance_id="x", sync="disk")  # type: ignore[arg-type]


async def test_no_thread_and_the_sync_runs_on_the_event_loop(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not [t for t in threading.enumerate() if t.name == "journal-commit-inline"]
    threads: list[int] = []
    real_sync = journal_module._sync

    def recording_sync(fd: int) -> None:
        threads.append(threading.get_ident())
        real_sync(fd)

    monkeypatch.setattr(journal_module, "_sync", recording_sync)
    assert await journal.append([tick(0)]) == 1
    assert threads  # the new segment's sync, then the group's
    assert set(threads) == {threading.get_ident()}


async def test_the_appends_of_one_loop_iteration_share_one_sync(journal: Journal) -> None:
    await journal.append([tick(0)])
    before = journal.stats().fsyncs
    order: list[tuple[int, list[int | None]]] = []

    def on_durable(first: int, items: Sequence[TickData]) -> None:
        order.append((first, [t.seq for t in items]))

    lsns = await asyncio.gather(
        *(journal.append([tick(i)], on_durable=on_durable) for i in range(1, 11))
    )
    assert lsns == list(range(2, 12))  # in the order of the calls
    assert order == [(2, list(range(1, 11)))]  # reported together, in LSN order
    assert journal.stats().fsyncs == before + 1
    assert seqs(journal) == list(range(11))


async def test_a_cancelled_appender_does_not_cancel_the_write(journal: Journal) -> None:
    durable: list[int] = []
    task = asyncio.create_task(
        journal.append([tick(0)], on_durable=lambda first, items: durable.append(first))
    )
    await asyncio.sleep(0)  # the task runs up to its await: the record is queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await journal.wait_idle()
    assert durable == [1]
    assert seqs(journal) == [0]


async def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="closing", sync="loop")
    await j.open()
    tasks = [asyncio.create_task(j.append([tick(i)])) for i in range(3)]
    await asyncio.sleep(0)  # all three queued, none synced yet
    assert j.last_lsn == 0
    await j.close()
    assert [t.result() for t in tasks] == [1, 2, 3]
    again = Journal(tmp_path, instance_id="closing", sync="loop")
    await again.open()
    assert seqs(again) == [0, 1, 2]  # kept for the next router: nothing was stored
    await again.mark_stored(again.last_lsn)
    await again.close()


def test_two_event_loops_commit_in_one_lsn_order(
    tmp_path: Path, loops: tuple[LoopThread, LoopThread]
) -> None:
    one, two = loops
    j = Journal(tmp_path, instance_id="loops", sync="loop")
    one.run(j.open()).result(WAIT)
    seen: dict[int, asyncio.AbstractEventLoop] = {}

    def on_durable(first: int, items: Sequence[object]) -> None:
        for offset in range(len(items)):
            seen[first + offset] = asyncio.get_running_loop()

    async def produce(first: int) -> list[int]:
        return [
            await j.append([tick(i)], on_durable=on_durable) for i in range(first, first + 200, 2)
        ]

    a, b = one.run(produce(0)), two.run(produce(1))
    lsns_one, lsns_two = a.result(WAIT), b.result(WAIT)
    assert lsns_one == sorted(lsns_one)
    assert lsns_two == sorted(lsns_two)
    assert sorted(lsns_one + lsns_two) == list(range(1, 201))
    assert {seen[lsn] for lsn in lsns_one} == {one.loop}
    assert {seen[lsn] for lsn in lsns_two} == {two.loop}
    items = list(j.replay())  # file order is LSN order, each record where its loop was told
    assert [lsn for lsn, _ in items] == list(range(1, 201))
    by_lsn = {lsn: item for lsn, item in items}
    assert all(isinstance(by_lsn[lsn], TickData) for lsn in lsns_one)
    assert [by_lsn[lsn].seq for lsn in lsns_one] == list(range(0, 200, 2))  # type: ignore[union-attr]
    assert [by_lsn[lsn].seq for lsn in lsns_two] == list(range(1, 200, 2))  # type: ignore[union-attr]
    one.run(j.mark_stored(200)).result(WAIT)
    one.run(j.close()).result(WAIT)
    assert not j.path.exists()


def test_appends_queued_on_another_loop_fail_once_the_journal_is_closed(
    tmp_path: Path, loops: tuple[LoopThread, LoopThread]
) -> None:
    one, two = loops
    j = Journal(tmp_path, instance_id="late", sync="loop")
    one.run(j.open()).result(WAIT)
    blocked, release = threading.Event(), threading.Event()

    async def queue_then_block() -> asyncio.Future[int]:
        append = asyncio.ensure_future(j.append([tick(0)]))
        await asyncio.sleep(0)  # the append queues its record; its commit is scheduled next
        blocked.set()
        release.wait(WAIT)  # hold this loop before the commit runs
        return append

    queued = two.run(queue_then_block())
    assert blocked.wait(WAIT)
    one.run(j.close()).result(WAIT)
    release.set()
    append = queued.result(WAIT)
    with pytest.raises(JournalError, match="closed"):
        two.run(asyncio.wait_for(append, WAIT)).result(WAIT)
    assert not j.path.exists()  # nothing was written after close
