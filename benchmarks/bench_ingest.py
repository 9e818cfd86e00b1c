"""Write-path benchmark: throughput, submit latency and journal group commit.

Run: ``python benchmarks/bench_ingest.py [--ticks N] [--rate R] [--seconds S]``

1. **Throughput**: ``--ticks`` ticks through the pipeline in ``buffered`` mode, then
   ``flush()``, into an embedded SQLite file and (when ``DATA_MANAGER_BENCH_POSTGRES_URL`` is
   set) PostgreSQL, in a fresh schema that is dropped afterwards. Figure: ticks/s from the
   first submit to the end of the flush.
2. **Submit latency** at a steady ``--rate`` ticks/s for ``--seconds`` (SQLite behind it, so
   the writer really runs), per call, next to a bare ``asyncio.Queue.put`` drained by a
   consumer task at the same rate.
3. **Journal mode**: acknowledged ticks/s with 8 and 64 concurrent producers for
   ``--seconds`` each, next to ``8 / fsync latency`` (one 256-byte write plus
   ``fdatasync`` in the journal folder, median, measured in the same run): the rate 8
   producers would reach with one sync per tick.

Ticks are built before timing; the clock is the system one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_manager.breaker import CircuitBreaker  # noqa: E402
from data_manager.ingest import IngestPipeline  # noqa: E402
from data_manager.journal import Journal  # noqa: E402
from data_manager.models import TickData  # noqa: E402

T0 = 1_727_996_400_000
SYMBOLS = [f"S{i:02d}/USD" for i in range(50)]


def make_ticks(n: int, *, offset: int = 0) -> list[TickData]:
    return [
        TickData(
            symbol=SYMBOLS[i % len(SYMBOLS)],
            timestamp=T0 + (offset + i) // len(SYMBOLS),
            bid=1.1 + (i % 97) * 1e-5,
            ask=1.1002 + (i % 97) * 1e-5,
            source="bench",
            seq=offset + i,
        )
        for i in range(n)
    ]


async def sqlite_storage(folder: Path) -> Any:
    from data_manager.storage.sqlite import SQLiteStorage

    storage = SQLiteStorage(folder / "bench.sqlite3")
    await storage.connect()
    await storage.create_schema()
    return storage


def pipeline(storage: Any, journal: Journal | None = None, **kwargs: Any) -> IngestPipeline:
    return IngestPipeline(
        storage,
        journal=journal,
        breaker=CircuitBreaker("database"),
        orphan_scan_interval=None,
        **kwargs,
    )


def pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


# --------------------------------------------------------------------------- 1. throughput


async def throughput(storage: Any, n: int, label: str) -> None:
    ticks = make_ticks(n)
    p = pipeline(storage, batch_size=100, flush_interval=1.0)
    await p.start()
    started = time.perf_counter()
    for i, t in enumerate(ticks):
        await p.submit(t)
        if i % 100 == 99:
            await asyncio.sleep(0)  # a feed handler yields between messages
    submitted = time.perf_counter()
    await p.flush()
    elapsed = time.perf_counter() - started
    stats = p.stats()
    await p.close()
    print(
        f"  {label:<10} {n / elapsed:>12,.0f} ticks/s  (submit {submitted - started:.2f}s, "
        f"total {elapsed:.2f}s, {stats.batches} batches, mean "
        f"{stats.batch_items / max(1, stats.batches):,.0f}, max {stats.max_batch_size:,})"
    )


async def postgres_throughput(url: str, n: int) -> None:
    import asyncpg

    from data_manager.settings import PostgresSettings
    from data_manager.storage.postgres import PostgresStorage

    schema = f"bench_{secrets.token_hex(4)}"
    storage = PostgresStorage(PostgresSettings(url=url, db_schema=schema))
    await storage.connect()
    try:
        await storage.create_schema()
        await throughput(storage, n, "postgresql")
    finally:
        await storage.close()
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', timeout=60)
        finally:
            await conn.close(timeout=10)


# --------------------------------------------------------------------------- 2. latency


async def paced(rate: int, seconds: float, submit: Any, ticks: list[TickData]) -> list[int]:
    """Call ``submit`` ``rate`` times per second (in 1 ms slices); return each call's ns."""
    per_slice = max(1, rate // 1000)
    latencies: list[int] = []
    loop = asyncio.get_running_loop()
    next_slice = loop.time()
    i = 0
    total = int(rate * seconds)
    clock = time.perf_counter_ns
    while i < total:
        for _ in range(per_slice):
            t = ticks[i % len(ticks)]
            before = clock()
            await submit(t)
            latencies.append(clock() - before)
            i += 1
        next_slice += 0.001
        delay = next_slice - loop.time()
        await asyncio.sleep(delay if delay > 0 else 0)
    return latencies


async def latency(storage: Any, rate: int, seconds: float) -> None:
    ticks = make_ticks(rate * 2, offset=10_000_000)

    queue: asyncio.Queue[TickData] = asyncio.Queue(maxsize=100_000)

    async def consume() -> None:
        while True:
            await queue.get()
            while not queue.empty():
                queue.get_nowait()

    consumer = asyncio.create_task(consume())
    base = await paced(rate, seconds, queue.put, ticks)
    consumer.cancel()

    p = pipeline(storage, batch_size=100, flush_interval=1.0)
    await p.start()
    ours = await paced(rate, seconds, p.submit, ticks)
    await p.flush()
    stats = p.stats()
    await p.close()
    print(f"  {'':<24}{'p50 µs':>9}{'p99 µs':>9}{'p99.9 µs':>10}{'max µs':>9}")
    for label, values in (("asyncio.Queue.put", base), ("IngestPipeline.submit", ours)):
        print(
            f"  {label:<24}{pct(values, 0.5):>9.2f}{pct(values, 0.99):>9.2f}"
            f"{pct(values, 0.999):>10.2f}{max(values) / 1000:>9.1f}"
        )
    print(
        f"  ({len(ours):,} submits at {rate:,}/s; {stats.batches} batches, mean "
        f"{stats.batch_items / max(1, stats.batches):,.0f}; mean flush "
        f"{1000 * stats.flush_seconds_total / max(1, stats.batches):.2f} ms)"
    )


# --------------------------------------------------------------------------- 3. journal


def fsync_latency(folder: Path, rounds: int = 200) -> float:
    path = folder / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    samples = []
    try:
        payload = b"x" * 256
        for _ in range(rounds):
            before = time.perf_counter()
            os.write(fd, payload)
            os.fdatasync(fd) if hasattr(os, "fdatasync") else os.fsync(fd)
            samples.append(time.perf_counter() - before)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(samples)


async def journal_mode(storage: Any, folder: Path, producers: int, seconds: float) -> float:
    journal = Journal(folder, instance_id=f"bench-{producers}")
    p = pipeline(storage, journal, batch_size=1000, flush_interval=0.05)
    await p.start()
    ticks = make_ticks(200_000, offset=20_000_000 + producers * 1_000_000)
    acked = 0
    stop = time.perf_counter() + seconds

    async def produce(k: int) -> None:
        nonlocal acked
        i = k
        while time.perf_counter() < stop:
            await p.submit(ticks[i % len(ticks)], mode="journal")
            acked += 1
            i += producers

    started = time.perf_counter()
    await asyncio.gather(*(produce(k) for k in range(producers)))
    elapsed = time.perf_counter() - started
    fsyncs = p.stats().journal_fsyncs
    await p.close()
    rate = acked / elapsed
    print(
        f"  {producers:>3} producers {rate:>10,.0f} ticks/s   {fsyncs:,} fsyncs, "
        f"{acked / max(1, fsyncs):.1f} ticks per fsync"
    )
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    url = os.environ.get("DATA_MANAGER_BENCH_POSTGRES_URL")

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        folder = Path(tmp)
        print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, files in {tmp}")
        storage = await sqlite_storage(folder)
        try:
            print(f"\n1. buffered throughput, {args.ticks:,} ticks + flush")
            await throughput(storage, args.ticks, "sqlite")
            if url:
                await postgres_throughput(url, args.ticks)
            else:
                print("  postgresql (set DATA_MANAGER_BENCH_POSTGRES_URL to run)")

            print(f"\n2. submit latency at {args.rate:,} ticks/s for {args.seconds:g}s (SQLite)")
            await latency(storage, args.rate, args.seconds)

            print(f"\n3. journal mode, {args.seconds:g}s per run (SQLite behind it)")
            sync = await asyncio.to_thread(fsync_latency, folder)
            print(
                f"  fsync latency {sync * 1e3:.3f} ms (median) -> 8 / fsync = "
                f"{8 / sync:,.0f} ticks/s"
            )
            for producers in (8, 64):
                await journal_mode(storage, folder / "journal", producers, args.seconds)
        finally:
            await storage.close()


if __name__ == "__main__":
    asyncio.run(main())
