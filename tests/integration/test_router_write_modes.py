"""The router's write modes against PostgreSQL: ``buffered`` (stored by ``flush()``),
``journal`` (acknowledged once fsync'd to the local journal), ``sync`` (committed before the
call returns), per-call overrides, and ``close(timeout=...)`` with the database down.

Storage is checked through a separate connection, i.e. what another process sees.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import pytest
import pytest_asyncio

from data_manager import (
    CandleData,
    ConfigurationError,
    DataManagerSettings,
    DataRouter,
    OrderFlowMetrics,
    PostgresSettings,
    TickData,
    ValidationError,
)
from data_manager.journal import Journal
from data_manager.strategy import RoutingStrategy, strategy_from_mapping

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from tests.servers import PostgresServer

pytestmark = pytest.mark.postgres

T0: Final = 1_727_996_400_000
SYM: Final = "EUR/USD"
DEADLINE: Final = 60.0

#: Only what a test saves reaches storage (no derived candles or order flow), and the
#: write-behind batcher never flushes on its own: only flush() and close() store.
HELD: Final[dict[str, Any]] = {
    "aggregation": {"enabled": False},
    "order_flow": {"enabled": False},
    "batch": {"size": 100_000, "max_batch": 100_000, "flush_interval_seconds": 3600},
}


def held() -> RoutingStrategy:
    return strategy_from_mapping(HELD)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("POSTGRES_", "DRAGONFLY_")) or (
            name.startswith("DATA_MANAGER_") and not name.startswith("DATA_MANAGER_TEST_")
        ):
            monkeypatch.delenv(name)


def tick(i: int, *, source: str = "polygon") -> TickData:
    return TickData(
        symbol=SYM, timestamp=T0 + i, bid=1.1 + i / 1e6, ask=1.1002 + i / 1e6, source=source
    )


def candle(minute: int) -> CandleData:
    return CandleData(
        symbol=SYM,
        timeframe="1m",
        timestamp=T0 + minute * 60_000,
        open=1.1,
        high=1.2,
        low=1.0,
        close=1.15,
        source="polygon",
    )


def flow(i: int) -> OrderFlowMetrics:
    return OrderFlowMetrics(symbol=SYM, timestamp=T0 + i, window_ms=60_000, ofi=0.5)


def journal_bytes(journal_dir: Path) -> int:
    """Bytes in the journal segments under ``journal_dir`` (every instance)."""
    return sum(p.stat().st_size for p in journal_dir.glob("*/*.seg"))


class Side:
    """A plain asyncpg connection to the test schema, beside the router."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema

    async def count(self, table: str = "ticks") -> int:
        return int(await self.conn.fetchval(f'SELECT count(*) FROM "{self.schema}".{table}'))


@pytest_asyncio.fixture(loop_scope="session")
async def side(postgres_url: str, pg_schema: str) -> AsyncIterator[Side]:
    conn = await asyncpg.connect(postgres_url, timeout=10)
    try:
        yield Side(conn, pg_schema)
    finally:
        await conn.close(timeout=10)


def settings(postgres_url: str, pg_schema: str, tmp_path: Path, **kw: Any) -> DataManagerSettings:
    values: dict[str, Any] = {
        "postgres": PostgresSettings(url=postgres_url, db_schema=pg_schema, pool_min=1, pool_max=4),
        "watch_strategy": False,
        "journal_dir": tmp_path / "journal",
    }
    values.update(kw)
    return DataManagerSettings(**values)


async def test_buffered_is_stored_by_flush(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side
) -> None:
    n = 1000
    s = settings(postgres_url, pg_schema, tmp_path, write_mode="buffered")
    async with DataRouter(s, strategy=held()) as router:
        for i in range(n):
            await router.save_tick(tick(i))
        await router.save_candle(candle(0))
        await router.save_order_flow(flow(0))
        assert await side.count() == 0  # queued, not stored
        assert (await router.health_check()).write_path.queue_depth == n + 2
        await router.flush()
        assert await side.count() == n
        assert await side.count("candles") == 1
        assert await side.count("order_flow") == 1
        assert (await router.health_check()).write_path.queue_depth == 0
        await router.flush()  # nothing queued: returns at once
        assert await side.count() == n


async def test_flush_waits_for_concurrent_producers_accepted_before_it(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side
) -> None:
    s = settings(postgres_url, pg_schema, tmp_path, write_mode="buffered")
    async with DataRouter(s, strategy=held()) as router:

        async def produce(offset: int) -> None:
            for i in range(250):
                await router.save_tick(tick(offset + i))

        await asyncio.gather(*(produce(k * 1000) for k in range(4)))
        await router.flush()
        assert await side.count() == 1000


@pytest.mark.parametrize("sqlstate", ["53100", "25006", "40P01", "55P03"])
async def test_a_server_that_cannot_store_now_is_retried_not_dead_lettered(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side, sqlstate: str
) -> None:
    """Disk full, read-only (a failover), a deadlock or a lock wait: the data is not at
    fault, so it waits (retries, then the journal) instead of being refused."""
    q = f'"{pg_schema}"'
    s = settings(postgres_url, pg_schema, tmp_path, write_mode="buffered")
    async with DataRouter(s, strategy=held()) as router:
        await side.conn.execute(f"CREATE TABLE {q}.cannot_now (on_ boolean)")
        await side.conn.execute(f"INSERT INTO {q}.cannot_now VALUES (true)")
        await side.conn.execute(
            f"CREATE FUNCTION {q}.cannot_now() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF (SELECT on_ FROM {q}.cannot_now) THEN "
            f"RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END IF; "
            "RETURN NEW; END $$"
        )
        await side.conn.execute(
            f"CREATE TRIGGER cannot_now BEFORE INSERT ON {q}.ticks "
            f"FOR EACH ROW EXECUTE FUNCTION {q}.cannot_now()"
        )
        for i in range(50):
            await router.save_tick(tick(i))
        flushing = asyncio.create_task(router.flush())
        async with asyncio.timeout(DEADLINE):
            while not router._ingest.stats().retries:  # noqa: ASYNC110 - no event to await
                await asyncio.sleep(0.01)
        await side.conn.execute(f"UPDATE {q}.cannot_now SET on_ = false")
        async with asyncio.timeout(DEADLINE):
            await flushing
        assert await side.count() == 50
        assert router._ingest.stats().dead_lettered == 0


async def test_a_statement_that_fails_again_every_time_does_not_hold_writes_back(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side
) -> None:
    # 53400 (a configured limit exceeded) for one symbol's rows: dead-lettered, and the
    # rest is stored; retried as "cannot now" it would block every write for ever.
    q = f'"{pg_schema}"'
    s = settings(postgres_url, pg_schema, tmp_path, write_mode="buffered")
    async with DataRouter(s, strategy=held()) as router:
        await side.conn.execute(
            f"CREATE FUNCTION {q}.over_limit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.symbol = 'GBP/USD' THEN "
            "RAISE EXCEPTION 'injected' USING ERRCODE = '53400'; END IF; "
            "RETURN NEW; END $$"
        )
        await side.conn.execute(
            f"CREATE TRIGGER over_limit BEFORE INSERT ON {q}.ticks "
            f"FOR EACH ROW EXECUTE FUNCTION {q}.over_limit()"
        )
        await router.save_tick(tick(0).model_copy(update={"symbol": "GBP/USD"}))
        await router.save_tick(tick(1))
        async with asyncio.timeout(DEADLINE):
            await router.flush()
        assert await side.count() == 1
        assert router._ingest.stats().dead_lettered == 1


async def test_a_bulk_candle_is_not_overwritten_by_an_adopted_journal(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side
) -> None:
    # A dead router's journal holds an older version of a bucket (acknowledged in journal
    # mode, not stored), behind many other records: the next router replays it in the
    # background while a bulk import stores a newer version of that bucket.
    def version(minute: int, close: float) -> CandleData:
        return candle(minute).model_copy(update={"close": close})

    dead = Journal(tmp_path / "journal", instance_id="dead-router")
    await dead.open()
    await dead.append([version(m, 1.15) for m in range(1, 20_001)] + [version(0, 1.11)])
    await dead.close()
    s = settings(postgres_url, pg_schema, tmp_path, write_mode="buffered")
    async with DataRouter(s, strategy=held()) as router:
        assert (await router.health_check()).write_path.details["backlog_journals"] == 1
        assert await router.save_candles_bulk([version(0, 1.19)]) == 1
        await router.flush()
    close = await side.conn.fetchval(
        f'SELECT close FROM "{pg_schema}".candles WHERE ts = to_timestamp($1 / 1000.0)', T0
    )
    assert close == 1.19


async def test_journal_mode_is_on_disk_before_it_is_stored(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side
) -> None:
    n = 200
    journal = tmp_path / "journal"
    s = settings(postgres_url, pg_schema, tmp_path, write_mode="journal")
    async with DataRouter(s, strategy=held()) as router:
        assert journal_bytes(journal) <= 64  # at most an empty segment
        await asyncio.gather(*(router.save_tick(tick(i)) for i in range(n)))  # group commit
        on_disk = journal_bytes(journal)
        assert on_disk > n * 40  # every acknowledged record is in a segment file
        assert await side.count() == 0
        health = await router.health_check()
        assert health.write_path.journal_records == n
        assert health.status == "healthy", health.reason  # waiting for its batch: normal
        await router.flush()
        assert await side.count() == n
        health = await router.health_check()
        assert health.write_path.journal_records == 0
        assert health.status == "healthy", health.reason


def journal_router_with_candles(postgres_url: str, pg_schema: str, tmp_path: Path) -> DataRouter:
    """A ``journal``-mode router that aggregates 1m candles (see HELD for the rest)."""
    strategy = strategy_from_mapping(
        {**HELD, "aggregation": {"enabled": True, "timeframes": ["1m"]}}
    )
    s = settings(postgres_url, pg_schema, tmp_path, write_mode="journal")
    return DataRouter(s, strategy=strategy)


async def test_a_journaled_tick_whose_caller_gave_up_still_reaches_the_candles(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side
) -> None:
    # The caller's timeout fires in the very loop pass that made its append durable: the
    # tick is accepted (stored), so the candles must count it too.
    async with journal_router_with_candles(postgres_url, pg_schema, tmp_path) as router:
        await router.save_tick(tick(1))  # the series' forming bar is restored (none)
        ingest = router._ingest
        assert ingest is not None
        durable = ingest._on_durable
        calls: list[asyncio.Task[None]] = []

        def then_cancel(first: int, items: Any) -> None:
            durable(first, items)
            calls[0].cancel()

        ingest._on_durable = then_cancel  # type: ignore[method-assign]
        calls.append(asyncio.create_task(router.save_tick(tick(2))))
        with pytest.raises(asyncio.CancelledError):
            await calls[0]
        ingest._on_durable = durable  # type: ignore[method-assign]
        await router.flush()
        assert await side.count() == 2
        (bar,) = await router.get_latest_candles(SYM, "1m", 1)
        assert bar.close == tick(2).mid
        assert bar.end_time == tick(2).timestamp


async def test_a_journaled_tick_whose_caller_gave_up_mid_append_still_reaches_the_candles(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side
) -> None:
    # The caller is cancelled while its append waits for the group's sync: the append goes
    # on and is kept, so the tick is accepted (stored) and the candles must count it too.
    async with journal_router_with_candles(postgres_url, pg_schema, tmp_path) as router:
        await router.save_tick(tick(1))  # the series' forming bar is restored (none)
        call = asyncio.create_task(router.save_tick(tick(2)))
        await asyncio.sleep(0)  # its append is queued for the next group
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert router._ingest is not None
        journal = router._ingest.journal
        assert journal is not None
        await journal.wait_idle()
        await router.flush()
        assert await side.count() == 2
        (bar,) = await router.get_latest_candles(SYM, "1m", 1)
        assert bar.close == tick(2).mid
        assert bar.end_time == tick(2).timestamp


async def test_sync_mode_is_committed_when_the_call_returns(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side
) -> None:
    s = settings(postgres_url, pg_schema, tmp_path, write_mode="sync")
    async with DataRouter(s, strategy=held()) as router:
        for i in range(5):
            await router.save_tick(tick(i))
            assert await side.count() == i + 1
        await router.save_candle(candle(0))
        assert await side.count("candles") == 1
        await router.save_order_flow(flow(0))
        assert await side.count("order_flow") == 1
        assert journal_bytes(tmp_path / "journal") <= 64


async def test_per_call_mode_overrides_the_setting(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side
) -> None:
    s = settings(postgres_url, pg_schema, tmp_path, write_mode="buffered")
    async with DataRouter(s, strategy=held()) as router:
        await router.save_tick(tick(0), mode="sync")
        assert await side.count() == 1
        await router.save_tick(tick(1))  # the default: buffered
        await router.save_tick(tick(2), mode="buffered")
        await router.save_tick(tick(3), mode="journal")
        assert journal_bytes(tmp_path / "journal") > 64
        assert await side.count() == 1
        await router.save_candle(candle(0), mode="sync")
        assert await side.count("candles") == 1
        await router.flush()
        assert await side.count() == 4

    s = settings(postgres_url, pg_schema, tmp_path / "b", write_mode="sync")
    async with DataRouter(s, strategy=held()) as router:
        await router.save_tick(tick(10), mode="buffered")
        assert await side.count() == 4
        await router.save_tick(tick(11))  # the default: sync
        assert await side.count() == 5  # committed; the buffered one may still be queued
        await router.flush()
        assert await side.count() == 6


async def test_unknown_mode_is_a_validation_error(
    postgres_url: str, pg_schema: str, tmp_path: Path, side: Side
) -> None:
    s = settings(postgres_url, pg_schema, tmp_path)
    async with DataRouter(s, strategy=held()) as router:
        for bad in ("fast", "Buffered", "", None, 1):
            with pytest.raises(ValidationError):
                await router.save_tick(tick(0), mode=bad)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await router.save_candle(candle(0), mode="async")  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await router.save_order_flow(flow(0), mode="later")  # type: ignore[arg-type]
        assert await router.get_latest_tick(SYM) is None
        await router.flush()
        assert await side.count() == 0
    with pytest.raises(ConfigurationError, match="write_mode"):
        settings(postgres_url, pg_schema, tmp_path, write_mode="fast")


@pytest.mark.slow
async def test_close_with_the_database_down_keeps_the_rest_for_the_next_router(
    postgres_server_factory: Callable[[], PostgresServer], tmp_path: Path
) -> None:
    server = postgres_server_factory()
    journal = tmp_path / "journal"

    def cfg() -> DataManagerSettings:
        return DataManagerSettings(
            postgres=PostgresSettings(
                url=server.url, pool_min=1, pool_max=2, connect_timeout=1, pool_timeout=1
            ),
            watch_strategy=False,
            journal_dir=journal,
            write_mode="buffered",
            init_deadline_seconds=30,
        )

    n_stored, n_held, n_journaled = 300, 700, 50
    router = DataRouter(cfg(), strategy=held())
    await router.initialize()
    for i in range(n_stored):
        await router.save_tick(tick(i))
    await router.flush()
    for i in range(n_stored, n_stored + n_held):
        await router.save_tick(tick(i))  # buffered: acknowledged, queued in memory
    for i in range(n_stored + n_held, n_stored + n_held + n_journaled):
        await router.save_tick(tick(i), mode="journal")
    total = n_stored + n_held + n_journaled

    server.stop()
    await asyncio.wait_for(router.close(timeout=20), DEADLINE)
    assert journal_bytes(journal) > (n_held + n_journaled) * 40  # the rest is on disk

    server.start()
    conn = await asyncpg.connect(server.url, timeout=10)
    try:
        assert await conn.fetchval("SELECT count(*) FROM ticks") == n_stored
        async with DataRouter(cfg(), strategy=held()) as successor:
            await asyncio.wait_for(successor.flush(), DEADLINE)
            assert await conn.fetchval("SELECT count(*) FROM ticks") == total
            got = await successor.get_ticks(SYM, T0, T0 + total)
            assert [t.timestamp for t in got] == [T0 + i for i in range(total)]  # each once
            assert (await successor.health_check()).write_path.journal_records == 0
        dupes = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM ticks GROUP BY source, ts, bid "
            "HAVING count(*) > 1) d"
        )
        assert dupes == 0
    finally:
        await conn.close(timeout=10)
    assert journal_bytes(journal) == 0  # replayed journals are removed
