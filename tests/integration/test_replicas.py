"""Read replicas against a real primary and a real streaming replica (``pg_basebackup -R``).

The primary is a dedicated throwaway server (``postgres_server_factory``); the replica is a
hot standby of it (``tests/servers_replica.py``). Lag is made real by pausing WAL replay on
the replica (``pg_wal_replay_pause()``) and measured against a :class:`ManualClock`, so no
test waits for time to pass; polling with a deadline is used only for what another process
does (replication, replay, a server starting).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import pytest
import pytest_asyncio

from data_manager.clock import ManualClock
from data_manager.models import CandleData, TickData
from data_manager.settings import PostgresSettings
from data_manager.storage.postgres import PostgresStorage
from data_manager.storage.replicas import ReplicatedStorage
from tests.servers_replica import ReplicaServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from tests.servers import PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

T0: Final = 1_727_996_400_000
DEADLINE: Final = 30.0
TIMEOUT: Final = 10.0


def tick(symbol: str, offset: int = 0, bid: float = 1.1) -> TickData:
    return TickData(
        symbol=symbol, timestamp=T0 + offset, bid=bid, ask=bid + 0.0002, source="replica-test"
    )


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


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=TIMEOUT)
    try:
        await conn.execute(sql, timeout=TIMEOUT)
    finally:
        await conn.close(timeout=TIMEOUT)


async def fetchval(url: str, sql: str) -> Any:
    conn = await asyncpg.connect(url, timeout=TIMEOUT)
    try:
        return await conn.fetchval(sql, timeout=TIMEOUT)
    finally:
        await conn.close(timeout=TIMEOUT)


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll with a deadline: replication and replay happen in other processes."""
    deadline = time.monotonic() + DEADLINE
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def replica_serves(storage: ReplicatedStorage, read: Callable[[], Awaitable[Any]]) -> Any:
    """Check replicas until ``read`` is answered by the replica; return that answer."""
    answer: list[Any] = []

    async def served() -> bool:
        await storage.check_now()
        before = storage.replica_status()[0].reads
        answer[:] = [await read()]
        return storage.replica_status()[0].reads > before

    await until(served, "a read served by the replica")
    return answer[0]


async def pause_replay(replica_url: str) -> None:
    await execute(replica_url, "SELECT pg_wal_replay_pause()")

    async def paused() -> bool:
        state = await fetchval(replica_url, "SELECT pg_get_wal_replay_pause_state()")
        return bool(state == "paused")

    await until(paused, "replay paused")


async def resume_replay(replica_url: str) -> None:
    await execute(replica_url, "SELECT pg_wal_replay_resume()")


@pytest.fixture
def primary_server(cluster: tuple[PostgresServer, ReplicaServer]) -> PostgresServer:
    return cluster[0]


@pytest.fixture
def replica_server(cluster: tuple[PostgresServer, ReplicaServer]) -> ReplicaServer:
    replica = cluster[1]
    if not replica.running:  # a failed test may have left it stopped
        replica.start()
    return replica


@pytest_asyncio.fixture(loop_scope="session")
async def schema(primary_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh schema on the primary (the replica gets it by replication), dropped afterwards."""
    name = f"dmrepl_{secrets.token_hex(4)}"
    await execute(primary_server.url, f'CREATE SCHEMA "{name}"')
    yield name
    await execute(primary_server.url, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest_asyncio.fixture(loop_scope="session")
async def replicated(
    primary_server: PostgresServer,
    replica_server: ReplicaServer,
    schema: str,
    clock: ManualClock,
) -> AsyncIterator[ReplicatedStorage]:
    """A ReplicatedStorage without background checks (tests call ``check_now``)."""
    storage = ReplicatedStorage(
        PostgresStorage(settings(primary_server.url, schema)),
        [PostgresStorage(settings(replica_server.url, schema))],
        max_lag_seconds=5.0,
        lag_check_interval=None,
        check_timeout=5.0,
        clock=clock,
    )
    await storage.connect()
    try:
        await storage.create_schema()
        # The schema reaches the replica by replication: wait until it may serve reads.
        await replica_serves(storage, lambda: storage.latest_tick("NOT/SEEN"))
        yield storage
    finally:
        await storage.close()
        await resume_replay(replica_server.url)


async def test_reads_go_to_the_replica(replicated: ReplicatedStorage) -> None:
    status = replicated.replica_status()
    assert [s.healthy for s in status] == [True]
    assert status[0].lag_seconds == 0.0
    reads = status[0].reads
    on_primary = replicated.primary_reads()

    # Symbols this router never wrote: straight to the replica, round after round.
    assert await replicated.latest_tick("AUD/USD") is None
    assert await replicated.latest_ticks(["AUD/USD", "NZD/USD"]) == {}
    assert await replicated.latest_order_flow("AUD/USD") is None
    assert await replicated.candles_range("AUD/USD", "1m", T0, T0 + 60_000) == []
    assert replicated.replica_status()[0].reads == reads + 4
    assert replicated.primary_reads() == on_primary


async def test_read_after_write_sees_the_write(replicated: ReplicatedStorage) -> None:
    first = tick("EUR/USD", 0)
    assert await replicated.write_ticks([first]) == 1
    reads = replicated.replica_status()[0].reads
    own = replicated.primary_reads()["own_writes"]

    # Right after the write: the primary answers, because no check has yet seen the replica
    # replay it.
    assert await replicated.latest_tick("EUR/USD") == first
    assert replicated.primary_reads()["own_writes"] == own + 1
    assert replicated.replica_status()[0].reads == reads

    # Once a check sees the replica past the write, the replica answers, with the write.
    got = await replica_serves(replicated, lambda: replicated.latest_tick("EUR/USD"))
    assert got == first
    ranged = await replicated.ticks_range("EUR/USD", T0, T0 + 1)
    assert ranged == [first]
    streamed = [t async for t in replicated.iter_ticks("EUR/USD", T0, T0 + 1)]  # primary
    assert streamed == [first]

    candle = CandleData(
        symbol="EUR/USD",
        timeframe="1m",
        timestamp=T0,
        open=1.1,
        high=1.2,
        low=1.0,
        close=1.15,
        volume=10.0,
        source="replica-test",
    )
    await replicated.write_candles([candle])
    own = replicated.primary_reads()["own_writes"]
    assert await replicated.latest_candles("EUR/USD", "1m", 5) == [candle]
    assert replicated.primary_reads()["own_writes"] == own + 1
    got = await replica_serves(replicated, lambda: replicated.latest_candles("EUR/USD", "1m", 5))
    assert got == [candle]


async def test_own_write_not_yet_replayed_is_read_from_the_primary(
    replicated: ReplicatedStorage, replica_server: ReplicaServer, schema: str
) -> None:
    old, new = tick("USD/JPY", 0, bid=150.0), tick("USD/JPY", 1, bid=151.0)
    await replicated.write_ticks([old])
    assert await replica_serves(replicated, lambda: replicated.latest_tick("USD/JPY")) == old

    await pause_replay(replica_server.url)
    await replicated.write_ticks([new])
    await replicated.check_now()

    # The replica is within the lag bound (no time has passed) and keeps serving other
    # symbols, but it does not have the new tick...
    status = replicated.replica_status()[0]
    assert status.healthy
    on_replica = await fetchval(
        replica_server.url,
        f"SELECT max(bid) FROM \"{schema}\".ticks WHERE symbol = 'USD/JPY'",
    )
    assert on_replica == 150.0
    # ...so this router's read of USD/JPY goes to the primary and sees its own write.
    own = replicated.primary_reads()["own_writes"]
    assert await replicated.latest_tick("USD/JPY") == new
    assert replicated.primary_reads()["own_writes"] == own + 1
    reads = replicated.replica_status()[0].reads
    assert await replicated.latest_tick("CHF/JPY") is None
    assert replicated.replica_status()[0].reads == reads + 1

    await resume_replay(replica_server.url)
    assert await replica_serves(replicated, lambda: replicated.latest_tick("USD/JPY")) == new


async def test_lag_bound_is_honoured(
    replicated: ReplicatedStorage,
    primary_server: PostgresServer,
    replica_server: ReplicaServer,
    schema: str,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert replicated.replica_status()[0].lag_seconds == 0.0
    await pause_replay(replica_server.url)
    # Written by another client, so read-your-writes is not what keeps reads off the replica.
    await execute(
        primary_server.url,
        f'SET synchronous_commit = on; CREATE TABLE "{schema}".filler AS SELECT 1 AS x',
    )

    async def behind() -> bool:
        (status,) = await replicated.check_now()
        return (status.lag_bytes or 0) > 0

    await until(behind, "the primary's flushed WAL to pass the paused replica")
    status = replicated.replica_status()[0]
    assert status.healthy  # behind, but no time has passed
    assert status.lag_seconds == 0.0

    clock.advance(4.9)
    (status,) = await replicated.check_now()
    assert status.healthy
    assert status.lag_seconds == pytest.approx(4.9)

    caplog.set_level(logging.INFO, logger="data_manager.storage.replicas")
    clock.advance(0.2)
    (status,) = await replicated.check_now()
    assert not status.healthy
    assert status.skipped_reason == "lagging"
    assert status.lag_seconds == pytest.approx(5.1)
    assert status.incidents == 1
    clock.advance(1.0)
    await replicated.check_now()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per incident, not once per check
    assert "lagging" in warnings[0].getMessage()

    reads = replicated.replica_status()[0].reads
    assert await replicated.latest_tick("GBP/USD") is None
    assert replicated.primary_reads()["no_healthy_replica"] == 1  # nothing else was skipped
    assert replicated.replica_status()[0].reads == reads

    await resume_replay(replica_server.url)

    async def caught_up() -> bool:
        (status,) = await replicated.check_now()
        return status.healthy

    await until(caught_up, "the replica to catch up")
    status = replicated.replica_status()[0]
    assert status.lag_seconds == 0.0
    assert status.lag_bytes == 0
    assert status.incidents == 1
    assert any("is back" in r.getMessage() for r in caplog.records)
    await replicated.latest_tick("GBP/USD")
    assert replicated.replica_status()[0].reads == reads + 1


async def test_lag_bound_in_bytes(
    primary_server: PostgresServer, replica_server: ReplicaServer, schema: str
) -> None:
    storage = ReplicatedStorage(
        PostgresStorage(settings(primary_server.url, schema)),
        [PostgresStorage(settings(replica_server.url, schema))],
        max_lag_bytes=0,
        lag_check_interval=None,
        clock=ManualClock(),
    )
    async with storage:
        await pause_replay(replica_server.url)
        try:
            await execute(
                primary_server.url,
                f'SET synchronous_commit = on; CREATE TABLE "{schema}".filler AS SELECT 1 AS x',
            )

            async def lagging() -> bool:
                (status,) = await storage.check_now()
                return status.skipped_reason == "lagging"

            await until(lagging, "the byte bound to be exceeded")
            status = storage.replica_status()[0]
            assert status.lag_bytes is not None
            assert status.lag_bytes > 0
            assert status.lag_seconds == 0.0  # the time bound alone would have kept it
        finally:
            await resume_replay(replica_server.url)

        async def healthy() -> bool:
            (status,) = await storage.check_now()
            return status.healthy

        await until(healthy, "the replica to catch up")


async def test_stopped_replica_is_skipped_and_used_again_after_restart(
    replicated: ReplicatedStorage, replica_server: ReplicaServer
) -> None:
    expected = tick("EUR/GBP", 0)
    await replicated.write_ticks([expected])
    assert await replica_serves(replicated, lambda: replicated.latest_tick("EUR/GBP")) == expected

    replica_server.stop()
    try:
        # The read chosen for the replica fails there and is answered by the primary.
        assert await replicated.latest_tick("EUR/GBP") == expected
        status = replicated.replica_status()[0]
        assert status.skipped_reason == "down"
        assert status.last_error is not None
        assert replicated.primary_reads()["replica_failed"] == 1
        # Later reads do not try it at all; checks keep reporting it down.
        assert await replicated.latest_tick("EUR/GBP") == expected
        assert replicated.primary_reads()["no_healthy_replica"] == 1
        (status,) = await replicated.check_now()
        assert status.skipped_reason == "down"
        assert status.incidents == 1
        health = await replicated.ping()
        assert health.reachable
        assert health.details["replicas"] == [
            {
                "target": status.target,
                "healthy": False,
                "lag_seconds": None,
                "lag_bytes": None,
                "skipped_reason": "down",
                "reads": status.reads,
                "errors": status.errors,
                "incidents": 1,
                "last_error": status.last_error,
            }
        ]
    finally:
        replica_server.start()

    got = await replica_serves(replicated, lambda: replicated.latest_tick("EUR/GBP"))
    assert got == expected
    assert replicated.replica_status()[0].healthy


async def test_a_server_that_is_not_a_replica_is_never_read(
    primary_server: PostgresServer, postgres_url: str, schema: str
) -> None:
    storage = ReplicatedStorage(
        PostgresStorage(settings(primary_server.url, schema)),
        [PostgresStorage(settings(postgres_url, schema))],
        lag_check_interval=None,
    )
    async with storage:
        (status,) = storage.replica_status()
        assert status.skipped_reason == "other_cluster"
        await storage.create_schema()
        assert await storage.latest_tick("EUR/USD") is None
        assert storage.primary_reads()["no_healthy_replica"] == 1


async def test_unreachable_replica_does_not_fail_connect(
    primary_server: PostgresServer, schema: str
) -> None:
    from tests.servers import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    storage = ReplicatedStorage(
        PostgresStorage(settings(primary_server.url, schema)),
        [PostgresStorage(settings(url, schema))],
        lag_check_interval=None,
    )
    async with storage:
        (status,) = storage.replica_status()
        assert status.skipped_reason == "down"
        assert status.last_error is not None
        assert "cannot connect" in status.last_error
        await storage.create_schema()
        assert await storage.latest_tick("EUR/USD") is None


async def test_background_checks_follow_the_replica(
    primary_server: PostgresServer, replica_server: ReplicaServer, schema: str
) -> None:
    storage = ReplicatedStorage(
        PostgresStorage(settings(primary_server.url, schema)),
        [PostgresStorage(settings(replica_server.url, schema))],
        max_lag_seconds=5.0,
        lag_check_interval=0.05,
    )
    async with storage:
        await storage.create_schema()
        written = tick("EUR/CHF", 0)
        await storage.write_ticks([written])

        async def replica_read() -> bool:
            before = storage.replica_status()[0].reads
            got = await storage.latest_tick("EUR/CHF")
            assert got == written
            return storage.replica_status()[0].reads > before

        # No check_now here: only the background task can move reads to the replica.
        await until(replica_read, "the background check to route reads to the replica")


async def test_lag_grows_while_the_primary_cannot_be_checked(
    primary_server: PostgresServer,
    replica_server: ReplicaServer,
    schema: str,
    clock: ManualClock,
) -> None:
    # The primary's pool has one connection; an open iter_ticks cursor holds it, so checks
    # cannot read the primary's WAL position while another client keeps writing.
    one = PostgresSettings(
        url=primary_server.url,
        db_schema=schema,
        pool_min=1,
        pool_max=1,
        pool_timeout=0.5,
        connect_timeout=2.0,
        statement_timeout=10.0,
    )
    storage = ReplicatedStorage(
        PostgresStorage(one),
        [PostgresStorage(settings(replica_server.url, schema))],
        max_lag_seconds=5.0,
        lag_check_interval=None,
        check_timeout=1.0,
        clock=clock,
    )
    writer = PostgresStorage(settings(primary_server.url, schema))  # another process
    async with storage:
        await storage.create_schema()
        await writer.connect()
        try:
            await writer.write_ticks([tick("NZD/USD", 0, bid=1.0), tick("NZD/USD", 1, bid=1.0)])
            got = await replica_serves(storage, lambda: storage.latest_tick("NZD/USD"))
            assert got is not None
            assert got.timestamp == T0 + 1
            assert storage.replica_status()[0].lag_seconds == 0.0

            await pause_replay(replica_server.url)
            cursor = storage.iter_ticks("NZD/USD", T0, T0 + 2, batch_size=1)
            await anext(cursor)  # holds the primary's only connection
            try:
                await writer.write_ticks([tick("NZD/USD", 2, bid=1.5)])
                clock.advance(4.0)
                (status,) = await storage.check_now()
                # Within the bound: still used, but its lag is not 0 any more.
                assert status.healthy
                assert status.lag_seconds == pytest.approx(4.0)
                clock.advance(1.1)
                (status,) = await storage.check_now()
                assert not status.healthy
                assert status.skipped_reason == "lagging"
                assert status.lag_seconds == pytest.approx(5.1)
                assert status.last_error is not None
                assert "the primary's WAL position has not been read" in status.last_error
                health = await storage.ping()
                replicas = health.details["replicas"]
                assert isinstance(replicas, list)
                assert replicas[0]["skipped_reason"] == "lagging"
            finally:
                await cursor.aclose()
            # Reads go to the primary, which has the other client's write.
            no_replica = storage.primary_reads()["no_healthy_replica"]
            got = await storage.latest_tick("NZD/USD")
            assert got is not None
            assert got.bid == 1.5
            assert storage.primary_reads()["no_healthy_replica"] == no_replica + 1
        finally:
            await resume_replay(replica_server.url)
            await writer.close()

        async def healthy() -> bool:
            (status,) = await storage.check_now()
            return status.healthy and status.lag_seconds == 0.0

        await until(healthy, "the replica to catch up once the primary can be checked")
