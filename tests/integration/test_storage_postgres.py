"""PostgreSQL-only behaviour: connection settings, error translation against a real server,
pool limits, cancellation, query plans, and what the tables look like in SQL."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import pytest_asyncio

from data_manager.errors import (
    ConnectionPoolExhaustedError,
    DatabaseConnectionError,
    QueryExecutionError,
    QueryTimeoutError,
    RouterClosedError,
)
from data_manager.models import CandleData, TickData
from data_manager.settings import PostgresSettings
from data_manager.storage import schema
from data_manager.storage.postgres import COPY_MIN_ROWS, PostgresStorage
from tests.servers import free_port

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from tests.servers import PostgresServer

pytestmark = pytest.mark.postgres

T0 = 1_727_996_400_000
SYM = "EUR/USD"
DEADLINE = 10.0


def tick(ts: int, *, symbol: str = SYM, source: str = "polygon") -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=1.1, ask=1.1002, source=source)


def candle(ts: int, *, source: str = "polygon", symbol: str = SYM) -> CandleData:
    return CandleData(
        symbol=symbol,
        timeframe="1m",
        timestamp=ts,
        open=1.1,
        high=1.2,
        low=1.0,
        close=1.15,
        source=source,
    )


def settings_for(url: str, pg_schema: str, **overrides: Any) -> PostgresSettings:
    return PostgresSettings(url=url, db_schema=pg_schema, **overrides)


@pytest_asyncio.fixture(loop_scope="session")
async def side(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection for checks behind the storage's back (Unix-ms codec)."""
    conn = await asyncpg.connect(postgres_url, timeout=10)
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=schema.encode_pg_timestamptz,
        decoder=schema.decode_pg_timestamptz,
        format="tuple",
    )
    try:
        yield conn
    finally:
        await conn.close(timeout=10)


@contextlib.asynccontextmanager
async def opened(
    settings: PostgresSettings, *, create: bool = True
) -> AsyncIterator[PostgresStorage]:
    storage = PostgresStorage(settings)
    await storage.connect()
    try:
        if create:
            await storage.create_schema()
        yield storage
    finally:
        await storage.close()


async def wait_for(predicate: Callable[[], Any], what: str) -> None:
    """Poll ``predicate`` (sync or async) until true; fail after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- connection


async def test_refused_connection_names_host_and_port_never_the_password() -> None:
    port = free_port()
    secret = "pw-must-not-leak-7f3a"
    settings = PostgresSettings(
        host="127.0.0.1", port=port, database="test", password=secret, connect_timeout=2
    )
    storage = PostgresStorage(settings)
    with pytest.raises(DatabaseConnectionError) as caught:
        await storage.connect()
    assert f"127.0.0.1:{port}" in str(caught.value)
    chain: list[BaseException] = []
    cause: BaseException | None = caught.value
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    assert all(secret not in f"{exc!s} {exc!r}" for exc in chain)
    assert secret not in repr(storage)
    assert storage._engine is not None
    assert storage._engine.url.password is None
    health = await storage.ping()
    assert health.reachable is False
    assert health.error is not None
    assert secret not in health.error
    await storage.close()


async def test_connection_settings_reach_the_server(postgres_url: str, pg_schema: str) -> None:
    settings = settings_for(
        postgres_url,
        pg_schema,
        statement_timeout=1.5,
        application_name="dm-settings-probe",
        pool_min=2,
        pool_max=5,
        pool_timeout=0.25,
    )
    async with opened(settings) as storage:
        engine = storage._engine
        assert engine is not None
        async with engine.connect() as conn:
            row = (
                await conn.exec_driver_sql(
                    "SELECT current_setting('statement_timeout'), "
                    "current_setting('application_name')"
                )
            ).one()
        assert tuple(row) == ("1500ms", "dm-settings-probe")
        pool: Any = engine.sync_engine.pool
        assert (pool.size(), pool._max_overflow, pool.timeout()) == (2, 3, 0.25)
        assert storage.pool_status().max_size == 5


async def test_closed_storage_refuses_work(postgres_url: str, pg_schema: str) -> None:
    async with opened(settings_for(postgres_url, pg_schema)) as storage:
        pass
    with pytest.raises(RouterClosedError):
        await storage.latest_tick(SYM)
    with pytest.raises(RouterClosedError):
        await storage.connect()
    assert (await storage.ping()).reachable is False


# --------------------------------------------------------------------------- errors


async def test_statement_timeout_is_a_query_timeout(postgres_url: str, pg_schema: str) -> None:
    async with opened(settings_for(postgres_url, pg_schema, statement_timeout=0.2)) as storage:
        with pytest.raises(QueryTimeoutError, match="statement_timeout") as caught:
            await storage.diagnostic_sleep(1.0)
        assert caught.value.timeout_seconds == 0.2
        # The connection is still good for the next caller.
        assert await storage.write_ticks([tick(T0)]) == 1
        assert await storage.latest_tick(SYM) is not None


async def test_pool_exhaustion_is_reported(postgres_url: str, pg_schema: str) -> None:
    settings = settings_for(postgres_url, pg_schema, pool_min=1, pool_max=1, pool_timeout=0.2)
    async with opened(settings) as storage:
        await storage.write_ticks([tick(T0 + i) for i in range(5)])
        holder = storage.iter_ticks(SYM, T0, T0 + 10, batch_size=2)
        assert (await anext(holder)).timestamp == T0  # holds the only connection
        assert storage.pool_status().in_use == 1
        with pytest.raises(ConnectionPoolExhaustedError, match="pool timeout"):
            await storage.latest_tick(SYM)
        await holder.aclose()
        assert await storage.latest_tick(SYM) is not None


async def test_pool_status_counts_waiters(postgres_url: str, pg_schema: str) -> None:
    settings = settings_for(postgres_url, pg_schema, pool_min=1, pool_max=1, pool_timeout=30)
    async with opened(settings) as storage:
        await storage.write_ticks([tick(T0 + i) for i in range(5)])
        holder = storage.iter_ticks(SYM, T0, T0 + 10, batch_size=2)
        await anext(holder)
        waiter = asyncio.create_task(storage.latest_tick(SYM))
        await wait_for(lambda: storage.pool_status().waiting == 1, "a waiter")
        status = storage.pool_status()
        assert (status.size, status.in_use, status.idle, status.max_size) == (1, 1, 0, 1)
        await holder.aclose()
        got = await asyncio.wait_for(waiter, DEADLINE)
        assert got is not None
        assert got.timestamp == T0 + 4
        status = storage.pool_status()
        assert (status.waiting, status.in_use, status.idle) == (0, 0, 1)


async def test_cancelled_read_does_not_poison_the_pool(
    postgres_url: str, pg_schema: str, side: asyncpg.Connection
) -> None:
    app = f"dm-cancel-{pg_schema}"
    settings = settings_for(postgres_url, pg_schema, pool_min=1, pool_max=1, application_name=app)
    async with opened(settings) as storage:
        await storage.write_ticks([tick(T0)])
        await cancel_read_mid_query(storage, postgres_url, pg_schema, side, app)
        got = await storage.latest_tick(SYM)
        assert got is not None
        assert got.timestamp == T0
        assert storage.pool_status().in_use == 0


async def cancel_read_mid_query(
    storage: PostgresStorage,
    postgres_url: str,
    pg_schema: str,
    side: asyncpg.Connection,
    app: str,
) -> None:
    """Start ``latest_tick`` behind a table lock and cancel it while it waits on the lock."""
    locker = await asyncpg.connect(postgres_url, timeout=10)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute(f'LOCK TABLE "{pg_schema}".ticks IN ACCESS EXCLUSIVE MODE')
        reader = asyncio.create_task(storage.latest_tick(SYM))

        async def blocked() -> bool:
            n = await side.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = $1 AND wait_event_type = 'Lock'",
                app,
            )
            return bool(n)

        await wait_for(blocked, "the read to wait on the lock")
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await tx.rollback()
    finally:
        await locker.close(timeout=10)


@pytest.mark.slow
async def test_server_restart_is_a_connection_error_then_recovers(
    postgres_server_factory: Callable[[], PostgresServer],
) -> None:
    server = postgres_server_factory()
    settings = PostgresSettings(url=server.url, pool_min=2, pool_max=2, connect_timeout=2)
    async with opened(settings) as storage:
        await storage.write_ticks([tick(T0)])
        # Open both pooled connections, then leave them idle.
        holders = [storage.iter_ticks(SYM, T0, T0 + 1) for _ in range(2)]
        for holder in holders:
            await anext(holder)
        for holder in holders:
            await holder.aclose()
        assert storage.pool_status().idle == 2
        server.stop()
        with pytest.raises(DatabaseConnectionError):
            await storage.latest_tick(SYM)
        server.start()
        # The other idle connection died too; it is recycled instead of failing a call.
        got = await storage.latest_tick(SYM)
        assert got is not None
        assert await storage.write_ticks([tick(T0 + 1)]) == 1
        server.stop()
        health = await storage.ping()
        assert health.reachable is False
        assert health.error is not None
        server.start()
        assert (await storage.ping()).reachable is True


@pytest.mark.slow
async def test_a_unix_socket_folder_in_the_url_reaches_the_server(
    postgres_server_factory: Callable[[], PostgresServer],
) -> None:
    server = postgres_server_factory()
    # libpq's spelling; the server listens on <root>/.s.PGSQL.<port> as well as on TCP.
    url = f"postgresql://postgres@/{server.database}?host={server.root}&port={server.port}"
    async with opened(PostgresSettings(url=url)) as storage:
        assert await storage.write_ticks([tick(T0)]) == 1
        assert (await storage.latest_tick(SYM)) == tick(T0)
        assert storage._engine is not None
        async with storage._engine.connect() as conn:
            row = (
                await conn.exec_driver_sql(
                    "SELECT inet_server_addr(), current_setting('data_directory')"
                )
            ).one()
        assert row[0] is None  # NULL: the connection came through the socket, not TCP
        assert row[1] == str(server.data_dir)  # and reached this server, not another one


# --------------------------------------------------------------------------- schema & SQL


async def test_schema_in_sql_terms(
    postgres_url: str, pg_schema: str, side: asyncpg.Connection
) -> None:
    async with opened(settings_for(postgres_url, pg_schema)) as storage:
        info = await storage.create_schema()
        await storage.write_ticks([tick(T0 + 123)])
        rows = await side.fetch(
            "SELECT table_name || '.' || column_name, data_type "
            "FROM information_schema.columns WHERE table_schema = $1 "
            "AND column_name IN ('ts', 'received_at', 'start_time', 'end_time', 'applied_at')",
            pg_schema,
        )
        types = {r[0]: r[1] for r in rows}
        assert set(types.values()) == {"timestamp with time zone"}
        assert len(types) == 7
        exact = await side.fetchval(
            f"SELECT ts = 'epoch'::timestamptz + 1727996400123 * interval '1 millisecond' "
            f'FROM "{pg_schema}".ticks'
        )
        assert exact is True
        version = await side.fetchval(f'SELECT max(version) FROM "{pg_schema}".dm_schema_version')
        assert version == info.version == schema.head_version()
        health = await storage.ping()
        assert health.reachable is True
        assert health.version is not None
        assert health.timescaledb is info.timescaledb
        if info.timescaledb:
            hypertables = await side.fetch(
                "SELECT hypertable_name FROM timescaledb_information.hypertables "
                "WHERE hypertable_schema = $1",
                pg_schema,
            )
            assert {r[0] for r in hypertables} == {"ticks", "candles", "order_flow"}


async def test_writes_survive_schema_refresh_between_batches(
    postgres_url: str, pg_schema: str
) -> None:
    settings = settings_for(postgres_url, pg_schema, pool_min=1, pool_max=1)
    async with opened(settings) as storage:
        assert await storage.write_ticks([tick(T0)]) == 1
        await storage.create_schema()  # staging tables are rebuilt on next use
        assert await storage.write_ticks([tick(T0), tick(T0 + 1)]) == 1
        assert await storage.write_candles([candle(T0)]) == 1


async def test_failed_bulk_batch_leaves_nothing_behind(postgres_url: str, pg_schema: str) -> None:
    settings = settings_for(postgres_url, pg_schema, pool_min=1, pool_max=1)
    async with opened(settings) as storage:
        n = COPY_MIN_ROWS + 10
        bad = [tick(T0 + i) for i in range(n)]
        # The model refuses this value; bypass it to see what the database does with it.
        bad[-1] = TickData.model_construct(**(tick(T0 + n).__dict__ | {"exchange": 2**63}))
        with pytest.raises(QueryExecutionError):
            await storage.write_ticks(bad)
        assert await storage.latest_tick(SYM) is None
        # Same connection, same staging table: it was emptied by the rollback.
        assert await storage.write_ticks(bad[:-1]) == n - 1
        assert len(await storage.ticks_range(SYM, T0, T0 + 2 * n)) == n - 1


async def test_hot_reads_are_index_scans(
    postgres_url: str, pg_schema: str, side: asyncpg.Connection
) -> None:
    async with opened(settings_for(postgres_url, pg_schema)) as storage:
        await storage.write_ticks(
            [tick(T0 + i, symbol=f"S{i % 50}", source="ab"[i % 2]) for i in range(20_000)]
        )
        await storage.write_candles(
            [
                candle(T0 + i * 60_000, source=src, symbol=f"S{k}")
                for k in range(8)
                for i in range(2000)
                for src in ("p", "q", "r")
            ]
        )
        await side.execute(f'ANALYZE "{pg_schema}".ticks; ANALYZE "{pg_schema}".candles')
        sql = storage._sql

        async def plan(query: str, *args: Any) -> str:
            rows = await side.fetch("EXPLAIN (COSTS OFF) " + query, *args)
            return "\n".join(r[0] for r in rows)

        for query, args in [
            (sql.latest_tick_any, ("S7",)),
            (sql.latest_tick_source, ("S7", "a")),
            (sql.latest_candles_source, ("S7", "1m", "p", 100)),
        ]:
            text = await plan(query, *args)
            assert "Index Scan Backward" in text, text
            assert "Seq Scan" not in text, text
            # No full sort: the index yields rows newest first; ties of the newest
            # millisecond are ordered by an incremental sort on top of it, and the LIMIT
            # stops it after that millisecond.
            assert re.search(r"^\s*(->\s+)?Sort$", text, re.MULTILINE) is None, text
            if "Incremental Sort" in text:  # (on a hypertable the key names its chunk)
                assert re.search(r"Presorted Key: (\w+\.)?ts$", text, re.MULTILINE), text
        many: list[tuple[str, tuple[object, ...]]] = [
            (sql.latest_ticks_many, (["S1", "S2"],)),
            (sql.latest_candles_many, (["S7"], ["1m"], [], 100)),
            (sql.latest_candles_one, ("S7", "1m", [], 100)),
            (sql.ticks_range_any, ("S7", T0, T0 + 1000, None)),
            (sql.ticks_range_source, ("S7", T0, T0 + 1000, "a", 100)),
        ]
        for query, params in many:
            text = await plan(query, *params)
            assert "Index" in text, text
            assert "Seq Scan" not in text, text


# --------------------------------------------------------------------------- hot-read lane


def test_hot_read_lane_is_capped_at_a_quarter_of_the_pool() -> None:
    assert PostgresSettings(pool_max=20).hot_read_lane == 2
    assert PostgresSettings(pool_min=1, pool_max=4).hot_read_lane == 1
    assert PostgresSettings(pool_min=1, pool_max=3).hot_read_lane == 0
    assert PostgresSettings(pool_max=20, hot_read_connections=0).hot_read_lane == 0


async def test_hot_reads_keep_their_connections_checked_out(
    postgres_url: str, pg_schema: str
) -> None:
    settings = settings_for(postgres_url, pg_schema, pool_min=1, pool_max=8)
    async with opened(settings) as storage:
        await storage.write_ticks([tick(T0 + i, symbol=f"S{i}/USD") for i in range(4)])
        assert storage.pool_status().in_use == 0
        # Six concurrent reads: the lane keeps two connections, the rest go back.
        got = await asyncio.gather(*(storage.latest_tick(f"S{i % 4}/USD") for i in range(6)))
        assert [g.symbol if g else None for g in got] == [f"S{i % 4}/USD" for i in range(6)]
        assert storage.pool_status().in_use == 2
        for _ in range(20):  # sequential reads reuse the lane: no new checkouts
            assert await storage.latest_tick("S1/USD") is not None
        assert storage.pool_status().in_use == 2
        # Every kind of latest read goes through it and sees fresh writes.
        await storage.write_ticks([tick(T0 + 10, symbol="S1/USD")])
        latest = await storage.latest_tick("S1/USD")
        assert latest is not None
        assert latest.timestamp == T0 + 10
        assert set(await storage.latest_ticks(["S0/USD", "S3/USD"])) == {"S0/USD", "S3/USD"}
        await storage.write_candles([candle(T0), candle(T0 + 60_000)])
        assert len(await storage.latest_candles(SYM, "1m", 5)) == 2
        assert storage.pool_status().in_use == 2
    assert storage.pool_status().size == 0  # closed: lane returned, pool disposed


async def test_cancelled_hot_read_drops_its_lane_connection(
    postgres_url: str, pg_schema: str, side: asyncpg.Connection
) -> None:
    app = f"dm-lane-{pg_schema}"
    settings = settings_for(postgres_url, pg_schema, pool_min=1, pool_max=4, application_name=app)
    async with opened(settings) as storage:
        await storage.write_ticks([tick(T0)])
        assert await storage.latest_tick(SYM) is not None  # fills the lane (one connection)
        assert storage.pool_status().in_use == 1
        await cancel_read_mid_query(storage, postgres_url, pg_schema, side, app)
        assert storage.pool_status().in_use == 0  # invalidated, not put back in the lane
        got = await storage.latest_tick(SYM)
        assert got is not None
        assert got.timestamp == T0
        assert storage.pool_status().in_use == 1


async def test_hot_read_lane_survives_a_killed_backend(
    postgres_url: str, pg_schema: str, side: asyncpg.Connection
) -> None:
    app = f"dm-kill-{pg_schema}"
    settings = settings_for(postgres_url, pg_schema, pool_min=1, pool_max=4, application_name=app)
    async with opened(settings) as storage:
        await storage.write_ticks([tick(T0)])
        assert await storage.latest_tick(SYM) is not None
        killed = await side.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            app,
        )
        assert killed >= 1

        async def lane_conn_closed() -> bool:
            return all(_conn_closed(raw) for raw in storage._lane)

        await wait_for(lane_conn_closed, "asyncpg to notice the terminated backend")
        got = await storage.latest_tick(SYM)  # the dead lane connection is replaced
        assert got is not None
        assert got.timestamp == T0


def _conn_closed(raw: Any) -> bool:
    return bool(raw.driver_connection.is_closed())
