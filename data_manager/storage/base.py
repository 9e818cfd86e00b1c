"""The storage interface the router depends on, and what every backend shares.

Keys (see ``docs/DECISIONS.md``):

* **tick**: ``(symbol, source, ts, content_key)`` where ``content_key`` is a signed 64-bit
  BLAKE2b digest of the tick's content (bid, ask, bid/ask size, last price/size, volume,
  aggressor, seq). A replayed tick hits the same key and is skipped; two different quotes in
  the same millisecond have different keys and are both kept.
* **candle**: ``(symbol, timeframe, source, ts)`` (ts = bucket start); writes upsert, except
  that a forming candle (``is_closed=False``) never overwrites a closed one.
* **order flow**: ``(symbol, source, ts, window_ms)``; writes upsert.

Tick order: within one source, ticks are ordered by ``(ts, content_key)`` (the primary key).
Storage keeps no arrival order, so that is the order every rebuild from stored ticks uses
(:func:`in_key_order` restores it on a stream that ordered by ``ts`` alone).

Timestamps cross this interface as Unix ms; each backend stores them its own way.
Ranges are half-open: ``start_ms <= ts < end_ms``.

``received_before`` (``iter_ticks``, ``aggregate_tick_buckets``) keeps only ticks stamped
before that moment, ``received_at < received_before``, plus those without a stamp: after a
crash, a router rebuilds candles from what the dead router had received, without the ticks
it received itself since it started. ``None`` adds no predicate at all, so the statements
(and their plans) are those of a plain range.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, Protocol

from data_manager.errors import ValidationError
from data_manager.models import CandleData, OrderFlowMetrics, TickData

if TYPE_CHECKING:
    from data_manager.aggregation import PriceField

__all__ = [
    "SCHEMA_VERSION",
    "TICK_CONTENT_FIELDS",
    "BackendHealth",
    "DataKind",
    "PoolStatus",
    "SchemaInfo",
    "Storage",
    "TickBucket",
    "check_received_before",
    "in_key_order",
    "tick_content_key",
]

#: Version of the table layout this SDK writes. A database with a newer one is refused.
SCHEMA_VERSION: Final = 1

DataKind = Literal["ticks", "candles", "order_flow"]

_NONE: Final = float("nan")  # stands for "no value" inside the packed content
_CONTENT: Final = struct.Struct("<7dq1s")
_AGGRESSOR: Final = {None: b"-", "buy": b"b", "sell": b"s"}


#: The fields whose values :func:`tick_content_key` digests (with the symbol, source and
#: timestamp they make a stored tick's key; ``received_at`` and labels are not part of it).
TICK_CONTENT_FIELDS: Final = (
    "bid",
    "ask",
    "bid_size",
    "ask_size",
    "last_price",
    "last_size",
    "volume",
    "seq",
    "aggressor",
)


def tick_content_key(
    tick: TickData,
    _pack: Any = _CONTENT.pack,
    _nan: float = _NONE,
    _aggressor: Any = _AGGRESSOR,
    _digest: Any = blake2b,
    _from_bytes: Any = int.from_bytes,
) -> int:
    """Return the signed 64-bit content digest that makes tick writes idempotent (of the
    :data:`TICK_CONTENT_FIELDS`, unrolled here: this runs once per stored tick)."""
    # Reads the field dict once and binds every helper as a default: this runs once per
    # stored tick, and the nested helper it replaces cost a third of the time.
    d = tick.__dict__
    bid_size, ask_size, last_price = d["bid_size"], d["ask_size"], d["last_price"]
    last_size, volume, seq = d["last_size"], d["volume"], d["seq"]
    packed = _pack(
        d["bid"],
        d["ask"],
        _nan if bid_size is None else float(bid_size),
        _nan if ask_size is None else float(ask_size),
        _nan if last_price is None else float(last_price),
        _nan if last_size is None else float(last_size),
        _nan if volume is None else float(volume),
        -1 if seq is None else seq,
        _aggressor[d["aggressor"]],
    )
    key: int = _from_bytes(_digest(packed, digest_size=8).digest(), "little", signed=True)
    return key


def check_received_before(value: object) -> int | None:
    """``received_before`` as given, once it is known to be ``None`` or an ``int`` (Unix ms).

    Raises:
        ValidationError: Anything else, a ``bool`` included.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"received_before must be Unix ms as an int or None, got {value!r}"
        raise ValidationError(msg)
    return int(value)


async def in_key_order(ticks: AsyncIterable[TickData]) -> AsyncGenerator[TickData, None]:
    """Re-yield a stream ordered by timestamp so that ticks of one millisecond come in key
    order, ``(source, content_key)``.

    ``iter_ticks`` without a source orders by ``ts`` alone on PostgreSQL (and by insertion
    order within a millisecond on SQLite); aggregation needs one defined order, the one
    :meth:`Storage.aggregate_tick_buckets` uses. Only ticks sharing a millisecond are
    buffered, and their keys computed.
    """
    tied: list[TickData] = []
    async for tick in ticks:
        if tied and tick.timestamp != tied[0].timestamp:
            if len(tied) > 1:
                tied.sort(key=_source_and_key)
            for held in tied:
                yield held
            tied.clear()
        tied.append(tick)
    if len(tied) > 1:
        tied.sort(key=_source_and_key)
    for held in tied:
        yield held


def _source_and_key(tick: TickData) -> tuple[str, int]:
    return tick.source, tick_content_key(tick)


class TickBucket(NamedTuple):
    """Stored ticks of one (tick source, bucket) aggregated by the database; see
    :meth:`Storage.aggregate_tick_buckets`.

    The price fields are ``None`` and ``num_trades`` is 0 when no tick of the bucket carried a
    price (``price="last"`` and only quotes): such a row still tells that the source had
    ticks in that bucket, which closes its earlier buckets.
    """

    source: str
    """The tick source (without the aggregation prefix)."""
    start: int
    """Bucket start, Unix ms."""
    num_trades: int
    """Ticks that contributed a price (the candle's ``num_trades``)."""
    open: float | None
    high: float | None
    low: float | None
    close: float | None
    first_ts: int | None
    """Timestamp of the first tick that contributed a price."""
    last_ts: int | None
    """Timestamp of the last tick that contributed a price."""
    volume_count: int
    """Of the ``num_trades`` ticks, those that carried a volume (``volume``, else ``last_size``)."""
    volume: float | None
    """Sum of those volumes in tick order (``None`` when ``volume_count`` is 0)."""
    notional: float | None
    """Sum of price x volume over the same ticks, in tick order."""


@dataclass(frozen=True, slots=True)
class SchemaInfo:
    """What ``create_schema`` found or did."""

    version: int
    created: bool
    migrated_from: int | None
    timescaledb: bool
    timescaledb_version: str | None = None


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """Connection pool usage."""

    size: int
    in_use: int
    idle: int
    waiting: int
    max_size: int


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """One backend's answer to a health probe."""

    name: str
    kind: str
    reachable: bool
    latency_ms: float | None = None
    version: str | None = None
    timescaledb: bool = False
    timescaledb_version: str | None = None
    error: str | None = None
    details: dict[str, object] = field(default_factory=dict)


class Storage(Protocol):
    """A durable store of ticks, candles and order flow.

    Every method translates driver errors into the SDK's tree (``errors.map_database_errors``).
    Writes are idempotent under the keys in the module docstring; bulk writes use the
    backend's fastest path (COPY into a staging table on PostgreSQL).
    """

    @property
    def kind(self) -> str:
        """``"postgresql"`` or ``"sqlite"``."""
        ...

    @property
    def target(self) -> str:
        """Where it points, for messages (never contains a password)."""
        ...

    async def connect(self) -> None:
        """Open the pool and check one connection. Raises ``DatabaseConnectionError``."""
        ...

    async def create_schema(self) -> SchemaInfo:
        """Create or migrate the tables idempotently; refuse a newer schema."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...

    async def ping(self) -> BackendHealth:
        """Round-trip a trivial query and report reachability, latency and version."""
        ...

    def pool_status(self) -> PoolStatus:
        """Current pool usage (no I/O)."""
        ...

    async def write_ticks(self, ticks: Sequence[TickData]) -> int:
        """Store ticks idempotently in one transaction; return how many rows were new."""
        ...

    async def write_candles(self, candles: Sequence[CandleData]) -> int:
        """Upsert candles in one transaction; return how many rows changed."""
        ...

    async def write_order_flow(self, metrics: Sequence[OrderFlowMetrics]) -> int:
        """Upsert order-flow rows in one transaction; return how many rows changed."""
        ...

    async def latest_tick(self, symbol: str, *, source: str | None = None) -> TickData | None:
        """Newest tick of ``symbol`` (from ``source``, or any source)."""
        ...

    async def latest_ticks(self, symbols: Sequence[str]) -> dict[str, TickData]:
        """Newest tick of each symbol, any source, in one round trip where possible."""
        ...

    async def latest_candles(
        self,
        symbol: str,
        timeframe: str,
        limit: int,
        *,
        source: str | None = None,
        preferred_sources: Sequence[str] = (),
    ) -> list[CandleData]:
        """The newest ``limit`` candles, returned oldest to newest.

        Without ``source``: the first of ``preferred_sources`` that has candles for
        (symbol, timeframe), else the source whose newest candle is newest.
        """
        ...

    async def ticks_range(
        self,
        symbol: str,
        start_ms: int,
        end_ms: int,
        *,
        source: str | None = None,
        limit: int | None = None,
    ) -> list[TickData]:
        """Ticks with ``start_ms <= ts < end_ms``, oldest first."""
        ...

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
        """Candles with ``start_ms <= ts < end_ms``, oldest first (source chosen as in
        :meth:`latest_candles`)."""
        ...

    async def latest_order_flow(
        self, symbol: str, *, source: str | None = None
    ) -> OrderFlowMetrics | None:
        """Newest order-flow metrics of ``symbol``."""
        ...

    async def delete_range(
        self,
        symbol: str,
        start_ms: int,
        end_ms: int,
        kind: DataKind,
        *,
        timeframe: str | None = None,
    ) -> int:
        """Delete ``kind`` rows of ``symbol`` in ``[start_ms, end_ms)``; return how many."""
        ...

    async def latest_candles_many(
        self,
        keys: Sequence[tuple[str, str]],
        limit: int,
        *,
        preferred_sources: Sequence[str] = (),
    ) -> dict[tuple[str, str], list[CandleData]]:
        """:meth:`latest_candles` for many (symbol, timeframe) keys in a few queries."""
        ...

    def reset_after_fork(self) -> None:
        """Drop the parent's connections without closing them (called in a forked child)."""
        ...

    def iter_ticks(
        self,
        symbol: str,
        start_ms: int,
        end_ms: int,
        *,
        source: str | None = None,
        batch_size: int = 10_000,
        received_before: int | None = None,
    ) -> AsyncGenerator[TickData, None]:
        """Stream ticks in ``[start_ms, end_ms)`` oldest first with a server-side cursor.

        With ``received_before`` (Unix ms), only ticks whose ``received_at`` is unset or
        earlier; a non-int raises :class:`~data_manager.errors.ValidationError` on the first
        iteration.
        """
        ...

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
        """Aggregate the ticks in ``[start_ms, end_ms)`` per (tick source, bucket), in SQL.

        Buckets are the fixed UTC grid of ``timeframe`` (weeks start on Monday), computed
        by the database, with the rules of :mod:`data_manager.aggregation` applied to the
        ticks of each source in key order ``(ts, content_key)``. One row per (source,
        bucket) that holds any tick, ordered by source then bucket start;
        :func:`data_manager.storage.candle_sql.candles_from_buckets` turns them into
        candles. The SQL lives in :mod:`data_manager.storage.candle_sql`. With
        ``received_before`` (Unix ms), only ticks whose ``received_at`` is unset or earlier
        count, as if the others were not stored.

        Raises:
            ValidationError: Unknown timeframe or price, or ``received_before`` not an int.
        """
        ...
