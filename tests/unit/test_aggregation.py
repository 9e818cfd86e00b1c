"""Tick → candle aggregation: pandas as the reference for OHLC, plus every edge the live path
meets (bucket boundaries, late ticks, restarts, gaps, New York closes, pip sizes)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_manager.aggregation import (
    CandleAggregator,
    RebuildRequest,
    aggregate_ticks,
    bucket_bounds,
    default_pip_size,
)
from data_manager.errors import ValidationError
from data_manager.models import CandleData, TickData

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
# 2024-10-03T23:00:00Z, a multiple of one hour (and of one minute).
T0 = 1_727_996_400_000
PANDAS_RULES = {"1m": "1min", "5m": "5min", "1h": "1h"}
NEW_YORK = ZoneInfo("America/New_York")

PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def tick(
    ts: int,
    price: float = 1.1,
    *,
    spread: float = 0.0002,
    symbol: str = "EUR/USD",
    source: str = "feed",
    **extra: Any,
) -> TickData:
    return TickData(
        symbol=symbol,
        timestamp=ts,
        bid=price,
        ask=round(price + spread, 10),
        source=source,
        **extra,
    )


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()) * 1000


def run_live(aggregator: CandleAggregator, ticks: Iterable[TickData]) -> list[CandleData]:
    """Every candle emitted, in order."""
    out: list[CandleData] = []
    for t in ticks:
        out.extend(aggregator.update(t))
    return out


def final_candles(aggregator: CandleAggregator, emitted: Sequence[CandleData]) -> list[CandleData]:
    """What storage ends up holding: the closed candles plus the forming ones."""
    return [c for c in emitted if c.is_closed] + aggregator.forming()


def pandas_ohlc(
    ticks: Sequence[TickData], rule: str
) -> list[tuple[int, float, float, float, float]]:
    index = pd.to_datetime([t.timestamp for t in ticks], unit="ms", utc=True)
    series = pd.Series([t.mid for t in ticks], index=index)
    frame = series.resample(rule, origin="epoch", closed="left", label="left").ohlc().dropna()
    return [
        (int(label.value // 1_000_000), row.open, row.high, row.low, row.close)
        for label, row in frame.iterrows()
    ]


def ohlc(candles: Iterable[CandleData]) -> list[tuple[int, float, float, float, float]]:
    return [(c.timestamp, c.open, c.high, c.low, c.close) for c in candles]


def comparable(candle: CandleData) -> dict[str, Any]:
    """Candle fields to compare others with; VWAP to 1e-12 relative (a restored VWAP
    numerator is exact only to float rounding, and rounding both sides to a fixed number of
    digits can still split them at a rounding boundary)."""
    values = candle.model_dump()
    if values["vwap"] is not None:
        values["vwap"] = pytest.approx(values["vwap"], rel=1e-12, abs=0.0)
    return values


@st.composite
def tick_streams(draw: st.DrawFn, tf_ms: int, *, volumes: bool = False) -> list[TickData]:
    """Sorted timestamps (equal ones included), random gaps spanning several buckets."""
    start = T0 + draw(st.sampled_from([0, 1, tf_ms - 1, draw(st.integers(0, tf_ms))]))
    n = draw(st.integers(1, 50))
    gaps = draw(
        st.lists(
            st.one_of(
                st.integers(0, 2_000),
                st.integers(0, 3 * tf_ms),
                st.sampled_from([0, 1, tf_ms]),
            ),
            min_size=n,
            max_size=n,
        )
    )
    prices = draw(st.lists(st.integers(100_000, 100_400), min_size=n, max_size=n))
    sizes = draw(
        st.lists(
            st.one_of(st.none(), st.integers(1, 5)) if volumes else st.none(),
            min_size=n,
            max_size=n,
        )
    )
    ticks = []
    ts = start
    for gap, price, size in zip(gaps, prices, sizes, strict=True):
        ts += gap
        ticks.append(tick(ts, price / 100_000, volume=None if size is None else float(size)))
    return ticks


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("timeframe", ["1m", "5m", "1h"])
@PROPERTY_SETTINGS
@given(data=st.data())
def test_ohlc_matches_pandas_resample(timeframe: str, data: st.DataObject) -> None:
    tf_ms = {"1m": MINUTE, "5m": 5 * MINUTE, "1h": HOUR}[timeframe]
    ticks = data.draw(tick_streams(tf_ms))
    aggregator = CandleAggregator(timeframes=[timeframe])
    emitted = run_live(aggregator, ticks)
    candles = final_candles(aggregator, emitted)

    assert ohlc(candles) == pandas_ohlc(ticks, PANDAS_RULES[timeframe])
    assert all(c.is_closed for c in candles[:-1])
    assert not candles[-1].is_closed
    # Tick volume: every quote counts, and the buckets account for every tick.
    assert sum(c.num_trades or 0 for c in candles) == len(ticks)
    assert all(c.volume == c.num_trades and c.vwap is None for c in candles)
    for c in candles:
        assert c.start_time is not None
        assert c.end_time is not None
        assert c.timestamp <= c.start_time <= c.end_time < c.timestamp + tf_ms


@PROPERTY_SETTINGS
@given(data=st.data())
def test_aggregate_ticks_equals_live_update(data: st.DataObject) -> None:
    timeframe = data.draw(st.sampled_from(["1m", "5m", "1h"]))
    ticks = data.draw(tick_streams({"1m": MINUTE, "5m": 5 * MINUTE, "1h": HOUR}[timeframe]))
    aggregator = CandleAggregator(timeframes=[timeframe])
    live = final_candles(aggregator, run_live(aggregator, ticks))

    assert aggregate_ticks(ticks, timeframe, close_last=False) == live
    closed = aggregate_ticks(ticks, timeframe)
    assert closed[:-1] == live[:-1]
    assert closed[-1] == live[-1].model_copy(update={"is_closed": True})
    # The pure function sorts its input (stably), so bucketing does not depend on order.
    shuffled = aggregate_ticks(list(reversed(ticks)), timeframe, close_last=False)
    assert [c.timestamp for c in shuffled] == [c.timestamp for c in live]
    assert [c.num_trades for c in shuffled] == [c.num_trades for c in live]


@PROPERTY_SETTINGS
@given(data=st.data())
def test_replay_is_deterministic_and_candles_are_valid(data: st.DataObject) -> None:
    ticks = data.draw(tick_streams(MINUTE, volumes=True))
    first = run_live(CandleAggregator(timeframes=["1m", "5m", "1h"]), ticks)
    second = run_live(CandleAggregator(timeframes=["1m", "5m", "1h"]), ticks)

    assert first == second
    for candle in first:
        # Candles are built without validation: they must be exactly what validation gives.
        assert CandleData.model_validate(candle.model_dump()) == candle
        assert CandleData.model_validate_json(candle.model_dump_json()) == candle


@PROPERTY_SETTINGS
@given(data=st.data())
def test_restore_mid_bucket_continues_exactly(data: st.DataObject) -> None:
    ticks = data.draw(tick_streams(MINUTE, volumes=data.draw(st.booleans())))
    split = data.draw(st.integers(1, len(ticks)))
    timeframes = ["1m", "5m", "1h"]
    whole = CandleAggregator(timeframes=timeframes)
    expected = final_candles(whole, run_live(whole, ticks))

    before = CandleAggregator(timeframes=timeframes)
    emitted = run_live(before, ticks[:split])
    stored = before.forming()  # what storage holds for the forming buckets at the restart
    after = CandleAggregator(timeframes=timeframes)
    assert after.restore(stored) == len(stored)
    emitted_after = run_live(after, ticks[split:])
    got = [c for c in emitted if c.is_closed] + final_candles(after, emitted_after)

    key = lambda c: (c.timeframe, c.timestamp)  # noqa: E731
    assert [c.model_dump() for c in sorted(got, key=key)] == [
        comparable(c) for c in sorted(expected, key=key)
    ]


@st.composite
def unruly_streams(draw: st.DrawFn) -> list[TickData]:
    """Ticks of two sources with jumps, duplicates, out-of-order and late arrivals, real
    volume on some, trades and plain quotes mixed (for ``price="last"``)."""
    n = draw(st.integers(1, 60))
    ts = T0 + draw(st.integers(0, HOUR))
    stamps = []
    for _ in range(n):
        ts += draw(
            st.one_of(
                st.integers(0, 5_000),
                st.sampled_from([0, 1, MINUTE, 5 * MINUTE, HOUR]),
                st.integers(0, 2 * DAY),
            )
        )
        stamps.append(ts)
    # Move some ticks earlier in the arrival order (out of order) or later (late).
    for _ in range(draw(st.integers(0, n // 3))):
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        stamps[i], stamps[j] = stamps[j], stamps[i]
    ticks = []
    for ts in stamps:
        price = draw(st.integers(100_000, 100_400)) / 100_000
        trade = draw(st.booleans())
        size = draw(st.one_of(st.none(), st.integers(1, 5)))
        ticks.append(
            tick(
                ts,
                price,
                source=draw(st.sampled_from(["a", "b"])),
                volume=None if size is None else float(size),
                last_price=price if trade else None,
            )
        )
    return ticks


@PROPERTY_SETTINGS
@given(data=st.data())
def test_folded_buckets_equal_per_tick_updates(data: st.DataObject) -> None:
    """Without per-tick forming candles, coarser buckets fold the finest one; every candle,
    counter and rebuild request must be what updating each bucket per tick gives."""
    options: dict[str, Any] = {
        "timeframes": data.draw(
            st.lists(
                st.sampled_from(["1m", "5m", "15m", "1h", "4h", "1d", "1w"]),
                min_size=2,
                max_size=5,
                unique=True,
            )
        ),
        "price": data.draw(st.sampled_from(["mid", "last"])),
        "daily_close": data.draw(st.sampled_from(["utc", "new_york_17"])),
        "late_policy": data.draw(st.sampled_from(["drop", "rebuild"])),
        "emit_gap_candles": data.draw(st.booleans()),
    }
    ticks = data.draw(unruly_streams())
    per_tick = CandleAggregator(emit_forming=True, **options)
    folded = CandleAggregator(emit_forming=False, **options)
    for i, t in enumerate(ticks):
        expected = [c for c in per_tick.update(t) if c.is_closed]
        assert folded.update(t) == expected
        action = data.draw(st.sampled_from(["none", "none", "peek", "idle", "restart"]))
        if action == "peek":
            assert folded.forming() == per_tick.forming()
            assert folded.forming_of(t.symbol, t.source) == per_tick.forming_of(t.symbol, t.source)
        elif action == "idle":
            now = t.timestamp + data.draw(st.sampled_from([0, MINUTE, HOUR, DAY]))
            assert folded.close_idle(now, 1_000) == per_tick.close_idle(now, 1_000)
        elif action == "restart" and i % 2:
            stored = per_tick.forming()
            assert folded.forming() == stored
            per_tick = CandleAggregator(emit_forming=True, **options)
            folded = CandleAggregator(emit_forming=False, **options)
            assert folded.restore(stored) == per_tick.restore(stored)
    assert folded.forming() == per_tick.forming()
    assert folded.stats == per_tick.stats
    assert folded.drain_rebuilds() == per_tick.drain_rebuilds()
    assert folded.close_idle(2**62) == per_tick.close_idle(2**62)


def test_restore_into_a_live_series_keeps_folded_buckets_exact() -> None:
    """restore() skips a series that already has state, but first makes the coarser buckets
    take in the finest forming candle for good: they must still equal per-tick updating."""
    per_tick = CandleAggregator(timeframes=["1m", "5m"], emit_forming=True)
    folded = CandleAggregator(timeframes=["1m", "5m"], emit_forming=False)
    first = [tick(T0 + i * 10_000, 1.1 + i * 1e-4) for i in range(9)]  # 1m closes once
    later = [tick(T0 + 90_000 + i * 10_000, 1.2 - i * 1e-4) for i in range(30)]  # 5m closes
    for t in first:
        assert folded.update(t) == [c for c in per_tick.update(t) if c.is_closed]
    stored = per_tick.forming()
    assert folded.restore(stored) == per_tick.restore(stored) == 0
    closed: list[CandleData] = []
    for t in later:
        emitted = folded.update(t)
        assert emitted == [c for c in per_tick.update(t) if c.is_closed]
        closed += emitted
    assert [(c.timeframe, c.num_trades) for c in closed if c.timeframe == "5m"] == [("5m", 30)]
    assert folded.forming() == per_tick.forming()


@PROPERTY_SETTINGS
@given(data=st.data())
def test_gap_candles_match_pandas_forward_fill(data: st.DataObject) -> None:
    ticks = data.draw(tick_streams(MINUTE))
    aggregator = CandleAggregator(timeframes=["1m"], emit_gap_candles=True)
    candles = final_candles(aggregator, run_live(aggregator, ticks))

    index = pd.to_datetime([t.timestamp for t in ticks], unit="ms", utc=True)
    frame = (
        pd.Series([t.mid for t in ticks], index=index)
        .resample("1min", origin="epoch", closed="left", label="left")
        .ohlc()
    )
    previous_close = frame["close"].ffill().shift()
    for column in ("open", "high", "low", "close"):
        frame[column] = frame[column].fillna(previous_close)
    expected = [
        (int(label.value // 1_000_000), row.open, row.high, row.low, row.close)
        for label, row in frame.iterrows()
    ]
    assert ohlc(candles) == expected
    gaps = [c for c in candles if c.event_type == "gap"]
    assert all(c.volume == 0 and c.num_trades == 0 and c.is_closed for c in gaps)
    assert all(c.start_time is None and c.end_time is None for c in gaps)


# --------------------------------------------------------------------------- boundaries


def test_bucket_boundary_ticks() -> None:
    aggregator = CandleAggregator(timeframes=["1m"])
    first = aggregator.update(tick(T0 - 1, 1.1000))  # last ms of the previous minute
    assert [(c.timestamp, c.is_closed) for c in first] == [(T0 - MINUTE, False)]

    at_start = aggregator.update(tick(T0, 1.2000))  # exactly on the boundary: closes it
    assert [(c.timestamp, c.is_closed) for c in at_start] == [
        (T0 - MINUTE, True),
        (T0, False),
    ]
    assert at_start[0].close == pytest.approx(1.1001)

    inside = aggregator.update(tick(T0 + MINUTE - 1, 1.3000))
    assert [(c.timestamp, c.is_closed) for c in inside] == [(T0, False)]
    assert aggregator.update(tick(T0 + MINUTE, 1.0))[0].timestamp == T0
    assert aggregator.stats.candles_closed == 2


def test_closed_then_forming_for_every_timeframe_in_order() -> None:
    aggregator = CandleAggregator(timeframes=["5m", "1m"])
    aggregator.update(tick(T0, 1.1))
    out = aggregator.update(tick(T0 + MINUTE, 1.2))
    assert [(c.timeframe, c.timestamp, c.is_closed) for c in out] == [
        ("5m", T0, False),
        ("1m", T0, True),
        ("1m", T0 + MINUTE, False),
    ]
    assert all(c.source == "agg:feed" for c in out)


def test_candle_fields_with_real_volume() -> None:
    aggregator = CandleAggregator(timeframes=["1m"], price="bid")
    aggregator.update(tick(T0 + 10, 1.1000, volume=2.0))
    aggregator.update(tick(T0 + 20, 1.1010, last_size=3.0))  # no volume: last_size counts
    (candle,) = aggregator.update(tick(T0 + 30, 1.0990))  # no size at all: counts 0
    assert candle.open == 1.1000
    assert candle.high == 1.1010
    assert candle.low == 1.0990
    assert candle.close == 1.0990
    assert candle.volume == 5.0
    assert candle.vwap == pytest.approx((2 * 1.1000 + 3 * 1.1010) / 5)
    assert candle.num_trades == 3
    assert candle.range_pips == 20.0
    assert (candle.start_time, candle.end_time) == (T0 + 10, T0 + 30)


def test_tick_volume_switches_to_real_volume_within_a_bucket() -> None:
    aggregator = CandleAggregator(timeframes=["1m"])
    (first,) = aggregator.update(tick(T0, 1.1))
    assert (first.volume, first.vwap) == (1.0, None)
    (second,) = aggregator.update(tick(T0 + 1, 1.1, volume=4.0))
    assert second.volume == 4.0
    assert second.vwap == pytest.approx(1.1001)
    assert second.num_trades == 2


def test_zero_real_volume_has_no_vwap() -> None:
    (candle,) = CandleAggregator(timeframes=["1m"]).update(tick(T0, 1.1, volume=0.0))
    assert candle.volume == 0.0
    assert candle.vwap is None


def test_out_of_order_tick_inside_the_forming_bucket() -> None:
    aggregator = CandleAggregator(timeframes=["1m"], price="bid")
    aggregator.update(tick(T0 + 30_000, 1.10))
    aggregator.update(tick(T0 + 40_000, 1.12))
    (candle,) = aggregator.update(tick(T0 + 10_000, 1.05))  # older than both, same bucket
    assert (candle.open, candle.high, candle.low, candle.close) == (1.05, 1.12, 1.05, 1.12)
    assert (candle.start_time, candle.end_time) == (T0 + 10_000, T0 + 40_000)
    (candle,) = aggregator.update(tick(T0 + 40_000, 1.11))  # same ms as the last: latest wins
    assert candle.close == 1.11
    assert aggregator.stats.late_dropped == 0


def test_price_last_skips_quotes_but_closes_on_them() -> None:
    aggregator = CandleAggregator(timeframes=["1m"], price="last")
    assert aggregator.update(tick(T0, 1.1)) == []  # a quote: no last price
    (candle,) = aggregator.update(tick(T0 + 1, 1.1, last_price=1.1003, last_size=2.0))
    assert candle.open == 1.1003
    assert candle.num_trades == 1
    assert candle.volume == 2.0
    (closed,) = aggregator.update(tick(T0 + MINUTE, 1.2))  # a quote in the next minute
    assert closed.is_closed
    assert closed.timestamp == T0
    assert aggregator.forming() == []
    assert aggregator.stats.no_price == 2


# --------------------------------------------------------------------------- late ticks


def test_late_tick_dropped_and_counted() -> None:
    aggregator = CandleAggregator(timeframes=["1m", "1h"])
    aggregator.update(tick(T0, 1.1))
    aggregator.update(tick(T0 + MINUTE, 1.1))
    out = aggregator.update(tick(T0 + 5, 1.5))  # closed 1m bucket, still-open 1h bucket
    assert [c.timeframe for c in out] == ["1h"]
    assert out[0].high == pytest.approx(1.5001)
    assert aggregator.stats.late_dropped == 1
    assert aggregator.pending_rebuilds == set()


def test_late_tick_in_a_never_formed_bucket_is_late() -> None:
    aggregator = CandleAggregator(timeframes=["1m"])
    aggregator.update(tick(T0, 1.1))
    aggregator.update(tick(T0 + 5 * MINUTE, 1.1))
    assert aggregator.update(tick(T0 + 2 * MINUTE, 1.1)) == []
    assert aggregator.stats.late_dropped == 1


def test_late_tick_rebuild_request_and_rebuild() -> None:
    aggregator = CandleAggregator(timeframes=["1m"], late_policy="rebuild")
    stored = [tick(T0 + 1_000, 1.10), tick(T0 + 2_000, 1.12), tick(T0 + MINUTE, 1.11)]
    for t in stored:
        aggregator.update(t)
    late = tick(T0 + 500, 1.05)
    assert aggregator.update(late) == []
    request = RebuildRequest("EUR/USD", "feed", "1m", T0)
    assert aggregator.pending_rebuilds == {request}
    assert aggregator.stats.rebuild_requests == 1
    assert aggregator.stats.late_dropped == 0

    assert aggregator.drain_rebuilds() == [request]
    assert aggregator.pending_rebuilds == set()
    rebuilt = aggregator.rebuild(request, [*stored, late, tick(T0, 9.9, source="other")])
    assert rebuilt is not None
    assert rebuilt.is_closed
    assert (rebuilt.timestamp, rebuilt.source) == (T0, "agg:feed")
    assert rebuilt.open == pytest.approx(1.0501)  # the late tick is the earliest
    assert rebuilt.low == pytest.approx(1.0501)
    assert rebuilt.close == pytest.approx(1.1201)
    assert rebuilt.num_trades == 3
    assert aggregator.rebuild(RebuildRequest("EUR/USD", "feed", "1m", T0 - MINUTE), stored) is None


def test_close_idle_closes_only_after_grace_and_later_ticks_are_late() -> None:
    aggregator = CandleAggregator(timeframes=["1m"])
    aggregator.update(tick(T0 + 1, 1.1))
    assert aggregator.close_idle(T0 + MINUTE + 1_999, grace_ms=2_000) == []
    (closed,) = aggregator.close_idle(T0 + MINUTE + 2_000, grace_ms=2_000)
    assert closed.is_closed
    assert closed.timestamp == T0
    assert aggregator.close_idle(T0 + 10 * MINUTE) == []
    assert aggregator.update(tick(T0 + 30_000, 1.1)) == []  # its bucket is closed
    assert aggregator.stats.late_dropped == 1
    (opened,) = aggregator.update(tick(T0 + MINUTE + 3_000, 1.1))
    assert opened.timestamp == T0 + MINUTE
    assert not opened.is_closed


# --------------------------------------------------------------------------- restore


def test_restore_preserves_volume_vwap_and_trades() -> None:
    before = CandleAggregator(timeframes=["1m"])
    before.update(tick(T0, 1.1, volume=2.0))
    before.update(tick(T0 + 1, 1.2, volume=1.0))
    (forming,) = before.forming()

    after = CandleAggregator(timeframes=["1m"])
    assert after.restore([forming]) == 1
    (candle,) = after.update(tick(T0 + 2, 1.0, volume=3.0))
    assert candle.volume == 6.0
    assert candle.num_trades == 3
    assert candle.vwap == pytest.approx((2 * 1.1001 + 1.2001 + 3 * 1.0001) / 6)
    assert candle.open == forming.open
    assert candle.low == pytest.approx(1.0001)
    assert after.update(tick(T0 - 1, 1.1)) == []  # older than the restored bucket
    assert after.stats.late_dropped == 1


def test_restore_ignores_what_it_must_not_use() -> None:
    aggregator = CandleAggregator(timeframes=["1m"])
    base = CandleAggregator(timeframes=["1m", "5m"])
    base.update(tick(T0, 1.1))
    forming = base.forming()
    vendor = forming[0].model_copy(update={"source": "feed"})  # a vendor's own candle
    misaligned = forming[0].model_copy(update={"timestamp": T0 + 1})
    assert aggregator.restore([vendor, misaligned, forming[1]]) == 0
    assert aggregator.restore([forming[0]]) == 1
    assert aggregator.restore([forming[0]]) == 0  # state exists already
    assert aggregator.forming() == [forming[0]]


def test_a_restored_closed_candle_keeps_its_bucket_closed() -> None:
    # The previous router closed the bar of T0; a tick resent after the restart (or a
    # late one) must not reopen it with itself alone.
    base = CandleAggregator(timeframes=["1m"])
    base.update(tick(T0 + 1_000, 1.1))
    (closed, _) = base.update(tick(T0 + 60_000, 1.2))
    assert closed.is_closed
    aggregator = CandleAggregator(timeframes=["1m"])
    assert aggregator.restore([closed]) == 1
    assert aggregator.update(tick(T0 + 1_000, 1.1)) == []
    assert aggregator.stats.late_dropped == 1
    (opened,) = aggregator.update(tick(T0 + 61_000, 1.3))
    assert (opened.timestamp, opened.num_trades) == (T0 + 60_000, 1)


def test_take_over_keeps_closed_ends_rebuilds_and_counters() -> None:
    old = CandleAggregator(timeframes=["1m", "5m"], late_policy="rebuild")
    old.update(tick(T0 + 1_000, 1.1))
    old.update(tick(T0 + 61_000, 1.2))  # closes the 1m bar of T0
    old.update(tick(T0 + 2_000, 1.0))  # late for it: a rebuild owed
    new = CandleAggregator(timeframes=["1m", "5m"], late_policy="rebuild")
    new.take_over(old)
    assert new.pending_rebuilds == {RebuildRequest("EUR/USD", "feed", "1m", T0)}
    assert new.stats is old.stats
    assert [c.timestamp for c in new.forming()] == [T0 + 60_000, T0]
    new.drain_rebuilds()
    assert new.update(tick(T0 + 30_000, 1.5)) == [_forming_5m(new)]  # late for 1m only
    assert new.pending_rebuilds == {RebuildRequest("EUR/USD", "feed", "1m", T0)}


def _forming_5m(aggregator: CandleAggregator) -> CandleData:
    return next(c for c in aggregator.forming() if c.timeframe == "5m")


def test_take_over_leaves_a_dropped_timeframes_bar_as_it_stands() -> None:
    old = CandleAggregator(timeframes=["1m", "5m"])
    old.update(tick(T0 + 1_000, 1.1))
    new = CandleAggregator(timeframes=["1m"])
    new.take_over(old)
    assert [c.timeframe for c in new.forming()] == ["1m"]
    assert [c.timeframe for c in old.forming()] == ["1m", "5m"]  # not closed


# --------------------------------------------------------------------------- calendars


def test_new_york_daily_close_across_spring_dst_change() -> None:
    aggregator = CandleAggregator(timeframes=["1d"], daily_close="new_york_17")
    before = utc_ms(2024, 3, 10, 20, 59, 59) + 999  # Sunday 16:59:59.999 EDT
    at_close = utc_ms(2024, 3, 10, 21)  # Sunday 17:00 EDT
    (first,) = aggregator.update(tick(before, 1.1))
    assert first.timestamp == utc_ms(2024, 3, 9, 22)  # Saturday 17:00 EST
    closed, second = aggregator.update(tick(at_close, 1.2))
    assert closed.is_closed
    assert closed.timestamp == first.timestamp
    assert second.timestamp == at_close

    assert bucket_bounds(before, "1d", daily_close="new_york_17") == (
        utc_ms(2024, 3, 9, 22),
        at_close,
    )  # a 23-hour trading day
    assert bucket_bounds(at_close, "1d", daily_close="new_york_17") == (
        at_close,
        at_close + DAY,
    )
    assert bucket_bounds(before, "1d") == (utc_ms(2024, 3, 10), utc_ms(2024, 3, 11))


def test_new_york_daily_close_across_autumn_dst_change() -> None:
    start, end = bucket_bounds(utc_ms(2024, 11, 3, 12), "1d", daily_close="new_york_17")
    assert (start, end) == (utc_ms(2024, 11, 2, 21), utc_ms(2024, 11, 3, 22))  # 25 hours
    # New York 4h bars: 01:00 local is ambiguous that night; the bar starts at the first one.
    assert bucket_bounds(utc_ms(2024, 11, 3, 6, 30), "4h", daily_close="new_york_17") == (
        utc_ms(2024, 11, 3, 5),
        utc_ms(2024, 11, 3, 10),
    )
    assert bucket_bounds(utc_ms(2024, 3, 10, 7), "4h", daily_close="new_york_17") == (
        utc_ms(2024, 3, 10, 6),
        utc_ms(2024, 3, 10, 9),
    )


@settings(max_examples=200, deadline=None)
@given(ts=st.integers(utc_ms(2020, 1, 1), utc_ms(2030, 1, 1)))
def test_new_york_buckets_tile_and_nest(ts: int) -> None:
    day_start, day_end = bucket_bounds(ts, "1d", daily_close="new_york_17")
    four_start, four_end = bucket_bounds(ts, "4h", daily_close="new_york_17")
    week_start, week_end = bucket_bounds(ts, "1w", daily_close="new_york_17")
    for start, end in ((day_start, day_end), (four_start, four_end), (week_start, week_end)):
        assert start <= ts < end
    assert day_start <= four_start
    assert four_end <= day_end
    assert week_start <= day_start
    assert day_end <= week_end
    local_day = datetime.fromtimestamp(day_start / 1000, NEW_YORK)
    assert (local_day.hour, local_day.minute) == (17, 0)
    assert datetime.fromtimestamp(four_start / 1000, NEW_YORK).hour in {17, 21, 1, 5, 9, 13}
    local_week = datetime.fromtimestamp(week_start / 1000, NEW_YORK)
    assert (local_week.weekday(), local_week.hour) == (6, 17)  # Sunday 17:00
    # Consecutive buckets tile time: the next one starts where this one ends.
    assert bucket_bounds(day_end, "1d", daily_close="new_york_17")[0] == day_end
    assert bucket_bounds(four_end, "4h", daily_close="new_york_17")[0] == four_end


def test_utc_buckets_are_epoch_aligned_and_weeks_start_on_monday() -> None:
    ts = T0 + 12_345
    for timeframe, length in (("1m", MINUTE), ("15m", 15 * MINUTE), ("4h", 4 * HOUR)):
        assert bucket_bounds(ts, timeframe) == (ts - ts % length, ts - ts % length + length)
    # Hours and below are the same under the New York close (whole-hour UTC offset).
    assert bucket_bounds(ts, "1h", daily_close="new_york_17") == bucket_bounds(ts, "1h")
    start, end = bucket_bounds(ts, "1w")
    monday = datetime.fromtimestamp(start / 1000, UTC)
    assert (monday.weekday(), monday.hour, monday.minute) == (0, 0, 0)
    assert start <= ts < end == start + 7 * DAY


def test_gap_candles_under_new_york_close_follow_calendar_buckets() -> None:
    aggregator = CandleAggregator(
        timeframes=["1d"], daily_close="new_york_17", emit_gap_candles=True
    )
    aggregator.update(tick(utc_ms(2024, 3, 8, 12), 1.1))  # Friday
    out = aggregator.update(tick(utc_ms(2024, 3, 11, 12), 1.2))  # Monday
    assert [(c.timestamp, c.event_type) for c in out] == [
        (utc_ms(2024, 3, 7, 22), "ohlcv"),  # Thursday 17:00 EST → Friday 17:00
        (utc_ms(2024, 3, 8, 22), "gap"),
        (utc_ms(2024, 3, 9, 22), "gap"),  # the 23-hour day
        (utc_ms(2024, 3, 10, 21), "ohlcv"),  # Sunday 17:00 EDT, forming
    ]


# --------------------------------------------------------------------------- pips, options


def test_pip_sizes() -> None:
    assert default_pip_size("USD/JPY") == 0.01
    assert default_pip_size("EURJPY") == 0.01
    assert default_pip_size("EUR/USD") == 0.0001
    aggregator = CandleAggregator(timeframes=["1m"], price="bid")
    aggregator.update(tick(T0, 150.10, symbol="USD/JPY"))
    (jpy,) = aggregator.update(tick(T0 + 1, 150.25, symbol="USD/JPY"))
    assert jpy.range_pips == 15.0
    aggregator.update(tick(T0, 1.08500))
    (eur,) = aggregator.update(tick(T0 + 1, 1.08550))
    assert eur.range_pips == 5.0  # not 4.99999999...

    gold = CandleAggregator(timeframes=["1m"], price="bid", pip_size=lambda symbol: 0.1)
    gold.update(tick(T0, 2400.0, symbol="XAU/USD"))
    (xau,) = gold.update(tick(T0 + 1, 2401.5, symbol="XAU/USD"))
    assert xau.range_pips == 15.0


def test_sources_and_symbols_are_separate_series() -> None:
    aggregator = CandleAggregator(timeframes=["1m"], source_prefix="mine:")
    (a,) = aggregator.update(tick(T0, 1.1, source="a"))
    (b,) = aggregator.update(tick(T0 + 2 * MINUTE, 1.2, source="b"))  # does not close "a"
    (a2,) = aggregator.update(tick(T0 + 1, 1.3, source="a"))
    assert (a.source, b.source, a2.source) == ("mine:a", "mine:b", "mine:a")
    assert a2.num_trades == 2
    assert not a2.is_closed


@pytest.mark.parametrize(
    "options",
    [
        {"timeframes": []},
        {"timeframes": ["2m"]},
        {"timeframes": "1m"},
        {"timeframes": ["1m"], "price": "close"},
        {"timeframes": ["1m"], "daily_close": "tokyo"},
        {"timeframes": ["1m"], "late_policy": "ignore"},
    ],
)
def test_invalid_options_raise_validation_error(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CandleAggregator(**options)


def test_too_long_aggregated_source_is_refused_before_any_state_change() -> None:
    aggregator = CandleAggregator(timeframes=["1m"])
    with pytest.raises(ValidationError, match="exceed"):
        aggregator.update(tick(T0, 1.1, source="s" * 64))
    assert aggregator.forming() == []


def test_bad_pip_size_is_refused() -> None:
    aggregator = CandleAggregator(timeframes=["1m"], pip_size=lambda symbol: 0.0)
    with pytest.raises(ValidationError, match="pip_size"):
        aggregator.update(tick(T0, 1.1))


def test_duplicate_timeframes_are_ignored() -> None:
    aggregator = CandleAggregator(timeframes=["1m", "5m", "1m"])
    assert aggregator.timeframes == ("1m", "5m")
    assert len(aggregator.update(tick(T0, 1.1))) == 2
