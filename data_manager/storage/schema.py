"""Table layout shared by both backends, row <-> model conversion, and schema migrations.

Tables (SQLAlchemy Core; the PostgreSQL schema comes from ``PostgresSettings.db_schema``):

=================  ==========================================  ==============================
table              key                                         extra index
=================  ==========================================  ==============================
``ticks``          PK (symbol, source, ts, content_key)        (symbol, ts): newest, any source
``candles``        PK (symbol, timeframe, source, ts)          none: every read is a PK prefix
``order_flow``     PK (symbol, source, ts, window_ms)          (symbol, ts): newest, any source
``dm_schema_version``  PK (version)                            -
=================  ==========================================  ==============================

Every unique index includes ``ts``, which TimescaleDB requires of a hypertable.

Time columns are ``timestamptz`` on PostgreSQL (readable in SQL, native to TimescaleDB) and
``INTEGER`` Unix ms on SQLite. The code always handles Unix ms: on PostgreSQL each connection
gets an asyncpg codec (:func:`encode_pg_timestamptz` / :func:`decode_pg_timestamptz`) that maps
``timestamptz`` to and from Unix ms with integer arithmetic only, so no ``datetime`` is built
on the hot paths and no float ever touches a timestamp.

Migrations are an ordered tuple of :class:`Migration` steps. A database with no recorded
version runs every step; one recorded at version *n* runs the steps after *n*. Step 1 creates
the tables from the current metadata (``checkfirst``), so every later step must be idempotent
(``IF NOT EXISTS``, or inspect first): on a fresh database it runs after step 1 has already
produced the current layout. Adding version 2 means adding one function and one
:class:`Migration` entry, and bumping ``SCHEMA_VERSION`` in ``base.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import TIMESTAMP

from data_manager.errors import ConfigurationError, ValidationError
from data_manager.models import CandleData, OrderFlowMetrics, TickData, construct_unchecked
from data_manager.storage.base import SCHEMA_VERSION, tick_content_key

if TYPE_CHECKING:
    from pydantic import BaseModel
    from sqlalchemy import Connection, Delete, Select
    from sqlalchemy.sql.elements import ColumnClause
    from sqlalchemy.types import TypeEngine

    from data_manager.storage.base import DataKind

__all__ = [
    "CANDLE_COLUMNS",
    "CANDLE_KEY",
    "MIGRATIONS",
    "ORDER_FLOW_COLUMNS",
    "ORDER_FLOW_KEY",
    "ORDER_FLOW_NEWEST_FIRST",
    "ROWID",
    "Row",
    "TICK_COLUMNS",
    "TICK_NEWEST_FIRST",
    "TICK_READ_COLUMNS",
    "Migration",
    "MigrationOutcome",
    "Tables",
    "build_tables",
    "candle_from_row",
    "candle_record",
    "candle_sources_stmt",
    "candles_stmt",
    "column_list",
    "datetime_to_ms",
    "decode_pg_timestamptz",
    "dedupe_candles",
    "dedupe_order_flow",
    "delete_range_stmt",
    "encode_pg_timestamptz",
    "head_version",
    "migrate",
    "ms_to_datetime",
    "newest_first",
    "order_flow_from_row",
    "order_flow_record",
    "pick_candle_source",
    "quote_ident",
    "tick_from_row",
    "tick_record",
    "tick_records",
    "ticks_range_stmt",
    "upsert_clause",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_INT64_MAX: Final = 2**63 - 1
_ONE_MS: Final = timedelta(milliseconds=1)
_ONE_US: Final = timedelta(microseconds=1)
#: PostgreSQL stores timestamps as microseconds since 2000-01-01; this is that origin in Unix ms.
_PG_EPOCH_MS: Final = 946_684_800_000
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)

#: Column order of a tick row as written (COPY / executemany) and as stored.
TICK_COLUMNS: Final = (
    "symbol",
    "source",
    "ts",
    "content_key",
    "bid",
    "ask",
    "volume",
    "exchange",
    "event_type",
    "use_case",
    "bid_size",
    "ask_size",
    "last_price",
    "last_size",
    "aggressor",
    "seq",
    "received_at",
)
#: Column order :func:`tick_from_row` expects (the stored columns minus ``content_key``).
TICK_READ_COLUMNS: Final = tuple(c for c in TICK_COLUMNS if c != "content_key")

#: The ORDER BY terms that put a symbol's newest tick first: the order the caches keep
#: (:func:`data_manager.cache.codec.supersedes`), highest first. ``source`` compares bytes
#: (its "C" collation on PostgreSQL, BINARY on SQLite), a missing value ranks lowest.
#: ``content_key`` comes last only to make the order total: rows equal on every other term
#: share their key but for -0.0 against 0.0. Only ``ts`` is in an index; the rest orders
#: the few rows of the newest millisecond (PostgreSQL's incremental sort, SQLite's sorter
#: for the right part of an ORDER BY), so a ``LIMIT 1`` stays an index probe.
TICK_NEWEST_FIRST: Final = (
    "ts DESC",
    "source DESC",
    "seq DESC NULLS LAST",
    "bid DESC",
    "ask DESC",
    "bid_size DESC NULLS LAST",
    "ask_size DESC NULLS LAST",
    "last_price DESC NULLS LAST",
    "last_size DESC NULLS LAST",
    "volume DESC NULLS LAST",
    "aggressor DESC NULLS LAST",
    "content_key DESC",
)
#: Order flow's counterpart of :data:`TICK_NEWEST_FIRST`; ``window_ms`` completes the key,
#: so the order is total.
ORDER_FLOW_NEWEST_FIRST: Final = ("ts DESC", "source DESC", "window_ms DESC")


def newest_first(terms: Sequence[str], alias: str = "") -> str:
    """``terms`` as an ORDER BY list, each column qualified with ``alias`` (e.g. ``"x."``)."""
    return ", ".join(alias + term for term in terms)


CANDLE_COLUMNS: Final = (
    "symbol",
    "timeframe",
    "source",
    "ts",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "vwap",
    "range_pips",
    "num_trades",
    "start_time",
    "end_time",
    "event_type",
    "is_closed",
)
CANDLE_KEY: Final = ("symbol", "timeframe", "source", "ts")
ORDER_FLOW_COLUMNS: Final = (
    "symbol",
    "source",
    "ts",
    "window_ms",
    "ofi",
    "volume_delta",
    "buy_volume",
    "sell_volume",
    "imbalance",
    "vwap",
    "toxicity",
    "num_trades",
)
ORDER_FLOW_KEY: Final = ("symbol", "source", "ts", "window_ms")


# --------------------------------------------------------------------------- time


def ms_to_datetime(ms: int) -> datetime:
    """Unix ms -> aware UTC ``datetime``, exactly (integer arithmetic, no float)."""
    return _EPOCH + timedelta(milliseconds=ms)


def datetime_to_ms(value: datetime) -> int:
    """Aware ``datetime`` -> Unix ms, exactly (floors sub-millisecond parts)."""
    return (value - _EPOCH) // _ONE_MS


def encode_pg_timestamptz(value: int | datetime) -> tuple[int]:
    """asyncpg ``tuple``-format encoder for ``timestamptz``: Unix ms (or a datetime) in,
    microseconds since 2000-01-01 out."""
    if isinstance(value, datetime):
        return ((value - _PG_EPOCH) // _ONE_US,)
    return ((value - _PG_EPOCH_MS) * 1000,)


def decode_pg_timestamptz(value: tuple[int]) -> int:
    """asyncpg ``tuple``-format decoder for ``timestamptz``: Unix ms (sub-ms parts floored)."""
    return value[0] // 1000 + _PG_EPOCH_MS


# --------------------------------------------------------------------------- tables


def quote_ident(name: str) -> str:
    """Quote a SQL identifier (``db_schema`` is already restricted to ``[A-Za-z0-9_]``)."""
    return '"' + name.replace('"', '""') + '"'


def _time() -> TypeEngine[int]:
    return BigInteger().with_variant(TIMESTAMP(timezone=True), "postgresql")


def _key(length: int) -> TypeEngine[str]:
    # Byte-wise "C" collation on PostgreSQL: these are identifiers, and memcmp is much cheaper
    # than a locale's strcoll in every index comparison.
    return String(length).with_variant(String(length, collation="C"), "postgresql")


@dataclass(frozen=True, slots=True)
class Tables:
    """The SDK's tables bound to one PostgreSQL schema (or none, on SQLite)."""

    metadata: MetaData
    ticks: Table
    candles: Table
    order_flow: Table
    versions: Table

    def data_table(self, kind: DataKind) -> Table:
        """The table holding ``kind``."""
        tables = {"ticks": self.ticks, "candles": self.candles, "order_flow": self.order_flow}
        return tables[kind]


def build_tables(schema: str | None = None) -> Tables:
    """Describe the tables, qualified with ``schema`` when given."""
    md = MetaData(schema=schema)
    ticks = Table(
        "ticks",
        md,
        Column("symbol", _key(32), nullable=False),
        Column("source", _key(64), nullable=False),
        Column("ts", _time(), nullable=False),
        Column("content_key", BigInteger, nullable=False),
        Column("bid", Double, nullable=False),
        Column("ask", Double, nullable=False),
        Column("volume", Double),
        Column("exchange", BigInteger),
        Column("event_type", Text, nullable=False),
        Column("use_case", Text, nullable=False),
        Column("bid_size", Double),
        Column("ask_size", Double),
        Column("last_price", Double),
        Column("last_size", Double),
        Column("aggressor", String(4)),
        Column("seq", BigInteger),
        Column("received_at", _time()),
        PrimaryKeyConstraint("symbol", "source", "ts", "content_key", name="ticks_pkey"),
        Index("ix_ticks_symbol_ts", "symbol", "ts"),
    )
    candles = Table(
        "candles",
        md,
        Column("symbol", _key(32), nullable=False),
        Column("timeframe", _key(8), nullable=False),
        Column("source", _key(64), nullable=False),
        Column("ts", _time(), nullable=False),
        Column("open", Double, nullable=False),
        Column("high", Double, nullable=False),
        Column("low", Double, nullable=False),
        Column("close", Double, nullable=False),
        Column("volume", Double),
        Column("vwap", Double),
        Column("range_pips", Double),
        Column("num_trades", BigInteger),
        Column("start_time", _time()),
        Column("end_time", _time()),
        Column("event_type", Text, nullable=False),
        Column("is_closed", Boolean, nullable=False),
        PrimaryKeyConstraint(*CANDLE_KEY, name="candles_pkey"),
        # Clustered on the key in SQLite: "last N candles" reads one contiguous run.
        sqlite_with_rowid=False,
    )
    order_flow = Table(
        "order_flow",
        md,
        Column("symbol", _key(32), nullable=False),
        Column("source", _key(64), nullable=False),
        Column("ts", _time(), nullable=False),
        Column("window_ms", BigInteger, nullable=False),
        Column("ofi", Double, nullable=False),
        Column("volume_delta", Double, nullable=False),
        Column("buy_volume", Double, nullable=False),
        Column("sell_volume", Double, nullable=False),
        Column("imbalance", Double, nullable=False),
        Column("vwap", Double),
        Column("toxicity", Double),
        Column("num_trades", BigInteger, nullable=False),
        PrimaryKeyConstraint(*ORDER_FLOW_KEY, name="order_flow_pkey"),
        Index("ix_order_flow_symbol_ts", "symbol", "ts"),
    )
    versions = Table(
        "dm_schema_version",
        md,
        Column("version", Integer, primary_key=True, autoincrement=False),
        Column("description", Text, nullable=False),
        Column("applied_at", _time(), nullable=False),
    )
    return Tables(md, ticks, candles, order_flow, versions)


# --------------------------------------------------------------------------- model -> row


def tick_record(t: TickData) -> tuple[Any, ...]:
    """A tick as a row in :data:`TICK_COLUMNS` order."""
    return (
        t.symbol,
        t.source,
        t.timestamp,
        tick_content_key(t),
        t.bid,
        t.ask,
        t.volume,
        t.exchange,
        t.event_type,
        t.use_case,
        t.bid_size,
        t.ask_size,
        t.last_price,
        t.last_size,
        t.aggressor,
        t.seq,
        t.received_at,
    )


def tick_records(ticks: Sequence[TickData]) -> list[tuple[Any, ...]]:
    """Rows for :func:`tick_record`, refusing what no BIGINT column can hold.

    Raises:
        ValidationError: A tick's ``seq`` does not fit in a signed 64-bit integer.
    """
    try:
        return [tick_record(t) for t in ticks]
    except struct.error as exc:
        bad = next((t for t in ticks if t.seq is not None and t.seq > _INT64_MAX), None)
        where = f" ({bad.symbol} at {bad.timestamp}: seq={bad.seq})" if bad else ""
        msg = f"tick seq must fit in a signed 64-bit integer{where}"
        raise ValidationError(msg) from exc


def candle_record(c: CandleData) -> tuple[Any, ...]:
    """A candle as a row in :data:`CANDLE_COLUMNS` order."""
    return (
        c.symbol,
        c.timeframe,
        c.source,
        c.timestamp,
        c.open,
        c.high,
        c.low,
        c.close,
        c.volume,
        c.vwap,
        c.range_pips,
        c.num_trades,
        c.start_time,
        c.end_time,
        c.event_type,
        c.is_closed,
    )


def order_flow_record(m: OrderFlowMetrics) -> tuple[Any, ...]:
    """Order-flow metrics as a row in :data:`ORDER_FLOW_COLUMNS` order."""
    return (
        m.symbol,
        m.source,
        m.timestamp,
        m.window_ms,
        m.ofi,
        m.volume_delta,
        m.buy_volume,
        m.sell_volume,
        m.imbalance,
        m.vwap,
        m.toxicity,
        m.num_trades,
    )


def dedupe_candles(candles: Sequence[CandleData]) -> list[CandleData]:
    """One candle per key, resolved as the database would resolve them one after another.

    PostgreSQL refuses ``ON CONFLICT DO UPDATE`` touching a row twice in one statement, so a
    batch holding the same key twice (a forming candle and its close) is folded first: a later
    candle replaces an earlier one unless the earlier one is closed and the later is not.
    """
    chosen: dict[tuple[str, str, str, int], CandleData] = {}
    for c in candles:
        key = (c.symbol, c.timeframe, c.source, c.timestamp)
        held = chosen.get(key)
        if held is None or not held.is_closed or c.is_closed:
            chosen[key] = c
    return list(chosen.values())


def dedupe_order_flow(metrics: Sequence[OrderFlowMetrics]) -> list[OrderFlowMetrics]:
    """One row per key; the last one wins (what sequential upserts would leave)."""
    chosen: dict[tuple[str, str, int, int], OrderFlowMetrics] = {}
    for m in metrics:
        chosen[(m.symbol, m.source, m.timestamp, m.window_ms)] = m
    return list(chosen.values())


# --------------------------------------------------------------------------- row -> model

_M = TypeVar("_M", bound="BaseModel")


class Row(Protocol):
    """What the converters need of a row: positional access (SQLAlchemy ``Row``, asyncpg
    ``Record``, tuples)."""

    def __getitem__(self, index: int, /) -> Any: ...


_TICK_FIELDS: Final = frozenset(TickData.model_fields)
_CANDLE_FIELDS: Final = frozenset(CandleData.model_fields)
_ORDER_FLOW_FIELDS: Final = frozenset(OrderFlowMetrics.model_fields)


def _construct(cls: type[_M], values: dict[str, Any], fields: frozenset[str]) -> _M:
    """A model from values the database already validated, without validating again.

    A range read can return 100k rows; this costs a fifth of ``model_construct`` (see
    :func:`data_manager.models.construct_unchecked`). A unit test checks the outcome equals a
    validated model.
    """
    return construct_unchecked(cls, values, set(fields))


def tick_from_row(r: Row) -> TickData:
    """A tick from a row in :data:`TICK_READ_COLUMNS` order (``ts`` as Unix ms)."""
    return _construct(
        TickData,
        {
            "symbol": r[0],
            "timestamp": r[2],
            "bid": r[3],
            "ask": r[4],
            "source": r[1],
            "volume": r[5],
            "exchange": r[6],
            "event_type": r[7],
            "use_case": r[8],
            "bid_size": r[9],
            "ask_size": r[10],
            "last_price": r[11],
            "last_size": r[12],
            "aggressor": r[13],
            "seq": r[14],
            "received_at": r[15],
        },
        _TICK_FIELDS,
    )


def candle_from_row(r: Row) -> CandleData:
    """A candle from a row in :data:`CANDLE_COLUMNS` order (times as Unix ms)."""
    return _construct(
        CandleData,
        {
            "symbol": r[0],
            "timeframe": r[1],
            "timestamp": r[3],
            "open": r[4],
            "high": r[5],
            "low": r[6],
            "close": r[7],
            "source": r[2],
            "volume": r[8],
            "vwap": r[9],
            "range_pips": r[10],
            "num_trades": r[11],
            "start_time": r[12],
            "end_time": r[13],
            "event_type": r[14],
            "is_closed": bool(r[15]),
        },
        _CANDLE_FIELDS,
    )


def order_flow_from_row(r: Row) -> OrderFlowMetrics:
    """Order-flow metrics from a row in :data:`ORDER_FLOW_COLUMNS` order."""
    return _construct(
        OrderFlowMetrics,
        {
            "symbol": r[0],
            "timestamp": r[2],
            "window_ms": r[3],
            "ofi": r[4],
            "volume_delta": r[5],
            "buy_volume": r[6],
            "sell_volume": r[7],
            "imbalance": r[8],
            "vwap": r[9],
            "toxicity": r[10],
            "num_trades": r[11],
            "source": r[1],
        },
        _ORDER_FLOW_FIELDS,
    )


# --------------------------------------------------------------------------- portable queries


def candle_sources_stmt(tables: Tables, symbol: str, timeframe: str) -> Select[Any]:
    """Every source of (symbol, timeframe) with its newest candle's ``ts``.

    A loose index scan (recursive CTE hopping from one source to the next on the primary key)
    plus one max() probe per source: a handful of index lookups however many candles there are,
    where ``GROUP BY source`` would read them all.
    """
    c = tables.candles
    prefix = and_(c.c.symbol == symbol, c.c.timeframe == timeframe)
    first = select(c.c.source).where(prefix).order_by(c.c.source).limit(1).scalar_subquery()
    seed = select(first.label("source")).cte("dm_sources", recursive=True)
    following = (
        select(c.c.source)
        .where(prefix, c.c.source > seed.c.source)
        .order_by(c.c.source)
        .limit(1)
        .scalar_subquery()
    )
    sources = seed.union_all(select(following).where(seed.c.source.is_not(None)))
    newest = select(func.max(c.c.ts)).where(prefix, c.c.source == sources.c.source)
    return select(sources.c.source, newest.scalar_subquery().label("newest")).where(
        sources.c.source.is_not(None)
    )


#: Source prefix of candles the SDK aggregated itself (``agg:<tick source>``).
AGGREGATED_PREFIX: Final = "agg:"


def pick_candle_source(
    found: Sequence[tuple[str, int]] | Mapping[str, int], preferred: Sequence[str]
) -> str | None:
    """The first preferred source present in ``found``; else explicitly saved sources win
    over aggregated ones (``agg:…``), then the one with the newest candle (ties go to the
    smallest name, so the choice is stable)."""
    newest = dict(found)
    for source in preferred:
        if source in newest:
            return source
    if not newest:
        return None
    return min(newest, key=lambda s: (s.startswith(AGGREGATED_PREFIX), -newest[s], s))


def delete_range_stmt(
    tables: Tables,
    kind: DataKind,
    symbol: str,
    start_ms: int,
    end_ms: int,
    timeframe: str | None,
) -> Delete:
    """``DELETE`` the rows of ``symbol`` with ``start_ms <= ts < end_ms`` (one timeframe's
    candles when ``timeframe`` is given)."""
    t = tables.data_table(kind)
    stmt = delete(t).where(t.c.symbol == symbol, t.c.ts >= start_ms, t.c.ts < end_ms)
    if kind == "candles" and timeframe is not None:
        stmt = stmt.where(t.c.timeframe == timeframe)
    return stmt


#: SQLite's implicit row id: insertion order, and the tail of every SQLite index.
ROWID: Final[ColumnClause[Any]] = literal_column("rowid")


def ticks_range_stmt(
    tables: Tables,
    symbol: str,
    start_ms: int,
    end_ms: int,
    *,
    source: str | None,
    limit: int | None,
    any_source_tie: Any = None,
    after: tuple[int, int] | None = None,
) -> Select[Any]:
    """Ticks with ``start_ms <= ts < end_ms``, oldest first, in :data:`TICK_READ_COLUMNS`
    order plus a trailing tie-breaker column (for keyset paging).

    The tie-breaker makes the order total: ``content_key`` within one source (the primary
    key's order), ``any_source_tie`` across sources (SQLite passes :data:`ROWID`, which its
    ``(symbol, ts)`` index carries for free; PostgreSQL passes nothing and orders by ``ts``
    alone). ``after`` = (ts, tie) of the last row already seen continues from there.
    """
    t = tables.ticks
    tie = t.c.content_key if source is not None else any_source_tie
    cols = [t.c[name] for name in TICK_READ_COLUMNS]
    stmt = select(*cols, tie if tie is not None else t.c.content_key).where(
        t.c.symbol == symbol, t.c.ts < end_ms
    )
    if after is None or tie is None:
        stmt = stmt.where(t.c.ts >= start_ms)
    else:
        # (ts, tie) > after, spelled so that ``ts >= last_ts`` bounds the index range.
        last_ts, last_tie = after
        stmt = stmt.where(t.c.ts >= max(start_ms, last_ts), or_(t.c.ts > last_ts, tie > last_tie))
    if source is not None:
        stmt = stmt.where(t.c.source == source)
    stmt = stmt.order_by(t.c.ts) if tie is None else stmt.order_by(t.c.ts, tie)
    return stmt if limit is None else stmt.limit(limit)


def candles_stmt(
    tables: Tables,
    symbol: str,
    timeframe: str,
    source: str,
    *,
    start_ms: int,
    end_ms: int,
) -> Select[Any]:
    """Candles of one (symbol, timeframe, source) in ``[start_ms, end_ms)``, oldest first
    (a primary-key range scan), in :data:`CANDLE_COLUMNS` order."""
    c = tables.candles
    return (
        select(*(c.c[name] for name in CANDLE_COLUMNS))
        .where(
            c.c.symbol == symbol,
            c.c.timeframe == timeframe,
            c.c.source == source,
            c.c.ts >= start_ms,
            c.c.ts < end_ms,
        )
        .order_by(c.c.ts)
    )


def upsert_clause(
    target: str, columns: Sequence[str], key: Sequence[str], *, distinct: str, guard: str = ""
) -> str:
    """``ON CONFLICT (key) DO UPDATE SET ... WHERE ...`` that skips rows that would not change.

    Args:
        target: How the statement names the target table in the ``WHERE`` clause.
        columns: Every column inserted.
        key: The conflict target.
        distinct: The null-safe "differs" operator (``IS DISTINCT FROM`` / ``IS NOT``).
        guard: An extra condition the update needs (the closed-candle protection).
    """
    updates = [c for c in columns if c not in key]
    set_ = ", ".join(f'"{c}" = excluded."{c}"' for c in updates)
    changed = " OR ".join(f'{target}."{c}" {distinct} excluded."{c}"' for c in updates)
    where = f"({guard}) AND ({changed})" if guard else changed
    conflict = ", ".join(f'"{c}"' for c in key)
    return f"ON CONFLICT ({conflict}) DO UPDATE SET {set_} WHERE {where}"


def column_list(columns: Sequence[str], prefix: str = "") -> str:
    """``"a", "b"`` (or ``p."a", p."b"``) for hand-written SQL."""
    return ", ".join(f'{prefix}"{c}"' for c in columns)


# --------------------------------------------------------------------------- migrations

MigrationStep = Callable[["Connection", Tables], None]


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema's history: what ``upgrade`` does takes the database to
    ``version``. Steps after the first must be idempotent (see the module docstring)."""

    version: int
    description: str
    upgrade: MigrationStep


@dataclass(frozen=True, slots=True)
class MigrationOutcome:
    """What :func:`migrate` found and did."""

    found: int | None
    version: int
    created: bool

    @property
    def migrated_from(self) -> int | None:
        """The version an existing database was upgraded from, if it was."""
        if self.found is not None and self.found < self.version:
            return self.found
        return None


def _v1_create_tables(conn: Connection, tables: Tables) -> None:
    tables.metadata.create_all(
        conn, tables=[tables.ticks, tables.candles, tables.order_flow], checkfirst=True
    )


#: The schema's history, oldest first. ``MIGRATIONS[-1].version`` equals ``SCHEMA_VERSION``.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ticks, candles and order_flow tables", _v1_create_tables),
)


def head_version() -> int:
    """The version the current :data:`MIGRATIONS` lead to."""
    return MIGRATIONS[-1].version


def migrate(conn: Connection, tables: Tables, *, target: str, now_ms: int) -> MigrationOutcome:
    """Bring the database to :func:`head_version` (sync; run through ``run_sync``).

    The caller holds a transaction and whatever lock keeps two processes from migrating at
    once; every step and its version row commit together or not at all.

    Raises:
        ConfigurationError: The database records a version newer than this SDK knows.
    """
    head = head_version()
    v = tables.versions
    v.create(conn, checkfirst=True)
    found: int | None = conn.execute(select(func.max(v.c.version))).scalar()
    if found is not None and found > head:
        msg = (
            f"the database at {target} has schema version {found}, newer than version {head} "
            f"that this data_manager supports; upgrade data_manager to use it"
        )
        raise ConfigurationError(msg)
    current = 0 if found is None else found
    for step in MIGRATIONS:
        if current < step.version <= head:
            step.upgrade(conn, tables)
            conn.execute(
                insert(v).values(
                    version=step.version, description=step.description, applied_at=now_ms
                )
            )
    return MigrationOutcome(found=found, version=head, created=found is None)


assert MIGRATIONS[-1].version == SCHEMA_VERSION, "MIGRATIONS and SCHEMA_VERSION disagree"
