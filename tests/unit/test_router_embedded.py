"""``DataRouter`` on the embedded SQLite store: zero-configuration start, lifecycle, refusal
after close, the unclosed-router warning, write modes, health, the demo and the examples.

Nothing here needs a server. Storage is checked with plain ``sqlite3`` behind the router's
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import io
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest
from rich.console import Console

from data_manager import (
    CandleData,
    ConfigurationError,
    DataManagerSettings,
    DataRouter,
    HealthCheckResponse,
    OrderFlowMetrics,
    RouterClosedError,
    TickData,
    ValidationError,
)
from data_manager.clock import ManualClock
from data_manager.demo import PAIRS, DemoResult, run_demo
from data_manager.health import CacheHealth, PoolHealth
from data_manager.router import RouterState
from data_manager.settings import WriteMode
from data_manager.strategy import RoutingStrategy, strategy_from_mapping
from tests.unit.conftest import WAIT
from tests.unit.test_journal_committer import wait_for_child

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

T0: Final = 1_727_996_400_000
SYM: Final = "EUR/USD"
ROOT: Final = Path(__file__).resolve().parents[2]
SUBPROCESS_TIMEOUT: Final = 120.0

#: Only what a test saves reaches storage: no tick → candle / order-flow derivation.
PLAIN: Final[dict[str, Any]] = {"aggregation": {"enabled": False}, "order_flow": {"enabled": False}}
#: ...and the write-behind batcher never flushes on its own (only flush()/close() store).
HELD: Final[dict[str, Any]] = {
    **PLAIN,
    "batch": {"size": 100_000, "max_batch": 100_000, "flush_interval_seconds": 3600},
}


def strategy(sections: dict[str, Any] = PLAIN) -> RoutingStrategy:
    return strategy_from_mapping(sections)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No configuration leaks in from the machine: the embedded default must apply."""
    for name in list(os.environ):
        if name.startswith(("POSTGRES_", "DRAGONFLY_")) or (
            name.startswith("DATA_MANAGER_") and not name.startswith("DATA_MANAGER_TEST_")
        ):
            monkeypatch.delenv(name)


def tick(ts: int = T0, *, bid: float = 1.09551, source: str = "polygon") -> TickData:
    return TickData(symbol=SYM, timestamp=ts, bid=bid, ask=bid + 0.00002, source=source)


def candle(ts: int = T0, *, close: float = 1.0852) -> CandleData:
    return CandleData(
        symbol=SYM,
        timeframe="1m",
        timestamp=ts,
        open=1.0850,
        high=1.0855,
        low=1.0848,
        close=close,
        volume=15234,
        source="polygon",
    )


def flow(ts: int = T0) -> OrderFlowMetrics:
    return OrderFlowMetrics(symbol=SYM, timestamp=ts, window_ms=60_000, ofi=1.5)


def embedded(tmp_path: Path, name: str = "store.sqlite3", **overrides: Any) -> DataManagerSettings:
    values: dict[str, Any] = {
        "sqlite_path": str(tmp_path / name),
        "watch_strategy": False,
        "journal_dir": tmp_path / "journal",
    }
    values.update(overrides)
    return DataManagerSettings(**values)


def count_rows(path: Path | str, table: str = "ticks") -> int:
    """Rows in ``table``, read through a separate connection (what another process sees)."""
    with contextlib.closing(sqlite3.connect(str(path))) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def journal_bytes(journal_dir: Path) -> int:
    """Bytes in the journal segments under ``journal_dir`` (every instance)."""
    return sum(p.stat().st_size for p in journal_dir.glob("*/*.seg"))


def state_of(router: DataRouter) -> RouterState:
    """``router.state``, un-narrowed for the type checker across awaits."""
    return router.state


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[DataRouter]:
    async with DataRouter(embedded(tmp_path), strategy=strategy()) as opened:
        yield opened


# --------------------------------------------------------------------------- configuration


async def test_no_configuration_means_the_embedded_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="data_manager")
    monkeypatch.chdir(tmp_path)  # relative default paths land here; no ./config either
    async with DataRouter() as router:
        assert router.storage.kind == "sqlite"
        await router.save_tick(tick(), mode="sync")
        health = await router.health_check()
    default_file = tmp_path / ".data_manager" / "data_manager.sqlite3"
    assert default_file.is_file()
    assert count_rows(default_file) == 1
    db = health.databases["sqlite"]
    assert db.embedded is True
    assert db.reachable is True
    assert str(default_file.relative_to(tmp_path)) in db.target
    assert health.cache.l2_configured is False
    assert any("embedded" in r.getMessage() for r in caplog.records), "not said in the log"


async def test_sqlite_path_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "elsewhere" / "md.sqlite3"
    monkeypatch.setenv("DATA_MANAGER_SQLITE_PATH", str(target))
    monkeypatch.setenv("DATA_MANAGER_WRITE_MODE", "sync")
    async with DataRouter(strategy=strategy()) as router:
        assert router.settings.write_mode == "sync"
        await router.save_tick(tick())
        assert count_rows(target) == 1  # sync: stored before save_tick returned
    assert not (tmp_path / ".data_manager" / "data_manager.sqlite3").exists()


async def test_in_memory_stores_are_private(tmp_path: Path) -> None:
    a = DataRouter(embedded(tmp_path, sqlite_path=":memory:"), strategy=strategy())
    b = DataRouter(
        embedded(tmp_path, sqlite_path=":memory:", journal_dir=tmp_path / "j2"),
        strategy=strategy(),
    )
    async with a, b:
        await a.save_ticks([tick()])
        assert len(await a.get_ticks(SYM, T0, T0 + 1)) == 1
        assert await b.get_ticks(SYM, T0, T0 + 1) == []
        assert (await a.health_check()).databases["sqlite"].embedded


async def test_save_ticks_leaves_each_sources_newest_tick_in_l1(tmp_path: Path) -> None:
    async with DataRouter(embedded(tmp_path), strategy=strategy(HELD)) as router:
        await router.save_tick(tick(T0, source="b"))
        await router.save_ticks([tick(T0 + 10, source="b"), tick(T0 + 20, source="a")])
        newest_b = await router.get_latest_tick(SYM, source="b")
        newest = await router.get_latest_tick(SYM)
    assert newest_b is not None
    assert newest_b.timestamp == T0 + 10
    assert newest is not None
    assert (newest.source, newest.timestamp) == ("a", T0 + 20)


async def test_save_ticks_breaks_ties_like_save_tick(tmp_path: Path) -> None:
    # Same feed, same millisecond: the higher seq is the newer, whatever the batch order.
    high = TickData(symbol=SYM, timestamp=T0, bid=1.1, ask=1.1001, source="p", seq=5)
    low = TickData(symbol=SYM, timestamp=T0, bid=1.2, ask=1.2001, source="p", seq=3)
    async with DataRouter(embedded(tmp_path), strategy=strategy(HELD)) as router:
        await router.save_ticks([high, low])
        newest = await router.get_latest_tick(SYM)
    assert newest is not None
    assert newest.seq == 5


@pytest.mark.parametrize("bad", [None, 5, object()])
async def test_bulk_saves_refuse_what_is_not_iterable(tmp_path: Path, bad: Any) -> None:
    async with DataRouter(embedded(tmp_path), strategy=strategy()) as router:
        with pytest.raises(ValidationError, match="expected an iterable of TickData"):
            await router.save_ticks(bad)
        with pytest.raises(ValidationError, match="expected an iterable of CandleData"):
            await router.save_candles_bulk(bad)


# --------------------------------------------------------------------------- lifecycle


async def test_a_close_during_initialize_waits_for_it_then_closes(tmp_path: Path) -> None:
    router = DataRouter(embedded(tmp_path), strategy=strategy(HELD))
    reached, release = asyncio.Event(), asyncio.Event()
    real = router._start_backup_stream

    async def paused() -> None:  # a step of initialize() that awaits
        reached.set()
        await release.wait()
        await real()

    router._start_backup_stream = paused  # type: ignore[method-assign]
    opening = asyncio.create_task(router.initialize())
    await asyncio.wait_for(reached.wait(), WAIT)
    closing = asyncio.create_task(router.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done()  # it waits for initialize() instead of tearing down under it
    release.set()
    await asyncio.wait_for(asyncio.gather(opening, closing), WAIT)
    assert router.state is RouterState.CLOSED
    assert router._storage is None  # what initialize() opened is closed again
    with pytest.raises(RouterClosedError):
        await router.save_tick(tick())


_AGG_1M: Final[dict[str, Any]] = {
    "aggregation": {"timeframes": ["1m"], "publish_interval_seconds": 0},
    "order_flow": {"enabled": False},
    "batch": {"size": 100_000, "max_batch": 100_000, "flush_interval_seconds": 3600},
}


def _fork_router_user(router: DataRouter, go: int, maintenance: bool) -> int:
    """Fork a child that, once told, uses ``router`` (a read), maybe runs maintenance, and
    closes it; the child never saves anything."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        pid = os.fork()
    if pid:
        return pid
    code = 1  # pragma: no cover - the child's exit code is what the parent checks
    try:  # pragma: no cover
        os.read(go, 1)

        async def child() -> None:
            async with asyncio.timeout(WAIT):
                await router.get_latest_tick(SYM)  # first use after the fork: reconnects
                if maintenance:
                    await router.run_maintenance()
                await router.close()

        asyncio.run(child())
        code = 0
    finally:  # pragma: no cover
        os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("maintenance", [False, True], ids=["close", "maintenance"])
async def test_a_forked_child_leaves_the_parents_candles_alone(
    tmp_path: Path, maintenance: bool
) -> None:
    bucket = "SELECT num_trades, high, is_closed FROM candles WHERE timeframe='1m' AND ts=?"
    async with DataRouter(embedded(tmp_path), strategy=strategy(_AGG_1M)) as router:
        await router.save_tick(tick(T0, bid=1.1))
        await router.save_tick(tick(T0 + 1000, bid=1.1))
        await asyncio.sleep(0)  # the publish timer (interval 0) materialises the bar
        go_read, go_write = os.pipe()
        pid = _fork_router_user(router, go_read, maintenance)
        # The parent goes on: a third tick in the bucket (and, with maintenance, one in the
        # next bucket, which closes it).
        await router.save_tick(tick(T0 + 2000, bid=1.3))
        if maintenance:
            await router.save_tick(tick(T0 + 60_000, bid=1.3))
        await router.flush()
        with contextlib.closing(sqlite3.connect(tmp_path / "store.sqlite3")) as db:
            before = db.execute(bucket, (T0,)).fetchall()
        os.write(go_write, b"x")
        assert await asyncio.to_thread(wait_for_child, pid) == 0
        with contextlib.closing(sqlite3.connect(tmp_path / "store.sqlite3")) as db:
            after = db.execute(bucket, (T0,)).fetchall()
    assert before[0][0] == 3
    assert after == before  # the child wrote none of its inherited, older bars


async def test_lifecycle(tmp_path: Path) -> None:
    router = DataRouter(embedded(tmp_path), strategy=strategy())
    assert state_of(router) is RouterState.UNOPENED
    await router.initialize()
    assert state_of(router) is RouterState.OPEN
    storage = router.storage
    await router.initialize()  # harmless: nothing rebuilt
    assert router.storage is storage
    await router.save_tick(tick())
    await router.close()
    assert router.state is RouterState.CLOSED
    await router.close()  # harmless
    assert count_rows(tmp_path / "store.sqlite3") == 1  # close flushed the queue
    with pytest.raises(RouterClosedError):
        await router.initialize()  # a closed router is not reopened
    async with DataRouter(embedded(tmp_path), strategy=strategy()) as again:
        assert state_of(again) is RouterState.OPEN
        got = await again.get_latest_tick(SYM)
        assert got is not None
        assert got.timestamp == T0
    assert state_of(again) is RouterState.CLOSED


async def test_a_failed_initialize_stops_the_write_path_and_unlocks_its_journal(
    tmp_path: Path,
) -> None:
    with socket.socket() as busy:  # the metrics port is taken: initialize() fails last
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        router = DataRouter(
            embedded(tmp_path, metrics_port=port, metrics_addr="127.0.0.1"), strategy=strategy()
        )
        with pytest.raises(ConfigurationError, match="cannot serve metrics"):
            await router.initialize()
    names = [task.get_name() for task in asyncio.all_tasks()]
    assert "data_manager-ingest-writer" not in names
    # Its journal was closed (empty: removed), not left locked by a live writer.
    assert not (tmp_path / "journal" / router.instance_id).exists()


#: Several concurrent initialize() calls on one router, in a child process so that whatever
#: a failed initialisation leaks dies with it. Prints a JSON summary as its last line.
CONCURRENT_INITIALIZE: Final = """
import asyncio, json, sys
from data_manager import DataManagerSettings, DataRouter, TickData
from data_manager.strategy import strategy_from_mapping

async def main(path: str, journal: str) -> dict[str, object]:
    router = DataRouter(
        DataManagerSettings(sqlite_path=path, watch_strategy=False, journal_dir=journal),
        strategy=strategy_from_mapping(
            {"aggregation": {"enabled": False}, "order_flow": {"enabled": False}}
        ),
    )
    async with asyncio.timeout(20):
        results = await asyncio.gather(
            *(router.initialize() for _ in range(3)), return_exceptions=True
        )
    out: dict[str, object] = {
        "errors": [repr(r) for r in results if r is not None],
        "state": router.state.value,
    }
    del results
    quote = dict(symbol="EUR/USD", bid=1.1, ask=1.1002, source="polygon")
    try:
        async with asyncio.timeout(10):
            await router.save_tick(TickData(timestamp=1727996400000, **quote), mode="sync")
            await router.save_tick(TickData(timestamp=1727996400001, **quote))
            await router.flush()
        out["writes"] = "ok"
    except Exception as exc:
        out["writes"] = repr(exc)
    try:
        async with asyncio.timeout(10):
            await router.close()
    except Exception as exc:
        out["close"] = repr(exc)
    return out

print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
"""


def test_concurrent_initialize_opens_the_router_once(tmp_path: Path) -> None:
    # Lazy start from several request handlers at once: all of them must end up with one
    # working router, not a second initialisation tearing down the first one's storage.
    path = tmp_path / "store.sqlite3"
    done = run_python(tmp_path, "-c", CONCURRENT_INITIALIZE, str(path), str(tmp_path / "j"))
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"errors": [], "state": "open", "writes": "ok"}
    assert count_rows(path) == 2


async def test_async_with_closes_on_error(tmp_path: Path) -> None:
    router = DataRouter(embedded(tmp_path), strategy=strategy())

    async def use() -> None:
        async with router:
            await router.save_tick(tick())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await use()
    assert router.state is RouterState.CLOSED
    assert count_rows(tmp_path / "store.sqlite3") == 1


def public_calls(router: DataRouter) -> dict[str, Callable[[], Awaitable[object]]]:
    """One call of every public method (except the lifecycle ones) with valid arguments."""

    async def sync(fn: Callable[[], object]) -> object:
        return fn()

    return {
        "save_tick": lambda: router.save_tick(tick()),
        "save_candle": lambda: router.save_candle(candle()),
        "save_order_flow": lambda: router.save_order_flow(flow()),
        "save_ticks": lambda: router.save_ticks([tick()]),
        "save_candles_bulk": lambda: router.save_candles_bulk([candle()]),
        "flush": router.flush,
        "get_latest_tick": lambda: router.get_latest_tick(SYM),
        "get_latest_candles": lambda: router.get_latest_candles(SYM, "1m", 10),
        "get_latest_order_flow": lambda: router.get_latest_order_flow(SYM),
        "get_ticks": lambda: router.get_ticks(SYM, T0, T0 + 1),
        "get_candles": lambda: router.get_candles(SYM, "1m", T0, T0 + 1),
        "iter_ticks": lambda: anext(router.iter_ticks(SYM, T0, T0 + 1)),
        "iter_candles": lambda: anext(router.iter_candles(SYM, "1m", T0, T0 + 1)),
        "get_candles_df": lambda: router.get_candles_df(SYM, "1m", T0, T0 + 1),
        "get_ticks_df": lambda: router.get_ticks_df(SYM, T0, T0 + 1),
        "delete_range": lambda: router.delete_range(SYM, T0, T0 + 1, "ticks"),
        "apply_retention": lambda: router.apply_retention(dry_run=True),
        "rebuild_candles": lambda: router.rebuild_candles(SYM, "1m", T0, T0 + 1),
        "check_staleness": lambda: router.check_staleness(SYM),
        "warm_start": lambda: router.warm_start([SYM], ["1m"]),
        "health_check": router.health_check,
        "run_maintenance": router.run_maintenance,
        "reload_strategy": router.reload_strategy,
        "subscribe_ticks": lambda: sync(lambda: router.subscribe_ticks([SYM])),
        "subscribe_candles": lambda: sync(lambda: router.subscribe_candles(SYM, "1m")),
        "storage": lambda: sync(lambda: router.storage),
    }


#: Public names that may be used on a router that is not open: the lifecycle itself, and
#: configuration that is naturally done before initialize().
NOT_REFUSED: Final = frozenset(
    {"initialize", "close", "state", "strategy", "processors", "cache", "pool_manager"}
    | {"register_processor", "unregister_processor", "settings", "instance_id", "metrics"}
)


def test_the_refusal_table_covers_every_public_method(tmp_path: Path) -> None:
    router = DataRouter(embedded(tmp_path), strategy=strategy())
    names = {n for n, _ in inspect.getmembers(DataRouter) if not n.startswith("_")}
    missing = names - set(public_calls(router)) - NOT_REFUSED
    assert missing == set(), f"add these to public_calls(): {sorted(missing)}"


@pytest.mark.parametrize("state", ["never opened", "closed"])
async def test_a_router_that_is_not_open_refuses_every_call(tmp_path: Path, state: str) -> None:
    router = DataRouter(embedded(tmp_path), strategy=strategy())
    if state == "closed":
        await router.initialize()
        await router.close()
    refused: list[str] = []
    for name, call in public_calls(router).items():
        try:
            await call()
        except RouterClosedError:
            refused.append(name)
    assert refused == list(public_calls(router)), "these did not raise RouterClosedError"
    assert router.state is not RouterState.OPEN
    await router.close()


def reads_with(
    router: DataRouter, *, source: Any = None, timeframe: Any = "1m"
) -> dict[str, Callable[[], Awaitable[object]]]:
    """One call of every public method that takes a ``source`` or a ``timeframe``."""

    async def sync(fn: Callable[[], object]) -> object:
        return fn()

    return {
        "get_latest_tick": lambda: router.get_latest_tick(SYM, source=source),
        "get_latest_candles": lambda: router.get_latest_candles(SYM, timeframe, source=source),
        "get_latest_order_flow": lambda: router.get_latest_order_flow(SYM, source=source),
        "get_ticks": lambda: router.get_ticks(SYM, T0, T0 + 1, source=source),
        "get_candles": lambda: router.get_candles(SYM, timeframe, T0, T0 + 1, source=source),
        "iter_ticks": lambda: anext(router.iter_ticks(SYM, T0, T0 + 1, source=source)),
        "iter_candles": lambda: anext(
            router.iter_candles(SYM, timeframe, T0, T0 + 1, source=source)
        ),
        "get_candles_df": lambda: router.get_candles_df(SYM, timeframe, T0, T0 + 1, source=source),
        "get_ticks_df": lambda: router.get_ticks_df(SYM, T0, T0 + 1, source=source),
        "rebuild_candles": lambda: router.rebuild_candles(
            SYM, timeframe, T0, T0 + 1, source=source
        ),
        "check_staleness": lambda: router.check_staleness(SYM, timeframe=timeframe, source=source),
        "subscribe_candles": lambda: sync(
            lambda: router.subscribe_candles(SYM, timeframe, source=source)
        ),
        "delete_range": lambda: router.delete_range(
            SYM, T0, T0 + 1, "candles", timeframe=timeframe
        ),
        "warm_start": lambda: router.warm_start([SYM], [timeframe]),
    }


def test_the_bad_input_table_covers_every_method_taking_a_source_or_timeframe(
    tmp_path: Path,
) -> None:
    router = DataRouter(embedded(tmp_path), strategy=strategy())
    names = {
        name
        for name, member in inspect.getmembers(DataRouter, inspect.isfunction)
        if not name.startswith("_")
        and {"source", "timeframe", "timeframes"} & set(inspect.signature(member).parameters)
    }
    assert names == set(reads_with(router)), "update reads_with()"


def taking(calls: dict[str, Callable[[], Awaitable[object]]], *params: str) -> dict[str, Any]:
    """The calls of ``calls`` whose method has one of ``params``."""
    return {
        name: call
        for name, call in calls.items()
        if set(params) & set(inspect.signature(getattr(DataRouter, name)).parameters)
    }


async def not_refused(calls: dict[str, Callable[[], Awaitable[object]]], field: str) -> list[str]:
    """The calls that did not raise a ValidationError about ``field``, with what they did."""
    wrong: list[str] = []
    for name, call in calls.items():
        try:
            await call()
        except ValidationError as exc:
            if field not in str(exc):
                wrong.append(f"{name}: {exc!r}")
        except Exception as exc:  # any other error is the finding
            wrong.append(f"{name}: {exc!r}")
        else:
            wrong.append(f"{name}: no error")
    return wrong


@pytest.mark.parametrize(
    "source", [123, b"polygon", "", "  ", "a\x00b", "x" * 65, "\ud800"], ids=repr
)
async def test_a_bad_source_is_a_validation_error_on_every_read(
    router: DataRouter, source: object
) -> None:
    assert await not_refused(taking(reads_with(router, source=source), "source"), "source") == []


@pytest.mark.parametrize("timeframe", [["1m"], 60, "2m"], ids=repr)
async def test_a_bad_timeframe_is_a_validation_error_on_every_read(
    router: DataRouter, timeframe: object
) -> None:
    calls = taking(reads_with(router, timeframe=timeframe), "timeframe", "timeframes")
    assert await not_refused(calls, "timeframe") == []


@pytest.mark.parametrize("limit", ["5", 1.5, 0, -1, True, 2**63, None], ids=repr)
async def test_a_bad_limit_is_a_validation_error_on_every_read(
    router: DataRouter, limit: Any
) -> None:
    limits: dict[str, Callable[[], Awaitable[object]]] = {
        "get_latest_candles": lambda: router.get_latest_candles(SYM, "1m", limit),
        "warm_start": lambda: router.warm_start([SYM], ["1m"], limit),
    }
    if limit is not None:  # get_ticks takes None: no limit
        limits["get_ticks"] = lambda: router.get_ticks(SYM, T0, T0 + 1, limit=limit)
    assert await not_refused(limits, "limit") == []
    batch = {"iter_ticks": lambda: anext(router.iter_ticks(SYM, T0, T0 + 1, batch_size=limit))}
    assert await not_refused(batch, "batch_size") == []


async def test_the_largest_limit_is_served(router: DataRouter) -> None:
    await router.save_tick(tick(), mode="sync")
    largest = 2**63 - 1
    assert len(await router.get_ticks(SYM, T0, T0 + 1, limit=largest)) == 1
    assert await router.get_latest_candles(SYM, "1m", largest) == []
    assert await router.warm_start([SYM], ["1m"], largest) == 1


@pytest.mark.parametrize("argument", ["symbols", "timeframes"])
async def test_warm_start_refuses_a_lone_string(router: DataRouter, argument: str) -> None:
    symbols: Any = SYM if argument == "symbols" else [SYM]
    timeframes: Any = "1m" if argument == "timeframes" else ["1m"]
    with pytest.raises(ValidationError, match=f"{argument} must be a list"):
        await router.warm_start(symbols, timeframes)


async def test_a_read_source_is_trimmed_as_a_saved_one_is(router: DataRouter) -> None:
    await router.save_tick(tick(source=" polygon "), mode="sync")  # stored as "polygon"
    got = await router.get_latest_tick(SYM, source=" polygon ")
    assert got is not None
    assert got.source == "polygon"
    assert await router.get_ticks(SYM, T0, T0 + 1, source="polygon ") == [got]


async def test_unclosed_router_warns_when_collected(tmp_path: Path) -> None:
    box = [DataRouter(embedded(tmp_path, sqlite_path=":memory:"), strategy=strategy())]
    await box[0].initialize()
    ref = weakref.ref(box[0])
    # Kept so the test can release what the forgotten router held once it is gone.
    parts = [box[0]._ingest, box[0]._storage]

    def forget() -> None:
        box.clear()  # the last reference
        gc.collect()

    try:
        with pytest.warns(ResourceWarning, match="unclosed DataRouter"):
            forget()
    finally:
        leftover = ref()
        if leftover is not None:
            await leftover.close()
        else:
            ingest, storage = parts
            if ingest is not None:
                await ingest.close()
            if storage is not None:
                await storage.close()
    assert ref() is None


async def test_closed_router_does_not_warn(tmp_path: Path) -> None:
    router = DataRouter(embedded(tmp_path, sqlite_path=":memory:"), strategy=strategy())
    async with router:
        pass
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del router
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


# --------------------------------------------------------------------------- write modes


async def test_buffered_mode_stores_on_flush(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    settings = embedded(tmp_path, write_mode="buffered")
    async with DataRouter(settings, strategy=strategy(HELD)) as router:
        for i in range(300):
            await router.save_tick(tick(T0 + i))
        assert count_rows(path) == 0  # accepted, queued, not yet stored
        latest = await router.get_latest_tick(SYM)  # ...but readable from L1 at once
        assert latest is not None
        assert latest.timestamp == T0 + 299
        await router.flush()
        assert count_rows(path) == 300


@pytest.mark.parametrize("journal_sync", ["thread", "loop", "aio"])
async def test_journal_mode_acknowledges_after_the_journal(
    tmp_path: Path, journal_sync: str
) -> None:
    path = tmp_path / "store.sqlite3"
    journal = tmp_path / "journal"
    settings = embedded(tmp_path, write_mode="journal", journal_sync=journal_sync)
    async with DataRouter(settings, strategy=strategy(HELD)) as router:
        name = f"journal-commit-{router.instance_id}"
        committers = [t for t in threading.enumerate() if t.name == name]
        assert len(committers) == (1 if journal_sync == "thread" else 0)
        for i in range(50):
            await router.save_tick(tick(T0 + i))
        assert journal_bytes(journal) > 50 * 40  # every record is on disk...
        assert count_rows(path) == 0  # ...and not yet in the database
        health = await router.health_check()
        assert health.write_path.journal_records == 50
        await router.flush()
        assert count_rows(path) == 50
        assert (await router.health_check()).write_path.journal_records == 0


async def test_sync_mode_is_stored_when_the_call_returns(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    async with DataRouter(embedded(tmp_path, write_mode="sync"), strategy=strategy(HELD)) as router:
        await router.save_tick(tick())
        assert count_rows(path) == 1
        await router.save_candle(candle())
        assert count_rows(path, "candles") == 1
        await router.save_order_flow(flow())
        assert count_rows(path, "order_flow") == 1


async def test_per_call_mode_overrides_the_default(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    async with DataRouter(
        embedded(tmp_path, write_mode="buffered"), strategy=strategy(HELD)
    ) as router:
        await router.save_tick(tick(T0), mode="sync")
        assert count_rows(path) == 1
        await router.save_tick(tick(T0 + 1))
        await router.save_tick(tick(T0 + 2), mode="journal")
        assert count_rows(path) == 1
        assert journal_bytes(tmp_path / "journal") > 0
        await router.flush()
        assert count_rows(path) == 3
    async with DataRouter(
        embedded(tmp_path, write_mode="sync", journal_dir=tmp_path / "j2"),
        strategy=strategy(HELD),
    ) as router:
        await router.save_tick(tick(T0 + 3), mode="buffered")
        assert count_rows(path) == 3
        await router.flush()
        assert count_rows(path) == 4


async def test_unknown_write_mode_is_refused_and_nothing_is_written(router: DataRouter) -> None:
    with pytest.raises(ValidationError, match="fast"):
        await router.save_tick(tick(), mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await router.save_candle(candle(), mode="SYNC")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await router.save_order_flow(flow(), mode="")  # type: ignore[arg-type]
    assert await router.get_latest_tick(SYM) is None
    await router.flush()
    assert await router.get_ticks(SYM, T0, T0 + 1) == []
    assert await router.get_latest_candles(SYM, "1m", 1) == []
    with pytest.raises(ConfigurationError, match="write_mode"):
        DataManagerSettings(write_mode="fast")


async def test_flush_covers_every_kind(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    async with DataRouter(embedded(tmp_path), strategy=strategy(HELD)) as router:
        await router.save_tick(tick())
        await router.save_candle(candle())
        await router.save_order_flow(flow())
        await router.flush()
        assert [count_rows(path, t) for t in ("ticks", "candles", "order_flow")] == [1, 1, 1]


async def test_close_stores_what_was_queued(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    router = DataRouter(embedded(tmp_path), strategy=strategy(HELD))
    await router.initialize()
    for i in range(200):
        await router.save_tick(tick(T0 + i))
    assert count_rows(path) == 0
    await router.close(timeout=30)
    assert count_rows(path) == 200
    assert journal_bytes(tmp_path / "journal") == 0


@pytest.mark.parametrize("mode", ["buffered", "journal"])
async def test_a_bulk_candle_is_not_overwritten_by_an_older_queued_one(
    tmp_path: Path, mode: WriteMode
) -> None:
    async with DataRouter(embedded(tmp_path), strategy=strategy(HELD)) as router:
        await router.save_candle(candle(close=1.0852), mode=mode)  # queued, not yet stored
        assert await router.save_candles_bulk([candle(close=1.0854)]) == 1
        await router.flush()
        stored = await router.storage.candles_range(SYM, "1m", T0, T0 + 60_000)
    assert [c.close for c in stored] == [1.0854]


# --------------------------------------------------------------------------- health


async def test_health_on_the_embedded_store(router: DataRouter) -> None:
    await router.save_tick(tick())
    await router.get_latest_tick(SYM)
    health = await router.health_check()
    assert isinstance(health, HealthCheckResponse)
    assert health.status == "healthy", health.reason
    assert set(health.databases) == {"sqlite"}
    db = health.databases["sqlite"]
    assert (db.kind, db.embedded, db.reachable) == ("sqlite", True, True)
    assert "store.sqlite3" in db.target
    assert set(health.connection_pools) == {"sqlite"}
    assert isinstance(health.connection_pools["sqlite"], PoolHealth)
    assert health.cache.l2_configured is False
    assert health.cache.l1.hits >= 1
    assert health.write_path.default_mode == router.settings.write_mode
    assert HealthCheckResponse.model_validate_json(health.model_dump_json()) == health

    stats = await router.cache.get_stats()
    assert isinstance(stats, CacheHealth)
    assert stats.l1.hits >= 1
    assert stats.l1_entries >= 1
    pools = await router.pool_manager.health_check_all()
    assert set(pools) == {"sqlite"}
    assert pools["sqlite"].max_size >= 1


# --------------------------------------------------------------------------- demo & examples


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSTGRES_", "DRAGONFLY_", "DATA_MANAGER_"))
    }
    env["DATA_MANAGER_SQLITE_PATH"] = str(tmp_path / "examples.sqlite3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"  # rich wraps lines at the terminal width
    return env


def run_python(tmp_path: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` in ``tmp_path`` on the embedded default; check the exit code."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def example(name: str) -> str:
    return str(ROOT / "examples" / name)


async def test_run_demo_builds_candles_for_every_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default journal folder is relative
    out = io.StringIO()
    result = await run_demo(
        n_ticks=2000,
        settings=DataManagerSettings(sqlite_path=str(tmp_path / "d.sqlite3"), watch_strategy=False),
        console=Console(file=out, width=200),
    )
    assert isinstance(result, DemoResult)
    assert result.ticks == 2000
    assert len(result.save_latencies_us) == 2000
    assert set(result.candles_1m) == {sym for sym, *_ in PAIRS}
    assert all(n >= 1 for n in result.candles_1m.values()), result.candles_1m
    assert "d.sqlite3" in result.storage
    assert count_rows(tmp_path / "d.sqlite3") == 2000
    assert count_rows(tmp_path / "d.sqlite3", "candles") >= len(PAIRS)
    assert "ingested 2,000 ticks" in out.getvalue()


def test_demo_command_runs_on_a_bare_machine(tmp_path: Path) -> None:
    done = run_python(tmp_path, "-m", "data_manager", "demo", "--ticks", "2000")
    assert "ingested 2,000 ticks" in done.stdout
    assert "health: healthy" in done.stdout
    assert count_rows(tmp_path / "examples.sqlite3") == 2000


def test_example_polygon_collector(tmp_path: Path) -> None:
    done = run_python(tmp_path, example("polygon_collector.py"))
    found = re.search(r"EUR/USD latest: bid=(\S+) ask=(\S+) mid=(\S+)", done.stdout)
    assert found is not None, done.stdout
    bid, ask, mid = (float(x) for x in found.groups())
    assert (bid, ask, mid) == pytest.approx((1.09560, 1.09562, 1.09561))  # the 10th quote
    assert count_rows(tmp_path / "examples.sqlite3") == 10


def test_example_trading_engine(tmp_path: Path) -> None:
    done = run_python(tmp_path, example("trading_engine.py"))
    assert "tick mid=1.08550; 5 hourly candles, last close 1.0855" in done.stdout


@pytest.mark.slow  # two runs of a subprocess
def test_example_bulk_historical_import_is_idempotent(tmp_path: Path) -> None:
    first = run_python(tmp_path, example("bulk_historical_import.py"))
    assert "Imported 2000 candles (2000 rows written)" in first.stdout
    # Its docstring: "Re-running it stores nothing new".
    second = run_python(tmp_path, example("bulk_historical_import.py"))
    assert "Imported 2000 candles (0 rows written)" in second.stdout
    assert count_rows(tmp_path / "examples.sqlite3", "candles") == 2000


def test_example_collector(tmp_path: Path) -> None:
    done = run_python(tmp_path, example("collector.py"), "--ticks", "2000")
    assert "collector → sqlite" in done.stdout
    assert "saved 2,000 ticks" in done.stdout
    for symbol in ("EUR/USD", "GBP/USD", "USD/JPY"):
        assert re.search(rf"{symbol}: bid [\d.]+ ask [\d.]+", done.stdout), done.stdout
    assert count_rows(tmp_path / "examples.sqlite3") == 2000  # flushed before exit


@pytest.mark.slow  # two runs of a subprocess
def test_example_engine_seeds_a_fresh_store_once(tmp_path: Path) -> None:
    signal = r"{}: 20 candles \(engine-example\), SMA5 [\d.]+ vs SMA20 [\d.]+ → (long|short|flat)"
    first = run_python(tmp_path, example("engine.py"))
    assert "engine ← sqlite" in first.stdout
    for symbol in ("EUR/USD", "GBP/USD", "USD/JPY"):
        assert f"{symbol}: only 0 candles; seeded 30 sample 1m candles" in first.stdout
        assert re.search(signal.format(symbol), first.stdout), first.stdout
    second = run_python(tmp_path, example("engine.py"))
    assert "seeded" not in second.stdout  # enough candles now: it only reads
    for symbol in ("EUR/USD", "GBP/USD", "USD/JPY"):
        assert re.search(signal.format(symbol), second.stdout), second.stdout
    assert count_rows(tmp_path / "examples.sqlite3", "candles") == 90


@pytest.mark.slow  # two runs of a subprocess
def test_example_health_probe(tmp_path: Path) -> None:
    done = run_python(tmp_path, example("health_probe.py"))
    assert done.stdout.startswith("healthy:"), done.stdout
    assert "reachable=True" in done.stdout
    as_json = run_python(tmp_path, example("health_probe.py"), "--json")
    report = HealthCheckResponse.model_validate_json(as_json.stdout)
    assert report.status == "healthy"
    assert report.databases["sqlite"].embedded is True


def test_example_multiprocess_demo_explains_what_it_needs(tmp_path: Path) -> None:
    # Its docstring: without POSTGRES_HOST and DRAGONFLY_HOST it says so and exits with 2.
    done = run_python(tmp_path, example("multiprocess_demo.py"), expect=2)
    said = done.stdout + done.stderr
    assert "POSTGRES_HOST" in said
    assert "DRAGONFLY_HOST" in said


def test_example_bulk_import_reports_rejects_and_is_idempotent(tmp_path: Path) -> None:
    done = run_python(tmp_path, example("bulk_import.py"), "--rows", "1000")
    assert "1,000 rows: 997 accepted, 3 rejected, 997 stored" in done.stdout
    for line in (12, 22, 32):  # the three rows its docstring says are broken
        assert f"(lines [{line}])" in done.stdout
    assert "imported again: 0 rows changed" in done.stdout
    assert re.search(r"first week(?: as a DataFrame)?: 16[58] (rows|candles)", done.stdout)
    assert count_rows(tmp_path / "examples.sqlite3", "candles") == 997


#: Every script in examples/ and the test that runs it.
EXAMPLES: Final = {
    "polygon_collector.py": test_example_polygon_collector,
    "trading_engine.py": test_example_trading_engine,
    "bulk_historical_import.py": test_example_bulk_historical_import_is_idempotent,
    "collector.py": test_example_collector,
    "engine.py": test_example_engine_seeds_a_fresh_store_once,
    "health_probe.py": test_example_health_probe,
    "multiprocess_demo.py": test_example_multiprocess_demo_explains_what_it_needs,
    "bulk_import.py": test_example_bulk_import_reports_rejects_and_is_idempotent,
}


def test_every_example_is_covered() -> None:
    scripts = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert scripts == set(EXAMPLES), "add a test for each new example to EXAMPLES"


async def test_subscribe_ticks_refuses_a_lone_string(router: DataRouter) -> None:
    with pytest.raises(ValidationError, match="symbols must be a list"):
        router.subscribe_ticks(SYM)  # not the symbols "E", "U", "R", ...


async def test_iter_ticks_bounds_its_batch_size(router: DataRouter) -> None:
    with pytest.raises(ValidationError, match="batch_size must be at most 1,000,000"):
        await anext(router.iter_ticks(SYM, T0, T0 + 1, batch_size=2**31))


async def test_staleness_of_a_tick_source_counts_what_the_router_derives_from_it(
    tmp_path: Path,
) -> None:
    # The candles aggregated from a source's ticks are "agg:<source>"; the order flow the
    # router computes is its own ("sdk"), across sources.
    clock = ManualClock(wall_ms=T0 + 30_000)
    derived = strategy({"aggregation": {"timeframes": ["1m"]}})
    async with DataRouter(embedded(tmp_path), strategy=derived, clock=clock) as router:
        for ts, bid in ((T0 + 29_000, 1.09551), (T0 + 29_500, 1.09561)):  # two books: a flow
            book = tick(ts, bid=bid).model_dump() | {"bid_size": 1e6, "ask_size": 2e6}
            await router.save_tick(TickData(**book))
        report = await router.check_staleness(SYM, source="polygon")
        assert dict(report) == {"tick": False, "candle": False, "order_flow": False}
        assert dict(await router.check_staleness(SYM, source="other")) == {
            "tick": True,
            "candle": True,
            "order_flow": False,  # the symbol's order flow: the router computes one for all
        }
