"""The L2 write script under both Lua versions it must run on, without a server.

Redis and Valkey run scripts on Lua 5.1, DragonflyDB on Lua 5.4, and DragonflyDB cannot be
installed where the suite runs. Here the script runs on real Lua 5.1 and 5.4 interpreters
(lupa) against a small in-memory stand-in for the commands it calls, fed with the exact
arguments :class:`RedisCache` sends, so a construct one version lacks fails on both CI and a
developer machine. What the commands themselves do on a server is covered by the integration
tests against Redis.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_manager.cache.bus import _replaces
from data_manager.cache.codec import encode_order_flow, encode_tick, tie_rank
from data_manager.cache.memory import MemoryCache
from data_manager.cache.redis import WRITE_SCRIPT, RedisCache, WriteOp, _script_calls
from data_manager.models import CandleData, OrderFlowMetrics, TickData

TS = 1_767_225_600_000
MINUTE = 60_000


class FakeServer:
    """Strings and sorted sets, with the commands WRITE_SCRIPT calls (TTLs recorded)."""

    def __init__(self) -> None:
        self.strings: dict[str, str] = {}
        self.zsets: dict[str, dict[str, float]] = {}
        self.ttl: dict[str, int] = {}

    def call(self, name: str, *args: Any) -> Any:
        return getattr(self, "_" + name.lower())(*(str(a) for a in args))

    def _get(self, key: str) -> str | None:
        return self.strings.get(key)

    def _set(self, key: str, value: str, px: str, ms: str) -> str:
        assert px == "PX"
        self.strings[key] = value
        self.ttl[key] = int(ms)
        return "OK"

    def _del(self, *keys: str) -> int:
        return sum(
            (self.strings.pop(k, None) is not None) + (self.zsets.pop(k, None) is not None)
            for k in keys
        )

    def _pexpire(self, key: str, ms: str) -> int:
        if key in self.strings or key in self.zsets:
            self.ttl[key] = int(ms)
            return 1
        return 0

    def _sorted(self, key: str) -> list[tuple[float, str]]:
        return sorted((score, member) for member, score in self.zsets.get(key, {}).items())

    def _zadd(self, key: str, score: str, member: str) -> int:
        self.zsets.setdefault(key, {})[member] = float(score)
        return 1

    def _zcard(self, key: str) -> int:
        return len(self.zsets.get(key, {}))

    def _zrange(self, key: str, start: str, stop: str, *opts: str) -> list[str]:
        items = self._sorted(key)[int(start) : int(stop) + 1 or None]
        if opts == ("WITHSCORES",):
            return [x for score, member in items for x in (member, repr(int(score)))]
        return [member for _, member in items]

    def _zrangebyscore(self, key: str, low: str, high: str) -> list[str]:
        return [m for s, m in self._sorted(key) if float(low) <= s <= float(high)]

    def _zremrangebyscore(self, key: str, low: str, high: str) -> int:
        doomed = self._zrangebyscore(key, low, high)
        for member in doomed:
            del self.zsets[key][member]
        return len(doomed)

    def _zremrangebyrank(self, key: str, start: str, stop: str) -> int:
        doomed = [member for _, member in self._sorted(key)[int(start) : int(stop) + 1]]
        for member in doomed:
            del self.zsets[key][member]
        return len(doomed)


class Script:
    """WRITE_SCRIPT compiled once on one Lua version, run like EVALSHA does."""

    def __init__(self, version: str, server: FakeServer) -> None:
        runtime = importlib.import_module(f"lupa.{version}").LuaRuntime
        self.lua = runtime(unpack_returned_tuples=True)
        self.server = server
        self.version = str(self.lua.eval("_VERSION"))
        self.body = self.lua.eval(f"function() {WRITE_SCRIPT} end")
        self.lua.globals().redis = self.lua.table_from({"call": self._call})

    def _call(self, name: str, *args: Any) -> Any:
        result = self.server.call(name, *args)
        if isinstance(result, list):
            return self.lua.table_from(result)
        return result

    def run(self, call: Sequence[str | bytes | int]) -> Any:
        numkeys = int(call[0])
        text = [a.decode() if isinstance(a, bytes) else str(a) for a in call[1:]]
        g = self.lua.globals()
        g.KEYS = self.lua.table_from(text[:numkeys])
        g.ARGV = self.lua.table_from(text[numkeys:])
        return self.body()

    def apply(self, ops: Sequence[WriteOp]) -> list[Any]:
        return [self.run(call) for call in _script_calls(ops)]


@pytest.fixture(params=["lua51", "lua54"])
def lua_version(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    pytest.importorskip(f"lupa.{name}")
    return name


@pytest.fixture
def cache() -> RedisCache:
    # Never connected: only builds keys and script arguments.
    return RedisCache(
        url="redis://127.0.0.1:1/0",
        key_prefix="t",
        tick_ttl=30,
        candle_ttl=60,
        order_flow_ttl=45,
        ring_size=3,
    )


def tick(ts: int = TS, *, symbol: str = "EUR/USD", source: str = "ig", **kw: Any) -> TickData:
    bid = float(kw.pop("bid", 1.0845))
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.0001, source=source, **kw)


def candle(i: int, *, closed: bool = True) -> CandleData:
    return CandleData(
        symbol="EUR/USD",
        timeframe="1m",
        timestamp=TS + i * MINUTE,
        open=1.0,
        high=1.2,
        low=0.9,
        close=1.1,
        source="ig",
        is_closed=closed,
    )


def stored_bid(server: FakeServer, key: str) -> float:
    from data_manager.cache.codec import decode_tick

    return decode_tick(server.strings[key].encode()).bid


def test_runs_on_the_interpreter_it_names(lua_version: str) -> None:
    script = Script(lua_version, FakeServer())
    assert script.version == {"lua51": "Lua 5.1", "lua54": "Lua 5.4"}[lua_version]


def test_one_batch_of_latest_values_settles_like_single_calls(
    lua_version: str, cache: RedisCache
) -> None:
    server = FakeServer()
    script = Script(lua_version, server)
    newer, older = tick(TS + 5, bid=1.2), tick(TS, bid=1.1)
    other = tick(symbol="GBP/USD", bid=1.3)
    flow = OrderFlowMetrics(symbol="EUR/USD", timestamp=TS, window_ms=1000, ofi=2.0, source="db")
    ops = [cache.write_op(x) for x in (newer, older, other, flow)]
    assert len(_script_calls(ops)) == 1  # one 'M' call for all four
    assert script.apply(ops) == [3]  # the older tick stored nothing
    assert stored_bid(server, cache.tick_key("EUR/USD")) == 1.2
    assert stored_bid(server, cache.tick_key("EUR/USD", "ig")) == 1.2
    assert stored_bid(server, cache.tick_key("GBP/USD")) == 1.3
    assert server.ttl[cache.tick_key("GBP/USD")] == 30_000
    assert server.ttl[cache.order_flow_key("EUR/USD", "db")] == 45_000  # its own TTL


def test_single_latest_value_and_the_seq_tie_rule(lua_version: str, cache: RedisCache) -> None:
    server = FakeServer()
    script = Script(lua_version, server)
    assert script.apply([cache.write_op(tick(seq=9, bid=1.3))]) == [3]
    # Same millisecond, same source, lower seq: refused on both keys.
    assert script.apply([cache.write_op(tick(seq=4, bid=1.1))]) == [0]
    # Same millisecond, same source, unsequenced: ranks below any seq, refused.
    assert script.apply([cache.write_op(tick(bid=1.5))]) == [0]
    # Same seq: the content decides (a higher bid ranks higher); a replay is stored again.
    assert script.apply([cache.write_op(tick(seq=9, bid=1.4))]) == [3]
    assert script.apply([cache.write_op(tick(seq=9, bid=1.4))]) == [3]
    assert stored_bid(server, cache.tick_key("EUR/USD", "ig")) == 1.4


def test_equal_timestamps_across_sources_settle_on_the_higher_source(
    lua_version: str, cache: RedisCache
) -> None:
    server = FakeServer()
    script = Script(lua_version, server)
    any_key = cache.tick_key("EUR/USD")
    # A(seq 2), B, then A's late seq 1, in the same millisecond, in either source order.
    assert script.apply([cache.write_op(tick(source="srcA", seq=2, bid=1.2))]) == [3]
    assert script.apply([cache.write_op(tick(source="srcB", bid=1.3))]) == [3]
    assert script.apply([cache.write_op(tick(source="srcA", seq=1, bid=1.1))]) == [0]
    assert stored_bid(server, any_key) == 1.3
    server = FakeServer()
    script = Script(lua_version, server)
    assert script.apply([cache.write_op(tick(source="srcB", bid=1.3))]) == [3]
    assert script.apply([cache.write_op(tick(source="srcA", seq=2, bid=1.2))]) == [1]
    assert stored_bid(server, any_key) == 1.3


def test_a_per_source_write_never_touches_the_any_source_key(
    lua_version: str, cache: RedisCache
) -> None:
    server = FakeServer()
    script = Script(lua_version, server)
    any_key, lagging_key = cache.tick_key("EUR/USD"), cache.tick_key("EUR/USD", "lagging")
    older = tick(source="lagging", bid=1.1)
    op = cache.write_op(older, per_source=True)
    assert _script_calls([op]) == [op.args]  # its own call, never merged into an 'M'
    # A key lost (restart): the per-source key is written, the any-source key stays absent.
    assert script.apply([op]) == [1]
    assert stored_bid(server, lagging_key) == 1.1
    assert server.ttl[lagging_key] == 30_000
    assert any_key not in server.strings
    # Compare-and-set like any latest value; the any-source key, once there, is left alone.
    assert script.apply([cache.write_op(tick(TS + 5, bid=1.3))]) == [3]
    assert script.apply([cache.write_op(tick(TS - 1, source="lagging"), per_source=True)]) == [0]
    assert script.apply(
        [cache.write_op(tick(TS + 9, source="lagging", bid=1.2), per_source=True)]
    ) == [1]
    assert (stored_bid(server, lagging_key), stored_bid(server, any_key)) == (1.2, 1.3)
    flow = OrderFlowMetrics(symbol="EUR/USD", timestamp=TS, window_ms=1000, ofi=2.0, source="db")
    assert script.apply([cache.write_op(flow, per_source=True)]) == [1]
    assert cache.order_flow_key("EUR/USD", "db") in server.strings
    assert cache.order_flow_key("EUR/USD") not in server.strings


#: Sources whose order differs between code points and a naive reading of their JSON (an
#: escaped quote or backslash, non-ASCII, upper before lower case, a prefix of another).
_SOURCES = ["ig", "ig2", "Zeta", "q#", "\u00e9cu", "\u00e9", 'q"x', "q\\x", "q", "\u65e5\u672c"]


@st.composite
def _tied(draw: st.DrawFn, build: Any, **fields: list[Any]) -> list[Any]:
    """Up to 12 values that mostly tie: each field takes one of two or three values drawn
    for the example (sources from :data:`_SOURCES`), so every rule of the order is hit."""
    pools = {
        name: draw(st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True))
        for name, values in fields.items()
    }
    size = draw(st.integers(1, 12))
    return [
        build(**{name: draw(st.sampled_from(pool)) for name, pool in pools.items()})
        for _ in range(size)
    ]


_ticks = _tied(
    lambda ts, **kw: tick(ts, **kw),
    ts=[TS, TS + 1],
    source=_SOURCES,
    seq=[None, 0, 7, 10, 2**63 - 1],
    bid=[1.1, 1.25, 9.5, 10.0],
    bid_size=[None, 0.0, 5.0, 1e-05, 2.5e6],
    ask_size=[None, 1.0],
    last_price=[None, 1.1, 1.3],
    last_size=[None, 2.0],
    volume=[None, 0.0, 3.0],
    aggressor=[None, "buy", "sell"],
)
_flows = _tied(
    lambda **kw: OrderFlowMetrics(symbol="EUR/USD", **kw),
    timestamp=[TS, TS + 1],
    window_ms=[1000, 60_000, 2**63 - 1],
    ofi=[1.0, 2.0],
    source=_SOURCES,
)


def _rank(item: TickData | OrderFlowMetrics) -> tuple[Any, ...]:
    return (item.timestamp, *tie_rank(item))


def _settles_alike(
    lua_version: str, cache: RedisCache, items: Sequence[TickData | OrderFlowMetrics]
) -> None:
    """Apply ``items`` in order to the script (one batch), an L1 and the bus's coalescing;
    all three must hold the same values, byte for byte, and the newest by the order."""
    server = FakeServer()
    Script(lua_version, server).apply([cache.write_op(item) for item in items])
    l1 = MemoryCache(max_entries=100, tick_ttl=60, candle_ttl=60, order_flow_ttl=60, ring_size=3)
    coalesced: dict[str, TickData | OrderFlowMetrics] = {}
    for item in items:
        if type(item) is TickData:
            l1.put_tick(item)
        else:
            l1.put_order_flow(item)  # type: ignore[arg-type]
        old = coalesced.get(item.source)
        if old is None or _replaces(item, old):
            coalesced[item.source] = item
    is_tick = type(items[0]) is TickData
    get, key, encode = (
        (l1.get_tick, cache.tick_key, encode_tick)
        if is_tick
        else (l1.get_order_flow, cache.order_flow_key, encode_order_flow)
    )
    newest = get("EUR/USD")
    assert newest is not None
    assert _rank(newest) == max(map(_rank, items))
    assert server.strings[key("EUR/USD")] == encode(newest).decode()  # type: ignore[arg-type]
    for source, pending in coalesced.items():
        own = get("EUR/USD", source)
        assert own is pending
        assert _rank(own) == max(_rank(i) for i in items if i.source == source)
        assert server.strings[key("EUR/USD", source)] == encode(own).decode()  # type: ignore[arg-type]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_ticks)
def test_ticks_settle_alike_in_the_script_l1_and_the_bus(
    lua_version: str, cache: RedisCache, ticks: list[TickData]
) -> None:
    _settles_alike(lua_version, cache, ticks)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_flows)
def test_order_flow_settles_alike_in_the_script_l1_and_the_bus(
    lua_version: str, cache: RedisCache, flows: list[OrderFlowMetrics]
) -> None:
    _settles_alike(lua_version, cache, flows)


def test_live_candles_fill_and_trim_the_ring(lua_version: str, cache: RedisCache) -> None:
    server = FakeServer()
    script = Script(lua_version, server)
    ring = cache.candle_key("EUR/USD", "1m", "ig")
    # Mixed with a tick, candles keep one call each; the ring holds 3.
    ops = [cache.write_op(candle(i)) for i in range(5)] + [cache.write_op(tick())]
    assert script.apply(ops) == [1, 1, 1, 1, 1, 3]
    assert [s for s, _ in server._sorted(ring)] == [TS + i * MINUTE for i in (2, 3, 4)]
    # A forming candle never replaces a closed one of its bucket.
    assert script.apply([cache.write_op(candle(4, closed=False))]) == [0]
    assert server.ttl[ring] == 60_000


def test_a_series_reset_deletes_ring_and_floor(lua_version: str, cache: RedisCache) -> None:
    server = FakeServer()
    script = Script(lua_version, server)
    script.apply(cache.backfill_ops([candle(0), candle(1)], complete=True))
    ring = cache.candle_key("EUR/USD", "1m", "ig")
    floor = cache.candle_floor_key("EUR/USD", "1m", "ig")
    assert ring in server.zsets
    assert floor in server.strings
    assert script.apply([cache.reset_candles_op("EUR/USD", "1m", "ig")]) == [2]
    assert ring not in server.zsets
    assert floor not in server.strings
