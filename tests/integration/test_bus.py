"""The cache bus between routers: fast path to L2, pub/sub into L1, loss and recovery, fork."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
import traceback
import warnings
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from data_manager.breaker import CircuitBreaker
from data_manager.cache.bus import CacheBus, LatestKey
from data_manager.cache.redis import RedisCache
from data_manager.clock import ManualClock
from data_manager.errors import CacheError, CacheUnavailableError
from data_manager.models import CandleData, TickData

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from data_manager.cache.codec import CacheItem
    from data_manager.cache.redis import WriteOp
    from tests.servers import RedisServer

pytestmark = pytest.mark.redis

TS = 1_727_996_400_000
DEADLINE = 10.0  # seconds; generous, only reached when something is broken


def tick(
    ts: int = TS, *, symbol: str = "EUR/USD", source: str = "ig", bid: float = 1.1
) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.0001, source=source)


class Router:
    """What a router does with the bus callbacks, recorded for assertions."""

    def __init__(self) -> None:
        self.items: list[CacheItem] = []
        self.messages: list[list[CacheItem]] = []  # the items of each message, in order
        self.lost = 0
        self.restored = 0
        self.owed: list[list[LatestKey]] = []  # the keys of each on_resumed call
        self._changed = asyncio.Event()

    def on_items(self, items: Sequence[CacheItem]) -> None:
        self.items.extend(items)
        self.messages.append(list(items))
        self._changed.set()

    def on_lost(self) -> None:
        self.lost += 1
        self._changed.set()

    def on_restored(self) -> None:
        self.restored += 1
        self._changed.set()

    def on_resumed(self, keys: Sequence[LatestKey]) -> None:
        self.owed.append(list(keys))
        self._changed.set()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for a callback that makes ``condition`` true (events, with a deadline)."""
        try:
            async with asyncio.timeout(DEADLINE):
                while not condition():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"timed out waiting for {what}")


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll a counter with a deadline (for effects no callback reports)."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not condition():  # noqa: ASYNC110 - counters have no event to await
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def make_cache(url: str, prefix: str, **kw: object) -> RedisCache:
    options: dict[str, object] = {"socket_timeout": 1.0, **kw}
    return RedisCache(url=url, key_prefix=prefix, **options)  # type: ignore[arg-type]


def make_bus(cache: RedisCache) -> CacheBus:
    return CacheBus(cache, reconnect_check_seconds=0.5, backoff_initial=0.02, backoff_max=0.2)


class Pair:
    def __init__(self, url: str, prefix: str, **cache_kw: object) -> None:
        self.cache_a = make_cache(url, prefix, **cache_kw)
        self.cache_b = make_cache(url, prefix, **cache_kw)
        self.a = make_bus(self.cache_a)
        self.b = make_bus(self.cache_b)
        self.router_a = Router()
        self.router_b = Router()

    async def start(self) -> None:
        for cache in (self.cache_a, self.cache_b):
            await cache.connect()
        for bus, router in ((self.a, self.router_a), (self.b, self.router_b)):
            assert await bus.start(
                router.on_items, router.on_lost, router.on_restored, on_resumed=router.on_resumed
            )

    async def close(self) -> None:
        for closer in (self.a.aclose, self.b.aclose, self.cache_a.aclose, self.cache_b.aclose):
            await closer()


@pytest_asyncio.fixture(loop_scope="session")
async def pair(redis_url: str, redis_prefix: str) -> AsyncIterator[Pair]:
    routers = Pair(redis_url, redis_prefix)
    await routers.start()
    yield routers
    await routers.close()


# ----------------------------------------------------------------------------- delivery


async def test_update_reaches_l2_and_the_other_router(pair: Pair) -> None:
    pair.a.publish(tick())
    await pair.router_b.until(lambda: len(pair.router_b.items) == 1, "B to receive the tick")
    assert pair.router_b.items == [tick()]
    # PUBLISH follows the writes in the same pipeline: L2 already holds what was announced.
    assert await pair.cache_b.get_tick("EUR/USD") == tick()
    # A skips its own message without handing it to its L1.
    await until(lambda: pair.a.stats().own_skipped == 1, "A to see its own message")
    assert pair.router_a.items == []
    assert pair.a.stats().published == 1
    assert pair.b.stats().received == 1


async def test_updates_coalesce_per_symbol_with_compare_and_set(pair: Pair) -> None:
    # Published back to back (no await in between), as a burst of ticks would be.
    for i in range(100):
        pair.a.publish(tick(TS + i, bid=1.0 + i / 1000))
    pair.a.publish(tick(TS + 50))  # a late, older tick must not win the coalescing
    pair.a.publish(tick(TS, symbol="GBP/USD"))
    forming = dict(
        symbol="EUR/USD", timeframe="1m", timestamp=TS, open=1.0, high=1.2, low=0.9,
        source="ig",
    )  # fmt: skip
    pair.a.publish(CandleData(**forming, close=1.0, is_closed=False))
    pair.a.publish(CandleData(**forming, close=1.1, is_closed=True))
    pair.a.publish(CandleData(**forming, close=1.2, is_closed=False))
    await pair.a.flush()
    await pair.router_b.until(lambda: len(pair.router_b.items) >= 3, "B to receive the batch")
    by_kind = {(type(i).__name__, i.symbol): i for i in pair.router_b.items}
    assert len(pair.router_b.items) == 3
    assert by_kind["TickData", "EUR/USD"].timestamp == TS + 99
    assert by_kind["CandleData", "EUR/USD"].close == 1.1  # type: ignore[union-attr]
    stats = pair.a.stats()
    assert stats.messages_sent == 2  # the ticks, then the candle
    assert stats.coalesced == 99 + 1 + 2  # ticks, the late tick, the candle updates
    assert (await pair.cache_b.get_tick("EUR/USD")).timestamp == TS + 99  # type: ignore[union-attr]


async def test_ticks_go_ahead_of_derived_bursts_sent_in_chunks(pair: Pair) -> None:
    # What a publish timer does: forming bars of 50 symbols over 3 timeframes at once; a
    # tick published right after must not wait behind all of them.
    burst = [
        CandleData(
            symbol=f"S{i % 50:02d}/USD", timeframe=timeframe, timestamp=TS,
            open=1.0, high=1.0, low=1.0, close=1.0, source="ig", is_closed=False,
        )
        for timeframe in ("1m", "5m", "15m")
        for i in range(50)
    ]  # fmt: skip
    for candle in burst:
        pair.a.publish(candle)
    pair.a.publish(tick())
    await pair.a.flush()
    await pair.router_b.until(lambda: len(pair.router_b.items) == 151, "B to receive it all")
    messages = pair.router_b.messages
    assert messages[0] == [tick()]
    assert [len(m) for m in messages[1:]] == [64, 64, 22]  # derived_batch = 64
    assert [c for m in messages[1:] for c in m] == burst  # in the order published
    assert pair.a.stats().messages_sent == 4


async def test_malformed_and_foreign_messages(pair: Pair, redis_prefix: str) -> None:
    client = pair.cache_a.client
    await client.publish(pair.a.channel, b"\x00 not json")
    # A process in another language announcing a tick in the documented format.
    foreign = {
        "v": 1,
        "type": "bus",
        "origin": "go-collector-1",
        "items": [
            {"v": 1, "type": "tick", "symbol": "USD/JPY", "timestamp": TS, "bid": 150.1,
             "ask": 150.2, "source": "go"},
        ],
    }  # fmt: skip
    await client.publish(f"{redis_prefix}:v1:bus", json.dumps(foreign))
    await pair.router_b.until(lambda: len(pair.router_b.items) == 1, "the foreign tick")
    assert pair.router_b.items[0].symbol == "USD/JPY"
    assert pair.b.stats().malformed == 1
    assert pair.b.connected


async def test_a_failing_callback_does_not_stop_the_reader(pair: Pair) -> None:
    first = asyncio.Event()

    def flaky(items: Sequence[CacheItem]) -> None:
        if not first.is_set():
            first.set()
            raise RuntimeError("router bug")
        pair.router_b.on_items(items)

    pair.b._on_items = flaky  # the router's callback, replaced for this test
    pair.a.publish(tick())
    async with asyncio.timeout(DEADLINE):
        await first.wait()
    pair.a.publish(tick(TS + 1))
    await pair.router_b.until(lambda: len(pair.router_b.items) == 1, "the second delivery")
    assert pair.b.stats().callback_errors == 1


# ----------------------------------------------------------------------------- faults


def bar(i: int, *, symbol: str = "EUR/USD") -> CandleData:
    """The closed 1m candle of minute ``i`` of the hour starting at TS."""
    return CandleData(
        symbol=symbol, timeframe="1m", timestamp=TS + i * 60_000,
        open=1.1, high=1.1, low=1.1, close=1.1, source="feed",
    )  # fmt: skip


def fail_applies(cache: RedisCache, times: int, *, refused: bool = False) -> None:
    """Make the next ``times`` pipelines the bus's sender runs on ``cache`` fail as a
    timed-out socket does (or, ``refused``, as a server refusing the call does: out of
    memory, say). Other writes (a router's background L2 fill after a read, say, which may
    run at any moment) are left alone: they must not take a failure meant for the bus."""
    real = cache.apply
    left = [times]

    async def apply(ops: Sequence[WriteOp], **kw: Any) -> None:
        if left[0] > 0 and kw.get("own_connection"):
            left[0] -= 1
            if refused:
                raise CacheError("simulated: OOM command not allowed")
            msg = "simulated: socket timeout on the bus pipeline"
            raise CacheUnavailableError(msg)
        await real(ops, **kw)

    cache.apply = apply  # type: ignore[method-assign]


async def test_candles_of_a_failed_batch_go_out_with_the_next_one(pair: Pair) -> None:
    """A lost candle would be a gap in every ring once the next one is appended: the bus
    keeps it and sends it ahead of the next derived data, to L2 and the other routers."""
    for i in range(5):
        pair.a.publish(bar(i))
    await pair.a.flush()
    fail_applies(pair.cache_a, 1)
    pair.a.publish(bar(5))
    await pair.a.flush()  # the pipeline failed: bar 5 is kept
    pair.a.publish(tick())  # ticks alone do not carry it
    pair.a.publish(bar(6))
    await pair.a.flush()
    got = await pair.cache_b.get_candles("EUR/USD", "1m", 3, "feed")
    assert [c.timestamp for c in got or []] == [bar(i).timestamp for i in (4, 5, 6)]
    await pair.router_b.until(lambda: bar(6) in pair.router_b.items, "B to receive bar 6")
    assert pair.router_b.messages[-1] == [bar(5), bar(6)]  # oldest first, in one message
    stats = pair.a.stats()
    assert (stats.dropped, stats.retried, stats.reset_series) == (0, 1, 0)


async def test_what_a_failed_batch_left_is_retried_without_a_new_update(
    redis_url: str, redis_prefix: str
) -> None:
    """A quiet router may publish nothing more: the candle a failed batch left and the key
    it owes go out with a retry of their own (they waited for the next update: a gap in
    every ring, a stale latest value in L2, for as long as the router stayed quiet)."""
    routers = Pair(redis_url, redis_prefix)
    routers.a = CacheBus(routers.cache_a, retry_seconds=0.05)
    await routers.start()
    try:
        routers.a.publish(bar(0))
        await routers.a.flush()
        fail_applies(routers.cache_a, 3)  # the tick's batch, the candle's, their first retry
        routers.a.publish(tick())
        routers.a.publish(bar(1))
        await routers.a.flush()
        assert routers.router_a.owed == []  # nothing reached L2 yet
        await routers.router_a.until(lambda: bool(routers.router_a.owed), "the retry")
        assert routers.router_a.owed == [[(TickData, "EUR/USD", "ig")]]
        await routers.router_b.until(lambda: bar(1) in routers.router_b.items, "B to get bar 1")
        got = await routers.cache_b.get_candles("EUR/USD", "1m", 2, "feed")
        assert [c.timestamp for c in got or []] == [bar(0).timestamp, bar(1).timestamp]
    finally:
        await routers.close()


async def test_close_tries_the_candles_a_failed_batch_left_once_more(pair: Pair) -> None:
    """Kept candles die with the process: close() tries them once more instead of leaving
    the ring without them (the next router's candle would be appended after a gap)."""
    pair.a.publish(bar(0))
    await pair.a.flush()
    fail_applies(pair.cache_a, 1)
    pair.a.publish(bar(1))
    await pair.a.flush()  # kept; the retry is a second away
    await pair.a.aclose()
    got = await pair.cache_b.get_candles("EUR/USD", "1m", 2, "feed")
    assert [c.timestamp for c in got or []] == [bar(0).timestamp, bar(1).timestamp]


async def test_candles_of_a_refused_batch_reset_their_series(pair: Pair) -> None:
    """A batch the server refuses is dropped (it would be refused again); its candles'
    rings would show a gap once the next candle is appended, so they are reset."""
    for i in range(5):
        pair.a.publish(bar(i))
    await pair.a.flush()
    fail_applies(pair.cache_a, 1, refused=True)
    pair.a.publish(bar(5))
    await pair.a.flush()
    pair.a.publish(bar(6))
    await pair.a.flush()
    assert await pair.cache_b.get_candles("EUR/USD", "1m", 3, "feed") is None  # not 3, 4, 6
    got = await pair.cache_b.get_candles("EUR/USD", "1m", 1, "feed")
    assert [c.timestamp for c in got or []] == [bar(6).timestamp]
    stats = pair.a.stats()
    assert (stats.dropped, stats.reset_series) == (1, 1)


async def test_dropped_latest_values_are_owed_to_on_resumed_once_l2_takes_a_batch(
    redis_url: str, redis_prefix: str
) -> None:
    """A quiet key may get no newer update for as long as L2 keeps its older value: the
    keys of dropped latest values go to ``on_resumed`` with the next batch that lands,
    the newest ``max_owed_keys`` of them."""
    routers = Pair(redis_url, redis_prefix)
    routers.a = CacheBus(routers.cache_a, max_owed_keys=2)
    owed = routers.router_a.owed
    await routers.start()
    try:
        fail_applies(routers.cache_a, 2)  # the ticks' pipeline, then the candle's
        for symbol in ("EUR/USD", "GBP/USD", "USD/JPY"):
            routers.a.publish(tick(symbol=symbol))
        routers.a.publish(bar(0))  # candles are kept and resent, never owed
        await routers.a.flush()
        assert owed == []  # nothing reached L2 yet
        routers.a.publish(tick(TS + 1))
        await routers.a.flush()
        assert owed == [[(TickData, "GBP/USD", "ig"), (TickData, "USD/JPY", "ig")]]
        assert routers.a.stats().owed_forgotten == 1  # EUR/USD, the oldest beyond the bound
        routers.a.publish(tick(TS + 2))
        await routers.a.flush()
        assert len(owed) == 1  # handed over once
    finally:
        await routers.close()


async def test_candles_given_up_reset_their_series_everywhere(
    redis_url: str, redis_prefix: str
) -> None:
    """Beyond ``max_retained_candles`` the oldest kept candles are given up: their series'
    rings are deleted from L2 and dropped from the other routers' L1 once L2 answers."""
    routers = Pair(redis_url, redis_prefix)
    routers.a = CacheBus(routers.cache_a, max_retained_candles=1)
    await routers.start()
    try:
        for symbol in ("EUR/USD", "GBP/USD"):
            routers.a.publish(bar(0, symbol=symbol))
        await routers.a.flush()
        fail_applies(routers.cache_a, 1)
        routers.a.publish(bar(1))  # given up: EUR/USD's ring would show a gap
        routers.a.publish(bar(1, symbol="GBP/USD"))  # kept
        await routers.a.flush()
        assert routers.a.stats().dropped == 1
        routers.a.publish(tick())
        await routers.a.flush()
        assert await routers.cache_b.get_candles("EUR/USD", "1m", 1, "feed") is None
        assert routers.a.stats().reset_series == 1
        # Without on_gaps, the other router drops its whole L1 (lost, then restored).
        await routers.router_b.until(lambda: routers.router_b.restored == 1, "B to clear L1")
        assert routers.router_b.lost == 1
        routers.a.publish(bar(2, symbol="GBP/USD"))
        await routers.a.flush()
        got = await routers.cache_b.get_candles("GBP/USD", "1m", 3, "feed")
        assert [c.timestamp for c in got or []] == [bar(i).timestamp for i in range(3)]
    finally:
        await routers.close()


async def test_lost_subscription_is_reported_and_restored_without_restart(
    redis_server_factory: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory()
    clock = ManualClock()
    breaker = CircuitBreaker("l2", failure_threshold=1, reset_timeout=5.0, clock=clock)
    routers = Pair(server.url, "t")
    routers.cache_a = make_cache(server.url, "t", breaker=breaker)
    routers.a = make_bus(routers.cache_a)
    await routers.start()
    caplog.set_level(logging.WARNING, logger="data_manager.cache.bus")
    try:
        server.stop()
        await routers.router_b.until(lambda: routers.router_b.lost == 1, "on_lost")
        assert not routers.b.connected
        # L2 is down: the fast path drops cache updates, counts them and logs once.
        for i in range(3):
            routers.a.publish(tick(TS + i))
            await routers.a.flush()
        assert routers.a.stats().dropped == 3
        dropping = [r for r in caplog.records if "dropping cache updates" in r.getMessage()]
        assert len(dropping) == 1
        server.start()
        await routers.router_b.until(lambda: routers.router_b.restored == 1, "on_restored")
        await routers.router_a.until(lambda: routers.router_a.restored == 1, "A resubscribed")
        assert routers.b.connected
        clock.advance(5.0)  # let A's cache breaker probe again
        routers.a.publish(tick(TS + 10))
        await routers.router_b.until(lambda: len(routers.router_b.items) == 1, "delivery after")
        assert routers.router_b.items[0].timestamp == TS + 10
        assert routers.b.stats().lost == 1
        assert routers.b.stats().restored == 1
    finally:
        await routers.close()


async def test_silently_dead_connection_is_detected_by_ping(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    cache = make_cache(server.url, "t", socket_timeout=0.3)
    bus = make_bus(cache)  # reconnect_check_seconds=0.5
    router = Router()
    await cache.connect()
    pid = int((await cache.client.info("server"))["process_id"])
    assert await bus.start(router.on_items, router.on_lost, router.on_restored)
    os.kill(pid, signal.SIGSTOP)  # no FIN, no RST: only a missing PONG tells
    try:
        await router.until(lambda: router.lost == 1, "on_lost after a missing PONG")
    finally:
        os.kill(pid, signal.SIGCONT)
    await router.until(lambda: router.restored == 1, "on_restored")
    await bus.aclose()
    await cache.aclose()


async def test_start_while_down_reports_lost_then_restored(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    server.stop()
    cache = make_cache(server.url, "t")
    bus = make_bus(cache)
    router = Router()
    try:
        assert not await bus.start(router.on_items, router.on_lost, router.on_restored)
        assert router.lost == 1
        server.start()
        await router.until(lambda: router.restored == 1, "on_restored")
        assert bus.connected
    finally:
        await bus.aclose()
        await cache.aclose()


# ----------------------------------------------------------------------------- processes


async def _child(cache: RedisCache, bus: CacheBus, parent_client_id: int) -> int:
    """Runs in the forked child, in a new event loop; the exit code says what failed."""
    await cache.connect()
    if await cache.client.client_id() == parent_client_id:
        return 3  # reused the parent's connection
    router = Router()
    if not await bus.start(router.on_items, router.on_lost, router.on_restored):
        return 4
    bus.publish(tick(TS + 1, symbol="GBP/USD"))
    await bus.flush()
    if await cache.get_tick("GBP/USD") != tick(TS + 1, symbol="GBP/USD"):
        return 5
    await bus.aclose()
    await cache.aclose()
    return 0


async def test_forked_child_opens_its_own_connections(redis_url: str, redis_prefix: str) -> None:
    cache = make_cache(redis_url, redis_prefix)
    bus = make_bus(cache)
    router = Router()
    await cache.connect()
    assert await bus.start(router.on_items, router.on_lost, router.on_restored)
    bus.publish(tick())  # the parent has a sender task, a pool and a subscription
    await bus.flush()
    parent_id = await cache.client.client_id()
    parent_origin = bus.origin
    with warnings.catch_warnings():
        # Python 3.12+ warns when forking a process with threads; the child below only
        # uses objects it creates after the fork.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            cache.reset_after_fork()
            bus.reset_after_fork()
            code = 2 if bus.origin == parent_origin else asyncio.run(_child(cache, bus, parent_id))
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    # The parent receives what the child published (so the child's origin is new) ...
    await router.until(lambda: any(i.symbol == "GBP/USD" for i in router.items), "child's tick")
    status = 0
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
                if done:
                    break
                await asyncio.sleep(0.01)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the forked child did not exit")
    assert os.waitstatus_to_exitcode(status) == 0
    # ... and its own connections were left intact by the child.
    assert await cache.client.client_id() == parent_id
    assert await cache.get_tick("EUR/USD") == tick()
    assert bus.connected
    bus.publish(tick(TS + 2))  # the sender's own connection too
    await bus.flush()
    assert bus.stats().dropped == 0
    assert await cache.get_tick("EUR/USD") == tick(TS + 2)
    await bus.aclose()
    await cache.aclose()


_PEER = textwrap.dedent(
    """
    import asyncio, sys
    from data_manager.cache.bus import CacheBus
    from data_manager.cache.redis import RedisCache
    from data_manager.models import TickData

    async def main(url, prefix):
        cache = RedisCache(url=url, key_prefix=prefix)
        await cache.connect()
        bus = CacheBus(cache)
        answered = asyncio.Event()
        def on_items(items):
            if any(i.symbol == "GBP/USD" for i in items):
                answered.set()
        await bus.start(on_items, lambda: None, lambda: None)
        ts = 1727996400000
        async with asyncio.timeout(20):
            while not answered.is_set():
                ts += 1
                peer_tick = TickData(
                    symbol="EUR/USD", timestamp=ts, bid=1.1, ask=1.2, source="peer"
                )
                bus.publish(peer_tick)
                try:
                    await asyncio.wait_for(answered.wait(), 0.1)
                except TimeoutError:
                    pass
        await bus.aclose()
        await cache.aclose()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.slow
async def test_two_processes_see_each_others_writes(redis_url: str, redis_prefix: str) -> None:
    cache = make_cache(redis_url, redis_prefix)
    bus = make_bus(cache)
    router = Router()
    await cache.connect()
    assert await bus.start(router.on_items, router.on_lost, router.on_restored)
    peer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PEER, redis_url, redis_prefix, stderr=asyncio.subprocess.PIPE
    )
    try:
        await router.until(lambda: any(i.source == "peer" for i in router.items), "peer's tick")
        async with asyncio.timeout(DEADLINE):
            while peer.returncode is None:
                bus.publish(tick(symbol="GBP/USD"))
                try:
                    async with asyncio.timeout(0.1):
                        await peer.wait()
                except TimeoutError:
                    continue
        assert peer.returncode == 0, (await peer.stderr.read()).decode()  # type: ignore[union-attr]
        peer_tick = await cache.get_tick("EUR/USD", "peer")
        assert peer_tick is not None
    finally:
        if peer.returncode is None:
            peer.kill()
            await peer.wait()
        await bus.aclose()
        await cache.aclose()
