"""A collector: turns a (simulated) vendor feed into ticks and saves them through the router.

Run::

    python examples/collector.py                      # 20,000 ticks, as fast as possible
    python examples/collector.py --ticks 0 --rate 500 # 500 ticks/s until Ctrl-C / SIGTERM

It stores into the embedded SQLite file unless ``POSTGRES_HOST`` (and ``POSTGRES_DB``) is set;
with ``DRAGONFLY_HOST`` set, every other process's router sees each tick within about a
millisecond through the L2 cache's pub/sub (see ``multiprocess_demo.py``). Ctrl-C or SIGTERM
stops it cleanly: the router flushes what is queued before the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time

from data_manager import DataRouter
from data_manager.demo import synthetic_fx_stream


async def collect(router: DataRouter, *, ticks: int, rate: float, stop: asyncio.Event) -> int:
    """Save ``ticks`` synthetic quotes (0 = until ``stop``), paced at ``rate`` per second."""
    start_ms = int(time.time() * 1000)
    stream = synthetic_fx_stream(ticks or 10**12, start_ms=start_ms, source="collector")
    began = time.perf_counter()
    saved = 0
    for tick in stream:
        if stop.is_set():
            break
        # A live feed: stamp the quote with the wall clock, keep the simulated prices.
        await router.save_tick(tick.model_copy(update={"timestamp": int(time.time() * 1000)}))
        saved += 1
        if rate > 0:
            # Pace against the schedule, not per tick, so sleeps do not add up.
            delay = began + saved / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
    return saved


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=20_000, help="0 = until stopped")
    parser.add_argument("--rate", type=float, default=0.0, help="ticks/s; 0 = no pacing")
    args = parser.parse_args()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    async with DataRouter() as router:
        print(f"collector → {router.storage.target}")
        began = time.perf_counter()
        saved = await collect(router, ticks=args.ticks, rate=args.rate, stop=stop)
        await router.flush()  # every accepted tick is in the database from here on
        seconds = time.perf_counter() - began
        print(f"saved {saved:,} ticks in {seconds:.2f} s ({saved / seconds:,.0f} ticks/s)")
        for symbol in ("EUR/USD", "GBP/USD", "USD/JPY"):
            latest = await router.get_latest_tick(symbol)
            if latest is not None:
                print(f"  {symbol}: bid {latest.bid} ask {latest.ask}")


if __name__ == "__main__":
    asyncio.run(main())
