"""A second :class:`~data_manager.router.DataRouter` in its own OS process.

``tests/integration/test_router_coherence.py`` runs it to check that two processes see each
other's writes through the L2 pub/sub bus. Usage::

    python tests/integration/_router_child.py PG_URL SCHEMA REDIS_URL PREFIX JOURNAL_DIR \\
        SYMBOL TS COUNT

Conversation, one line each way:

1. child → ``ready``: its router is open and subscribed.
2. The parent saves a tick of SYMBOL at TS. The child waits until its L1 holds it (pushed
   by pub/sub, not read from a lower tier), saves ticks at TS+1 … TS+COUNT, sends them on the
   bus and answers ``saw <TS>``.
3. parent → any line (or EOF): the child closes its router and exits 0.

Exit codes: 0 ok, 2 the parent's tick never reached this process's L1, 3 bad arguments.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Final

from data_manager.models import TickData
from data_manager.router import DataRouter
from data_manager.settings import DataManagerSettings, DragonflySettings, PostgresSettings
from data_manager.strategy import strategy_from_mapping

DEADLINE: Final = 20.0  # seconds; only reached when something is broken


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(argv: list[str]) -> int:
    if len(argv) != 8:
        sys.stderr.write(__doc__ or "")
        return 3
    pg_url, schema, redis_url, prefix, journal, symbol, ts_text, count_text = argv
    ts, count = int(ts_text), int(count_text)
    settings = DataManagerSettings(
        postgres=PostgresSettings(url=pg_url, db_schema=schema),
        dragonfly=DragonflySettings(url=redis_url, key_prefix=prefix),
        watch_strategy=False,
        journal_dir=Path(journal),
        write_mode="sync",
    )
    strategy = strategy_from_mapping({"aggregation": {"enabled": False}})
    async with DataRouter(settings, strategy=strategy) as router:
        _say("ready")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while True:
            # L1 only: a read through get_latest_tick could fetch it from L2 or the database.
            seen = router.cache.l1.get_tick(symbol)
            if seen is not None and seen.timestamp >= ts:
                break
            if loop.time() > deadline:
                return 2
            await asyncio.sleep(0.005)
        for i in range(1, count + 1):
            await router.save_tick(
                TickData(symbol=symbol, timestamp=ts + i, bid=2.0, ask=2.0001, source="child")
            )
        bus = router._bus
        if bus is not None:
            await asyncio.wait_for(bus.flush(), DEADLINE)
        _say(f"saw {seen.timestamp}")
        await loop.run_in_executor(None, sys.stdin.readline)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
