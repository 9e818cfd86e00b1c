"""Router-level computations on the embedded store: aggregation, order flow, processors,
subscriptions, maintenance with a manual clock."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import pytest

from data_manager import (
    BackpressureTimeoutError,
    CandleData,
    CircuitBreakerOpenError,
    DatabaseConnectionError,
    DataManagerSettings,
    DataRouter,
    JournalError,
    OrderFlowMetrics,
    TickData,
    ValidationError,
)
from data_manager.clock import ManualClock
from data_manager.processors import IncrementalSMA
from data_manager.router import RouterState
from data_manager.storage.sqlite import SQLiteStorage
from data_manager.strategy import strategy_from_mapping

T0 = 1_727_996_400_000  # 2024-10-03T23:00:00Z, a minute boundary


def q(ts: int, bid: float, *, symbol: str = "EUR/USD", **extra: object) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.0002, source="feed", **extra)


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[DataRouter]:
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "journal"
    )
    strategy = strategy_from_mapping(
        {"aggregation": {"timeframes": ["1m", "5m"]}, "subscriptions": {"buffer_size": 3}}
    )
    clock = ManualClock(wall_ms=T0)
    async with DataRouter(settings=settings, clock=clock, strategy=strategy) as r:
        yield r


async def test_aggregated_candles_form_close_and_reach_storage(router: DataRouter) -> None:
    for i, bid in enumerate((1.1000, 1.1010, 1.0990, 1.1005)):
        await router.save_tick(q(T0 + i * 10_000, bid))
    forming = await router.get_latest_candles("EUR/USD", "1m", 1)
    assert forming[-1].is_closed is False
    assert forming[-1].source == "agg:feed"
    await router.save_tick(q(T0 + 60_000, 1.1020))  # next bucket closes the first
    await router.flush()
    stored = await router.storage.candles_range("EUR/USD", "1m", T0, T0 + 120_000)
    assert [c.is_closed for c in stored] == [True, False]
    first = stored[0]
    assert (first.open, first.close) == pytest.approx((1.1001, 1.1006))
    assert first.high == pytest.approx(1.1011)
    assert first.low == pytest.approx(1.0991)
    assert first.num_trades == 4


async def test_idle_bucket_closed_by_maintenance_with_manual_clock(tmp_path: Path) -> None:
    clock = ManualClock(wall_ms=T0)
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "j"
    )
    strategy = strategy_from_mapping(
        {"aggregation": {"timeframes": ["1m"], "idle_close_grace_seconds": 2}}
    )
    async with DataRouter(settings=settings, clock=clock, strategy=strategy) as router:
        await router.save_tick(q(T0 + 1_000, 1.1))
        clock.advance(60.0)  # bucket end passed, grace not yet
        await router.run_maintenance()
        await router.flush()  # the L1 TTL (60 s) has run out too: read what storage has
        assert (await router.get_latest_candles("EUR/USD", "1m", 1))[-1].is_closed is False
        clock.advance(2.5)
        await router.run_maintenance()
        await router.flush()
        latest = await router.get_latest_candles("EUR/USD", "1m", 1)
        assert latest[-1].is_closed is True
        stored = await router.storage.candles_range("EUR/USD", "1m", T0, T0 + 60_000)
        assert stored[-1].is_closed is True


async def test_idle_closed_bar_reaches_this_routers_subscribers(tmp_path: Path) -> None:
    clock = ManualClock(wall_ms=T0)
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "j"
    )
    strategy = strategy_from_mapping(
        {
            "aggregation": {
                "timeframes": ["1m"],
                "idle_close_grace_seconds": 2,
                "publish_interval_seconds": 60,  # no forming snapshot gets in between
            }
        }
    )
    async with DataRouter(settings=settings, clock=clock, strategy=strategy) as router:
        sub = router.subscribe_candles("EUR/USD", "1m")
        await router.save_tick(q(T0 + 1_000, 1.1))
        await router.save_tick(q(T0 + 2_000, 1.2))
        clock.advance(62.5)  # the bucket's end and its grace have passed; no tick since
        await router.run_maintenance()
        assert sub.pending == 1
        bar = await anext(sub)
        assert (bar.timestamp, bar.is_closed, bar.num_trades) == (T0, True, 2)


ONE_MINUTE = strategy_from_mapping({"aggregation": {"timeframes": ["1m"]}})


async def after_a_restart(tmp_path: Path, *, clock: ManualClock | None = None) -> DataRouter:
    """An unopened router on a SQLite file where a previous router left the 1m bar of T0
    forming, from ticks at T0 + 1 s (bid 1.1000) and T0 + 2 s (bid 1.1050)."""
    path = str(tmp_path / "db.sqlite3")

    def settings(journal: str) -> DataManagerSettings:
        return DataManagerSettings(
            sqlite_path=path, watch_strategy=False, journal_dir=tmp_path / journal
        )

    async with DataRouter(settings=settings("a"), strategy=ONE_MINUTE) as first:
        await first.save_tick(q(T0 + 1_000, 1.1000))
        await first.save_tick(q(T0 + 2_000, 1.1050))
    return DataRouter(settings=settings("b"), clock=clock, strategy=ONE_MINUTE)


class HeldReads:
    """Holds a router's storage ``latest_candles`` reads (the forming-candle restore) until
    :meth:`release`; the first ``failures`` reads then raise the given errors."""

    def __init__(
        self, router: DataRouter, monkeypatch: pytest.MonkeyPatch, *failures: Exception
    ) -> None:
        storage = router.storage
        read = storage.latest_candles
        self.started = asyncio.Event()
        self.reads = 0
        self._go = asyncio.Event()
        self._failures = list(failures)

        async def held(*args: Any, **kwargs: Any) -> list[CandleData]:
            self.reads += 1
            self.started.set()
            await self._go.wait()
            if self._failures:
                raise self._failures.pop(0)
            return await read(*args, **kwargs)

        monkeypatch.setattr(storage, "latest_candles", held)

    def release(self) -> None:
        self._go.set()


async def test_forming_bucket_restored_by_the_next_router(tmp_path: Path) -> None:
    async with await after_a_restart(tmp_path) as second:
        await second.save_tick(q(T0 + 3_000, 1.0950))
        await second.flush()
        candle = (await second.get_latest_candles("EUR/USD", "1m", 1))[-1]
    # One bucket, built from all three ticks across the restart.
    assert candle.open == pytest.approx(1.1001)
    assert candle.high == pytest.approx(1.1051)
    assert candle.low == pytest.approx(1.0951)
    assert candle.num_trades == 3


async def test_concurrent_first_ticks_after_a_restart_share_one_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await after_a_restart(tmp_path) as second:
        reads = HeldReads(second, monkeypatch)
        saves = [
            asyncio.create_task(second.save_tick(q(T0 + 3_000, 1.0950))),
            asyncio.create_task(second.save_tick(q(T0 + 4_000, 1.1100))),
        ]
        await reads.started.wait()  # both saves have run up to the restore by now
        reads.release()
        await asyncio.gather(*saves)
        assert reads.reads == 1  # one read per timeframe, shared by both saves
        await second.flush()
        candle = (await second.get_latest_candles("EUR/USD", "1m", 1))[-1]
    # The restored bar took both ticks: none opened a bucket the restore then skipped.
    assert candle.num_trades == 4
    assert candle.open == pytest.approx(1.1001)
    assert candle.high == pytest.approx(1.1101)
    assert candle.low == pytest.approx(1.0951)
    assert candle.close == pytest.approx(1.1101)


@pytest.mark.parametrize(
    "error",
    [DatabaseConnectionError("database down"), RuntimeError("a bug in a storage backend")],
    ids=["database down", "unexpected error"],
)
async def test_a_failed_restore_leaves_buffered_saves_accepted_and_is_retried(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    clock = ManualClock(wall_ms=T0 + 10_000)
    async with await after_a_restart(tmp_path, clock=clock) as second:
        reads = HeldReads(second, monkeypatch, error)
        reads.release()
        await second.save_tick(q(T0 + 3_000, 1.0950))  # accepted although the read failed
        assert "cannot restore the forming candles" in caplog.text
        await second.save_tick(q(T0 + 4_000, 1.1100))  # within the pause: waits, no read
        assert reads.reads == 1
        health = (await second.health_check()).write_path.details
        assert (health["forming_restore_failures"], health["ticks_awaiting_restore"]) == (1, 2)
        clock.advance(1.0)
        await second.save_tick(q(T0 + 5_000, 1.1000))  # the retry restores the bar
        assert reads.reads == 2
        await second.flush()
        candle = (await second.get_latest_candles("EUR/USD", "1m", 1))[-1]
        assert len(await second.get_ticks("EUR/USD", T0, T0 + 60_000)) == 5
    # The bar continues the previous router's, with every tick that waited for the restore.
    assert candle.num_trades == 5
    assert candle.open == pytest.approx(1.1001)
    assert candle.high == pytest.approx(1.1101)
    assert candle.low == pytest.approx(1.0951)
    assert candle.close == pytest.approx(1.1001)


async def test_restores_that_keep_failing_are_given_up_after_three_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(wall_ms=T0 + 10_000)
    down = [DatabaseConnectionError("database down") for _ in range(3)]
    async with await after_a_restart(tmp_path, clock=clock) as second:
        reads = HeldReads(second, monkeypatch, *down)
        reads.release()
        await second.save_tick(q(T0 + 3_000, 1.0950))
        clock.advance(1.0)
        await second.run_maintenance()  # the timer retries without waiting for a tick
        assert reads.reads == 2
        await second.flush()  # the third attempt: aggregation goes on without the bar
        assert reads.reads == 3
        await second.save_tick(q(T0 + 4_000, 1.1100))
        assert reads.reads == 3  # given up: no more reads
        candle = (await second.get_latest_candles("EUR/USD", "1m", 1))[-1]
    assert candle.num_trades == 2
    assert (candle.open, candle.close) == pytest.approx((1.0951, 1.1101))


async def save_refused(router: DataRouter, refusal: str, tick: TickData) -> None:
    """Save ``tick`` while the write path refuses it (``refusal``), expecting the error the
    caller gets; the write path takes ticks again afterwards."""
    ingest = router._ingest
    assert ingest is not None
    if refusal == "queue full":  # the router's queue holds one item, and nobody waits
        await router.save_order_flow(
            OrderFlowMetrics(symbol="GBP/USD", timestamp=T0, window_ms=60_000)
        )
        with pytest.raises(BackpressureTimeoutError):
            await router.save_tick(tick)
        await router.flush()
    elif refusal == "journal append fails":
        journal = ingest.journal
        assert journal is not None

        async def append(*args: object, **kwargs: object) -> int:
            msg = "no space left on the journal's disk"
            raise JournalError(msg)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(journal, "append", append)
            with pytest.raises(JournalError):
                await router.save_tick(tick, mode="journal")
    else:  # "database down": a sync write, the breaker open
        breaker = ingest.breaker
        for _ in range(breaker.failure_threshold):
            breaker.record_failure()
        with pytest.raises(CircuitBreakerOpenError):
            await router.save_tick(tick, mode="sync")
        breaker.record_success()


async def test_a_save_waiting_for_a_restore_ends_normally_when_close_gives_up_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    second = await after_a_restart(tmp_path)
    await second.initialize()
    reads = HeldReads(second, monkeypatch)  # never released: the restore read hangs
    save = asyncio.create_task(second.save_tick(q(T0 + 3_000, 1.0950)))
    await reads.started.wait()  # the tick is accepted and waits for the restore
    await second.close(timeout=0.2)  # runs out of time; the teardown cancels the restore
    done, _ = await asyncio.wait({save}, timeout=10)
    assert save in done, "save_tick never returned"
    # The caller was never cancelled, and its tick was accepted: it must not see the
    # restore's cancellation (the tick is in the journal for the next router).
    assert not save.cancelled()
    save.result()


async def test_a_journaled_save_that_close_overtakes_still_succeeds(tmp_path: Path) -> None:
    second = await after_a_restart(tmp_path)
    await second.initialize()
    await second.save_tick(q(T0 + 3_000, 1.0950))  # restores the bar of T0
    # Journal mode: the call awaits the fsync while close() begins; the tick closes the bar
    # of T0, whose candle the closing write path would refuse.
    save = asyncio.create_task(second.save_tick(q(T0 + 61_000, 1.1010), mode="journal"))
    await asyncio.sleep(0)
    await second.close()
    await asyncio.wait({save})
    save.result()  # acknowledged by the journal: not reported as refused
    async with DataRouter(
        settings=DataManagerSettings(sqlite_path=str(tmp_path / "db.sqlite3"),
                                     watch_strategy=False, journal_dir=tmp_path / "b"),
        strategy=ONE_MINUTE,
    ) as third:  # fmt: skip
        await third.flush()
        stored = await third.storage.ticks_range("EUR/USD", T0, T0 + 120_000)
    assert [t.timestamp for t in stored] == [T0 + 1_000, T0 + 2_000, T0 + 3_000, T0 + 61_000]


@pytest.mark.parametrize("refusal", ["queue full", "journal append fails", "database down"])
async def test_a_refused_tick_changes_no_derived_data(tmp_path: Path, refusal: str) -> None:
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "j"
    )
    sections: dict[str, Any] = {"aggregation": {"timeframes": ["1m"]}}
    if refusal == "queue full":
        sections["batch"] = {"size": 1, "max_batch": 1, "max_queue": 1, "put_timeout_seconds": 0}
    clock = ManualClock(wall_ms=T0 + 10_000)
    async with DataRouter(settings, clock=clock, strategy=strategy_from_mapping(sections)) as r:
        sma = IncrementalSMA(3)
        r.register_processor(sma)
        sub = r.subscribe_ticks(["EUR/USD"])
        await r.save_tick(q(T0 + 1_000, 1.1000, bid_size=1e6, ask_size=1e6))
        await r.flush()
        # Same bid, three times the size: it would add a trade and 2e6 of OFI.
        refused = q(T0 + 2_000, 1.1000, bid_size=3e6, ask_size=1e6)

        async def derived() -> tuple[int | None, float | None, int, int]:
            candle = (await r.get_latest_candles("EUR/USD", "1m", 1))[-1]
            flow = await r.get_latest_order_flow("EUR/USD")
            ofi = None if flow is None else flow.ofi
            return candle.num_trades, ofi, r.processors.stats()[sma.name].calls, sub.pending

        before = await derived()
        assert before == (1, None, 1, 1)  # trades, OFI (none after one quote), calls, items
        await save_refused(r, refusal, refused)
        assert await derived() == before
        await r.save_tick(refused)  # the caller's retry, accepted: counted once
        trades, ofi, calls, pending = await derived()
        assert (trades, calls, pending) == (2, 2, 2)
        assert ofi == pytest.approx(2e6)


async def test_a_tick_aggregation_cannot_take_is_refused_before_it_is_stored(
    router: DataRouter,
) -> None:
    long_source = "v" * 61  # fits a tick, but "agg:" + it is longer than a source may be
    tick = TickData(symbol="EUR/USD", timestamp=T0, bid=1.1, ask=1.1002, source=long_source)
    with pytest.raises(ValidationError, match="aggregated source"):
        await router.save_tick(tick, mode="sync")
    assert await router.get_ticks("EUR/USD", T0, T0 + 1) == []
    assert await router.get_latest_tick("EUR/USD") is None


async def test_a_tick_aggregation_cannot_take_is_refused_while_its_symbol_is_disabled(
    tmp_path: Path,
) -> None:
    # A reload may enable the symbol later: its ticks would then be stored and refused.
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "journal"
    )
    strategy = strategy_from_mapping({"aggregation": {"disabled_symbols": ["EUR/USD"]}})
    async with DataRouter(settings=settings, strategy=strategy) as router:
        tick = TickData(symbol="EUR/USD", timestamp=T0, bid=1.1, ask=1.1002, source="v" * 61)
        with pytest.raises(ValidationError, match="aggregated source"):
            await router.save_tick(tick)
        await router.flush()
        assert await router.get_ticks("EUR/USD", T0, T0 + 1) == []


#: Late ticks rebuild their bucket's candle, and only flush(), close() or run_maintenance()
#: (never the timer, meanwhile) do it.
LATE_REBUILD: Final = {
    "aggregation": {"timeframes": ["1m"], "late_policy": "rebuild"},
    "batch": {"flush_interval_seconds": 3600},
}


def on_disk(tmp_path: Path, journal: str) -> DataManagerSettings:
    return DataManagerSettings(
        sqlite_path=str(tmp_path / "db.sqlite3"),
        watch_strategy=False,
        journal_dir=tmp_path / journal,
    )


async def owe_a_late_rebuild(router: DataRouter) -> None:
    await router.save_tick(q(T0 + 1_000, 1.1000))
    await router.save_tick(q(T0 + 61_000, 1.1010))  # closes the bar of T0
    await router.save_tick(q(T0 + 2_000, 1.0900))  # late for it: a rebuild is owed


@pytest.mark.parametrize("end", ["flush", "close"])
async def test_flush_and_close_store_the_rebuilds_owed_for_late_ticks(
    tmp_path: Path, end: str
) -> None:
    strategy = strategy_from_mapping(LATE_REBUILD)
    clock = ManualClock(wall_ms=T0 + 70_000)
    async with DataRouter(on_disk(tmp_path, "a"), clock=clock, strategy=strategy) as router:
        await owe_a_late_rebuild(router)
        if end == "flush":
            await router.flush()
            stored = await router.storage.candles_range("EUR/USD", "1m", T0, T0 + 1)
    if end == "close":
        async with DataRouter(on_disk(tmp_path, "b"), strategy=strategy) as reader:
            stored = await reader.storage.candles_range("EUR/USD", "1m", T0, T0 + 1)
    assert len(stored) == 1
    assert (stored[0].num_trades, stored[0].is_closed) == (2, True)
    assert stored[0].low == pytest.approx(1.0901)


async def test_close_gives_its_steps_one_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The write path's flush took all of close's timeout (a slow database, timed on the
    router's clock): the late-tick rebuilds must not start then against a database that no
    longer answers, which would take another whole timeout."""
    timeout = 3600.0
    clock = ManualClock(wall_ms=T0 + 70_000)
    real_write = SQLiteStorage.write_ticks

    async def slow_write(self: SQLiteStorage, ticks: Sequence[TickData]) -> int:
        clock.advance(timeout)  # the database took the whole timeout to store them
        return await real_write(self, ticks)

    monkeypatch.setattr(SQLiteStorage, "write_ticks", slow_write)  # before the writer binds it
    strategy = strategy_from_mapping(LATE_REBUILD)
    router = DataRouter(on_disk(tmp_path, "j"), clock=clock, strategy=strategy)
    await router.initialize()
    await owe_a_late_rebuild(router)
    asked = asyncio.Event()

    async def hanging_read(*args: object, **kwargs: object) -> list[TickData]:
        asked.set()
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    monkeypatch.setattr(router.storage, "ticks_range", hanging_read)
    closing = asyncio.create_task(router.close(timeout=timeout))
    rebuilding = asyncio.create_task(asked.wait())
    await asyncio.wait({closing, rebuilding}, return_when=asyncio.FIRST_COMPLETED)
    rebuilding.cancel()
    if not closing.done():
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        pytest.fail("close() started the rebuilds after its timeout had run out")
    await closing
    assert "close(timeout=...) had no time left" in caplog.text
    assert router.state is RouterState.CLOSED


async def test_order_flow_computed_and_readable(router: DataRouter) -> None:
    await router.save_tick(q(T0, 1.1000, bid_size=1e6, ask_size=1e6))
    await router.save_tick(q(T0 + 10, 1.1000, bid_size=3e6, ask_size=1e6))
    await router.save_tick(
        q(
            T0 + 20,
            1.1000,
            bid_size=3e6,
            ask_size=1e6,
            last_price=1.1002,
            last_size=5e5,
            aggressor="buy",
        )
    )
    flow = await router.get_latest_order_flow("EUR/USD")
    assert flow is not None
    assert flow.ofi == pytest.approx(2e6)  # bid size grew by 2e6 at an unchanged bid
    assert flow.buy_volume == pytest.approx(5e5)
    assert flow.imbalance == pytest.approx(1.0)
    await router.flush()
    stored = await router.storage.latest_order_flow("EUR/USD")
    assert stored is not None
    assert stored.ofi == pytest.approx(flow.ofi)


@pytest.mark.parametrize("interval", [0, 60])
async def test_order_flow_is_materialised_per_interval_and_on_read(
    tmp_path: Path, interval: float
) -> None:
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "j"
    )
    strategy = strategy_from_mapping(
        {"aggregation": {"enabled": False}, "order_flow": {"publish_interval_seconds": interval}}
    )
    async with DataRouter(settings=settings, strategy=strategy) as router:
        l1 = router.cache.l1
        await router.save_tick(q(T0, 1.1000, bid_size=1e6, ask_size=1e6))
        await router.save_tick(q(T0 + 10, 1.1000, bid_size=3e6, ask_size=1e6))
        for _ in range(3):
            await asyncio.sleep(0)  # event-loop passes, far shorter than 60 s
        held = l1.get_order_flow("EUR/USD")
        if interval:
            assert held is None  # not yet materialised
        else:
            assert held is not None
            assert held.ofi == pytest.approx(2e6)
        flow = await router.get_latest_order_flow("EUR/USD")  # this router reads its writes
        assert flow is not None
        assert flow.ofi == pytest.approx(2e6)
        assert l1.get_order_flow("EUR/USD") == flow


async def test_processors_see_every_tick(router: DataRouter) -> None:
    sma = IncrementalSMA(3)
    router.register_processor(sma)
    for i, bid in enumerate((1.0, 2.0, 3.0, 4.0)):
        await router.save_tick(q(T0 + i, bid))
    assert router.processors.stats()[sma.name].calls == 4
    router.unregister_processor(sma.name)
    await router.save_tick(q(T0 + 10, 5.0))
    assert sma.name not in router.processors.names


async def test_processors_registered_through_the_registry_run_too(router: DataRouter) -> None:
    sma = IncrementalSMA(3)
    router.processors.register(sma)  # the public registry, not register_processor()
    await router.save_tick(q(T0, 1.0))
    assert router.processors.stats()[sma.name].calls == 1
    router.processors.unregister(sma.name)
    await router.save_tick(q(T0 + 1, 2.0))
    assert router.processors.ticks == 1


async def test_an_abandoned_subscription_is_released(router: DataRouter) -> None:
    # Created and dropped without an ``async for`` (or one never started): it buffered and
    # was offered every tick for the router's lifetime.
    for _ in range(3):
        router.subscribe_ticks(["EUR/USD"])
    gc.collect()
    assert len(router._subs) == 0
    kept = router.subscribe_ticks(["EUR/USD"])
    for i in range(5):  # buffer_size is 3: two dropped
        await router.save_tick(q(T0 + i, 1.1))
    await kept.aclose()
    health = await router.health_check()
    assert health.write_path.details["subscriptions_dropped"] == 2  # kept after it closed
    with pytest.raises(ValidationError, match="symbols is empty"):
        router.subscribe_ticks([])


async def test_subscription_receives_matching_ticks_and_stays_bounded(router: DataRouter) -> None:
    sub = router.subscribe_ticks(["eur_usd"])
    await router.save_tick(q(T0, 1.1))
    await router.save_tick(q(T0, 1.3, symbol="GBP/USD"))
    got = await asyncio.wait_for(anext(sub), 1.0)
    assert got.symbol == "EUR/USD"
    for i in range(10):  # buffer_size is 3: the oldest are dropped and counted
        await router.save_tick(q(T0 + 1 + i, 1.1 + i * 1e-4))
    assert sub.pending == 3
    assert sub.dropped == 7
    last = [await anext(sub) for _ in range(3)]
    assert [t.timestamp for t in last] == [T0 + 8, T0 + 9, T0 + 10]
    await sub.aclose()
    await router.save_tick(q(T0 + 20, 1.2))
    assert sub.pending == 0


async def test_candle_subscription_and_close_ends_iteration(router: DataRouter) -> None:
    sub = router.subscribe_candles("EUR/USD", "1m")
    await router.save_tick(q(T0, 1.1))
    candle = await asyncio.wait_for(anext(sub), 1.0)
    assert (candle.timeframe, candle.is_closed) == ("1m", False)
    await router.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(sub), 1.0)


async def test_forming_bars_are_published_once_per_interval_per_series(tmp_path: Path) -> None:
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "j"
    )
    strategy = strategy_from_mapping(
        {"aggregation": {"timeframes": ["1m", "5m"], "publish_interval_seconds": 60}}
    )
    async with DataRouter(settings=settings, strategy=strategy) as router:
        sub = router.subscribe_candles("EUR/USD", "1m")
        for i in range(20):
            await router.save_tick(q(T0 + i * 1_000, 1.1 + i * 1e-5))
            await asyncio.sleep(0)  # several event-loop passes: none publishes a forming bar
        assert sub.pending == 0
        # This router's own reads materialise the current bar (and publish it, once).
        latest = (await router.get_latest_candles("EUR/USD", "1m", 1))[-1]
        assert (latest.num_trades, latest.is_closed) == (20, False)
        assert sub.pending == 1
        assert (await anext(sub)).num_trades == 20
        # A closed bar goes out at once, with no timer involved.
        await router.save_tick(q(T0 + 60_000, 1.2))
        closed = await asyncio.wait_for(anext(sub), 1.0)
        assert (closed.timestamp, closed.is_closed, closed.num_trades) == (T0, True, 20)
        assert sub.pending == 0


async def test_publish_interval_zero_publishes_every_event_loop_pass(tmp_path: Path) -> None:
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "j"
    )
    strategy = strategy_from_mapping(
        {"aggregation": {"timeframes": ["1m"], "publish_interval_seconds": 0}}
    )
    async with DataRouter(settings=settings, strategy=strategy) as router:
        sub = router.subscribe_candles("EUR/USD", "1m")
        # The series' first tick is aggregated once its restore has run, in a pass of its own.
        await router.save_tick(q(T0, 1.1))
        assert (await asyncio.wait_for(anext(sub), 1.0)).num_trades == 1
        await router.save_tick(q(T0 + 1_000, 1.2))
        await router.save_tick(q(T0 + 2_000, 1.3))  # same pass: one snapshot for both
        bar = await asyncio.wait_for(anext(sub), 1.0)
        assert bar.num_trades == 3
        await router.save_tick(q(T0 + 3_000, 1.4))
        assert (await asyncio.wait_for(anext(sub), 1.0)).num_trades == 4


async def test_explicit_candles_win_over_aggregated_ones_without_a_source(
    router: DataRouter,
) -> None:
    await router.save_tick(q(T0 + 1_000, 1.1000))
    await router.flush()
    assert (await router.get_latest_candles("EUR/USD", "1m", 1))[-1].source == "agg:feed"
    vendor = CandleData(
        symbol="EUR/USD",
        timeframe="1m",
        timestamp=T0 - 60_000,
        open=1.09,
        high=1.095,
        low=1.085,
        close=1.092,
        volume=10,
        source="polygon",
    )
    await router.save_candle(vendor)
    await router.flush()
    # The vendor's series answers although the aggregated one has the newer candle ...
    assert (await router.get_latest_candles("EUR/USD", "1m", 1))[-1].source == "polygon"
    # ... through a fresh read path too (the database's own resolution).
    rows = await router.storage.latest_candles("EUR/USD", "1m", 5)
    assert {c.source for c in rows} == {"polygon"}
    assert (await router.get_latest_candles("EUR/USD", "1m", 1, source="agg:feed"))[
        -1
    ].is_closed is False


async def test_rebuild_equals_live_aggregation(tmp_path: Path) -> None:
    import random

    clock = ManualClock(wall_ms=T0)
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "j"
    )
    strategy = strategy_from_mapping({"aggregation": {"timeframes": ["1m", "5m"]}})
    rng = random.Random(3)
    ts, bid, ticks = T0, 1.1, []
    for _ in range(600):
        ts += rng.randint(100, 2_000)
        bid = round(bid + rng.gauss(0, 0.0002), 5)
        ticks.append(q(ts, bid, last_size=float(rng.randint(1, 9))))
    async with DataRouter(settings=settings, clock=clock, strategy=strategy) as router:
        for t in ticks:
            await router.save_tick(t)
        clock.advance((ts - T0) / 1000 + 600)  # every bucket has ended
        await router.run_maintenance()
        await router.flush()
        live = {
            tf: await router.storage.candles_range("EUR/USD", tf, T0, ts + 1) for tf in ("1m", "5m")
        }
        assert all(c.is_closed for rows in live.values() for c in rows)
        await router.delete_range("EUR/USD", T0, ts + 1, "candles")
        assert await router.storage.candles_range("EUR/USD", "1m", T0, ts + 1) == []
        for tf in ("1m", "5m"):
            written = await router.rebuild_candles("EUR/USD", tf, T0, ts + 1)
            rebuilt = await router.storage.candles_range("EUR/USD", tf, T0, ts + 1)
            assert written == len(live[tf])
            assert rebuilt == live[tf]


async def test_bulk_import_bypasses_the_aggregator_and_rebuild_fills_it(router: DataRouter) -> None:
    await router.save_ticks([q(T0 + i * 1_000, 1.1 + i * 1e-4) for i in range(90)])
    assert await router.storage.candles_range("EUR/USD", "1m", T0, T0 + 120_000) == []
    assert await router.rebuild_candles("EUR/USD", "1m", T0, T0 + 90_000) == 2
    rows = await router.storage.candles_range("EUR/USD", "1m", T0, T0 + 120_000)
    assert [c.num_trades for c in rows] == [60, 30]
    assert rows[0].is_closed is True


async def test_health_reports_staleness_per_symbol_from_l1(tmp_path: Path) -> None:
    clock = ManualClock(wall_ms=T0)
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "j"
    )
    async with DataRouter(settings=settings, clock=clock, strategy=strategy_from_mapping({})) as r:
        await r.save_tick(q(T0 - 500, 1.1))
        report = await r.health_check()
        # The aggregated 1m bucket of that tick ends at T0: fresh; no order flow yet: stale.
        assert report.staleness["EUR/USD"] == {"tick": False, "candle": False, "order_flow": True}
        clock.advance(3.0)  # past the 2 s tick TTL, within the 120 s candle TTL
        report = await r.health_check()
        assert report.staleness["EUR/USD"] == {"tick": True, "candle": False, "order_flow": True}


async def test_health_check_is_not_an_l1_read(tmp_path: Path) -> None:
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "j"
    )
    async with DataRouter(settings=settings, strategy=strategy_from_mapping({})) as r:
        await r.save_tick(q(T0, 1.1))
        await r.save_tick(q(T0, 1.2, symbol="GBP/USD"))
        l1 = r.cache.l1
        assert await r.get_latest_tick("EUR/USD") is not None  # one counted read
        order = l1.symbols()
        before = l1.stats()
        report = await r.health_check()
        assert set(report.staleness) == {"EUR/USD", "GBP/USD"}
        after = l1.stats()
        counted = ("tick_hits", "tick_misses", "candle_hits", "candle_misses")
        counted += ("order_flow_hits", "order_flow_misses")
        assert [getattr(after, n) for n in counted] == [getattr(before, n) for n in counted]
        assert l1.symbols() == order  # nothing moved in the LRU order


def strategy_file(path: Path, aggregation: dict[str, Any]) -> Path:
    text = f"DATA_MANAGER_STRATEGY = {{'aggregation': {aggregation!r}}}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def watching(tmp_path: Path, aggregation: dict[str, Any]) -> DataManagerSettings:
    return DataManagerSettings(
        sqlite_path=str(tmp_path / "db.sqlite3"),
        journal_dir=tmp_path / "journal",
        strategy_file=strategy_file(tmp_path / "strategy.py", aggregation),
        strategy_poll_seconds=3600,
    )


async def close_by_the_idle_timer(router: DataRouter, clock: ManualClock) -> None:
    """Three ticks in the 1m bar of T0, then the idle timer closes it (no grace)."""
    for offset, bid in ((1_000, 1.10), (30_000, 1.12), (50_000, 1.09)):
        await router.save_tick(q(T0 + offset, bid))
    clock.advance(61.0)
    await router.run_maintenance()


async def stored_1m(router: DataRouter) -> CandleData:
    (bar,) = await router.storage.candles_range("EUR/USD", "1m", T0, T0 + 1)
    return bar


@pytest.mark.parametrize(
    ("change", "trades"),
    [
        ({"publish_interval_seconds": 0.5}, 3),  # read live: the aggregator stays
        ({"price": "bid", "late_policy": "drop"}, 3),  # a new aggregator
        ({"late_policy": "rebuild"}, 4),  # the late tick rebuilds the bar from storage
    ],
)
async def test_a_strategy_reload_keeps_closed_bars_closed(
    tmp_path: Path, change: dict[str, Any], trades: int
) -> None:
    base = {"timeframes": ["1m"], "idle_close_grace_seconds": 0}
    clock = ManualClock(wall_ms=T0)
    async with DataRouter(watching(tmp_path, base), clock=clock) as router:
        await close_by_the_idle_timer(router, clock)
        await router.flush()
        before = await stored_1m(router)
        assert before.is_closed
        strategy_file(tmp_path / "strategy.py", {**base, **change})
        assert await router.reload_strategy()
        await router.save_tick(q(T0 + 40_000, 1.50))  # late for the closed bar
        await router.save_tick(q(T0 + 70_000, 1.10))
        await router.flush()
        after = await stored_1m(router)  # not reopened by the late tick alone
        assert (after.open, after.num_trades, after.start_time) == (
            before.open,
            trades,
            before.start_time,
        )


async def test_a_strategy_reload_keeps_the_rebuilds_owed(tmp_path: Path) -> None:
    base = {"timeframes": ["1m"], "late_policy": "rebuild"}
    clock = ManualClock(wall_ms=T0 + 70_000)
    async with DataRouter(watching(tmp_path, base), clock=clock) as router:
        await owe_a_late_rebuild(router)
        strategy_file(tmp_path / "strategy.py", {**base, "timeframes": ["1m", "5m"]})
        assert await router.reload_strategy()
        await router.flush()
        bar = await stored_1m(router)
    assert (bar.num_trades, bar.is_closed) == (2, True)
    assert bar.low == pytest.approx(1.0901)


@pytest.mark.parametrize("back", ["reload", "restart"])
async def test_a_timeframe_removed_and_added_back_continues_its_bar(
    tmp_path: Path, back: str
) -> None:
    both = {"timeframes": ["1m", "5m"]}
    clock = ManualClock(wall_ms=T0)
    async with DataRouter(watching(tmp_path, both), clock=clock) as router:
        await router.save_tick(q(T0 + 1_000, 1.1))
        strategy_file(tmp_path / "strategy.py", {"timeframes": ["1m"]})
        assert await router.reload_strategy()
        await router.save_tick(q(T0 + 2_000, 1.2))  # no 5m bar meanwhile
        if back == "reload":
            strategy_file(tmp_path / "strategy.py", both)
            assert await router.reload_strategy()
            await router.save_tick(q(T0 + 3_000, 1.3))
            await router.flush()
            (bar,) = await router.get_latest_candles("EUR/USD", "5m", 1)
    if back == "restart":
        clock.advance(1.0)
        strategy_file(tmp_path / "strategy.py", both)
        async with DataRouter(watching(tmp_path, both), clock=clock) as router:
            await router.save_tick(q(T0 + 3_000, 1.3))
            await router.flush()
            (bar,) = await router.get_latest_candles("EUR/USD", "5m", 1)
    # The bar goes on from where it stood (the tick saved without 5m is not in it).
    assert (bar.timestamp, bar.is_closed, bar.num_trades) == (T0, False, 2)
    assert (bar.open, bar.close) == pytest.approx((1.1001, 1.3001))


async def test_aggregation_switched_off_and_on_restores_its_bars(tmp_path: Path) -> None:
    base = {"timeframes": ["1m"], "idle_close_grace_seconds": 0}
    clock = ManualClock(wall_ms=T0)
    async with DataRouter(watching(tmp_path, base), clock=clock) as router:
        await close_by_the_idle_timer(router, clock)
        await router.save_tick(q(T0 + 61_000, 1.11))
        await router.flush()
        before = await stored_1m(router)
        for enabled in (False, True):
            strategy_file(tmp_path / "strategy.py", {**base, "enabled": enabled})
            assert await router.reload_strategy()
        await router.save_tick(q(T0 + 40_000, 1.50))  # late for the closed bar
        await router.save_tick(q(T0 + 62_000, 1.12))
        await router.flush()
        assert await stored_1m(router) == before
        (forming,) = await router.get_latest_candles("EUR/USD", "1m", 1)
        assert (forming.timestamp, forming.num_trades) == (T0 + 60_000, 2)


async def test_a_resent_tick_after_a_restart_does_not_reopen_a_closed_bar(
    tmp_path: Path,
) -> None:
    clock = ManualClock(wall_ms=T0)
    strategy = strategy_from_mapping(
        {"aggregation": {"timeframes": ["1m"], "idle_close_grace_seconds": 0}}
    )
    async with DataRouter(on_disk(tmp_path, "a"), clock=clock, strategy=strategy) as first:
        await close_by_the_idle_timer(first, clock)  # the newest stored bar is closed
        await first.flush()
        before = await stored_1m(first)
    assert before.is_closed
    async with DataRouter(on_disk(tmp_path, "b"), clock=clock, strategy=strategy) as second:
        await second.save_tick(q(T0 + 50_000, 1.09))  # the feed resends its last ticks
        await second.save_tick(q(T0 + 61_000, 1.11))
        await second.save_tick(q(T0 + 62_000, 1.12))
        await second.flush()
        assert await stored_1m(second) == before


async def test_a_tick_saved_again_is_counted_once_by_the_derived_data(
    router: DataRouter,
) -> None:
    # An at-least-once feed resends a tick: storage keeps it once, and so must the candles,
    # the order flow and the processors.
    sma = IncrementalSMA(period=10)
    router.register_processor(sma)
    trade = {"last_price": 1.1002, "last_size": 5e5, "aggressor": "buy"}
    first = q(T0 + 1_000, 1.1000, volume=100.0, **trade)
    second = q(T0 + 2_000, 1.2000, volume=300.0, **trade)
    for tick in (first, first, second, q(T0 + 1_000, 1.1000, volume=100.0, **trade)):
        await router.save_tick(tick)
    flow = await router.get_latest_order_flow("EUR/USD")
    assert flow is not None
    assert flow.buy_volume == pytest.approx(1e6)  # two trades, not four
    (bar,) = await router.get_latest_candles("EUR/USD", "1m", 1)
    assert (bar.num_trades, bar.volume) == (2, 400.0)
    assert router.processors.stats()[sma.name].calls == 2
    await router.flush()
    assert len(await router.storage.ticks_range("EUR/USD", T0, T0 + 60_000)) == 2


async def test_a_reload_during_a_recovery_wait_does_not_hold_series_aggregated_here(
    tmp_path: Path,
) -> None:
    # A dead router's journal was adopted (its candles are being rebuilt, new series wait);
    # a reload that adds a timeframe sends the series aggregated here back to restore: they
    # must not wait for a recovery that leaves them alone.
    clock = ManualClock(wall_ms=T0)
    async with DataRouter(watching(tmp_path, {"timeframes": ["1m"]}), clock=clock) as router:
        await router.save_tick(q(T0 + 1_000, 1.1))
        router._on_adopted()
        strategy_file(tmp_path / "strategy.py", {"timeframes": ["1m", "5m"]})
        assert await router.reload_strategy()
        await router.save_tick(q(T0 + 2_000, 1.2))
        (bar,) = await router.get_latest_candles("EUR/USD", "1m", 1)
        assert bar.num_trades == 2
