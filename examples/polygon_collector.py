"""Seed 004, example 1: a collector that turns vendor messages into ticks and saves them.

Run: ``python examples/polygon_collector.py`` (embedded SQLite unless POSTGRES_HOST is set).
The vendor feed is simulated with a few Polygon-shaped messages.
"""

from __future__ import annotations

import asyncio
import time

from data_manager import DataRouter, TickData


class PolygonCollector:
    def __init__(self) -> None:
        self.router = DataRouter()

    async def start(self) -> None:
        await self.router.initialize()

    async def stop(self) -> None:
        await self.router.close()

    async def handle_tick(self, polygon_data: dict[str, object]) -> None:
        # Convert Polygon data to TickData (validated: bad quotes raise ValidationError)
        tick = TickData(
            symbol=polygon_data["pair"],
            timestamp=polygon_data["t"],
            timestamp_ms=polygon_data["t"],
            bid=polygon_data["b"],
            ask=polygon_data["a"],
            source="polygon",
        )
        # → L1 + L2/pub-sub fast path, then the database per the write mode
        await self.router.save_tick(tick)


async def main() -> None:
    collector = PolygonCollector()
    await collector.start()
    try:
        now = int(time.time() * 1000)
        for i in range(10):
            await collector.handle_tick(
                {"pair": "EUR/USD", "t": now + i, "b": 1.09551 + i * 1e-5, "a": 1.09553 + i * 1e-5}
            )
        await collector.router.flush()
        latest = await collector.router.get_latest_tick("EUR/USD")
        assert latest is not None
        print(f"EUR/USD latest: bid={latest.bid} ask={latest.ask} mid={latest.mid:.6f}")
    finally:
        await collector.stop()


if __name__ == "__main__":
    asyncio.run(main())
