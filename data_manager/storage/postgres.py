"""PostgreSQL / TimescaleDB storage: SQLAlchemy 2 asyncio engine on asyncpg, one pool.

Pool. One SQLAlchemy ``AsyncAdaptedQueuePool`` serves every call. Seed 004's
``"pool": {"min": 5, "max": 20}`` (``PostgresSettings.pool_min`` / ``pool_max``) maps to:

* ``pool_size = pool_min``: connections kept open once opened. QueuePool opens them on
  demand, not up front. ``pool_min`` is at least 1 (settings refuse 0, which SQLAlchemy
  takes as "no limit").
* ``max_overflow = pool_max - pool_min``: extra connections opened under load and closed
  again when returned, so at most ``pool_max`` connections exist.
* ``pool_timeout``: how long a caller waits for a free connection before
  :class:`~data_manager.errors.ConnectionPoolExhaustedError`.
* ``pool_pre_ping`` is off: a ping costs a round trip per checkout. Instead a checkout
  that finds a connection asyncpg already knows is closed (the server went away while it
  was idle) recycles every connection of that generation and opens a fresh one, and a
  connection that dies mid-call surfaces as :class:`~data_manager.errors.DatabaseConnectionError`
  (transient, retried by the write path) and takes its generation with it.

Connections. Made by asyncpg with ``host``/``port``/``database``/``user``, the password from
``resolved_password()`` (read once in :meth:`PostgresStorage.connect`, kept out of every URL,
``repr`` and message), ``sslmode`` as asyncpg's ``ssl``, ``connect_timeout``, and
``server_settings`` ``application_name`` and ``statement_timeout`` (ms). asyncpg's own
``command_timeout`` is the statement timeout plus a second, so the server cancels first (a
clean SQLSTATE 57014) and the client-side bound only catches a silent network. Each connection
gets a ``timestamptz`` codec that speaks Unix ms (``schema.encode_pg_timestamptz``).

Paths. DDL, migrations, deletes and candle range reads go through SQLAlchemy Core (reads on
an ``AUTOCOMMIT`` view of the same pool: no BEGIN/ROLLBACK round trips). The hot paths use
the asyncpg connection underneath the pooled one:

* latest-row reads: one prepared statement, no transaction, no SQLAlchemy result machinery
  (~200 µs per ``latest_tick`` on a warm pool here, against ~130 µs for a bare asyncpg
  ``fetchrow`` and ~400-600 µs through Core);
* writes: batches of :data:`COPY_MIN_ROWS` rows or more go by binary ``COPY`` into a
  per-connection temp table, then one ``INSERT ... SELECT ... ON CONFLICT`` in the same
  transaction; smaller ones as a single ``INSERT ... SELECT FROM unnest($1::text[], ...)
  ON CONFLICT`` statement (one round trip instead of five). Never one INSERT per row;
* ``ticks_range`` (~2x faster than through Core for 10k rows) and ``iter_ticks`` (a
  server-side cursor in a read-only transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final, cast

import asyncpg
from sqlalchemy import URL, Table, text
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import greenlet_spawn

from data_manager.errors import (
    DatabaseConnectionError,
    DataManagerError,
    QueryExecutionError,
    RouterClosedError,
    map_database_errors,
)
from data_manager.storage import schema
from data_manager.storage.base import (
    BackendHealth,
    PoolStatus,
    SchemaInfo,
    TickBucket,
    check_received_before,
)
from data_manager.storage.candle_sql import (
    RECEIVED_BEFORE_SQL,
    TIMESCALEDB_SCHEMA_SQL,
    postgres_buckets_sql,
)
from data_manager.storage.schema import (
    CANDLE_COLUMNS,
    CANDLE_KEY,
    ORDER_FLOW_COLUMNS,
    ORDER_FLOW_KEY,
    ORDER_FLOW_NEWEST_FIRST,
    TICK_COLUMNS,
    TICK_NEWEST_FIRST,
    TICK_READ_COLUMNS,
    Tables,
    build_tables,
    candle_from_row,
    candle_record,
    column_list,
    dedupe_candles,
    dedupe_order_flow,
    newest_first,
    order_flow_from_row,
    order_flow_record,
    quote_ident,
    tick_from_row,
    tick_records,
    upsert_clause,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Sequence

    from sqlalchemy import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.pool import PoolProxiedConnection

    from data_manager.aggregation import PriceField
    from data_manager.models import CandleData, OrderFlowMetrics, TickData
    from data_manager.settings import PostgresSettings
    from data_manager.storage.base import DataKind

__all__ = ["COPY_MIN_ROWS", "HYPERTABLE_CHUNKS", "PostgresStorage", "hypertable_sql"]

logger = logging.getLogger(__name__)

#: TimescaleDB chunk interval per table: a day of ticks or order flow per chunk keeps the
#: chunks being written (and their indexes) small enough to stay in memory; candles are ~1000x
#: sparser, so a month each.
HYPERTABLE_CHUNKS: Final = {"ticks": "1 day", "candles": "30 days", "order_flow": "1 day"}

_COMMAND_GRACE_SECONDS: Final = 1.0
#: Smaller batches go as one ``INSERT ... SELECT FROM unnest($1::text[], ...)`` statement
#: (one round trip, atomic on its own); from here on COPY wins despite its extra round trips
#: (BEGIN, COPY, INSERT, COMMIT). Measured per tick batch: COPY costs less CPU from ~80 rows
#: (5.2 vs 6.4 µs a row at 140), the single statement less wall time up to ~200 rows (2.2
#: vs 2.5 ms at 140). The write-behind batches of a busy, CPU-bound router are about this
#: size, so CPU decides.
COPY_MIN_ROWS: Final = 128
_STAGE_INFO_KEY: Final = "data_manager.stage"
_STAGES: Final = {
    "ticks": "dm_stage_ticks",
    "candles": "dm_stage_candles",
    "order_flow": "dm_stage_order_flow",
}
_PING_SQL: Final = (
    "SELECT current_setting('server_version'), "
    "(SELECT extversion FROM pg_extension WHERE extname = 'timescaledb')"
)


_POLICIES_SQL: Final = (
    "SELECT hypertable_name, proc_name, schedule_interval::text "
    "FROM timescaledb_information.jobs WHERE hypertable_schema = $1 "
    "ORDER BY hypertable_name, proc_name"
)


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


_WRITE_COLUMNS: Final[dict[DataKind, tuple[str, ...]]] = {
    "ticks": TICK_COLUMNS,
    "candles": CANDLE_COLUMNS,
    "order_flow": ORDER_FLOW_COLUMNS,
}


def _array_type(table: Table, column: str) -> str:
    """The PostgreSQL array type of a column, e.g. ``TIMESTAMP WITH TIME ZONE[]``."""
    dialect = PGDialect()  # type: ignore[no-untyped-call]  # untyped in SQLAlchemy's stubs
    compiled = table.c[column].type.compile(dialect=dialect)
    return re.sub(r"\(\d+\)| COLLATE .*", "", compiled) + "[]"


def hypertable_sql(relation: str, interval: str, timescaledb_version: str) -> str:
    """``create_hypertable`` for ``relation`` (a quoted, qualified name) on ``ts``.

    TimescaleDB 2.13 replaced the positional interface with ``by_range`` dimensions and
    deprecated the old one; older 2.x releases only have the old one. Both forms are
    idempotent (``if_not_exists``), convert a table that already holds rows
    (``migrate_data``), and skip TimescaleDB's default ``(ts DESC)`` index: every index of
    ours leads with ``symbol`` and includes ``ts``, and one more would only slow ingest down.
    """
    parts = tuple(int(p) for p in re.findall(r"\d+", timescaledb_version)[:2])
    options = "if_not_exists => TRUE, migrate_data => TRUE, create_default_indexes => FALSE"
    if parts >= (2, 13):
        return (
            f"SELECT create_hypertable('{relation}'::regclass, "
            f"by_range('ts', INTERVAL '{interval}'), {options})"
        )
    return (
        f"SELECT create_hypertable('{relation}'::regclass, 'ts', "
        f"chunk_time_interval => INTERVAL '{interval}', {options})"
    )


def _driver(raw: PoolProxiedConnection) -> asyncpg.Connection:
    """The asyncpg connection under a pooled one."""
    return cast("asyncpg.Connection", raw.driver_connection)


def _fetch(apg: asyncpg.Connection, one: bool, sql: str, args: tuple[Any, ...]) -> Any:
    return apg.fetchrow(sql, *args) if one else apg.fetch(sql, *args)


#: Hot-read connections of storages reset in a forked child: the parent still uses them, so
#: the child must neither close nor garbage-collect them (a collected pool connection is
#: rolled back or terminated on the shared socket).
_ABANDONED_AFTER_FORK: Final[list[Any]] = []


def _status_count(status: str) -> int:
    """Row count from an asyncpg command tag (``INSERT 0 42`` -> 42)."""
    tail = status.rpartition(" ")[2]
    return int(tail) if tail.isdigit() else 0


class _Sql:
    """Hand-written statements for the asyncpg paths, built once per schema."""

    def __init__(self, db_schema: str, tables: Tables) -> None:
        s = quote_ident(db_schema)
        ticks, candles, flow = f"{s}.ticks", f"{s}.candles", f"{s}.order_flow"
        tcols, ccols, ocols = (
            column_list(TICK_READ_COLUMNS),
            column_list(CANDLE_COLUMNS),
            column_list(ORDER_FLOW_COLUMNS),
        )
        # Newest first in the order every cache tier keeps (schema.TICK_NEWEST_FIRST).
        newest = newest_first(TICK_NEWEST_FIRST)
        self.latest_tick_any = (
            f"SELECT {tcols} FROM {ticks} WHERE symbol = $1 ORDER BY {newest} LIMIT 1"
        )
        self.latest_tick_source = (
            f"SELECT {tcols} FROM {ticks} WHERE symbol = $1 AND source = $2 "
            f"ORDER BY {newest} LIMIT 1"
        )
        self.latest_ticks_many = (
            f"SELECT {column_list(TICK_READ_COLUMNS, 't.')} FROM unnest($1::text[]) AS k(symbol) "
            f"CROSS JOIN LATERAL (SELECT {tcols} FROM {ticks} x WHERE x.symbol = k.symbol "
            f"ORDER BY {newest_first(TICK_NEWEST_FIRST, 'x.')} LIMIT 1) t"
        )
        # LIMIT NULL is no limit, so one statement serves ranges with and without one.
        self.ticks_range_any = (
            f"SELECT {tcols} FROM {ticks} WHERE symbol = $1 AND ts >= $2 AND ts < $3 "
            "ORDER BY ts LIMIT $4"
        )
        self.ticks_range_source = (
            f"SELECT {tcols} FROM {ticks} WHERE symbol = $1 AND ts >= $2 AND ts < $3 "
            "AND source = $4 ORDER BY ts, content_key LIMIT $5"
        )
        # iter_ticks with received_before: the statements above plus that predicate (and no
        # LIMIT), kept apart so that a plain range keeps its own statement and plan.
        self.ticks_received_before_any = (
            f"SELECT {tcols} FROM {ticks} WHERE symbol = $1 AND ts >= $2 AND ts < $3"
            f"{RECEIVED_BEFORE_SQL.format('$4')} ORDER BY ts"
        )
        self.ticks_received_before_source = (
            f"SELECT {tcols} FROM {ticks} WHERE symbol = $1 AND ts >= $2 AND ts < $3 "
            f"AND source = $4{RECEIVED_BEFORE_SQL.format('$5')} ORDER BY ts, content_key"
        )
        self.latest_candles_source = (
            f"SELECT {ccols} FROM {candles} WHERE symbol = $1 AND timeframe = $2 "
            "AND source = $3 ORDER BY ts DESC LIMIT $4"
        )
        # Per key: hop through its sources on the primary key (loose index scan), pick the
        # first preferred one, else an explicitly saved (non-"agg:") one before aggregated
        # ones, then the one whose newest candle is newest, then read its
        # newest $4 candles - all in one round trip, every step an index probe.
        self.latest_candles_many = f"""
WITH RECURSIVE k(symbol, timeframe) AS (
    SELECT * FROM unnest($1::text[], $2::text[])
), src(symbol, timeframe, source) AS (
    SELECT k.symbol, k.timeframe,
           (SELECT c.source FROM {candles} c
             WHERE c.symbol = k.symbol AND c.timeframe = k.timeframe
             ORDER BY c.source LIMIT 1)
      FROM k
    UNION ALL
    SELECT s.symbol, s.timeframe,
           (SELECT c.source FROM {candles} c
             WHERE c.symbol = s.symbol AND c.timeframe = s.timeframe AND c.source > s.source
             ORDER BY c.source LIMIT 1)
      FROM src s WHERE s.source IS NOT NULL
), chosen AS (
    SELECT DISTINCT ON (s.symbol, s.timeframe) s.symbol, s.timeframe, s.source
      FROM src s WHERE s.source IS NOT NULL
     ORDER BY s.symbol, s.timeframe,
              array_position($3::text[], s.source::text) NULLS LAST,
              left(s.source, 4) = 'agg:',
              (SELECT c.ts FROM {candles} c
                WHERE c.symbol = s.symbol AND c.timeframe = s.timeframe AND c.source = s.source
                ORDER BY c.ts DESC LIMIT 1) DESC,
              s.source
)
SELECT {column_list(CANDLE_COLUMNS, "c.")}
  FROM chosen ch CROSS JOIN LATERAL (
       SELECT {ccols} FROM {candles} x
        WHERE x.symbol = ch.symbol AND x.timeframe = ch.timeframe AND x.source = ch.source
        ORDER BY x.ts DESC LIMIT $4) c"""
        # The same resolution for one key, without the unnest/DISTINCT ON machinery (the
        # cache-miss path of get_latest_candles; ~80 µs cheaper than the general form).
        self.latest_candles_one = f"""
WITH RECURSIVE src(source) AS (
    (SELECT source FROM {candles} WHERE symbol = $1 AND timeframe = $2 ORDER BY source LIMIT 1)
    UNION ALL
    SELECT (SELECT c.source FROM {candles} c
             WHERE c.symbol = $1 AND c.timeframe = $2 AND c.source > s.source
             ORDER BY c.source LIMIT 1)
      FROM src s WHERE s.source IS NOT NULL
)
SELECT {ccols} FROM {candles}
 WHERE symbol = $1 AND timeframe = $2 AND source = (
       SELECT s.source FROM src s WHERE s.source IS NOT NULL
        ORDER BY array_position($3::text[], s.source::text) NULLS LAST,
                 left(s.source, 4) = 'agg:',
                 (SELECT c.ts FROM {candles} c
                   WHERE c.symbol = $1 AND c.timeframe = $2 AND c.source = s.source
                   ORDER BY c.ts DESC LIMIT 1) DESC,
                 s.source
        LIMIT 1)
 ORDER BY ts DESC LIMIT $4"""
        newest_flow = newest_first(ORDER_FLOW_NEWEST_FIRST)
        self.latest_flow_any = (
            f"SELECT {ocols} FROM {flow} WHERE symbol = $1 ORDER BY {newest_flow} LIMIT 1"
        )
        self.latest_flow_source = (
            f"SELECT {ocols} FROM {flow} WHERE symbol = $1 AND source = $2 "
            f"ORDER BY {newest_flow} LIMIT 1"
        )
        # Session temp tables (one set per connection, emptied at every commit): creating a
        # table per batch would churn the system catalogs at the ingest rate.
        self.create_stages = "".join(
            f"DROP TABLE IF EXISTS pg_temp.{stage}; "
            f"CREATE TEMP TABLE {stage} (LIKE {s}.{kind} INCLUDING DEFAULTS) "
            "ON COMMIT DELETE ROWS; "
            for kind, stage in _STAGES.items()
        )
        conflict: dict[DataKind, str] = {
            "ticks": "ON CONFLICT DO NOTHING",
            "candles": upsert_clause(
                "t",
                CANDLE_COLUMNS,
                CANDLE_KEY,
                distinct="IS DISTINCT FROM",
                # A forming candle never overwrites a closed one.
                guard="NOT t.is_closed OR excluded.is_closed",
            ),
            "order_flow": upsert_clause(
                "t", ORDER_FLOW_COLUMNS, ORDER_FLOW_KEY, distinct="IS DISTINCT FROM"
            ),
        }
        #: kind -> INSERT ... SELECT from the staging table (after COPY).
        self.merge_stage: dict[DataKind, str] = {}
        #: kind -> the same INSERT fed by one array parameter per column (small batches).
        self.merge_arrays: dict[DataKind, str] = {}
        for kind, columns in _WRITE_COLUMNS.items():
            table = tables.data_table(kind)
            into = f"INSERT INTO {s}.{kind} AS t ({column_list(columns)})"
            self.merge_stage[kind] = (
                f"{into} SELECT {column_list(columns)} FROM pg_temp.{_STAGES[kind]} "
                f"{conflict[kind]}"
            )
            arrays = ", ".join(
                f"${i}::{_array_type(table, name)}" for i, name in enumerate(columns, 1)
            )
            self.merge_arrays[kind] = f"{into} SELECT * FROM unnest({arrays}) {conflict[kind]}"


class PostgresStorage:
    """:class:`~data_manager.storage.base.Storage` on PostgreSQL, TimescaleDB when available.

    Args:
        settings: Connection, pool and timeout settings (read once, by the router).

    Use as ``async with PostgresStorage(settings) as storage: ...`` or call :meth:`connect`
    and :meth:`close`. A closed storage is not reopened.
    """

    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self._tables = build_tables(settings.db_schema)
        self._sql = _Sql(settings.db_schema, self._tables)
        self._timeout = settings.statement_timeout
        self._engine: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None
        self._state = _State.NEW
        self._password: str | None = None
        self._waiting = 0
        # Pooled connections checked out for latest-row reads (see _hot_read): the idle
        # ones, and how many the lane owns in all (idle + busy).
        self._lane: list[PoolProxiedConnection] = []
        self._lane_owned = 0
        self._lane_max = settings.hot_read_lane
        # Bumped by create_schema so every connection rebuilds its staging tables once
        # (their layout follows the target tables).
        self._stage_generation = 0

    def __repr__(self) -> str:
        return (
            f"<PostgresStorage {self.target} schema={self._settings.db_schema} {self._state.value}>"
        )

    async def __aenter__(self) -> PostgresStorage:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ identity

    @property
    def kind(self) -> str:
        """``"postgresql"``."""
        return "postgresql"

    @property
    def target(self) -> str:
        """``postgresql host:port/database`` (never the password)."""
        return self._settings.target

    @property
    def tables(self) -> Tables:
        """The SQLAlchemy Core tables, bound to the configured schema."""
        return self._tables

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Build the pool and check one connection.

        Raises:
            DatabaseConnectionError: The server is unreachable or refused the connection.
            ConfigurationError: The password file cannot be read.
            RouterClosedError: The storage was closed.
        """
        if self._state is _State.CLOSED:
            msg = f"storage {self.target} is closed"
            raise RouterClosedError(msg)
        s = self._settings
        if self._engine is None:
            # password_file is a file read: keep it off the event loop.
            self._password = await asyncio.to_thread(s.resolved_password)
            engine = create_async_engine(
                # No password here: _open_connection supplies it, so no URL ever holds it.
                URL.create(
                    "postgresql+asyncpg",
                    username=s.user,
                    host=s.host,
                    port=s.port,
                    database=s.database,
                ),
                async_creator=self._open_connection,
                pool_size=s.pool_min,
                max_overflow=s.pool_max - s.pool_min,
                pool_timeout=s.pool_timeout,
                pool_pre_ping=False,
            )
            self._engine = engine
            # Same pool; reads through Core skip SQLAlchemy's BEGIN/ROLLBACK round trips.
            self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        with map_database_errors(target=self.target, timeout_seconds=self._timeout):
            async with self._engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
        self._state = _State.OPEN

    async def _open_connection(self) -> asyncpg.Connection:
        """Open one asyncpg connection (SQLAlchemy's ``async_creator``)."""
        s = self._settings
        kwargs: dict[str, Any] = {}
        if s.sslmode is not None:
            kwargs["ssl"] = s.sslmode
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                host=s.host,
                port=s.port,
                user=s.user,
                password=self._password,
                database=s.database,
                timeout=s.connect_timeout,
                command_timeout=s.statement_timeout + _COMMAND_GRACE_SECONDS,
                server_settings={
                    "application_name": s.application_name,
                    "statement_timeout": str(max(1, round(s.statement_timeout * 1000))),
                },
                **kwargs,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Auth failures, unknown databases and refused sockets all mean "cannot connect".
            msg = f"cannot connect to {self.target}: {type(exc).__name__}: {exc}"
            raise DatabaseConnectionError(msg) from exc
        try:
            await conn.set_type_codec(
                "timestamptz",
                schema="pg_catalog",
                encoder=schema.encode_pg_timestamptz,
                decoder=schema.decode_pg_timestamptz,
                format="tuple",
            )
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def close(self) -> None:
        """Close every pooled connection. Idempotent."""
        self._state = _State.CLOSED
        lane, self._lane = self._lane, []
        self._lane_owned -= len(lane)
        for raw in lane:
            await self._checkin(raw)
        engine, self._engine, self._reader = self._engine, None, None
        if engine is not None:
            await engine.dispose()

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's connections without touching them."""
        self._state = _State.CLOSED
        _ABANDONED_AFTER_FORK.extend(self._lane)
        self._lane = []
        self._lane_owned = 0
        engine, self._engine, self._reader = self._engine, None, None
        if engine is not None:
            engine.sync_engine.dispose(close=False)

    def _require(self) -> AsyncEngine:
        engine = self._engine
        if engine is None or self._state is not _State.OPEN:
            msg = f"storage {self.target} is {self._state.value}; call connect() first"
            raise RouterClosedError(msg)
        return engine

    async def _checkout(self) -> PoolProxiedConnection:
        """A pooled connection at driver level, counting waiters; a connection the server
        closed while it sat idle is recycled (with its generation) and replaced."""
        engine = self._require()
        self._waiting += 1
        try:
            raw = await engine.raw_connection()
            if _driver(raw).is_closed():
                # Closed while idle in the pool (asyncpg saw the server go: restart,
                # failover, idle timeout). Recycle its whole generation and take a fresh one
                # instead of failing this call - a free pre-ping for graceful shutdowns.
                await greenlet_spawn(engine.sync_engine.pool._invalidate, raw)
                await greenlet_spawn(raw.close)
                raw = await engine.raw_connection()
        finally:
            self._waiting -= 1
        return raw

    async def _checkin(self, raw: PoolProxiedConnection) -> None:
        """Return ``raw`` to the pool; a connection found closed recycles its generation."""
        apg = raw.driver_connection
        engine = self._engine
        if apg is not None and apg.is_closed() and engine is not None:
            # The server or the network dropped it, and most likely every other pooled
            # connection with it (restart, failover). Recycle them all at their next
            # checkout - what SQLAlchemy does for a disconnect it detects itself - rather
            # than fail once per idle connection.
            await greenlet_spawn(engine.sync_engine.pool._invalidate, raw)
        await greenlet_spawn(raw.close)

    @contextlib.asynccontextmanager
    async def _pooled(self) -> AsyncIterator[PoolProxiedConnection]:
        """A pooled connection at driver level (for asyncpg calls), counting waiters.

        Straight from the pool rather than through an ``AsyncConnection``: that wrapper costs
        ~20 µs per checkout and nothing here needs it (no SQLAlchemy transaction is begun, so
        the pool's reset-on-return rollback is a no-op).
        """
        raw = await self._checkout()
        async with self._returning(raw):
            yield raw

    @contextlib.asynccontextmanager
    async def _returning(self, raw: PoolProxiedConnection) -> AsyncIterator[None]:
        """Return the checked-out ``raw`` to the pool after the block."""
        try:
            yield
        except asyncio.CancelledError:
            # Cancelled mid-protocol: the connection may still be busy; never reuse it.
            await greenlet_spawn(raw.invalidate)
            raise
        finally:
            await self._checkin(raw)

    async def _hot_read(self, one: bool, sql: str, *args: Any) -> Any:
        """``fetchrow`` (``one``) or ``fetch`` of one statement on a hot-read connection.

        The latest-row reads are one autocommit statement each, so they need none of the
        pool's per-checkout work (a greenlet hop each way, ~95 µs together): up to
        ``hot_read_lane`` connections stay checked out of the pool for them and are reused
        with a list pop and append. A read that finds the lane empty (all busy, or not yet
        filled) checks a connection out of the pool and keeps it while the lane is short.
        A connection that fails or is cancelled mid-read is invalidated, never reused.
        """
        lane = self._lane
        raw = None
        while lane:
            raw = lane.pop()
            if not _driver(raw).is_closed():
                break
            # The server dropped it while idle (restart, failover): forget it.
            self._lane_owned -= 1
            await greenlet_spawn(raw.invalidate)
            raw = None
        if raw is None:
            with map_database_errors(target=self.target, timeout_seconds=self._timeout):
                raw = await self._checkout()
            if self._lane_owned >= self._lane_max:  # the lane is full and busy
                with map_database_errors(target=self.target, timeout_seconds=self._timeout):
                    async with self._returning(raw):
                        return await _fetch(_driver(raw), one, sql, args)
            self._lane_owned += 1
        try:
            with map_database_errors(target=self.target, timeout_seconds=self._timeout):
                result = await _fetch(_driver(raw), one, sql, args)
        except BaseException:
            self._lane_owned -= 1
            await greenlet_spawn(raw.invalidate)
            raise
        if self._state is _State.OPEN:
            lane.append(raw)
        else:  # the storage closed while this read ran
            self._lane_owned -= 1
            await greenlet_spawn(raw.invalidate)
        return result

    # ------------------------------------------------------------------ schema

    async def create_schema(self) -> SchemaInfo:
        """Create or migrate the tables (idempotent); make hypertables when TimescaleDB is
        installed or installable.

        Raises:
            ConfigurationError: The database holds a newer schema version than this SDK.
        """
        engine = self._require()
        with map_database_errors(target=self.target, timeout_seconds=self._timeout):
            async with engine.begin() as conn:
                outcome = await conn.run_sync(self._create_schema_sync)
        # TimescaleDB in a transaction of its own, after the migration committed: a failure
        # there (no privilege, extension not preloaded - which kills the connection) must
        # never undo the schema or leave a poisoned connection in the pool.
        ts_version: str | None = None
        try:
            with map_database_errors(target=self.target, timeout_seconds=self._timeout):
                async with engine.begin() as conn:
                    ts_version = await conn.run_sync(self._enable_timescaledb)
        except (QueryExecutionError, DatabaseConnectionError) as exc:
            logger.warning(
                "timescaledb could not be enabled on %s (%s); using plain PostgreSQL tables",
                self.target,
                exc,
            )
        self._stage_generation += 1
        return SchemaInfo(
            version=outcome.version,
            created=outcome.created,
            migrated_from=outcome.migrated_from,
            timescaledb=ts_version is not None,
            timescaledb_version=ts_version,
        )

    def _create_schema_sync(self, conn: Connection) -> schema.MigrationOutcome:
        name = self._settings.db_schema
        # One migrator at a time across processes; released at commit.
        conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"data_manager:{name}"}
        )
        exists = conn.execute(
            text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": name}
        ).scalar()
        if exists is None:
            conn.exec_driver_sql(f"CREATE SCHEMA {quote_ident(name)}")
        return schema.migrate(
            conn, self._tables, target=self.target, now_ms=time.time_ns() // 1_000_000
        )

    def _enable_timescaledb(self, conn: Connection) -> str | None:
        """Turn the data tables into hypertables when TimescaleDB is (or can be) installed.

        Idempotent (``if_not_exists``), and ``migrate_data`` converts tables that already
        hold rows, so installing TimescaleDB later and calling ``create_schema`` again works.
        """
        find = "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        version: str | None = conn.exec_driver_sql(find).scalar()
        if version is None:
            available = conn.exec_driver_sql(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
            ).scalar()
            if available is None:
                return None
            preload = conn.exec_driver_sql("SHOW shared_preload_libraries").scalar() or ""
            if "timescaledb" not in str(preload):
                # CREATE EXTENSION would fail and close the connection.
                logger.info(
                    "timescaledb is installed on %s but not in shared_preload_libraries; "
                    "using plain PostgreSQL tables",
                    self.target,
                )
                return None
            try:
                with conn.begin_nested():
                    conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS timescaledb")
            except DBAPIError as exc:
                # No privilege, or not in shared_preload_libraries: plain tables work too.
                logger.warning(
                    "timescaledb is available on %s but cannot be enabled (%s); "
                    "using plain PostgreSQL tables",
                    self.target,
                    str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__,
                )
                return None
            version = conn.exec_driver_sql(find).scalar()
            if version is None:  # pragma: no cover - CREATE EXTENSION succeeded
                return None
        for table, interval in HYPERTABLE_CHUNKS.items():
            relation = f"{quote_ident(self._settings.db_schema)}.{table}"
            conn.exec_driver_sql(hypertable_sql(relation, interval, version))
        return version

    # ------------------------------------------------------------------ health

    async def ping(self) -> BackendHealth:
        """Round-trip a trivial query; report latency, server and TimescaleDB versions.

        Never raises for an unreachable server: ``reachable=False`` with the error.
        """
        details: dict[str, object] = {"schema": self._settings.db_schema}
        started = time.perf_counter()
        try:
            with map_database_errors(target=self.target, timeout_seconds=self._timeout):
                async with self._pooled() as raw:
                    row = await _driver(raw).fetchrow(_PING_SQL)
                    assert row is not None  # a scalar SELECT always returns one row
                    if row[1] is not None:
                        # TimescaleDB: which background policies run on our tables.
                        jobs = await _driver(raw).fetch(_POLICIES_SQL, self._settings.db_schema)
                        details["timescaledb_policies"] = [
                            f"{job[0]}:{job[1]} every {job[2]}" for job in jobs
                        ]
        except DataManagerError as exc:
            details["pool"] = asdict(self.pool_status())
            return BackendHealth(
                name=self.kind, kind=self.kind, reachable=False, error=str(exc), details=details
            )
        latency_ms = (time.perf_counter() - started) * 1000
        details["pool"] = asdict(self.pool_status())
        return BackendHealth(
            name=self.kind,
            kind=self.kind,
            reachable=True,
            latency_ms=latency_ms,
            version=row[0],
            timescaledb=row[1] is not None,
            timescaledb_version=row[1],
            details=details,
        )

    def pool_status(self) -> PoolStatus:
        """Open, busy and idle connections, and callers waiting for one (no I/O)."""
        s = self._settings
        engine = self._engine
        if engine is None:
            return PoolStatus(size=0, in_use=0, idle=0, waiting=0, max_size=s.pool_max)
        pool = engine.sync_engine.pool
        if not isinstance(pool, QueuePool):  # pragma: no cover - we always build a QueuePool
            return PoolStatus(size=0, in_use=0, idle=0, waiting=self._waiting, max_size=s.pool_max)
        idle, in_use = pool.checkedin(), pool.checkedout()
        return PoolStatus(
            size=idle + in_use,
            in_use=in_use,
            idle=idle,
            # Callers inside a checkout: waiting for a free connection or for a new one.
            waiting=self._waiting,
            max_size=s.pool_max,
        )

    async def diagnostic_sleep(self, seconds: float) -> None:
        """Hold one pooled connection in ``pg_sleep(seconds)`` on the server.

        For diagnostics and fault tests: shows the statement timeout
        (:class:`~data_manager.errors.QueryTimeoutError`) and pool limits at work.
        """
        engine = self._require()
        with map_database_errors(target=self.target, timeout_seconds=self._timeout):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})

    # ------------------------------------------------------------------ writes

    async def _prepare_stages(self, raw: PoolProxiedConnection) -> asyncpg.Connection:
        apg = _driver(raw)
        if raw.info.get(_STAGE_INFO_KEY) != self._stage_generation:
            # Outside the write transaction: a rolled-back batch must not take them along.
            await apg.execute(self._sql.create_stages)
            raw.info[_STAGE_INFO_KEY] = self._stage_generation
        return apg

    async def _merge(self, kind: DataKind, records: list[tuple[Any, ...]]) -> int:
        """Write ``records`` of ``kind`` through the fastest path for their number."""
        with map_database_errors(target=self.target, timeout_seconds=self._timeout):
            async with self._pooled() as raw:
                if len(records) < COPY_MIN_ROWS:
                    columns = [list(c) for c in zip(*records, strict=True)]
                    status = await _driver(raw).execute(self._sql.merge_arrays[kind], *columns)
                else:
                    apg = await self._prepare_stages(raw)
                    async with apg.transaction():
                        await apg.copy_records_to_table(
                            _STAGES[kind],
                            schema_name="pg_temp",
                            records=records,
                            columns=_WRITE_COLUMNS[kind],
                        )
                        status = await apg.execute(self._sql.merge_stage[kind])
        return _status_count(status)

    async def write_ticks(self, ticks: Sequence[TickData]) -> int:
        """COPY the ticks into a staging table and insert the new ones, in one transaction.

        Returns:
            How many rows were new (replays and duplicates are skipped).
        """
        self._require()
        if not ticks:
            return 0
        records = tick_records(ticks)
        return await self._merge("ticks", records)

    async def write_candles(self, candles: Sequence[CandleData]) -> int:
        """COPY + upsert; a forming candle never overwrites a closed one.

        Returns:
            How many rows were inserted or changed.
        """
        self._require()
        if not candles:
            return 0
        records = [candle_record(c) for c in dedupe_candles(candles)]
        return await self._merge("candles", records)

    async def write_order_flow(self, metrics: Sequence[OrderFlowMetrics]) -> int:
        """COPY + upsert of order-flow rows.

        Returns:
            How many rows were inserted or changed.
        """
        self._require()
        if not metrics:
            return 0
        records = [order_flow_record(m) for m in dedupe_order_flow(metrics)]
        return await self._merge("order_flow", records)

    async def delete_range(
        self,
        symbol: str,
        start_ms: int,
        end_ms: int,
        kind: DataKind,
        *,
        timeframe: str | None = None,
    ) -> int:
        """Delete ``symbol``'s rows of ``kind`` with ``start_ms <= ts < end_ms`` (only
        ``timeframe``'s candles when given).

        Returns:
            How many rows were deleted.
        """
        engine = self._require()
        stmt = schema.delete_range_stmt(self._tables, kind, symbol, start_ms, end_ms, timeframe)
        with map_database_errors(target=self.target, timeout_seconds=self._timeout):
            async with engine.begin() as conn:
                result = await conn.execute(stmt)
        return int(result.rowcount)

    # ------------------------------------------------------------------ reads (hot)

    async def latest_tick(self, symbol: str, *, source: str | None = None) -> TickData | None:
        """Newest tick of ``symbol`` (from ``source``, or any source); one index probe."""
        self._require()
        if source is None:
            row = await self._hot_read(True, self._sql.latest_tick_any, symbol)
        else:
            row = await self._hot_read(True, self._sql.latest_tick_source, symbol, source)
        return None if row is None else tick_from_row(row)

    async def latest_ticks(self, symbols: Sequence[str]) -> dict[str, TickData]:
        """Newest tick of each symbol (any source) in one round trip."""
        self._require()
        if not symbols:
            return {}
        wanted = list(dict.fromkeys(symbols))
        rows = await self._hot_read(False, self._sql.latest_ticks_many, wanted)
        return {row[0]: tick_from_row(row) for row in rows}

    async def latest_candles(
        self,
        symbol: str,
        timeframe: str,
        limit: int,
        *,
        source: str | None = None,
        preferred_sources: Sequence[str] = (),
    ) -> list[CandleData]:
        """The newest ``limit`` candles, oldest to newest (source resolved as in the
        :class:`~data_manager.storage.base.Storage` protocol), in one round trip."""
        self._require()
        if limit <= 0:
            return []
        if source is not None:
            rows = await self._hot_read(
                False, self._sql.latest_candles_source, symbol, timeframe, source, limit
            )
        else:
            rows = await self._hot_read(
                False,
                self._sql.latest_candles_one,
                symbol,
                timeframe,
                list(preferred_sources),
                limit,
            )
        return [candle_from_row(r) for r in reversed(rows)]

    async def latest_candles_many(
        self,
        keys: Sequence[tuple[str, str]],
        limit: int,
        *,
        preferred_sources: Sequence[str] = (),
    ) -> dict[tuple[str, str], list[CandleData]]:
        """The newest ``limit`` candles of every (symbol, timeframe), oldest to newest, in one
        round trip (for warm start). Keys without candles map to ``[]``."""
        self._require()
        out: dict[tuple[str, str], list[CandleData]] = {key: [] for key in keys}
        if not out or limit <= 0:
            return out
        symbols = [k[0] for k in out]
        timeframes = [k[1] for k in out]
        with map_database_errors(target=self.target, timeout_seconds=self._timeout):
            async with self._pooled() as raw:
                rows = await _driver(raw).fetch(
                    self._sql.latest_candles_many,
                    symbols,
                    timeframes,
                    list(preferred_sources),
                    limit,
                )
        for row in rows:  # newest first within each key
            out[(row[0], row[1])].append(candle_from_row(row))
        for candles in out.values():
            candles.reverse()
        return out

    async def latest_order_flow(
        self, symbol: str, *, source: str | None = None
    ) -> OrderFlowMetrics | None:
        """Newest order-flow metrics of ``symbol`` (any window)."""
        self._require()
        if source is None:
            row = await self._hot_read(True, self._sql.latest_flow_any, symbol)
        else:
            row = await self._hot_read(True, self._sql.latest_flow_source, symbol, source)
        return None if row is None else order_flow_from_row(row)

    # ------------------------------------------------------------------ reads (ranges)

    def _require_reader(self) -> AsyncEngine:
        self._require()
        assert self._reader is not None
        return self._reader

    async def ticks_range(
        self,
        symbol: str,
        start_ms: int,
        end_ms: int,
        *,
        source: str | None = None,
        limit: int | None = None,
    ) -> list[TickData]:
        """Ticks with ``start_ms <= ts < end_ms``, oldest first (at most ``limit``)."""
        self._require()
        if limit is not None and limit <= 0:
            return []
        with map_database_errors(target=self.target, timeout_seconds=self._timeout):
            async with self._pooled() as raw:
                apg = _driver(raw)
                if source is None:
                    rows = await apg.fetch(
                        self._sql.ticks_range_any, symbol, start_ms, end_ms, limit
                    )
                else:
                    rows = await apg.fetch(
                        self._sql.ticks_range_source, symbol, start_ms, end_ms, source, limit
                    )
        return [tick_from_row(r) for r in rows]

    async def _resolve_candle_source(
        self, conn: AsyncConnection, symbol: str, timeframe: str, preferred: Sequence[str]
    ) -> str | None:
        stmt = schema.candle_sources_stmt(self._tables, symbol, timeframe)
        found = [(r[0], r[1]) for r in (await conn.execute(stmt)).all()]
        return schema.pick_candle_source(found, preferred)

    async def candles_range(
        self,
        symbol: str,
        timeframe: str,
        start_ms: int,
        end_ms: int,
        *,
        source: str | None = None,
        preferred_sources: Sequence[str] = (),
    ) -> list[CandleData]:
        """Candles with ``start_ms <= ts < end_ms``, oldest first; source chosen as in
        :meth:`latest_candles`."""
        reader = self._require_reader()
        with map_database_errors(target=self.target, timeout_seconds=self._timeout):
            async with reader.connect() as conn:
                if source is None:
                    source = await self._resolve_candle_source(
                        conn, symbol, timeframe, preferred_sources
                    )
                    if source is None:
                        return []
                stmt = schema.candles_stmt(
                    self._tables, symbol, timeframe, source, start_ms=start_ms, end_ms=end_ms
                )
                rows = (await conn.execute(stmt)).all()
        return [candle_from_row(r) for r in rows]

    async def iter_ticks(
        self,
        symbol: str,
        start_ms: int,
        end_ms: int,
        *,
        source: str | None = None,
        batch_size: int = 10_000,
        received_before: int | None = None,
    ) -> AsyncGenerator[TickData, None]:
        """Stream ticks in ``[start_ms, end_ms)`` oldest first through a server-side cursor
        (``batch_size`` rows per fetch), holding one pooled connection until exhausted or
        closed; wrap it in ``contextlib.aclosing`` when you may stop early. With
        ``received_before``, only ticks whose ``received_at`` is unset or earlier.

        Raises:
            ValidationError: ``received_before`` is not an int.
        """
        self._require()
        received_before = check_received_before(received_before)
        args: tuple[object, ...]
        if received_before is not None:
            if source is None:
                sql = self._sql.ticks_received_before_any
                args = (symbol, start_ms, end_ms, received_before)
            else:
                sql = self._sql.ticks_received_before_source
                args = (symbol, start_ms, end_ms, source, received_before)
        elif source is None:
            sql, args = self._sql.ticks_range_any, (symbol, start_ms, end_ms, None)
        else:
            sql, args = self._sql.ticks_range_source, (symbol, start_ms, end_ms, source, None)
        with map_database_errors(target=self.target, timeout_seconds=self._timeout):
            async with self._pooled() as raw:
                apg = _driver(raw)
                async with apg.transaction(readonly=True):
                    async for row in apg.cursor(sql, *args, prefetch=max(1, batch_size)):
                        yield tick_from_row(row)

    async def aggregate_tick_buckets(
        self,
        symbol: str,
        timeframe: str,
        start_ms: int,
        end_ms: int,
        *,
        price: PriceField,
        source: str | None = None,
        received_before: int | None = None,
    ) -> list[TickBucket]:
        """Aggregate the ticks in ``[start_ms, end_ms)`` per (tick source, bucket) in one
        statement: ``time_bucket`` and ``first``/``last`` when the ``timescaledb`` extension
        is installed in the database, plain SQL otherwise (see
        :mod:`data_manager.storage.candle_sql`). Sums are added in key order, so the values
        equal the Python aggregator's bit for bit. With ``received_before``, only ticks
        whose ``received_at`` is unset or earlier count.

        Raises:
            ValidationError: Unknown timeframe or price, or ``received_before`` not an int.
        """
        self._require()
        received_before = check_received_before(received_before)
        args: tuple[object, ...] = (symbol, start_ms, end_ms)
        if source is not None:
            args = (*args, source)
        if received_before is not None:
            args = (*args, received_before)
        with map_database_errors(target=self.target, timeout_seconds=self._timeout):
            async with self._pooled() as raw:
                apg = _driver(raw)
                # Asked each time (one catalog probe): the extension may be added later.
                extension_schema: str | None = await apg.fetchval(TIMESCALEDB_SCHEMA_SQL)
                sql = postgres_buckets_sql(
                    self._settings.db_schema,
                    timeframe,
                    price=price,
                    by_source=source is not None,
                    timescaledb_schema=extension_schema,
                    received_before=received_before is not None,
                )
                rows = await apg.fetch(sql, *args)
        return [TickBucket(*row) for row in rows]
