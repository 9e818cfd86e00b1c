"""Cross-process benchmarks (issue 3): propagation to other processes' L1, and hit rates.

Readers are separate processes (``multiprocessing`` with ``spawn``), each with its own
router on the same PostgreSQL schema and Redis key prefix as the writer. Times are
``time.time_ns()``, which is one clock for every process on the machine.

Propagation: the writer process saves a tick every 3 ms through the shipped strategy,
rotating over 50 symbols (and, 2 ms later, one through a second router with no derived data,
on other symbols); each reader notes when its bus hands the tick to the router (which puts
it in L1 in the same call: the hook wraps the bus callback, so the time is taken once the
tick is in L1). Baseline: a bare redis-py ``PUBLISH`` of a message of the same size,
interleaved with the SDK's writes, to a bare redis-py subscriber in the reader processes.

Hit rates: one collector writes 50 symbols at 1,000 ticks/s (aggregation on, as shipped),
after a history of 200 closed 1m candles per symbol was stored; 8 reader processes (2 with
``--quick``) each read ``get_latest_tick`` and ``get_latest_candles(…, "1m", 100)`` of a random
symbol 100 times a second. After a warm-up, each reader counts which tier answered (the
router's counters, read before and after every call) and the age of what it was served:
now − the tick's timestamp, and now − the last candle's ``end_time`` (the newest tick in it).
"""

from __future__ import annotations

import asyncio
import faulthandler
import multiprocessing
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from benchmarks._report import Figure, Group, median, pct
from benchmarks._servers import RouterSpec, Scratch, build_router

SOURCE = "bench"
SYMBOLS = [f"S{i:02d}/USD" for i in range(50)]
MINUTE = 60_000
PROPAGATION_TARGET_P99_MS = 2.0
_SPAWN = multiprocessing.get_context("spawn")


def _ms(ns: float) -> float:
    return ns / 1e6


async def _get(queue: Any, wait: float, procs: list[Any]) -> Any:
    """``queue.get`` (at most ``wait`` seconds) without blocking the event loop; fails at
    once when one of ``procs`` died."""
    import queue as queues

    deadline = time.monotonic() + wait
    while True:
        try:
            return await asyncio.to_thread(queue.get, True, 0.5)
        except queues.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                msg = f"reader process exited with code {dead[0].exitcode} (see its traceback)"
                raise RuntimeError(msg) from None
            if time.monotonic() > deadline:
                alive = [p for p in procs if p.is_alive() and p.pid is not None]
                for proc in alive:  # ask for their asyncio tasks (see _dump_tasks_on_signal)
                    os.kill(proc.pid, signal.SIGUSR1)
                await asyncio.sleep(1)
                msg = (
                    f"no answer from the reader processes within {wait:g} s "
                    f"({len(alive)} still running; where they wait is printed above)"
                )
                raise TimeoutError(msg) from None


def _run_reader(main: Coroutine[Any, Any, None]) -> None:
    """Run a reader process's ``main``; SIGUSR1 prints where it waits.

    Outside the event loop (starting, or after the loop closed) the handler is
    :mod:`faulthandler`'s: every thread's Python stack. While the loop runs it is
    :func:`_dump_tasks_on_signal`'s: every asyncio task's chain of awaits.
    """
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        asyncio.run(main)
    finally:
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # asyncio reset it


def _await_chain(coro: Any) -> list[str]:
    """``file:line in function`` of each coroutine ``coro`` awaits, outermost first."""
    where: list[str] = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where


def _dump_tasks_on_signal() -> None:
    """In a reader process: print every asyncio task's chain of awaits on SIGUSR1, so a
    reader that never answers shows where it waits."""

    def dump() -> None:
        tasks = asyncio.all_tasks()
        lines = [f"reader {os.getpid()}: {len(tasks)} asyncio tasks"]
        for task in tasks:
            lines.append(f"  {task.get_name()}:")
            lines += [f"    {place}" for place in _await_chain(task.get_coro())]
        print("\n".join(lines), file=sys.stderr, flush=True)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)


def _stop_all(procs: list[Any]) -> None:
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)


# --------------------------------------------------------------------------- propagation


def propagation_reader(spec: RouterSpec, index: int, ready: Any, stop: Any, out: Any) -> None:
    """Subprocess entry point: record when each tick (and baseline message) arrives."""
    _run_reader(_propagation_reader(spec, index, ready, stop, out))


def _wrap_bus(router: Any, on_tick: Callable[[Any, int], None]) -> None:
    """Call ``on_tick(tick, time_ns)`` once the bus has handed ``tick`` to the router."""
    from data_manager.models import TickData

    bus = getattr(router, "_bus", None)
    if bus is None or not hasattr(bus, "_on_items"):
        msg = "cannot hook the router's cache bus (no _bus._on_items): update benchmarks/_bus.py"
        raise RuntimeError(msg)
    inner = bus._on_items

    def hook(items: Any) -> None:
        inner(items)  # the router's callback: puts the items in L1
        now = time.time_ns()
        for item in items:
            if type(item) is TickData:
                on_tick(item, now)

    bus._on_items = hook


async def _propagation_reader(
    spec: RouterSpec, index: int, ready: Any, stop: Any, out: Any
) -> None:
    from redis.asyncio import Redis

    _dump_tasks_on_signal()
    router = build_router(spec)
    await router.initialize()
    got: dict[tuple[str, int], int] = {}
    _wrap_bus(router, lambda tick, now: got.__setitem__((tick.symbol, tick.timestamp), now))

    baseline: dict[int, int] = {}
    client = Redis.from_url(spec.redis_url or "", protocol=2)
    pubsub = client.pubsub()
    await pubsub.subscribe(f"{spec.prefix}:baseline")

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                now = time.time_ns()
                baseline[orjson.loads(message["data"])["i"]] = now

    listener = asyncio.create_task(listen())
    ready.put(index)
    try:
        while not stop.is_set():  # noqa: ASYNC110 - a multiprocessing.Event, not asyncio's
            await asyncio.sleep(0.05)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
        await router.close()
    out.put((index, got, baseline))


def _latencies(results: list[Any], sends: dict[tuple[str, int], int]) -> tuple[list[float], int]:
    out: list[float] = []
    lost = 0
    for _, got, _baseline in results:
        for key, sent in sends.items():
            recv = got.get(key)
            if recv is None:
                lost += 1
            else:
                out.append(_ms(recv - sent))
    return out, lost


async def run_propagation(scratch: Scratch, *, quick: bool) -> Group:
    """save_tick in this process → L1 of two reader processes."""
    from redis.asyncio import Redis

    from data_manager.models import TickData

    group = Group("propagation", "")
    n = 600 if quick else 5000
    warm = 100 if quick else 200
    interval = 0.003
    spec = scratch.spec("prop")  # the shipped strategy (aggregation and order flow on)
    router = build_router(spec)
    await router.initialize()  # creates the schema before the readers race for it
    # A second writer on other symbols, with no derived data: the bus path of a bare tick.
    plain = build_router(
        spec.with_strategy({"aggregation": {"enabled": False}, "order_flow": {"enabled": False}})
    )
    await plain.initialize()
    ready, stop, out = _SPAWN.Queue(), _SPAWN.Event(), _SPAWN.Queue()
    procs = [
        _SPAWN.Process(target=propagation_reader, args=(spec, k, ready, stop, out), daemon=True)
        for k in range(2)
    ]
    for proc in procs:
        proc.start()
    bare = Redis.from_url(spec.redis_url or "", protocol=2)
    try:
        for _ in procs:
            await _get(ready, 120, procs)
        base_ms = time.time_ns() // 1_000_000

        def tick(i: int, prefix: str) -> Any:
            return TickData(
                symbol=f"{prefix}{SYMBOLS[i % len(SYMBOLS)][1:]}",
                timestamp=base_ms + i,
                bid=1.1 + (i % 7) * 1e-5,
                ask=1.1002 + (i % 7) * 1e-5,
                source=SOURCE,
            )

        shipped_ticks = [tick(i, "S") for i in range(warm + n)]
        plain_ticks = [tick(i, "T") for i in range(warm + n)]
        # The shipped writer, the bare baseline and the plain writer take turns, one every
        # ``interval / 3``, so all three see the same load.
        pad = "x" * 420  # about the size of one bus message carrying a tick
        channel = f"{spec.prefix}:baseline"
        sends: dict[tuple[str, int], int] = {}
        plain_sends: dict[tuple[str, int], int] = {}
        base_sends: dict[int, int] = {}
        step = interval / 3
        for i in range(warm + n):
            t = shipped_ticks[i]
            sent = time.time_ns()
            await router.save_tick(t)
            if i >= warm:
                sends[(t.symbol, t.timestamp)] = sent
            await asyncio.sleep(step)
            payload = orjson.dumps({"i": i, "pad": pad})
            sent = time.time_ns()
            await bare.publish(channel, payload)
            if i >= warm:
                base_sends[i] = sent
            await asyncio.sleep(step)
            t = plain_ticks[i]
            sent = time.time_ns()
            await plain.save_tick(t)
            if i >= warm:
                plain_sends[(t.symbol, t.timestamp)] = sent
            await asyncio.sleep(step)
        await asyncio.sleep(0.5)
        stop.set()
        results = [await _get(out, 120, procs) for _ in procs]
    finally:
        stop.set()
        await bare.aclose()
        await plain.close()
        await router.close()
        await asyncio.to_thread(_stop_all, procs)

    sdk, lost = _latencies(results, sends)
    sdk_plain, lost_plain = _latencies(results, plain_sends)
    base: list[float] = []
    for _, _got, baseline in results:
        base += [_ms(baseline[i] - sent) for i, sent in base_sends.items() if i in baseline]
    count = f"{len(sdk)} deliveries ({n} ticks × {len(procs)} readers)"
    group.figures.append(
        Figure(
            "save_tick → L1 of another process, p50",
            median(sdk),
            "ms",
            "bare PUBLISH → redis-py subscriber",
            median(base),
            median(sdk) / median(base),
            note=f"{count}; {lost} never arrived" if lost else count,
        )
    )
    group.figures.append(
        Figure(
            "save_tick → L1 of another process, p99",
            pct(sdk, 0.99),
            "ms",
            "bare PUBLISH → redis-py subscriber",
            pct(base, 0.99),
            pct(sdk, 0.99) / pct(base, 0.99),
            target=f"≤ {PROPAGATION_TARGET_P99_MS:g} ms",
            met=pct(sdk, 0.99) <= PROPAGATION_TARGET_P99_MS and lost == 0,
            note=f"max {max(sdk):.2f} ms; baseline max {max(base):.2f} ms",
        )
    )
    group.figures.append(
        Figure(
            "Same, writer with no derived data, p99",
            pct(sdk_plain, 0.99),
            "ms",
            "bare PUBLISH → redis-py subscriber",
            pct(base, 0.99),
            pct(sdk_plain, 0.99) / pct(base, 0.99),
            target=f"(context; ≤ {PROPAGATION_TARGET_P99_MS:g} ms)",
            note=(
                f"p50 {median(sdk_plain):.2f} ms, max {max(sdk_plain):.2f} ms"
                + (f"; {lost_plain} never arrived" if lost_plain else "")
            ),
        )
    )
    group.notes.append(
        f"1 writer process with two routers, 2 reader processes; every {interval * 1000:g} ms "
        f"the shipped-strategy router saves a tick (50 symbols in turn; its aggregation and "
        "order flow publish 3 candles and 1 order-flow value with each), the bare baseline "
        "publishes once and the no-derived-data router saves a tick of other symbols; both "
        "routers write to PostgreSQL (buffered)"
    )
    return group


# --------------------------------------------------------------------------- hit rates


def hitrate_reader(
    spec: RouterSpec, index: int, cfg: dict[str, float], ready: Any, go: Any, out: Any
) -> None:
    """Subprocess entry point: read random symbols, count tiers and ages."""
    _run_reader(_hitrate_reader(spec, index, cfg, ready, go, out))


class _Tiers:
    """Which tier answered a call, from the router's counters before and after it."""

    def __init__(self, router: Any) -> None:
        self._router = router

    def snap(self) -> tuple[int, int, int] | None:
        # The router sums its per-operation counters into a new object on every access.
        c = getattr(self._router, "_counters", None)
        return None if c is None else (c.l1_hits, c.l2_hits, c.db_reads)

    @staticmethod
    def which(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> str:
        if before is None or after is None:
            return "?"
        if after[0] > before[0]:
            return "l1"
        if after[1] > before[1]:
            return "l2"
        if after[2] > before[2]:
            return "db"
        return "none"


async def _hitrate_reader(
    spec: RouterSpec, index: int, cfg: dict[str, float], ready: Any, go: Any, out: Any
) -> None:
    _dump_tasks_on_signal()
    router = build_router(spec)
    await router.initialize()
    ready.put(index)
    await asyncio.to_thread(go.wait, 120)
    rng = random.Random(index)
    tiers = _Tiers(router)
    period = 1.0 / cfg["reads_per_second"]
    counts: dict[str, dict[str, int]] = {"tick": {}, "candles": {}}
    cold: dict[str, dict[str, int]] = {"tick": {}, "candles": {}}  # during the warm-up
    tick_age: list[int] = []
    candle_age: list[int] = []
    short = 0
    empty = 0
    loop = asyncio.get_running_loop()
    warm_end = loop.time() + cfg["warm"]
    end = warm_end + cfg["seconds"]
    stats_before = None
    while (now := loop.time()) < end:
        measuring = now >= warm_end
        if measuring and stats_before is None:
            stats_before = await router.cache.get_stats()
        symbol = rng.choice(SYMBOLS)
        s0 = tiers.snap()
        tick = await router.get_latest_tick(symbol)
        s1 = tiers.snap()
        candles = await router.get_latest_candles(symbol, "1m", 100)
        s2 = tiers.snap()
        wall = time.time_ns() // 1_000_000
        into = counts if measuring else cold
        tier = _Tiers.which(s0, s1)
        into["tick"][tier] = into["tick"].get(tier, 0) + 1
        tier = _Tiers.which(s1, s2)
        into["candles"][tier] = into["candles"].get(tier, 0) + 1
        if measuring:
            if tick is None:
                empty += 1
            else:
                tick_age.append(wall - tick.timestamp)
            if candles:
                last = candles[-1]
                candle_age.append(wall - (last.end_time or last.timestamp))
                short += len(candles) < 100
            else:
                empty += 1
        await asyncio.sleep(period)
    stats_after = await router.cache.get_stats()
    await router.close()
    assert stats_before is not None
    totals = {
        "l1_hits": stats_after.l1.hits - stats_before.l1.hits,
        "l1_misses": stats_after.l1.misses - stats_before.l1.misses,
        "l2_hits": stats_after.l2.hits - stats_before.l2.hits,
        "l2_misses": stats_after.l2.misses - stats_before.l2.misses,
        "db_reads": int(stats_after.details.get("db_reads") or 0)
        - int(stats_before.details.get("db_reads") or 0),
    }
    out.put(
        {
            "index": index,
            "counts": counts,
            "cold": cold,
            "totals": totals,
            "tick_age": tick_age,
            "candle_age": candle_age,
            "short": short,
            "empty": empty,
        }
    )


async def run_hitrates(scratch: Scratch, *, quick: bool) -> Group:
    """One collector, N reader processes: hit rate per tier and age of served values."""
    from data_manager.models import CandleData, TickData

    group = Group("hitrates", "")
    readers = 2 if quick else 8
    cfg = {
        "warm": 2.0 if quick else 3.0,
        "seconds": 4.0 if quick else 20.0,
        "reads_per_second": 100.0,
    }
    rate = 1000  # ticks/s over all symbols
    spec = scratch.spec("hits")
    router = build_router(spec)
    await router.initialize()
    agg_source = f"agg:{SOURCE}"  # the aggregator's default source prefix
    this_minute = time.time_ns() // 1_000_000 // MINUTE * MINUTE
    history = [
        CandleData(
            symbol=sym,
            timeframe="1m",
            timestamp=this_minute - (200 - k) * MINUTE,
            open=1.1,
            high=1.2,
            low=1.0,
            close=1.15,
            volume=10.0,
            source=agg_source,
            start_time=this_minute - (200 - k) * MINUTE,
            end_time=this_minute - (200 - k) * MINUTE + 59_000,
            is_closed=True,
        )
        for sym in SYMBOLS
        for k in range(200)
    ]
    await router.save_candles_bulk(history)

    ready, go, out = _SPAWN.Queue(), _SPAWN.Event(), _SPAWN.Queue()
    procs = [
        _SPAWN.Process(target=hitrate_reader, args=(spec, k, cfg, ready, go, out), daemon=True)
        for k in range(readers)
    ]
    for proc in procs:
        proc.start()
    written = 0

    async def collect(seconds: float) -> None:
        nonlocal written
        loop = asyncio.get_running_loop()
        per_slice = max(1, rate // 1000)  # ticks per 1 ms slice
        start = next_slice = loop.time()
        i = 0
        while loop.time() - start < seconds:
            for _ in range(per_slice):
                jitter = (i % 13) * 1e-5
                await router.save_tick(
                    TickData(
                        symbol=SYMBOLS[i % len(SYMBOLS)],
                        timestamp=time.time_ns() // 1_000_000,
                        bid=1.1 + jitter,
                        ask=1.1002 + jitter,
                        source=SOURCE,
                    )
                )
                i += 1
            next_slice += 0.001
            await asyncio.sleep(max(0.0, next_slice - loop.time()))
        written = i

    try:
        for _ in procs:
            await _get(ready, 180, procs)
        # The collector runs a second before the readers start, and past their end.
        collector = asyncio.create_task(collect(cfg["warm"] + cfg["seconds"] + 3.0))
        await asyncio.sleep(1.0)
        go.set()
        results = [await _get(out, 180, procs) for _ in procs]
        await collector
    finally:
        go.set()
        await router.close()
        await asyncio.to_thread(_stop_all, procs)

    counts: dict[str, dict[str, int]] = {"tick": {}, "candles": {}}
    cold: dict[str, dict[str, int]] = {"tick": {}, "candles": {}}
    totals: dict[str, int] = {}
    tick_age: list[int] = []
    candle_age: list[int] = []
    short = empty = 0
    for r in results:
        for kind in counts:
            for tier, c in r["counts"][kind].items():
                counts[kind][tier] = counts[kind].get(tier, 0) + c
            for tier, c in r["cold"][kind].items():
                cold[kind][tier] = cold[kind].get(tier, 0) + c
        for k, v in r["totals"].items():
            totals[k] = totals.get(k, 0) + v
        tick_age += r["tick_age"]
        candle_age += r["candle_age"]
        short += r["short"]
        empty += r["empty"]

    def shares(table: dict[str, dict[str, int]], kind: str) -> str:
        total = sum(table[kind].values())
        return ", ".join(
            f"{tier.upper()} {100.0 * table[kind][tier] / total:.1f} %"
            for tier in ("l1", "l2", "db", "none", "?")
            if table[kind].get(tier)
        )

    reads = totals["l1_hits"] + totals["l1_misses"]
    l1_rate = 100.0 * totals["l1_hits"] / reads if reads else 0.0
    l2_lookups = totals["l2_hits"] + totals["l2_misses"]
    l2_rate = 100.0 * totals["l2_hits"] / l2_lookups if l2_lookups else 0.0
    group.figures += [
        Figure(
            "L1 hit rate, all reads",
            l1_rate,
            "%",
            target="report",
            note=f"{reads:,} reads by {readers} readers in {cfg['seconds']:g} s",
        ),
        Figure(
            "L2 hit rate, of L1 misses that tried L2",
            l2_rate,
            "%",
            target="report",
            note=f"{l2_lookups:,} L2 lookups",
        ),
        Figure(
            "Database reads, share of all reads",
            100.0 * totals["db_reads"] / reads if reads else 0.0,
            "%",
            target="report",
            note=f"{totals['db_reads']:,} database reads",
        ),
    ]
    for kind, label in (("tick", "get_latest_tick"), ("candles", "get_latest_candles(…, 100)")):
        group.notes.append(
            f"{label} answered by: {shares(counts, kind)} (during the {cfg['warm']:g} s "
            f"warm-up, from a cold L1: {shares(cold, kind)})"
        )
    # With ticks every 50 ms per symbol, a perfectly fresh cache serves values whose age is
    # uniform on 0..50 ms: that is the baseline an instant bus would reach.
    gap = 1000.0 * len(SYMBOLS) / rate
    if tick_age:
        group.figures += [
            Figure(
                "Age of served tick (now − timestamp), p50",
                float(median(tick_age)),
                "ms",
                f"feed gap alone: U(0, {gap:g} ms)",
                gap / 2,
                target="report",
            ),
            Figure(
                "Age of served tick (now − timestamp), p99",
                float(pct(tick_age, 0.99)),
                "ms",
                f"feed gap alone: U(0, {gap:g} ms)",
                gap * 0.99,
                target="report",
                note=f"max {max(tick_age)} ms",
            ),
        ]
    if candle_age:
        group.figures += [
            Figure(
                "Age of served 1m candle (now − end_time), p50",
                float(median(candle_age)),
                "ms",
                f"feed gap alone: U(0, {gap:g} ms)",
                gap / 2,
                target="report",
            ),
            Figure(
                "Age of served 1m candle (now − end_time), p99",
                float(pct(candle_age, 0.99)),
                "ms",
                f"feed gap alone: U(0, {gap:g} ms)",
                gap * 0.99,
                target="report",
                note=f"max {max(candle_age)} ms; {short} of {len(candle_age)} answers had < 100 "
                "candles",
            ),
        ]
    group.notes.append(
        f"1 collector at {rate:,} ticks/s over {len(SYMBOLS)} symbols (shipped strategy: "
        f"aggregation on, buffered writes); {readers} reader processes × "
        f"{cfg['reads_per_second']:g} iterations/s (one tick read + one candle read each), "
        f"{cfg['warm']:g} s warm-up not counted; {written:,} ticks written; {empty} empty answers"
    )
    return group
