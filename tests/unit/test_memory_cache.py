"""Unit tests of the L1 memory cache: compare-and-set, TTLs, LRU bound, candle rings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_manager.cache.codec import tie_rank
from data_manager.cache.memory import MemoryCache
from data_manager.clock import ManualClock
from data_manager.errors import ConfigurationError, ValidationError
from data_manager.models import CandleData, OrderFlowMetrics, TickData

if TYPE_CHECKING:
    import random

T0 = 1_727_996_400_000  # 2024-10-03T23:00:00Z, a minute boundary
MINUTE = 60_000
SYM = "EUR/USD"


def tick(
    ts: int, *, bid: float = 1.1, source: str = "ig", symbol: str = SYM, **kw: object
) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.0002, source=source, **kw)


def flow(
    ts: int, *, ofi: float = 0.0, source: str = "databento", symbol: str = SYM
) -> OrderFlowMetrics:
    return OrderFlowMetrics(symbol=symbol, timestamp=ts, window_ms=60_000, ofi=ofi, source=source)


def candle(
    i: int,
    *,
    close: float = 1.1,
    closed: bool = True,
    source: str = "ig",
    symbol: str = SYM,
    timeframe: str = "1m",
) -> CandleData:
    """The candle of minute ``i`` after T0."""
    return CandleData(
        symbol=symbol,
        timeframe=timeframe,
        timestamp=T0 + i * MINUTE,
        open=1.1,
        high=2.0,
        low=1.0,
        close=close,
        source=source,
        is_closed=closed,
    )


def make(
    clock: ManualClock | None = None,
    *,
    max_entries: int = 1000,
    ring_size: int = 10,
    tick_ttl: float = 2.0,
    candle_ttl: float = 120.0,
    order_flow_ttl: float = 5.0,
) -> MemoryCache:
    return MemoryCache(
        max_entries=max_entries,
        tick_ttl=tick_ttl,
        candle_ttl=candle_ttl,
        order_flow_ttl=order_flow_ttl,
        ring_size=ring_size,
        clock=clock or ManualClock(),
    )


def stamps(candles: list[CandleData] | None) -> list[int]:
    assert candles is not None
    return [(c.timestamp - T0) // MINUTE for c in candles]


# ---------------------------------------------------------------- ticks: compare-and-set


def test_tick_hit_by_source_and_any_source() -> None:
    cache = make()
    a = tick(T0, source="ig")
    b = tick(T0 + 5, source="oanda")
    assert cache.put_tick(a)
    assert cache.put_tick(b)
    assert cache.get_tick(SYM, "ig") is a
    assert cache.get_tick(SYM, "oanda") is b
    assert cache.get_tick(SYM) is b  # newest across sources
    assert cache.get_tick("GBP/USD") is None
    assert cache.get_tick(SYM, "unknown") is None


def test_older_tick_never_replaces_newer() -> None:
    cache = make()
    new = tick(T0 + 10, bid=1.2)
    assert cache.put_tick(new)
    assert not cache.put_tick(tick(T0 + 9, bid=1.3))
    assert cache.get_tick(SYM, "ig") is new
    assert cache.get_tick(SYM) is new
    assert cache.stats().stale_writes == 2  # per-source and any-source both refused


def test_any_source_entry_keeps_newest_across_sources() -> None:
    cache = make()
    newest = tick(T0 + 10, source="ig")
    cache.put_tick(newest)
    older = tick(T0 + 5, source="oanda")
    # Stored for its own source, but not for "any source", which has a newer tick.
    assert cache.put_tick(older)
    assert cache.get_tick(SYM, "oanda") is older
    assert cache.get_tick(SYM) is newest


def test_equal_timestamp_same_source_goes_by_content_then_later_arrival() -> None:
    cache = make()
    higher = tick(T0, bid=1.2)
    cache.put_tick(higher)
    assert not cache.put_tick(tick(T0, bid=1.1))  # same ms, lower bid: ranks lower
    assert cache.get_tick(SYM, "ig") is higher
    replay = tick(T0, bid=1.2)
    assert cache.put_tick(replay)  # equal rank: a replay, the later arrival is kept
    assert cache.get_tick(SYM, "ig") is replay
    assert cache.get_tick(SYM) is replay


def test_equal_timestamp_same_source_ordered_by_seq() -> None:
    cache = make()
    later = tick(T0, bid=1.2, seq=8)
    cache.put_tick(later)
    assert not cache.put_tick(tick(T0, bid=1.3, seq=7))
    assert not cache.put_tick(tick(T0, bid=1.3))  # a missing seq ranks lowest
    assert cache.get_tick(SYM, "ig") is later
    assert cache.put_tick(tick(T0, bid=1.3, seq=8))  # same seq: the content decides


def test_equal_timestamp_across_sources_goes_to_the_higher_source() -> None:
    """Whatever order routers see them in, the symbol's newest is the same tick."""
    a2, b, a1 = (
        tick(T0, source="a", seq=2),
        tick(T0, source="b", bid=1.0),
        tick(T0, source="a", seq=1),
    )
    for order in ((a2, b, a1), (b, a2, a1), (a1, b, a2), (a2, a1, b)):
        cache = make()
        for t in order:
            cache.put_tick(t)
        assert cache.get_tick(SYM) is b
        assert cache.get_tick(SYM, "a") is a2
    # The source compares by code point, whatever its seq or price.
    cache = make()
    cache.put_tick(tick(T0, source="oanda", seq=1, bid=1.0))
    ig = tick(T0, source="ig", seq=99, bid=9.0)
    assert cache.put_tick(ig)  # stored for its own source only
    assert cache.get_tick(SYM, "ig") is ig
    assert cache.get_tick(SYM).source == "oanda"  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),
            st.sampled_from(["ig", "oanda", "lmax"]),
            st.sampled_from([None, 1, 2]),
            st.sampled_from([1.1, 1.2]),
        ),
        min_size=1,
        max_size=40,
    ),
    st.randoms(use_true_random=False),
)
def test_any_arrival_order_converges_to_newest(
    updates: list[tuple[int, str, int | None, float]], rnd: random.Random
) -> None:
    ticks = [tick(T0 + ts, source=src, seq=seq, bid=bid) for ts, src, seq, bid in updates]
    shuffled = list(ticks)
    rnd.shuffle(shuffled)
    cache = make()
    for t in shuffled:
        cache.put_tick(t)

    def rank(t: TickData) -> tuple[object, ...]:
        return (t.timestamp, *tie_rank(t))

    def newest(candidates: list[TickData]) -> TickData:
        # The highest rank; among equal ranks (the same tick) the last to arrive.
        top = max(map(rank, candidates))
        return [t for t in candidates if rank(t) == top][-1]

    assert cache.get_tick(SYM) is newest(shuffled)
    for src in {s for _, s, _, _ in updates}:
        assert cache.get_tick(SYM, src) is newest([t for t in shuffled if t.source == src])


# ---------------------------------------------------------------- any-source entry: who creates it


def test_a_value_read_for_one_source_fills_only_that_sources_entries() -> None:
    cache = make()
    lagging = tick(T0, source="lagging")
    assert cache.fill_tick(SYM, "lagging", lagging) is lagging
    assert cache.fill_order_flow(SYM, "lagging", flow(T0, source="lagging")) is not None
    assert cache.get_tick(SYM, "lagging") is lagging
    # Another source may have a newer value: the symbol's newest stays unknown here.
    assert cache.get_tick(SYM) is None
    assert cache.get_order_flow(SYM) is None
    assert cache.take_confirmations() == []


@pytest.mark.parametrize("kind", ["tick", "order_flow"])
def test_a_relayed_write_is_served_as_the_newest_only_once_a_fill_settles_it(kind: str) -> None:
    cache = make()
    value: Any = tick if kind == "tick" else flow
    put: Any = cache.put_tick if kind == "tick" else cache.put_order_flow
    fill: Any = cache.fill_tick if kind == "tick" else cache.fill_order_flow
    get: Any = cache.get_tick if kind == "tick" else cache.get_order_flow
    lagging, fast, later = value(T0, source="lagging"), value(T0 + 5_000), value(T0 + 6_000)
    put(lagging, settled=False)
    assert get(SYM) is None  # not served: another source may be newer
    assert get(SYM, "lagging") is None  # nor this: the tiers may hold a newer one of it
    assert cache.take_confirmations() == [(kind, SYM, "lagging"), (kind, SYM, None)]
    put(value(T0 + 1, source="lagging"), settled=False)
    assert cache.take_confirmations() == []  # one check per new entry
    # The check's answer (the tiers' newest) settles it; compare-and-set with what came in.
    assert fill(SYM, None, fast) is fast
    assert get(SYM) is fast
    assert get(SYM, fast.source) is fast
    assert fill(SYM, "lagging", lagging) is not lagging  # the live write is newer
    assert get(SYM, "lagging").timestamp == T0 + 1
    put(later, settled=False)
    assert get(SYM) is later  # settled: later writes are served at once


@pytest.mark.parametrize("kind", ["tick", "order_flow"])
def test_a_relayed_older_value_of_a_source_is_not_served_as_that_sources_newest(
    kind: str,
) -> None:
    # Another router's late value is relayed although the tiers below refused it (they
    # hold a newer one of that source): it must not become the source's newest here.
    cache = make()
    value: Any = tick if kind == "tick" else flow
    put: Any = cache.put_tick if kind == "tick" else cache.put_order_flow
    fill: Any = cache.fill_tick if kind == "tick" else cache.fill_order_flow
    get: Any = cache.get_tick if kind == "tick" else cache.get_order_flow
    late, newest = value(T0), value(T0 + 5_000)
    source = late.source
    put(late, settled=False)
    assert get(SYM, source) is None
    assert (kind, SYM, source) in cache.take_confirmations()
    assert fill(SYM, source, newest) is newest  # the check's answer for that source
    assert get(SYM, source) is newest
    assert put(value(T0 + 1), settled=False) is False  # still older: refused


def test_a_fill_keeps_a_newer_live_write_that_raced_with_its_read() -> None:
    cache = make()
    newer = tick(T0 + 7_000, source="lagging")
    cache.put_tick(tick(T0, source="lagging"), settled=False)
    cache.put_tick(newer, settled=False)  # arrived while the check's read was under way
    assert cache.fill_tick(SYM, None, tick(T0 + 5_000)) is newer
    assert cache.get_tick(SYM) is newer


def test_a_fill_with_nothing_below_settles_the_live_writes() -> None:
    cache = make()
    own = tick(T0, source="lagging")
    cache.put_tick(own, settled=False)
    assert cache.fill_tick(SYM, None, None) is own
    assert cache.get_tick(SYM) is own
    assert cache.fill_tick("GBP/USD", None, None) is None
    assert cache.get_tick("GBP/USD") is None


def test_an_own_write_is_served_at_once_and_still_queued_for_a_check() -> None:
    cache = make()
    own = tick(T0, source="lagging")
    cache.put_tick(own)
    assert cache.get_tick(SYM) is own
    assert cache.get_tick(SYM, "lagging") is own
    assert cache.take_confirmations() == [("tick", SYM, None)]  # its own source: no check
    # The check finds a newer tick of another source: it replaces the own one.
    fast = tick(T0 + 5_000)
    assert cache.fill_tick(SYM, None, fast) is fast
    assert cache.get_tick(SYM) is fast


def test_a_lost_any_source_entry_is_checked_again() -> None:
    clock = ManualClock()
    cache = make(clock)
    cache.put_tick(tick(T0))
    cache.take_confirmations()
    cache.put_tick(tick(T0 + 1))
    assert cache.take_confirmations() == []  # the entry exists
    clock.advance(3)  # past tick_ttl
    assert cache.get_tick(SYM) is None  # expired: removed
    cache.put_tick(tick(T0 + 2), settled=False)
    assert cache.take_confirmations() == [("tick", SYM, None)]  # the source's entry stays
    cache.put_tick(tick(T0 + 3), settled=False)
    cache.clear()
    assert cache.take_confirmations() == []  # nothing left to check


# ---------------------------------------------------------------- TTLs


def test_tick_expires_after_ttl_and_is_removed() -> None:
    clock = ManualClock()
    cache = make(clock, tick_ttl=2.0)
    t = tick(T0)
    cache.put_tick(t)
    clock.advance(1.999)
    assert cache.get_tick(SYM) is t
    clock.advance(0.001)
    assert cache.get_tick(SYM) is None
    stats = cache.stats()
    assert stats.expirations == 1
    assert stats.tick_entries == 1  # the per-source entry is removed when it is next read
    assert cache.get_tick(SYM, "ig") is None
    assert cache.stats().tick_entries == 0
    assert cache.stats().expirations == 2


def test_write_refreshes_ttl() -> None:
    clock = ManualClock()
    cache = make(clock, tick_ttl=2.0)
    cache.put_tick(tick(T0))
    clock.advance(1.5)
    fresh = tick(T0 + 1)
    cache.put_tick(fresh)
    clock.advance(1.5)
    assert cache.get_tick(SYM) is fresh


def test_expired_entry_still_refuses_older_writes_until_removed() -> None:
    clock = ManualClock()
    cache = make(clock, tick_ttl=2.0)
    cache.put_tick(tick(T0 + 10))
    clock.advance(3)
    assert not cache.put_tick(tick(T0 + 5))
    assert cache.get_tick(SYM, "ig") is None  # still expired: no older value resurrected
    newer = tick(T0 + 11)
    assert cache.put_tick(newer)
    assert cache.get_tick(SYM, "ig") is newer


def test_ttls_are_per_type() -> None:
    clock = ManualClock()
    cache = make(clock, tick_ttl=1.0, order_flow_ttl=5.0, candle_ttl=10.0)
    cache.put_tick(tick(T0))
    cache.put_order_flow(flow(T0))
    cache.put_candle(candle(0))
    clock.advance(1.0)
    assert cache.get_tick(SYM) is None
    assert cache.get_order_flow(SYM) is not None
    assert cache.get_candles(SYM, "1m", 1, "ig") is not None
    clock.advance(4.0)
    assert cache.get_order_flow(SYM) is None
    assert cache.get_candles(SYM, "1m", 1, "ig") is not None
    clock.advance(5.0)
    assert cache.get_candles(SYM, "1m", 1, "ig") is None
    assert cache.stats().candle_rings == 0


def test_configure_ttl_applies_to_cached_entries() -> None:
    clock = ManualClock()
    cache = make(clock, tick_ttl=10.0)
    cache.put_tick(tick(T0))
    clock.advance(3)
    assert cache.get_tick(SYM) is not None
    cache.configure(tick_ttl=2.0)
    assert cache.get_tick(SYM) is None


def test_with_age_variants_report_seconds_since_write() -> None:
    clock = ManualClock()
    cache = make(clock)
    t = tick(T0)
    f = flow(T0)
    cache.put_tick(t)
    cache.put_order_flow(f)
    cache.put_candle(candle(0))
    clock.advance(0.25)
    assert cache.get_tick_with_age(SYM) == (t, 0.25)
    assert cache.get_order_flow_with_age(SYM, "databento") == (f, 0.25)
    got = cache.get_candles_with_age(SYM, "1m", 1, "ig")
    assert got is not None
    assert stamps(got[0]) == [0]
    assert got[1] == 0.25
    assert cache.get_tick_with_age("GBP/USD") is None
    clock.advance(10)
    assert cache.get_tick_with_age(SYM) is None
    assert cache.get_order_flow_with_age(SYM) is None
    assert cache.stats().hits == 3


# ---------------------------------------------------------------- order flow


def test_order_flow_compare_and_set() -> None:
    cache = make()
    new = flow(T0 + 100, ofi=2.0)
    assert cache.put_order_flow(new)
    assert not cache.put_order_flow(flow(T0 + 50, ofi=1.0))
    assert cache.get_order_flow(SYM) is new
    assert cache.get_order_flow(SYM, "databento") is new
    assert cache.get_order_flow(SYM, "other") is None
    same_ts = flow(T0 + 100, ofi=3.0)
    assert cache.put_order_flow(same_ts)  # same key as the database's: the later write
    assert cache.get_order_flow(SYM) is same_ts
    # Equal timestamps otherwise go by source, then window_ms, as in every tier.
    assert cache.put_order_flow(flow(T0 + 100, ofi=4.0, source="alpha"))
    assert cache.get_order_flow(SYM) is same_ts
    wider = same_ts.model_copy(update={"window_ms": 300_000})
    assert cache.put_order_flow(wider)
    assert not cache.put_order_flow(flow(T0 + 100, ofi=5.0))
    assert cache.get_order_flow(SYM) is wider


# ---------------------------------------------------------------- LRU bound


def test_lru_evicts_least_recently_used() -> None:
    clock = ManualClock()
    cache = make(clock, max_entries=4)
    cache.put_tick(tick(T0, symbol="AAA"))  # 2 entries: (AAA, ig) and AAA
    clock.advance(0.01)
    cache.put_tick(tick(T0, symbol="BBB"))  # 4 entries
    clock.advance(0.01)
    assert cache.get_tick("AAA") is not None  # AAA (any source) is now the most recent
    clock.advance(0.01)
    cache.put_tick(tick(T0, symbol="CCC"))  # evicts (AAA, ig) then (BBB, ig)
    stats = cache.stats()
    assert stats.evictions == 2
    assert len(cache) == 4
    assert cache.get_tick("AAA", "ig") is None
    assert cache.get_tick("BBB", "ig") is None
    assert cache.get_tick("AAA") is not None
    assert cache.get_tick("BBB") is not None
    assert cache.get_tick("CCC", "ig") is not None


def test_lru_spans_data_types() -> None:
    clock = ManualClock()
    cache = make(clock, max_entries=3)
    cache.put_candle(candle(0))  # ring, oldest
    clock.advance(0.01)
    cache.put_order_flow(flow(T0))  # 2 entries
    clock.advance(0.01)
    assert cache.get_candles(SYM, "1m", 1, "ig") is not None  # ring is used again
    clock.advance(0.01)
    cache.put_tick(tick(T0))  # 2 more entries: evicts the two order-flow entries
    assert cache.stats().evictions == 2
    assert len(cache) == 3
    assert cache.stats().order_flow_entries == 0
    assert cache.get_candles(SYM, "1m", 1, "ig") is not None


def test_lru_spans_data_types_exact() -> None:
    clock = ManualClock()
    cache = make(clock, max_entries=4)
    cache.put_candle(candle(0))
    clock.advance(0.01)
    cache.put_order_flow(flow(T0))  # 3 entries: ring, (sym, src) flow, sym flow
    clock.advance(0.01)
    assert cache.get_candles(SYM, "1m", 1, "ig") is not None  # ring most recent
    clock.advance(0.01)
    cache.put_tick(tick(T0))  # 5 entries, then 4: the per-source flow (oldest) goes
    assert cache.stats().evictions == 1
    assert cache.get_order_flow(SYM, "databento") is None
    assert cache.get_order_flow(SYM) is not None
    assert cache.get_candles(SYM, "1m", 1, "ig") is not None
    assert cache.get_tick(SYM) is not None


def test_entry_just_written_survives_tied_clock() -> None:
    clock = ManualClock()  # never advanced: every ``used`` stamp ties
    cache = make(clock, max_entries=2)
    cache.put_candle(candle(0))
    cache.put_candle(candle(0, timeframe="5m"))
    assert cache.put_candle(candle(0, timeframe="1h"))
    assert cache.get_candles(SYM, "1h", 1, "ig") is not None
    assert len(cache) == 2


def test_configure_shrink_evicts_and_trims() -> None:
    clock = ManualClock()
    cache = make(clock, max_entries=100, ring_size=10)
    for i in range(10):
        cache.put_candle(candle(i))
    for sym in ("AAA", "BBB", "CCC"):
        clock.advance(0.01)
        cache.put_tick(tick(T0, symbol=sym))
    assert len(cache) == 7
    cache.configure(max_entries=3, ring_size=4)
    assert len(cache) == 3
    assert cache.stats().evictions == 4
    assert cache.get_tick("CCC") is not None  # the most recently used survive
    assert cache.get_tick("CCC", "ig") is not None
    assert cache.get_tick("BBB") is not None
    assert cache.get_candles(SYM, "1m", 1, "ig") is None  # the ring was the LRU entry
    cache.configure(max_entries=100)
    for i in range(10):
        cache.put_candle(candle(i))
    assert stamps(cache.get_candles(SYM, "1m", 4, "ig")) == [6, 7, 8, 9]
    assert cache.get_candles(SYM, "1m", 5, "ig") is None
    assert cache.ring_size == 4
    assert cache.max_entries == 100


def test_configure_ring_shrink_clears_complete_flag() -> None:
    cache = make(ring_size=10)
    cache.put_candles([candle(i) for i in range(5)], complete=True)
    assert stamps(cache.get_candles(SYM, "1m", 50, "ig")) == [0, 1, 2, 3, 4]
    cache.configure(ring_size=3)
    assert cache.get_candles(SYM, "1m", 4, "ig") is None
    assert stamps(cache.get_candles(SYM, "1m", 3, "ig")) == [2, 3, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_entries": 0},
        {"ring_size": 0},
        {"tick_ttl": 0},
        {"candle_ttl": -1.0},
        {"order_flow_ttl": float("nan")},
    ],
)
def test_invalid_configuration_is_refused_whole(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        make(**kwargs)  # type: ignore[arg-type]
    cache = make(max_entries=50, tick_ttl=2.0)
    with pytest.raises(ConfigurationError):
        cache.configure(**{"order_flow_ttl": 30.0, **kwargs})  # type: ignore[arg-type]
    assert cache.order_flow_ttl == 5.0  # nothing applied
    assert cache.candle_ttl == 120.0
    assert cache.max_entries == 50
    assert cache.tick_ttl == 2.0


def test_infinite_ttl_never_expires() -> None:
    clock = ManualClock()
    cache = make(clock, order_flow_ttl=float("inf"))
    cache.put_order_flow(flow(T0))
    clock.advance(1e9)
    assert cache.get_order_flow(SYM) is not None
    assert cache.order_flow_ttl == float("inf")


# ---------------------------------------------------------------- candle rings


def test_ring_keeps_order_upserts_and_trims() -> None:
    cache = make(ring_size=5)
    for i in (0, 1, 2, 4, 3):  # 3 arrives late, within the span: inserted in order
        assert cache.put_candle(candle(i))
    assert stamps(cache.get_candles(SYM, "1m", 5, "ig")) == [0, 1, 2, 3, 4]
    replaced = candle(2, close=1.5)
    assert cache.put_candle(replaced)
    got = cache.get_candles(SYM, "1m", 5, "ig")
    assert got is not None
    assert got[2] is replaced
    assert cache.put_candle(candle(5))  # trims the oldest
    assert stamps(cache.get_candles(SYM, "1m", 5, "ig")) == [1, 2, 3, 4, 5]
    assert not cache.put_candle(candle(0))  # older than the span of a full ring
    assert stamps(cache.get_candles(SYM, "1m", 3, "ig")) == [3, 4, 5]


def test_closed_candle_is_never_replaced_by_forming_one() -> None:
    cache = make()
    closed = candle(0, close=1.2)
    cache.put_candle(closed)
    assert not cache.put_candle(candle(0, close=1.3, closed=False))
    got = cache.get_candles(SYM, "1m", 1, "ig")
    assert got == [closed]
    # Same rule for a bucket that is not the newest.
    cache.put_candle(candle(1))
    assert not cache.put_candle(candle(0, close=1.4, closed=False))
    got = cache.get_candles(SYM, "1m", 2, "ig")
    assert got is not None
    assert got[0] is closed
    assert cache.stats().stale_writes == 2


def test_forming_candle_is_updated_then_closed() -> None:
    cache = make()
    cache.put_candle(candle(0, close=1.1, closed=False))
    cache.put_candle(candle(0, close=1.2, closed=False))
    final = candle(0, close=1.3, closed=True)
    assert cache.put_candle(final)
    assert cache.get_candles(SYM, "1m", 1, "ig") == [final]


def test_short_ring_is_a_miss_unless_complete() -> None:
    cache = make(ring_size=10)
    for i in range(3):
        cache.put_candle(candle(i))
    assert cache.get_candles(SYM, "1m", 5, "ig") is None  # the database may hold older ones
    assert stamps(cache.get_candles(SYM, "1m", 3, "ig")) == [0, 1, 2]
    assert stamps(cache.get_candles(SYM, "1m", 2, "ig")) == [1, 2]
    assert cache.get_candles(SYM, "1m", 0, "ig") == []
    # The backend answered with fewer rows than asked: nothing older exists.
    assert cache.put_candles([candle(i) for i in range(-2, 3)], complete=True) == 2
    assert stamps(cache.get_candles(SYM, "1m", 50, "ig")) == [-2, -1, 0, 1, 2]
    stats = cache.stats()
    assert stats.candle_misses == 1
    assert stats.candle_hits == 4


def test_complete_ring_accepts_older_candle_until_full() -> None:
    cache = make(ring_size=4)
    cache.put_candles([candle(5), candle(6)], complete=True)
    assert cache.put_candle(candle(3))  # nothing older is known: it is the new oldest
    assert stamps(cache.get_candles(SYM, "1m", 10, "ig")) == [3, 5, 6]
    cache.put_candle(candle(7))
    assert stamps(cache.get_candles(SYM, "1m", 10, "ig")) == [3, 5, 6, 7]
    assert not cache.put_candle(candle(1))  # full: it would be trimmed at once
    # ... and candle 1 now exists below: the ring is no longer the whole series.
    assert cache.get_candles(SYM, "1m", 5, "ig") is None
    cache.put_candle(candle(8))  # trims candle 3
    assert cache.get_candles(SYM, "1m", 5, "ig") is None
    assert stamps(cache.get_candles(SYM, "1m", 4, "ig")) == [5, 6, 7, 8]


def test_a_candle_inserted_inside_a_full_ring_trims_the_oldest() -> None:
    cache = make(ring_size=3)
    cache.put_candles([candle(0), candle(5), candle(9)], complete=True)
    for i in (1, 2, 6, 7):
        assert cache.put_candle(candle(i))
    assert stamps(cache.get_candles(SYM, "1m", 3, "ig")) == [6, 7, 9]
    assert cache.get_candles(SYM, "1m", 4, "ig") is None  # trimmed: no longer complete
    assert cache.stats().candles == 3


def test_incomplete_ring_ignores_candle_older_than_span() -> None:
    cache = make(ring_size=10)
    cache.put_candle(candle(5))
    assert not cache.put_candle(candle(1))  # would leave a gap (2..4) the DB may have
    assert stamps(cache.get_candles(SYM, "1m", 1, "ig")) == [5]
    assert cache.get_candles(SYM, "1m", 2, "ig") is None


def test_write_to_expired_ring_starts_a_new_ring() -> None:
    clock = ManualClock()
    cache = make(clock, candle_ttl=10.0)
    cache.put_candles([candle(i) for i in range(5)], complete=True)
    clock.advance(10)
    assert cache.put_candle(candle(5))
    assert stamps(cache.get_candles(SYM, "1m", 1, "ig")) == [5]
    assert cache.get_candles(SYM, "1m", 2, "ig") is None  # stale candles were not revived
    clock.advance(10)
    assert cache.put_candles([candle(7), candle(8)], complete=False) == 2
    assert stamps(cache.get_candles(SYM, "1m", 2, "ig")) == [7, 8]
    assert cache.get_candles(SYM, "1m", 3, "ig") is None
    assert cache.stats().expirations == 2


def test_put_candles_merges_and_prefers_cached_values() -> None:
    cache = make(ring_size=10)
    live_forming = candle(4, close=1.9, closed=False)
    live_closed = candle(3, close=1.8)
    cache.put_candle(live_closed)
    cache.put_candle(live_forming)
    backfill = [candle(i, close=1.2) for i in range(5)]
    backfill[4] = candle(4, close=1.25, closed=True)  # the closed version wins
    assert cache.put_candles(reversed(backfill), complete=False) == 4
    got = cache.get_candles(SYM, "1m", 5, "ig")
    assert got is not None
    assert stamps(got) == [0, 1, 2, 3, 4]
    assert got[3] is live_closed
    assert got[4] is backfill[4]
    assert cache.get_candles(SYM, "1m", 6, "ig") is None  # not complete


def test_put_candles_trims_and_loses_completeness() -> None:
    cache = make(ring_size=3)
    assert cache.put_candles([candle(i) for i in range(5)], complete=True) == 3
    assert stamps(cache.get_candles(SYM, "1m", 3, "ig")) == [2, 3, 4]
    assert cache.get_candles(SYM, "1m", 4, "ig") is None


def test_put_candles_keeps_ring_completeness_when_ring_is_older() -> None:
    cache = make(ring_size=10)
    cache.put_candles([candle(0), candle(1)], complete=True)
    cache.put_candles([candle(1), candle(2)], complete=False)  # newer slice only
    assert stamps(cache.get_candles(SYM, "1m", 10, "ig")) == [0, 1, 2]


@pytest.mark.parametrize("complete", [True, False])
def test_a_backfill_ending_before_the_ring_is_not_joined(complete: bool) -> None:
    # Live candles 11 and 12 reached the ring; the database has stored up to 10 only. Bucket
    # 11 is in both, but from 12 alone nothing tells whether the database lacks a candle
    # between 10 and 12 (written, not stored yet): joining them could serve a gap.
    cache = make(ring_size=10)
    cache.put_candle(candle(12))
    assert cache.put_candles([candle(i) for i in range(6, 11)], complete=complete) == 0
    assert cache.get_candles(SYM, "1m", 2, "ig") is None
    assert stamps(cache.peek_candles(SYM, "1m", "ig")) == [12]
    # Once the database reaches the ring's oldest candle, the two join.
    assert cache.put_candles([candle(i) for i in range(8, 13)], complete=False) == 4
    assert stamps(cache.get_candles(SYM, "1m", 5, "ig")) == [8, 9, 10, 11, 12]


def test_a_complete_ring_given_an_older_disjoint_backfill_is_complete_no_longer() -> None:
    cache = make(ring_size=10)
    cache.put_candles([candle(5), candle(6)], complete=True)
    assert stamps(cache.get_candles(SYM, "1m", 10, "ig")) == [5, 6]
    assert cache.put_candles([candle(1), candle(2)], complete=True) == 0
    assert cache.get_candles(SYM, "1m", 10, "ig") is None


def test_peek_candles_shows_a_short_ring_without_counting() -> None:
    clock = ManualClock()
    cache = make(clock, candle_ttl=10.0)
    assert cache.peek_candles(SYM, "1m", "ig") == []
    cache.put_candle(candle(3))
    peeked = cache.peek_candles(SYM, "1m", "ig")
    assert stamps(peeked) == [3]
    peeked.clear()  # a copy
    assert stamps(cache.peek_candles(SYM, "1m", "ig")) == [3]
    stats = cache.stats()
    assert (stats.candle_hits, stats.candle_misses) == (0, 0)
    clock.advance(10)
    assert cache.peek_candles(SYM, "1m", "ig") == []  # expired


def test_put_candles_refuses_mixed_series_and_ignores_empty() -> None:
    cache = make()
    assert cache.put_candles([], complete=True) == 0
    with pytest.raises(ValidationError):
        cache.put_candles([candle(0), candle(1, source="oanda")], complete=True)
    assert len(cache) == 0


def test_drop_candles_drops_one_series() -> None:
    cache = make()
    for source in ("ig", "oanda"):
        cache.put_candle(candle(0, source=source))
    assert cache.drop_candles(SYM, "1m", "ig")
    assert cache.get_candles(SYM, "1m", 1, "ig") is None
    assert stamps(cache.get_candles(SYM, "1m", 1, "oanda")) == [0]
    assert cache.candle_sources(SYM, "1m") == ["oanda"]
    assert not cache.drop_candles(SYM, "1m", "ig")
    cache.put_candle(candle(1, source="ig"))  # a new ring starts
    assert stamps(cache.get_candles(SYM, "1m", 1, "ig")) == [1]


def test_get_candles_returns_a_copy() -> None:
    cache = make()
    cache.put_candles([candle(0), candle(1)], complete=True)
    got = cache.get_candles(SYM, "1m", 2, "ig")
    assert got is not None
    got.clear()
    full = cache.get_candles(SYM, "1m", 5, "ig")
    assert full is not None
    full.pop()
    assert stamps(cache.get_candles(SYM, "1m", 2, "ig")) == [0, 1]


def test_candle_sources_live_rings_most_recent_first() -> None:
    clock = ManualClock()
    cache = make(clock, candle_ttl=10.0)
    cache.put_candle(candle(0, source="oanda"))
    clock.advance(1)
    cache.put_candle(candle(0, source="ig"))
    cache.put_candle(candle(0, source="ig", timeframe="5m"))
    assert cache.candle_sources(SYM, "1m") == ["ig", "oanda"]
    assert cache.candle_sources(SYM, "5m") == ["ig"]
    assert cache.candle_sources(SYM, "1h") == []
    clock.advance(9.5)  # oanda's ring is 10.5 s old, ig's 9.5 s
    assert cache.candle_sources(SYM, "1m") == ["ig"]
    assert cache.stats().candle_rings == 2  # the expired ring was dropped
    clock.advance(1)
    assert cache.candle_sources(SYM, "1m") == []
    assert cache.stats().hits == 0  # not counted as reads


# ---------------------------------------------------------------- maintenance, stats


def test_clear_drops_entries_and_keeps_counters() -> None:
    cache = make()
    cache.put_tick(tick(T0))
    cache.put_order_flow(flow(T0))
    cache.put_candle(candle(0))
    assert cache.get_tick(SYM) is not None
    cache.clear()
    assert len(cache) == 0
    assert cache.get_tick(SYM) is None
    assert cache.get_order_flow(SYM) is None
    assert cache.get_candles(SYM, "1m", 1, "ig") is None
    assert cache.candle_sources(SYM, "1m") == []
    stats = cache.stats()
    assert stats.clears == 1
    assert stats.tick_hits == 1
    assert stats.tick_misses == 1
    assert stats.bytes_estimate == 0
    # An older tick is accepted again: the cache no longer knows the newer one.
    assert cache.put_tick(tick(T0 - 1))


def test_invalidate_symbol_drops_only_that_symbol() -> None:
    cache = make()
    cache.put_tick(tick(T0))
    cache.put_tick(tick(T0, source="oanda"))
    cache.put_order_flow(flow(T0))
    cache.put_candle(candle(0))
    cache.put_candle(candle(0, timeframe="5m"))
    cache.put_tick(tick(T0, symbol="GBP/USD"))
    cache.put_candle(candle(0, symbol="GBP/USD"))
    assert cache.invalidate_symbol(SYM) == 7  # 3 ticks + 2 flows + 2 rings
    assert cache.get_tick(SYM) is None
    assert cache.get_order_flow(SYM) is None
    assert cache.candle_sources(SYM, "1m") == []
    assert cache.get_tick("GBP/USD") is not None
    assert cache.get_candles("GBP/USD", "1m", 1, "ig") is not None
    assert len(cache) == 3


def test_stats_counts_and_byte_estimate() -> None:
    cache = make(ring_size=100)
    empty = cache.stats()
    assert empty.bytes_estimate == 0
    assert empty.hit_rate == 0.0
    cache.put_tick(tick(T0))
    cache.put_order_flow(flow(T0))
    cache.put_candles([candle(i) for i in range(10)], complete=False)
    cache.get_tick(SYM)
    cache.get_tick(SYM, "nope")
    cache.get_order_flow(SYM)
    cache.get_candles(SYM, "1m", 10, "ig")
    cache.get_candles(SYM, "1m", 11, "ig")
    cache.get_candles(SYM, "5m", 1, "ig")
    s = cache.stats()
    assert (s.tick_entries, s.order_flow_entries, s.candle_rings, s.candles) == (2, 2, 1, 10)
    assert s.entries == 5
    assert (s.tick_hits, s.tick_misses) == (1, 1)
    assert (s.order_flow_hits, s.order_flow_misses) == (1, 0)
    assert (s.candle_hits, s.candle_misses) == (1, 2)
    assert s.hit_rate == pytest.approx(3 / 6)
    assert s.evictions == 0
    assert s.max_entries == 1000
    # Each model is a few hundred bytes; ten more candles must grow the estimate.
    assert 2_000 < s.bytes_estimate < 100_000
    cache.put_candles([candle(i) for i in range(10, 20)], complete=False)
    grown = cache.stats().bytes_estimate
    per_candle = (grown - s.bytes_estimate) / 10
    assert 200 < per_candle < 2_000


def test_put_dispatches_by_type_and_settled_applies_to_latest_values() -> None:
    cache = make()
    assert cache.put(tick(T0), settled=False)
    assert cache.put(flow(T0), settled=False)
    assert cache.put(candle(0))
    # Unsettled latest values are not served; the ring is.
    assert cache.get_tick(SYM) is None
    assert cache.get_order_flow(SYM) is None
    assert cache.get_tick(SYM, "ig") is None
    assert cache.get_order_flow(SYM, "databento") is None
    assert cache.peek_tick(SYM, "ig") == tick(T0)
    assert cache.get_candles(SYM, "1m", 1, "ig") == [candle(0)]
    assert cache.put(tick(T0, symbol="GBP/USD"))  # a new entry, settled by default
    assert cache.get_tick("GBP/USD") == tick(T0, symbol="GBP/USD")
    assert not cache.put(tick(T0 - 1), settled=False)  # compare-and-set, as put_tick
