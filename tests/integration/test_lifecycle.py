"""Data lifecycle on real stores: retention removes exactly the expired rows (the cutoff
itself is kept), per kind and timeframe, in batches; dry runs count; ``delete_range`` is
half-open and drops the symbol from the caches."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import pytest
import pytest_asyncio

from data_manager import (
    CandleData,
    DataManagerSettings,
    DataRouter,
    DragonflySettings,
    OrderFlowMetrics,
    PostgresSettings,
    RouterClosedError,
    TickData,
    ValidationError,
    lifecycle,
)
from data_manager.lifecycle import (
    DAY_MS,
    RetentionSettings,
    apply_retention,
    delete_range,
    plan_retention,
    retention_settings,
    timescale_compression_sql,
    timescale_retention_sql,
)
from data_manager.models import MIN_TIMESTAMP_MS
from data_manager.storage.postgres import PostgresStorage
from data_manager.strategy import strategy_from_mapping

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from data_manager.storage.base import BackendHealth

NOW: Final = 1_730_000_000_000  # 2024-10-27T03:33:20Z
T0: Final = 1_727_996_400_000
MINUTE: Final = 60_000
HOUR: Final = 3_600_000
SYM: Final = "EUR/USD"
OTHER: Final = "GBP/USD"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("POSTGRES_", "DRAGONFLY_")) or (
            name.startswith("DATA_MANAGER_") and not name.startswith("DATA_MANAGER_TEST_")
        ):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- policy


def test_plan_retention_rules_and_cutoffs() -> None:
    policy = RetentionSettings(
        ticks_days=1,
        candles_days=30,
        candles_timeframe_days={"1m": 2.5, "1d": None},
        order_flow_days=0.5,
    )
    rules = {r.label: r.cutoff_ms for r in plan_retention(policy, NOW)}
    assert rules == {
        "ticks": NOW - DAY_MS,
        "candles 1m": NOW - 5 * DAY_MS // 2,
        "candles 5m": NOW - 30 * DAY_MS,
        "candles 15m": NOW - 30 * DAY_MS,
        "candles 30m": NOW - 30 * DAY_MS,
        "candles 1h": NOW - 30 * DAY_MS,
        "candles 4h": NOW - 30 * DAY_MS,
        "candles 1w": NOW - 30 * DAY_MS,  # 1d: kept for ever
        "order_flow": NOW - DAY_MS // 2,
    }
    # No per-timeframe override: one rule for every candle.
    uniform = plan_retention(RetentionSettings(candles_days=7), NOW)
    assert [(r.kind, r.timeframe, r.cutoff_ms) for r in uniform] == [
        ("candles", None, NOW - 7 * DAY_MS)
    ]
    assert plan_retention(RetentionSettings(), NOW) == []  # the default keeps everything
    # Longer than any row can be old: nothing to delete, not an overflow or a date the
    # database cannot take.
    for days in (3e6, 1e305):
        (rule,) = plan_retention(RetentionSettings(ticks_days=days), NOW)
        assert rule.cutoff_ms == MIN_TIMESTAMP_MS


def test_retention_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="replay horizon"):
        RetentionSettings(replay_horizon_days=7, compress_after_days=3)
    with pytest.raises(ValueError, match="greater than 0"):
        RetentionSettings(ticks_days=0)
    with pytest.raises(ValueError, match="candles_timeframe_days"):
        RetentionSettings(candles_timeframe_days={"1m": -1})
    with pytest.raises(ValueError, match="2m"):
        RetentionSettings.model_validate({"candles_timeframe_days": {"2m": 1}})
    assert RetentionSettings(replay_horizon_days=3).compress_after == 3
    # Nothing configured: everything is kept.
    assert (
        plan_retention(retention_settings(DataManagerSettings(sqlite_path=":memory:")), NOW) == []
    )


def test_timescale_statements() -> None:
    sql = timescale_retention_sql('"s".ticks', 30)
    assert sql == [
        "SELECT remove_retention_policy('\"s\".ticks'::regclass, if_exists => TRUE)",
        "SELECT add_retention_policy('\"s\".ticks'::regclass, "
        "drop_after => INTERVAL '2592000 seconds', initial_start => now() + INTERVAL '1 day')",
    ]
    sql = timescale_compression_sql('"s".candles', "candles", 7, enable=True)
    assert "timescaledb.compress_segmentby = 'symbol, timeframe, source'" in sql[0]
    assert sql[-1].endswith("compress_after => INTERVAL '604800 seconds')")
    assert len(timescale_compression_sql('"s".ticks', "ticks", 7, enable=False)) == 2
    # No retention, or compression off: only the removal of an earlier policy.
    assert timescale_retention_sql('"s".ticks', None) == sql_remove("retention", '"s".ticks')
    assert timescale_compression_sql('"s".ticks', "ticks", None, enable=True) == sql_remove(
        "compression", '"s".ticks'
    )


def sql_remove(policy: str, relation: str) -> list[str]:
    return [f"SELECT remove_{policy}_policy('{relation}'::regclass, if_exists => TRUE)"]


# --------------------------------------------------------------------------- backends


@dataclass
class Store:
    """A router's store plus a side door (plain SQL) to check what is really there."""

    settings: DataManagerSettings
    sqlite_path: Path | None = None
    postgres_url: str | None = None
    schema: str | None = None

    async def rows(self, table: str, columns: str, where: str = "") -> list[tuple[Any, ...]]:
        """``SELECT columns FROM table [WHERE where]``; ``ts`` comes back as Unix ms."""
        clause = f" WHERE {where}" if where else ""
        if self.postgres_url is not None:
            names = [c.strip() for c in columns.split(",")]
            ts_ms = "(extract(epoch FROM ts) * 1000)::bigint"
            select = ", ".join(ts_ms if c == "ts" else c for c in names)
            sql = f'SELECT {select} FROM "{self.schema}".{table}{clause}'
            conn = await asyncpg.connect(self.postgres_url, timeout=10)
            try:
                return [tuple(r) for r in await conn.fetch(sql, timeout=10)]
            finally:
                await conn.close(timeout=10)
        path = self.sqlite_path

        def query() -> list[tuple[Any, ...]]:
            with contextlib.closing(sqlite3.connect(str(path))) as conn:
                return list(conn.execute(f"SELECT {columns} FROM {table}{clause}"))

        return await asyncio.to_thread(query)


@pytest.fixture(
    params=[
        "embedded",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("postgres+l2", marks=[pytest.mark.postgres, pytest.mark.redis]),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    base: dict[str, Any] = {"journal_dir": tmp_path / "journal", "watch_strategy": False}
    if request.param == "embedded":
        path = tmp_path / "store.sqlite3"
        return Store(DataManagerSettings(sqlite_path=str(path), **base), sqlite_path=path)
    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("pg_schema")
    base["postgres"] = PostgresSettings(url=url, db_schema=schema, pool_min=1, pool_max=4)
    if request.param == "postgres+l2":
        base["dragonfly"] = DragonflySettings(
            url=request.getfixturevalue("redis_url"),
            key_prefix=request.getfixturevalue("redis_prefix"),
        )
    return Store(DataManagerSettings(**base), postgres_url=url, schema=schema)


@pytest_asyncio.fixture(loop_scope="session")
async def router(store: Store) -> AsyncIterator[DataRouter]:
    plain = strategy_from_mapping(
        {"aggregation": {"enabled": False}, "order_flow": {"enabled": False}}
    )
    async with DataRouter(store.settings, strategy=plain) as opened:
        yield opened


def tick(ts: int, symbol: str = SYM) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=1.1, ask=1.1002, source="p")


def candle(ts: int, timeframe: str, symbol: str = SYM) -> CandleData:
    return CandleData(
        symbol=symbol,
        timeframe=timeframe,
        timestamp=ts,
        open=1.1,
        high=1.2,
        low=1.0,
        close=1.15,
        source="p",
    )


def flow(ts: int, symbol: str = SYM) -> OrderFlowMetrics:
    return OrderFlowMetrics(symbol=symbol, timestamp=ts, window_ms=1000, source="p")


# --------------------------------------------------------------------------- retention


POLICY: Final = RetentionSettings(
    ticks_days=1,
    candles_days=30,
    candles_timeframe_days={"1m": 2, "1d": None},
    order_flow_days=1,
    delete_batch_rows=2,  # several batches per rule
)


async def seed_around_cutoffs(router: DataRouter) -> None:
    tick_cut, m1_cut, h1_cut, flow_cut = (
        NOW - DAY_MS,
        NOW - 2 * DAY_MS,
        NOW - 30 * DAY_MS,
        NOW - DAY_MS,
    )
    offsets = (-10 * DAY_MS, -5000, -1, 0, 1, 5000)
    await router.save_ticks([tick(tick_cut + o, s) for o in offsets for s in (SYM, OTHER)])
    await router.save_candles_bulk(
        [candle(m1_cut + o, "1m") for o in offsets]
        + [candle(h1_cut + o, "1h") for o in offsets]
        + [candle(NOW - 3650 * DAY_MS + o, "1d") for o in offsets]
    )
    for o in offsets:
        await router.save_order_flow(flow(flow_cut + o), mode="sync")


async def test_retention_deletes_exactly_the_expired_rows(router: DataRouter, store: Store) -> None:
    await seed_around_cutoffs(router)

    dry = await apply_retention(router, policy=POLICY, now_ms=NOW, dry_run=True)
    assert dry.dry_run
    # TimescaleDB: policy + drop_chunks + a keyed delete in the cutoff chunk; else the delete job
    method = "timescaledb_policy" if dry.timescaledb else "delete"
    counts = {o.rule.label: o.rows for o in dry.outcomes}
    # Three of six rows sit strictly before each cutoff (the cutoff itself is kept).
    assert counts["ticks"] == 6  # two symbols
    assert counts["candles 1m"] == 3
    assert counts["candles 1h"] == 3
    assert counts["order_flow"] == 3
    assert counts["candles 5m"] == 0
    assert "candles 1d" not in counts
    assert len(await store.rows("ticks", "ts")) == 12  # a dry run deletes nothing

    report = await apply_retention(router, policy=POLICY, now_ms=NOW)
    assert {o.rule.label: o.rows for o in report.outcomes} == counts
    assert report.rows == 15
    ticks_outcome = next(o for o in report.outcomes if o.rule.kind == "ticks")
    assert ticks_outcome.method == method
    if method == "delete":
        assert ticks_outcome.batches == 4  # 2 + 2 + 2 + a last, empty one

    kept = (0, 1, 5000)
    for sym in (SYM, OTHER):
        got = await store.rows("ticks", "ts", f"symbol = '{sym}'")
        assert sorted(r[0] - (NOW - DAY_MS) for r in got) == list(kept)
    for tf, cut in (("1m", NOW - 2 * DAY_MS), ("1h", NOW - 30 * DAY_MS)):
        got = await store.rows("candles", "ts", f"timeframe = '{tf}'")
        assert sorted(r[0] - cut for r in got) == list(kept)
    assert len(await store.rows("candles", "ts", "timeframe = '1d'")) == 6  # kept for ever
    got = await store.rows("order_flow", "ts")
    assert sorted(r[0] - (NOW - DAY_MS) for r in got) == list(kept)

    again = await apply_retention(router, policy=POLICY, now_ms=NOW)
    assert again.rows == 0  # idempotent


async def test_uniform_candle_retention_and_no_retention(router: DataRouter, store: Store) -> None:
    await router.save_candles_bulk(
        [candle(NOW - 8 * DAY_MS, tf) for tf in ("1m", "1h", "1d")]
        + [candle(NOW - 7 * DAY_MS, tf) for tf in ("1m", "1h", "1d")]
    )
    nothing = await apply_retention(router, policy=RetentionSettings(), now_ms=NOW)
    assert nothing.outcomes == []
    assert len(await store.rows("candles", "ts")) == 6
    report = await apply_retention(router, policy=RetentionSettings(candles_days=7), now_ms=NOW)
    assert [(o.rule.label, o.rows) for o in report.outcomes] == [("candles", 3)]
    assert sorted(r[0] for r in await store.rows("candles", "ts")) == [NOW - 7 * DAY_MS] * 3


# --------------------------------------------------------------------------- TimescaleDB


@dataclass
class TimescalePolicies:
    """The policy statements :func:`apply_retention` sent, replayed as TimescaleDB would."""

    statements: list[str] = dataclasses.field(default_factory=list)

    def in_force(self) -> set[tuple[str, str]]:
        """``(table, "retention" | "compression")`` for every policy left installed."""
        installed: set[tuple[str, str]] = set()
        for sql in self.statements:
            found = re.match(r"SELECT (add|remove)_(\w+)_policy\('[^']*\.(\w+)'", sql)
            if found is not None:
                verb, policy, table = found.groups()
                (installed.add if verb == "add" else installed.discard)((table, policy))
        return installed


@pytest.fixture
def timescale(router: DataRouter, monkeypatch: pytest.MonkeyPatch) -> TimescalePolicies:
    """Let the PostgreSQL ``router`` pass for TimescaleDB: ``ping`` reports the extension,
    every data table is a hypertable with compression on, and the statements only TimescaleDB
    has (its catalogue, policies, ``drop_chunks``) are recorded instead of run. Counts and
    deletes still run, so the rows are real."""
    policies = TimescalePolicies()
    ping = PostgresStorage.ping

    async def timescale_ping(self: PostgresStorage) -> BackendHealth:
        return dataclasses.replace(await ping(self), timescaledb=True)

    async def script(self: Any, statements: list[str]) -> list[Any]:
        policies.statements += statements
        return [True if "compression_enabled" in sql else 0 for sql in statements]

    monkeypatch.setattr(PostgresStorage, "ping", timescale_ping)
    monkeypatch.setattr(lifecycle._Maintenance, "script", script)
    return policies


@pytest.mark.postgres
@pytest.mark.parametrize("store", ["postgres"], indirect=True)
async def test_timescale_policies_follow_the_retention(
    router: DataRouter, timescale: TimescalePolicies
) -> None:
    everything_uniform = RetentionSettings(ticks_days=7, candles_days=30, order_flow_days=7)
    report = await apply_retention(router, policy=everything_uniform, now_ms=NOW)
    assert report.timescaledb
    assert timescale.in_force() == {
        (table, policy)
        for table in ("ticks", "candles", "order_flow")
        for policy in ("retention", "compression")
    }

    # Ticks kept for ever, daily candles too, compression off: TimescaleDB's own jobs must
    # stop, or they go on dropping (and compressing) chunks past the old cutoffs.
    later = RetentionSettings(
        candles_days=30, candles_timeframe_days={"1d": None}, order_flow_days=7, compression=False
    )
    dry = await apply_retention(router, policy=later, now_ms=NOW, dry_run=True)
    assert len(timescale.in_force()) == 6  # a dry run changes no policy
    report = await apply_retention(router, policy=later, now_ms=NOW)
    assert timescale.in_force() == {("order_flow", "retention")}
    assert [o.method for o in report.outcomes if o.rule.kind == "candles"] == ["delete"] * 7
    off = "order_flow: compression off; no new chunks are compressed"
    assert (f"{off} (dry run: no change)", off) == (dry.compression[-1], report.compression[-1])


@pytest.mark.postgres
@pytest.mark.parametrize("store", ["postgres"], indirect=True)
async def test_a_plain_table_next_to_hypertables_gets_the_delete_job(
    router: DataRouter, store: Store, timescale: TimescalePolicies, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ticks table is not a hypertable (say, converting it failed): TimescaleDB cannot
    # take a retention policy for it, so its rows are deleted like on plain PostgreSQL.
    recorded = lifecycle._Maintenance.script

    async def script(self: Any, statements: list[str]) -> list[Any]:
        answers = await recorded(self, statements)
        return [
            None if "compression_enabled" in sql and "'ticks'" in sql else answer
            for sql, answer in zip(statements, answers, strict=True)
        ]

    monkeypatch.setattr(lifecycle._Maintenance, "script", script)
    await seed_around_cutoffs(router)
    report = await apply_retention(router, policy=POLICY, now_ms=NOW)
    methods = {o.rule.label: o.method for o in report.outcomes}
    assert methods["ticks"] == "delete"
    assert methods["order_flow"] == "timescaledb_policy"
    assert ("ticks", "retention") not in timescale.in_force()
    assert next(o.rows for o in report.outcomes if o.rule.kind == "ticks") == 6
    assert len(await store.rows("ticks", "ts")) == 6


# --------------------------------------------------------------------------- delete_range


async def test_delete_range_is_half_open_and_scoped(router: DataRouter, store: Store) -> None:
    await router.save_ticks([tick(T0 + i, s) for i in range(10) for s in (SYM, OTHER)])
    await router.save_candles_bulk(
        [candle(T0 + i * HOUR, tf) for i in range(4) for tf in ("1m", "1h")]
    )
    for i in range(4):
        await router.save_order_flow(flow(T0 + i), mode="sync")

    assert await delete_range(router, "eur_usd", T0 + 3, T0 + 7, "ticks") == 4
    left = [t.timestamp - T0 for t in await router.get_ticks(SYM, T0, T0 + 100)]
    assert left == [0, 1, 2, 7, 8, 9]
    assert len(await router.get_ticks(OTHER, T0, T0 + 100)) == 10

    deleted = await delete_range(router, SYM, T0 + HOUR, T0 + 3 * HOUR, "candles", timeframe="1m")
    assert deleted == 2
    got = await store.rows("candles", "timeframe, ts")
    assert sorted((tf, ts - T0) for tf, ts in got) == sorted(
        [("1m", 0), ("1m", 3 * HOUR)] + [("1h", i * HOUR) for i in range(4)]
    )
    assert await delete_range(router, SYM, T0, T0 + 2, "order_flow") == 2
    assert sorted(r[0] - T0 for r in await store.rows("order_flow", "ts")) == [2, 3]
    assert await delete_range(router, SYM, T0, T0, "ticks") == 0  # empty range

    with pytest.raises(ValidationError, match="kind"):
        await delete_range(router, SYM, T0, T0 + 1, "quotes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="timeframe only applies"):
        await delete_range(router, SYM, T0, T0 + 1, "ticks", timeframe="1m")
    with pytest.raises(ValidationError, match="before start"):
        await delete_range(router, SYM, T0 + 1, T0, "ticks")


async def test_delete_range_drops_the_symbol_from_the_caches(router: DataRouter) -> None:
    ticks = [tick(T0 + i) for i in range(10)]
    await router.save_ticks(ticks)
    if router.cache.l2 is not None:
        await router.cache.flush()  # the newest tick has reached L2
        assert await router.cache.l2.get_tick(SYM) == ticks[-1]
    latest = await router.get_latest_tick(SYM)
    assert latest is not None
    assert latest.timestamp == T0 + 9

    assert await delete_range(router, SYM, T0 + 5, T0 + 10, "ticks") == 5
    if router.cache.l2 is not None:
        assert await router.cache.l2.get_tick(SYM) is None
    latest = await router.get_latest_tick(SYM)  # from the database now
    assert latest is not None
    assert latest.timestamp == T0 + 4


async def test_lifecycle_needs_an_open_router(store: Store) -> None:
    router = DataRouter(store.settings)
    with pytest.raises(RouterClosedError, match="not initialised"):
        await apply_retention(router, policy=POLICY, now_ms=NOW)
    with pytest.raises(RouterClosedError):
        await delete_range(router, SYM, T0, T0 + 1, "ticks")
