"""L1: the in-process memory cache of the latest market data.

One :class:`MemoryCache` per router (so per process) holds:

* the latest :class:`~data_manager.models.TickData` per ``(symbol, source)`` and per symbol
  across sources,
* the latest :class:`~data_manager.models.OrderFlowMetrics` with the same two keys,
* a ring of the latest ``ring_size`` :class:`~data_manager.models.CandleData` per
  ``(symbol, timeframe, source)``, oldest to newest.

Every read is a dictionary lookup and a clock read: no I/O, no awaits, no copies beyond the
list slice handed to the caller. Writes are compare-and-set on the event timestamp, so the
order in which writes and pub/sub messages arrive never lets an older value replace a newer
one, and equal timestamps are settled by the order every tier shares
(:func:`~data_manager.cache.codec.supersedes`).

A symbol's any-source entry needs care when it is missing (a new process, L1 cleared,
the entry evicted or expired): one source's tick cannot tell whether another source has a
newer one this cache never saw. So only an any-source answer of the tiers below
(:meth:`MemoryCache.fill_tick` with no source) creates it outright. A value read for one
source fills that source's entry only. A live write that finds the entry missing creates it
and queues the symbol in :meth:`MemoryCache.take_confirmations`, so the owner checks it
against the tiers below; with ``settled=False`` (another router's write, which this cache
cannot vouch for) the new entry is not served until that check's fill settles it, while it
keeps collecting live writes, so the fill keeps the newer of its answer and the writes that
raced with the read. The same goes for a ``(symbol, source)`` entry such a write creates: a
relayed value may be one the tiers below refused as older than theirs (a late tick, a
resend), so it is queued with its source and served once a read for that source settles it.

Bounds: at most ``max_entries`` entries in total (a tick, an order-flow value or a whole
candle ring each count as one), evicted least recently used first (reads and writes both
count as a use), and a TTL per data type measured from the last write on the process's
monotonic clock. Expired entries are misses and are removed when next touched.

The cache is **not thread-safe**: it is meant to be used from the event-loop thread of the
router that owns it, where no method can be interrupted by another. Symbols are expected in
canonical form (:func:`~data_manager.models.normalize_symbol`); the router normalises them
before they get here.
"""

from __future__ import annotations

import sys
import time
from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter
from typing import TYPE_CHECKING, Final, Generic, Literal, TypeAlias, TypeVar

from data_manager.cache.codec import tie_rank
from data_manager.clock import Clock, SystemClock
from data_manager.errors import ConfigurationError, ValidationError
from data_manager.models import CandleData, OrderFlowMetrics, TickData

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["LatestKind", "MemoryCache", "MemoryCacheStats"]

_V = TypeVar("_V", TickData, OrderFlowMetrics)

#: Latest-value key: the bare symbol for "any source", ``(symbol, source)`` otherwise. A str
#: never equals a tuple, so both live in one dict; the bare str also hashes for free (its hash
#: is cached), which makes the most common read, ``get_tick(symbol)``, the cheapest.
_LatestKey: TypeAlias = str | tuple[str, str]
_RingKey: TypeAlias = tuple[str, str, str]  # (symbol, timeframe, source)

#: Rough per-entry cost of an OrderedDict slot (hash table entry, index and linked-list node)
#: on 64-bit CPython; only used for the byte estimate.
_ODICT_SLOT_BYTES: Final = 104

_candle_ts: Final = attrgetter("timestamp")

# What _put_latest did.
_REFUSED: Final = 0
_STORED: Final = 1
_CREATED: Final = 2

#: A latest-value kind, as :meth:`MemoryCache.take_confirmations` names it.
LatestKind: TypeAlias = Literal["tick", "order_flow"]

#: Keys sampled by stats() to estimate how many latest-value entries own their model.
_SAMPLE: Final = 256


class _Latest(Generic[_V]):
    """A latest-value entry; mutated in place on update so a write allocates nothing."""

    __slots__ = ("settled", "stored_at", "ts", "used", "value")

    def __init__(self, value: _V, now: float, settled: bool) -> None:
        self.value: _V = value
        self.ts: int = value.timestamp
        self.stored_at = now  # monotonic time of the last accepted write: TTL and age
        self.used = now  # monotonic time of the last read or write: cross-type LRU order
        # False for an any-source entry only live writes made: not served until a fill
        # from an any-source read settles it (see the module docstring).
        self.settled = settled


class _Ring:
    """A ring of candles for one (symbol, timeframe, source), sorted by bucket start.

    A list rather than a deque: the hot read is a tail slice, which a list does in one
    memcpy and a deque cannot do at all; trimming the head of a ring of a few hundred
    pointers is a negligible memmove.
    """

    __slots__ = ("complete", "items", "stored_at", "used")

    def __init__(self, now: float) -> None:
        self.items: list[CandleData] = []
        # True when the tier below had nothing older than items[0] (it returned fewer rows
        # than asked), so a read asking for more than the ring holds is still a full answer.
        self.complete = False
        self.stored_at = now
        self.used = now


@dataclass(frozen=True, slots=True)
class MemoryCacheStats:
    """A snapshot of the L1 counters.

    Hits and misses count ``get_*`` calls; ``stale_writes`` counts writes refused by the
    compare-and-set (an older or closed-protected value); ``bytes_estimate`` is an estimate
    (see :meth:`MemoryCache.stats`).
    """

    tick_entries: int
    order_flow_entries: int
    candle_rings: int
    candles: int
    max_entries: int
    tick_hits: int
    tick_misses: int
    order_flow_hits: int
    order_flow_misses: int
    candle_hits: int
    candle_misses: int
    stale_writes: int
    evictions: int
    expirations: int
    clears: int
    bytes_estimate: int

    @property
    def entries(self) -> int:
        """Entries counted against ``max_entries``."""
        return self.tick_entries + self.order_flow_entries + self.candle_rings

    @property
    def hits(self) -> int:
        """Hits across all data types."""
        return self.tick_hits + self.order_flow_hits + self.candle_hits

    @property
    def misses(self) -> int:
        """Misses across all data types."""
        return self.tick_misses + self.order_flow_misses + self.candle_misses

    @property
    def hit_rate(self) -> float:
        """Hits over reads, 0.0 before the first read."""
        reads = self.hits + self.misses
        return self.hits / reads if reads else 0.0


def _check_config(
    max_entries: int, tick_ttl: float, candle_ttl: float, order_flow_ttl: float, ring_size: int
) -> None:
    if max_entries < 1:
        msg = f"L1 max_entries must be >= 1, got {max_entries}"
        raise ConfigurationError(msg)
    if ring_size < 1:
        msg = f"L1 ring_size must be >= 1, got {ring_size}"
        raise ConfigurationError(msg)
    for name, ttl in (
        ("tick_ttl", tick_ttl),
        ("candle_ttl", candle_ttl),
        ("order_flow_ttl", order_flow_ttl),
    ):
        # math.inf is allowed (never expires); NaN fails both comparisons and is refused.
        if not ttl > 0:
            msg = f"L1 {name} must be > 0 seconds, got {ttl}"
            raise ConfigurationError(msg)


def _model_bytes(value: object) -> int:
    """Approximate deep size of a pydantic model: object, its ``__dict__`` and field values."""
    size = sys.getsizeof(value)
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict):
        size += sys.getsizeof(fields)
        # None is a shared singleton (most optional fields are None); do not count it.
        size += sum(sys.getsizeof(v) for v in fields.values() if v is not None)
    fields_set = getattr(value, "__pydantic_fields_set__", None)
    if fields_set is not None:
        size += sys.getsizeof(fields_set)
    return size


class MemoryCache:
    """Bounded, TTL'd, compare-and-set cache of the latest ticks, order flow and candles.

    All methods are synchronous and do no I/O. Not thread-safe (see the module docstring).

    Args:
        max_entries: Upper bound on entries (ticks + order-flow values + candle rings).
        tick_ttl: Seconds a tick is served after its last write.
        candle_ttl: Seconds a candle ring is served after its last write.
        order_flow_ttl: Seconds an order-flow value is served after its last write.
        ring_size: Candles kept per (symbol, timeframe, source).
        clock: Source of monotonic time; the system clock by default.

    Raises:
        ConfigurationError: A bound below 1 or a TTL that is not > 0.
    """

    __slots__ = (
        "_candle_hits",
        "_candle_misses",
        "_candle_ttl",
        "_clears",
        "_confirmations",
        "_evictions",
        "_expirations",
        "_flow_hits",
        "_flow_misses",
        "_flow_ttl",
        "_flows",
        "_max_entries",
        "_now",
        "_ring_index",
        "_ring_size",
        "_rings",
        "_sizes",
        "_stale_writes",
        "_tick_hits",
        "_tick_misses",
        "_tick_ttl",
        "_ticks",
    )

    def __init__(
        self,
        *,
        max_entries: int,
        tick_ttl: float,
        candle_ttl: float,
        order_flow_ttl: float,
        ring_size: int,
        clock: Clock | None = None,
    ) -> None:
        _check_config(max_entries, tick_ttl, candle_ttl, order_flow_ttl, ring_size)
        self._max_entries = max_entries
        self._tick_ttl = tick_ttl
        self._candle_ttl = candle_ttl
        self._flow_ttl = order_flow_ttl
        self._ring_size = ring_size
        # SystemClock.monotonic is time.monotonic behind a Python frame; binding the C
        # function directly saves that frame on every read.
        self._now: Callable[[], float] = (
            time.monotonic if clock is None or type(clock) is SystemClock else clock.monotonic
        )
        # One OrderedDict per type keeps every entry statically typed (no casts on the hot
        # path); each is in LRU order, so the global LRU entry is the least recently used of
        # the three heads, compared by their ``used`` stamps.
        self._ticks: OrderedDict[_LatestKey, _Latest[TickData]] = OrderedDict()
        self._flows: OrderedDict[_LatestKey, _Latest[OrderFlowMetrics]] = OrderedDict()
        self._rings: OrderedDict[_RingKey, _Ring] = OrderedDict()
        # (symbol, timeframe) -> {source: ring}: answers candle_sources() without a scan.
        self._ring_index: dict[tuple[str, str], dict[str, _Ring]] = {}
        # Per-entry byte costs, measured once on the first stats() that sees each type.
        self._sizes: dict[str, int] = {}
        self._tick_hits = self._tick_misses = 0
        self._flow_hits = self._flow_misses = 0
        self._candle_hits = self._candle_misses = 0
        self._stale_writes = self._evictions = self._expirations = self._clears = 0
        # Any-source entries live writes created, to check against the tiers below (an
        # ordered set, so a symbol is queued once however often its entry comes and goes).
        # (kind, symbol, source or None for the any-source entry) → None, oldest first.
        self._confirmations: dict[tuple[LatestKind, str, str | None], None] = {}

    # ------------------------------------------------------------------ configuration

    @property
    def max_entries(self) -> int:
        """Upper bound on entries."""
        return self._max_entries

    @property
    def ring_size(self) -> int:
        """Candles kept per (symbol, timeframe, source)."""
        return self._ring_size

    @property
    def tick_ttl(self) -> float:
        """Tick TTL in seconds."""
        return self._tick_ttl

    @property
    def candle_ttl(self) -> float:
        """Candle-ring TTL in seconds."""
        return self._candle_ttl

    @property
    def order_flow_ttl(self) -> float:
        """Order-flow TTL in seconds."""
        return self._flow_ttl

    def configure(
        self,
        *,
        max_entries: int | None = None,
        tick_ttl: float | None = None,
        candle_ttl: float | None = None,
        order_flow_ttl: float | None = None,
        ring_size: int | None = None,
    ) -> None:
        """Change bounds and TTLs at runtime (strategy hot reload); ``None`` keeps a value.

        New TTLs apply at once to entries already cached (expiry is computed at read time
        from the write time). A smaller ``max_entries`` evicts least recently used entries; a
        smaller ``ring_size`` trims every ring's oldest candles. The change is validated as a
        whole before anything is applied.

        Raises:
            ConfigurationError: A bound below 1 or a TTL that is not > 0.
        """
        new_max = self._max_entries if max_entries is None else max_entries
        new_ring = self._ring_size if ring_size is None else ring_size
        new_tick = self._tick_ttl if tick_ttl is None else tick_ttl
        new_candle = self._candle_ttl if candle_ttl is None else candle_ttl
        new_flow = self._flow_ttl if order_flow_ttl is None else order_flow_ttl
        _check_config(new_max, new_tick, new_candle, new_flow, new_ring)
        self._tick_ttl, self._candle_ttl, self._flow_ttl = new_tick, new_candle, new_flow
        if new_ring < self._ring_size:
            for ring in self._rings.values():
                if len(ring.items) > new_ring:
                    del ring.items[: len(ring.items) - new_ring]
                    ring.complete = False  # older candles now exist outside the ring
        self._ring_size = new_ring
        self._max_entries = new_max
        self._evict_excess()

    # ------------------------------------------------------------------ ticks

    def put_tick(self, tick: TickData, *, settled: bool = True) -> bool:
        """Store a live tick if it is not older than the cached one (compare-and-set).

        The ``(symbol, source)`` entry and the symbol's any-source entry are each updated
        under the same rule (:func:`~data_manager.cache.codec.supersedes`): a newer
        timestamp wins; on an equal timestamp the higher source wins, then the higher
        ``seq`` (a missing one lowest), then the content (bid, ask, ...); a tick equal in all
        of these (a replay) is stored again. Every router, L2 and the database settle on the
        same tick that way. An expired entry still guards against older writes until it is
        removed.

        A missing any-source entry is created from ``tick`` and the symbol is queued for
        :meth:`take_confirmations`: the tiers below may hold a newer tick of another source.

        Args:
            tick: The tick.
            settled: Serve new entries at once (this process's own write). With False (a
                write relayed from elsewhere, which may be older than what the tiers below
                hold: they refuse such a write, but it is still relayed) a new any-source
                entry misses until :meth:`fill_tick` settles it, and so does a new
                ``(symbol, source)`` entry, which is queued for :meth:`take_confirmations`
                too. An existing entry keeps its state.

        Returns:
            True if the ``(symbol, source)`` entry now holds ``tick``.
        """
        now = self._now()
        stored = self._put_latest(self._ticks, (tick.symbol, tick.source), tick, now, settled)
        if stored == _CREATED and not settled:
            self._confirmations["tick", tick.symbol, tick.source] = None
        if self._put_latest(self._ticks, tick.symbol, tick, now, settled) == _CREATED:
            self._confirmations["tick", tick.symbol, None] = None
        return stored != _REFUSED

    def fill_tick(self, symbol: str, source: str | None, tick: TickData | None) -> TickData | None:
        """Store what a read of the tiers below answered for ``get_tick(symbol, source)``.

        With a ``source``, only that source's entry is written (compare-and-set): one
        source's tick says nothing about the others, so it never reaches the any-source
        entry. Without one, ``tick`` is the symbol's newest tick (None: the tiers hold
        none); it is compare-and-set into its source's entry and the any-source entry, which
        is then settled and served, holding the newer of ``tick`` and the live writes that
        reached it meanwhile.

        Returns:
            The value the entry now holds (``tick`` or a newer live one), or None.
        """
        return self._fill(self._ticks, symbol, source, tick)

    def get_tick(self, symbol: str, source: str | None = None) -> TickData | None:
        """Return the latest tick of ``symbol`` (from ``source``, or from any source).

        Returns:
            The tick, or None on a miss or when the entry has outlived ``tick_ttl``.
        """
        key: _LatestKey = symbol if source is None else (symbol, source)
        entry = self._ticks.get(key)
        if entry is not None:
            now = self._now()
            if now - entry.stored_at >= self._tick_ttl:
                del self._ticks[key]
                self._expirations += 1
            elif entry.settled:
                entry.used = now
                self._ticks.move_to_end(key)
                self._tick_hits += 1
                return entry.value
        self._tick_misses += 1
        return None

    def get_tick_with_age(
        self, symbol: str, source: str | None = None
    ) -> tuple[TickData, float] | None:
        """Like :meth:`get_tick`, with the seconds since the value was written to this cache."""
        key: _LatestKey = symbol if source is None else (symbol, source)
        entry = self._ticks.get(key)
        if entry is not None:
            now = self._now()
            age = now - entry.stored_at
            if age >= self._tick_ttl:
                del self._ticks[key]
                self._expirations += 1
            elif entry.settled:
                entry.used = now
                self._ticks.move_to_end(key)
                self._tick_hits += 1
                return entry.value, age
        self._tick_misses += 1
        return None

    # ------------------------------------------------------------------ order flow

    def put_order_flow(self, metrics: OrderFlowMetrics, *, settled: bool = True) -> bool:
        """Store order-flow metrics if not older than the cached ones (compare-and-set).

        Same rule as :meth:`put_tick`; on an equal timestamp the higher source wins, then the
        longer ``window_ms``, then the later arrival.

        Returns:
            True if the ``(symbol, source)`` entry now holds ``metrics``.
        """
        now = self._now()
        key = (metrics.symbol, metrics.source)
        stored = self._put_latest(self._flows, key, metrics, now, settled)
        if stored == _CREATED and not settled:
            self._confirmations["order_flow", metrics.symbol, metrics.source] = None
        if self._put_latest(self._flows, metrics.symbol, metrics, now, settled) == _CREATED:
            self._confirmations["order_flow", metrics.symbol, None] = None
        return stored != _REFUSED

    def fill_order_flow(
        self, symbol: str, source: str | None, metrics: OrderFlowMetrics | None
    ) -> OrderFlowMetrics | None:
        """Like :meth:`fill_tick`, for order-flow metrics."""
        return self._fill(self._flows, symbol, source, metrics)

    def get_order_flow(self, symbol: str, source: str | None = None) -> OrderFlowMetrics | None:
        """Return the latest order-flow metrics of ``symbol``, or None (miss or expired)."""
        key: _LatestKey = symbol if source is None else (symbol, source)
        entry = self._flows.get(key)
        if entry is not None:
            now = self._now()
            if now - entry.stored_at >= self._flow_ttl:
                del self._flows[key]
                self._expirations += 1
            elif entry.settled:
                entry.used = now
                self._flows.move_to_end(key)
                self._flow_hits += 1
                return entry.value
        self._flow_misses += 1
        return None

    def get_order_flow_with_age(
        self, symbol: str, source: str | None = None
    ) -> tuple[OrderFlowMetrics, float] | None:
        """Like :meth:`get_order_flow`, with the seconds since the value was written here."""
        key: _LatestKey = symbol if source is None else (symbol, source)
        entry = self._flows.get(key)
        if entry is not None:
            now = self._now()
            age = now - entry.stored_at
            if age >= self._flow_ttl:
                del self._flows[key]
                self._expirations += 1
            elif entry.settled:
                entry.used = now
                self._flows.move_to_end(key)
                self._flow_hits += 1
                return entry.value, age
        self._flow_misses += 1
        return None

    def put(self, item: TickData | CandleData | OrderFlowMetrics, *, settled: bool = True) -> bool:
        """:meth:`put_tick`, :meth:`put_candle` or :meth:`put_order_flow`, by the item's
        type (``settled`` applies to ticks and order flow).

        Returns:
            True if the cache now holds ``item``.
        """
        kind = type(item)
        if kind is TickData:
            return self.put_tick(item, settled=settled)  # type: ignore[arg-type]
        if kind is CandleData:
            return self.put_candle(item)  # type: ignore[arg-type]
        return self.put_order_flow(item, settled=settled)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ candles

    def put_candle(self, candle: CandleData) -> bool:
        """Upsert one candle into its ring by bucket start.

        * same bucket: replaces the cached candle, except that a closed candle is never
          replaced by a forming one (``is_closed=False``);
        * newer bucket: appended (the oldest is dropped past ``ring_size``);
        * older bucket inside the ring's span: inserted in order (the oldest is dropped
          past ``ring_size``);
        * older than the ring's oldest: ignored, unless the ring is complete and not full
          (then it is the new oldest) — otherwise the ring would show a gap the database
          does not have. A complete ring that is full is complete no longer: the tiers
          below now hold a candle older than its oldest.

        An expired ring is discarded first: the candle starts a new ring.

        Returns:
            True if the ring now holds ``candle``.
        """
        now = self._now()
        key = (candle.symbol, candle.timeframe, candle.source)
        ring = self._rings.get(key)
        if ring is not None and now - ring.stored_at >= self._candle_ttl:
            self._expire_ring(key)
            ring = None
        if ring is None:
            ring = self._new_ring(key, now)
            ring.items.append(candle)
            self._evict_excess(ring)
            return True
        items = ring.items
        ts = candle.timestamp
        # items is never empty: rings are created with a candle and never emptied in place.
        last = items[-1]
        if ts > last.timestamp:
            items.append(candle)
            if len(items) > self._ring_size:
                del items[0]
                ring.complete = False
        elif ts == last.timestamp:
            if last.is_closed and not candle.is_closed:
                self._stale_writes += 1
                return False
            items[-1] = candle
        else:
            pos = bisect_left(items, ts, key=_candle_ts)
            if pos == 0 and ts < items[0].timestamp:
                if not ring.complete or len(items) >= self._ring_size:
                    ring.complete = False
                    self._stale_writes += 1
                    return False
                items.insert(0, candle)
            elif items[pos].timestamp == ts:
                if items[pos].is_closed and not candle.is_closed:
                    self._stale_writes += 1
                    return False
                items[pos] = candle
            else:
                items.insert(pos, candle)
                if len(items) > self._ring_size:
                    del items[0]
                    ring.complete = False
        ring.stored_at = ring.used = now
        self._rings.move_to_end(key)
        return True

    def put_candles(self, candles: Iterable[CandleData], *, complete: bool) -> int:
        """Backfill a ring with candles read from a lower tier (L2 or the database).

        Candles the ring already holds win over the backfill for the same bucket (the ring
        is fed by live writes, which are at least as fresh), except that a closed candle
        replaces a forming one. An expired ring is discarded first.

        A backfill that ends before the ring's oldest candle is not joined to it: candles
        between the two (written but not yet stored, say) may be in neither, and the joined
        ring would serve that gap as if it were the series. The ring is then left as it is,
        no longer complete, and 0 is returned; :meth:`peek_candles` still shows it.

        Args:
            candles: Candles of one (symbol, timeframe, source), in any order.
            complete: The tier below has no candles older than these (it returned fewer
                than asked). A complete ring serves any ``limit`` with what it holds.

        Returns:
            How many of ``candles`` the ring holds afterwards.

        Raises:
            ValidationError: ``candles`` mix several (symbol, timeframe, source) keys.
        """
        batch = list(candles)
        if not batch:
            return 0
        first = batch[0]
        key = (first.symbol, first.timeframe, first.source)
        merged: dict[int, CandleData] = {}
        for candle in batch:
            if (candle.symbol, candle.timeframe, candle.source) != key:
                msg = f"put_candles got candles of {key} and of {candle.symbol!r}/"
                msg += f"{candle.timeframe}/{candle.source!r}; pass one series at a time"
                raise ValidationError(msg)
            merged[candle.timestamp] = candle
        now = self._now()
        ring = self._rings.get(key)
        if ring is not None and now - ring.stored_at >= self._candle_ttl:
            self._expire_ring(key)
            ring = None
        created = ring is None
        if ring is None:
            ring = self._new_ring(key, now)
            backfill_is_oldest = True
        else:
            if ring.items and max(merged) < ring.items[0].timestamp:
                ring.complete = False  # the tiers below hold older candles
                return 0
            backfill_is_oldest = not ring.items or min(merged) <= ring.items[0].timestamp
            for cached in ring.items:
                incoming = merged.get(cached.timestamp)
                if incoming is None or cached.is_closed or not incoming.is_closed:
                    merged[cached.timestamp] = cached
        items = [merged[ts] for ts in sorted(merged)]
        # Completeness follows whichever side supplied the oldest candle.
        ring.complete = complete if backfill_is_oldest else ring.complete
        if len(items) > self._ring_size:
            del items[: len(items) - self._ring_size]
            ring.complete = False
        ring.items = items
        ring.stored_at = ring.used = now
        if not created:
            self._rings.move_to_end(key)
        self._evict_excess(ring)
        ids = {id(c) for c in batch}
        return sum(1 for c in items if id(c) in ids)

    def drop_candles(self, symbol: str, timeframe: str, source: str) -> bool:
        """Drop the ring of one series (its live updates were lost on the way here), so the
        next read misses and refills it from a lower tier. Returns False when there is none."""
        key = (symbol, timeframe, source)
        if key not in self._rings:
            return False
        self._drop_ring(key)
        return True

    def peek_candles(self, symbol: str, timeframe: str, source: str) -> list[CandleData]:
        """Every candle of a live ring, oldest to newest, complete or not ([] when there is
        none): what this router saw of the series, for an answer the tiers below cannot
        complete. Not counted as a hit or a miss; the ring's LRU position is unchanged."""
        ring = self._rings.get((symbol, timeframe, source))
        if ring is None or self._now() - ring.stored_at >= self._candle_ttl:
            return []
        return ring.items[:]

    def get_candles(
        self, symbol: str, timeframe: str, limit: int, source: str
    ) -> list[CandleData] | None:
        """Return the last ``limit`` candles, oldest to newest, or None on a miss.

        A ring holding fewer than ``limit`` candles is a miss unless it is complete: a short
        list would hide older candles the database has. So is an expired ring. A ``limit``
        of 0 or less returns an empty list for a live ring.

        Returns:
            A new list (the caller may keep or mutate it), or None.
        """
        key = (symbol, timeframe, source)
        ring = self._rings.get(key)
        if ring is not None:
            now = self._now()
            if now - ring.stored_at < self._candle_ttl:
                items = ring.items
                start = len(items) - limit
                if start >= 0 or ring.complete:
                    ring.used = now
                    self._rings.move_to_end(key)
                    self._candle_hits += 1
                    return items[start:] if start > 0 else items[:]
            else:
                self._drop_ring(key)
                self._expirations += 1
        self._candle_misses += 1
        return None

    def get_candles_with_age(
        self, symbol: str, timeframe: str, limit: int, source: str
    ) -> tuple[list[CandleData], float] | None:
        """Like :meth:`get_candles`, with the seconds since the ring was last written here."""
        key = (symbol, timeframe, source)
        ring = self._rings.get(key)
        if ring is not None:
            now = self._now()
            age = now - ring.stored_at
            if age < self._candle_ttl:
                items = ring.items
                start = len(items) - limit
                if start >= 0 or ring.complete:
                    ring.used = now
                    self._rings.move_to_end(key)
                    self._candle_hits += 1
                    return (items[start:] if start > 0 else items[:]), age
            else:
                self._drop_ring(key)
                self._expirations += 1
        self._candle_misses += 1
        return None

    @property
    def confirmations_due(self) -> bool:
        """True when live writes created entries to check since the last
        :meth:`take_confirmations`."""
        return bool(self._confirmations)

    def take_confirmations(self) -> list[tuple[LatestKind, str, str | None]]:
        """The (kind, symbol, source) of each entry to check that live writes created since
        the last call, oldest first: source None for an any-source entry, a source for one
        a relayed write created. The owner reads the newest value of each from the tiers
        below and hands it to :meth:`fill_tick` / :meth:`fill_order_flow` (with that
        source)."""
        due = list(self._confirmations)
        self._confirmations.clear()
        return due

    def symbols(self) -> list[str]:
        """Symbols with a latest tick in the cache, least recently used first (no TTL
        check; for health)."""
        return [key for key in self._ticks if type(key) is str]

    # ------------------------------------------------------------------ peeks (for health)

    def peek_tick(self, symbol: str, source: str | None = None) -> TickData | None:
        """The live tick of ``symbol`` (from ``source``, or from any source), without
        counting a read: no hit or miss, no LRU move; an expired entry is left for the next
        read to drop. An entry not yet settled counts too: any tick this cache saw will do
        (for staleness, or to answer beside a lower tier's value)."""
        entry = self._ticks.get(symbol if source is None else (symbol, source))
        if entry is None or self._now() - entry.stored_at >= self._tick_ttl:
            return None
        return entry.value

    def peek_order_flow(self, symbol: str, source: str | None = None) -> OrderFlowMetrics | None:
        """Like :meth:`peek_tick`, for order-flow metrics."""
        entry = self._flows.get(symbol if source is None else (symbol, source))
        if entry is None or self._now() - entry.stored_at >= self._flow_ttl:
            return None
        return entry.value

    def peek_candle_end(self, symbol: str, timeframe: str) -> int | None:
        """The ``bucket_end`` of the newest candle in any live ring of ``(symbol,
        timeframe)``, or None; like :meth:`peek_tick`, not a read."""
        rings = self._ring_index.get((symbol, timeframe))
        if not rings:
            return None
        now = self._now()
        ends = [
            ring.items[-1].bucket_end
            for ring in rings.values()
            if ring.items and now - ring.stored_at < self._candle_ttl
        ]
        return max(ends, default=None)

    def candle_sources(self, symbol: str, timeframe: str) -> list[str]:
        """Sources with a live (unexpired) ring for ``(symbol, timeframe)``.

        Ordered by the ring's last write, most recent first, so the router can prefer the
        source that is currently streaming. Does not count as a read (no hit/miss, no LRU
        move).
        """
        rings = self._ring_index.get((symbol, timeframe))
        if rings is None:
            return []
        now = self._now()
        ttl = self._candle_ttl
        if len(rings) == 1:  # the usual case: one feed per series
            for source, ring in rings.items():
                if now - ring.stored_at < ttl:
                    return [source]
        live = [
            (ring.stored_at, source) for source, ring in rings.items() if now - ring.stored_at < ttl
        ]
        if len(live) < len(rings):
            expired = [source for source, ring in rings.items() if now - ring.stored_at >= ttl]
            for source in expired:
                self._drop_ring((symbol, timeframe, source))
            self._expirations += len(expired)
        # Newest write first; equal stamps (a coarse clock) fall back to the source name.
        live.sort(reverse=True)
        return [source for _, source in live]

    def contents(self) -> tuple[list[TickData], list[OrderFlowMetrics], list[CandleData]]:
        """Every per-source tick and order-flow entry and every ring's candles (oldest
        first per ring), expired or not; not a read (no hit or miss, no LRU move)."""
        ticks = [entry.value for key, entry in self._ticks.items() if type(key) is tuple]
        flows = [entry.value for key, entry in self._flows.items() if type(key) is tuple]
        candles = [candle for ring in self._rings.values() for candle in ring.items]
        return ticks, flows, candles

    # ------------------------------------------------------------------ maintenance

    def clear(self) -> None:
        """Drop every entry (e.g. when the pub/sub subscription is lost); counters stay."""
        self._ticks.clear()
        self._flows.clear()
        self._rings.clear()
        self._ring_index.clear()
        self._confirmations.clear()
        self._clears += 1

    def invalidate_symbol(self, symbol: str) -> int:
        """Drop every entry of ``symbol`` (all sources, timeframes and types).

        Scans the entries once, so it costs O(entries); it is not meant for a hot path.

        Returns:
            The number of entries dropped.
        """
        dropped = 0
        for latest in (self._ticks, self._flows):
            doomed = [k for k in latest if k == symbol or (type(k) is tuple and k[0] == symbol)]
            for k in doomed:
                del latest[k]
            dropped += len(doomed)
        ring_keys = [k for k in self._rings if k[0] == symbol]
        for rk in ring_keys:
            self._drop_ring(rk)
        return dropped + len(ring_keys)

    def __len__(self) -> int:
        """Entries counted against ``max_entries``."""
        return len(self._ticks) + len(self._flows) + len(self._rings)

    def stats(self) -> MemoryCacheStats:
        """Return the counters and an estimate of the memory held.

        The byte estimate multiplies entry counts by per-entry costs measured once per
        cache, on the first entry of each type seen by ``stats()``: ``sys.getsizeof`` of the
        key, the entry object, the model with its ``__dict__``, fields set and non-None
        field values, plus a fixed OrderedDict slot cost. A model shared by the any-source
        and a per-source entry is counted once (the share of per-source keys is sampled from
        the first 256 keys). Short strings that CPython shares between models (source,
        timeframe) are counted for each, so it errs ~15 % high. Cost: O(candle rings).
        """
        candles = sum(len(ring.items) for ring in self._rings.values())
        return MemoryCacheStats(
            tick_entries=len(self._ticks),
            order_flow_entries=len(self._flows),
            candle_rings=len(self._rings),
            candles=candles,
            max_entries=self._max_entries,
            tick_hits=self._tick_hits,
            tick_misses=self._tick_misses,
            order_flow_hits=self._flow_hits,
            order_flow_misses=self._flow_misses,
            candle_hits=self._candle_hits,
            candle_misses=self._candle_misses,
            stale_writes=self._stale_writes,
            evictions=self._evictions,
            expirations=self._expirations,
            clears=self._clears,
            bytes_estimate=self._estimate_bytes(candles),
        )

    # ------------------------------------------------------------------ internals

    def _put_latest(
        self,
        entries: OrderedDict[_LatestKey, _Latest[_V]],
        key: _LatestKey,
        value: _V,
        now: float,
        settled: bool,
    ) -> int:
        """Compare-and-set ``value`` into ``key``; a new entry is created ``settled`` or not
        (an existing one keeps its state). Returns _REFUSED, _STORED or _CREATED."""
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = _Latest(value, now, settled)
            self._evict_excess(entry)
            return _CREATED
        ts = value.timestamp
        # The common case costs one comparison; ties take the shared order (codec.supersedes).
        if ts < entry.ts or (ts == entry.ts and tie_rank(value) < tie_rank(entry.value)):
            self._stale_writes += 1
            return _REFUSED
        entry.value = value
        entry.ts = ts
        entry.stored_at = entry.used = now
        entries.move_to_end(key)
        return _STORED

    def _fill(
        self,
        entries: OrderedDict[_LatestKey, _Latest[_V]],
        symbol: str,
        source: str | None,
        value: _V | None,
    ) -> _V | None:
        """:meth:`fill_tick` on ``entries``."""
        now = self._now()
        key: _LatestKey
        if source is None:
            key = symbol
            if value is not None:
                self._put_latest(entries, (symbol, value.source), value, now, True)
        else:
            key = (symbol, source)
        if value is not None:
            self._put_latest(entries, key, value, now, True)
        entry = entries.get(key)
        if entry is None:
            return None
        entry.settled = True
        return entry.value

    def _new_ring(self, key: _RingKey, now: float) -> _Ring:
        ring = _Ring(now)
        self._rings[key] = ring
        symbol, timeframe, source = key
        self._ring_index.setdefault((symbol, timeframe), {})[source] = ring
        return ring

    def _expire_ring(self, key: _RingKey) -> None:
        # A write to an expired ring starts a new one: the old candles are as stale as the
        # TTL says, and reviving them with a fresh write time would serve them again.
        self._drop_ring(key)
        self._expirations += 1

    def _drop_ring(self, key: _RingKey) -> None:
        del self._rings[key]
        symbol, timeframe, source = key
        index_key = (symbol, timeframe)
        sources = self._ring_index[index_key]
        del sources[source]
        if not sources:
            del self._ring_index[index_key]

    def _evict_excess(self, keep: object = None) -> None:
        """Evict least recently used entries until the bound holds.

        Each dict is in LRU order, so the global LRU entry is the head with the smallest
        ``used`` stamp. ``keep`` (the entry just written) is never chosen: on a coarse
        monotonic clock (Windows ticks every ~16 ms) stamps tie, and evicting the value being
        stored would turn a write into a no-op. Other ties go to ticks, then order flow, then
        rings.
        """
        ticks, flows, rings = self._ticks, self._flows, self._rings
        excess = len(ticks) + len(flows) + len(rings) - self._max_entries
        while excess > 0:
            victim: (
                OrderedDict[_LatestKey, _Latest[TickData]]
                | OrderedDict[_LatestKey, _Latest[OrderFlowMetrics]]
                | OrderedDict[_RingKey, _Ring]
                | None
            ) = None
            victim_used = 0.0
            for entries in (ticks, flows, rings):
                for head in entries.values():
                    if head is not keep and (victim is None or head.used < victim_used):
                        victim, victim_used = entries, head.used
                    break
            if victim is rings:
                self._drop_ring(next(iter(rings)))
            elif victim is not None:
                victim.popitem(last=False)
            else:  # only ``keep`` is left, which max_entries >= 1 always allows
                return
            self._evictions += 1
            excess -= 1

    def _estimate_bytes(self, candles: int) -> int:
        sizes = self._sizes
        for kind, latest in (("tick", self._ticks), ("flow", self._flows)):
            if kind not in sizes:
                for key, entry in latest.items():
                    # Structure measured on a per-source entry's shape: (symbol, source) key.
                    sizes[kind] = _model_bytes(entry.value)
                    sizes[kind + "_slot"] = (
                        sys.getsizeof((key, key)) + sys.getsizeof(entry) + _ODICT_SLOT_BYTES
                    )
                    break
        if "candle" not in sizes:
            for rkey, ring in self._rings.items():
                sizes["candle"] = _model_bytes(ring.items[0]) + 8  # + its list slot
                sizes["ring"] = (
                    sys.getsizeof(rkey)
                    + sys.getsizeof(ring)
                    + sys.getsizeof([])
                    + _ODICT_SLOT_BYTES
                    + 200  # its slot in the (symbol, timeframe) -> sources index
                )
                break
        total = len(self._rings) * sizes.get("ring", 0) + candles * sizes.get("candle", 0)
        for kind, latest in (("tick", self._ticks), ("flow", self._flows)):
            if latest:
                # An any-source entry shares its model with a per-source entry; count models
                # for the per-source share only, estimated from a sample of the keys.
                sample = list(islice(latest, _SAMPLE))
                own = sum(1 for k in sample if type(k) is tuple) / len(sample)
                total += len(latest) * (sizes[kind + "_slot"] + round(own * sizes[kind]))
        return total
