"""The journal with ``sync="aio"``: the event loop writes, Linux AIO syncs in the background.

The behaviour every committer shares (records, failures, segments, orphans) runs against all
of them in ``test_journal.py``; this module covers what only the AIO committer does, and the
``auto`` choice.
"""

from __future__ import annotations

import asyncio
import errno
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import data_manager.journal as journal_module
from data_manager.errors import JournalError
from data_manager.journal import Journal
from tests.unit.conftest import WAIT
from tests.unit.test_journal_committer import seqs, tick

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.unit.conftest import LoopThread

pytest.importorskip("libaio", reason="Linux AIO needs the libaio package")


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = Journal(tmp_path, instance_id="aio", sync="aio")
    await j.open()
    yield j
    await j.close()


def committer(journal: Journal) -> journal_module._AioCommitter:
    c = journal._committer
    assert isinstance(c, journal_module._AioCommitter)
    return c


async def test_no_thread_and_no_blocking_sync_for_groups(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not [t for t in threading.enumerate() if t.name == "journal-commit-aio"]
    await journal.append([tick(0)])  # creates the segment (synced directly, once)
    blocking: list[int] = []
    monkeypatch.setattr(journal_module, "_sync", blocking.append)
    assert await journal.append([tick(1), tick(2)]) == 3
    assert blocking == []  # the group's sync went to the kernel
    assert journal.stats().fsyncs == 2


async def test_appends_during_a_sync_form_the_next_group(journal: Journal) -> None:
    await journal.append([tick(0)])
    c = committer(journal)
    loop = asyncio.get_running_loop()
    # Hold back the completion of the next sync: the loop does not read the eventfd.
    loop.remove_reader(c._efd.fileno())
    first = asyncio.ensure_future(journal.append([tick(1)]))
    await asyncio.sleep(0)  # append queues it; the next loop pass writes it, submits the sync
    await asyncio.sleep(0)
    assert c._inflight is not None
    later = [asyncio.ensure_future(journal.append([tick(i)])) for i in range(2, 12)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not first.done()  # its sync completed in the kernel, but nobody read it yet
    assert len(c._queue) == 10  # the others wait for the next group, not for a sync each
    before = journal.stats().fsyncs
    loop.add_reader(c._efd.fileno(), c._completed)
    assert await asyncio.wait_for(first, WAIT) == 2
    assert await asyncio.wait_for(asyncio.gather(*later), WAIT) == list(range(3, 13))
    assert journal.stats().fsyncs == before + 2  # the held group, then the ten as one
    assert seqs(journal) == list(range(12))


class _SubmitRaises:
    """An AIO context whose ``submit`` raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def submit(self, blocks: list[object]) -> int:
        raise self.error

    def close(self) -> None:
        pass


async def test_a_refused_request_is_synced_in_the_loop_instead(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    await journal.append([tick(0)])
    c = committer(journal)
    blocking: list[int] = []
    real_sync = journal_module._sync

    def recording_sync(fd: int) -> None:
        blocking.append(fd)
        real_sync(fd)

    real_ctx = c._ctx
    monkeypatch.setattr(c, "_ctx", _SubmitRaises(OSError(errno.EINVAL, "Invalid argument")))
    monkeypatch.setattr(journal_module, "_sync", recording_sync)
    assert await journal.append([tick(1)]) == 2  # acknowledged, durable all the same
    assert len(blocking) == 1
    monkeypatch.setattr(c, "_ctx", real_ctx)
    assert seqs(journal) == [0, 1]


async def test_an_unexpected_error_submitting_fails_the_group_instead_of_stranding_it(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    await journal.append([tick(0)])
    c = committer(journal)
    real_ctx = c._ctx
    monkeypatch.setattr(c, "_ctx", _SubmitRaises(RuntimeError("not the kernel's answer")))
    with pytest.raises(JournalError, match="not the kernel's answer"):
        await asyncio.wait_for(journal.append([tick(1)]), WAIT)
    monkeypatch.setattr(c, "_ctx", real_ctx)
    assert await asyncio.wait_for(journal.append([tick(2)]), WAIT) == 2
    assert seqs(journal) == [0, 2]


def test_appends_from_another_event_loop_are_refused(
    tmp_path: Path, loops: tuple[LoopThread, LoopThread]
) -> None:
    one, two = loops
    j = Journal(tmp_path, instance_id="bound", sync="aio")
    one.run(j.open()).result(WAIT)
    with pytest.raises(JournalError, match="another event loop"):
        two.run(j.append([tick(0)])).result(WAIT)
    assert one.run(j.append([tick(1)])).result(WAIT) == 1
    one.run(j.mark_stored(1)).result(WAIT)
    one.run(j.close()).result(WAIT)
    assert not j.path.exists()


async def test_auto_uses_aio_where_it_works(tmp_path: Path) -> None:
    j = Journal(tmp_path, instance_id="auto")
    assert j.sync == "auto"
    await j.open()
    try:
        assert isinstance(j._committer, journal_module._AioCommitter)
        assert await j.append([tick(0)]) == 1
    finally:
        await j.close()


async def test_without_libaio_auto_falls_back_to_a_thread_and_aio_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "libaio", None)  # import libaio -> ImportError
    auto = Journal(tmp_path, instance_id="fallback")
    await auto.open()
    try:
        assert isinstance(auto._committer, journal_module._Committer)
        assert await auto.append([tick(0)]) == 1
    finally:
        await auto.close()

    strict = Journal(tmp_path, instance_id="strict", sync="aio")
    with pytest.raises(JournalError, match="libaio"):
        await strict.open()
    assert not strict.is_open
    again = Journal(tmp_path, instance_id="strict", sync="thread")
    await again.open()  # the failed open left the folder unlocked
    await again.close()
