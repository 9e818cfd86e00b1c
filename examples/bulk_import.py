"""A bulk historical import: a CSV of hourly candles into the store, bad rows reported.

Run::

    python examples/bulk_import.py                  # 5,000 generated hourly candles
    python examples/bulk_import.py --rows 100000 --keep history.csv

It writes a CSV of generated EUR/USD hourly candles (with a few deliberately broken rows:
a high below the low, a timestamp in seconds, a missing price), then imports it with
:func:`data_manager.interop.import_file` — the same code as ``data-manager import`` — which
validates every row, stores the good ones in batches (COPY on PostgreSQL) and reports the
rejected ones by reason and line. Importing the same file again stores nothing new. Finally
it reads a week back, as a pandas DataFrame when pandas is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import tempfile
from pathlib import Path

from data_manager import DataRouter
from data_manager.errors import ConfigurationError
from data_manager.interop import get_candles_df, import_file

HOUR_MS = 3_600_000
START_MS = 1_700_000_000_000 // HOUR_MS * HOUR_MS  # 2023-11-14T22:00Z


def write_history(path: Path, rows: int) -> None:
    """A CSV of ``rows`` hourly candles; rows 10, 20 and 30 are broken on purpose."""
    rng = random.Random(1)
    price = 1.08
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["timestamp", "open", "high", "low", "close", "volume"])
        for i in range(rows):
            o = price
            c = o + rng.gauss(0, 0.0008)
            hi = max(o, c) + abs(rng.gauss(0, 0.0003))
            lo = min(o, c) - abs(rng.gauss(0, 0.0003))
            ts = START_MS + i * HOUR_MS
            close = f"{c:.5f}"
            if i == 10:
                hi, lo = lo, hi  # high below low
            elif i == 20:
                ts //= 1000  # seconds instead of milliseconds
            elif i == 30:
                close = ""  # a missing close
            out.writerow([ts, f"{o:.5f}", f"{hi:.5f}", f"{lo:.5f}", close, rng.randint(500, 5000)])
            price = c


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000)
    parser.add_argument("--keep", type=Path, help="write the CSV here instead of a temp dir")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "eurusd_1h.csv"
        write_history(path, args.rows)
        async with DataRouter() as router:
            print(f"importing {path} → {router.storage.target}")
            report = await import_file(
                router,
                path,
                kind="candles",
                symbol="EUR/USD",
                timeframe="1h",
                source="historical",
                batch_size=2_000,
            )
            print(
                f"{report.rows:,} rows: {report.accepted:,} accepted, {report.rejected} "
                f"rejected, {report.stored:,} stored in {report.batches} batches "
                f"({report.seconds:.2f} s)"
            )
            for reason, r in report.reasons.items():
                print(f"  rejected {r.count}× (lines {r.first_lines}): {reason}")
            again = await import_file(
                router,
                path,
                kind="candles",
                symbol="EUR/USD",
                timeframe="1h",
                source="historical",
            )
            print(f"imported again: {again.stored} rows changed (writes are idempotent)")
            week = (START_MS, START_MS + 7 * 24 * HOUR_MS)
            try:
                df = await get_candles_df(router, "EUR/USD", "1h", *week, source="historical")
                print(f"first week as a DataFrame: {len(df)} rows\n{df.head(3)}")
            except ConfigurationError:  # pandas is an optional extra
                candles = await router.get_candles("EUR/USD", "1h", *week, source="historical")
                print(f"first week: {len(candles)} candles (pip install pandas for a DataFrame)")


if __name__ == "__main__":
    asyncio.run(main())
