"""Reads the routes do not send to replicas stay on the primary, through a router.

A real primary and a hot standby of it (``tests/servers_replica.py``); the replica lags
because its WAL replay is paused (``pg_wal_replay_pause()``), while the router's
:class:`ManualClock` keeps it within the lag bound: a replica any read route would use.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import pytest

from data_manager.clock import ManualClock
from data_manager.models import CandleData, TickData
from data_manager.router import DataRouter
from data_manager.settings import DataManagerSettings, PostgresReplicaSettings, PostgresSettings
from data_manager.strategy import strategy_from_mapping
from tests.integration.test_replicas import until

if TYPE_CHECKING:
    from pathlib import Path

    from tests.servers import PostgresServer
    from tests.servers_replica import ReplicaServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

T0: Final = 1_727_996_400_000  # a minute's start
TIMEOUT: Final = 10.0
STRATEGY: Final = {"aggregation": {"timeframes": ["1m"]}, "order_flow": {"enabled": False}}


def tick(offset: int, bid: float) -> TickData:
    return TickData(symbol="EUR/USD", timestamp=T0 + offset, bid=bid, ask=bid + 0.0002, source="x")


def candle(minute: int) -> CandleData:
    return CandleData(
        symbol="EUR/USD",
        timeframe="1m",
        timestamp=T0 + minute * 60_000,
        open=1.1,
        high=1.2,
        low=1.0,
        close=1.1,
        source="vendor",
    )


async def fetch(url: str, sql: str) -> list[Any]:
    conn = await asyncpg.connect(url, timeout=TIMEOUT)
    try:
        return list(await conn.fetch(sql, timeout=TIMEOUT))
    finally:
        await conn.close(timeout=TIMEOUT)


async def bar(url: str, sql: str) -> list[tuple[float, ...]]:
    """(high, close) of each row, rounded: the aggregated price is the mid."""
    return [tuple(round(v, 5) for v in row) for row in await fetch(url, sql)]


async def test_a_router_continues_another_routers_bar_from_the_primary(
    cluster: tuple[PostgresServer, ReplicaServer], tmp_path: Path
) -> None:
    primary, replica = cluster
    schema = f"dmrepl_{secrets.token_hex(4)}"
    bar_sql = f"SELECT high, close FROM \"{schema}\".candles WHERE source = 'agg:x'"

    def router(name: str, *, replicas: bool) -> DataRouter:
        pg = PostgresSettings(
            url=primary.url,
            db_schema=schema,
            replicas=(PostgresReplicaSettings(url=replica.url),) if replicas else (),
        )
        # Buffered: B's tick is not written yet when its series' restore reads the bar.
        settings = DataManagerSettings(
            postgres=pg, watch_strategy=False, journal_dir=tmp_path / name, write_mode="buffered"
        )
        return DataRouter(settings, clock=ManualClock(), strategy=strategy_from_mapping(STRATEGY))

    a = router("a", replicas=False)
    b = router("b", replicas=True)
    await a.initialize()
    await b.initialize()
    try:
        await a.save_tick(tick(0, 1.10))
        await a.run_maintenance()  # the forming bar is queued ...
        await a.flush()  # ... and stored: high 1.10
        replicated = b.storage

        async def replica_serves() -> bool:
            # B's schema setup counts as a write to every symbol: the replica serves B's
            # reads once a check sees it replayed past that (and A's bar).
            await replicated.check_now()  # type: ignore[attr-defined]
            before = replicated.replica_status()[0].reads  # type: ignore[attr-defined]
            got = await replicated.latest_candles("EUR/USD", "1m", 1, source="agg:x")
            served = replicated.replica_status()[0].reads > before  # type: ignore[attr-defined]
            return served and len(got) == 1

        await until(replica_serves, "the replica to replay the bar and serve B's reads")
        await fetch(replica.url, "SELECT pg_wal_replay_pause()")
        await a.save_tick(tick(1_000, 1.30))
        await a.close()  # its bar is stored forming, on the primary only: high 1.30
        assert await bar(primary.url, bar_sql) == [(1.3001, 1.3001)]
        assert await bar(replica.url, bar_sql) == [(1.1001, 1.1001)]
        status = await replicated.check_now()  # type: ignore[attr-defined]
        assert [s.healthy for s in status] == [True]  # a replica the routes may use

        await b.save_tick(tick(2_000, 1.20))  # continues A's bar
        await b.run_maintenance()
        await b.flush()
    finally:
        await a.close()
        await b.close()
        await fetch(replica.url, "SELECT pg_wal_replay_resume()")
    try:
        assert await bar(primary.url, bar_sql) == [(1.3001, 1.2001)]  # A's high kept
    finally:
        await fetch(primary.url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_iter_candles_reads_where_get_candles_reads(
    cluster: tuple[PostgresServer, ReplicaServer], tmp_path: Path
) -> None:
    # The default get_candles route is the primary: iter_candles (and the DataFrames and
    # exports built on it) must not stop at a lagging replica's newest candle.
    primary, replica = cluster
    schema = f"dmrepl_{secrets.token_hex(4)}"
    pg = PostgresSettings(
        url=primary.url, db_schema=schema, replicas=(PostgresReplicaSettings(url=replica.url),)
    )
    settings = DataManagerSettings(postgres=pg, watch_strategy=False, journal_dir=tmp_path / "j")
    router = DataRouter(settings, clock=ManualClock(), strategy=strategy_from_mapping(STRATEGY))
    writer = DataRouter(
        settings.model_copy(update={"postgres": pg.model_copy(update={"replicas": ()})}),
        clock=ManualClock(),
        strategy=strategy_from_mapping(STRATEGY),
    )
    await router.initialize()
    await writer.initialize()
    try:
        replicated = router.storage

        async def replica_serves() -> bool:
            await replicated.check_now()  # type: ignore[attr-defined]
            before = replicated.replica_status()[0].reads  # type: ignore[attr-defined]
            await replicated.latest_candles("EUR/USD", "1m", 1, source="vendor")
            return replicated.replica_status()[0].reads > before  # type: ignore[attr-defined]

        await until(replica_serves, "the replica to serve the router's reads")
        await fetch(replica.url, "SELECT pg_wal_replay_pause()")
        bars = [candle(minute) for minute in range(5)]
        await writer.save_candles_bulk(bars)  # another router's write: the replica lacks it
        status = await replicated.check_now()  # type: ignore[attr-defined]
        assert [s.healthy for s in status] == [True]

        end = T0 + 10 * 60_000
        got = await router.get_candles("EUR/USD", "1m", T0, end, source="vendor")
        assert len(got) == 5
        streamed = [c async for c in router.iter_candles("EUR/USD", "1m", T0, end)]
        assert streamed == got
    finally:
        await writer.close()
        await router.close()
        await fetch(replica.url, "SELECT pg_wal_replay_resume()")
        await fetch(primary.url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
