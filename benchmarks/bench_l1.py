"""Micro-benchmark of L1 hits, next to the bare Python operations they are built on.

Run: ``python benchmarks/bench_l1.py [--symbols N] [--repeat R] [--number K]``

Each figure is the median over ``repeat`` runs of the mean time per call over ``number``
calls (``timeit``), in nanoseconds, including the cost of calling a lambda (first row). The
cache holds ``symbols`` symbols with a tick each and one full candle ring, so lookups hit a
dictionary of realistic size; the clock is the system one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

T0 = 1_727_996_400_000
MINUTE = 60_000


def _import_cache() -> tuple[type, type, type]:
    # Import the cache modules without the package __init__, so the benchmark measures
    # (and runs with) nothing but the L1 code.
    import types

    root = Path(__file__).resolve().parent.parent
    if "data_manager" not in sys.modules:
        pkg = types.ModuleType("data_manager")
        pkg.__path__ = [str(root / "data_manager")]
        sys.modules["data_manager"] = pkg
    from data_manager.cache.memory import MemoryCache
    from data_manager.models import CandleData, TickData

    return MemoryCache, TickData, CandleData


def _median_ns(stmt: Callable[[], object], *, number: int, repeat: int) -> float:
    runs = timeit.repeat(stmt, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=1000)
    parser.add_argument("--ring", type=int, default=200)
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()

    memory_cache, tick_data, candle_data = _import_cache()
    cache = memory_cache(
        max_entries=10 * args.symbols + 10,
        tick_ttl=3600.0,
        candle_ttl=3600.0,
        order_flow_ttl=3600.0,
        ring_size=args.ring,
    )
    symbols = [f"S{i:04d}/USD" for i in range(args.symbols)]
    for sym in symbols:
        cache.put_tick(
            tick_data(symbol=sym, timestamp=T0, bid=1.1, ask=1.1002, source="ig"),
        )
    hot = symbols[len(symbols) // 2]
    candles = [
        candle_data(
            symbol=hot,
            timeframe="1m",
            timestamp=T0 + i * MINUTE,
            open=1.1,
            high=1.2,
            low=1.0,
            close=1.15,
            source="ig",
        )
        for i in range(args.ring)
    ]
    cache.put_candles(candles, complete=False)
    assert cache.get_tick(hot) is not None
    got = cache.get_candles(hot, "1m", 100, "ig")
    assert got is not None
    assert len(got) == 100

    plain = {sym: object() for sym in symbols}
    ordered = OrderedDict(plain)
    ring = list(candles)

    # A live feed: every tick newer than the last, so each put passes the CAS and updates
    # both the per-source and the any-source entry.
    feed = [
        tick_data(symbol=hot, timestamp=T0 + 1 + i, bid=1.1, ask=1.1002, source="ig")
        for i in range(20_000)
    ]

    def put_ticks_ns() -> float:
        runs = []
        for _ in range(args.repeat):
            fresh = memory_cache(
                max_entries=100, tick_ttl=60.0, candle_ttl=60.0, order_flow_ttl=60.0, ring_size=10
            )
            put = fresh.put_tick
            start = time.perf_counter()
            for t in feed:
                put(t)
            runs.append((time.perf_counter() - start) / len(feed))
        return statistics.median(runs) * 1e9

    def touch() -> None:  # what an LRU hit costs on top of the lookup
        ordered.get(hot)
        ordered.move_to_end(hot)

    get_candles = cache.get_candles
    cases: list[tuple[str, Callable[[], object]]] = [
        ("lambda: None (timing-loop overhead)    [baseline]", lambda: None),
        ("dict.get(symbol)                       [baseline]", lambda: plain.get(hot)),
        ("OrderedDict.get + move_to_end          [baseline]", touch),
        ("list[-100:] of a 200-item list         [baseline]", lambda: ring[-100:]),
        ("MemoryCache.get_tick(symbol)                 hit", lambda: cache.get_tick(hot)),
        ("MemoryCache.get_tick(symbol, source)         hit", lambda: cache.get_tick(hot, "ig")),
        ("MemoryCache.get_tick_with_age(symbol)        hit", lambda: cache.get_tick_with_age(hot)),
        ("MemoryCache.get_tick(unknown)               miss", lambda: cache.get_tick("NOPE")),
        (
            "MemoryCache.get_candles(sym, tf, 100, src)   hit",
            lambda: get_candles(hot, "1m", 100, "ig"),
        ),
        (
            "MemoryCache.get_candles(sym, tf, 1, src)     hit",
            lambda: get_candles(hot, "1m", 1, "ig"),
        ),
        ("MemoryCache.candle_sources(sym, tf)", lambda: cache.candle_sources(hot, "1m")),
    ]
    rows = [(name, _median_ns(fn, number=args.number, repeat=args.repeat)) for name, fn in cases]
    rows.append(("MemoryCache.put_tick, newer ts (CAS x2)", put_ticks_ns()))
    r, n = args.repeat, args.number
    print(
        f"python {sys.version.split()[0]}, {args.symbols} symbols, ring {args.ring}, "
        f"median of {r} x {n} calls"
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'operation':<{width}}  {'ns/call':>8}")
    for name, ns in rows:
        print(f"{name:<{width}}  {ns:>8.0f}")


if __name__ == "__main__":
    main()
