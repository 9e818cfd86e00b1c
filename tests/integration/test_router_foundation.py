"""``DataRouter`` as its users see it: configuration, lifecycle, the seed 004 quick start on
every backend, unreachable and newer databases, timeouts, and health without secrets.

The contract suite (``backend`` fixture) runs the same calls on the embedded SQLite store,
on PostgreSQL, and on PostgreSQL with the Redis-protocol L2 cache, and checks storage with
direct SQL behind the router's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit

import asyncpg
import psutil
import pytest
import pytest_asyncio

from data_manager import (
    CandleData,
    ConfigurationError,
    ConnectionPoolExhaustedError,
    DatabaseConnectionError,
    DataManagerSettings,
    DataRouter,
    DragonflySettings,
    HealthCheckResponse,
    PostgresSettings,
    QueryTimeoutError,
    RouterClosedError,
    TickData,
    ValidationError,
)
from data_manager.health import CacheHealth, PoolHealth
from data_manager.router import RouterState
from data_manager.storage.base import SCHEMA_VERSION
from data_manager.strategy import RoutingStrategy, strategy_from_mapping
from tests.servers import free_port

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator

    from tests.servers import PostgresServer

T0: Final = 1_727_996_400_000  # seed 004's timestamp, 2024-10-03T23:00:00Z
MINUTE: Final = 60_000
SYM: Final = "EUR/USD"
SECRET: Final = "pw-must-never-leak-5d1e"
ROOT: Final = Path(__file__).resolve().parents[2]
#: Upper bound for anything that must "not hang"; generous, so a slow machine passes.
DEADLINE: Final = 15.0

#: Only what the test saves reaches storage: no tick → candle / order-flow derivation.
PLAIN: Final = {"aggregation": {"enabled": False}, "order_flow": {"enabled": False}}


def plain_strategy(**sections: dict[str, Any]) -> RoutingStrategy:
    return strategy_from_mapping({**PLAIN, **sections})


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No configuration leaks in from the machine: explicit settings say everything."""
    for name in list(os.environ):
        if name.startswith(("POSTGRES_", "DRAGONFLY_")) or (
            name.startswith("DATA_MANAGER_") and not name.startswith("DATA_MANAGER_TEST_")
        ):
            monkeypatch.delenv(name)


def tick(ts: int, *, source: str = "polygon", bid: float = 1.09551, symbol: str = SYM) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.00002, source=source)


def candle(ts: int, *, source: str = "polygon", close: float = 1.0852) -> CandleData:
    return CandleData(
        symbol=SYM,
        timeframe="1m",
        timestamp=ts,
        open=close,
        high=close + 0.001,
        low=close - 0.001,
        close=close,
        volume=100.0,
        source=source,
    )


async def pg_fetchval(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(sql, *args, timeout=10)
    finally:
        await conn.close(timeout=10)


async def app_connections(url: str, application_name: str) -> int:
    """Server-side sessions opened under ``application_name`` (ours, not the side door's)."""
    n = await pg_fetchval(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
        application_name,
    )
    return int(n)


async def wait_until(
    probe: Callable[[], Awaitable[Any]], expected: Any, what: str, within: float = 5.0
) -> None:
    """Poll ``probe`` until it returns ``expected``: a server notices closed sockets
    asynchronously, so its view lags the client's by a few milliseconds."""
    deadline = time.monotonic() + within
    while (got := await probe()) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}: {got!r} != {expected!r}")
        await asyncio.sleep(0.02)


def pg_settings(url: str, schema: str, **overrides: Any) -> PostgresSettings:
    return PostgresSettings(url=url, db_schema=schema, pool_min=1, pool_max=4, **overrides)


def state_of(router: DataRouter) -> RouterState:
    """``router.state``, un-narrowed for the type checker across awaits."""
    return router.state


def secrets_in(records: list[logging.LogRecord]) -> list[str]:
    """Formatted log lines (tracebacks included) that contain SECRET."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [line for r in records if SECRET in (line := formatter.format(r))]


def exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """Where a contract test's routers store, plus a side door for checks."""

    name: str
    journal_dir: Path
    sqlite_path: Path | None = None
    postgres_url: str | None = None
    pg_schema: str | None = None
    redis_url: str | None = None
    redis_prefix: str | None = None

    def settings(self, **overrides: Any) -> DataManagerSettings:
        values: dict[str, Any] = {"watch_strategy": False, "journal_dir": self.journal_dir}
        if self.postgres_url is not None and self.pg_schema is not None:
            values["postgres"] = pg_settings(self.postgres_url, self.pg_schema)
        else:
            values["sqlite_path"] = str(self.sqlite_path)
        if self.redis_url is not None and self.redis_prefix is not None:
            values["dragonfly"] = DragonflySettings(
                url=self.redis_url, key_prefix=self.redis_prefix
            )
        values.update(overrides)
        return DataManagerSettings(**values)

    async def count(self, table: str, where: str = "") -> int:
        """Rows of ``table`` in storage, counted with plain SQL."""
        clause = f" WHERE {where}" if where else ""
        if self.postgres_url is not None:
            n = await pg_fetchval(
                self.postgres_url, f'SELECT count(*) FROM "{self.pg_schema}".{table}{clause}'
            )
            return int(n)
        path = self.sqlite_path

        def query() -> int:
            with contextlib.closing(sqlite3.connect(str(path))) as conn:
                return int(conn.execute(f"SELECT count(*) FROM {table}{clause}").fetchone()[0])

        return await asyncio.to_thread(query)

    @contextlib.asynccontextmanager
    async def router(self, strategy: RoutingStrategy | None = None, **overrides: Any) -> Any:
        router = DataRouter(self.settings(**overrides), strategy=strategy or plain_strategy())
        await router.initialize()
        try:
            yield router
        finally:
            await router.close()


@pytest.fixture(
    params=[
        "embedded",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("postgres+l2", marks=[pytest.mark.postgres, pytest.mark.redis]),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    journal = tmp_path / "journal"
    if request.param == "embedded":
        return Backend("embedded", journal, sqlite_path=tmp_path / "store.sqlite3")
    found = Backend(
        request.param,
        journal,
        postgres_url=request.getfixturevalue("postgres_url"),
        pg_schema=request.getfixturevalue("pg_schema"),
    )
    if request.param == "postgres+l2":
        found.redis_url = request.getfixturevalue("redis_url")
        found.redis_prefix = request.getfixturevalue("redis_prefix")
    return found


@pytest_asyncio.fixture(loop_scope="session")
async def router(backend: Backend) -> AsyncIterator[DataRouter]:
    async with backend.router() as opened:
        yield opened


# --------------------------------------------------------------------------- contract


async def test_seed_004_quick_start(backend: Backend, router: DataRouter) -> None:
    # Seed 004's quick start, as written there (timestamp and its alias both given).
    tick = TickData(
        symbol="EUR/USD",
        timestamp=1727996400000,
        timestamp_ms=1727996400000,  # type: ignore[call-arg]  # alias unknown to the mypy plugin
        bid=1.09551,
        ask=1.09553,
        source="polygon",
    )
    await router.save_tick(tick)
    latest_tick = await router.get_latest_tick("EUR/USD")
    assert latest_tick is not None
    assert (latest_tick.bid, latest_tick.ask, latest_tick.source) == (1.09551, 1.09553, "polygon")

    candle = CandleData(
        symbol="EUR/USD",
        timeframe="1m",
        timestamp=1727996400000,
        timestamp_ms=1727996400000,  # type: ignore[call-arg]
        open=1.0850,
        high=1.0855,
        low=1.0848,
        close=1.0852,
        volume=15234,
        source="polygon",
    )
    await router.save_candle(candle)
    candles = await router.get_latest_candles(symbol="EUR/USD", timeframe="1m", limit=100)
    assert [(c.timestamp, c.close, c.volume) for c in candles] == [(T0, 1.0852, 15234)]

    await router.flush()
    assert await backend.count("ticks") == 1
    assert await backend.count("candles") == 1
    # A fresh router (empty L1) answers the same from storage.
    async with backend.router() as other:
        again = await other.get_latest_tick("EUR/USD")
        assert again is not None
        assert (again.timestamp, again.bid, again.ask) == (T0, 1.09551, 1.09553)
        stored = await other.get_latest_candles("EUR/USD", "1m", 100)
        assert [(c.timestamp, c.close) for c in stored] == [(T0, 1.0852)]


async def test_latest_candles_are_oldest_to_newest_and_limited(
    backend: Backend, router: DataRouter
) -> None:
    written = await router.save_candles_bulk(
        candle(T0 + i * MINUTE, close=1 + i) for i in range(10)
    )
    assert written == 10
    last3 = await router.get_latest_candles(SYM, "1m", limit=3)
    assert [c.timestamp for c in last3] == [T0 + i * MINUTE for i in (7, 8, 9)]
    everything = await router.get_latest_candles(SYM, "1m", limit=100)
    assert [c.close for c in everything] == [1 + i for i in range(10)]
    # A newer candle saved through the live path shows up in the next read.
    await router.save_candle(candle(T0 + 10 * MINUTE, close=99.0))
    newest = await router.get_latest_candles(SYM, "1m", limit=3)
    assert [c.close for c in newest] == [9.0, 10.0, 99.0]
    for bad in (0, -1):
        with pytest.raises(ValidationError):
            await router.get_latest_candles(SYM, "1m", limit=bad)
    with pytest.raises(ValidationError):
        await router.get_latest_candles(SYM, "7m", limit=3)
    await router.flush()
    assert await backend.count("candles") == 11


async def test_save_candles_bulk_upserts(backend: Backend, router: DataRouter) -> None:
    candles = [candle(T0 + i * MINUTE, close=1.0 + i / 100) for i in range(500)]
    assert await router.save_candles_bulk(candles) == 500
    await router.save_candles_bulk(candles)
    assert await backend.count("candles") == 500
    # A corrected bar replaces the stored one (same key: symbol, timeframe, source, start).
    await router.save_candles_bulk([candle(T0, close=1.0851)])
    assert await backend.count("candles") == 500
    got = await router.get_candles(SYM, "1m", T0, T0 + MINUTE)
    assert [c.close for c in got] == [1.0851]


async def test_range_reads_are_half_open_in_ms_and_aware_datetimes(router: DataRouter) -> None:
    await router.save_ticks(tick(T0 + i * 1000, bid=1.1 + i / 1000) for i in range(10))
    await router.save_candles_bulk(candle(T0 + i * MINUTE) for i in range(10))
    await router.flush()

    by_ms = await router.get_ticks(SYM, T0 + 2000, T0 + 5000)
    assert [t.timestamp for t in by_ms] == [T0 + 2000, T0 + 3000, T0 + 4000]
    start = datetime.fromtimestamp((T0 + 2000) / 1000, tz=UTC)
    by_dt = await router.get_ticks(SYM, start, start + timedelta(seconds=3))
    assert by_dt == by_ms
    # Any offset, not only UTC: the same instants.
    plus2 = timezone(timedelta(hours=2))
    assert await router.get_ticks(SYM, start.astimezone(plus2), T0 + 5000) == by_ms
    assert len(await router.get_ticks(SYM, T0, T0 + 10_000, limit=4)) == 4
    assert await router.get_ticks(SYM, T0 + 3000, T0 + 3000) == []

    got = await router.get_candles(SYM, "1m", T0 + 2 * MINUTE, T0 + 5 * MINUTE)
    assert [c.timestamp for c in got] == [T0 + i * MINUTE for i in (2, 3, 4)]
    got_dt = await router.get_candles(
        SYM, "1m", datetime.fromtimestamp(T0 / 1000, tz=UTC), T0 + 2 * MINUTE
    )
    assert [c.timestamp for c in got_dt] == [T0, T0 + MINUTE]

    naive = datetime(2024, 10, 3, 23, 0, 0)  # no tzinfo: refused
    with pytest.raises(ValidationError, match="naive"):
        await router.get_ticks(SYM, naive, T0 + 5000)
    with pytest.raises(ValidationError, match="naive"):
        await router.get_candles(SYM, "1m", T0, naive)
    with pytest.raises(ValidationError):
        await router.get_ticks(SYM, T0 + 5000, T0)  # end before start
    with pytest.raises(ValidationError):
        await router.get_ticks(SYM, T0 // 1000, T0)  # seconds, not milliseconds


async def test_reads_per_source_and_newest_of_any_source(
    backend: Backend, router: DataRouter
) -> None:
    await router.save_tick(tick(T0 + 5, source="twelve-data", bid=1.2))
    await router.save_tick(tick(T0 + 1, source="polygon", bid=1.1))  # older, saved later

    async def check(r: DataRouter) -> None:
        newest = await r.get_latest_tick(SYM)
        assert newest is not None
        assert (newest.source, newest.timestamp) == ("twelve-data", T0 + 5)
        polygon = await r.get_latest_tick(SYM, source="polygon")
        assert polygon is not None
        assert (polygon.source, polygon.timestamp, polygon.bid) == ("polygon", T0 + 1, 1.1)
        assert await r.get_latest_tick(SYM, source="nobody") is None
        assert await r.get_latest_tick("GBP/USD") is None
        only = await r.get_ticks(SYM, T0, T0 + 10, source="polygon")
        assert [t.source for t in only] == ["polygon"]
        both = await r.get_ticks(SYM, T0, T0 + 10)
        assert [t.source for t in both] == ["polygon", "twelve-data"]

    await router.flush()
    await check(router)  # from L1 where it can
    async with backend.router() as fresh:
        await check(fresh)  # from L2 / storage


async def test_candle_source_preference_comes_from_the_strategy(backend: Backend) -> None:
    polygon = [candle(T0 + i * MINUTE, source="polygon", close=1.0) for i in range(5)]
    twelve = [candle(T0 + (i + 1) * MINUTE, source="twelve-data", close=2.0) for i in range(5)]
    async with backend.router() as router:
        await router.save_candles_bulk(polygon + twelve)
        newest = await router.get_latest_candles(SYM, "1m", 3)
        assert {c.source for c in newest} == {"twelve-data"}  # no preference: newest source
        assert newest[-1].timestamp == T0 + 5 * MINUTE
        only = await router.get_latest_candles(SYM, "1m", 3, source="polygon")
        assert [c.timestamp for c in only] == [T0 + i * MINUTE for i in (2, 3, 4)]

    prefer = plain_strategy(sources={"candle_preference": ["polygon", "twelve-data"]})
    async with backend.router(strategy=prefer) as router:
        preferred = await router.get_latest_candles(SYM, "1m", 3)
        assert [(c.source, c.timestamp) for c in preferred] == [
            ("polygon", T0 + i * MINUTE) for i in (2, 3, 4)
        ]
        ranged = await router.get_candles(SYM, "1m", T0, T0 + 10 * MINUTE)
        assert {c.source for c in ranged} == {"polygon"}
        explicit = await router.get_latest_candles(SYM, "1m", 1, source="twelve-data")
        assert [c.source for c in explicit] == ["twelve-data"]

    absent = plain_strategy(sources={"candle_preference": ["bloomberg", "polygon"]})
    async with backend.router(strategy=absent) as router:
        fallback = await router.get_latest_candles(SYM, "1m", 1)
        assert [c.source for c in fallback] == ["polygon"]  # first listed source that has any


async def test_replays_store_nothing_twice(backend: Backend, router: DataRouter) -> None:
    ticks = [tick(T0 + i, bid=1.1 + i / 10_000) for i in range(50)]
    assert await router.save_ticks(ticks) == 50
    assert await router.save_ticks(ticks) == 0
    for t in ticks:
        await router.save_tick(t)
    for t in ticks[:10]:
        await router.save_tick(t, mode="sync")
    await router.flush()
    assert await backend.count("ticks") == 50
    assert len(await router.get_ticks(SYM, T0, T0 + 50)) == 50


async def test_same_millisecond_distinct_quotes_are_both_kept(
    backend: Backend, router: DataRouter
) -> None:
    await router.save_tick(tick(T0, bid=1.1))
    await router.save_tick(tick(T0, bid=1.1001))
    await router.save_tick(tick(T0, bid=1.1))  # a true duplicate of the first
    await router.save_ticks([tick(T0, bid=1.1002), tick(T0, bid=1.1001)])
    await router.flush()
    assert await backend.count("ticks") == 3
    got = await router.get_ticks(SYM, T0, T0 + 1)
    assert sorted(t.bid for t in got) == [1.1, 1.1001, 1.1002]


async def test_wrong_types_are_refused_before_anything_is_written(
    backend: Backend, router: DataRouter
) -> None:
    c = candle(T0)
    with pytest.raises(ValidationError):
        await router.save_tick(c)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await router.save_candle(tick(T0))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await router.save_ticks([tick(T0), c])  # type: ignore[list-item]
    with pytest.raises(ValidationError):
        await router.save_candles_bulk([c, tick(T0)])  # type: ignore[list-item]
    await router.flush()
    assert await backend.count("ticks") == 0
    assert await backend.count("candles") == 0
    assert await router.get_latest_tick(SYM) is None


# --------------------------------------------------------------------------- configuration


@pytest.mark.postgres
async def test_router_reads_its_configuration_from_the_environment(
    postgres_url: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config here: the packaged defaults apply
    monkeypatch.setenv("DATA_MANAGER_POSTGRES__URL", postgres_url)
    monkeypatch.setenv("DATA_MANAGER_POSTGRES__DB_SCHEMA", pg_schema)
    monkeypatch.setenv("DATA_MANAGER_WATCH_STRATEGY", "false")
    async with DataRouter() as router:
        assert router.storage.kind == "postgresql"
        await router.save_tick(tick(T0), mode="sync")
    tables = await pg_fetchval(
        postgres_url,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 "
        "AND table_name IN ('ticks', 'candles', 'order_flow')",
        pg_schema,
    )
    assert tables == 3
    assert await pg_fetchval(postgres_url, f'SELECT count(*) FROM "{pg_schema}".ticks') == 1
    assert not (tmp_path / ".data_manager" / "data_manager.sqlite3").exists()


@pytest.mark.postgres
async def test_router_reads_the_seed_environment_names(
    postgres_url: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = urlsplit(postgres_url)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POSTGRES_HOST", parts.hostname or "")
    monkeypatch.setenv("POSTGRES_PORT", str(parts.port or 5432))
    monkeypatch.setenv("POSTGRES_DB", parts.path.lstrip("/"))
    monkeypatch.setenv("POSTGRES_USER", parts.username or "postgres")
    monkeypatch.setenv("DATA_MANAGER_POSTGRES__DB_SCHEMA", pg_schema)
    monkeypatch.setenv("DATA_MANAGER_WATCH_STRATEGY", "false")
    router = DataRouter()
    assert state_of(router) is RouterState.UNOPENED
    await router.initialize()
    try:
        assert state_of(router) is RouterState.OPEN
        assert f"{parts.hostname}:{parts.port}" in router.storage.target
        health = await router.health_check()
        assert health.databases["postgresql"].reachable
        assert health.databases["postgresql"].embedded is False
    finally:
        await router.close()
    assert router.state is RouterState.CLOSED


@pytest.mark.postgres
async def test_explicit_settings_win_over_the_environment(
    postgres_url: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTGRES_HOST", "db.invalid")
    monkeypatch.setenv("POSTGRES_DB", "nowhere")
    settings = DataManagerSettings(
        postgres=pg_settings(postgres_url, pg_schema),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
        init_deadline_seconds=0,
    )
    async with DataRouter(settings=settings, strategy=plain_strategy()) as router:
        assert router.settings is settings
        assert "db.invalid" not in router.storage.target
        await router.save_tick(tick(T0), mode="sync")
        assert (await router.health_check()).databases["postgresql"].reachable


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.postgres
async def test_lifecycle_on_postgres(postgres_url: str, pg_schema: str, tmp_path: Path) -> None:
    app = f"dm-life-{pg_schema}"
    settings = DataManagerSettings(
        postgres=pg_settings(postgres_url, pg_schema, application_name=app),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
    )

    router = DataRouter(settings, strategy=plain_strategy())
    async with router as entered:
        assert entered is router
        assert router.state is RouterState.OPEN
        storage = router.storage
        await router.initialize()  # a second initialize is harmless: same pool, same state
        assert router.storage is storage
        assert router.state is RouterState.OPEN
        await router.save_tick(tick(T0))
        await router.flush()
        assert await app_connections(postgres_url, app) >= 1
    assert state_of(router) is RouterState.CLOSED
    await router.close()  # closing twice is harmless
    await wait_until(lambda: app_connections(postgres_url, app), 0, "close to release them")
    with pytest.raises(RouterClosedError):
        await router.initialize()
    with pytest.raises(RouterClosedError):
        await router.get_latest_tick(SYM)
    assert await pg_fetchval(postgres_url, f'SELECT count(*) FROM "{pg_schema}".ticks') == 1


# --------------------------------------------------------------------------- unreachable


async def test_unreachable_database_is_named_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    port = free_port()  # nothing listens there
    fallback = tmp_path / "fallback.sqlite3"
    settings = DataManagerSettings(
        postgres=PostgresSettings(
            url=f"postgresql://trader:{SECRET}@127.0.0.1:{port}/market", connect_timeout=2
        ),
        sqlite_path=str(fallback),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
        init_deadline_seconds=0,
    )
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    router = DataRouter(settings, strategy=plain_strategy())
    with pytest.raises(DatabaseConnectionError) as caught:
        await router.initialize()
    assert f"127.0.0.1:{port}" in str(caught.value)
    for exc in exception_chain(caught.value):
        assert SECRET not in f"{exc!s} {exc!r}"
    assert secrets_in(caplog.records) == []
    # No silent fallback to the embedded store.
    assert not fallback.exists()
    assert not (tmp_path / ".data_manager" / "data_manager.sqlite3").exists()
    assert router.state is not RouterState.OPEN
    with pytest.raises(RouterClosedError):
        await router.save_tick(tick(T0))
    await router.close()


@contextlib.contextmanager
def refusing_server() -> Iterator[tuple[int, list[float]]]:
    """A loopback port that accepts TCP connections and drops them at once.

    Yields the port and the (monotonic) times of the connections it saw, so a test can
    count connection attempts.
    """
    seen: list[float] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.05)
    stop = False

    def serve() -> None:
        while not stop:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            seen.append(time.monotonic())
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        stop = True
        thread.join(5)
        listener.close()


async def test_initialize_retries_until_its_deadline(tmp_path: Path) -> None:
    with refusing_server() as (port, attempts):
        settings = DataManagerSettings(
            postgres=PostgresSettings(
                host="127.0.0.1", port=port, database="market", password=SECRET, connect_timeout=1
            ),
            sqlite_path=str(tmp_path / "fallback.sqlite3"),
            watch_strategy=False,
            journal_dir=tmp_path / "journal",
            init_deadline_seconds=0.5,
        )
        router = DataRouter(settings, strategy=plain_strategy())
        started = time.monotonic()
        with pytest.raises(DatabaseConnectionError) as caught:
            async with asyncio.timeout(DEADLINE):
                await router.initialize()
        elapsed = time.monotonic() - started
    assert len(attempts) >= 2, "initialize() did not retry"
    assert attempts[-1] - attempts[0] > 0  # spread out by the backoff, not a burst
    assert elapsed < 0.5 + 10  # stopped after about the deadline (generous slack)
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "0.5" in str(caught.value)  # says how long it tried
    assert SECRET not in str(caught.value)
    assert not (tmp_path / "fallback.sqlite3").exists()


# --------------------------------------------------------------------------- schema


@pytest.mark.postgres
async def test_newer_schema_is_refused_by_initialize(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    app = f"dm-newer-{pg_schema}"
    settings = DataManagerSettings(
        postgres=pg_settings(postgres_url, pg_schema, application_name=app),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
    )
    async with DataRouter(settings, strategy=plain_strategy()) as first:
        await first.save_tick(tick(T0), mode="sync")
    newer = SCHEMA_VERSION + 7
    conn = await asyncpg.connect(postgres_url, timeout=10)
    try:
        await conn.execute(
            f'INSERT INTO "{pg_schema}".dm_schema_version (version, description, applied_at) '
            "VALUES ($1, 'from a newer SDK', now())",
            newer,
        )
    finally:
        await conn.close(timeout=10)
    router = DataRouter(settings, strategy=plain_strategy())
    refusal = ""
    try:
        await router.initialize()
    except ConfigurationError as exc:
        refusal = str(exc)
    assert re.search(rf"{newer}.*{SCHEMA_VERSION}", refusal), refusal or "newer schema accepted"
    assert state_of(router) is not RouterState.OPEN
    try:
        # The refused router left no connection behind...
        await wait_until(
            lambda: app_connections(postgres_url, app), 0, "the refused router's connections"
        )
    finally:
        # ...and whatever it did leave is released here, not blamed on a later test.
        with warnings.catch_warnings(record=True) as leaked:
            warnings.simplefilter("always")
            gc.collect()
        await router.close()
    assert [str(w.message) for w in leaked if issubclass(w.category, ResourceWarning)] == []
    # The data was not touched.
    assert await pg_fetchval(postgres_url, f'SELECT count(*) FROM "{pg_schema}".ticks') == 1


@pytest.mark.postgres
async def test_schema_created_twice_in_sequence_and_at_once(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    def settings(n: int) -> DataManagerSettings:
        return DataManagerSettings(
            postgres=pg_settings(postgres_url, pg_schema),
            watch_strategy=False,
            journal_dir=tmp_path / f"journal{n}",
        )

    async with DataRouter(settings(1), strategy=plain_strategy()) as first:
        await first.save_tick(tick(T0), mode="sync")
    async with DataRouter(settings(2), strategy=plain_strategy()) as second:
        got = await second.get_latest_tick(SYM)
        assert got is not None
        assert got.timestamp == T0
    versions = await pg_fetchval(
        postgres_url, f'SELECT count(DISTINCT version) FROM "{pg_schema}".dm_schema_version'
    )
    assert versions == 1
    # Processes of a platform start together: several routers creating the schema at once.
    routers = [DataRouter(settings(10 + i), strategy=plain_strategy()) for i in range(4)]
    try:
        async with asyncio.timeout(DEADLINE * 2):
            await asyncio.gather(*(r.initialize() for r in routers))
        for i, r in enumerate(routers):
            await r.save_tick(tick(T0 + 1 + i), mode="sync")
    finally:
        for r in routers:
            await r.close()
    assert await pg_fetchval(postgres_url, f'SELECT count(*) FROM "{pg_schema}".ticks') == 5


@pytest.mark.postgres
async def test_concurrent_first_initialize_on_a_fresh_schema(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    routers = [
        DataRouter(
            DataManagerSettings(
                postgres=pg_settings(postgres_url, pg_schema),
                watch_strategy=False,
                journal_dir=tmp_path / f"journal{i}",
            ),
            strategy=plain_strategy(),
        )
        for i in range(4)
    ]
    try:
        async with asyncio.timeout(DEADLINE * 2):
            results = await asyncio.gather(
                *(r.initialize() for r in routers), return_exceptions=True
            )
        assert [r for r in results if isinstance(r, BaseException)] == []
    finally:
        for r in routers:
            await r.close()


# --------------------------------------------------------------------------- timeouts & pool


@pytest.mark.postgres
async def test_statement_timeout_reaches_the_caller_as_query_timeout(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    settings = DataManagerSettings(
        postgres=pg_settings(postgres_url, pg_schema, statement_timeout=0.3),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
    )
    async with DataRouter(settings, strategy=plain_strategy()) as router:
        await router.save_ticks([tick(T0)])
        locker = await asyncpg.connect(postgres_url, timeout=10)
        try:
            tx = locker.transaction()
            await tx.start()
            await locker.execute(f'LOCK TABLE "{pg_schema}".ticks IN ACCESS EXCLUSIVE MODE')
            with pytest.raises(QueryTimeoutError) as caught:
                async with asyncio.timeout(DEADLINE):
                    await router.get_ticks(SYM, T0, T0 + 1)
            assert caught.value.timeout_seconds == 0.3
            await tx.rollback()
        finally:
            await locker.close(timeout=10)
        # The router is fine once the lock is gone.
        assert len(await router.get_ticks(SYM, T0, T0 + 1)) == 1
        assert (await router.health_check()).databases["postgresql"].reachable


@pytest.mark.postgres
async def test_pool_exhaustion_reaches_the_caller_and_shows_in_health(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    settings = DataManagerSettings(
        postgres=PostgresSettings(
            url=postgres_url, db_schema=pg_schema, pool_min=1, pool_max=1, pool_timeout=0.2
        ),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
        health_timeout_seconds=1.0,
    )
    async with DataRouter(settings, strategy=plain_strategy()) as router:
        await router.save_ticks([tick(T0 + i) for i in range(5)])
        holder = cast(
            "AsyncGenerator[TickData, None]", router.iter_ticks(SYM, T0, T0 + 10, batch_size=2)
        )
        try:
            first = await anext(holder)  # holds the only connection
            assert first.timestamp == T0
            with pytest.raises(ConnectionPoolExhaustedError):
                await router.get_ticks(SYM, T0, T0 + 10)
            async with asyncio.timeout(DEADLINE):
                health = await router.health_check()
            pool = health.connection_pools["postgresql"]
            assert (pool.in_use, pool.max_size) == (1, 1)
            pools = await router.pool_manager.health_check_all()
            assert pools["postgresql"].in_use == 1
        finally:
            await holder.aclose()
        assert len(await router.get_ticks(SYM, T0, T0 + 10)) == 5
        assert (await router.pool_manager.health_check_all())["postgresql"].in_use == 0


# --------------------------------------------------------------------------- health


@pytest.mark.postgres
@pytest.mark.redis
async def test_health_check_reports_every_part(
    postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    settings = DataManagerSettings(
        postgres=pg_settings(postgres_url, pg_schema),
        dragonfly=DragonflySettings(url=redis_url, key_prefix=redis_prefix),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
    )
    async with DataRouter(settings, strategy=plain_strategy()) as router:
        await router.save_tick(tick(T0))
        await router.get_latest_tick(SYM)
        await router.get_latest_tick("GBP/USD")
        await router.flush()
        health = await router.health_check()
        assert isinstance(health, HealthCheckResponse)
        assert health.status == "healthy", health.reason
        db = health.databases["postgresql"]
        assert db.reachable
        assert db.embedded is False
        assert db.version
        assert db.latency_ms is not None
        assert db.latency_ms >= 0
        assert health.cache.l2_configured
        assert health.cache.l2_reachable is True
        assert health.cache.l2_version
        assert health.cache.l1.hits >= 1
        assert health.cache.l1.misses >= 1
        pool = health.connection_pools["postgresql"]
        assert isinstance(pool, PoolHealth)
        assert pool.max_size == 4
        assert health.write_path.default_mode == settings.write_mode
        assert health.write_path.queue_depth == 0
        assert HealthCheckResponse.model_validate_json(health.model_dump_json()) == health

        stats = await router.cache.get_stats()
        assert isinstance(stats, CacheHealth)
        assert stats.l1.hits == health.cache.l1.hits
        assert stats.l2_configured
        pools = await router.pool_manager.health_check_all()
        assert set(pools) == {"postgresql"}
        assert pools["postgresql"].max_size == 4


@pytest.mark.postgres
async def test_no_secret_in_repr_errors_health_or_logs(
    postgres_url: str,
    pg_schema: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    parts = urlsplit(postgres_url)
    # The test server trusts local users, so the password is sent and ignored.
    user = parts.username or "postgres"
    with_password = f"postgresql://{user}:{SECRET}@{parts.hostname}:{parts.port}{parts.path}"
    settings = DataManagerSettings(
        postgres=PostgresSettings(url=with_password, db_schema=pg_schema),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
    )
    assert settings.postgres.resolved_password() == SECRET
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert SECRET not in text
    async with DataRouter(settings, strategy=plain_strategy()) as router:
        assert SECRET not in repr(router)
        assert SECRET not in router.storage.target
        await router.save_tick(tick(T0))
        await router.flush()
        health = await router.health_check()
        assert health.databases["postgresql"].reachable
        assert SECRET not in health.model_dump_json()
        assert SECRET not in repr(health)
        assert SECRET not in (await router.cache.get_stats()).model_dump_json()
    # An error raised by a real server (unknown database) keeps it out as well.
    wrong_db = PostgresSettings(
        url=with_password.rsplit("/", 1)[0] + "/no_such_database_dm", db_schema=pg_schema
    )
    bad = DataRouter(
        DataManagerSettings(
            postgres=wrong_db,
            watch_strategy=False,
            journal_dir=tmp_path / "journal2",
            init_deadline_seconds=0,
        ),
        strategy=plain_strategy(),
    )
    with pytest.raises(DatabaseConnectionError) as caught:
        await bad.initialize()
    for exc in exception_chain(caught.value):
        assert SECRET not in f"{exc!s} {exc!r}"
    await bad.close()
    assert caplog.records, "nothing was logged at DEBUG; the check below would be empty"
    assert secrets_in(caplog.records) == []


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A loopback port whose connections are accepted (by the kernel) and never answered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.postgres
async def test_health_is_bounded_when_the_cache_hangs(
    postgres_url: str, pg_schema: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with silent_server() as port:
        settings = DataManagerSettings(
            postgres=pg_settings(postgres_url, pg_schema),
            dragonfly=DragonflySettings(
                host="127.0.0.1", port=port, password=SECRET, key_prefix="dmhang"
            ),
            watch_strategy=False,
            journal_dir=tmp_path / "journal",
            health_timeout_seconds=0.5,
        )
        router = DataRouter(settings, strategy=plain_strategy())
        try:
            async with asyncio.timeout(DEADLINE):
                await router.initialize()  # the cache is optional: it starts without it
            async with asyncio.timeout(DEADLINE):
                await router.save_tick(tick(T0), mode="sync")
                got = await router.get_latest_tick(SYM, source="polygon")
            assert got is not None
            started = time.monotonic()
            async with asyncio.timeout(DEADLINE):
                health = await router.health_check()
            elapsed = time.monotonic() - started
            assert elapsed < 0.5 * 3 + 2  # one bounded probe per backend, with slack
            assert health.databases["postgresql"].reachable
            assert health.cache.l2_configured
            assert health.cache.l2_reachable is False
            assert health.status == "degraded"
            assert SECRET not in health.model_dump_json()
        finally:
            async with asyncio.timeout(DEADLINE):
                await router.close()
    assert secrets_in(caplog.records) == []  # the cache password stays out of logs


@pytest.mark.slow
async def test_health_is_bounded_when_the_database_hangs(
    postgres_server_factory: Callable[[], PostgresServer], tmp_path: Path
) -> None:
    server = postgres_server_factory()
    settings = DataManagerSettings(
        postgres=PostgresSettings(url=server.url, pool_min=1, pool_max=2, connect_timeout=1),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
        health_timeout_seconds=0.5,
    )
    postmaster = psutil.Process(int((server.data_dir / "postmaster.pid").read_text().split()[0]))
    router = DataRouter(settings, strategy=plain_strategy())
    await router.initialize()
    try:
        assert (await router.health_check()).status == "healthy"
        # Backends run in their own process groups: stop every process of the server, so
        # connections are accepted by the kernel and never answered.
        frozen = [postmaster, *postmaster.children(recursive=True)]
        for process in frozen:
            process.suspend()
        try:
            started = time.monotonic()
            async with asyncio.timeout(DEADLINE):
                health = await router.health_check()
            elapsed = time.monotonic() - started
        finally:
            for process in frozen:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.resume()
        assert elapsed < 0.5 * 3 + 2
        db = health.databases["postgresql"]
        assert db.reachable is False
        assert db.error
        assert health.status == "unhealthy"
        async with asyncio.timeout(DEADLINE):
            assert (await router.health_check()).databases["postgresql"].reachable
    finally:
        async with asyncio.timeout(DEADLINE):
            await router.close()


# --------------------------------------------------------------------------- examples


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_multiprocess_demo_shares_ticks_through_the_cache(
    postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    pg, cache = urlsplit(postgres_url), urlsplit(redis_url)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSTGRES_", "DRAGONFLY_", "DATA_MANAGER_"))
    }
    env.update(
        POSTGRES_HOST=pg.hostname or "",
        POSTGRES_PORT=str(pg.port or 5432),
        POSTGRES_DB=pg.path.lstrip("/"),
        POSTGRES_USER=pg.username or "postgres",
        DRAGONFLY_HOST=cache.hostname or "",
        DRAGONFLY_PORT=str(cache.port or 6379),
        DATA_MANAGER_POSTGRES__DB_SCHEMA=pg_schema,
        DATA_MANAGER_DRAGONFLY__KEY_PREFIX=redis_prefix,
        DATA_MANAGER_JOURNAL_DIR=str(tmp_path / "journal"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    script = str(ROOT / "examples" / "multiprocess_demo.py")
    done = subprocess.run(
        [sys.executable, script, "--engines", "2", "--ticks", "500"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "collector: 500 ticks" in done.stdout
    engines = re.findall(r"engine-\d+: received (\d+) live .*last: (True|False)", done.stdout)
    assert len(engines) == 2, done.stdout
    assert all(int(n) > 0 and last == "True" for n, last in engines), done.stdout
