"""The write path against real PostgreSQL servers and real process deaths.

Every test ends with the same check: the rows in the table are exactly what was accepted
(acknowledged), each once. Servers are stopped and started for real
(``postgres_server_factory``); producers are separate processes killed with SIGKILL. A
power loss is simulated with LazyFS, which drops every byte the journal did not sync
(``tests/servers_lazyfs.py``; runs only when ``DATA_MANAGER_TEST_LAZYFS`` is set).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import pytest

from data_manager.breaker import CircuitBreaker
from data_manager.errors import BackpressureTimeoutError
from data_manager.ingest import IngestPipeline
from data_manager.journal import Journal, find_orphans
from data_manager.models import TickData
from data_manager.settings import PostgresSettings
from tests.servers_lazyfs import LAZYFS_ENV, LazyFS, lazyfs_binary, start_lazyfs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from data_manager.storage.postgres import PostgresStorage
    from tests.servers import PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

T0: Final = 1_727_996_400_000
ROOT: Final = Path(__file__).resolve().parents[2]
DEADLINE: Final = 60.0


def tick(seq: int, source: str = "faults") -> TickData:
    return TickData(
        symbol="EUR/USD", timestamp=T0 + seq, bid=1.1, ask=1.1002, source=source, seq=seq
    )


def pipeline_options(**overrides: Any) -> dict[str, Any]:
    """Fast retries and a short breaker so the faults play out in seconds."""
    options: dict[str, Any] = {
        "batch_size": 50,
        "flush_interval": 0.02,
        "retry_attempts": 2,
        "retry_initial": 0.01,
        "retry_max_backoff": 0.05,
        "breaker": CircuitBreaker("database", failure_threshold=2, reset_timeout=0.2),
        "orphan_scan_interval": None,
    }
    options.update(overrides)
    return options


def settings(url: str, schema: str) -> PostgresSettings:
    return PostgresSettings(
        url=url,
        db_schema=schema,
        pool_min=1,
        pool_max=4,
        pool_timeout=2.0,
        connect_timeout=2.0,
        statement_timeout=10.0,
    )


async def open_storage(url: str, schema: str) -> PostgresStorage:
    from data_manager.storage.postgres import PostgresStorage

    storage = PostgresStorage(settings(url, schema))
    await storage.connect()
    await storage.create_schema()
    return storage


async def stored_seqs(url: str, schema: str, source: str = "faults") -> list[int]:
    """Every stored seq of ``source``, duplicates included, sorted."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            f'SELECT seq FROM "{schema}".ticks WHERE source = $1', source, timeout=10
        )
    finally:
        await conn.close(timeout=10)
    return sorted(r["seq"] for r in rows)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll with a deadline (fault tests only: the change comes from another process)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def fault_server(
    postgres_server_factory: Callable[[], PostgresServer],
) -> PostgresServer:
    """One dedicated server for the tests of this module that stop and start it."""
    return postgres_server_factory()


@pytest.fixture
def server(fault_server: PostgresServer) -> Iterator[PostgresServer]:
    if not fault_server.running:
        fault_server.start()
    yield fault_server
    if not fault_server.running:
        fault_server.start()


@pytest.fixture
def schema() -> str:
    """A fresh schema name on the dedicated server (the server is thrown away at the end)."""
    return f"faults_{secrets.token_hex(4)}"


@pytest.fixture
def lazyfs() -> Iterator[LazyFS]:
    """A throwaway LazyFS mount (skips without ``DATA_MANAGER_TEST_LAZYFS``)."""
    binary = lazyfs_binary()
    if binary is None:
        pytest.skip(f"set {LAZYFS_ENV} to a lazyfs executable to simulate power losses")
    with start_lazyfs(binary) as fs:
        yield fs


@pytest.fixture
async def closing() -> AsyncIterator[list[Any]]:
    """Close pipelines and storages a test leaves open, whatever happened."""
    resources: list[Any] = []
    yield resources
    for resource in reversed(resources):
        with contextlib.suppress(Exception):
            if isinstance(resource, IngestPipeline):
                await resource.close(timeout=5)
            else:
                await resource.close()


# --------------------------------------------------------------------------- outages


async def test_database_stopped_mid_ingest_loses_nothing(
    server: PostgresServer, schema: str, tmp_path: Path, closing: list[Any]
) -> None:
    storage = await open_storage(server.url, schema)
    closing.append(storage)
    pipeline = IngestPipeline(
        storage, journal=Journal(tmp_path, instance_id="a"), **pipeline_options()
    )
    closing.append(pipeline)
    await pipeline.start()
    seq = 0

    async def produce(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            await pipeline.submit(tick(seq))
            seq += 1
            if seq % 25 == 0:
                await asyncio.sleep(0.001)  # a live feed, not one burst

    await produce(1_000)
    await asyncio.to_thread(server.stop)
    await produce(1_000)  # the database is down: ingest goes on
    await until(lambda: pipeline.stats().spilled > 0, "batches to reach the journal")
    assert pipeline.stats().breaker_state in ("open", "half_open")
    await asyncio.to_thread(server.start)
    await produce(1_000)
    await pipeline.flush(timeout=DEADLINE)
    assert await stored_seqs(server.url, schema) == list(range(3_000))
    stats = pipeline.stats()
    assert (stats.journal_records, stats.backlog_journals, stats.breaker_state) == (
        0,
        0,
        "closed",
    )
    assert stats.replayed >= stats.spilled > 0


async def test_full_queue_pushes_back_and_loses_nothing(
    server: PostgresServer, schema: str, closing: list[Any]
) -> None:
    storage = await open_storage(server.url, schema)
    closing.append(storage)
    pipeline = IngestPipeline(
        storage, journal=None, **pipeline_options(max_queue=200, max_batch=50, put_timeout=0.01)
    )
    closing.append(pipeline)
    await pipeline.start()
    await asyncio.to_thread(server.stop)
    accepted: list[int] = []
    refused = 0
    for seq in range(600):
        try:
            await pipeline.submit(tick(seq))
        except BackpressureTimeoutError:
            refused += 1
        else:
            accepted.append(seq)
    assert refused > 0
    assert len(accepted) <= 200 + 50  # the bound, plus the batch the writer holds
    assert pipeline.stats().backpressure_timeouts == refused

    pipeline.configure(put_timeout=None)  # now a full queue makes the producer wait
    blocked = asyncio.create_task(pipeline.submit(tick(10_000)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not blocked.done()
    await asyncio.to_thread(server.start)
    await asyncio.wait_for(blocked, DEADLINE)  # room again once the database is back
    accepted.append(10_000)
    await pipeline.flush(timeout=DEADLINE)
    assert await stored_seqs(server.url, schema) == sorted(accepted)


@pytest.mark.parametrize("power_loss", [False, True], ids=["restart", "power-loss"])
async def test_close_with_database_down_is_replayed_by_the_next_start(
    server: PostgresServer,
    schema: str,
    tmp_path: Path,
    closing: list[Any],
    request: pytest.FixtureRequest,
    power_loss: bool,
) -> None:
    # With power_loss, the journal goes through LazyFS and the machine "loses power" right
    # after close() returns: what close() left must already be synced.
    fs: LazyFS | None = request.getfixturevalue("lazyfs") if power_loss else None
    folder = tmp_path if fs is None else fs.mount
    storage = await open_storage(server.url, schema)
    closing.append(storage)
    first = IngestPipeline(
        storage, journal=Journal(folder, instance_id="first"), **pipeline_options()
    )
    await first.start()
    await asyncio.to_thread(server.stop)
    for seq in range(500):
        await first.submit(tick(seq))
    await first.close(timeout=DEADLINE)
    assert find_orphans(folder) == [folder / "first"]  # left for the next router
    if fs is not None:
        await asyncio.to_thread(fs.power_loss)
        folder = fs.disk

    await asyncio.to_thread(server.start)
    second = IngestPipeline(
        storage, journal=Journal(folder, instance_id="second"), **pipeline_options()
    )
    closing.append(second)
    await second.start()
    assert second.stats().orphans_adopted == 1
    await second.flush(timeout=DEADLINE)
    assert await stored_seqs(server.url, schema) == list(range(500))
    assert not (folder / "first").exists()


# --------------------------------------------------------------------------- kill -9

_CHILD: Final = textwrap.dedent(
    """
    import asyncio, sys
    from data_manager.ingest import IngestPipeline
    from data_manager.journal import Journal
    from data_manager.models import TickData
    from data_manager.settings import PostgresSettings
    from data_manager.storage.postgres import PostgresStorage

    async def main() -> None:
        url, schema, journal_dir, instance, batch, sync = sys.argv[1:7]
        storage = PostgresStorage(PostgresSettings(url=url, db_schema=schema))
        await storage.connect()
        pipeline = IngestPipeline(
            storage,
            journal=Journal(journal_dir, instance_id=instance, sync=sync),
            batch_size=int(batch),
            max_batch=max(int(batch), 1000),
            flush_interval=0.02 if int(batch) < 10_000 else 3600.0,
            orphan_scan_interval=None,
        )
        await pipeline.start()
        out = sys.stdout

        async def produce(first: int) -> None:
            seq = first
            while True:
                await pipeline.submit(
                    TickData(symbol="EUR/USD", timestamp=1_727_996_400_000 + seq, bid=1.1,
                             ask=1.1002, source="child", seq=seq),
                    mode="journal",
                )
                out.write(f"{seq}\\n")  # acknowledged: durable in the journal
                out.flush()
                seq += 8

        await asyncio.gather(*(produce(k) for k in range(8)))

    asyncio.run(main())
    """
)


def start_child(
    url: str, schema: str, journal_dir: Path, instance: str, batch: int, sync: str = "thread"
) -> Any:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, schema, str(journal_dir), instance, str(batch), sync],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def read_acks_then_kill(child: Any, kill_after: int) -> set[int]:
    """Collect acknowledged seqs; SIGKILL the child after ``kill_after`` of them."""
    acked: set[int] = set()
    stream = child.stdout
    try:
        while len(acked) < kill_after:
            line = stream.readline()
            if not line:
                raise AssertionError(f"child exited early with {child.poll()}")
            acked.add(int(line))
        child.send_signal(signal.SIGKILL)
        for line in stream:  # what it printed before dying was acknowledged too
            if line.endswith(b"\n"):
                acked.add(int(line))
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
        stream.close()
    return acked


async def adopt_and_check(
    storage: PostgresStorage,
    url: str,
    schema: str,
    folder: Path,
    acked: set[int],
    closing: list[Any],
) -> None:
    """A new pipeline on ``folder`` adopts the dead child's journal; then every tick the
    child acknowledged is stored, each once."""
    survivor = IngestPipeline(
        storage, journal=Journal(folder, instance_id="survivor"), **pipeline_options()
    )
    closing.append(survivor)
    await survivor.start()
    await survivor.flush(timeout=DEADLINE)
    rows = await stored_seqs(url, schema, source="child")
    assert len(rows) == len(set(rows))  # each row once
    missing = acked - set(rows)
    assert not missing, f"{len(missing)} acknowledged ticks lost, e.g. {sorted(missing)[:5]}"
    assert survivor.stats().orphans_adopted == 1


@pytest.mark.parametrize("sync", ["thread", "loop", "aio"])
async def test_journal_mode_survives_kill_9(
    postgres_url: str, pg_schema: str, tmp_path: Path, closing: list[Any], sync: str
) -> None:
    storage = await open_storage(postgres_url, pg_schema)
    closing.append(storage)
    child = start_child(postgres_url, pg_schema, tmp_path, "child", 100, sync)
    kill_after = random.randint(300, 3_000)
    acked = await asyncio.to_thread(read_acks_then_kill, child, kill_after)
    assert len(acked) >= kill_after

    await adopt_and_check(storage, postgres_url, pg_schema, tmp_path, acked, closing)
    left = await asyncio.to_thread(lambda: list(tmp_path.iterdir()))
    assert left == [tmp_path / "survivor"]  # the orphan was replayed, then removed


@pytest.mark.parametrize("sync", ["thread", "loop", "aio"])
async def test_journal_mode_survives_power_loss(
    postgres_url: str, pg_schema: str, lazyfs: LazyFS, closing: list[Any], sync: str
) -> None:
    storage = await open_storage(postgres_url, pg_schema)
    closing.append(storage)
    # The child never flushes (huge batch): what it acknowledged is only in its journal,
    # which it writes through LazyFS. SIGKILL, then LazyFS drops every unsynced byte: what
    # is left in its backing folder is what the disk would hold after a power loss.
    child = start_child(postgres_url, pg_schema, lazyfs.mount, "child", 1_000_000, sync)
    acked = await asyncio.to_thread(read_acks_then_kill, child, random.randint(300, 3_000))
    await asyncio.to_thread(lazyfs.power_loss)
    assert await stored_seqs(postgres_url, pg_schema, source="child") == []

    await adopt_and_check(storage, postgres_url, pg_schema, lazyfs.disk, acked, closing)


async def test_running_pipeline_adopts_a_dead_neighbours_journal(
    postgres_url: str, pg_schema: str, tmp_path: Path, closing: list[Any]
) -> None:
    storage = await open_storage(postgres_url, pg_schema)
    closing.append(storage)
    neighbour = IngestPipeline(
        storage, journal=Journal(tmp_path, instance_id="neighbour"), **pipeline_options()
    )
    closing.append(neighbour)
    await neighbour.start()
    # This child never flushes (huge batch): what it acknowledged is only in its journal.
    child = start_child(postgres_url, pg_schema, tmp_path, "doomed", 1_000_000)
    stream = child.stdout
    first = await asyncio.to_thread(stream.readline)
    assert first.strip().isdigit()
    assert await neighbour.adopt_orphans() == 0  # alive: its lock is held
    acked = await asyncio.to_thread(read_acks_then_kill, child, 500)
    acked.add(int(first))

    assert await neighbour.adopt_orphans() == 1
    await neighbour.submit(tick(1))  # its own writes go on meanwhile
    await neighbour.flush(timeout=DEADLINE)
    rows = await stored_seqs(postgres_url, pg_schema, source="child")
    assert len(rows) == len(set(rows))
    assert acked <= set(rows)
    assert await stored_seqs(postgres_url, pg_schema) == [1]
    assert not (tmp_path / "doomed").exists()
