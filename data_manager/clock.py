"""Injectable clocks: the SDK never calls ``time`` directly where a test needs control."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """Wall-clock milliseconds (event-time comparisons) and a monotonic clock (TTLs)."""

    def time_ms(self) -> int:
        """Unix time in milliseconds."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...


class SystemClock:
    """The real clocks."""

    __slots__ = ()

    def time_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to; for tests of TTLs and staleness."""

    __slots__ = ("_mono", "_wall_ms")

    def __init__(self, wall_ms: int = 1_727_996_400_000, monotonic: float = 1_000.0) -> None:
        self._wall_ms = wall_ms
        self._mono = monotonic

    def time_ms(self) -> int:
        return self._wall_ms

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        self._mono += seconds
        self._wall_ms += round(seconds * 1000)
