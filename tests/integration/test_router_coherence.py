"""Coherence between routers: pub/sub into L1, compare-and-set against remote updates, a lost
subscription, two OS processes, and a fork.

Routers in one test share the test's schema and key prefix, so they see each other exactly as
separate processes on one machine do. Pub/sub delivery is polled with a deadline: no event
of the other router is observable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import urlsplit

import asyncpg
import psutil
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from data_manager.clock import Clock, ManualClock, SystemClock
from data_manager.errors import CacheError, DatabaseConnectionError
from data_manager.models import CandleData, TickData
from data_manager.router import DataRouter
from data_manager.settings import DataManagerSettings, DragonflySettings, PostgresSettings
from data_manager.storage.base import tick_content_key
from data_manager.strategy import strategy_from_mapping
from tests.integration.test_bus import bar, fail_applies

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from data_manager.cache.bus import CacheBus
    from data_manager.cache.redis import RedisCache
    from tests.servers import RedisServer

    RouterFactory = Callable[..., Awaitable[DataRouter]]

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

TS: Final = 1_727_996_400_000
SYM: Final = "EUR/USD"
SRC: Final = "ig"
MINUTE: Final = 60_000
DEADLINE: Final = 10.0  # seconds; generous, only reached when something is broken
CHILD: Final = Path(__file__).with_name("_router_child.py")
ROOT: Final = Path(__file__).parents[2]


# ----------------------------------------------------------------------------- helpers


def tick(ts: int = TS, bid: float = 1.1, *, symbol: str = SYM, source: str = SRC) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.0001, source=source)


def candle(ts: int, close: float = 1.1) -> CandleData:
    return CandleData(
        symbol=SYM,
        timeframe="1m",
        timestamp=ts,
        open=1.1,
        high=1.2,
        low=1.0,
        close=close,
        volume=10,
        source=SRC,
    )


def l2_of(router: DataRouter) -> RedisCache:
    l2 = router.cache.l2
    assert l2 is not None, "the router has no L2 cache"
    return l2


def bus_of(router: DataRouter) -> CacheBus:
    bus = router._bus
    assert bus is not None, "the router has no cache bus"
    return bus


def l1_ts(router: DataRouter, symbol: str = SYM) -> int | None:
    """Timestamp of the tick in the router's L1 (no lower tier is asked)."""
    got = router.cache.l1.get_tick(symbol)
    return None if got is None else got.timestamp


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` with a deadline (pub/sub delivery has no event to await here)."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not condition():  # noqa: ASYNC110 - nothing to await but the other side
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def until_async(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Like :func:`until`, for a condition that has to ask a server."""
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
    """Open routers on the test's schema and key prefix; all are closed afterwards."""
    opened: list[DataRouter] = []

    async def make(
        *,
        clock: Clock | None = None,
        strategy: Mapping[str, Any] | None = None,
        redis: str | None = None,
    ) -> DataRouter:
        mapping: dict[str, Any] = {"aggregation": {"enabled": False}, **(strategy or {})}
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


# ----------------------------------------------------------------------------- pub/sub into L1


async def test_a_write_reaches_the_other_routers_l1(make_router: RouterFactory) -> None:
    a, b = await make_router(), await make_router()
    await a.save_tick(tick(TS, 1.5))
    await until(lambda: l1_ts(b) == TS, "router B's L1 to receive A's tick")
    got = await b.get_latest_tick(SYM)
    assert got is not None
    assert (got.timestamp, got.bid) == (TS, 1.5)
    s = await b.cache.get_stats()
    assert (s.l1.hits, s.l1.misses, s.details["db_reads"]) == (1, 0, 0)


async def test_a_remote_older_update_never_replaces_a_newer_one(
    make_router: RouterFactory,
) -> None:
    a, b = await make_router(), await make_router()
    await a.save_tick(tick(TS + 10, 1.0))
    await until(lambda: l1_ts(b) == TS + 10, "router B's L1 to receive A's tick")

    received = bus_of(a).stats().received
    await b.save_tick(tick(TS + 5, 2.0))  # older: B's L1 and L2 refuse it, A gets it anyway
    await bus_of(b).flush()
    await until(lambda: bus_of(a).stats().received > received, "A to receive B's older tick")

    for router in (a, b):
        got = await router.get_latest_tick(SYM)
        assert got is not None
        assert (got.timestamp, got.bid) == (TS + 10, 1.0)
    assert a.cache.l1.stats().stale_writes >= 1
    l2_tick = await l2_of(a).get_tick(SYM)
    assert l2_tick is not None
    assert l2_tick.timestamp == TS + 10
    # The database keeps both ticks; the newest is still the newest.
    db_tick = await a.storage.latest_tick(SYM)
    assert db_tick is not None
    assert db_tick.timestamp == TS + 10


async def test_remote_updates_arriving_out_of_order_settle_on_the_newest(
    make_router: RouterFactory,
) -> None:
    writers = [await make_router() for _ in range(3)]
    reader = await make_router()
    stamps = [TS + 7, TS + 3, TS + 9, TS + 1, TS + 8, TS + 2]
    for i, ts in enumerate(stamps):
        await writers[i % 3].save_tick(tick(ts, 1.0 + i / 10))
    for w in writers:
        await bus_of(w).flush()
    await until(lambda: l1_ts(reader) == TS + 9, "the reader's L1 to settle")
    await until(
        lambda: bus_of(reader).stats().received >= len(stamps), "every update to reach the reader"
    )
    assert l1_ts(reader) == TS + 9
    for w in writers:
        assert l1_ts(w) == TS + 9
    l2_tick = await l2_of(reader).get_tick(SYM)
    assert l2_tick is not None
    assert l2_tick.timestamp == TS + 9


async def test_equal_timestamps_of_two_sources_settle_on_one_tick_everywhere(
    make_router: RouterFactory,
) -> None:
    """Two feeds quote the same millisecond through two routers. Whichever order each tier
    sees them in (a router applies its own tick before the other's arrives), every L1 and L2
    keep the same one: the higher source."""
    a, b = await make_router(), await make_router()

    async def settled() -> set[tuple[str, int]]:
        l2_tick = await l2_of(a).get_tick(SYM)
        assert l2_tick is not None
        held = [r.cache.l1.get_tick(SYM) for r in (a, b)] + [l2_tick]
        return {(t.source, t.timestamp) for t in held if t is not None}

    # One after the other, the later arrival being the lower source everywhere.
    await a.save_tick(tick(TS, 1.2, source="srcB"))
    await bus_of(a).flush()
    await until(lambda: b.cache.l1.get_tick(SYM, "srcB") is not None, "B to get srcB's tick")
    await b.save_tick(tick(TS, 1.1, source="srcA"))
    await bus_of(b).flush()
    await until(lambda: a.cache.l1.get_tick(SYM, "srcA") is not None, "A to get srcA's tick")
    assert await settled() == {("srcB", TS)}
    # At once: each router takes its own tick first and the other's from the bus.
    await asyncio.gather(
        a.save_tick(tick(TS + 1, 1.1, source="srcA")),
        b.save_tick(tick(TS + 1, 1.2, source="srcB")),
    )
    await bus_of(a).flush()
    await bus_of(b).flush()
    await until(lambda: a.cache.l1.get_tick(SYM, "srcB").timestamp == TS + 1, "A to get srcB")  # type: ignore[union-attr]
    await until(lambda: b.cache.l1.get_tick(SYM, "srcA").timestamp == TS + 1, "B to get srcA")  # type: ignore[union-attr]
    assert await settled() == {("srcB", TS + 1)}


async def test_a_per_source_read_never_makes_its_tick_the_symbols_newest(
    make_router: RouterFactory,
) -> None:
    a = await make_router()
    await a.save_tick(tick(TS, 1.1, source="lagging"))
    await a.save_tick(tick(TS + 5_000, 1.2, source="fast"))  # the symbol's newest
    await bus_of(a).flush()
    b = await make_router()  # a new process: its L1 is empty
    got = await b.get_latest_tick(SYM, source="lagging")  # read through L2 into L1
    assert got is not None
    assert got.source == "lagging"
    newest = await b.get_latest_tick(SYM)
    assert newest is not None
    assert (newest.source, newest.timestamp) == ("fast", TS + 5_000)


async def test_a_relayed_tick_l2_refused_never_becomes_the_symbols_newest(
    make_router: RouterFactory,
) -> None:
    a = await make_router()
    await a.save_tick(tick(TS + 5_000, 1.2, source="fast"))
    await bus_of(a).flush()
    b = await make_router()  # subscribes after fast's tick went by (or cleared its L1)
    await a.save_tick(tick(TS, 1.1, source="lagging"))  # older: L2's any-source key keeps fast's
    await until(lambda: b.cache.l1.get_tick(SYM, "lagging") is not None, "B to get the tick")
    newest = await b.get_latest_tick(SYM)
    assert newest is not None
    assert (newest.source, newest.timestamp) == ("fast", TS + 5_000)
    assert l1_ts(b) == TS + 5_000  # the read settled B's L1 on it


async def test_a_relayed_late_tick_never_becomes_its_sources_newest(
    make_router: RouterFactory,
) -> None:
    a = await make_router()
    await a.save_tick(tick(TS + 5_000, 1.2))
    await bus_of(a).flush()
    b = await make_router()  # has no entry for the source yet
    await a.save_tick(tick(TS, 1.1))  # a late tick (a resend): L2 keeps the newer one...
    await bus_of(a).flush()
    # ...but the bus relays it, and B learns of the source from it.
    await until(lambda: b.cache.l1.peek_tick(SYM, SRC) is not None, "B to get the tick")
    got = await b.get_latest_tick(SYM, source=SRC)
    assert got is not None
    assert got.timestamp == TS + 5_000
    await until(
        lambda: getattr(b.cache.l1.get_tick(SYM, SRC), "timestamp", None) == TS + 5_000,
        "B's entry for the source to settle on L2's tick",
    )


async def test_an_own_tick_in_a_new_router_yields_to_a_newer_tick_of_another_source(
    make_router: RouterFactory,
) -> None:
    a = await make_router()
    await a.save_tick(tick(TS + 5_000, 1.2, source="fast"))
    await bus_of(a).flush()
    b = await make_router()  # a new collector of a lagging feed
    await b.save_tick(tick(TS, 1.1, source="lagging"))
    # Served at once (read-your-writes), then checked against L2 in the background.
    await until(lambda: l1_ts(b) == TS + 5_000, "B's new entry to be checked against L2")
    newest = await b.get_latest_tick(SYM)
    assert newest is not None
    assert newest.source == "fast"
    assert (await b.get_latest_tick(SYM, source="lagging")).timestamp == TS  # type: ignore[union-attr]


async def test_a_read_through_serves_and_backfills_the_tick_the_caches_keep(
    make_router: RouterFactory,
) -> None:
    """Same source, same millisecond: seq 2 is the newest tick. Once L2 lost its keys, a
    fresh router reads through to the database: it must answer seq 2 and put seq 2 back."""
    older = tick(TS).model_copy(update={"seq": 1})
    newer = tick(TS).model_copy(update={"seq": 2})
    assert tick_content_key(older) > tick_content_key(newer)  # the primary key disagrees
    a = await make_router()
    await a.save_tick(older)
    await a.save_tick(newer)
    await bus_of(a).flush()
    l2 = l2_of(a)
    await l2.client.delete(l2.tick_key(SYM, SRC), l2.tick_key(SYM))  # e.g. a restart
    b = await make_router()
    for source in (SRC, None):
        got = await b.get_latest_tick(SYM, source=source)
        assert got is not None
        assert got.seq == 2, f"source={source}: the database answered seq {got.seq}"

    async def backfilled() -> bool:
        return await l2.get_tick(SYM, SRC) is not None and await l2.get_tick(SYM) is not None

    await until_async(backfilled, "the read-through to backfill L2")
    for source in (SRC, None):
        in_l2 = await l2.get_tick(SYM, source)
        assert in_l2 is not None
        assert in_l2.seq == 2


async def test_bulk_saves_reach_l2_and_other_routers(make_router: RouterFactory) -> None:
    """``save_ticks`` documents that the newest tick of each symbol updates the caches."""
    a, b = await make_router(), await make_router()
    await a.save_tick(tick(TS, 1.0))
    await bus_of(a).flush()
    await until(lambda: l1_ts(b) == TS, "router B's L1 to receive A's tick")
    b.cache.l1.clear()  # B asks the tiers below L1

    assert await a.save_ticks([tick(TS + i, 1.0 + i) for i in range(1, 6)]) == 5
    assert l1_ts(a) == TS + 5
    got = await b.get_latest_tick(SYM)
    assert got is not None
    assert got.timestamp == TS + 5, "L2 still serves the tick the bulk save superseded"


async def test_a_bulk_candle_save_fills_the_shared_candle_ring(make_router: RouterFactory) -> None:
    ring = {"cache": {"candle_ring_size": 3}}
    a, b = await make_router(strategy=ring), await make_router(strategy=ring)
    minutes = [TS + i * 60_000 for i in range(5)]
    batch = [candle(ts, close=round(1.1 + i / 100, 2)) for i, ts in enumerate(minutes)]
    # Newest first, and the newest bucket twice: its later version is the one kept.
    batch = [*reversed(batch), candle(minutes[-1], close=1.15)]
    assert await a.save_candles_bulk(batch) == 5

    in_l2 = await l2_of(b).get_candles(SYM, "1m", 3, SRC)
    assert in_l2 is not None, "L2's ring does not hold the bulk save's newest candles"
    assert [(c.timestamp, c.close) for c in in_l2] == [
        (minutes[2], 1.12),
        (minutes[3], 1.13),
        (minutes[4], 1.15),
    ]

    def b_ring() -> list[int] | None:
        got = b.cache.l1.get_candles(SYM, "1m", 3, SRC)
        return None if got is None else [c.timestamp for c in got]

    await until(lambda: b_ring() == minutes[2:], "router B's L1 ring to receive A's candles")
    assert bus_of(a).stats().published == 3  # only the ring's window goes out


async def test_a_failed_bus_batch_leaves_no_gap_in_candle_rings(
    make_router: RouterFactory,
) -> None:
    """One bus pipeline fails (a transient L2 error) on a closed candle: neither L2 nor the
    other router's L1 may then serve the series without it."""
    a, b = await make_router(), await make_router()

    def newest_in_b() -> int | None:
        ring = b.cache.l1.get_candles(SYM, "1m", 1, "feed")
        return ring[-1].timestamp if ring else None

    for i in range(5):
        await a.save_candle(bar(i))
    await bus_of(a).flush()
    await until(lambda: newest_in_b() == bar(4).timestamp, "B's ring to reach bar 4")
    fail_applies(l2_of(a), 1)
    await a.save_candle(bar(5))
    await bus_of(a).flush()
    await a.save_candle(bar(6))
    await bus_of(a).flush()
    want = [bar(i).timestamp for i in (4, 5, 6)]
    in_l2 = await l2_of(a).get_candles(SYM, "1m", 3, "feed")
    assert [c.timestamp for c in in_l2 or []] == want
    await until(lambda: newest_in_b() == bar(6).timestamp, "B's ring to reach bar 6")
    assert [c.timestamp for c in b.cache.l1.get_candles(SYM, "1m", 3, "feed") or []] == want


async def test_close_lets_a_cache_check_under_way_finish(make_router: RouterFactory) -> None:
    a = await make_router()
    l2 = l2_of(a)
    real = l2.get_tick
    go, done = asyncio.Event(), asyncio.Event()

    async def slow_get_tick(symbol: str, source: str | None = None) -> TickData | None:
        await go.wait()  # a read still under way when close() begins
        answer = await real(symbol, source)
        done.set()
        return answer

    l2.get_tick = slow_get_tick  # type: ignore[method-assign]
    running = set(a._background)
    await a.save_tick(tick(TS, source="srcA"))  # a new any-source entry: checked in the background
    assert a._background - running, "no check was started"
    asyncio.get_running_loop().call_later(0.2, go.set)  # well inside close()'s 1 s for fills
    await a.close()
    assert done.is_set(), "close() cancelled the check under way"


@pytest.mark.parametrize("gap", [False, True], ids=["alone", "with a candle gap meanwhile"])
async def test_a_candle_gap_does_not_void_a_latest_tick_check_under_way(
    make_router: RouterFactory, gap: bool
) -> None:
    a = await make_router()
    l2 = l2_of(a)
    # Another source's newer tick, written before this router's L1 could see it.
    await l2.put_ticks([tick(TS + 10, source="srcB")])
    real = l2.get_tick
    started, go = asyncio.Event(), asyncio.Event()

    async def held_get_tick(symbol: str, source: str | None = None) -> TickData | None:
        started.set()
        await go.wait()  # a read under way
        return await real(symbol, source)

    l2.get_tick = held_get_tick  # type: ignore[method-assign]
    running = set(a._background)  # the maintenance loop
    await a.save_tick(tick(TS, source="srcA"))  # creates the entry: checked in the background
    check = a._background - running
    await started.wait()
    if gap:
        a._drop_gapped([("GBP/USD", "1m", "feed")])  # what a bus message naming a gap does
    go.set()
    await asyncio.gather(*check)
    l2.get_tick = real  # type: ignore[method-assign]
    got = await a.get_latest_tick(SYM)
    assert got is not None
    assert (got.source, got.timestamp) == ("srcB", TS + 10)


async def test_a_latest_value_the_bus_dropped_reaches_l2_once_it_takes_batches_again(
    make_router: RouterFactory,
) -> None:
    # The newest tick of a quiet symbol missed L2 (its batch failed): L2 would serve the
    # older tick for up to its TTL. Once a batch lands again, the router sends it.
    a = await make_router()
    await a.save_tick(tick(TS, 1.0))
    await bus_of(a).flush()
    fail_applies(l2_of(a), 1)
    await a.save_tick(tick(TS + 1_000, 2.0))  # stored; its bus batch fails
    await bus_of(a).flush()
    assert (await l2_of(a).get_tick(SYM)).timestamp == TS  # type: ignore[union-attr]
    await a.save_tick(tick(TS, symbol="GBP/USD"))  # another symbol's batch lands
    await bus_of(a).flush()
    refreshes = [t for t in a._background if t.get_coro().__qualname__.endswith("_refresh_l2")]
    assert refreshes, "no refresh of the dropped key was started"
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*refreshes)
    for source in (None, SRC):
        got = await l2_of(a).get_tick(SYM, source)
        assert got is not None
        assert got.timestamp == TS + 1_000
    b = await make_router()
    assert (await b.get_latest_tick(SYM)).timestamp == TS + 1_000  # type: ignore[union-attr]


async def test_candles_given_up_drop_only_their_series_from_the_other_routers_l1(
    make_router: RouterFactory,
) -> None:
    """Beyond the bus's bound on kept candles (``max_retained_candles``) the oldest are
    given up and their series named in the next message: the other router drops those
    rings only, not its whole L1."""
    a, b = await make_router(), await make_router()
    bus = bus_of(a)
    bus._max_retained = 1  # 4096 by default: keep one candle, give up the older ones

    def ring_in_b(symbol: str) -> list[CandleData] | None:
        return b.cache.l1.get_candles(symbol, "1m", 1, "feed")

    await a.save_tick(tick(TS))
    for symbol in (SYM, "GBP/USD"):
        bus.publish(bar(0, symbol=symbol))
    await bus.flush()
    await until(lambda: l1_ts(b) == TS and ring_in_b(SYM) is not None, "B to get both")
    await until(lambda: ring_in_b("GBP/USD") is not None, "B to get GBP/USD's ring")
    fail_applies(l2_of(a), 1)
    bus.publish(bar(1))  # given up: EUR/USD's rings would show a gap
    bus.publish(bar(1, symbol="GBP/USD"))  # kept, sent with the next derived data
    await bus.flush()
    await a.save_tick(tick(TS + 1))  # the next batch that reaches L2 names the gap
    await bus.flush()
    await until(lambda: ring_in_b(SYM) is None, "B to drop EUR/USD's ring")
    await until(lambda: l1_ts(b) == TS + 1, "B to get the tick")
    assert ring_in_b("GBP/USD") is not None  # the rest of B's L1 stays
    assert b.cache.l1.stats().clears == 0
    assert bus_of(b).stats().lost == 0


# ----------------------------------------------------------------------------- lost subscription


async def test_killed_subscription_clears_l1_until_resubscribed(
    make_router: RouterFactory, redis_server_factory: Callable[[], RedisServer]
) -> None:
    server = await asyncio.to_thread(redis_server_factory)
    a, b = await make_router(redis=server.url), await make_router(redis=server.url)
    await a.save_tick(tick(TS, 1.0))
    await until(lambda: l1_ts(b) == TS, "router B's L1 to receive A's tick")
    clears = b.cache.l1.stats().clears

    admin = Redis.from_url(server.url, socket_timeout=5)
    try:
        killed = await admin.client_kill_filter(_type="pubsub")
    finally:
        await admin.aclose()
    assert killed >= 2  # both routers' subscriptions
    # Whatever A writes while B is not subscribed must not be hidden by B's old L1.
    await a.save_tick(tick(TS + 1, 2.0))

    await until(lambda: bus_of(b).stats().restored >= 1, "B to subscribe again")
    assert bus_of(b).stats().lost >= 1
    assert b.cache.l1.stats().clears >= clears + 2  # on loss and again on restore
    got = await b.get_latest_tick(SYM)
    assert got is not None
    assert (got.timestamp, got.bid) == (TS + 1, 2.0)
    # Subscribed again: L1 serves, and is fed by pub/sub.
    hits = (await b.cache.get_stats()).l1.hits
    assert (await b.get_latest_tick(SYM)) is got
    assert (await b.cache.get_stats()).l1.hits == hits + 1
    await a.save_tick(tick(TS + 2, 3.0))
    await until(lambda: l1_ts(b) == TS + 2, "B's L1 to receive A's next tick")
    assert (await b.health_check()).cache.subscription == "connected"


async def test_l1_is_bypassed_while_the_subscription_is_lost(
    make_router: RouterFactory, redis_server_factory: Callable[[], RedisServer]
) -> None:
    server = await asyncio.to_thread(redis_server_factory)
    router = await make_router(redis=server.url)
    await router.save_tick(tick(TS, 1.0))  # stored (sync): L1 keeps nothing of it below
    assert router.cache.l1.get_tick(SYM) is not None

    await asyncio.to_thread(server.stop)

    async def health_lost() -> bool:
        return (await router.cache.get_stats()).subscription == "lost"

    await until_async(health_lost, "the router to notice the lost subscription")
    assert len(router.cache.l1) == 0
    before = await router.cache.get_stats()
    for _ in range(3):
        got = await router.get_latest_tick(SYM)
        assert got is not None
        assert got.timestamp == TS
    after = await router.cache.get_stats()
    assert after.l1.hits == before.l1.hits  # every read skipped L1 ...
    # ... for the database.
    assert int(after.details["db_reads"] or 0) == int(before.details["db_reads"] or 0) + 3
    health = await router.health_check()
    assert health.status == "degraded"
    assert health.cache.subscription == "lost"

    await asyncio.to_thread(server.start)
    await until(lambda: bus_of(router).connected, "the subscription to come back")
    assert (await router.cache.get_stats()).subscription == "connected"
    await router.save_tick(tick(TS + 1, 2.0))
    hits = (await router.cache.get_stats()).l1.hits
    got = await router.get_latest_tick(SYM)
    assert got is not None
    assert got.timestamp == TS + 1
    assert (await router.cache.get_stats()).l1.hits == hits + 1


async def test_own_writes_not_stored_yet_are_read_while_the_subscription_is_lost(
    make_router: RouterFactory, redis_server_factory: Callable[[], RedisServer]
) -> None:
    # The manual clock holds buffered writes in the queue: the database has only TS.
    server = await asyncio.to_thread(redis_server_factory)
    router = await make_router(redis=server.url)
    await router.save_tick(tick(TS, 1.0))
    await router.save_candle(candle(TS, 1.1))
    await router.save_tick(tick(TS + 60_000, 2.0), mode="buffered")  # before the loss
    await asyncio.to_thread(server.stop)
    await until(lambda: not bus_of(router).connected, "the router to notice the lost subscription")
    await router.save_candle(candle(TS + 60_000, 1.15), mode="buffered")  # during it

    got = await router.get_latest_tick(SYM)
    assert got is not None
    assert (got.timestamp, got.bid) == (TS + 60_000, 2.0)
    candles = await router.get_latest_candles(SYM, "1m", 2, source=SRC)
    assert [(c.timestamp, c.close) for c in candles] == [(TS, 1.1), (TS + 60_000, 1.15)]
    assert (await router.storage.latest_tick(SYM)).timestamp == TS  # type: ignore[union-attr]


async def test_own_writes_not_stored_yet_survive_a_cache_restart(
    make_router: RouterFactory, redis_server_factory: Callable[[], RedisServer]
) -> None:
    # A tick saved just before the cache server restarts (empty) and still queued for the
    # database: no read through the database may install the older stored tick as the newest.
    server = await asyncio.to_thread(redis_server_factory)
    clock = ManualClock()
    router = await make_router(redis=server.url, clock=clock)
    await router.save_tick(tick(TS, 1.0))
    await router.save_tick(tick(TS + 60_000, 2.0), mode="buffered")
    await bus_of(router).flush()  # it reached L2, which loses it below
    await asyncio.to_thread(server.stop)
    await until(lambda: not bus_of(router).connected, "the router to notice the lost subscription")
    with contextlib.suppress(CacheError):
        await l2_of(router).get_tick(SYM)  # opens the cache's breaker: L2 was found down
    await asyncio.to_thread(server.start)
    await until(lambda: bus_of(router).connected, "the subscription to come back")

    got = await router.get_latest_tick(SYM)
    assert got is not None
    assert got.timestamp == TS + 60_000
    clock.advance(60)  # the cache's breaker lets a probe through: the resend lands

    async def resent() -> bool:
        with contextlib.suppress(CacheError):
            in_l2 = await l2_of(router).get_tick(SYM)
            return in_l2 is not None and in_l2.timestamp == TS + 60_000
        return False

    await until_async(resent, "the router's queued tick to be sent to L2 again")
    other = await make_router(redis=server.url)
    seen = await other.get_latest_tick(SYM)
    assert seen is not None
    assert seen.timestamp == TS + 60_000


async def test_after_a_cache_restart_l2_gets_the_databases_newest_not_an_older_own_write(
    make_router: RouterFactory, redis_server_factory: Callable[[], RedisServer]
) -> None:
    # During the outage A stores a tick and B, later, a newer one of the same source; B
    # stops before the cache comes back (empty). What A sends to L2 then is the database's
    # newest of the keys it wrote, not its own older tick.
    server = await asyncio.to_thread(redis_server_factory)
    a = await make_router(redis=server.url)
    b = await make_router(redis=server.url)
    await a.save_tick(tick(TS, 1.0))
    await asyncio.to_thread(server.stop)
    await until(lambda: not bus_of(a).connected, "A to notice the lost subscription")
    await a.save_tick(tick(TS + 1_000, 2.0))
    await b.save_tick(tick(TS + 2_000, 3.0))
    await b.close()
    await asyncio.to_thread(server.start)
    await until(lambda: bus_of(a).connected, "A's subscription to come back")

    async def refreshed() -> bool:
        with contextlib.suppress(CacheError):
            in_l2 = await l2_of(a).get_tick(SYM, SRC)
            return in_l2 is not None
        return False

    await until_async(refreshed, "A to refresh L2")
    in_l2 = await l2_of(a).get_tick(SYM, SRC)
    assert in_l2 is not None
    assert in_l2.timestamp == TS + 2_000
    for router in (a, await make_router(redis=server.url)):
        got = await router.get_latest_tick(SYM)
        assert got is not None
        assert got.timestamp == TS + 2_000


async def test_after_a_cache_restart_one_sources_newest_never_becomes_the_symbols_newest(
    make_router: RouterFactory, redis_server_factory: Callable[[], RedisServer]
) -> None:
    # Source b has the newest stored tick; during the outage the router stores an older
    # one of source a. The refresh sends a's newest to a's key only, and the symbol's newest
    # of any source (b's) to the any-source key.
    server = await asyncio.to_thread(redis_server_factory)
    a = await make_router(redis=server.url)
    await a.save_tick(tick(TS + 200, 2.0, source="b"))
    await asyncio.to_thread(server.stop)
    await until(lambda: not bus_of(a).connected, "A to notice the lost subscription")
    await a.save_tick(tick(TS + 100, 1.0, source="a"))
    await asyncio.to_thread(server.start)  # comes back empty
    await until(lambda: bus_of(a).connected, "A's subscription to come back")

    async def refreshed() -> bool:  # the any-source value is sent last
        with contextlib.suppress(CacheError):
            return await l2_of(a).get_tick(SYM) is not None
        return False

    await until_async(refreshed, "A to refresh L2")
    newest = await l2_of(a).get_tick(SYM)
    assert newest is not None
    assert (newest.source, newest.timestamp) == ("b", TS + 200)
    own = await l2_of(a).get_tick(SYM, "a")
    assert own is not None
    assert own.timestamp == TS + 100
    served = await (await make_router(redis=server.url)).get_latest_tick(SYM)
    assert served is not None
    assert (served.source, served.timestamp) == ("b", TS + 200)


async def test_after_the_subscription_returns_an_own_unstored_tick_yields_to_a_newer_one(
    make_router: RouterFactory, redis_server_factory: Callable[[], RedisServer]
) -> None:
    # b@200 is stored; a@100 is queued (the manual clock holds it). Restored, the cleared L1
    # gets a@100 back, but not as the symbol's newest until the tiers below confirm it.
    server = await asyncio.to_thread(redis_server_factory)
    router = await make_router(redis=server.url)
    await router.save_tick(tick(TS + 200, 2.0, source="b"))
    await router.save_tick(tick(TS + 100, 1.0, source="a"), mode="buffered")
    await asyncio.to_thread(server.stop)
    await until(lambda: not bus_of(router).connected, "the router to notice the lost subscription")
    await asyncio.to_thread(server.start)
    await until(lambda: bus_of(router).connected, "the subscription to come back")

    got = await router.get_latest_tick(SYM)
    assert got is not None
    assert (got.source, got.timestamp) == ("b", TS + 200)
    own = await router.get_latest_tick(SYM, source="a")
    assert own is not None
    assert own.timestamp == TS + 100  # its own source's entry is served as before


async def test_with_the_database_down_a_router_reads_its_own_unstored_tick(
    make_router: RouterFactory, redis_server_factory: Callable[[], RedisServer]
) -> None:
    # While the subscription is lost and after it returns (its own tick then waits for a
    # confirmation the database cannot give), a read answers the router's own queued tick
    # instead of the database's error.
    server = await asyncio.to_thread(redis_server_factory)
    router = await make_router(redis=server.url)
    await router.save_tick(tick(TS, 1.0))
    await router.save_tick(tick(TS + 60_000, 2.0), mode="buffered")  # held by the clock
    storage = router.storage
    real_read = storage.latest_tick

    async def down(*args: Any, **kwargs: Any) -> TickData | None:
        msg = "cannot connect (simulated)"
        raise DatabaseConnectionError(msg)

    storage.latest_tick = down  # type: ignore[method-assign]
    try:
        await asyncio.to_thread(server.stop)
        await until(lambda: not bus_of(router).connected, "the router to notice the loss")
        assert (await router.get_latest_tick(SYM)).timestamp == TS + 60_000  # type: ignore[union-attr]
        await asyncio.to_thread(server.start)  # comes back empty
        await until(lambda: bus_of(router).connected, "the subscription to come back")
        assert (await router.get_latest_tick(SYM)).timestamp == TS + 60_000  # type: ignore[union-attr]
    finally:
        storage.latest_tick = real_read  # type: ignore[method-assign]
    await router.flush()
    assert (await router.get_latest_tick(SYM)).timestamp == TS + 60_000  # type: ignore[union-attr]


async def test_a_read_across_the_restore_still_reads_the_routers_own_writes(
    make_router: RouterFactory, redis_server_factory: Callable[[], RedisServer]
) -> None:
    # A read that starts while L1 is bypassed and ends after the subscription is back (L1
    # cleared meanwhile) answers the newer of the database's tick and the router's own
    # queued one, which the database does not have yet.
    server = await asyncio.to_thread(redis_server_factory)
    router = await make_router(redis=server.url)
    await router.save_tick(tick(TS, 1.0))
    await router.save_tick(tick(TS + 60_000, 2.0), mode="buffered")
    await asyncio.to_thread(server.stop)
    await until(lambda: not bus_of(router).connected, "the router to notice the lost subscription")
    storage = router.storage
    ingest = router._ingest
    assert ingest is not None
    entered, release, stored = asyncio.Event(), asyncio.Event(), asyncio.Event()
    real_read, real_write = storage.latest_tick, ingest._writers[TickData]

    async def held_read(*args: Any, **kwargs: Any) -> TickData | None:
        entered.set()
        await release.wait()
        return await real_read(*args, **kwargs)

    async def held_write(*args: Any, **kwargs: Any) -> Any:
        await stored.wait()  # the database lags: the queued tick is stored after the read
        return await real_write(*args, **kwargs)

    storage.latest_tick = held_read  # type: ignore[method-assign]
    ingest._writers[TickData] = held_write
    try:
        read = asyncio.create_task(router.get_latest_tick(SYM))
        async with asyncio.timeout(DEADLINE):
            await entered.wait()
        await asyncio.to_thread(server.start)
        await until(lambda: bus_of(router).connected, "the subscription to come back")
        storage.latest_tick = real_read  # type: ignore[method-assign]
        release.set()
        async with asyncio.timeout(DEADLINE):
            got = await read
        assert got is not None
        assert got.timestamp == TS + 60_000
    finally:
        storage.latest_tick = real_read  # type: ignore[method-assign]
        stored.set()
        ingest._writers[TickData] = real_write
    await router.flush()


# ----------------------------------------------------------------------------- two processes


async def _line(stream: asyncio.StreamReader, what: str) -> str:
    try:
        async with asyncio.timeout(DEADLINE * 3):  # a cold interpreter imports a lot first
            raw = await stream.readline()
    except TimeoutError:
        pytest.fail(f"the child process never said {what!r}")
    return raw.decode().strip()


@pytest.mark.slow
async def test_routers_in_two_processes_see_each_others_writes(
    make_router: RouterFactory,
    postgres_url: str,
    pg_schema: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    router = await make_router()
    count = 5
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        postgres_url,
        pg_schema,
        redis_url,
        redis_prefix,
        str(tmp_path / "child-journal"),
        SYM,
        str(TS),
        str(count),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    assert child.stderr is not None
    try:
        assert await _line(child.stdout, "ready") == "ready"
        await router.save_tick(tick(TS, 1.0))  # parent → child
        assert await _line(child.stdout, "saw") == f"saw {TS}"
        # child → parent: its ticks arrive in this process's L1 by pub/sub.
        await until(lambda: l1_ts(router) == TS + count, "the child's ticks in the parent's L1")
        got = await router.get_latest_tick(SYM)
        assert got is not None
        assert (got.timestamp, got.source) == (TS + count, "child")
        assert (await router.cache.get_stats()).details["db_reads"] == 0
        child.stdin.write(b"done\n")
        await child.stdin.drain()
        async with asyncio.timeout(DEADLINE):
            code = await child.wait()
        errors = (await child.stderr.read()).decode()
        assert code == 0, errors
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    # The child's writes went to the shared database too.
    db_tick = await router.storage.latest_tick(SYM)
    assert db_tick is not None
    assert db_tick.timestamp == TS + count


async def test_warm_start_settles_l1_on_the_newer_of_l2_and_the_database(
    make_router: RouterFactory,
) -> None:
    """Another router's tick can be in L2 and not yet stored (write-behind): warm_start
    settled L1 on the database's older tick, which a plain read would not have served."""
    a = await make_router()
    await a.save_tick(tick(TS, 1.0))  # stored, and in L2
    await bus_of(a).flush()
    await l2_of(a).put_ticks([tick(TS + 10, 1.1, source="oanda")])  # in L2 only
    warm = await make_router()
    assert await warm.warm_start([SYM], ["1m"]) == 1  # what the database had
    got = await warm.get_latest_tick(SYM)
    assert got is not None
    assert (got.source, got.timestamp) == ("oanda", TS + 10)
    assert warm.cache.l1.peek_tick(SYM) == got  # served by L1, settled on it


# ----------------------------------------------------------------------------- fork


def _own_ports(url: str) -> set[int]:
    """Local ports of this process's established connections to the server at ``url``.

    They pick this process's connections out of the server's client list, which also shows
    whatever else uses a shared server.
    """
    server_port = urlsplit(url).port
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == server_port and c.status == psutil.CONN_ESTABLISHED
    }


async def _redis_clients(url: str) -> dict[int, int]:
    """Client id → client port of every connection the Redis server at ``url`` has."""
    admin = Redis.from_url(url, socket_timeout=5)
    try:
        clients: list[dict[str, Any]] = await admin.client_list()
        own = await admin.client_id()
    finally:
        await admin.aclose()
    return {
        int(c["id"]): int(str(c["addr"]).rsplit(":", 1)[1]) for c in clients if int(c["id"]) != own
    }


async def _postgres_backends(url: str, ports: set[int]) -> set[int]:
    """Backend pids of the PostgreSQL sessions whose client uses one of ``ports``."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int[])", list(ports)
        )
    finally:
        await conn.close(timeout=10)
    return {int(r["pid"]) for r in rows}


async def _in_forked_child(router: DataRouter, parent_id: str, newest_client: int) -> int:
    """Runs in the forked child, in a new event loop; the exit code says what failed."""
    got = await router.get_latest_tick(SYM)  # first use in the child: it reconnects
    if router.instance_id == parent_id:
        return 3
    if got is None or got.timestamp != TS:
        return 4
    if await l2_of(router).client.client_id() <= newest_client:
        return 5  # an L2 connection that existed before the fork (ids only grow)
    if router._default_candle_source:
        return 8  # the parent's candle sources, resolved from the L1 the child dropped
    await router.save_tick(tick(TS + 1, 2.0))  # sync: the child's own pool writes it
    stored = await router.storage.latest_tick(SYM)
    if stored is None or stored.timestamp != TS + 1:
        return 6
    await router.close()
    return 0


async def _wait_child(pid: int) -> int:
    try:
        async with asyncio.timeout(DEADLINE * 2):
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
                if done:
                    return os.waitstatus_to_exitcode(status)
                await asyncio.sleep(0.01)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        pytest.fail("the forked child did not exit")


def _fork_and_run(child: Callable[[], Awaitable[int]]) -> int:
    """Fork; the child runs ``child()`` in a new event loop and exits with what it returns."""
    with warnings.catch_warnings():
        # Python 3.12+ warns when a process with threads forks; the child only uses objects
        # that reconnect after the fork, in a new event loop.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            asyncio.run(_exit_with(child))
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    return pid


async def _exit_with(child: Callable[[], Awaitable[int]]) -> NoReturn:  # pragma: no cover
    code = 1
    try:
        async with asyncio.timeout(DEADLINE):
            code = await child()
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit from inside the loop: asyncio.run's clean-up would wait on whatever a failed
        # check left running, and nothing in the child is ours to tidy up.
        os._exit(code)


async def test_forked_child_uses_the_router_with_its_own_connections(
    make_router: RouterFactory, postgres_url: str, redis_url: str
) -> None:
    router = await make_router()
    await router.save_tick(tick(TS, 1.0))
    await router.save_candles_bulk([candle(TS)])
    await bus_of(router).flush()
    router.cache.l1.clear()
    assert (await router.get_latest_tick(SYM)) is not None  # the pools hold live connections
    assert await router.get_latest_candles(SYM, "1m", 5)  # resolves SYM's candle source
    assert router._default_candle_source, "no candle source resolved for the child to drop"
    parent_id = router.instance_id
    clients = await _redis_clients(redis_url)
    redis_ports = _own_ports(redis_url)
    parent_redis = {cid for cid, port in clients.items() if port in redis_ports}
    parent_pg = await _postgres_backends(postgres_url, _own_ports(postgres_url))
    assert parent_redis, "the router holds no L2 connection to watch"
    assert parent_pg, "the router holds no PostgreSQL connection to watch"

    pid = _fork_and_run(lambda: _in_forked_child(router, parent_id, max(clients)))
    assert await _wait_child(pid) == 0

    # The child closed its own connections only: the parent's are all still there ...
    assert parent_pg <= await _postgres_backends(postgres_url, _own_ports(postgres_url))
    assert parent_redis <= set(await _redis_clients(redis_url))
    # ... and the parent goes on working with them.
    assert router.instance_id == parent_id
    stored = await router.storage.latest_tick(SYM)
    assert stored is not None
    assert stored.timestamp == TS + 1  # the child's write
    await router.save_tick(tick(TS + 2, 3.0))
    await bus_of(router).flush()
    router.cache.l1.clear()
    got = await router.get_latest_tick(SYM)
    assert got is not None
    assert got.timestamp == TS + 2
    assert (await router.health_check()).status == "healthy"


async def _first_calls_at_once(router: DataRouter) -> int:
    """In the child: five buffered saves as its first calls, all at once."""
    ticks = [tick(TS + k, 1.0 + k / 100) for k in range(1, 6)]
    # The first starts the reconnection and waits on the network: the others must wait for
    # it too. They went on to the parent's write path, whose writer never runs here.
    await asyncio.gather(*(router.save_tick(t, mode="buffered") for t in ticks))
    await router.flush()
    stored = await router.get_ticks(SYM, TS + 1, TS + 6)
    if [t.timestamp for t in stored] != [t.timestamp for t in ticks]:
        return 7
    await router.close()
    return 0


async def test_first_calls_at_once_in_a_forked_child_share_one_reconnection(
    make_router: RouterFactory,
) -> None:
    router = await make_router()
    await router.save_tick(tick(TS, 1.0))
    pid = _fork_and_run(lambda: _first_calls_at_once(router))
    assert await _wait_child(pid) == 0
    assert len(await router.get_ticks(SYM, TS, TS + 6)) == 6  # the parent sees them too


async def _reconnection_fails_once(router: DataRouter) -> int:
    """In the child: the first reconnection fails; the next call must try again."""
    connect = router._connect_with_deadline
    attempts = 0

    async def refuse_once(storage: Any) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise DatabaseConnectionError("refused once by the test")
        await connect(storage)

    router._connect_with_deadline = refuse_once  # type: ignore[method-assign]
    try:
        await router.save_tick(tick(TS + 1, 2.0))
    except DatabaseConnectionError:
        pass
    else:
        return 9  # the failed reconnection must reach the caller
    # It left the router half reset (the parent's write path, no connection): the call went
    # through it instead of reconnecting.
    await router.save_tick(tick(TS + 1, 2.0))  # sync
    stored = await router.storage.latest_tick(SYM)
    if attempts != 2 or stored is None or stored.timestamp != TS + 1:
        return 6
    await router.close()
    return 0


async def test_a_failed_reconnection_in_a_forked_child_is_retried_by_the_next_call(
    make_router: RouterFactory,
) -> None:
    router = await make_router()
    await router.save_tick(tick(TS, 1.0))
    pid = _fork_and_run(lambda: _reconnection_fails_once(router))
    assert await _wait_child(pid) == 0
    stored = await router.storage.latest_tick(SYM)
    assert stored is not None
    assert stored.timestamp == TS + 1


async def _close_first(router: DataRouter) -> int:
    """In the child: close() before any other call."""
    await router.close()
    return 0


async def test_close_as_a_forked_childs_first_call_leaves_the_parents_connections(
    make_router: RouterFactory, postgres_url: str
) -> None:
    router = await make_router()
    await router.save_tick(tick(TS, 1.0))
    parent_pg = await _postgres_backends(postgres_url, _own_ports(postgres_url))
    assert parent_pg, "the router holds no PostgreSQL connection to watch"
    pid = _fork_and_run(lambda: _close_first(router))
    assert await _wait_child(pid) == 0
    # close() in the child closed the parent's pool (and flushed its write path) through
    # the inherited sockets: the parent's sessions ended.
    assert parent_pg <= await _postgres_backends(postgres_url, _own_ports(postgres_url))
    await router.save_tick(tick(TS + 1, 2.0))
    stored = await router.storage.latest_tick(SYM)
    assert stored is not None
    assert stored.timestamp == TS + 1


async def _l1_in_use(router: DataRouter) -> int:
    """In the child: after its own write, reads are answered by L1."""
    await router.save_tick(tick(TS + 1, 2.0))  # first use: it reconnects
    if bus_of(router).connected is False:
        return 3
    before = router.cache.l1.stats().tick_hits
    got = await router.get_latest_tick(SYM)
    if got is None or got.timestamp != TS + 1:
        return 4
    if router.cache.l1.stats().tick_hits == before:
        return 7  # L1 bypassed: the parent's lost-subscription state was kept
    await router.close()
    return 0


async def test_a_child_forked_while_the_subscription_was_lost_uses_l1_again(
    make_router: RouterFactory,
) -> None:
    router = await make_router()
    await router.save_tick(tick(TS, 1.0))
    router._on_subscription_lost()  # the parent's state as it forks (as on a lost connection)
    pid = _fork_and_run(lambda: _l1_in_use(router))
    assert await _wait_child(pid) == 0


async def _forked_maintenance(router: DataRouter) -> int:
    """In the child: a forming candle must reach the database without an explicit flush."""
    await router.save_tick(tick(TS + 60_000, 2.0))  # the next 1m bucket
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0  # sixty flush intervals
    while loop.time() < deadline:
        rows = await router.storage.latest_candles(SYM, "1m", 1, source=f"agg:{SRC}")
        if rows and rows[-1].timestamp == TS + 60_000:
            await router.close()
            return 0
        await asyncio.sleep(0.02)
    return 7


async def test_forked_child_keeps_the_router_timer_running(make_router: RouterFactory) -> None:
    """The timer that queues forming candles (run_maintenance) runs in a forked child too."""
    # The real clock: the write queue's time-based flush runs on the router's clock.
    router = await make_router(
        clock=SystemClock(),
        strategy={
            "aggregation": {"enabled": True, "timeframes": ["1m"]},
            "batch": {"flush_interval_seconds": 0.05},
        },
    )
    # Control: in the parent, the forming candle is stored by the timer alone.
    await router.save_tick(tick(TS, 1.0))

    async def stored() -> bool:
        return bool(await router.storage.latest_candles(SYM, "1m", 1, source=f"agg:{SRC}"))

    await until_async(stored, "the forming candle in the parent")
    pid = _fork_and_run(lambda: _forked_maintenance(router))
    assert await _wait_child(pid) == 0, "the forked child's router never ran its timer"


async def test_health_reports_an_l2_that_refuses_writes(make_router: RouterFactory) -> None:
    # The server answers (PING, reads), so its breaker stays closed; but the latest tick it
    # keeps is older than the one written (memory full, or here a key of another type).
    router = await make_router()
    l2 = l2_of(router)
    await l2.client.lpush(l2.tick_key(SYM, SRC), "not a tick")
    await router.save_tick(tick(TS))
    await bus_of(router).flush()
    health = await router.health_check()
    assert health.status == "degraded"
    assert health.cache.l2_reachable
    assert "L2 cache refuses writes" in health.reason
    assert "WRONGTYPE" in (health.cache.l2_write_refused or "")


async def test_candles_only_l2_holds_yet_are_not_a_gap_in_a_new_routers_l1(
    make_router: RouterFactory,
) -> None:
    # Router A's newest candle is in L2 (the bus) but not in the database (buffered). A new
    # router that fills L1 from the database must take it from L2 too, or the next live
    # candle is appended after a gap that stays while the series is active.
    a = await make_router()
    for i in range(3):
        await a.save_candle(candle(TS + i * MINUTE))  # sync: stored, and in L2
    await a.save_candle(candle(TS + 3 * MINUTE), mode="buffered")  # L2 only, for now
    await bus_of(a).flush()
    b, c = await make_router(), await make_router()
    await b.warm_start([SYM], ["1m"], limit=10)
    minutes = [(x.timestamp - TS) // MINUTE for x in b.cache.l1.peek_candles(SYM, "1m", SRC)]
    assert minutes == [0, 1, 2, 3]
    got = await c.get_latest_candles(SYM, "1m", 10)  # no source: resolved from the database
    assert [(x.timestamp - TS) // MINUTE for x in got] == [0, 1, 2, 3]
    await a.save_candle(candle(TS + 4 * MINUTE), mode="buffered")

    def has_all(router: DataRouter) -> bool:
        held = router.cache.l1.peek_candles(SYM, "1m", SRC)
        return [(x.timestamp - TS) // MINUTE for x in held] == [0, 1, 2, 3, 4]

    await until(lambda: has_all(b) and has_all(c), "the next live candle, with no gap")
