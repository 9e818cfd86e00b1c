"""``DataRouter``: the one entry point to market data.

The router orchestrates and owns lifecycle; SQL lives in ``storage/``, serialisation and
eviction in ``cache/``, batching and the journal in ``ingest``/``journal``, routing rules in
``strategy``. It validates nothing twice: models are validated when they are built.

Read path: L1 (in-process) → the strategy's route (``dragonfly_cache`` = L2, ``timescale`` =
the configured database) → the answer backfills the tiers above it. Concurrent misses for
one key share one backend read (single-flight).

Write path: L1 and the L2/pub-sub fast path first (so every router sees the update within
about a millisecond), then the database in the write mode asked for (``sync``, ``buffered``
or ``journal``; see the README for each mode's guarantee). What a tick feeds (candles, order
flow, processors, subscribers) sees it only once the write path has accepted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import heapq
import itertools
import logging
import os
import time
import uuid
import warnings
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from data_manager.aggregation import CandleAggregator, PriceField, RebuildRequest, bucket_bounds
from data_manager.breaker import CircuitBreaker
from data_manager.cache.codec import supersedes
from data_manager.cache.memory import MemoryCache
from data_manager.cache.singleflight import SingleFlight
from data_manager.clock import Clock, SystemClock
from data_manager.errors import (
    TRANSIENT_ERRORS,
    CacheError,
    CacheUnavailableError,
    CircuitBreakerOpenError,
    DatabaseConnectionError,
    DataManagerError,
    RetryExhaustedError,
    RouterClosedError,
    ValidationError,
)
from data_manager.health import (
    CacheHealth,
    DatabaseHealth,
    HealthCheckResponse,
    PoolHealth,
    ProcessorHealth,
    ReplicaHealth,
    StrategyHealth,
    TierStats,
    WritePathHealth,
    overall_status,
)
from data_manager.ingest import IngestPipeline, PipelineState
from data_manager.journal import Journal
from data_manager.metrics import HistogramRecorder
from data_manager.models import (
    MAX_SOURCE_LENGTH,
    TIMEFRAMES,
    CandleData,
    OrderFlowMetrics,
    TickData,
    _check_text,
    epoch_ms_range,
    normalize_symbol,
    stamp_received,
    timeframe_ms,
)
from data_manager.models import _check_count as _count
from data_manager.orderflow import OrderFlowCalculator
from data_manager.processors import ProcessorRegistry, TickProcessor
from data_manager.repeats import RepeatFilter
from data_manager.settings import DataManagerSettings, WriteMode
from data_manager.storage.base import Storage, in_key_order
from data_manager.storage.candle_sql import candles_from_buckets, rebuild_chunks, sql_bucketable
from data_manager.storage.schema import AGGREGATED_PREFIX
from data_manager.strategy import RoutingStrategy, StrategyWatcher
from data_manager.subscriptions import Subscription, SubscriptionHub

if TYPE_CHECKING:
    from data_manager.cache.bus import CacheBus
    from data_manager.cache.redis import RedisCache
    from data_manager.interop import DataFrameBackend
    from data_manager.lifecycle import RetentionReport
    from data_manager.metrics import MetricsServer
    from data_manager.settings import RetentionSettings
    from data_manager.storage.base import DataKind
    from data_manager.stream import BackupStream

__all__ = ["USE_DEFAULT", "DataRouter", "RouterState", "StalenessReport"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
L = TypeVar("L", TickData, OrderFlowMetrics)
_S = TypeVar("_S", bound="Storage | None")
P = ParamSpec("P")

#: Buckets (seconds) of the served-value age histogram.
AGE_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0)

#: How many symbols health reports staleness for (the most recently used first).
_HEALTH_STALENESS_SYMBOLS: Final = 200
#: Order-flow settings that change only when metrics are published, not how they are
#: computed: changing them keeps the calculator's state.
_FLOW_TIMING: Final = {"publish_interval_seconds"}
#: Aggregation settings read where they apply, each time: changing them keeps the aggregator.
_AGG_LIVE: Final = {"publish_interval_seconds", "idle_close_grace_seconds", "disabled_symbols"}

TIMESCALE: Final = "timescale"
REPLICA: Final = "timescale_replica"
_DATABASES: Final = frozenset({TIMESCALE, REPLICA})
L2_CACHE: Final = "dragonfly_cache"

#: Attempts at restoring a series' forming candles before aggregation goes on without
#: them, and the pause (seconds, router clock) before a failed one is retried.
_RESTORE_ATTEMPTS: Final = 3
_RESTORE_RETRY_SECONDS: Final = 1.0
# The newest values of this router's writes sent to L2 again when the cache subscription
# comes back: per pipeline, and how long to wait while L2 stays unreachable (its breaker
# open) before trying again.
_RESEND_CHUNK: Final = 500
_RESEND_RETRY_SECONDS: Final = 0.5
#: The database cannot answer now (a latest-value read then falls back on L1's live value).
_DB_UNAVAILABLE: Final[tuple[type[DataManagerError], ...]] = (
    *TRANSIENT_ERRORS,
    CircuitBreakerOpenError,
    RetryExhaustedError,
)
# How long first ticks of a series wait (in their restore, not in their callers) for the
# candles a crashed router left to be rebuilt before they are aggregated without them.
_RECOVERY_WAIT_SECONDS: Final = 60.0
_RECOVERY_RETRY_SECONDS: Final = 5.0
#: Longest wait for the backup stream at close (its own default); less if close's
#: ``timeout`` has less left.
_BACKUP_CLOSE_SECONDS: Final = 5.0
# How long close() lets background cache fills under way finish (each is one short read).
_FILL_SETTLE_SECONDS: Final = 1.0


class _UseDefault(enum.Enum):
    USE_DEFAULT = "USE_DEFAULT"


#: Marker for "use the configured default" in per-call overrides (distinct from ``None``).
USE_DEFAULT: Final = _UseDefault.USE_DEFAULT


class RouterState(enum.Enum):
    """Lifecycle of a router."""

    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


# ----------------------------------------------------------------------------- fork safety
# A child process must not reuse the parent's sockets. Instead of calling os.getpid() on
# every request, a fork bumps a generation counter that each router compares (one int read).
_fork_generation = 0
_live_routers: weakref.WeakSet[DataRouter] = weakref.WeakSet()


def _arm(interval: float, callback: Callable[[], None]) -> asyncio.Handle:
    """Run ``callback`` after ``interval`` seconds, or on the next event-loop pass for 0."""
    loop = asyncio.get_running_loop()
    return loop.call_later(interval, callback) if interval > 0 else loop.call_soon(callback)


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.lru_cache(maxsize=8192)
def _symbol(raw: str) -> str:
    """Cached :func:`normalize_symbol` (the hot paths see the same few symbols)."""
    return normalize_symbol(raw)


def _norm(raw: str) -> str:
    if type(raw) is not str:
        return normalize_symbol(raw)  # raises ValidationError with a clear message
    return _symbol(raw)


@functools.lru_cache(maxsize=1024)
def _checked_source(raw: str) -> str:
    """A source checked (and trimmed) as the models check theirs; cached like symbols."""
    return _check_text(raw, field="source", max_length=MAX_SOURCE_LENGTH)


def _source(raw: str | None) -> str | None:
    """A read's ``source`` argument, checked: reads find what writes stored, and bad input
    is a ValidationError before any I/O, not a database error after a round trip."""
    if raw is None:
        return None
    if type(raw) is not str:
        return _check_text(raw, field="source", max_length=MAX_SOURCE_LENGTH)  # raises
    return _checked_source(raw)


#: The largest count a read accepts: what the database and L2 take as a 64-bit integer.
_MAX_COUNT: Final = 2**63 - 1
_MAX_FETCH_ROWS: Final = 1_000_000  # iter_ticks' batch_size: rows held in memory at once


def _primary_of(storage: _S) -> _S:
    """``storage``'s primary when it has read replicas (reads that must see the newest
    rows: another router's bars, rebuilds, cache fills), else ``storage`` itself."""
    primary: _S = getattr(storage, "primary", storage)
    return primary


def _names(value: Iterable[str], what: str) -> list[str]:
    """A list of symbols or timeframes: a lone string is refused, not taken letter by letter."""
    if isinstance(value, str | bytes):
        msg = f"{what} must be a list, got the string {value!r}; wrap it: [{value!r}]"
        raise ValidationError(msg)
    try:
        return list(value)
    except TypeError:
        msg = f"{what} must be a list, got {type(value).__name__}"
        raise ValidationError(msg) from None


def _ring_window(candles: Iterable[CandleData], ring_size: int) -> list[CandleData]:
    """Per series, the last version of each of its newest ``ring_size`` buckets, oldest
    first: all of ``candles`` a candle ring can hold (older buckets would fall out of it at
    once), in the order that lets a ring take them without a gap."""
    series: dict[tuple[str, str, str], dict[int, CandleData]] = {}
    for candle in candles:
        key = (candle.symbol, candle.timeframe, candle.source)
        buckets = series.get(key)
        if buckets is None:
            buckets = series[key] = {}
        buckets[candle.timestamp] = candle
    return [
        buckets[start]
        for buckets in series.values()
        for start in sorted(heapq.nlargest(ring_size, buckets))
    ]


class StalenessReport(dict[str, bool]):
    """Seed 000's ``{"tick": bool, "candle": bool, "order_flow": bool}``; True means stale."""

    @property
    def tick(self) -> bool:
        """The latest tick is older than its staleness TTL, or there is none."""
        return self["tick"]

    @property
    def candle(self) -> bool:
        """The latest candle's bucket ended longer ago than its TTL, or there is none."""
        return self["candle"]

    @property
    def order_flow(self) -> bool:
        """The latest order-flow metrics are older than their TTL, or there are none."""
        return self["order_flow"]


class CacheManager:
    """``router.cache``: the cache tiers and their statistics (seed 004's support call)."""

    def __init__(self, router: DataRouter) -> None:
        self._router = router

    @property
    def l1(self) -> MemoryCache:
        """The in-process tier."""
        return self._router._l1

    @property
    def l2(self) -> RedisCache | None:
        """The Redis-protocol tier, or None when not configured."""
        return self._router._l2

    async def get_stats(self) -> CacheHealth:
        """Hits, misses and hit rate per tier, L1 size, and the L2 connection state."""
        return await self._router._cache_health(probe=False)

    async def flush(self) -> None:
        """Return once every update queued on the L2/pub-sub fast path has been sent."""
        if self._router._bus is not None:
            await self._router._bus.flush()


class PoolManager:
    """``router.pool_manager``: connection pools (seed 004's support call)."""

    def __init__(self, router: DataRouter) -> None:
        self._router = router

    async def health_check_all(self) -> dict[str, PoolHealth]:
        """Usage of every connection pool, keyed by backend name."""
        return self._router._pool_health()


class _TierCounters:
    __slots__ = ("db_reads", "l1_hits", "l1_misses", "l2_errors", "l2_hits", "l2_misses")

    def add(self, other: _TierCounters) -> _TierCounters:
        """Sum of two counter sets (a new object)."""
        total = _TierCounters()
        for name in self.__slots__:
            setattr(total, name, getattr(self, name) + getattr(other, name))
        return total

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {name: getattr(self, name) for name in self.__slots__}

    def __init__(self) -> None:
        self.l1_hits = 0
        self.l1_misses = 0
        self.l2_hits = 0
        self.l2_misses = 0
        self.l2_errors = 0
        self.db_reads = 0


class _DerivedRecovery:
    """What a router knows of a crash recovery: the series a dead instance's replayed
    journal touched, and whether their first ticks here wait for their rebuild."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], list[int]] = {}  # (symbol, source) -> [lo, hi]
        self.cutoff_ms: int | None = None  # ticks received from then on are this router's
        self.wait_until = 0.0  # monotonic
        self.live: set[tuple[str, str]] = set()  # aggregated here before the adoption
        self.done: asyncio.Event | None = None  # set when the rebuild has run (or given up)
        self.replayed = False  # every adopted journal is replayed
        self.task: asyncio.Task[object] | None = None
        self.retry_at: float | None = None  # monotonic, after a failed rebuild
        self.failures = 0  # failed rebuilds in a row
        self.current: tuple[str, str] | None = None  # the series being rebuilt

    @property
    def waiting(self) -> bool:
        return self.done is not None and not self.done.is_set()

    def begin(self, *, cutoff_ms: int, wait_until: float, live: set[tuple[str, str]]) -> None:
        """Journals were adopted: a recovery begins (or the one under way goes on)."""
        if self.done is None or self.done.is_set():
            self.done = asyncio.Event()
            self.live = live
        else:
            # Series that got ticks here since the last adoption are aggregated live: the
            # later cutoff would count those ticks twice in their rebuild.
            self.live |= live
        self.cutoff_ms = cutoff_ms  # the dead instances' ticks were all received before
        self.wait_until = wait_until
        self.replayed = False

    def note(self, items: Sequence[Any], agg_prefix: str | None) -> None:
        """Widen the series' ranges by replayed ticks and aggregated candles."""
        series = self.series
        for item in items:
            cls = type(item)
            if cls is TickData:
                key = (item.symbol, item.source)
            elif cls is CandleData and agg_prefix and item.source.startswith(agg_prefix):
                key = (item.symbol, item.source[len(agg_prefix) :])
            else:
                continue
            ts = item.timestamp
            span = series.get(key)
            if span is None:
                series[key] = [ts, ts]
            elif ts < span[0]:
                span[0] = ts
            elif ts > span[1]:
                span[1] = ts

    def take(self) -> dict[tuple[str, str], list[int]]:
        series, self.series = self.series, {}
        return series

    def give_back(self, series: dict[tuple[str, str], list[int]]) -> None:
        for key, (lo, hi) in series.items():
            span = self.series.setdefault(key, [lo, hi])
            span[0], span[1] = min(span[0], lo), max(span[1], hi)

    def due(self, now: float) -> bool:
        """The rebuild should start: every adopted journal is replayed, and no rebuild is
        under way or a failed one's pause has passed."""
        return (
            self.waiting
            and self.replayed
            and (self.task is None or self.task.done())
            and (self.retry_at is None or now >= self.retry_at)
        )

    def finish(self) -> bool:
        """The rebuild ran; unless more journals are being replayed, the recovery ends."""
        if not self.replayed or self.series or self.done is None:
            return False
        self.done.set()
        self.live = set()
        return True


class _RecoveryObserver:
    """The write path's :class:`~data_manager.ingest.ReplayObserver`: forwards to the router
    without keeping it alive."""

    __slots__ = ("adopted", "adopted_replayed", "replayed")

    def __init__(self, router: DataRouter) -> None:
        self.adopted = _weak_callback(router._on_adopted)
        self.replayed = _weak_callback(router._on_replayed)
        self.adopted_replayed = _weak_callback(router._on_adopted_replayed)


class _FormingRestore:
    """The forming-candle restore of one (symbol, tick source) series under way, and the
    ticks that arrived meanwhile (aggregated, in arrival order, once it has run)."""

    __slots__ = ("failures", "retry_at", "task", "ticks")

    def __init__(self) -> None:
        self.ticks: list[tuple[TickData, Sequence[str]]] = []
        self.task: asyncio.Task[None] | None = None  # the attempt running, if any
        self.failures = 0
        self.retry_at = 0.0  # no new attempt before this (router clock, monotonic)


class DataRouter:
    """The single entry point to market data.

    Args:
        settings: Configuration; when omitted it is read from the environment and the
            static JSON files (see :class:`DataManagerSettings`).
        clock: Time source (tests inject :class:`data_manager.clock.ManualClock`).
        strategy: A fixed routing strategy; when omitted it is loaded from the strategy file
            and hot-reloaded while the router runs.

    Use it as ``async with DataRouter() as router: ...`` or call :meth:`initialize` and
    :meth:`close` yourself. A closed router refuses use with :class:`RouterClosedError`.
    """

    def __init__(
        self,
        settings: DataManagerSettings | None = None,
        *,
        clock: Clock | None = None,
        strategy: RoutingStrategy | None = None,
    ) -> None:
        self.settings = settings if settings is not None else DataManagerSettings()
        self._clock: Clock = clock or SystemClock()
        self._state = RouterState.UNOPENED
        self._init_lock = asyncio.Lock()
        self._fork_gen = _fork_generation
        # The fork generation whose inherited connections were abandoned (the process that
        # built the router inherited none), and the reset under way in this process.
        self._fork_dropped = _fork_generation
        self._fork_reset: tuple[int, asyncio.Task[None]] | None = None
        self.instance_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._watcher = StrategyWatcher(
            self.settings.resolved_strategy_file,
            poll_seconds=self.settings.strategy_poll_seconds,
            fixed=strategy,
            required=self.settings.strategy_file is not None,
        )
        strat = self._watcher.current
        self._l1 = MemoryCache(
            max_entries=strat.cache.l1_max_entries,
            tick_ttl=strat.cache.l1_tick_ttl_seconds,
            candle_ttl=strat.cache.l1_candle_ttl_seconds,
            order_flow_ttl=strat.cache.l1_order_flow_ttl_seconds,
            ring_size=strat.cache.candle_ring_size,
            clock=self._clock,
        )
        self._l1_enabled = True  # False while the pub/sub subscription is lost
        # Bumped whenever L1 is cleared because it may have missed updates (a lost or
        # restored subscription, a fork). A read-through records it before it awaits and
        # fills L1 only if it is unchanged: a value read before the clear may be older than
        # what the clear was for. It is also part of the single-flight keys, so a read that
        # starts after the clear never shares the answer of one that began before it.
        self._l1_gen = 0
        # Bumped when rings of given-up candle series are dropped: candle read-throughs
        # compare ``_l1_gen + _ring_drops`` (both only grow), latest-value ones ``_l1_gen``
        # alone, so a candle gap does not void a latest-value confirmation under way.
        self._ring_drops = 0
        self._l2: RedisCache | None = None
        self._bus: CacheBus | None = None
        self._storage: Storage | None = None
        self._ingest: IngestPipeline | None = None
        self._start_derived(strat)
        self._processors = ProcessorRegistry()
        self._subs = SubscriptionHub()
        # The database cursors of iter_ticks() calls under way: close() closes them (each
        # holds a connection and a transaction the pool's disposal would not end).
        self._cursors: weakref.WeakSet[AsyncGenerator[TickData, None]] = weakref.WeakSet()
        self._flight: SingleFlight = SingleFlight()
        # Per-operation tier counters (plain ints: metrics read them at scrape time).
        self._c_tick = _TierCounters()
        self._c_candles = _TierCounters()
        self._c_flow = _TierCounters()
        self._c_misc = _TierCounters()
        # Background reads that confirm L1's any-source entries (_confirm_latest): not
        # callers' reads, so not in the read counters.
        self._c_confirm = _TierCounters()
        #: Event-time age (seconds) of sampled values served from L1 (1 hit in 32).
        self._served_age = HistogramRecorder(AGE_BUCKETS)
        self._read_latency: dict[tuple[str, str], HistogramRecorder] = {
            (backend, op): HistogramRecorder()
            for backend in ("l2", "database")
            for op in ("get_latest_tick", "get_latest_candles", "get_latest_order_flow")
        }
        self._metrics: MetricsServer | None = None
        self._backup: BackupStream | None = None
        self._default_candle_source: dict[tuple[str, str], str] = {}
        # save_candle queued candles (buffered or journal) that a flush has not covered yet:
        # a bulk save must not be overwritten by an older version of them landing after it.
        self._candles_queued = False
        self._restore_failures = 0  # failed forming-candle restores (health)
        self._background: set[asyncio.Task[Any]] = set()
        self._maintenance: asyncio.Task[object] | None = None
        self._warned_no_l2 = False
        self.cache = CacheManager(self)
        self.pool_manager = PoolManager(self)
        _live_routers.add(self)

    def _start_derived(self, strat: RoutingStrategy) -> None:
        """Empty aggregation and order-flow state (a new router, or a forked child)."""
        self._aggregator = self._build_aggregator(strat)
        # Forming candles are upserted once per maintenance pass (and on flush), not once
        # per tick: only the newest state of each forming bucket needs to reach the database.
        self._forming_dirty: dict[tuple[str, str, str], CandleData] = {}
        # (symbol, tick source) series whose forming bars changed since _emit_forming ran,
        # and the timer that runs it (aggregation.publish_interval_seconds after the first).
        self._forming_touched: dict[tuple[str, str], Sequence[str]] = {}
        self._forming_timer: asyncio.Handle | None = None
        # Series whose forming candles were restored (the hot path's one set lookup), and
        # the restores under way: their ticks wait there, in arrival order.
        self._agg_restored: set[tuple[str, str]] = set()
        # Series aggregated here before a reload sent them back to restore (see
        # _replace_aggregator): still "aggregated here" for crash recovery.
        self._agg_seen: set[tuple[str, str]] = set()
        # Forming bars of timeframes a reload dropped, by (symbol, source, timeframe).
        self._set_aside: dict[tuple[str, str, str], CandleData] = {}
        self._agg_restoring: dict[tuple[str, str], _FormingRestore] = {}
        self._repeats = RepeatFilter()  # ticks saved again: counted once (see _derive)
        # Crash recovery (see _DerivedRecovery): the (symbol, tick source) series a dead
        # instance's replayed journal touched, each with its oldest and newest timestamp.
        self._recovery = _DerivedRecovery()
        # The own journal's newest LSN at the last maintenance pass (see _hold_derived).
        self._barrier_lsn: int | None = None
        self._late_owed = False  # a late-tick rebuild failed since the last pass
        self._orderflow = self._build_orderflow(strat)
        self._flow_dirty: dict[str, OrderFlowMetrics] = {}
        # Symbols whose metrics changed since _emit_flow ran, and the timer that runs it.
        self._flow_touched: dict[str, Sequence[str]] = {}
        self._flow_timer: asyncio.Handle | None = None

    @property
    def _counters(self) -> _TierCounters:
        """All read operations' tier counters summed (health and metrics)."""
        return self._c_tick.add(self._c_candles).add(self._c_flow).add(self._c_misc)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> DataRouter:
        await self.initialize()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def state(self) -> RouterState:
        """Where the router is in its lifecycle."""
        return self._state

    @property
    def storage(self) -> Storage:
        """The database backend (PostgreSQL/TimescaleDB or the embedded SQLite)."""
        self._require_open()
        if self._storage is None:
            # A forked child whose reconnection failed (the next awaited call retries it).
            msg = "the router has no database connection in this process; await a call first"
            raise RouterClosedError(msg)
        return self._storage

    async def initialize(self) -> None:
        """Connect, create or migrate the schema, start background tasks.

        Connecting is retried (exponential backoff with jitter) until
        ``settings.init_deadline_seconds`` have passed.

        Raises:
            DatabaseConnectionError: The database stayed unreachable past the deadline.
            ConfigurationError: The schema is newer than this SDK, or the strategy is invalid.
            RouterClosedError: The router was closed before.
        """
        async with self._init_lock:  # concurrent callers share one initialisation
            if self._state is RouterState.OPEN:
                return
            if self._state is RouterState.CLOSED:
                msg = "this DataRouter was closed; create a new one"
                raise RouterClosedError(msg)
            await self._open()

    async def _open(self) -> None:
        storage = self._build_storage()
        self._storage = storage  # closed by _teardown if anything below fails
        try:
            await self._connect_with_deadline(storage)
            info = await storage.create_schema()
            logger.info(
                "storage ready: %s (schema v%d%s)",
                storage.target,
                info.version,
                ", timescaledb" if info.timescaledb else "",
            )
            built_from = self._watcher.current
            await self._watcher.start(watch=self.settings.watch_strategy)
            if self._watcher.current is not built_from:
                # L1, the aggregator and order flow were built in __init__, before the file
                # was read: apply the file's values to them now.
                self._on_strategy_swap(built_from, self._watcher.current)
            self._watcher.add_listener(_weak_callback(self._on_strategy_swap))
            await self._start_l2()
            await self._start_backup_stream()
            self._ingest = self._build_ingest(storage)
            await self._ingest.start()
            self._maintenance = self._spawn(_maintenance_loop(weakref.ref(self)))
            if self.settings.metrics_port is not None:
                from data_manager.metrics import serve_metrics

                self._metrics = serve_metrics(
                    self, self.settings.metrics_port, self.settings.metrics_addr
                )
        except BaseException:
            await self._teardown()
            raise
        self._state = RouterState.OPEN
        if self._recovery.due(self._clock.monotonic()):
            self._start_recovery()  # the adopted journals were replayed during the start

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - API
        """Flush what is queued and release every connection.

        Candles owed a rebuild for late ticks (``late_policy="rebuild"``) are rebuilt and
        stored once everything queued is stored; if it could not be (the database is
        down, or no time is left), that is logged and left to :meth:`rebuild_candles`.

        Args:
            timeout: Seconds for the whole close, one deadline shared by its steps (the
                flush, the rebuilds, the backup stream): what is not stored by then (or
                cannot be, because the database is down) stays in the journal and is
                replayed by the next router that starts. Releasing the connections
                afterwards is bounded by their own timeouts.
        """
        if self._state is RouterState.UNOPENED and self._init_lock.locked():
            # initialize() is under way: let it finish (or fail), then close what it opened.
            # Tearing its backends down under it would leave it to open the router anyway.
            async with self._init_lock:
                pass
        if self._state is RouterState.CLOSED:
            return
        if self._fork_gen != _fork_generation:
            # A forked child: what the parent opened is not this process's to flush or
            # close. A reset under way finishes first (what it opens is closed below).
            reset = self._fork_reset
            if reset is not None and reset[0] == _fork_generation and not reset[1].done():
                await asyncio.wait([reset[1]])
            self._abandon_parents(_fork_generation)
        was_open = self._state is RouterState.OPEN
        self._state = RouterState.CLOSED
        self._subs.close_all()
        for timer in (self._forming_timer, self._flow_timer):
            if timer is not None:
                timer.cancel()
        self._forming_timer = self._flow_timer = None
        # One deadline for every step: each gets what the previous ones left.
        deadline = None if timeout is None else self._clock.monotonic() + timeout

        def left(cap: float | None = None) -> float | None:
            """What the deadline leaves (``None``: no deadline), at most ``cap``."""
            rest = None if deadline is None else max(0.0, deadline - self._clock.monotonic())
            if cap is None or rest is None:
                return cap if rest is None else rest
            return min(rest, cap)

        try:
            if was_open and self._ingest is not None:
                if self._agg_restoring or self._recovery.waiting:
                    await self._settle_restores(left())
                self._submit_forming()
                self._release_derived_hold()
                await self._ingest.close(left())
                await self._rebuild_after_close(left())
            fills = [t for t in self._background if t is not self._maintenance]
            if fills:
                # Cache fills and checks under way finish before their connections close:
                # cancelled part-way, a read can leave a driver connection half opened.
                await asyncio.wait(fills, timeout=left(_FILL_SETTLE_SECONDS))
            if self._backup is not None:
                backup, self._backup = self._backup, None
                await backup.aclose(left(_BACKUP_CLOSE_SECONDS))
        finally:
            await self._teardown()

    async def _teardown(self, *, keep_watcher: bool = False) -> None:
        """Stop and close every backend the router holds (the strategy watcher too unless
        ``keep_watcher``: a failed reset after a fork leaves it running for the retry)."""
        if self._metrics is not None:
            metrics, self._metrics = self._metrics, None
            await metrics.aclose()
        for task in list(self._background):
            task.cancel()
        self._background.clear()
        for restore in self._agg_restoring.values():
            if restore.task is not None:
                restore.task.cancel()
        for cursor in list(self._cursors):
            # (One being read from right now cannot be closed here: its read fails once the
            # storage is closed.)
            with contextlib.suppress(RuntimeError):
                await cursor.aclose()
        self._cursors.clear()
        closers: list[Callable[[], Coroutine[Any, Any, None]]] = (
            [] if keep_watcher else [self._watcher.aclose]
        )
        if self._backup is not None:
            # initialize() failed after the backup stream started: stop it and give back
            # its spool (close() closes it itself, before this).
            backup, self._backup = self._backup, None
            closers.insert(0, functools.partial(backup.aclose, 0))
        ingest = self._ingest
        if ingest is not None and ingest.state in (PipelineState.NEW, PipelineState.RUNNING):
            # initialize() failed after the write path started (or part-way through its
            # start): stop its writer and give back the journal locks it took. (A pipeline
            # whose own close() was cancelled is CLOSING: waiting for it would never end.)
            closers.insert(0, functools.partial(ingest.close, 0))
        if self._bus is not None:
            closers.append(self._bus.aclose)
        if self._l2 is not None:
            closers.append(self._l2.aclose)
        if self._storage is not None:
            closers.append(self._storage.close)
        for close in closers:
            try:
                await close()
            except DataManagerError:
                logger.warning("error while closing %s", close, exc_info=True)
        self._bus = None
        self._l2 = None
        self._storage = None

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, "_state", None) is RouterState.OPEN:
            _warn(
                f"unclosed DataRouter {self.instance_id}; call `await router.close()` "
                "or use `async with DataRouter() as router:`",
                ResourceWarning,
                stacklevel=2,
            )

    def _require_open(self) -> None:
        if self._state is not RouterState.OPEN:
            if self._state is RouterState.CLOSED:
                msg = "DataRouter is closed; create a new one"
            else:
                msg = "DataRouter is not initialised; call `await router.initialize()` first"
            raise RouterClosedError(msg)

    async def _ready(self) -> None:
        """Check state, and rebuild connections once after a fork (cheap otherwise)."""
        if self._state is not RouterState.OPEN:
            self._require_open()
        if self._fork_gen != _fork_generation:
            await self._after_fork()

    async def _after_fork(self) -> None:
        """Reset the router once in a forked child, whichever call comes first.

        Concurrent first calls all wait for the same reset: none may reach the parent's
        write path or connections meanwhile (a tick queued in the parent's pipeline would
        never be stored here). A failed reset is retried by the next call; the parent's
        connections are abandoned once, by the first attempt.
        """
        gen = _fork_generation
        reset = self._fork_reset
        if reset is None or reset[0] != gen:
            task = asyncio.get_running_loop().create_task(self._reset_after_fork(gen))
            reset = self._fork_reset = (gen, task)
        try:
            # Shielded: a caller that gives up does not cancel the reset the others wait for.
            await asyncio.shield(reset[1])
        except BaseException:
            if reset[1].done() and self._fork_reset is reset:
                self._fork_reset = None  # it failed: the next call tries again
            raise

    def _abandon_parents(self, gen: int) -> None:
        """Drop what the router holds of the parent's (connections, tasks, write path)
        without closing or using any of it: it is the parent's, still in use there."""
        if self._fork_dropped == gen:
            return
        self._fork_dropped = gen
        if self._metrics is not None:
            self._metrics.shutdown()  # in a child this only closes the inherited socket
            self._metrics = None
        logger.info("fork detected in router %s; reconnecting", self.instance_id)
        self.instance_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._background.clear()
        self._cursors = weakref.WeakSet()  # the parent's, on its connections: left alone
        self._maintenance = None
        # The parent's backup stream (its tasks, connection and spool) and write path (its
        # queue, writer task and journal) stay the parent's, untouched; the child opens its
        # own, under its own instance id, journal and spool.
        self._backup = None
        self._ingest = None
        if self._bus is not None:
            self._bus.reset_after_fork()
        if self._l2 is not None:
            self._l2.reset_after_fork()
        self._bus = None
        self._l2 = None
        if self._storage is not None:
            self._storage.reset_after_fork()
        self._storage = None
        self._forget_l1()
        # The parent may have lost its subscription (L1 bypassed); the child's own bus
        # subscribes afresh and calls on_lost if it cannot, which bypasses L1 again.
        self._l1_enabled = True
        self._flight = SingleFlight()
        # The series the parent aggregates stay the parent's: started from its in-memory
        # bars, this child's close() or maintenance would store stale candles (closed ones
        # too) over the parent's newer rows. The child restores from the database instead,
        # and drops the parent loop's timer handles (they never fire here).
        self._start_derived(self._watcher.current)
        self._watcher.reset_after_fork()

    async def _reset_after_fork(self, gen: int) -> None:
        """Abandon the parent's connections and open our own; on failure, close what this
        attempt opened (the next call tries again)."""
        self._abandon_parents(gen)
        try:
            storage = self._build_storage()
            self._storage = storage
            await self._connect_with_deadline(storage)
            await self._start_l2()
            await self._start_backup_stream()
            self._ingest = self._build_ingest(storage)
            await self._ingest.start()
            # The parent's timer task belongs to a loop that never runs here: start our own.
            self._maintenance = self._spawn(_maintenance_loop(weakref.ref(self)))
        except BaseException:
            await self._teardown(keep_watcher=True)
            self._ingest = None
            self._maintenance = None
            raise
        self._fork_gen = gen

    # ------------------------------------------------------------------ construction

    def _build_storage(self) -> Storage:
        pg = self.settings.postgres
        if pg.configured:
            from data_manager.storage.postgres import PostgresStorage

            primary = PostgresStorage(pg)
            if not pg.replicas:
                return primary
            from data_manager.storage.replicas import ReplicatedStorage

            return ReplicatedStorage(
                primary,
                [PostgresStorage(r) for r in pg.replica_settings()],
                max_lag_seconds=pg.replica_max_lag_seconds,
                max_lag_bytes=pg.replica_max_lag_bytes,
                lag_check_interval=pg.replica_check_interval,
                clock=self._clock,
            )
        from data_manager.storage.sqlite import SQLiteStorage

        logger.info(
            "no PostgreSQL host configured; using the embedded SQLite store at %s",
            self.settings.sqlite_path,
        )
        return SQLiteStorage(self.settings.sqlite_path)

    def _db_for(self, route: Sequence[str]) -> Storage:
        """The database step of a read route: replicas only when the route names them."""
        storage = self.storage
        return storage if REPLICA in route else _primary_of(storage)

    async def _connect_with_deadline(self, storage: Storage) -> None:
        deadline = self.settings.init_deadline_seconds
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(DatabaseConnectionError),
                stop=stop_after_delay(deadline),
                wait=wait_random_exponential(multiplier=0.1, max=2.0),
                reraise=True,
            ):
                with attempt:
                    await storage.connect()
        except DatabaseConnectionError as exc:
            msg = f"cannot connect to {storage.target} within {deadline:g}s: {exc}"
            raise DatabaseConnectionError(msg) from exc

    def _build_aggregator(self, strat: RoutingStrategy) -> CandleAggregator | None:
        agg = strat.aggregation
        if not agg.enabled or not agg.timeframes:
            return None
        return CandleAggregator(
            timeframes=list(agg.timeframes),
            price=agg.price,
            late_policy=agg.late_policy,
            daily_close=agg.daily_close,
            # Forming bars are materialised by _emit_forming, once per series per pass of
            # the event loop, not once per tick per timeframe.
            emit_forming=False,
        )

    def _replace_aggregator(self, strat: RoutingStrategy) -> None:
        """Aggregate under new settings from here on, continuing the current state: the
        forming bars, where closed bars end, the rebuilds owed (see
        :meth:`CandleAggregator.take_over`). Timeframes it did not aggregate (added, or
        aggregation switched back on) may have bars in storage: every series restores them
        on its next tick, as after a restart."""
        previous = self._aggregator
        if self._forming_touched:
            self._emit_forming()  # from the aggregator being replaced
        aggregator = self._aggregator = self._build_aggregator(strat)
        kept = () if aggregator is None else aggregator.timeframes
        set_aside = self._set_aside
        if previous is not None:
            # The forming bars of timeframes dropped: stored as they stand, and kept here
            # to go on if the timeframe comes back.
            for candle in previous.forming():
                if candle.timeframe not in kept:
                    key = (candle.symbol, candle.source, candle.timeframe)
                    set_aside[key] = self._forming_dirty[key] = candle
        if aggregator is None:
            return
        if previous is not None:
            aggregator.take_over(previous)
        back = [key for key in set_aside if key[2] in kept]
        if back:
            aggregator.restore([set_aside.pop(key) for key in back])
        if previous is None or set(kept) - set(previous.timeframes):
            self._agg_seen |= self._agg_restored
            self._agg_restored.clear()

    def _build_orderflow(self, strat: RoutingStrategy) -> OrderFlowCalculator | None:
        flow = strat.order_flow
        if not flow.enabled:
            return None
        return OrderFlowCalculator(
            window_ms=round(flow.window_seconds * 1000),
            vpin_bucket_volume=flow.vpin_bucket_volume,
            vpin_buckets=flow.vpin_buckets,
        )

    def _build_ingest(self, storage: Storage) -> IngestPipeline:
        batch = self._watcher.current.batch
        journal = Journal(
            self.settings.journal_dir,
            instance_id=self.instance_id,
            sync=self.settings.journal_sync,
        )
        pipeline = IngestPipeline(
            storage,
            journal=journal,
            batch_size=batch.size,
            journal_batch_size=batch.journal_size,
            flush_interval=batch.flush_interval_seconds,
            max_batch=batch.max_batch,
            max_queue=batch.max_queue,
            put_timeout=batch.put_timeout_seconds,
            breaker=CircuitBreaker("database", clock=self._clock),
            clock=self._clock,
            backup=self._backup if self._watcher.current.backup_stream.enabled else None,
        )
        pipeline.hold_for_derived(_RecoveryObserver(self))
        pipeline.on_kept_after_cancel = _weak_callback(self._derive_kept_after_cancel)
        return pipeline

    def _derive_kept_after_cancel(
        self,
        item: TickData | CandleData | OrderFlowMetrics,
        route: Sequence[str] | None = None,
    ) -> None:
        """A ``journal``-mode tick whose caller was cancelled, and whose append was kept
        (durable as the cancellation landed, or later): it is accepted (it will be stored),
        so the data derived from it counts it, as its call would have (see
        :meth:`save_tick`; ``route`` is the call's, else the strategy's now)."""
        if type(item) is not TickData or self._state is not RouterState.OPEN:
            return  # candles and order flow derive nothing
        if route is None:
            route = self._watcher.current.routing.save_tick
        if self._derive(item, (item.symbol, item.source), route):
            self._join_restore(item, route)

    async def _start_backup_stream(self) -> None:
        url = self.settings.backup_stream_url
        if url is None:
            return
        from data_manager.stream import SPOOL_DIR, backup_stream_from_url

        backup = backup_stream_from_url(
            url.get_secret_value(),
            spool_dir=self.settings.journal_dir / SPOOL_DIR,
            instance_id=self.instance_id,
            stream=self.settings.backup_stream_name,
            key=self.settings.backup_stream_key,
            maxlen=self.settings.backup_stream_maxlen,
        )
        await backup.start()
        self._backup = backup

    async def _start_l2(self) -> None:
        cfg = self.settings.dragonfly
        if not cfg.configured:
            logger.info("no DRAGONFLY_HOST configured; running without the L2 cache")
            return
        from data_manager.cache.bus import CacheBus
        from data_manager.cache.redis import RedisCache

        cache_cls: type[RedisCache] = RedisCache
        if cfg.cluster_nodes:
            from data_manager.cache.cluster import ClusterRedisCache

            cache_cls = ClusterRedisCache
        strat = self._watcher.current
        l2 = cache_cls.from_settings(
            cfg,
            tick_ttl=strat.cache.tick_ttl_seconds,
            candle_ttl=strat.cache.candle_ttl_seconds,
            order_flow_ttl=strat.cache.order_flow_ttl_seconds,
            ring_size=strat.cache.candle_ring_size,
            clock=self._clock,
        )
        try:
            await l2.connect()
        except CacheError:
            # The cache is optional: start without it; its breaker lets it back in later.
            logger.warning("L2 cache %s unreachable at start; reads use the database", cfg.target)
        bus = CacheBus(l2, origin=self.instance_id)
        await bus.start(
            on_items=_weak_callback(self._apply_remote),
            on_lost=_weak_callback(self._on_subscription_lost),
            on_restored=_weak_callback(self._on_subscription_restored),
            on_gaps=_weak_callback(self._drop_gapped),
            on_resumed=_weak_callback(self._on_bus_resumed),
        )
        self._l2 = l2
        self._bus = bus

    # ------------------------------------------------------------------ strategy

    def _on_strategy_swap(self, old: RoutingStrategy, new: RoutingStrategy) -> None:
        c = new.cache
        self._l1.configure(
            max_entries=c.l1_max_entries,
            tick_ttl=c.l1_tick_ttl_seconds,
            candle_ttl=c.l1_candle_ttl_seconds,
            order_flow_ttl=c.l1_order_flow_ttl_seconds,
            ring_size=c.candle_ring_size,
        )
        if self._l2 is not None:
            self._l2.configure(
                tick_ttl=c.tick_ttl_seconds,
                candle_ttl=c.candle_ttl_seconds,
                order_flow_ttl=c.order_flow_ttl_seconds,
            )
        if self._ingest is not None:
            b = new.batch
            self._ingest.configure(
                batch_size=b.size,
                journal_batch_size=b.journal_size,
                flush_interval=b.flush_interval_seconds,
                max_batch=b.max_batch,
                put_timeout=b.put_timeout_seconds,
            )
        if old.aggregation.model_dump(exclude=_AGG_LIVE) != new.aggregation.model_dump(
            exclude=_AGG_LIVE
        ):
            self._replace_aggregator(new)
        if old.order_flow.model_dump(exclude=_FLOW_TIMING) != new.order_flow.model_dump(
            exclude=_FLOW_TIMING
        ):
            if self._flow_touched:
                self._emit_flow()  # from the calculator being replaced
            self._orderflow = self._build_orderflow(new)
        if self._ingest is not None and old.backup_stream != new.backup_stream:
            self._ingest.set_backup(self._backup if new.backup_stream.enabled else None)
        if old.sources != new.sources:
            self._default_candle_source.clear()  # resolved under the old preference

    @property
    def metrics(self) -> MetricsServer | None:
        """The Prometheus endpoint when ``settings.metrics_port`` is set (``.port``, ``.url``)."""
        return self._metrics

    async def reload_strategy(self) -> bool:
        """Check the strategy file now (instead of waiting for the next poll).

        Returns:
            True when a new strategy was swapped in; a rejected edit returns False and shows
            in ``health_check().strategy.last_error``.
        """
        self._require_open()
        return await self._watcher.check_now()

    @property
    def strategy(self) -> RoutingStrategy:
        """The routing strategy in force (hot-reloaded)."""
        return self._watcher.current

    # ------------------------------------------------------------------ coherence

    def _apply_remote(self, items: Sequence[TickData | CandleData | OrderFlowMetrics]) -> None:
        l1 = self._l1
        if self._subs:
            for item in items:
                self._subs.dispatch(item)
        # Another router's latest value may have lost L2's any-source compare-and-set (a
        # lagging source): it never makes a missing any-source entry servable here, only
        # the confirmation read from L2 does (settled=False).
        for item in items:
            l1.put(item, settled=False)
            if type(item) is CandleData:
                self._promote_source(item)
        if l1.confirmations_due:
            self._confirm_latest()

    def _confirm_latest(self) -> None:
        """Check the any-source entries live writes just created in L1 against the tiers
        below: one read-through per symbol in the background (shared with any read of it
        under way), whose answer settles the entry (see :meth:`MemoryCache.fill_tick`).

        A live write cannot tell whether another source has a newer value that this L1
        never saw (written before this process started, before L1 was cleared, before the
        entry was evicted or expired); the tiers below can. Neither can a relayed write
        tell whether its own source has a newer value (L2 refuses a late tick but the bus
        still relays it): the ``(symbol, source)`` entries such writes create are checked
        the same way, with a read for that source.
        """
        due = self._l1.take_confirmations()
        if not self._l1_enabled or self._state is not RouterState.OPEN:
            return  # the fill would be refused (L1 bypassed) or nobody is left to serve
        gen = self._l1_gen
        counters = self._c_confirm
        for kind, symbol, source in due:
            # A flight of its own: a caller's read neither waits for a confirmation nor has
            # its tiers counted as one.
            load = self._load_latest_tick if kind == "tick" else self._load_latest_order_flow
            self._spawn(
                self._flight.do(
                    ("confirm", kind, symbol, source, gen),
                    functools.partial(load, symbol, source, counters),
                )
            )

    def _drop_gapped(self, series: Sequence[tuple[str, str, str]]) -> None:
        """Drop the L1 rings of the candle series whose live updates another router gave
        up (L2 was unreachable for too long; the bus names them), so the next read refills
        them from L2 or the database instead of serving a gap. The rest of L1 stays."""
        for symbol, timeframe, source in series:
            self._l1.drop_candles(symbol, timeframe, source)
        # A candle read under way may have read such a ring before L2 reset it: it must not
        # fill L1 with it (see _ring_drops).
        self._ring_drops += 1
        logger.info(
            "cache bus: %d candle series lost live updates; their L1 rings dropped", len(series)
        )

    def _on_subscription_lost(self) -> None:
        # Without the bus we cannot know what other routers wrote: stop trusting L1, and the
        # candle sources resolved from what it saw. It keeps this router's own writes the
        # database has not stored yet: reads answer the newer of them and the database's.
        self._l1_enabled = False
        self._forget_l1()
        self._keep_unstored()
        logger.warning("cache subscription lost; L1 cleared and bypassed until resubscribed")

    def _on_subscription_restored(self) -> None:
        # L1 held only this router's writes while bypassed; L2 may have lost what it was
        # sent (a restarted server comes back empty; what the bus could not send was
        # dropped), and a read through a database that lags the write path would install
        # an older value there as the newest. So once this router's writes are stored,
        # the database's newest values of the keys it wrote go to L2 and the other routers.
        ticks, flows, _ = self._l1.contents()
        self._forget_l1()
        self._l1_enabled = True
        unstored = self._keep_unstored()
        # L1 forgot what other sources wrote: its own unstored values are served once the
        # tiers below confirm no other source has newer ones (as after a start).
        if self._l1.confirmations_due:
            self._confirm_latest()
        if self._bus is None or self._state is not RouterState.OPEN:
            return
        routing = self._watcher.current.routing
        keys: set[tuple[type[Any], str, str]] = set()
        for item in itertools.chain(unstored, ticks, flows):
            kind = type(item)
            if (kind is TickData and L2_CACHE in routing.save_tick) or (
                kind is OrderFlowMetrics and L2_CACHE in routing.save_order_flow
            ):
                keys.add((kind, item.symbol, item.source))
        if keys:
            self._spawn(self._refresh_l2(self._bus, sorted(keys, key=repr)))
        logger.info("cache subscription restored; L1 in use again")

    def _on_bus_resumed(self, keys: Sequence[tuple[type[Any], str, str]]) -> None:
        # The bus dropped these keys' latest values while L2 could not take them, and a
        # quiet key may get no newer update for as long as L2 keeps the older one.
        if self._bus is not None and self._state is RouterState.OPEN:
            self._spawn(self._refresh_l2(self._bus, sorted(keys, key=repr)))

    def _keep_unstored(self) -> list[TickData | CandleData | OrderFlowMetrics]:
        """Put back into the cleared L1 the items the write path holds and has not stored
        yet (this router's writes the database lacks), compare-and-set; return them.

        Their any-source entries are created unsettled: the cleared L1 no longer knows
        whether another source wrote a newer value, so a read serves them only once a
        confirmation from the tiers below settles them (see :meth:`_confirm_latest`).
        """
        unstored = self._ingest.unstored() if self._ingest is not None else []
        for item in unstored:
            self._l1.put(item, settled=False)
        return unstored

    async def _refresh_l2(self, bus: CacheBus, keys: list[tuple[type[Any], str, str]]) -> None:
        """Once the write path has stored what was accepted so far, send the database's
        newest tick or order flow of each ``(kind, symbol, source)`` to L2 and the other
        routers (compare-and-set: a newer value there stays), retrying while L2 is
        unreachable or its breaker open, until it lands or this router closes or forks:
        for the keys this router wrote while L2 or the subscription was down.

        The database's newest, not this router's: another router may have stored a newer
        value meanwhile, which it could not send to L2 either.
        """
        ingest = self._ingest
        storage = _primary_of(self._storage)
        if ingest is None or storage is None:
            return
        try:
            await ingest.flush()
            # A source's newest goes to its own key only: it says nothing about the other
            # sources, so it must not become the symbol's any-source value (see
            # RedisCache.write_op); each symbol's newest of any source goes there.
            per_source: list[TickData | OrderFlowMetrics] = []
            newest: list[TickData | OrderFlowMetrics] = []
            symbols = sorted({(kind is TickData, symbol) for kind, symbol, _ in keys})
            for kind, symbol, source in keys:
                latest = storage.latest_tick if kind is TickData else storage.latest_order_flow
                value = await latest(symbol, source=source)
                if value is not None:
                    per_source.append(value)
            for is_tick, symbol in symbols:
                latest = storage.latest_tick if is_tick else storage.latest_order_flow
                value = await latest(symbol)
                if value is not None:
                    newest.append(value)
        except DataManagerError:
            logger.warning(
                "cache: could not read the newest values of the keys L2 missed updates of; "
                "they reach it with their next update",
                exc_info=True,
            )
            return
        chunks = [
            (items[start : start + _RESEND_CHUNK], only_source)
            for items, only_source in ((per_source, True), (newest, False))
            for start in range(0, len(items), _RESEND_CHUNK)
        ]
        for chunk, only_source in chunks:
            while self._state is RouterState.OPEN and self._bus is bus:
                try:
                    await bus.send(chunk, per_source=only_source)
                except CacheUnavailableError:
                    await asyncio.sleep(_RESEND_RETRY_SECONDS)
                    continue
                except CacheError:
                    logger.warning(
                        "cache: L2 refused the newest values of the keys it missed updates "
                        "of; they reach it with their next update",
                        exc_info=True,
                    )
                    return
                break

    def _forget_l1(self) -> None:
        """Clear L1 and what was resolved from it (the candle sources); reads under way
        see the new generation and do not fill it with what they read before."""
        self._l1.clear()
        self._default_candle_source.clear()
        self._l1_gen += 1

    # ------------------------------------------------------------------ writes

    def _resolve_mode(self, mode: WriteMode | _UseDefault) -> WriteMode:
        if mode is USE_DEFAULT:
            return self.settings.write_mode
        if mode not in ("buffered", "journal", "sync"):
            msg = f"unknown write mode {mode!r}; expected buffered, journal or sync"
            raise ValidationError(msg)
        return mode

    def _publish(
        self, route: Sequence[str], item: TickData | CandleData | OrderFlowMetrics
    ) -> None:
        if self._bus is not None and L2_CACHE in route:
            self._bus.publish(item)

    async def save_tick(
        self, tick: TickData, *, mode: WriteMode | _UseDefault = USE_DEFAULT
    ) -> None:
        """Accept a tick: L1 and the L2/pub-sub fast path, the write path, then aggregation,
        order flow, processors and this router's subscribers.

        The derived data sees only ticks the write path accepted (queued, journaled or
        committed, per ``mode``): a tick refused with an error is not counted, and saving
        it again counts it once.

        Args:
            tick: A validated :class:`TickData`.
            mode: ``sync`` (return after commit), ``buffered`` (return once queued) or
                ``journal`` (return once fsync'd to the local journal); default from settings.

        Raises:
            ValidationError: ``tick`` is not a TickData, or its source is too long to form
                the aggregated candles' source.
            DatabaseConnectionError, RetryExhaustedError, CircuitBreakerOpenError: only in
                ``sync`` mode (other modes hand failures to the journal).
            JournalError: ``journal`` mode, and the append or its sync failed.
            BackpressureTimeoutError: The queue stayed full past ``put_timeout_seconds``.
        """
        if self._state is not RouterState.OPEN or self._fork_gen != _fork_generation:
            await self._ready()
        if type(tick) is not TickData:
            msg = f"save_tick expects TickData, got {type(tick).__name__}"
            raise ValidationError(msg)
        write_mode = self._resolve_mode(mode)
        tick = stamp_received(tick, self._clock.time_ms())
        series = (tick.symbol, tick.source)
        if self._aggregator is not None and series not in self._agg_restored:
            self._check_new_series(tick)  # a tick it would refuse is refused before storing
        route = self._watcher.current.routing.save_tick
        # The latest-value fast path comes first, whatever the write mode: compare-and-set
        # on the timestamp, so a tick retried after a refusal changes nothing there.
        self._l1.put_tick(tick)
        if self._l1.confirmations_due:
            self._confirm_latest()
        self._publish(route, tick)
        ingest = self._ingest
        assert ingest is not None
        try:
            await ingest.submit(tick, mode=write_mode)
        except asyncio.CancelledError:
            # The caller gave up as its journal append became durable: the tick is accepted
            # (it will be stored), so the derived data counts it all the same.
            if ingest.took_despite_cancel(tick):
                self._derive_kept_after_cancel(tick, route)
            raise
        # Accepted (queued, journaled or committed): only now does the tick reach the data
        # derived from it, so a refused tick is not counted and the caller's retry counts it
        # once. (Buffered: submit does not wait unless the queue is full: no extra await.)
        if self._state is not RouterState.OPEN:
            # close() began while the write was under way: the tick is stored or journaled
            # (so this call succeeds), but the derived data was closed with the router.
            return
        if self._derive(tick, series, route):
            # The first ticks of a series since the start: aggregated once the bars a
            # previous router left forming are restored (last, as it may wait).
            await self._aggregate_after_restore(tick, route)

    def _derive(self, tick: TickData, series: tuple[str, str], route: Sequence[str]) -> bool:
        """Hand an accepted tick to the derived data and this router's subscribers; True
        when its series' forming bars are still to be restored (the caller then aggregates
        it through the restore).

        A tick saved again (the same timestamp and content as one of the series' last
        ticks: stored once) reaches only the subscribers: the derived data counts it once.
        """
        derives = self._aggregator is not None or self._orderflow is not None
        if (derives or self._processors.active) and self._repeats.is_repeat(tick, series):
            if self._subs:
                self._subs.dispatch(tick)
            return False
        restoring = False
        if self._aggregator is not None:
            if series in self._agg_restored:
                self._feed_aggregator(tick, route)
            else:
                restoring = True
        if self._orderflow is not None:
            self._feed_orderflow(tick, route)
        if self._processors.active:
            self._processors.process(tick)
        if self._subs:
            self._subs.dispatch(tick)
        return restoring

    def _check_new_series(self, tick: TickData) -> None:
        """Refuse a tick that would open a series the aggregator cannot form.

        Also for a symbol whose aggregation is disabled: the series counts as checked from
        here on, and a reload may enable the symbol (its ticks would then be stored and
        refused by the aggregator afterwards).
        """
        assert self._aggregator is not None
        self._aggregator.candle_source(tick.source)

    def _feed_orderflow(self, tick: TickData, route: Sequence[str]) -> None:
        assert self._orderflow is not None
        if not self._orderflow.feed(tick):
            return
        if self._flow_timer is None:
            interval = self._watcher.current.order_flow.publish_interval_seconds
            self._flow_timer = _arm(interval, self._flow_due)
        self._flow_touched[tick.symbol] = route

    def _flow_due(self) -> None:
        self._flow_timer = None
        if self._state is RouterState.OPEN:
            self._emit_flow()

    def _emit_flow(self) -> None:
        """Materialise and publish the metrics of every symbol touched since the last call
        (L1, L2 and other routers, subscribers); the database gets them once per
        maintenance pass."""
        touched = self._flow_touched
        calculator = self._orderflow
        if not touched or calculator is None:
            touched.clear()
            return
        self._flow_touched = {}
        dirty = self._flow_dirty
        for symbol, route in touched.items():
            metrics = calculator.latest(symbol)
            if metrics is None:
                continue
            self._l1.put_order_flow(metrics)
            self._publish(route, metrics)
            if self._subs:
                self._subs.dispatch(metrics)
            dirty[symbol] = metrics
        if self._l1.confirmations_due:
            self._confirm_latest()

    def _feed_aggregator(self, tick: TickData, route: Sequence[str]) -> None:
        assert self._aggregator is not None
        assert self._ingest is not None
        if tick.symbol in self._watcher.current.aggregation.disabled_symbols:
            return
        dirty = self._forming_dirty
        for candle in self._aggregator.update(tick):  # closed candles only
            self._l1.put_candle(candle)
            self._publish(route, candle)
            if self._subs:
                self._subs.dispatch(candle)
            dirty.pop((candle.symbol, candle.source, candle.timeframe), None)
            self._ingest.submit_nowait(candle)
        if self._forming_timer is None:
            interval = self._watcher.current.aggregation.publish_interval_seconds
            self._forming_timer = _arm(interval, self._forming_due)
        self._forming_touched[(tick.symbol, tick.source)] = route

    def _forming_due(self) -> None:
        self._forming_timer = None
        if self._state is RouterState.OPEN:
            self._emit_forming()

    def _emit_forming(self) -> None:
        """Publish the forming bars of every series touched since the last call: one
        snapshot per series and timeframe, however many ticks it took since.

        Runs from the publish timer, before reads and flushes of this router (so they see
        the current bars), and from the maintenance pass.
        """
        touched = self._forming_touched
        aggregator = self._aggregator
        if not touched or aggregator is None:
            touched.clear()
            return
        self._forming_touched = {}
        dirty = self._forming_dirty
        l1 = self._l1
        for (symbol, source), route in touched.items():
            for candle in aggregator.forming_of(symbol, source):
                l1.put_candle(candle)
                self._publish(route, candle)
                if self._subs:
                    self._subs.dispatch(candle)
                dirty[(candle.symbol, candle.source, candle.timeframe)] = candle

    async def _aggregate_after_restore(self, tick: TickData, route: Sequence[str]) -> None:
        """Aggregate one of the first ticks of a series since this router started: once the
        forming candles a previous router left for it are restored.

        Concurrent first ticks of a series share one restore (one storage read per
        timeframe); their ticks wait in it and are aggregated in arrival order when it
        ends, so none can open a bucket the restore then skips.
        """
        task = self._join_restore(tick, route)
        if task is not None:
            # A caller that gives up waiting leaves its tick (and the others') in the
            # restore, which goes on; a restore that ends otherwise (cancelled by close())
            # is not the caller's error: its tick is accepted already.
            await asyncio.wait((task,))

    def _join_restore(self, tick: TickData, route: Sequence[str]) -> asyncio.Task[None] | None:
        """Add ``tick`` to its series' restore, started here if none runs; return the
        restore's task, or None when the tick waits for a later attempt."""
        key = (tick.symbol, tick.source)
        restore = self._agg_restoring.get(key)
        if restore is None:
            restore = self._agg_restoring[key] = _FormingRestore()
        restore.ticks.append((tick, route))
        task = restore.task
        if task is None:
            if self._clock.monotonic() < restore.retry_at or (
                key not in self._agg_seen and self._recovery_waits(key)
            ):
                # The last attempt failed moments ago, or the candles a crashed router left
                # are being rebuilt: the tick waits for the next attempt. (A series a reload
                # sent back here was aggregated here already: recovery leaves it alone.)
                return None
            task = restore.task = self._start_restore(key, restore)
        return task

    def _start_restore(self, key: tuple[str, str], restore: _FormingRestore) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._restore_forming(key, restore))

    def _start_held_restores(self, *, due_only: bool) -> list[asyncio.Task[None]]:
        """Retry the restores whose ticks wait after a failed attempt (with ``due_only``,
        those whose pause has passed); return every restore task under way."""
        now = self._clock.monotonic()
        tasks: list[asyncio.Task[None]] = []
        rebuilding = self._recovery.current if self._recovery.waiting else None
        for key, restore in list(self._agg_restoring.items()):
            if key == rebuilding:
                continue  # its restore reads the rebuilt bars, once they are written
            if restore.task is None and not (due_only and now < restore.retry_at):
                restore.task = self._start_restore(key, restore)
            if restore.task is not None:
                tasks.append(restore.task)
        return tasks

    async def _restore_forming(self, key: tuple[str, str], restore: _FormingRestore) -> None:
        """Continue the buckets a previous router of this (symbol, source) left forming,
        then aggregate the ticks that waited for it.

        The ticks are accepted already: a failed read is not their callers' error. It is
        logged and retried with a later tick (or by flush, close or maintenance) at least
        ``_RESTORE_RETRY_SECONDS`` later, the ticks waiting meanwhile; after
        ``_RESTORE_ATTEMPTS`` failures aggregation goes on without the restored bars.
        """
        symbol, source = key
        newest: list[CandleData] = []
        aggregator = self._aggregator
        # Not self.storage: close() runs the last attempts. The primary: another router's
        # bars, which a lagging replica would hand back older (and stored over the newer).
        storage = _primary_of(self._storage)
        read: set[str] = set()
        try:
            # Until every timeframe aggregated now is read (a reload may add some meanwhile).
            while aggregator is not None and storage is not None:
                missing = [tf for tf in aggregator.timeframes if tf not in read]
                if not missing:
                    break
                agg_source = f"{aggregator.source_prefix}{source}"
                for tf in missing:
                    # The newest bar: a forming one goes on; a closed one tells where the
                    # closed bars end, so a resent or late tick cannot reopen it.
                    newest += await storage.latest_candles(symbol, tf, 1, source=agg_source)
                    read.add(tf)
                aggregator = self._aggregator
        except Exception:  # the storage's errors, or a bug: either way retried, then given up
            if self._agg_restoring.get(key) is not restore:
                return
            restore.task = None
            restore.failures += 1
            self._restore_failures += 1
            if restore.failures < _RESTORE_ATTEMPTS:
                restore.retry_at = self._clock.monotonic() + _RESTORE_RETRY_SECONDS
                logger.warning(
                    "cannot restore the forming candles of %s from %s (attempt %d of %d); "
                    "its %d ticks since the start are accepted and wait to be aggregated",
                    symbol,
                    source,
                    restore.failures,
                    _RESTORE_ATTEMPTS,
                    len(restore.ticks),
                    exc_info=True,
                )
                return
            logger.error(
                "cannot restore the forming candles of %s from %s after %d attempts; "
                "aggregating without them: the bars formed before this router started "
                "miss their earlier ticks until rebuild_candles() recomputes them",
                symbol,
                source,
                restore.failures,
                exc_info=True,
            )
        if self._agg_restoring.get(key) is not restore:
            return  # superseded (a forked child starts its derived data afresh)
        del self._agg_restoring[key]
        # From here on nothing awaits: no tick of the series can come in between.
        aggregator = self._aggregator  # a strategy reload may have replaced it meanwhile
        if aggregator is None:
            return
        if key not in self._agg_restored:
            if newest:
                restored = aggregator.restore(newest)
                logger.info(
                    "restored the newest %d candles of %s from %s", restored, symbol, source
                )
            self._agg_restored.add(key)
        ingest = self._ingest
        if ingest is None or ingest.state is not PipelineState.RUNNING:
            return  # closed meanwhile: the ticks are stored; the derived data closed too
        for tick, route in restore.ticks:
            self._feed_aggregator(tick, route)

    def _materialise_derived(self) -> None:
        """Publish the forming bars and order flow still waiting for their timer (before
        this router reads L1, reports health or flushes)."""
        if self._forming_touched:
            self._emit_forming()
        if self._flow_touched:
            self._emit_flow()

    def _submit_forming(self) -> None:
        self._materialise_derived()
        if self._ingest is None:
            return
        if self._flow_dirty:
            flows = list(self._flow_dirty.values())
            self._flow_dirty.clear()
            for metrics in flows:
                self._ingest.submit_nowait(metrics)
        if not self._forming_dirty:
            return
        dirty = list(self._forming_dirty.values())
        self._forming_dirty.clear()
        for candle in dirty:
            self._ingest.submit_nowait(candle)

    # ------------------------------------------------------------------ maintenance

    async def run_maintenance(self) -> None:
        """One pass of the router's timer: retry forming-candle restores that failed, close
        idle buckets, queue forming candles, rebuild buckets hit by late ticks.

        The router runs this every ``batch.flush_interval_seconds``; tests with a manual
        clock call it directly instead of waiting.
        """
        await self._ready()
        if self._recovery.due(self._clock.monotonic()):
            self._start_recovery()
        if self._agg_restoring and not self._recovery_waits():
            restoring = self._start_held_restores(due_only=True)
            if restoring:
                await asyncio.wait(restoring)
        aggregator = self._aggregator
        try:
            await self._maintain_derived(aggregator)
        finally:
            self._hold_derived()

    async def _maintain_derived(self, aggregator: CandleAggregator | None) -> None:
        if aggregator is not None:
            agg = self._watcher.current.aggregation
            grace_ms = round(agg.idle_close_grace_seconds * 1000)
            route = self._watcher.current.routing.save_tick
            for candle in aggregator.close_idle(self._clock.time_ms(), grace_ms):
                self._forming_dirty.pop((candle.symbol, candle.source, candle.timeframe), None)
                self._l1.put_candle(candle)
                self._publish(route, candle)
                if self._subs:
                    self._subs.dispatch(candle)  # as a bar a tick closes
                assert self._ingest is not None
                self._ingest.submit_nowait(candle)
            self._submit_forming()
            requests = aggregator.drain_rebuilds()
            if requests:
                await self._rebuild_late(aggregator, requests, agg.daily_close)
        else:
            self._submit_forming()

    def _hold_derived(self) -> None:
        """Let the journal's checkpoint pass the ticks whose derived data is now queued.

        The barrier is the journal's newest LSN at the *previous* pass: a tick acknowledged
        then has been aggregated since (its caller resumed), and this pass queued the
        forming bars and order flow that hold it. Nothing moves while ticks wait for a
        restore, nor after a late-tick rebuild failed (their candles are not queued). Late
        ticks that arrived during this pass are above the barrier.
        """
        journal = self._barrier_journal()
        if journal is None:
            return
        assert self._ingest is not None
        late_owed, self._late_owed = self._late_owed, False
        if self._agg_restoring or late_owed:
            self._barrier_lsn = None
            return
        if self._barrier_lsn is not None:
            self._ingest.derived_barrier(self._barrier_lsn)
        self._barrier_lsn = journal.last_lsn

    def _barrier_journal(self) -> Journal | None:
        """This router's journal while it is open: the one derived-data barriers hold."""
        journal = None if self._ingest is None else self._ingest.journal
        return journal if journal is not None and journal.is_open else None

    async def _rebuild_late(
        self, aggregator: CandleAggregator, requests: Sequence[RebuildRequest], daily_close: Any
    ) -> None:
        """Queue the candles of buckets that took late ticks, re-aggregated from storage,
        and send them where the candles they replace went (:meth:`_spread_rebuilt`).

        Requests it could not finish (the database failed) are owed again.
        """
        assert self._ingest is not None
        done = 0
        try:
            await self._ingest.flush()  # the late ticks themselves must be stored first
            for req in requests:
                candle = await self._rebuilt(
                    _primary_of(self.storage), aggregator, req, daily_close
                )
                if candle is not None:
                    self._spread_rebuilt((candle,))
                    self._ingest.submit_nowait(candle)
                done += 1
        finally:
            if done < len(requests):
                self._late_owed = True  # their candles are not queued: see _hold_derived
                # Owed by the aggregator in force (a strategy reload may have replaced it).
                current = self._aggregator
                if current is not None:
                    current.owe(requests[done:])

    def _spread_rebuilt(self, candles: Iterable[CandleData]) -> None:
        """Send rebuilt candles where live aggregated candles go: L1, L2 and the other
        routers (the live write, which replaces the closed candle it supersedes; a
        backfill never would) and this router's subscribers.

        Only the candles a ring can hold go out (:func:`_ring_window`): rebuilding a year
        of bars costs one ring's worth of updates per series, not one per bar.
        """
        strat = self._watcher.current
        route = strat.routing.save_tick  # aggregated candles follow their ticks' route
        for candle in _ring_window(candles, strat.cache.candle_ring_size):
            self._l1.put_candle(candle)
            self._publish(route, candle)
            if self._subs:
                self._subs.dispatch(candle)

    @staticmethod
    async def _rebuilt(
        storage: Storage, aggregator: CandleAggregator, req: RebuildRequest, daily_close: Any
    ) -> CandleData | None:
        """The candle of one bucket hit by late ticks, from the ticks storage holds."""
        start, end = bucket_bounds(req.bucket_start, req.timeframe, daily_close=daily_close)
        ticks = await storage.ticks_range(req.symbol, start, end, source=req.source)
        return aggregator.rebuild(req, ticks)

    async def _rebuild_after_close(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Store the rebuilds still owed for late ticks, once the write path has closed,
        within ``timeout`` seconds (what close's deadline has left; none left: not tried).

        Done directly against storage, and only when the write path stored everything it
        accepted: a rebuild from fewer ticks would be wrong, and a journal replayed later
        would put the candle it replaces back.
        """
        aggregator = self._aggregator
        storage = _primary_of(self._storage)
        ingest = self._ingest
        if aggregator is None or storage is None or ingest is None:
            return
        if not aggregator.pending_rebuilds:
            return
        requests = aggregator.drain_rebuilds()
        stats = ingest.stats()
        if stats.journal_records or stats.lost_on_close:
            logger.warning(
                "%d candle rebuilds owed for late ticks were not done at close: the database "
                "has not stored everything yet; rebuild_candles() recomputes those buckets",
                len(requests),
            )
            return
        if timeout is not None and timeout <= 0:
            logger.warning(
                "%d candle rebuilds owed for late ticks were not done: close(timeout=...) had "
                "no time left for them; rebuild_candles() recomputes those buckets",
                len(requests),
            )
            return
        daily_close = self._watcher.current.aggregation.daily_close
        try:
            async with asyncio.timeout(timeout):
                candles = [
                    candle
                    for req in requests
                    if (candle := await self._rebuilt(storage, aggregator, req, daily_close))
                    is not None
                ]
                if candles:
                    await storage.write_candles(candles)
                    self._spread_rebuilt(candles)  # the bus sends them as it closes
        except (DataManagerError, TimeoutError):
            logger.warning(
                "%d candle rebuilds owed for late ticks failed at close; rebuild_candles() "
                "recomputes those buckets",
                len(requests),
                exc_info=True,
            )

    # ------------------------------------------------------------------ history

    async def rebuild_candles(
        self,
        symbol: str,
        timeframe: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        method: Literal["auto", "sql", "stream"] = "auto",
    ) -> int:
        """Rebuild aggregated candles of the buckets overlapping ``[start, end)`` from the
        stored ticks (bulk imports with ``save_ticks`` bypass the live aggregator).

        The candles are those live ingestion gives for the same ticks, with the strategy's
        aggregation options: the ticks of each source are taken in key order
        ``(timestamp, content key)``, which storage keeps (not arrival order). Candles of
        buckets that have ended are stored closed; a bucket still running is stored forming.
        Queued writes are flushed first. The newest ``cache.candle_ring_size`` candles of
        each series then replace the cached ones as live candles do (L1, L2, the other
        routers, subscribers).

        Args:
            source: Tick source to rebuild (candles ``agg:<source>``); default every source.
            method: ``"sql"`` aggregates in the database (``time_bucket`` and
                ``first``/``last`` on TimescaleDB, plain SQL elsewhere; one statement per
                day of ticks, per week for ``"1w"``) and transfers one row per candle;
                ``"stream"`` streams every tick through the Python aggregator; ``"auto"``
                uses SQL unless the buckets follow a calendar (``daily_close="new_york_17"``
                with ``4h``, ``1d`` or ``1w``), which only ``"stream"`` computes.

        Returns:
            How many candles were written.

        Raises:
            ValidationError: Unknown timeframe or method, a bad source, naive datetimes,
                ``end`` before ``start``, or ``method="sql"`` for calendar-aligned buckets.
        """
        await self._ready()
        sym = _norm(symbol)
        timeframe_ms(timeframe)
        source = _source(source)
        if method not in ("auto", "sql", "stream"):
            msg = f"method must be 'auto', 'sql' or 'stream', got {method!r}"
            raise ValidationError(msg)
        start_ms, end_ms = epoch_ms_range(start, end)
        agg = self._watcher.current.aggregation
        in_sql = method != "stream" and sql_bucketable(timeframe, agg.daily_close)
        if method == "sql" and not in_sql:
            msg = (
                f"method='sql' cannot rebuild {timeframe} candles under "
                f"daily_close={agg.daily_close!r}: their buckets follow New York daylight "
                "saving time; use method='stream' (or 'auto')"
            )
            raise ValidationError(msg)
        first, _ = bucket_bounds(start_ms, timeframe, daily_close=agg.daily_close)
        _, last = bucket_bounds(max(start_ms, end_ms - 1), timeframe, daily_close=agg.daily_close)
        assert self._ingest is not None
        self._submit_forming()
        await self._ingest.flush()  # rebuild from everything accepted so far
        return await self._rebuild_range(sym, timeframe, first, last, source, in_sql=in_sql)

    async def _rebuild_range(
        self,
        sym: str,
        timeframe: str,
        first: int,
        last: int,
        source: str | None,
        *,
        in_sql: bool | None = None,
        received_before: int | None = None,
    ) -> int:
        """Rebuild the buckets of bucket-aligned ``[first, last)`` from the stored ticks
        (those received before ``received_before``, when given); see :meth:`rebuild_candles`."""
        agg = self._watcher.current.aggregation
        # Not self.storage: close() may finish a crash recovery's. Rebuilds read the primary.
        storage = _primary_of(self._storage)
        assert storage is not None
        if in_sql is None:
            in_sql = sql_bucketable(timeframe, agg.daily_close)
        if in_sql:
            return await self._rebuild_candles_sql(
                sym, timeframe, first, last, source, agg.price, received_before
            )
        aggregator = CandleAggregator(
            timeframes=[timeframe],
            price=agg.price,
            late_policy="drop",
            daily_close=agg.daily_close,
            emit_forming=False,
        )
        ring = self._watcher.current.cache.candle_ring_size
        written = 0
        batch: list[CandleData] = []
        newest: list[CandleData] = []  # the ring's window of what was written so far
        ticks = storage.iter_ticks(sym, first, last, source=source, received_before=received_before)
        # One source's stream is already in key order; across sources, ticks of one
        # millisecond are not (PostgreSQL orders by ts alone).
        async for tick in ticks if source is not None else in_key_order(ticks):
            batch.extend(c for c in aggregator.update(tick) if c.is_closed)
            if len(batch) >= 10_000:
                written += await storage.write_candles(batch)
                newest = _ring_window([*newest, *batch], ring)
                batch.clear()
        now = self._clock.time_ms()
        # Buckets still open at the end of the stream: closed when their end has passed.
        batch.extend(aggregator.close_idle(now, 0))
        batch.extend(aggregator.forming())
        if batch:
            written += await storage.write_candles(batch)
        self._spread_rebuilt([*newest, *batch])
        return written

    async def _rebuild_candles_sql(
        self,
        symbol: str,
        timeframe: str,
        first: int,
        last: int,
        source: str | None,
        price: PriceField,
        received_before: int | None = None,
    ) -> int:
        """``rebuild_candles(method="sql")`` over bucket-aligned ``[first, last)``.

        Chunks go newest first: a source seen in a newer chunk has closed every bucket of
        the older ones, so each chunk is final when it is read.
        """
        now = self._clock.time_ms()
        ring = self._watcher.current.cache.candle_ring_size
        storage = _primary_of(self._storage)  # see _rebuild_range
        assert storage is not None
        later: set[str] = set()
        written = 0
        newest: list[CandleData] = []  # the ring's window of what was written so far
        for lo, hi in rebuild_chunks(first, last, timeframe):
            buckets = await storage.aggregate_tick_buckets(
                symbol,
                timeframe,
                lo,
                hi,
                price=price,
                source=source,
                received_before=received_before,
            )
            candles = candles_from_buckets(
                buckets, symbol=symbol, timeframe=timeframe, now_ms=now, later_sources=later
            )
            later.update(row.source for row in buckets)
            for i in range(0, len(candles), 10_000):
                written += await storage.write_candles(candles[i : i + 10_000])
            newest = _ring_window([*newest, *candles], ring)
        self._spread_rebuilt(newest)
        return written

    # ------------------------------------------------------------------ subscriptions

    def subscribe_ticks(self, symbols: Iterable[str] | None = None) -> Subscription[TickData]:
        """Live ticks of ``symbols`` (all symbols when None) from this and every other router.

        ``async for tick in router.subscribe_ticks(["EUR/USD"]): ...``. Other processes'
        writes arrive through the L2 pub/sub bus (none without L2). Each subscriber has a
        bounded buffer (``subscriptions.buffer_size``); a slow consumer loses the oldest
        items, counted in ``Subscription.dropped``.
        """
        self._require_open()
        wanted = None if symbols is None else frozenset(map(_norm, _names(symbols, "symbols")))
        if wanted is not None and not wanted:
            msg = "symbols is empty: nothing would ever match; pass None for every symbol"
            raise ValidationError(msg)

        def match(tick: TickData) -> bool:
            return wanted is None or tick.symbol in wanted

        return self._subs.add(
            Subscription(
                TickData,
                match,
                buffer_size=self._watcher.current.subscriptions.buffer_size,
                on_close=self._subs.remove,
            )
        )

    def subscribe_candles(
        self, symbol: str, timeframe: str, *, source: str | None = None
    ) -> Subscription[CandleData]:
        """Live candle updates (forming and closed) of one (symbol, timeframe).

        Without ``source`` every source's candles are delivered (vendor and aggregated).
        """
        self._require_open()
        sym = _norm(symbol)
        timeframe_ms(timeframe)
        source = _source(source)

        def match(candle: CandleData) -> bool:
            return (
                candle.symbol == sym
                and candle.timeframe == timeframe
                and (source is None or candle.source == source)
            )

        return self._subs.add(
            Subscription(
                CandleData,
                match,
                buffer_size=self._watcher.current.subscriptions.buffer_size,
                on_close=self._subs.remove,
            )
        )

    # ------------------------------------------------------------------ processors

    def register_processor(self, processor: TickProcessor) -> None:
        """Call ``processor.on_tick`` with every saved tick of its symbols.

        Processors run synchronously on the save path and must be cheap; a failing one is
        counted and logged (rate-limited), never blocks storage, and shows in health.
        """
        self._processors.register(processor)

    def unregister_processor(self, name: str) -> None:
        """Stop calling the processor registered under ``name``."""
        self._processors.unregister(name)

    @property
    def processors(self) -> ProcessorRegistry:
        """The real-time processor registry (seed 003's branch B)."""
        return self._processors

    async def save_candle(
        self, candle: CandleData, *, mode: WriteMode | _UseDefault = USE_DEFAULT
    ) -> None:
        """Accept a candle (upserted on (symbol, timeframe, source, bucket start)).

        Raises:
            ValidationError: ``candle`` is not a CandleData.
        """
        if self._state is not RouterState.OPEN or self._fork_gen != _fork_generation:
            await self._ready()
        if type(candle) is not CandleData:
            msg = f"save_candle expects CandleData, got {type(candle).__name__}"
            raise ValidationError(msg)
        write_mode = self._resolve_mode(mode)
        if write_mode != "sync":
            self._candles_queued = True
        route = self._watcher.current.routing.save_candle
        self._l1.put_candle(candle)
        self._promote_source(candle)
        self._publish(route, candle)
        if self._subs:
            self._subs.dispatch(candle)
        assert self._ingest is not None
        await self._ingest.submit(candle, mode=write_mode)

    async def save_order_flow(
        self, metrics: OrderFlowMetrics, *, mode: WriteMode | _UseDefault = USE_DEFAULT
    ) -> None:
        """Accept order-flow metrics.

        Raises:
            ValidationError: ``metrics`` is not an OrderFlowMetrics.
        """
        if self._state is not RouterState.OPEN or self._fork_gen != _fork_generation:
            await self._ready()
        if type(metrics) is not OrderFlowMetrics:
            msg = f"save_order_flow expects OrderFlowMetrics, got {type(metrics).__name__}"
            raise ValidationError(msg)
        write_mode = self._resolve_mode(mode)
        route = self._watcher.current.routing.save_order_flow
        self._l1.put_order_flow(metrics)
        if self._l1.confirmations_due:
            self._confirm_latest()
        self._publish(route, metrics)
        if self._subs:
            self._subs.dispatch(metrics)
        assert self._ingest is not None
        await self._ingest.submit(metrics, mode=write_mode)

    async def save_ticks(self, ticks: Iterable[TickData]) -> int:
        """Bulk-store ticks synchronously (COPY on PostgreSQL); idempotent.

        Bulk imports bypass the live aggregator; the caches take every tick in batch order
        through their compare-and-set, as from :meth:`save_tick` (so each source's newest
        tick, and the symbol's, end up there; the bus coalesces them per source).

        Returns:
            How many rows were new.
        """
        await self._ready()
        batch = self._check_all(ticks, TickData)
        if not batch:
            return 0
        stored = await self.storage.write_ticks(batch)
        route = self._watcher.current.routing.save_tick
        put_tick = self._l1.put_tick
        for tick in batch:
            put_tick(tick)
            self._publish(route, tick)  # L2 (compare-and-set) and the other routers' L1
        if self._l1.confirmations_due:
            self._confirm_latest()
        if self._subs:
            # What the other routers' subscribers get through the bus, which coalesces the
            # batch: each source's newest tick of it.
            newest: dict[tuple[str, str], TickData] = {}
            for tick in batch:
                key = (tick.symbol, tick.source)
                old = newest.get(key)
                if old is None or supersedes(tick, old):
                    newest[key] = tick
            for tick in newest.values():
                self._subs.dispatch(tick)
        await self._settle_bus()
        return stored

    async def save_candles_bulk(self, candles: Iterable[CandleData]) -> int:
        """Bulk-upsert candles synchronously (COPY into staging on PostgreSQL).

        L1, L2 and the other routers get every candle of each series that falls in the
        candle ring (``cache.candle_ring_size``, the newest buckets), oldest first.

        Candles this router queued with :meth:`save_candle` (``buffered`` or ``journal``)
        are stored first, so none of them can overwrite a bulk candle afterwards; so are
        journals waiting to be replayed (a dead router's, batches spilled during an
        outage), whose candles are older than the bulk ones. While the database is down
        that waits, as :meth:`flush` does.

        Returns:
            How many rows were inserted or updated.
        """
        await self._ready()
        batch = self._check_all(candles, CandleData)
        if not batch:
            return 0
        assert self._ingest is not None
        if self._candles_queued or self._ingest.replay_owed:
            await self._flush_write_path()
        stored = await self.storage.write_candles(batch)
        strat = self._watcher.current
        for candle in batch:
            self._l1.put_candle(candle)
            self._promote_source(candle)
        bus = self._bus if L2_CACHE in strat.routing.save_candle else None
        if bus is not None or self._subs:
            # L2, the other routers' L1 and every router's subscribers: every candle of the
            # ring's window (the last version of each bucket, as the database keeps it),
            # oldest first, so the shared ring has no gap.
            for candle in _ring_window(batch, strat.cache.candle_ring_size):
                if bus is not None:
                    bus.publish(candle)
                if self._subs:
                    self._subs.dispatch(candle)
        await self._settle_bus()
        return stored

    async def _settle_bus(self) -> None:
        """Wait until what was published reached L2: a synchronous bulk save returns with
        L2 already holding its newest values, so any router's next read sees them."""
        if self._bus is not None:
            try:
                async with asyncio.timeout(4 * self.settings.dragonfly.socket_timeout):
                    await self._bus.flush()
            except TimeoutError:
                logger.warning("L2 did not take a bulk save's newest values in time")

    @staticmethod
    def _check_all(items: Iterable[Any], cls: type[T]) -> list[T]:
        try:
            batch = list(items)
        except TypeError as exc:
            msg = f"expected an iterable of {cls.__name__}, got {type(items).__name__}"
            raise ValidationError(msg) from exc
        for i, item in enumerate(batch):
            if type(item) is not cls:
                msg = f"item {i} is {type(item).__name__}, expected {cls.__name__}"
                raise ValidationError(msg)
        return batch

    async def flush(self) -> None:
        """Return once everything accepted before this call is stored in the database,
        with the candles of buckets that took late ticks (``late_policy="rebuild"``)
        rebuilt from them."""
        await self._ready()
        assert self._ingest is not None
        if self._agg_restoring or self._recovery.waiting:
            await self._settle_restores(None)
        self._submit_forming()
        aggregator = self._aggregator
        if aggregator is not None and aggregator.pending_rebuilds:
            # Buckets that took late ticks (late_policy="rebuild"): their rebuilt candles
            # are part of what was accepted.
            daily_close = self._watcher.current.aggregation.daily_close
            await self._rebuild_late(aggregator, aggregator.drain_rebuilds(), daily_close)
        await self._flush_write_path()

    async def _flush_write_path(self) -> None:
        """Wait until everything queued so far is stored (``IngestPipeline.flush``)."""
        assert self._ingest is not None
        queued, self._candles_queued = self._candles_queued, False
        try:
            await self._ingest.flush()
        except BaseException:
            self._candles_queued = self._candles_queued or queued
            raise

    async def _settle_restores(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Give every series whose ticks wait for their restore an attempt now, and wait
        (up to ``timeout`` seconds) until the attempts have run. A crash recovery's rebuild
        comes first at a flush; at close it is left to the next router."""
        deadline = None if timeout is None else self._clock.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - self._clock.monotonic())

        recovery = self._recovery
        if recovery.waiting and self._state is RouterState.OPEN and self._ingest is not None:
            # flush(): the adopted journals' replay first, then their rebuild, retried at
            # once after a failure until it is done or given up.
            await self._ingest.flush(left())
            while recovery.waiting and recovery.replayed:
                task = recovery.task
                if task is None or task.done():
                    task = self._start_recovery()
                await asyncio.wait((task,), timeout=left())
                if not task.done():
                    break
            if recovery.waiting:
                return  # journals adopted meanwhile: their ticks wait for the next rebuild
        elif recovery.waiting:
            # close(): the rebuild is left to the next router (the adopted journals stay
            # until one finishes it), so that the held ticks can be aggregated now, on the
            # bars stored so far: the next rebuild corrects the buckets they share with the
            # dead router's ticks (it counts every tick received before its own adoption).
            task = recovery.task
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait((task,))
        tasks = self._start_held_restores(due_only=False)
        if tasks:
            await asyncio.wait(tasks, timeout=left())

    def _release_derived_hold(self) -> None:
        """Closing with every derived item queued: the checkpoint may pass every tick."""
        journal = self._barrier_journal()
        aggregator = self._aggregator
        if (
            journal is None
            or self._agg_restoring
            or self._recovery.waiting
            or (aggregator is not None and aggregator.pending_rebuilds)
        ):
            return  # ticks whose derived data is not queued stay for the next router
        assert self._ingest is not None
        self._ingest.derived_barrier(journal.last_lsn)

    # ------------------------------------------------------------------ crash recovery

    def _recovery_waits(self, key: tuple[str, str] | None = None) -> bool:
        """Whether first ticks of a series (``key``) wait for a crash recovery before their
        restore: until it is done (at most ``_RECOVERY_WAIT_SECONDS``), and while their
        series is being rebuilt."""
        recovery = self._recovery
        if not recovery.waiting:
            return False
        if self._clock.monotonic() < recovery.wait_until:
            return True
        return key is not None and recovery.current == key

    def _on_adopted(self) -> None:
        now = self._clock.monotonic()
        self._recovery.begin(
            cutoff_ms=self._clock.time_ms(),
            wait_until=now + _RECOVERY_WAIT_SECONDS,
            live=self._agg_restored | self._agg_seen | set(self._agg_restoring),
        )

    def _on_replayed(self, items: Sequence[Any]) -> None:
        aggregator = self._aggregator
        prefix = None if aggregator is None else aggregator.source_prefix
        self._recovery.note(items, prefix)

    def _on_adopted_replayed(self) -> None:
        self._recovery.replayed = True
        if self._state is RouterState.OPEN and self._recovery.due(self._clock.monotonic()):
            self._start_recovery()

    def _start_recovery(self) -> asyncio.Task[object]:
        recovery = self._recovery
        recovery.retry_at = None
        task = recovery.task = self._spawn(self._recover_derived())
        return task

    async def _recover_derived(self) -> None:
        """Rebuild the candles of the series a dead instance's replayed journal touched,
        from the ticks stored before the adoption, then let their restores run.

        The dead router kept the candles and order flow of its last moments in memory; its
        journal's checkpoint held those ticks back (see :meth:`_hold_derived`), so they are
        replayed, and every bucket they fall in is rebuilt here. Ticks this router received
        since are left out (they are aggregated live, on top of the rebuilt bars). Order
        flow is not recomputed. A failure is retried from the maintenance pass.
        """
        recovery = self._recovery
        series = recovery.take()
        aggregator = self._aggregator
        written = 0
        rebuilt = 0
        skipped: list[tuple[str, str]] = []
        gave_up = False
        try:
            agg = self._watcher.current.aggregation
            while series:
                key, (lo, hi) = next(iter(series.items()))
                symbol, source = key
                restoring = self._agg_restoring.get(key)
                if aggregator is None or symbol in agg.disabled_symbols:
                    pass
                elif (
                    key in recovery.live
                    or key in self._agg_restored
                    or key in self._agg_seen
                    or (restoring is not None and restoring.task is not None)
                ):
                    skipped.append(key)  # aggregated here already (or about to be)
                else:
                    recovery.current = key
                    for tf in aggregator.timeframes:
                        written += await self._recover_buckets(
                            aggregator, symbol, source, tf, lo, hi, recovery.cutoff_ms
                        )
                    rebuilt += 1
                recovery.current = None
                del series[key]
        except Exception:
            recovery.current = None
            recovery.failures += 1
            if recovery.failures < _RESTORE_ATTEMPTS:
                recovery.give_back(series)
                recovery.retry_at = self._clock.monotonic() + _RECOVERY_RETRY_SECONDS
                logger.warning(
                    "cannot rebuild the candles of %d series a dead instance's journal "
                    "touched (attempt %d of %d); retrying in %.0f s",
                    len(series),
                    recovery.failures,
                    _RESTORE_ATTEMPTS,
                    _RECOVERY_RETRY_SECONDS,
                    exc_info=True,
                )
                return
            gave_up = True
            logger.error(
                "giving up rebuilding the candles of %s after a crash; their bars miss the "
                "dead instance's last ticks until rebuild_candles() recomputes them (or the "
                "next router, which replays the adopted journals again)",
                ", ".join(f"{sym} from {src}" for sym, src in sorted(series)),
                exc_info=True,
            )
        finally:
            if rebuilt or written:
                logger.info(
                    "crash recovery: rebuilt %d candles of %d series from the ticks a dead "
                    "instance's journal replayed",
                    written,
                    rebuilt,
                )
            for symbol, source in skipped:
                logger.warning(
                    "crash recovery: %s from %s was aggregated here before the journal of a "
                    "dead instance was replayed; its bars may miss that instance's last "
                    "ticks: rebuild them with rebuild_candles()",
                    symbol,
                    source,
                )
        recovery.failures = 0
        if gave_up and self._ingest is not None:
            self._ingest.keep_adopted()  # for the next router, whatever happens next here
        if not recovery.finish():
            return  # more journals were adopted meanwhile: their replay ends in a new run
        if self._ingest is not None:
            await self._ingest.release_adopted()
        if self._agg_restoring and self._state is RouterState.OPEN:
            self._start_held_restores(due_only=False)

    async def _recover_buckets(
        self,
        aggregator: CandleAggregator,
        symbol: str,
        source: str,
        timeframe: str,
        lo: int,
        hi: int,
        cutoff_ms: int | None,
    ) -> int:
        """Rebuild one timeframe's buckets of ``[lo, hi]`` for a crash recovery; close the
        forming bar stored before them (the dead router may have closed it in memory only:
        its ticks are all stored, and one of a later bucket was replayed)."""
        agg = self._watcher.current.aggregation
        agg_source = f"{aggregator.source_prefix}{source}"
        first, _ = bucket_bounds(lo, timeframe, daily_close=agg.daily_close)
        _, last = bucket_bounds(hi, timeframe, daily_close=agg.daily_close)
        storage = _primary_of(self._storage)  # see _rebuild_range
        assert storage is not None
        newest = await storage.latest_candles(symbol, timeframe, 1, source=agg_source)
        written = await self._rebuild_range(
            symbol, timeframe, first, last, source, received_before=cutoff_ms
        )
        if newest and newest[-1].timestamp < first and not newest[-1].is_closed:
            closed = newest[-1].model_copy(update={"is_closed": True})
            written += await storage.write_candles([closed])
            self._spread_rebuilt((closed,))
        return written

    # ------------------------------------------------------------------ reads

    async def get_latest_tick(self, symbol: str, *, source: str | None = None) -> TickData | None:
        """Newest tick of ``symbol`` (from ``source``, or any source): L1, then the route.

        Returns:
            The tick, or None when no tier has one.

        Raises:
            ValidationError: A bad symbol or source (not 1-64 printable characters).
        """
        if self._state is not RouterState.OPEN or self._fork_gen != _fork_generation:
            await self._ready()
        sym = _norm(symbol)
        if source is not None:
            source = _source(source)
        if self._l1_enabled:
            hit = self._l1.get_tick(sym, source)
            if hit is not None:
                c = self._c_tick
                c.l1_hits += 1
                if not c.l1_hits & 31:
                    self._served_age.observe((self._clock.time_ms() - hit.timestamp) / 1000)
                return hit
        self._c_tick.l1_misses += 1
        return await self._flight.do(
            ("tick", sym, source, self._l1_gen), lambda: self._load_latest_tick(sym, source)
        )

    async def _load_latest_tick(
        self, symbol: str, source: str | None, counters: _TierCounters | None = None
    ) -> TickData | None:
        l2 = self._l2
        return await self._read_latest(
            "get_latest_tick",
            self._c_tick if counters is None else counters,
            l2_get=None if l2 is None else (lambda: l2.get_tick(symbol, source)),
            db_get=lambda db: db.latest_tick(symbol, source=source),
            l1_fill=lambda tick: self._l1.fill_tick(symbol, source, tick),
            l1_peek=lambda: self._l1.peek_tick(symbol, source),
            l2_put=None
            if l2 is None
            else (lambda tick: l2.put_ticks([tick], per_source=source is not None)),
        )

    async def _read_latest(
        self,
        operation: str,
        counters: _TierCounters,
        *,
        l2_get: Callable[[], Awaitable[L | None]] | None,
        db_get: Callable[[Storage], Awaitable[L | None]],
        l1_fill: Callable[[L | None], L | None],
        l1_peek: Callable[[], L | None],
        l2_put: Callable[[L], Coroutine[Any, Any, object]] | None,
    ) -> L | None:
        """Read-through for one "latest" value along the operation's route; the answer
        backfills the tiers above the one that gave it (L1 only if it was not cleared
        meanwhile: see ``_l1_gen``).

        L1 takes the answer through ``l1_fill`` even when it is None: an any-source read
        settles the symbol's any-source entry (see :meth:`MemoryCache.fill_tick`), which then
        holds, and this read returns, the newer of the answer and the live writes that
        reached L1 meanwhile. A per-source answer fills only that source's entries, in L1
        and in L2 (``l2_put`` knows which)."""
        route = self._watcher.current.routing.for_operation(operation)
        gen = self._l1_gen
        l2_skipped = False
        value: L | None = None
        for backend in route:
            if backend == L2_CACHE:
                if l2_get is None:
                    self._warn_no_l2()
                    continue
                started = time.perf_counter()
                try:
                    value = await l2_get()
                except CacheError:
                    counters.l2_errors += 1
                    l2_skipped = True
                    continue
                self._observe("l2", operation, started)
                if value is not None:
                    counters.l2_hits += 1
                    break
                counters.l2_misses += 1
            elif backend in _DATABASES:
                counters.db_reads += 1
                started = time.perf_counter()
                try:
                    value = await db_get(self._db_for(route))
                except _DB_UNAVAILABLE:
                    # L1's live value (this router's own write the database may lack, or
                    # one another router relayed, not yet confirmed) answers rather than an
                    # error; nothing is cached or settled.
                    live = l1_peek()
                    if live is None:
                        raise
                    return live
                self._observe("database", operation, started)
                if (
                    value is not None
                    and l2_put is not None
                    and L2_CACHE in route
                    and not l2_skipped
                ):
                    self._spawn(l2_put(value))
                break
        if self._l1_enabled and self._l1_gen == gen:
            return l1_fill(value)
        # L1 is bypassed (the subscription is down), or was cleared while this read ran
        # (the answer may be older than what the clear was for: it is not cached). It
        # holds this router's own writes since it was cleared, which the tiers below may
        # not have yet (write-behind, L2 down): the newer of the two, so a router always
        # reads its own writes.
        own = l1_peek()
        if own is not None and (value is None or supersedes(own, value)):
            return own
        return value

    async def get_latest_candles(
        self,
        symbol: str,
        timeframe: str,
        limit: int = 100,
        *,
        source: str | None = None,
    ) -> list[CandleData]:
        """The newest ``limit`` candles, oldest → newest.

        Without ``source`` the candles come from the strategy's preferred sources, else
        from the source with the newest data.

        Raises:
            ValidationError: Unknown timeframe, a non-positive limit, or a bad source.
        """
        if self._state is not RouterState.OPEN or self._fork_gen != _fork_generation:
            await self._ready()
        sym = _norm(symbol)
        if type(timeframe) is not str or timeframe not in TIMEFRAMES:
            timeframe_ms(timeframe)  # raises a clear ValidationError
        if source is not None:
            source = _source(source)
        if type(limit) is not int or not 1 <= limit <= _MAX_COUNT:
            _count(limit, "limit")  # raises a clear ValidationError
        if self._forming_touched:
            self._emit_forming()  # read-your-writes: forming bars not yet materialised
        src = source if source is not None else self._default_candle_source.get((sym, timeframe))
        if src is not None and self._l1_enabled:
            hit = self._l1.get_candles(sym, timeframe, limit, src)
            if hit is not None:
                self._c_candles.l1_hits += 1
                return hit
        self._c_candles.l1_misses += 1
        shared = await self._flight.do(
            ("candles", sym, timeframe, limit, source, self._l1_gen + self._ring_drops),
            lambda: self._load_latest_candles(sym, timeframe, limit, source),
        )
        return list(shared)  # every caller of a shared read gets a list of its own

    async def _load_latest_candles(
        self, symbol: str, timeframe: str, limit: int, source: str | None
    ) -> list[CandleData]:
        strat = self._watcher.current
        route = strat.routing.get_latest_candles
        preferred = strat.sources.candle_preference
        gen = self._l1_gen + self._ring_drops
        l2_skipped = False
        l2_unresolved = False  # L2 passed over: its ring is keyed by a source not known yet
        for backend in route:
            if backend == L2_CACHE:
                if self._l2 is None:
                    self._warn_no_l2()
                    continue
                known = source or self._default_candle_source.get((symbol, timeframe))
                if known is None:
                    l2_unresolved = True
                    continue  # L2 is keyed by source; resolving "any source" needs the DB
                started = time.perf_counter()
                try:
                    got = await self._l2.get_candles(symbol, timeframe, limit, known)
                except CacheError:
                    self._c_candles.l2_errors += 1
                    l2_skipped = True
                    continue
                self._observe("l2", "get_latest_candles", started)
                if got is not None:
                    self._c_candles.l2_hits += 1
                    return self._merge_with_l1(symbol, timeframe, limit, known, got, gen)
                self._c_candles.l2_misses += 1
            elif backend in _DATABASES:
                self._c_candles.db_reads += 1
                started = time.perf_counter()
                rows = await self._db_for(route).latest_candles(
                    symbol, timeframe, limit, source=source, preferred_sources=preferred
                )
                self._observe("database", "get_latest_candles", started)
                src = source
                if src is None:
                    src = rows[-1].source if rows else self._local_candle_source(symbol, timeframe)
                    if src is not None:
                        self._default_candle_source[(symbol, timeframe)] = src
                if rows and self._l2 is not None and L2_CACHE in route and not l2_skipped:
                    if l2_unresolved:
                        # Now that the source is known, L2's ring may hold newer candles
                        # than the database (another router's, not stored yet): merged
                        # with these rows there, it is the answer (L1 would otherwise keep
                        # a gap where they are, and append the next live bucket after it).
                        got = await self._l2_ring_after_backfill(rows, limit)
                        if got is not None:
                            rows = got
                    else:
                        self._spawn(self._l2.put_candles(rows, complete=len(rows) < limit))
                return self._merge_with_l1(symbol, timeframe, limit, src, rows, gen)
        return []

    async def _l2_ring_after_backfill(
        self, rows: list[CandleData], limit: int
    ) -> list[CandleData] | None:
        """Backfill L2 with ``rows`` (one series, from the database), then read its ring:
        the stored candles joined with the live ones L2 has beyond them. None when L2
        fails or its ring cannot answer ``limit`` (then ``rows`` are all there is)."""
        assert self._l2 is not None
        last = rows[-1]
        try:
            await self._l2.put_candles(rows, complete=len(rows) < limit)
            return await self._l2.get_candles(last.symbol, last.timeframe, limit, last.source)
        except CacheError:
            return None

    def _merge_with_l1(
        self,
        symbol: str,
        timeframe: str,
        limit: int,
        source: str | None,
        rows: list[CandleData],
        gen: int,
    ) -> list[CandleData]:
        """Backfill L1 with ``rows`` and answer from the merged ring.

        L1 holds what this router wrote or was sent but the database may not have yet
        (forming candles and buffered saves), so the merged ring is the read-your-writes
        answer. ``gen`` is ``_l1_gen + _ring_drops`` when the read began: if L1 (or the
        series' ring) was cleared since, ``rows`` may be older than what the clear was for
        and are only returned.

        When ``rows`` do not reach the ring's oldest candle (none, or all older: the tier
        below lags behind the live writes), nothing proves what lies between them: the
        answer is both, newest ``limit``, and is not cached; a later read tries again.
        """
        if source is None:
            return rows
        l1 = self._l1
        if not self._l1_enabled or self._l1_gen + self._ring_drops != gen:
            # Bypassed, or cleared while this read ran: L1 holds the live writes since,
            # which the tier below may not have yet. Answer both, L1's versions of a bucket
            # first; cache nothing (``rows`` may be older than what the clear was for).
            own = l1.peek_candles(symbol, timeframe, source)
            if not own:
                return rows
            by_start = {candle.timestamp: candle for candle in rows}
            by_start.update((candle.timestamp, candle) for candle in own)
            return [by_start[start] for start in sorted(by_start)][-limit:]
        if rows:
            l1.put_candles(rows, complete=len(rows) < limit)
        merged = l1.get_candles(symbol, timeframe, limit, source)
        if merged is not None:
            return merged
        live = l1.peek_candles(symbol, timeframe, source)
        if rows and live:
            newest = rows[-1].timestamp
            live = [*rows, *(c for c in live if c.timestamp > newest)]
        elif not live:
            return rows
        return live[-limit:]

    def _source_rank(self, source: str) -> tuple[int, bool]:
        preference = self._watcher.current.sources.candle_preference
        index = preference.index(source) if source in preference else len(preference)
        return index, source.startswith("agg:")

    def _promote_source(self, candle: CandleData) -> None:
        """A saved candle of a better-ranked source (preferred, or explicit over aggregated)
        becomes the series a source-less read answers with."""
        key = (candle.symbol, candle.timeframe)
        current = self._default_candle_source.get(key)
        if (
            current is not None
            and current != candle.source
            and self._source_rank(candle.source) < self._source_rank(current)
        ):
            self._default_candle_source[key] = candle.source

    def _local_candle_source(self, symbol: str, timeframe: str) -> str | None:
        """Source of candles only L1 holds yet: the preferred one, else the freshest."""
        local = self._l1.candle_sources(symbol, timeframe)
        if not local:
            return None
        for preferred in self._watcher.current.sources.candle_preference:
            if preferred in local:
                return preferred
        explicit = [src for src in local if not src.startswith("agg:")]
        return explicit[0] if explicit else local[0]

    async def get_latest_order_flow(
        self, symbol: str, *, source: str | None = None
    ) -> OrderFlowMetrics | None:
        """Newest order-flow metrics of ``symbol``: L1, then the route."""
        if self._state is not RouterState.OPEN or self._fork_gen != _fork_generation:
            await self._ready()
        sym = _norm(symbol)
        if source is not None:
            source = _source(source)
        if self._flow_touched:
            self._emit_flow()  # read-your-writes: metrics not yet materialised
        if self._l1_enabled:
            hit = self._l1.get_order_flow(sym, source)
            if hit is not None:
                self._c_flow.l1_hits += 1
                return hit
        self._c_flow.l1_misses += 1
        return await self._flight.do(
            ("of", sym, source, self._l1_gen), lambda: self._load_latest_order_flow(sym, source)
        )

    async def _load_latest_order_flow(
        self, symbol: str, source: str | None, counters: _TierCounters | None = None
    ) -> OrderFlowMetrics | None:
        l2 = self._l2
        return await self._read_latest(
            "get_latest_order_flow",
            self._c_flow if counters is None else counters,
            l2_get=None if l2 is None else (lambda: l2.get_order_flow(symbol, source)),
            db_get=lambda db: db.latest_order_flow(symbol, source=source),
            l1_fill=lambda m: self._l1.fill_order_flow(symbol, source, m),
            l1_peek=lambda: self._l1.peek_order_flow(symbol, source),
            l2_put=None
            if l2 is None
            else (lambda m: l2.put_order_flow([m], per_source=source is not None)),
        )

    async def get_ticks(
        self,
        symbol: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        limit: int | None = None,
    ) -> list[TickData]:
        """Ticks with ``start <= timestamp < end`` (Unix ms or aware datetimes), oldest first.

        Raises:
            ValidationError: Naive datetimes, ``end`` before ``start``, a bad source, or a
                ``limit`` that is not a positive int.
        """
        await self._ready()
        sym = _norm(symbol)
        start_ms, end_ms = epoch_ms_range(start, end)
        if limit is not None:
            limit = _count(limit, "limit")
        db = self._db_for(self._watcher.current.routing.get_ticks)
        return await db.ticks_range(sym, start_ms, end_ms, source=_source(source), limit=limit)

    async def get_candles(
        self,
        symbol: str,
        timeframe: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
    ) -> list[CandleData]:
        """Candles whose bucket starts in ``[start, end)``, oldest first.

        Raises:
            ValidationError: Unknown timeframe, naive datetimes, ``end`` before ``start``,
                or a bad source.
        """
        await self._ready()
        sym = _norm(symbol)
        timeframe_ms(timeframe)
        start_ms, end_ms = epoch_ms_range(start, end)
        db = self._db_for(self._watcher.current.routing.get_candles)
        return await db.candles_range(
            sym,
            timeframe,
            start_ms,
            end_ms,
            source=_source(source),
            preferred_sources=self._watcher.current.sources.candle_preference,
        )

    async def iter_ticks(
        self,
        symbol: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        batch_size: int = 10_000,
    ) -> AsyncIterator[TickData]:
        """Stream ticks in ``[start, end)`` oldest first without holding them all in memory."""
        await self._ready()
        sym = _norm(symbol)
        start_ms, end_ms = epoch_ms_range(start, end)
        batch_size = _count(batch_size, "batch_size")
        if batch_size > _MAX_FETCH_ROWS:  # a cursor fetches at most 2**31 - 1 rows at once
            msg = f"batch_size must be at most {_MAX_FETCH_ROWS:,}, got {batch_size:,}"
            raise ValidationError(msg)
        rows = self.storage.iter_ticks(
            sym, start_ms, end_ms, source=_source(source), batch_size=batch_size
        )
        self._cursors.add(rows)
        try:
            async for tick in rows:
                yield tick
        finally:
            self._cursors.discard(rows)
            await rows.aclose()  # the connection goes back now, not when rows is collected
        if self._state is not RouterState.OPEN:  # close() ended the cursor: not the end
            msg = "DataRouter was closed while iter_ticks() was reading"
            raise RouterClosedError(msg)

    def iter_candles(
        self,
        symbol: str,
        timeframe: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        batch_size: int = 10_000,
    ) -> AsyncIterator[CandleData]:
        """Stream candles in ``[start, end)`` oldest first, a window of bars at a time."""
        from data_manager.interop import iter_candles

        return iter_candles(
            self, symbol, timeframe, start, end, source=_source(source), batch_size=batch_size
        )

    async def get_candles_df(
        self,
        symbol: str,
        timeframe: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        backend: DataFrameBackend = "pandas",
    ) -> Any:
        """Candles in ``[start, end)`` as a pandas/polars DataFrame or an Arrow table
        (extras ``data_manager[pandas]``, ``[polars]``, ``[arrow]``)."""
        from data_manager.interop import get_candles_df

        return await get_candles_df(
            self, symbol, timeframe, start, end, source=_source(source), backend=backend
        )

    async def get_ticks_df(
        self,
        symbol: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        backend: DataFrameBackend = "pandas",
    ) -> Any:
        """Ticks in ``[start, end)`` as a pandas/polars DataFrame or an Arrow table."""
        from data_manager.interop import get_ticks_df

        return await get_ticks_df(self, symbol, start, end, source=_source(source), backend=backend)

    async def delete_range(
        self,
        symbol: str,
        start: int | datetime,
        end: int | datetime,
        kind: DataKind,
        *,
        timeframe: str | None = None,
    ) -> int:
        """Delete ``kind`` rows of ``symbol`` in ``[start, end)`` (flushing queued writes
        first so none brings a row back); returns how many were deleted."""
        from data_manager.lifecycle import delete_range

        return await delete_range(self, symbol, start, end, kind, timeframe=timeframe)

    async def apply_retention(
        self,
        *,
        policy: RetentionSettings | None = None,
        now_ms: int | None = None,
        dry_run: bool = False,
    ) -> RetentionReport:
        """Delete (or, with TimescaleDB, schedule dropping) data older than its retention."""
        from data_manager.lifecycle import apply_retention

        return await apply_retention(self, policy=policy, now_ms=now_ms, dry_run=dry_run)

    # ------------------------------------------------------------------ seed 000 extras

    async def check_staleness(
        self, symbol: str, *, timeframe: str = "1m", source: str | None = None
    ) -> StalenessReport:
        """Seed 000's staleness check: True where now − event time exceeds the TTL.

        A candle's event time is its bucket end; missing data counts as stale. TTLs come
        from the strategy's ``staleness`` section (per-timeframe overrides for candles).

        ``source`` names a tick source: the candles are that source's own, or else those
        aggregated from its ticks (``agg:<source>``); the order flow is that source's, or
        else the symbol's newest (the router computes it across sources, under its own).
        """
        await self._ready()
        sym = _norm(symbol)
        source = _source(source)
        ttl = self._watcher.current.staleness
        now = self._clock.time_ms()
        tick = await self.get_latest_tick(sym, source=source)
        candles = await self.get_latest_candles(sym, timeframe, 1, source=source)
        flow = await self.get_latest_order_flow(sym, source=source)
        if source is not None and not candles:
            aggregator = self._aggregator
            agg = (AGGREGATED_PREFIX if aggregator is None else aggregator.source_prefix) + source
            if len(agg) <= MAX_SOURCE_LENGTH:
                candles = await self.get_latest_candles(sym, timeframe, 1, source=agg)
        if source is not None and flow is None:
            flow = await self.get_latest_order_flow(sym)
        candle_ttl = ttl.candle_seconds_for(timeframe)
        return StalenessReport(
            tick=tick is None or now - tick.timestamp > ttl.tick_seconds * 1000,
            candle=not candles or now - candles[-1].bucket_end > candle_ttl * 1000,
            order_flow=flow is None or now - flow.timestamp > ttl.order_flow_seconds * 1000,
        )

    async def warm_start(
        self, symbols: Sequence[str], timeframes: Sequence[str], limit: int = 100
    ) -> int:
        """Load the latest ticks and candles of ``symbols`` from the database into L2 and L1.

        Returns:
            How many items were loaded.

        Raises:
            ValidationError: ``symbols`` or ``timeframes`` is not a list (a lone string is
                refused), holds a bad symbol or an unknown timeframe, or ``limit`` is not a
                positive int.
        """
        await self._ready()
        syms = [_norm(s) for s in _names(symbols, "symbols")]
        timeframes = _names(timeframes, "timeframes")
        for tf in timeframes:
            timeframe_ms(tf)
        limit = _count(limit, "limit")
        storage = _primary_of(self.storage)  # what fills the caches must not lag
        gen = self._l1_gen
        ticks = await storage.latest_ticks(syms)
        keys = [(s, tf) for s in syms for tf in timeframes]
        candles = await storage.latest_candles_many(
            keys, limit, preferred_sources=self._watcher.current.sources.candle_preference
        )
        newest = dict(ticks)
        if self._l2 is not None:
            try:
                await self._l2.put_ticks(list(ticks.values()))  # compare-and-set
                # L2 may hold newer ticks than the database (another router's writes, not
                # stored yet): each symbol's newer one settles L1, as a read-through would.
                for sym, held in (await self._l2.get_ticks(syms)).items():
                    stored = newest.get(sym)
                    if stored is None or supersedes(held, stored):
                        newest[sym] = held
            except CacheError:
                logger.warning("warm start could not fill L2", exc_info=True)
            # L2 may hold newer candles too: its ring, joined with the stored ones, fills L1
            # (the stored ones alone would leave a gap where those are).
            for key, rows in candles.items():
                if rows:
                    joined = await self._l2_ring_after_backfill(rows, limit)
                    if joined is not None:
                        candles[key] = joined
        # L1 only if it was not cleared since the reads began (see _l1_gen).
        fill_l1 = self._l1_enabled and self._l1_gen == gen
        if fill_l1:
            for sym, tick in newest.items():
                self._l1.fill_tick(sym, None, tick)  # each symbol's newest: settles L1
        loaded = len(ticks)
        for (sym, tf), rows in candles.items():
            if rows:
                self._default_candle_source[(sym, tf)] = rows[-1].source
                if fill_l1:
                    self._l1.put_candles(rows, complete=len(rows) < limit)
                loaded += len(rows)
        return loaded

    # ------------------------------------------------------------------ health

    async def _database_health(self, storage: Storage) -> DatabaseHealth:
        """The database's part of :meth:`health_check` (one ping, bounded by the health
        timeout)."""
        timeout = self.settings.health_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                db = await storage.ping()
        except TimeoutError:
            db_health = DatabaseHealth(
                kind=storage.kind,
                target=storage.target,
                reachable=False,
                error=f"no answer within {timeout:g}s",
                embedded=storage.kind == "sqlite",
            )
        else:
            policies = db.details.get("timescaledb_policies", [])
            db_health = DatabaseHealth(
                kind=db.kind,
                target=storage.target,
                reachable=db.reachable,
                latency_ms=db.latency_ms,
                version=db.version,
                timescaledb=db.timescaledb,
                timescaledb_version=db.timescaledb_version,
                embedded=storage.kind == "sqlite",
                error=db.error,
                timescaledb_policies=[str(p) for p in policies]
                if isinstance(policies, list)
                else [],
            )
        replica_status = getattr(storage, "replica_status", None)
        if replica_status is not None:
            db_health = db_health.model_copy(
                update={
                    "replicas": [
                        ReplicaHealth(
                            target=r.target,
                            healthy=r.healthy,
                            lag_seconds=r.lag_seconds,
                            lag_bytes=r.lag_bytes,
                            skipped_reason=None
                            if r.skipped_reason is None
                            else str(r.skipped_reason),
                            reads=r.reads,
                            errors=r.errors,
                        )
                        for r in replica_status()
                    ]
                }
            )
        return db_health

    async def _probe_backup(self) -> str | None:
        """An idle backup stream has not asked its server lately: the probe does."""
        backup = self._backup
        timeout = self.settings.health_timeout_seconds
        return None if backup is None else await backup.probe(timeout)

    async def health_check(self) -> HealthCheckResponse:
        """Report every backend, cache tier, pool, breaker, queue and the strategy.

        Never blocks past ``settings.health_timeout_seconds``, even when a backend hangs
        (in a forked child, the first call reconnects first, as every call does).
        """
        await self._ready()
        storage = self.storage
        # Every probe at once: the whole check takes at most one timeout.
        db_health, cache, backup_error = await asyncio.gather(
            self._database_health(storage), self._cache_health(probe=True), self._probe_backup()
        )
        databases = {storage.kind: db_health}
        write_path = self._write_path_health(backup_error)
        strategy = StrategyHealth(
            file=str(self._watcher.path) if self._watcher.path else None,
            version=self._watcher.version,
            content_hash=self._watcher.content_hash,
            last_error=self._watcher.last_error,
            reloads=self._watcher.reload_count,
        )
        processors = {
            name: ProcessorHealth(
                calls=st.calls, errors=st.errors, slow=st.slow, last_error=st.last_error
            )
            for name, st in self._processors.stats().items()
        }
        status, reason = overall_status(databases, cache, write_path, strategy)
        failing = [n for n, p in processors.items() if p.slow or p.errors]
        if failing and status == "healthy":
            status, reason = "degraded", f"processors slow or failing: {', '.join(failing)}"
        return HealthCheckResponse(
            status=status,
            reason=reason,
            checked_at_ms=self._clock.time_ms(),
            databases=databases,
            cache=cache,
            connection_pools=self._pool_health(),
            write_path=write_path,
            strategy=strategy,
            processors=processors,
            staleness=self._staleness_from_l1(),
        )

    def _staleness_from_l1(self) -> dict[str, dict[str, bool]]:
        """Staleness of the symbols this router holds, from L1 only (no I/O): True where the
        latest tick / 1m candle / order flow is older than its TTL or missing."""
        self._materialise_derived()  # what is not yet materialised counts too
        ttl = self._watcher.current.staleness
        now = self._clock.time_ms()
        out: dict[str, dict[str, bool]] = {}
        l1 = self._l1
        # Peeks, not reads: a health check neither counts as an L1 hit or miss nor keeps
        # entries from being evicted.
        for symbol in reversed(l1.symbols()[-_HEALTH_STALENESS_SYMBOLS:]):
            tick = l1.peek_tick(symbol)
            flow = l1.peek_order_flow(symbol)
            candle_end = l1.peek_candle_end(symbol, "1m")
            out[symbol] = {
                "tick": tick is None or now - tick.timestamp > ttl.tick_seconds * 1000,
                "candle": candle_end is None
                or now - candle_end > ttl.candle_seconds_for("1m") * 1000,
                "order_flow": flow is None or now - flow.timestamp > ttl.order_flow_seconds * 1000,
            }
        return out

    def _pool_health(self) -> dict[str, PoolHealth]:
        if self._storage is None:
            return {}
        pool = self._storage.pool_status()
        return {
            self._storage.kind: PoolHealth(
                size=pool.size,
                in_use=pool.in_use,
                idle=pool.idle,
                waiting=pool.waiting,
                max_size=pool.max_size,
            )
        }

    def _write_path_health(self, backup_error: str | None = None) -> WritePathHealth:
        if self._ingest is None:
            return WritePathHealth(default_mode=self.settings.write_mode)
        stats = self._ingest.stats()
        details: dict[str, float | int | str | None] = {
            "accepted": stats.accepted,
            "stored": stats.stored,
            "retries": stats.retries,
            "dead_lettered": stats.dead_lettered,
            "backlog_journals": stats.backlog_journals,
            "journal_problems": stats.journal_problems,
            "subscriptions_dropped": self._subs.dropped(),
            "forming_restore_failures": self._restore_failures,
            "ticks_awaiting_restore": sum(len(r.ticks) for r in self._agg_restoring.values()),
        }
        if self._backup is not None:
            b = self._backup.stats()
            details.update(
                backup_stream_state=b.state,
                backup_stream_target=b.target,
                backup_stream_pending=b.pending_items,
                backup_stream_spooled=b.spooled_items,
                backup_stream_lag_seconds=b.lag_seconds,
                backup_stream_failures=b.failures,
                backup_stream_last_error=b.last_error,
                backup_stream_check_error=backup_error,
            )
        return WritePathHealth(
            default_mode=self.settings.write_mode,
            queue_depth=stats.queue_depth,
            journal_records=stats.journal_records,
            journal_bytes=stats.journal_bytes,
            circuit=stats.breaker_state,
            details=details,
        )

    async def _cache_health(self, *, probe: bool) -> CacheHealth:
        c = self._counters
        l1_stats = self._l1.stats()
        l1 = TierStats(hits=c.l1_hits, misses=c.l1_misses, hit_rate=_rate(c.l1_hits, c.l1_misses))
        l2 = TierStats(
            hits=c.l2_hits,
            misses=c.l2_misses,
            hit_rate=_rate(c.l2_hits, c.l2_misses),
            errors=c.l2_errors,
        )
        reachable: bool | None = None
        latency: float | None = None
        version: str | None = None
        circuit: str | None = None
        if self._l2 is not None:
            circuit = self._l2.breaker_state
            if probe:
                try:
                    async with asyncio.timeout(self.settings.health_timeout_seconds):
                        latency = await self._l2.ping()
                        version = await self._l2.info_version()
                    reachable = True
                except (CacheError, TimeoutError):
                    reachable = False
            else:
                reachable = circuit == "closed"
        cluster: dict[str, bool] = {}
        node_states = getattr(self._l2, "node_states", None)
        if node_states is not None:
            cluster = node_states()
        subscription = None
        if self._bus is not None:
            subscription = "connected" if self._l1_enabled else "lost"
        return CacheHealth(
            l1=l1,
            l2=l2,
            l2_configured=self.settings.dragonfly.configured,
            l2_reachable=reachable,
            l2_latency_ms=latency,
            l2_target=self.settings.dragonfly.target
            if self.settings.dragonfly.configured
            else None,
            l2_version=version,
            l2_circuit=circuit,
            l2_write_refused=None if self._l2 is None else self._l2.write_refused,
            l1_entries=l1_stats.entries,
            l1_bytes_estimate=l1_stats.bytes_estimate,
            subscription=subscription,
            details={"db_reads": c.db_reads, "singleflight_shared": self._flight.shared},
            operations={
                "get_latest_tick": self._c_tick.as_dict(),
                "get_latest_candles": self._c_candles.as_dict(),
                "get_latest_order_flow": self._c_flow.as_dict(),
            },
            evictions=l1_stats.evictions,
            served_age_seconds=_age_summary(self._served_age),
            cluster_nodes=cluster,
        )

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(_weak_callback(self._background_done))
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._c_misc.l2_errors += 1
            logger.debug("background cache fill failed", exc_info=task.exception())

    def _observe(self, backend: str, operation: str, started: float) -> None:
        self._read_latency[backend, operation].observe(time.perf_counter() - started)

    def _warn_no_l2(self) -> None:
        if not self._warned_no_l2:
            self._warned_no_l2 = True
            logger.warning(
                "the routing strategy names %r but no L2 cache is configured; skipping it",
                L2_CACHE,
            )


def _weak_callback(method: Callable[P, None]) -> Callable[P, None]:
    """Wrap a bound method so background tasks holding it don't keep the router alive
    (an unclosed router must still be collected and warn)."""
    ref = weakref.WeakMethod(method)

    def call(*args: P.args, **kwargs: P.kwargs) -> None:
        target = ref()
        if target is not None:
            target(*args, **kwargs)

    return call


async def _maintenance_loop(ref: weakref.ref[DataRouter]) -> None:
    """The router's timer; holds the router only weakly between passes."""
    while True:
        router = ref()
        if router is None or router.state is RouterState.CLOSED:
            return
        interval = router.strategy.batch.flush_interval_seconds
        del router
        await asyncio.sleep(interval)
        router = ref()
        if router is None or router.state is RouterState.CLOSED:
            return
        if router.state is not RouterState.OPEN:
            del router
            continue
        try:
            await router.run_maintenance()
        except RouterClosedError:
            return  # closed while the pass ran
        except DataManagerError:
            logger.warning("maintenance pass failed", exc_info=True)
        del router


def _age_summary(recorder: HistogramRecorder) -> dict[str, float | int | None]:
    snap = recorder.snapshot()
    count = sum(snap.counts)
    return {"samples": count, "mean": snap.sum / count if count else None}


def _rate(hits: int, misses: int) -> float | None:
    total = hits + misses
    return None if total == 0 else hits / total
