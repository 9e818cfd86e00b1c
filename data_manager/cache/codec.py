"""Wire format of the L2 cache and the cache bus: versioned JSON any language can read.

Every value stored in L2 and every item carried on the bus is one UTF-8 JSON object
(encoded with orjson, no whitespace). The first two members are always the schema version
``"v"`` and a type tag ``"type"``; the others are the model's fields under the model's own
names. Timestamps are integer Unix milliseconds; prices and sizes are JSON numbers;
optional fields are present with ``null`` when unset. A reader must ignore members it does
not know (a later ``v: 1`` writer may add some), and must refuse any other ``"v"``.

Version 1::

    tick        {"v":1, "type":"tick",
                 "symbol":str, "timestamp":int, "bid":num, "ask":num, "source":str,
                 "volume":num|null, "exchange":int|null, "event_type":str, "use_case":str,
                 "bid_size":num|null, "ask_size":num|null, "last_price":num|null,
                 "last_size":num|null, "aggressor":"buy"|"sell"|null, "seq":int|null,
                 "received_at":int|null,
                 "mid":num, "spread":num}              <- derived; ignored when decoding

    candle      {"v":1, "type":"candle",
                 "symbol":str, "timeframe":"1m"|"5m"|"15m"|"30m"|"1h"|"4h"|"1d"|"1w",
                 "timestamp":int (bucket start), "open":num, "high":num, "low":num,
                 "close":num, "source":str, "volume":num|null, "vwap":num|null,
                 "range_pips":num|null, "num_trades":int|null, "start_time":int|null,
                 "end_time":int|null, "event_type":str, "is_closed":bool}

    order_flow  {"v":1, "type":"order_flow",
                 "symbol":str, "timestamp":int, "window_ms":int, "ofi":num,
                 "volume_delta":num, "buy_volume":num, "sell_volume":num, "imbalance":num,
                 "vwap":num|null, "toxicity":num|null, "num_trades":int, "source":str}

    bus         {"v":1, "type":"bus", "origin":str, "items":[tick|candle|order_flow, ...]}

Required members (the rest default as in :mod:`data_manager.models` when absent): tick —
symbol, timestamp, bid, ask, source; candle — symbol, timeframe, timestamp, open, high, low,
close, source; order_flow — symbol, timestamp, window_ms. Symbols are in canonical form
(``"EUR/USD"``, see :func:`data_manager.models.normalize_symbol`).

A writer in another language that stores values in L2 must go through the same Lua script
(:mod:`data_manager.cache.redis`), which reads ``"timestamp"``, ``"seq"`` and ``"is_closed"``
out of stored values with string patterns, so those three must be written as plain JSON
(``"timestamp":1727996400000``).

Decoding trusts the payload's field types, as it comes from an SDK process through a
server only SDK processes write to: it checks the version, the type tag, that the required
members are there and that ``timestamp`` is an integer, then builds the model without
re-running validation (about 1 µs instead of 10). ``validate=True`` runs full validation
for payloads of unknown origin. Anything malformed raises :class:`CacheError`, never a
decoder exception.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

import orjson

from data_manager.errors import CacheError, ValidationError
from data_manager.models import CandleData, OrderFlowMetrics, TickData, construct_unchecked

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = [
    "SCHEMA_VERSION",
    "BusMessage",
    "CacheItem",
    "bus_prefix",
    "decode_bus_message",
    "decode_candle",
    "decode_item",
    "decode_order_flow",
    "decode_tick",
    "encode_bus_message",
    "encode_candle",
    "encode_item",
    "encode_order_flow",
    "encode_tick",
]

#: Version written into every object (``"v"``). Bump it, and the key namespace ``:v1:``,
#: on any change an older reader could misread.
SCHEMA_VERSION: Final = 1

CacheItem: TypeAlias = TickData | CandleData | OrderFlowMetrics

_M = TypeVar("_M", TickData, CandleData, OrderFlowMetrics)

_TICK: Final = "tick"
_CANDLE: Final = "candle"
_ORDER_FLOW: Final = "order_flow"
_BUS: Final = "bus"


def _can_fast_construct(cls: type[Any]) -> bool:
    """True when building the model from its ``__dict__`` is what ``model_construct`` does.

    That holds for a plain (non-root) model without ``model_post_init``; the check runs once
    at import so a future model change falls back to ``model_construct`` instead of
    producing a half-built object.
    """
    return cls.__pydantic_post_init__ is None and not cls.__pydantic_root_model__


class _Kind:
    """What the decoder needs to know about one model class."""

    __slots__ = ("cls", "fast", "fields", "required", "tag")

    def __init__(self, cls: type[Any], tag: str) -> None:
        self.cls = cls
        self.tag = tag
        self.fields: frozenset[str] = frozenset(cls.model_fields)
        self.required: frozenset[str] = frozenset(
            name for name, info in cls.model_fields.items() if info.is_required()
        )
        self.fast = _can_fast_construct(cls)


_KINDS: Final[Mapping[str, _Kind]] = {
    _TICK: _Kind(TickData, _TICK),
    _CANDLE: _Kind(CandleData, _CANDLE),
    _ORDER_FLOW: _Kind(OrderFlowMetrics, _ORDER_FLOW),
}
_TICK_KIND: Final = _KINDS[_TICK]
_TICK_HEAD: Final = b'{"v":1,"type":"tick",'
_dumps: Final = orjson.dumps
_CANDLE_KIND: Final = _KINDS[_CANDLE]
_ORDER_FLOW_KIND: Final = _KINDS[_ORDER_FLOW]


# --------------------------------------------------------------------------- encoding


def encode_tick(tick: TickData) -> bytes:
    """Encode a tick as a version-1 ``tick`` object (with derived ``mid``/``spread``).

    The bytes of ``orjson.dumps({"v": 1, "type": "tick", **fields, "mid": …, "spread": …})``,
    spliced from the field dict's JSON instead of built from a merged dict, with ``mid`` and
    ``spread`` computed as :class:`TickData` does (its properties cost 0.17 µs each): 0.9
    instead of 1.5 µs, and the bus encodes every tick it sends. A unit test checks the bytes
    against the merged dict's.
    """
    fields = tick.__dict__
    bid, ask = fields["bid"], fields["ask"]
    dumps = _dumps
    return b"".join(
        (
            _TICK_HEAD,
            dumps(fields)[1:-1],
            b',"mid":',
            dumps((bid + ask) / 2),
            b',"spread":',
            dumps(ask - bid),
            b"}",
        )
    )


def encode_candle(candle: CandleData) -> bytes:
    """Encode a candle as a version-1 ``candle`` object."""
    return orjson.dumps({"v": 1, "type": _CANDLE, **candle.__dict__})


def encode_order_flow(metrics: OrderFlowMetrics) -> bytes:
    """Encode order-flow metrics as a version-1 ``order_flow`` object."""
    return orjson.dumps({"v": 1, "type": _ORDER_FLOW, **metrics.__dict__})


def encode_item(item: CacheItem) -> bytes:
    """Encode any of the three models.

    Raises:
        CacheError: ``item`` is not a TickData, CandleData or OrderFlowMetrics.
    """
    cls = type(item)
    if cls is TickData:
        return encode_tick(item)  # type: ignore[arg-type]
    if cls is CandleData:
        return encode_candle(item)  # type: ignore[arg-type]
    if cls is OrderFlowMetrics:
        return encode_order_flow(item)  # type: ignore[arg-type]
    msg = f"cannot encode {cls.__name__} for the cache"
    raise CacheError(msg)


def bus_prefix(origin: str) -> bytes:
    """The bytes every bus message from ``origin`` starts with.

    A subscriber compares a message's head with its own prefix to skip its own messages
    without parsing them.
    """
    return b'{"v":1,"type":"bus","origin":' + orjson.dumps(origin) + b',"items":['


def encode_bus_message(prefix: bytes, items: Iterable[bytes]) -> bytes:
    """Build a ``bus`` object from ``bus_prefix(origin)`` and already-encoded items.

    The items are spliced in as they are (they are the same bytes written to L2), so a
    batch is encoded once.
    """
    return prefix + b",".join(items) + b"]}"


# --------------------------------------------------------------------------- decoding


def _loads(data: bytes | bytearray | memoryview | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        msg = f"cache payload is not valid JSON: {exc}"
        raise CacheError(msg) from exc


def _build(obj: Any, kind: _Kind, validate: bool) -> Any:
    """Turn a decoded JSON object into ``kind.cls``; ``obj`` is consumed."""
    if type(obj) is not dict:
        msg = f"cache payload must be a JSON object, got {type(obj).__name__}"
        raise CacheError(msg)
    version = obj.pop("v", None)
    tag = obj.pop("type", None)
    if version != SCHEMA_VERSION or tag != kind.tag:
        msg = f"expected a v{SCHEMA_VERSION} {kind.tag!r} object, got v={version!r} type={tag!r}"
        raise CacheError(msg)
    if validate:
        known = {name: value for name, value in obj.items() if name in kind.fields}
        try:
            return kind.cls.model_validate(known)
        except ValidationError as exc:
            msg = f"cache payload is not a valid {kind.tag}: {exc}"
            raise CacheError(msg) from exc
    if kind is _TICK_KIND:
        # Derived values travel for other readers only.
        obj.pop("mid", None)
        obj.pop("spread", None)
    if type(obj.get("timestamp")) is not int:
        msg = f"{kind.tag} payload has no integer 'timestamp'"
        raise CacheError(msg)
    if kind.fast and obj.keys() == kind.fields:
        return construct_unchecked(kind.cls, obj, set(kind.fields))
    missing = kind.required - obj.keys()
    if missing:
        msg = f"{kind.tag} payload lacks {', '.join(sorted(missing))}"
        raise CacheError(msg)
    # Absent optional members take their defaults; unknown members are ignored.
    return kind.cls.model_construct(**obj)


def decode_tick(data: bytes | bytearray | memoryview | str, *, validate: bool = False) -> TickData:
    """Decode a ``tick`` object.

    Args:
        data: The JSON payload.
        validate: Run the model's full validation (for payloads of unknown origin).

    Raises:
        CacheError: The payload is not a valid version-1 tick.
    """
    result: TickData = _build(_loads(data), _TICK_KIND, validate)
    return result


def decode_candle(
    data: bytes | bytearray | memoryview | str, *, validate: bool = False
) -> CandleData:
    """Decode a ``candle`` object. See :func:`decode_tick` for the arguments.

    Raises:
        CacheError: The payload is not a valid version-1 candle.
    """
    result: CandleData = _build(_loads(data), _CANDLE_KIND, validate)
    return result


def decode_order_flow(
    data: bytes | bytearray | memoryview | str, *, validate: bool = False
) -> OrderFlowMetrics:
    """Decode an ``order_flow`` object. See :func:`decode_tick` for the arguments.

    Raises:
        CacheError: The payload is not a valid version-1 order-flow object.
    """
    result: OrderFlowMetrics = _build(_loads(data), _ORDER_FLOW_KIND, validate)
    return result


def _decode_obj(obj: Any, validate: bool) -> CacheItem:
    tag = obj.get("type") if type(obj) is dict else None
    kind = _KINDS.get(tag) if type(tag) is str else None
    if kind is None:
        msg = f"unknown cache item type {tag!r}"
        raise CacheError(msg)
    result: CacheItem = _build(obj, kind, validate)
    return result


def decode_item(data: bytes | bytearray | memoryview | str, *, validate: bool = False) -> CacheItem:
    """Decode a tick, candle or order-flow object, whichever its ``"type"`` says.

    Raises:
        CacheError: Malformed payload or unknown type.
    """
    return _decode_obj(_loads(data), validate)


class BusMessage:
    """A decoded ``bus`` object: who sent it and the items it carries."""

    __slots__ = ("items", "origin")

    def __init__(self, origin: str, items: list[CacheItem]) -> None:
        self.origin = origin
        self.items = items

    def __repr__(self) -> str:
        return f"BusMessage(origin={self.origin!r}, items={len(self.items)})"


def decode_bus_message(
    data: bytes | bytearray | memoryview | str, *, validate: bool = False
) -> BusMessage:
    """Decode a ``bus`` object and every item in it.

    Raises:
        CacheError: The message or any of its items is malformed (the whole message is
            refused: a partial batch would be harder to reason about than a missing one).
    """
    obj = _loads(data)
    if type(obj) is not dict or obj.get("v") != SCHEMA_VERSION or obj.get("type") != _BUS:
        head = obj.get("type") if type(obj) is dict else type(obj).__name__
        msg = f"expected a v{SCHEMA_VERSION} 'bus' object, got {head!r}"
        raise CacheError(msg)
    origin = obj.get("origin")
    raw_items = obj.get("items")
    if type(origin) is not str or type(raw_items) is not list:
        msg = "bus message needs a string 'origin' and a list 'items'"
        raise CacheError(msg)
    decode: Callable[[Any, bool], CacheItem] = _decode_obj
    return BusMessage(origin, [decode(item, validate) for item in raw_items])
