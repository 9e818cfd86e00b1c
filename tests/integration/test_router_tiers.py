"""The router's tiered read path on real servers: L1 → the strategy's route → backfill.

Which tier answered is told apart by putting a different value in each tier directly (L2
through ``router.cache.l2``, the database through ``router.storage``) and by the router's
own counters (``router.cache.get_stats()``). Time only moves through a
:class:`~data_manager.clock.ManualClock`; nothing here sleeps to wait for a TTL.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from data_manager.clock import ManualClock
from data_manager.models import CandleData, OrderFlowMetrics, TickData
from data_manager.router import DataRouter, StalenessReport
from data_manager.settings import DataManagerSettings, DragonflySettings, PostgresSettings
from data_manager.strategy import strategy_from_mapping

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from data_manager.cache.bus import CacheBus
    from data_manager.cache.redis import RedisCache
    from data_manager.health import CacheHealth
    from tests.servers import RedisServer

    RouterFactory = Callable[..., Awaitable[DataRouter]]

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

TS: Final = 1_727_996_400_000  # ManualClock's default wall time; a whole hour
SYM: Final = "EUR/USD"
SRC: Final = "ig"
CACHE_FIRST: Final = ["dragonfly_cache", "timescale"]
DB_ONLY: Final = ["timescale"]
DEADLINE: Final = 10.0  # seconds; generous, only reached when something is broken


# ----------------------------------------------------------------------------- helpers


def tick(ts: int = TS, bid: float = 1.1, *, symbol: str = SYM, source: str = SRC) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.0001, source=source)


def candle(
    ts: int = TS, close: float = 1.1, *, timeframe: str = "1m", symbol: str = SYM
) -> CandleData:
    return CandleData(
        symbol=symbol,
        timeframe=timeframe,
        timestamp=ts,
        open=close,
        high=close + 0.001,
        low=close - 0.001,
        close=close,
        source=SRC,
    )


def flow(
    ts: int = TS, ofi: float = 1.0, *, symbol: str = SYM, source: str = SRC
) -> OrderFlowMetrics:
    return OrderFlowMetrics(symbol=symbol, timestamp=ts, window_ms=1_000, ofi=ofi, source=source)


def l2_of(router: DataRouter) -> RedisCache:
    l2 = router.cache.l2
    assert l2 is not None, "the router has no L2 cache"
    return l2


def bus_of(router: DataRouter) -> CacheBus:
    bus = router._bus
    assert bus is not None, "the router has no cache bus"
    return bus


_FILLS: Final = frozenset({"put_ticks", "put_candles", "put_order_flow"})


async def backfills_done(router: DataRouter) -> None:
    """Await the L2 fills the router spawned in the background after a database read."""
    fills = [t for t in router._background if getattr(t.get_coro(), "__name__", "") in _FILLS]
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*fills)


async def stats(router: DataRouter) -> CacheHealth:
    return await router.cache.get_stats()


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` with a deadline (for fault tests, where no event reports it)."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not await condition():  # noqa: ASYNC110 - the state has no event to await
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


@pytest_asyncio.fixture(loop_scope="session")
async def make_router(
    postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> AsyncIterator[RouterFactory]:
    """Open routers on the test's schema and key prefix; all are closed afterwards.

    ``routing`` overrides the strategy's routes, ``strategy`` adds whole sections; the live
    aggregator is off unless asked for, so ticks do not also produce candles.
    """
    opened: list[DataRouter] = []

    async def make(
        *,
        clock: ManualClock | None = None,
        routing: Mapping[str, list[str]] | None = None,
        strategy: Mapping[str, Any] | None = None,
        redis: str | None = None,
    ) -> DataRouter:
        mapping: dict[str, Any] = {"aggregation": {"enabled": False}, **(strategy or {})}
        if routing is not None:
            mapping["routing"] = dict(routing)
        settings = DataManagerSettings(
            postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema),
            dragonfly=DragonflySettings(url=redis or redis_url, key_prefix=redis_prefix),
            watch_strategy=False,
            journal_dir=tmp_path / "j",
            write_mode="sync",
        )
        router = DataRouter(
            settings, clock=clock or ManualClock(), strategy=strategy_from_mapping(mapping)
        )
        await router.initialize()
        opened.append(router)
        return router

    yield make
    for router in reversed(opened):
        await router.close()


@dataclass(frozen=True)
class Kind:
    """One kind of "latest" data, with a marker value telling which copy a read returned."""

    name: str
    op: str  # the strategy's read operation

    async def put_db(
        self, router: DataRouter, marker: float, ts: int = TS, source: str = SRC
    ) -> None:
        if self.name == "tick":
            await router.storage.write_ticks([tick(ts, bid=marker, source=source)])
        elif self.name == "candles":
            await router.storage.write_candles([candle(ts - 60_000, marker), candle(ts, marker)])
        else:
            await router.storage.write_order_flow([flow(ts, ofi=marker, source=source)])

    async def put_l2(self, router: DataRouter, marker: float, ts: int = TS) -> None:
        l2 = l2_of(router)
        if self.name == "tick":
            await l2.put_ticks([tick(ts, bid=marker)])
        elif self.name == "candles":
            await l2.put_candles([candle(ts - 60_000, marker), candle(ts, marker)], complete=True)
        else:
            await l2.put_order_flow([flow(ts, ofi=marker)])

    async def read(self, router: DataRouter, *, source: str | None = None) -> float | None:
        """The marker of the value the router returns (None: no value)."""
        if self.name == "tick":
            got = await router.get_latest_tick(SYM, source=source)
            return None if got is None else got.bid
        if self.name == "candles":
            rows = await router.get_latest_candles(SYM, "1m", 2, source=source)
            return rows[-1].close if rows else None
        metrics = await router.get_latest_order_flow(SYM, source=source)
        return None if metrics is None else metrics.ofi

    async def l2_source(self, router: DataRouter, source: str | None) -> str | None:
        """The source of the latest value L2 holds for ``source`` (None: any source), or
        None when it has none (ticks and order flow only)."""
        l2 = l2_of(router)
        got = await (l2.get_tick if self.name == "tick" else l2.get_order_flow)(SYM, source)
        return None if got is None else got.source


KINDS: Final = [
    Kind("tick", "get_latest_tick"),
    Kind("candles", "get_latest_candles"),
    Kind("order_flow", "get_latest_order_flow"),
]
kinds = pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
LATEST_KINDS: Final = [k for k in KINDS if k.name != "candles"]
latest_kinds = pytest.mark.parametrize("kind", LATEST_KINDS, ids=[k.name for k in LATEST_KINDS])

DB_VALUE: Final = 1.25
L2_VALUE: Final = 1.5
LAGGING_VALUE: Final = 1.75


# ----------------------------------------------------------------------------- route order


@kinds
async def test_cache_first_route_answers_from_l2(make_router: RouterFactory, kind: Kind) -> None:
    router = await make_router(routing={kind.op: CACHE_FIRST})
    await kind.put_db(router, DB_VALUE)
    await kind.put_l2(router, L2_VALUE)

    assert await kind.read(router, source=SRC) == L2_VALUE
    s = await stats(router)
    assert (s.l1.misses, s.l2.hits, s.details["db_reads"]) == (1, 1, 0)


@kinds
async def test_database_only_route_never_asks_l2(make_router: RouterFactory, kind: Kind) -> None:
    router = await make_router(routing={kind.op: DB_ONLY})
    await kind.put_db(router, DB_VALUE)
    await kind.put_l2(router, L2_VALUE)

    assert await kind.read(router, source=SRC) == DB_VALUE
    s = await stats(router)
    assert (s.l2.hits, s.l2.misses, s.details["db_reads"]) == (0, 0, 1)
    l2 = l2_of(router).stats()
    assert (l2.hits, l2.misses) == (0, 0)
    await backfills_done(router)
    # The answer was not pushed into a tier the route does not name.
    assert await kind.read(router, source=SRC) == DB_VALUE  # L1 now
    if kind.name == "tick":
        assert (await l2_of(router).get_tick(SYM, SRC)).bid == L2_VALUE  # type: ignore[union-attr]


@kinds
async def test_l2_miss_falls_through_to_the_database(
    make_router: RouterFactory, kind: Kind
) -> None:
    router = await make_router(routing={kind.op: CACHE_FIRST})
    await kind.put_db(router, DB_VALUE)

    assert await kind.read(router, source=SRC) == DB_VALUE
    s = await stats(router)
    assert (s.l2.hits, s.l2.misses, s.details["db_reads"]) == (0, 1, 1)


@kinds
async def test_no_tier_has_it(make_router: RouterFactory, kind: Kind) -> None:
    router = await make_router()
    assert await kind.read(router) is None
    assert await kind.read(router, source=SRC) is None


# ----------------------------------------------------------------------------- backfill


@kinds
async def test_database_hit_fills_l2_and_l1(make_router: RouterFactory, kind: Kind) -> None:
    router = await make_router(routing={kind.op: CACHE_FIRST})
    await kind.put_db(router, DB_VALUE)

    assert await kind.read(router) == DB_VALUE
    await backfills_done(router)
    s = await stats(router)
    assert (s.l1.hits, s.details["db_reads"]) == (0, 1)

    assert await kind.read(router) == DB_VALUE  # filled L1
    s = await stats(router)
    assert (s.l1.hits, s.details["db_reads"]) == (1, 1)

    router.cache.l1.clear()
    assert await kind.read(router) == DB_VALUE  # filled L2
    s = await stats(router)
    assert (s.l2.hits, s.details["db_reads"]) == (1, 1), f"{kind.name} was not backfilled into L2"


@kinds
async def test_l2_hit_fills_l1(make_router: RouterFactory, kind: Kind) -> None:
    router = await make_router(routing={kind.op: CACHE_FIRST})
    await kind.put_l2(router, L2_VALUE)

    assert await kind.read(router, source=SRC) == L2_VALUE
    assert await kind.read(router, source=SRC) == L2_VALUE
    s = await stats(router)
    assert (s.l1.hits, s.l1.misses, s.l2.hits, s.details["db_reads"]) == (1, 1, 1, 0)
    assert l2_of(router).stats().hits == 1


@latest_kinds
async def test_a_per_source_database_read_never_makes_its_value_the_symbols_newest(
    make_router: RouterFactory, kind: Kind
) -> None:
    # An empty L2, as after a restart without persistence; the database's newest value of
    # the symbol comes from SRC, and a lagging source has an older one.
    router = await make_router(routing={kind.op: CACHE_FIRST})
    await kind.put_db(router, DB_VALUE)
    await kind.put_db(router, LAGGING_VALUE, TS - 5_000, "lagging")

    assert await kind.read(router, source="lagging") == LAGGING_VALUE  # L2 miss, database
    await backfills_done(router)
    # It fills the lagging source's entries only, in L2 and in L1.
    assert await kind.l2_source(router, "lagging") == "lagging"
    assert await kind.l2_source(router, None) is None
    assert await kind.read(router) == DB_VALUE  # L1 and L2 miss: the database's newest
    await backfills_done(router)
    assert await kind.l2_source(router, None) == SRC
    router.cache.l1.clear()
    assert await kind.read(router) == DB_VALUE  # from L2 now
    assert (await stats(router)).details["db_reads"] == 2


# ----------------------------------------------------------------------------- single-flight


async def test_concurrent_misses_share_one_database_read(
    make_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = await make_router(routing={"get_latest_tick": CACHE_FIRST})
    await router.storage.write_ticks([tick(bid=DB_VALUE)])
    storage = router.storage
    real = storage.latest_tick
    calls = 0
    entered, release = asyncio.Event(), asyncio.Event()

    async def gated(symbol: str, *, source: str | None = None) -> TickData | None:
        nonlocal calls
        calls += 1
        entered.set()
        await release.wait()  # hold the read open until every caller has asked
        return await real(symbol, source=source)

    monkeypatch.setattr(storage, "latest_tick", gated)
    readers = [asyncio.create_task(router.get_latest_tick(SYM)) for _ in range(50)]
    async with asyncio.timeout(10):
        await entered.wait()
    held = await stats(router)
    release.set()
    results = await asyncio.gather(*readers)

    assert calls == 1
    assert held.details["singleflight_shared"] == 49
    assert all(r is results[0] for r in results)  # the very same object for every caller
    assert results[0] is not None
    assert results[0].bid == DB_VALUE
    s = await stats(router)
    assert (s.l1.misses, s.l2.misses, s.details["db_reads"]) == (50, 1, 1)
    assert l2_of(router).stats().misses == 1  # one L2 GET as well


async def test_concurrent_candle_misses_share_a_read_but_not_a_list(
    make_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = await make_router(routing={"get_latest_candles": DB_ONLY})
    await router.storage.write_candles([candle(TS + i * 60_000) for i in range(5)])
    storage = router.storage
    real = storage.latest_candles
    calls = 0
    entered, release = asyncio.Event(), asyncio.Event()

    async def gated(*args: Any, **kwargs: Any) -> list[CandleData]:
        nonlocal calls
        calls += 1
        entered.set()
        await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(storage, "latest_candles", gated)
    readers = [
        asyncio.create_task(router.get_latest_candles(SYM, "1m", 5, source=SRC)) for _ in range(3)
    ]
    async with asyncio.timeout(10):
        await entered.wait()
    release.set()
    first, second, third = await asyncio.gather(*readers)
    assert calls == 1
    first.pop()  # a caller drops the newest bar: the others' answers are theirs
    assert (len(first), len(second), len(third)) == (4, 5, 5)
    assert second is not third


async def test_concurrent_misses_on_different_keys_are_not_merged(
    make_router: RouterFactory,
) -> None:
    router = await make_router(routing={"get_latest_tick": DB_ONLY})
    symbols = ["EUR/USD", "GBP/USD", "USD/JPY"]
    await router.storage.write_ticks([tick(symbol=s) for s in symbols])
    got = await asyncio.gather(*(router.get_latest_tick(s) for s in symbols for _ in range(5)))
    assert [t.symbol for t in got if t is not None] == [s for s in symbols for _ in range(5)]
    assert (await stats(router)).details["db_reads"] == 3


# ----------------------------------------------------------------------------- compare-and-set


async def test_shuffled_saves_leave_the_newest_tick_in_every_tier(
    make_router: RouterFactory,
) -> None:
    router = await make_router()
    # The first live write of a symbol has its any-source entry confirmed by a background
    # read of L2 and the database, whose older answer a later save may have overtaken (a
    # refused fill counts too): settle that entry before counting the saves' refusals.
    await router.save_tick(tick(TS - 1))
    confirming = [t for t in router._background if t.get_coro().__qualname__ == "SingleFlight.do"]
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*confirming)
    before = router.cache.l1.stats().stale_writes
    stamps = [TS + i for i in range(20)]
    random.Random(7).shuffle(stamps)
    for ts in stamps:
        await router.save_tick(tick(ts, bid=1.0 + (ts - TS) / 1000))
    newest = TS + 19
    assert router._bus is not None
    await router._bus.flush()

    assert (await router.get_latest_tick(SYM)).timestamp == newest  # type: ignore[union-attr]
    assert router.cache.l1.get_tick(SYM, SRC).timestamp == newest  # type: ignore[union-attr]
    l2 = l2_of(router)
    assert (await l2.get_tick(SYM)).timestamp == newest  # type: ignore[union-attr]
    assert (await l2.get_tick(SYM, SRC)).timestamp == newest  # type: ignore[union-attr]
    assert (await router.storage.latest_tick(SYM)).timestamp == newest  # type: ignore[union-attr]
    # Every save that was not a new maximum was refused by L1's compare-and-set (both keys).
    refused = sum(1 for i, ts in enumerate(stamps) if ts < max(stamps[: i + 1]))
    assert router.cache.l1.stats().stale_writes - before == 2 * refused


async def test_an_older_database_answer_never_replaces_a_newer_cached_tick(
    make_router: RouterFactory,
) -> None:
    router = await make_router()
    await router.storage.write_ticks([tick(TS, bid=DB_VALUE)])
    await router.save_tick(tick(TS + 5, bid=L2_VALUE))
    assert router._bus is not None
    await router._bus.flush()
    # A backfill of the older database row into both caches is refused.
    await l2_of(router).put_ticks([tick(TS, bid=DB_VALUE)])
    router.cache.l1.put_tick(tick(TS, bid=DB_VALUE))
    assert (await router.get_latest_tick(SYM)).bid == L2_VALUE  # type: ignore[union-attr]
    router.cache.l1.clear()
    assert (await router.get_latest_tick(SYM)).bid == L2_VALUE  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- L2 outage


async def test_l2_outage_degrades_reads_to_the_database_and_recovers_without_restart(
    make_router: RouterFactory, redis_server_factory: Callable[[], RedisServer]
) -> None:
    server = await asyncio.to_thread(redis_server_factory)
    clock = ManualClock()
    router = await make_router(clock=clock, redis=server.url)
    l2 = l2_of(router)
    await router.save_tick(tick(TS, 1.0))
    assert router._bus is not None
    await router._bus.flush()
    assert await l2.get_tick(SYM) is not None

    await asyncio.to_thread(server.stop)

    async def lost() -> bool:
        return (await stats(router)).subscription == "lost"

    await until(lost, "the router to notice its subscription is gone")
    for _ in range(6):  # enough failures to open the breaker
        assert (await router.get_latest_tick(SYM)).timestamp == TS  # type: ignore[union-attr]
    assert l2.breaker_state == "open"
    before = l2.stats()
    for _ in range(5):
        assert (await router.get_latest_tick(SYM)).timestamp == TS  # type: ignore[union-attr]
    after = l2.stats()
    # Open breaker: L2 is not even tried (no connect, no timeout), the database answers.
    assert after.short_circuited >= before.short_circuited + 5
    assert after.errors == before.errors
    s = await stats(router)
    assert s.details["db_reads"] == 11
    assert s.l1.hits == 0  # L1 is bypassed while the subscription is lost

    await router.save_tick(tick(TS + 1, 2.0))  # sync mode: the database has it on return
    assert (await router.storage.latest_tick(SYM)).timestamp == TS + 1  # type: ignore[union-attr]
    health = await router.health_check()
    assert health.status == "degraded"
    assert health.cache.l2_reachable is False
    assert health.cache.l2_circuit == "open"
    assert health.cache.subscription == "lost"
    assert "L2" in health.reason

    await asyncio.to_thread(server.start)
    clock.advance(l2.breaker.reset_timeout + 1)  # the breaker's clock is the router's

    async def connected() -> bool:
        return (await stats(router)).subscription == "connected"

    await until(connected, "the subscription to come back")
    # The restarted server is empty: L2 misses, the database answers and refills L2 ...
    assert (await router.get_latest_tick(SYM)).timestamp == TS + 1  # type: ignore[union-attr]

    async def closed() -> bool:  # this read, or the refresh of L2 under way, was the probe
        return l2.breaker_state == "closed"

    await until(closed, "the L2 breaker to close after its probe")
    await backfills_done(router)
    assert (await l2.get_tick(SYM)).timestamp == TS + 1  # type: ignore[union-attr]
    # ... and L1 and L2 serve again, with the same router.
    hits = (await stats(router)).l1.hits
    assert (await router.get_latest_tick(SYM)).timestamp == TS + 1  # type: ignore[union-attr]
    assert (await stats(router)).l1.hits == hits + 1
    router.cache.l1.clear()
    l2_hits = (await stats(router)).l2.hits
    assert (await router.get_latest_tick(SYM)).timestamp == TS + 1  # type: ignore[union-attr]
    assert (await stats(router)).l2.hits == l2_hits + 1
    health = await router.health_check()
    assert health.status == "healthy", health.reason


class HeldL2Reads:
    """Stands in for one L2 getter: call ``n`` reads L2, reports it in ``read[n]``, then
    waits for ``release(n)`` before it answers."""

    def __init__(self, real: Callable[..., Awaitable[Any]]) -> None:
        self._real = real
        self._calls = 0
        self.read: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self._released: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)

    async def __call__(self, *args: Any) -> Any:
        n = self._calls
        self._calls += 1
        value = await self._real(*args)
        self.read[n].set()
        await self._released[n].wait()
        return value

    def release(self, n: int) -> None:
        self._released[n].set()


L2_GETTERS: Final = {"tick": "get_tick", "candles": "get_candles", "order_flow": "get_order_flow"}


async def read_across_lost_subscription(
    router: DataRouter, server: RedisServer, kind: Kind, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Task[float | None], HeldL2Reads]:
    """Start a read that takes ``DB_VALUE`` from L2 and is held there while the router's
    subscription is lost and restored, and L2 takes ``L2_VALUE`` (newer) meanwhile."""
    await kind.put_l2(router, DB_VALUE)
    l2 = l2_of(router)
    held = HeldL2Reads(getattr(l2, L2_GETTERS[kind.name]))
    monkeypatch.setattr(l2, L2_GETTERS[kind.name], held)
    before = asyncio.create_task(kind.read(router, source=SRC))
    await held.read[0].wait()
    restored = bus_of(router).stats().restored
    admin = Redis.from_url(server.url, socket_timeout=5)
    try:
        assert await admin.client_kill_filter(_type="pubsub") >= 1
    finally:
        await admin.aclose()
    await kind.put_l2(router, L2_VALUE, TS + 60_000)  # the router's L1 cannot hear of it

    async def resubscribed() -> bool:
        return bus_of(router).stats().restored > restored

    await until(resubscribed, "the router to subscribe again")
    return before, held


@kinds
async def test_a_read_begun_before_a_lost_subscription_does_not_fill_l1_after_it(
    make_router: RouterFactory,
    redis_server_factory: Callable[[], RedisServer],
    kind: Kind,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its value predates what L2 took during the outage: put in the L1 the restore
    emptied, it would be served instead of L2's newer one."""
    server = await asyncio.to_thread(redis_server_factory)
    router = await make_router(routing={kind.op: CACHE_FIRST}, redis=server.url)
    before, held = await read_across_lost_subscription(router, server, kind, monkeypatch)
    held.release(0)
    assert await before == DB_VALUE  # begun before the outage: an answer of its time
    held.release(1)
    assert await kind.read(router, source=SRC) == L2_VALUE


@kinds
async def test_a_read_begun_after_a_restored_subscription_does_not_share_an_older_one(
    make_router: RouterFactory,
    redis_server_factory: Callable[[], RedisServer],
    kind: Kind,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Single-flight must not hand a read that starts after the restore the answer of the
    same key's read that began before the outage."""
    server = await asyncio.to_thread(redis_server_factory)
    router = await make_router(routing={kind.op: CACHE_FIRST}, redis=server.url)
    before, held = await read_across_lost_subscription(router, server, kind, monkeypatch)
    after = asyncio.create_task(kind.read(router, source=SRC))  # runs before ``before`` resumes
    held.release(0)
    assert await before == DB_VALUE
    held.release(1)
    assert await after == L2_VALUE


# ----------------------------------------------------------------------------- TTL and staleness


async def test_a_router_whose_l2_is_down_still_reads_its_own_writes(
    make_router: RouterFactory,
) -> None:
    # Nothing listens on port 1: no subscription, so L1 is bypassed from the start.
    router = await make_router(
        redis="redis://127.0.0.1:1/0", strategy={"batch": {"flush_interval_seconds": 3600.0}}
    )
    assert not router._l1_enabled
    await router.save_tick(tick(TS + 1_000, 1.10), mode="sync")
    await router.save_tick(tick(TS + 2_000, 1.20), mode="buffered")  # not stored yet
    for source in (None, SRC):
        got = await router.get_latest_tick(SYM, source=source)
        assert got is not None
        assert got.bid == 1.20
    # A newer value stored by someone else still wins over its own older write.
    await router.storage.write_ticks([tick(TS + 3_000, 1.30)])
    got = await router.get_latest_tick(SYM)
    assert got is not None
    assert got.bid == 1.30


async def test_l1_tick_ttl_expiry_falls_back_to_l2_then_the_database(
    make_router: RouterFactory,
) -> None:
    clock = ManualClock()
    router = await make_router(clock=clock, strategy={"cache": {"l1_tick_ttl_seconds": 10}})
    await router.save_tick(tick(bid=L2_VALUE))
    assert router._bus is not None
    await router._bus.flush()
    assert (await router.get_latest_tick(SYM)).bid == L2_VALUE  # type: ignore[union-attr]
    assert (await stats(router)).l1.hits == 1

    clock.advance(11)
    assert (await router.get_latest_tick(SYM)).bid == L2_VALUE  # type: ignore[union-attr]
    s = await stats(router)
    assert (s.l1.hits, s.l2.hits, s.details["db_reads"]) == (1, 1, 0)

    # L2's copy gone too (its TTL runs on the server's clock; deleting stands in for it):
    # the cache expiring never hides what the database holds.
    client = l2_of(router).client
    await client.delete(l2_of(router).tick_key(SYM), l2_of(router).tick_key(SYM, SRC))
    clock.advance(11)
    assert (await router.get_latest_tick(SYM)).bid == L2_VALUE  # type: ignore[union-attr]
    s = await stats(router)
    assert (s.l2.misses, s.details["db_reads"]) == (1, 1)


async def test_l1_ttl_expiry_with_database_only_route_reads_the_database(
    make_router: RouterFactory,
) -> None:
    clock = ManualClock()
    router = await make_router(clock=clock, routing={"get_latest_tick": DB_ONLY})
    await router.save_tick(tick(bid=DB_VALUE))
    assert (await router.get_latest_tick(SYM)).bid == DB_VALUE  # type: ignore[union-attr]
    assert (await stats(router)).details["db_reads"] == 0  # L1 answered

    clock.advance(router.strategy.cache.l1_tick_ttl_seconds + 1)
    assert (await router.get_latest_tick(SYM)).bid == DB_VALUE  # type: ignore[union-attr]
    assert (await stats(router)).details["db_reads"] == 1


async def test_l2_entries_carry_the_strategy_ttls(make_router: RouterFactory) -> None:
    router = await make_router(
        strategy={"cache": {"tick_ttl_seconds": 30, "order_flow_ttl_seconds": 40}}
    )
    await router.save_tick(tick())
    await router.save_order_flow(flow())
    assert router._bus is not None
    await router._bus.flush()
    l2 = l2_of(router)
    tick_ms = await l2.client.pttl(l2.tick_key(SYM))
    flow_ms = await l2.client.pttl(l2.order_flow_key(SYM))
    assert 25_000 < tick_ms <= 30_000
    assert 35_000 < flow_ms <= 40_000


async def test_staleness_report_shape_and_no_data(make_router: RouterFactory) -> None:
    router = await make_router()
    report = await router.check_staleness(SYM)
    assert isinstance(report, StalenessReport)
    assert isinstance(report, Mapping)
    assert dict(report) == {"tick": True, "candle": True, "order_flow": True}
    assert (report.tick, report.candle, report.order_flow) == (True, True, True)


async def test_staleness_follows_the_clock(make_router: RouterFactory) -> None:
    clock = ManualClock()
    router = await make_router(clock=clock)
    now = clock.time_ms()
    await router.save_tick(tick(now))
    await router.save_order_flow(flow(now))
    # A closed 1m candle whose bucket ended 100 s ago (the 1m threshold is 120 s).
    await router.save_candle(candle(now - 160_000))
    assert dict(await router.check_staleness(SYM)) == {
        "tick": False,
        "candle": False,
        "order_flow": False,
    }

    clock.advance(3)  # tick threshold 2 s, order flow 5 s
    assert dict(await router.check_staleness(SYM)) == {
        "tick": True,
        "candle": False,
        "order_flow": False,
    }
    clock.advance(3)
    assert dict(await router.check_staleness(SYM)) == {
        "tick": True,
        "candle": False,
        "order_flow": True,
    }
    clock.advance(15)  # the candle's bucket end is now 121 s old
    assert (await router.check_staleness(SYM)).candle is True


async def test_candle_staleness_is_measured_from_the_bucket_end(
    make_router: RouterFactory,
) -> None:
    clock = ManualClock()
    router = await make_router(clock=clock)
    now = clock.time_ms()
    # An hourly bucket that started 2 h ago ended 1 h ago: fresh for 1h (7200 s) ...
    await router.save_candle(candle(now - 7_200_000, timeframe="1h"))
    assert (await router.check_staleness(SYM, timeframe="1h")).candle is False
    # ... although its start is older than 7200 s; stale 7200 s after its end.
    clock.advance(3_601)
    assert (await router.check_staleness(SYM, timeframe="1h")).candle is True


async def test_per_timeframe_staleness_from_the_strategy(make_router: RouterFactory) -> None:
    clock = ManualClock()
    router = await make_router(clock=clock, strategy={"staleness": {"per_timeframe": {"1h": 600}}})
    now = clock.time_ms()
    await router.save_candle(candle(now - 3_600_000 - 700_000, timeframe="1h"))  # ended 700 s ago
    await router.save_candle(candle(now - 300_000 - 500_000, timeframe="5m"))  # ended 500 s ago
    assert (await router.check_staleness(SYM, timeframe="1h")).candle is True  # 700 > 600
    assert (await router.check_staleness(SYM, timeframe="5m")).candle is False  # 500 < 5 × 120


# ----------------------------------------------------------------------------- warm start


async def test_warm_start_loads_ticks_and_candles_in_few_queries(
    make_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = await make_router()
    symbols = ["EUR/USD", "GBP/USD", "USD/JPY"]
    storage = router.storage
    await storage.write_ticks([tick(TS + i, symbol=s) for s in symbols for i in range(3)])
    await storage.write_candles(
        [
            candle(TS - i * tf_ms, symbol=s, timeframe=tf)
            for s in symbols
            for tf, tf_ms in (("1m", 60_000), ("5m", 300_000))
            for i in range(4)
        ]
    )
    calls: dict[str, int] = {}
    for name in ("latest_tick", "latest_ticks", "latest_candles", "latest_candles_many"):
        real = getattr(storage, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(storage, name, counted)

    loaded = await router.warm_start(symbols, ["1m", "5m"], limit=10)

    assert loaded == 3 + 3 * 2 * 4
    assert sum(calls.values()) <= 2, calls
    l2 = l2_of(router)
    for sym in symbols:
        assert (await router.get_latest_tick(sym)).timestamp == TS + 2  # type: ignore[union-attr]
        for tf in ("1m", "5m"):
            assert len(await router.get_latest_candles(sym, tf, 10)) == 4
            assert len(await l2.get_candles(sym, tf, 10, SRC) or []) == 4
        assert (await l2.get_tick(sym)).timestamp == TS + 2  # type: ignore[union-attr]
    s = await stats(router)
    assert (s.l1.misses, s.details["db_reads"]) == (0, 0)
    assert s.l1.hits == 3 + 6
    assert sum(calls.values()) <= 2, calls  # the reads above did not touch the database


# ----------------------------------------------------------------------------- rebuilt candles

AGG_SRC: Final = "agg:ig"
LATE_REBUILD: Final = {
    "aggregation": {
        "enabled": True,
        "timeframes": ["1m"],
        "late_policy": "rebuild",
        "publish_interval_seconds": 0,
    }
}


def bar(candle: CandleData) -> tuple[int, float, float, float, float, int | None, bool]:
    return (
        candle.timestamp,
        candle.open,
        candle.high,
        candle.low,
        candle.close,
        candle.num_trades,
        candle.is_closed,
    )


def l1_bars(router: DataRouter, limit: int) -> list[tuple[Any, ...]] | None:
    ring = router.cache.l1.get_candles(SYM, "1m", limit, AGG_SRC)
    return None if ring is None else [bar(c) for c in ring]


# ----------------------------------------------------------------------------- candle rings
# The database lags behind live candles (write-behind): a reader's ring, fed live, must not
# be taken for the whole series, nor joined to older stored candles across a gap.

WRITE_BEHIND: Final = {"batch": {"flush_interval_seconds": 3600.0}}
MINUTE: Final = 60_000


def minutes(rows: list[CandleData]) -> list[int]:
    return [(c.timestamp - TS) // MINUTE for c in rows]


async def until_live(router: DataRouter, minute: int) -> None:
    async def arrived() -> bool:
        ring = router.cache.l1.peek_candles(SYM, "1m", SRC)
        return bool(ring) and ring[-1].timestamp == TS + minute * MINUTE

    await until(arrived, f"the candle of minute {minute} to reach the reader's L1")


async def test_live_candles_the_database_lacks_yet_are_not_cached_as_the_whole_series(
    make_router: RouterFactory,
) -> None:
    writer = await make_router(strategy=WRITE_BEHIND)
    for i in (1, 2, 3):
        await writer.save_candle(candle(TS + i * MINUTE), mode="buffered")
    await bus_of(writer).flush()
    reader = await make_router(strategy=WRITE_BEHIND)  # sees the next ones live only
    for i in (4, 5):
        await writer.save_candle(candle(TS + i * MINUTE), mode="buffered")
    await bus_of(writer).flush()
    await until_live(reader, 5)
    # Nothing is stored yet and L2's ring does not say it is the whole series: the reader
    # answers with what it has, without caching that as complete...
    assert minutes(await reader.get_latest_candles(SYM, "1m", 10, source=SRC)) == [4, 5]
    await writer.flush()
    # ... so once stored, the older candles are there.
    got = await reader.get_latest_candles(SYM, "1m", 10, source=SRC)
    assert minutes(got) == [1, 2, 3, 4, 5]


async def test_a_gap_between_stored_and_live_candles_is_never_cached(
    make_router: RouterFactory,
) -> None:
    writer = await make_router(strategy=WRITE_BEHIND)
    await writer.storage.write_candles([candle(TS + i * MINUTE) for i in range(1, 11)])
    await writer.save_candle(candle(TS + 11 * MINUTE), mode="buffered")  # queued, not stored
    await bus_of(writer).flush()
    l2 = l2_of(writer)
    await l2.client.delete(l2.candle_key(SYM, "1m", SRC))  # L2 lost the ring (evicted)
    reader = await make_router(strategy=WRITE_BEHIND)
    await writer.save_candle(candle(TS + 12 * MINUTE), mode="buffered")
    await bus_of(writer).flush()
    await until_live(reader, 12)
    # Minute 11 is in no tier the reader can see: this answer has the gap, but it is kept
    # neither in its L1 nor in L2.
    assert minutes(await reader.get_latest_candles(SYM, "1m", 5, source=SRC)) == [7, 8, 9, 10, 12]
    await backfills_done(reader)
    await writer.flush()
    got = await reader.get_latest_candles(SYM, "1m", 5, source=SRC)
    assert minutes(got) == [8, 9, 10, 11, 12]
    await backfills_done(reader)
    other = await make_router(strategy=WRITE_BEHIND)
    got = await other.get_latest_candles(SYM, "1m", 5, source=SRC)
    assert minutes(got) == [8, 9, 10, 11, 12]
    assert (await stats(other)).l2.hits == 1  # from the ring the reader backfilled


async def test_a_preferred_source_saved_by_another_router_is_what_reads_resolve_to(
    make_router: RouterFactory,
) -> None:
    preference = {"sources": {"candle_preference": ["alpha"]}}
    reader = await make_router(strategy=preference)
    writer = await make_router(strategy=preference)

    def bar(i: int, source: str) -> CandleData:
        return candle(TS + i * MINUTE).model_copy(update={"source": source})

    for i in range(4):
        await writer.save_candle(bar(i, "beta"))
    assert {c.source for c in await reader.get_latest_candles(SYM, "1m", 3)} == {"beta"}
    for i in range(4):
        await writer.save_candle(bar(i, "alpha"))
    await bus_of(writer).flush()

    async def resolved_to_alpha() -> bool:
        return {c.source for c in await reader.get_latest_candles(SYM, "1m", 3)} == {"alpha"}

    await until(resolved_to_alpha, "the reader to answer with the preferred source")


async def test_an_l1_clear_forgets_the_candle_sources_it_resolved(
    make_router: RouterFactory,
) -> None:
    preference = {"sources": {"candle_preference": ["alpha"]}}
    reader = await make_router(strategy=preference)
    await reader.storage.write_candles([candle(TS).model_copy(update={"source": "beta"})])
    assert {c.source for c in await reader.get_latest_candles(SYM, "1m", 1)} == {"beta"}
    # Written while this router could not hear of it (its subscription was down).
    await reader.storage.write_candles([candle(TS).model_copy(update={"source": "alpha"})])
    reader._on_subscription_lost()
    reader._on_subscription_restored()
    assert {c.source for c in await reader.get_latest_candles(SYM, "1m", 1)} == {"alpha"}


async def test_a_late_tick_rebuild_reaches_l2_other_routers_and_subscribers(
    make_router: RouterFactory,
) -> None:
    """late_policy="rebuild": the rebuilt closed candle replaces the superseded one in every
    tier, not only in the router that rebuilt it and the database."""
    a = await make_router(strategy=LATE_REBUILD)
    b = await make_router(strategy=LATE_REBUILD)
    sub = a.subscribe_candles(SYM, "1m", source=AGG_SRC)
    await a.save_tick(tick(TS + 1_000, 1.10))
    await a.save_tick(tick(TS + 61_000, 1.12))  # closes the bucket of TS
    await a.save_tick(tick(TS + 30_000, 1.50))  # late for it: a new high, a rebuild owed
    await a.flush()  # stores the late tick, then the rebuilt candle
    await a.cache.flush()
    stored = await a.storage.candles_range(SYM, "1m", TS, TS + 1, source=AGG_SRC)
    assert len(stored) == 1
    rebuilt = bar(stored[0])
    assert stored[0].high > 1.5
    assert stored[0].num_trades == 2

    in_l2 = await l2_of(a).get_candles(SYM, "1m", 2, AGG_SRC)
    assert in_l2 is not None
    assert bar(in_l2[0]) == rebuilt

    async def b_has_it() -> bool:
        ring = l1_bars(b, 2)
        return ring is not None and ring[0] == rebuilt

    await until(b_has_it, "router B's L1 to take the rebuilt candle")
    delivered = [bar(await anext(sub)) for _ in range(sub.pending)]
    closed = [c for c in delivered if c[0] == TS and c[-1]]
    assert closed[-1] == rebuilt


@pytest.mark.parametrize("method", ["sql", "stream"])
async def test_rebuild_candles_replaces_cached_candles_and_sends_one_ring(
    make_router: RouterFactory, method: str
) -> None:
    """``rebuild_candles`` puts its candles where live ones go (the live write: a closed
    candle replaces a closed one), but only the newest ``candle_ring_size`` per series."""
    ring = 3
    clock = ManualClock(wall_ms=TS + 3_600_000)  # every rebuilt bucket has ended
    strategy = {"cache": {"candle_ring_size": ring}}
    a = await make_router(clock=clock, strategy=strategy)
    b = await make_router(clock=clock, strategy=strategy)
    newest_start = TS + 5 * 60_000
    wrong = CandleData(
        symbol=SYM,
        timeframe="1m",
        timestamp=newest_start,
        open=1.0,
        high=9.0,
        low=1.0,
        close=1.0,
        source=AGG_SRC,
    )
    await a.save_candle(wrong)  # every tier holds a closed candle the rebuild corrects
    await a.save_ticks(
        [
            tick(TS + i * 60_000 + j * 1_000, 1.1 + i / 100 + j / 1000)
            for i in range(6)
            for j in (1, 2)
        ]
    )
    await a.cache.flush()

    async def b_holds(expected: tuple[Any, ...]) -> bool:
        return l1_bars(b, 1) == [expected]

    await until(lambda: b_holds(bar(wrong)), "router B's L1 to take the wrong candle")
    sent = bus_of(a).stats().published

    assert await a.rebuild_candles(SYM, "1m", TS, TS + 6 * 60_000, method=method) == 6  # type: ignore[arg-type]
    await a.cache.flush()

    assert bus_of(a).stats().published - sent == ring  # not one update per rebuilt bar
    stored = await a.storage.candles_range(SYM, "1m", TS, TS + 6 * 60_000, source=AGG_SRC)
    newest = bar(stored[-1])
    assert newest[0] == newest_start
    assert newest[2] < 2  # the rebuilt high, not the wrong one
    in_l2 = await l2_of(a).get_candles(SYM, "1m", 1, AGG_SRC)
    assert in_l2 is not None
    assert [bar(c) for c in in_l2] == [newest]
    assert l1_bars(a, 1) == [newest]
    await until(lambda: b_holds(newest), "router B's L1 to take the rebuilt candle")


# ----------------------------------------------------------------------------- stats


async def test_cache_stats_count_hits_misses_and_size(make_router: RouterFactory) -> None:
    router = await make_router()
    empty = await stats(router)
    assert (empty.l1_entries, empty.l1.hit_rate, empty.l2.hit_rate) == (0, None, None)
    assert empty.l2_configured
    assert empty.subscription == "connected"

    await router.storage.write_ticks([tick(bid=DB_VALUE)])
    await router.get_latest_tick(SYM)  # L1 miss, L2 miss, database
    await backfills_done(router)
    await router.get_latest_tick(SYM)  # L1 hit
    router.cache.l1.clear()
    await router.get_latest_tick(SYM)  # L1 miss, L2 hit
    await router.get_latest_tick(SYM)  # L1 hit

    s = await stats(router)
    assert (s.l1.hits, s.l1.misses, s.l1.hit_rate) == (2, 2, 0.5)
    assert (s.l2.hits, s.l2.misses, s.l2.hit_rate) == (1, 1, 0.5)
    assert s.details["db_reads"] == 1
    assert s.l1_entries >= 1
    assert s.l1_bytes_estimate > 0
    assert s.l2_circuit == "closed"

    for i in range(10):
        await router.save_tick(tick(symbol=f"SYM{i}"))
    more = await stats(router)
    assert more.l1_entries >= s.l1_entries + 10
    assert more.l1_bytes_estimate > s.l1_bytes_estimate


async def test_health_reports_cache_tiers(make_router: RouterFactory) -> None:
    router = await make_router()
    health = await router.health_check()
    assert health.status == "healthy", health.reason
    assert health.cache.l2_reachable is True
    assert health.cache.l2_version is not None
    assert health.cache.subscription == "connected"


async def test_l2_is_read_directly_by_another_client(
    make_router: RouterFactory, redis_url: str
) -> None:
    """What the router writes to L2 is plain JSON under the documented key."""
    router = await make_router()
    await router.save_tick(tick(bid=L2_VALUE))
    assert router._bus is not None
    await router._bus.flush()
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        raw = await client.get(l2_of(router).tick_key(SYM))
    finally:
        await client.aclose()
    assert isinstance(raw, bytes)
    assert b'"bid":1.5' in raw.replace(b" ", b"")
