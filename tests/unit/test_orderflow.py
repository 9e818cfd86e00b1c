"""Order-flow metrics: hand-computed OFI, VPIN, imbalance and VWAP, and a brute-force
reference over random streams."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_manager.errors import ValidationError
from data_manager.models import OrderFlowMetrics, TickData
from data_manager.orderflow import OrderFlowCalculator, ofi_event, vpin

T0 = 1_727_996_400_000


def tick(
    ts: int,
    bid: float = 1.1000,
    ask: float = 1.1002,
    *,
    symbol: str = "EUR/USD",
    source: str = "feed",
    **extra: Any,
) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=ask, source=source, **extra)


def book(
    ts: int, bid: float, bid_size: float, ask: float, ask_size: float, **extra: Any
) -> TickData:
    return tick(ts, bid, ask, bid_size=bid_size, ask_size=ask_size, **extra)


def trade(ts: int, side: str | None, size: float, price: float | None = None) -> TickData:
    return tick(ts, aggressor=side, last_size=size, last_price=price)


def calculator(**options: Any) -> OrderFlowCalculator:
    options.setdefault("vpin_bucket_volume", 10.0)
    return OrderFlowCalculator(**options)


# --------------------------------------------------------------------------- OFI


def test_ofi_event_each_side_up_down_equal() -> None:
    prev = (1.0, 5.0, 1.1, 5.0)
    assert ofi_event(prev, (1.0, 7.0, 1.1, 4.0)) == 7 - 5 - 4 + 5  # both sides unchanged
    assert ofi_event(prev, (1.01, 2.0, 1.1, 5.0)) == 2  # bid up: + new bid size
    assert ofi_event(prev, (0.99, 2.0, 1.1, 5.0)) == -5  # bid down: - old bid size
    assert ofi_event(prev, (1.0, 5.0, 1.09, 3.0)) == -3  # ask down: - new ask size
    assert ofi_event(prev, (1.0, 5.0, 1.11, 3.0)) == 5  # ask up: + old ask size


def test_ofi_over_a_window_hand_computed() -> None:
    flow = calculator()
    assert flow.update(book(T0, 1.1000, 5, 1.1002, 5)) is None  # first snapshot: no e_n
    m1 = flow.update(book(T0 + 100, 1.1000, 7, 1.1002, 4))  # equal/equal: 7-5-4+5
    m2 = flow.update(book(T0 + 200, 1.1001, 2, 1.1003, 6))  # up/up: +2 +4
    m3 = flow.update(book(T0 + 300, 1.1000, 3, 1.10025, 1))  # down/down: -2 -1
    m4 = flow.update(book(T0 + 400, 1.1000, 3, 1.1003, 2))  # equal/up: +3-3 +1
    assert m1 is not None
    assert m2 is not None
    assert m3 is not None
    assert m4 is not None
    assert [m1.ofi, m2.ofi, m3.ofi, m4.ofi] == [3.0, 9.0, 6.0, 7.0]
    assert m4.timestamp == T0 + 400
    assert m4.window_ms == 60_000
    assert m4.num_trades == 0
    assert m4.vwap is None
    assert m4.toxicity is None
    assert m4.imbalance == 0.0
    assert m4.volume_delta == 0.0
    assert flow.stats.snapshots == 5


def test_ticks_without_sizes_do_not_break_the_ofi_chain() -> None:
    flow = calculator()
    flow.update(book(T0, 1.1000, 5, 1.1002, 5))
    assert flow.update(tick(T0 + 1, 1.2000, 1.2002)) is None  # no sizes: nothing
    assert flow.update(tick(T0 + 2, bid_size=3.0)) is None  # one size only: nothing
    # Compared with T0's book: bid up (+4), ask unchanged (-5 + 5).
    metrics = flow.update(book(T0 + 3, 1.1001, 4, 1.1002, 5))
    assert metrics is not None
    assert metrics.ofi == 4.0


def test_books_of_different_sources_are_never_differenced() -> None:
    flow = calculator()
    flow.update(book(T0, 1.1000, 5, 1.1002, 5, source="a"))
    assert flow.update(book(T0 + 1, 1.2000, 1, 1.2002, 1, source="b")) is None
    metrics = flow.update(book(T0 + 2, 1.1000, 6, 1.1002, 5, source="a"))
    assert metrics is not None
    assert metrics.ofi == 1.0


# --------------------------------------------------------------------------- trades


def test_volume_delta_imbalance_and_vwap_hand_computed() -> None:
    flow = calculator()
    flow.update(trade(T0, "buy", 2, 1.1002))
    flow.update(trade(T0 + 1, "sell", 1, 1.1000))
    flow.update(tick(T0 + 2, aggressor="buy", volume=1.0, last_price=1.1004))  # size = volume
    metrics = flow.update(trade(T0 + 3, None, 4, 1.1010))  # unclassified: VWAP only
    assert metrics is not None
    assert (metrics.buy_volume, metrics.sell_volume) == (3.0, 1.0)
    assert metrics.volume_delta == 2.0
    assert metrics.imbalance == 0.5
    assert metrics.vwap == pytest.approx((2 * 1.1002 + 1.1000 + 1.1004 + 4 * 1.1010) / 8)
    assert metrics.num_trades == 4
    assert metrics.ofi == 0.0


def test_trade_without_last_price_uses_mid_and_quotes_with_volume_are_not_trades() -> None:
    flow = calculator()
    assert flow.update(tick(T0, 1.1000, 1.1002, volume=5.0)) is None  # a quote with volume
    assert flow.update(tick(T0, aggressor="buy", last_size=0.0)) is None  # nothing traded
    metrics = flow.update(tick(T0 + 1, 1.1000, 1.1002, aggressor="sell", last_size=2.0))
    assert metrics is not None
    assert metrics.vwap == pytest.approx(1.1001)
    assert metrics.imbalance == -1.0
    assert metrics.volume_delta == -2.0


def test_rolling_window_evicts_by_event_time() -> None:
    flow = calculator(window_ms=1_000)
    flow.update(trade(T0, "buy", 1, 1.1))
    kept = flow.update(trade(T0 + 1_000, "buy", 2, 1.1))  # T0 is exactly on the edge: kept
    assert kept is not None
    assert kept.buy_volume == 3.0
    metrics = flow.update(trade(T0 + 1_001, "sell", 4, 1.1))  # T0 now out
    assert metrics is not None
    assert (metrics.buy_volume, metrics.sell_volume, metrics.num_trades) == (2.0, 4.0, 2)
    later = flow.update(trade(T0 + 5_000, "buy", 1, 1.2))
    assert later is not None
    assert (later.buy_volume, later.sell_volume, later.num_trades) == (1.0, 0.0, 1)
    assert later.vwap == pytest.approx(1.2)


def test_out_of_order_ticks() -> None:
    flow = calculator(window_ms=1_000)
    flow.update(trade(T0 + 2_000, "buy", 1, 1.1))
    late = flow.update(trade(T0 + 1_500, "sell", 1, 1.1))  # within the window: counted now
    assert late is not None
    assert late.timestamp == T0 + 2_000
    assert late.sell_volume == 1.0
    assert flow.update(trade(T0 + 500, "sell", 9, 1.1)) is None  # older than the window
    assert flow.stats.late_ignored == 1
    latest = flow.latest("EUR/USD")
    assert latest is not None
    assert latest.sell_volume == 1.0


def test_symbols_have_independent_state() -> None:
    flow = calculator()
    flow.update(trade(T0, "buy", 1, 1.1))
    other = flow.update(
        TickData(
            symbol="USD/JPY",
            timestamp=T0,
            bid=150.0,
            ask=150.02,
            source="feed",
            aggressor="sell",
            last_size=3.0,
        )
    )
    assert other is not None
    assert other.symbol == "USD/JPY"
    assert (other.buy_volume, other.sell_volume) == (0.0, 3.0)
    eur = flow.latest("EUR/USD")
    assert eur is not None
    assert (eur.buy_volume, eur.sell_volume) == (1.0, 0.0)
    flow.reset("EUR/USD")
    assert flow.latest("EUR/USD") is None
    assert flow.latest("USD/JPY") is not None
    flow.reset()
    assert flow.latest("USD/JPY") is None


# --------------------------------------------------------------------------- VPIN


def test_vpin_bucket_splitting_hand_computed() -> None:
    flow = calculator(vpin_bucket_volume=10.0, vpin_buckets=2)
    m = flow.update(trade(T0, "buy", 4, 1.1))
    assert m is not None
    assert m.toxicity is None
    m = flow.update(trade(T0 + 1, "sell", 3, 1.1))
    assert m is not None
    assert m.toxicity is None
    # 3 of these 8 fill bucket 1 (buy 7, sell 3: |4|), 5 start bucket 2.
    m = flow.update(trade(T0 + 2, "buy", 8, 1.1))
    assert m is not None
    assert m.toxicity == pytest.approx(4 / 10)
    m = flow.update(trade(T0 + 3, "sell", 5, 1.1))  # bucket 2: buy 5, sell 5: |0|
    assert m is not None
    assert m.toxicity == pytest.approx((4 + 0) / 20)
    # 25 spans three buckets: 10 (full), 10 (full), 5 (filling); the last two full: |10|, |10|.
    m = flow.update(trade(T0 + 4, "buy", 25, 1.1))
    assert m is not None
    assert m.toxicity == pytest.approx(1.0)
    assert vpin([4, 0], 10) == pytest.approx(0.2)
    assert vpin([], 10) is None


def test_vpin_bucket_fills_despite_float_rounding() -> None:
    flow = calculator(vpin_bucket_volume=0.3, vpin_buckets=2)
    for i in range(3):
        m = flow.update(trade(T0 + i, "sell", 0.1, 1.1))  # 0.1 * 3 > 0.3 in binary floats
    assert m is not None
    assert m.toxicity == pytest.approx(1.0)
    flow.update(trade(T0 + 3, "buy", 0.15, 1.1))
    m = flow.update(trade(T0 + 4, "sell", 0.15, 1.1))
    assert m is not None
    assert m.toxicity == pytest.approx((0.3 + 0.0) / 0.6)


def test_vpin_counts_the_buckets_a_large_trade_fills_whole() -> None:
    flow = calculator(vpin_bucket_volume=1.0, vpin_buckets=3)
    flow.update(trade(T0, "buy", 4.5, 1.1))  # four full buckets (|1| each), 0.5 left
    m = flow.update(trade(T0 + 1, "sell", 1.25, 1.1))  # 0.5 of it: |0|; 0.75 left
    assert m is not None
    assert m.toxicity == pytest.approx((1 + 1 + 0) / 3)
    # Completes the bucket in progress (sell 0.75, buy 0.25: |0.5|), then ten million
    # whole buckets of |1| (only the last three are kept), 0.75 left.
    flow.update(trade(T0 + 2, "buy", 10_000_000, 1.1))
    m = flow.update(trade(T0 + 3, "sell", 0.25, 1.1))  # buy 0.75, sell 0.25: |0.5|
    assert m is not None
    assert m.toxicity == pytest.approx((1 + 1 + 0.5) / 3)


def test_vpin_takes_a_trade_far_beyond_the_bucket_volumes_float_resolution() -> None:
    # 1e11 - 1e-6 == 1e11 in floats: pouring bucket by bucket never got anywhere.
    flow = calculator(vpin_bucket_volume=1e-6, vpin_buckets=50)
    m = flow.update(trade(T0, "buy", 1e11, 1.1))
    assert m is not None
    assert m.toxicity == pytest.approx(1.0)
    # Past 2**53 buckets a subtraction of one bucket changes nothing either.
    flow = calculator(vpin_bucket_volume=5.200446605608241e-06, vpin_buckets=50)
    m = flow.update(trade(T0, "sell", 1.9119690806600936e31, 1.1))
    assert m is not None
    assert m.toxicity == pytest.approx(1.0)


def test_unclassified_trades_do_not_feed_vpin() -> None:
    flow = calculator(vpin_bucket_volume=1.0)
    m = flow.update(trade(T0, None, 5, 1.1))
    assert m is not None
    assert m.toxicity is None


# --------------------------------------------------------------------------- reference


def brute_force(
    events: list[tuple[int, float, float, float, float, float, int]], now: int, window_ms: int
) -> dict[str, float]:
    inside = [e for e in events if now - window_ms <= e[0] <= now]
    return {
        "ofi": sum(e[1] for e in inside),
        "buy": sum(e[2] for e in inside),
        "sell": sum(e[3] for e in inside),
        "traded": sum(e[4] for e in inside),
        "pv": sum(e[5] for e in inside),
        "trades": sum(e[6] for e in inside),
    }


def reference_vpin(signed_sizes: list[int], bucket: int, n: int) -> float | None:
    """Split classified volume unit by unit into buckets (integers: no rounding at all)."""
    units = [1 if size > 0 else -1 for size in signed_sizes for _ in range(abs(size))]
    full = [abs(sum(units[i : i + bucket])) for i in range(0, len(units) - bucket + 1, bucket)]
    return vpin(full[-n:], bucket) if full else None


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 700),  # gap, ms
            st.integers(-3, 3),  # bid move, ticks of 0.0001
            st.integers(0, 3),  # spread, ticks
            st.integers(0, 9),  # bid size
            st.integers(0, 9),  # ask size
            st.sampled_from([None, "buy", "sell", "none"]),  # trade side ("none": unclassified)
            st.integers(1, 7),  # trade size
        ),
        min_size=1,
        max_size=80,
    ),
    window_ms=st.sampled_from([500, 1_000, 5_000]),
)
def test_matches_brute_force_over_random_streams(
    steps: list[tuple[int, int, int, int, int, str | None, int]], window_ms: int
) -> None:
    flow = OrderFlowCalculator(window_ms=window_ms, vpin_bucket_volume=5.0, vpin_buckets=3)
    events: list[tuple[int, float, float, float, float, float, int]] = []
    previous: tuple[float, float, float, float] | None = None
    signed: list[int] = []
    ts = T0
    bid_ticks = 11_000
    for gap, move, spread, bid_size, ask_size, side, size in steps:
        ts += gap
        bid_ticks += move
        bid, ask = bid_ticks / 10_000, (bid_ticks + spread) / 10_000
        extra: dict[str, Any] = {"bid_size": float(bid_size), "ask_size": float(ask_size)}
        if side is not None:
            extra |= {"last_size": float(size), "last_price": ask if side == "buy" else bid}
            if side != "none":
                extra["aggressor"] = side
        metrics = flow.update(tick(ts, bid, ask, **extra))

        current = (bid, float(bid_size), ask, float(ask_size))
        e = 0.0
        if previous is not None:  # the formula, written out independently
            pb, pqb, pa, pqa = previous
            e = (
                (bid_size if bid >= pb else 0)
                - (pqb if bid <= pb else 0)
                - (ask_size if ask <= pa else 0)
                + (pqa if ask >= pa else 0)
            )
        buy = float(size) if side == "buy" else 0.0
        sell = float(size) if side == "sell" else 0.0
        traded = float(size) if side is not None else 0.0
        price = ask if side == "buy" else bid
        if side in ("buy", "sell"):
            signed.append(size if side == "buy" else -size)
        contributes = previous is not None or side is not None
        previous = current
        if not contributes:
            assert metrics is None
            continue
        events.append((ts, e, buy, sell, traded, traded * price, int(side is not None)))
        expected = brute_force(events, ts, window_ms)
        assert metrics is not None
        assert OrderFlowMetrics.model_validate(metrics.model_dump()) == metrics
        assert metrics.timestamp == ts
        assert metrics.ofi == pytest.approx(expected["ofi"], abs=1e-9)
        assert metrics.buy_volume == pytest.approx(expected["buy"], abs=1e-9)
        assert metrics.sell_volume == pytest.approx(expected["sell"], abs=1e-9)
        assert metrics.num_trades == expected["trades"]
        if expected["traded"]:
            assert metrics.vwap == pytest.approx(expected["pv"] / expected["traded"])
        else:
            assert metrics.vwap is None
        total = expected["buy"] + expected["sell"]
        assert metrics.imbalance == pytest.approx(
            (expected["buy"] - expected["sell"]) / total if total else 0.0, abs=1e-9
        )
        want = reference_vpin(signed, 5, 3)
        if want is None:
            assert metrics.toxicity is None
        else:
            assert metrics.toxicity == pytest.approx(want, abs=1e-9)


def test_running_sums_stay_exact_over_many_evictions() -> None:
    flow = OrderFlowCalculator(window_ms=10, vpin_bucket_volume=1.0)
    sizes = [0.1, 0.7, 0.3, 1.9, 0.01]
    metrics = None
    for i in range(12_000):  # several exact re-summations of the window
        side = "buy" if i % 3 else "sell"
        metrics = flow.update(trade(T0 + i, side, sizes[i % 5], 1.1 + (i % 7) / 10_000))
    assert metrics is not None
    last = range(12_000 - 11, 12_000)  # the window [t - 10, t] holds 11 trades
    buy = sum(sizes[i % 5] for i in last if i % 3)
    sell = sum(sizes[i % 5] for i in last if not i % 3)
    assert metrics.num_trades == 11
    assert metrics.buy_volume == pytest.approx(buy, abs=1e-12)
    assert metrics.sell_volume == pytest.approx(sell, abs=1e-12)
    assert -1.0 <= metrics.imbalance <= 1.0


@pytest.mark.parametrize(
    "options",
    [
        {"window_ms": 0, "vpin_bucket_volume": 1.0},
        {"window_ms": 1.5, "vpin_bucket_volume": 1.0},
        {"vpin_bucket_volume": 0.0},
        {"vpin_bucket_volume": float("inf")},
        {"vpin_bucket_volume": 1.0, "vpin_buckets": 0},
        {"vpin_bucket_volume": 1.0, "source": ""},
    ],
)
def test_invalid_options_raise_validation_error(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        OrderFlowCalculator(**options)
