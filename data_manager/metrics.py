"""Prometheus metrics of a :class:`~data_manager.router.DataRouter`, read at scrape time.

The hot paths pay nothing for metrics: the router, its caches, the write path and the
strategy watcher already keep plain integer counters (for ``health_check``), and
:class:`RouterCollector` turns them into metric families only when Prometheus scrapes.
There is no ``Counter.inc()`` on any save or read.

Usage::

    from data_manager.metrics import serve_metrics

    async with DataRouter() as router:
        server = serve_metrics(router, port=9464, addr="0.0.0.0")
        ...
        await server.aclose()

or, to expose them through your own registry or web framework::

    registry = register_router(router)           # a new CollectorRegistry
    body = prometheus_client.generate_latest(registry)

Threads. The HTTP server answers on its own threads; the router's state belongs to its
event loop. A scrape therefore hands one short callback to the loop
(``call_soon_threadsafe``) that copies every counter into an immutable snapshot, and builds
the families from the snapshot on the scrape thread. If the loop does not run the callback
within ``snapshot_timeout`` seconds (it is blocked), the router's part of the scrape is
``data_manager_collector_up 0`` alone, and a rate-limited warning is logged. How long the
callback waited is exported as ``data_manager_event_loop_lag_seconds``: a blocked loop is
the classic failure of an asyncio service.

Importing this module imports neither ``prometheus_client`` nor ``http.server`` (together
15-45 ms); they load on the first registration, scrape or :func:`serve_metrics`, so the
write path and the router can use :class:`HistogramRecorder` without paying for them.

Metrics, as ``name (type; labels)`` and meaning. Labels never carry a symbol: each has a
handful of values.

data_manager_info (gauge, always 1; version, database, write_mode)
    SDK version, database kind (postgresql, sqlite) and default write mode; value 1.
data_manager_router_open (gauge)
    1 while the router is open.
data_manager_collector_up (gauge)
    1 when the scrape got a snapshot from the router's event loop, 0 when the loop did not
    answer in time (then the only data_manager_* sample of the scrape).
data_manager_event_loop_lag_seconds (gauge)
    How long the scrape's snapshot callback waited for the router's event loop.
data_manager_cache_reads_total (counter; tier, result)
    Latest-value reads (get_latest_*) by cache tier (l1, l2) and result (hit, miss, error); an
    L1 miss goes on along the strategy's route.
data_manager_database_reads_total (counter)
    Latest-value reads answered by the database.
data_manager_singleflight_shared_total (counter)
    Reads that joined an identical read already in flight instead of querying again.
data_manager_read_latency_seconds (histogram; backend, operation)
    Time of an L2 or database read after an L1 miss, by backend (l2, database) and operation;
    exported when the router records it.
data_manager_l1_lookups_total (counter; kind, result)
    L1 lookups by data kind (tick, candles, order_flow) and result (hit, miss), the router's
    read-your-writes merges included.
data_manager_l1_entries (gauge)
    L1 entries held (a tick, an order-flow value or a candle ring each count one).
data_manager_l1_capacity (gauge)
    L1 bound on entries (max_entries).
data_manager_l1_candles (gauge)
    Candles held in all L1 rings.
data_manager_l1_size_bytes (gauge)
    Estimated memory held by L1.
data_manager_l1_enabled (gauge)
    0 while L1 is bypassed because the pub/sub subscription is lost.
data_manager_l1_evictions_total (counter)
    L1 entries evicted by the size bound (least recently used first).
data_manager_l1_expirations_total (counter)
    L1 entries dropped by their TTL.
data_manager_l1_stale_writes_total (counter)
    L1 writes refused by compare-and-set (older than what L1 holds).
data_manager_l1_clears_total (counter)
    Full clears of L1 (subscription lost or restored).
data_manager_l2_errors_total (counter)
    Failed L2 calls, reads and writes.
data_manager_l2_short_circuited_total (counter)
    L2 calls refused without I/O by the open circuit breaker.
data_manager_l2_writes_total (counter)
    L2 write calls.
data_manager_l2_incidents_total (counter)
    L2 outages: first error after a success.
data_manager_bus_updates_total (counter; result)
    Updates offered to the pub/sub fast path, by outcome: published, coalesced (superseded
    before it was sent) or dropped (L2 unavailable).
data_manager_bus_messages_sent_total (counter)
    Pub/sub messages sent (each carries a batch of updates).
data_manager_bus_candles_retried_total (counter)
    Candle updates sent again after L2 could not take the batch carrying them.
data_manager_bus_series_reset_total (counter)
    Candle series reset in L2 and other routers' L1 after updates were given up.
data_manager_bus_received_total (counter)
    Updates received from other routers.
data_manager_bus_malformed_total (counter)
    Received pub/sub messages that could not be decoded.
data_manager_bus_callback_errors_total (counter)
    Errors raised while applying received updates.
data_manager_bus_subscription_lost_total (counter)
    Times the pub/sub subscription was lost.
data_manager_bus_subscription_restored_total (counter)
    Times the pub/sub subscription was restored.
data_manager_bus_connected (gauge)
    1 while subscribed to the pub/sub channel.
data_manager_l2_cluster_node_up (gauge; node)
    Redis Cluster master: 1 when usable, 0 while avoided after a failure.
data_manager_backup_stream_up (gauge)
    1 while the backup stream accepts batches (0: down, batches spooled locally).
data_manager_backup_stream_published_total (counter)
    Items published to the backup stream.
data_manager_backup_stream_failures_total (counter)
    Failed publishes to the backup stream.
data_manager_backup_stream_dropped_total (counter)
    Items the backup stream gave up on (logged as errors; the database still has them).
data_manager_backup_stream_pending_items (gauge)
    Items accepted but not yet published (outbox plus spool).
data_manager_backup_stream_lag_seconds (gauge)
    Age of the oldest item not yet published to the backup stream.
data_manager_replica_healthy (gauge; target)
    PostgreSQL read replica: 1 when reads may go to it.
data_manager_replica_lag_seconds (gauge; target)
    Upper bound of a read replica's replay lag.
data_manager_replica_reads_total (counter; target)
    Reads a read replica answered.
data_manager_writes_accepted_total (counter)
    Items accepted by the write path in every mode, candles and order flow the router derives
    from ticks included.
data_manager_writes_stored_total (counter)
    Items the database confirmed.
data_manager_write_batch_size (histogram)
    Items per database write: batches, journal replay chunks and sync writes.
data_manager_write_flush_seconds (histogram)
    Time to write one batch to the database, retries included.
data_manager_write_retries_total (counter)
    Storage attempts retried after a transient error.
data_manager_write_batch_failures_total (counter)
    Batches that could not be stored now (then journaled or held).
data_manager_write_queue_depth (gauge)
    Items waiting in memory for the writer.
data_manager_write_queue_capacity (gauge)
    The write queue bound (max_queue).
data_manager_write_backpressure_waits_total (counter)
    Saves that found the queue full and waited.
data_manager_write_backpressure_timeouts_total (counter)
    Saves that gave up waiting for queue space (BackpressureTimeoutError).
data_manager_write_dead_lettered_total (counter)
    Records the database refused, kept in the dead-letter file (identical ones once).
data_manager_write_lost_total (counter)
    Items neither stored nor journaled at close (no journal, or it could not take them).
data_manager_writer_errors_total (counter)
    Unexpected errors in the writer task.
data_manager_journal_records (gauge)
    Journal records not yet stored in the database.
data_manager_journal_size_bytes (gauge)
    Journal bytes on disk, this instance's and adopted ones.
data_manager_journal_backlog (gauge)
    Journals waiting to be replayed (0 in normal operation).
data_manager_journal_fsyncs_total (counter)
    Fsyncs of this instance's journal (group commits).
data_manager_journal_spilled_total (counter)
    Items journaled because the database could not take them.
data_manager_journal_replayed_total (counter)
    Items stored from a journal.
data_manager_journal_problems_total (counter)
    Problems the journals found and logged as errors (damaged bytes moved aside, a segment
    file deleted under them).
data_manager_journal_orphans_adopted_total (counter)
    Journals of dead instances taken over for replay.
data_manager_circuit_state (gauge; backend, state)
    1 for the current state (closed, open, half_open) of each circuit breaker (database, l2), 0
    for the others.
data_manager_circuit_opens_total (counter; backend)
    Times a circuit breaker opened; exported when the component reports it.
data_manager_pool_connections (gauge; backend, state)
    Pooled database connections by state (in_use, idle).
data_manager_pool_max_connections (gauge; backend)
    Database connection pool limit.
data_manager_pool_waiting (gauge; backend)
    Callers waiting for a database connection.
data_manager_strategy_reloads_total (counter)
    Routing strategy swaps applied.
data_manager_strategy_reload_errors_total (counter)
    Routing strategy edits rejected (the strategy in force kept serving).
data_manager_strategy_last_reload_failed (gauge)
    1 while the last edit of the strategy file stands rejected.
data_manager_strategy_version (gauge)
    Routing strategy swaps since start (0: the strategy loaded at start).
data_manager_processor_calls_total (counter; processor)
    Ticks passed to each registered tick processor.
data_manager_processor_errors_total (counter; processor)
    Tick processor calls that raised.
data_manager_processor_slow_calls_total (counter; processor)
    Tick processor calls over the registry's slow threshold.
data_manager_processor_seconds_total (counter; processor)
    Time spent in each tick processor.
data_manager_processor_slow (gauge; processor)
    1 while a tick processor's moving-average call time is over the threshold.
data_manager_subscriptions (gauge)
    Open live subscriptions.

Counters start at 0 with the router (they are per router, like the process-level
``process_*`` metrics are per process): use ``rate()``/``increase()``, which handle resets.
Histograms whose component does not record buckets yet are exported with the ``+Inf``
bucket only, so ``_count``, ``_sum`` and averages work and the type never changes when
finer buckets arrive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import os
import socket
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from data_manager.errors import ConfigurationError
from data_manager.logutil import RateLimitedLogger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from data_manager.cache.bus import BusStats
    from data_manager.cache.memory import MemoryCacheStats
    from data_manager.cache.redis import RedisCacheStats
    from data_manager.ingest import IngestStats
    from data_manager.processors import ProcessorStats
    from data_manager.router import DataRouter
    from data_manager.storage.base import PoolStatus
    from data_manager.strategy import StrategyStatus

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "METRICS",
    "HistogramRecorder",
    "HistogramSnapshot",
    "MetricSpec",
    "MetricsServer",
    "RouterCollector",
    "metrics_table",
    "register_router",
    "serve_metrics",
]

logger = logging.getLogger(__name__)

#: Default latency buckets in seconds: 100 µs (an L2 round trip on the same host) to 10 s
#: (past any timeout the SDK sets).
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Default batch-size buckets (items), up to the default ``max_batch`` of 50 000.
BATCH_SIZE_BUCKETS: Final = (1.0, 10.0, 50.0, 100.0, 500.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0)

DEFAULT_SNAPSHOT_TIMEOUT: Final = 5.0
_SERVER_POLL_SECONDS: Final = 0.1  # how long shutdown() may wait for the accept loop
_CIRCUIT_STATES: Final = ("closed", "open", "half_open")

# ----------------------------------------------------------------------------- metric table

MetricType = Literal["counter", "gauge", "histogram", "info"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """Name, type, labels and help text of one exported metric."""

    name: str
    type: MetricType
    labels: tuple[str, ...]
    help: str


# (name, type, labels, meaning). The meaning is the HELP text and the documentation.
_TABLE: Final[tuple[tuple[str, MetricType, tuple[str, ...], str], ...]] = (
    ("data_manager_info", "info", ("version", "database", "write_mode"),
     "SDK version, database kind (postgresql, sqlite) and default write mode; value 1."),
    ("data_manager_router_open", "gauge", (), "1 while the router is open."),
    ("data_manager_collector_up", "gauge", (),
     "1 when the scrape got a snapshot from the router's event loop, 0 when the loop did not "
     "answer in time (then the only data_manager_* sample of the scrape)."),
    ("data_manager_event_loop_lag_seconds", "gauge", (),
     "How long the scrape's snapshot callback waited for the router's event loop."),
    ("data_manager_cache_reads_total", "counter", ("tier", "result"),
     "Latest-value reads (get_latest_*) by cache tier (l1, l2) and result (hit, miss, "
     "error); an L1 miss goes on along the strategy's route."),
    ("data_manager_database_reads_total", "counter", (),
     "Latest-value reads answered by the database."),
    ("data_manager_singleflight_shared_total", "counter", (),
     "Reads that joined an identical read already in flight instead of querying again."),
    ("data_manager_read_latency_seconds", "histogram", ("backend", "operation"),
     "Time of an L2 or database read after an L1 miss, by backend (l2, database) and "
     "operation; exported when the router records it."),
    ("data_manager_l1_lookups_total", "counter", ("kind", "result"),
     "L1 lookups by data kind (tick, candles, order_flow) and result (hit, miss), the "
     "router's read-your-writes merges included."),
    ("data_manager_l1_entries", "gauge", (),
     "L1 entries held (a tick, an order-flow value or a candle ring each count one)."),
    ("data_manager_l1_capacity", "gauge", (), "L1 bound on entries (max_entries)."),
    ("data_manager_l1_candles", "gauge", (), "Candles held in all L1 rings."),
    ("data_manager_l1_size_bytes", "gauge", (), "Estimated memory held by L1."),
    ("data_manager_l1_enabled", "gauge", (),
     "0 while L1 is bypassed because the pub/sub subscription is lost."),
    ("data_manager_l1_evictions_total", "counter", (),
     "L1 entries evicted by the size bound (least recently used first)."),
    ("data_manager_l1_expirations_total", "counter", (), "L1 entries dropped by their TTL."),
    ("data_manager_l1_stale_writes_total", "counter", (),
     "L1 writes refused by compare-and-set (older than what L1 holds)."),
    ("data_manager_l1_clears_total", "counter", (),
     "Full clears of L1 (subscription lost or restored)."),
    ("data_manager_l2_errors_total", "counter", (), "Failed L2 calls, reads and writes."),
    ("data_manager_l2_short_circuited_total", "counter", (),
     "L2 calls refused without I/O by the open circuit breaker."),
    ("data_manager_l2_writes_total", "counter", (), "L2 write calls."),
    ("data_manager_l2_incidents_total", "counter", (),
     "L2 outages: first error after a success."),
    ("data_manager_bus_updates_total", "counter", ("result",),
     "Updates offered to the pub/sub fast path, by outcome: published, coalesced "
     "(superseded before it was sent) or dropped (L2 unavailable)."),
    ("data_manager_bus_messages_sent_total", "counter", (),
     "Pub/sub messages sent (each carries a batch of updates)."),
    ("data_manager_bus_candles_retried_total", "counter", (),
     "Candle updates sent again after L2 could not take the batch carrying them."),
    ("data_manager_bus_series_reset_total", "counter", (),
     "Candle series reset in L2 and other routers' L1 after updates were given up."),
    ("data_manager_bus_received_total", "counter", (),
     "Updates received from other routers."),
    ("data_manager_bus_malformed_total", "counter", (),
     "Received pub/sub messages that could not be decoded."),
    ("data_manager_bus_callback_errors_total", "counter", (),
     "Errors raised while applying received updates."),
    ("data_manager_bus_subscription_lost_total", "counter", (),
     "Times the pub/sub subscription was lost."),
    ("data_manager_bus_subscription_restored_total", "counter", (),
     "Times the pub/sub subscription was restored."),
    ("data_manager_bus_connected", "gauge", (), "1 while subscribed to the pub/sub channel."),
    ("data_manager_l2_cluster_node_up", "gauge", ("node",),
     "Redis Cluster master: 1 when usable, 0 while avoided after a failure."),
    ("data_manager_backup_stream_up", "gauge", (),
     "1 while the backup stream accepts batches (0: down, batches spooled locally)."),
    ("data_manager_backup_stream_published_total", "counter", (),
     "Items published to the backup stream."),
    ("data_manager_backup_stream_failures_total", "counter", (),
     "Failed publishes to the backup stream."),
    ("data_manager_backup_stream_dropped_total", "counter", (),
     "Items the backup stream gave up on (logged as errors; the database still has them)."),
    ("data_manager_backup_stream_pending_items", "gauge", (),
     "Items accepted but not yet published (outbox plus spool)."),
    ("data_manager_backup_stream_lag_seconds", "gauge", (),
     "Age of the oldest item not yet published to the backup stream."),
    ("data_manager_replica_healthy", "gauge", ("target",),
     "PostgreSQL read replica: 1 when reads may go to it."),
    ("data_manager_replica_lag_seconds", "gauge", ("target",),
     "Upper bound of a read replica's replay lag."),
    ("data_manager_replica_reads_total", "counter", ("target",),
     "Reads a read replica answered."),
    ("data_manager_writes_accepted_total", "counter", (),
     "Items accepted by the write path in every mode, candles and order flow the router "
     "derives from ticks included."),
    ("data_manager_writes_stored_total", "counter", (), "Items the database confirmed."),
    ("data_manager_write_batch_size", "histogram", (),
     "Items per database write: batches, journal replay chunks and sync writes."),
    ("data_manager_write_flush_seconds", "histogram", (),
     "Time to write one batch to the database, retries included."),
    ("data_manager_write_retries_total", "counter", (),
     "Storage attempts retried after a transient error."),
    ("data_manager_write_batch_failures_total", "counter", (),
     "Batches that could not be stored now (then journaled or held)."),
    ("data_manager_write_queue_depth", "gauge", (),
     "Items waiting in memory for the writer."),
    ("data_manager_write_queue_capacity", "gauge", (), "The write queue bound (max_queue)."),
    ("data_manager_write_backpressure_waits_total", "counter", (),
     "Saves that found the queue full and waited."),
    ("data_manager_write_backpressure_timeouts_total", "counter", (),
     "Saves that gave up waiting for queue space (BackpressureTimeoutError)."),
    ("data_manager_write_dead_lettered_total", "counter", (),
     "Records the database refused, kept in the dead-letter file (identical ones once)."),
    ("data_manager_write_lost_total", "counter", (),
     "Items neither stored nor journaled at close (no journal, or it could not take them)."),
    ("data_manager_writer_errors_total", "counter", (),
     "Unexpected errors in the writer task."),
    ("data_manager_journal_records", "gauge", (),
     "Journal records not yet stored in the database."),
    ("data_manager_journal_size_bytes", "gauge", (),
     "Journal bytes on disk, this instance's and adopted ones."),
    ("data_manager_journal_backlog", "gauge", (),
     "Journals waiting to be replayed (0 in normal operation)."),
    ("data_manager_journal_fsyncs_total", "counter", (),
     "Fsyncs of this instance's journal (group commits)."),
    ("data_manager_journal_spilled_total", "counter", (),
     "Items journaled because the database could not take them."),
    ("data_manager_journal_replayed_total", "counter", (), "Items stored from a journal."),
    ("data_manager_journal_problems_total", "counter", (),
     "Problems the journals found and logged as errors (damaged bytes moved aside, a "
     "segment file deleted under them)."),
    ("data_manager_journal_orphans_adopted_total", "counter", (),
     "Journals of dead instances taken over for replay."),
    ("data_manager_circuit_state", "gauge", ("backend", "state"),
     "1 for the current state (closed, open, half_open) of each circuit breaker "
     "(database, l2), 0 for the others."),
    ("data_manager_circuit_opens_total", "counter", ("backend",),
     "Times a circuit breaker opened; exported when the component reports it."),
    ("data_manager_pool_connections", "gauge", ("backend", "state"),
     "Pooled database connections by state (in_use, idle)."),
    ("data_manager_pool_max_connections", "gauge", ("backend",),
     "Database connection pool limit."),
    ("data_manager_pool_waiting", "gauge", ("backend",),
     "Callers waiting for a database connection."),
    ("data_manager_strategy_reloads_total", "counter", (),
     "Routing strategy swaps applied."),
    ("data_manager_strategy_reload_errors_total", "counter", (),
     "Routing strategy edits rejected (the strategy in force kept serving)."),
    ("data_manager_strategy_last_reload_failed", "gauge", (),
     "1 while the last edit of the strategy file stands rejected."),
    ("data_manager_strategy_version", "gauge", (),
     "Routing strategy swaps since start (0: the strategy loaded at start)."),
    ("data_manager_processor_calls_total", "counter", ("processor",),
     "Ticks passed to each registered tick processor."),
    ("data_manager_processor_errors_total", "counter", ("processor",),
     "Tick processor calls that raised."),
    ("data_manager_processor_slow_calls_total", "counter", ("processor",),
     "Tick processor calls over the registry's slow threshold."),
    ("data_manager_processor_seconds_total", "counter", ("processor",),
     "Time spent in each tick processor."),
    ("data_manager_processor_slow", "gauge", ("processor",),
     "1 while a tick processor's moving-average call time is over the threshold."),
    ("data_manager_subscriptions", "gauge", (), "Open live subscriptions."),
)  # fmt: skip

#: Every metric the collector can export (the module docstring's list, as data).
METRICS: Final[tuple[MetricSpec, ...]] = tuple(
    MetricSpec(name, type_, labels, help_) for name, type_, labels, help_ in _TABLE
)
_SPECS: Final = {spec.name: spec for spec in METRICS}


def metrics_table() -> str:
    """The metric list as a Markdown table (name, type, labels, meaning), for docs."""
    rows = [
        "| name | type | labels | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for spec in METRICS:
        type_ = "gauge (info)" if spec.type == "info" else spec.type
        labels = ", ".join(f"`{label}`" for label in spec.labels)
        rows.append(f"| `{spec.name}` | {type_} | {labels} | {spec.help} |")
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- histograms


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Bucket counts of a :class:`HistogramRecorder` at one moment.

    Attributes:
        bounds: Upper bounds (inclusive, Prometheus ``le``), increasing.
        counts: Observations per bucket, not cumulative; one more than ``bounds`` (the
            last one is everything above the largest bound).
        sum: Sum of the observed values.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """Number of observations."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, observations <= le)`` pairs, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class HistogramRecorder:
    """A fixed-bucket histogram for the few places that time one event at a time.

    ``observe`` is a bisect and two additions — no lock, no allocation, no
    ``prometheus_client`` object. Meant for the event-loop thread (like the router's other
    counters) and for paths that already wait on I/O (a batch write, an L2 or database
    read), never for the L1 hot path.

    Args:
        bounds: Bucket upper bounds, strictly increasing and finite.
    """

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        values = tuple(float(b) for b in bounds)
        if not values or any(not math.isfinite(b) for b in values):
            msg = "histogram bounds must be a non-empty sequence of finite numbers"
            raise ValueError(msg)
        if any(a >= b for a, b in itertools.pairwise(values)):
            msg = f"histogram bounds must be strictly increasing, got {values}"
            raise ValueError(msg)
        self._bounds = values
        self._counts = [0] * (len(values) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (``le`` semantics: a value equal to a bound is in it)."""
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        """Copy the counts (cheap; for stats and metrics)."""
        return HistogramSnapshot(self._bounds, tuple(self._counts), self._sum)


# ----------------------------------------------------------------------------- snapshot


@dataclass(frozen=True, slots=True)
class _ReadCounters:
    l1_hits: int
    l1_misses: int
    l2_hits: int
    l2_misses: int
    l2_errors: int
    db_reads: int


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Everything one scrape exports, copied on the router's event loop."""

    open: bool
    write_mode: str
    database: str
    reads: _ReadCounters
    singleflight_shared: int
    l1_enabled: bool
    l1: MemoryCacheStats
    l2: RedisCacheStats | None
    l2_opens: int | None
    bus: BusStats | None
    ingest: IngestStats | None
    database_opens: int | None
    pool: PoolStatus | None
    strategy: StrategyStatus
    processors: dict[str, ProcessorStats]
    subscriptions: int
    read_latency: dict[tuple[str, str], HistogramSnapshot]
    loop_lag: float
    cluster_nodes: dict[str, bool]
    backup: Any
    replicas: list[Any]


def _cluster_nodes(l2: object) -> dict[str, bool]:
    node_states = getattr(l2, "node_states", None)
    return dict(node_states()) if node_states is not None else {}


def _replicas(storage: object) -> list[Any]:
    status = getattr(storage, "replica_status", None)
    return list(status()) if status is not None else []


def _scale_families(f: _Families, snap: _Snapshot) -> None:
    for node, up in sorted(snap.cluster_nodes.items()):
        f.add("data_manager_l2_cluster_node_up", 1.0 if up else 0.0, node)
    b = snap.backup
    if b is not None:
        f.add("data_manager_backup_stream_up", 1.0 if b.state == "up" else 0.0)
        f.add("data_manager_backup_stream_published_total", b.published_items)
        f.add("data_manager_backup_stream_failures_total", b.failures)
        f.add("data_manager_backup_stream_dropped_total", b.dropped_items)
        f.add("data_manager_backup_stream_pending_items", b.pending_items)
        if b.lag_seconds is not None:
            f.add("data_manager_backup_stream_lag_seconds", b.lag_seconds)
    for r in snap.replicas:
        f.add("data_manager_replica_healthy", 1.0 if r.healthy else 0.0, r.target)
        if r.lag_seconds is not None:
            f.add("data_manager_replica_lag_seconds", r.lag_seconds, r.target)
        f.add("data_manager_replica_reads_total", r.reads, r.target)


def _take_snapshot(router: DataRouter, loop_lag: float) -> _Snapshot:
    """Copy the router's counters. Runs on the router's event loop (or with none running).

    This is the one place that knows the router's internals; everything it reads is a
    counter or a no-I/O ``stats()`` the router keeps for ``health_check`` anyway.
    """
    c = router._counters
    storage = router._storage
    ingest = router._ingest
    l2 = router._l2
    bus = router._bus
    latency: dict[tuple[str, str], HistogramRecorder] = getattr(router, "_read_latency", {})
    ingest_stats = ingest.stats() if ingest is not None else None
    l2_stats = l2.stats() if l2 is not None else None
    return _Snapshot(
        open=router.state.value == "open",
        write_mode=router.settings.write_mode,
        database=storage.kind if storage is not None else _configured_database(router),
        reads=_ReadCounters(
            c.l1_hits, c.l1_misses, c.l2_hits, c.l2_misses, c.l2_errors, c.db_reads
        ),
        singleflight_shared=router._flight.shared,
        l1_enabled=router._l1_enabled,
        l1=router._l1.stats(),
        l2=l2_stats,
        l2_opens=getattr(l2_stats, "breaker_opens", None),
        bus=bus.stats() if bus is not None else None,
        ingest=ingest_stats,
        database_opens=getattr(ingest_stats, "breaker_opens", None),
        pool=storage.pool_status() if storage is not None else None,
        strategy=router._watcher.status(),
        cluster_nodes=_cluster_nodes(l2),
        backup=router._backup.stats() if router._backup is not None else None,
        replicas=_replicas(storage),
        processors=router.processors.stats(),
        subscriptions=len(router._subs),
        read_latency={key: rec.snapshot() for key, rec in latency.items()},
        loop_lag=loop_lag,
    )


def _configured_database(router: DataRouter) -> str:
    return "postgresql" if router.settings.postgres.configured else "sqlite"


# ----------------------------------------------------------------------------- families


class _Families:
    """Builds metric families on demand, in :data:`METRICS` order."""

    def __init__(self) -> None:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        self._types: dict[MetricType, Any] = {
            "counter": CounterMetricFamily,
            "gauge": GaugeMetricFamily,
            "histogram": HistogramMetricFamily,
            "info": InfoMetricFamily,
        }
        # Untyped upstream: Prometheus' own rendering of "le" (1.0, +Inf, 0.00025).
        self._le: Callable[[float], str] = floatToGoString
        self._out: dict[str, Metric] = {}

    def family(self, name: str) -> Any:
        fam = self._out.get(name)
        if fam is None:
            spec = _SPECS[name]
            cls = self._types[spec.type]
            if spec.type == "info":
                # InfoMetricFamily appends "_info" itself; its labels are the value dict.
                fam = cls(spec.name.removesuffix("_info"), spec.help)
            else:
                fam = cls(spec.name, spec.help, labels=spec.labels)
            self._out[name] = fam
        return fam

    def add(self, name: str, value: float, *labels: str) -> None:
        self.family(name).add_metric(list(labels), value)

    def histogram(
        self, name: str, buckets: Sequence[tuple[float, int]], total: float, *labels: str
    ) -> None:
        self.family(name).add_metric(
            list(labels), [(self._le(le), float(n)) for le, n in buckets], total
        )

    def results(self) -> list[Metric]:
        out = self._out
        return [out[spec.name] for spec in METRICS if spec.name in out]


def _families(snap: _Snapshot) -> list[Metric]:
    from data_manager import __version__

    f = _Families()
    f.family("data_manager_info").add_metric(
        [], {"version": __version__, "database": snap.database, "write_mode": snap.write_mode}
    )
    f.add("data_manager_router_open", 1.0 if snap.open else 0.0)
    f.add("data_manager_collector_up", 1.0)
    f.add("data_manager_event_loop_lag_seconds", snap.loop_lag)

    r = snap.reads
    reads = "data_manager_cache_reads_total"
    f.add(reads, r.l1_hits, "l1", "hit")
    f.add(reads, r.l1_misses, "l1", "miss")
    if snap.l2 is not None:
        f.add(reads, r.l2_hits, "l2", "hit")
        f.add(reads, r.l2_misses, "l2", "miss")
        f.add(reads, r.l2_errors, "l2", "error")
    f.add("data_manager_database_reads_total", r.db_reads)
    f.add("data_manager_singleflight_shared_total", snap.singleflight_shared)
    for (backend, operation), hist in sorted(snap.read_latency.items()):
        f.histogram(
            "data_manager_read_latency_seconds", hist.cumulative(), hist.sum, backend, operation
        )

    _l1_families(f, snap)
    _scale_families(f, snap)
    if snap.l2 is not None:
        _l2_families(f, snap.l2, snap.l2_opens)
    if snap.bus is not None:
        _bus_families(f, snap.bus)
    if snap.ingest is not None:
        _ingest_families(f, snap.ingest, snap.database_opens)
    if snap.pool is not None:
        p, backend = snap.pool, snap.database
        f.add("data_manager_pool_connections", p.in_use, backend, "in_use")
        f.add("data_manager_pool_connections", p.idle, backend, "idle")
        f.add("data_manager_pool_max_connections", p.max_size, backend)
        f.add("data_manager_pool_waiting", p.waiting, backend)

    s = snap.strategy
    f.add("data_manager_strategy_reloads_total", s.reload_count)
    f.add("data_manager_strategy_reload_errors_total", s.error_count)
    f.add("data_manager_strategy_last_reload_failed", 1.0 if s.last_error else 0.0)
    f.add("data_manager_strategy_version", s.version)

    for name, p_stats in sorted(snap.processors.items()):
        f.add("data_manager_processor_calls_total", p_stats.calls, name)
        f.add("data_manager_processor_errors_total", p_stats.errors, name)
        f.add("data_manager_processor_slow_calls_total", p_stats.slow_calls, name)
        f.add("data_manager_processor_seconds_total", p_stats.total_seconds, name)
        f.add("data_manager_processor_slow", 1.0 if p_stats.slow else 0.0, name)
    f.add("data_manager_subscriptions", snap.subscriptions)
    return f.results()


def _l1_families(f: _Families, snap: _Snapshot) -> None:
    s = snap.l1
    lookups = "data_manager_l1_lookups_total"
    f.add(lookups, s.tick_hits, "tick", "hit")
    f.add(lookups, s.tick_misses, "tick", "miss")
    f.add(lookups, s.candle_hits, "candles", "hit")
    f.add(lookups, s.candle_misses, "candles", "miss")
    f.add(lookups, s.order_flow_hits, "order_flow", "hit")
    f.add(lookups, s.order_flow_misses, "order_flow", "miss")
    f.add("data_manager_l1_entries", s.entries)
    f.add("data_manager_l1_capacity", s.max_entries)
    f.add("data_manager_l1_candles", s.candles)
    f.add("data_manager_l1_size_bytes", s.bytes_estimate)
    f.add("data_manager_l1_enabled", 1.0 if snap.l1_enabled else 0.0)
    f.add("data_manager_l1_evictions_total", s.evictions)
    f.add("data_manager_l1_expirations_total", s.expirations)
    f.add("data_manager_l1_stale_writes_total", s.stale_writes)
    f.add("data_manager_l1_clears_total", s.clears)


def _l2_families(f: _Families, s: RedisCacheStats, opens: int | None) -> None:
    f.add("data_manager_l2_errors_total", s.errors)
    f.add("data_manager_l2_short_circuited_total", s.short_circuited)
    f.add("data_manager_l2_writes_total", s.writes)
    f.add("data_manager_l2_incidents_total", s.incidents)
    _circuit(f, "l2", s.breaker_state, opens)


def _bus_families(f: _Families, s: BusStats) -> None:
    updates = "data_manager_bus_updates_total"
    f.add(updates, s.published, "published")
    f.add(updates, s.coalesced, "coalesced")
    f.add(updates, s.dropped, "dropped")
    f.add("data_manager_bus_messages_sent_total", s.messages_sent)
    f.add("data_manager_bus_candles_retried_total", s.retried)
    f.add("data_manager_bus_series_reset_total", s.reset_series)
    f.add("data_manager_bus_received_total", s.received)
    f.add("data_manager_bus_malformed_total", s.malformed)
    f.add("data_manager_bus_callback_errors_total", s.callback_errors)
    f.add("data_manager_bus_subscription_lost_total", s.lost)
    f.add("data_manager_bus_subscription_restored_total", s.restored)
    f.add("data_manager_bus_connected", 1.0 if s.connected else 0.0)


def _ingest_families(f: _Families, s: IngestStats, opens: int | None) -> None:
    f.add("data_manager_writes_accepted_total", s.accepted)
    f.add("data_manager_writes_stored_total", s.stored)
    # IngestStats may carry bucket counts (HistogramSnapshot); without them only the +Inf
    # bucket is known: count and sum still give rates and averages.
    sizes = getattr(s, "batch_size_histogram", None)
    if isinstance(sizes, HistogramSnapshot):
        f.histogram("data_manager_write_batch_size", sizes.cumulative(), sizes.sum)
    else:
        f.histogram("data_manager_write_batch_size", [(math.inf, s.batches)], s.batch_items)
    flush = getattr(s, "flush_seconds_histogram", None)
    if isinstance(flush, HistogramSnapshot):
        f.histogram("data_manager_write_flush_seconds", flush.cumulative(), flush.sum)
    else:
        f.histogram(
            "data_manager_write_flush_seconds", [(math.inf, s.batches)], s.flush_seconds_total
        )
    f.add("data_manager_write_retries_total", s.retries)
    f.add("data_manager_write_batch_failures_total", s.store_failures)
    f.add("data_manager_write_queue_depth", s.queue_depth)
    f.add("data_manager_write_queue_capacity", s.queue_capacity)
    f.add("data_manager_write_backpressure_waits_total", s.backpressure_waits)
    f.add("data_manager_write_backpressure_timeouts_total", s.backpressure_timeouts)
    f.add("data_manager_write_dead_lettered_total", s.dead_lettered)
    f.add("data_manager_write_lost_total", s.lost_on_close)
    f.add("data_manager_writer_errors_total", s.writer_errors)
    f.add("data_manager_journal_records", s.journal_records)
    f.add("data_manager_journal_size_bytes", s.journal_bytes)
    f.add("data_manager_journal_backlog", s.backlog_journals)
    f.add("data_manager_journal_fsyncs_total", s.journal_fsyncs)
    f.add("data_manager_journal_spilled_total", s.spilled)
    f.add("data_manager_journal_replayed_total", s.replayed)
    f.add("data_manager_journal_problems_total", s.journal_problems)
    f.add("data_manager_journal_orphans_adopted_total", s.orphans_adopted)
    _circuit(f, "database", s.breaker_state, opens)


def _circuit(f: _Families, backend: str, state: str, opens: int | None) -> None:
    for candidate in _CIRCUIT_STATES:
        f.add("data_manager_circuit_state", 1.0 if state == candidate else 0.0, backend, candidate)
    if opens is not None:
        f.add("data_manager_circuit_opens_total", opens, backend)


# ----------------------------------------------------------------------------- collector


class RouterCollector:
    """A ``prometheus_client`` collector that reads a router's counters at scrape time.

    Register it on a :class:`~prometheus_client.CollectorRegistry` (or use
    :func:`register_router`). One router per registry: a second router's collector is
    refused as duplicated time series; give each its own registry (or process).

    Args:
        router: The router to export (open or not; a closed router still has counters).
        loop: The router's event loop. Default: the loop running when the collector is
            built — build it from async code (as :func:`serve_metrics` does when called
            there). Without a loop, scrapes read the counters directly, which is right
            only when nothing else is running the router at the time.
        snapshot_timeout: Seconds a scrape from another thread waits for the loop.
    """

    def __init__(
        self,
        router: DataRouter,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        snapshot_timeout: float = DEFAULT_SNAPSHOT_TIMEOUT,
    ) -> None:
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        self._router = router
        self._loop = loop
        self._timeout = snapshot_timeout
        self._log = RateLimitedLogger(logger, 60.0)

    def describe(self) -> Iterator[Metric]:
        """Every family this collector may export, without samples (no snapshot taken).

        ``CollectorRegistry.register`` uses it to refuse duplicate metric names.
        """
        f = _Families()
        for spec in METRICS:
            f.family(spec.name)
        return iter(f.results())

    def collect(self) -> Iterator[Metric]:
        """Take a snapshot (on the router's loop) and yield the metric families."""
        snap = self._snapshot()
        if snap is None:
            f = _Families()
            f.add("data_manager_collector_up", 0.0)
            return iter(f.results())
        return iter(_families(snap))

    def _snapshot(self) -> _Snapshot | None:
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return _take_snapshot(self._router, 0.0)
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return _take_snapshot(self._router, 0.0)
        future: concurrent.futures.Future[_Snapshot] = concurrent.futures.Future()
        sent = time.perf_counter()

        def take() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the scrape gave up already
            try:
                future.set_result(_take_snapshot(self._router, time.perf_counter() - sent))
            except Exception as exc:  # a bug: fail this scrape visibly, not the loop
                future.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
        except RuntimeError:  # closed between the check and the call
            return _take_snapshot(self._router, 0.0)
        try:
            return future.result(self._timeout)
        except TimeoutError:
            future.cancel()
            self._log.warning(
                "loop-timeout",
                "metrics scrape: the router's event loop did not answer within %.1fs "
                "(blocked?); exporting data_manager_collector_up 0",
                self._timeout,
            )
            return None


def register_router(
    router: DataRouter,
    registry: CollectorRegistry | None = None,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    snapshot_timeout: float = DEFAULT_SNAPSHOT_TIMEOUT,
    collector: RouterCollector | None = None,
) -> CollectorRegistry:
    """Register a :class:`RouterCollector` for ``router``.

    Args:
        router: The router to export.
        registry: Where to register; default a new registry that also carries the
            standard ``process_*``, ``python_info`` and ``python_gc_*`` collectors (never
            the global ``prometheus_client.REGISTRY``, which this SDK leaves to the
            application).
        loop: See :class:`RouterCollector`.
        snapshot_timeout: See :class:`RouterCollector`.
        collector: Register this collector (built for ``router``) instead of a new one.

    Returns:
        The registry.

    Raises:
        ValueError: ``registry`` already exports a router (duplicated time series).
    """
    from prometheus_client import (
        GCCollector,
        PlatformCollector,
        ProcessCollector,
    )
    from prometheus_client.registry import CollectorRegistry

    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    if collector is None:
        collector = RouterCollector(router, loop=loop, snapshot_timeout=snapshot_timeout)
    registry.register(collector)
    return registry


# ----------------------------------------------------------------------------- HTTP server


def _server_classes() -> tuple[type[WSGIServer], type[WSGIServer], type[WSGIRequestHandler]]:
    """The HTTP server classes, built on first use: ``wsgiref`` pulls in ``http.server``
    (about 20 ms of imports) that a process not serving metrics should not pay for."""
    from socketserver import TCPServer, ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class ThreadingServer(ThreadingMixIn, WSGIServer):
        # One thread per scrape: a scrape waiting on a blocked event loop does not hold up
        # the accept loop. Daemon threads: shutting the server down never waits for them.
        daemon_threads = True

        def server_bind(self) -> None:
            # HTTPServer.server_bind resolves socket.getfqdn(host), a reverse DNS lookup
            # that can block for seconds (and serve_metrics runs on the event loop); the
            # WSGI environ only needs a name, so the address itself will do.
            TCPServer.server_bind(self)
            host, port = self.server_address[:2]
            self.server_name = str(host)
            self.server_port = int(port)
            self.setup_environ()

    class ThreadingServer6(ThreadingServer):
        address_family = socket.AF_INET6

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not logged (a line per scrape, forever, is noise)."""

    return ThreadingServer, ThreadingServer6, QuietHandler


class MetricsServer:
    """A background HTTP server answering ``GET /metrics`` (any path, in fact).

    Built by :func:`serve_metrics`. Use :meth:`shutdown` (blocking, at most ~0.1 s) or
    :meth:`aclose` (from async code) to stop it; both are idempotent.
    """

    def __init__(
        self, server: WSGIServer, thread: threading.Thread, registry: CollectorRegistry
    ) -> None:
        self._server = server
        self._thread = thread
        self._closed = False
        self._pid = os.getpid()
        self.registry = registry

    @property
    def port(self) -> int:
        """The TCP port (the one the OS chose when asked for port 0)."""
        return int(self._server.server_address[1])

    @property
    def addr(self) -> str:
        """The address it listens on."""
        return str(self._server.server_address[0])

    @property
    def url(self) -> str:
        """``http://addr:port/metrics``."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting scrapes and release the port (blocks up to ~0.1 s)."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            # A forked child inherits the listening socket but not the serving thread:
            # shutdown() would wait for ever on a loop that does not run here.
            self._server.server_close()
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)

    async def aclose(self) -> None:
        """:meth:`shutdown` without blocking the event loop."""
        await asyncio.to_thread(self.shutdown)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<MetricsServer {self.url} {state}>"


def serve_metrics(
    router: DataRouter,
    port: int,
    addr: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    snapshot_timeout: float = DEFAULT_SNAPSHOT_TIMEOUT,
) -> MetricsServer:
    """Export ``router`` over HTTP from a background thread.

    Call it from the router's event loop (the collector captures the running loop).

    Args:
        router: The router to export.
        port: TCP port; 0 lets the OS choose (read it back from ``.port``).
        addr: Address to bind. The default only accepts local scrapes; in a container
            use ``"0.0.0.0"`` and keep the port off public networks (no authentication).
        registry: Register the router's collector on this registry and serve it; default
            a new one (see :func:`register_router`).
        snapshot_timeout: See :class:`RouterCollector`.

    Returns:
        The running server (``.port``, ``.url``, ``.shutdown()``, ``.aclose()``).

    Raises:
        ConfigurationError: The address cannot be bound (port in use, bad address).
    """
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app

    collector = RouterCollector(router, snapshot_timeout=snapshot_timeout)
    registry = register_router(router, registry, collector=collector)
    server4, server6, handler = _server_classes()
    server_class = server6 if ":" in addr else server4
    try:
        server = make_server(
            addr, port, make_wsgi_app(registry), server_class, handler_class=handler
        )
    except OSError as exc:
        registry.unregister(collector)
        msg = f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}"
        raise ConfigurationError(msg) from exc
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": _SERVER_POLL_SECONDS},
        name=f"data_manager-metrics-{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    metrics = MetricsServer(server, thread, registry)
    logger.info("metrics served at %s", metrics.url)
    return metrics
