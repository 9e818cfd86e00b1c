"""Seed 004, example 3: bulk historical import of candles (COPY on PostgreSQL).

Run: ``python examples/bulk_historical_import.py``. The "historical data" is generated.
Re-running it stores nothing new: bulk writes are idempotent upserts.
"""

from __future__ import annotations

import asyncio
import random

from data_manager import CandleData, DataRouter


async def import_historical_data(symbol: str, candles_raw: list[dict[str, float]]) -> int:
    async with DataRouter() as router:
        # Convert to CandleData objects (each one validated)
        candles = [
            CandleData(
                symbol=symbol,
                timeframe="1h",
                timestamp=int(c["timestamp"]),
                timestamp_ms=int(c["timestamp"]),
                open=c["open"],
                high=c["high"],
                low=c["low"],
                close=c["close"],
                volume=c["volume"],
                source="polygon_historical",
            )
            for c in candles_raw
        ]
        # Bulk save (optimized)
        stored = await router.save_candles_bulk(candles)
        print(f"Imported {len(candles)} candles ({stored} rows written)")
        return stored


def fake_history(
    n: int, *, start_ms: int = 1_700_000_000_000 // 3_600_000 * 3_600_000
) -> list[dict[str, float]]:
    rng = random.Random(1)
    price = 1.08
    rows = []
    for i in range(n):
        o = price
        c = o + rng.gauss(0, 0.0008)
        hi, lo = max(o, c) + abs(rng.gauss(0, 0.0003)), min(o, c) - abs(rng.gauss(0, 0.0003))
        rows.append(
            {
                "timestamp": start_ms + i * 3_600_000,
                "open": o,
                "high": hi,
                "low": lo,
                "close": c,
                "volume": float(rng.randint(500, 5000)),
            }
        )
        price = c
    return rows


if __name__ == "__main__":
    asyncio.run(import_historical_data("EUR/USD", fake_history(2_000)))
