"""Read path (issue 3): L1 hits, L2 hits with a cold L1, and the database fallback.

Every SDK figure is measured next to the bare operation it is built on, in the same run:

* L1 hits (``get_latest_tick``, ``get_latest_candles(..., 100)``) as ``timeit`` does it: the
  mean over a batch of back-to-back awaits, median over many batches; the baselines
  (``dict.get``, a 100-item slice) run through the same loop;
* the L2 hit clears the router's L1 before every read, so each read goes L1 miss → L2; the
  baseline is a redis-py ``GET`` + ``orjson.loads`` of the same key through a client built
  with the SDK's own connection settings (hiredis in both). Calls alternate SDK/baseline so
  drift hits both alike; median and p99 per call;
* the database fallback deletes the L2 keys and clears L1 before every read (so each read
  is L1 miss → L2 miss → PostgreSQL); the baseline is a bare Redis ``GET`` (a miss) plus a bare
  asyncpg ``fetchrow`` of the same row with the same columns. The SDK refills L2 in the
  background after such a read; the loop waits for that refill (outside the timed window)
  before deleting the keys again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from benchmarks._report import Figure, Group, median, pct
from benchmarks._servers import RouterSpec, Scratch, build_router

SOURCE = "bench"
SYMBOLS = [f"S{i:02d}/USD" for i in range(50)]
HOT = SYMBOLS[25]
MINUTE = 60_000

L1_TARGET_TICK_US = 3.0
L1_TARGET_CANDLES_US = 15.0
L2_TARGET_RATIO = 1.5
DB_TARGET_RATIO = 1.5


async def _batched_ns(call: Callable[[], Awaitable[object]], number: int, repeat: int) -> float:
    """Median over ``repeat`` batches of the mean ns per awaited call."""
    perf = time.perf_counter_ns
    for _ in range(number):  # warm-up batch
        await call()
    means = []
    for _ in range(repeat):
        start = perf()
        for _ in range(number):
            await call()
        means.append((perf() - start) / number)
    return median(means)


def _batched_sync_ns(call: Callable[[], object], number: int, repeat: int) -> float:
    """The same for a plain function (the baselines)."""
    perf = time.perf_counter_ns
    for _ in range(number):
        call()
    means = []
    for _ in range(repeat):
        start = perf()
        for _ in range(number):
            call()
        means.append((perf() - start) / number)
    return median(means)


async def _await_floor(number: int, repeat: int) -> float:
    table = {HOT: object()}

    async def trivial() -> object:
        return table.get(HOT)

    return await _batched_ns(trivial, number, repeat)


def _bare_redis(router: Any) -> Any:
    """A redis-py client with the SDK's own connection settings (hiredis parser, RESP2)."""
    from redis.asyncio import BlockingConnectionPool, Redis

    pool = router.cache.l2.client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    return Redis.from_pool(
        BlockingConnectionPool(max_connections=pool.max_connections, timeout=1.0, **kwargs)
    )


async def run_reads(scratch: Scratch, *, quick: bool) -> Group:
    """Run the read-path benchmark and return its figures."""
    import asyncpg

    from data_manager.models import CandleData, TickData
    from data_manager.storage.schema import TICK_READ_COLUMNS

    group = Group("reads", "1. Read path (issue 3)")
    spec: RouterSpec = scratch.spec(
        "reads", {"aggregation": {"enabled": False}, "order_flow": {"enabled": False}}
    )
    number, repeat = (1000, 30) if quick else (2000, 150)
    samples = 400 if quick else 5000
    db_samples = 200 if quick else 3000

    router = build_router(spec)
    await router.initialize()
    bare = _bare_redis(router)
    conn = await asyncpg.connect(spec.postgres_url, timeout=10)
    try:
        now = time.time_ns() // 1_000_000
        for i, sym in enumerate(SYMBOLS):
            await router.save_tick(
                TickData(
                    symbol=sym, timestamp=now + i, bid=1.1, ask=1.1002, source=SOURCE, volume=1.0
                )
            )
        first_bucket = (now // MINUTE - 200) * MINUTE
        candles = [
            CandleData(
                symbol=HOT,
                timeframe="1m",
                timestamp=first_bucket + k * MINUTE,
                open=1.1,
                high=1.2,
                low=1.0,
                close=1.15,
                volume=10.0,
                source=SOURCE,
                start_time=first_bucket + k * MINUTE,
                end_time=first_bucket + k * MINUTE + 59_000,
                is_closed=True,
            )
            for k in range(200)
        ]
        await router.save_candles_bulk(candles)
        await router.flush()

        # ---------------------------------------------------------------- L1 hits
        got = await router.get_latest_tick(HOT)
        assert got is not None, "no tick in L1"
        assert got.symbol == HOT, got
        first = await router.get_latest_candles(HOT, "1m", 100)  # resolves the source once
        assert len(first) == 100, len(first)
        plain = {sym: object() for sym in SYMBOLS}
        ring = list(candles)
        floor = await _await_floor(number, repeat)

        get_tick = router.get_latest_tick
        sdk_tick = await _batched_ns(lambda: get_tick(HOT), number, repeat)
        dict_ns = _batched_sync_ns(lambda: plain.get(HOT), number, repeat)
        group.figures.append(
            Figure(
                "get_latest_tick, L1 hit (median)",
                sdk_tick / 1000,
                "µs",
                "dict.get(symbol)",
                dict_ns / 1000,
                sdk_tick / dict_ns,
                target=f"≤ {L1_TARGET_TICK_US:g} µs",
                met=sdk_tick / 1000 <= L1_TARGET_TICK_US,
                note=(
                    f"mean of {number} back-to-back awaits, median of {repeat} batches; "
                    f"awaiting a trivial coroutine costs {floor / 1000:.2f} µs on this machine"
                ),
            )
        )
        get_candles = router.get_latest_candles
        sdk_candles = await _batched_ns(lambda: get_candles(HOT, "1m", 100), number, repeat)
        slice_ns = _batched_sync_ns(lambda: ring[-100:], number, repeat)
        group.figures.append(
            Figure(
                "get_latest_candles(…, 100), L1 hit (median)",
                sdk_candles / 1000,
                "µs",
                "list[-100:] of 200 items",
                slice_ns / 1000,
                sdk_candles / slice_ns,
                target=f"≤ {L1_TARGET_CANDLES_US:g} µs",
                met=sdk_candles / 1000 <= L1_TARGET_CANDLES_US,
            )
        )

        # ---------------------------------------------------------------- L2 hits
        l1 = router.cache.l1
        l2 = router.cache.l2
        key_any = l2.tick_key(HOT)
        assert orjson.loads(await bare.get(key_any) or b"null") is not None, "L2 holds no tick"
        sdk: list[float] = []
        base: list[float] = []
        perf = time.perf_counter_ns
        for i in range(samples + 200):
            order = (0, 1) if i % 2 else (1, 0)
            for which in order:
                l1.clear()
                if which:
                    t0 = perf()
                    tick = await router.get_latest_tick(HOT)
                    t1 = perf()
                    assert tick is not None
                    if i >= 200:
                        sdk.append((t1 - t0) / 1000)
                else:
                    t0 = perf()
                    orjson.loads(await bare.get(key_any) or b"null")
                    t1 = perf()
                    if i >= 200:
                        base.append((t1 - t0) / 1000)
        ratio = median(sdk) / median(base)
        group.figures.append(
            Figure(
                "get_latest_tick, L2 hit, L1 cleared (median)",
                median(sdk),
                "µs",
                "redis-py GET + orjson.loads",
                median(base),
                ratio,
                target=f"≤ {L2_TARGET_RATIO:g}× baseline",
                met=ratio <= L2_TARGET_RATIO,
                note=(
                    f"p99 {pct(sdk, 0.99):.0f} µs vs {pct(base, 0.99):.0f} µs "
                    f"({len(sdk)} alternating samples)"
                ),
            )
        )

        # Candles from L2 (informational: the L2 target is stated for the GET path).
        ring_key = l2.candle_key(HOT, "1m", SOURCE)
        deadline = time.monotonic() + 2.0  # the backfill of the first read runs in background
        while len(members := await bare.zrange(ring_key, -100, -1)) < 100:
            if time.monotonic() > deadline:
                break
        if len(members) == 100:
            sdk, base = [], []
            for i in range(samples // 2 + 100):
                l1.clear()
                t0 = perf()
                got_c = await router.get_latest_candles(HOT, "1m", 100)
                t1 = perf()
                raw = await bare.zrange(ring_key, -100, -1)
                [orjson.loads(m) for m in raw]
                t2 = perf()
                assert len(got_c) == 100
                if i >= 100:
                    sdk.append((t1 - t0) / 1000)
                    base.append((t2 - t1) / 1000)
            group.figures.append(
                Figure(
                    "get_latest_candles(…, 100), L2 hit, L1 cleared (median)",
                    median(sdk),
                    "µs",
                    "ZRANGE 100 + orjson.loads ×100",
                    median(base),
                    median(sdk) / median(base),
                    target="(context; no target)",
                    note=f"p99 {pct(sdk, 0.99):.0f} µs vs {pct(base, 0.99):.0f} µs",
                )
            )
        else:
            group.notes.append(
                f"L2 candle ring held {len(members)} candles, not 100: candle L2 read skipped"
            )

        # ---------------------------------------------------------------- DB fallback
        key_src = l2.tick_key(HOT, SOURCE)
        columns = ", ".join(TICK_READ_COLUMNS)
        sql = (
            f'SELECT {columns} FROM "{spec.schema}".ticks WHERE symbol = $1 '
            "ORDER BY ts DESC LIMIT 1"
        )
        assert await conn.fetchrow(sql, HOT) is not None
        sdk, base = [], []
        for i in range(db_samples + 50):
            l1.clear()
            await bare.delete(key_any, key_src)
            t0 = perf()
            tick = await router.get_latest_tick(HOT)
            t1 = perf()
            assert tick is not None, "the database fallback returned nothing"
            assert tick.symbol == HOT, tick
            # Let the background refill land before the keys are deleted again.
            deadline = time.monotonic() + 2.0
            while not await bare.exists(key_any) and time.monotonic() < deadline:
                pass
            await bare.delete(key_any, key_src)
            t2 = perf()
            await bare.get(key_any)
            await conn.fetchrow(sql, HOT)
            t3 = perf()
            if i >= 50:
                sdk.append((t1 - t0) / 1000)
                base.append((t3 - t2) / 1000)
        ratio = median(sdk) / median(base)
        group.figures.append(
            Figure(
                "get_latest_tick, L1+L2 miss → PostgreSQL (median)",
                median(sdk),
                "µs",
                "Redis GET (miss) + asyncpg fetchrow",
                median(base),
                ratio,
                target=f"≤ {DB_TARGET_RATIO:g}× baseline",
                met=ratio <= DB_TARGET_RATIO,
                note=(
                    f"p99 {pct(sdk, 0.99):.0f} µs vs {pct(base, 0.99):.0f} µs ({len(sdk)} samples)"
                ),
            )
        )
    finally:
        await conn.close(timeout=10)
        await bare.aclose()
        await router.close()
    return group
