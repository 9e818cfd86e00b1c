"""Real-time tick processors: the synchronous branch that runs beside storage.

A :class:`TickProcessor` sees every tick of the symbols it asks for, synchronously, on the
router's hot path, and returns a result (an indicator value, a signal) or ``None``.
:class:`ProcessorRegistry` runs them, isolates their failures and measures them.

The registry never blocks storage because it does nothing but call ``on_tick``: no I/O, no
awaits, no queues. That also means it cannot interrupt a processor, so a processor must be
cheap (microseconds). One that needs heavy work (a model, a network call, a large window
recomputation) should only enqueue the tick in ``on_tick`` — into an ``asyncio.Queue`` its
own task drains, or a ``queue.SimpleQueue`` read by its own thread — and do the work there.
Processors flagged ``slow`` in :meth:`ProcessorRegistry.stats` are the ones to move.

Shipped examples: :class:`IncrementalSMA` and :class:`IncrementalRSI` (Wilder), both O(1) per
tick and per symbol.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, NamedTuple, Protocol, runtime_checkable

from data_manager.clock import Clock, SystemClock
from data_manager.errors import ConfigurationError, ValidationError
from data_manager.models import normalize_symbol

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from data_manager.models import TickData

__all__ = [
    "IncrementalRSI",
    "IncrementalSMA",
    "ProcessorOutput",
    "ProcessorRegistry",
    "ProcessorStats",
    "TickProcessor",
]

logger = logging.getLogger(__name__)

PriceField = Literal["mid", "bid", "ask", "last"]
_PRICE_FIELDS: Final = ("mid", "bid", "ask", "last")
#: Weight of the latest call in a processor's moving-average duration.
_EWMA_ALPHA: Final = 0.05


@runtime_checkable
class TickProcessor(Protocol):
    """Something that turns ticks into results, synchronously and cheaply.

    Attributes:
        name: Unique name within a registry (used in stats and logs).
        symbols: The symbols it wants, or ``None`` for all. Read (and normalised, so
            ``"EUR_USD"`` means ``"EUR/USD"``) when the processor is registered;
            re-register it to change them.
    """

    @property
    def name(self) -> str: ...

    @property
    def symbols(self) -> frozenset[str] | None: ...

    def on_tick(self, tick: TickData) -> object | None:
        """Process one tick; return a result, or ``None`` when there is nothing to report.

        Must not block: no I/O, no sleeping, no waiting on locks held elsewhere.
        """
        ...


def _price_getter(price: PriceField) -> Callable[[TickData], float | None]:
    if price not in _PRICE_FIELDS:
        msg = f"price must be one of {_PRICE_FIELDS}, got {price!r}"
        raise ValidationError(msg)
    if price == "mid":
        return lambda tick: (tick.bid + tick.ask) / 2
    if price == "bid":
        return lambda tick: tick.bid
    if price == "ask":
        return lambda tick: tick.ask
    return lambda tick: tick.last_price


def _symbol_set(symbols: Iterable[str] | None) -> frozenset[str] | None:
    if symbols is None:
        return None
    if isinstance(symbols, str):
        msg = "symbols must be a collection of symbols, not a single string"
        raise ValidationError(msg)
    return frozenset(normalize_symbol(symbol) for symbol in symbols)


def _check_period(period: int, minimum: int) -> None:
    if not isinstance(period, int) or isinstance(period, bool) or period < minimum:
        msg = f"period must be an integer >= {minimum}, got {period!r}"
        raise ValidationError(msg)


class _SmaState:
    __slots__ = ("prices", "since_resum", "total")

    def __init__(self) -> None:
        self.prices: deque[float] = deque()
        self.total = 0.0
        self.since_resum = 0


class IncrementalSMA:
    """Simple moving average of the last ``period`` prices, per symbol, O(1) per tick.

    Args:
        period: Number of prices averaged.
        price: Which tick price: ``"mid"`` (default), ``"bid"``, ``"ask"`` or ``"last"``
            (ticks without ``last_price`` are skipped).
        symbols: Symbols to process (``None``: all).
        name: Defaults to ``f"sma{period}"``.

    ``on_tick`` returns the average once ``period`` prices were seen, else ``None``. The
    running sum is recomputed exactly (``math.fsum``) every ``period`` ticks so that
    float drift from add/subtract does not accumulate.
    """

    __slots__ = ("_get_price", "_period", "_states", "name", "symbols")

    def __init__(
        self,
        period: int,
        *,
        price: PriceField = "mid",
        symbols: Iterable[str] | None = None,
        name: str | None = None,
    ) -> None:
        _check_period(period, 1)
        self._period = period
        self._get_price = _price_getter(price)
        self._states: dict[str, _SmaState] = {}
        self.name = name or f"sma{period}"
        self.symbols = _symbol_set(symbols)

    @property
    def period(self) -> int:
        """Number of prices averaged."""
        return self._period

    def on_tick(self, tick: TickData) -> float | None:
        """Add the tick's price; return the current average or ``None`` while warming up."""
        price = self._get_price(tick)
        if price is None:
            return None
        state = self._states.get(tick.symbol)
        if state is None:
            state = self._states[tick.symbol] = _SmaState()
        prices = state.prices
        prices.append(price)
        state.total += price
        if len(prices) > self._period:
            state.total -= prices.popleft()
        state.since_resum += 1
        if state.since_resum >= self._period:
            state.total = math.fsum(prices)
            state.since_resum = 0
        if len(prices) < self._period:
            return None
        return state.total / self._period

    def value(self, symbol: str) -> float | None:
        """The symbol's current average, or ``None`` while warming up."""
        state = self._states.get(symbol)
        if state is None or len(state.prices) < self._period:
            return None
        return state.total / self._period


class _RsiState:
    __slots__ = ("avg_gain", "avg_loss", "last", "seen")

    def __init__(self, price: float) -> None:
        self.last = price
        self.seen = 0  # price changes seen (up to the period)
        self.avg_gain = 0.0
        self.avg_loss = 0.0


class IncrementalRSI:
    """Relative Strength Index with Wilder's smoothing, per symbol, O(1) per tick.

    Wilder (1978), *New Concepts in Technical Trading Systems*: the first average gain/loss
    is the simple mean of the first ``period`` changes; after that
    ``avg = (avg_prev * (period - 1) + current) / period``. ``RSI = 100 · G / (G + L)``
    (the same as ``100 - 100 / (1 + G/L)``), 50 when both averages are 0 (a flat market).

    Args:
        period: Smoothing period (14 by default).
        price: Which tick price (see :class:`IncrementalSMA`).
        symbols: Symbols to process (``None``: all).
        name: Defaults to ``f"rsi{period}"``.

    ``on_tick`` returns ``None`` until ``period`` price changes (``period + 1`` prices) were
    seen, then the RSI in [0, 100].
    """

    __slots__ = ("_get_price", "_period", "_states", "name", "symbols")

    def __init__(
        self,
        period: int = 14,
        *,
        price: PriceField = "mid",
        symbols: Iterable[str] | None = None,
        name: str | None = None,
    ) -> None:
        _check_period(period, 1)
        self._period = period
        self._get_price = _price_getter(price)
        self._states: dict[str, _RsiState] = {}
        self.name = name or f"rsi{period}"
        self.symbols = _symbol_set(symbols)

    @property
    def period(self) -> int:
        """Smoothing period."""
        return self._period

    def on_tick(self, tick: TickData) -> float | None:
        """Add the tick's price; return the RSI or ``None`` while warming up."""
        price = self._get_price(tick)
        if price is None:
            return None
        state = self._states.get(tick.symbol)
        if state is None:
            self._states[tick.symbol] = _RsiState(price)
            return None
        change = price - state.last
        state.last = price
        gain = change if change > 0 else 0.0
        loss = -change if change < 0 else 0.0
        period = self._period
        if state.seen < period:
            # Seed: simple mean of the first `period` changes.
            state.seen += 1
            state.avg_gain += (gain - state.avg_gain) / state.seen
            state.avg_loss += (loss - state.avg_loss) / state.seen
            if state.seen < period:
                return None
        else:
            state.avg_gain = (state.avg_gain * (period - 1) + gain) / period
            state.avg_loss = (state.avg_loss * (period - 1) + loss) / period
        total = state.avg_gain + state.avg_loss
        return 100.0 * state.avg_gain / total if total > 0 else 50.0


class ProcessorOutput(NamedTuple):
    """One processor's result for one tick."""

    processor: str
    value: object


# NamedTuple's generated __new__ is a Python function; tuple.__new__ skips it (~4x cheaper).
_new_output = tuple.__new__


@dataclass(frozen=True, slots=True)
class ProcessorStats:
    """A processor's counters (a snapshot, for health and metrics).

    Attributes:
        calls: Ticks passed to it.
        errors: Calls that raised.
        slow_calls: Calls that took longer than the registry's threshold.
        total_seconds: Time spent in it.
        max_seconds: Its slowest call.
        avg_seconds: Exponential moving average of its call time (weight 0.05).
        slow: The moving average is over the threshold.
        last_error: ``repr`` of its latest exception.
    """

    calls: int
    errors: int
    slow_calls: int
    total_seconds: float
    max_seconds: float
    avg_seconds: float
    slow: bool
    last_error: str | None


class _Entry:
    __slots__ = (
        "avg",
        "calls",
        "errors",
        "last_error",
        "logged_at",
        "max",
        "name",
        "on_tick",
        "processor",
        "slow",
        "slow_calls",
        "suppressed",
        "symbols",
        "total",
    )

    def __init__(self, name: str, processor: TickProcessor) -> None:
        self.name = name
        self.processor = processor
        self.on_tick = processor.on_tick
        symbols = processor.symbols
        self.symbols = None if symbols is None else _symbol_set(symbols)
        self.calls = 0
        self.errors = 0
        self.slow_calls = 0
        self.total = 0.0
        self.max = 0.0
        self.avg = 0.0
        self.slow = False
        self.last_error: str | None = None
        self.logged_at: float | None = None
        self.suppressed = 0


class ProcessorRegistry:
    """Runs registered processors on each tick, isolating and measuring each one.

    A processor's exception never propagates: it is counted, its ``repr`` kept, and logged
    with its traceback the first time and then at most once per ``log_interval`` seconds per
    processor (with the number of errors suppressed meanwhile). Each call is timed; a call
    over ``slow_threshold`` seconds counts as slow, and a processor whose moving-average
    call time goes over it is flagged ``slow`` (logged once per transition). Exceptions
    that are not ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) propagate.

    Synchronous and not thread-safe: call it from the thread that owns the processors.

    Args:
        slow_threshold: Seconds per call above which a call is slow.
        log_interval: Minimum seconds between two error logs of the same processor.
        clock: Monotonic clock for log rate limiting (injectable for tests).
        timer: High-resolution timer measuring calls (injectable for tests).
    """

    __slots__ = (
        "_by_symbol",
        "_clock",
        "_entries",
        "_log_interval",
        "_slow_threshold",
        "_timer",
        "active",
        "ticks",
    )

    def __init__(
        self,
        *,
        slow_threshold: float = 0.001,
        log_interval: float = 60.0,
        clock: Clock | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not slow_threshold > 0 or not log_interval >= 0:
            msg = "slow_threshold must be > 0 and log_interval >= 0"
            raise ValidationError(msg)
        self._slow_threshold = float(slow_threshold)
        self._log_interval = float(log_interval)
        self._clock = clock or SystemClock()
        self._timer = timer
        self._entries: dict[str, _Entry] = {}
        # symbol -> entries that want it; rebuilt lazily after (un)registration.
        self._by_symbol: dict[str, tuple[_Entry, ...]] = {}
        self.ticks = 0
        #: True while a processor is registered (the save path reads it per tick).
        self.active = False

    def register(self, processor: TickProcessor) -> None:
        """Add a processor.

        Raises:
            ConfigurationError: Another processor has the same name, or it does not
                implement :class:`TickProcessor`.
        """
        if not isinstance(processor, TickProcessor):
            msg = f"{processor!r} does not implement TickProcessor (name, symbols, on_tick)"
            raise ConfigurationError(msg)
        name = processor.name
        if name in self._entries:
            msg = f"a processor named {name!r} is already registered"
            raise ConfigurationError(msg)
        self._entries[name] = _Entry(name, processor)
        self._by_symbol.clear()
        self.active = True

    def unregister(self, name: str) -> TickProcessor | None:
        """Remove a processor by name; return it (``None`` if there was none)."""
        entry = self._entries.pop(name, None)
        self._by_symbol.clear()
        self.active = bool(self._entries)
        return None if entry is None else entry.processor

    @property
    def names(self) -> tuple[str, ...]:
        """Registered processor names, in registration order."""
        return tuple(self._entries)

    def _for_symbol(self, symbol: str) -> tuple[_Entry, ...]:
        entries = tuple(
            entry
            for entry in self._entries.values()
            if entry.symbols is None or symbol in entry.symbols
        )
        self._by_symbol[symbol] = entries
        return entries

    def process(self, tick: TickData) -> list[ProcessorOutput]:
        """Run every processor interested in ``tick.symbol``; return their non-``None`` results.

        Never raises because of a processor (see the class docstring).
        """
        self.ticks += 1
        entries = self._by_symbol.get(tick.symbol)
        if entries is None:
            entries = self._for_symbol(tick.symbol)
        results: list[ProcessorOutput] = []
        if not entries:
            return results
        timer = self._timer
        threshold = self._slow_threshold
        # One timer read per processor: each call is measured from the end of the previous
        # one, so the registry's own bookkeeping (~0.1 µs) is charged to the next processor.
        started = timer()
        for entry in entries:
            try:
                value = entry.on_tick(tick)
            except Exception as exc:  # isolate: a processor bug must not stop ingestion
                self._failed(entry, tick, exc)
                value = None
            finished = timer()
            elapsed = finished - started
            started = finished
            entry.calls += 1
            entry.total += elapsed
            if elapsed > entry.max:
                entry.max = elapsed
            entry.avg += (elapsed - entry.avg) * _EWMA_ALPHA
            if elapsed > threshold:
                entry.slow_calls += 1
            if (entry.avg > threshold) is not entry.slow:
                self._flag_slow(entry)
            if value is not None:
                results.append(_new_output(ProcessorOutput, (entry.name, value)))
        return results

    def _failed(self, entry: _Entry, tick: TickData, exc: Exception) -> None:
        entry.errors += 1
        try:
            entry.last_error = repr(exc)
        except Exception:  # a broken __repr__ must not escape the isolation either
            entry.last_error = f"<{type(exc).__name__}: repr() failed>"
        now = self._clock.monotonic()
        if entry.logged_at is not None and now - entry.logged_at < self._log_interval:
            entry.suppressed += 1
            return
        logger.error(
            "tick processor %r failed on %s at %d (%d similar errors not logged since last)",
            entry.name,
            tick.symbol,
            tick.timestamp,
            entry.suppressed,
            exc_info=exc,
        )
        entry.logged_at = now
        entry.suppressed = 0

    def _flag_slow(self, entry: _Entry) -> None:
        entry.slow = not entry.slow
        if entry.slow:
            logger.warning(
                "tick processor %r is slow: %.0f µs per call on average (threshold %.0f µs);"
                " move its work to its own task or thread",
                entry.name,
                entry.avg * 1e6,
                self._slow_threshold * 1e6,
            )
        else:
            logger.info("tick processor %r is no longer slow", entry.name)

    def stats(self) -> dict[str, ProcessorStats]:
        """Return a snapshot of every processor's counters, by name."""
        return {
            name: ProcessorStats(
                calls=entry.calls,
                errors=entry.errors,
                slow_calls=entry.slow_calls,
                total_seconds=entry.total,
                max_seconds=entry.max,
                avg_seconds=entry.avg,
                slow=entry.slow,
                last_error=entry.last_error,
            )
            for name, entry in self._entries.items()
        }
