"""The write path: a write-behind batcher with retries, a circuit breaker and the journal.

Three write modes, each with its guarantee:

* ``buffered`` (write-behind): :meth:`IngestPipeline.submit` puts the item in a bounded
  in-memory queue and returns. One writer task stores batches: when ``batch_size`` items are
  queued, or the oldest has waited ``flush_interval`` seconds, or someone calls
  :meth:`~IngestPipeline.flush`. Under load a batch is whatever queued up while the previous
  one was being written (group commit), capped by ``max_batch``. A process crash loses what
  was still queued; nothing else.
* ``journal``: the call returns once the item is appended to the local :class:`Journal` and
  fsync'd (one sync shared by every concurrent caller); it is then queued like a buffered
  item. Neither ``kill -9`` nor a power loss loses an acknowledged item: the next router to
  start replays the journal.
* ``sync``: the call returns after the database committed it, retrying transient errors;
  it raises :class:`CircuitBreakerOpenError` while the breaker is open and
  :class:`RetryExhaustedError` (chained to the last error) when retries run out.

Failures. Transient database errors (``errors.TRANSIENT_ERRORS``) are retried with tenacity
(bounded attempts, capped jittered exponential backoff). Every attempt reports to the
:class:`CircuitBreaker`. A batch that still cannot be stored is appended to the journal and
dropped from memory, and the pipeline enters *backlog mode*: while the journal holds
records the database has not seen, new batches are appended to the journal too, and the
writer replays the journal to the database in LSN order (a half-open probe first, when the
breaker is open). When the replay catches up, batches go straight to the database again.
Routing everything through the journal while it has a backlog keeps one global order (what
was accepted first is stored first), so an older version of a forming candle can never
overwrite a newer one; the cost is an extra sequential write while recovering. Without a
journal a failing batch stays in memory and the full queue pushes back on producers.

Orphans. At start, and every ``orphan_scan_interval`` seconds, the pipeline looks for
journals of dead instances in the same folder (their lock is free), takes their lock and
puts them in the backlog ahead of its own journal (older data first), which also puts it in
backlog mode until they are replayed. :meth:`start` does not wait for the replay;
:meth:`flush` does.

Order. Buffered and journal-mode items are stored in the order they were queued (a
journal-mode item is queued once it is durable, so it can land after a buffered item
submitted while its sync ran). ``sync`` writes go straight to the database and may overtake
queued items. Within a batch, only the last version of a candle or order-flow key is sent;
should the database refuse it, the batch's other versions of that key are written in its
place, so the row ends as one upsert after another would leave it.

Data the database refuses (``QueryExecutionError``/``ValidationError`` for a batch) must not
wedge the queue: the batch is split in halves until the refused items are isolated, the rest
is stored, and each refused item is counted, logged and appended to the dead-letter file
(``<journal root>/dead-letter/<instance>.jsonl``), never dropped silently.

Correctness rests on the storage's idempotent writes: an item may be written twice (a batch
retried after a commit whose answer was lost, a journal replayed after a crash), never lost
once acknowledged, and never stored twice as two rows.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from data_manager._tasks import finish_despite_cancel
from data_manager.breaker import BreakerState, CircuitBreaker
from data_manager.clock import Clock, SystemClock
from data_manager.errors import (
    TRANSIENT_ERRORS,
    BackpressureTimeoutError,
    CircuitBreakerOpenError,
    ConfigurationError,
    QueryExecutionError,
    QueryTimeoutError,
    RetryExhaustedError,
    RouterClosedError,
    ValidationError,
)
from data_manager.journal import (
    DEAD_LETTER_DIR,
    DeadLetterFile,
    IngestItem,
    Journal,
    JournalBatch,
    JournalError,
    JournalLockedError,
    decode_item,
    encode_item,
    find_orphans,
)
from data_manager.logutil import RateLimitedLogger
from data_manager.metrics import BATCH_SIZE_BUCKETS, HistogramRecorder, HistogramSnapshot
from data_manager.models import CandleData, OrderFlowMetrics, TickData

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from pathlib import Path

    from data_manager.settings import WriteMode
    from data_manager.storage.base import Storage
    from data_manager.stream import BackupStream

__all__ = ["IngestItem", "IngestPipeline", "IngestStats", "PipelineState", "ReplayObserver"]

logger = logging.getLogger(__name__)

#: A queued entry: a buffered item, or ``(item, lsn)`` for one already in the journal.
_Entry: TypeAlias = "IngestItem | tuple[IngestItem, int]"
_ITEM_TYPES: Final = frozenset({TickData, CandleData, OrderFlowMetrics})
# Errors that say "this data is refused", as opposed to "the database is not answering".
_REFUSED: Final = (QueryExecutionError, ValidationError)
_DECODE_SLICE: Final = 500  # records decoded between two yields to the event loop
_RECENT_DEAD_LETTERS: Final = 4_096  # refused records remembered, so none is kept twice
# Upsert keys noted as overtaken (see _to_journal) before the ones no queued version can be
# below any more are looked for; then again each time the count doubles.
_OVERTAKEN_PRUNE_MIN = 4_096


class ReplayObserver(Protocol):
    """What the router learns of dead instances' journals (see
    :meth:`IngestPipeline.hold_for_derived`)."""

    def adopted(self) -> None:
        """Journals of dead instances were adopted; their replay begins."""

    def replayed(self, items: Sequence[IngestItem]) -> None:
        """These items of an adopted journal are stored."""

    def adopted_replayed(self) -> None:
        """Every adopted journal is replayed (each is kept, held, until the pipeline's
        ``release_adopted`` or its shutdown)."""


class PipelineState(enum.Enum):
    """Lifecycle of an :class:`IngestPipeline`."""

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET: Final = _Unset.UNSET


class _StoreFailed(Exception):
    """A batch could not be stored now (transient failure, open breaker, or a bug)."""


@dataclass(frozen=True, slots=True)
class IngestStats:
    """A snapshot of the write path's counters (no I/O to take it).

    Attributes:
        queue_depth: Items in memory waiting for the writer (plus the batch in hand).
        queue_capacity: ``max_queue``.
        accepted: Items accepted by :meth:`IngestPipeline.submit` since start (all modes).
        stored: Items the database confirmed (direct, replayed and sync).
        batches: Batches written to the database (replay chunks included).
        batch_items: Items in those batches (``batch_items / batches`` is the mean size).
        last_batch_size, max_batch_size: Of those batches.
        flush_seconds_total, last_flush_seconds, max_flush_seconds: Wall time spent
            writing batches (retries included).
        retries: Storage attempts retried after a transient error.
        store_failures: Batches that could not be stored (then journaled or held).
        breaker_state: ``closed``, ``open`` or ``half_open``.
        journal_records, journal_bytes: Records not yet stored and bytes on disk, over
            this instance's journal and the adopted ones.
        journal_fsyncs: Syncs of this instance's journal (group commits).
        spilled: Items appended to the journal because the database could not take them.
        replayed: Items stored from a journal.
        backlog_journals: Journals waiting to be replayed (0 in normal operation).
        orphans_adopted: Journals of dead instances taken over.
        dead_lettered: Records the database refused, kept in the dead-letter file (or, without
            one, logged); a record identical to one of the last 4,096 kept is counted once.
        backpressure_waits: Submits that found the queue full and waited.
        backpressure_timeouts: Submits that gave up with BackpressureTimeoutError.
        lost_on_close: Items that could be neither stored nor journaled at close: without
            a journal, or when appending to it failed too (a full disk while the database
            is down). Logged as an error.
        writer_errors: Unexpected errors in the writer task (logged with traceback).
        journal_problems: Problems this instance's journal and the adopted ones found and
            logged as errors (:attr:`Journal.problems`: damaged bytes moved aside, a
            segment file deleted under them), those of adopted journals since removed too.
    """

    queue_depth: int
    queue_capacity: int
    accepted: int
    stored: int
    batches: int
    batch_items: int
    last_batch_size: int
    max_batch_size: int
    flush_seconds_total: float
    last_flush_seconds: float
    max_flush_seconds: float
    retries: int
    store_failures: int
    breaker_state: str
    journal_records: int
    journal_bytes: int
    journal_fsyncs: int
    spilled: int
    replayed: int
    backlog_journals: int
    orphans_adopted: int
    dead_lettered: int
    backpressure_waits: int
    backpressure_timeouts: int
    lost_on_close: int
    writer_errors: int
    batch_size_histogram: HistogramSnapshot | None = None
    flush_seconds_histogram: HistogramSnapshot | None = None
    breaker_opens: int = 0
    journal_problems: int = 0


class IngestPipeline:
    """Write-behind batcher, retries, circuit breaker and journal in front of a Storage.

    Args:
        storage: Where items end up; its writes must be idempotent.
        journal: This instance's journal (opened by :meth:`start` if needed); ``None``
            disables ``journal`` mode, spilling and orphan adoption.
        batch_size: Flush when this many items are queued.
        journal_batch_size: Flush when this many items are queued counting those from
            ``journal`` mode, which are on disk already: they wait for a larger batch (fewer
            database commits), or for the flush interval. Taken as at least ``batch_size``
            and at most ``max_batch``.
        flush_interval: ...or when the oldest queued item is this many seconds old.
        max_batch: Upper bound of one group commit.
        max_queue: Queue bound; a submit beyond it waits (back-pressure).
        put_timeout: Seconds a submit waits on a full queue before raising
            :class:`BackpressureTimeoutError`; ``None`` waits for ever, ``0`` never waits.
        retry_attempts: Storage attempts per batch (first try included).
        retry_initial: First backoff in seconds (doubling after each failure).
        retry_max_backoff: Backoff cap in seconds.
        retry_jitter: Random extra backoff, up to this many seconds; default
            ``retry_initial``. Tests pass zeros for all three.
        breaker: The database's circuit breaker (shared with whoever else calls it).
        clock: Time source for the flush interval and the breaker wait.
        replay_batch: Records per replay chunk.
        dead_letter_path: Where refused items go; default
            ``<journal root>/dead-letter/<instance>.jsonl`` (``None`` without a journal:
            refused items are then only logged, in full, at error level).
        orphan_scan_interval: Seconds between scans for dead instances' journals; ``None``
            scans only at start.
        backup: Optional backup stream; every batch the writer takes is also published to
            it (never blocking; see ``data_manager.stream``).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        journal: Journal | None = None,
        batch_size: int = 100,
        journal_batch_size: int = 2_000,
        flush_interval: float = 1.0,
        max_batch: int = 50_000,
        max_queue: int = 100_000,
        put_timeout: float | None = None,
        retry_attempts: int = 5,
        retry_initial: float = 0.05,
        retry_max_backoff: float = 2.0,
        retry_jitter: float | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Clock | None = None,
        replay_batch: int = 5_000,
        dead_letter_path: Path | None = None,
        orphan_scan_interval: float | None = 60.0,
        backup: BackupStream | None = None,
    ) -> None:
        self._storage = storage
        self._backup = backup
        # Hot-path incidents (a failing database, a bad feed) are logged at most every 30 s
        # per kind, with a count of what was suppressed; counters keep every occurrence.
        self._log = RateLimitedLogger(logger, 30.0, clock=clock)
        self._journal = journal
        self._clock: Clock = clock or SystemClock()
        self._breaker = breaker or CircuitBreaker("database", clock=self._clock)
        self._replay_batch = max(1, replay_batch)
        self._orphan_scan_interval = orphan_scan_interval
        if dead_letter_path is None and journal is not None:
            dead_letter_path = journal.root / DEAD_LETTER_DIR / f"{journal.instance_id}.jsonl"
        self._dead_letters = DeadLetterFile(dead_letter_path) if dead_letter_path else None
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._space: asyncio.Future[None] | None = None
        # Set (and checked) by configure() below.
        self._batch_size = batch_size
        self._journal_batch_size = journal_batch_size
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._put_timeout = put_timeout
        self._retry_attempts = retry_attempts
        self._retry_initial = retry_initial
        self._retry_max_backoff = retry_max_backoff
        self._retry_jitter = retry_jitter
        self.configure(
            batch_size=batch_size,
            journal_batch_size=journal_batch_size,
            flush_interval=flush_interval,
            max_batch=max_batch,
            max_queue=max_queue,
            put_timeout=put_timeout,
            retry_attempts=retry_attempts,
            retry_initial=retry_initial,
            retry_max_backoff=retry_max_backoff,
            retry_jitter=retry_jitter,
        )
        self._writers: dict[type[Any], Callable[[Any], Awaitable[int]]] = {
            TickData: storage.write_ticks,
            CandleData: storage.write_candles,
            OrderFlowMetrics: storage.write_order_flow,
        }
        self._state = PipelineState.NEW
        self._queue: collections.deque[_Entry] = collections.deque()
        self._oldest = 0.0  # monotonic time the oldest queued item arrived (lower bound)
        self._urgent = 0  # queued items not (yet) on disk: buffered ones, not journal ones
        self._held: list[_Entry] | None = None  # the batch the writer is placing
        self._held_barrier = 0  # _journaled_lsn when _held was taken
        self._journaled_lsn = 0  # newest record of our journal acknowledged or spilled
        # A queued journal-mode upsert at or below this LSN is written once more: items
        # accepted before it were since journaled after it, or stored after its replay.
        self._reorder_lsn = 0
        # Upsert keys with a buffered version (or a copy) appended to the journal, each with
        # the first LSN of that append: a queued journal-mode version of the key below it is
        # journaled once more when it goes to the journal (see _to_journal).
        self._overtaken: dict[Any, int] = {}
        self._overtaken_prune_at = _OVERTAKEN_PRUNE_MIN
        self._spill_items: list[IngestItem] = []
        self._reserved = 0  # queue slots promised to journal-mode appends in flight
        # Journal-mode calls whose append is not durable yet, by id(item) (one object per
        # call: a model saved again while in flight is journaled as a copy); _on_durable
        # removes them.
        self._appending: set[int] = set()
        # Items of journal-mode calls cancelled mid-append (id → item), until their append
        # settles; see _release_if_lost.
        self._cancelled: dict[int, IngestItem] = {}
        self._cancelled_but_taken: IngestItem | None = None  # see took_despite_cancel
        #: Told of each ``journal``-mode item whose caller was cancelled while its append
        #: was under way, once the append is kept (the item is accepted all the same): the
        #: router hands such a tick to the data derived from it, as its call would have.
        self.on_kept_after_cancel: Callable[[IngestItem], None] | None = None
        self._followups: set[asyncio.Task[None]] = set()
        self._backlog: list[Journal] = []  # journals to replay, in order
        # Journals whose durable checkpoint after a replayed upsert could not be written: they
        # stay in the backlog until it is (see _replay_step).
        self._owed_checkpoints: set[Journal] = set()
        # Set by hold_for_derived: told of dead instances' records as they are replayed.
        self._observer: ReplayObserver | None = None
        # (items enqueued, LSN): see derived_barrier.
        self._barriers: collections.deque[tuple[int, int]] = collections.deque()
        # Adopted journals replayed, kept (held) until release_adopted: see hold_for_derived;
        # and those kept for the next router (keep_adopted).
        self._replayed_adopted: list[Journal] = []
        self._kept_adopted: list[Journal] = []
        self._retry_at = 0.0  # no storage attempt before this (monotonic)
        self._spill_retry_at = 0.0  # no journal append before this (after a disk error)
        self._next_scan: float | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writer_idle = False
        self._spill: asyncio.Future[int] | None = None  # the journal append of _held
        self._space_waiters = 0
        self._progress: asyncio.Future[None] | None = None
        self._flush_target = 0
        # Counters (see IngestStats).
        self._enqueued = 0
        self._taken = 0
        self._placed = 0
        self._accepted = 0
        self._stored = 0
        self._batches = 0
        self._batch_items = 0
        self._last_batch = 0
        self._max_batch_seen = 0
        self._flush_total = 0.0
        self._flush_last = 0.0
        self._flush_max = 0.0
        self._batch_sizes = HistogramRecorder(BATCH_SIZE_BUCKETS)
        self._flush_seconds = HistogramRecorder()
        self._retries = 0
        self._store_failures = 0
        self._spilled = 0
        self._replayed = 0
        self._orphans_adopted = 0
        self._dead_lettered = 0
        self._removed_problems = 0  # journal problems of adopted journals since closed
        self._recent_dead: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._bp_waits = 0
        self._bp_timeouts = 0
        self._lost = 0
        self._writer_errors = 0

    def __repr__(self) -> str:
        return (
            f"IngestPipeline(state={self._state.value}, queued={len(self._queue)}, "
            f"backlog={len(self._backlog)})"
        )

    # ------------------------------------------------------------------ configuration

    @property
    def state(self) -> PipelineState:
        """Where the pipeline is in its lifecycle."""
        return self._state

    @property
    def journal(self) -> Journal | None:
        """This instance's journal, if any."""
        return self._journal

    @property
    def breaker(self) -> CircuitBreaker:
        """The database circuit breaker."""
        return self._breaker

    @property
    def replay_owed(self) -> bool:
        """Journals wait to be replayed (spilled batches, a dead instance's journal)."""
        return bool(self._backlog)

    def unstored(self) -> list[IngestItem]:
        """The accepted items held in memory and not stored yet (the batch being written,
        then the queue), oldest first; what a spill moved to the journal is not among them."""
        entries = [*(self._held or ()), *self._queue]
        return [entry[0] if type(entry) is tuple else entry for entry in entries]

    def configure(
        self,
        *,
        batch_size: int | _Unset = _UNSET,
        journal_batch_size: int | _Unset = _UNSET,
        flush_interval: float | _Unset = _UNSET,
        max_batch: int | _Unset = _UNSET,
        max_queue: int | _Unset = _UNSET,
        put_timeout: float | _Unset | None = _UNSET,
        retry_attempts: int | _Unset = _UNSET,
        retry_initial: float | _Unset = _UNSET,
        retry_max_backoff: float | _Unset = _UNSET,
        retry_jitter: float | _Unset | None = _UNSET,
    ) -> None:
        """Change batching, back-pressure or retry settings while running (hot reload).

        Only the arguments given change. A smaller ``max_queue`` applies to new submits;
        what is already queued stays.

        Raises:
            ConfigurationError: A value is out of range; nothing is changed then.
        """
        new = {
            "batch_size": self._batch_size if batch_size is _UNSET else batch_size,
            "journal_batch_size": (
                self._journal_batch_size if journal_batch_size is _UNSET else journal_batch_size
            ),
            "flush_interval": (
                self._flush_interval if flush_interval is _UNSET else flush_interval
            ),
            "max_batch": self._max_batch if max_batch is _UNSET else max_batch,
            "max_queue": self._max_queue if max_queue is _UNSET else max_queue,
            "retry_attempts": (
                self._retry_attempts if retry_attempts is _UNSET else retry_attempts
            ),
            "retry_initial": self._retry_initial if retry_initial is _UNSET else retry_initial,
            "retry_max_backoff": (
                self._retry_max_backoff if retry_max_backoff is _UNSET else retry_max_backoff
            ),
        }
        timeout = self._put_timeout if put_timeout is _UNSET else put_timeout
        jitter = self._retry_jitter if retry_jitter is _UNSET else retry_jitter
        problems = [
            f"{name} must be >= 1"
            for name in (
                "batch_size",
                "journal_batch_size",
                "max_batch",
                "max_queue",
                "retry_attempts",
            )
            if new[name] < 1
        ]
        problems += [
            f"{name} must be >= 0"
            for name in ("flush_interval", "retry_initial", "retry_max_backoff")
            if new[name] < 0
        ]
        if new["batch_size"] > new["max_batch"]:
            problems.append("batch_size must not exceed max_batch")
        if timeout is not None and timeout < 0:
            problems.append("put_timeout must be >= 0 or None")
        if jitter is not None and jitter < 0:
            problems.append("retry_jitter must be >= 0 or None")
        if problems:
            msg = "invalid write-path settings: " + "; ".join(problems)
            raise ConfigurationError(msg)
        self._batch_size = int(new["batch_size"])
        self._journal_batch_size = int(new["journal_batch_size"])
        self._flush_interval = float(new["flush_interval"])
        self._max_batch = int(new["max_batch"])
        self._journal_trigger = min(
            max(self._batch_size, self._journal_batch_size), self._max_batch
        )
        self._max_queue = int(new["max_queue"])
        self._retry_attempts = int(new["retry_attempts"])
        self._retry_initial = float(new["retry_initial"])
        self._retry_max_backoff = float(new["retry_max_backoff"])
        self._put_timeout = timeout
        self._retry_jitter = jitter
        self.wake()

    def hold_for_derived(self, observer: ReplayObserver) -> None:
        """Keep the journal's records until the data derived from them is queued and stored,
        and report what is replayed from dead instances' journals.

        The router derives candles and order flow from the ticks it accepts and keeps them
        in memory until its next maintenance pass; a crash loses them. With this, the
        journal's checkpoint stops at the LSN of the last :meth:`derived_barrier` whose
        queued items are placed, so a crash leaves every tick whose derived data may be lost
        to the next router's replay; ``observer`` then learns which series to rebuild.
        An adopted journal, once replayed, is kept (its checkpoint held where it was found)
        until :meth:`release_adopted`: if this router stops before it has rebuilt them, the
        next one replays the ticks again and rebuilds. Call before :meth:`start`.
        """
        self._observer = observer
        if self._journal is not None:
            self._journal.hold_checkpoint(0)

    def derived_barrier(self, lsn: int) -> None:
        """The data derived from this journal's records up to ``lsn`` is queued: once what is
        queued now is stored (or journaled), the checkpoint may pass ``lsn``."""
        if self._journal is None or self._observer is None:
            return
        self._barriers.append((self._enqueued, lsn))
        self._apply_barriers()

    async def release_adopted(self) -> None:
        """The data derived from the replayed adopted journals is rebuilt: remove them."""
        journals = self._replayed_adopted
        while journals:
            journal = journals.pop(0)  # one at a time: a failure leaves the others listed
            journal.hold_checkpoint(None)
            try:
                await self._remove_adopted(journal)
            except Exception:
                logger.exception("write path: cannot remove the replayed journal %s", journal.path)

    def keep_adopted(self) -> None:
        """The replayed adopted journals stay (held) for the next router: their derived
        data could not be rebuilt. They are closed, not removed, at shutdown."""
        self._kept_adopted.extend(self._replayed_adopted)
        self._replayed_adopted.clear()

    def _apply_barriers(self) -> None:
        barriers = self._barriers
        if not barriers or self._journal is None:
            return
        placed = self._placed
        lsn = None
        while barriers and barriers[0][0] <= placed:
            lsn = barriers.popleft()[1]
        if lsn is not None:
            self._journal.hold_checkpoint(lsn)

    def set_backup(self, backup: BackupStream | None) -> None:
        """Start or stop publishing batches to a backup stream (strategy hot reload)."""
        self._backup = backup

    def wake(self) -> None:
        """Make the writer re-check its triggers now.

        Needed only after moving an injected clock (tests); cheap otherwise.
        """
        self._wake.set()
        self._release_space()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the journal, adopt dead instances' journals, start the writer.

        The replay of what was found runs in the background; :meth:`flush` waits for it.

        Raises:
            JournalLockedError: Another live process holds this instance's journal.
            JournalError: The journal folder cannot be used.
            RouterClosedError: The pipeline was started before.
        """
        if self._state is not PipelineState.NEW:
            msg = f"{self!r} cannot be started twice"
            raise RouterClosedError(msg)
        journal = self._journal
        if journal is not None:
            if not journal.is_open:
                await journal.open()
            self._journaled_lsn = journal.last_lsn
            if journal.pending_records:
                # Leftovers of an earlier run under the same instance id.
                self._backlog.append(journal)
            await self.adopt_orphans()
            if self._orphan_scan_interval is not None:
                self._next_scan = self._clock.monotonic() + self._orphan_scan_interval
        self._state = PipelineState.RUNNING
        self._writer = asyncio.create_task(self._run(), name="data_manager-ingest-writer")

    async def adopt_orphans(self) -> int:
        """Take over the journals of dead instances in the journal folder.

        Returns:
            How many journals were adopted (they are replayed in the background).
        """
        own = self._journal
        if own is None or self._state in (PipelineState.CLOSING, PipelineState.CLOSED):
            return 0
        exclude = {own.instance_id} | {j.instance_id for j in self._backlog}
        exclude |= {j.instance_id for j in (*self._replayed_adopted, *self._kept_adopted)}
        try:
            paths = await asyncio.to_thread(find_orphans, own.root, exclude=exclude)
        except OSError:
            logger.exception("write path: cannot scan %s for orphaned journals", own.root)
            return 0
        adopted = 0
        for path in paths:
            orphan = Journal(path.parent, instance_id=path.name, segment_bytes=own.segment_bytes)
            try:
                # Cancelled, it still gives back the lock its worker thread took.
                await orphan.open(create=False)
            except JournalLockedError:
                continue  # alive after all, or another router was quicker
            except JournalError:
                logger.exception("cannot adopt the journal %s; leaving it", path)
                continue
            if orphan.pending_records == 0:
                await self._remove_adopted(orphan)  # nothing to replay
                continue
            logger.warning(
                "adopting the journal of dead instance %s: %d records to replay",
                orphan.instance_id,
                orphan.pending_records,
            )
            if self._observer is not None:
                orphan.hold_checkpoint(orphan.stored_lsn)  # kept until release_adopted
            # Older data first: ahead of our own backlog, if we have one.
            at = self._backlog.index(own) if own in self._backlog else len(self._backlog)
            self._backlog.insert(at, orphan)
            adopted += 1
        self._orphans_adopted += adopted
        if adopted:
            if self._observer is not None:
                self._observer.adopted()
            self.wake()
        return adopted

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - router API
        """Return once everything accepted before this call is stored in the database.

        This includes journals being replayed (adopted ones too). While the database is
        down this waits for it to come back.

        Args:
            timeout: Give up after this many seconds; ``None`` waits for ever.

        Raises:
            QueryTimeoutError: ``timeout`` passed first (nothing is lost; the work goes on).
            RouterClosedError: The pipeline was never started.
        """
        if self._state is PipelineState.NEW:
            msg = "the write pipeline has not been started"
            raise RouterClosedError(msg)
        done = self._flush_condition()
        try:
            async with asyncio.timeout(timeout):
                await self._wait_progress(done)
        except TimeoutError:
            msg = (
                f"flush did not finish within {timeout:g}s: {len(self._queue)} queued, "
                f"{self._journal_records()} in the journal, circuit "
                f"{self._breaker.state.value}"
            )
            raise QueryTimeoutError(msg, timeout_seconds=timeout) from None

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - router API
        """Stop accepting, store what is queued, journal what cannot be stored.

        Waits (up to ``timeout``) for everything to be stored. With a journal it stops
        waiting as soon as the database is known to be down (breaker open); whatever is
        not stored then is appended to the journal before this returns, and the journal is
        left for the next router to replay. Without a journal it waits the full
        ``timeout`` (``None``: until stored), then logs and counts what it had to drop; so
        it does with a journal that cannot take the rest either (a full disk).
        """
        if self._state in (PipelineState.CLOSING, PipelineState.CLOSED):
            await self._closed.wait()  # a concurrent close() finishes the job
            return
        if self._state is PipelineState.NEW:
            # Never started, or start() failed part-way: give back every lock it took.
            self._state = PipelineState.CLOSED
            journals = [j for j in self._backlog if j is not self._journal]
            self._backlog.clear()
            if self._journal is not None:
                journals.append(self._journal)
            try:
                for held in journals:
                    if held.is_open:
                        try:
                            await held.close()
                        except JournalError:
                            logger.exception("write path: cannot close the journal %s", held.path)
            finally:
                self._closed.set()
            return
        self._state = PipelineState.CLOSING
        self._release_space()
        done = self._flush_condition()
        journal = self._journal

        def finished() -> bool:
            return done() or (journal is not None and self._breaker.state is BreakerState.OPEN)

        cancelled = False
        try:
            async with asyncio.timeout(timeout):
                await self._wait_progress(finished)
        except TimeoutError:
            logger.warning("write path: close() gave up flushing after %ss", timeout)
        except asyncio.CancelledError:
            # Our caller gave up waiting (an outer timeout): shut down as after our own
            # timeout, then let the cancellation through. Left CLOSING, the writer would run
            # on and every later close() would wait for ever.
            cancelled = True
        except Exception:
            logger.exception("write path: flush at close failed")
        try:
            # Cancelled meanwhile, the shutdown still runs to its end: cut short, it would
            # leave queued items neither stored nor journaled, and the journal locked.
            await finish_despite_cancel(self._shut_down())
        finally:
            self._state = PipelineState.CLOSED
            self._closed.set()
            self._notify_progress()
        if cancelled:
            raise asyncio.CancelledError

    async def _shut_down(self) -> None:
        """Stop the writer, journal what is left, close every journal (end of close())."""
        journal = self._journal
        await self._stop_writer()
        await self._journal_leftovers()
        others = [*self._backlog, *self._replayed_adopted, *self._kept_adopted]
        self._backlog.clear()
        self._replayed_adopted.clear()
        self._kept_adopted.clear()
        for backlog in [*(j for j in others if j is not journal), journal]:
            if backlog is None:
                continue
            if backlog is not journal:
                self._removed_problems += len(backlog.problems)  # still counted in stats
            try:
                await backlog.close()  # unlocked: the next router adopts what is left
            except JournalError:
                # Its checkpoint or its removal failed (a full disk, say): the records stay
                # on disk and are replayed (idempotently) by the next router; the others
                # are closed all the same.
                logger.exception("write path: closing the journal %s failed", backlog.path)

    async def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        if self._journal is not None:
            # Appends already requested finish (and queue their items) before we look.
            await self._journal.wait_idle()

    async def _journal_leftovers(self) -> None:
        held = self._held or []
        spill = self._spill
        if spill is not None and spill.done() and not spill.cancelled() and not spill.exception():
            # The writer was stopped after journaling it, before it noted so: note it here as
            # _place_held would (queued upserts up to it were overtaken by the spilled items;
            # the spill's own LSNs belong to no queued entry, so its last one bounds them).
            held = []
            last = spill.result()
            self._journaled_lsn = max(self._journaled_lsn, last)
            self._reorder_lsn = max(self._reorder_lsn, last)
            self._note_overtaken(self._spill_items, last)
        leftovers = held + list(self._queue)
        self._held = None
        self._queue.clear()
        self._urgent = 0
        fresh = _to_journal(leftovers, self._overtaken)
        if not fresh:
            return
        journal = self._journal
        if journal is not None and journal.is_open:
            try:
                await journal.append(fresh)
            except JournalError:
                self._lost += len(fresh)
                logger.exception(
                    "write path: %d items could be neither stored nor journaled before "
                    "close; they are lost",
                    len(fresh),
                )
                return
            self._spilled += len(fresh)
            logger.warning(
                "write path: %d items not stored at close are in the journal %s",
                len(fresh),
                journal.path,
            )
            return
        self._lost += len(fresh)
        logger.error(
            "write path: %d items could not be stored before close and there is no "
            "journal to keep them; they are lost",
            len(fresh),
        )

    # ------------------------------------------------------------------ submit

    async def submit(self, item: IngestItem, *, mode: WriteMode = "buffered") -> None:
        """Accept one item under ``mode`` (see the module docstring for guarantees).

        Raises:
            ValidationError: ``item`` is not a TickData, CandleData or OrderFlowMetrics,
                or ``mode`` is unknown.
            RouterClosedError: The pipeline is not running.
            BackpressureTimeoutError: The queue stayed full past ``put_timeout``.
            ConfigurationError: ``journal`` mode without a journal.
            JournalError: ``journal`` mode and the append or sync failed.
            CircuitBreakerOpenError, RetryExhaustedError, QueryExecutionError: ``sync``
                mode only.
        """
        if mode == "buffered":
            # The hot path: no await unless the queue is full.
            if (
                self._state is PipelineState.RUNNING
                and type(item) in _ITEM_TYPES
                and len(self._queue) + self._reserved < self._max_queue
                and not self._space_waiters
            ):
                self._enqueue(item)
                self._accepted += 1
                return
            self._check_submit(item)
            await self._wait_for_space()
            self._enqueue(item)
            self._accepted += 1
        elif mode == "journal":
            await self._submit_journaled(item)
        elif mode == "sync":
            self._check_submit(item)
            await self._write_now(item)
        else:
            msg = f"unknown write mode {mode!r}; expected buffered, journal or sync"
            raise ValidationError(msg)

    def submit_nowait(self, item: IngestItem) -> None:
        """Queue ``item`` (buffered) without ever waiting, even past ``max_queue``.

        For items derived synchronously from another one (candles aggregated from a tick):
        the caller then applies back-pressure with its own :meth:`submit`, so the overshoot
        is bounded by what one item derives.

        Raises:
            ValidationError: Unsupported item type.
            RouterClosedError: The pipeline is not running.
        """
        self._check_submit(item)
        self._enqueue(item)
        self._accepted += 1

    def _check_submit(self, item: object) -> None:
        if self._state is not PipelineState.RUNNING:
            msg = f"the write pipeline is {self._state.value}"
            raise RouterClosedError(msg)
        if type(item) not in _ITEM_TYPES:
            msg = (
                f"cannot store a {type(item).__name__}; expected TickData, CandleData or "
                "OrderFlowMetrics"
            )
            raise ValidationError(msg)

    def _enqueue(self, entry: _Entry) -> None:
        queue = self._queue
        self._urgent += 1
        if not queue:
            self._oldest = self._clock.monotonic()
            queue.append(entry)
            if self._writer_idle:
                self._wake.set()  # start the interval timer
        else:
            queue.append(entry)
            if self._writer_idle and (
                self._urgent >= self._batch_size or len(queue) >= self._journal_trigger
            ):
                self._wake.set()
        self._enqueued += 1

    def _enqueue_durable(self, items: Sequence[IngestItem], first_lsn: int) -> None:
        """Queue journaled items (with their LSNs) for the database."""
        queue = self._queue
        if not queue:
            self._oldest = self._clock.monotonic()
            if self._writer_idle:
                self._wake.set()  # start the interval timer
        queue.extend(zip(items, range(first_lsn, first_lsn + len(items)), strict=True))
        self._enqueued += len(items)
        if self._writer_idle and len(queue) >= self._journal_trigger:
            self._wake.set()

    async def _wait_for_space(self) -> None:
        """Wait until one more item fits (back-pressure)."""
        timeout = self._put_timeout
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._space_waiters += 1
        self._bp_waits += 1
        try:
            while len(self._queue) + self._reserved >= self._max_queue:
                if self._state is not PipelineState.RUNNING:
                    msg = f"the write pipeline is {self._state.value}"
                    raise RouterClosedError(msg)
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise self._backpressure_timeout(timeout)
                if self._space is None:
                    self._space = loop.create_future()
                try:
                    async with asyncio.timeout(remaining):
                        await asyncio.shield(self._space)
                except TimeoutError:
                    raise self._backpressure_timeout(timeout) from None
            if self._state is not PipelineState.RUNNING:
                msg = f"the write pipeline is {self._state.value}"
                raise RouterClosedError(msg)
        finally:
            self._space_waiters -= 1

    def _backpressure_timeout(self, timeout: float | None) -> BackpressureTimeoutError:
        self._bp_timeouts += 1
        msg = (
            f"the write queue stayed full ({len(self._queue)}/{self._max_queue}) for "
            f"{timeout}s; the database is slow or down (circuit {self._breaker.state.value})"
        )
        return BackpressureTimeoutError(msg)

    def _release_space(self) -> None:
        space, self._space = self._space, None
        if space is not None and not space.done():
            space.set_result(None)

    async def _submit_journaled(self, item: IngestItem) -> None:
        journal = self._journal
        if journal is None:
            msg = "journal write mode needs a journal directory"
            raise ConfigurationError(msg)
        self._check_submit(item)
        if len(self._queue) + self._reserved >= self._max_queue or self._space_waiters:
            await self._wait_for_space()
        appending = self._appending
        given = item
        key = id(item)
        if key in appending:
            # The same object is already on its way (saved twice at once): journal an equal
            # copy, so that every call in flight is told apart by its own object's id.
            item = item.model_copy()
            key = id(item)
        self._reserved += 1
        appending.add(key)
        try:
            await journal.append((item,), on_durable=self._on_durable)
        except asyncio.CancelledError:
            if key in appending:
                self._release_if_lost(journal, item)  # the append goes on without this caller
            else:
                # Cancelled after its append was durable (a timeout firing as it returned):
                # it is queued for the database like any other, and its slot was released.
                # The caller learns it from took_despite_cancel (the data derived from it).
                self._accepted += 1
                self._cancelled_but_taken = given
            raise
        except BaseException:
            self._reserved -= 1  # _on_durable will not run for a failed append
            appending.discard(key)
            self._release_space()  # a caller may wait for this very slot
            raise
        self._accepted += 1

    def took_despite_cancel(self, item: IngestItem) -> bool:
        """Whether the cancelled :meth:`submit` of ``item`` that is unwinding right now had
        its item accepted (a ``journal`` append durable as the cancellation landed).

        Ask in the ``except asyncio.CancelledError`` around ``submit``, before any await:
        the answer concerns the call whose cancellation is propagating.
        """
        taken = self._cancelled_but_taken is item
        self._cancelled_but_taken = None
        return taken

    def _release_if_lost(self, journal: Journal, item: IngestItem) -> None:
        """Give a cancelled call's queue slot back if its append fails.

        If the append is kept, ``_on_durable`` releases the slot as usual; if it fails,
        nobody is told (the caller is gone), so a follow-up waits until every append
        requested so far has settled and releases the slot if ``_on_durable`` never saw
        the item.
        """
        self._cancelled[id(item)] = item

        async def follow_up() -> None:
            await journal.wait_idle()
            if self._cancelled.pop(id(item), None) is not None:
                self._reserved -= 1
                self._appending.discard(id(item))
                self._release_space()

        task = asyncio.get_running_loop().create_task(follow_up())
        self._followups.add(task)
        task.add_done_callback(self._followups.discard)

    def _on_durable(self, first_lsn: int, items: Sequence[IngestItem]) -> None:
        """Journal callback: the items are on disk; queue them (in LSN order)."""
        self._reserved -= len(items)
        self._appending.difference_update(map(id, items))
        # Callbacks run in LSN order, after any spill settled before them: the newest so far.
        self._journaled_lsn = first_lsn + len(items) - 1
        if self._cancelled:
            kept = [item for item in items if self._cancelled.pop(id(item), None) is not None]
            self._accepted += len(kept)  # their callers gave up, but the appends were kept
            if kept and self.on_kept_after_cancel is not None:
                for item in kept:
                    try:
                        self.on_kept_after_cancel(item)
                    except Exception:
                        logger.exception("write path: on_kept_after_cancel failed")
        own = self._journal
        if self._backlog and own is not None and not (self._queue or self._held is not None):
            # Backlog mode: the replay will read them from the journal. (With anything waiting
            # in memory they are queued too, below, to keep their place: buffered items go to
            # the journal after them, and an older upsert may be written once more; a newer
            # upsert must then be written again after it; see _to_write.)
            if self._backup is not None:
                self._backup.publish_batch(items)  # these never pass through _take_batch
            if own not in self._backlog:
                self._backlog.append(own)
            self.wake()
            return
        self._enqueue_durable(items, first_lsn)

    # ------------------------------------------------------------------ sync writes

    async def _write_now(self, item: IngestItem) -> None:
        started = time.perf_counter()
        await self._write_with_retry(type(item), [item])
        self._stored += 1
        self._accepted += 1
        self._record_batch(1, time.perf_counter() - started)

    async def _write_with_retry(self, kind: type[Any], items: list[Any]) -> None:
        """One storage call per attempt, through the breaker, retrying transient errors.

        Raises:
            CircuitBreakerOpenError: The breaker refused an attempt.
            RetryExhaustedError: Transient errors through every attempt (chained).
            QueryExecutionError, ValidationError: The database refused the data.
        """
        write = self._writers[kind]
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._retry_attempts),
            wait=_backoff(
                self._retry_initial,
                self._retry_max_backoff,
                self._retry_initial if self._retry_jitter is None else self._retry_jitter,
            ),
            retry=retry_if_exception_type(TRANSIENT_ERRORS),
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt(write, items)
        except TRANSIENT_ERRORS as exc:
            msg = (
                f"storing {len(items)} {kind.__name__} failed after "
                f"{self._retry_attempts} attempts: {exc}"
            )
            raise RetryExhaustedError(msg) from exc

    def _count_retry(self, state: RetryCallState) -> None:
        self._retries += 1

    async def _attempt(self, write: Callable[[Any], Awaitable[int]], items: list[Any]) -> None:
        breaker = self._breaker
        if not breaker.allow():
            msg = f"circuit {breaker.name} is open; not calling the database"
            raise CircuitBreakerOpenError(msg)
        probe = breaker.state is BreakerState.HALF_OPEN
        try:
            await write(items)
        except _REFUSED:
            breaker.record_success()  # it answered: the database is up, the data is bad
            raise
        except asyncio.CancelledError:
            if probe:
                breaker.release()  # our caller left: no answer either way
            raise
        except BaseException:
            breaker.record_failure()  # transient errors and bugs
            raise
        breaker.record_success()

    # ------------------------------------------------------------------ the writer

    async def _run(self) -> None:
        while True:
            try:
                await self._wait_for_work()
                now = self._clock.monotonic()
                if self._held is None and self._batch_due(now):
                    self._held = self._take_batch()
                    self._held_barrier = self._journaled_lsn
                    if self._backup is not None:
                        # Every accepted batch goes to the backup stream, whatever the
                        # database does with it (it is the backup for database outages).
                        self._backup.publish_batch(
                            [e[0] if type(e) is tuple else e for e in self._held]  # type: ignore[misc]
                        )
                if self._held is not None and now >= self._held_ready_at():
                    await self._place_held()
                if (
                    self._replay_wanted()
                    and self._clock.monotonic() >= self._retry_at
                    and self._breaker.state is not BreakerState.OPEN
                ):
                    await self._replay_step()
                if self._next_scan is not None and self._clock.monotonic() >= self._next_scan:
                    assert self._orphan_scan_interval is not None
                    self._next_scan = self._clock.monotonic() + self._orphan_scan_interval
                    await self.adopt_orphans()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug, not a database failure (those are handled below): keep the data
                # where it is, say so loudly, and try again a little later.
                self._writer_errors += 1
                logger.exception("write path: unexpected error in the writer; retrying")
                await asyncio.sleep(max(self._retry_max_backoff, 0.05))
            finally:
                self._notify_progress()

    def _batch_due(self, now: float) -> bool:
        n = len(self._queue)
        return bool(n) and (
            self._urgent >= self._batch_size
            or n >= self._journal_trigger
            or self._flush_target > self._taken
            or self._state is not PipelineState.RUNNING
            or now - self._oldest >= self._flush_interval
        )

    def _next_wakeup(self, now: float) -> float | None:
        """0 when there is work now, else seconds until there may be (None: no timer)."""
        waits: list[float] = []
        if self._held is not None:
            ready = self._held_ready_at()
            if now >= ready:
                return 0.0
            waits.append(ready - now)
        else:
            if self._batch_due(now):
                return 0.0
            if self._queue:
                waits.append(self._oldest + self._flush_interval - now)
        if self._replay_wanted():
            if now >= self._retry_at:
                if self._breaker.state is not BreakerState.OPEN:
                    return 0.0
                # Opened by someone else since; look again in a while.
                self._retry_at = now + max(self._breaker.reset_timeout, 0.001)
            waits.append(self._retry_at - now)
        if self._next_scan is not None:
            if now >= self._next_scan:
                return 0.0
            waits.append(self._next_scan - now)
        return min(waits) if waits else None

    async def _wait_for_work(self) -> None:
        while True:
            delay = self._next_wakeup(self._clock.monotonic())
            if delay == 0.0:
                return
            self._wake.clear()
            self._writer_idle = True
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            finally:
                self._writer_idle = False

    def _can_spill(self) -> bool:
        return self._journal is not None and self._journal.is_open

    def _held_ready_at(self) -> float:
        """When the batch in hand can next be placed: stored, or else journaled."""
        if not self._can_spill():
            return self._retry_at
        if self._older_backlog() or self._breaker.state is BreakerState.OPEN:
            return self._spill_retry_at
        return min(self._retry_at, self._spill_retry_at)

    def _older_backlog(self) -> bool:
        """Whether a journal in the backlog holds records older than the batch in hand.

        The batch then waits for the replay (it goes to the journal behind them), so that
        what was accepted first is stored first.
        """
        backlog = self._backlog
        if not backlog:
            return False
        own = self._journal
        return (
            len(backlog) > 1
            or backlog[0] is not own
            or own.stored_lsn < self._held_barrier
            or own in self._owed_checkpoints  # stored, but the file does not say so yet
        )

    def _replay_wanted(self) -> bool:
        """Whether the replay has work: any, or with a batch in hand, what is older.

        A batch in hand normally goes to the journal behind the backlog at once; it stays
        in hand only when that append failed (a full disk, say). The replay then goes on
        up to the batch, which is stored next, so a journal that cannot grow still drains.
        """
        return bool(self._backlog) and (self._held is None or self._older_backlog())

    def _take_batch(self) -> list[_Entry]:
        queue = self._queue
        n = min(len(queue), self._max_batch)
        batch = [queue.popleft() for _ in range(n)]
        self._taken += n
        if queue:
            self._urgent -= sum(1 for entry in batch if type(entry) is not tuple)
        else:
            self._urgent = 0
        # What is left (only past max_batch) keeps the old _oldest: flushed promptly.
        self._release_space()
        return batch

    async def _place_held(self) -> None:
        """Store the batch in hand, or journal it, or keep it (no journal, database down)."""
        batch = self._held
        assert batch is not None
        own = self._journal
        if (
            not self._older_backlog()
            and self._breaker.state is not BreakerState.OPEN
            and self._clock.monotonic() >= self._retry_at
        ):
            # Journal-mode entries the replay stored already are skipped.
            items, top_lsn = _to_write(
                batch, journaled_to=own.stored_lsn if own else 0, reorder_to=self._reorder_lsn
            )
            try:
                await self._store_batch(items)
            except _StoreFailed:
                pass
            else:
                if top_lsn and own is not None:
                    await own.mark_stored(top_lsn)
                if own is not None:
                    self._reorder_lsn = max(self._reorder_lsn, own.stored_lsn)
                self._held = None
                self._placed += len(batch)
                self._apply_barriers()
                return
        if own is not None and own.is_open:
            fresh = _to_journal(batch, self._overtaken)
            if fresh:
                # Shielded so that close() can tell whether a cancelled writer got it written.
                self._spill_items = fresh
                self._spill = asyncio.ensure_future(own.append(fresh))
                try:
                    last = await asyncio.shield(self._spill)
                except JournalError:
                    self._spill = None
                    logger.exception("write path: cannot journal a batch; holding it in memory")
                    self._spill_retry_at = self._clock.monotonic() + max(
                        self._breaker.reset_timeout, 0.1
                    )
                    return
                self._spill = None
                self._journaled_lsn = max(self._journaled_lsn, last)
                self._reorder_lsn = max(self._reorder_lsn, last - len(fresh))
                self._note_overtaken(fresh, last)
            self._spilled += len(fresh)
            if own not in self._backlog:
                logger.warning(
                    "write path: database unavailable; batches go to the journal %s", own.path
                )
                self._backlog.append(own)
            self._held = None
            self._placed += len(batch)
            self._apply_barriers()
            self._prune_overtaken()
            return
        # No journal: keep the batch and try again when the breaker lets a probe through.
        self._retry_at = self._clock.monotonic() + max(self._breaker.reset_timeout, 0.001)

    def _prune_overtaken(self) -> None:
        """Forget the overtaken keys no journal-mode version can be journaled below any more.

        A journal-mode entry is copied when its LSN is below its key's (see _to_journal).
        Journal-mode entries join the queue in LSN order, and all those appended before a
        spill have joined it once the spill is durable (the journal reports groups in LSN
        order before its callers resume); later ones are above every spill so far. So a key
        noted at or below the oldest queued journal-mode LSN can never cause a copy again:
        during a long outage the queue may never empty, and the keys (a new one per
        order-flow row or candle bucket) would otherwise pile up until it does.
        """
        overtaken = self._overtaken
        if not overtaken:
            return
        if self._queue and len(overtaken) < self._overtaken_prune_at:
            return  # the scan below is paid for by a doubling of the keys
        floor = next((entry[1] for entry in self._queue if type(entry) is tuple), None)
        if floor is None:
            overtaken.clear()  # no queued journal-mode version left to overtake
        else:
            for key in [key for key, first in overtaken.items() if first <= floor]:
                del overtaken[key]
        self._overtaken_prune_at = max(_OVERTAKEN_PRUNE_MIN, 2 * len(overtaken))

    def _note_overtaken(self, appended: list[IngestItem], last: int) -> None:
        """Note the upsert keys of ``appended``, journaled up to ``last`` (see _to_journal)."""
        first = last - len(appended) + 1
        overtaken = self._overtaken
        for item in appended:
            if type(item) is not TickData:
                key = _upsert_key(item)
                overtaken[key] = max(overtaken.get(key, 0), first)

    async def _store_batch(
        self, items: list[IngestItem], refused: list[tuple[bytes, BaseException]] | None = None
    ) -> None:
        """Store a mixed batch, isolating refused items.

        What is refused (``refused`` adds records that could not even be decoded) goes to
        the dead-letter file only once the whole batch is settled: a batch that fails now is
        placed again later as a whole, and its refused items must not be kept twice.

        Raises:
            _StoreFailed: Some of it could not be stored now (retry later, as a whole).
        """
        refused = [] if refused is None else refused
        undecodable = len(refused)  # not among items
        started = time.perf_counter()
        try:
            for kind, group, versions in _group(items):
                await self._store_isolating(kind, group, refused, versions)
        except (RetryExhaustedError, CircuitBreakerOpenError) as exc:
            self._store_failures += 1
            self._retry_at = self._clock.monotonic() + self._breaker_wait()
            self._log.warning(
                "batch-not-stored", "write path: batch of %d not stored: %s", len(items), exc
            )
            raise _StoreFailed from exc
        except Exception as exc:
            # Not a database answer but a bug: back off as if the breaker had opened, so
            # the writer does not spin on it.
            self._store_failures += 1
            self._retry_at = self._clock.monotonic() + max(self._breaker.reset_timeout, 0.1)
            self._log.exception(
                "storage-bug", "write path: unexpected storage error for a batch of %d", len(items)
            )
            raise _StoreFailed from exc
        if refused:
            await self._dead_letter(refused)
        if items:
            self._stored += len(items) - (len(refused) - undecodable)  # not the refused
            self._record_batch(len(items), time.perf_counter() - started)

    def _breaker_wait(self) -> float:
        """How long to leave the database alone after a failed batch."""
        state = self._breaker.state
        if state is BreakerState.OPEN:
            return max(self._breaker.reset_timeout, 0.001)
        if state is BreakerState.HALF_OPEN:
            # Someone else's probe is in flight: look again shortly rather than spin.
            return min(max(self._breaker.reset_timeout, 0.001), 0.1)
        return 0.0

    async def _store_isolating(
        self,
        kind: type[Any],
        items: list[Any],
        refused: list[tuple[bytes, BaseException]],
        versions: dict[int, list[Any]],
    ) -> None:
        """Write ``items``; on a refusal, split until the refused ones are alone (collected
        in ``refused``). A refused upsert that stood for other versions of its key in the
        batch (``versions``, see :func:`_group`) makes way for them."""
        try:
            await self._write_with_retry(kind, items)
        except _REFUSED as exc:
            if len(items) == 1:
                refused.append((encode_item(items[0]), exc))
                if versions:
                    await self._store_displaced(kind, items[0], versions, refused)
                return
            mid = len(items) // 2
            await self._store_isolating(kind, items[:mid], refused, versions)
            await self._store_isolating(kind, items[mid:], refused, versions)

    async def _store_displaced(
        self,
        kind: type[Any],
        item: Any,
        versions: dict[int, list[Any]],
        refused: list[tuple[bytes, BaseException]],
    ) -> None:
        """After the database refused ``item``, store what the batch's other versions of its
        key leave, as one upsert after another would have: the version :func:`_group` picks
        among them is written, and while that is refused too, the next one.

        Every version is then stored (the row holds it, or a version that supersedes it) or
        refused; one round trip per version refused, a cost only refusals pay.
        """
        rest = versions.pop(id(item), [])
        while True:
            rest = [version for version in rest if version is not item]
            if not rest:
                return
            ((_, (item,), _),) = _group(rest)
            try:
                await self._write_with_retry(kind, [item])
            except _REFUSED as exc:
                refused.append((encode_item(item), exc))
            else:
                return

    async def _dead_letter(self, refused: list[tuple[bytes, BaseException]]) -> None:
        """Keep refused items (the dead-letter file, else the log), each record once.

        A candle or order-flow upsert written again behind older versions (see
        :func:`_to_write`) is refused twice, as the journal's record and as its copy, when
        they are stored apart; a record identical to one kept recently is not kept again.
        """
        recent = self._recent_dead
        entries: list[tuple[bytes, str]] = []
        seen: set[bytes] = set()
        for payload, exc in refused:
            if payload in recent or payload in seen:
                continue
            seen.add(payload)
            entries.append((payload, f"{type(exc).__name__}: {exc}"))
        if len(entries) < len(refused):
            logger.info(
                "write path: %d refused record(s) were kept already",
                len(refused) - len(entries),
            )
        if not entries:
            return
        if self._dead_letters is None:
            for payload, reason in entries:
                logger.error(
                    "write path: refused item (no dead-letter file): %r (%s)", payload, reason
                )
            self._remember_dead(entries)
            return
        self._log.error(
            "refused-item",
            "write path: the database refused %d item(s); kept in %s: %s",
            len(entries),
            self._dead_letters.path,
            entries[0][1],
        )
        try:
            await self._dead_letters.write(entries, time_ms=self._clock.time_ms())
        except JournalError:
            # Logged in full instead; not remembered, so a later refusal tries the file again.
            logger.exception("write path: refused items could not be kept: %r", entries)
        else:
            self._remember_dead(entries)

    def _remember_dead(self, entries: list[tuple[bytes, str]]) -> None:
        """Count ``entries`` as kept and remember the newest ``_RECENT_DEAD_LETTERS``."""
        self._dead_lettered += len(entries)
        recent = self._recent_dead
        for payload, _ in entries[-_RECENT_DEAD_LETTERS:]:
            recent[payload] = None
        while len(recent) > _RECENT_DEAD_LETTERS:
            recent.popitem(last=False)

    async def _replay_step(self) -> None:
        """Store the next chunk of the oldest journal in the backlog."""
        journal = self._backlog[0]
        if journal in self._owed_checkpoints and not await self._pay_checkpoint(journal):
            return
        if journal.stored_lsn >= journal.last_lsn:
            await self._finish_backlog(journal)
            return
        limit = journal.last_lsn
        if self._held is not None and journal is self._journal:
            limit = min(limit, self._held_barrier)  # the batch in hand comes after these
        if limit <= journal.stored_lsn:
            return
        chunk = await journal.read(
            journal.stored_lsn, max_records=min(self._replay_batch, limit - journal.stored_lsn)
        )
        if chunk.end_lsn > limit:  # LSNs skip a gap (segments deleted before a crash)
            chunk = JournalBatch(records=[r for r in chunk.records if r[0] <= limit], end_lsn=limit)
        if not chunk.records and chunk.end_lsn <= journal.stored_lsn:
            # Records counted but not readable (files changed under us): say so, move on.
            # Only up to the limit: records appended since (during the read, say) are
            # readable, and in backlog mode this replay is the only way they are stored.
            logger.error(
                "write path: journal %s records %d..%d cannot be read; skipping them",
                journal.path,
                journal.stored_lsn + 1,
                limit,
            )
            await journal.mark_stored(limit)
            if journal.stored_lsn >= journal.last_lsn:
                await self._finish_backlog(journal)
            return
        items: list[IngestItem] = []
        undecodable: list[tuple[bytes, BaseException]] = []
        # Below a held checkpoint only the ticks are stored again: an upsert's newer version
        # may have been stored since (see Journal.hold_checkpoint).
        upserts_stored = journal.upserts_stored_lsn
        replays = journal.replays
        for start in range(0, len(chunk.records), _DECODE_SLICE):
            for lsn, payload in chunk.records[start : start + _DECODE_SLICE]:
                if not replays(lsn, payload):
                    continue
                try:
                    items.append(decode_item(payload))
                except ValidationError as exc:
                    if lsn > upserts_stored:  # a stored tick's damage is not news
                        undecodable.append((payload, exc))
            await asyncio.sleep(0)  # decoding is CPU work: let producers in between
        try:
            await self._store_batch(items, undecodable)
        except _StoreFailed:
            return
        # A chunk holding an upsert is checkpointed before anything else is written: a newer
        # version stored next without passing through this journal (a buffered one, once
        # the replay caught up) must not be overwritten by this replay again after a crash.
        # Nothing is written between the commit and the checkpoint (one writer task); a
        # crash in between replays the chunk over itself only. Until it is on disk the
        # checkpoint is owed: the journal keeps its place in the backlog (_older_backlog).
        if any(type(item) is not TickData for item in items):
            self._owed_checkpoints.add(journal)
        try:
            await journal.mark_stored(chunk.end_lsn)  # in memory (a file when one is due)
        except JournalError as exc:
            # Stored all the same: the mark holds in memory, the file (and deleting stored
            # segments) is retried as an owed checkpoint.
            self._owed_checkpoints.add(journal)
            logger.error("write path: cannot update journal %s (%s)", journal.path, exc)
        if journal is not self._journal:
            if self._backup is not None:
                # A dead instance acknowledged these; it may never have published them.
                self._backup.publish_batch(items)
            if self._observer is not None:
                self._observer.replayed(items)
        self._replayed += len(items)
        if journal in self._owed_checkpoints and not await self._pay_checkpoint(journal):
            return
        if journal.stored_lsn >= journal.last_lsn:
            await self._finish_backlog(journal)

    async def _pay_checkpoint(self, journal: Journal) -> bool:
        """Write ``journal``'s checkpoint now, as a replayed upsert needs (True when done).

        Until it is on disk the journal stays in the backlog, so new items keep going
        behind it into the journal: stored directly instead, a newer version of the upsert
        would be overwritten by the replay of the older after a crash.
        """
        if not journal.is_open:
            # Closed under us (a shutdown): closing wrote its final checkpoint, or could not
            # and said so; nothing is left to retry here.
            self._owed_checkpoints.discard(journal)
            return True
        try:
            await journal.mark_stored(journal.stored_lsn, durable=True)
        except JournalError as exc:
            logger.error(
                "write path: cannot write the checkpoint of journal %s (%s); keeping new "
                "writes behind it and trying again",
                journal.path,
                exc,
            )
            self._retry_at = self._clock.monotonic() + max(self._breaker.reset_timeout, 0.1)
            return False
        self._owed_checkpoints.discard(journal)
        return True

    async def _finish_backlog(self, journal: Journal) -> None:
        self._owed_checkpoints.discard(journal)
        if journal in self._backlog:
            self._backlog.remove(journal)
        if journal is self._journal:
            logger.info("write path: journal replay caught up; writing to the database again")
            return
        if self._observer is None:
            logger.info("write path: journal of %s replayed; removing it", journal.instance_id)
            await self._remove_adopted(journal)
            return
        logger.info("write path: journal of %s fully replayed", journal.instance_id)
        self._replayed_adopted.append(journal)
        if not any(j is not self._journal for j in self._backlog):
            self._observer.adopted_replayed()

    async def _remove_adopted(self, journal: Journal) -> None:
        """Close (and so remove) an adopted journal; its problems stay counted."""
        self._removed_problems += len(journal.problems)
        await journal.close()

    # ------------------------------------------------------------------ progress & stats

    def _record_batch(self, size: int, seconds: float) -> None:
        self._batches += 1
        self._batch_items += size
        self._last_batch = size
        self._max_batch_seen = max(self._max_batch_seen, size)
        self._flush_total += seconds
        self._flush_last = seconds
        self._flush_max = max(self._flush_max, seconds)
        self._batch_sizes.observe(size)
        self._flush_seconds.observe(seconds)

    def _notify_progress(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None and not progress.done():
            progress.set_result(None)

    def _flush_condition(self) -> Callable[[], bool]:
        """Snapshot what "everything accepted so far" means; return its test.

        Two phases: first every item queued before the call is placed (stored, refused or
        journaled); then every journal record written up to that moment is stored, which
        covers the batches journaled on the way.
        """
        target = self._enqueued
        own = self._journal
        others = [j for j in self._backlog if j is not own]
        self._flush_target = max(self._flush_target, target)
        self.wake()
        lsn_target: int | None = None

        def done() -> bool:
            nonlocal lsn_target
            if lsn_target is None:
                if self._placed < target:
                    return False
                lsn_target = own.last_lsn if own is not None else 0
            if own is not None and own.is_open and own.stored_lsn < lsn_target:
                if self._enqueued > self._flush_target:
                    # Journal-mode items acknowledged meanwhile hold LSNs up to the target:
                    # write them now instead of when their batch fills or its interval ends.
                    self._flush_target = self._enqueued
                    self.wake()
                return False
            return not any(j in self._backlog for j in others)

        return done

    async def _wait_progress(self, done: Callable[[], bool]) -> None:
        while not done():
            writer = self._writer
            if writer is None or writer.done():
                msg = "the write pipeline's writer is not running"
                raise RouterClosedError(msg)
            if self._progress is None:
                self._progress = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._progress)

    def _journal_records(self) -> int:
        journals = list(self._backlog)
        if self._journal is not None and self._journal not in journals:
            journals.append(self._journal)
        return sum(j.pending_records for j in journals)

    def stats(self) -> IngestStats:
        """Current counters (cheap; no I/O)."""
        own = self._journal
        # Replayed adopted journals still held count too (problems, bytes on disk).
        journals = [*self._backlog, *self._replayed_adopted, *self._kept_adopted]
        if own is not None and own not in journals:
            journals.append(own)
        return IngestStats(
            queue_depth=len(self._queue) + len(self._held or ()),
            queue_capacity=self._max_queue,
            accepted=self._accepted,
            stored=self._stored,
            batches=self._batches,
            batch_items=self._batch_items,
            last_batch_size=self._last_batch,
            max_batch_size=self._max_batch_seen,
            flush_seconds_total=self._flush_total,
            last_flush_seconds=self._flush_last,
            max_flush_seconds=self._flush_max,
            retries=self._retries,
            store_failures=self._store_failures,
            breaker_state=self._breaker.state.value,
            journal_records=sum(j.pending_records for j in journals),
            journal_bytes=sum(j.size_bytes for j in journals),
            journal_fsyncs=own.stats().fsyncs if own is not None else 0,
            spilled=self._spilled,
            replayed=self._replayed,
            backlog_journals=len(self._backlog),
            orphans_adopted=self._orphans_adopted,
            dead_lettered=self._dead_lettered,
            backpressure_waits=self._bp_waits,
            backpressure_timeouts=self._bp_timeouts,
            lost_on_close=self._lost,
            writer_errors=self._writer_errors,
            batch_size_histogram=self._batch_sizes.snapshot(),
            flush_seconds_histogram=self._flush_seconds.snapshot(),
            breaker_opens=self._breaker.opened_count,
            journal_problems=self._removed_problems + sum(len(j.problems) for j in journals),
        )


def _backoff(initial: float, cap: float, jitter: float) -> wait_exponential_jitter:
    """``initial * 2**n`` plus up to ``jitter`` random seconds, capped at ``cap``."""
    try:
        return wait_exponential_jitter(multiplier=initial, max=cap, jitter=jitter)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # tenacity < 9.1 calls it ``initial`` (9.1+ deprecates that name)
        return wait_exponential_jitter(initial=initial, max=cap, jitter=jitter)


_ALL_JOURNALED: Final = 1 << 62  # ``journaled_to`` meaning every journal-mode entry


def _to_write(
    batch: Sequence[_Entry], *, journaled_to: int, reorder_to: int
) -> tuple[list[IngestItem], int]:
    """The items of ``batch`` to write to the database, in order (a spill or close
    appends :func:`_to_journal`'s instead).

    Buffered entries are all written. A journal-mode entry with an LSN up to
    ``journaled_to`` is written elsewhere (the replay stored it, or it is in the journal
    already) and is skipped, unless it is a candle or order-flow upsert that items accepted
    before it may overtake: one that follows a buffered entry or such a copy in the batch,
    or one at or below ``reorder_to`` (earlier batches were journaled after it, or stored
    after its replay). Such an upsert is written once more, in its place, so the older
    version cannot overwrite it. Ticks are never overwritten, so their order does not
    matter.

    Returns:
        The items, and the highest LSN among the journal-mode entries written (0: none).
    """
    items: list[IngestItem] = []
    top_lsn = 0
    behind = False  # something older was written in this batch: upserts after it follow
    for entry in batch:
        if type(entry) is tuple:
            item, lsn = entry
            if lsn > journaled_to:
                top_lsn = lsn
                items.append(item)
            elif (behind or lsn <= reorder_to) and type(item) is not TickData:
                items.append(item)
                behind = True  # a copy of an older version: newer ones go after it too
        else:
            behind = True
            items.append(entry)  # type: ignore[arg-type]
    return items, top_lsn


def _upsert_key(item: IngestItem) -> tuple[Any, ...]:
    """The row a candle or order-flow item upserts."""
    if type(item) is CandleData:
        return ("c", item.symbol, item.timeframe, item.source, item.timestamp)
    flow: OrderFlowMetrics = item  # type: ignore[assignment]
    return ("o", flow.symbol, flow.source, flow.timestamp, flow.window_ms)


def _to_journal(batch: Sequence[_Entry], overtaken: dict[Any, int]) -> list[IngestItem]:
    """The items of ``batch`` to append to the journal (a spill, or what close leaves).

    Buffered entries are all appended. A journal-mode entry is in the journal already and is
    appended once more only when the ordering needs it: it is a candle or order-flow upsert
    and a buffered version of its key lands in the journal after it, earlier in this batch
    or in an earlier append (``overtaken``: key -> first LSN of that append). A copy for any
    other reason could land behind a newer version of the key journaled meanwhile (queued,
    or still being synced), and a replay after a crash would end on the copy.
    """
    items: list[IngestItem] = []
    behind: set[tuple[Any, ...]] = set()  # keys with a buffered version appended here
    for entry in batch:
        if type(entry) is tuple:
            item, lsn = entry
            if type(item) is TickData:
                continue
            key = _upsert_key(item)
            if key in behind or lsn < overtaken.get(key, 0):
                items.append(item)
                behind.add(key)  # later versions of the key in the batch follow the copy
        else:
            items.append(entry)  # type: ignore[arg-type]
            if type(entry) is not TickData:
                behind.add(_upsert_key(entry))  # type: ignore[arg-type]
    return items


def _group(
    items: list[IngestItem],
) -> list[tuple[type[Any], list[Any], dict[int, list[Any]]]]:
    """Split a mixed batch by kind (ticks, candles, order flow), keeping order.

    Candles and order-flow rows are upserts: within one batch only the last version of a key
    matters (and a forming candle never replaces a closed one, as in storage), so earlier
    versions are dropped here rather than sent; it also keeps one statement from touching
    the same row twice.

    Returns:
        ``(kind, items, versions)`` per kind present, where ``versions`` maps the ``id`` of
        each item sent for a key the batch holds more than once to every version of that
        key, in order: should the database refuse the one sent, the others are still due
        (see ``IngestPipeline._store_displaced``).
    """
    ticks: list[TickData] = []
    candles: dict[tuple[str, str, str, int], CandleData] = {}
    flows: dict[tuple[str, str, int, int], OrderFlowMetrics] = {}
    # Keys met more than once, with all their versions (rare: no cost for the others).
    repeated_candles: dict[tuple[str, str, str, int], list[CandleData]] = {}
    repeated_flows: dict[tuple[str, str, int, int], list[OrderFlowMetrics]] = {}
    for item in items:
        cls = type(item)
        if cls is TickData:
            ticks.append(item)  # type: ignore[arg-type]
        elif cls is CandleData:
            candle: CandleData = item  # type: ignore[assignment]
            key = (candle.symbol, candle.timeframe, candle.source, candle.timestamp)
            seen = candles.get(key)
            if seen is None:
                candles[key] = candle
                continue
            _add_version(repeated_candles, key, seen, candle)
            if candle.is_closed or not seen.is_closed:
                candles[key] = candle
        else:
            flow: OrderFlowMetrics = item  # type: ignore[assignment]
            flow_key = (flow.symbol, flow.source, flow.timestamp, flow.window_ms)
            seen_flow = flows.get(flow_key)
            if seen_flow is not None:
                _add_version(repeated_flows, flow_key, seen_flow, flow)
            flows[flow_key] = flow
    out: list[tuple[type[Any], list[Any], dict[int, list[Any]]]] = []
    if ticks:
        out.append((TickData, ticks, {}))
    if candles:
        versions: dict[int, list[Any]] = {id(candles[k]): v for k, v in repeated_candles.items()}
        out.append((CandleData, list(candles.values()), versions))
    if flows:
        versions = {id(flows[k]): v for k, v in repeated_flows.items()}
        out.append((OrderFlowMetrics, list(flows.values()), versions))
    return out


def _add_version(repeated: dict[Any, list[Any]], key: Any, seen: Any, version: Any) -> None:
    """Note ``version`` of ``key``, met before as ``seen`` (its only version until now when
    the key is not in ``repeated`` yet)."""
    known = repeated.get(key)
    if known is None:
        repeated[key] = [seen, version]
    else:
        known.append(version)
