"""The synchronous facade: works from plain code, from inside a running event loop (as in
Jupyter) and from several threads; streams; stops its thread on close."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest

from data_manager import (
    ConfigurationError,
    DataManagerError,
    DataManagerSettings,
    RouterClosedError,
    TickData,
    ValidationError,
)
from data_manager.strategy import strategy_from_mapping
from data_manager.sync import DataRouter, SyncDataRouter
from tests.unit.test_router_embedded import count_rows, run_python

if TYPE_CHECKING:
    from data_manager.router import DataRouter as AsyncDataRouter

T0: Final = 1_727_996_400_000
SYM: Final = "EUR/USD"
PLAIN: Final = strategy_from_mapping(
    {"aggregation": {"enabled": False}, "order_flow": {"enabled": False}}
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("POSTGRES_", "DRAGONFLY_")) or (
            name.startswith("DATA_MANAGER_") and not name.startswith("DATA_MANAGER_TEST_")
        ):
            monkeypatch.delenv(name)


def settings(tmp_path: Path) -> DataManagerSettings:
    return DataManagerSettings(
        sqlite_path=str(tmp_path / "store.sqlite3"),
        journal_dir=tmp_path / "journal",
        watch_strategy=False,
    )


def tick(i: int) -> TickData:
    return TickData(symbol=SYM, timestamp=T0 + i, bid=1.1, ask=1.1002, source="s", seq=i)


def exercise(router: SyncDataRouter) -> None:
    """The same calls, whatever thread or loop is around."""
    router.save_tick(tick(0), mode="sync")
    assert router.save_ticks(tick(i) for i in range(1, 50)) == 49
    latest = router.get_latest_tick("eurusd")
    assert latest is not None
    assert latest.seq == 49
    assert [t.seq for t in router.get_ticks(SYM, T0, T0 + 10)] == list(range(10))
    assert sum(1 for _ in router.iter_ticks(SYM, T0, T0 + 100, batch_size=7)) == 50
    with pytest.raises(ValidationError, match="timeframe"):
        router.get_latest_candles(SYM, "7m")  # errors cross the thread unchanged
    assert router.health_check().status == "healthy"


def test_plain_script(tmp_path: Path) -> None:
    assert DataRouter is SyncDataRouter
    with SyncDataRouter(settings(tmp_path), strategy=PLAIN) as router:
        thread = router._thread
        assert thread.is_alive()
        exercise(router)
        router.flush()
    assert router.closed
    assert not thread.is_alive()  # close stops the loop thread
    with pytest.raises(RouterClosedError):
        router.get_latest_tick(SYM)
    router.close()  # idempotent


async def test_inside_a_running_event_loop(tmp_path: Path) -> None:
    # Jupyter's situation: this thread runs a loop, and the calls block it without deadlock.
    asyncio.get_running_loop()
    with SyncDataRouter(settings(tmp_path), strategy=PLAIN) as router:
        exercise(router)


def test_from_many_threads(tmp_path: Path) -> None:
    with SyncDataRouter(settings(tmp_path), strategy=PLAIN) as router:

        def work(n: int) -> int:
            router.save_tick(tick(1000 + n), mode="sync")
            got = router.get_latest_tick(SYM)
            assert got is not None
            return n

        with ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(work, range(64))) == list(range(64))
        assert len(router.get_ticks(SYM, T0 + 1000, T0 + 1064)) == 64


def test_stopping_a_stream_early_and_dataframes(tmp_path: Path) -> None:
    with SyncDataRouter(settings(tmp_path), strategy=PLAIN) as router:
        router.save_ticks(tick(i) for i in range(30))
        stream = router.iter_ticks(SYM, T0, T0 + 100, batch_size=4)
        assert [next(stream).seq for _ in range(3)] == [0, 1, 2]
        stream.close()  # closes the async generator on the facade's loop
        for bad in ("4", 0):  # the router's own error, not one from the facade
            with pytest.raises(ValidationError, match="batch_size"):
                next(router.iter_ticks(SYM, T0, T0 + 100, batch_size=bad))  # type: ignore[arg-type]
            with pytest.raises(ValidationError, match="batch_size"):
                next(router.iter_candles(SYM, "1m", T0, T0 + 100, batch_size=bad))  # type: ignore[arg-type]
        pytest.importorskip("pandas")
        df = router.get_ticks_df(SYM, T0, T0 + 100)
        assert len(df) == 30
        assert df["seq"].tolist() == list(range(30))


def test_calling_from_the_facades_own_loop_is_refused(tmp_path: Path) -> None:
    with SyncDataRouter(settings(tmp_path), strategy=PLAIN) as router:

        async def nested(_: AsyncDataRouter) -> str:
            try:
                router.get_latest_tick(SYM)  # would wait on the loop it is blocking
            except DataManagerError as exc:
                return str(exc)
            return "no error"

        assert "own event loop" in router.run(nested)


def test_a_forgotten_facade_closes_itself(tmp_path: Path) -> None:
    router = SyncDataRouter(settings(tmp_path), strategy=PLAIN)
    router.initialize()
    router.save_tick(tick(0))  # buffered: only a close flushes it
    thread, inner = router._thread, router.router
    del router
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()
    assert inner.state.value == "closed"
    with SyncDataRouter(settings(tmp_path), strategy=PLAIN) as again:
        assert [t.seq for t in again.get_ticks(SYM, T0, T0 + 1)] == [0]


def test_close_from_the_facades_own_loop_is_refused(tmp_path: Path) -> None:
    router = SyncDataRouter(settings(tmp_path), strategy=PLAIN)
    router.initialize()

    async def close_inside(_: AsyncDataRouter) -> str:
        try:
            router.close()  # would wait for the loop it is blocking, for ever
        except DataManagerError as exc:
            return str(exc)
        return "no error"

    assert "own event loop" in router.run(close_inside)
    assert not router.closed
    router.save_tick(tick(0))  # still usable
    router.close()
    assert router.closed
    assert not router._thread.is_alive()


def test_a_facade_dropped_on_its_own_loop_closes_itself(tmp_path: Path) -> None:
    router = SyncDataRouter(settings(tmp_path), strategy=PLAIN)
    router.initialize()
    router.save_tick(tick(0))  # buffered: only a close flushes it
    loop, thread, inner = router._loop, router._thread, router.router
    holder = [router]
    del router
    # The last reference goes away on the loop's thread, so the finalizer runs there: it
    # must schedule the close, not wait for it.
    loop.call_soon_threadsafe(holder.clear)
    thread.join(10)
    assert not thread.is_alive()
    assert inner.state.value == "closed"
    assert count_rows(tmp_path / "store.sqlite3") == 1


@pytest.mark.slow  # a subprocess
def test_a_facade_left_open_at_interpreter_exit_closes_cleanly(tmp_path: Path) -> None:
    script = (
        "from data_manager import TickData\n"
        "from data_manager.sync import SyncDataRouter\n"
        "router = SyncDataRouter()\n"
        "router.initialize()\n"
        "for i in range(100):\n"
        f"    router.save_tick(TickData(symbol='EUR/USD', timestamp={T0} + i, bid=1.1,"
        " ask=1.1002, source='s', seq=i))\n"
        "print('saved')\n"  # and no close(): the interpreter's exit closes it
    )
    done = run_python(tmp_path, "-c", script)
    assert "saved" in done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert count_rows(tmp_path / "examples.sqlite3") == 100
    # A journal closed cleanly leaves no instance folder for the next router to adopt.
    assert list((tmp_path / ".data_manager" / "journal").iterdir()) == []


def test_a_failing_constructor_leaves_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_MANAGER_WRITE_MODE", "eventually")
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ConfigurationError, match="write_mode"):
        SyncDataRouter()  # settings read from the environment, on the facade's loop
    leftover = [
        t for t in threading.enumerate() if t.ident not in before and t.name == "data_manager-sync"
    ]
    for t in leftover:
        t.join(5)
    assert not any(t.is_alive() for t in leftover)
