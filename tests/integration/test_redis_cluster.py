"""L2 on a three-master Redis Cluster of local ``redis-server`` processes.

Reads and compare-and-set writes for symbols spread over every master, multi-node
``get_ticks``, pub/sub coherence between two buses (and two routers), and a master killed
and restarted. Skipped, saying why, when ``redis-server`` or ``redis-cli`` is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import TYPE_CHECKING, Any, Final

import pytest
import pytest_asyncio
from redis.crc import key_slot

from data_manager.breaker import CircuitBreaker
from data_manager.cache.bus import CacheBus
from data_manager.cache.cluster import ClusterRedisCache, parse_node
from data_manager.cache.redis import WRITE_SCRIPT_SHA
from data_manager.clock import ManualClock
from data_manager.errors import CacheUnavailableError, ConfigurationError
from data_manager.models import CandleData, TickData
from tests.servers_cluster import (
    RedisClusterHandle,
    cluster_unavailable_reason,
    start_redis_cluster,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
    from pathlib import Path

    from data_manager.cache.codec import CacheItem

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TS: Final = 1_727_996_400_000
DEADLINE: Final = 15.0  # seconds; generous, only reached when something is broken


def tick(symbol: str, ts: int = TS, bid: float = 1.1, source: str = "ig") -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.0001, source=source)


def candle(symbol: str, i: int, *, closed: bool = True) -> CandleData:
    return CandleData(
        symbol=symbol,
        timeframe="1m",
        timestamp=TS + i * 60_000,
        open=1.1,
        high=1.2,
        low=1.0,
        close=1.15,
        source="ig",
        is_closed=closed,
    )


async def poll(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` with a deadline (cross-process effects have no event to await)."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not await condition():  # noqa: ASYNC110 - the state lives in other processes
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def spread_symbols(cache: ClusterRedisCache, per_node: int = 2) -> dict[str, list[str]]:
    """Node ``host:port`` → ``per_node`` symbols whose keys that node holds."""
    by_node: dict[str, list[str]] = {}
    for i in range(1000):
        symbol = f"S{i}/USD"
        bucket = by_node.setdefault(cache.node_for_symbol(symbol), [])
        if len(bucket) < per_node:
            bucket.append(symbol)
        if len(by_node) == 3 and all(len(b) == per_node for b in by_node.values()):
            return by_node
    raise AssertionError(f"symbols do not cover three nodes: {by_node}")


class Receiver:
    """What a router does with the bus callbacks, recorded for assertions."""

    def __init__(self) -> None:
        self.items: list[CacheItem] = []
        self.lost = 0
        self.restored = 0
        self._changed = asyncio.Event()

    def on_items(self, items: Sequence[CacheItem]) -> None:
        self.items.extend(items)
        self._changed.set()

    def on_lost(self) -> None:
        self.lost += 1
        self._changed.set()

    def on_restored(self) -> None:
        self.restored += 1
        self._changed.set()

    def latest(self, symbol: str) -> int | None:
        stamps = [i.timestamp for i in self.items if i.symbol == symbol]
        return max(stamps) if stamps else None

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(DEADLINE):
                while not condition():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"timed out waiting for {what}")


def _start_cluster() -> RedisClusterHandle:
    reason = cluster_unavailable_reason()
    if reason is not None:
        pytest.skip(f"Redis Cluster tests need redis-server and redis-cli: {reason}")
    return start_redis_cluster()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterHandle]:
    """A three-master cluster shared by the tests that do not break it."""
    with _start_cluster() as handle:
        yield handle


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterHandle]:
    """A dedicated three-master cluster for a fault test."""
    with _start_cluster() as handle:
        yield handle


@pytest_asyncio.fixture(loop_scope="session")
async def make_cache() -> AsyncIterator[Callable[..., ClusterRedisCache]]:
    """Build caches (closed afterwards); the prefix is fresh per test, so tests never share
    keys, and a cluster is thrown away with its data."""
    opened: list[ClusterRedisCache] = []
    prefix = f"t{secrets.token_hex(4)}"

    def make(seeds: Sequence[str], **kwargs: Any) -> ClusterRedisCache:
        cache = ClusterRedisCache(nodes=seeds, key_prefix=prefix, **kwargs)
        opened.append(cache)
        return cache

    yield make
    for cache in opened:
        await cache.aclose()


# ----------------------------------------------------------------------------- configuration


def test_seed_nodes_are_parsed_and_validated() -> None:
    assert parse_node("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_node("[::1]:7001") == ("::1", 7001)
    for bad in ("127.0.0.1", ":7000", "host:0", "host:x"):
        with pytest.raises(ConfigurationError):
            parse_node(bad)
    with pytest.raises(ConfigurationError):
        ClusterRedisCache(nodes=[])


# ----------------------------------------------------------------------------- reads and writes


async def test_compare_and_set_writes_and_reads_on_every_master(
    cluster: RedisClusterHandle, make_cache: Callable[..., ClusterRedisCache]
) -> None:
    cache = make_cache(cluster.seeds[1:2])  # one seed is enough to learn the whole cluster
    await cache.connect()
    for node in cluster.nodes:
        assert node.script_loaded(WRITE_SCRIPT_SHA), f"no write script on {node.address}"
    by_node = spread_symbols(cache)
    assert set(by_node) == set(cluster.seeds)
    symbols = [s for group in by_node.values() for s in group]

    await cache.put_ticks([tick(s, TS + 10, 2.0) for s in symbols])
    await cache.put_ticks([tick(s, TS + 5, 9.9) for s in symbols])  # older: refused
    for address, group in by_node.items():
        node = cluster.node_by_address(address)
        for symbol in group:
            key = cache.tick_key(symbol)
            # The server's own slot computation agrees with the routing, and the key is there.
            assert node.keyslot(key) == node.keyslot(cache.candle_key(symbol, "1m", "ig"))
            assert node.owns_key(key), f"{key} not on {address}"
            assert node.owns_key(cache.tick_key(symbol, "ig"))
            got = await cache.get_tick(symbol)
            assert got is not None
            assert (got.timestamp, got.bid) == (TS + 10, 2.0)

    ticks = await cache.get_ticks([*symbols, "MISSING/USD"])
    assert sorted(ticks) == sorted(symbols)
    assert {t.timestamp for t in ticks.values()} == {TS + 10}

    for group in by_node.values():
        symbol = group[0]
        await cache.put_candles([candle(symbol, i) for i in range(5)], complete=True)
        candles = await cache.get_candles(symbol, "1m", 10, "ig")
        assert candles is not None
        assert [c.timestamp for c in candles] == [TS + i * 60_000 for i in range(5)]
    assert cache.stats().errors == 0
    assert cache.stats().writes == 2 * len(symbols) + 3
    assert (await cache.info_version()).startswith("redis ")
    assert await cache.ping() >= 0


# ----------------------------------------------------------------------------- coherence


@pytest.mark.parametrize("pinned", [False, True], ids=["any-node", "channel-node"])
async def test_updates_of_one_bus_reach_the_other_across_nodes(
    cluster: RedisClusterHandle, make_cache: Callable[..., ClusterRedisCache], pinned: bool
) -> None:
    cache_a, cache_b = (make_cache(cluster.seeds, bus_on_channel_node=pinned) for _ in "ab")
    await cache_a.connect()
    await cache_b.connect()
    a, b = CacheBus(cache_a), CacheBus(cache_b)
    ra, rb = Receiver(), Receiver()
    try:
        assert await b.start(rb.on_items, rb.on_lost, rb.on_restored)
        assert await a.start(ra.on_items, ra.on_lost, ra.on_restored)
        assert b._conn is not None
        sub_node = f"{b._conn.host}:{b._conn.port}"  # type: ignore[attr-defined]
        if pinned:  # the subscription is on the master owning the channel's slot
            owner = cache_b.cluster.get_node_from_key(cache_b.channel)
            assert owner is not None
            assert owner.name == sub_node
        by_node = spread_symbols(cache_a)
        # Only symbols held elsewhere: their writes go to other nodes, and unpinned the PUBLISH
        # too, so the message reaches B only through the cluster's pub/sub propagation.
        others = [s for node, group in by_node.items() if node != sub_node for s in group]
        for symbol in others:
            a.publish(tick(symbol, TS + 1))
        await a.flush()
        await rb.until(
            lambda: all(rb.latest(s) == TS + 1 for s in others), "B to receive A's updates"
        )
        for symbol in others:  # the values the message announced are in L2
            got = await cache_b.get_tick(symbol)
            assert got is not None
            assert got.timestamp == TS + 1
        assert a.stats().dropped == 0
        assert ra.items == []  # its own messages are skipped
    finally:
        await a.aclose()
        await b.aclose()


# ----------------------------------------------------------------------------- faults


async def test_a_killed_master_fails_its_symbols_then_recovers(
    own_cluster: RedisClusterHandle, make_cache: Callable[..., ClusterRedisCache]
) -> None:
    clock = ManualClock()
    caches = [
        make_cache(
            own_cluster.seeds,
            breaker=CircuitBreaker("l2", failure_threshold=3, reset_timeout=2.0, clock=clock),
        )
        for _ in range(2)
    ]
    cache, other = caches
    for c in caches:
        await c.connect()
    a, b = CacheBus(cache), CacheBus(other, reconnect_check_seconds=0.5, backoff_max=0.2)
    ra, rb = Receiver(), Receiver()
    try:
        assert await b.start(rb.on_items, rb.on_lost, rb.on_restored)
        assert await a.start(ra.on_items, ra.on_lost, ra.on_restored)
        assert b._conn is not None
        victim_address = f"{b._conn.host}:{b._conn.port}"  # type: ignore[attr-defined]
        victim = own_cluster.node_by_address(victim_address)
        by_node = spread_symbols(cache, per_node=1)
        dead = by_node[victim_address][0]
        alive = [group[0] for node, group in by_node.items() if node != victim_address]
        await cache.put_ticks([tick(s) for s in (dead, *alive)])

        victim.kill()  # B's subscription and ``dead``'s keys go with it

        # The lost master's symbols fail with the SDK error; the others are still served
        # while the breaker is closed.
        with pytest.raises(CacheUnavailableError):
            await cache.get_tick(dead)
        with pytest.raises(CacheUnavailableError):
            await cache.put_ticks([tick(dead, TS + 1)])
        for symbol in alive:
            got = await cache.get_tick(symbol)
            assert got is not None
            assert got.timestamp == TS
        # One breaker for the whole cluster: enough failures open it, and then every call
        # short-circuits (no I/O) until the probe, including those of healthy masters.
        for _ in range(3):
            with contextlib.suppress(CacheUnavailableError):
                await cache.get_tick(dead)
        assert cache.breaker_state == "open"
        short = cache.stats().short_circuited
        with pytest.raises(CacheUnavailableError):
            await cache.get_tick(alive[0])
        assert cache.stats().short_circuited == short + 1
        # The probe after the reset timeout reaches a healthy master and closes it again.
        clock.advance(2.5)
        assert await cache.get_tick(alive[0]) is not None
        assert cache.breaker_state == "closed"

        # The bus noticed its node's loss and moved to another master; coherence goes on.
        await rb.until(lambda: rb.lost >= 1 and rb.restored >= 1, "B to resubscribe")
        assert b._conn is not None
        assert f"{b._conn.host}:{b._conn.port}" != victim_address  # type: ignore[attr-defined]
        for symbol in alive:
            a.publish(tick(symbol, TS + 2))
        await a.flush()
        await rb.until(
            lambda: all(rb.latest(s) == TS + 2 for s in alive), "B to get updates after the loss"
        )

        victim.start()  # same port and nodes.conf: it rejoins with its slots, without data

        async def dead_symbol_writable() -> bool:
            clock.advance(2.5)  # let the breaker probe again if it opened meanwhile
            try:
                await cache.put_ticks([tick(dead, TS + 3)])
                got = await cache.get_tick(dead)
            except CacheUnavailableError:
                return False
            return got is not None and got.timestamp == TS + 3

        await poll(dead_symbol_writable, "the restarted master to serve its symbols again")
        assert victim.owns_key(cache.tick_key(dead))
        assert victim.script_loaded(WRITE_SCRIPT_SHA)  # re-sent with EVAL after NOSCRIPT
        ticks = await cache.get_ticks([dead, *alive])
        assert sorted(ticks) == sorted([dead, *alive])
        a.publish(tick(dead, TS + 4))
        await a.flush()
        await rb.until(lambda: rb.latest(dead) == TS + 4, "B to get updates of the restarted node")
    finally:
        await a.aclose()
        await b.aclose()


# ----------------------------------------------------------------------------- two routers


async def test_two_routers_share_the_cluster(
    cluster: RedisClusterHandle,
    postgres_url: str,
    pg_schema: str,
    tmp_path: Path,
) -> None:
    from data_manager.router import DataRouter
    from data_manager.settings import DataManagerSettings, DragonflySettings, PostgresSettings
    from data_manager.strategy import strategy_from_mapping

    prefix = f"t{secrets.token_hex(4)}"
    routers: list[DataRouter] = []
    try:
        for i in range(2):
            settings = DataManagerSettings(
                postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema),
                dragonfly=DragonflySettings(cluster_nodes=tuple(cluster.seeds), key_prefix=prefix),
                watch_strategy=False,
                journal_dir=tmp_path / f"j{i}",
                write_mode="sync",
            )
            router = DataRouter(
                settings,
                clock=ManualClock(),
                strategy=strategy_from_mapping({"aggregation": {"enabled": False}}),
            )
            await router.initialize()
            routers.append(router)
        ra, rb = routers
        l2 = ra.cache.l2
        assert isinstance(l2, ClusterRedisCache)
        by_node = spread_symbols(l2, per_node=1)
        symbols = [group[0] for group in by_node.values()]
        for symbol in symbols:
            await ra.save_tick(tick(symbol, TS + 7, 3.0))

        async def b_sees_all() -> bool:
            return all(
                (t := rb.cache.l1.get_tick(s)) is not None and t.timestamp == TS + 7
                for s in symbols
            )

        await poll(b_sees_all, "router B's L1 to receive A's ticks from every node")
        for symbol in symbols:
            got = await rb.get_latest_tick(symbol)
            assert got is not None
            assert (got.timestamp, got.bid) == (TS + 7, 3.0)
            in_l2 = await l2.get_tick(symbol)
            assert in_l2 is not None
            assert in_l2.timestamp == TS + 7
    finally:
        for router in reversed(routers):
            await router.close()


async def test_delete_range_drops_the_symbols_keys_on_every_node(
    cluster: RedisClusterHandle, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    # The keys of a symbol live on the node of its {symbol} slot, not on the first seed.
    from data_manager.router import DataRouter
    from data_manager.settings import DataManagerSettings, DragonflySettings, PostgresSettings
    from data_manager.strategy import strategy_from_mapping

    settings = DataManagerSettings(
        postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema),
        dragonfly=DragonflySettings(
            cluster_nodes=tuple(cluster.seeds), key_prefix=f"t{secrets.token_hex(4)}"
        ),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
        write_mode="sync",
    )
    strategy = strategy_from_mapping({"aggregation": {"enabled": False}})
    async with DataRouter(settings, clock=ManualClock(), strategy=strategy) as router:
        l2 = router.cache.l2
        assert isinstance(l2, ClusterRedisCache)
        symbols = [group[0] for group in spread_symbols(l2, per_node=1).values()]
        for symbol in symbols:
            await router.save_tick(tick(symbol, TS))
        await router.cache.flush()
        for symbol in symbols:
            assert await l2.get_tick(symbol) is not None
            assert await router.delete_range(symbol, TS, TS + 1, "ticks") == 1
            assert await l2.get_tick(symbol) is None, f"{symbol} kept its L2 tick"
            assert await l2.get_tick(symbol, "ig") is None


# ----------------------------------------------------------------------------- redirections


async def test_moved_and_ask_redirections_are_followed(
    cluster: RedisClusterHandle, make_cache: Callable[..., ClusterRedisCache]
) -> None:
    cache = make_cache(cluster.seeds)
    await cache.connect()
    by_node = spread_symbols(cache, per_node=1)
    (owner_address, (symbol,)), (other_address, (stranger,)) = list(by_node.items())[:2]
    owner, other = (cluster.node_by_address(a) for a in (owner_address, other_address))
    slot = owner.keyslot(cache.tick_key(symbol))

    # MOVED: a stale slot map sends the symbol to the wrong master, which redirects; the
    # cache reloads the map and retries there.
    nodes = cache.cluster.nodes_manager
    nodes.slots_cache[slot] = [nodes.nodes_cache[other_address]]
    await cache.put_ticks([tick(symbol, TS + 20)])
    assert cache.node_for_symbol(symbol) == owner_address  # the map was reloaded
    got = await cache.get_tick(symbol)
    assert got is not None
    assert got.timestamp == TS + 20
    assert owner.owns_key(cache.tick_key(symbol))
    assert cache.stats().errors == 0

    # ASK: while the slot migrates, a key the source no longer holds is asked of the target,
    # behind ASKING. The stranger's keys are untouched throughout.
    await cache.put_ticks([tick(stranger)])
    # Another symbol in the same slot (found locally: CRC16 of the hash tag, as the server).
    fresh_symbol = next(
        f"{symbol}{i}"
        for i in range(1_000_000)
        if key_slot(cache.tick_key(f"{symbol}{i}").encode()) == slot
    )
    owner_id, other_id = owner.node_id(), other.node_id()
    try:
        assert other.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", owner_id) == b"+OK\r\n"
        assert owner.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", other_id) == b"+OK\r\n"
        assert await cache.get_tick(fresh_symbol) is None  # ASK → the target: a miss, no error
        got = await cache.get_tick(symbol)  # still on the source: served there
        assert got is not None
        assert got.timestamp == TS + 20
    finally:
        for node in (owner, other):
            node.command("CLUSTER", "SETSLOT", str(slot), "STABLE")
    assert cache.stats().errors == 0
    assert await cache.get_tick(stranger) is not None
