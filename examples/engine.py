"""A strategy engine: reads the latest candles and tick of a few symbols and derives a signal.

Run::

    python examples/engine.py                      # one pass over EUR/USD, GBP/USD, USD/JPY
    python examples/engine.py --iterations 10 --interval 1

It reads what collectors stored (``collector.py`` or ``data-manager demo``): candles come
from L1, then the L2 cache, then the database. When a symbol has fewer than five 1m candles
it stores 30 sample candles (source ``engine-example``) and reads those, so the example has
something to read on a fresh machine (pass ``--no-seed`` to skip that). Uses the embedded
SQLite file unless ``POSTGRES_HOST`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from data_manager import CandleData, DataRouter

SYMBOLS = ("EUR/USD", "GBP/USD", "USD/JPY")
SEED_SOURCE = "engine-example"


def sma(values: list[float], n: int) -> float:
    window = values[-n:]
    return sum(window) / len(window)


async def seed(router: DataRouter, symbol: str) -> int:
    """Store 30 sample closed 1m candles ending at the current minute, around the last quote."""
    minute = int(time.time() * 1000) // 60_000 * 60_000
    tick = await router.get_latest_tick(symbol)
    price = tick.mid if tick is not None else 1.0850
    candles = []
    for i in range(30):
        close = price * (1 + 0.0002 * ((i * 7) % 5 - 1.9))
        candles.append(
            CandleData(
                symbol=symbol,
                timeframe="1m",
                timestamp=minute - (30 - i) * 60_000,
                open=price,
                high=max(price, close) * 1.0001,
                low=min(price, close) * 0.9999,
                close=close,
                volume=1000.0 + i,
                source=SEED_SOURCE,
            )
        )
        price = close
    return await router.save_candles_bulk(candles)


async def evaluate(router: DataRouter, symbol: str, *, seed_if_short: bool) -> str:
    candles = await router.get_latest_candles(symbol, "1m", limit=20)
    if len(candles) < 5 and seed_if_short:
        stored = await seed(router, symbol)
        print(f"  {symbol}: only {len(candles)} candles; seeded {stored} sample 1m candles")
        candles = await router.get_latest_candles(symbol, "1m", limit=20, source=SEED_SOURCE)
    tick = await router.get_latest_tick(symbol)
    if len(candles) < 5:
        return f"{symbol}: {len(candles)} candles, not enough for a signal"
    closes = [c.close for c in candles]
    fast, slow = sma(closes, 5), sma(closes, 20)
    signal = "long" if fast > slow else "short" if fast < slow else "flat"
    quote = f"mid {tick.mid:.5f}" if tick is not None else "no tick yet"
    return (
        f"{symbol}: {len(candles)} candles ({candles[-1].source}), SMA5 {fast:.5f} vs "
        f"SMA20 {slow:.5f} → {signal}; {quote}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between passes")
    parser.add_argument("--no-seed", action="store_true", help="never store sample candles")
    args = parser.parse_args()

    async with DataRouter() as router:
        print(f"engine ← {router.storage.target}")
        for i in range(args.iterations):
            if i:
                await asyncio.sleep(args.interval)
            for symbol in SYMBOLS:
                print(await evaluate(router, symbol, seed_if_short=not args.no_seed and i == 0))


if __name__ == "__main__":
    asyncio.run(main())
