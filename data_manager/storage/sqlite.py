"""Embedded SQLite storage: the default when no PostgreSQL is configured.

SQLAlchemy's asyncio engine on aiosqlite, same tables and keys as PostgreSQL (see
``schema.py``) with timestamps as ``INTEGER`` Unix ms. A file database runs in WAL mode with
``synchronous=NORMAL`` (a commit survives a process crash; the last commits may be lost on
power failure) and a ``busy_timeout`` for other processes' writers. Writers in this process
take an asyncio lock first, so they queue on the event loop instead of spinning in SQLite's
busy handler; readers never wait for a writer (WAL).

``":memory:"`` is a private in-process database on one connection (``StaticPool``), handy
for unit tests; every operation then holds the lock, since statements of concurrent
callers would otherwise interleave inside one connection's transaction.

Writes are one ``executemany`` of ``INSERT ... ON CONFLICT`` in one transaction. Range reads,
deletes and migrations go through SQLAlchemy Core; the latest-row reads use aiosqlite's
connection directly (one worker-thread hop per query instead of about five). ``iter_ticks``
pages with keyset queries on ``(ts, rowid)`` (``(ts, content_key)`` within one source), so it
holds no connection between pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import URL, event, or_
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool, StaticPool
from sqlalchemy.util import greenlet_spawn

from data_manager.errors import DataManagerError, RouterClosedError, map_database_errors
from data_manager.settings import DEFAULT_SQLITE_PATH
from data_manager.storage import schema
from data_manager.storage.base import (
    BackendHealth,
    PoolStatus,
    SchemaInfo,
    TickBucket,
    check_received_before,
)
from data_manager.storage.candle_sql import sqlite_buckets_sql
from data_manager.storage.schema import (
    CANDLE_COLUMNS,
    CANDLE_KEY,
    ORDER_FLOW_COLUMNS,
    ORDER_FLOW_KEY,
    ORDER_FLOW_NEWEST_FIRST,
    ROWID,
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
    tick_from_row,
    tick_records,
    upsert_clause,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Sequence

    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.pool import ConnectionPoolEntry

    from data_manager.aggregation import PriceField
    from data_manager.models import CandleData, OrderFlowMetrics, TickData
    from data_manager.storage.base import DataKind

__all__ = ["MEMORY", "SQLiteStorage"]

#: The path that selects a private in-process database.
MEMORY: Final = ":memory:"


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


_INSERT_TICKS: Final = (
    f"INSERT INTO ticks ({column_list(TICK_COLUMNS)}) VALUES ({_placeholders(len(TICK_COLUMNS))}) "
    "ON CONFLICT DO NOTHING"
)
_UPSERT_CANDLES: Final = (
    f"INSERT INTO candles ({column_list(CANDLE_COLUMNS)}) "
    f"VALUES ({_placeholders(len(CANDLE_COLUMNS))}) "
    + upsert_clause(
        "candles",
        CANDLE_COLUMNS,
        CANDLE_KEY,
        distinct="IS NOT",
        # A forming candle never overwrites a closed one.
        guard="NOT candles.is_closed OR excluded.is_closed",
    )
)
_TICK_COLS: Final = column_list(TICK_READ_COLUMNS)
# Newest first in the order every cache tier keeps (schema.TICK_NEWEST_FIRST).
_LATEST_TICK_ANY: Final = (
    f"SELECT {_TICK_COLS} FROM ticks WHERE symbol = ? "
    f"ORDER BY {newest_first(TICK_NEWEST_FIRST)} LIMIT 1"
)
_LATEST_TICK_SOURCE: Final = (
    f"SELECT {_TICK_COLS} FROM ticks WHERE symbol = ? AND source = ? "
    f"ORDER BY {newest_first(TICK_NEWEST_FIRST)} LIMIT 1"
)
_LATEST_CANDLES: Final = (
    f"SELECT {column_list(CANDLE_COLUMNS)} FROM candles "
    "WHERE symbol = ? AND timeframe = ? AND source = ? ORDER BY ts DESC LIMIT ?"
)
# Every source of (symbol, timeframe) with its newest ts: a loose index scan on the primary
# key (see schema.candle_sources_stmt, the same query in SQLAlchemy Core).
_CANDLE_SOURCES: Final = """
WITH RECURSIVE src(source) AS (
    SELECT (SELECT source FROM candles WHERE symbol = ?1 AND timeframe = ?2
             ORDER BY source LIMIT 1)
    UNION ALL
    SELECT (SELECT c.source FROM candles c
             WHERE c.symbol = ?1 AND c.timeframe = ?2 AND c.source > src.source
             ORDER BY c.source LIMIT 1)
      FROM src WHERE src.source IS NOT NULL
)
SELECT source, (SELECT max(c.ts) FROM candles c
                 WHERE c.symbol = ?1 AND c.timeframe = ?2 AND c.source = src.source)
  FROM src WHERE source IS NOT NULL"""
_FLOW_COLS: Final = column_list(ORDER_FLOW_COLUMNS)
_LATEST_FLOW_ANY: Final = (
    f"SELECT {_FLOW_COLS} FROM order_flow WHERE symbol = ? "
    f"ORDER BY {newest_first(ORDER_FLOW_NEWEST_FIRST)} LIMIT 1"
)
_LATEST_FLOW_SOURCE: Final = (
    f"SELECT {_FLOW_COLS} FROM order_flow WHERE symbol = ? AND source = ? "
    f"ORDER BY {newest_first(ORDER_FLOW_NEWEST_FIRST)} LIMIT 1"
)
_UPSERT_ORDER_FLOW: Final = (
    f"INSERT INTO order_flow ({column_list(ORDER_FLOW_COLUMNS)}) "
    f"VALUES ({_placeholders(len(ORDER_FLOW_COLUMNS))}) "
    + upsert_clause("order_flow", ORDER_FLOW_COLUMNS, ORDER_FLOW_KEY, distinct="IS NOT")
)


class SQLiteStorage:
    """:class:`~data_manager.storage.base.Storage` on an embedded SQLite database.

    Args:
        path: Database file (parent folders are created), or ``":memory:"``.
        busy_timeout: Seconds a statement waits for another process's write lock before
            :class:`~data_manager.errors.QueryTimeoutError`.
        pool_size: Connections kept for a file database (readers run in parallel in WAL).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_SQLITE_PATH,
        *,
        busy_timeout: float = 5.0,
        pool_size: int = 4,
    ) -> None:
        self._path = os.fspath(path)
        self._memory = self._path == MEMORY
        self._busy_timeout = busy_timeout
        self._pool_size = 1 if self._memory else max(1, pool_size)
        self._tables = build_tables(None)
        self._engine: AsyncEngine | None = None
        self._state = _State.NEW
        self._lock = asyncio.Lock()
        self._waiting = 0

    def __repr__(self) -> str:
        return f"<SQLiteStorage {self._path} {self._state.value}>"

    async def __aenter__(self) -> SQLiteStorage:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ identity

    @property
    def kind(self) -> str:
        """``"sqlite"``."""
        return "sqlite"

    @property
    def target(self) -> str:
        """``sqlite <path>``."""
        return f"sqlite {self._path}"

    @property
    def path(self) -> str:
        """The database file (or ``":memory:"``)."""
        return self._path

    @property
    def tables(self) -> Tables:
        """The SQLAlchemy Core tables."""
        return self._tables

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Open the database (creating its folder) and check one connection.

        Raises:
            DatabaseConnectionError: The file cannot be opened.
            RouterClosedError: The storage was closed.
        """
        if self._state is _State.CLOSED:
            msg = f"storage {self.target} is closed"
            raise RouterClosedError(msg)
        if self._engine is None:
            self._engine = await self._build_engine()
        with map_database_errors(target=self.target, timeout_seconds=self._busy_timeout):
            async with self._engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
        self._state = _State.OPEN

    async def _build_engine(self) -> AsyncEngine:
        if self._memory:
            engine = create_async_engine("sqlite+aiosqlite:///:memory:", poolclass=StaticPool)
        else:
            parent = Path(self._path).parent
            with map_database_errors(target=self.target):
                await asyncio.to_thread(parent.mkdir, parents=True, exist_ok=True)
            engine = create_async_engine(
                URL.create("sqlite+aiosqlite", database=self._path),
                pool_size=self._pool_size,
                max_overflow=0,
                pool_timeout=max(self._busy_timeout, 1.0),
            )
        memory, busy_ms = self._memory, max(0, round(self._busy_timeout * 1000))

        @event.listens_for(engine.sync_engine, "connect")
        def _configure(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cursor = dbapi_conn.cursor()
            try:
                if not memory:
                    cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            finally:
                cursor.close()

        return engine

    async def close(self) -> None:
        """Close every connection. Idempotent."""
        self._state = _State.CLOSED
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's connections without touching them."""
        self._state = _State.CLOSED
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.sync_engine.dispose(close=False)

    def _require(self) -> AsyncEngine:
        engine = self._engine
        if engine is None or self._state is not _State.OPEN:
            msg = f"storage {self.target} is {self._state.value}; call connect() first"
            raise RouterClosedError(msg)
        return engine

    @contextlib.asynccontextmanager
    async def _connection(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        """A connection, under the lock when it must be (every use in memory, writes on file),
        with driver errors mapped."""
        engine = self._require()
        locked = self._memory or write
        if locked:
            self._waiting += 1
            try:
                await self._lock.acquire()
            finally:
                self._waiting -= 1
        try:
            with map_database_errors(target=self.target, timeout_seconds=self._busy_timeout):
                async with engine.connect() as conn:
                    yield conn
        finally:
            if locked:
                self._lock.release()

    @contextlib.asynccontextmanager
    async def _driver(self) -> AsyncIterator[Any]:
        """aiosqlite's connection under a pooled one, for the latest-row reads.

        One worker-thread hop per query where a SQLAlchemy Core statement costs about five
        (cursor, execute, fetch, close, ...): ~240 µs instead of ~760 µs per ``latest_tick``.
        These reads are single ``SELECT`` statements, so no transaction is left open.
        """
        engine = self._require()
        if self._memory:
            self._waiting += 1
            try:
                await self._lock.acquire()
            finally:
                self._waiting -= 1
        try:
            with map_database_errors(target=self.target, timeout_seconds=self._busy_timeout):
                raw = await engine.raw_connection()
                try:
                    yield raw.driver_connection
                finally:
                    await greenlet_spawn(raw.close)
        finally:
            if self._memory:
                self._lock.release()

    # ------------------------------------------------------------------ schema

    async def create_schema(self) -> SchemaInfo:
        """Create or migrate the tables (idempotent); refuse a newer schema.

        Raises:
            ConfigurationError: The database holds a newer schema version than this SDK.
        """
        async with self._connection(write=True) as conn:
            # IMMEDIATE: take the write lock up front, so two processes migrating at once
            # queue instead of both reading the old version.
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
            outcome = await conn.run_sync(
                schema.migrate,
                self._tables,
                target=self.target,
                now_ms=time.time_ns() // 1_000_000,
            )
            await conn.commit()
        return SchemaInfo(
            version=outcome.version,
            created=outcome.created,
            migrated_from=outcome.migrated_from,
            timescaledb=False,
        )

    # ------------------------------------------------------------------ health

    async def ping(self) -> BackendHealth:
        """Round-trip ``SELECT sqlite_version()``; never raises."""
        details: dict[str, object] = {"path": self._path}
        started = time.perf_counter()
        try:
            async with self._connection(write=False) as conn:
                version = (await conn.exec_driver_sql("SELECT sqlite_version()")).scalar()
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
            version=None if version is None else str(version),
            details=details,
        )

    def pool_status(self) -> PoolStatus:
        """Open, busy and idle connections, and callers waiting (no I/O)."""
        engine = self._engine
        if engine is None:
            return PoolStatus(size=0, in_use=0, idle=0, waiting=0, max_size=self._pool_size)
        pool = engine.sync_engine.pool
        if isinstance(pool, QueuePool):
            idle, in_use = pool.checkedin(), pool.checkedout()
        else:  # StaticPool: one connection, busy while the lock is held
            in_use = 1 if self._lock.locked() else 0
            idle = 1 - in_use
        return PoolStatus(
            size=idle + in_use,
            in_use=in_use,
            idle=idle,
            waiting=self._waiting,
            max_size=self._pool_size,
        )

    # ------------------------------------------------------------------ writes

    async def _write_many(self, sql: str, records: list[tuple[Any, ...]]) -> int:
        async with self._connection(write=True) as conn:
            result = await conn.exec_driver_sql(sql, records)  # executemany
            await conn.commit()
        return max(0, int(result.rowcount))

    async def write_ticks(self, ticks: Sequence[TickData]) -> int:
        """Insert ticks idempotently in one transaction.

        Returns:
            How many rows were new.
        """
        self._require()
        if not ticks:
            return 0
        return await self._write_many(_INSERT_TICKS, tick_records(ticks))

    async def write_candles(self, candles: Sequence[CandleData]) -> int:
        """Upsert candles in one transaction; a forming candle never overwrites a closed one.

        Returns:
            How many rows were inserted or changed.
        """
        self._require()
        if not candles:
            return 0
        # Folded like PostgreSQL does, so both backends count changed rows the same way.
        records = [candle_record(c) for c in dedupe_candles(candles)]
        return await self._write_many(_UPSERT_CANDLES, records)

    async def write_order_flow(self, metrics: Sequence[OrderFlowMetrics]) -> int:
        """Upsert order-flow rows in one transaction.

        Returns:
            How many rows were inserted or changed.
        """
        self._require()
        if not metrics:
            return 0
        records = [order_flow_record(m) for m in dedupe_order_flow(metrics)]
        return await self._write_many(_UPSERT_ORDER_FLOW, records)

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
        stmt = schema.delete_range_stmt(self._tables, kind, symbol, start_ms, end_ms, timeframe)
        async with self._connection(write=True) as conn:
            result = await conn.execute(stmt)
            await conn.commit()
        return int(result.rowcount)

    # ------------------------------------------------------------------ reads

    async def latest_tick(self, symbol: str, *, source: str | None = None) -> TickData | None:
        """Newest tick of ``symbol`` (from ``source``, or any source)."""
        async with self._driver() as db:
            if source is None:
                rows = await db.execute_fetchall(_LATEST_TICK_ANY, (symbol,))
            else:
                rows = await db.execute_fetchall(_LATEST_TICK_SOURCE, (symbol, source))
        return next((tick_from_row(r) for r in rows), None)

    async def latest_ticks(self, symbols: Sequence[str]) -> dict[str, TickData]:
        """Newest tick of each symbol (any source), on one connection."""
        out: dict[str, TickData] = {}
        if not symbols:
            self._require()
            return out
        async with self._driver() as db:
            for symbol in dict.fromkeys(symbols):
                for row in await db.execute_fetchall(_LATEST_TICK_ANY, (symbol,)):
                    out[symbol] = tick_from_row(row)
        return out

    async def _newest_candles(
        self,
        db: Any,
        symbol: str,
        timeframe: str,
        limit: int,
        source: str | None,
        preferred: Sequence[str],
    ) -> list[CandleData]:
        """The newest ``limit`` candles of one key, oldest first; ``db`` is aiosqlite's."""
        if source is None:
            found = await db.execute_fetchall(_CANDLE_SOURCES, (symbol, timeframe))
            source = schema.pick_candle_source([(r[0], r[1]) for r in found], preferred)
            if source is None:
                return []
        rows = await db.execute_fetchall(_LATEST_CANDLES, (symbol, timeframe, source, limit))
        candles = [candle_from_row(r) for r in rows]
        candles.reverse()
        return candles

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
        :class:`~data_manager.storage.base.Storage` protocol)."""
        if limit <= 0:
            self._require()
            return []
        async with self._driver() as db:
            return await self._newest_candles(
                db, symbol, timeframe, limit, source, preferred_sources
            )

    async def latest_candles_many(
        self,
        keys: Sequence[tuple[str, str]],
        limit: int,
        *,
        preferred_sources: Sequence[str] = (),
    ) -> dict[tuple[str, str], list[CandleData]]:
        """The newest ``limit`` candles of every (symbol, timeframe), oldest to newest, on one
        connection (for warm start). Keys without candles map to ``[]``."""
        out: dict[tuple[str, str], list[CandleData]] = {key: [] for key in keys}
        if not out or limit <= 0:
            self._require()
            return out
        async with self._driver() as db:
            for symbol, timeframe in out:
                out[(symbol, timeframe)] = await self._newest_candles(
                    db, symbol, timeframe, limit, None, preferred_sources
                )
        return out

    async def latest_order_flow(
        self, symbol: str, *, source: str | None = None
    ) -> OrderFlowMetrics | None:
        """Newest order-flow metrics of ``symbol`` (any window)."""
        async with self._driver() as db:
            if source is None:
                rows = await db.execute_fetchall(_LATEST_FLOW_ANY, (symbol,))
            else:
                rows = await db.execute_fetchall(_LATEST_FLOW_SOURCE, (symbol, source))
        return next((order_flow_from_row(r) for r in rows), None)

    async def ticks_range(
        self,
        symbol: str,
        start_ms: int,
        end_ms: int,
        *,
        source: str | None = None,
        limit: int | None = None,
    ) -> list[TickData]:
        """Ticks with ``start_ms <= ts < end_ms``, oldest first (at most ``limit``); ticks of
        one millisecond come in insertion order."""
        if limit is not None and limit <= 0:
            self._require()
            return []
        stmt = schema.ticks_range_stmt(
            self._tables,
            symbol,
            start_ms,
            end_ms,
            source=source,
            limit=limit,
            any_source_tie=ROWID,
        )
        async with self._connection(write=False) as conn:
            rows = (await conn.execute(stmt)).all()
        return [tick_from_row(r) for r in rows]

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
        async with self._connection(write=False) as conn:
            if source is None:
                stmt = schema.candle_sources_stmt(self._tables, symbol, timeframe)
                found = [(r[0], r[1]) for r in (await conn.execute(stmt)).all()]
                source = schema.pick_candle_source(found, preferred_sources)
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
        """Stream ticks in ``[start_ms, end_ms)`` oldest first, ``batch_size`` rows per query
        (keyset paging on ``(ts, tie-breaker)``, so memory stays bounded and no connection is
        held between pages). With ``received_before``, only ticks whose ``received_at`` is
        unset or earlier.

        Raises:
            ValidationError: ``received_before`` is not an int.
        """
        self._require()
        received_before = check_received_before(received_before)
        received = self._tables.ticks.c.received_at
        size = max(1, batch_size)
        after: tuple[int, int] | None = None
        while True:
            stmt = schema.ticks_range_stmt(
                self._tables,
                symbol,
                start_ms,
                end_ms,
                source=source,
                limit=size,
                any_source_tie=ROWID,
                after=after,
            )
            if received_before is not None:
                stmt = stmt.where(or_(received.is_(None), received < received_before))
            async with self._connection(write=False) as conn:
                rows = (await conn.execute(stmt)).all()
            for row in rows:
                yield tick_from_row(row)
            if len(rows) < size:
                return
            last = rows[-1]
            after = (last[2], last[-1])

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
        statement (window functions in key order; see :mod:`data_manager.storage.candle_sql`).
        With ``received_before``, only ticks whose ``received_at`` is unset or earlier count.

        SQLite 3.43+ compensates its sums, so volume and VWAP may differ from the Python
        aggregator's in the last bits; everything else is exact.

        Raises:
            ValidationError: Unknown timeframe or price, or ``received_before`` not an int.
        """
        self._require()
        received_before = check_received_before(received_before)
        sql = sqlite_buckets_sql(
            timeframe,
            price=price,
            by_source=source is not None,
            received_before=received_before is not None,
        )
        params: tuple[object, ...] = (symbol, start_ms, end_ms)
        if source is not None:
            params = (*params, source)
        if received_before is not None:
            params = (*params, received_before)
        async with self._driver() as db:
            rows = await db.execute_fetchall(sql, params)
        return [TickBucket(*row) for row in rows]
