"""Hot reload of the routing strategy file under a running router with live readers.

The router watches a strategy file in the test's temporary directory; instead of waiting for
the poller, each test asks the router's watcher to check the file now. Readers loop on
``get_latest_tick`` while the file is edited: a valid edit takes effect, every kind of bad
edit is rejected while the old strategy keeps serving and health names the problem.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import pytest_asyncio

from data_manager.clock import ManualClock
from data_manager.models import CandleData, TickData
from data_manager.router import DataRouter
from data_manager.settings import DataManagerSettings, DragonflySettings, PostgresSettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from data_manager.cache.redis import RedisCache

    RouterFactory = Callable[..., Awaitable[DataRouter]]

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

TS: Final = 1_727_996_400_000
SYM: Final = "EUR/USD"
SRC: Final = "ig"
DB_VALUE: Final = 1.25
L2_VALUE: Final = 1.5

#: The file the router starts with: cache first, no aggregation (ticks stay ticks).
BASE: Final = """
DATA_MANAGER_STRATEGY = {
    "version": "base",
    "routing": {"get_latest_tick": ["dragonfly_cache", "timescale"]},
    "aggregation": {"enabled": False},
}
"""

#: A valid edit: latest ticks from the database only.
DB_ONLY: Final = """
DATA_MANAGER_STRATEGY = {
    "version": "db-only",
    "routing": {"get_latest_tick": ["timescale"]},
    "aggregation": {"enabled": False},
}
"""


def tick(ts: int = TS, bid: float = 1.1) -> TickData:
    return TickData(symbol=SYM, timestamp=ts, bid=bid, ask=bid + 0.0001, source=SRC)


def l2_of(router: DataRouter) -> RedisCache:
    l2 = router.cache.l2
    assert l2 is not None, "the router has no L2 cache"
    return l2


def write_strategy(path: Path, text: str) -> None:
    """Replace the file the way editors do: write a sibling, then rename it over."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(textwrap.dedent(text))
    os.replace(tmp, path)


async def reload(router: DataRouter) -> bool:
    """Check the strategy file now (what the poller does every poll interval)."""
    return await router._watcher.check_now()


@pytest_asyncio.fixture(loop_scope="session")
async def make_router(
    postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> AsyncIterator[RouterFactory]:
    """Open routers that watch ``tmp_path/strategy.py`` (written with ``text`` first)."""
    opened: list[DataRouter] = []

    async def make(text: str = BASE, *, clock: ManualClock | None = None) -> DataRouter:
        path = tmp_path / "strategy.py"
        write_strategy(path, text)
        settings = DataManagerSettings(
            postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema),
            dragonfly=DragonflySettings(url=redis_url, key_prefix=redis_prefix),
            strategy_file=path,
            watch_strategy=True,
            strategy_poll_seconds=3600,  # the tests check the file themselves
            journal_dir=tmp_path / "j",
            write_mode="sync",
        )
        router = DataRouter(settings, clock=clock or ManualClock())
        await router.initialize()
        opened.append(router)
        return router

    yield make
    for router in reversed(opened):
        await router.close()


class Readers:
    """Tasks looping on ``get_latest_tick``; they record every answer and any error."""

    def __init__(self, router: DataRouter, count: int = 4) -> None:
        self.router = router
        self.answers: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(count)]

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                got = await self.router.get_latest_tick(SYM)
            except Exception as exc:
                self.errors.append(exc)
                self._progress.set()
                return
            self.answers.append(float("nan") if got is None else got.bid)
            self._progress.set()
            await asyncio.sleep(0)  # an L1 hit never yields by itself

    async def settle(self) -> list[float]:
        """Let every reader answer a few more times; return the answers since the last call."""
        start = len(self.answers)
        while len(self.answers) < start + 20 and not self.errors:
            self._progress.clear()
            await self._progress.wait()
        assert not self.errors, self.errors
        return self.answers[start:]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert not self.errors, self.errors


async def two_tier_router(make_router: RouterFactory) -> DataRouter:
    """A router whose L2 and database hold different ticks (so answers name their tier)."""
    router = await make_router()
    await router.storage.write_ticks([tick(bid=DB_VALUE)])
    await l2_of(router).put_ticks([tick(bid=L2_VALUE)])
    return router


# ----------------------------------------------------------------------------- valid edits


async def test_valid_edit_takes_effect_while_readers_run(make_router: RouterFactory) -> None:
    router = await two_tier_router(make_router)
    assert router.strategy.version == "base"
    readers = Readers(router)
    assert set(await readers.settle()) == {L2_VALUE}

    write_strategy(router.settings.resolved_strategy_file, DB_ONLY)
    assert await reload(router)
    assert router.strategy.version == "db-only"
    assert router.strategy.routing.get_latest_tick == ("timescale",)
    router.cache.l1.clear()  # drop the answer L1 holds from the old route
    db_reads = (await router.cache.get_stats()).details["db_reads"]
    l2_hits = (await router.cache.get_stats()).l2.hits
    assert set(await readers.settle()) == {DB_VALUE}
    await readers.stop()
    stats = await router.cache.get_stats()
    assert stats.details["db_reads"] > db_reads  # type: ignore[operator]
    assert stats.l2.hits == l2_hits
    health = await router.health_check()
    assert health.status == "healthy", health.reason
    assert health.strategy.last_error is None
    assert health.strategy.reloads == 1
    assert health.strategy.version == 2


async def test_unchanged_content_is_not_a_reload(make_router: RouterFactory) -> None:
    router = await make_router()
    before = router.strategy.content_hash
    write_strategy(router.settings.resolved_strategy_file, "# a comment\n" + BASE)
    assert not await reload(router)
    assert router.strategy.content_hash == before
    assert (await router.health_check()).strategy.reloads == 0


async def test_reloaded_l1_ttl_applies_at_once(make_router: RouterFactory) -> None:
    clock = ManualClock()
    router = await make_router(clock=clock)
    await router.save_tick(tick(bid=L2_VALUE))
    # The write's check against L2 (if still under way) refills the entry with the time
    # it answers: let it answer before the clock moves, or the entry would look fresh.
    await asyncio.gather(
        *(t for t in router._background if t.get_coro().__qualname__ == "SingleFlight.do")
    )
    clock.advance(10)
    await router.get_latest_tick(SYM)
    assert (await router.cache.get_stats()).l1.hits == 1  # 60 s default: still cached

    write_strategy(
        router.settings.resolved_strategy_file,
        BASE.replace('"aggregation"', '"cache": {"l1_tick_ttl_seconds": 5},\n    "aggregation"'),
    )
    assert await reload(router)
    await router.get_latest_tick(SYM)
    stats = await router.cache.get_stats()
    assert (stats.l1.hits, stats.l1.misses) == (1, 1)  # written 10 s ago: expired under 5 s


async def test_reloaded_staleness_applies_at_once(make_router: RouterFactory) -> None:
    clock = ManualClock()
    router = await make_router(clock=clock)
    await router.save_tick(tick(clock.time_ms()))
    clock.advance(3)
    assert (await router.check_staleness(SYM)).tick is True  # default 2 s
    write_strategy(
        router.settings.resolved_strategy_file,
        BASE.replace('"aggregation"', '"staleness": {"tick_seconds": 10},\n    "aggregation"'),
    )
    assert await reload(router)
    assert (await router.check_staleness(SYM)).tick is False


async def test_reloaded_candle_preference_applies_to_source_less_reads(
    make_router: RouterFactory,
) -> None:
    router = await make_router()
    for source, count in (("alpha", 3), ("beta", 4)):
        for i in range(count):
            candle = CandleData(
                symbol=SYM, timeframe="1m", timestamp=TS + i * 60_000, open=1.1, high=1.2,
                low=1.0, close=1.1, source=source,
            )  # fmt: skip
            await router.save_candle(candle, mode="sync")
    # No preference: the source with the newest candle.
    assert {c.source for c in await router.get_latest_candles(SYM, "1m", 3)} == {"beta"}
    write_strategy(
        router.settings.resolved_strategy_file,
        BASE.replace(
            '"aggregation"', '"sources": {"candle_preference": ["alpha"]},\n    "aggregation"'
        ),
    )
    assert await reload(router)
    assert {c.source for c in await router.get_latest_candles(SYM, "1m", 3)} == {"alpha"}


async def test_reloaded_l2_ttl_applies_to_new_writes(make_router: RouterFactory) -> None:
    router = await make_router()
    write_strategy(
        router.settings.resolved_strategy_file,
        BASE.replace('"aggregation"', '"cache": {"tick_ttl_seconds": 30},\n    "aggregation"'),
    )
    assert await reload(router)
    assert router.strategy.cache.tick_ttl_seconds == 30
    await router.save_tick(tick())
    bus = router._bus
    assert bus is not None
    await bus.flush()
    l2 = l2_of(router)
    ttl_ms = await l2.client.pttl(l2.tick_key(SYM))
    assert 0 < ttl_ms <= 30_000, f"L2 tick TTL is {ttl_ms} ms after reloading 30 s"


# ----------------------------------------------------------------------------- the file at start


async def test_the_strategy_file_governs_l1_from_the_start(make_router: RouterFactory) -> None:
    clock = ManualClock()
    router = await make_router(
        BASE.replace('"aggregation"', '"cache": {"l1_tick_ttl_seconds": 5},\n    "aggregation"'),
        clock=clock,
    )
    assert router.strategy.cache.l1_tick_ttl_seconds == 5
    assert router.cache.l1.tick_ttl == 5, "L1 was built from the defaults, not the file"
    await router.save_tick(tick(bid=L2_VALUE))
    clock.advance(10)
    await router.get_latest_tick(SYM)
    assert (await router.cache.get_stats()).l1.hits == 0


async def test_the_strategy_file_governs_aggregation_from_the_start(
    make_router: RouterFactory,
) -> None:
    router = await make_router()  # BASE turns aggregation off
    assert router.strategy.aggregation.enabled is False
    await router.save_tick(tick())
    await router.flush()
    candles = await router.storage.latest_candles(SYM, "1m", 1, source=f"agg:{SRC}")
    assert candles == [], "the file disables aggregation, yet ticks were aggregated"


# ----------------------------------------------------------------------------- bad edits

BAD_EDITS: Final = {
    "syntax-error": (
        'DATA_MANAGER_STRATEGY = {"routing": {"get_latest_tick": ["timescale"]}\n',
        "syntax error",
    ),
    "unknown-backend": (
        'DATA_MANAGER_STRATEGY = {"routing": {"get_latest_tick": ["memcached", "timescale"]}}\n',
        "unknown backend 'memcached'",
    ),
    "negative-ttl": (
        'DATA_MANAGER_STRATEGY = {"cache": {"tick_ttl_seconds": -5}}\n',
        "cache.tick_ttl_seconds",
    ),
    "non-literal": (
        'DATA_MANAGER_STRATEGY = {"cache": {"tick_ttl_seconds": open("{canary}", "w")}}\n',
        "is not a literal",
    ),
    "second-assignment": (
        'DATA_MANAGER_STRATEGY = {"version": "a"}\nDATA_MANAGER_STRATEGY = {"version": "b"}\n',
        "exactly one statement",
    ),
    "restart-required": (
        'DATA_MANAGER_STRATEGY = {"routing": {"get_latest_tick": ["timescale"]},\n'
        ' "cache": {"candle_ring_size": 300}, "aggregation": {"enabled": False}}\n',
        "restart required",
    ),
}


@pytest.mark.parametrize("edit", list(BAD_EDITS))
async def test_bad_edit_is_rejected_and_the_old_strategy_keeps_serving(
    make_router: RouterFactory, edit: str, tmp_path: Path
) -> None:
    router = await two_tier_router(make_router)
    path = router.settings.resolved_strategy_file
    old = router.strategy
    readers = Readers(router)
    assert set(await readers.settle()) == {L2_VALUE}

    text, problem = BAD_EDITS[edit]
    canary = tmp_path / "executed"
    write_strategy(path, text.replace("{canary}", str(canary)))
    assert not await reload(router)

    assert router.strategy is old
    router.cache.l1.clear()  # a read now goes down the route in force: still L2 first
    assert set(await readers.settle()) == {L2_VALUE}
    assert not canary.exists(), "the strategy file was executed"
    health = await router.health_check()
    assert health.status == "degraded"
    assert health.strategy.last_error is not None
    assert problem in health.strategy.last_error
    assert str(path) in health.strategy.last_error
    assert "strategy" in health.reason
    assert health.strategy.content_hash == old.content_hash
    # Checking the same bad file again changes nothing.
    assert not await reload(router)
    assert router.strategy is old

    write_strategy(path, DB_ONLY)  # a good edit clears the error and takes effect
    assert await reload(router)
    router.cache.l1.clear()
    assert set(await readers.settle()) == {DB_VALUE}
    await readers.stop()
    health = await router.health_check()
    assert health.strategy.last_error is None
    assert health.status == "healthy", health.reason


async def test_reverting_a_bad_edit_clears_the_error(make_router: RouterFactory) -> None:
    router = await make_router()
    path = router.settings.resolved_strategy_file
    old = router.strategy
    write_strategy(path, "DATA_MANAGER_STRATEGY = {")
    assert not await reload(router)
    assert (await router.health_check()).strategy.last_error is not None
    write_strategy(path, BASE)
    assert not await reload(router)  # nothing to swap: the old strategy was never replaced
    assert router.strategy is old
    health = await router.health_check()
    assert health.strategy.last_error is None
    assert health.status == "healthy", health.reason


async def test_deleted_file_keeps_the_last_good_strategy(make_router: RouterFactory) -> None:
    router = await make_router()
    old = router.strategy
    router.settings.resolved_strategy_file.unlink()
    assert not await reload(router)
    assert router.strategy is old
    health = await router.health_check()
    assert health.status == "degraded"
    assert health.strategy.last_error is not None
    assert "disappeared" in health.strategy.last_error
