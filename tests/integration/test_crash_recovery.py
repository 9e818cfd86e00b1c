"""After a crash, the next router rebuilds the candles the dead one kept in memory.

A router derives candles from the ticks it accepts and stores them at its maintenance
passes; ``kill -9`` loses what it had not stored yet. In ``journal`` mode the journal's
checkpoint holds back the ticks whose candles may be lost, the next router replays them and
rebuilds every bucket they fall in from the stored ticks. Each test kills a child process
running a real router and checks the candles in the database against the same ticks
aggregated from scratch.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

from data_manager.aggregation import aggregate_ticks
from data_manager.errors import DatabaseConnectionError
from data_manager.models import TickData
from data_manager.router import DataRouter
from data_manager.settings import DataManagerSettings, PostgresSettings
from data_manager.storage.postgres import PostgresStorage
from data_manager.strategy import strategy_from_mapping

if TYPE_CHECKING:
    from data_manager.models import CandleData

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ROOT: Final = Path(__file__).resolve().parents[2]
SYMBOLS: Final = ("EUR/USD", "GBP/USD", "USD/JPY", "AUD/USD")
SOURCE: Final = "crash"
TIMEFRAMES: Final = ("1m", "5m")
DEADLINE: Final = 60.0
START: Final = 1_000_000_000_000  # 2001: before any tick of these tests
END: Final = 4_000_000_000_000  # 2096: after any

_CHILD: Final = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from data_manager.models import TickData
    from data_manager.router import DataRouter
    from data_manager.settings import DataManagerSettings, PostgresSettings
    from data_manager.strategy import strategy_from_mapping

    url, schema, folder, interval, per_symbol, base, one_by_one = sys.argv[1:8]
    symbols = sys.argv[8].split(",")

    async def main():
        settings = DataManagerSettings(
            postgres=PostgresSettings(url=url, db_schema=schema),
            journal_dir=Path(folder),
            write_mode="journal",
            watch_strategy=False,
        )
        strategy = strategy_from_mapping({
            "aggregation": {"enabled": True, "timeframes": ["1m", "5m"]},
            "order_flow": {"enabled": False},
            "batch": {"flush_interval_seconds": float(interval)},
        })
        router = DataRouter(settings, strategy=strategy)
        await router.initialize()
        out = sys.stdout

        async def produce(k, symbol):
            for i in range(int(per_symbol)):
                await router.save_tick(TickData(
                    symbol=symbol, timestamp=int(base) + i * 40, bid=1.1 + (i % 37) * 1e-4,
                    ask=1.1002 + (i % 37) * 1e-4, bid_size=1.0 + i % 5, ask_size=2.0,
                    source="crash", seq=i,
                ))
                out.write(f"{k} {i}\\n")  # acknowledged: durable in the journal
                out.flush()

        if one_by_one == "1":
            for k, s in enumerate(symbols):
                await produce(k, s)
        else:
            await asyncio.gather(*(produce(k, s) for k, s in enumerate(symbols)))
        out.write("done\\n")
        out.flush()
        ingest = router._ingest
        while ingest.stats().stored < len(symbols) * int(per_symbol):
            await asyncio.sleep(0.01)
        out.write("stored\\n")
        out.flush()
        await asyncio.sleep(3600)  # killed before this ends

    asyncio.run(main())
    """
)


def start_child(
    url: str, schema: str, folder: Path, interval: float, per_symbol: int, *, one_by_one: bool
) -> Any:
    """A child router saving ``per_symbol`` ticks of each symbol in ``journal`` mode, the
    symbols concurrently or ``one_by_one``, with maintenance passes ``interval`` s apart."""
    base = int(time.time() * 1000)  # event time runs ahead of the clock: no bar goes idle
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            url,
            schema,
            str(folder),
            str(interval),
            str(per_symbol),
            str(base),
            "1" if one_by_one else "0",
            ",".join(SYMBOLS),
        ],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def kill_when(child: Any, done: Any) -> int:
    """Read the child's lines until ``done(line, acked)``; SIGKILL it; return how many
    ticks it acknowledged."""
    acked = 0
    stream = child.stdout
    try:
        while True:
            line = stream.readline()
            if not line:
                raise AssertionError(f"child exited early with {child.poll()}")
            if line[:1].isdigit():
                acked += 1
            if done(line, acked):
                break
        child.send_signal(signal.SIGKILL)
        acked += sum(1 for line in stream if line[:1].isdigit() and line.endswith(b"\n"))
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
        stream.close()
    return acked


async def kill_once_stored(url: str, schema: str, folder: Path, per_symbol: int) -> int:
    """A child without maintenance passes saves ``per_symbol`` ticks of each symbol, one
    symbol after another; it is killed once all are stored (no forming candle is). They
    are stored in batches of ``batch.journal_size`` (2,000): the total must be a multiple."""
    child = start_child(url, schema, folder, 3_600.0, per_symbol, one_by_one=True)
    acked = await asyncio.to_thread(kill_when, child, lambda line, _n: line == b"stored\n")
    assert acked == per_symbol * len(SYMBOLS)
    return acked


def survivor(url: str, schema: str, folder: Path) -> DataRouter:
    settings = DataManagerSettings(
        postgres=PostgresSettings(url=url, db_schema=schema),
        journal_dir=folder,
        watch_strategy=False,
    )
    strategy = strategy_from_mapping(
        {
            "aggregation": {"enabled": True, "timeframes": list(TIMEFRAMES)},
            "order_flow": {"enabled": False},
        }
    )
    return DataRouter(settings, strategy=strategy)


def ohlcv(candle: CandleData) -> tuple[Any, ...]:
    return (
        candle.timestamp,
        candle.open,
        candle.high,
        candle.low,
        candle.close,
        candle.volume,
        candle.num_trades,
        candle.start_time,
        candle.end_time,
    )


async def assert_candles_match_ticks(router: DataRouter, acked: int) -> None:
    """Every aggregated candle equals the stored ticks aggregated from scratch."""
    ticks: list[TickData] = []
    for symbol in SYMBOLS:
        ticks.extend(await router.get_ticks(symbol, START, END, source=SOURCE))
    assert len(ticks) >= acked  # nothing acknowledged was lost (and the test saw them all)
    for symbol in SYMBOLS:
        mine = [t for t in ticks if t.symbol == symbol]
        for tf in TIMEFRAMES:
            expected = [ohlcv(c) for c in aggregate_ticks(mine, tf)]
            stored = await router.get_candles(symbol, tf, START, END, source=f"agg:{SOURCE}")
            assert [ohlcv(c) for c in stored] == expected, (symbol, tf)
            # Every bar but the newest was closed by a later tick (the clock is behind them).
            assert all(c.is_closed for c in stored[:-1]), (symbol, tf)


async def recover(
    url: str, schema: str, folder: Path, acked: int, *, adopted: int | None = 1
) -> None:
    router = survivor(url, schema, folder)
    await router.initialize()
    try:
        await asyncio.wait_for(router.flush(), DEADLINE)
        assert router._ingest is not None
        if adopted is not None:
            assert router._ingest.stats().orphans_adopted == adopted
        await assert_candles_match_ticks(router, acked)
    finally:
        await router.close(timeout=DEADLINE)


async def test_candles_of_a_router_killed_mid_ingest_are_rebuilt(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    # Maintenance passes run every 50 ms: candles are stored, and the checkpoint moves, as
    # the child goes; it dies at a random moment between two passes.
    child = start_child(postgres_url, pg_schema, tmp_path, 0.05, 2_500, one_by_one=False)
    kill_after = random.randint(2_000, 9_000)
    acked = await asyncio.to_thread(kill_when, child, lambda _line, n: n >= kill_after)
    await recover(postgres_url, pg_schema, tmp_path, acked)


async def test_stored_ticks_whose_candles_were_not_are_replayed(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    # No maintenance pass runs (an hour apart): every tick is stored, past the journal's
    # checkpoint interval (10,000 records), but no forming candle is. The symbols come one
    # after another, so the first ones' ticks all lie below a checkpoint that did not wait
    # for their candles: it must have stayed behind for the next router to rebuild them.
    acked = await kill_once_stored(postgres_url, pg_schema, tmp_path, 3_000)
    await recover(postgres_url, pg_schema, tmp_path, acked)


async def test_a_router_closed_before_rebuilding_leaves_it_to_the_next(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    acked = await kill_once_stored(postgres_url, pg_schema, tmp_path, 1_000)
    router = survivor(postgres_url, pg_schema, tmp_path)
    await router.initialize()
    # Closed at once: the replay of the dead router's journal may not even have begun.
    # close() must not wait for a rebuild nothing will start; what it did not rebuild
    # stays in the journal for the next router.
    await asyncio.wait_for(router.close(), DEADLINE)
    await recover(postgres_url, pg_schema, tmp_path, acked, adopted=None)


async def until(condition: Any, what: str) -> None:
    """Poll with a deadline (a background task of the router changes it)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_flush_waits_for_a_failed_rebuild_to_be_retried(
    postgres_url: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acked = await kill_once_stored(postgres_url, pg_schema, tmp_path, 500)
    real = PostgresStorage.aggregate_tick_buckets
    calls = 0

    async def fails_once(self: PostgresStorage, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise DatabaseConnectionError("the database went away for a moment")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(PostgresStorage, "aggregate_tick_buckets", fails_once)
    router = survivor(postgres_url, pg_schema, tmp_path)
    await router.initialize()
    try:
        await until(lambda: router._recovery.failures == 1, "the first rebuild to fail")
        await asyncio.wait_for(router.flush(), DEADLINE)  # retried now, not in 5 s
        await assert_candles_match_ticks(router, acked)
    finally:
        await router.close(timeout=DEADLINE)


async def test_ticks_held_for_a_recovery_are_aggregated_at_close(
    postgres_url: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # buffered mode: the held ticks are not in this router's journal. close() during the
    # recovery aggregates them (the rebuild is left to the next router, which keeps them).
    acked = await kill_once_stored(postgres_url, pg_schema, tmp_path, 500)
    gate = asyncio.Event()  # the rebuild never gets past its first read
    real = PostgresStorage.aggregate_tick_buckets

    async def stuck(self: PostgresStorage, *args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(PostgresStorage, "aggregate_tick_buckets", stuck)
    router = survivor(postgres_url, pg_schema, tmp_path)
    await router.initialize()
    base = int(time.time() * 1000)
    new = [
        TickData(symbol="NZD/USD", timestamp=base + i, bid=1.1, ask=1.1002, source=SOURCE, seq=i)
        for i in range(20)
    ]
    for tick in new:
        await router.save_tick(tick)  # returns: the tick waits for the recovery
    await until(lambda: router._recovery.task is not None, "the rebuild to start")
    await router.close(timeout=DEADLINE)
    monkeypatch.undo()

    await recover(postgres_url, pg_schema, tmp_path, acked)
    router = survivor(postgres_url, pg_schema, tmp_path)
    await router.initialize()
    try:
        stored = await router.get_candles("NZD/USD", "1m", START, END, source=f"agg:{SOURCE}")
        assert [ohlcv(c) for c in stored] == [ohlcv(c) for c in aggregate_ticks(new, "1m")]
    finally:
        await router.close(timeout=DEADLINE)
