"""The backup stream: every accepted batch is also published to a durable message stream.

This is the write path's third branch (the database is the first, the cache the second): a
copy of everything the router accepted, kept outside this machine, from which
:func:`replay_from_stream` can rebuild or back-fill a database. Two backends:

* :class:`NatsBackupStream` (the default): NATS JetStream. One stream (``DM_BACKUP``) on
  file storage captures the subjects ``dm.backup.<kind>``; messages are kept until they are
  older than ``max_age`` (7 days by default) or the stream outgrows ``max_bytes``, oldest
  first (``discard=old``). Each message carries a ``Nats-Msg-Id`` header, so JetStream
  drops a re-sent copy within its ``duplicate_window`` (2 minutes) -- a convenience only.
* :class:`RedisBackupStream`, the lighter option, with plain limits: entries live in the
  server's memory (they survive a restart only if the server persists its data, RDB/AOF, and
  then only up to the last save), and ``XADD ... MAXLEN ~ N`` trims the oldest entries once
  the stream holds more than about ``maxlen`` messages, whatever their age: a replay can
  never reach further back than what is left. There is no de-duplication at all.

Neither stream de-duplicates for correctness: a batch may be published twice (a timed-out
publish the client still delivers after reconnecting, a spool drained again after a crash),
and the copies are removed where they land, by the database's idempotent writes
(:func:`data_manager.storage.base.tick_content_key` for ticks, upserts for candles and order
flow). Replaying the same stretch twice leaves the same rows.

Message format (one message per batch and kind; version 1, UTF-8 JSON, orjson)::

    {"v":1, "type":"batch", "kind":"tick"|"candle"|"order_flow",
     "batch_id":str, "origin":str, "items":[<item>, ...]}

where each item is exactly the :mod:`data_manager.cache.codec` version-1 object of that kind
(ticks carry every content field and ``seq``, from which the database recomputes its
content key; ``mid``/``spread`` are derived and ignored when read). ``batch_id`` is unique
per message: ``<origin>:<session>:<n>``, where ``session`` is random per stream object, so
a router restarted under the same instance id never reuses an id (JetStream would drop the
new message as a duplicate); spooled data gets ``<spool instance>:<session>:s<first
LSN>-<last LSN>``, the range of the spool records the message holds (a message holds every
record of its kind in that range, so the id names its content: a chunk sent again after a
lost acknowledgement, with more records or cut differently, never passes for a copy).
``origin`` is the publishing router's instance id. A batch larger than the message limit
(1 MiB, NATS's default ``max_payload``; lower when the server's ``max_payload`` or an
existing JetStream stream's ``max_msg_size`` is, headers included) is split into several
messages; batches queued while the stream was slow are coalesced (up to
``coalesce_items``), so a message can hold several batches. A message the server refuses
for its size (the stream's limit was lowered meanwhile) is not an outage: it is cut
smaller and sent again at once, and an item too large to fit alone is dropped (counted in
``dropped_items``, logged as an error) instead of being retried for ever.
Readers ignore members they do not know and refuse any other ``"v"``.

Never blocking the write path. :meth:`BackupStream.publish_batch` is synchronous: it
appends the batch to an in-memory outbox and returns. A background task publishes the
outbox in order. When a publish fails (or the outbox outgrows ``max_pending_items``
because the stream is too slow), the stream is *down*: the failed batch and everything
queued behind it go to a local **spool** (a :class:`~data_manager.journal.Journal` of its
own, ``<journal_dir>/stream-spool/<instance>/``), and so do new batches, so nothing waits
in memory for the stream to come back. A circuit breaker decides when to probe again; then
the spool is drained to the stream in order (chunk by chunk, each marked stored once
acknowledged) and, once it is empty, batches go straight to the stream again. Keeping one
route while a backlog exists keeps the stream in acceptance order, so an older version of a
forming candle is never published after a newer one. Spools of dead instances in the same
folder are adopted at start and drained first. Without a spool directory a down stream
keeps at most ``max_pending_items`` items in memory and drops the oldest batches beyond
(counted and logged as errors). Failures are counted and visible in :meth:`stats`.
An outage is logged once, as a warning. A refusal only a configuration change can end (the
JetStream stream does not store the subjects, another stream does, it cannot be created,
it does not exist and may not be created, the Redis key holds another type) is logged as an
error saying so, again at most once a minute, and shows in ``last_error`` as a
"configuration error"; it is retried all the same, so the stream resumes once fixed.

Replay. ``--since`` selects messages by the time the stream stored them (JetStream's
message timestamp, the Redis entry id), not by the items' event time: data spooled during
an outage is stored later than it happened, so a replay from just before an outage
includes it. A replay reads up to the end of the stream as it was when the replay started
and writes through ``Storage.write_ticks``/``write_candles``/``write_order_flow``. While a
live router writes the same symbols, a replay can briefly put back an older version of a
*forming* candle (the live router's next update overwrites it; a closed candle is never
replaced by a forming one).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import enum
import logging
import math
import reprlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Self, TypeAlias, cast
from urllib.parse import urlsplit, urlunsplit

import orjson

from data_manager._tasks import finish_despite_cancel
from data_manager.breaker import BreakerState, CircuitBreaker
from data_manager.clock import Clock, SystemClock
from data_manager.errors import (
    BackupStreamError,
    ConfigurationError,
    DataManagerError,
    JournalError,
    JournalLockedError,
    QueryTimeoutError,
    ValidationError,
)
from data_manager.journal import (
    IngestItem,
    Journal,
    JournalBatch,
    decode_item,
    encode_item,
    find_orphans,
    new_instance_id,
)
from data_manager.logutil import RateLimitedLogger
from data_manager.models import CandleData, OrderFlowMetrics, TickData, to_epoch_ms

if TYPE_CHECKING:
    from collections.abc import (
        AsyncGenerator,
        Awaitable,
        Callable,
        Iterable,
        Iterator,
        Sequence,
    )

    from nats.aio.client import Client as NatsClient
    from nats.js.api import StreamInfo
    from nats.js.client import JetStreamContext
    from nats.js.errors import APIError
    from redis.asyncio import Redis

    from data_manager.storage.base import Storage

__all__ = [
    "DEFAULT_NATS_STREAM",
    "DEFAULT_REDIS_KEY",
    "DEFAULT_SUBJECT_PREFIX",
    "PAYLOAD_VERSION",
    "SPOOL_DIR",
    "BackupStream",
    "BackupStreamError",
    "BackupStreamStats",
    "BatchMessage",
    "NatsBackupStream",
    "RedisBackupStream",
    "ReplayReport",
    "StreamKind",
    "StreamState",
    "backup_stream_from_url",
    "decode_batch_message",
    "encode_batch_message",
    "parse_since",
    "replay_from_stream",
]

logger = logging.getLogger(__name__)

#: Version written into every message (``"v"``).
PAYLOAD_VERSION: Final = 1
DEFAULT_NATS_STREAM: Final = "DM_BACKUP"
DEFAULT_SUBJECT_PREFIX: Final = "dm.backup"
DEFAULT_REDIS_KEY: Final = "dm:backup:v1"
#: Sub-folder of the journal directory that holds the spools (one per instance).
SPOOL_DIR: Final = "stream-spool"
#: NATS's default ``max_payload``; also the default message limit for Redis.
DEFAULT_MESSAGE_BYTES: Final = 1024 * 1024
# What the headers of a JetStream publish take besides the message id and the stream name
# ("NATS/1.0", "Nats-Msg-Id", "Nats-Expected-Stream", separators), with room to spare: the
# server counts headers into both max_payload and a stream's max_msg_size.
_NATS_HEADER_BYTES: Final = 128
# JetStream's error code for "message size exceeds maximum allowed" (the stream's
# max_msg_size): refused on every attempt, however often it is sent.
_JS_MESSAGE_TOO_LARGE: Final = 10054
# "expected stream does not match": the subject is stored by another stream than ours.
_JS_STREAM_MISMATCH: Final = 10060
# "resource limits exceeded for account": a status 400 that passes by itself once messages
# age out of the account's streams; an outage, not a configuration error.
_JS_ACCOUNT_LIMITS: Final = 10002
_DECODE_SLICE: Final = 500  # spooled records decoded between two yields to the event loop
_LOG_INTERVAL: Final = 60.0  # seconds between two log lines of one repeated problem
_LOG_TEXT: Final = 200  # characters of an item's or a reason's text in a log line
_NATS_SCHEMES: Final = frozenset({"nats", "tls"})
_REDIS_SCHEMES: Final = frozenset({"redis", "rediss", "unix"})

StreamKind: TypeAlias = Literal["tick", "candle", "order_flow"]

_KIND_OF: Final[dict[type[Any], StreamKind]] = {
    TickData: "tick",
    CandleData: "candle",
    OrderFlowMetrics: "order_flow",
}
_CLASS_OF: Final[dict[str, type[IngestItem]]] = {
    "tick": TickData,
    "candle": CandleData,
    "order_flow": OrderFlowMetrics,
}
# What an item object may hold and be validated as it is: the model's fields and the
# derived values it ignores (anything else is filtered out first).
_FIELDS_OF: Final[dict[str, frozenset[str]]] = {
    name: frozenset(cls.model_fields) | frozenset(cls.model_computed_fields)
    for name, cls in _CLASS_OF.items()
}


class StreamState(enum.Enum):
    """What a backup stream is doing (``stats().state``)."""

    NEW = "new"
    UP = "up"  # batches go straight to the stream
    DOWN = "down"  # the last attempt failed; batches go to the spool
    CATCHING_UP = "catching_up"  # the stream answers; the spool is being drained
    CLOSING = "closing"
    CLOSED = "closed"


class _Life(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class BackupStreamStats:
    """A snapshot of a backup stream's counters (no I/O to take it).

    Attributes:
        backend: ``"nats"`` or ``"redis"``.
        target: Where it publishes (no credentials).
        state: A :class:`StreamState` value.
        breaker_state: ``closed``, ``open`` or ``half_open``.
        accepted_batches, accepted_items: Handed to :meth:`BackupStream.publish_batch`.
        published_messages, published_items: Acknowledged by the stream, each message
            once: spool drains and re-sent copies the stream stored again are included; a
            copy JetStream dropped as a duplicate of a message already counted is not (a
            duplicate whose first acknowledgement was lost is counted, once).
        duplicates: Messages JetStream reported as already stored (same ``Nats-Msg-Id``).
        failures: Publish (or connect) attempts that failed.
        spooled_items: Items written to the spool because the stream was down or slow.
        spool_records, spool_bytes: Spooled items not yet published, and the spool's size
            on disk (adopted spools included).
        pending_items: Everything not yet published: outbox, in flight, on its way to the
            spool and in the spool.
        lag_seconds: Age of the oldest unpublished batch (since the stream went down, for
            spooled data); 0 when nothing is pending.
        dropped_items: Items given up: no spool and the outbox overflowed, the spool could
            not be written, a spooled record could not be read back, an item too large for
            a message on its own (the stream's ``max_msg_size``), or published after close.
            Each is counted once, even when it is met again (a spool chunk read again after
            a failed publish). Logged as errors: an item refused by name (type, symbol,
            timestamp), at most once a minute with the number of similar refusals since.
        last_error: The last failure, kept after recovery (``None``: there was none);
            ``"configuration error: ..."`` when only a change of the server's or the
            stream's configuration can end it (retried all the same).
        adopted_spools: Spools of dead instances taken over.
    """

    backend: str
    target: str
    state: str
    breaker_state: str
    accepted_batches: int
    accepted_items: int
    published_messages: int
    published_items: int
    duplicates: int
    failures: int
    spooled_items: int
    spool_records: int
    spool_bytes: int
    pending_items: int
    lag_seconds: float
    dropped_items: int
    last_error: str | None
    adopted_spools: int


class BackupStream(Protocol):
    """Where the write path sends a copy of every accepted batch."""

    async def start(self) -> None:
        """Open the spool and start publishing; never fails because the stream is down."""
        ...

    def publish_batch(self, items: Sequence[IngestItem]) -> None:
        """Queue one accepted batch for publishing; returns at once.

        Raises:
            ValidationError: An item is not a TickData, CandleData or OrderFlowMetrics
                (nothing of the batch is queued).
        """
        ...

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until nothing is pending (published, or spooled with no stream to take it)."""
        ...

    async def aclose(self, timeout: float | None = 5.0) -> None:  # noqa: ASYNC109
        """Publish what is pending (up to ``timeout``), spool the rest, disconnect."""
        ...

    def stats(self) -> BackupStreamStats:
        """Current counters (cheap; no I/O)."""
        ...

    async def probe(self, timeout: float) -> str | None:  # noqa: ASYNC109
        """Check now that the server answers and the stream takes messages (for health).

        Returns:
            None when it does, or when publishing is under way (the state says how that
            goes); otherwise why not.
        """
        ...


# --------------------------------------------------------------------------- messages


def _item_objects(kind: StreamKind, items: Iterable[Any]) -> list[dict[str, Any]]:
    """The codec's version-1 objects of ``items`` (see :mod:`data_manager.cache.codec`).

    Built as dicts (the same ones ``codec.encode_item`` serialises) so a whole batch goes
    through one ``orjson.dumps`` call: about five times faster than one call per item. One
    comprehension per kind keeps the per-item cost to building the dict.
    """
    if kind == "tick":
        return [
            {"v": 1, "type": "tick", **t.__dict__, "mid": t.mid, "spread": t.spread} for t in items
        ]
    if kind == "candle":
        return [{"v": 1, "type": "candle", **c.__dict__} for c in items]
    return [{"v": 1, "type": "order_flow", **m.__dict__} for m in items]


def encode_batch_message(
    kind: StreamKind, batch_id: str, origin: str, items: Iterable[IngestItem]
) -> bytes:
    """Encode items of one kind as a version-1 ``batch`` message.

    Raises:
        ValidationError: An item is not of ``kind``.
    """
    cls = _CLASS_OF.get(kind)
    items = list(items)
    if cls is None or any(type(item) is not cls for item in items):
        msg = f"a {kind!r} batch message holds only {kind} items"
        raise ValidationError(msg)
    return _encode(kind, batch_id, origin, items)


def _encode(kind: StreamKind, batch_id: str, origin: str, items: Iterable[Any]) -> bytes:
    return orjson.dumps(
        {
            "v": PAYLOAD_VERSION,
            "type": "batch",
            "kind": kind,
            "batch_id": batch_id,
            "origin": origin,
            "items": _item_objects(kind, items),
        }
    )


@dataclass(frozen=True, slots=True)
class BatchMessage:
    """A decoded ``batch`` message."""

    kind: StreamKind
    batch_id: str
    origin: str
    items: list[IngestItem]


def decode_batch_message(data: bytes | bytearray | memoryview | str) -> BatchMessage:
    """Decode a ``batch`` message, validating every item again.

    What comes back from a stream is untrusted input (another process, another language or
    a person may have written it), so each item goes through the model's full validation.

    Raises:
        ValidationError: Not a version-1 batch, or an item the model refuses (the whole
            message is refused).
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        msg = f"backup message is not valid JSON: {exc}"
        raise ValidationError(msg) from exc
    if type(obj) is not dict or obj.get("v") != PAYLOAD_VERSION or obj.get("type") != "batch":
        head = (obj.get("v"), obj.get("type")) if type(obj) is dict else type(obj).__name__
        msg = f"expected a v{PAYLOAD_VERSION} 'batch' message, got {head!r}"
        raise ValidationError(msg)
    kind = obj.get("kind")
    raw = obj.get("items")
    batch_id = obj.get("batch_id")
    origin = obj.get("origin")
    # ``kind`` is checked as a string first: a list or an object is not hashable, and the
    # dict lookup would raise a TypeError instead of refusing the message.
    if type(kind) is not str or kind not in _CLASS_OF or type(raw) is not list:
        shown = reprlib.repr(kind)  # bounded: the message is logged per skipped message
        msg = f"backup message needs a known 'kind' and a list 'items', got kind={shown}"
        raise ValidationError(msg)
    if type(batch_id) is not str or type(origin) is not str:
        msg = "backup message needs string 'batch_id' and 'origin'"
        raise ValidationError(msg)
    cls = _CLASS_OF[kind]
    fields = _FIELDS_OF[kind]
    items: list[IngestItem] = []
    for entry in raw:
        if type(entry) is not dict or entry.get("v") != 1 or entry.get("type") != kind:
            msg = f"backup message {batch_id!r} holds an item that is not a v1 {kind!r}"
            raise ValidationError(msg)
        del entry["v"], entry["type"]
        if not entry.keys() <= fields:
            # Unknown members (a later v1 writer may add some) are left out; derived ones
            # (mid, spread) the model drops itself.
            entry = {k: v for k, v in entry.items() if k in fields}
        items.append(cls.model_validate(entry))
    return BatchMessage(
        kind=cast("StreamKind", kind), batch_id=batch_id, origin=origin, items=items
    )


#: Names a message from the items it holds (called once per message encoded).
_MakeId: TypeAlias = "Callable[[list[IngestItem]], str]"


@dataclass(frozen=True, slots=True)
class _Message:
    kind: StreamKind
    batch_id: str
    payload: bytes
    items: list[IngestItem]  # kept to cut the message again if the server refuses its size

    @property
    def count(self) -> int:
        return len(self.items)


class _TooLarge(BackupStreamError):
    """The server refused a message for its size: sending it again can never succeed."""


class _Misconfigured(BackupStreamError):
    """The server refuses for a reason of configuration: only a change of it can help."""


def _group_by_kind(
    items: list[IngestItem], on_refused: Callable[[object, str], None]
) -> list[tuple[StreamKind, list[IngestItem]]]:
    """Split a mixed batch by kind, keeping the order within each kind."""
    if items:
        # The usual batch holds one kind only (ticks): one type check per item, no copies.
        first = type(items[0])
        kind = _KIND_OF.get(first)
        if kind is not None and all(type(item) is first for item in items):
            return [(kind, items)]
    groups: dict[StreamKind, list[IngestItem]] = {}
    for item in items:
        kind = _KIND_OF.get(type(item))
        if kind is None:
            # Not something the write path accepts; refusing it here keeps one bad object
            # from wedging the stream.
            on_refused(item, f"a {type(item).__name__} is not a publishable item")
            continue
        group = groups.get(kind)
        if group is None:
            groups[kind] = [item]
        else:
            group.append(item)
    return list(groups.items())


class _Encoder:
    """Cuts items of one kind into messages under the size limit.

    The limit is on the whole message as the server counts it: the payload plus
    ``overhead(batch_id)`` (a JetStream message's headers). It remembers how many bytes an
    item of each kind took last time, so a large batch is cut before it is encoded
    (encoding it whole only to find it too big would double the work).
    """

    __slots__ = ("_per_item", "limit", "on_refused", "overhead")

    def __init__(
        self,
        limit: int,
        on_refused: Callable[[object, str], None],
        overhead: Callable[[str], int],
    ) -> None:
        self.limit = limit
        self.on_refused = on_refused
        self.overhead = overhead
        self._per_item: dict[StreamKind, float] = {}

    def messages(
        self, items: list[IngestItem], *, origin: str, make_id: _MakeId
    ) -> Iterator[_Message]:
        """Encode ``items`` as messages of one kind each, none larger than the limit.

        Lazily: the caller sends each message before the next is encoded, so a large
        batch never holds the event loop for long.
        """
        for kind, group in _group_by_kind(items, self.on_refused):
            per_item = self._per_item.get(kind)
            # 80% of the limit: item sizes vary (symbols, optional fields).
            step = len(group) if per_item is None else max(1, int(self.limit * 0.8 / per_item))
            for start in range(0, len(group), step):
                yield from self._encode_within(kind, group[start : start + step], origin, make_id)

    def _encode_within(
        self,
        kind: StreamKind,
        items: list[IngestItem],
        origin: str,
        make_id: _MakeId,
    ) -> Iterator[_Message]:
        batch_id = make_id(items)
        try:
            payload = _encode(kind, batch_id, origin, items)
        except orjson.JSONEncodeError as exc:
            # A value that is not JSON (only a model built without validation holds one):
            # find the item by halving, and publish the others.
            if len(items) == 1:
                self.on_refused(items[0], f"it cannot be encoded: {exc}")
                return
            half = len(items) // 2
            yield from self._encode_within(kind, items[:half], origin, make_id)
            yield from self._encode_within(kind, items[half:], origin, make_id)
            return
        self._per_item[kind] = len(payload) / len(items)
        size = len(payload) + self.overhead(batch_id)
        if size <= self.limit:
            yield _Message(kind, batch_id, payload, items)
            return
        if len(items) == 1:
            self.on_refused(
                items[0], f"its message takes {size} bytes, over the {self.limit}-byte limit"
            )
            return
        parts = min(len(items), max(2, math.ceil(size * 1.25 / self.limit)))
        step = math.ceil(len(items) / parts)
        for start in range(0, len(items), step):
            yield from self._encode_within(kind, items[start : start + step], origin, make_id)


# --------------------------------------------------------------------------- publishing


def _check_publishable(items: Sequence[object]) -> None:
    """Raise ValidationError unless every item is one of the three models."""
    first = type(items[0])
    if first in _KIND_OF and all(type(item) is first for item in items):
        return  # the usual batch: one kind only
    for item in items:
        if type(item) not in _KIND_OF:
            msg = (
                f"cannot publish a {type(item).__name__} to the backup stream; expected "
                "TickData, CandleData or OrderFlowMetrics"
            )
            raise ValidationError(msg)


@dataclass(slots=True)
class _Batch:
    items: list[IngestItem]
    accepted_at: float  # monotonic


def _clip(text: str, most: int = _LOG_TEXT) -> str:
    """``text`` cut to ``most`` characters (the cut marked with "...")."""
    return text if len(text) <= most else f"{text[: most - 3]}..."


def _describe_item(item: object) -> str:
    """A short identification of ``item`` for a log line: never its whole repr.

    An item built without validation may hold anything, of any size, in any field.
    """
    symbol = getattr(item, "symbol", None)
    timestamp = getattr(item, "timestamp", None)
    if isinstance(symbol, str) and type(timestamp) is int:
        return f"{type(item).__name__} {_clip(repr(symbol), 60)} at {timestamp}"
    return _clip(f"{type(item).__name__}: {item!r}")


def _add_range(ranges: list[tuple[int, int]], low: int, high: int) -> int:
    """Add ``low..high`` to the disjoint, sorted, non-adjacent ``ranges`` (in place);
    return how many of its LSNs were not in them yet."""
    # The ranges that overlap or touch low..high are merged with it into one.
    first = bisect.bisect_left(ranges, low - 1, key=lambda r: r[1])
    stop = bisect.bisect_right(ranges, high + 1, key=lambda r: r[0])
    touched = ranges[first:stop]
    new = high - low + 1 - sum(max(0, min(b, high) - max(a, low) + 1) for a, b in touched)
    if touched:
        low, high = min(low, touched[0][0]), max(high, touched[-1][1])
    ranges[first:stop] = [(low, high)]
    return new


def _err(exc: BaseException) -> str:
    """``Type: message`` of a driver error (redis-py's and nats-py's reprs can leave the
    server's message out: ``server:ResponseError``, ``BadRequestError()``)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _lsn_ranges(lsns: list[int], most: int = 10) -> str:
    """``"3, 7-9, 12"`` for ascending ``lsns`` (the first ``most`` ranges, then "...")."""
    ranges: list[str] = []
    start = end = lsns[0]
    for lsn in [*lsns[1:], -1]:
        if lsn == end + 1:
            end = lsn
            continue
        ranges.append(str(start) if start == end else f"{start}-{end}")
        start = end = lsn
    if len(ranges) > most:
        ranges[most:] = ["..."]
    return ", ".join(ranges)


def _redact(url: str) -> str:
    """``url`` without user name or password, for logs and health."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, ""))


class _BackupStreamBase:
    """Outbox, spool, breaker and the publishing task; subclasses talk to the server.

    Subclasses implement :meth:`_connect` (idempotent: connect if needed and make sure the
    destination exists), :meth:`_check` (connect if needed and ask the server whether the
    destination still takes messages), :meth:`_send` (publish one message and wait for the
    server's acknowledgement; return whether the server stored it, ``False`` for a copy it
    already held; raise :class:`BackupStreamError` on any failure) and :meth:`_disconnect`.
    """

    backend = "stream"

    def __init__(
        self,
        target: str,
        *,
        spool_dir: Path | str | None,
        instance_id: str | None,
        max_pending_items: int,
        coalesce_items: int,
        max_message_bytes: int,
        drain_records: int,
        retry_interval: float,
        breaker: CircuitBreaker | None,
        clock: Clock | None,
    ) -> None:
        if max_pending_items < 1 or coalesce_items < 1 or drain_records < 1:
            msg = "max_pending_items, coalesce_items and drain_records must be >= 1"
            raise ConfigurationError(msg)
        if max_message_bytes < 4096:
            msg = f"max_message_bytes must be at least 4096, got {max_message_bytes}"
            raise ConfigurationError(msg)
        if retry_interval < 0:
            msg = "retry_interval must be >= 0"
            raise ConfigurationError(msg)
        self.target = target
        self.instance_id = instance_id or new_instance_id()
        self._clock: Clock = clock or SystemClock()
        self._breaker = breaker or CircuitBreaker(
            f"backup-stream {target}", failure_threshold=3, reset_timeout=1.0, clock=self._clock
        )
        self._max_pending = max_pending_items
        self._coalesce = coalesce_items
        self._limit = max_message_bytes
        self._drain_records = drain_records
        self._retry_interval = retry_interval
        self._spool_root = Path(spool_dir) if spool_dir is not None else None
        self._spool: Journal | None = None
        self._spools: list[Journal] = []  # adopted ones first, our own last
        self._life = _Life.NEW
        self._closed = asyncio.Event()  # set once aclose() has finished
        self._outbox: collections.deque[_Batch] = collections.deque()
        self._outbox_items = 0
        self._inflight: list[_Batch] | None = None
        self._inflight_items = 0
        self._inflight_spooled = False
        self._to_spool: list[list[IngestItem]] = []
        self._to_spool_items = 0
        self._spooling = 0  # items in the append under way
        self._spooling_from = 0  # the spool's last LSN when that append started
        self._backlog = False  # the spool route is in force
        self._backlog_since = 0.0
        self._down = False  # the last attempt failed
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._spool_wake = asyncio.Event()
        self._progress: asyncio.Future[None] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._spooler_task: asyncio.Task[None] | None = None
        # A health probe's request; the publishing task answers it (see probe()).
        self._probe: asyncio.Future[str | None] | None = None
        self._next_id = 0
        # Message ids must never repeat within JetStream's duplicate window, even across a
        # restart under the same instance id: a repeated id is dropped as a duplicate.
        self._session = secrets.token_hex(4)
        self._encoder_: _Encoder | None = None
        self._refused_limit = 0  # below the size of a message the server refused (0: none)
        # Ids acknowledged for the unit or spool chunk under way: a copy of one of them the
        # stream drops as a duplicate is not counted again (spooled ids repeat on a retry).
        self._acked: set[str] = set()
        # Per spool: the LSN ranges (disjoint, sorted) of the chunk under way counted as
        # dropped already (unreadable, or skipped by the spool): a chunk that fails to
        # publish is read again and meets them again.
        self._lost_counted: dict[str, list[tuple[int, int]]] = {}
        # Counters (see BackupStreamStats).
        self._accepted_batches = 0
        self._accepted_items = 0
        self._published_messages = 0
        self._published_items = 0
        self._duplicates = 0
        self._failures = 0
        self._spooled = 0
        self._dropped = 0
        self._last_error: str | None = None
        self._adopted = 0
        self._log = RateLimitedLogger(logger, _LOG_INTERVAL, clock=self._clock)
        self._recoveries = 0  # times the stream answered again after a failure

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, state={self._state().value})"

    # ------------------------------------------------------------------ server side

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _check(self) -> None:
        raise NotImplementedError

    async def _send(self, message: _Message) -> bool:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        raise NotImplementedError

    def _message_limit(self) -> int:
        """Largest message (payload and headers) the server takes, as far as known."""
        if self._refused_limit:
            return min(self._limit, self._refused_limit)
        return self._limit

    def _message_overhead(self, batch_id: str) -> int:
        """Bytes the server counts into a message besides its payload."""
        del batch_id
        return 0

    async def _message_refused(self, size: int, exc: _TooLarge) -> None:
        """The server refused a message of ``size`` bytes as too large (for good).

        Whatever the server's limit turns out to be, it is below ``size``: later messages
        are cut under it. Subclasses look the actual limit up first.
        """
        del exc
        limit = self._message_limit()
        self._refused_limit = min(limit, size - 1)

    # ------------------------------------------------------------------ lifecycle

    @property
    def breaker(self) -> CircuitBreaker:
        """The stream's circuit breaker."""
        return self._breaker

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the spool, adopt dead instances' spools, start publishing.

        Connecting is left to the background task: a stream that is down at start only
        means batches go to the spool until it answers.

        Raises:
            JournalLockedError: Another live process holds this instance's spool.
            JournalError: The spool folder cannot be used.
            ConfigurationError: The stream was started before, or its client library is
                missing.
        """
        if self._life is not _Life.NEW:
            msg = f"{self!r} cannot be started twice"
            raise ConfigurationError(msg)
        self._check_client()
        if self._spool_root is not None:
            spool = Journal(self._spool_root, instance_id=self.instance_id)
            await spool.open()
            self._spool = spool
            try:
                await self._adopt_spools()
            except BaseException:
                # Cancelled or failed part-way: give back every spool taken so far, or they
                # would stay locked (never drained, never adopted) for the life of the process.
                taken, self._spools, self._spool = [*self._spools, spool], [], None
                await finish_despite_cancel(self._close_spools(taken))
                raise
            self._spools.append(spool)
            if any(s.pending_records for s in self._spools):
                self._enter_backlog()
                logger.info(
                    "backup stream %s: %d spooled items to publish first",
                    self.target,
                    sum(s.pending_records for s in self._spools),
                )
        self._life = _Life.RUNNING
        self._pump_task = asyncio.create_task(self._pump(), name="data_manager-backup-pump")
        self._spooler_task = asyncio.create_task(
            self._spooler(), name="data_manager-backup-spooler"
        )
        self._wake.set()

    def _check_client(self) -> None:
        """Raise ConfigurationError when the client library is not installed."""

    async def _adopt_spools(self) -> None:
        assert self._spool_root is not None
        paths = await asyncio.to_thread(find_orphans, self._spool_root, exclude={self.instance_id})
        for path in paths:
            orphan = Journal(path.parent, instance_id=path.name)
            try:
                await orphan.open(create=False)
            except JournalLockedError:
                continue  # alive after all, or another router was quicker
            except JournalError:
                logger.exception("backup stream: cannot adopt the spool %s; leaving it", path)
                continue
            if orphan.pending_records == 0:
                await orphan.close()  # nothing left to publish: removes it
                continue
            logger.warning(
                "backup stream: adopting the spool of dead instance %s (%d items)",
                orphan.instance_id,
                orphan.pending_records,
            )
            self._spools.append(orphan)
            self._adopted += 1

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - router API
        """Wait until every batch accepted so far is published.

        Batches accepted during the wait are waited for too, so under a steady flow this
        returns at the first moment nothing is pending. While the stream is down this
        waits for it to come back.

        Raises:
            QueryTimeoutError: ``timeout`` passed first (nothing is lost; the work goes on).
            BackupStreamError: The stream was never started or is closed.
        """
        if self._life is not _Life.RUNNING:
            msg = f"{self!r} is not running"
            raise BackupStreamError(msg)
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self._wait_until(self._idle)
        except TimeoutError:
            stats = self.stats()
            msg = (
                f"backup stream flush did not finish within {timeout:g}s: "
                f"{stats.pending_items} items pending, state {stats.state}"
            )
            raise QueryTimeoutError(msg, timeout_seconds=timeout) from None

    async def aclose(self, timeout: float | None = 5.0) -> None:  # noqa: ASYNC109 - router API
        """Stop accepting; publish what is pending, spool what cannot be; disconnect.

        Waits up to ``timeout`` for the stream to take everything; with a spool it stops
        waiting as soon as the stream is known to be down. What is left is written to the
        spool, which the next start (or another instance, once this one is gone) drains.
        Without a spool what is left is dropped, counted and logged.
        """
        if self._life is _Life.CLOSING:
            await self._closed.wait()  # a concurrent aclose() finishes the job
            return
        if self._life is _Life.CLOSED:
            return
        if self._life is _Life.NEW:
            self._life = _Life.CLOSED
            self._settle_leftovers()  # batches handed over before start: nowhere to go
            self._closed.set()
            return
        self._life = _Life.CLOSING
        self._wake.set()

        def finished() -> bool:
            return self._idle() or (self._spool is not None and self._down)

        cancelled = False
        try:
            async with asyncio.timeout(timeout):
                await self._wait_until(finished)
        except TimeoutError:
            logger.warning(
                "backup stream %s: close gave up waiting after %ss", self.target, timeout
            )
        except asyncio.CancelledError:
            # Our caller gave up (an outer timeout): shut down as after our own timeout,
            # then let the cancellation through; left CLOSING, the pump would run on and
            # what is pending would never reach the spool.
            cancelled = True
        try:
            await finish_despite_cancel(self._shut_down())
        finally:
            self._life = _Life.CLOSED
            self._closed.set()
            self._notify_progress()
        if cancelled:
            raise asyncio.CancelledError

    async def _shut_down(self) -> None:
        """Stop the pump, spool what is left, close the spools, disconnect (end of aclose)."""
        await self._stop_task(self._pump_task)
        self._pump_task = None
        self._settle_leftovers()
        self._spool_wake.set()
        spooler, self._spooler_task = self._spooler_task, None
        if spooler is not None:
            await spooler  # it exits once everything handed to it is written
        spools, self._spools = self._spools, []
        await self._close_spools(spools)
        self._spool = None
        try:
            await self._disconnect()
        except BackupStreamError as exc:
            logger.warning("backup stream %s: disconnect failed: %s", self.target, exc)

    async def _close_spools(self, spools: list[Journal]) -> None:
        for spool in spools:
            await spool.close()  # kept on disk when not fully published; no-op if not open

    @staticmethod
    async def _stop_task(task: asyncio.Task[None] | None) -> None:
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def _settle_leftovers(self) -> None:
        """At close, after the pump stopped: spool (or drop) what it did not publish."""
        leftovers: list[list[IngestItem]] = []
        if self._inflight is not None and not self._inflight_spooled:
            leftovers += [b.items for b in self._inflight]
        leftovers += [b.items for b in self._outbox]
        self._inflight = None
        self._inflight_items = 0
        self._outbox.clear()
        self._outbox_items = 0
        count = sum(len(items) for items in leftovers)
        if not count:
            return
        if self._spool is not None and self._spool.is_open:
            self._to_spool.extend(leftovers)
            self._to_spool_items += count
            logger.warning(
                "backup stream %s: %d items not published at close go to the spool %s",
                self.target,
                count,
                self._spool.path,
            )
            return
        self._dropped += count
        logger.error(
            "backup stream %s: %d items were not published before close and there is no "
            "spool to keep them",
            self.target,
            count,
        )

    # ------------------------------------------------------------------ publish

    def publish_batch(self, items: Sequence[IngestItem]) -> None:
        """Queue one accepted batch; returns at once.

        The items are copied (the caller may reuse its list). While the stream is down the
        batch goes to the spool instead of the outbox.

        Raises:
            ValidationError: An item is not a TickData, CandleData or OrderFlowMetrics;
                nothing of the batch is queued. (The write path never passes one; refused
                here, at the call, rather than found later by the background tasks.)
        """
        count = len(items)
        if not count:
            return
        _check_publishable(items)
        if self._life in (_Life.CLOSING, _Life.CLOSED):
            self._dropped += count
            logger.error(
                "backup stream %s is %s: a batch of %d items was not published",
                self.target,
                self._life.value,
                count,
            )
            return
        batch = list(items)
        self._accepted_batches += 1
        self._accepted_items += count
        if self._backlog:
            self._to_spool.append(batch)
            self._to_spool_items += count
            self._spool_wake.set()
            return
        self._outbox.append(_Batch(batch, self._clock.monotonic()))
        self._outbox_items += count
        if self._outbox_items > self._max_pending:
            self._overflow()
        self._wake.set()

    def _overflow(self) -> None:
        """The outbox outgrew its bound: the stream is slower than the flow (or hangs)."""
        if self._spool is None:
            while self._outbox_items > self._max_pending and len(self._outbox) > 1:
                dropped = self._outbox.popleft()
                self._outbox_items -= len(dropped.items)
                self._dropped += len(dropped.items)
                logger.error(
                    "backup stream %s: outbox full (%d items) and no spool; dropped the "
                    "oldest batch of %d",
                    self.target,
                    self._max_pending,
                    len(dropped.items),
                )
            return
        logger.warning(
            "backup stream %s: outbox over %d items; spooling until the stream catches up",
            self.target,
            self._max_pending,
        )
        self._enter_backlog()
        # Strict order: the unit in flight (which may still succeed: then it is published
        # twice, and the database keeps one copy), then the outbox.
        if self._inflight is not None and not self._inflight_spooled:
            self._inflight_spooled = True
            self._to_spool.extend(b.items for b in self._inflight)
            self._to_spool_items += self._inflight_items
        self._move_outbox_to_spool()

    def _move_outbox_to_spool(self) -> None:
        self._to_spool.extend(b.items for b in self._outbox)
        self._to_spool_items += self._outbox_items
        self._outbox.clear()
        self._outbox_items = 0
        self._spool_wake.set()

    def _enter_backlog(self) -> None:
        if not self._backlog:
            self._backlog = True
            self._backlog_since = self._clock.monotonic()

    # ------------------------------------------------------------------ the spooler

    async def _spooler(self) -> None:
        """Append what is handed to the spool, in order, one sync per group."""
        while True:
            if not self._to_spool:
                if self._life is _Life.CLOSING and self._pump_task is None:
                    return
                self._spool_wake.clear()
                await self._spool_wake.wait()
                continue
            spool = self._spool
            assert spool is not None
            group = [item for batch in self._to_spool for item in batch]
            self._to_spool = []
            self._to_spool_items = 0
            self._spooling = len(group)
            self._spooling_from = spool.last_lsn
            try:
                try:
                    await spool.append(group)
                except ValidationError:
                    # An item the journal cannot encode refuses the whole group (nothing of
                    # it was written): drop that item, spool the others.
                    group = self._spoolable(group)
                    self._spooling = len(group)
                    await spool.append(group)
            except JournalError as exc:
                self._dropped += len(group)
                self._last_error = f"spool: {exc}"
                logger.error(
                    "backup stream %s: %d items could not be spooled and are not in the "
                    "stream (the database has them): %s",
                    self.target,
                    len(group),
                    exc,
                )
            except Exception as exc:
                # A bug, not a spool failure: this group is lost to the stream, but the task
                # must go on, or the stream stops for good without a word.
                self._dropped += len(group)
                self._last_error = f"internal error: {exc!r}"
                logger.exception(
                    "backup stream %s: unexpected error; %d items not spooled",
                    self.target,
                    len(group),
                )
            else:
                self._spooled += len(group)
            finally:
                self._spooling = 0
                self._wake.set()
                self._notify_progress()

    def _spoolable(self, group: list[IngestItem]) -> list[IngestItem]:
        """``group`` without the items the journal refuses (each dropped and logged)."""
        kept: list[IngestItem] = []
        for item in group:
            try:
                encode_item(item)
            except ValidationError as exc:
                self._refused(item, f"it cannot be spooled: {exc}")
            else:
                kept.append(item)
        return kept

    # ------------------------------------------------------------------ the pump

    async def probe(self, timeout: float) -> str | None:  # noqa: ASYNC109 - health's bound
        """Check now that the server answers and the stream takes messages (for health).

        An idle stream learns of an outage only from its next batch: until then its state
        says up. So the publishing task (all server I/O stays there) connects, looks the
        destination up and records the answer as a publish attempt would (a failure makes
        the state ``down`` until the next success).

        Returns:
            None when the server answers, or when publishing is under way or not running
            (the state says how that goes); otherwise why not.
        """
        pump = self._pump_task
        if pump is None or pump.done() or self._life is not _Life.RUNNING:
            return None
        if self._outbox or self._backlog or self._inflight is not None:
            return None  # being exercised right now: the state is first-hand
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_future()
            self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self._probe)
        except TimeoutError:
            return f"{self.target} gave no answer within {timeout:g}s"

    async def _answer_probe(self) -> None:
        probe, self._probe = self._probe, None
        assert probe is not None
        answer: str | None = None  # also when closing cancels the check: nothing to report
        try:
            await self._check()
        except BackupStreamError as exc:
            self._on_failure(exc)
            answer = str(exc)
        except Exception as exc:
            answer = f"internal error: {exc!r}"
            raise
        else:
            self._on_success()
        finally:
            if not probe.done():
                probe.set_result(answer)

    async def _pump(self) -> None:
        while True:
            await self._wait_for_work()
            try:
                if self._probe is not None:
                    await self._answer_probe()
                elif self._backlog:
                    await self._drain_step()
                else:
                    await self._publish_step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A bug, not a stream failure (those are BackupStreamError): keep the data
                # where it is, say so loudly, try again a little later.
                self._last_error = f"internal error: {exc!r}"
                logger.exception("backup stream %s: unexpected error; retrying", self.target)
                self._retry_at = self._clock.monotonic() + max(self._breaker.reset_timeout, 0.1)
            finally:
                self._notify_progress()

    def _next_delay(self) -> float | None:
        """0 when there is work now, else seconds until there may be (None: wait for a wake)."""
        if self._probe is not None:
            return 0.0
        if self._backlog:
            if any(s.pending_records for s in self._spools):
                return max(0.0, self._retry_at - self._clock.monotonic())
            if self._to_spool or self._spooling:
                return None  # the spooler wakes us when it is written
            return 0.0  # nothing left anywhere: leave the spool route
        if self._outbox:
            return max(0.0, self._retry_at - self._clock.monotonic())
        return None

    async def _wait_for_work(self) -> None:
        while True:
            delay = self._next_delay()
            if delay == 0.0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _take_unit(self) -> list[_Batch]:
        """The next batches to publish together (coalesced up to ``coalesce_items``)."""
        outbox = self._outbox
        unit = [outbox.popleft()]
        size = len(unit[0].items)
        while outbox and size + len(outbox[0].items) <= self._coalesce:
            batch = outbox.popleft()
            size += len(batch.items)
            unit.append(batch)
        self._outbox_items -= size
        self._inflight = unit
        self._inflight_items = size
        self._inflight_spooled = False
        return unit

    async def _publish_step(self) -> None:
        if not self._breaker.allow():
            self._retry_at = self._clock.monotonic() + max(self._breaker.reset_timeout, 0.001)
            return
        unit = self._take_unit()
        self._acked.clear()  # direct ids never repeat
        try:
            items = unit[0].items if len(unit) == 1 else [i for b in unit for i in b.items]
            await self._publish_items(items, origin=self.instance_id, make_id=self._direct_id)
        except BackupStreamError as exc:
            self._on_failure(exc)
            if not self._inflight_spooled:
                if self._spool is not None:
                    self._enter_backlog()
                    self._inflight_spooled = True
                    self._to_spool.extend(b.items for b in unit)
                    self._to_spool_items += self._inflight_items
                    self._move_outbox_to_spool()
                else:
                    self._outbox.extendleft(reversed(unit))
                    self._outbox_items += self._inflight_items
            return
        except BaseException:
            # Cancelled (close) or a bug: the unit goes back where it came from.
            if not self._inflight_spooled:
                self._outbox.extendleft(reversed(unit))
                self._outbox_items += self._inflight_items
            raise
        finally:
            self._inflight = None
            self._inflight_items = 0
        self._on_success()

    async def _publish_items(
        self, items: list[IngestItem], *, origin: str, make_id: _MakeId
    ) -> None:
        """Connect if needed, then encode and send ``items`` message by message.

        Raises:
            BackupStreamError: Connecting or a send failed (the messages before it are
                published; the caller re-sends the whole unit later, and the database
                keeps one copy).
        """
        await self._connect()
        for message in self._encoder().messages(items, origin=origin, make_id=make_id):
            await self._send_fitting(message, origin=origin, make_id=make_id)

    async def _send_fitting(self, message: _Message, *, origin: str, make_id: _MakeId) -> None:
        """Send ``message``; if the server refuses its size, cut it smaller and send that.

        A refusal for size is not an outage: the server answers, and the same message
        would be refused on every attempt, holding up everything queued behind it. The
        limit is lowered below the refused size and the items are encoded again under it;
        one item that cannot fit alone is dropped (counted, logged as an error).

        Raises:
            BackupStreamError: A send failed for any other reason.
        """
        try:
            stored = await self._send(message)
        except _TooLarge as exc:
            size = len(message.payload) + self._message_overhead(message.batch_id)
            await self._message_refused(size, exc)
            logger.warning(
                "backup stream %s refused a %d-byte message as too large (%s); cutting it "
                "under %d bytes",
                self.target,
                size,
                exc,
                self._message_limit(),
            )
            encoder = self._encoder()
            for part in encoder.messages(message.items, origin=origin, make_id=make_id):
                await self._send_fitting(part, origin=origin, make_id=make_id)
            return
        if not stored and message.batch_id in self._acked:
            return  # a copy of a message counted already (JetStream dropped it)
        self._acked.add(message.batch_id)
        self._published_messages += 1
        self._published_items += message.count

    def _encoder(self) -> _Encoder:
        encoder = self._encoder_
        limit = self._message_limit()
        if encoder is None or encoder.limit != limit:
            encoder = self._encoder_ = _Encoder(limit, self._refused, self._message_overhead)
        return encoder

    def _direct_id(self, items: list[IngestItem]) -> str:
        del items  # every attempt gets an id of its own: nothing is ever sent twice under one
        self._next_id += 1
        return f"{self.instance_id}:{self._session}:{self._next_id}"

    def _refused(self, item: object, reason: str) -> None:
        # Counted one by one, logged at most once a minute: a flood of bad items must not
        # flood the log (the first line names the item, later ones how many were alike).
        self._dropped += 1
        self._log.error(
            "item-refused",
            "backup stream %s: %s not published: %s",
            self.target,
            _describe_item(item),
            _clip(reason),
        )

    async def _drain_step(self) -> None:
        spool = next((s for s in self._spools if s.pending_records), None)
        if spool is None:
            await self._finish_backlog()
            return
        # Local I/O first: the breaker's probe is taken only when there is something to send.
        chunk = await spool.read(spool.stored_lsn, max_records=self._drain_records)
        if not chunk.records and chunk.end_lsn <= spool.stored_lsn:
            # Counted but unreadable (the files changed under us): say so and move on
            # rather than retry for ever.
            lost = spool.last_lsn - spool.stored_lsn
            self._dropped += lost
            logger.error(
                "backup stream %s: %d spooled items in %s cannot be read; skipped",
                self.target,
                lost,
                spool.path,
            )
            await spool.mark_stored(spool.last_lsn)
            self._lost_counted.pop(spool.instance_id, None)
            return
        skipped = self._newly_skipped(spool, chunk)
        if skipped:
            self._dropped += skipped
            logger.error(
                "backup stream %s: %d spooled record(s) in %s could not be read (damaged, or "
                "their segment deleted: see the log above) and are not in the stream",
                self.target,
                skipped,
                spool.path,
            )
        if not self._breaker.allow():
            self._retry_at = self._clock.monotonic() + max(self._breaker.reset_timeout, 0.001)
            return
        items: list[IngestItem] = []
        lsn_of: dict[int, int] = {}  # id(item) -> its record's LSN
        unreadable: list[int] = []  # LSNs found unreadable for the first time
        first_error: ValidationError | None = None
        for index, (lsn, payload) in enumerate(chunk.records, 1):
            try:
                item = decode_item(payload)
            except ValidationError as exc:
                if self._count_lost(spool, lsn, lsn):
                    unreadable.append(lsn)
                    first_error = first_error or exc
            else:
                items.append(item)
                lsn_of[id(item)] = lsn
            if index % _DECODE_SLICE == 0:
                await asyncio.sleep(0)  # decoding is CPU work: let the write path in between
        if unreadable:
            self._dropped += len(unreadable)
            logger.error(
                "backup stream %s: %d unreadable spool record(s) in %s skipped (LSN %s): %s",
                self.target,
                len(unreadable),
                spool.path,
                _lsn_ranges(unreadable),
                first_error,
            )

        def spool_id(content: list[IngestItem]) -> str:
            # The id names the LSN range of the message's own records. A message holds every
            # record of its kind in that range, so the id names its content: a chunk sent
            # again (a lost acknowledgement, a failure half-way) may hold more records or be
            # cut differently (the size estimate or limit changed), and with an id naming
            # the chunk and a part number JetStream would drop a message holding other
            # records as a duplicate, losing them.
            first, last = lsn_of[id(content[0])], lsn_of[id(content[-1])]
            return f"{spool.instance_id}:{self._session}:s{first}-{last}"

        try:
            await self._publish_items(items, origin=spool.instance_id, make_id=spool_id)
        except BackupStreamError as exc:
            self._on_failure(exc)
            return
        await spool.mark_stored(chunk.end_lsn)
        # A stored chunk is never read again.
        self._acked.clear()
        self._lost_counted.pop(spool.instance_id, None)
        self._on_success()
        if spool is not self._spool and spool.pending_records == 0:
            logger.info("backup stream: spool of %s fully published", spool.instance_id)
            self._spools.remove(spool)
            await spool.close()

    def _newly_skipped(self, spool: Journal, chunk: JournalBatch) -> int:
        """How many records of ``chunk``'s LSN range the spool skipped (damaged bytes, a
        segment file deleted), each counted once however often the chunk is read again."""
        previous = spool.stored_lsn
        if chunk.end_lsn - previous == len(chunk.records):
            return 0  # nothing skipped: the common case
        count = 0
        for lsn in [*(record[0] for record in chunk.records), chunk.end_lsn + 1]:
            if lsn > previous + 1:  # LSNs previous+1 .. lsn-1 were skipped
                count += self._count_lost(spool, previous + 1, lsn - 1)
            previous = lsn
        return count

    def _count_lost(self, spool: Journal, low: int, high: int) -> int:
        """Note LSNs ``low..high`` of ``spool`` as counted dropped; return how many were
        not yet. Ranges, not a high-water mark: a record returned by one read may be
        skipped by the next (its file deleted between two failed drains)."""
        return _add_range(self._lost_counted.setdefault(spool.instance_id, []), low, high)

    async def _finish_backlog(self) -> None:
        if self._to_spool or self._spooling:
            return
        self._backlog = False
        logger.info("backup stream %s: caught up; publishing directly again", self.target)

    def _on_failure(self, exc: BackupStreamError) -> None:
        self._failures += 1
        self._breaker.record_failure()
        where = "the spool" if self._spool is not None else "memory"
        if isinstance(exc, _Misconfigured):
            # Not an outage: the server answers and refuses, and will until an operator
            # changes its configuration. Retried all the same (nobody is told when that
            # happens), and said again at most once a minute meanwhile.
            self._last_error = f"configuration error: {exc}"
            self._log.error(
                ("misconfigured", self._recoveries, str(exc)),
                "backup stream %s: %s; this will not pass without a configuration change "
                "(batches go to %s; retrying)",
                self.target,
                exc,
                where,
            )
        else:
            self._last_error = str(exc)
            if not self._down:
                logger.warning(
                    "backup stream %s is down (%s); batches go to %s", self.target, exc, where
                )
        self._down = True
        wait = (
            self._breaker.reset_timeout
            if self._breaker.state is BreakerState.OPEN
            else self._retry_interval
        )
        self._retry_at = self._clock.monotonic() + wait

    def _on_success(self) -> None:
        self._breaker.record_success()
        if self._down:
            logger.info("backup stream %s answers again", self.target)
            self._recoveries += 1  # a configuration error coming back is logged at once
        self._down = False

    # ------------------------------------------------------------------ progress & stats

    def _idle(self) -> bool:
        return not self._outbox and self._inflight is None and not self._backlog

    def _notify_progress(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None and not progress.done():
            progress.set_result(None)

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            pump = self._pump_task
            if pump is None or pump.done():
                msg = f"{self!r}: the publishing task is not running"
                raise BackupStreamError(msg)
            if self._progress is None:
                self._progress = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._progress)

    def _state(self) -> StreamState:
        if self._life is _Life.NEW:
            return StreamState.NEW
        if self._life is _Life.CLOSED:
            return StreamState.CLOSED
        if self._life is _Life.CLOSING:
            return StreamState.CLOSING
        if self._down:
            return StreamState.DOWN
        return StreamState.CATCHING_UP if self._backlog else StreamState.UP

    def stats(self) -> BackupStreamStats:
        """Current counters (cheap; no I/O)."""
        now = self._clock.monotonic()
        spool_records = sum(s.pending_records for s in self._spools)
        spooling = self._spooling
        if spooling and self._spool is not None and self._spool.last_lsn != self._spooling_from:
            spooling = 0  # durable already (the journal counts them) but not yet noted
        pending = (
            self._outbox_items
            + (0 if self._inflight_spooled else self._inflight_items)
            + self._to_spool_items
            + spooling
            + spool_records
        )
        lag = 0.0
        if self._backlog:
            lag = now - self._backlog_since
        elif self._inflight is not None:
            lag = now - self._inflight[0].accepted_at
        elif self._outbox:
            lag = now - self._outbox[0].accepted_at
        return BackupStreamStats(
            backend=self.backend,
            target=self.target,
            state=self._state().value,
            breaker_state=self._breaker.state.value,
            accepted_batches=self._accepted_batches,
            accepted_items=self._accepted_items,
            published_messages=self._published_messages,
            published_items=self._published_items,
            duplicates=self._duplicates,
            failures=self._failures,
            spooled_items=self._spooled,
            spool_records=spool_records,
            spool_bytes=sum(s.size_bytes for s in self._spools),
            pending_items=pending,
            lag_seconds=max(0.0, lag) if pending else 0.0,
            dropped_items=self._dropped,
            last_error=self._last_error,
            adopted_spools=self._adopted,
        )


# --------------------------------------------------------------------------- NATS


def _captures(pattern: str, subject: str) -> bool:
    """Whether the NATS subject filter ``pattern`` (wildcards ``*``, ``>``) matches ``subject``."""
    tokens = subject.split(".")
    parts = pattern.split(".")
    for index, part in enumerate(parts):
        if part == ">":
            return len(tokens) > index
        if index >= len(tokens) or part not in ("*", tokens[index]):
            return False
    return len(parts) == len(tokens)


def _api_error(exc: APIError) -> str:
    """A JetStream API error as the server put it (its repr shows neither code nor text)."""
    what = exc.description or type(exc).__name__
    return f"{what} (JetStream error {exc.err_code}, status {exc.code})"


def _nats_missing() -> ConfigurationError:
    return ConfigurationError(
        "the NATS backup stream needs the nats-py package: pip install 'data_manager[nats]'"
    )


class NatsBackupStream(_BackupStreamBase):
    """Backup stream on NATS JetStream.

    The stream is created when missing (``create_stream=True``): file storage, limits
    retention (``max_age``, ``max_bytes``; oldest messages discarded first), subjects
    ``<subject_prefix>.>``. An existing stream is used as it is (its limits are the
    operator's): its ``max_msg_size`` caps the messages, read again on every connection
    and whenever the server refuses a message for its size. The client reconnects by
    itself; publishing waits at most ``publish_timeout`` per message.

    Args:
        url: ``nats://host:4222`` (``tls://`` for TLS; credentials in the URL are never
            logged).
        stream: JetStream stream name.
        subject_prefix: Messages go to ``<subject_prefix>.<kind>``.
        create_stream: Create the stream when it does not exist.
        max_age: Seconds a message is kept (created streams only); ``None``: no limit.
        max_bytes: Size limit of the stream (created streams only); ``None``: no limit.
        duplicate_window: Seconds JetStream remembers ``Nats-Msg-Id`` values.
        replicas: Stream replicas (1 on a single server).
        connect_timeout: Seconds allowed to connect.
        publish_timeout: Seconds allowed for each publish acknowledgement.
        reconnect_wait: Seconds between the client's reconnection attempts.
        spool_dir: Spool root (``<journal_dir>/stream-spool``); ``None``: no spool.
        instance_id: This router's instance id (the spool folder, the ``origin`` of
            messages); default a fresh one.
        max_pending_items: Outbox bound in items.
        coalesce_items: Most items published together when batches queue up.
        max_message_bytes: Message size limit, headers included (further capped by the
            server's ``max_payload`` and the stream's ``max_msg_size``).
        drain_records: Spool records read per drain step.
        retry_interval: Seconds before the next attempt after a failure, until the breaker
            opens.
        breaker: Circuit breaker (default: opens after 3 failures, probes after 1 s).
        clock: Time source for the breaker, retries and lag.
    """

    backend = "nats"

    def __init__(
        self,
        url: str,
        *,
        stream: str = DEFAULT_NATS_STREAM,
        subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
        create_stream: bool = True,
        max_age: float | None = 7 * 86_400.0,
        max_bytes: int | None = None,
        duplicate_window: float = 120.0,
        replicas: int = 1,
        connect_timeout: float = 2.0,
        publish_timeout: float = 2.0,
        reconnect_wait: float = 0.5,
        spool_dir: Path | str | None = None,
        instance_id: str | None = None,
        max_pending_items: int = 100_000,
        coalesce_items: int = 10_000,
        max_message_bytes: int = DEFAULT_MESSAGE_BYTES,
        drain_records: int = 5_000,
        retry_interval: float = 0.05,
        breaker: CircuitBreaker | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not stream or any(c in stream for c in " .*>\t\r\n"):
            msg = f"invalid JetStream stream name {stream!r}"
            raise ConfigurationError(msg)
        if not subject_prefix or any(c in subject_prefix for c in " *>\t\r\n"):
            msg = f"invalid subject prefix {subject_prefix!r}"
            raise ConfigurationError(msg)
        if connect_timeout <= 0 or publish_timeout <= 0 or reconnect_wait < 0:
            msg = "connect_timeout and publish_timeout must be > 0, reconnect_wait >= 0"
            raise ConfigurationError(msg)
        super().__init__(
            _redact(url),
            spool_dir=spool_dir,
            instance_id=instance_id,
            max_pending_items=max_pending_items,
            coalesce_items=coalesce_items,
            max_message_bytes=max_message_bytes,
            drain_records=drain_records,
            retry_interval=retry_interval,
            breaker=breaker,
            clock=clock,
        )
        self._url = url
        self.stream = stream
        self.subject_prefix = subject_prefix
        self._create = create_stream
        self._max_age = max_age
        self._max_bytes = max_bytes
        self._duplicate_window = duplicate_window
        self._replicas = replicas
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._reconnect_wait = reconnect_wait
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        self._stream_limit = 0  # the stream's max_msg_size (0: none)

    def _check_client(self) -> None:
        try:
            import nats  # noqa: F401
        except ImportError as exc:
            raise _nats_missing() from exc

    def _message_limit(self) -> int:
        """The smallest of our own limit, the server's max_payload (it may change on a
        reconnect) and the stream's max_msg_size (the operator's)."""
        limit = super()._message_limit()
        nc = self._nc
        if nc is not None and nc.max_payload > 0:
            limit = min(limit, nc.max_payload)
        if self._stream_limit:
            limit = min(limit, self._stream_limit)
        return limit

    def _message_overhead(self, batch_id: str) -> int:
        return _NATS_HEADER_BYTES + len(batch_id.encode()) + len(self.stream.encode())

    async def _message_refused(self, size: int, exc: _TooLarge) -> None:
        # The stream's max_msg_size may have been lowered since it was read: read it again
        # (an error here is an outage like any other; the unit is sent again later).
        import nats.errors

        js = self._js
        assert js is not None
        try:
            self._note_stream_limit(await js.stream_info(self.stream))
        except (nats.errors.Error, OSError) as lookup:
            msg = f"cannot look up the stream {self.stream!r} on {self.target}: {lookup!r}"
            raise BackupStreamError(msg) from lookup
        await super()._message_refused(size, exc)

    def _subjects(self) -> list[str]:
        return [f"{self.subject_prefix}.{kind}" for kind in _CLASS_OF]

    def _use_stream(self, info: StreamInfo) -> None:
        """Check that the stream stores our subjects, and note its message size limit.

        Raises:
            _Misconfigured: Some subject is not among the stream's (every publish to it
                would be refused, or go to no stream at all).
        """
        patterns = info.config.subjects or []
        missing = [s for s in self._subjects() if not any(_captures(p, s) for p in patterns)]
        if missing:
            msg = (
                f"JetStream stream {self.stream!r} on {self.target} does not store the "
                f"subjects {', '.join(missing)} (its subjects: {patterns})"
            )
            raise _Misconfigured(msg)
        self._note_stream_limit(info)

    def _note_stream_limit(self, info: StreamInfo) -> None:
        """Cap messages at the stream's own ``max_msg_size`` (-1 or 0: no limit)."""
        configured = info.config.max_msg_size or 0
        limit = configured if configured > 0 else 0
        if limit != self._stream_limit and limit and limit < self._limit:
            logger.info(
                "backup stream %s: stream %s takes messages of at most %d bytes; messages "
                "are cut to fit",
                self.target,
                self.stream,
                limit,
            )
        self._stream_limit = limit

    async def _connect(self) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            self._nc = self._js = None
            self._stream_ready = False
            nc = await _nats_connect(
                self._url,
                connect_timeout=self._connect_timeout,
                reconnect_wait=self._reconnect_wait,
                name=f"data_manager-backup-{self.instance_id}",
                on_error=self._client_error,
                on_reconnect=self._client_reconnected,
            )
            self._nc = nc
            self._js = nc.jetstream(timeout=self._publish_timeout)
        if not self._stream_ready:
            assert self._js is not None
            await self._ensure_stream(self._js)
            # Read afresh with the stream: what a refusal taught holds until then.
            self._refused_limit = 0
            self._stream_ready = True

    async def _check(self) -> None:
        """Connect if needed and look the stream up again (created again if it was deleted
        and ``create_stream`` allows it). A message size limit learned from a refusal holds."""
        learned = self._refused_limit
        self._stream_ready = False
        await self._connect()
        self._refused_limit = learned

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        import nats.errors
        import nats.js.errors
        from nats.js import api

        try:
            self._use_stream(await js.stream_info(self.stream))
            return
        except nats.js.errors.NotFoundError:
            if not self._create:
                msg = (
                    f"JetStream stream {self.stream!r} does not exist on {self.target} "
                    "(and creating it is turned off)"
                )
                raise _Misconfigured(msg) from None
        except (nats.errors.Error, OSError) as exc:
            msg = f"cannot look up the stream {self.stream!r} on {self.target}: {_err(exc)}"
            raise BackupStreamError(msg) from exc
        config = api.StreamConfig(
            name=self.stream,
            description="data_manager backup stream (one message per accepted batch)",
            subjects=[f"{self.subject_prefix}.>"],
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            storage=api.StorageType.FILE,
            max_age=self._max_age,
            max_bytes=self._max_bytes,
            duplicate_window=self._duplicate_window,
            num_replicas=self._replicas,
        )
        try:
            self._use_stream(await js.add_stream(config))
        except nats.js.errors.BadRequestError as exc:
            # Created meanwhile by another router is fine; anything else (subjects another
            # stream captures, replicas the server cannot have...) is the operator's to fix.
            try:
                info = await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                msg = (
                    f"cannot create the stream {self.stream!r} on {self.target}: {_api_error(exc)}"
                )
                raise _Misconfigured(msg) from exc
            except (nats.errors.Error, OSError) as lookup:
                msg = f"cannot look up the stream {self.stream!r} on {self.target}: {lookup!r}"
                raise BackupStreamError(msg) from lookup
            self._use_stream(info)
            return
        except (nats.errors.Error, OSError) as exc:
            msg = f"cannot create the stream {self.stream!r} on {self.target}: {_err(exc)}"
            raise BackupStreamError(msg) from exc
        logger.info(
            "backup stream: created JetStream stream %s on %s (file storage, max_age=%ss)",
            self.stream,
            self.target,
            self._max_age,
        )

    async def _send(self, message: _Message) -> bool:
        import nats.errors
        import nats.js.errors

        js = self._js
        assert js is not None
        try:
            ack = await js.publish(
                f"{self.subject_prefix}.{message.kind}",
                message.payload,
                timeout=self._publish_timeout,
                stream=self.stream,
                headers={"Nats-Msg-Id": message.batch_id},
            )
        except nats.js.errors.NoStreamResponseError as exc:
            # Nobody stores this subject: the server lost the stream (a new, empty server
            # behind the same address). Look it up (and create it) before the next try.
            self._stream_ready = False
            msg = f"no JetStream stream answers on {self.target}"
            raise BackupStreamError(msg) from exc
        except nats.errors.MaxPayloadError as exc:
            msg = "over the server's max_payload"
            raise _TooLarge(msg) from exc
        except nats.js.errors.APIError as exc:
            if exc.err_code == _JS_MESSAGE_TOO_LARGE:
                msg = f"stream {self.stream!r}: {exc.description or 'message too large'}"
                raise _TooLarge(msg) from exc
            if (
                isinstance(exc, nats.js.errors.BadRequestError)
                and exc.err_code != _JS_ACCOUNT_LIMITS
            ):
                # The server refuses this publish as such (another stream stores the
                # subject, the stream is sealed...): the same publish is refused until the
                # configuration changes. Look the stream up again before the next try.
                self._stream_ready = False
                subject = f"{self.subject_prefix}.{message.kind}"
                why = (
                    f"the subject {subject} is stored by another stream"
                    if exc.err_code == _JS_STREAM_MISMATCH
                    else f"a publish to {subject} is refused"
                )
                msg = f"JetStream stream {self.stream!r} on {self.target}: {why}: {_api_error(exc)}"
                raise _Misconfigured(msg) from exc
            msg = f"publish to {self.target} failed: {_api_error(exc)}"
            raise BackupStreamError(msg) from exc
        except (nats.errors.Error, OSError) as exc:
            msg = f"publish to {self.target} failed: {_err(exc)}"
            raise BackupStreamError(msg) from exc
        if ack.duplicate:
            self._duplicates += 1
            return False
        return True

    async def _disconnect(self) -> None:
        import nats.errors

        nc, self._nc, self._js = self._nc, None, None
        if nc is None or nc.is_closed:
            return
        try:
            async with asyncio.timeout(self._connect_timeout):
                await nc.close()
        except (nats.errors.Error, OSError) as exc:
            msg = f"closing the connection to {self.target} failed: {_err(exc)}"
            raise BackupStreamError(msg) from exc

    async def _client_error(self, exc: Exception) -> None:
        # The client reports every failed reconnection attempt here; the pump reports the
        # outage once (at WARNING) when a publish fails.
        self._last_error = f"{type(exc).__name__}: {exc}"
        logger.debug("backup stream %s: client error: %r", self.target, exc)

    async def _client_reconnected(self) -> None:
        logger.info("backup stream %s: reconnected", self.target)
        self._wake.set()


async def _nats_connect(
    url: str,
    *,
    connect_timeout: float,
    reconnect_wait: float,
    name: str,
    on_error: Callable[[Exception], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> NatsClient:
    """Connect to NATS, reconnecting for ever afterwards; fail within ``connect_timeout``.

    Raises:
        ConfigurationError: nats-py is not installed.
        BackupStreamError: The server did not answer in time.
    """
    try:
        import nats.errors
        from nats.aio.client import Client
    except ImportError as exc:
        raise _nats_missing() from exc

    async def quiet_error(exc: Exception) -> None:
        logger.debug("nats client error: %r", exc)

    nc = Client()
    try:
        # With unlimited reconnects the client retries the first connection for ever too,
        # hence the outer deadline.
        async with asyncio.timeout(connect_timeout * 2):
            await nc.connect(
                servers=[url],
                name=name,
                connect_timeout=connect_timeout,  # type: ignore[arg-type]
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=reconnect_wait,  # type: ignore[arg-type]
                error_cb=on_error or quiet_error,
                reconnected_cb=on_reconnect,
            )
    except (nats.errors.Error, OSError) as exc:  # TimeoutError is an OSError
        await _close_client(nc, within=connect_timeout)
        msg = f"cannot connect to {_redact(url)}: {_err(exc)}"
        raise BackupStreamError(msg) from exc
    except BaseException:
        # Cancelled part-way (a closing stream stops its pump, a replay is abandoned): the
        # client may already hold an open socket and tasks of its own, and nobody else has
        # a reference to close it.
        await finish_despite_cancel(_close_client(nc, within=connect_timeout))
        raise
    return nc


async def _close_client(nc: NatsClient, *, within: float) -> None:
    """Close a client that may be half-connected; errors are of no interest any more."""
    import nats.errors

    with contextlib.suppress(nats.errors.Error, OSError):
        async with asyncio.timeout(within):
            await nc.close()


# --------------------------------------------------------------------------- Redis


def _redis_client(url: str, *, socket_timeout: float, connect_timeout: float) -> Redis:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    try:
        client: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            # The breaker decides when to try again, not a retry loop inside a publish.
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )
    except ValueError as exc:
        msg = f"invalid Redis URL {_redact(url)!r}: {exc}"
        raise ConfigurationError(msg) from None
    return client


class RedisBackupStream(_BackupStreamBase):
    """Backup stream on a Redis stream (``XADD key MAXLEN ~ maxlen * kind ... payload ...``).

    Limits, plainly: the entries are in the server's memory (about ``maxlen`` × message
    size; a 1000-tick message is about 330 KB), survive a restart only as far as the
    server persists its data, and the oldest are trimmed once there are more than about
    ``maxlen`` (with ``approximate=True`` Redis trims whole nodes, so somewhat more are
    kept). There is no de-duplication: re-sent batches are removed by the database.

    Args:
        url: ``redis://[:password@]host:6379/0`` (``rediss://`` for TLS).
        key: The Redis stream key.
        maxlen: Entries (messages, not items) kept; ``None``: never trimmed (memory grows
            without bound).
        approximate: ``MAXLEN ~`` (cheap) instead of an exact trim.
        socket_timeout: Seconds allowed for each command.
        connect_timeout: Seconds allowed to connect.
        spool_dir, instance_id, max_pending_items, coalesce_items, max_message_bytes,
        drain_records, retry_interval, breaker, clock: As for :class:`NatsBackupStream`.
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        key: str = DEFAULT_REDIS_KEY,
        maxlen: int | None = 10_000,
        approximate: bool = True,
        socket_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        spool_dir: Path | str | None = None,
        instance_id: str | None = None,
        max_pending_items: int = 100_000,
        coalesce_items: int = 10_000,
        max_message_bytes: int = DEFAULT_MESSAGE_BYTES,
        drain_records: int = 5_000,
        retry_interval: float = 0.05,
        breaker: CircuitBreaker | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not key:
            msg = "the Redis stream key must not be empty"
            raise ConfigurationError(msg)
        if maxlen is not None and maxlen < 1:
            msg = f"maxlen must be >= 1 or None, got {maxlen}"
            raise ConfigurationError(msg)
        if socket_timeout <= 0 or connect_timeout <= 0:
            msg = "socket_timeout and connect_timeout must be > 0"
            raise ConfigurationError(msg)
        super().__init__(
            f"{_redact(url)} key {key}",
            spool_dir=spool_dir,
            instance_id=instance_id,
            max_pending_items=max_pending_items,
            coalesce_items=coalesce_items,
            max_message_bytes=max_message_bytes,
            drain_records=drain_records,
            retry_interval=retry_interval,
            breaker=breaker,
            clock=clock,
        )
        self.key = key
        self.maxlen = maxlen
        self._approximate = approximate
        self._socket_timeout = socket_timeout
        self._client = _redis_client(
            url, socket_timeout=socket_timeout, connect_timeout=connect_timeout
        )

    async def _connect(self) -> None:
        """Nothing to do: the client connects on first use and after a failure."""

    async def _check(self) -> None:
        """Ask for the key's type (one round trip; the client connects on use): a stream,
        or none yet."""
        from redis.exceptions import RedisError

        try:
            async with asyncio.timeout(self._socket_timeout * 2):
                kind = await self._client.type(self.key)
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            msg = f"cannot reach {self.target}: {_err(exc)}"
            raise BackupStreamError(msg) from exc
        if isinstance(kind, bytes):
            kind = kind.decode()
        if kind not in ("stream", "none"):
            msg = f"the key of {self.target} holds something other than a stream: a {kind}"
            raise _Misconfigured(msg)

    async def _send(self, message: _Message) -> bool:
        from redis.exceptions import NoPermissionError, RedisError, ResponseError

        try:
            async with asyncio.timeout(self._socket_timeout * 2):
                await self._client.xadd(
                    self.key,
                    {"kind": message.kind, "payload": message.payload},
                    maxlen=self.maxlen,
                    approximate=self._approximate,
                )
        except NoPermissionError as exc:
            msg = f"XADD to {self.target} is not allowed to this user: {exc}"
            raise _Misconfigured(msg) from exc
        except ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                msg = f"the key of {self.target} holds something other than a stream: {exc}"
                raise _Misconfigured(msg) from exc
            msg = f"XADD to {self.target} failed: {_err(exc)}"
            raise BackupStreamError(msg) from exc
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            msg = f"XADD to {self.target} failed: {_err(exc)}"
            raise BackupStreamError(msg) from exc
        return True  # a Redis stream has no de-duplication

    async def _disconnect(self) -> None:
        from redis.exceptions import RedisError

        try:
            await self._client.aclose()
        except (RedisError, OSError) as exc:
            msg = f"closing the connection to {self.target} failed: {_err(exc)}"
            raise BackupStreamError(msg) from exc


def backup_stream_from_url(
    url: str,
    *,
    spool_dir: Path | str | None = None,
    instance_id: str | None = None,
    stream: str = DEFAULT_NATS_STREAM,
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
    key: str = DEFAULT_REDIS_KEY,
    maxlen: int | None = 10_000,
) -> NatsBackupStream | RedisBackupStream:
    """A backup stream for ``url``: NATS for ``nats://``/``tls://``, Redis for
    ``redis://``/``rediss://``/``unix://``, with default limits otherwise.

    Raises:
        ConfigurationError: Unknown scheme.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in _NATS_SCHEMES:
        return NatsBackupStream(
            url,
            stream=stream,
            subject_prefix=subject_prefix,
            spool_dir=spool_dir,
            instance_id=instance_id,
        )
    if scheme in _REDIS_SCHEMES:
        return RedisBackupStream(
            url, key=key, maxlen=maxlen, spool_dir=spool_dir, instance_id=instance_id
        )
    msg = f"unknown backup stream URL scheme {scheme!r}; expected nats://, tls:// or redis://"
    raise ConfigurationError(msg)


# --------------------------------------------------------------------------- replay


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What :func:`replay_from_stream` did.

    Attributes:
        source: Where it read (no credentials).
        messages: Messages read and decoded.
        items, ticks, candles, order_flow: Items written (all kinds, then per kind).
        rows_written: What the storage reported as new or changed rows; lower than
            ``items`` when rows were there already (a second replay reports 0 new ticks).
        invalid_messages: Messages that could not be decoded (logged, skipped).
        first_ms, last_ms: Stream time of the first and last message read.
        seconds: Wall time of the replay.
    """

    source: str
    messages: int
    items: int
    ticks: int
    candles: int
    order_flow: int
    rows_written: int
    invalid_messages: int
    first_ms: int | None
    last_ms: int | None
    seconds: float


@dataclass(slots=True)
class _ReplayCounters:
    messages: int = 0
    items: int = 0
    ticks: int = 0
    candles: int = 0
    order_flow: int = 0
    rows: int = 0
    invalid: int = 0
    first_ms: int | None = None
    last_ms: int | None = None

    def report(self, source: str, started: float) -> ReplayReport:
        return ReplayReport(
            source=source,
            messages=self.messages,
            items=self.items,
            ticks=self.ticks,
            candles=self.candles,
            order_flow=self.order_flow,
            rows_written=self.rows,
            invalid_messages=self.invalid,
            first_ms=self.first_ms,
            last_ms=self.last_ms,
            seconds=time.perf_counter() - started,
        )


#: One message read from a stream: (stream time in ms, message id, payload).
_Read: TypeAlias = tuple[int, str, bytes]
#: One Redis stream entry as redis-py returns it: (id, fields).
_Entry: TypeAlias = tuple[bytes, dict[bytes, bytes]]


def parse_since(text: str) -> int:
    """Parse ``--since``: Unix milliseconds, or an ISO 8601 time (UTC when no offset).

    Raises:
        ValidationError: Neither, or a value that is clearly seconds or nanoseconds.
    """
    value = text.strip()
    if value.isdigit():
        return to_epoch_ms(int(value), field="since")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        msg = f"--since {text!r} is neither Unix milliseconds nor an ISO 8601 time"
        raise ValidationError(msg) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return to_epoch_ms(moment, field="since")


async def replay_from_stream(
    storage: Storage,
    source_url: str,
    *,
    since_ms: int | None = None,
    kind: StreamKind | None = None,
    batch_size: int = 10_000,
    stream: str = DEFAULT_NATS_STREAM,
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
    key: str = DEFAULT_REDIS_KEY,
    connect_timeout: float = 5.0,
    read_timeout: float = 10.0,
    on_progress: Callable[[ReplayReport], None] | None = None,
) -> ReplayReport:
    """Write what the backup stream holds into ``storage``, without duplicates.

    Reads from ``since_ms`` (stream time: when the stream stored the message) to the end
    of the stream as it was when the replay started, in stream order, and writes through
    the storage's idempotent bulk writes: replaying the same stretch twice leaves the same
    rows. Within one write, only the last version of a candle or order-flow row is kept
    (as the write path does; a forming candle never replaces a closed one).

    Args:
        storage: A connected storage whose schema exists.
        source_url: ``nats://...`` (JetStream) or ``redis://...`` (Redis stream).
        since_ms: Start (Unix ms, stream time); ``None``: everything retained.
        kind: Only this kind (``"tick"``, ``"candle"``, ``"order_flow"``).
        batch_size: Items per storage write.
        stream, subject_prefix: The JetStream stream and subject prefix (NATS).
        key: The stream key (Redis).
        connect_timeout: Seconds allowed to connect.
        read_timeout: Seconds allowed for each read from the stream.
        on_progress: Called with the running totals after each storage write.

    Raises:
        BackupStreamError: The stream cannot be reached or read (what was written so far
            stays; running the replay again is safe).
        ConfigurationError: Unknown URL scheme or a missing client library.
        ValidationError: ``kind`` or ``batch_size`` is invalid.
        DataManagerError: A storage error, as the storage raised it.
    """
    if kind is not None and kind not in _CLASS_OF:
        msg = f"unknown kind {kind!r}; expected tick, candle or order_flow"
        raise ValidationError(msg)
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}"
        raise ValidationError(msg)
    scheme = urlsplit(source_url).scheme.lower()
    source = _redact(source_url)
    reader: AsyncGenerator[list[_Read], None]
    if scheme in _NATS_SCHEMES:
        reader = _read_nats(
            source_url,
            stream=stream,
            subject_prefix=subject_prefix,
            kind=kind,
            since_ms=since_ms,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        source = f"{source} stream {stream}"
    elif scheme in _REDIS_SCHEMES:
        reader = _read_redis(
            source_url,
            key=key,
            kind=kind,
            since_ms=since_ms,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        source = f"{source} key {key}"
    else:
        msg = f"unknown stream URL scheme {scheme!r}; expected nats://, tls:// or redis://"
        raise ConfigurationError(msg)
    started = time.perf_counter()
    counters = _ReplayCounters()
    pending: list[IngestItem] = []
    # One write in flight while the next batch is read and decoded: decoding is CPU work
    # here, the write mostly waits on the database, so the two overlap.
    writing: asyncio.Task[None] | None = None

    async def write(items: list[IngestItem]) -> None:
        await _replay_write(storage, items, counters)
        if on_progress is not None:
            on_progress(counters.report(source, started))

    try:
        async with contextlib.aclosing(reader):
            async for chunk in reader:
                for stream_ms, message_id, payload in chunk:
                    if counters.first_ms is None:
                        counters.first_ms = stream_ms
                    counters.last_ms = stream_ms
                    try:
                        message = decode_batch_message(payload)
                    except ValidationError as exc:
                        counters.invalid += 1
                        logger.error("replay: message %s skipped: %s", message_id, exc)
                        continue
                    await asyncio.sleep(0)  # let the write in flight (and others) run
                    if kind is not None and message.kind != kind:
                        continue
                    counters.messages += 1
                    pending.extend(message.items)
                if len(pending) >= batch_size:
                    if writing is not None:
                        await writing
                    writing = asyncio.create_task(write(pending))
                    pending = []
        if writing is not None:
            await writing
            writing = None
        if pending:
            await write(pending)
    finally:
        if writing is not None and not writing.done():
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError, DataManagerError):
                await writing
    report = counters.report(source, started)
    logger.info(
        "replay from %s: %d messages, %d items, %d rows written, %d invalid in %.1fs",
        source,
        report.messages,
        report.items,
        report.rows_written,
        report.invalid_messages,
        report.seconds,
    )
    return report


async def _replay_write(
    storage: Storage, items: list[IngestItem], counters: _ReplayCounters
) -> None:
    """Write a mixed list in as few calls as possible (one per kind)."""
    ticks: list[TickData] = []
    candles: dict[tuple[str, str, str, int], CandleData] = {}
    flows: dict[tuple[str, str, int, int], OrderFlowMetrics] = {}
    for item in items:
        cls = type(item)
        if cls is TickData:
            ticks.append(item)  # type: ignore[arg-type]
        elif cls is CandleData:
            candle: CandleData = item  # type: ignore[assignment]
            ckey = (candle.symbol, candle.timeframe, candle.source, candle.timestamp)
            seen = candles.get(ckey)
            if seen is None or candle.is_closed or not seen.is_closed:
                candles[ckey] = candle
        else:
            flow: OrderFlowMetrics = item  # type: ignore[assignment]
            flows[(flow.symbol, flow.source, flow.timestamp, flow.window_ms)] = flow
    if ticks:
        counters.rows += await storage.write_ticks(ticks)
        counters.ticks += len(ticks)
    if candles:
        counters.rows += await storage.write_candles(list(candles.values()))
        counters.candles += len(candles)
    if flows:
        counters.rows += await storage.write_order_flow(list(flows.values()))
        counters.order_flow += len(flows)
    counters.items += len(ticks) + len(candles) + len(flows)


async def _read_nats(
    url: str,
    *,
    stream: str,
    subject_prefix: str,
    kind: StreamKind | None,
    since_ms: int | None,
    connect_timeout: float,
    read_timeout: float,
    fetch_batch: int = 16,
) -> AsyncGenerator[list[_Read], None]:
    """Read a JetStream stream with an ephemeral pull consumer (no acks), in order."""
    try:
        import nats.errors
        import nats.js.errors
        from nats.js import api
    except ImportError as exc:
        raise _nats_missing() from exc
    target = _redact(url)
    nc = await _nats_connect(
        url, connect_timeout=connect_timeout, reconnect_wait=0.5, name="data_manager-replay"
    )
    js = nc.jetstream(timeout=read_timeout)
    sub: JetStreamContext.PullSubscription | None = None
    try:
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            msg = f"JetStream stream {stream!r} does not exist on {target}"
            raise BackupStreamError(msg) from None
        last_seq = info.state.last_seq
        if not info.state.messages:
            return
        subject = f"{subject_prefix}.{kind}" if kind else f"{subject_prefix}.>"
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            # Removed by the server if this process dies half-way.
            inactive_threshold=max(60.0, read_timeout * 3),
            filter_subject=subject,
            mem_storage=True,
        )
        if since_ms is None:
            config.deliver_policy = api.DeliverPolicy.ALL
        else:
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = datetime.fromtimestamp(since_ms / 1000, tz=UTC)
        sub = await js.pull_subscribe(subject, stream=stream, config=config)
        pending = (await sub.consumer_info()).num_pending
        stalls = 0
        while pending:
            try:
                messages = await sub.fetch(fetch_batch, timeout=read_timeout)
            except nats.errors.TimeoutError:
                # Nothing within read_timeout: finished, or the server is slow.
                pending = (await sub.consumer_info()).num_pending
                stalls += 1
                if pending and stalls > 3:
                    msg = f"reading {stream!r} on {target} stalled with {pending} messages left"
                    raise BackupStreamError(msg) from None
                continue
            stalls = 0
            out: list[_Read] = []
            for message in messages:
                meta = message.metadata
                seq = meta.sequence.stream
                if seq > last_seq:
                    pending = 0
                    break
                stamp = meta.timestamp
                stream_ms = int(stamp.timestamp() * 1000) if stamp is not None else 0
                message_id = (message.headers or {}).get("Nats-Msg-Id", f"{stream}#{seq}")
                out.append((stream_ms, message_id, message.data))
                pending = meta.num_pending
                if seq >= last_seq:
                    pending = 0
                    break
            yield out
    except (nats.errors.Error, OSError) as exc:
        msg = f"reading the stream {stream!r} on {target} failed: {_err(exc)}"
        raise BackupStreamError(msg) from exc
    finally:
        if sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()
        with contextlib.suppress(nats.errors.Error, OSError):
            async with asyncio.timeout(connect_timeout):
                await nc.close()


async def _read_redis(
    url: str,
    *,
    key: str,
    kind: StreamKind | None,
    since_ms: int | None,
    connect_timeout: float,
    read_timeout: float,
    count: int = 16,
) -> AsyncGenerator[list[_Read], None]:
    """Read a Redis stream with XRANGE, in order, up to its last entry at the start."""
    from redis.exceptions import RedisError

    client = _redis_client(url, socket_timeout=read_timeout, connect_timeout=connect_timeout)
    target = f"{_redact(url)} key {key}"
    try:
        # protocol 2, no decode_responses: ids and fields come back as bytes.
        last = cast("list[_Entry]", await client.xrevrange(key, count=1))
        if not last:
            return
        end_id = last[0][0]
        start: bytes | str = f"{since_ms}-0" if since_ms is not None else "-"
        while True:
            entries = cast(
                "list[_Entry]", await client.xrange(key, min=start, max=end_id, count=count)
            )
            if not entries:
                return
            out: list[_Read] = []
            for entry_id, fields in entries:
                entry_kind = fields.get(b"kind")
                if kind is not None and entry_kind is not None and entry_kind.decode() != kind:
                    continue  # skipped without parsing the payload
                stream_ms = int(entry_id.split(b"-", 1)[0])
                out.append((stream_ms, entry_id.decode(), fields.get(b"payload", b"")))
            yield out
            last_id = entries[-1][0]
            if last_id == end_id:
                return
            start = b"(" + last_id
    except (RedisError, OSError) as exc:
        msg = f"reading {target} failed: {_err(exc)}"
        raise BackupStreamError(msg) from exc
    finally:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()
