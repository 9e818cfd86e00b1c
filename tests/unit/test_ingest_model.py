"""A randomized model check of the write path: the database ends up holding what was accepted.

Each run draws a sequence of operations from its seed and plays it against
:class:`IngestPipeline` over an in-memory database and a real journal folder: ticks, candle
versions and order-flow versions submitted in every write mode (one mode per upsert series,
as the README's "Limitations" asks; ticks in any mode), concurrent journal-mode bursts, the
database going down and coming back, a transient error, the flush interval passing,
``flush()``, a journal that cannot be written (a full disk), records the database refuses,
``close()`` followed by a new pipeline on the same folder (under the same instance id or a
new one, which adopts the old journal), and a crash: the writer stops wherever it is, the
journals are dropped without being closed and their locks freed, as the kernel does for a
dead process, with journal-mode calls possibly still in flight.

The model tracks what each call acknowledged and what its mode promises. A ``journal`` or
``sync`` item is safe once acknowledged; a ``buffered`` one once a ``flush()`` returned
after it, or a ``close()`` that could store or journal it (not with the database down and
the disk full); a crash may lose buffered items accepted since. After every ``flush()``,
and at the end (database up, a final pipeline that adopts whatever was left, flushed):

* every safe tick is stored, no refused tick or failed call's tick is, nothing else is;
* every candle and order-flow row holds an acknowledged, not refused version, at least the
  newest safe one (so exactly the newest when that one is safe);
* the dead-letter files hold every refused tick that was safe and the refused newest
  version of a series, and nothing that was not refused;
* no pipeline's writer hit an unexpected error, and none counted items lost at close but
  the one close that may lose them;
* runs without an outage or a crash write no tick twice (the storage records every write;
  replays are idempotent by key, so elsewhere only distinct keys are compared).

A seed replays the same operations and, since the journal's worker-thread I/O runs inline
and time is a manual clock, the same interleaving; a failure names its seed, its settings
and the last operations. Each defect the model found has a minimal case at the end of this
file, and seeds that found them (``REGRESSION_SEEDS``) run in the quick run too; a defect
found and not fixed yet is kept as a strict xfail, its seeds in ``KNOWN``. Fixed so far: a
buffered upsert replayed from the journal and then superseded by a version stored directly
came back after a crash, since the replay's stored mark was not checkpointed (a replayed
chunk holding an upsert is now checkpointed at once); and a spill copied a journal-mode
upsert into the journal behind a newer version of its key journaled meanwhile, so a crash
replayed the copy last (a spill now copies a journal-mode upsert only behind a buffered
version of its key). ``-m slow`` runs many more seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson
import pytest

from data_manager import ingest as ingest_module
from data_manager import journal as journal_module
from data_manager.breaker import BreakerState, CircuitBreaker
from data_manager.clock import ManualClock
from data_manager.errors import (
    BackpressureTimeoutError,
    CircuitBreakerOpenError,
    JournalError,
    QueryExecutionError,
    RetryExhaustedError,
)
from data_manager.ingest import IngestPipeline
from data_manager.journal import DEAD_LETTER_DIR, Journal
from data_manager.models import CandleData, OrderFlowMetrics, TickData
from tests.unit.conftest import WAIT
from tests.unit.test_ingest import T0, FakeStorage, until

if TYPE_CHECKING:
    from collections.abc import Sequence

    from data_manager.journal import IngestItem
    from data_manager.settings import WriteMode

Status = Literal["pending", "safe", "maybe", "failed"]
Ident = tuple[str, int, int]  # (kind, tick seq or series index, version)

RESET: Final = 5.0  # the breaker's reset timeout (seconds of the manual clock)
QUICK_SEEDS: Final = 30
QUICK_OPS: Final = 200
SLOW_SEEDS: Final = 500
SLOW_OPS: Final = 400
#: Seeds that found defects since fixed (a minimal case of each is at the end of this file),
#: run in the quick run too, with as many operations as in the slow one.
REGRESSION_SEEDS: Final = (40, 211, 109)

#: Seeds that run into a defect found and not fixed yet (seed -> the defect, which then has a
#: minimal case at the end of this file): strict xfails, so a fix asks for their removal.
KNOWN: Final[dict[int, str]] = {}


def seeds(numbers: list[int]) -> list[Any]:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN[n])) if n in KNOWN else n
        for n in numbers
    ]


def ident(item: IngestItem) -> Ident:
    """What the model calls an item: a tick by its seq, an upsert by series and version."""
    if type(item) is TickData:
        assert item.seq is not None
        return ("tick", item.seq, 0)
    if type(item) is CandleData:
        assert item.volume is not None
        return ("candle", (item.timestamp - T0) // 60_000, int(item.volume))
    assert type(item) is OrderFlowMetrics
    return ("flow", item.window_ms // 1_000 - 1, int(item.ofi))


def ident_of_record(kind: str, data: dict[str, Any]) -> Ident:
    """The same for a dead-letter line's ``kind`` and ``data``."""
    if kind == "tick":
        return ("tick", int(data["seq"]), 0)
    if kind == "candle":
        return ("candle", (int(data["timestamp"]) - T0) // 60_000, int(data["volume"]))
    assert kind == "order_flow", kind
    return ("flow", int(data["window_ms"]) // 1_000 - 1, int(data["ofi"]))


def make_tick(seq: int) -> TickData:
    symbol = "EUR/USD" if seq % 3 else "GBP/USD"
    return TickData(symbol=symbol, timestamp=T0 + seq, bid=1.1, ask=1.1002, source="m", seq=seq)


def make_candle(index: int, version: int, *, closed: bool) -> CandleData:
    return CandleData(
        symbol="EUR/USD",
        timeframe="1m",
        timestamp=T0 + index * 60_000,
        open=1.0,
        high=2.0,
        low=0.5,
        close=1.0 + version / 1_000,
        volume=float(version),
        source="m",
        is_closed=closed,
    )


def make_flow(index: int, version: int) -> OrderFlowMetrics:
    return OrderFlowMetrics(
        symbol="EUR/USD", timestamp=T0, window_ms=(index + 1) * 1_000, ofi=float(version)
    )


async def crash(pipeline: IngestPipeline) -> None:
    """Stop ``pipeline`` as ``kill -9`` would: the writer stops wherever it is, nothing is
    closed, checkpointed or trimmed, and the kernel frees the journals' locks."""
    writer = pipeline._writer
    assert writer is not None
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    for task in list(pipeline._followups):
        task.cancel()
    journals = [pipeline.journal, *pipeline._backlog]
    for journal in {id(j): j for j in journals if j is not None}.values():
        committer = journal._committer
        journal._forget_after_fork()  # closes the segment without trimming or syncing
        journal._lock.forget()  # the last descriptor: the flock goes with it
        if committer is not None:  # idle: gives back an AIO context, ends a thread
            committer.close(journal)
            committer.stop()
    spill = pipeline._spill  # a spill the writer was waiting for fails now: look at it
    if spill is not None:
        await asyncio.wait([spill])
        if not spill.cancelled():
            spill.exception()


class ModelStorage(FakeStorage):
    """The ingest tests' in-memory database, with the real one's candle rule (a forming
    candle never replaces a closed one); ``calls`` records every write, duplicates too."""

    def __init__(self, trace: list[str]) -> None:
        super().__init__()
        self.trace = trace

    def _done(self, kind: str, items: Sequence[Any]) -> None:
        super()._done(kind, items)
        if kind != "ticks":
            self.trace.append(f"    stored {[ident(i) for i in items]}")

    async def write_candles(self, candles: Sequence[CandleData]) -> int:
        await self._enter(candles)
        for c in candles:
            key = (c.symbol, c.timeframe, c.source, c.timestamp)
            held = self.candles.get(key)
            if held is None or not held.is_closed or c.is_closed:
                self.candles[key] = c
        self._done("candles", candles)
        return len(candles)

    def row(self, kind: str, index: int) -> int | None:
        """The version a series' row holds (``None``: no row)."""
        if kind == "candle":
            candle = self.candles.get(("EUR/USD", "1m", "m", T0 + index * 60_000))
            return None if candle is None else ident(candle)[2]
        flow = self.flows.get(("EUR/USD", "sdk", T0, (index + 1) * 1_000))
        return None if flow is None else ident(flow)[2]


@dataclass
class Entry:
    """One submitted item: its mode, whether the database refuses it, what the call said."""

    item: IngestItem
    mode: WriteMode
    poison: bool
    status: Status = "pending"

    @property
    def key(self) -> Ident:
        return ident(self.item)


@dataclass
class Series:
    """A candle or order-flow key, saved in one write mode; versions 1, 2, ... in order."""

    kind: Literal["candle", "flow"]
    index: int
    mode: WriteMode
    closes_at: int  # candles: versions from this one on are closed
    versions: list[Entry]


class ModelRun:
    """One seeded sequence of operations against the write path, and the model of it."""

    def __init__(self, seed: int, root: Path, ops: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.root = root
        self.ops = ops
        self.clock = ManualClock()
        self.trace: list[str] = []
        self.storage = ModelStorage(self.trace)
        self.poison: set[Ident] = set()
        self.storage.refuse = lambda item: ident(item) in self.poison
        self.disk_full = False
        self.faults = False  # an outage or a crash happened: replays may write twice
        self.ticks: dict[int, Entry] = {}
        self.series: dict[tuple[str, int], Series] = {}
        self.generation = 0
        self.instance = ""
        self.pipeline: IngestPipeline | None = None
        self.live: list[IngestPipeline] = []
        rng = self.rng
        batch_size = rng.choice([1, 2, 4, 8])
        self.options: dict[str, Any] = {
            "batch_size": batch_size,
            "journal_batch_size": rng.choice([batch_size, 16]),
            "max_batch": batch_size * rng.choice([1, 3, 20]),
            "max_queue": rng.choice([12, 64]),
            "replay_batch": rng.choice([1, 3, 50]),
        }
        self.segment_bytes = rng.choice([1_024, 4_096, journal_module.DEFAULT_SEGMENT_BYTES])
        self.checkpoint_every = rng.choice([1, 7, 10_000])

    # ------------------------------------------------------------------ bookkeeping

    def log(self, text: str) -> None:
        self.trace.append(text)

    def entries(self) -> list[Entry]:
        out = list(self.ticks.values())
        for series in self.series.values():
            out.extend(series.versions)
        return out

    def settle_pending(self, status: Status) -> None:
        for entry in self.entries():
            if entry.status == "pending":
                entry.status = status

    def fail(self, problems: list[str]) -> None:
        tail = "\n".join(self.trace[-200:])
        options = f"{self.options} segment_bytes={self.segment_bytes} "
        options += f"checkpoint_every={self.checkpoint_every}"
        msg = f"seed {self.seed} ({options}):\n" + "\n".join(problems[:20])
        raise AssertionError(f"{msg}\n--- last operations:\n{tail}")

    # ------------------------------------------------------------------ pipelines

    async def start(self, *, same_id: bool) -> None:
        if not same_id or not self.instance:
            self.generation += 1
            self.instance = f"p{self.generation:04d}"  # in start order: ties sort right
        journal = Journal(
            self.root,
            instance_id=self.instance,
            sync="loop",
            segment_bytes=self.segment_bytes,
            checkpoint_every=self.checkpoint_every,
        )
        breaker = CircuitBreaker(
            "database", failure_threshold=2, reset_timeout=RESET, clock=self.clock
        )
        pipeline = IngestPipeline(
            self.storage,
            journal=journal,
            breaker=breaker,
            clock=self.clock,
            flush_interval=1.0,
            put_timeout=0,
            retry_attempts=2,
            retry_initial=0.0,
            retry_max_backoff=0.0,
            retry_jitter=0.0,
            orphan_scan_interval=None,
            **self.options,
        )
        await pipeline.start()
        self.pipeline = pipeline
        self.live.append(pipeline)
        self.log(f"start {self.instance}")

    def current(self) -> IngestPipeline:
        assert self.pipeline is not None
        return self.pipeline

    def check_pipeline(self, pipeline: IngestPipeline, *, may_lose: bool) -> None:
        stats = pipeline.stats()
        problems = []
        if stats.writer_errors:
            problems.append(f"{stats.writer_errors} unexpected writer error(s)")
        if stats.lost_on_close and not may_lose:
            problems.append(f"{stats.lost_on_close} item(s) lost at close")
        if problems:
            self.fail(problems)

    async def close(self) -> None:
        pipeline = self.current()
        lossy = self.disk_full and self.storage.down
        self.advance_if_up()
        await pipeline.close(timeout=WAIT)
        self.live.remove(pipeline)
        self.settle_pending("maybe" if lossy else "safe")
        self.check_pipeline(pipeline, may_lose=lossy)
        self.log(f"close {self.instance} (lossy={lossy})")

    async def crash(self) -> None:
        """Stop the pipeline as a killed process stops: no close, journals left as they are,
        their locks freed; journal-mode calls may be in flight."""
        pipeline = self.current()
        inflight: list[asyncio.Task[None]] = []
        if self.rng.random() < 0.5:
            for _ in range(self.rng.randint(1, 4)):
                entry = self.new_tick("journal")
                inflight.append(asyncio.create_task(self.submit(entry)))
            for _ in range(self.rng.randrange(4)):
                await asyncio.sleep(0)
        await crash(pipeline)
        # Calls still in flight end now: acknowledged only if their append was durable.
        await asyncio.gather(*inflight)
        self.live.remove(pipeline)
        self.settle_pending("maybe")
        self.check_pipeline(pipeline, may_lose=True)
        self.faults = True
        self.log(f"crash {self.instance} ({len(inflight)} journal call(s) in flight)")

    def advance_if_up(self) -> None:
        """Past every retry and breaker wait, so nothing waits on the manual clock."""
        if not self.storage.down:
            self.clock.advance(RESET)
            self.current().wake()

    # ------------------------------------------------------------------ items

    def new_tick(self, mode: WriteMode) -> Entry:
        seq = len(self.ticks)
        entry = Entry(make_tick(seq), mode, poison=self.rng.random() < 0.03)
        if entry.poison:
            self.poison.add(entry.key)
        self.ticks[seq] = entry
        return entry

    def new_version(self, series: Series) -> Entry:
        version = len(series.versions) + 1
        item: IngestItem
        if series.kind == "candle":
            item = make_candle(series.index, version, closed=version >= series.closes_at)
        else:
            item = make_flow(series.index, version)
        entry = Entry(item, series.mode, poison=self.rng.random() < 0.03)
        if entry.poison:
            self.poison.add(entry.key)
        series.versions.append(entry)
        return entry

    async def submit(self, entry: Entry) -> None:
        pipeline = self.current()
        try:
            await pipeline.submit(entry.item, mode=entry.mode)
        except BackpressureTimeoutError:
            entry.status = "failed"
        except JournalError:
            assert entry.mode == "journal"
            entry.status = "failed"
        except (CircuitBreakerOpenError, RetryExhaustedError):
            assert entry.mode == "sync"
            entry.status = "failed"
        except QueryExecutionError:
            assert entry.mode == "sync"
            assert entry.poison, f"{entry.key} refused but not poisoned"
            entry.status = "failed"
        else:
            entry.status = "pending" if entry.mode == "buffered" else "safe"
            if entry.mode == "sync":
                self.check_sync_stored(entry)
        self.log(f"  {entry.mode:8} {entry.key} poison={entry.poison} -> {entry.status}")

    def check_sync_stored(self, entry: Entry) -> None:
        kind, index, version = entry.key
        if kind == "tick":
            stored = any(t.seq == index for t in self.storage.ticks.values())
        else:
            stored = self.storage.row(kind, index) == version
        if not stored:
            self.fail([f"sync {entry.key} acknowledged but not in the database"])

    # ------------------------------------------------------------------ operations

    async def op_tick(self) -> None:
        mode = self.rng.choices(["buffered", "journal", "sync"], [5, 4, 1])[0]
        await self.submit(self.new_tick(mode))  # type: ignore[arg-type]

    async def op_burst(self) -> None:
        entries = [
            self.new_tick(self.rng.choice(["buffered", "journal"]))
            for _ in range(self.rng.randint(2, 6))
        ]
        self.log(f"burst of {len(entries)}")
        await asyncio.gather(*(self.submit(entry) for entry in entries))

    async def op_upsert(self, kind: Literal["candle", "flow"]) -> None:
        mine = [s for s in self.series.values() if s.kind == kind]
        if not mine or self.rng.random() < 0.15:
            index = len(mine)
            mode = self.rng.choices(["buffered", "journal", "sync"], [5, 4, 1])[0]
            series = Series(kind, index, mode, self.rng.randint(2, 12), [])  # type: ignore[arg-type]
            self.series[(kind, index)] = series
        else:
            series = self.rng.choice(mine)
        await self.submit(self.new_version(series))

    async def op_down(self) -> None:
        self.storage.down = True
        self.storage.fail_next = 0
        self.faults = True
        self.log("database down")

    async def op_up(self) -> None:
        self.storage.down = False
        self.clock.advance(RESET)
        self.current().wake()
        self.log("database up")

    async def op_transient(self) -> None:
        breaker = self.current().breaker
        if self.storage.down or breaker.state is not BreakerState.CLOSED:
            return
        if breaker.consecutive_failures:
            return
        self.storage.fail_next = 1  # the retry gets through
        self.log("one transient error")

    async def op_advance(self) -> None:
        seconds = self.rng.choice([0.3, 1.0, RESET])
        self.clock.advance(seconds)
        self.current().wake()
        self.log(f"clock +{seconds}s")

    async def op_yield(self) -> None:
        for _ in range(self.rng.randint(1, 12)):
            await asyncio.sleep(0)

    async def op_flush(self) -> None:
        if self.storage.down:
            return  # flush() waits for the database
        self.advance_if_up()
        pending = [e for e in self.entries() if e.status == "pending"]
        await self.current().flush(timeout=WAIT)
        for entry in pending:
            entry.status = "safe"
        self.log(f"flush ({len(pending)} buffered item(s) now safe)")
        self.check(final=False)

    async def op_disk(self) -> None:
        self.disk_full = not self.disk_full
        self.log(f"disk full={self.disk_full}")

    async def op_close(self) -> None:
        await self.close()
        await self.start(same_id=self.rng.random() < 0.3)

    async def op_crash(self) -> None:
        await self.crash()
        await self.start(same_id=self.rng.random() < 0.3)

    # ------------------------------------------------------------------ the run

    async def run(self) -> None:
        ops = [
            (self.op_tick, 30),
            (self.op_burst, 5),
            (lambda: self.op_upsert("candle"), 12),
            (lambda: self.op_upsert("flow"), 6),
            (self.op_down, 4),
            (self.op_up, 5),
            (self.op_transient, 2),
            (self.op_advance, 6),
            (self.op_yield, 5),
            (self.op_flush, 5),
            (self.op_disk, 2),
            (self.op_close, 2),
            (self.op_crash, 2),
        ]
        actions = [op for op, _ in ops]
        weights = [w for _, w in ops]
        await self.start(same_id=False)
        try:
            for _ in range(self.ops):
                await self.rng.choices(actions, weights)[0]()
                for _ in range(self.rng.randrange(3)):
                    await asyncio.sleep(0)
            await self.finish()
        finally:
            self.storage.down = False
            for pipeline in list(self.live):
                with contextlib.suppress(Exception):
                    await pipeline.close(timeout=5)

    async def finish(self) -> None:
        """Database up, disk fine: close, start a pipeline that adopts what is left, flush."""
        self.log("finish")
        self.disk_full = False
        self.storage.down = False
        self.storage.fail_next = 0
        self.current().wake()
        await self.close()
        await self.start(same_id=False)
        self.advance_if_up()
        await self.current().flush(timeout=WAIT)
        self.check(final=True)
        await self.close()
        left = sorted(p.name for p in self.root.iterdir() if p.name != DEAD_LETTER_DIR)
        if left:
            self.fail([f"journal folders left after the final close: {left}"])

    # ------------------------------------------------------------------ the invariants

    def check(self, *, final: bool) -> None:
        problems: list[str] = []
        stored = {t.seq for t in self.storage.ticks.values()}
        for seq, entry in self.ticks.items():
            assert entry.status != "pending", entry
            here = seq in stored
            if entry.status == "safe" and not entry.poison and not here:
                problems.append(f"tick {seq} ({entry.mode}, acknowledged) is not stored")
            if here and entry.poison:
                problems.append(f"tick {seq} ({entry.mode}) was refused but is stored")
            if here and entry.status == "failed":
                problems.append(f"tick {seq} ({entry.mode}) failed its call but is stored")
        unknown = stored - self.ticks.keys()
        if unknown:
            problems.append(f"ticks never submitted are stored: {sorted(unknown)}")
        for series in self.series.values():
            row = self.storage.row(series.kind, series.index)
            good = [
                v.key[2] for v in series.versions if v.status in ("safe", "maybe") and not v.poison
            ]
            safe = [v.key[2] for v in series.versions if v.status == "safe" and not v.poison]
            name = f"{series.kind} {series.index} ({series.mode})"
            if row is None and safe:
                problems.append(f"{name}: no row; version {max(safe)} was acknowledged")
            elif row is not None and row not in good:
                problems.append(f"{name}: holds version {row}, not an accepted one ({good})")
            elif row is not None and safe and row < max(safe):
                problems.append(f"{name}: holds version {row}, older than {max(safe)}")
        if final:
            problems += self.check_dead_letters()
            if not self.faults:
                writes = Counter(
                    t.seq for kind, items in self.storage.calls if kind == "ticks" for t in items
                )
                twice = sorted(seq for seq, n in writes.items() if n > 1)
                if twice:
                    problems.append(f"ticks written twice without any fault: {twice}")
        if problems:
            self.fail(problems)

    def check_dead_letters(self) -> list[str]:
        kept: set[Ident] = set()
        folder = self.root / DEAD_LETTER_DIR
        if folder.is_dir():
            for path in folder.glob("*.jsonl"):
                for line in path.read_bytes().splitlines():
                    record = orjson.loads(line)
                    kept.add(ident_of_record(record["kind"], record["data"]))
        problems = []
        due: list[Entry] = [
            e for e in self.ticks.values() if e.poison and e.status == "safe" and e.mode != "sync"
        ]
        for series in self.series.values():
            accepted = [v for v in series.versions if v.status in ("safe", "maybe")]
            newest = accepted[-1] if accepted else None
            if newest is not None and newest.poison and newest.status == "safe":
                due.append(newest)  # refused when written (a sync call's refusal raises)
        for entry in due:
            if entry.key not in kept:
                problems.append(f"refused {entry.key} ({entry.mode}) is not in the dead letters")
        refusable = {e.key for e in self.entries() if e.poison and e.status in ("safe", "maybe")}
        extra = kept - refusable
        if extra:
            problems.append(f"dead letters hold what was never refused: {sorted(extra)}")
        return problems


@pytest.fixture
def model_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast, crash-consistent journals: a process crash keeps what was written, so the model
    needs no fsync (the power-loss guarantee has tests of its own)."""
    monkeypatch.setattr(journal_module, "_sync", lambda fd: None)
    monkeypatch.setattr(journal_module, "_fsync_dir", lambda path: None)
    # Adopted journals are only read: no AIO context each (slow to set up and tear down).
    monkeypatch.setattr(ingest_module, "Journal", functools.partial(Journal, sync="loop"))


class InlineExecutor(ThreadPoolExecutor):
    """Runs what the journal hands to a worker thread at once, in the caller: a seed then
    replays the same interleaving (file I/O blocks the loop, which a test can afford)."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting task, as a thread would
            future.set_exception(exc)
        return future


async def run_model(seed: int, root: Path, ops: int, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    executor = InlineExecutor(max_workers=1)
    previous = loop._default_executor  # type: ignore[attr-defined]
    loop.set_default_executor(executor)
    model = ModelRun(seed, root / "journal", ops)
    real_write_group = Journal._write_group

    def write_group(journal: Journal, group: Any) -> Any:
        if model.disk_full and any(entry.payloads for entry in group):
            raise JournalError("No space left on device (model)")
        return real_write_group(journal, group)

    monkeypatch.setattr(Journal, "_write_group", write_group)
    try:
        await model.run()
    finally:
        loop._default_executor = previous  # type: ignore[attr-defined]
        executor.shutdown(wait=True)


@pytest.mark.usefixtures("model_env")
@pytest.mark.parametrize("seed", seeds([*range(QUICK_SEEDS), *REGRESSION_SEEDS]))
async def test_the_database_holds_what_was_accepted(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await run_model(
        seed, tmp_path, SLOW_OPS if seed in REGRESSION_SEEDS else QUICK_OPS, monkeypatch
    )


@pytest.mark.usefixtures("model_env")
@pytest.mark.parametrize("seed", seeds(list(range(QUICK_SEEDS))))
async def test_the_database_holds_what_was_accepted_pruning_after_every_spill(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The upsert keys spills overtook are pruned after every spill, not once thousands of
    # them pile up: what the pruning keeps must still order every copy.
    monkeypatch.setattr(ingest_module, "_OVERTAKEN_PRUNE_MIN", 0)
    await run_model(seed, tmp_path, QUICK_OPS, monkeypatch)


@pytest.mark.slow
@pytest.mark.usefixtures("model_env")
@pytest.mark.parametrize(
    "seed",
    seeds([n for n in range(QUICK_SEEDS, QUICK_SEEDS + SLOW_SEEDS) if n not in REGRESSION_SEEDS]),
)
async def test_the_database_holds_what_was_accepted_over_many_seeds(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await run_model(seed, tmp_path, SLOW_OPS, monkeypatch)


# --------------------------------------------------------------------------- defects found


async def _pipeline(
    storage: FakeStorage, clock: ManualClock, root: Path, name: str, **options: Any
) -> IngestPipeline:
    pipeline = IngestPipeline(
        storage,
        journal=Journal(root, instance_id=name, sync="loop"),
        breaker=CircuitBreaker("database", failure_threshold=2, reset_timeout=RESET, clock=clock),
        clock=clock,
        retry_attempts=2,
        retry_initial=0.0,
        retry_max_backoff=0.0,
        retry_jitter=0.0,
        orphan_scan_interval=None,
        **options,
    )
    await pipeline.start()
    return pipeline


async def test_a_crash_does_not_bring_back_a_replayed_buffered_upsert(tmp_path: Path) -> None:
    storage, clock, root = ModelStorage([]), ManualClock(), tmp_path / "journal"
    first = await _pipeline(storage, clock, root, "a", batch_size=1)
    storage.down = True
    await first.submit(make_candle(0, 1, closed=False))  # buffered: spilled to the journal
    await until(lambda: first.stats().spilled == 1)
    storage.down = False
    clock.advance(RESET)
    first.wake()
    await first.flush(timeout=WAIT)  # replayed from the journal
    await first.submit(make_candle(0, 2, closed=False))
    await first.flush(timeout=WAIT)  # stored directly
    assert storage.row("candle", 0) == 2
    await crash(first)
    second = await _pipeline(storage, clock, root, "b")  # adopts "a"
    await second.flush(timeout=WAIT)
    await second.close()
    assert storage.row("candle", 0) == 2


async def test_a_crash_after_a_spill_keeps_the_newest_journal_mode_upsert(tmp_path: Path) -> None:
    storage, clock, root = ModelStorage([]), ManualClock(), tmp_path / "journal"
    first = await _pipeline(
        storage, clock, root, "a", batch_size=2, journal_batch_size=1_000, flush_interval=3_600
    )
    storage.down = True
    storage.gate = asyncio.Event()
    await first.submit(make_tick(1))
    await first.submit(make_candle(0, 1, closed=False), mode="journal")  # LSN 1
    await first.submit(make_tick(2))  # the batch [t1, v1, t2] is taken
    await storage.entered.wait()
    await first.submit(make_candle(0, 2, closed=False), mode="journal")  # LSN 2, queued
    storage.gate.set()  # the batch fails and is spilled: t1, t2 (LSNs 3-4), no copy of v1
    await until(lambda: first.stats().spilled == 2)
    await crash(first)  # v2's second write was still queued
    storage.down = False
    storage.gate = None
    clock.advance(RESET)
    second = await _pipeline(storage, clock, root, "b")  # adopts "a"
    await second.flush(timeout=WAIT)
    await second.close()
    assert storage.row("candle", 0) == 2
