"""The demo: a synthetic FX stream through a real router, then reads, with a summary.

It runs on whatever the configuration says — with nothing configured that is the embedded
SQLite store, so it needs no servers.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from data_manager.models import TickData
from data_manager.router import DataRouter
from data_manager.settings import DataManagerSettings

__all__ = ["DemoResult", "run_demo", "synthetic_fx_stream"]

#: (symbol, starting mid, pip size, typical spread in pips)
PAIRS = (
    ("EUR/USD", 1.0855, 0.0001, 0.2),
    ("GBP/USD", 1.2710, 0.0001, 0.6),
    ("USD/JPY", 149.85, 0.01, 0.5),
    ("AUD/USD", 0.6590, 0.0001, 0.4),
    ("USD/CHF", 0.8810, 0.0001, 0.7),
)


def synthetic_fx_stream(
    n_ticks: int, *, start_ms: int, seed: int = 7, source: str = "demo"
) -> Iterator[TickData]:
    """Yield ``n_ticks`` realistic quotes across :data:`PAIRS` in event-time order.

    Mid prices follow a random walk scaled to each pair's pip size; spreads vary around a
    typical value and widen in bursts; inter-arrival times are exponential with occasional
    bursts of fast ticks, as on a real feed.
    """
    rng = random.Random(seed)
    mids = {sym: mid for sym, mid, _, _ in PAIRS}
    now = start_ms
    burst_left = 0
    for _ in range(n_ticks):
        if burst_left == 0 and rng.random() < 0.002:
            burst_left = rng.randint(50, 400)
        mean_gap = 5.0 if burst_left else 60.0
        burst_left = max(0, burst_left - 1)
        now += max(1, int(rng.expovariate(1 / mean_gap)))
        sym, _, pip, typical = PAIRS[rng.randrange(len(PAIRS))]
        step = rng.gauss(0, 0.35 if not burst_left else 1.2) * pip
        mids[sym] = max(pip * 10, mids[sym] + step)
        spread = max(0.1, rng.gauss(typical, typical / 4)) * pip * (3 if burst_left else 1)
        mid = mids[sym]
        yield TickData(
            symbol=sym,
            timestamp=now,
            bid=round(mid - spread / 2, 6),
            ask=round(mid + spread / 2, 6),
            bid_size=float(rng.randint(1, 20) * 100_000),
            ask_size=float(rng.randint(1, 20) * 100_000),
            source=source,
        )


@dataclass
class DemoResult:
    """What the demo measured."""

    ticks: int = 0
    seconds: float = 0.0
    save_latencies_us: list[float] = field(default_factory=list)
    candles_1m: dict[str, int] = field(default_factory=dict)
    read_tick_us: float = 0.0
    read_candles_us: float = 0.0
    cold_candles_us: float = 0.0
    storage: str = ""


async def run_demo(
    *,
    n_ticks: int = 50_000,
    settings: DataManagerSettings | None = None,
    console: Console | None = None,
) -> DemoResult:
    """Feed a synthetic stream through a router, read it back, and print a summary."""
    console = console or Console()
    result = DemoResult()
    # Start an hour ago, aligned to a minute, so 1m/5m/1h candles all form.
    start_ms = (int(time.time() * 1000) // 60_000 - 60) * 60_000
    async with DataRouter(settings=settings) as router:
        result.storage = router.storage.target
        console.print(f"[bold]data_manager demo[/] → storage: {result.storage}")
        progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,} ticks"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        latencies = result.save_latencies_us
        t0 = time.perf_counter()
        with progress:
            task = progress.add_task("ingesting", total=n_ticks)
            for i, tick in enumerate(synthetic_fx_stream(n_ticks, start_ms=start_ms)):
                s = time.perf_counter_ns()
                await router.save_tick(tick)
                latencies.append((time.perf_counter_ns() - s) / 1000)
                if i % 1000 == 999:
                    progress.update(task, advance=1000)
            await router.flush()
        result.seconds = time.perf_counter() - t0
        result.ticks = n_ticks

        table = Table(title="latest state per symbol")
        for col in ("symbol", "bid", "ask", "spread (pips)", "1m candles", "last 1m close"):
            table.add_column(col, justify="right")
        cold_candles: list[float] = []
        for sym, _, pip, _ in PAIRS:
            s = time.perf_counter_ns()
            candles = await router.get_latest_candles(sym, "1m", limit=100)
            cold_candles.append((time.perf_counter_ns() - s) / 1000)
            latest = await router.get_latest_tick(sym)
            result.candles_1m[sym] = len(candles)
            if latest is None:
                continue
            table.add_row(
                sym,
                f"{latest.bid:.5f}",
                f"{latest.ask:.5f}",
                f"{latest.spread / pip:.1f}",
                str(len(candles)),
                f"{candles[-1].close:.5f}" if candles else "-",
            )
        # Warm reads: what an engine polling the router pays (L1 hits).
        read_tick: list[float] = []
        read_candles: list[float] = []
        for _ in range(200):
            for sym, _, _, _ in PAIRS:
                s = time.perf_counter_ns()
                await router.get_latest_tick(sym)
                read_tick.append((time.perf_counter_ns() - s) / 1000)
                s = time.perf_counter_ns()
                await router.get_latest_candles(sym, "1m", limit=100)
                read_candles.append((time.perf_counter_ns() - s) / 1000)
        result.read_tick_us = statistics.median(read_tick)
        result.read_candles_us = statistics.median(read_candles)
        result.cold_candles_us = statistics.median(cold_candles)
        health = await router.health_check()

    console.print(table)
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, math.ceil(len(lat) * 0.99) - 1)]
    console.print(
        f"ingested {result.ticks:,} ticks in {result.seconds:.2f}s "
        f"({result.ticks / result.seconds:,.0f} ticks/s incl. flush); "
        f"save_tick p50 {statistics.median(lat):.1f} µs, p99 {p99:.1f} µs"
    )
    console.print(
        f"reads (warm, L1): get_latest_tick median {result.read_tick_us:.1f} µs, "
        f"get_latest_candles(…, 100) median {result.read_candles_us:.1f} µs; "
        f"first candle read per symbol (database) {result.cold_candles_us:.0f} µs"
    )
    console.print(f"health: [bold]{health.status}[/] ({health.reason})")
    return result
