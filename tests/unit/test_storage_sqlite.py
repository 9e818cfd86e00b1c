"""SQLite storage without any server, and the pure parts of the shared schema module."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from data_manager.errors import (
    TRANSIENT_ERRORS,
    DatabaseConnectionError,
    DatabaseUnavailableError,
    QueryExecutionError,
    QueryTimeoutError,
    RouterClosedError,
    map_database_errors,
)
from data_manager.models import (
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    CandleData,
    OrderFlowMetrics,
    TickData,
)
from data_manager.storage import schema
from data_manager.storage import sqlite as sqlite_storage
from data_manager.storage.base import SCHEMA_VERSION
from data_manager.storage.postgres import hypertable_sql
from data_manager.storage.sqlite import SQLiteStorage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

T0 = 1_727_996_400_000
SYM = "EUR/USD"


def tick(ts: int, *, bid: float = 1.1, source: str = "polygon") -> TickData:
    return TickData(symbol=SYM, timestamp=ts, bid=bid, ask=bid + 0.0002, source=source)


@contextlib.asynccontextmanager
async def memory_storage() -> AsyncIterator[SQLiteStorage]:
    async with SQLiteStorage(":memory:") as storage:
        await storage.create_schema()
        yield storage


# --------------------------------------------------------------------------- query plans


async def test_latest_value_reads_are_index_probes(tmp_path: Path) -> None:
    """The newest-first order has more terms than any index: the index must still drive the
    scan (the terms after ``ts`` only order the rows of the newest millisecond)."""
    path = tmp_path / "plans.sqlite3"
    async with SQLiteStorage(path) as storage:
        await storage.create_schema()
        await storage.write_ticks([tick(T0 + i, source="ab"[i % 2]) for i in range(2000)])
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("ANALYZE")
        for query, args in (
            (sqlite_storage._LATEST_TICK_ANY, (SYM,)),
            (sqlite_storage._LATEST_TICK_SOURCE, (SYM, "a")),
            (sqlite_storage._LATEST_FLOW_ANY, (SYM,)),
            (sqlite_storage._LATEST_FLOW_SOURCE, (SYM, "a")),
        ):
            steps = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + query, args)]
            assert steps[0].startswith("SEARCH "), steps
            assert " USING " in steps[0], steps
            assert set(steps[1:]) <= {"USE TEMP B-TREE FOR RIGHT PART OF ORDER BY"}, steps


# --------------------------------------------------------------------------- :memory:


async def test_memory_databases_are_private() -> None:
    async with memory_storage() as one, memory_storage() as two:
        assert await one.write_ticks([tick(T0)]) == 1
        assert await two.latest_tick(SYM) is None
        assert (await one.latest_tick(SYM)) == tick(T0)


async def test_memory_database_serialises_concurrent_callers() -> None:
    async with memory_storage() as storage:
        writes = [
            storage.write_ticks([tick(T0 + i * 10 + j) for j in range(10)]) for i in range(20)
        ]
        reads = [storage.latest_tick(SYM) for _ in range(20)]
        results = await asyncio.gather(*writes, *reads)
        assert sum(results[:20]) == 200  # type: ignore[arg-type]
        assert len(await storage.ticks_range(SYM, T0, T0 + 1000)) == 200
        status = storage.pool_status()
        assert (status.size, status.in_use, status.waiting, status.max_size) == (1, 0, 0, 1)


async def test_memory_iteration_does_not_hold_the_only_connection() -> None:
    async with memory_storage() as storage:
        await storage.write_ticks([tick(T0 + i) for i in range(10)])
        seen = []
        async for t in storage.iter_ticks(SYM, T0, T0 + 100, batch_size=3):
            seen.append(t.timestamp)
            # Writing while iterating must not deadlock on the single connection.
            await storage.write_ticks([tick(T0 + 1000 + len(seen))])
        assert seen == [T0 + i for i in range(10)]


async def test_ping_reports_sqlite_version() -> None:
    async with memory_storage() as storage:
        health = await storage.ping()
    assert (health.kind, health.reachable, health.timescaledb) == ("sqlite", True, False)
    assert health.version == sqlite3.sqlite_version
    assert health.latency_ms is not None


async def test_closed_storage_refuses_work_and_reuse() -> None:
    storage = SQLiteStorage(":memory:")
    with pytest.raises(RouterClosedError, match="connect"):
        await storage.latest_tick(SYM)
    await storage.connect()
    await storage.close()
    await storage.close()  # idempotent
    with pytest.raises(RouterClosedError):
        await storage.write_ticks([tick(T0)])
    with pytest.raises(RouterClosedError):
        await storage.connect()
    health = await storage.ping()
    assert health.reachable is False


# --------------------------------------------------------------------------- files


async def test_file_database_creates_folders_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store.sqlite3"
    async with SQLiteStorage(path) as storage:
        info = await storage.create_schema()
        assert (info.version, info.created, info.timescaledb) == (SCHEMA_VERSION, True, False)
        await storage.write_ticks([tick(T0)])
        assert storage.target == f"sqlite {path}"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT ts FROM ticks").fetchone() == (T0,)  # INTEGER Unix ms
    async with SQLiteStorage(path) as again:
        assert (await again.create_schema()).created is False
        assert await again.latest_tick(SYM) == tick(T0)


async def test_another_writer_holding_the_lock_is_a_query_timeout(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    async with SQLiteStorage(path, busy_timeout=0.05) as storage:
        await storage.create_schema()
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(QueryTimeoutError, match="locked") as caught:
                await storage.write_ticks([tick(T0)])
            assert caught.value.timeout_seconds == 0.05
            other.execute("ROLLBACK")
        assert await storage.write_ticks([tick(T0)]) == 1


async def test_unopenable_file_is_a_connection_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    storage = SQLiteStorage(blocker / "store.sqlite3")
    with pytest.raises(DatabaseConnectionError):
        await storage.connect()
    await storage.close()


def test_sqlite_cantopen_maps_to_connection_error() -> None:
    with pytest.raises(DatabaseConnectionError, match="cannot open"):  # noqa: SIM117
        with map_database_errors(target="sqlite /nowhere"):
            sqlite3.connect("file:/nonexistent-dir/x.db?mode=rw", uri=True)


class _DriverError(Exception):
    def __init__(self, *, sqlstate: str | None = None, sqlite_errorcode: int | None = None):
        super().__init__("injected")
        self.sqlstate = sqlstate
        self.sqlite_errorcode = sqlite_errorcode


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_DriverError(sqlstate="53100"), DatabaseUnavailableError),  # disk full
        (_DriverError(sqlstate="25006"), DatabaseUnavailableError),  # read-only (standby)
        (_DriverError(sqlstate="40P01"), DatabaseUnavailableError),  # deadlock
        (_DriverError(sqlstate="40001"), DatabaseUnavailableError),  # serialization
        (_DriverError(sqlstate="55P03"), DatabaseUnavailableError),  # lock not available
        (_DriverError(sqlstate="58030"), DatabaseUnavailableError),  # I/O error
        (_DriverError(sqlite_errorcode=13), DatabaseUnavailableError),  # SQLITE_FULL
        (_DriverError(sqlite_errorcode=7), DatabaseUnavailableError),  # SQLITE_NOMEM
        (_DriverError(sqlstate="23505"), QueryExecutionError),  # the data: unique violation
        # Fail the same statement again: split and dead-lettered, never retried for ever.
        (_DriverError(sqlstate="53400"), QueryExecutionError),  # temp_file_limit, say
        (_DriverError(sqlstate="53200"), QueryExecutionError),  # max_locks_per_transaction
        (_DriverError(sqlstate="58P01"), QueryExecutionError),  # a file is missing
        (_DriverError(sqlstate="22P02"), QueryExecutionError),  # the data: bad text
    ],
    ids=lambda v: getattr(v, "sqlstate", None) or getattr(v, "sqlite_errorcode", None),
)
def test_what_the_server_cannot_do_now_is_transient(
    error: Exception, expected: type[Exception]
) -> None:
    with pytest.raises(expected) as info:  # noqa: SIM117
        with map_database_errors(target="db"):
            raise error
    assert type(info.value) is expected
    assert isinstance(info.value, TRANSIENT_ERRORS) is (expected is DatabaseUnavailableError)


# --------------------------------------------------------------------------- schema module


def test_migrations_lead_to_schema_version() -> None:
    assert schema.head_version() == SCHEMA_VERSION
    versions = [m.version for m in schema.MIGRATIONS]
    assert versions == sorted(set(versions))
    assert versions[0] == 1


@given(st.integers(min_value=MIN_TIMESTAMP_MS, max_value=MAX_TIMESTAMP_MS))
def test_time_conversions_are_exact(ms: int) -> None:
    dt = schema.ms_to_datetime(ms)
    assert dt == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert schema.datetime_to_ms(dt) == ms
    wire = schema.encode_pg_timestamptz(ms)
    assert schema.decode_pg_timestamptz(wire) == ms
    assert schema.encode_pg_timestamptz(dt) == wire


def test_sub_millisecond_times_floor() -> None:
    dt = schema.ms_to_datetime(T0) + timedelta(microseconds=999)
    assert schema.datetime_to_ms(dt) == T0
    assert schema.decode_pg_timestamptz(schema.encode_pg_timestamptz(dt)) == T0
    before = schema.ms_to_datetime(T0) - timedelta(microseconds=1)
    assert schema.decode_pg_timestamptz(schema.encode_pg_timestamptz(before)) == T0 - 1


def test_rows_become_models_equal_to_validated_ones() -> None:
    full_tick = TickData(
        symbol=SYM,
        timestamp=T0,
        bid=1.1,
        ask=1.2,
        source="s",
        volume=3.0,
        exchange=4,
        event_type="trade",
        use_case="u",
        bid_size=1.0,
        ask_size=2.0,
        last_price=1.15,
        last_size=5.0,
        aggressor="buy",
        seq=9,
        received_at=T0 + 1,
    )
    minimal_tick = TickData(symbol=SYM, timestamp=T0, bid=1.1, ask=1.1, source="s")
    for original in (full_tick, minimal_tick):
        row = tuple(
            v
            for c, v in zip(schema.TICK_COLUMNS, schema.tick_record(original), strict=True)
            if c != "content_key"
        )
        built = schema.tick_from_row(row)
        assert built == original
        assert built.model_dump() == original.model_dump()
        assert built.model_dump_json() == original.model_dump_json()
        assert (built.mid, built.spread, built.timestamp_ms) == (
            original.mid,
            original.spread,
            original.timestamp,
        )
        assert built.model_fields_set == set(TickData.model_fields)
        assert hash(built) == hash(original)
        assert built.model_copy(update={"bid": 1.0}).bid == 1.0
        with pytest.raises(Exception, match="frozen"):
            built.bid = 2.0  # type: ignore[misc]
    candle = CandleData(
        symbol=SYM,
        timeframe="5m",
        timestamp=T0,
        open=1,
        high=2,
        low=0.5,
        close=1.5,
        source="s",
        volume=1.0,
        vwap=1.2,
        range_pips=3.0,
        num_trades=4,
        start_time=T0,
        end_time=T0 + 1,
        is_closed=False,
    )
    built_candle = schema.candle_from_row(schema.candle_record(candle))
    assert built_candle == candle
    assert built_candle.bucket_end == T0 + 300_000
    assert built_candle.model_dump() == candle.model_dump()
    flow = OrderFlowMetrics(symbol=SYM, timestamp=T0, window_ms=1000, ofi=1.5, toxicity=0.2)
    built_flow = schema.order_flow_from_row(schema.order_flow_record(flow))
    assert built_flow == flow
    assert built_flow.timestamp_ms == T0


def test_candle_source_choice() -> None:
    found = [("broker", T0), ("polygon", T0 + 10), ("agg", T0 + 10)]
    assert schema.pick_candle_source(found, []) == "agg"  # tie -> smallest name
    assert schema.pick_candle_source(found, ["x", "broker"]) == "broker"
    assert schema.pick_candle_source(found, ["x"]) == "agg"
    assert schema.pick_candle_source([], ["x"]) is None


def test_dedupe_candles_keeps_closed_over_later_forming() -> None:
    def c(close: float, closed: bool, ts: int = T0) -> CandleData:
        return CandleData(
            symbol=SYM,
            timeframe="1m",
            timestamp=ts,
            open=1,
            high=2,
            low=0.5,
            close=close,
            source="s",
            is_closed=closed,
        )

    folded = schema.dedupe_candles(
        [c(1.1, False), c(1.2, False), c(1.3, True), c(1.4, False), c(1.0, False, T0 + 60_000)]
    )
    assert [(x.close, x.is_closed) for x in folded] == [(1.3, True), (1.0, False)]
    assert [x.close for x in schema.dedupe_candles([c(1.3, True), c(1.4, True)])] == [1.4]


def test_schema_identifiers_are_quoted() -> None:
    assert schema.quote_ident("MySchema") == '"MySchema"'
    tables = schema.build_tables("MySchema")
    assert tables.ticks.schema == "MySchema"
    assert tables.data_table("order_flow") is tables.order_flow


def test_hypertable_sql_follows_the_timescaledb_version() -> None:
    new = hypertable_sql('"s".ticks', "1 day", "2.17.2")
    assert "by_range('ts', INTERVAL '1 day')" in new
    old = hypertable_sql('"s".ticks', "1 day", "2.11.0")
    assert "'ts', chunk_time_interval => INTERVAL '1 day'" in old
    for sql in (new, old):
        assert sql.startswith("SELECT create_hypertable('\"s\".ticks'::regclass")
        assert "if_not_exists => TRUE" in sql
        assert "migrate_data => TRUE" in sql
        assert "create_default_indexes => FALSE" in sql
