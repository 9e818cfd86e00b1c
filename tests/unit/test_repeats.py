"""RepeatFilter: a tick saved again is recognised; an out-of-order or distinct one is not."""

from __future__ import annotations

from data_manager.models import TickData
from data_manager.repeats import RepeatFilter, tick_identity
from data_manager.storage.base import TICK_CONTENT_FIELDS, tick_content_key

T0 = 1_727_996_400_000
SERIES = ("EUR/USD", "feed")


def tick(ts: int, bid: float = 1.1, **extra: object) -> TickData:
    return TickData(
        symbol="EUR/USD", timestamp=ts, bid=bid, ask=bid + 0.0002, source="feed", **extra
    )


def test_a_resent_tick_is_a_repeat_whatever_its_arrival_stamp() -> None:
    seen = RepeatFilter()
    assert not seen.is_repeat(tick(T0), SERIES)
    assert not seen.is_repeat(tick(T0 + 1), SERIES)
    assert seen.is_repeat(tick(T0, received_at=T0 + 5), SERIES)  # not part of the content
    assert seen.is_repeat(tick(T0 + 1), SERIES)


def test_older_or_equal_ticks_with_other_content_are_new() -> None:
    seen = RepeatFilter()
    assert not seen.is_repeat(tick(T0 + 10), SERIES)
    assert not seen.is_repeat(tick(T0 + 5), SERIES)  # out of order, first seen
    assert not seen.is_repeat(tick(T0 + 10, 1.2), SERIES)  # same time, other price
    assert not seen.is_repeat(tick(T0 + 10, seq=7), SERIES)  # same time, other seq
    assert seen.is_repeat(tick(T0 + 5), SERIES)
    assert not seen.is_repeat(tick(T0 + 10), ("EUR/USD", "other"))  # another series


def test_only_the_last_depth_ticks_are_remembered() -> None:
    seen = RepeatFilter(depth=3)
    for i in range(4):
        assert not seen.is_repeat(tick(T0 + i), SERIES)
    assert not seen.is_repeat(tick(T0), SERIES)  # forgotten: counted again
    assert seen.is_repeat(tick(T0 + 3), SERIES)


def test_a_burst_in_one_millisecond_is_told_apart_beyond_the_depth() -> None:
    seen = RepeatFilter(depth=2)
    burst = [tick(T0, 1.1 + i / 1000) for i in range(5)]
    assert not any(seen.is_repeat(t, SERIES) for t in burst)
    assert all(seen.is_repeat(t, SERIES) for t in burst)


def test_the_identity_holds_exactly_what_the_stored_key_digests() -> None:
    # A repeat must be what storage would not store again: every field the content key
    # digests changes the identity, and the fields it leaves out change neither.
    base = tick(T0, seq=1, bid_size=1.0, ask_size=1.0, last_price=1.1, last_size=1.0)
    changes: dict[str, object] = {
        "bid": 1.0,
        "ask": 1.3,
        "bid_size": 2.0,
        "ask_size": 2.0,
        "last_price": 1.2,
        "last_size": 2.0,
        "volume": 5.0,
        "seq": 2,
        "aggressor": "buy",
    }
    assert set(changes) == set(TICK_CONTENT_FIELDS)
    for field, value in changes.items():
        other = base.model_copy(update={field: value})
        assert tick_content_key(other) != tick_content_key(base), field
        assert tick_identity(other) != tick_identity(base), field
    for field, value in {"received_at": T0 + 5, "exchange": "x", "use_case": "u"}.items():
        # Unchecked: "x" is no valid exchange, and neither field counts for the identity.
        other = TickData.model_construct(**(base.__dict__ | {field: value}))
        assert tick_content_key(other) == tick_content_key(base), field
        assert tick_identity(other) == tick_identity(base), field
