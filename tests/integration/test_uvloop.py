"""The router on uvloop's event loop, as many trading services run it.

Two routers share a schema and a key prefix inside one uvloop loop: the writer saves in
``journal`` mode (the default committer, Linux AIO where it works, watches an eventfd
with ``add_reader``), the reader gets the writer's ticks through the cache bus
(subscriber connection, pub/sub into L1) and reads them back through L1, L2 and the
database. The rest of the suite runs on asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import pytest

from data_manager import (
    DataManagerSettings,
    DataRouter,
    DragonflySettings,
    PostgresSettings,
    TickData,
)
from data_manager import journal as journal_module
from data_manager.strategy import strategy_from_mapping

if sys.platform != "win32":  # a test dependency everywhere else
    import uvloop

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not run on Windows"),
]

T0: Final = 1_727_996_400_000
SYM: Final = "EUR/USD"
N: Final = 300
DEADLINE: Final = 60.0
#: Only saved ticks reach storage, and only flush() stores them.
HELD: Final[dict[str, Any]] = {
    "aggregation": {"enabled": False},
    "order_flow": {"enabled": False},
    "batch": {"size": 100_000, "max_batch": 100_000, "flush_interval_seconds": 3600},
}


def tick(i: int) -> TickData:
    return TickData(
        symbol=SYM, timestamp=T0 + i, bid=1.1 + i / 1e6, ask=1.1002 + i / 1e6, source="polygon"
    )


def test_journal_mode_and_the_cache_bus_on_uvloop(
    postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    def settings(name: str, **kw: Any) -> DataManagerSettings:
        return DataManagerSettings(
            postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema),
            dragonfly=DragonflySettings(url=redis_url, key_prefix=redis_prefix),
            watch_strategy=False,
            journal_dir=tmp_path / name,
            **kw,
        )

    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        strategy = strategy_from_mapping(HELD)
        async with (
            DataRouter(settings("reader"), strategy=strategy) as reader,
            DataRouter(settings("writer", write_mode="journal"), strategy=strategy) as writer,
        ):
            journal = writer._ingest._journal if writer._ingest is not None else None
            assert journal is not None
            assert isinstance(journal._committer, journal_module._AioCommitter)

            await asyncio.gather(*(writer.save_tick(tick(i)) for i in range(N)))
            assert (await writer.health_check()).write_path.journal_records == N  # on disk
            assert 0 < journal.stats().fsyncs < N  # concurrent saves shared syncs

            def reader_has_the_newest() -> bool:
                got = reader._l1.get_tick(SYM)  # filled by the writer's bus messages
                return got is not None and got.timestamp == T0 + N - 1

            async with asyncio.timeout(DEADLINE):  # pub/sub delivery has no event to await
                while not reader_has_the_newest():  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
            latest = await reader.get_latest_tick(SYM)
            assert latest is not None
            assert (latest.timestamp, latest.bid) == (T0 + N - 1, tick(N - 1).bid)

            await writer.flush()
            conn = await asyncpg.connect(postgres_url, timeout=10)
            try:
                stored = await conn.fetchval(f'SELECT count(*) FROM "{pg_schema}".ticks')
            finally:
                await conn.close(timeout=10)
            assert stored == N
            assert (await writer.health_check()).write_path.journal_records == 0
            ticks = await reader.get_ticks(SYM, T0, T0 + N)
            assert [t.timestamp for t in ticks] == [T0 + i for i in range(N)]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
