"""Seed 004, example 2: a trading engine reading the latest tick and recent candles.

Run: ``python examples/trading_engine.py``. It first stores a few hourly candles so there is
something to read (an engine normally reads what collectors wrote).
"""

from __future__ import annotations

import asyncio
import time

from data_manager import CandleData, DataRouter, TickData


class TradingEngine:
    def __init__(self, router: DataRouter) -> None:
        self.router = router

    async def get_market_data(self, symbol: str) -> tuple[TickData | None, list[CandleData]]:
        # Get latest tick (L1 → L2 → database)
        current_tick = await self.router.get_latest_tick(symbol)
        # Get recent candles for strategy (oldest → newest)
        candles = await self.router.get_latest_candles(symbol=symbol, timeframe="1h", limit=100)
        return current_tick, candles


async def main() -> None:
    async with DataRouter() as router:
        hour = (int(time.time() * 1000) // 3_600_000 - 5) * 3_600_000
        await router.save_candles_bulk(
            CandleData(
                symbol="EUR/USD",
                timeframe="1h",
                timestamp=hour + i * 3_600_000,
                open=1.0850,
                high=1.0860,
                low=1.0840,
                close=1.0855,
                volume=1000 + i,
                source="example",
            )
            for i in range(5)
        )
        await router.save_tick(
            TickData(
                symbol="EUR/USD",
                timestamp=hour + 5 * 3_600_000,
                bid=1.0854,
                ask=1.0856,
                source="example",
            ),
            mode="sync",
        )
        engine = TradingEngine(router)
        tick, candles = await engine.get_market_data("EUR/USD")
        assert tick is not None
        last = candles[-1].close
        print(f"tick mid={tick.mid:.5f}; {len(candles)} hourly candles, last close {last}")


if __name__ == "__main__":
    asyncio.run(main())
