"""The cache bus sender while L2 cannot take its batches."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run in a child: a sender that spins without awaiting blocks the event loop for good, and
# only a process timeout can tell.
CHILD = textwrap.dedent(
    """
    import asyncio
    from data_manager.breaker import CircuitBreaker
    from data_manager.cache.bus import CacheBus
    from data_manager.cache.redis import RedisCache
    from data_manager.clock import ManualClock
    from data_manager.models import CandleData

    TS = 1_727_996_400_000

    async def main() -> None:
        breaker = CircuitBreaker("l2", failure_threshold=1, reset_timeout=5.0, clock=ManualClock())
        breaker.record_failure()  # L2 was found down: every write is refused without I/O
        cache = RedisCache(url="redis://127.0.0.1:1/0", key_prefix="t", breaker=breaker,
                           socket_timeout=0.2)
        bus = CacheBus(cache, derived_batch=2)
        for i in range(3):  # one more candle than a batch holds
            bus.publish(CandleData(symbol="EUR/USD", timeframe="1m", timestamp=TS + i * 60_000,
                                   open=1.1, high=1.1, low=1.1, close=1.1, source="feed"))
        await asyncio.sleep(0.05)  # the loop must get this turn back from the sender
        stats = bus.stats()
        print("loop alive", stats.dropped, stats.published)

    asyncio.run(main())
    """
)


def test_a_batch_l2_cannot_take_does_not_block_the_event_loop() -> None:
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the bus sender retried a failed batch without yielding") from exc
    assert out.returncode == 0, out.stderr
    # Kept for a later batch, not dropped; nothing published while L2 is down.
    assert out.stdout.split() == ["loop", "alive", "0", "0"], out.stdout
