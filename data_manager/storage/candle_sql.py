"""Candles rebuilt from stored ticks by the database: the SQL, and the rows -> candles step.

:meth:`~data_manager.storage.base.Storage.aggregate_tick_buckets` runs one of three
statements built here and returns one :class:`~data_manager.storage.base.TickBucket` per
(tick source, bucket); :func:`candles_from_buckets` turns those rows into the candles
:class:`~data_manager.aggregation.CandleAggregator` gives for the same ticks.
``DataRouter.rebuild_candles`` uses them (``method="auto"`` or ``"sql"``).

The statements
    * **TimescaleDB** (the extension is installed in the database): ``time_bucket`` with its
      default origin, Monday 2000-01-03 00:00 UTC, which puts every timeframe on the SDK's
      grid (epoch-aligned, weeks on Monday); ``first``/``last`` for open and close.
    * **PostgreSQL**: ``date_bin`` on the same grid (PostgreSQL 14+); open and close from
      one ``array_agg(px ORDER BY ts, content_key)``.
    * **SQLite** (``ts`` is already Unix ms): integer arithmetic and one ``GROUP BY``; open
      and close by primary-key probes (correlated subqueries).

Semantics (those of :mod:`data_manager.aggregation`)
    Ticks of a source are taken in key order ``(ts, content_key)``, the order
    ``iter_ticks(..., source=...)`` yields them. Price: ``(bid + ask) / 2``, ``bid``, ``ask``
    or ``last_price`` (with ``"last"``, a tick without one adds nothing to its bucket but its
    row still exists). Volume: ``coalesce(volume, last_size)``. ``first``/``last`` break ties
    on ``ts`` with ``content_key`` through one numeric key, ``ts_ms * 2**64 + content_key``
    (unique and ordered like ``(ts, content_key)``), because TimescaleDB's ``first`` keeps
    whichever tied row it met first. With ``received_before``, ticks stamped at or after
    the bound are left out everywhere, as if they were not stored.

Float sums
    On PostgreSQL volume and price x volume are added in key order,
    ``sum(... ORDER BY ts, content_key)``: a plain running ``float8`` sum, bit-identical to
    the Python aggregator. SQLite's ``sum()`` takes rows in the order its grouping delivers
    them and is compensated from 3.43 on (Kahan-Babuska-Neumaier), so there volume and VWAP
    may differ from Python's in the last bits (tests compare them with
    ``math.isclose(rel_tol=1e-12)``); prices, counts and times are exact everywhere.

What SQL cannot do
    Buckets that follow a calendar (``daily_close="new_york_17"`` for 4h/1d/1w move with New
    York daylight saving time) and gap candles stay with the streaming aggregator; see
    :func:`sql_bucketable`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Final

from data_manager.aggregation import bucket_bounds, default_pip_size
from data_manager.errors import ValidationError
from data_manager.models import MAX_SOURCE_LENGTH, CandleData, construct_unchecked, timeframe_ms
from data_manager.storage.schema import ms_to_datetime, quote_ident

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Sequence

    from data_manager.aggregation import DailyClose, PriceField
    from data_manager.storage.base import TickBucket

__all__ = [
    "CHUNK_MS",
    "RECEIVED_BEFORE_SQL",
    "TIMESCALEDB_SCHEMA_SQL",
    "bucket_grid",
    "candles_from_buckets",
    "postgres_buckets_sql",
    "rebuild_chunks",
    "sql_bucketable",
    "sqlite_buckets_sql",
]

#: Where the ``timescaledb`` extension's functions live, or no row without the extension.
TIMESCALEDB_SCHEMA_SQL: Final = (
    "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
    "WHERE e.extname = 'timescaledb'"
)

#: Ticks aggregated per statement in a rebuild: a day (a week for ``"1w"``). Bounds the
#: rows held in memory and each statement's run time (``statement_timeout`` applies).
CHUNK_MS: Final = 86_400_000

_PRICE_SQL: Final = {
    "mid": "(bid + ask) / 2",  # TickData.mid's expression: the same float, bit for bit
    "bid": "bid",
    "ask": "ask",
    "last": "last_price",
}
#: Timeframes whose buckets follow New York time under ``daily_close="new_york_17"``.
_CALENDAR_TIMEFRAMES: Final = frozenset({"4h", "1d", "1w"})
#: ``ts_ms * 2**64 + content_key`` orders like ``(ts, content_key)``: content_key is int64.
_KEY_SCALE: Final = 2**64
#: Ticks kept by ``received_before``: unstamped ones, and those received before the bound
#: (``.format(parameter)``); the PostgreSQL ``iter_ticks`` statements use it too.
RECEIVED_BEFORE_SQL: Final = " AND (received_at IS NULL OR received_at < {})"
_PRICED: Final = "FILTER (WHERE px IS NOT NULL)"
_CANDLE_FIELDS_SET: Final = set(CandleData.model_fields)


def sql_bucketable(timeframe: str, daily_close: DailyClose) -> bool:
    """Whether ``timeframe``'s buckets tile time at a fixed length (what SQL computes): every
    timeframe under ``daily_close="utc"``, and those of an hour or less under
    ``"new_york_17"`` (New York's UTC offset is a whole number of hours)."""
    return daily_close == "utc" or timeframe not in _CALENDAR_TIMEFRAMES


def bucket_grid(timeframe: str) -> tuple[int, int]:
    """``(length, origin)`` in ms of the UTC bucket grid, ``start = ts - (ts - origin) % length``:
    origin 0, or Monday 1970-01-05 for ``"1w"`` (taken from
    :func:`~data_manager.aggregation.bucket_bounds`).

    Raises:
        ValidationError: Unknown timeframe.
    """
    length = timeframe_ms(timeframe)
    return length, bucket_bounds(0, timeframe)[0] % length


def rebuild_chunks(first: int, last: int, timeframe: str) -> list[tuple[int, int]]:
    """Split ``[first, last)`` (bucket-aligned) into bucket-aligned pieces of
    :data:`CHUNK_MS` (one bucket when longer), newest first."""
    length = timeframe_ms(timeframe)
    span = max(length, CHUNK_MS - CHUNK_MS % length)
    starts = range(first, last, span)
    return [(lo, min(lo + span, last)) for lo in reversed(starts)]


def _check_price(price: str) -> str:
    try:
        return _PRICE_SQL[price]
    except KeyError:
        msg = f"price must be one of {tuple(_PRICE_SQL)}, got {price!r}"
        raise ValidationError(msg) from None


@lru_cache(maxsize=256)
def postgres_buckets_sql(
    db_schema: str,
    timeframe: str,
    *,
    price: PriceField,
    by_source: bool,
    timescaledb_schema: str | None,
    received_before: bool = False,
) -> str:
    """The PostgreSQL statement of :meth:`aggregate_tick_buckets`.

    Parameters: ``$1`` symbol, ``$2``/``$3`` the range (``timestamptz``, Unix ms through the
    connection's codec), ``$4`` the tick source when ``by_source``, then the
    ``received_before`` bound (``timestamptz`` too) when ``received_before``. Columns in
    :class:`~data_manager.storage.base.TickBucket` order.

    Args:
        db_schema: The SDK's schema (``PostgresSettings.db_schema``).
        timeframe: A key of ``models.TIMEFRAMES`` (always the UTC grid).
        price: ``"mid"``, ``"bid"``, ``"ask"`` or ``"last"``.
        by_source: Restrict to one tick source (``$4``).
        timescaledb_schema: Schema of the ``timescaledb`` extension: use ``time_bucket`` and
            ``first``/``last``; ``None`` for plain PostgreSQL.
        received_before: Keep only ticks with ``received_at`` unset or below the last
            parameter; ``False`` leaves the statement without that predicate.

    Raises:
        ValidationError: Unknown timeframe or price.
    """
    length, origin = bucket_grid(timeframe)
    px = _check_price(price)
    width = f"INTERVAL '{length} milliseconds'"
    key = "k"
    if timescaledb_schema is not None:
        ext = quote_ident(timescaledb_schema)
        # Default origin (Monday 2000-01-03 UTC) = the SDK's grid for every timeframe.
        bucket = f"{ext}.time_bucket({width}, ts)"
        # extract() is numeric (exact); the key orders like (ts, content_key).
        extra = f",\n           extract(epoch FROM ts) * {1000 * _KEY_SCALE} + content_key AS {key}"
        open_ = f"{ext}.first(px, {key}) {_PRICED}"
        close = f"{ext}.last(px, {key}) {_PRICED}"
    else:
        # date_bin (PostgreSQL 14+) is integer arithmetic on the stored microseconds;
        # the same arithmetic on extract(epoch)'s numeric milliseconds made the statement
        # ~25 % slower (200k ticks).
        bucket = f"date_bin({width}, ts, TIMESTAMPTZ '{ms_to_datetime(origin).isoformat()}')"
        extra = ""
        # One array serves open and close (identical aggregate calls are computed once).
        prices = f"(array_agg(px ORDER BY ts, content_key) {_PRICED})"
        open_ = f"{prices}[1]"
        close = f"{prices}[count(px)]"
    filters = " AND source = $4" if by_source else ""
    if received_before:
        filters += RECEIVED_BEFORE_SQL.format(f"${5 if by_source else 4}")
    return f"""WITH t AS (
    SELECT source, ts, content_key,
           {bucket} AS bucket,
           {px} AS px,
           coalesce(volume, last_size) AS vol{extra}
      FROM {quote_ident(db_schema)}.ticks
     WHERE symbol = $1 AND ts >= $2 AND ts < $3{filters}
)
SELECT source, bucket,
       count(px),
       {open_},
       max(px),
       min(px),
       {close},
       min(ts) {_PRICED},
       max(ts) {_PRICED},
       count(vol) {_PRICED},
       sum(vol ORDER BY ts, content_key) {_PRICED},
       sum(px * vol ORDER BY ts, content_key)
  FROM t
 GROUP BY source, bucket
 ORDER BY source, bucket"""


@lru_cache(maxsize=64)
def sqlite_buckets_sql(
    timeframe: str, *, price: PriceField, by_source: bool, received_before: bool = False
) -> str:
    """The SQLite statement of :meth:`aggregate_tick_buckets`.

    Parameters: ``?1`` symbol, ``?2``/``?3`` the range (Unix ms), ``?4`` the tick source
    when ``by_source``, then the ``received_before`` bound (Unix ms) when
    ``received_before``. One ``GROUP BY`` pass for everything but open and close, which are
    primary-key probes at the bucket's first and last priced millisecond (lowest/highest
    ``content_key``): two index lookups per bucket. (Window functions in key order took
    ~3.5x as long for 200k ticks.) The probes filter on ``received_at`` too, or a tick left
    out could still give a bucket its open or close.
    ``sum()`` adds in whatever order the grouping delivers, so volume and VWAP may differ
    from Python's in the last bits.

    Raises:
        ValidationError: Unknown timeframe or price.
    """
    length, origin = bucket_grid(timeframe)
    px = _check_price(price)
    # ts >= MIN_TIMESTAMP_MS > origin: the operand of % is positive, so % is a floor mod.
    shifted = "ts" if origin == 0 else f"(ts - {origin})"
    filters = " AND source = ?4" if by_source else ""
    probe_filters = f" AND {px} IS NOT NULL" if price == "last" else ""
    if received_before:
        # Numbered parameters: SQLite expects as many values as the highest number.
        received = RECEIVED_BEFORE_SQL.format(f"?{5 if by_source else 4}")
        filters += received
        probe_filters += received

    def probe(value: str, at: str, order: str) -> str:
        return (
            f"(SELECT {value} FROM ticks WHERE symbol = ?1 AND source = g.source "
            f"AND ts = g.{at}{probe_filters} ORDER BY content_key {order} LIMIT 1)"
        )

    return f"""WITH t AS (
    SELECT source, ts,
           ts - {shifted} % {length} AS bucket,
           {px} AS px,
           coalesce(volume, last_size) AS vol
      FROM ticks
     WHERE symbol = ?1 AND ts >= ?2 AND ts < ?3{filters}
), g AS (
    SELECT source, bucket,
           count(px) AS num_trades,
           max(px) AS high,
           min(px) AS low,
           min(CASE WHEN px IS NOT NULL THEN ts END) AS first_ts,
           max(CASE WHEN px IS NOT NULL THEN ts END) AS last_ts,
           count(CASE WHEN px IS NOT NULL THEN vol END) AS volume_count,
           sum(CASE WHEN px IS NOT NULL THEN vol END) AS volume,
           sum(px * vol) AS notional
      FROM t
     GROUP BY source, bucket
)
SELECT source, bucket, num_trades,
       {probe(px, "first_ts", "ASC")},
       high, low,
       {probe(px, "last_ts", "DESC")},
       first_ts, last_ts, volume_count, volume, notional
  FROM g
 ORDER BY source, bucket"""


def candles_from_buckets(
    buckets: Sequence[TickBucket],
    *,
    symbol: str,
    timeframe: str,
    now_ms: int,
    later_sources: Collection[str] = (),
    source_prefix: str = "agg:",
    pip_size: Callable[[str], float] | None = None,
) -> list[CandleData]:
    """Candles from :meth:`aggregate_tick_buckets` rows, as the streaming aggregator builds
    them (``range_pips``, tick volume, VWAP, the ``agg:`` source).

    A bucket is closed when its source has a tick at or after its end (a row of a later
    bucket, here or in ``later_sources``) or when its end is at or before ``now_ms``;
    otherwise it is forming. Rows without a priced tick give no candle.

    Args:
        buckets: Rows of one symbol and timeframe.
        symbol: Their symbol.
        timeframe: Their timeframe.
        now_ms: The router's clock.
        later_sources: Tick sources known to have ticks after these rows' range (a rebuild
            done in chunks, newest first).
        source_prefix: See :class:`~data_manager.aggregation.CandleAggregator`.
        pip_size: See :class:`~data_manager.aggregation.CandleAggregator`.

    Raises:
        ValidationError: An aggregated source would be too long, or the pip size is not
            positive (as the streaming aggregator).
    """
    length = timeframe_ms(timeframe)
    pip = float((pip_size or default_pip_size)(symbol))
    if not pip > 0:
        msg = f"pip_size({symbol!r}) returned {pip!r}; it must be positive"
        raise ValidationError(msg)
    newest: dict[str, int] = {}
    for row in buckets:
        newest[row.source] = max(row.start, newest.get(row.source, row.start))
    out: list[CandleData] = []
    for row in buckets:
        if not row.num_trades:
            continue
        assert row.open is not None
        assert row.high is not None
        assert row.low is not None
        out_source = source_prefix + row.source
        if len(out_source) > MAX_SOURCE_LENGTH:
            msg = (
                f"aggregated source {out_source!r} would exceed {MAX_SOURCE_LENGTH} characters;"
                " shorten the tick source or source_prefix"
            )
            raise ValidationError(msg)
        volume: float
        vwap: float | None
        if row.volume_count:
            assert row.volume is not None
            assert row.notional is not None
            volume = row.volume
            vwap = row.notional / volume if volume > 0 else None
        else:
            volume, vwap = float(row.num_trades), None  # tick volume
        end = row.start + length
        closed = row.source in later_sources or row.start < newest[row.source] or end <= now_ms
        out.append(
            construct_unchecked(
                CandleData,
                {
                    "symbol": symbol,
                    "timeframe": timeframe,
                    "timestamp": row.start,
                    "open": row.open,
                    "high": row.high,
                    "low": row.low,
                    "close": row.close,
                    "source": out_source,
                    "volume": volume,
                    "vwap": vwap,
                    "range_pips": round((row.high - row.low) / pip, 6),
                    "num_trades": row.num_trades,
                    "start_time": row.first_ts,
                    "end_time": row.last_ts,
                    "event_type": "ohlcv",
                    "is_closed": closed,
                },
                _CANDLE_FIELDS_SET,
            )
        )
    return out
