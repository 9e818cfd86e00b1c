"""One collector process, several engine processes, sharing data through the L2 cache.

Needs a shared PostgreSQL and a Redis-protocol server (DragonflyDB in production)::

    POSTGRES_HOST=127.0.0.1 POSTGRES_DB=market DRAGONFLY_HOST=127.0.0.1 \\
        python examples/multiprocess_demo.py [--engines 3] [--ticks 2000] [--rate 1000]

Each process has its own ``DataRouter``; nothing is shared in Python. The collector saves
ticks; every save reaches the L2 cache and its pub/sub bus on a fast path, and each engine's
router applies it to its own L1, where ``get_latest_tick`` answers in microseconds and
``subscribe_ticks`` delivers it. The engines report how many ticks they received live, the
delivery delay (collector's receive time to the engine seeing it), and whether
``get_latest_tick`` returned the collector's last tick. Exit code 0 when every engine did.

Without ``POSTGRES_HOST`` and ``DRAGONFLY_HOST`` it says so and exits with code 2: the
embedded SQLite store has no cross-process cache, so there would be nothing to show.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from multiprocessing.synchronize import Event as EventType
from typing import Any

SYMBOLS = ("EUR/USD", "GBP/USD", "USD/JPY")
DEADLINE_SECONDS = 30.0


def require_servers() -> None:
    missing = [name for name in ("POSTGRES_HOST", "DRAGONFLY_HOST") if not os.environ.get(name)]
    if missing:
        print(
            f"multiprocess_demo needs a shared database and cache: set {' and '.join(missing)} "
            "(plus POSTGRES_DB, and POSTGRES_PORT / DRAGONFLY_PORT if not the defaults). "
            "Processes share data through the L2 cache; the embedded SQLite store has none.",
            file=sys.stderr,
        )
        sys.exit(2)


# --------------------------------------------------------------------------- collector


async def collector(ticks: int, rate: float, engines_ready: Any, done: Any) -> dict[str, Any]:
    from data_manager import DataRouter, TickData

    async with DataRouter() as router:
        # Start only when every engine listens, so each one can see every tick.
        await asyncio.to_thread(engines_ready.wait, DEADLINE_SECONDS)
        began = time.perf_counter()
        last: TickData | None = None
        for i in range(ticks):
            symbol = SYMBOLS[i % len(SYMBOLS)]
            mid = 1.08 + (i % 100) * 1e-5
            last = TickData(
                symbol=symbol,
                timestamp=int(time.time() * 1000),
                bid=round(mid - 1e-5, 6),
                ask=round(mid + 1e-5, 6),
                source="mp-demo",
                seq=i,
            )
            await router.save_tick(last)
            if rate > 0:
                delay = began + (i + 1) / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
        await router.flush()
        done.set()
        assert last is not None
        return {"ticks": ticks, "seconds": time.perf_counter() - began, "last_seq": last.seq}


def collector_main(ticks: int, rate: float, ready: Any, done: Any, results: Any) -> None:
    results.put(("collector", asyncio.run(collector(ticks, rate, ready, done))))


# --------------------------------------------------------------------------- engines


async def engine(
    name: str, last_seq: int, last_symbol: str, ready: Any, done: EventType
) -> dict[str, Any]:
    from data_manager import DataRouter

    delays: list[float] = []
    received = 0
    async with DataRouter() as router:
        subscription = router.subscribe_ticks(SYMBOLS)
        # A Barrier: the collector starts when every engine is here.
        await asyncio.to_thread(ready.wait, DEADLINE_SECONDS)

        async def listen() -> None:
            nonlocal received
            async for tick in subscription:
                received += 1
                if tick.received_at is not None:
                    delays.append(time.time() * 1000 - tick.received_at)

        listener = asyncio.create_task(listen())
        await asyncio.to_thread(done.wait, DEADLINE_SECONDS)
        # The collector has stored everything; its last tick must be what we see as latest.
        deadline = time.monotonic() + DEADLINE_SECONDS
        latest = await router.get_latest_tick(last_symbol)
        while (latest is None or latest.seq != last_seq) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            latest = await router.get_latest_tick(last_symbol)
        listener.cancel()
        await subscription.aclose()
        return {
            "engine": name,
            "received": received,
            "dropped": subscription.dropped,
            "p50_ms": statistics.median(delays) if delays else None,
            "max_ms": max(delays) if delays else None,
            "saw_last": latest is not None and latest.seq == last_seq,
        }


def engine_main(
    name: str, last_seq: int, last_symbol: str, ready: Any, done: EventType, results: Any
) -> None:
    results.put(("engine", asyncio.run(engine(name, last_seq, last_symbol, ready, done))))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--ticks", type=int, default=2_000)
    parser.add_argument("--rate", type=float, default=1_000.0, help="ticks/s; 0 = no pacing")
    args = parser.parse_args()
    require_servers()
    if args.ticks < 1 or args.engines < 1:
        parser.error("--ticks and --engines must be at least 1")

    # spawn: every process starts clean and builds its own router (no inherited sockets).
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(args.engines + 1)
    done = ctx.Event()
    results = ctx.Queue()
    last_seq = args.ticks - 1
    last_symbol = SYMBOLS[last_seq % len(SYMBOLS)]
    procs = [
        ctx.Process(
            target=engine_main,
            args=(f"engine-{i + 1}", last_seq, last_symbol, ready, done, results),
        )
        for i in range(args.engines)
    ]
    procs.append(
        ctx.Process(target=collector_main, args=(args.ticks, args.rate, ready, done, results))
    )
    for p in procs:
        p.start()
    reports: list[dict[str, Any]] = []
    collected: dict[str, Any] = {}
    deadline = time.monotonic() + DEADLINE_SECONDS * 3
    try:
        while len(reports) + bool(collected) < len(procs) and time.monotonic() < deadline:
            try:
                role, report = results.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # a process died without reporting: its traceback is above
                continue
            if role == "collector":
                collected = report
            else:
                reports.append(report)
    finally:
        for p in procs:
            p.join(DEADLINE_SECONDS)
            if p.is_alive():
                p.terminate()

    print(f"collector: {collected.get('ticks', 0):,} ticks in {collected.get('seconds', 0):.2f} s")
    ok = True
    for r in sorted(reports, key=lambda r: str(r["engine"])):
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.2f} ms"
        worst = "-" if r["max_ms"] is None else f"{r['max_ms']:.2f} ms"
        print(
            f"{r['engine']}: received {r['received']:,} live (dropped {r['dropped']}), "
            f"delay p50 {p50} max {worst}, latest tick is the collector's last: {r['saw_last']}"
        )
        ok = ok and bool(r["saw_last"])
    failed = [p for p in procs if p.exitcode != 0]
    if failed or len(reports) != args.engines or not ok:
        print("FAILED: not every engine saw the collector's last tick", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
