"""A small circuit breaker shared by the cache tier and the write path.

States: ``closed`` (calls pass) → after ``failure_threshold`` consecutive failures →
``open`` (calls are refused without being attempted) → after ``reset_timeout`` seconds one
probe is let through (``half_open``) → success closes it, failure re-opens it.
"""

from __future__ import annotations

import enum
import logging

from data_manager.clock import Clock, SystemClock

__all__ = ["BreakerState", "CircuitBreaker"]

logger = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    """Circuit-breaker state."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures and short-circuits calls while a backend is down.

    Args:
        name: Shown in logs and health (``"postgresql"``, ``"l2"``).
        failure_threshold: Consecutive failures that open the breaker.
        reset_timeout: Seconds the breaker stays open before a probe is allowed.
        clock: Monotonic time source (injectable for tests).
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_opened_at",
        "_probe_in_flight",
        "_state",
        "failure_threshold",
        "name",
        "opened_count",
        "reset_timeout",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        if failure_threshold < 1 or reset_timeout < 0:
            msg = "failure_threshold must be >= 1 and reset_timeout >= 0"
            raise ValueError(msg)
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._clock: Clock = clock or SystemClock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        """Current state; an open breaker past its timeout reports ``half_open``."""
        if (
            self._state is BreakerState.OPEN
            and self._clock.monotonic() - self._opened_at >= self.reset_timeout
        ):
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        return self._failures

    def allow(self) -> bool:
        """Return True when a call may be attempted now.

        While half-open exactly one caller (the probe) is allowed until it reports back.
        """
        if self._state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            self._state = BreakerState.HALF_OPEN
            return True
        return False

    def record_success(self) -> None:
        """A call succeeded: close the breaker."""
        if self._state is not BreakerState.CLOSED:
            logger.info("circuit %s closed: backend answered again", self.name)
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_in_flight = False

    def record_failure(self) -> None:
        """A call failed: count it and open the breaker at the threshold."""
        self._failures += 1
        self._probe_in_flight = False
        if self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold
        ):
            if self._state is BreakerState.CLOSED:
                logger.warning(
                    "circuit %s opened after %d consecutive failures",
                    self.name,
                    self._failures,
                )
                self.opened_count += 1
            self._state = BreakerState.OPEN
            self._opened_at = self._clock.monotonic()

    def release(self) -> None:
        """A call ended without an answer (its caller was cancelled): count nothing, and let
        a half-open breaker send another probe."""
        self._probe_in_flight = False

    def reset(self) -> None:
        """Forget all failures (used after a fork or a reconnect)."""
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_in_flight = False
