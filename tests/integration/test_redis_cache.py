"""L2 on a real Redis-protocol server: keys, compare-and-set, TTLs, candle rings, degradation."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from data_manager.breaker import CircuitBreaker
from data_manager.cache.redis import REFUSAL_MEMORY_SECONDS, WRITE_SCRIPT_SHA, RedisCache
from data_manager.clock import ManualClock
from data_manager.errors import CacheError, CacheUnavailableError
from data_manager.models import CandleData, OrderFlowMetrics, TickData
from data_manager.settings import DragonflySettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from tests.servers import RedisServer

pytestmark = pytest.mark.redis

TS = 1_727_996_400_000
MINUTE = 60_000


def tick(ts: int = TS, *, symbol: str = "EUR/USD", source: str = "ig", **kw: object) -> TickData:
    bid = float(kw.pop("bid", 1.0845))  # type: ignore[arg-type]
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.0001, source=source, **kw)


def candle(i: int, *, closed: bool = True, close: float = 1.1, source: str = "ig") -> CandleData:
    return CandleData(
        symbol="EUR/USD",
        timeframe="1m",
        timestamp=TS + i * MINUTE,
        open=1.0,
        high=1.2,
        low=0.9,
        close=close,
        source=source,
        is_closed=closed,
    )


def flow(ts: int = TS, *, ofi: float = 1.0, source: str = "databento") -> OrderFlowMetrics:
    return OrderFlowMetrics(symbol="EUR/USD", timestamp=ts, window_ms=1000, ofi=ofi, source=source)


@pytest_asyncio.fixture(loop_scope="session")
async def cache(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisCache]:
    l2 = RedisCache(
        url=redis_url,
        key_prefix=redis_prefix,
        tick_ttl=30,
        candle_ttl=60,
        order_flow_ttl=45,
        ring_size=5,
    )
    await l2.connect()
    yield l2
    await l2.aclose()


async def live(cache: RedisCache, *items: TickData | CandleData | OrderFlowMetrics) -> None:
    """Write the way the cache bus does (live writes, one pipeline)."""
    await cache.apply([cache.write_op(item) for item in items])


# ----------------------------------------------------------------------------- latest values


async def test_keys_are_hash_tagged_and_hold_plain_json(
    cache: RedisCache, redis_prefix: str
) -> None:
    await cache.put_ticks([tick()])
    raw = await cache.client.get(f"{redis_prefix}:v1:{{EUR/USD}}:tick:ig")
    assert raw is not None
    obj = json.loads(raw)
    assert (obj["v"], obj["type"], obj["symbol"], obj["timestamp"]) == (1, "tick", "EUR/USD", TS)
    assert await cache.client.get(f"{redis_prefix}:v1:{{EUR/USD}}:tick") == raw
    assert await cache.get_tick("EUR/USD") == tick()
    assert await cache.get_tick("EUR/USD", "ig") == tick()
    assert await cache.get_tick("EUR/USD", "other") is None
    assert await cache.get_tick("GBP/USD") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (2, 2)


async def test_older_tick_never_replaces_newer(cache: RedisCache) -> None:
    newer, older = tick(TS + 5, bid=1.2), tick(TS, bid=1.1)
    await cache.put_ticks([newer])
    await cache.put_ticks([older])  # a late message
    await cache.put_ticks([older, newer, older])  # out of order inside one pipeline
    await live(cache, older)  # and through the bus's path
    assert await cache.get_tick("EUR/USD", "ig") == newer
    assert await cache.get_tick("EUR/USD") == newer


async def test_any_source_key_holds_the_newest_of_all_sources(cache: RedisCache) -> None:
    await cache.put_ticks([tick(TS + 10, source="a"), tick(TS + 20, source="b")])
    await cache.put_ticks([tick(TS + 15, source="a")])
    assert (await cache.get_tick("EUR/USD", "a")).timestamp == TS + 15  # type: ignore[union-attr]
    assert (await cache.get_tick("EUR/USD")).source == "b"  # type: ignore[union-attr]


async def test_values_read_for_one_source_never_create_the_any_source_key(
    cache: RedisCache,
) -> None:
    lagging = tick(TS, source="lagging")
    metrics = OrderFlowMetrics(symbol="EUR/USD", timestamp=TS, window_ms=1000, source="lagging")
    await cache.put_ticks([lagging], per_source=True)
    await cache.put_order_flow([metrics], per_source=True)
    assert await cache.get_tick("EUR/USD", "lagging") == lagging
    assert await cache.get_order_flow("EUR/USD", "lagging") == metrics
    # They say nothing about other sources: the symbol's newest stays unknown.
    assert await cache.get_tick("EUR/USD") is None
    assert await cache.get_order_flow("EUR/USD") is None


async def test_same_millisecond_ties_follow_the_l1_rule(cache: RedisCache) -> None:
    # Both sequenced, same source: the higher seq stays whatever the arrival order.
    await cache.put_ticks([tick(seq=9, bid=1.3), tick(seq=4, bid=1.1)])
    assert (await cache.get_tick("EUR/USD", "ig")).seq == 9  # type: ignore[union-attr]
    assert (await cache.get_tick("EUR/USD")).seq == 9  # type: ignore[union-attr]
    # Unsequenced: the later write wins (a replay only refreshes the TTL).
    await cache.put_ticks([tick(TS + 1, source="x", bid=1.1), tick(TS + 1, source="x", bid=1.2)])
    assert (await cache.get_tick("EUR/USD", "x")).bid == 1.2  # type: ignore[union-attr]
    # A sequenced tick from another source at the same ms is not compared by seq.
    await cache.put_ticks([tick(TS + 1, source="y", seq=1, bid=1.5)])
    assert (await cache.get_tick("EUR/USD")).source == "y"  # type: ignore[union-attr]


async def test_get_ticks_reads_many_symbols_at_once(cache: RedisCache) -> None:
    await cache.put_ticks([tick(symbol="EUR/USD"), tick(symbol="USD/JPY", bid=150.1)])
    got = await cache.get_ticks(["EUR/USD", "GBP/USD", "USD/JPY"])
    assert sorted(got) == ["EUR/USD", "USD/JPY"]
    assert got["USD/JPY"].bid == 150.1
    assert await cache.get_ticks([]) == {}


async def test_order_flow_is_compare_and_set(cache: RedisCache) -> None:
    await cache.put_order_flow([flow(TS + 1000, ofi=2.0), flow(TS, ofi=1.0)])
    assert (await cache.get_order_flow("EUR/USD")).ofi == 2.0  # type: ignore[union-attr]
    assert (await cache.get_order_flow("EUR/USD", "databento")).ofi == 2.0  # type: ignore[union-attr]
    assert await cache.get_order_flow("EUR/USD", "other") is None


async def test_every_key_gets_its_ttl(cache: RedisCache) -> None:
    await cache.put_ticks([tick()])
    await cache.put_order_flow([flow()])
    await cache.put_candles([candle(0)], complete=True)
    client = cache.client
    for key, ttl_ms in [
        (cache.tick_key("EUR/USD", "ig"), 30_000),
        (cache.tick_key("EUR/USD"), 30_000),
        (cache.order_flow_key("EUR/USD", "databento"), 45_000),
        (cache.order_flow_key("EUR/USD"), 45_000),
        (cache.candle_key("EUR/USD", "1m", "ig"), 60_000),
        (cache.candle_floor_key("EUR/USD", "1m", "ig"), 60_000),
    ]:
        pttl = await client.pttl(key)
        assert 0 < pttl <= ttl_ms, key


async def test_one_live_batch_mixes_kinds_in_order_and_keeps_each_ttl(cache: RedisCache) -> None:
    # The bus's batch: every latest value goes in one script call, candles in their own.
    newer, older, other = tick(TS + 1, bid=1.2), tick(TS, bid=1.1), tick(symbol="GBP/USD")
    await live(cache, newer, flow(), candle(0), older, other)
    assert await cache.get_tick("EUR/USD") == newer  # the older tick later in the batch lost
    assert await cache.get_tick("EUR/USD", "ig") == newer
    assert await cache.get_tick("GBP/USD") == other
    assert await cache.get_order_flow("EUR/USD") == flow()
    assert await cache.get_candles("EUR/USD", "1m", 1, "ig") == [candle(0)]
    client = cache.client
    assert 0 < await client.pttl(cache.tick_key("GBP/USD")) <= 30_000
    # Each item keeps its own TTL inside the shared call (order flow's is 45 s, not 30).
    assert 30_000 < await client.pttl(cache.order_flow_key("EUR/USD", "databento")) <= 45_000


# ----------------------------------------------------------------------------- candles


async def test_candle_ring_is_trimmed_and_short_reads_miss(cache: RedisCache) -> None:
    await live(cache, *(candle(i) for i in range(8)))  # ring_size is 5
    assert await cache.client.zcard(cache.candle_key("EUR/USD", "1m", "ig")) == 5
    got = await cache.get_candles("EUR/USD", "1m", 5, "ig")
    assert [c.timestamp for c in got or []] == [TS + i * MINUTE for i in range(3, 8)]
    assert [c.timestamp for c in await cache.get_candles("EUR/USD", "1m", 2, "ig") or []] == [
        TS + 6 * MINUTE,
        TS + 7 * MINUTE,
    ]
    # More than the ring holds: older candles exist elsewhere, so never a short answer.
    assert await cache.get_candles("EUR/USD", "1m", 6, "ig") is None
    assert await cache.get_candles("EUR/USD", "1m", 3, "other") is None


async def test_complete_backfill_serves_short_lists_until_trimmed(cache: RedisCache) -> None:
    await cache.put_candles([candle(i) for i in range(3)], complete=False)
    assert await cache.get_candles("EUR/USD", "1m", 4, "ig") is None
    assert len(await cache.get_candles("EUR/USD", "1m", 3, "ig") or []) == 3
    # The database had only these three: a short list is the whole truth.
    await cache.put_candles([candle(i) for i in range(3)], complete=True)
    got = await cache.get_candles("EUR/USD", "1m", 100, "ig")
    assert [c.timestamp for c in got or []] == [TS, TS + MINUTE, TS + 2 * MINUTE]
    # Live candles keep it complete until the ring drops the oldest.
    await live(cache, candle(3), candle(4))
    assert len(await cache.get_candles("EUR/USD", "1m", 100, "ig") or []) == 5
    await live(cache, candle(5))
    assert await cache.get_candles("EUR/USD", "1m", 100, "ig") is None
    assert len(await cache.get_candles("EUR/USD", "1m", 5, "ig") or []) == 5


async def test_closed_candle_is_never_replaced_by_a_forming_one(cache: RedisCache) -> None:
    await live(cache, candle(0, closed=False, close=1.0))
    await live(cache, candle(0, closed=False, close=1.05))  # forming updates its bucket
    got = await cache.get_candles("EUR/USD", "1m", 1, "ig")
    assert got is not None
    assert (got[0].close, got[0].is_closed) == (1.05, False)
    await live(cache, candle(0, closed=True, close=1.1))
    await live(cache, candle(0, closed=False, close=1.0))  # a late forming update
    got = await cache.get_candles("EUR/USD", "1m", 1, "ig")
    assert got is not None
    assert (got[0].close, got[0].is_closed) == (1.1, True)
    # A closed correction still replaces a closed candle.
    await live(cache, candle(0, closed=True, close=1.15))
    assert (await cache.get_candles("EUR/USD", "1m", 1, "ig") or [])[0].close == 1.15


async def test_backfill_never_overrides_fresher_live_candles(cache: RedisCache) -> None:
    await live(cache, candle(1, closed=False, close=1.15), candle(2, closed=False, close=1.0))
    # The database lags: it has an older forming bucket 1 and a closed bucket 2.
    await cache.put_candles(
        [candle(0), candle(1, closed=False, close=1.05), candle(2, close=1.1)], complete=True
    )
    got = await cache.get_candles("EUR/USD", "1m", 10, "ig")
    assert got is not None  # complete: the backfill supplied the oldest candle
    assert [(c.close, c.is_closed) for c in got] == [(1.1, True), (1.15, False), (1.1, True)]


async def test_live_candle_older_than_an_incomplete_ring_is_refused(cache: RedisCache) -> None:
    await live(cache, candle(5), candle(6))
    await live(cache, candle(1))  # would leave a gap at 2..4
    assert len(await cache.client.zrange(cache.candle_key("EUR/USD", "1m", "ig"), 0, -1)) == 2
    # Once the ring is known complete, an older candle extends it.
    await cache.put_candles([candle(4), candle(5)], complete=True)
    await live(cache, candle(3))
    got = await cache.get_candles("EUR/USD", "1m", 10, "ig")
    assert [c.timestamp for c in got or []] == [TS + i * MINUTE for i in (3, 4, 5, 6)]


async def test_a_full_complete_ring_refusing_an_older_candle_is_complete_no_longer(
    cache: RedisCache,
) -> None:
    await cache.put_candles([candle(i) for i in range(5, 10)], complete=True)  # size 5: full
    assert len(await cache.get_candles("EUR/USD", "1m", 10, "ig") or []) == 5
    await live(cache, candle(4))  # stored below now; the full ring cannot take it
    assert len(await cache.client.zrange(cache.candle_key("EUR/USD", "1m", "ig"), 0, -1)) == 5
    assert await cache.get_candles("EUR/USD", "1m", 10, "ig") is None
    assert len(await cache.get_candles("EUR/USD", "1m", 5, "ig") or []) == 5


async def test_a_backfill_ending_before_the_ring_is_not_joined(cache: RedisCache) -> None:
    # The ring has live candle 12; the database (lagging) up to 10: bucket 11 may be in
    # neither, so the two are not joined, and the ring stops claiming to be complete.
    await cache.put_candles([candle(12)], complete=True)
    assert len(await cache.get_candles("EUR/USD", "1m", 3, "ig") or []) == 1
    await cache.put_candles([candle(i) for i in range(8, 11)], complete=True)
    ring = await cache.client.zrange(cache.candle_key("EUR/USD", "1m", "ig"), 0, -1)
    assert len(ring) == 1
    assert await cache.get_candles("EUR/USD", "1m", 3, "ig") is None
    # A backfill reaching the ring's oldest candle joins it.
    await cache.put_candles([candle(i) for i in range(9, 13)], complete=False)
    got = await cache.get_candles("EUR/USD", "1m", 4, "ig")
    assert [c.timestamp for c in got or []] == [TS + i * MINUTE for i in range(9, 13)]


# ----------------------------------------------------------------------------- errors


async def test_malformed_value_is_a_cache_error_and_gets_overwritten(cache: RedisCache) -> None:
    await cache.client.set(cache.tick_key("EUR/USD"), b"{not json")
    with pytest.raises(CacheError) as info:
        await cache.get_tick("EUR/USD")
    assert not isinstance(info.value, CacheUnavailableError)
    assert cache.breaker_state == "closed"
    await cache.put_ticks([tick()])  # no readable timestamp: the new value wins
    assert await cache.get_tick("EUR/USD") == tick()


async def test_server_errors_are_mapped_and_chained(cache: RedisCache) -> None:
    await cache.client.hset(cache.tick_key("EUR/USD"), "f", "v")  # wrong type for GET
    with pytest.raises(CacheError) as info:
        await cache.get_tick("EUR/USD")
    assert info.value.__cause__ is not None
    with pytest.raises(CacheError):
        await cache.put_ticks([tick()])


async def test_closed_cache_refuses_calls(redis_url: str, redis_prefix: str) -> None:
    l2 = RedisCache(url=redis_url, key_prefix=redis_prefix)
    await l2.connect()
    await l2.aclose()
    with pytest.raises(CacheUnavailableError):
        await l2.get_tick("EUR/USD")


async def test_from_settings_and_server_info(redis_url: str, redis_prefix: str) -> None:
    settings = DragonflySettings(url=redis_url, key_prefix=redis_prefix)
    l2 = RedisCache.from_settings(settings, tick_ttl=5, ring_size=10)
    try:
        await l2.connect()
        assert l2.ring_size == 10
        assert await l2.ping() > 0
        assert (await l2.info_version()).split()[0] in {"redis", "valkey", "dragonfly"}
        assert settings.host in l2.target
    finally:
        await l2.aclose()


async def test_lost_script_cache_falls_back_to_eval(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()  # SCRIPT FLUSH would disturb a shared server
    l2 = RedisCache(url=server.url, key_prefix="t")
    try:
        await l2.connect()
        await l2.client.script_flush()
        await l2.put_ticks([tick()])
        assert await l2.get_tick("EUR/USD") == tick()
        assert await l2.client.script_exists(WRITE_SCRIPT_SHA) == [True]
    finally:
        await l2.aclose()


# ----------------------------------------------------------------------------- write connection


async def test_bus_writes_go_through_when_readers_hold_every_pooled_connection(
    redis_url: str, redis_prefix: str
) -> None:
    l2 = RedisCache(url=redis_url, key_prefix=redis_prefix, max_connections=1, pool_timeout=0.2)
    try:
        await l2.connect()
        pool = l2.client.connection_pool
        reader = await pool.get_connection()  # a slow reader holds the only pooled connection
        try:
            with pytest.raises(CacheUnavailableError):
                await live(l2, tick())  # a pooled write waits pool_timeout, then gives up
            await l2.apply([l2.write_op(tick(TS + 1))], own_connection=True)
        finally:
            await pool.release(reader)
        assert await l2.get_tick("EUR/USD") == tick(TS + 1)
    finally:
        await l2.aclose()


async def test_concurrent_writes_share_the_write_connection_safely(cache: RedisCache) -> None:
    # Only one pipeline at a time may use the write connection; the others take pooled ones.
    symbols = [f"S{i}/USD" for i in range(8)]
    await asyncio.gather(
        *(cache.apply([cache.write_op(tick(symbol=s))], own_connection=True) for s in symbols)
    )
    assert await cache.get_ticks(symbols) == {s: tick(symbol=s) for s in symbols}


async def _connections_named(client: Redis, name: str) -> list[dict[str, str]]:
    return [c for c in await client.client_list() if c.get("name") == name]


async def test_write_connection_reopens_after_the_server_drops_it_and_closes_with_the_cache(
    redis_url: str, redis_prefix: str
) -> None:
    name = f"{redis_prefix}-writer"
    l2 = RedisCache(url=redis_url, key_prefix=redis_prefix, client_name=name)
    admin = Redis.from_url(redis_url)
    try:
        await l2.connect()
        await l2.apply([l2.write_op(tick())], own_connection=True)
        (writer,) = [c for c in await _connections_named(admin, name) if c["cmd"] == "evalsha"]
        await admin.client_kill_filter(_id=writer["id"])
        with pytest.raises(CacheUnavailableError):
            await l2.apply([l2.write_op(tick(TS + 1))], own_connection=True)
        await l2.apply([l2.write_op(tick(TS + 2))], own_connection=True)  # a new connection
        assert await l2.get_tick("EUR/USD") == tick(TS + 2)
        await l2.aclose()
        async with asyncio.timeout(5):
            while await _connections_named(admin, name):  # noqa: ASYNC110 - server-side state
                await asyncio.sleep(0.01)
    finally:
        await l2.aclose()
        await admin.aclose()


# ----------------------------------------------------------------------------- degradation


async def test_breaker_short_circuits_while_down_and_recovers_without_restart(
    redis_server_factory: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory()
    clock = ManualClock()
    breaker = CircuitBreaker("l2", failure_threshold=3, reset_timeout=10.0, clock=clock)
    l2 = RedisCache(url=server.url, key_prefix="t", breaker=breaker, socket_timeout=1.0)
    caplog.set_level(logging.INFO, logger="data_manager.cache.redis")
    try:
        await l2.connect()
        await l2.put_ticks([tick()])
        server.stop()
        for _ in range(3):
            with pytest.raises(CacheUnavailableError):
                await l2.get_tick("EUR/USD")
        assert l2.breaker_state == "open"
        assert l2.stats().errors == 3
        # The server is back, but the breaker has not let a probe through yet: if these
        # calls touched the network they would succeed.
        server.start()
        for _ in range(5):
            with pytest.raises(CacheUnavailableError, match="circuit is open"):
                await l2.get_tick("EUR/USD")
            with pytest.raises(CacheUnavailableError):
                await l2.put_ticks([tick(TS + 1)])
        assert l2.stats().short_circuited == 10
        assert l2.stats().errors == 3
        clock.advance(10.0)  # reset timeout over: the next call is the probe
        assert await l2.get_tick("EUR/USD") is None  # the server restarted empty
        assert l2.breaker_state == "closed"
        await l2.put_ticks([tick()])
        assert await l2.get_tick("EUR/USD") == tick()
    finally:
        await l2.aclose()
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "data_manager.cache.redis"
    ]
    assert len(warnings) == 1  # one incident, logged once
    assert warnings[0].exc_info is not None
    assert any(
        r.levelno == logging.INFO and "answers again" in r.getMessage() for r in caplog.records
    )


async def test_a_refused_write_is_reported_for_a_while_whatever_else_is_written(
    redis_url: str, redis_prefix: str
) -> None:
    clock = ManualClock()
    l2 = RedisCache(url=redis_url, key_prefix=redis_prefix, clock=clock)
    try:
        await l2.connect()
        await l2.client.lpush(l2.tick_key("EUR/USD", "ig"), "not a tick")
        with pytest.raises(CacheError, match="WRONGTYPE"):
            await l2.put_ticks([tick()])
        assert "WRONGTYPE" in (l2.write_refused or "")
        assert l2.breaker_state == "closed"  # it answers: reads go on
        # Another key takes its write: the stray key still refuses every write of its own.
        await l2.put_ticks([tick(symbol="GBP/USD")])
        assert "WRONGTYPE" in (l2.write_refused or "")
        clock.advance(REFUSAL_MEMORY_SECONDS)
        assert l2.write_refused is None
    finally:
        await l2.aclose()


async def test_hung_server_costs_one_socket_timeout_per_call_until_the_breaker_opens(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    clock = ManualClock()
    breaker = CircuitBreaker("l2", failure_threshold=2, reset_timeout=10.0, clock=clock)
    l2 = RedisCache(url=server.url, key_prefix="t", breaker=breaker, socket_timeout=0.2)
    await l2.connect()
    info = await l2.client.info("server")
    pid = int(info["process_id"])
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only timeouts can tell
    try:
        for _ in range(2):
            with pytest.raises(CacheUnavailableError):
                await l2.get_tick("EUR/USD")
        assert l2.breaker_state == "open"
        with pytest.raises(CacheUnavailableError, match="circuit is open"):
            await l2.get_tick("EUR/USD")
    finally:
        os.kill(pid, signal.SIGCONT)
    clock.advance(10.0)
    assert await l2.get_tick("EUR/USD") is None
    assert l2.breaker_state == "closed"
    await l2.aclose()
