"""The cache wire format: round trips, what another language sees, and malformed input."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from data_manager.cache.codec import (
    SCHEMA_VERSION,
    bus_prefix,
    decode_bus_message,
    decode_candle,
    decode_item,
    decode_order_flow,
    decode_tick,
    encode_bus_message,
    encode_candle,
    encode_item,
    encode_order_flow,
    encode_tick,
)
from data_manager.errors import CacheError
from data_manager.models import (
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    TIMEFRAMES,
    CandleData,
    OrderFlowMetrics,
    TickData,
)

TS = 1_727_996_400_000

# ----------------------------------------------------------------------------- strategies

timestamps = st.integers(min_value=MIN_TIMESTAMP_MS, max_value=MAX_TIMESTAMP_MS)
prices = st.floats(min_value=1e-6, max_value=1e7, allow_nan=False, allow_infinity=False)
sizes = st.none() | st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
texts = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S")), min_size=1, max_size=20
).filter(lambda s: s.strip() == s and "{" not in s and "}" not in s)
symbols = st.sampled_from(["EUR/USD", "GBP/JPY", "AAPL", "BTC-PERP", "ES:H5"]) | texts


@st.composite
def ticks(draw: st.DrawFn) -> TickData:
    bid = draw(prices)
    ask = bid + draw(st.floats(min_value=0, max_value=10, allow_nan=False))
    return TickData(
        symbol=draw(symbols),
        timestamp=draw(timestamps),
        bid=bid,
        ask=ask,
        source=draw(texts),
        volume=draw(sizes),
        exchange=draw(st.none() | st.integers(-(2**31), 2**31)),
        event_type=draw(st.sampled_from(["quote", "trade"])),
        use_case=draw(st.sampled_from(["", "scalping", 'with "quotes" \\ and \u00e9'])),
        bid_size=draw(sizes),
        ask_size=draw(sizes),
        last_price=draw(st.none() | prices),
        last_size=draw(sizes),
        aggressor=draw(st.sampled_from([None, "buy", "sell"])),
        seq=draw(st.none() | st.integers(0, 2**63 - 1)),
        received_at=draw(st.none() | timestamps),
    )


@st.composite
def candles(draw: st.DrawFn) -> CandleData:
    low = draw(prices)
    high = low + draw(st.floats(min_value=0, max_value=100, allow_nan=False))
    inside = st.floats(min_value=low, max_value=high, allow_nan=False)
    start = draw(st.none() | timestamps)
    return CandleData(
        symbol=draw(symbols),
        timeframe=draw(st.sampled_from(sorted(TIMEFRAMES))),
        timestamp=draw(timestamps),
        open=draw(inside),
        high=high,
        low=low,
        close=draw(inside),
        source=draw(texts),
        volume=draw(sizes),
        vwap=draw(st.none() | prices),
        num_trades=draw(st.none() | st.integers(0, 10**9)),
        start_time=start,
        end_time=None if start is None else draw(st.integers(start, MAX_TIMESTAMP_MS)),
        is_closed=draw(st.booleans()),
    )


@st.composite
def order_flows(draw: st.DrawFn) -> OrderFlowMetrics:
    finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
    return OrderFlowMetrics(
        symbol=draw(symbols),
        timestamp=draw(timestamps),
        window_ms=draw(st.integers(1, 86_400_000)),
        ofi=draw(finite),
        volume_delta=draw(finite),
        buy_volume=draw(st.floats(min_value=0, max_value=1e9, allow_nan=False)),
        sell_volume=draw(st.floats(min_value=0, max_value=1e9, allow_nan=False)),
        imbalance=draw(st.floats(min_value=-1, max_value=1, allow_nan=False)),
        vwap=draw(st.none() | prices),
        toxicity=draw(st.none() | st.floats(min_value=0, max_value=1, allow_nan=False)),
        num_trades=draw(st.integers(0, 10**9)),
        source=draw(texts),
    )


# ----------------------------------------------------------------------------- round trips


@given(ticks())
def test_tick_round_trip(tick: TickData) -> None:
    data = encode_tick(tick)
    decoded = decode_tick(data)
    assert decoded == tick
    assert decoded.model_dump() == tick.model_dump()
    assert decoded.mid == tick.mid
    # The same bytes also pass full validation: the fast path builds nothing invalid.
    assert decode_tick(data, validate=True) == tick


@given(ticks())
def test_encoded_tick_is_the_json_of_one_merged_dict(tick: TickData) -> None:
    merged = {"v": 1, "type": "tick", **tick.__dict__, "mid": tick.mid, "spread": tick.spread}
    assert encode_tick(tick) == orjson.dumps(merged)


@given(candles())
def test_candle_round_trip(candle: CandleData) -> None:
    data = encode_candle(candle)
    assert decode_candle(data) == candle
    assert decode_candle(data, validate=True) == candle
    assert decode_item(data) == candle


@given(order_flows())
def test_order_flow_round_trip(metrics: OrderFlowMetrics) -> None:
    data = encode_order_flow(metrics)
    assert decode_order_flow(data) == metrics
    assert decode_order_flow(data, validate=True) == metrics


@given(
    st.lists(ticks() | candles() | order_flows(), max_size=5),
    texts,
    st.lists(st.tuples(symbols, st.sampled_from(sorted(TIMEFRAMES)), texts), max_size=2),
)
def test_bus_message_round_trip(
    items: list[Any], origin: str, gaps: list[tuple[str, str, str]]
) -> None:
    prefix = bus_prefix(origin)
    message = encode_bus_message(prefix, [encode_item(i) for i in items], gaps)
    assert message.startswith(prefix)
    decoded = decode_bus_message(message)
    assert decoded.origin == origin
    assert decoded.items == items
    assert decoded.gaps == gaps
    assert json.loads(message).get("gaps", []) == [list(g) for g in gaps]
    # Plain JSON, as another language reads it.
    plain = json.loads(message)
    assert plain["v"] == SCHEMA_VERSION
    assert plain["type"] == "bus"
    tags: dict[type[Any], str] = {
        TickData: "tick",
        CandleData: "candle",
        OrderFlowMetrics: "order_flow",
    }
    assert [item["type"] for item in plain["items"]] == [tags[type(i)] for i in items]


def test_decoded_model_is_fully_built() -> None:
    tick = TickData(symbol="EUR/USD", timestamp=TS, bid=1.0845, ask=1.0846, source="ig", seq=7)
    decoded = decode_tick(encode_tick(tick))
    assert type(decoded) is TickData
    assert decoded.model_fields_set == set(TickData.model_fields)
    assert decoded.timestamp_ms == TS
    assert decoded.model_copy(update={"bid": 1.0}).bid == 1.0
    assert hash(decoded) == hash(tick)


# ----------------------------------------------------------------------------- other languages


def test_encoded_tick_is_plain_json_with_model_field_names() -> None:
    tick = TickData(symbol="EUR/USD", timestamp=TS, bid=1.0845, ask=1.0846, source="ig")
    obj = json.loads(encode_tick(tick))
    assert list(obj)[:2] == ["v", "type"]
    assert obj["v"] == 1
    assert obj["type"] == "tick"
    assert obj["timestamp"] == TS
    assert isinstance(obj["timestamp"], int)
    assert obj["bid"] == 1.0845
    assert obj["source"] == "ig"
    assert obj["seq"] is None
    assert math.isclose(obj["mid"], 1.08455)
    assert math.isclose(obj["spread"], 0.0001)
    assert set(obj) - {"v", "type", "mid", "spread"} == set(TickData.model_fields)


def test_hand_written_payloads_decode() -> None:
    # What a writer in another language might produce: spaces, other member order, only the
    # required members, an unknown member, and a wrong derived value (ignored).
    tick = decode_tick(
        '{ "type": "tick", "v": 1, "source": "go-feed", "ask": 1.2, "bid": 1.1,'
        '  "timestamp": 1727996400000, "symbol": "EUR/USD", "mid": 99, "extra": [1, 2] }'
    )
    assert tick.symbol == "EUR/USD"
    assert tick.timestamp == TS
    assert tick.event_type == "quote"
    assert tick.seq is None
    assert math.isclose(tick.mid, 1.15)
    candle = decode_candle(
        json.dumps(
            {
                "v": 1,
                "type": "candle",
                "symbol": "EUR/USD",
                "timeframe": "1m",
                "timestamp": TS,
                "open": 1.0,
                "high": 1.2,
                "low": 0.9,
                "close": 1.1,
                "source": "rust-agg",
                "is_closed": False,
            }
        )
    )
    assert candle.is_closed is False
    assert candle.volume is None
    flow = decode_order_flow(
        '{"v":1,"type":"order_flow","symbol":"X","timestamp":' + str(TS) + ',"window_ms":5}'
    )
    assert flow.window_ms == 5
    assert flow.source == "sdk"


# ----------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"tick"',
        b'{"v": 2, "type": "tick", "symbol": "X", "timestamp": 1727996400000, "bid": 1,'
        b' "ask": 1, "source": "s"}',
        b'{"type": "tick", "symbol": "X", "timestamp": 1727996400000, "bid": 1, "ask": 1,'
        b' "source": "s"}',
        b'{"v": 1, "type": "candle", "symbol": "X", "timestamp": 1727996400000, "bid": 1,'
        b' "ask": 1, "source": "s"}',
        b'{"v": 1, "type": "tick", "symbol": "X", "timestamp": 1727996400000, "bid": 1}',
        b'{"v": 1, "type": "tick", "symbol": "X", "timestamp": "2024-10-03", "bid": 1,'
        b' "ask": 1, "source": "s"}',
        b'{"v": 1, "type": "tick", "symbol": "X", "timestamp": 1727996400000.5, "bid": 1,'
        b' "ask": 1, "source": "s"}',
    ],
)
def test_malformed_tick_raises_cache_error(payload: bytes) -> None:
    with pytest.raises(CacheError):
        decode_tick(payload)


def test_validate_refuses_what_the_fast_path_trusts() -> None:
    crossed = (
        b'{"v":1,"type":"tick","symbol":"X","timestamp":1727996400000,"bid":2,"ask":1,"source":"s"}'
    )
    assert decode_tick(crossed).bid == 2  # trusted: built as is
    with pytest.raises(CacheError, match="ask"):
        decode_tick(crossed, validate=True)


_TICK_BODY = '"type":"tick","symbol":"X","timestamp":1727996400000,"bid":1,"ask":1,"source":"s"'


@pytest.mark.parametrize("version", ["true", "1.0", '"1"', "2", "null"])
@pytest.mark.parametrize("validate", [False, True])
def test_only_the_integer_1_is_version_1(version: str, validate: bool) -> None:
    # True == 1 == 1.0 in Python, but a payload must say "v": 1 to be version 1.
    item = f'{{"v":{version},{_TICK_BODY}}}'
    with pytest.raises(CacheError, match="expected a v1"):
        decode_tick(item.encode(), validate=validate)
    with pytest.raises(CacheError, match="expected a v1"):
        decode_item(item.encode(), validate=validate)
    bus = f'{{"v":{version},"type":"bus","origin":"o","items":[]}}'
    with pytest.raises(CacheError, match="expected a v1"):
        decode_bus_message(bus.encode(), validate=validate)
    inner = f'{{"v":1,"type":"bus","origin":"o","items":[{item}]}}'
    with pytest.raises(CacheError, match="expected a v1"):
        decode_bus_message(inner.encode(), validate=validate)
    assert decode_tick(f'{{"v":1,{_TICK_BODY}}}'.encode(), validate=validate).bid == 1


@pytest.mark.parametrize(
    "message",
    [
        b'{"v":1,"type":"tick","items":[]}',
        b'{"v":1,"type":"bus","items":[]}',
        b'{"v":1,"type":"bus","origin":"a","items":{}}',
        b'{"v":1,"type":"bus","origin":"a","items":[{"v":1,"type":"quote"}]}',
        b'{"v":1,"type":"bus","origin":"a","items":[{"v":1,"type":"tick","symbol":"X"}]}',
        b'{"v":1,"type":"bus","origin":"a","items":[7]}',
        b'{"v":1,"type":"bus","origin":"a","items":[],"gaps":[["X","1m"]]}',
        b'{"v":1,"type":"bus","origin":"a","items":[],"gaps":{}}',
        b"\xff\xfe",
    ],
)
def test_malformed_bus_message_raises_cache_error(message: bytes) -> None:
    with pytest.raises(CacheError):
        decode_bus_message(message)


def test_encode_item_refuses_other_types() -> None:
    with pytest.raises(CacheError):
        encode_item({"symbol": "X"})  # type: ignore[arg-type]


def test_bus_prefix_escapes_the_origin() -> None:
    origin = 'a"b\\c'
    message = encode_bus_message(bus_prefix(origin), [])
    assert orjson.loads(message) == {"v": 1, "type": "bus", "origin": origin, "items": []}
    assert decode_bus_message(message).items == []
