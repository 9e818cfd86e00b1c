"""The storage contract, run against every backend: SQLite (file and ``:memory:``) and
PostgreSQL (its own schema per test)."""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import Index, inspect

from data_manager.cache.codec import tie_rank
from data_manager.errors import ConfigurationError, QueryExecutionError, ValidationError
from data_manager.models import CandleData, OrderFlowMetrics, TickData
from data_manager.settings import PostgresSettings
from data_manager.storage import schema
from data_manager.storage.base import SCHEMA_VERSION, Storage, tick_content_key
from data_manager.storage.postgres import COPY_MIN_ROWS, PostgresStorage
from data_manager.storage.sqlite import SQLiteStorage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from sqlalchemy import Connection

T0 = 1_727_996_400_000  # 2024-10-03T23:00:00Z
MINUTE = 60_000
SYM = "EUR/USD"


@dataclass
class Backend:
    """A storage under test plus a side door to its database for setup and checks."""

    name: str
    storage: PostgresStorage | SQLiteStorage
    execute: Callable[[str], Awaitable[None]] | None
    version_table: str

    def fresh(self) -> PostgresStorage | SQLiteStorage:
        """Another storage on the same database (same schema)."""
        if isinstance(self.storage, PostgresStorage):
            return PostgresStorage(self.storage._settings)
        return SQLiteStorage(self.storage.path)


@dataclass
class Spec:
    """Which backend to build (resolved synchronously, so server fixtures can be requested
    per parameter)."""

    name: str
    path: Path | None = None
    postgres_url: str | None = None
    pg_schema: str | None = None


@pytest.fixture(
    params=[
        "sqlite",
        "sqlite-memory",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ],
)
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Spec:
    if request.param == "postgres":
        return Spec(
            "postgres",
            postgres_url=request.getfixturevalue("postgres_url"),
            pg_schema=request.getfixturevalue("pg_schema"),
        )
    if request.param == "sqlite":
        return Spec("sqlite", path=tmp_path / "nested" / "store.sqlite3")
    return Spec("sqlite-memory")


@pytest_asyncio.fixture(loop_scope="session")
async def backend(spec: Spec) -> AsyncIterator[Backend]:
    """A connected storage with its schema created."""
    storage: PostgresStorage | SQLiteStorage
    execute: Callable[[str], Awaitable[None]] | None = None
    version_table = "dm_schema_version"
    if spec.postgres_url is not None and spec.pg_schema is not None:
        url, pg_schema = spec.postgres_url, spec.pg_schema
        settings = PostgresSettings(url=url, db_schema=pg_schema, pool_min=1, pool_max=4)

        async def pg_execute(sql: str) -> None:
            conn = await asyncpg.connect(url, timeout=10)
            try:
                await conn.execute(f'SET search_path TO "{pg_schema}"; {sql}', timeout=10)
            finally:
                await conn.close(timeout=10)

        storage, execute = PostgresStorage(settings), pg_execute
        version_table = f'"{pg_schema}".dm_schema_version'
    elif spec.path is not None:
        path = spec.path

        async def sqlite_execute(sql: str) -> None:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.executescript(sql)

        storage, execute = SQLiteStorage(path), sqlite_execute
    else:
        storage = SQLiteStorage(":memory:")
    await storage.connect()
    await storage.create_schema()
    try:
        yield Backend(spec.name, storage, execute, version_table)
    finally:
        await storage.close()


def tick(
    ts: int, *, source: str = "polygon", bid: float = 1.1, symbol: str = SYM, **kw: Any
) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.0002, source=source, **kw)


def candle(
    ts: int,
    *,
    source: str = "polygon",
    close: float = 1.1,
    closed: bool = True,
    timeframe: str = "1m",
    symbol: str = SYM,
) -> CandleData:
    return CandleData(
        symbol=symbol,
        timeframe=timeframe,
        timestamp=ts,
        open=1.1,
        high=max(1.2, close),
        low=min(1.0, close),
        close=close,
        source=source,
        is_closed=closed,
    )


def flow(
    ts: int, *, window_ms: int = 1000, ofi: float = 0.0, source: str = "sdk"
) -> OrderFlowMetrics:
    return OrderFlowMetrics(symbol=SYM, timestamp=ts, window_ms=window_ms, ofi=ofi, source=source)


def test_backends_satisfy_the_protocol() -> None:
    def accepts(storage: Storage) -> str:
        return storage.kind

    assert accepts(SQLiteStorage(":memory:")) == "sqlite"
    assert accepts(PostgresStorage(PostgresSettings(host="db", database="x"))) == "postgresql"


# --------------------------------------------------------------------------- ticks


async def test_tick_replay_is_idempotent(backend: Backend) -> None:
    s = backend.storage
    ticks = [tick(T0 + i) for i in range(50)]
    assert await s.write_ticks(ticks) == 50
    assert await s.write_ticks(ticks) == 0
    assert await s.write_ticks([*ticks[10:20], tick(T0 + 50)]) == 1
    assert len(await s.ticks_range(SYM, T0, T0 + 1000)) == 51


async def test_same_millisecond_distinct_quotes_are_both_kept(backend: Backend) -> None:
    s = backend.storage
    first, second = tick(T0, bid=1.1), tick(T0, bid=1.2)
    same_but_seq = tick(T0, bid=1.1, seq=7)
    assert await s.write_ticks([first, second, first, same_but_seq]) == 3
    stored = await s.ticks_range(SYM, T0, T0 + 1)
    assert sorted((t.bid, t.seq or 0) for t in stored) == [(1.1, 0), (1.1, 7), (1.2, 0)]


async def test_tick_round_trips_every_field(backend: Backend) -> None:
    s = backend.storage
    full = TickData(
        symbol="eurusd",
        timestamp=T0 + 123,
        bid=1.09551,
        ask=1.09553,
        source="polygon",
        volume=1_500_000.5,
        exchange=2**40,
        event_type="trade",
        use_case="fx",
        bid_size=1e6,
        ask_size=2e6,
        last_price=1.09552,
        last_size=250_000.0,
        aggressor="sell",
        seq=2**62,
        received_at=T0 + 130,
    )
    await s.write_ticks([full])
    got = await s.latest_tick(SYM)
    assert got == full
    assert got is not None
    assert got.timestamp_ms == T0 + 123
    assert got.mid == pytest.approx(1.09552)
    assert got.spread == full.spread
    assert got.model_dump() == full.model_dump()
    assert TickData.model_validate(got.model_dump()) == full


async def test_latest_tick_per_source_and_any_source(backend: Backend) -> None:
    s = backend.storage
    await s.write_ticks(
        [tick(T0 + i, source="a", bid=1.0 + i / 100) for i in range(6)]
        + [tick(T0 + 9, source="b", bid=1.5), tick(T0 + 3, source="b")]
        + [tick(T0 + 99, symbol="GBP/USD")]
    )
    newest = await s.latest_tick(SYM)
    assert newest is not None
    assert (newest.source, newest.timestamp) == ("b", T0 + 9)
    from_a = await s.latest_tick(SYM, source="a")
    assert from_a is not None
    assert (from_a.timestamp, from_a.bid) == (T0 + 5, 1.05)
    assert await s.latest_tick(SYM, source="nobody") is None
    assert await s.latest_tick("USD/JPY") is None
    many = await s.latest_ticks([SYM, "GBP/USD", "USD/JPY", SYM])
    assert {k: v.timestamp for k, v in many.items()} == {SYM: T0 + 9, "GBP/USD": T0 + 99}
    assert await s.latest_ticks([]) == {}


def _rank(item: TickData | OrderFlowMetrics) -> tuple[Any, ...]:
    return (item.timestamp, *tie_rank(item))


async def test_latest_at_one_timestamp_is_the_one_every_cache_keeps(backend: Backend) -> None:
    """Rows sharing the newest millisecond: the database answers the value the caches settle
    on (``codec.supersedes``: source, seq, then content), whatever order they were written
    in, so a read-through never serves or backfills a value L1 and L2 would refuse."""
    s = backend.storage
    eur = [
        tick(T0 - 1, source="\u00e9", bid=9.0),  # older, from the highest source
        tick(T0, source="ig", seq=1),
        tick(T0, source="ig", seq=2),  # ig's newest, although seq 1 has the larger key
        tick(T0, source="ig", bid=1.5),  # unsequenced: below any seq
        tick(T0, source="Zeta", seq=9, bid=2.0),  # "Z" sorts before "i"
        tick(T0, source="ig2", bid=0.5),  # the highest source of T0: the symbol's newest
    ]
    assert tick_content_key(eur[1]) > tick_content_key(eur[2])
    gbp = [
        tick(T0, symbol="GBP/USD", **kw)
        for kw in (
            {},
            {"ask_size": 1.0},
            {"bid_size": 5.0},
            {"bid_size": 5.0, "volume": 0.0, "aggressor": "buy"},
            {"bid_size": 5.0, "volume": 0.0, "aggressor": "sell"},  # the newest
            {"bid_size": 5.0, "volume": 0.0},
        )
    ]
    ticks = eur + gbp
    # Highest rank first, one transaction each: neither insertion order nor the key helps.
    for t in sorted(ticks, key=_rank, reverse=True):
        await s.write_ticks([t])
    newest = {
        sym: max((t for t in ticks if t.symbol == sym), key=_rank) for sym in (SYM, "GBP/USD")
    }
    assert (newest[SYM].source, newest["GBP/USD"].aggressor) == ("ig2", "sell")
    assert await s.latest_tick(SYM) == newest[SYM]
    assert await s.latest_tick("GBP/USD") == newest["GBP/USD"]
    assert await s.latest_ticks([SYM, "GBP/USD"]) == newest
    for source in ("ig", "Zeta", "\u00e9"):
        own = max((t for t in eur if t.source == source), key=_rank)
        assert await s.latest_tick(SYM, source=source) == own
    assert (await s.latest_tick(SYM, source="ig")).seq == 2  # type: ignore[union-attr]

    flows = [flow(T0, source=src, window_ms=w) for src in ("b", "a") for w in (60_000, 1000)]
    for metrics in flows:
        await s.write_order_flow([metrics])
    assert await s.latest_order_flow(SYM) == max(flows, key=_rank)  # b, 60 s
    assert await s.latest_order_flow(SYM, source="a") == flows[2]


async def test_tick_range_is_half_open_and_limited(backend: Backend) -> None:
    s = backend.storage
    start, end = T0 + 10, T0 + 20
    await s.write_ticks([tick(ts) for ts in (start - 1, start, start + 5, end - 1, end)])
    got = await s.ticks_range(SYM, start, end)
    assert [t.timestamp for t in got] == [start, start + 5, end - 1]
    assert [t.timestamp for t in await s.ticks_range(SYM, start, end, limit=2)] == [
        start,
        start + 5,
    ]
    assert await s.ticks_range(SYM, start, end, limit=0) == []
    assert await s.ticks_range(SYM, end, start) == []
    assert await s.ticks_range(SYM, start, end, source="other") == []


async def test_iter_ticks_pages_through_everything_once(backend: Backend) -> None:
    s = backend.storage
    # Several quotes per millisecond, so page boundaries fall inside a millisecond.
    ticks = [tick(T0 + i // 3, bid=1.0 + i / 1000, source="ab"[i % 2]) for i in range(40)]
    await s.write_ticks(ticks)
    streamed = [t async for t in s.iter_ticks(SYM, T0, T0 + 100, batch_size=4)]
    assert len(streamed) == 40
    assert sorted(t.bid for t in streamed) == sorted(t.bid for t in ticks)
    assert [t.timestamp for t in streamed] == sorted(t.timestamp for t in streamed)
    only_b = [t async for t in s.iter_ticks(SYM, T0, T0 + 100, source="b", batch_size=3)]
    assert len(only_b) == 20
    assert {t.source for t in only_b} == {"b"}
    bounded = [t.timestamp async for t in s.iter_ticks(SYM, T0 + 2, T0 + 5, batch_size=2)]
    assert bounded == [T0 + 2] * 3 + [T0 + 3] * 3 + [T0 + 4] * 3


async def test_iter_ticks_can_stop_early_and_release(backend: Backend) -> None:
    s = backend.storage
    await s.write_ticks([tick(T0 + i) for i in range(20)])
    async with contextlib.aclosing(s.iter_ticks(SYM, T0, T0 + 100, batch_size=5)) as it:
        async for t in it:
            if t.timestamp == T0 + 2:
                break
    assert s.pool_status().in_use == 0
    assert (await s.latest_tick(SYM)) is not None


# --------------------------------------------------------------------------- candles


async def test_candle_upsert_and_closed_candle_protection(backend: Backend) -> None:
    s = backend.storage
    assert await s.write_candles([candle(T0, close=1.11, closed=False)]) == 1
    assert await s.write_candles([candle(T0, close=1.12, closed=False)]) == 1
    assert [c.close for c in await s.latest_candles(SYM, "1m", 5)] == [1.12]
    assert await s.write_candles([candle(T0, close=1.13, closed=True)]) == 1
    # A late forming update never reopens a closed candle.
    assert await s.write_candles([candle(T0, close=1.5, closed=False)]) == 0
    (stored,) = await s.latest_candles(SYM, "1m", 5)
    assert (stored.close, stored.is_closed) == (1.13, True)
    # A closed correction does replace it; an identical replay changes nothing.
    assert await s.write_candles([candle(T0, close=1.14)]) == 1
    assert await s.write_candles([candle(T0, close=1.14)]) == 0
    # Within one batch the same rule holds: close then a stale forming copy -> closed wins.
    batch = [candle(T0 + MINUTE, close=1.2), candle(T0 + MINUTE, close=1.9, closed=False)]
    assert await s.write_candles(batch) == 1
    assert [c.close for c in await s.latest_candles(SYM, "1m", 5)] == [1.14, 1.2]


async def test_latest_candles_order_and_limit(backend: Backend) -> None:
    s = backend.storage
    await s.write_candles([candle(T0 + i * MINUTE, close=1.0 + i / 100) for i in range(10)])
    await s.write_candles([candle(T0, timeframe="5m")])
    last3 = await s.latest_candles(SYM, "1m", 3)
    assert [c.timestamp for c in last3] == [T0 + 7 * MINUTE, T0 + 8 * MINUTE, T0 + 9 * MINUTE]
    assert last3[-1].close == 1.09
    assert last3[-1].bucket_end == T0 + 10 * MINUTE
    assert len(await s.latest_candles(SYM, "1m", 100)) == 10
    assert await s.latest_candles(SYM, "1m", 0) == []
    assert await s.latest_candles(SYM, "1h", 5) == []
    assert [c.timeframe for c in await s.latest_candles(SYM, "5m", 5)] == ["5m"]


async def test_candle_source_resolution(backend: Backend) -> None:
    s = backend.storage
    # "broker" is stale (ends at minute 2), "polygon" is fresh (minute 5), "agg" in between.
    await s.write_candles(
        [candle(T0 + i * MINUTE, source="broker") for i in range(3)]
        + [candle(T0 + i * MINUTE, source="polygon") for i in range(6)]
        + [candle(T0 + i * MINUTE, source="agg") for i in range(4)]
    )

    async def sources(**kw: Any) -> set[str]:
        return {c.source for c in await s.latest_candles(SYM, "1m", 10, **kw)}

    assert await sources() == {"polygon"}
    assert await sources(preferred_sources=["broker"]) == {"broker"}
    assert await sources(preferred_sources=["missing", "agg", "broker"]) == {"agg"}
    assert await sources(preferred_sources=["missing"]) == {"polygon"}
    assert await sources(source="agg") == {"agg"}
    assert await sources(source="missing") == set()
    ranged = await s.candles_range(SYM, "1m", T0, T0 + 2 * MINUTE, preferred_sources=["agg"])
    assert [(c.source, c.timestamp) for c in ranged] == [("agg", T0), ("agg", T0 + MINUTE)]
    assert {c.source for c in await s.candles_range(SYM, "1m", T0, T0 + 10 * MINUTE)} == {"polygon"}


async def test_candles_range_is_half_open(backend: Backend) -> None:
    s = backend.storage
    await s.write_candles([candle(T0 + i * MINUTE) for i in range(6)])
    got = await s.candles_range(SYM, "1m", T0 + MINUTE, T0 + 4 * MINUTE)
    assert [c.timestamp for c in got] == [T0 + MINUTE, T0 + 2 * MINUTE, T0 + 3 * MINUTE]
    assert await s.candles_range(SYM, "1m", T0, T0 + 10 * MINUTE, source="none") == []
    assert await s.candles_range("USD/JPY", "1m", T0, T0 + MINUTE) == []


async def test_latest_candles_many(backend: Backend) -> None:
    s = backend.storage
    await s.write_candles(
        [candle(T0 + i * MINUTE) for i in range(5)]
        + [candle(T0 + i * 5 * MINUTE, timeframe="5m", source="agg") for i in range(3)]
        + [candle(T0 + i * MINUTE, symbol="GBP/USD", source="x") for i in range(2)]
        + [candle(T0 + 9 * MINUTE, symbol="GBP/USD", source="y")]
    )
    keys = [(SYM, "1m"), (SYM, "5m"), ("GBP/USD", "1m"), ("USD/JPY", "1m")]
    got = await s.latest_candles_many(keys, 2)
    assert set(got) == set(keys)
    assert [c.timestamp for c in got[(SYM, "1m")]] == [T0 + 3 * MINUTE, T0 + 4 * MINUTE]
    assert [c.timestamp for c in got[(SYM, "5m")]] == [T0 + 5 * MINUTE, T0 + 10 * MINUTE]
    assert [c.source for c in got[("GBP/USD", "1m")]] == ["y"]
    assert got[("USD/JPY", "1m")] == []
    preferred = await s.latest_candles_many([("GBP/USD", "1m")], 5, preferred_sources=["x"])
    assert [c.source for c in preferred[("GBP/USD", "1m")]] == ["x", "x"]
    assert await s.latest_candles_many([], 5) == {}


# --------------------------------------------------------------------------- order flow


async def test_order_flow_upsert_and_latest(backend: Backend) -> None:
    s = backend.storage
    assert await s.write_order_flow([flow(T0, ofi=1.0), flow(T0 + 1, ofi=2.0)]) == 2
    assert await s.write_order_flow([flow(T0, ofi=1.0)]) == 0
    assert await s.write_order_flow([flow(T0, ofi=3.0), flow(T0, ofi=4.0)]) == 1
    await s.write_order_flow([flow(T0 + 5, window_ms=60_000, source="other")])
    latest = await s.latest_order_flow(SYM)
    assert latest is not None
    assert (latest.timestamp, latest.window_ms, latest.source) == (T0 + 5, 60_000, "other")
    mine = await s.latest_order_flow(SYM, source="sdk")
    assert mine is not None
    assert (mine.timestamp, mine.ofi) == (T0 + 1, 2.0)
    assert mine.timestamp_ms == T0 + 1
    assert await s.latest_order_flow("USD/JPY") is None
    full = OrderFlowMetrics(
        symbol=SYM,
        timestamp=T0 + 10,
        window_ms=5000,
        ofi=-3.5,
        volume_delta=-10.0,
        buy_volume=5.0,
        sell_volume=15.0,
        imbalance=-0.5,
        vwap=1.1,
        toxicity=0.25,
        num_trades=12,
    )
    await s.write_order_flow([full])
    assert await s.latest_order_flow(SYM, source="sdk") == full


# --------------------------------------------------------------------------- deletes


async def test_delete_range(backend: Backend) -> None:
    s = backend.storage
    await s.write_ticks([tick(T0 + i) for i in range(10)] + [tick(T0, symbol="GBP/USD")])
    await s.write_candles(
        [candle(T0 + i * MINUTE) for i in range(4)] + [candle(T0, timeframe="5m")]
    )
    await s.write_order_flow([flow(T0 + i) for i in range(3)])
    assert await s.delete_range(SYM, T0 + 2, T0 + 5, "ticks") == 3
    left = [t.timestamp - T0 for t in await s.ticks_range(SYM, T0, T0 + 100)]
    assert left == [0, 1, 5, 6, 7, 8, 9]
    assert await s.latest_tick("GBP/USD") is not None
    assert await s.delete_range(SYM, T0, T0 + 2 * MINUTE, "candles", timeframe="1m") == 2
    assert len(await s.latest_candles(SYM, "5m", 5)) == 1
    assert await s.delete_range(SYM, T0, T0 + 10 * MINUTE, "candles") == 3
    assert await s.delete_range(SYM, T0, T0 + 2, "order_flow") == 2
    latest = await s.latest_order_flow(SYM)
    assert latest is not None
    assert latest.timestamp == T0 + 2


# --------------------------------------------------------------------------- schema


async def test_create_schema_is_idempotent(backend: Backend) -> None:
    s = backend.storage
    await s.write_ticks([tick(T0)])
    info = await s.create_schema()
    assert (info.version, info.created, info.migrated_from) == (SCHEMA_VERSION, False, None)
    other = backend.fresh()
    if backend.name == "sqlite-memory":
        return  # a second :memory: storage is a different database
    async with other:
        again = await other.create_schema()
        assert (again.version, again.created) == (SCHEMA_VERSION, False)
        assert await other.latest_tick(SYM) is not None


async def test_newer_schema_is_refused(backend: Backend) -> None:
    if backend.execute is None:
        pytest.skip("no side door into a private :memory: database")
    await backend.execute(
        f"INSERT INTO {backend.version_table} (version, description, applied_at) "
        f"VALUES ({SCHEMA_VERSION + 98}, 'from the future', "
        f"{'now()' if backend.name == 'postgres' else T0})"
    )
    with pytest.raises(
        ConfigurationError, match=rf"version {SCHEMA_VERSION + 98}.*{SCHEMA_VERSION}"
    ):
        await backend.storage.create_schema()


async def test_older_schema_is_migrated_forward(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = backend.storage
    await s.write_candles([candle(T0)])
    ran: list[str] = []

    def v2(conn: Connection, tables: schema.Tables) -> None:
        ran.append(backend.name)
        Index("ix_candles_v2_probe", tables.candles.c.ts).create(conn, checkfirst=True)

    steps = (*schema.MIGRATIONS, schema.Migration(SCHEMA_VERSION + 1, "probe index", v2))
    monkeypatch.setattr(schema, "MIGRATIONS", steps)
    info = await s.create_schema()
    assert (info.version, info.created, info.migrated_from) == (SCHEMA_VERSION + 1, False, 1)
    assert ran == [backend.name]
    engine = s._engine
    assert engine is not None
    async with engine.connect() as conn:
        indexes = await conn.run_sync(
            lambda c: inspect(c).get_indexes("candles", schema=s.tables.candles.schema)
        )
    assert "ix_candles_v2_probe" in {ix["name"] for ix in indexes}
    again = await s.create_schema()
    assert (again.version, again.migrated_from) == (SCHEMA_VERSION + 1, None)
    assert ran == [backend.name]
    assert len(await s.latest_candles(SYM, "1m", 5)) == 1


async def test_bad_value_is_a_query_execution_error_and_writes_nothing(backend: Backend) -> None:
    s = backend.storage
    good = tick(T0)
    # The model refuses this value; bypass it to see what the database does with bad data.
    too_big = TickData.model_construct(**(tick(T0 + 1).__dict__ | {"exchange": 2**63}))
    with pytest.raises(QueryExecutionError):
        await s.write_ticks([good, too_big])
    assert await s.latest_tick(SYM) is None
    assert await s.write_ticks([good]) == 1  # the write path still works afterwards


async def test_seq_beyond_64_bits_is_a_validation_error(backend: Backend) -> None:
    with pytest.raises(ValidationError, match="seq"):
        await backend.storage.write_ticks([tick(T0, seq=2**64)])
    assert await backend.storage.latest_tick(SYM) is None


async def test_large_batches_keep_the_same_semantics(backend: Backend) -> None:
    # Large enough for PostgreSQL's COPY path (smaller batches go as one array INSERT).
    n = 2 * COPY_MIN_ROWS
    s = backend.storage
    ticks = [tick(T0 + i // 2, bid=1.0 + i / 10_000) for i in range(n)]
    assert await s.write_ticks(ticks + ticks[:10]) == n
    assert await s.write_ticks(ticks) == 0
    assert len([t async for t in s.iter_ticks(SYM, T0, T0 + n)]) == n
    closed = [candle(T0 + i * MINUTE, close=1.1) for i in range(n)]
    assert await s.write_candles(closed) == n
    forming = [candle(T0 + i * MINUTE, close=1.3, closed=False) for i in range(n + 1)]
    assert await s.write_candles(forming) == 1  # only the new bucket
    latest = await s.latest_candles(SYM, "1m", 2)
    assert [(c.close, c.is_closed) for c in latest] == [(1.1, True), (1.3, False)]
    flows = [flow(T0 + i, ofi=float(i)) for i in range(n)]
    assert await s.write_order_flow(flows + flows[:5]) == n
    assert await s.write_order_flow(flows) == 0
