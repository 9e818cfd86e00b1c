"""Every validation rule of the models, and the symbol normaliser."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import pytest

from data_manager import CandleData, OrderFlowMetrics, TickData, ValidationError, normalize_symbol
from data_manager.models import (
    MAX_SYMBOL_LENGTH,
    MAX_TEXT_LENGTH,
    epoch_ms_range,
    stamp_received,
    to_epoch_ms,
)
from data_manager.storage.base import tick_content_key

TS = 1_727_996_400_000


def tick(**over: Any) -> TickData:
    values: dict[str, Any] = {
        "symbol": "EUR/USD",
        "timestamp": TS,
        "bid": 1.09551,
        "ask": 1.09553,
        "source": "polygon",
    }
    values.update(over)
    return TickData(**values)


def candle(**over: Any) -> CandleData:
    values: dict[str, Any] = {
        "symbol": "EUR/USD",
        "timeframe": "1m",
        "timestamp": TS,
        "open": 1.0850,
        "high": 1.0855,
        "low": 1.0848,
        "close": 1.0852,
        "volume": 15234,
        "source": "polygon",
    }
    values.update(over)
    return CandleData(**values)


def test_seed_004_tick_example() -> None:
    t = TickData(
        symbol="EUR/USD",
        timestamp=1727996400000,
        timestamp_ms=1727996400000,
        bid=1.09551,
        ask=1.09553,
        source="polygon",
    )
    assert t.timestamp_ms == t.timestamp == 1727996400000
    assert t.mid == pytest.approx(1.09552)
    assert t.spread == pytest.approx(0.00002)
    assert t.event_type == "quote"
    assert t.model_dump()["mid"] == pytest.approx(1.09552)


@pytest.mark.parametrize("field", ["volume", "bid_size", "ask_size", "last_size"])
def test_a_negative_zero_size_is_zero(field: str) -> None:
    # -0.0 == 0.0, so the derived data took two such ticks for one, while storage keys a
    # tick by the bits of its values and kept both.
    got = tick(**{field: -0.0})
    assert math.copysign(1.0, getattr(got, field)) == 1.0
    assert got == tick(**{field: 0.0})
    assert tick_content_key(got) == tick_content_key(tick(**{field: 0.0}))
    assert math.copysign(1.0, candle(volume=-0.0).volume or 0.0) == 1.0


def test_timestamp_ms_alone_is_the_timestamp() -> None:
    assert TickData(symbol="EUR/USD", timestamp_ms=TS, bid=1.0, ask=1.1, source="x").timestamp == TS


def test_disagreeing_alias_is_an_error() -> None:
    with pytest.raises(ValidationError, match="disagree"):
        tick(timestamp_ms=TS + 1)


def test_models_are_immutable() -> None:
    t = tick()
    with pytest.raises(Exception, match="frozen"):
        t.bid = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bid", float("nan"), "finite"),
        ("ask", float("inf"), "finite"),
        ("bid", -1.0, "greater than 0"),
        ("bid", 0.0, "greater than 0"),
        ("ask", 1.0, "below bid"),
        ("volume", -1.0, "greater than or equal"),
        ("bid_size", -5.0, "greater than or equal"),
        ("ask_size", float("nan"), "finite"),
        ("last_size", -1.0, "greater than or equal"),
        ("last_price", 0.0, "greater than 0"),
        ("aggressor", "both", "buy"),
        ("seq", -1, "greater than or equal"),
        ("timestamp", 1_727_996_400, "seconds"),
        ("timestamp", 1_727_996_400_000_000, "micro- or nanoseconds"),
        ("timestamp", 1_727_996_400_000_000_000, "micro- or nanoseconds"),
        ("timestamp", "yesterday", "Unix milliseconds"),
        ("symbol", "", "empty"),
        ("symbol", "   ", "empty"),
        ("symbol", "X" * (MAX_SYMBOL_LENGTH + 1), "longer than"),
        ("symbol", "EUR\x00USD", "control"),
        ("symbol", "EUR\nUSD", "control"),
        ("symbol", "{EUR}/USD", "braces"),
        ("symbol", 42, "string"),
        ("source", "", "printable"),
        ("source", "feed\ud800", "printable"),
        ("use_case", "backtest\ud800", "not valid Unicode"),
        ("event_type", "\udfffquote", "not valid Unicode"),
        ("use_case", "x" * (MAX_TEXT_LENGTH + 1), "at most 1024 characters"),
        ("event_type", "é" * (MAX_TEXT_LENGTH + 1), "at most 1024 characters"),
        ("unknown_field", 1, "Extra inputs"),
    ],
)
def test_tick_rejections(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        tick(**{field: value})


def test_free_text_takes_any_unicode() -> None:
    assert tick(use_case="démo ✓", event_type="trade").use_case == "démo ✓"
    assert len(tick(use_case="✓" * MAX_TEXT_LENGTH).use_case) == MAX_TEXT_LENGTH


def test_validation_error_is_a_data_manager_error_not_pydantic() -> None:
    import pydantic

    from data_manager import DataManagerError

    with pytest.raises(ValidationError) as info:
        tick(bid=float("nan"))
    assert isinstance(info.value, DataManagerError)
    assert not isinstance(info.value, pydantic.ValidationError)


def test_naive_datetime_refused_aware_accepted() -> None:
    aware = datetime(2024, 10, 3, 23, 0, tzinfo=UTC)
    assert tick(timestamp=aware).timestamp == TS
    with pytest.raises(ValidationError, match="naive"):
        tick(timestamp=datetime(2024, 10, 3, 23, 0))
    plus2 = datetime(2024, 10, 4, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert to_epoch_ms(plus2) == TS


def test_a_range_bound_between_two_milliseconds_is_the_later_one() -> None:
    # [start, end) holds the millisecond timestamps at or after start and before end.
    at = datetime(2024, 10, 3, 23, 0, tzinfo=UTC)
    half = at + timedelta(microseconds=500)
    assert to_epoch_ms(half) == TS  # a timestamp: truncated, as before
    assert epoch_ms_range(at - timedelta(milliseconds=5), half) == (TS - 5, TS + 1)
    assert epoch_ms_range(half, at + timedelta(milliseconds=10)) == (TS + 1, TS + 10)
    assert epoch_ms_range(at, at) == (TS, TS)
    with pytest.raises(ValidationError, match="before start"):
        epoch_ms_range(TS + 2, half)


def test_derived_fields_given_are_ignored() -> None:
    t = tick(mid=999.0, spread=5.0)
    assert t.mid == pytest.approx(1.09552)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("EUR/USD", "EUR/USD"),
        ("EUR_USD", "EUR/USD"),
        ("eur/usd", "EUR/USD"),
        ("EURUSD", "EUR/USD"),
        ("eurusd", "EUR/USD"),
        ("usd-jpy", "USD/JPY"),
        ("  GBP_USD  ", "GBP/USD"),
        ("XAUUSD", "XAU/USD"),
        ("AAPL", "AAPL"),
        ("AAPLUS", "AAPLUS"),  # six letters but not two currency codes: kept
        ("ES.c.0", "ES.c.0"),
        ("  BRK.B ", "BRK.B"),
        ("BTC-PERP", "BTC-PERP"),
    ],
)
def test_symbol_normaliser(raw: str, expected: str) -> None:
    assert normalize_symbol(raw) == expected
    assert tick(symbol=raw).symbol == expected


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"high": 1.0840}, "high .* below low"),
        ({"open": 1.0860}, "open .* outside"),
        ({"close": 1.0840}, "close .* outside"),
        ({"volume": -1}, "greater than or equal"),
        ({"timeframe": "7m"}, "timeframe"),
        ({"open": float("nan")}, "finite"),
        ({"low": 0.0}, "greater than 0"),
        ({"num_trades": -1}, "greater than or equal"),
        ({"start_time": TS + 10, "end_time": TS}, "end_time"),
        ({"timestamp": 1_727_996_400}, "seconds"),
        ({"event_type": "ohlcv\ud800"}, "not valid Unicode"),
        ({"event_type": "x" * (MAX_TEXT_LENGTH + 1)}, "at most 1024 characters"),
        ({"num_trades": 2**63}, "less than or equal"),
    ],
)
def test_candle_rejections(over: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        candle(**over)


def test_candle_seed_example_and_bucket_end() -> None:
    c = candle(timestamp_ms=TS)
    assert c.is_closed is True
    assert c.event_type == "ohlcv"
    assert c.bucket_end == TS + 60_000


def test_order_flow_fields_and_bounds() -> None:
    m = OrderFlowMetrics(
        symbol="eur_usd",
        timestamp=TS,
        window_ms=60_000,
        ofi=-1200.0,
        volume_delta=3.0,
        buy_volume=5.0,
        sell_volume=2.0,
        imbalance=3 / 7,
        vwap=1.0855,
        toxicity=0.4,
        num_trades=7,
    )
    assert m.symbol == "EUR/USD"
    too_big = 2**63  # the columns are BIGINT
    for bad in (
        {"imbalance": 1.5},
        {"toxicity": -0.1},
        {"window_ms": 0},
        {"window_ms": too_big},
        {"num_trades": too_big},
        {"buy_volume": -1},
    ):
        with pytest.raises(ValidationError):
            OrderFlowMetrics(**{"symbol": "EUR/USD", "timestamp": TS, "window_ms": 1000, **bad})


def test_model_validate_and_json_map_errors() -> None:
    with pytest.raises(ValidationError):
        TickData.model_validate({"symbol": "EUR/USD"})
    with pytest.raises(ValidationError):
        TickData.model_validate_json(b'{"symbol": "EUR/USD", "bid": 1}')
    good = tick()
    assert TickData.model_validate_json(good.model_dump_json()) == good
    # Said once, not once by the model's __init__ and again around it.
    with pytest.raises(ValidationError) as caught:
        TickData.model_validate_json(good.model_dump_json().replace('"seq":null', '"seq":-1'))
    assert str(caught.value).count("invalid TickData") == 1


def test_model_validate_does_not_mutate_input() -> None:
    data = {"symbol": "eur_usd", "timestamp_ms": TS, "bid": 1.0, "ask": 1.1, "source": "x"}
    before = dict(data)
    TickData.model_validate(data)
    assert data == before


def test_any_mapping_is_normalised_and_checked_like_a_dict() -> None:
    data = {"symbol": "eurusd", "timestamp": TS, "bid": 1.0, "ask": 1.1, "source": "x"}
    assert TickData.model_validate(MappingProxyType(data)).symbol == "EUR/USD"
    with pytest.raises(ValidationError, match="not valid Unicode"):
        TickData.model_validate(MappingProxyType({**data, "use_case": "\udfff"}))


def test_stamp_received_copies_without_touching_the_original() -> None:
    t = tick()
    stamped = stamp_received(t, TS + 5)
    assert stamped.received_at == TS + 5
    assert t.received_at is None
    assert stamped.mid == t.mid
    assert stamped.model_dump(exclude={"received_at"}) == t.model_dump(exclude={"received_at"})


def flow(**over: Any) -> OrderFlowMetrics:
    return OrderFlowMetrics(**{"symbol": "EUR/USD", "timestamp": TS, "window_ms": 60_000, **over})


@pytest.mark.parametrize(
    ("build", "update", "message"),
    [
        (tick, {"bid": -5.0, "ask": -1.0}, "greater than 0"),
        (tick, {"ask": float("inf")}, "finite"),
        (tick, {"ask": 1.0}, "below bid"),
        (tick, {"timestamp": 5}, "seconds"),
        (tick, {"timestamp": 1_727_996_400}, "seconds"),  # time.time(), not ms
        (tick, {"symbol": ""}, "empty"),
        (tick, {"exchange": 2**63}, "less than or equal"),
        (tick, {"use_case": object()}, "string"),
        (tick, {"source": "s" * 65}, "printable"),
        (tick, {"event_type": "quote\x00"}, "NUL"),
        (tick, {"timestamp_ms": TS + 1, "timestamp": TS}, "disagree"),
        (tick, {"no_such_field": 1}, "Extra inputs"),
        (candle, {"high": 1.0}, "below low"),
        (candle, {"timeframe": "2m"}, "timeframe"),
        (candle, {"close": -1.0}, "greater than 0"),
        (candle, {"event_type": "\x00"}, "NUL"),
        (flow, {"window_ms": 0}, "greater than 0"),
        (flow, {"imbalance": 1.5}, "less than or equal"),
        (flow, {"symbol": "A B"}, "spaces"),
    ],
)
def test_model_copy_with_update_validates(build: Any, update: dict[str, Any], message: str) -> None:
    original = build()
    with pytest.raises(ValidationError, match=message):
        original.model_copy(update=update)


def test_model_copy_with_update_normalises_like_the_constructor() -> None:
    t = tick(seq=1)
    moved = t.model_copy(update={"timestamp": datetime(2024, 10, 4, tzinfo=UTC), "bid": 1.0955})
    assert moved.timestamp == 1_728_000_000_000
    assert moved == tick(seq=1, timestamp=1_728_000_000_000, bid=1.0955)
    assert moved.__pydantic_fields_set__ == t.__pydantic_fields_set__ | {"timestamp", "bid"}
    assert t.model_copy(update={"timestamp_ms": TS + 1}).timestamp == TS + 1
    assert t.model_copy(update={"symbol": "gbp_usd", "mid": 99.0}).symbol == "GBP/USD"
    closed = candle(is_closed=False).model_copy(update={"is_closed": True})
    assert closed == candle(is_closed=True)
    assert flow().model_copy(update={"ofi": 3.0}).ofi == 3.0
    # Without update: a plain copy (no validation needed, nothing changes).
    for model in (t, candle(), flow()):
        copied = model.model_copy()
        assert copied == model
        assert copied is not model
        assert model.model_copy(update={}) == model


def test_unchecked_constructors_stay_unchecked() -> None:
    # model_construct is pydantic's documented unchecked constructor, and the SDK's own
    # fast paths build values it validated before: none of them validates again.
    t = tick()
    assert TickData.model_construct(**{**t.__dict__, "bid": -1.0}).bid == -1.0
    assert stamp_received(t, TS + 1).received_at == TS + 1


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (tick, "event_type"),
        (tick, "use_case"),
        (tick, "source"),
        (tick, "symbol"),
        (candle, "event_type"),
        (candle, "source"),
        (flow, "source"),
        (flow, "symbol"),
    ],
)
@pytest.mark.parametrize("text", ["\x00", "quote\x00", "\x00\u00e9", "a\x00b"])
def test_nul_is_refused_in_every_text_field(build: Any, field: str, text: str) -> None:
    # PostgreSQL refuses NUL in text columns: a buffered save would return and the row be
    # dead-lettered later.
    with pytest.raises(ValidationError):
        build(**{field: text})
    with pytest.raises(ValidationError):
        build().model_copy(update={field: text})
    cls = type(build())
    with pytest.raises(ValidationError):
        cls.model_validate({**build().model_dump(exclude={"mid", "spread"}), field: text})
