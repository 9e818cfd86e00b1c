"""Read replicas: :class:`ReplicatedStorage` routes reads to PostgreSQL hot standbys.

It implements the :class:`~data_manager.storage.base.Storage` protocol over one primary and
any number of streaming replicas:

* **Writes** (``write_*``, ``delete_range``, ``create_schema``) and ``iter_ticks`` go to the
  primary. ``iter_ticks`` holds a cursor open for as long as the caller iterates; on a standby
  such a query is the one replay cancels first (a recovery conflict), and a stream that failed
  half-way cannot be retried elsewhere without the caller seeing duplicates.
* **Reads** (``latest_*``, ``ticks_range``, ``candles_range``) go round-robin to the healthy
  replicas that hold every write this router made to the symbols read; otherwise to the
  primary. A replica that fails during a read is marked down and that read is retried on the
  primary, so a replica never turns a read that the primary could answer into an error.

**Read-your-writes.** Replicas are checked every ``lag_check_interval`` seconds (and by
:meth:`ReplicatedStorage.check_now`). Check number *k* first reads the primary's WAL
position ``P_k``, then each replica's replay position ``R``. A write that returned before
check *k* started is inside ``P_k`` (see "Positions" below), so a replica with ``R >= P_k``
has replayed it. The router remembers, per symbol, the number of the last check that had
started when its last write returned (its *mark*, an integer: no clock is involved); a replica
may serve a read of that symbol only when it has replayed ``P_k`` for some ``k > mark``. Reads
of symbols this router never wrote go to any healthy replica. So a read right after a write
goes to the primary, and moves to the replica at the first check that sees the replica
caught up, one ``lag_check_interval`` later at most if it keeps up. ``create_schema`` marks
every symbol. The guarantee is per router (per ``ReplicatedStorage``): writes made by other
processes are seen as soon as the replica replays them, like any replica read.

**Positions.** With ``synchronous_commit`` on (the default; any value but ``off``), a commit
returns after its WAL is flushed, so ``P_k`` is ``pg_current_wal_flush_lsn()``. With
``synchronous_commit = off`` a commit returns before its WAL is flushed; then ``P_k`` is
``pg_current_wal_insert_lsn()``, which covers it. That position can include WAL that no
commit has flushed yet (page-pruning records written during reads, say), which a replica only
receives once something is flushed past it: recently written symbols then stay on the
primary a little longer, which costs load, never correctness. The setting is read on every
check, in a session of the same pool the writes use, so it is the one they commit under.

**Lag.** A replica is *lagging* when its lag exceeds ``max_lag_seconds`` (or its replay is
more than ``max_lag_bytes`` behind the primary's flushed WAL). The lag is "now minus the
start of the newest check whose flushed position the replica has replayed": an upper bound,
exact to one ``lag_check_interval``, measured on this process's clock (injectable) and immune
to clock skew between servers. It is 0 for a replica that has replayed everything the
primary had flushed when the check began; an idle primary therefore never makes a replica
look stale, unlike ``now() - pg_last_xact_replay_timestamp()``, which keeps growing while
nothing is written. That server-side age is used only before the checks can bound the lag
(the replica is behind the oldest check remembered), and an unknown lag counts as lagging.
``max_lag_seconds`` must exceed ``lag_check_interval`` for that reason.

A replica is skipped while it is lagging, down (a check or a read failed or timed out),
promoted (no longer in recovery: its data may diverge from the primary's) or a copy of
another cluster (a different system identifier). Each incident is logged once when it begins
(with at most one warning per replica a minute while it flaps) and once when it ends, and
counted; :meth:`ReplicatedStorage.replica_status` reports lag, reads and incidents per
replica, and ``ping()`` includes them in its details.

Between two checks a replica's replay position is taken not to go backwards. A replica that
crashes and comes back from an earlier restart point within one interval could answer a read
with older data than the last check showed, until the next check sees it. While the primary
cannot be checked, replicas keep the visibility the last good check gave them, but not a lag
of 0: the newest position known is that of the last good check, so a replica that has
replayed it is at most "now minus that check's start" behind, and that is its lag. Once the
primary has gone unchecked for longer than ``max_lag_seconds``, every replica is lagging and
reads go to the primary; the replica's ``last_error`` says the primary could not be checked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Final, Literal, TypeVar

from data_manager.clock import Clock, SystemClock
from data_manager.errors import (
    ConfigurationError,
    DataManagerError,
    RouterClosedError,
    map_database_errors,
)
from data_manager.storage.postgres import _driver

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    import asyncpg

    from data_manager.aggregation import PriceField
    from data_manager.models import CandleData, OrderFlowMetrics, TickData
    from data_manager.storage.base import (
        BackendHealth,
        DataKind,
        PoolStatus,
        SchemaInfo,
        Storage,
        TickBucket,
    )
    from data_manager.storage.postgres import PostgresStorage

__all__ = ["PrimaryReadReason", "ReplicaStatus", "ReplicatedStorage", "SkipReason"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

SkipReason = Literal["unchecked", "down", "lagging", "promoted", "other_cluster"]
PrimaryReadReason = Literal["own_writes", "no_healthy_replica", "replica_failed"]

#: Checks remembered for the lag and visibility computations. At one check a second that is
#: over four minutes: far beyond any useful ``max_lag_seconds``; a replica further behind is
#: bounded by the server-side replay age instead.
HISTORY_SIZE: Final = 256
#: At most one warning per replica in this many seconds while it flaps between states.
WARN_INTERVAL_SECONDS: Final = 60.0
_NO_WRITE: Final = -1
# SQLSTATEs of hot-standby recovery conflicts: replay cancelled the query. The replica is
# healthy; the read is simply retried on the primary.
_RECOVERY_CONFLICT_SQLSTATES: Final = frozenset({"40001", "40P01"})
_PRIMARY_SQL: Final = (
    "SELECT pg_current_wal_insert_lsn(), pg_current_wal_flush_lsn(), "
    "current_setting('synchronous_commit') <> 'off', "
    "(SELECT system_identifier FROM pg_control_system())"
)
_REPLICA_SQL: Final = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), "
    "EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8, "
    "(SELECT system_identifier FROM pg_control_system())"
)


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as the router sees it (for health and metrics).

    Attributes:
        target: ``postgresql host:port/database`` (never a password).
        healthy: Whether reads may go to it now.
        lag_seconds: Upper bound of its lag (0 when caught up); None when unknown.
        lag_bytes: WAL bytes it has yet to replay of what the primary had flushed at the
            last check; None when unknown.
        skipped_reason: Why reads skip it; None when healthy.
        reads: Reads it answered.
        errors: Checks and reads that failed on it.
        incidents: Times it went from healthy to skipped.
        last_error: The last failure or refusal (down, promoted, other cluster, or lagging
            because the primary's WAL position could not be read), one line.
    """

    target: str
    healthy: bool
    lag_seconds: float | None
    lag_bytes: int | None
    skipped_reason: SkipReason | None
    reads: int
    errors: int
    incidents: int
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class _Check:
    """What the primary reported at the start of one check."""

    seq: int
    at: float  # clock.monotonic() when the check started
    visible: int  # every write returned before the check is at or below this LSN
    flushed: int  # the primary's flushed WAL


class _Replica:
    """Mutable routing state of one replica."""

    __slots__ = (
        "connected",
        "errors",
        "incidents",
        "lag_bytes",
        "lag_seconds",
        "last_error",
        "last_warned",
        "logged",
        "reads",
        "reason",
        "storage",
        "suppressed",
        "visible_seq",
    )

    def __init__(self, storage: PostgresStorage) -> None:
        self.storage = storage
        self.connected = False
        self.reason: SkipReason | None = "unchecked"
        self.visible_seq = _NO_WRITE  # newest check whose writes it has replayed
        self.lag_seconds: float | None = None
        self.lag_bytes: int | None = None
        self.reads = 0
        self.errors = 0
        self.incidents = 0
        self.last_error: str | None = None
        self.last_warned: float | None = None
        self.logged = False  # the current incident's start was logged
        self.suppressed = 0

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            target=self.storage.target,
            healthy=self.reason is None,
            lag_seconds=self.lag_seconds,
            lag_bytes=self.lag_bytes,
            skipped_reason=self.reason,
            reads=self.reads,
            errors=self.errors,
            incidents=self.incidents,
            last_error=self.last_error,
        )


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE somewhere down the cause chain of an SDK error, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        for candidate in (seen, getattr(seen, "orig", None)):
            state = getattr(candidate, "sqlstate", None)
            if isinstance(state, str):
                return state
        seen = seen.__cause__
    return None


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


async def _fetchrow(storage: PostgresStorage, sql: str, budget: float) -> asyncpg.Record:
    """Run one diagnostic statement on a pooled connection of ``storage``.

    Goes underneath the storage's public API (the read and write methods) on purpose: the
    WAL positions must come from the same pool, and so the same sessions, as the writes.
    """
    with map_database_errors(target=storage.target, timeout_seconds=budget):
        async with asyncio.timeout(budget), storage._pooled() as raw:
            row = await _driver(raw).fetchrow(sql)
    assert row is not None  # a SELECT without FROM always returns one row
    return row


class ReplicatedStorage:
    """:class:`~data_manager.storage.base.Storage` over a PostgreSQL primary and its replicas.

    Args:
        primary: Where writes, schema changes and the reads replicas cannot serve go.
        replicas: Streaming replicas (hot standbys) of ``primary``, each with its own pool.
        max_lag_seconds: A replica further behind than this is skipped.
        max_lag_bytes: ...or further behind than this many WAL bytes; None: no byte bound.
        lag_check_interval: Seconds between background checks; None starts no background
            task (call :meth:`check_now`).
        check_timeout: Time budget of one check, per server.
        clock: Monotonic clock for lag and log rate limits (injectable for tests).

    Raises:
        ConfigurationError: A bound is not positive, or ``max_lag_seconds`` does not exceed
            ``lag_check_interval`` (the lag is only known to within one interval).

    The object owns every storage passed in: :meth:`connect` opens them and :meth:`close`
    closes them.
    """

    def __init__(
        self,
        primary: PostgresStorage,
        replicas: Sequence[PostgresStorage],
        *,
        max_lag_seconds: float = 5.0,
        max_lag_bytes: int | None = None,
        lag_check_interval: float | None = 1.0,
        check_timeout: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        if max_lag_seconds <= 0 or check_timeout <= 0:
            msg = "max_lag_seconds and check_timeout must be positive"
            raise ConfigurationError(msg)
        if max_lag_bytes is not None and max_lag_bytes < 0:
            msg = f"max_lag_bytes must be >= 0 (got {max_lag_bytes})"
            raise ConfigurationError(msg)
        if lag_check_interval is not None and not 0 < lag_check_interval < max_lag_seconds:
            msg = (
                f"lag_check_interval ({lag_check_interval}s) must be positive and below "
                f"max_lag_seconds ({max_lag_seconds}s): lag is measured to within one interval"
            )
            raise ConfigurationError(msg)
        self._primary = primary
        self._replicas = tuple(_Replica(r) for r in replicas)
        self._max_lag = max_lag_seconds
        self._max_lag_bytes = max_lag_bytes
        self._interval = lag_check_interval
        self._check_timeout = check_timeout
        self._clock: Clock = clock or SystemClock()
        self._state = _State.NEW
        self._task: asyncio.Task[None] | None = None
        self._check_lock = asyncio.Lock()
        self._seq = 0  # number of the check in progress or last started
        self._history: collections.deque[_Check] = collections.deque(maxlen=HISTORY_SIZE)
        self._system_id: int | None = None
        self._primary_error: str | None = None  # why this check could not read the primary
        self._marks: dict[str, int] = {}  # symbol -> check number when its last write returned
        self._global_mark = _NO_WRITE  # the same for writes that touch every symbol (DDL)
        self._healthy: tuple[_Replica, ...] = ()
        self._next = 0  # round-robin position
        self._primary_reads: dict[PrimaryReadReason, int] = {
            "own_writes": 0,
            "no_healthy_replica": 0,
            "replica_failed": 0,
        }

    def __repr__(self) -> str:
        return (
            f"<ReplicatedStorage {self.target} replicas={len(self._replicas)} "
            f"healthy={len(self._healthy)} {self._state.value}>"
        )

    async def __aenter__(self) -> ReplicatedStorage:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ identity

    @property
    def kind(self) -> str:
        """``"postgresql"``."""
        return "postgresql"

    @property
    def target(self) -> str:
        """The primary's target (never a password)."""
        return self._primary.target

    @property
    def primary(self) -> PostgresStorage:
        """The primary storage (for reads a route pins to it)."""
        return self._primary

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Connect the primary, check every replica once, start the background checks.

        A replica that cannot be reached does not fail this call: it is reported down and
        retried at every check.

        Raises:
            DatabaseConnectionError: The primary is unreachable.
            RouterClosedError: The storage was closed.
        """
        if self._state is _State.CLOSED:
            msg = f"storage {self.target} is closed"
            raise RouterClosedError(msg)
        await self._primary.connect()
        self._state = _State.OPEN
        await self.check_now()
        if self._interval is not None and self._task is None:
            self._task = asyncio.create_task(
                self._check_forever(self._interval), name="data_manager replica checks"
            )

    async def close(self) -> None:
        """Stop the checks and close every connection. Idempotent."""
        self._state = _State.CLOSED
        self._healthy = ()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(self._primary.close(), *(r.storage.close() for r in self._replicas))

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's connections and checks without touching them."""
        self._state = _State.CLOSED
        self._healthy = ()
        self._task = None  # it belongs to the parent's event loop
        self._primary.reset_after_fork()
        for replica in self._replicas:
            replica.storage.reset_after_fork()

    async def create_schema(self) -> SchemaInfo:
        """Create or migrate the tables on the primary; replicas get them by replication."""
        try:
            return await self._primary.create_schema()
        finally:
            self._global_mark = self._seq

    # ------------------------------------------------------------------ health

    async def ping(self) -> BackendHealth:
        """The primary's ping, with every replica's status under ``details["replicas"]``."""
        health = await self._primary.ping()
        details = dict(health.details)
        details["replicas"] = [asdict(status) for status in self.replica_status()]
        return replace(health, details=details)

    def pool_status(self) -> PoolStatus:
        """The primary's pool (no I/O)."""
        return self._primary.pool_status()

    def replica_status(self) -> list[ReplicaStatus]:
        """Each replica's health, lag and counters as of the last check (no I/O)."""
        return [replica.status() for replica in self._replicas]

    def primary_reads(self) -> dict[PrimaryReadReason, int]:
        """Reads the primary answered, by why no replica did (no I/O).

        ``own_writes``: every healthy replica may still miss this router's last write of a
        symbol read; ``no_healthy_replica``: every replica was skipped; ``replica_failed``: the
        replica chosen failed and the read was retried on the primary.
        """
        return dict(self._primary_reads)

    async def check_now(self) -> list[ReplicaStatus]:
        """Check the primary's WAL position and every replica now; return their status.

        Never raises for an unreachable server: the replica is reported down, and a primary
        that cannot be checked leaves the replicas' visibility where it was.
        """
        async with self._check_lock:
            await self._check()
        return self.replica_status()

    async def _check_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_now()
            except Exception as exc:
                # A bug here must not leave replicas marked healthy with nobody checking:
                # reads fall back to the primary until a check passes again.
                logger.exception("replica check failed; reads go to the primary")
                for replica in self._replicas:
                    self._skip(replica, "unchecked", _one_line(exc))
                self._rebuild_healthy()

    async def _check(self) -> None:
        if self._state is not _State.OPEN:
            return
        self._seq += 1
        seq = self._seq
        started = self._clock.monotonic()
        try:
            insert, flush, sync_commit, system_id = await _fetchrow(
                self._primary, _PRIMARY_SQL, self._check_timeout
            )
        except (DataManagerError, TimeoutError) as exc:
            self._primary_error = _one_line(exc) or "check timed out"
            logger.debug("cannot read the primary's WAL position: %s", self._primary_error)
        else:
            self._primary_error = None
            if system_id != self._system_id or (
                self._history and insert < self._history[-1].visible
            ):
                # Another cluster, or WAL went backwards (restored, failed over): positions
                # read before mean nothing against the new one.
                self._history.clear()
            self._system_id = system_id
            visible = flush if sync_commit else insert
            self._history.append(_Check(seq=seq, at=started, visible=visible, flushed=flush))
        await asyncio.gather(*(self._check_replica(r) for r in self._replicas))
        self._rebuild_healthy()

    async def _check_replica(self, replica: _Replica) -> None:
        try:
            if not replica.connected:
                async with asyncio.timeout(self._check_timeout):
                    await replica.storage.connect()
                replica.connected = True
            in_recovery, replayed, replay_age, system_id = await _fetchrow(
                replica.storage, _REPLICA_SQL, self._check_timeout
            )
        except (DataManagerError, TimeoutError) as exc:
            replica.errors += 1
            self._skip(replica, "down", _one_line(exc) or "check timed out")
            return
        if self._system_id is not None and system_id != self._system_id:
            detail = f"system identifier {system_id} is not the primary's {self._system_id}"
            self._skip(replica, "other_cluster", detail)
            return
        if not in_recovery or replayed is None:
            self._skip(replica, "promoted", "not in recovery: it accepts writes of its own")
            return
        self._measure(replica, replayed, replay_age)
        too_far = replica.lag_seconds is None or replica.lag_seconds > self._max_lag
        if self._max_lag_bytes is not None and replica.lag_bytes is not None:
            too_far = too_far or replica.lag_bytes > self._max_lag_bytes
        if too_far:
            lag = "unknown" if replica.lag_seconds is None else f"{replica.lag_seconds:.3f}s"
            detail = f"lag {lag}, {replica.lag_bytes} bytes"
            unchecked = self._primary_unchecked_for()
            if unchecked is not None:
                detail = (
                    f"{detail} (the primary's WAL position has not been read for "
                    f"{unchecked:.3f}s: {self._primary_error})"
                )
            self._skip(replica, "lagging", detail, primary_unchecked=unchecked is not None)
            return
        self._back(replica)

    def _measure(self, replica: _Replica, replayed: int, replay_age: float | None) -> None:
        """Set the replica's visible check, lag in seconds and lag in bytes from ``replayed``."""
        now = self._clock.monotonic()
        history = self._history
        replica.visible_seq = _NO_WRITE
        for check in reversed(history):
            if check.visible <= replayed:
                replica.visible_seq = check.seq
                break
        # Only a fallback (see the module docstring); clock skew can make it negative.
        replica.lag_seconds = None if replay_age is None else max(0.0, replay_age)
        for check in reversed(history):
            if check.flushed <= replayed:
                # 0 only against this very check's position. When this check could not read
                # the primary, the newest position known may be long past: the replica is
                # then behind by up to the time since that check started, not by nothing.
                current = check is history[-1] and check.seq == self._seq
                replica.lag_seconds = 0.0 if current else max(0.0, now - check.at)
                break
        replica.lag_bytes = max(0, history[-1].flushed - replayed) if history else None

    def _primary_unchecked_for(self) -> float | None:
        """Seconds since the last check that read the primary, when this one could not."""
        if self._primary_error is None:
            return None
        if not self._history:
            return None
        return max(0.0, self._clock.monotonic() - self._history[-1].at)

    def _skip(
        self, replica: _Replica, reason: SkipReason, detail: str, *, primary_unchecked: bool = False
    ) -> None:
        """Take ``replica`` out of rotation; log when an incident starts (rate-limited)."""
        previous = replica.reason
        replica.reason = reason
        if reason != "lagging":  # lag is only measured on a reachable replica of the primary
            replica.lag_seconds = replica.lag_bytes = None
            replica.last_error = detail
        elif primary_unchecked:  # the lag grows because the primary cannot be checked: say so
            replica.last_error = detail
        if previous == reason:
            return
        if previous is None:
            replica.incidents += 1
        if self._may_log(replica):
            replica.logged = True
            logger.warning(
                "replica %s skipped (%s): %s; its reads go to the primary%s",
                replica.storage.target,
                reason,
                detail,
                self._suppressed_note(replica),
            )

    def _back(self, replica: _Replica) -> None:
        replica.reason = None
        if replica.logged:  # the end of every incident whose start was logged
            replica.logged = False
            logger.info(
                "replica %s is back (lag %.3fs); reads go to it again%s",
                replica.storage.target,
                replica.lag_seconds,
                self._suppressed_note(replica),
            )

    def _may_log(self, replica: _Replica) -> bool:
        """At most one warning per replica per :data:`WARN_INTERVAL_SECONDS`: a flapping
        replica must not flood the log (the next warning counts what was left out)."""
        now = self._clock.monotonic()
        if replica.last_warned is not None and now - replica.last_warned < WARN_INTERVAL_SECONDS:
            replica.suppressed += 1
            return False
        replica.last_warned = now
        return True

    @staticmethod
    def _suppressed_note(replica: _Replica) -> str:
        count, replica.suppressed = replica.suppressed, 0
        return f" ({count} earlier changes not logged)" if count else ""

    def _rebuild_healthy(self) -> None:
        # Replaced, never mutated: a read in flight keeps the tuple it took.
        self._healthy = tuple(r for r in self._replicas if r.reason is None)

    # ------------------------------------------------------------------ routing

    def _mark(self, symbols: Iterable[str]) -> None:
        seq = self._seq
        marks = self._marks
        for symbol in symbols:
            marks[symbol] = seq

    def _choose(self, symbols: Iterable[str]) -> _Replica | None:
        """A healthy replica that holds this router's writes of ``symbols``, or None."""
        healthy = self._healthy
        if not healthy:
            self._primary_reads["no_healthy_replica"] += 1
            return None
        need = self._global_mark
        marks = self._marks
        if marks:
            for symbol in symbols:
                mark = marks.get(symbol, _NO_WRITE)
                if mark > need:
                    need = mark
        count = len(healthy)
        start = self._next % count
        self._next = start + 1
        for offset in range(count):
            replica = healthy[(start + offset) % count]
            if need == _NO_WRITE or replica.visible_seq > need:
                return replica
        self._primary_reads["own_writes"] += 1
        return None

    async def _read(self, symbols: Iterable[str], read: Callable[[Storage], Awaitable[T]]) -> T:
        if self._state is not _State.OPEN:
            msg = f"storage {self.target} is {self._state.value}; call connect() first"
            raise RouterClosedError(msg)
        replica = self._choose(symbols)
        if replica is not None:
            try:
                result = await read(replica.storage)
            except DataManagerError as exc:
                self._read_failed(replica, exc)
            else:
                replica.reads += 1
                return result
        return await read(self._primary)

    def _read_failed(self, replica: _Replica, exc: DataManagerError) -> None:
        replica.errors += 1
        self._primary_reads["replica_failed"] += 1
        if _sqlstate(exc) in _RECOVERY_CONFLICT_SQLSTATES:
            # Replay needed the rows this query was reading; the replica itself is fine.
            logger.debug("recovery conflict on %s; read retried on the primary", exc)
            return
        self._skip(replica, "down", _one_line(exc))
        self._rebuild_healthy()

    # ------------------------------------------------------------------ writes (primary)

    async def write_ticks(self, ticks: Sequence[TickData]) -> int:
        """Write on the primary (see :meth:`PostgresStorage.write_ticks`)."""
        try:
            return await self._primary.write_ticks(ticks)
        finally:
            # Also after a failure: the commit may have happened before the error.
            self._mark({t.symbol for t in ticks})

    async def write_candles(self, candles: Sequence[CandleData]) -> int:
        """Write on the primary (see :meth:`PostgresStorage.write_candles`)."""
        try:
            return await self._primary.write_candles(candles)
        finally:
            self._mark({c.symbol for c in candles})

    async def write_order_flow(self, metrics: Sequence[OrderFlowMetrics]) -> int:
        """Write on the primary (see :meth:`PostgresStorage.write_order_flow`)."""
        try:
            return await self._primary.write_order_flow(metrics)
        finally:
            self._mark({m.symbol for m in metrics})

    async def delete_range(
        self,
        symbol: str,
        start_ms: int,
        end_ms: int,
        kind: DataKind,
        *,
        timeframe: str | None = None,
    ) -> int:
        """Delete on the primary (see :meth:`PostgresStorage.delete_range`)."""
        try:
            return await self._primary.delete_range(
                symbol, start_ms, end_ms, kind, timeframe=timeframe
            )
        finally:
            self._mark((symbol,))

    def iter_ticks(
        self,
        symbol: str,
        start_ms: int,
        end_ms: int,
        *,
        source: str | None = None,
        batch_size: int = 10_000,
        received_before: int | None = None,
    ) -> AsyncGenerator[TickData, None]:
        """Stream from the primary (see the module docstring for why not a replica)."""
        return self._primary.iter_ticks(
            symbol,
            start_ms,
            end_ms,
            source=source,
            batch_size=batch_size,
            received_before=received_before,
        )

    async def aggregate_tick_buckets(
        self,
        symbol: str,
        timeframe: str,
        start_ms: int,
        end_ms: int,
        *,
        price: PriceField,
        source: str | None = None,
        received_before: int | None = None,
    ) -> list[TickBucket]:
        """Aggregate on the primary, like ``iter_ticks``: a rebuild reads right after its
        flush, and its long statements are the ones a standby's replay cancels first."""
        return await self._primary.aggregate_tick_buckets(
            symbol,
            timeframe,
            start_ms,
            end_ms,
            price=price,
            source=source,
            received_before=received_before,
        )

    # ------------------------------------------------------------------ reads (replicas)

    async def latest_tick(self, symbol: str, *, source: str | None = None) -> TickData | None:
        """Newest tick of ``symbol``, from a replica when one holds this router's writes."""
        return await self._read((symbol,), lambda s: s.latest_tick(symbol, source=source))

    async def latest_ticks(self, symbols: Sequence[str]) -> dict[str, TickData]:
        """Newest tick of each symbol; a replica serves only if it holds all of them."""
        return await self._read(symbols, lambda s: s.latest_ticks(symbols))

    async def latest_candles(
        self,
        symbol: str,
        timeframe: str,
        limit: int,
        *,
        source: str | None = None,
        preferred_sources: Sequence[str] = (),
    ) -> list[CandleData]:
        """The newest ``limit`` candles, oldest to newest."""
        return await self._read(
            (symbol,),
            lambda s: s.latest_candles(
                symbol, timeframe, limit, source=source, preferred_sources=preferred_sources
            ),
        )

    async def latest_candles_many(
        self,
        keys: Sequence[tuple[str, str]],
        limit: int,
        *,
        preferred_sources: Sequence[str] = (),
    ) -> dict[tuple[str, str], list[CandleData]]:
        """:meth:`latest_candles` for many (symbol, timeframe) keys."""
        return await self._read(
            (symbol for symbol, _ in keys),
            lambda s: s.latest_candles_many(keys, limit, preferred_sources=preferred_sources),
        )

    async def ticks_range(
        self,
        symbol: str,
        start_ms: int,
        end_ms: int,
        *,
        source: str | None = None,
        limit: int | None = None,
    ) -> list[TickData]:
        """Ticks with ``start_ms <= ts < end_ms``, oldest first."""
        return await self._read(
            (symbol,),
            lambda s: s.ticks_range(symbol, start_ms, end_ms, source=source, limit=limit),
        )

    async def candles_range(
        self,
        symbol: str,
        timeframe: str,
        start_ms: int,
        end_ms: int,
        *,
        source: str | None = None,
        preferred_sources: Sequence[str] = (),
    ) -> list[CandleData]:
        """Candles with ``start_ms <= ts < end_ms``, oldest first."""
        return await self._read(
            (symbol,),
            lambda s: s.candles_range(
                symbol,
                timeframe,
                start_ms,
                end_ms,
                source=source,
                preferred_sources=preferred_sources,
            ),
        )

    async def latest_order_flow(
        self, symbol: str, *, source: str | None = None
    ) -> OrderFlowMetrics | None:
        """Newest order-flow metrics of ``symbol``."""
        return await self._read((symbol,), lambda s: s.latest_order_flow(symbol, source=source))
