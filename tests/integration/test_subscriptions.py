"""Live subscriptions fed by another process's writes through the L2 pub/sub bus."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_manager import (
    DataManagerSettings,
    DataRouter,
    DragonflySettings,
    PostgresSettings,
)

pytestmark = pytest.mark.slow

T0 = 1_727_996_400_000

CHILD = r"""
import asyncio, sys
from data_manager import DataRouter, TickData

async def main() -> None:
    async with DataRouter() as router:
        for i in range(int(sys.argv[1])):
            await router.save_tick(TickData(
                symbol="EUR/USD", timestamp=int(sys.argv[2]) + i, bid=1.1, ask=1.1002 + i * 1e-6,
                source="child"))
            await router.cache.flush()
        await router.save_tick(TickData(symbol="GBP/USD", timestamp=int(sys.argv[2]),
                                        bid=1.3, ask=1.3002, source="child"))
        await router.cache.flush()
    print("done", flush=True)

asyncio.run(main())
"""


def child_env(
    postgres_url: str, pg_schema: str, redis_url: str, prefix: str, j: Path
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DRAGONFLY_"))}
    env.update(
        DATA_MANAGER_POSTGRES__URL=postgres_url,
        DATA_MANAGER_POSTGRES__DB_SCHEMA=pg_schema,
        DATA_MANAGER_DRAGONFLY__URL=redis_url,
        DATA_MANAGER_DRAGONFLY__KEY_PREFIX=prefix,
        DATA_MANAGER_JOURNAL_DIR=str(j),
        DATA_MANAGER_WATCH_STRATEGY="false",
    )
    return env


async def test_ticks_written_by_another_process_reach_a_subscriber(
    postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    settings = DataManagerSettings(
        postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema),
        dragonfly=DragonflySettings(url=redis_url, key_prefix=redis_prefix),
        watch_strategy=False,
        journal_dir=tmp_path / "parent",
    )
    n = 20
    async with DataRouter(settings=settings) as router:
        sub = router.subscribe_ticks(["EUR/USD"])
        candles = router.subscribe_candles("EUR/USD", "1m")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(n),
            str(T0),
            env=child_env(postgres_url, pg_schema, redis_url, redis_prefix, tmp_path / "child"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        seen: list[int] = []
        async with asyncio.timeout(30):
            while not seen or seen[-1] < T0 + n - 1:
                tick = await anext(sub)
                assert tick.symbol == "EUR/USD"  # GBP/USD is filtered out
                assert tick.source == "child"
                seen.append(tick.timestamp)
            candle = await anext(candles)
        _out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        # Remote updates may be coalesced under bursts, never reordered, never the last one lost.
        assert seen == sorted(seen)
        assert seen[-1] == T0 + n - 1
        assert candle.source == "agg:child"
        assert sub.dropped == 0


async def test_bulk_saves_reach_this_and_the_other_routers_subscribers_alike(
    postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    from data_manager import CandleData, TickData

    def settings(name: str) -> DataManagerSettings:
        return DataManagerSettings(
            postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema),
            dragonfly=DragonflySettings(url=redis_url, key_prefix=redis_prefix),
            watch_strategy=False,
            journal_dir=tmp_path / name,
        )

    ticks = [
        TickData(
            symbol="EUR/USD",
            timestamp=T0 + i,
            bid=1.1,
            ask=1.1002,
            source="odd" if i % 2 else "even",
        )
        for i in range(10)
    ]
    candles = [
        CandleData(
            symbol="EUR/USD",
            timeframe="1m",
            timestamp=T0 + i * 60_000,
            open=1.1,
            high=1.2,
            low=1.0,
            close=1.15,
            volume=5,
            source="vendor",
        )
        for i in range(3)
    ]
    async with DataRouter(settings=settings("a")) as a, DataRouter(settings=settings("b")) as b:
        subs = {
            name: (router.subscribe_ticks(["EUR/USD"]), router.subscribe_candles("EUR/USD", "1m"))
            for name, router in (("a", a), ("b", b))
        }
        await a.save_ticks(ticks)
        await a.save_candles_bulk(candles)
        got: dict[str, tuple[list[tuple[str, int]], list[int]]] = {}
        async with asyncio.timeout(30):
            for name, (tick_sub, candle_sub) in subs.items():
                seen = [await anext(tick_sub) for _ in range(2)]
                bars = [await anext(candle_sub) for _ in range(3)]
                got[name] = (
                    sorted((t.source, t.timestamp) for t in seen),
                    [c.timestamp for c in bars],
                )
        # Each source's newest tick of the batch; every candle of the ring's window, in order.
        expected = ([("even", T0 + 8), ("odd", T0 + 9)], [c.timestamp for c in candles])
        assert got == {"a": expected, "b": expected}
        assert subs["a"][0].pending == subs["a"][1].pending == 0


async def test_leaving_an_async_for_unsubscribes(
    postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    import time

    from data_manager import TickData

    settings = DataManagerSettings(
        postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema),
        dragonfly=DragonflySettings(url=redis_url, key_prefix=redis_prefix),
        watch_strategy=False,
        journal_dir=tmp_path / "j",
    )

    def tick(i: int) -> TickData:
        return TickData(symbol="EUR/USD", timestamp=T0 + i, bid=1.1, ask=1.1002, source="s")

    class Leave(Exception):
        pass

    async def returns(router: DataRouter) -> TickData | None:
        async for t in router.subscribe_ticks(["EUR/USD"]):
            return t
        return None

    async def breaks(router: DataRouter) -> TickData | None:
        got = None
        async for t in router.subscribe_ticks(["EUR/USD"]):
            got = t
            break
        return got

    async def raises(router: DataRouter) -> TickData | None:
        try:
            async for _t in router.subscribe_ticks(["EUR/USD"]):
                raise Leave
        except Leave:
            pass
        return None

    async with DataRouter(settings=settings) as router:
        consumers = [asyncio.create_task(leave(router)) for leave in (returns, breaks, raises) * 20]
        deadline = time.monotonic() + 10
        while len(router._subs) < len(consumers):  # every consumer is waiting in its loop
            assert time.monotonic() < deadline
            await asyncio.sleep(0)
        await router.save_tick(tick(0))
        async with asyncio.timeout(10):
            await asyncio.gather(*consumers)
        deadline = time.monotonic() + 10
        while router._subs:  # finalising a left loop's generator runs on a later pass
            assert time.monotonic() < deadline, f"{len(router._subs)} subscriptions left"
            await asyncio.sleep(0)
        await router.save_tick(tick(1))  # nothing buffers it any more
        assert len(router._subs) == 0

        # aclose(), async with and direct anext() still work as before.
        sub = router.subscribe_ticks(["EUR/USD"])
        async with sub:
            await router.save_tick(tick(2))
            assert (await anext(sub)).timestamp == T0 + 2
            assert len(router._subs) == 1  # reading with anext() keeps the subscription
        assert len(router._subs) == 0
        sub = router.subscribe_ticks(["EUR/USD"])
        await router.save_tick(tick(3))
        await sub.aclose()
        assert [t.timestamp async for t in sub] == [T0 + 3]  # buffered items, then the end
        assert len(router._subs) == 0
