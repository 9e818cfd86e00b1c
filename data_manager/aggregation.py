"""Streaming tick → candle aggregation for several timeframes at once.

:class:`CandleAggregator` keeps, per ``(symbol, tick source, timeframe)``, the bucket being
formed and turns every tick into the candles it changed; :func:`aggregate_ticks` is the same
computation over a finite list (rebuilds, backfills, and the reference in tests). Both are
pure computation: no I/O, no awaits, no wall clock — the live timer enters only through
:meth:`CandleAggregator.close_idle`, so replaying the same ticks in the same order gives the
same candles.

Bucketing
    ``start = ts - ts % tf_ms`` (aligned to the Unix epoch, UTC) with two exceptions:

    * ``"1w"`` starts on Monday 00:00 UTC, the alignment TimescaleDB's ``time_bucket`` uses,
      because epoch-aligned weeks would start on Thursdays.
    * ``daily_close="new_york_17"`` (the FX convention) aligns ``"1d"`` to 17:00
      America/New_York, ``"4h"`` to 17:00/21:00/01:00/05:00/09:00/13:00 New York time (so six
      of them tile one trading day) and ``"1w"`` to Sunday 17:00 New York. Boundaries follow
      daylight saving time, so such a day lasts 23 or 25 hours twice a year (and the 01:00 4h
      bar 3 or 5 hours). Timeframes of an hour or less are unaffected: New York's UTC offset is
      a whole number of hours. Use :func:`bucket_bounds` for the real end of such a bucket;
      ``CandleData.bucket_end`` assumes a fixed length.

    A candle's ``timestamp`` is its bucket start; ``start_time``/``end_time`` are the first and
    last tick's timestamps.

What a tick contributes
    * Price: ``price="mid"`` (default), ``"bid"``, ``"ask"`` or ``"last"``. With ``"last"``, a
      tick without ``last_price`` (a plain quote) contributes no price, volume or count, but
      it still moves event time forward: it closes the buckets it is past.
    * Volume: ``tick.volume``, else ``tick.last_size``. A bucket in which no tick carried
      either reports *tick volume* (the number of ticks, as FX platforms do) and ``vwap=None``;
      as soon as one tick in the bucket carries a real volume, the bucket switches to real
      volume (ticks without one then count 0) and reports the VWAP of the aggregated price.
    * ``num_trades`` counts the ticks that contributed a price: quotes and trades alike for
      ``mid``/``bid``/``ask``, trades only for ``last``.
    * ``range_pips = (high - low) / pip_size``, rounded to 1e-6 pip so that a 5-pip range
      reads 5.0 and not 4.999999999.

Closing and lateness (event time)
    A tick at or after a bucket's end closes it (``is_closed=True``) and opens the next one.
    A tick inside the forming bucket updates it, even if it is older than the bucket's last
    tick (``open``/``close`` stay those of the earliest/latest tick; on equal timestamps the
    first arrival is the open and the last arrival the close). A tick older than the forming
    bucket, or older than the last closed bucket's end, is *late*: ``late_policy="drop"``
    counts it in ``stats.late_dropped``; ``late_policy="rebuild"`` records a
    :class:`RebuildRequest` in ``pending_rebuilds`` so the caller re-aggregates that bucket
    from stored ticks (:meth:`CandleAggregator.rebuild`). Lateness is judged per timeframe:
    a tick late for ``1m`` may still update the forming ``1h`` bar.

Gaps
    Buckets without ticks produce no candle unless ``emit_gap_candles=True``; then, when the
    next tick arrives, one flat candle per empty bucket is emitted at the previous close with
    ``volume=0``, ``num_trades=0``, no ``start_time``/``end_time`` and ``event_type="gap"``.
    :meth:`CandleAggregator.close_idle` never emits gap candles, so live runs and replays
    agree.

Series and restarts
    Each (symbol, tick source) is its own series, and its candles' ``source`` is
    ``source_prefix + tick.source`` (``"agg:polygon"``), so they never overwrite a vendor's
    own candles. The forming buckets live in memory; after a restart,
    :meth:`CandleAggregator.restore` reloads them from the forming candles storage holds.

Folding (``emit_forming=False`` only)
    Per tick, only the finest UTC bucket of a series is updated; each coarser bucket whose
    grid nests it (``1m`` inside ``5m``, ``1h``, ``1d``, ``1w``…) takes the finest bucket's
    candles as they close, and its own forming candle is the merge of what it holds and the
    finest forming candle, computed when it is read or closed. Ticks late for the finest
    bucket but inside a coarser forming one go into that coarser bucket directly; real-volume
    sums are still added per tick, in arrival order, so every field equals per-tick updating
    exactly (a property test compares the two). A bucket that would have to merge a finest
    candle it never saw (after a restart or an idle close) is updated per tick until it
    closes. Six timeframes cost about what one does.

Candles are built without re-running pydantic validation (``_unchecked_candle``): every field
is computed here from already validated ticks, and validation would cost several times the
aggregation itself on the ingest hot path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple
from zoneinfo import ZoneInfo

from data_manager.errors import ValidationError
from data_manager.models import (
    MAX_SOURCE_LENGTH,
    CandleData,
    TickData,
    construct_unchecked,
    timeframe_ms,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = [
    "AggregatorStats",
    "CandleAggregator",
    "DailyClose",
    "LatePolicy",
    "PriceField",
    "RebuildRequest",
    "aggregate_ticks",
    "bucket_bounds",
    "default_pip_size",
]

logger = logging.getLogger(__name__)

PriceField = Literal["mid", "bid", "ask", "last"]
DailyClose = Literal["utc", "new_york_17"]
LatePolicy = Literal["drop", "rebuild"]

_PRICE_FIELDS: Final = ("mid", "bid", "ask", "last")
_DAILY_CLOSES: Final = ("utc", "new_york_17")
_LATE_POLICIES: Final = ("drop", "rebuild")

_DAY_MS: Final = 86_400_000
_WEEK_MS: Final = 7 * _DAY_MS
#: 1970-01-05, the first Monday after the epoch: origin of weekly buckets.
_MONDAY_ORIGIN_MS: Final = 4 * _DAY_MS
#: Timeframes whose boundaries move with New York daylight saving time.
_NEW_YORK_TIMEFRAMES: Final = frozenset({"4h", "1d", "1w"})
_NEW_YORK_CLOSE_HOUR: Final = 17
_RANGE_DIGITS: Final = 6
#: The candle fields a bucket's ticks determine directly (the rest are derived or fixed).
_PRICE_TIME_FIELDS: Final = ("open", "high", "low", "close", "start_time", "end_time")
# Where a tick falls for a series' finest bucket (see CandleAggregator.update).
_IN_FINE: Final = 0  # inside its forming candle
_OPENS_FINE: Final = 1  # opens its next candle
_LATE_FOR_FINE: Final = 2  # before its forming candle (or watermark): late there


@cache
def _new_york() -> ZoneInfo:
    # Loaded on first use, not at import time.
    return ZoneInfo("America/New_York")


def default_pip_size(symbol: str) -> float:
    """Return the conventional pip size: 0.01 for JPY-quoted pairs, 0.0001 otherwise."""
    return 0.01 if symbol.upper().endswith("JPY") else 0.0001


def _new_york_bounds(timestamp_ms: int, timeframe: str) -> tuple[int, int]:
    """Bucket of a New-York-aligned timeframe, computed on the local wall clock.

    Every anchor (17:00, 21:00, 01:00, 05:00, 09:00, 13:00, Sunday 17:00) avoids the 02:00
    hour in which US clocks change, so an anchor always exists; an ambiguous 01:00 (autumn)
    resolves to its first occurrence (``fold=0``), which is where that bucket starts.
    """
    tz = _new_york()
    local = datetime.fromtimestamp(timestamp_ms // 1000, tz)
    wall = local.replace(tzinfo=None, minute=0, second=0, microsecond=0, fold=0)
    if timeframe == "4h":
        start_wall = wall - timedelta(hours=(wall.hour - 1) % 4)
        length = timedelta(hours=4)
    elif timeframe == "1d":
        start_wall = wall.replace(hour=_NEW_YORK_CLOSE_HOUR)
        if wall.hour < _NEW_YORK_CLOSE_HOUR:
            start_wall -= timedelta(days=1)
        length = timedelta(days=1)
    else:  # "1w": the FX week opens on Sunday 17:00 New York
        days_since_sunday = (wall.weekday() + 1) % 7
        start_wall = wall.replace(hour=_NEW_YORK_CLOSE_HOUR) - timedelta(days=days_since_sunday)
        if start_wall > wall:
            start_wall -= timedelta(days=7)
        length = timedelta(days=7)
    start = start_wall.replace(tzinfo=tz)
    # Wall-clock arithmetic: the end is the same local hour, whatever the UTC offset then.
    end = (start_wall + length).replace(tzinfo=tz)
    return int(start.timestamp()) * 1000, int(end.timestamp()) * 1000


def bucket_bounds(
    timestamp_ms: int, timeframe: str, *, daily_close: DailyClose = "utc"
) -> tuple[int, int]:
    """Return ``(start, end)`` (Unix ms, end exclusive) of the bucket holding ``timestamp_ms``.

    Args:
        timestamp_ms: Any instant, Unix ms.
        timeframe: A key of ``models.TIMEFRAMES``.
        daily_close: ``"utc"`` or ``"new_york_17"`` (see the module docstring).

    Raises:
        ValidationError: Unknown timeframe or daily close.
    """
    length = timeframe_ms(timeframe)
    if daily_close not in _DAILY_CLOSES:
        msg = f"daily_close must be one of {_DAILY_CLOSES}, got {daily_close!r}"
        raise ValidationError(msg)
    if daily_close == "new_york_17" and timeframe in _NEW_YORK_TIMEFRAMES:
        return _new_york_bounds(timestamp_ms, timeframe)
    origin = _MONDAY_ORIGIN_MS if timeframe == "1w" else 0
    start = timestamp_ms - (timestamp_ms - origin) % length
    return start, start + length


class RebuildRequest(NamedTuple):
    """A closed bucket that received a late tick and must be re-aggregated from storage."""

    symbol: str
    source: str
    """The tick source (without the aggregation prefix)."""
    timeframe: str
    bucket_start: int


@dataclass(slots=True)
class AggregatorStats:
    """Counters of a :class:`CandleAggregator` (exposed to health and metrics).

    Attributes:
        ticks: Ticks passed to ``update``.
        candles_closed: Candles emitted with ``is_closed=True`` (gap candles included).
        late_dropped: (tick, timeframe) pairs dropped as late under ``late_policy="drop"``.
        rebuild_requests: (tick, timeframe) pairs routed to ``pending_rebuilds``.
        no_price: Ticks that carried no usable price (``price="last"`` and no
            ``last_price``).
    """

    ticks: int = 0
    candles_closed: int = 0
    late_dropped: int = 0
    rebuild_requests: int = 0
    no_price: int = 0


# Every candle built here sets every field, so all share one fields-set (pydantic copies it
# in model_copy and never mutates it in place on a frozen model).
_CANDLE_FIELDS_SET: Final = set(CandleData.model_fields)


def _unchecked_candle(values: dict[str, Any]) -> CandleData:
    """A CandleData from values already known to be valid (every field, in order)."""
    return construct_unchecked(CandleData, values, _CANDLE_FIELDS_SET)


def _add_price(values: dict[str, Any], ts: int, price: float) -> None:
    """Take one priced tick into a forming candle's open/high/low/close and times: the
    earliest tick opens, the latest closes (on equal times, first and last arrival)."""
    if price > values["high"]:
        values["high"] = price
    elif price < values["low"]:
        values["low"] = price
    if ts >= values["end_time"]:
        values["close"] = price
        values["end_time"] = ts
    elif ts < values["start_time"]:
        values["open"] = price
        values["start_time"] = ts


def _merge_later(values: dict[str, Any], later: dict[str, Any], *, empty: bool) -> None:
    """Merge into ``values`` a candle whose ticks are all later than the ones ``values``
    holds (none when ``empty``): it supplies the close and end time, both the extremes."""
    if empty:
        for key in _PRICE_TIME_FIELDS:
            values[key] = later[key]
        return
    if later["high"] > values["high"]:
        values["high"] = later["high"]
    if later["low"] < values["low"]:
        values["low"] = later["low"]
    values["close"] = later["close"]
    values["end_time"] = later["end_time"]


class _Bucket:
    """State of one (symbol, source, timeframe): the forming bucket and what outlives it.

    ``values`` *is* the forming candle's field dict, updated in place; emitting a forming
    candle copies it (one C-level dict copy instead of rebuilding sixteen fields). The
    fields derived from the running sums (``num_trades``, ``volume``, ``vwap``,
    ``range_pips``) are written only when the candle is emitted (:meth:`settle`), not per
    tick.
    """

    __slots__ = (
        "calendar",
        "count",
        "end",
        "fine",
        "folded",
        "folds_into",
        "last_close",
        "length",
        "origin",
        "pip",
        "real",
        "start",
        "timeframe",
        "values",
        "vnum",
        "vol",
        "watermark",
    )

    def __init__(self, timeframe: str, *, calendar: bool, pip: float) -> None:
        self.timeframe = timeframe
        self.length = timeframe_ms(timeframe)
        self.origin = _MONDAY_ORIGIN_MS if timeframe == "1w" else 0
        self.calendar = calendar  # True: New-York-aligned, boundaries via zoneinfo
        self.values: dict[str, Any] | None = None  # None: no forming bucket
        self.start = 0
        self.end = 0
        self.count = 0
        self.real = False  # True once a tick of this bucket carried a real volume
        self.vol = 0.0
        self.vnum = 0.0  # Σ price·volume, the VWAP numerator
        self.watermark = 0  # end of the last closed bucket: anything before it is late
        self.last_close: float | None = None
        self.pip = pip  # the series' pip size, for range_pips
        # Folding (see CandleAggregator): the series' finest bucket, when this bucket's grid
        # nests it; whether ``values``/``count`` now hold only the ticks outside that finest
        # bucket's forming candle; and, on the finest bucket, the buckets it folds into.
        self.fine: _Bucket | None = None
        self.folded = False
        self.folds_into: list[_Bucket] = []

    def settle(self) -> dict[str, Any]:
        """Complete the forming candle's dict in place (derived fields; a folded bucket also
        takes in the finest bucket's forming candle) and return it."""
        values = self.values
        assert values is not None  # only called on a forming bucket
        if self.folded:
            return self._fold_in(values)
        return self._derive(values, self.count)

    def snapshot(self) -> dict[str, Any]:
        """A complete copy of the forming candle's dict (the bucket's state is untouched)."""
        values = self.values
        assert values is not None  # only called on a forming bucket
        if self.folded:
            return self._fold_in(values.copy())
        return self._derive(values, self.count).copy()

    def _derive(self, values: dict[str, Any], count: int) -> dict[str, Any]:
        values["num_trades"] = count
        if self.real:
            vol = self.vol
            values["volume"] = vol
            values["vwap"] = self.vnum / vol if vol > 0 else None
        else:
            values["volume"] = float(count)
            values["vwap"] = None
        values["range_pips"] = round((values["high"] - values["low"]) / self.pip, _RANGE_DIGITS)
        return values

    def _fold_in(self, values: dict[str, Any]) -> dict[str, Any]:
        return self._derive(values, self._take_fine(values, self.count))

    def fine_candle(self) -> dict[str, Any] | None:
        """The finest bucket's forming candle when it lies inside this bucket, else None."""
        fine = self.fine
        assert fine is not None  # only buckets that fold it ask
        current = fine.values
        if current is not None and self.start <= fine.start < self.end:
            return current
        return None

    def _take_fine(self, values: dict[str, Any], count: int) -> int:
        """Merge the finest forming candle (if inside this bucket) into ``values``, which
        hold ``count`` ticks; return the ticks of both."""
        # Every tick of the finest forming candle is later than every tick held here, so
        # it supplies the close and end time; high and low are the extremes of both.
        current = self.fine_candle()
        if current is None:
            return count
        _merge_later(values, current, empty=count == 0)
        assert self.fine is not None
        return count + self.fine.count

    def absorb(self, closed: dict[str, Any]) -> None:
        """Fold a closed candle of the finest bucket (later than every tick held here)."""
        values = self.values
        assert values is not None  # folded buckets are forming
        _merge_later(values, closed, empty=self.count == 0)
        self.count += closed["num_trades"]

    def unfold(self) -> None:
        """Take in the finest forming candle for good: update per tick again from now on."""
        if self.folded:
            values = self.values
            assert values is not None  # folded buckets are forming
            self.count = self._take_fine(values, self.count)
            self.folded = False

    def add_volume(self, price: float, volume: float) -> None:
        """Count one tick's real volume (the first one switches the bucket to real volume)."""
        if self.real:
            self.vol += volume
            self.vnum += price * volume
        else:  # first real volume: ticks before it count 0
            self.real = True
            self.vol = volume
            self.vnum = price * volume


class _Series:
    """All timeframes of one (symbol, tick source)."""

    __slots__ = ("buckets", "fine", "out_source", "pip", "source", "symbol")

    def __init__(self, symbol: str, source: str, out_source: str, pip: float) -> None:
        self.symbol = symbol
        self.source = source
        self.out_source = out_source
        self.pip = pip
        self.buckets: list[_Bucket] = []
        self.fine: _Bucket | None = None  # the finest bucket others fold, if any

    def link_folding(self) -> None:
        """Let the buckets whose grid nests the finest UTC bucket's fold it."""
        utc = [b for b in self.buckets if not b.calendar]
        if len(utc) < 2:
            return
        fine = min(utc, key=lambda b: b.length)
        nested = [
            b
            for b in utc
            if b is not fine
            and b.length % fine.length == 0
            and (b.origin - fine.origin) % fine.length == 0
        ]
        if nested:
            self.fine = fine
            fine.folds_into = nested
            for bucket in nested:
                bucket.fine = fine


class CandleAggregator:
    """Aggregates a live tick stream into candles of several timeframes.

    Synchronous, allocation-light and not thread-safe: call it from one thread (the
    router's event loop). See the module docstring for the exact rules.

    Args:
        timeframes: Keys of ``models.TIMEFRAMES`` (e.g. ``["1m", "5m", "1h"]``); duplicates
            are ignored.
        price: Which price forms the bars: ``"mid"``, ``"bid"``, ``"ask"`` or ``"last"``.
        source_prefix: Prepended to the tick source to form the candles' source, so
            aggregated candles never overwrite a vendor's own candles.
        pip_size: Pip size per symbol; defaults to :func:`default_pip_size`.
        daily_close: ``"utc"`` or ``"new_york_17"`` (FX bars closing 17:00 New York).
        late_policy: ``"drop"`` (count in ``stats.late_dropped``) or ``"rebuild"`` (record a
            :class:`RebuildRequest` in ``pending_rebuilds``).
        emit_gap_candles: Emit flat zero-volume candles for buckets without ticks.
        emit_forming: Return the updated forming candles from :meth:`update`; ``False``
            returns only closed candles (cheaper when forming bars are not published).

    Raises:
        ValidationError: An option is invalid.
    """

    __slots__ = (
        "_daily_close",
        "_emit_forming",
        "_emit_gaps",
        "_late_policy",
        "_pip_size",
        "_prefix",
        "_price",
        "_series",
        "_timeframes",
        "pending_rebuilds",
        "stats",
    )

    def __init__(
        self,
        *,
        timeframes: Iterable[str],
        price: PriceField = "mid",
        source_prefix: str = "agg:",
        pip_size: Callable[[str], float] | None = None,
        daily_close: DailyClose = "utc",
        late_policy: LatePolicy = "drop",
        emit_gap_candles: bool = False,
        emit_forming: bool = True,
    ) -> None:
        if isinstance(timeframes, str):
            msg = "timeframes must be a collection of timeframes, not a single string"
            raise ValidationError(msg)
        chosen = tuple(dict.fromkeys(timeframes))
        for timeframe in chosen:
            timeframe_ms(timeframe)  # raises on an unknown one
        if not chosen:
            msg = "timeframes must not be empty"
            raise ValidationError(msg)
        if price not in _PRICE_FIELDS:
            msg = f"price must be one of {_PRICE_FIELDS}, got {price!r}"
            raise ValidationError(msg)
        if daily_close not in _DAILY_CLOSES:
            msg = f"daily_close must be one of {_DAILY_CLOSES}, got {daily_close!r}"
            raise ValidationError(msg)
        if late_policy not in _LATE_POLICIES:
            msg = f"late_policy must be one of {_LATE_POLICIES}, got {late_policy!r}"
            raise ValidationError(msg)
        if not isinstance(source_prefix, str) or not source_prefix.isprintable():
            msg = f"source_prefix must be printable text, got {source_prefix!r}"
            raise ValidationError(msg)
        self._timeframes: tuple[str, ...] = chosen
        self._price: PriceField = price
        self._prefix = source_prefix
        self._pip_size = pip_size or default_pip_size
        self._daily_close: DailyClose = daily_close
        self._late_policy: LatePolicy = late_policy
        self._emit_gaps = emit_gap_candles
        self._emit_forming = emit_forming
        self._series: dict[tuple[str, str], _Series] = {}
        #: Closed buckets that received late ticks (``late_policy="rebuild"``).
        self.pending_rebuilds: set[RebuildRequest] = set()
        self.stats = AggregatorStats()

    @property
    def timeframes(self) -> tuple[str, ...]:
        """The timeframes aggregated, in the order given."""
        return self._timeframes

    @property
    def source_prefix(self) -> str:
        """Prefix of the aggregated candles' source."""
        return self._prefix

    # ------------------------------------------------------------------ hot path

    def update(self, tick: TickData) -> list[CandleData]:
        """Feed one tick; return the candles it changed.

        For each timeframe, in order: the candles this tick closed (``is_closed=True``, gap
        candles included), then the forming candle it updated or opened
        (``is_closed=False``, unless ``emit_forming=False``). A late tick returns nothing
        for that timeframe and is counted or queued for rebuild.

        Raises:
            ValidationError: The tick opens a new series and ``source_prefix + tick.source``
                would exceed ``MAX_SOURCE_LENGTH`` or ``pip_size`` gives a non-positive value
                (raised before any state changes).
        """
        mode = self._price
        price: float | None
        if mode == "mid":
            price = (tick.bid + tick.ask) / 2  # same expression as TickData.mid
        elif mode == "bid":
            price = tick.bid
        elif mode == "ask":
            price = tick.ask
        else:
            price = tick.last_price
        series = self._series.get((tick.symbol, tick.source))
        if series is None:
            series = self._new_series(tick.symbol, tick.source)
        self.stats.ticks += 1
        ts = tick.timestamp
        out: list[CandleData] = []
        if price is None:
            # A quote in "last" mode: no price to add, but event time has moved on.
            self.stats.no_price += 1
            for bucket in series.buckets:
                if bucket.values is not None and ts >= bucket.end:
                    out.append(self._close(bucket))
            return out
        volume = tick.volume
        if volume is None:
            volume = tick.last_size
        emit_forming = self._emit_forming
        fine = series.fine
        where = _IN_FINE
        if fine is not None:
            if fine.values is None:
                where = _OPENS_FINE if ts >= fine.watermark else _LATE_FOR_FINE
            elif ts >= fine.end:
                where = _OPENS_FINE
            elif ts < fine.start:
                where = _LATE_FOR_FINE
        for bucket in series.buckets:
            if bucket.folded:
                if where == _IN_FINE:
                    # The finest bucket takes this tick, and this bucket takes that bucket's
                    # candle when it closes: only the volume sums are kept here per tick.
                    if volume is not None:
                        bucket.add_volume(price, volume)
                    continue
                self._update_folded(series, bucket, ts, price, volume, where, out)
                continue
            values = bucket.values
            if values is not None:
                if ts < bucket.end:
                    if ts < bucket.start:
                        self._late(series, bucket, ts)
                        continue
                    _add_price(values, ts, price)
                    bucket.count += 1
                    if volume is not None:
                        bucket.add_volume(price, volume)
                    if emit_forming:
                        out.append(_unchecked_candle(bucket.snapshot()))
                    continue
                out.append(self._close(bucket))
            elif ts < bucket.watermark:
                self._late(series, bucket, ts)
                continue
            self._open(series, bucket, ts, price, volume, out)
            if bucket.fine is not None:
                self._fold_opened(bucket, ts, where)
        return out

    def _update_folded(
        self,
        series: _Series,
        bucket: _Bucket,
        ts: int,
        price: float,
        volume: float | None,
        where: int,
        out: list[CandleData],
    ) -> None:
        """A folded bucket's share of a tick that is not inside the finest forming candle."""
        values = bucket.values
        assert values is not None  # folded buckets are forming
        if ts < bucket.end:
            if ts < bucket.start:
                self._late(series, bucket, ts)
                return
            if where == _LATE_FOR_FINE:  # late for the finest bucket only: kept here
                if bucket.count == 0:
                    for key in _PRICE_TIME_FIELDS:
                        values[key] = ts if key.endswith("_time") else price
                else:
                    _add_price(values, ts, price)
                bucket.count += 1
            # else the tick opens the finest bucket's next candle, which folds in later.
            if volume is not None:
                bucket.add_volume(price, volume)
            return
        out.append(self._close(bucket))
        self._open(series, bucket, ts, price, volume, out)
        self._fold_opened(bucket, ts, where)

    @staticmethod
    def _fold_opened(bucket: _Bucket, ts: int, where: int) -> None:
        """Fold a bucket its tick just opened, when the finest bucket's forming candle is
        (or will be) made of ticks this bucket takes: the one this tick opens, or none.

        Otherwise (a forming finest candle this bucket never saw, which only a restart or a
        bucket closed by the idle timer can leave) the bucket is updated per tick until it
        closes.
        """
        fine = bucket.fine
        assert fine is not None
        if bucket.fine_candle() is not None and not fine.start <= ts < fine.end:
            return  # a candle this bucket never saw (not the one this tick opened)
        if where == _OPENS_FINE:
            bucket.folded = True
            bucket.count = 0  # the opening tick lives in the finest bucket's new candle
        elif where == _LATE_FOR_FINE and fine.values is None:
            bucket.folded = True  # holds the opening tick itself

    def _open(
        self,
        series: _Series,
        bucket: _Bucket,
        ts: int,
        price: float,
        volume: float | None,
        out: list[CandleData],
    ) -> None:
        if bucket.calendar:
            start, end = _new_york_bounds(ts, bucket.timeframe)
        else:
            start = ts - (ts - bucket.origin) % bucket.length
            end = start + bucket.length
        if self._emit_gaps and bucket.last_close is not None and bucket.watermark < start:
            self._emit_gap_candles(series, bucket, start, out)
        bucket.start = start
        bucket.end = end
        bucket.count = 1
        if volume is None:
            bucket.real = False
            bucket.vol = bucket.vnum = 0.0
            candle_volume = 1.0
            vwap = None
        else:
            bucket.real = True
            bucket.vol = candle_volume = volume
            bucket.vnum = price * volume
            vwap = price if volume > 0 else None
        bucket.values = {
            "symbol": series.symbol,
            "timeframe": bucket.timeframe,
            "timestamp": start,
            "open": price,
            "high": price,
            "low": price,
            "close": price,
            "source": series.out_source,
            "volume": candle_volume,
            "vwap": vwap,
            "range_pips": 0.0,
            "num_trades": 1,
            "start_time": ts,
            "end_time": ts,
            "event_type": "ohlcv",
            "is_closed": False,
        }
        if self._emit_forming:
            out.append(_unchecked_candle(bucket.snapshot()))

    def _close(self, bucket: _Bucket) -> CandleData:
        values = bucket.settle()
        bucket.values = None
        bucket.folded = False
        bucket.watermark = bucket.end
        bucket.last_close = values["close"]
        values["is_closed"] = True  # nothing else holds this dict: forming candles got copies
        self.stats.candles_closed += 1
        start = bucket.start
        for coarse in bucket.folds_into:
            if coarse.folded and coarse.start <= start < coarse.end:
                coarse.absorb(values)
        return _unchecked_candle(values)

    def _late(self, series: _Series, bucket: _Bucket, ts: int) -> None:
        if self._late_policy == "drop":
            self.stats.late_dropped += 1
            return
        self.stats.rebuild_requests += 1
        start = self._bucket_start(bucket, ts)
        self.pending_rebuilds.add(
            RebuildRequest(series.symbol, series.source, bucket.timeframe, start)
        )

    @staticmethod
    def _bucket_start(bucket: _Bucket, ts: int) -> int:
        if bucket.calendar:
            return _new_york_bounds(ts, bucket.timeframe)[0]
        return ts - (ts - bucket.origin) % bucket.length

    def _emit_gap_candles(
        self, series: _Series, bucket: _Bucket, until: int, out: list[CandleData]
    ) -> None:
        flat = bucket.last_close
        assert flat is not None  # checked by the caller
        start = bucket.watermark
        while start < until:
            if bucket.calendar:
                end = _new_york_bounds(start, bucket.timeframe)[1]
            else:
                end = start + bucket.length
            self.stats.candles_closed += 1
            out.append(
                _unchecked_candle(
                    {
                        "symbol": series.symbol,
                        "timeframe": bucket.timeframe,
                        "timestamp": start,
                        "open": flat,
                        "high": flat,
                        "low": flat,
                        "close": flat,
                        "source": series.out_source,
                        "volume": 0.0,
                        "vwap": None,
                        "range_pips": 0.0,
                        "num_trades": 0,
                        "start_time": None,
                        "end_time": None,
                        "event_type": "gap",
                        "is_closed": True,
                    }
                )
            )
            start = end

    def candle_source(self, source: str) -> str:
        """The source of the candles aggregated from ticks of ``source``.

        Raises:
            ValidationError: It would exceed ``MAX_SOURCE_LENGTH``.
        """
        out_source = self._prefix + source
        if len(out_source) > MAX_SOURCE_LENGTH:
            msg = (
                f"aggregated source {out_source!r} would exceed {MAX_SOURCE_LENGTH} characters;"
                " shorten the tick source or source_prefix"
            )
            raise ValidationError(msg)
        return out_source

    def _new_series(self, symbol: str, source: str) -> _Series:
        out_source = self.candle_source(source)
        pip = float(self._pip_size(symbol))
        if not pip > 0:
            msg = f"pip_size({symbol!r}) returned {pip!r}; it must be positive"
            raise ValidationError(msg)
        series = _Series(symbol, source, out_source, pip)
        new_york = self._daily_close == "new_york_17"
        series.buckets = [
            _Bucket(tf, calendar=new_york and tf in _NEW_YORK_TIMEFRAMES, pip=pip)
            for tf in self._timeframes
        ]
        if not self._emit_forming:
            # Forming candles are snapshotted now and then, not per tick: coarser buckets
            # can fold the finest one (its forming candle is merged in when they are read).
            series.link_folding()
        self._series[(symbol, source)] = series
        return series

    # ------------------------------------------------------------------ lifecycle

    def close_idle(self, now_ms: int, grace_ms: int = 0) -> list[CandleData]:
        """Close every forming bucket whose ``end + grace_ms <= now_ms`` (the live timer).

        Without it a bucket closes only when the next tick of its series arrives. Never emits
        gap candles (they come with the next tick, as in a replay).

        Args:
            now_ms: Current time, Unix ms (from the caller's clock).
            grace_ms: How long after a bucket's end to wait for stragglers.
        """
        closed: list[CandleData] = []
        for series in self._series.values():
            for bucket in series.buckets:
                if bucket.values is not None and bucket.end + grace_ms <= now_ms:
                    closed.append(self._close(bucket))
        return closed

    def forming_of(self, symbol: str, source: str) -> list[CandleData]:
        """Snapshots of the forming candles of one (symbol, tick source), one per timeframe
        with a forming bucket (for routers that publish forming bars lazily)."""
        series = self._series.get((symbol, source))
        if series is None:
            return []
        return [
            _unchecked_candle(bucket.snapshot())
            for bucket in series.buckets
            if bucket.values is not None
        ]

    def forming(self) -> list[CandleData]:
        """Return a snapshot of every forming candle (``is_closed=False``)."""
        return [
            _unchecked_candle(bucket.snapshot())
            for series in self._series.values()
            for bucket in series.buckets
            if bucket.values is not None
        ]

    def restore(self, candles: Iterable[CandleData]) -> int:
        """Reload the newest candles read back from storage after a restart.

        Only candles whose source starts with the prefix, whose timeframe is aggregated here
        and whose timestamp is a bucket start under the current options are used; a
        series/timeframe that already has state is left alone. A forming candle
        (``is_closed=False``) goes on: volume, VWAP (numerator ``vwap * volume``, exact up to
        float rounding) and ``num_trades`` continue where they stopped, and anything older
        than its bucket is late. A closed candle marks where its series' closed buckets
        end: a tick older than that end is late, as if this aggregator had closed it (a
        resent tick never reopens a stored bar).

        Returns:
            How many candles were restored.
        """
        restored = 0
        for candle in candles:
            if not candle.source.startswith(self._prefix):
                continue
            if candle.timeframe not in self._timeframes:
                continue
            source = candle.source[len(self._prefix) :]
            key = (candle.symbol, source)
            series = self._series.get(key) or self._new_series(candle.symbol, source)
            bucket = series.buckets[self._timeframes.index(candle.timeframe)]
            if bucket.values is not None or bucket.watermark:
                logger.debug("restore skipped %s %s: already has state", key, candle.timeframe)
                continue
            start, end = bucket_bounds(
                candle.timestamp, candle.timeframe, daily_close=self._daily_close
            )
            if start != candle.timestamp:
                logger.warning(
                    "restore skipped %s %s at %d: not a bucket start under daily_close=%s",
                    key,
                    candle.timeframe,
                    candle.timestamp,
                    self._daily_close,
                )
                continue
            if candle.is_closed:
                bucket.watermark = end
                bucket.last_close = candle.close
                restored += 1
                continue
            for coarse in bucket.folds_into:
                coarse.unfold()  # restored state need not lie inside what they fold
            count = candle.num_trades
            volume = candle.volume or 0.0
            if candle.vwap is not None:
                bucket.real, bucket.vol, bucket.vnum = True, volume, candle.vwap * volume
            elif volume == 0 and count:
                # Real volume that summed to zero (tick volume is never 0 for a non-empty bar).
                bucket.real, bucket.vol, bucket.vnum = True, 0.0, 0.0
            else:
                bucket.real, bucket.vol, bucket.vnum = False, 0.0, 0.0
                if count is None:
                    count = round(volume)
            bucket.count = count or 0
            bucket.start, bucket.end = start, end
            bucket.watermark = start
            bucket.values = {
                "symbol": candle.symbol,
                "timeframe": candle.timeframe,
                "timestamp": start,
                "open": candle.open,
                "high": candle.high,
                "low": candle.low,
                "close": candle.close,
                "source": series.out_source,
                "volume": volume if bucket.real else float(bucket.count),
                "vwap": candle.vwap if bucket.real else None,
                "range_pips": round((candle.high - candle.low) / series.pip, _RANGE_DIGITS),
                "num_trades": bucket.count,
                "start_time": candle.start_time if candle.start_time is not None else start,
                "end_time": candle.end_time if candle.end_time is not None else start,
                "event_type": "ohlcv",
                "is_closed": False,
            }
            restored += 1
        return restored

    def take_over(self, previous: CandleAggregator) -> None:
        """Go on where ``previous`` stopped (the aggregator this one replaces when the
        settings change): for every timeframe both aggregate, its forming buckets, where
        its closed buckets end (older ticks stay late, never reopening a closed bar) and
        the rebuilds it still owes; also its counters. The forming bars of timeframes this
        one drops are left as they stand (continued if the timeframe comes back).
        """
        self.stats = previous.stats
        kept = self._timeframes
        self.restore(previous.forming())
        for (symbol, source), old in previous._series.items():
            series = self._series.get((symbol, source))
            for bucket in old.buckets:
                if bucket.timeframe not in kept or bucket.last_close is None:
                    continue  # dropped, or never closed a bucket (a forming one came over)
                if series is None:
                    series = self._new_series(symbol, source)
                new = series.buckets[kept.index(bucket.timeframe)]
                if bucket.watermark > new.watermark:
                    new.watermark = bucket.watermark
                    new.last_close = bucket.last_close
        self.owe(previous.pending_rebuilds)

    def owe(self, requests: Iterable[RebuildRequest]) -> None:
        """Owe these rebuilds (a failed attempt's, or a replaced aggregator's), those of
        timeframes aggregated here."""
        kept = self._timeframes
        self.pending_rebuilds.update(r for r in requests if r.timeframe in kept)

    # ------------------------------------------------------------------ rebuilds

    def drain_rebuilds(self) -> list[RebuildRequest]:
        """Return (sorted) and clear the pending rebuild requests."""
        requests = sorted(self.pending_rebuilds)
        self.pending_rebuilds.clear()
        return requests

    def rebuild(self, request: RebuildRequest, ticks: Iterable[TickData]) -> CandleData | None:
        """Re-aggregate one closed bucket from its ticks, with this aggregator's options.

        Args:
            request: The bucket to rebuild.
            ticks: The stored ticks of that bucket (others are ignored), in any order.

        Returns:
            The closed candle, or ``None`` when no tick of the bucket carries a price.
        """
        start, end = bucket_bounds(
            request.bucket_start, request.timeframe, daily_close=self._daily_close
        )
        selected = [
            tick
            for tick in ticks
            if tick.symbol == request.symbol
            and tick.source == request.source
            and start <= tick.timestamp < end
        ]
        candles = aggregate_ticks(
            selected,
            request.timeframe,
            price=self._price,
            source_prefix=self._prefix,
            pip_size=self._pip_size,
            daily_close=self._daily_close,
        )
        return candles[0] if candles else None


def aggregate_ticks(
    ticks: Iterable[TickData],
    timeframe: str,
    *,
    price: PriceField = "mid",
    source_prefix: str = "agg:",
    pip_size: Callable[[str], float] | None = None,
    daily_close: DailyClose = "utc",
    emit_gap_candles: bool = False,
    close_last: bool = True,
) -> list[CandleData]:
    """Aggregate a finite list of ticks into candles of one timeframe.

    The ticks are sorted by timestamp first (stable, so equal timestamps keep their order),
    hence none is late; the result equals the closed candles :class:`CandleAggregator` emits
    for the same ticks plus its forming ones. Each (symbol, source) forms its own series.

    Args:
        ticks: The ticks.
        timeframe: A key of ``models.TIMEFRAMES``.
        price: See :class:`CandleAggregator`.
        source_prefix: See :class:`CandleAggregator`.
        pip_size: See :class:`CandleAggregator`.
        daily_close: See :class:`CandleAggregator`.
        emit_gap_candles: See :class:`CandleAggregator`.
        close_last: Mark each series' last candle closed (``False`` leaves it forming, as
            live aggregation would).

    Returns:
        Candles ordered by symbol, source, then timestamp.
    """
    aggregator = CandleAggregator(
        timeframes=(timeframe,),
        price=price,
        source_prefix=source_prefix,
        pip_size=pip_size,
        daily_close=daily_close,
        emit_gap_candles=emit_gap_candles,
        emit_forming=False,
    )
    candles: list[CandleData] = []
    update = aggregator.update
    for tick in sorted(ticks, key=_TIMESTAMP):
        candles.extend(update(tick))
    if close_last:
        candles.extend(aggregator.close_idle(_FAR_FUTURE_MS))
    else:
        candles.extend(aggregator.forming())
    candles.sort(key=_CANDLE_ORDER)
    return candles


_TIMESTAMP: Final = attrgetter("timestamp")
_CANDLE_ORDER: Final = attrgetter("symbol", "source", "timestamp")
_FAR_FUTURE_MS: Final = 2**62
