"""The cache bus: the fast write path to L2 and the pub/sub feed into every router's L1.

Publishing. :meth:`CacheBus.publish` is synchronous and never blocks: it puts the item into
a coalescing map keyed by (kind, symbol, source) — plus (timeframe, bucket) for candles —
where a newer value replaces an older one under the same compare-and-set rule as the
caches. A background sender wakes as soon as something is pending and sends **one
pipeline per batch**, on a connection of its own outside the cache's pool: the batch's
write-script calls (L2, compare-and-set) followed by one ``PUBLISH`` of the whole batch on
``<prefix>:v1:bus``. While a pipeline is in flight new updates keep coalescing, so under
load each symbol costs one write per round trip however fast it ticks. Ticks go first, in
batches of their own: derived data (candles, order flow) arrives in bursts from the
router's publish timers and is sent in chunks of at most ``derived_batch`` items, and ticks
that arrive meanwhile are sent before the next chunk, so a burst delays a tick by at most
one chunk's round trip. This path is independent of
database batching. When L2 is down the sender drops what is pending — the cache is optional
and the database path is separate — counts it, and logs once per incident.

A latest value lost that way is healed by the next update of its key, but a quiet key may
get none for as long as L2 keeps it (an hour by default), and L2 would serve the older value
all that time. So the bus remembers the keys ``(kind, symbol, source)`` of the latest values
it dropped (at most ``max_owed_keys``, the oldest forgotten beyond that) and, once a batch
reaches L2 again, hands them to ``on_resumed``: the router then sends the database's newest
value of each (see ``DataRouter._refresh_l2``).

Candles are kept instead: a lost candle would stay a gap in every ring once the next
bucket is appended, and rings are served as whole answers. So when a batch fails because
L2 is unreachable (not when it refuses a call), its candles are kept and go first in the
next batch of derived data that is sent, to L2 and to every router's L1 as usual; a newer
version of the same bucket published meanwhile replaces the kept one. At most
``max_retained_candles`` are kept; the oldest beyond that are given up, and their series
are reset instead: the next batch that reaches L2 deletes their rings and floors (the next
read refills them from the database) and names them in the message's ``gaps``, so every
other router drops its ring of them before applying the items (through ``on_gaps``, or
without one by clearing L1 through ``on_lost`` and ``on_restored``).

The message is the codec's ``bus`` object: ``{"v":1,"type":"bus","origin":<router id>,
"items":[...]}``, whose items are the very bytes written to L2.

Subscribing. :meth:`CacheBus.start` opens a dedicated connection (outside the pool),
subscribes to the channel and reads it in a task, handing every decoded batch from another
router to ``on_items`` (the router applies it to L1, compare-and-set). Its own messages are
recognised by their first bytes and skipped unparsed. A malformed message is counted and
skipped; it never stops the reader.

Coherence. When the subscription drops, ``on_lost`` is called (the router clears L1 and
stops serving from it), the reader retries with capped exponential backoff and jitter, and
``on_restored`` is called once it is subscribed again. A connection that dies silently (no
FIN, e.g. a network partition) is detected by a PING after ``reconnect_check_seconds / 2``
of silence that gets no answer within another half interval. Hence, once writes stop, two
routers agree within ``reconnect_check_seconds`` (noticing a dead subscription) plus the L1
TTL (an update that never reached L2, e.g. while it was down, is only forgotten when the
entry expires).

Fork safety. In a forked child call :meth:`CacheBus.reset_after_fork` (and
:meth:`RedisCache.reset_after_fork <data_manager.cache.redis.RedisCache.reset_after_fork>`):
the inherited tasks and connection are abandoned untouched, the router id changes (else
the parent would take the child's messages for its own), and the next ``publish`` or
``start`` creates new ones in the child's event loop.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from data_manager.cache.codec import (
    CacheItem,
    bus_prefix,
    decode_bus_message,
    encode_bus_message,
    tie_rank,
)
from data_manager.cache.redis import map_redis_errors
from data_manager.errors import CacheError, CacheUnavailableError, ConfigurationError
from data_manager.models import CandleData, OrderFlowMetrics, TickData

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from data_manager.cache.redis import RedisCache

__all__ = ["BusStats", "CacheBus"]

logger = logging.getLogger(__name__)

OnItems: TypeAlias = Callable[[Sequence[CacheItem]], None]
#: (symbol, timeframe, source) of a candle series.
Series: TypeAlias = tuple[str, str, str]
OnGaps: TypeAlias = Callable[[Sequence[Series]], None]
#: A latest value's key: its type (TickData or OrderFlowMetrics), symbol and source.
LatestKey: TypeAlias = tuple[type[Any], str, str]
OnResumed: TypeAlias = Callable[[Sequence[LatestKey]], None]
#: Keys of dropped latest values remembered for ``on_resumed`` by default.
MAX_OWED_KEYS: Final = 10_000

_MAX_BACKOFF_EXPONENT: Final = 30
# Fraction of the poll interval accepted as "a whole interval": timers may fire a hair early.
_TIMER_SLACK: Final = 0.9


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class BusStats:
    """A snapshot of the bus counters."""

    published: int
    coalesced: int
    messages_sent: int
    dropped: int
    received: int
    own_skipped: int
    malformed: int
    callback_errors: int
    lost: int
    restored: int
    connected: bool
    retried: int = 0
    """Candle updates sent again after the batch carrying them failed."""
    reset_series: int = 0
    """Candle series reset in L2 and the other routers' L1 after updates were given up."""
    owed_forgotten: int = 0
    """Keys of dropped latest values forgotten beyond ``max_owed_keys`` (not refreshed)."""


class _Counters:
    __slots__ = (
        "callback_errors",
        "coalesced",
        "dropped",
        "lost",
        "malformed",
        "messages_sent",
        "owed_forgotten",
        "own_skipped",
        "published",
        "received",
        "reset_series",
        "restored",
        "retried",
    )

    def __init__(self) -> None:
        self.published = 0
        self.coalesced = 0
        self.messages_sent = 0
        self.dropped = 0
        self.received = 0
        self.own_skipped = 0
        self.malformed = 0
        self.callback_errors = 0
        self.lost = 0
        self.restored = 0
        self.retried = 0
        self.reset_series = 0
        self.owed_forgotten = 0


def _new_origin() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _candle_key(candle: CandleData) -> tuple[Any, ...]:
    """A candle's coalescing key: its series and bucket."""
    return (candle.symbol, candle.source, candle.timeframe, candle.timestamp)


def _replaces(new: CacheItem, old: CacheItem) -> bool:
    """Whether ``new`` supersedes the pending ``old`` with the same coalescing key."""
    if type(new) is CandleData:
        # Same bucket: anything but a forming candle over a closed one.
        return new.is_closed or not old.is_closed  # type: ignore[union-attr]
    if new.timestamp != old.timestamp:
        return new.timestamp > old.timestamp
    # The order L1 and L2 apply, so coalescing never sends what they would refuse.
    return tie_rank(new) >= tie_rank(old)  # type: ignore[arg-type]


class CacheBus:
    """Fast write path to L2 plus the pub/sub subscription that keeps L1 coherent.

    Args:
        cache: The L2 cache whose pool, script and breaker the sender uses.
        origin: This router's id, carried by every message it sends; default
            ``"<pid>-<random>"``.
        reconnect_check_seconds: Bound on the time to notice a silently dead subscription.
        max_batch: Most ticks per pipeline (and per message).
        derived_batch: Most candles and order-flow values per pipeline; ticks pending
            after one such pipeline are sent before the next.
        linger_seconds: Wait this long after a wake-up before sending, to coalesce more
            (0: send at once; batches still form while a pipeline is in flight).
        backoff_initial: First resubscribe delay, seconds.
        backoff_max: Cap of the resubscribe delay, seconds.
        validate: Fully validate received items (for channels other programs write to).
        rng: Jitter source (tests pass a seeded one).
        close_timeout: How long :meth:`aclose` waits for pending updates to be sent.
        max_retained_candles: Most candle updates kept for a retry after failed batches.
        max_owed_keys: Most keys of dropped latest values remembered for ``on_resumed``.
        retry_seconds: After a batch L2 did not take, try again this long later if no new
            update has sent what it left (kept candles, series to reset, owed keys).

    Raises:
        ConfigurationError: A bound is not positive.
    """

    def __init__(
        self,
        cache: RedisCache,
        *,
        origin: str | None = None,
        reconnect_check_seconds: float = 1.0,
        max_batch: int = 256,
        derived_batch: int = 64,
        linger_seconds: float = 0.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        validate: bool = False,
        rng: random.Random | None = None,
        close_timeout: float = 1.0,
        max_retained_candles: int = 4096,
        max_owed_keys: int = MAX_OWED_KEYS,
        retry_seconds: float = 1.0,
    ) -> None:
        if not (
            reconnect_check_seconds > 0
            and backoff_initial > 0
            and backoff_max > 0
            and retry_seconds > 0
        ):
            msg = (
                "reconnect_check_seconds, backoff_initial, backoff_max and retry_seconds "
                "must be > 0"
            )
            raise ConfigurationError(msg)
        if (
            max_batch < 1
            or derived_batch < 1
            or linger_seconds < 0
            or max_retained_candles < 0
            or max_owed_keys < 0
        ):
            msg = (
                "max_batch and derived_batch must be >= 1, linger_seconds, "
                f"max_retained_candles and max_owed_keys >= 0, got {max_batch}, "
                f"{derived_batch}, {linger_seconds}, {max_retained_candles}, {max_owed_keys}"
            )
            raise ConfigurationError(msg)
        self._cache = cache
        self._check = reconnect_check_seconds
        self._max_batch = max_batch
        self._derived_batch = derived_batch
        self._linger = linger_seconds
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._validate = validate
        self._rng = rng or random.Random()
        self._close_timeout = close_timeout
        self._max_retained = max_retained_candles
        self._max_owed = max_owed_keys
        self._retry_seconds = retry_seconds
        self._abandoned: list[object] = []
        self._origin = origin or _new_origin()
        self._init_runtime()

    def _init_runtime(self) -> None:
        """Per-process state: rebuilt after a fork."""
        self._prefix = bus_prefix(self._origin)
        self._state = _State.NEW
        # Coalescing maps: ticks, and derived data (sent after pending ticks).
        self._ticks: dict[tuple[Any, ...], CacheItem] = {}
        self._derived: dict[tuple[Any, ...], CacheItem] = {}
        # Candles of failed batches, by their coalescing key, oldest first; and the series
        # to reset because some of their candles were given up (an ordered set).
        self._retained: dict[tuple[Any, ...], CacheItem] = {}
        self._gaps: dict[Series, None] = {}
        # Keys of the latest values dropped since the last batch that reached L2, oldest
        # first (an ordered set): owed to on_resumed.
        self._owed: dict[LatestKey, None] = {}
        # The wake-up that retries what a failed batch left, when no update comes to.
        self._retry: asyncio.TimerHandle | None = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None
        self._connected = False
        self._dropping = False
        self._counters = _Counters()
        self._on_items: OnItems | None = None
        self._on_lost: Callable[[], None] | None = None
        self._on_restored: Callable[[], None] | None = None
        self._on_gaps: OnGaps | None = None
        self._on_resumed: OnResumed | None = None

    # ------------------------------------------------------------------ properties

    @property
    def origin(self) -> str:
        """This router's id on the bus."""
        return self._origin

    @property
    def channel(self) -> str:
        """The pub/sub channel, ``<prefix>:v1:bus``."""
        return self._cache.channel

    @property
    def connected(self) -> bool:
        """True while the subscription is established."""
        return self._connected

    @property
    def pending(self) -> int:
        """Coalesced updates waiting for the sender."""
        return len(self._ticks) + len(self._derived)

    def stats(self) -> BusStats:
        """Counters of both directions and the subscription state."""
        c = self._counters
        return BusStats(
            published=c.published,
            coalesced=c.coalesced,
            messages_sent=c.messages_sent,
            dropped=c.dropped,
            received=c.received,
            own_skipped=c.own_skipped,
            malformed=c.malformed,
            callback_errors=c.callback_errors,
            lost=c.lost,
            restored=c.restored,
            connected=self._connected,
            retried=c.retried,
            reset_series=c.reset_series,
            owed_forgotten=c.owed_forgotten,
        )

    # ------------------------------------------------------------------ publishing

    def publish(self, item: CacheItem) -> None:
        """Queue ``item`` for L2 and the other routers; returns at once.

        Must be called from the event loop's thread. On a closed bus the item is counted
        as dropped.

        Raises:
            CacheError: ``item`` is not a TickData, CandleData or OrderFlowMetrics.
        """
        cls = type(item)
        key: tuple[Any, ...]
        if cls is TickData:
            key = (item.symbol, item.source)
            pending = self._ticks
        elif cls is CandleData:
            key = _candle_key(item)  # type: ignore[arg-type]
            pending = self._derived
        elif cls is OrderFlowMetrics:
            key = (item.symbol, item.source)
            pending = self._derived
        else:
            msg = f"cannot publish {cls.__name__} on the cache bus"
            raise CacheError(msg)
        if self._state is _State.CLOSED:
            self._counters.dropped += 1
            return
        old = pending.get(key)
        if old is not None:
            self._counters.coalesced += 1
            if not _replaces(item, old):
                return
        pending[key] = item
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_loop(), name=f"data_manager cache bus sender {self._origin}"
            )
        self._idle.clear()
        self._wakeup.set()

    async def send(self, items: Sequence[CacheItem], *, per_source: bool = False) -> None:
        """Write and announce ``items`` now, in one pipeline outside the coalescing and
        the sender (on a pooled connection): for a caller that must know they landed.

        ``per_source``: latest values known newest for their source only (see
        :meth:`RedisCache.write_op`); they never write a symbol's any-source key.

        Raises:
            CacheUnavailableError: Unreachable, too slow, or the cache's breaker is open.
            CacheError: The server refused a call, or an item is not a cache item.
        """
        cache = self._cache
        ops = [cache.write_op(item, per_source=per_source) for item in items]
        message = encode_bus_message(self._prefix, [op.payload for op in ops], [])
        await cache.apply(ops, publish=(cache.channel, message))
        self._counters.published += len(items)
        self._counters.messages_sent += 1

    async def flush(self) -> None:
        """Wait until every update published so far has been sent (or dropped).

        Bound the wait with ``asyncio.timeout`` if needed; the sender itself never waits
        longer than the cache's socket timeouts per batch.
        """
        await self._idle.wait()

    async def _send_loop(self) -> None:
        wakeup = self._wakeup
        while True:
            await wakeup.wait()
            wakeup.clear()
            if self._linger > 0:
                await asyncio.sleep(self._linger)
            while self._ticks or self._derived or self._retained:
                if not await self._send(self._take()):
                    # L2 did not take the batch and its candles are kept: they go again
                    # with the next update or the retry, not at once (with the breaker open
                    # nothing awaits, and retrying here would spin without yielding).
                    break
            else:
                if self._owed or self._gaps:
                    # A dropped batch left keys owed to on_resumed or series to reset, and
                    # no batch is left to carry them: an empty one does.
                    await self._send([])
            if (self._retained or self._owed or self._gaps) and self._retry is None:
                # Without it they would wait for the next update, which a quiet router may
                # never publish (a gap in L2's rings, a stale latest value meanwhile).
                self._retry = asyncio.get_running_loop().call_later(
                    self._retry_seconds, self._retry_due
                )
            self._idle.set()

    def _retry_due(self) -> None:
        self._retry = None
        if self._state is not _State.CLOSED:
            self._wakeup.set()

    def _take(self) -> list[CacheItem]:
        """The next batch: pending ticks if any, else a chunk of derived data (retained
        candles first)."""
        if self._ticks:
            pending, limit = self._ticks, self._max_batch
        else:
            if self._retained:
                self._requeue()
            pending, limit = self._derived, self._derived_batch
        if len(pending) <= limit:
            items = list(pending.values())
            pending.clear()
            return items
        keys = list(itertools.islice(pending, limit))
        return [pending.pop(key) for key in keys]

    def _requeue(self) -> None:
        """Put the retained candles in front of the pending derived data; a pending update
        of the same bucket takes the place of the retained one if it supersedes it."""
        merged, self._retained = self._retained, {}
        self._counters.retried += len(merged)
        for key, item in self._derived.items():
            old = merged.get(key)
            if old is None or _replaces(item, old):
                merged[key] = item
        self._derived = merged

    def _retain(self, items: list[CacheItem]) -> int:
        """Keep the candles of a batch L2 could not take; returns how many items are lost
        (the others, and the oldest retained candles beyond the bound)."""
        retained = self._retained
        lost = 0
        for item in items:
            if type(item) is not CandleData:
                lost += 1
                continue
            key = _candle_key(item)
            old = retained.get(key)
            if old is None or _replaces(item, old):
                retained[key] = item
        # The bound counts what waits behind them too: while L2 is down, new updates pile up
        # in the pending derived data, not here.
        while retained and len(retained) + len(self._derived) > self._max_retained:
            given_up: CandleData = retained.pop(next(iter(retained)))  # type: ignore[assignment]
            self._gaps[(given_up.symbol, given_up.timeframe, given_up.source)] = None
            lost += 1
        return lost

    def _lose_candles(self, items: list[CacheItem]) -> None:
        """The candles of a dropped batch may be missing from L2's rings (and have reached
        the other routers, if the announcement went out): their series are reset with the
        next batch, as when retained candles are given up."""
        for item in items:
            if type(item) is CandleData:
                self._gaps[(item.symbol, item.timeframe, item.source)] = None

    async def _send(self, items: list[CacheItem]) -> bool:
        """Write and announce one batch; False when L2 could not take it and its candles
        were kept for a later batch."""
        cache = self._cache
        gaps = list(self._gaps)
        try:
            ops = [cache.write_op(item) for item in items]
            message = encode_bus_message(self._prefix, [op.payload for op in ops], gaps)
            if gaps:
                # Before the batch's writes, which may start the reset rings afresh.
                ops = [cache.reset_candles_op(*series) for series in gaps] + ops
            await cache.apply(ops, publish=(cache.channel, message), own_connection=True)
        except CacheError as exc:
            # Unreachable (a transient failure): keep the candles for the next batch. A
            # refused call would be refused again: drop everything, as for latest values.
            if isinstance(exc, CacheUnavailableError):
                lost = self._retain(items)
            else:
                lost = len(items)
                self._lose_candles(items)
            self._owe(items)
            self._counters.dropped += lost
            if not self._dropping:
                self._dropping = True
                logger.warning(
                    "cache bus cannot write to L2 (%s); dropping cache updates until it "
                    "answers (the database write path is not affected)",
                    exc,
                )
            return lost == len(items)
        except Exception:
            # A bug must not silence the fast path for good: log it loudly and go on.
            self._counters.dropped += len(items)
            self._lose_candles(items)
            self._owe(items)
            logger.exception("cache bus sender failed on a batch of %d updates", len(items))
            return True
        for series in gaps:
            del self._gaps[series]
        self._counters.reset_series += len(gaps)
        self._counters.published += len(items)
        self._counters.messages_sent += 1
        if self._dropping:
            self._dropping = False
            logger.info(
                "cache bus writes to L2 again (%d updates dropped so far)", self._counters.dropped
            )
        if self._owed:
            owed = list(self._owed)
            self._owed.clear()
            if self._on_resumed is not None:
                try:
                    self._on_resumed(owed)
                except Exception:
                    self._counters.callback_errors += 1
                    logger.exception("cache bus callback %r failed", self._on_resumed)
        return True

    def _owe(self, items: list[CacheItem]) -> None:
        """Remember the keys of the latest values of a batch that did not reach L2."""
        owed = self._owed
        for item in items:
            kind = type(item)
            if kind is TickData or kind is OrderFlowMetrics:
                key = (kind, item.symbol, item.source)
                owed.pop(key, None)  # to the end: the oldest are forgotten first
                owed[key] = None
        excess = len(owed) - self._max_owed
        if excess > 0:
            for key in list(itertools.islice(owed, excess)):
                del owed[key]
            self._counters.owed_forgotten += excess

    # ------------------------------------------------------------------ subscribing

    async def start(
        self,
        on_items: OnItems,
        on_lost: Callable[[], None],
        on_restored: Callable[[], None],
        *,
        on_gaps: OnGaps | None = None,
        on_resumed: OnResumed | None = None,
    ) -> bool:
        """Subscribe and start handing other routers' updates to ``on_items``.

        The first subscription is attempted before returning. If it fails, ``on_lost`` is
        called at once and the reader keeps retrying in the background; ``on_restored`` is
        called whenever a subscription is established after ``on_lost``. ``on_gaps`` gets
        the candle series whose rings to drop (see the module docstring) before the items
        of the same message; without it, such a message clears L1 through ``on_lost`` and
        ``on_restored``. ``on_resumed`` gets the keys of the latest values dropped while L2
        could not take them, once a batch reaches it again. Callbacks run on the event loop
        and must not block; an exception they raise is logged and counted.

        Returns:
            True if subscribed on return.

        Raises:
            CacheError: The bus is closed or already started.
        """
        if self._state is _State.CLOSED:
            msg = "the cache bus is closed"
            raise CacheError(msg)
        if self._reader is not None:
            msg = "the cache bus is already started"
            raise CacheError(msg)
        self._on_items, self._on_lost, self._on_restored = on_items, on_lost, on_restored
        self._on_gaps = on_gaps
        self._on_resumed = on_resumed
        self._state = _State.RUNNING
        try:
            conn: AbstractConnection | None = await self._subscribe()
        except CacheError as exc:
            logger.warning(
                "cache bus cannot subscribe to %s on %s (%s); L1 is bypassed until it can",
                self.channel,
                self._cache.target,
                exc,
            )
            conn = None
            self._counters.lost += 1
            self._notify(on_lost)
        else:
            self._connected = True
        self._conn = conn
        self._reader = asyncio.get_running_loop().create_task(
            self._read_loop(conn), name=f"data_manager cache bus reader {self._origin}"
        )
        return conn is not None

    async def _subscribe(self) -> AbstractConnection:
        conn = self._cache.new_connection()
        try:
            with map_redis_errors(self._cache.target):
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_command("SUBSCRIBE", self.channel)
                reply = await conn.read_response(timeout=self._cache.socket_timeout)
            if reply is None:
                msg = f"no SUBSCRIBE confirmation from {self._cache.target}"
                raise CacheUnavailableError(msg)
            if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                msg = f"unexpected SUBSCRIBE reply from {self._cache.target}: {reply!r}"
                raise CacheError(msg)
        except BaseException:
            await self._discard(conn)
            raise
        return conn

    async def _discard(self, conn: AbstractConnection) -> None:
        try:
            await conn.disconnect(nowait=True)
        except (OSError, RuntimeError) as exc:  # already broken: nothing left to release
            logger.debug("closing the cache bus connection failed: %s", exc)

    def _backoff(self, attempt: int) -> float:
        exponent = min(attempt - 1, _MAX_BACKOFF_EXPONENT)
        cap = min(self._backoff_max, self._backoff_initial * 2.0**exponent)
        return cap * (0.5 + self._rng.random() / 2)

    async def _read_loop(self, conn: AbstractConnection | None) -> None:
        attempt = 0
        try:
            while True:
                if conn is None:
                    try:
                        conn = await self._subscribe()
                    except CacheError as exc:
                        attempt += 1
                        logger.debug("cache bus resubscribe attempt %d failed: %s", attempt, exc)
                        await asyncio.sleep(self._backoff(attempt))
                        continue
                    attempt = 0
                    self._conn = conn
                    self._connected = True
                    self._counters.restored += 1
                    logger.info("cache bus subscribed again to %s", self.channel)
                    if self._on_restored is not None:
                        self._notify(self._on_restored)
                try:
                    await self._pump(conn)
                except CacheError as exc:
                    logger.warning(
                        "cache bus subscription lost (%s); L1 is bypassed until resubscribed",
                        exc,
                    )
                except Exception:
                    logger.exception("cache bus reader failed; resubscribing")
                old, conn, self._conn = conn, None, None
                self._connected = False
                self._counters.lost += 1
                await self._discard(old)
                if self._on_lost is not None:
                    self._notify(self._on_lost)
        finally:
            if conn is not None:
                await self._discard(conn)

    async def _pump(self, conn: AbstractConnection) -> None:
        """Read messages until the connection fails; returns only by raising."""
        loop = asyncio.get_running_loop()
        poll = self._check / 2
        target = self._cache.target
        last_rx = loop.time()
        ping_sent: float | None = None
        while True:
            with map_redis_errors(target):
                reply = await conn.read_response(timeout=poll, disconnect_on_error=False)
            now = loop.time()
            if reply is None:
                if ping_sent is not None:
                    if now - ping_sent >= poll * _TIMER_SLACK:
                        msg = f"no answer to PING from {target} within {poll:g}s"
                        raise CacheUnavailableError(msg)
                elif now - last_rx >= poll * _TIMER_SLACK:
                    with map_redis_errors(target):
                        await conn.send_command("PING")
                    ping_sent = now
                continue
            last_rx = now
            ping_sent = None
            if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                self._handle(reply[2])
            # Anything else (a PONG, a subscribe confirmation) only proves liveness.

    def _handle(self, data: bytes) -> None:
        if data.startswith(self._prefix):
            self._counters.own_skipped += 1
            return
        try:
            message = decode_bus_message(data, validate=self._validate)
        except CacheError as exc:
            self._counters.malformed += 1
            if self._counters.malformed == 1:
                logger.warning("skipping a malformed cache bus message: %s", exc)
            return
        if message.origin == self._origin:
            self._counters.own_skipped += 1
            return
        if message.gaps:
            self._drop_gaps(message.gaps)
        self._counters.received += len(message.items)
        if self._on_items is not None and message.items:
            try:
                self._on_items(message.items)
            except Exception:
                self._counters.callback_errors += 1
                logger.exception("cache bus on_items callback failed")

    def _drop_gaps(self, gaps: list[Series]) -> None:
        if self._on_gaps is not None:
            try:
                self._on_gaps(gaps)
            except Exception:
                self._counters.callback_errors += 1
                logger.exception("cache bus on_gaps callback failed")
            return
        if self._on_lost is not None and self._on_restored is not None:
            # No way to drop single rings: drop the whole L1, as for a lost subscription.
            logger.info("cache bus: %d candle series lost updates; clearing L1", len(gaps))
            self._notify(self._on_lost)
            self._notify(self._on_restored)

    def _notify(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            self._counters.callback_errors += 1
            logger.exception("cache bus callback %r failed", callback)

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Send what is pending (waiting at most ``close_timeout`` seconds), then stop both
        tasks and close the subscription connection."""
        if self._state is _State.CLOSED:
            return
        if self._sender is not None:
            try:
                async with asyncio.timeout(self._close_timeout):
                    await self._idle.wait()
                    if self._retained or self._gaps:
                        # Kept candles and series resets would be lost with this process
                        # (a gap in L2's rings): one last try instead of the retry's wait.
                        self._cancel_retry()
                        self._idle.clear()
                        self._wakeup.set()
                        await self._idle.wait()
            except TimeoutError:
                logger.warning("cache bus closed with %d updates not sent to L2", self.pending)
        self._state = _State.CLOSED
        self._cancel_retry()
        tasks = [t for t in (self._sender, self._reader) if t is not None]
        self._sender = self._reader = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._ticks.clear()
        self._derived.clear()
        self._retained.clear()
        self._connected = False

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def reset_after_fork(self) -> None:
        """Forget the parent's tasks and connection in a forked child.

        They are kept referenced, never closed or collected: closing would act on sockets
        and an epoll set shared with the parent. The bus gets a new origin id and can be
        used (``publish``, ``start``) again in the child's event loop.
        """
        self._abandoned.extend(
            obj for obj in (self._sender, self._reader, self._conn) if obj is not None
        )
        self._origin = _new_origin()
        self._init_runtime()
