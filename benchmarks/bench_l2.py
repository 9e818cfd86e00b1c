"""L2 cache benchmark: what the SDK layer costs over bare redis-py, and bus propagation.

Run against any Redis-protocol server (it only touches keys under a random prefix and
deletes them afterwards)::

    python benchmarks/bench_l2.py --url redis://127.0.0.1:6379/0

Measures, on one event loop:

1. ``RedisCache.get_tick`` on a hit versus a bare redis-py ``GET`` + ``orjson.loads`` of the
   same payload, through a client built with the same pool settings (hiredis parser in
   both) — median and p99 per call, sequential;
2. ``put_ticks`` of 100 ticks (compare-and-set script, one pipeline) versus a bare pipeline
   of 100 ``SET PX`` — median per batch;
3. propagation: ``CacheBus.publish`` on one instance until the other instance's
   ``on_items`` runs (p50/p99), one tick at a time and in bursts of 100 symbols.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence

import orjson
from redis.asyncio import BlockingConnectionPool, Redis

from data_manager.cache.bus import CacheBus
from data_manager.cache.codec import CacheItem, encode_tick
from data_manager.cache.redis import RedisCache
from data_manager.models import TickData

TS = 1_727_996_400_000


def pct(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fmt(name: str, samples: Sequence[float]) -> str:
    us = [s * 1e6 for s in samples]
    return (
        f"{name:<44} median {statistics.median(us):8.1f} µs   p99 {pct(us, 0.99):8.1f} µs"
        f"   (n={len(us)})"
    )


async def timed(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    for _ in range(min(100, n)):  # warm-up: connections, caches
        await call()
    out = []
    perf = time.perf_counter
    for _ in range(n):
        start = perf()
        await call()
        out.append(perf() - start)
    return out


def tick(i: int, symbol: str = "EUR/USD") -> TickData:
    return TickData(symbol=symbol, timestamp=TS + i, bid=1.0845, ask=1.0846, source="bench")


async def bench_reads(cache: RedisCache, n: int) -> None:
    # The same pool settings as RedisCache builds (socket/connect timeouts, pool size,
    # RESP2, hiredis, no retries are defaults there too apart from the Retry object).
    kwargs = dict(cache.client.connection_pool.connection_kwargs)
    pool = BlockingConnectionPool(
        max_connections=cache.client.connection_pool.max_connections, timeout=1.0, **kwargs
    )
    bare = Redis.from_pool(pool)
    await cache.put_ticks([tick(0)])
    key = cache.tick_key("EUR/USD")
    assert orjson.loads(await bare.get(key) or b"")["timestamp"] == TS

    async def bare_get() -> object:
        return orjson.loads(await bare.get(key) or b"null")

    async def sdk_get() -> object:
        return await cache.get_tick("EUR/USD")

    # Alternate call by call so drift (CPU frequency, other load) hits both alike.
    sdk: list[float] = []
    raw: list[float] = []
    perf = time.perf_counter
    for _ in range(200):
        await bare_get()
        await sdk_get()
    for _ in range(n):
        t0 = perf()
        await bare_get()
        t1 = perf()
        await sdk_get()
        raw.append(t1 - t0)
        sdk.append(perf() - t1)
    print(fmt("bare redis-py GET + orjson.loads", raw))
    print(fmt("RedisCache.get_tick (hit, TickData)", sdk))
    print(f"{'':<44} ratio of medians {statistics.median(sdk) / statistics.median(raw):.2f}")

    batch = [tick(i, f"SYM{i}") for i in range(100)]
    payloads = [(cache.tick_key(t.symbol, t.source), encode_tick(t)) for t in batch]

    async def bare_put() -> object:
        pipe = bare.pipeline(transaction=False)
        for k, v in payloads:
            pipe.set(k, v, px=30_000)
        return await pipe.execute()

    async def sdk_put() -> object:
        await cache.put_ticks(batch)
        return None

    print(fmt("bare pipeline of 100 SET PX", await timed(bare_put, n // 20)))
    print(fmt("RedisCache.put_ticks(100) (CAS script)", await timed(sdk_put, n // 20)))
    await bare.aclose()


async def bench_propagation(url: str, prefix: str, n: int) -> None:
    cache_a = RedisCache(url=url, key_prefix=prefix)
    cache_b = RedisCache(url=url, key_prefix=prefix)
    a, b = CacheBus(cache_a), CacheBus(cache_b)
    arrived: dict[tuple[str, int], float] = {}
    event = asyncio.Event()
    perf = time.perf_counter

    def on_items(items: Sequence[CacheItem]) -> None:
        now = perf()
        for item in items:
            arrived[item.symbol, item.timestamp] = now
        event.set()

    def nothing() -> None:
        return None

    await cache_a.connect()
    await cache_b.connect()
    await a.start(lambda items: None, nothing, nothing)
    await b.start(on_items, nothing, nothing)

    single: list[float] = []
    for i in range(n + 200):
        event.clear()
        t = tick(i)
        start = perf()
        a.publish(t)
        while (t.symbol, t.timestamp) not in arrived:
            await event.wait()
            event.clear()
        if i >= 200:
            single.append(arrived[t.symbol, t.timestamp] - start)
    print(fmt("publish → other instance's on_items, 1 tick", single))

    burst: list[float] = []
    symbols = [f"SYM{i}" for i in range(100)]
    for j in range(max(1, n // 20)):
        arrived.clear()
        ts = TS + 10_000 + j
        start = perf()
        for s in symbols:
            a.publish(TickData(symbol=s, timestamp=ts, bid=1.0, ask=1.1, source="bench"))
        while len(arrived) < len(symbols):
            await event.wait()
            event.clear()
        burst.extend(arrived[s, ts] - start for s in symbols)
    print(fmt("publish → on_items, bursts of 100 symbols", burst))
    stats = a.stats()
    print(
        f"{'':<44} {stats.published} updates in {stats.messages_sent} pipelines/messages, "
        f"{stats.coalesced} coalesced"
    )
    await a.aclose()
    await b.aclose()
    await cache_a.aclose()
    await cache_b.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("DATA_MANAGER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    parser.add_argument("-n", type=int, default=10_000, help="samples per read measurement")
    args = parser.parse_args()
    prefix = f"bench{secrets.token_hex(4)}"
    cache = RedisCache(url=args.url, key_prefix=prefix)
    await cache.connect()
    print(f"server: {await cache.info_version()} at {cache.target}; prefix {prefix}")
    try:
        await bench_reads(cache, args.n)
        await bench_propagation(args.url, prefix, args.n // 5)
    finally:
        keys = [k async for k in cache.client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await cache.client.unlink(*keys[start : start + 1000])
        await cache.aclose()


if __name__ == "__main__":
    asyncio.run(main())
