"""The write-behind batcher: triggers, group commit, back-pressure, failures, replay."""

from __future__ import annotations

import asyncio
import errno
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from data_manager import ingest
from data_manager.breaker import BreakerState, CircuitBreaker
from data_manager.clock import ManualClock
from data_manager.errors import (
    BackpressureTimeoutError,
    CircuitBreakerOpenError,
    ConfigurationError,
    DatabaseConnectionError,
    JournalError,
    QueryExecutionError,
    QueryTimeoutError,
    RetryExhaustedError,
    RouterClosedError,
    ValidationError,
)
from data_manager.ingest import IngestPipeline, PipelineState
from data_manager.journal import (
    DEAD_LETTER_DIR,
    DeadLetterFile,
    Journal,
    JournalBatch,
    JournalLockedError,
)
from data_manager.models import CandleData, OrderFlowMetrics, TickData
from data_manager.storage.base import tick_content_key
from tests.unit.conftest import WAIT

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from data_manager.settings import JournalSync

T0 = 1_727_996_400_000


def tick(seq: int, *, symbol: str = "EUR/USD") -> TickData:
    return TickData(symbol=symbol, timestamp=T0 + seq, bid=1.1, ask=1.1002, source="test", seq=seq)


def candle(minute: int, close: float, *, is_closed: bool = True) -> CandleData:
    return CandleData(
        symbol="EUR/USD",
        timeframe="1m",
        timestamp=T0 + minute * 60_000,
        open=1.0,
        high=2.0,
        low=0.5,
        close=close,
        source="test",
        is_closed=is_closed,
    )


def flow(window: int, *, ofi: float = 1.0) -> OrderFlowMetrics:
    return OrderFlowMetrics(symbol="EUR/USD", timestamp=T0, window_ms=window, ofi=ofi)


class FakeStorage:
    """An idempotent in-memory store that can be told to fail, refuse or stall."""

    kind = "fake"
    target = "fake"

    def __init__(self) -> None:
        self.ticks: dict[tuple[str, str, int, int], TickData] = {}
        self.candles: dict[tuple[str, str, str, int], CandleData] = {}
        self.flows: dict[tuple[str, str, int, int], OrderFlowMetrics] = {}
        self.calls: list[tuple[str, list[Any]]] = []  # successful writes, in order
        self.attempts = 0
        self.down = False  # every call raises DatabaseConnectionError
        self.fail_next = 0  # that many calls raise DatabaseConnectionError
        self.refuse: Callable[[Any], bool] = lambda item: False
        self.gate: asyncio.Event | None = None  # when set up, writes wait for it
        self.entered = asyncio.Event()  # set when a write reaches the gate
        self._changed = asyncio.Event()

    async def _enter(self, items: Sequence[Any]) -> None:
        self.attempts += 1
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        if self.down:
            raise DatabaseConnectionError("fake database is down")
        if self.fail_next:
            self.fail_next -= 1
            raise DatabaseConnectionError("fake transient failure")
        if any(self.refuse(i) for i in items):
            raise QueryExecutionError("fake database refused a row")

    def _done(self, kind: str, items: Sequence[Any]) -> None:
        self.calls.append((kind, list(items)))
        self._changed.set()

    async def write_ticks(self, ticks: Sequence[TickData]) -> int:
        await self._enter(ticks)
        for t in ticks:
            self.ticks[(t.symbol, t.source, t.timestamp, tick_content_key(t))] = t
        self._done("ticks", ticks)
        return len(ticks)

    async def write_candles(self, candles: Sequence[CandleData]) -> int:
        await self._enter(candles)
        for c in candles:
            self.candles[(c.symbol, c.timeframe, c.source, c.timestamp)] = c
        self._done("candles", candles)
        return len(candles)

    async def write_order_flow(self, metrics: Sequence[OrderFlowMetrics]) -> int:
        await self._enter(metrics)
        for m in metrics:
            self.flows[(m.symbol, m.source, m.timestamp, m.window_ms)] = m
        self._done("order_flow", metrics)
        return len(metrics)

    async def wait_ticks(self, n: int) -> None:
        """Wait until ``n`` distinct ticks are stored (an event, never a sleep)."""
        while len(self.ticks) < n:
            self._changed.clear()
            await self._changed.wait()

    def stored_seqs(self) -> list[int]:
        return sorted(t.seq for t in self.ticks.values() if t.seq is not None)

    def call_sizes(self) -> list[int]:
        return [len(items) for _, items in self.calls]


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until ``condition`` holds (never a timed sleep).

    Bounded by a deadline, not a number of turns: what it waits for may run in a worker
    thread (opening an adopted journal, say), which a busy machine can hold up for seconds.
    """
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0)


def hold_group_syncs(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make each journal group's sync (thread and in-loop committers) wait for ``release``;
    ``entered`` is set when one starts waiting."""
    entered, release = threading.Event(), threading.Event()
    real_sync = Journal._sync_group

    def slow_sync(journal: Journal, written: Any) -> int:
        if written is not None:
            entered.set()
            assert release.wait(WAIT)
        return real_sync(journal, written)

    monkeypatch.setattr(Journal, "_sync_group", slow_sync)
    return entered, release


def database_back(
    storage: FakeStorage, clock: ManualClock, breaker: CircuitBreaker, pipeline: IngestPipeline
) -> None:
    """The database answers again and the breaker's probe is due: wake the writer."""
    storage.down = False
    clock.advance(breaker.reset_timeout)
    pipeline.wake()


async def settle() -> None:
    """Let every ready task run (asserting that something did *not* happen)."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def storage() -> FakeStorage:
    return FakeStorage()


@pytest.fixture
def breaker(clock: ManualClock) -> CircuitBreaker:
    return CircuitBreaker("database", failure_threshold=2, reset_timeout=5.0, clock=clock)


@pytest.fixture
async def make(
    storage: FakeStorage, clock: ManualClock, breaker: CircuitBreaker, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """Build started pipelines with zero backoff; close them all afterwards."""
    made: list[IngestPipeline] = []

    async def build(
        *, journal: bool | str = True, sync: JournalSync = "auto", **kwargs: Any
    ) -> IngestPipeline:
        j = None
        if journal:
            name = journal if isinstance(journal, str) else f"inst{len(made)}"
            j = Journal(tmp_path / "journal", instance_id=name, sync=sync)
        options: dict[str, Any] = {
            "batch_size": 10,
            "flush_interval": 1.0,
            "max_batch": 1_000,
            "retry_attempts": 2,
            "retry_initial": 0.0,
            "retry_max_backoff": 0.0,
            "retry_jitter": 0.0,
            "breaker": breaker,
            "clock": clock,
            "orphan_scan_interval": None,
            **kwargs,
        }
        pipeline = IngestPipeline(kwargs.pop("storage", storage), journal=j, **options)
        await pipeline.start()
        made.append(pipeline)
        return pipeline

    yield build
    for pipeline in made:
        await pipeline.close(timeout=5)


# --------------------------------------------------------------------------- triggers


async def test_batch_size_triggers_a_flush(make: Any, storage: FakeStorage) -> None:
    pipeline = await make()
    for i in range(9):
        await pipeline.submit(tick(i))
    await settle()
    assert storage.calls == []  # below the batch size, before the interval
    await pipeline.submit(tick(9))
    await storage.wait_ticks(10)
    assert storage.call_sizes() == [10]


async def test_journal_mode_items_wait_for_the_journal_batch_size(
    make: Any, storage: FakeStorage
) -> None:
    pipeline = await make(batch_size=10, journal_batch_size=30)
    await asyncio.gather(*(pipeline.submit(tick(i), mode="journal") for i in range(29)))
    await settle()
    assert storage.calls == []  # past batch_size, but already on disk: no hurry
    await pipeline.submit(tick(29), mode="journal")
    await storage.wait_ticks(30)
    assert storage.call_sizes() == [30]


async def test_buffered_items_keep_their_batch_size_beside_journal_items(
    make: Any, storage: FakeStorage
) -> None:
    pipeline = await make(batch_size=10, journal_batch_size=100, max_batch=60)
    await asyncio.gather(*(pipeline.submit(tick(i), mode="journal") for i in range(35)))
    for i in range(35, 44):
        await pipeline.submit(tick(i))
    await settle()
    assert storage.calls == []  # 9 buffered items, below batch_size; 44 in all, below 60
    await pipeline.submit(tick(44))
    await storage.wait_ticks(45)
    assert storage.call_sizes() == [45]  # the batch takes everything queued


async def test_what_a_capped_batch_leaves_counts_toward_the_batch_size(
    make: Any, storage: FakeStorage
) -> None:
    pipeline = await make(batch_size=10, journal_batch_size=100, max_batch=40)
    storage.gate = asyncio.Event()
    for i in range(10):
        await pipeline.submit(tick(i))
    await storage.entered.wait()  # the writer is inside the first write
    await asyncio.gather(*(pipeline.submit(tick(i), mode="journal") for i in range(10, 45)))
    for i in range(45, 54):
        await pipeline.submit(tick(i))
    storage.gate.set()
    await until(lambda: len(storage.calls) == 2)
    assert storage.call_sizes() == [10, 40]  # 35 journaled + 5 buffered; 4 buffered left
    for i in range(54, 59):
        await pipeline.submit(tick(i))
    await settle()
    assert len(storage.calls) == 2  # 9 buffered queued: below batch_size
    await pipeline.submit(tick(59))
    await storage.wait_ticks(60)
    assert storage.call_sizes() == [10, 40, 10]


async def test_flush_interval_triggers_a_flush(
    make: Any, storage: FakeStorage, clock: ManualClock
) -> None:
    pipeline = await make(batch_size=100, flush_interval=1.0)
    for i in range(3):
        await pipeline.submit(tick(i))
    clock.advance(0.9)
    pipeline.wake()
    await settle()
    assert storage.calls == []
    clock.advance(0.1)
    pipeline.wake()
    await storage.wait_ticks(3)
    assert storage.call_sizes() == [3]


async def test_group_commit_takes_what_arrived_during_the_last_write(
    make: Any, storage: FakeStorage
) -> None:
    pipeline = await make(batch_size=1, max_batch=30)
    storage.gate = asyncio.Event()
    await pipeline.submit(tick(0))
    await storage.entered.wait()  # the writer is inside the first write
    for i in range(1, 51):
        await pipeline.submit(tick(i))
    storage.gate.set()
    await pipeline.flush()
    assert storage.call_sizes() == [1, 30, 20]  # grown to what queued, capped by max_batch
    assert storage.stored_seqs() == list(range(51))
    stats = pipeline.stats()
    assert (stats.batches, stats.max_batch_size, stats.batch_items) == (3, 30, 51)


async def test_flush_returns_when_everything_accepted_is_stored(
    make: Any, storage: FakeStorage
) -> None:
    pipeline = await make(batch_size=1_000, flush_interval=3600)
    for i in range(25):
        await pipeline.submit(tick(i))
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(25))
    assert pipeline.stats().queue_depth == 0


async def test_mixed_kinds_are_grouped_per_kind_and_upserts_deduplicated(
    make: Any, storage: FakeStorage
) -> None:
    pipeline = await make(batch_size=100)
    await pipeline.submit(tick(1))
    await pipeline.submit(candle(0, 1.1, is_closed=False))
    await pipeline.submit(flow(1000))
    await pipeline.submit(candle(0, 1.2, is_closed=True))
    await pipeline.submit(candle(0, 1.3, is_closed=False))  # late forming: must not win
    await pipeline.submit(flow(1000))
    await pipeline.submit(tick(2))
    await pipeline.flush()
    kinds = [(kind, len(items)) for kind, items in storage.calls]
    assert kinds == [("ticks", 2), ("candles", 1), ("order_flow", 1)]
    (stored,) = storage.candles.values()
    assert (stored.close, stored.is_closed) == (1.2, True)


# --------------------------------------------------------------------------- back-pressure


async def test_full_queue_raises_after_put_timeout(make: Any, storage: FakeStorage) -> None:
    pipeline = await make(batch_size=1, max_queue=5, put_timeout=0)
    storage.gate = asyncio.Event()
    await pipeline.submit(tick(0))
    await storage.entered.wait()  # writer holds tick 0; the queue is empty
    for i in range(1, 6):
        await pipeline.submit(tick(i))
    with pytest.raises(BackpressureTimeoutError):
        await pipeline.submit(tick(6))
    stats = pipeline.stats()
    assert (stats.backpressure_timeouts, stats.accepted) == (1, 6)
    storage.gate.set()
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(6))  # everything accepted, nothing else


async def test_full_queue_makes_submit_wait_until_there_is_room(
    make: Any, storage: FakeStorage
) -> None:
    pipeline = await make(batch_size=1, max_queue=5, put_timeout=None)
    storage.gate = asyncio.Event()
    await pipeline.submit(tick(0))
    await storage.entered.wait()
    for i in range(1, 6):
        await pipeline.submit(tick(i))
    blocked = asyncio.create_task(pipeline.submit(tick(6)))
    await settle()
    assert not blocked.done()
    assert pipeline.stats().backpressure_waits == 1
    storage.gate.set()
    await blocked
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(7))


async def test_submit_nowait_never_waits_nor_drops(make: Any, storage: FakeStorage) -> None:
    pipeline = await make(batch_size=1, max_queue=2)
    storage.gate = asyncio.Event()
    await pipeline.submit(tick(0))
    await storage.entered.wait()
    for i in range(1, 5):
        pipeline.submit_nowait(tick(i))  # past max_queue: derived items are never refused
    assert pipeline.stats().queue_depth == 5
    storage.gate.set()
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(5))


# --------------------------------------------------------------------------- sync mode


async def test_sync_mode_returns_after_commit(make: Any, storage: FakeStorage) -> None:
    pipeline = await make()
    await pipeline.submit(tick(1), mode="sync")
    assert storage.stored_seqs() == [1]


async def test_sync_mode_retries_transient_errors(
    make: Any, storage: FakeStorage, breaker: CircuitBreaker
) -> None:
    breaker.failure_threshold = 3
    pipeline = await make(retry_attempts=3)
    storage.fail_next = 2
    await pipeline.submit(tick(1), mode="sync")
    assert storage.stored_seqs() == [1]
    assert pipeline.stats().retries == 2


async def test_sync_mode_raises_retry_exhausted_chained(
    make: Any, storage: FakeStorage, breaker: CircuitBreaker
) -> None:
    breaker.failure_threshold = 100
    pipeline = await make(retry_attempts=3)
    storage.down = True
    with pytest.raises(RetryExhaustedError) as info:
        await pipeline.submit(tick(1), mode="sync")
    assert isinstance(info.value.__cause__, DatabaseConnectionError)
    assert storage.attempts == 3


async def test_sync_mode_raises_when_breaker_is_open(
    make: Any, storage: FakeStorage, breaker: CircuitBreaker
) -> None:
    pipeline = await make()
    for _ in range(breaker.failure_threshold):
        breaker.record_failure()
    with pytest.raises(CircuitBreakerOpenError):
        await pipeline.submit(tick(1), mode="sync")
    assert storage.attempts == 0


async def test_sync_mode_surfaces_refused_data(make: Any, storage: FakeStorage) -> None:
    pipeline = await make()
    storage.refuse = lambda item: True
    with pytest.raises(QueryExecutionError):
        await pipeline.submit(tick(1), mode="sync")
    assert storage.attempts == 1  # a refusal is not retried


# --------------------------------------------------------------------------- failures


async def test_transient_errors_are_retried_for_batches(
    make: Any, storage: FakeStorage, breaker: CircuitBreaker
) -> None:
    breaker.failure_threshold = 3
    pipeline = await make(retry_attempts=3)
    storage.fail_next = 2
    for i in range(10):
        await pipeline.submit(tick(i))
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(10))
    stats = pipeline.stats()
    assert (stats.retries, stats.spilled, stats.breaker_state) == (2, 0, "closed")


async def test_open_breaker_sends_batches_to_the_journal_then_replays_in_order(
    make: Any, storage: FakeStorage, clock: ManualClock, breaker: CircuitBreaker
) -> None:
    pipeline = await make(batch_size=5)
    storage.down = True
    for i in range(5):
        await pipeline.submit(tick(i))
    # The first batch fails twice (retry_attempts=2 = threshold) and opens the breaker.
    await until(lambda: pipeline.stats().spilled == 5)
    assert breaker.state is BreakerState.OPEN
    attempts = storage.attempts
    for i in range(5, 23):
        await pipeline.submit(tick(i))
    await until(lambda: pipeline.stats().spilled == 23)  # group commit: one more batch
    stats = pipeline.stats()
    assert storage.attempts == attempts  # open breaker: the database is left alone
    assert stats.journal_records == 23
    assert stats.journal_bytes > 0
    assert stats.queue_depth == 0  # memory does not pile up

    storage.down = False
    clock.advance(breaker.reset_timeout)
    await pipeline.submit(tick(23))
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(24))
    written = [t.seq for kind, items in storage.calls for t in items]
    assert written == list(range(24))  # replayed in order, new writes after
    stats = pipeline.stats()
    assert (stats.breaker_state, stats.journal_records, stats.backlog_journals) == (
        "closed",
        0,
        0,
    )
    assert stats.replayed == 24


async def test_new_writes_continue_while_the_journal_is_replayed(
    make: Any, storage: FakeStorage, clock: ManualClock, breaker: CircuitBreaker
) -> None:
    pipeline = await make(batch_size=5, replay_batch=3)
    storage.down = True
    for i in range(10):
        await pipeline.submit(tick(i))
    await until(lambda: pipeline.stats().spilled == 10)
    storage.down = False
    clock.advance(breaker.reset_timeout)
    storage.gate = asyncio.Event()
    pipeline.wake()
    await storage.entered.wait()  # the first replay chunk is being written
    for i in range(10, 30):
        await pipeline.submit(tick(i))  # accepted while replaying
    storage.gate.set()
    await pipeline.flush()
    written = [t.seq for kind, items in storage.calls for t in items]
    assert written == list(range(30))
    assert [len(items) for _, items in storage.calls][:4] == [3, 3, 3, 3]


async def test_without_journal_an_open_breaker_keeps_batches_in_memory(
    make: Any, storage: FakeStorage, clock: ManualClock, breaker: CircuitBreaker
) -> None:
    pipeline = await make(journal=False, batch_size=5, max_queue=10, put_timeout=0)
    storage.down = True
    for i in range(5):
        await pipeline.submit(tick(i))
    await until(lambda: breaker.state is BreakerState.OPEN)
    for i in range(5, 15):
        await pipeline.submit(tick(i))
    with pytest.raises(BackpressureTimeoutError):
        await pipeline.submit(tick(15))  # full: pushes back, never drops
    assert pipeline.stats().queue_depth == 15
    database_back(storage, clock, breaker, pipeline)
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(15))


async def test_refused_item_is_isolated_and_dead_lettered(
    make: Any, storage: FakeStorage, tmp_path: Path
) -> None:
    pipeline = await make(batch_size=20, journal="poison")
    storage.refuse = lambda item: getattr(item, "seq", None) == 13
    for i in range(20):
        await pipeline.submit(tick(i))
    await pipeline.flush()
    assert storage.stored_seqs() == [i for i in range(20) if i != 13]
    stats = pipeline.stats()
    assert (stats.dead_lettered, stats.breaker_state) == (1, "closed")
    assert stats.stored == 19  # the refused one is not counted as stored
    lines = (tmp_path / "journal" / DEAD_LETTER_DIR / "poison.jsonl").read_bytes().splitlines()
    (record,) = [orjson.loads(line) for line in lines]
    assert record["kind"] == "tick"
    assert record["data"]["seq"] == 13
    assert "QueryExecutionError" in record["reason"]
    # The queue is not wedged.
    await pipeline.submit(tick(100))
    await pipeline.flush()
    assert 100 in storage.stored_seqs()


async def test_a_refused_candle_leaves_the_version_it_displaced_in_its_batch(
    make: Any, storage: FakeStorage, tmp_path: Path
) -> None:
    # The closed version wins the batch over the forming ones around it; refused, it makes
    # way for the newest forming one, refused too, then for the first.
    storage.refuse = lambda item: item.close in (1.5, 2.0)
    pipeline = await make(batch_size=3, journal="refusing")
    await pipeline.submit(candle(0, 1.0, is_closed=False))
    await pipeline.submit(candle(0, 1.5, is_closed=True))
    await pipeline.submit(candle(0, 2.0, is_closed=False))
    await pipeline.flush(timeout=WAIT)
    (stored,) = storage.candles.values()
    assert (stored.close, stored.is_closed) == (1.0, False)
    assert pipeline.stats().dead_lettered == 2
    lines = (tmp_path / "journal" / DEAD_LETTER_DIR / "refusing.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["data"]["close"] for line in lines] == [1.5, 2.0]


async def test_a_refused_order_flow_row_leaves_the_version_it_displaced_in_its_batch(
    make: Any, storage: FakeStorage
) -> None:
    storage.refuse = lambda item: item.ofi == 2.0
    pipeline = await make(batch_size=4)
    for ofi in (1.0, 2.0):
        await pipeline.submit(flow(1000, ofi=ofi))
        await pipeline.submit(flow(2000, ofi=ofi + 2))  # another key, stored as it is
    await pipeline.flush(timeout=WAIT)
    assert sorted(m.ofi for m in storage.flows.values()) == [1.0, 4.0]
    assert pipeline.stats().dead_lettered == 1


async def test_every_distinct_refused_record_is_kept_past_the_remembered_ones(
    make: Any, storage: FakeStorage, tmp_path: Path
) -> None:
    n = 4_200  # more than the 4,096 records remembered against keeping one twice
    pipeline = await make(batch_size=n, max_batch=n, journal="poison")
    storage.refuse = lambda item: True
    for i in range(n):
        pipeline.submit_nowait(tick(i))
    await pipeline.flush(timeout=WAIT)
    assert pipeline.stats().dead_lettered == n
    lines = (tmp_path / "journal" / DEAD_LETTER_DIR / "poison.jsonl").read_bytes().splitlines()
    assert sorted(orjson.loads(line)["data"]["seq"] for line in lines) == list(range(n))


async def test_a_refused_record_the_file_could_not_take_is_kept_when_refused_again(
    make: Any, storage: FakeStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = await make(batch_size=1, journal="poison")
    storage.refuse = lambda item: True
    real_write = DeadLetterFile.write

    async def full_disk(self: DeadLetterFile, *args: Any, **kwargs: Any) -> None:
        raise JournalError("No space left on device")

    monkeypatch.setattr(DeadLetterFile, "write", full_disk)
    await pipeline.submit(tick(7))
    await pipeline.flush(timeout=WAIT)
    assert pipeline.stats().dead_lettered == 0  # logged in full, not kept, not remembered

    monkeypatch.setattr(DeadLetterFile, "write", real_write)
    await pipeline.submit(tick(7))  # the same record, refused again
    await pipeline.flush(timeout=WAIT)
    assert pipeline.stats().dead_lettered == 1
    lines = (tmp_path / "journal" / DEAD_LETTER_DIR / "poison.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["data"]["seq"] for line in lines] == [7]


# --------------------------------------------------------------------------- journal mode


async def test_journal_mode_group_fsync_and_checkpoint(make: Any, storage: FakeStorage) -> None:
    pipeline = await make(batch_size=1_000)
    await asyncio.gather(*(pipeline.submit(tick(i), mode="journal") for i in range(64)))
    journal = pipeline.journal
    assert journal is not None
    assert journal.last_lsn == 64
    assert pipeline.stats().journal_fsyncs < 64  # concurrent callers shared syncs
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(64))
    assert journal.stored_lsn == 64
    assert pipeline.stats().journal_records == 0


class Observer:
    """A router's view of dead instances' journals (see ``hold_for_derived``)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.items: list[Any] = []

    def adopted(self) -> None:
        self.calls.append("adopted")

    def replayed(self, items: Sequence[Any]) -> None:
        self.calls.append("replayed")
        self.items.extend(items)

    def adopted_replayed(self) -> None:
        self.calls.append("adopted_replayed")


async def reopened_pending(folder: Path, instance: str) -> int:
    """Records a journal left to replay (it is opened and closed again)."""
    journal = Journal(folder, instance_id=instance)
    await journal.open(create=False)
    try:
        return journal.pending_records
    finally:
        await journal.close()


async def test_held_checkpoint_keeps_stored_ticks_until_their_derived_data_is_placed(
    make: Any, storage: FakeStorage, tmp_path: Path
) -> None:
    # Stored ticks stay in the journal while the data derived from them is not placed: a
    # crash leaves them to the next router, which rebuilds their candles.
    pipeline = await make(journal="held", batch_size=1_000)
    pipeline.hold_for_derived(Observer())
    for i in range(5):
        await pipeline.submit(tick(i), mode="journal")
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(5))
    await pipeline.close(timeout=5)  # no barrier: their candles were never queued
    assert await reopened_pending(tmp_path / "journal", "held") == 5


async def test_a_placed_derived_barrier_frees_the_journal(
    make: Any, storage: FakeStorage, tmp_path: Path
) -> None:
    pipeline = await make(journal="freed", batch_size=1_000)
    pipeline.hold_for_derived(Observer())
    for i in range(5):
        await pipeline.submit(tick(i), mode="journal")
    pipeline.submit_nowait(candle(1, 1.2))
    pipeline.derived_barrier(5)
    await pipeline.flush()  # the candle is stored: the checkpoint may pass the ticks
    await pipeline.close(timeout=5)
    assert not (tmp_path / "journal" / "freed").exists()  # nothing left to replay


async def adopt_and_report(storage: FakeStorage, clock: ManualClock, folder: Path) -> Observer:
    """A pipeline holding for derived data adopts the journals in ``folder``, replays them
    and closes; what it told its observer."""
    observer = Observer()
    pipeline = IngestPipeline(
        storage,
        journal=Journal(folder, instance_id="alive"),
        clock=clock,
        orphan_scan_interval=None,
    )
    pipeline.hold_for_derived(observer)
    await pipeline.start()
    try:
        await pipeline.flush()
    finally:
        await pipeline.close(timeout=5)
    return observer


async def test_replay_of_a_dead_instances_journal_is_reported(
    storage: FakeStorage, clock: ManualClock, tmp_path: Path
) -> None:
    folder = tmp_path / "journal"
    dead = Journal(folder, instance_id="dead")
    await dead.open()
    await dead.append([tick(1), tick(2), candle(1, 1.2)])
    await dead.close()  # not stored: an orphan with three records to replay
    observer = await adopt_and_report(storage, clock, folder)
    assert observer.calls == ["adopted", "replayed", "adopted_replayed"]
    assert observer.items == [tick(1), tick(2), candle(1, 1.2)]


async def test_below_a_held_checkpoint_only_ticks_are_replayed(
    storage: FakeStorage, clock: ManualClock, tmp_path: Path
) -> None:
    # A dead router stored a tick and a candle, then a newer version of the candle (not
    # through its journal); its checkpoint was held below both records. The replay stores
    # the tick again (its candles are rebuilt from it) but not the older candle.
    folder = tmp_path / "journal"
    dead = Journal(folder, instance_id="dead")
    await dead.open()
    dead.hold_checkpoint(0)
    await dead.append([tick(1), candle(1, 1.2)])
    await dead.mark_stored(2, durable=True)
    await dead.append([tick(2)])  # not stored
    await dead.close()
    assert (folder / "dead" / "checkpoint").read_text() == "0 2\n"
    observer = await adopt_and_report(storage, clock, folder)
    assert storage.stored_seqs() == [1, 2]
    assert not storage.candles  # the newer version stored since stays
    assert observer.items == [tick(1), tick(2)]


async def give_up_while_queued(pipeline: IngestPipeline, item: Any) -> None:
    """A journal-mode submit whose caller is cancelled once its append is queued."""
    call = asyncio.create_task(pipeline.submit(item, mode="journal"))
    await asyncio.sleep(0)  # the append is queued for the next group
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_cancelled_journal_call_whose_append_fails_gives_its_slot_back(
    make: Any, storage: FakeStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = await make(max_queue=2, put_timeout=0.01)

    def failing_write(self: Journal, group: Any) -> Any:
        raise JournalError("disk full")

    monkeypatch.setattr(Journal, "_write_group", failing_write)
    for seq in range(2):  # each caller gives up (a timeout, say) before its append fails
        await give_up_while_queued(pipeline, tick(seq))
    journal = pipeline.journal
    assert journal is not None
    await journal.wait_idle()  # both appends have failed by now
    monkeypatch.undo()
    await journal.wait_idle()  # and the follow-ups have run
    await pipeline.submit(tick(7))  # both slots are free again: no BackpressureTimeoutError
    await pipeline.submit(tick(8))
    await pipeline.flush()
    assert storage.stored_seqs() == [7, 8]


async def test_failed_journal_appends_wake_a_caller_waiting_for_their_slots(
    make: Any, storage: FakeStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both slots are held by journal appends that then fail (a full disk): the caller
    # waiting for space must get one at once, not wait for some unrelated later event.
    pipeline = await make(max_queue=2)

    def failing_write(self: Journal, group: Any) -> Any:
        raise JournalError("disk full")

    monkeypatch.setattr(Journal, "_write_group", failing_write)
    failing = [asyncio.create_task(pipeline.submit(tick(s), mode="journal")) for s in (1, 2)]
    await asyncio.sleep(0)  # both hold their slot now
    waiting = asyncio.create_task(pipeline.submit(tick(3)))
    for call in failing:
        with pytest.raises(JournalError):
            await call
    async with asyncio.timeout(WAIT):
        await waiting
    await pipeline.flush()
    assert storage.stored_seqs() == [3]


async def test_a_cancelled_journal_call_whose_append_is_kept_counts_as_accepted(
    make: Any, storage: FakeStorage
) -> None:
    pipeline = await make()
    await give_up_while_queued(pipeline, tick(1))
    journal = pipeline.journal
    assert journal is not None
    await journal.wait_idle()
    await pipeline.flush()
    assert storage.stored_seqs() == [1]
    stats = pipeline.stats()
    assert (stats.accepted, stats.stored) == (1, 1)


async def test_one_model_saved_twice_settles_each_calls_slot(
    make: Any, storage: FakeStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same object is saved twice in journal mode: the first caller gives up and its
    # append fails; the second append succeeds. Each call must settle its own queue slot:
    # the second's success is not the first's (the first's slot would never come back).
    pipeline = await make(max_queue=2)
    shared = tick(1)
    real_write = Journal._write_group

    def failing_write(self: Journal, group: Any) -> Any:
        raise JournalError("disk full")

    monkeypatch.setattr(Journal, "_write_group", failing_write)
    await give_up_while_queued(pipeline, shared)
    journal = pipeline.journal
    assert journal is not None
    monkeypatch.setattr(Journal, "_write_group", real_write)
    await pipeline.submit(shared, mode="journal")  # the same object, while the first is unsettled
    await journal.wait_idle()
    await asyncio.gather(*pipeline._followups)
    assert pipeline._reserved == 0
    assert not pipeline._appending
    assert not pipeline._cancelled
    await pipeline.flush()
    assert storage.stored_seqs() == [1]


async def test_journal_call_cancelled_as_its_append_returns_keeps_the_bound(
    make: Any, storage: FakeStorage
) -> None:
    # A caller's timeout fires in the very loop pass that made its append durable: the
    # slot was released with the append; it must not be released twice (the queue bound
    # would erode by one each time), and the item counts as accepted (it is stored).
    pipeline = await make(max_queue=2)
    calls: list[asyncio.Task[None]] = []
    durable = pipeline._on_durable

    def then_cancel(first: int, items: Any) -> None:
        durable(first, items)
        calls[0].cancel()

    pipeline._on_durable = then_cancel
    calls.append(asyncio.create_task(pipeline.submit(tick(1), mode="journal")))
    with pytest.raises(asyncio.CancelledError):
        await calls[0]
    pipeline._on_durable = durable
    journal = pipeline.journal
    assert journal is not None
    await journal.wait_idle()
    await asyncio.gather(*pipeline._followups)
    assert pipeline._reserved == 0
    assert pipeline.stats().accepted == 1
    await pipeline.flush()
    assert storage.stored_seqs() == [1]


async def test_journal_mode_without_journal_is_a_configuration_error(make: Any) -> None:
    pipeline = await make(journal=False)
    with pytest.raises(ConfigurationError):
        await pipeline.submit(tick(1), mode="journal")


async def test_journal_mode_items_survive_a_database_outage(
    make: Any, storage: FakeStorage, clock: ManualClock, breaker: CircuitBreaker
) -> None:
    pipeline = await make(batch_size=4)
    storage.down = True
    for i in range(12):
        await pipeline.submit(tick(i), mode="journal" if i % 2 else "buffered")
    await until(lambda: pipeline.stats().store_failures >= 1)
    assert pipeline.stats().backlog_journals == 1
    database_back(storage, clock, breaker, pipeline)
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(12))
    assert pipeline.journal is not None
    assert pipeline.journal.pending_records == 0


# --------------------------------------------------------------------------- close & restart


async def test_close_with_database_down_journals_the_rest_for_the_next_start(
    make: Any, storage: FakeStorage, clock: ManualClock, tmp_path: Path
) -> None:
    first = await make(batch_size=100, journal="first")
    storage.down = True
    for i in range(30):
        await first.submit(tick(i))
    await first.close(timeout=10)
    assert first.state is PipelineState.CLOSED
    assert (tmp_path / "journal" / "first").is_dir()  # left for the next router
    assert storage.ticks == {}

    storage.down = False
    clock.advance(60)
    second = await make(journal="second")
    assert second.stats().orphans_adopted == 1
    await second.flush()
    assert storage.stored_seqs() == list(range(30))
    assert not (tmp_path / "journal" / "first").exists()  # replayed, then removed


async def test_leftovers_under_the_same_instance_id_are_replayed(
    make: Any, storage: FakeStorage, clock: ManualClock, tmp_path: Path
) -> None:
    first = await make(batch_size=100, journal="stable")
    storage.down = True
    for i in range(7):
        await first.submit(tick(i))
    await first.close(timeout=10)
    storage.down = False
    clock.advance(60)
    again = await make(journal="stable")
    await again.submit(tick(7))
    await again.flush()
    assert storage.stored_seqs() == list(range(8))
    written = [t.seq for kind, items in storage.calls for t in items]
    assert written == list(range(8))  # the leftovers first


async def test_close_stores_everything_when_the_database_is_up(
    make: Any, storage: FakeStorage, tmp_path: Path
) -> None:
    pipeline = await make(batch_size=1_000, flush_interval=3600, journal="clean")
    for i in range(40):
        await pipeline.submit(tick(i), mode="journal" if i % 3 == 0 else "buffered")
    await pipeline.close()
    assert storage.stored_seqs() == list(range(40))
    assert not (tmp_path / "journal" / "clean").exists()  # nothing left: folder removed
    with pytest.raises(RouterClosedError):
        await pipeline.submit(tick(99))


async def test_close_without_journal_counts_what_it_loses(
    make: Any, storage: FakeStorage, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = await make(journal=False, batch_size=100)
    storage.down = True
    for i in range(3):
        await pipeline.submit(tick(i))
    await pipeline.close(timeout=0.2)
    assert pipeline.stats().lost_on_close == 3
    assert "they are lost" in caplog.text


async def test_close_with_a_full_disk_and_the_database_down_counts_what_it_loses(
    make: Any,
    storage: FakeStorage,
    breaker: CircuitBreaker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipeline = await make(batch_size=100)
    storage.down = True
    for _ in range(breaker.failure_threshold):
        breaker.record_failure()  # known down: close() journals the rest at once
    for i in range(3):
        await pipeline.submit(tick(i))

    def full_disk(self: Journal, group: Any) -> Any:
        raise JournalError("No space left on device")

    monkeypatch.setattr(Journal, "_write_group", full_disk)
    await pipeline.close(timeout=WAIT)
    assert pipeline.stats().lost_on_close == 3
    assert "neither stored nor journaled before close; they are lost" in caplog.text
    assert "no journal" not in caplog.text


# --------------------------------------------------------------------------- misc


async def test_invalid_arguments(make: Any) -> None:
    pipeline = await make()
    with pytest.raises(ValidationError):
        await pipeline.submit(tick(1), mode="bogus")
    with pytest.raises(ValidationError):
        await pipeline.submit("not a model")
    with pytest.raises(ConfigurationError):
        pipeline.configure(batch_size=0)
    with pytest.raises(ConfigurationError):
        IngestPipeline(FakeStorage(), batch_size=10, max_batch=5)  # type: ignore[arg-type]


async def test_configure_applies_while_running(make: Any, storage: FakeStorage) -> None:
    pipeline = await make(batch_size=100)
    for i in range(3):
        await pipeline.submit(tick(i))
    await settle()
    assert storage.calls == []
    pipeline.configure(batch_size=3)
    await storage.wait_ticks(3)
    assert storage.call_sizes() == [3]


async def test_flush_timeout_raises_and_keeps_the_data(
    make: Any, storage: FakeStorage, clock: ManualClock, breaker: CircuitBreaker
) -> None:
    pipeline = await make(batch_size=2)
    storage.down = True
    for i in range(4):
        await pipeline.submit(tick(i))
    with pytest.raises(QueryTimeoutError):
        await pipeline.flush(timeout=0.05)
    database_back(storage, clock, breaker, pipeline)
    await pipeline.flush()
    assert storage.stored_seqs() == list(range(4))


async def test_flush_does_not_wait_an_interval_for_what_was_journaled_meanwhile(
    make: Any, storage: FakeStorage
) -> None:
    pipeline = await make(batch_size=10, flush_interval=3600)  # the clock never gets there
    await pipeline.submit(tick(0))
    storage.gate = asyncio.Event()
    flushing = asyncio.create_task(pipeline.flush())
    await storage.entered.wait()  # tick 0's batch is being written
    await pipeline.submit(tick(1), mode="journal")  # acknowledged after flush() was called
    storage.gate.set()
    await asyncio.wait_for(flushing, WAIT)
    assert storage.stored_seqs() == [0, 1]


async def test_running_pipeline_adopts_orphans_on_its_scan_interval(
    make: Any, storage: FakeStorage, clock: ManualClock, tmp_path: Path
) -> None:
    pipeline = await make(journal="scanner", orphan_scan_interval=30.0)
    dead = Journal(tmp_path / "journal", instance_id="dead")
    await dead.open()
    await dead.append([tick(1), tick(2)])
    await dead.close()  # as if its process had died: unlocked, records left
    clock.advance(29)
    pipeline.wake()
    await settle()
    assert pipeline.stats().orphans_adopted == 0
    clock.advance(1)
    pipeline.wake()
    await until(lambda: pipeline.stats().orphans_adopted == 1)
    await pipeline.flush()
    assert storage.stored_seqs() == [1, 2]
    assert not dead.path.exists()


async def test_concurrent_close_calls_both_wait_for_the_end(
    make: Any, storage: FakeStorage
) -> None:
    pipeline = await make(batch_size=1_000)
    for i in range(5):
        await pipeline.submit(tick(i))
    await asyncio.gather(pipeline.close(), pipeline.close())
    assert pipeline.state is PipelineState.CLOSED
    assert storage.stored_seqs() == list(range(5))


async def test_real_sqlite_store_with_a_refused_tick(tmp_path: Path, clock: ManualClock) -> None:
    from data_manager.storage.sqlite import SQLiteStorage

    class Refusing(SQLiteStorage):
        """SQLite that refuses one tick, as a constraint would."""

        async def write_ticks(self, ticks: Sequence[TickData]) -> int:
            if any(t.seq == 21 for t in ticks):
                raise QueryExecutionError("CHECK constraint failed")
            return await super().write_ticks(ticks)

    sqlite = Refusing(tmp_path / "db.sqlite3")
    await sqlite.connect()
    await sqlite.create_schema()
    pipeline = IngestPipeline(
        sqlite,
        journal=Journal(tmp_path / "journal", instance_id="sqlite"),
        batch_size=16,
        retry_initial=0.0,
        retry_max_backoff=0.0,
        retry_jitter=0.0,
        clock=clock,
        orphan_scan_interval=None,
    )
    await pipeline.start()
    try:
        for i in range(40):
            await pipeline.submit(tick(i), mode="journal" if i % 4 == 0 else "buffered")
        await pipeline.submit(tick(40), mode="sync")
        await pipeline.flush()
        stored = await sqlite.ticks_range("EUR/USD", T0, T0 + 100_000)
        assert [t.seq for t in stored] == [i for i in range(41) if i != 21]
        assert pipeline.stats().dead_lettered == 1
    finally:
        await pipeline.close()
        await sqlite.close()


# --------------------------------------------------------------------------- faults on the way


async def test_a_full_disk_in_backlog_mode_does_not_wedge_the_replay(
    make: Any,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = await make(batch_size=5)
    storage.down = True
    for i in range(5):
        await pipeline.submit(tick(i))
    await until(lambda: pipeline.stats().spilled == 5)  # backlog mode: the journal first

    def full_disk(self: Journal, group: Any) -> Any:
        raise JournalError("No space left on device")

    monkeypatch.setattr(Journal, "_write_group", full_disk)
    for i in range(5, 10):
        await pipeline.submit(tick(i))  # taken, but cannot follow the others into the journal
    await until(lambda: pipeline.stats().queue_depth == 5)
    await settle()
    assert pipeline.stats().spilled == 5

    database_back(storage, clock, breaker, pipeline)  # the database is back, the disk is still full
    await pipeline.flush(timeout=WAIT)
    written = [t.seq for _, items in storage.calls for t in items]
    assert written == list(range(10))  # the journal's older records first, then the batch
    stats = pipeline.stats()
    assert (stats.journal_records, stats.backlog_journals, stats.breaker_state) == (0, 0, "closed")


async def test_unreadable_records_skipped_in_a_replay_are_only_those_before_it(
    make: Any,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = await make(batch_size=1)
    storage.down = True
    await pipeline.submit(tick(0))
    await until(lambda: pipeline.stats().spilled == 1)  # backlog mode: LSN 1
    real_read = Journal.read
    reads = 0

    async def unreadable_once(journal: Journal, after_lsn: int, **kwargs: Any) -> JournalBatch:
        # LSN 1 is counted but cannot be read (the disk changed under us); meanwhile a
        # journal-mode call is acknowledged as LSN 2, which only the replay will store.
        nonlocal reads
        reads += 1
        if reads > 1:
            return await real_read(journal, after_lsn, **kwargs)
        await pipeline.submit(tick(1), mode="journal")
        return JournalBatch(records=[], end_lsn=after_lsn)

    monkeypatch.setattr(Journal, "read", unreadable_once)
    database_back(storage, clock, breaker, pipeline)
    await pipeline.flush(timeout=WAIT)  # up to LSN 1
    await pipeline.flush(timeout=WAIT)  # up to LSN 2, accepted during the first
    assert storage.stored_seqs() == [1]
    assert pipeline.stats().journal_records == 0


async def _journal_a_newer_candle_before_an_older_one(
    pipeline: IngestPipeline,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    phase: str,
) -> None:
    """A buffered version of a forming candle, then a newer one in journal mode, while the
    database is down: the newer is on disk first, the older follows it there when its batch
    cannot be stored. Then the database comes back and everything is flushed."""
    storage.down = True
    if phase == "backlog-mode":
        await pipeline.submit(tick(0))
        await pipeline.submit(tick(1))
        await until(lambda: pipeline.stats().spilled == 2)
    await pipeline.submit(candle(0, 1.0, is_closed=False))
    await pipeline.submit(candle(0, 2.0, is_closed=False), mode="journal")
    await until(lambda: pipeline.stats().queue_depth == 0 and pipeline.stats().spilled >= 2)
    database_back(storage, clock, breaker, pipeline)
    await pipeline.flush(timeout=WAIT)


@pytest.mark.parametrize("batch", [2, 1], ids=["one-batch", "two-batches"])
@pytest.mark.parametrize("phase", ["first-failure", "backlog-mode"])
async def test_mixed_mode_upserts_keep_their_order_through_the_journal(
    make: Any,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    phase: str,
    batch: int,
) -> None:
    pipeline = await make(batch_size=batch, journal_batch_size=batch)
    await _journal_a_newer_candle_before_an_older_one(pipeline, storage, clock, breaker, phase)
    (stored,) = storage.candles.values()
    assert stored.close == 2.0  # the newer version, as accepted last


async def test_a_journal_mode_series_keeps_its_newest_version_through_an_outage(
    make: Any, storage: FakeStorage, clock: ManualClock, breaker: CircuitBreaker
) -> None:
    # One write mode per series (candles in journal mode, ticks buffered): v1 is queued while
    # a tick's batch fails and is spilled after it, so v1 is written once more; v2, accepted
    # after that in backlog mode, must keep its place behind v1's copy.
    pipeline = await make(batch_size=1, journal_batch_size=1000, flush_interval=3600)
    storage.down = True
    storage.gate = asyncio.Event()
    await pipeline.submit(tick(0))  # its batch is being written...
    await storage.entered.wait()
    await pipeline.submit(candle(0, 1.0, is_closed=False), mode="journal")  # ...v1 queued
    storage.gate.set()  # the batch fails and is spilled (behind v1)
    await until(lambda: pipeline.stats().spilled == 1)
    storage.gate = None
    await pipeline.submit(candle(0, 2.0, is_closed=False), mode="journal")
    database_back(storage, clock, breaker, pipeline)
    await pipeline.flush(timeout=WAIT)
    (stored,) = storage.candles.values()
    assert stored.close == 2.0


def fail_checkpoints(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """Make the next ``n`` checkpoint writes fail as on a full disk; ``[failures left]``."""
    real = Journal._checkpoint_and_delete
    left = [n]

    def full_disk(journal: Journal, dead: Any) -> None:
        if left[0]:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(journal, dead)

    monkeypatch.setattr(Journal, "_checkpoint_and_delete", full_disk)
    return left


async def v1_spilled(make: Any, storage: FakeStorage) -> IngestPipeline:
    """A pipeline on journal "a" whose first candle version (close 1.0) went to the journal
    while the database was down (it still is)."""
    pipeline: IngestPipeline = await make(journal="a", sync="loop", batch_size=1)
    storage.down = True
    await pipeline.submit(candle(0, 1.0, is_closed=False))
    await until(lambda: pipeline.stats().spilled == 1)
    return pipeline


async def crash_and_adopt(storage: FakeStorage, clock: ManualClock, tmp_path: Path) -> None:
    """A kill -9 of the router of journal "a" now: the next one adopts it as it is on disk."""
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "journal" / "a", crashed / "a")
    following = IngestPipeline(
        storage, journal=Journal(crashed, instance_id="b"), clock=clock, orphan_scan_interval=None
    )
    await following.start()
    try:
        await following.flush(timeout=WAIT)
    finally:
        await following.close(timeout=5)


@pytest.mark.parametrize("failures", [1, 3])
async def test_a_replayed_upsert_whose_checkpoint_failed_is_not_replayed_over_a_newer_one(
    make: Any,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    failures: int,
) -> None:
    # v1 of a candle is spilled while the database is down and replayed when it is back, but
    # the checkpoint saying so cannot be written (a full disk). v2, accepted next, must not
    # be stored around the journal before that checkpoint is on disk: a crash would replay
    # v1 over it.
    pipeline = await v1_spilled(make, storage)
    left = fail_checkpoints(monkeypatch, failures)
    database_back(storage, clock, breaker, pipeline)
    for refused in range(failures):  # v1 stored, then its checkpoint refused `failures` times
        # Each refusal puts the next try one reset timeout away.
        await until(lambda n=failures - 1 - refused: left[0] == n)
        await until(lambda: pipeline._retry_at > clock.monotonic() or not pipeline.replay_owed)
        if not refused:
            await pipeline.submit(candle(0, 2.0, is_closed=False))
            await until(lambda: pipeline.stats().queue_depth == 0)
        clock.advance(breaker.reset_timeout)
        pipeline.wake()
    await pipeline.flush(timeout=WAIT)
    assert storage.candles[("EUR/USD", "1m", "test", T0)].close == 2.0
    await crash_and_adopt(storage, clock, tmp_path)
    assert storage.candles[("EUR/USD", "1m", "test", T0)].close == 2.0


async def test_a_batch_due_when_an_owed_checkpoint_is_retried_goes_behind_it(
    make: Any,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # v2 is accepted as the retry comes due, before the writer wakes: it must not be stored
    # around the journal while the checkpoint is still refused.
    pipeline = await v1_spilled(make, storage)
    left = fail_checkpoints(monkeypatch, 2)
    database_back(storage, clock, breaker, pipeline)
    await until(lambda: left[0] == 1 and pipeline._retry_at > clock.monotonic())
    clock.advance(breaker.reset_timeout)
    await pipeline.submit(candle(0, 2.0, is_closed=False))
    await until(lambda: left[0] == 0 and pipeline.stats().queue_depth == 0)
    await settle()
    await crash_and_adopt(storage, clock, tmp_path)
    assert storage.candles[("EUR/USD", "1m", "test", T0)].close == 2.0


async def test_a_replayed_chunk_whose_checkpoint_failed_is_still_reported(
    storage: FakeStorage, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = tmp_path / "journal"
    dead = Journal(folder, instance_id="dead")
    await dead.open()
    await dead.append([tick(1), tick(2), candle(1, 1.2)])
    await dead.close()
    left = fail_checkpoints(monkeypatch, 1)
    observer = Observer()
    breaker = CircuitBreaker("database", failure_threshold=2, reset_timeout=5.0, clock=clock)
    pipeline = IngestPipeline(
        storage,
        journal=Journal(folder, instance_id="alive"),
        clock=clock,
        orphan_scan_interval=None,
        breaker=breaker,
    )
    pipeline.hold_for_derived(observer)
    await pipeline.start()
    try:
        await until(lambda: left[0] == 0 and pipeline._retry_at > clock.monotonic())
        clock.advance(breaker.reset_timeout)
        pipeline.wake()
        await pipeline.flush(timeout=WAIT)
    finally:
        await pipeline.close(timeout=5)
    assert observer.items == [tick(1), tick(2), candle(1, 1.2)]
    assert pipeline.stats().replayed == 3


@pytest.mark.parametrize("prune_min", [ingest._OVERTAKEN_PRUNE_MIN, 0])
@pytest.mark.parametrize("ending", ["spill", "close"])
async def test_an_older_upsert_written_again_brings_the_newer_ones_after_it(
    make: Any,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    monkeypatch: pytest.MonkeyPatch,
    ending: str,
    prune_min: int,
) -> None:
    # v1 and v2 (journal mode) end up queued in one batch below and above the spill's
    # watermark: v1 is written again (it was overtaken), so v2 must be written after it.
    # (prune_min 0: the overtaken keys are pruned after every spill, which must keep v1's.)
    monkeypatch.setattr(ingest, "_OVERTAKEN_PRUNE_MIN", prune_min)
    spill_next = asyncio.Event()
    real_write_ticks = storage.write_ticks
    attempts = 0

    async def write_ticks(ticks: Any) -> Any:
        nonlocal attempts
        attempts += 1
        if attempts == 2:  # the last attempt: the batch is spilled right after it fails
            spill_next.set()
        return await real_write_ticks(ticks)

    storage.write_ticks = write_ticks  # type: ignore[method-assign]
    pipeline = await make(
        journal="a", sync="loop", batch_size=1, journal_batch_size=1000, flush_interval=3600
    )

    async def newer() -> None:  # another journal-mode caller, during the spill
        await spill_next.wait()
        await asyncio.sleep(0)
        await pipeline.submit(candle(0, 2.0, is_closed=False), mode="journal")

    second = asyncio.create_task(newer())
    storage.down = True
    storage.gate = asyncio.Event()
    await pipeline.submit(tick(0))
    await storage.entered.wait()
    await pipeline.submit(candle(0, 1.0, is_closed=False), mode="journal")
    storage.gate.set()
    await asyncio.wait_for(second, WAIT)
    await until(lambda: pipeline.stats().spilled >= 1)
    storage.gate = None
    if ending == "spill":
        pipeline.configure(journal_batch_size=2)  # the queued pair is taken and spilled
        await until(lambda: pipeline.stats().queue_depth == 0)
        database_back(storage, clock, breaker, pipeline)
        await pipeline.flush(timeout=WAIT)
        await pipeline.close()
    else:
        await pipeline.close(timeout=WAIT)  # the database is down: the rest to the journal
        storage.down = False
        clock.advance(60)
        breaker.reset()
        following = await make(journal="b")
        await following.flush(timeout=WAIT)
    (stored,) = storage.candles.values()
    assert stored.close == 2.0


async def test_overtaken_keys_do_not_pile_up_while_an_outage_keeps_the_queue_busy(
    make: Any, storage: FakeStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each spilled buffered upsert notes its key (a new one per order-flow row) for the
    # journal-mode versions queued below it; with none queued, none is needed, even though
    # the queue never empties.
    monkeypatch.setattr(ingest, "_OVERTAKEN_PRUNE_MIN", 64)
    pipeline = await make(
        journal="a", sync="loop", batch_size=10, max_batch=10, flush_interval=3600
    )
    storage.down = True
    for window in range(1, 2_001):
        await pipeline.submit(flow(window))
    await until(lambda: pipeline.stats().spilled >= 1_000)
    assert pipeline.stats().queue_depth > 0
    assert len(pipeline._overtaken) < 2 * 64


@pytest.mark.parametrize("when", ["mid-spill", "after-spill"])
async def test_a_close_that_stops_a_spill_keeps_the_newest_upsert(
    make: Any,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    pipeline = await make(
        journal="a", sync="thread", batch_size=2, journal_batch_size=1000, flush_interval=3600
    )
    storage.down = True
    storage.gate = asyncio.Event()
    await pipeline.submit(tick(1))
    await pipeline.submit(candle(0, 1.0, is_closed=False), mode="journal")
    await pipeline.submit(tick(2))  # the batch [t1, v1, t2] is taken
    await storage.entered.wait()
    await pipeline.submit(candle(0, 2.0, is_closed=False), mode="journal")  # queued behind
    entered, release = hold_group_syncs(monkeypatch)
    storage.gate.set()  # the batch fails; its spill is in flight
    assert await asyncio.to_thread(entered.wait, WAIT)
    if when == "after-spill":
        release.set()
        await until(lambda: pipeline.stats().spilled >= 2)  # t1, t2: v1 is journaled
    closing = asyncio.create_task(pipeline.close(timeout=WAIT))  # stops the writer
    await settle()
    release.set()
    await asyncio.wait_for(closing, WAIT)
    monkeypatch.undo()
    storage.down = False
    storage.gate = None
    breaker.reset()
    clock.advance(60)
    following = await make(journal="b", replay_batch=1)
    await following.flush(timeout=WAIT)
    (stored,) = storage.candles.values()
    assert stored.close == 2.0


@pytest.mark.parametrize("phase", ["first-failure", "backlog-mode"])
async def test_a_refused_upsert_written_again_behind_older_ones_is_dead_lettered_once(
    make: Any,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    tmp_path: Path,
    phase: str,
) -> None:
    # The journal-mode version is journaled again behind the older buffered one; the
    # database refuses it, both as the original record and as the copy (stored apart: one
    # record per replay chunk).
    storage.refuse = lambda item: getattr(item, "close", None) == 2.0
    pipeline = await make(batch_size=2, journal_batch_size=2, journal="refusing", replay_batch=1)
    await _journal_a_newer_candle_before_an_older_one(pipeline, storage, clock, breaker, phase)
    assert pipeline.stats().dead_lettered == 1
    lines = (tmp_path / "journal" / DEAD_LETTER_DIR / "refusing.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["data"]["close"] for line in lines] == [2.0]


async def test_an_item_refused_before_its_batch_failed_is_dead_lettered_once(
    make: Any,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    tmp_path: Path,
) -> None:
    storage.refuse = lambda item: getattr(item, "seq", None) == 1
    real_write = storage.write_ticks
    outage = True

    async def flaky(ticks: Sequence[TickData]) -> int:
        if outage and ticks[0].seq == 2:  # the other half of the split meets an outage
            raise DatabaseConnectionError("connection reset")
        return await real_write(ticks)

    storage.write_ticks = flaky  # type: ignore[method-assign]
    pipeline = await make(batch_size=4, journal="refusing")
    for i in range(4):
        await pipeline.submit(tick(i))
    await until(lambda: pipeline.stats().spilled == 4)  # refused 1, stored 0, failed on 2-3
    assert pipeline.stats().dead_lettered == 0  # not yet: the batch is not settled
    outage = False
    clock.advance(breaker.reset_timeout)
    pipeline.wake()
    await pipeline.flush(timeout=WAIT)
    assert storage.stored_seqs() == [0, 2, 3]
    assert pipeline.stats().dead_lettered == 1
    lines = (tmp_path / "journal" / DEAD_LETTER_DIR / "refusing.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["data"]["seq"] for line in lines] == [1]


async def test_a_cancelled_caller_does_not_count_against_the_database(
    make: Any, storage: FakeStorage, clock: ManualClock, breaker: CircuitBreaker
) -> None:
    pipeline = await make()
    storage.gate = asyncio.Event()
    for seq in range(breaker.failure_threshold + 1):  # callers that give up mid-write
        storage.entered.clear()
        call = asyncio.create_task(pipeline.submit(tick(seq), mode="sync"))
        await storage.entered.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert (breaker.state, breaker.consecutive_failures) == (BreakerState.CLOSED, 0)

    # A half-open probe whose caller leaves lets the next caller probe.
    storage.gate = None
    for _ in range(breaker.failure_threshold):
        breaker.record_failure()
    clock.advance(breaker.reset_timeout)
    assert breaker.allow()  # someone's probe...
    breaker.release()  # ...whose caller was cancelled
    await pipeline.submit(tick(99), mode="sync")
    assert breaker.state is BreakerState.CLOSED
    assert storage.stored_seqs() == [99]


class _BlockingOpen:
    """Hold the worker thread that opens the journal ``name`` until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()
        real = Journal._open_sync

        def open_sync(journal: Journal, create: bool) -> None:
            if journal.instance_id != name:
                real(journal, create)
                return
            self.entered.set()
            self.release.wait(WAIT)
            try:
                real(journal, create)
            finally:
                self.done.set()

        monkeypatch.setattr(Journal, "_open_sync", open_sync)


async def dead_journal(root: Path, name: str) -> Journal:
    """A journal left with records by a process that died (unlocked)."""
    dead = Journal(root, instance_id=name)
    await dead.open()
    await dead.append([tick(1)])
    await dead.close()
    return dead


async def damaged_dead_journal(root: Path) -> None:
    """:func:`dead_journal` with bytes after its record that do not parse (one problem for
    whoever opens it)."""
    dead = await dead_journal(root, "dead")
    (segment,) = dead.path.glob("*.seg")
    with segment.open("ab") as fh:
        fh.write(b"\xde\xad\xbe\xef" * 8)


async def test_an_adopted_journals_problems_stay_counted_after_it_is_removed(
    make: Any, storage: FakeStorage, tmp_path: Path
) -> None:
    await damaged_dead_journal(tmp_path / "journal")
    pipeline = await make(journal="adopter")
    assert pipeline.stats().orphans_adopted == 1
    await pipeline.flush()
    assert storage.stored_seqs() == [1]
    stats = pipeline.stats()
    assert (stats.backlog_journals, stats.journal_problems) == (0, 1)  # replayed and removed


async def test_a_closed_pipeline_still_counts_its_adopted_journals_problems(
    make: Any, storage: FakeStorage, tmp_path: Path
) -> None:
    await damaged_dead_journal(tmp_path / "journal")
    storage.down = True  # the adopted journal stays in the backlog until close
    pipeline = await make(journal="adopter")
    assert pipeline.stats().journal_problems == 1
    await pipeline.close(timeout=0.1)
    assert pipeline.stats().journal_problems == 1  # a counter never goes down


async def lock_is_free(journal: Journal) -> bool:
    probe = Journal(journal.root, instance_id=journal.instance_id)
    try:
        await probe.open(create=False)
    except JournalLockedError:
        return False
    await probe.close()
    return True


async def test_a_full_disk_at_close_still_closes_and_unlocks_every_journal(
    make: Any, storage: FakeStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orphan = await dead_journal(tmp_path / "journal", "dead")
    storage.down = True  # the orphan cannot be replayed: it is still held at close
    pipeline = await make(journal="live")
    assert pipeline.stats().orphans_adopted == 1
    own = pipeline.journal
    assert own is not None
    await pipeline.submit(tick(2), mode="journal")  # the own journal has a record too
    real = Journal._write_checkpoint

    def disk_full(self: Journal) -> None:
        if self.instance_id == "dead":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)

    monkeypatch.setattr(Journal, "_write_checkpoint", disk_full)
    await pipeline.close(timeout=0.1)  # no raw OSError; the other journals still close
    monkeypatch.undo()
    assert not own.is_open
    assert await lock_is_free(orphan)
    assert await lock_is_free(own)


async def test_journal_close_failing_on_disk_is_a_journal_error_and_unlocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path, instance_id="me")
    await journal.open()
    await journal.append([tick(1)])  # not stored: close writes a checkpoint

    def disk_full(self: Journal) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Journal, "_write_checkpoint", disk_full)
    with pytest.raises(JournalError, match="No space left"):
        await journal.close()
    monkeypatch.undo()
    assert not journal.is_open
    assert await lock_is_free(journal)


@pytest.mark.parametrize("cancels", [1, 2])
async def test_cancelled_orphan_adoption_gives_the_orphans_lock_back(
    make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cancels: int
) -> None:
    pipeline = await make(journal="scanner")
    orphan = await dead_journal(tmp_path / "journal", "dead")
    blocking = _BlockingOpen(monkeypatch, "dead")
    adopting = asyncio.create_task(pipeline.adopt_orphans())
    assert await asyncio.to_thread(blocking.entered.wait, WAIT)
    for _ in range(cancels):
        # While the open runs in its thread (close() stopping the writer, say); a second
        # cancel lands while the task waits for that open to give the lock back.
        adopting.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
    assert not adopting.done()
    blocking.release.set()
    with pytest.raises(asyncio.CancelledError):
        await adopting
    assert await asyncio.to_thread(blocking.done.wait, WAIT)
    monkeypatch.undo()
    assert await lock_is_free(orphan)  # the next router can still adopt it


async def test_a_start_cancelled_while_adopting_gives_every_lock_back(
    storage: FakeStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "journal"
    first = await dead_journal(root, "a-dead")
    second = await dead_journal(root, "b-dead")
    blocking = _BlockingOpen(monkeypatch, "b-dead")
    own = Journal(root, instance_id="starting")
    pipeline = IngestPipeline(storage, journal=own, orphan_scan_interval=None)  # type: ignore[arg-type]
    starting = asyncio.create_task(pipeline.start())
    assert await asyncio.to_thread(blocking.entered.wait, WAIT)  # "a-dead" adopted by now
    starting.cancel()
    blocking.release.set()
    with pytest.raises(asyncio.CancelledError):
        await starting
    await asyncio.to_thread(blocking.done.wait, WAIT)
    monkeypatch.undo()
    await pipeline.close()  # what a router does when its initialize() fails
    assert pipeline.state is PipelineState.CLOSED
    assert [await lock_is_free(j) for j in (first, second)] == [True, True]
    assert not own.is_open
    assert not own.path.exists()  # nothing in it: removed at close


async def test_a_close_during_the_removal_of_a_replayed_orphan_still_removes_it(
    make: Any, storage: FakeStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orphan = await dead_journal(tmp_path / "journal", "dead")
    entered, release = asyncio.Event(), asyncio.Event()
    real_wait_idle = Journal.wait_idle

    async def slow_wait_idle(journal: Journal) -> None:
        if journal.instance_id == "dead":  # its close() waits for its committer a while
            entered.set()
            await release.wait()
        await real_wait_idle(journal)

    monkeypatch.setattr(Journal, "wait_idle", slow_wait_idle)
    pipeline = await make(journal="adopter")
    await asyncio.wait_for(entered.wait(), WAIT)  # replayed; the writer is closing it
    closing = asyncio.create_task(pipeline.close(timeout=WAIT))  # cancels the writer
    await settle()
    release.set()
    await asyncio.wait_for(closing, WAIT)
    assert storage.stored_seqs() == [1]
    assert not orphan.path.exists()  # fully stored: removed, not left open and locked


async def test_a_close_cancelled_during_its_shutdown_still_journals_the_rest(
    make: Any,
    storage: FakeStorage,
    clock: ManualClock,
    breaker: CircuitBreaker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    own = Journal(tmp_path / "journal", instance_id="leaving", sync="thread")
    pipeline = IngestPipeline(
        storage, journal=own, batch_size=100, flush_interval=3600, breaker=breaker, clock=clock
    )
    await pipeline.start()
    storage.down = True
    for _ in range(breaker.failure_threshold):
        breaker.record_failure()  # the database is known to be down: close() does not wait
    for i in range(5):
        await pipeline.submit(tick(i))  # buffered, queued
    entered, release = hold_group_syncs(monkeypatch)
    journaled = asyncio.create_task(pipeline.submit(tick(100), mode="journal"))
    assert await asyncio.to_thread(entered.wait, WAIT)  # its fsync is slow
    closing = asyncio.create_task(pipeline.close(timeout=10))
    await settle()  # close() stopped the writer and waits for that fsync
    closing.cancel()  # an outer timeout lands during the shutdown
    await settle()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await journaled
    monkeypatch.undo()
    assert pipeline.state is PipelineState.CLOSED
    assert not own.is_open  # unlocked for the next router
    assert pipeline.stats().lost_on_close == 0
    storage.down = False
    clock.advance(60)
    again = await make(journal="again")
    await again.flush(timeout=WAIT)
    assert storage.stored_seqs() == [0, 1, 2, 3, 4, 100]


async def test_a_cancelled_close_still_shuts_down_and_journals_the_rest(
    make: Any, storage: FakeStorage, clock: ManualClock, tmp_path: Path
) -> None:
    pipeline = await make(batch_size=100, journal="leaving")
    storage.gate = asyncio.Event()  # the database hangs
    for i in range(5):
        await pipeline.submit(tick(i))
    closing = asyncio.create_task(pipeline.close(timeout=None))
    await storage.entered.wait()  # close() is waiting for the flush
    closing.cancel()  # its caller gives up (an outer timeout)
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert pipeline.state is PipelineState.CLOSED
    await asyncio.wait_for(pipeline.close(0), WAIT)  # returns, as a teardown's would
    storage.gate = None
    again = await make(journal="again")
    assert again.stats().orphans_adopted == 1
    await again.flush(timeout=WAIT)
    assert storage.stored_seqs() == list(range(5))


async def test_a_journal_segment_deleted_in_backlog_mode_is_skipped_and_the_rest_replayed(
    storage: FakeStorage, clock: ManualClock, breaker: CircuitBreaker, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal", instance_id="gone", segment_bytes=1024)
    pipeline = IngestPipeline(
        storage,
        journal=journal,
        batch_size=5,
        replay_batch=4,
        flush_interval=1.0,
        retry_attempts=2,
        retry_initial=0.0,
        retry_max_backoff=0.0,
        retry_jitter=0.0,
        breaker=breaker,
        clock=clock,
        orphan_scan_interval=None,
    )
    await pipeline.start()
    try:
        storage.down = True
        # Backlog mode: one journal group per batch, a few groups per segment.
        for i in range(0, 60, 5):
            for seq in range(i, i + 5):
                await pipeline.submit(tick(seq))
            await until(lambda: pipeline.stats().queue_depth == 0)
        assert pipeline.stats().spilled == 60
        files = sorted(journal.path.glob("*.seg"))
        assert len(files) >= 3
        lost = range(int(files[1].name[:20]), int(files[2].name[:20]))
        seq_of: dict[int, int] = {}
        for lsn, item in journal.replay():
            assert isinstance(item, TickData)
            assert item.seq is not None
            seq_of[lsn] = item.seq
        files[1].unlink()  # a person's or a cleanup script's doing

        database_back(storage, clock, breaker, pipeline)
        async with asyncio.timeout(WAIT):
            await pipeline.flush()
        assert storage.stored_seqs() == sorted(
            seq for lsn, seq in seq_of.items() if lsn not in lost
        )
        (problem,) = journal.problems
        assert files[1].name in problem
        assert f"records {lost[0]}..{lost[-1]} are lost" in problem
        stats = pipeline.stats()
        assert (stats.journal_records, stats.backlog_journals, stats.writer_errors) == (0, 0, 0)
        assert stats.journal_problems == 1
        await pipeline.submit(tick(100))  # written to the database again
        await pipeline.flush(timeout=WAIT)
        assert 100 in storage.stored_seqs()
    finally:
        await pipeline.close(timeout=5)
    assert not journal.path.exists()
