"""A local, append-only journal: the write path's durable backup.

One :class:`Journal` belongs to one router instance and lives in ``<root>/<instance_id>/``,
locked with ``flock`` for as long as the instance runs. It holds what the database has not
stored yet: items submitted in ``journal`` mode (acknowledged only once they are fsync'd here)
and batches set aside while the database is down. When an instance dies, its lock is released
by the kernel; the next router to start (or a running one that scans) finds the folder with
:func:`find_orphans`, opens it (taking the lock) and replays it.

On disk::

    <root>/<instance_id>/lock                  flock'd by the owner; holds "pid host"
    <root>/<instance_id>/checkpoint            last stored LSN (losing it replays more: ticks
                                               are idempotent; the pipeline writes it at once
                                               after replaying an upsert, see mark_stored)
    <root>/<instance_id>/<first LSN>.seg       segments: 8-byte magic, then records
    <root>/<instance_id>/<seg>.corrupt-<off>   a damaged tail, moved aside (never deleted)
    <root>/dead-letter/<instance_id>.jsonl     items the database refused (kept for people)

A record is ``<u32 length><u32 crc32(length bytes + payload)><payload>``; the payload is one
kind byte (``t`` tick, ``c`` candle, ``o`` order flow) followed by the model's JSON (derived
fields and ``None`` values left out), so another language can read it. Records are numbered by
a log sequence number (LSN), consecutive within a segment; a segment's file name is its first
LSN. Decoding re-validates the model: what comes back from disk is untrusted input.

Durability: :meth:`Journal.append` returns after the bytes are written and ``fdatasync``'d
(plus an ``fsync`` of the folder when a segment file is created). The active segment is
extended with zeros :data:`PREALLOCATE_BYTES` at a time, ahead of the records, so a group
overwrites blocks the file already has: its ``fdatasync`` then flushes data only, with no
file size to commit through the file system's own journal (an append's ``fdatasync`` must
commit the new size too, and waits behind every other process's metadata on that file
system, e.g. a database's WAL). Only the group that extends the file pays for that. Zeros
after the last record are the unused part of that allowance, not damage; closing the
journal trims them.

With ``sync="thread"``, each open journal has one committer thread that writes and syncs
continuously: the event loop hands it the encoded records (waking it only when it is idle)
and goes on; the thread takes everything handed over since its last sync, writes it as one
group, syncs once, and hands the whole group back to the event loop in one callback, which
acknowledges its appenders in LSN order. Concurrent appenders thus share one sync: whoever
arrives while a sync runs joins the next one (group commit), the event loop never blocks on
the disk, and it keeps encoding the next group while the disk syncs the current one.

With ``sync="aio"`` (the default ``"auto"`` picks it wherever Linux AIO works, else the
thread) there is no thread: the event loop writes each group to the page cache and
submits its ``fdatasync`` to the kernel with ``io_submit``; the completion signals an
``eventfd`` the loop watches, and the loop then acknowledges the group and writes the next
one, gathered meanwhile. The loop never waits for the disk and no thread is woken or holds
the GIL.

With ``sync="loop"`` there is no thread: the appends of one event-loop iteration are written
and synced as one group by a callback at the start of the next iteration, which blocks the
loop for the write and the sync. That saves the two thread wake-ups per group (costly on
virtual machines) at the price of stalling everything else on the loop for as long as the
disk takes to sync; it suits a process that mostly ingests.

A crash mid-write leaves a torn tail; opening the journal detects it (length or CRC check),
moves the damaged bytes to a ``.corrupt-<offset>`` file beside the segment, logs it and
carries on after the last good record. A torn record was never acknowledged, because
acknowledgement waits for the sync.

A segment file deleted while the journal is open (by a person or a cleanup script) takes
its records with it. Reading finds it gone, reports it in :attr:`Journal.problems` and
skips its LSNs, so the records after it are still replayed. If it was the segment being
written, appends would go on into the deleted file until it is closed: that is checked
where the journal does I/O anyway (a read, a checkpoint, a segment change, the close), and
once seen, the next group starts a new segment.

The journal must sit on a local file system: ``flock`` over NFS is not dependable.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import itertools
import json
import logging
import os
import re
import secrets
import socket
import struct
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import orjson

from data_manager._tasks import finish_despite_cancel
from data_manager.errors import (
    JournalError,
    JournalLockedError,
    ValidationError,
)
from data_manager.models import CandleData, OrderFlowMetrics, TickData
from data_manager.settings import JournalSync

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator, Sequence

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows uses the filelock package instead
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "DeadLetterFile",
    "IngestItem",
    "Journal",
    "JournalBatch",
    "JournalError",
    "JournalLockedError",
    "JournalStats",
    "JournalSync",
    "decode_item",
    "encode_item",
    "find_orphans",
    "new_instance_id",
]

logger = logging.getLogger(__name__)

IngestItem: TypeAlias = TickData | CandleData | OrderFlowMetrics

#: Segment size after which appends go to a new file.
DEFAULT_SEGMENT_BYTES: Final = 64 * 1024 * 1024
#: Upper bound of one record; a larger length field is treated as corruption.
MAX_RECORD_BYTES: Final = 16 * 1024 * 1024
MAGIC: Final = b"DMJRNL\x00\x01"  # format version 1
LOCK_NAME: Final = "lock"
CHECKPOINT_NAME: Final = "checkpoint"
SEGMENT_SUFFIX: Final = ".seg"
DEAD_LETTER_DIR: Final = "dead-letter"
_TMP_PREFIX: Final = ".tmp-"
_HEADER: Final = struct.Struct("<II")
_LENGTH: Final = struct.Struct("<I")
_READ_CHUNK: Final = 4 * 1024 * 1024
#: Zeros written ahead of the active segment's end, so that group writes overwrite blocks
#: that already exist and ``fdatasync`` has no file size to commit (see the module docstring).
PREALLOCATE_BYTES: Final = 1024 * 1024
_TMP_STALE_SECONDS: Final = 60.0
#: Opening a journal whose lock is taken tries this often, this many seconds apart: another
#: router's orphan scan (:func:`find_orphans`) holds a live journal's lock for microseconds.
_LOCK_ATTEMPTS: Final = 5
_LOCK_RETRY_SECONDS: Final = 0.005
_INSTANCE_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SEGMENT_NAME: Final = re.compile(r"^(\d{20})\.seg$")

_KIND_OF: Final[dict[type[Any], bytes]] = {
    TickData: b"t",
    CandleData: b"c",
    OrderFlowMetrics: b"o",
}
_TYPE_OF: Final[dict[int, type[IngestItem]]] = {
    ord("t"): TickData,
    ord("c"): CandleData,
    ord("o"): OrderFlowMetrics,
}
_dumps: Final = orjson.dumps
_KIND_NAME: Final = {ord("t"): "tick", ord("c"): "candle", ord("o"): "order_flow"}


# --------------------------------------------------------------------------- records


def parse_checkpoint(text: str) -> tuple[int, int] | None:
    """A checkpoint file's replay point and stored LSN (``None``: damaged).

    The file holds ``"N"``, or ``"N M"`` when the checkpoint was held below the stored LSN
    ``M`` (see :meth:`Journal.hold_checkpoint`).
    """
    parts = text.strip().split(" ")
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        return None
    replay_from = int(parts[0])
    return replay_from, max(replay_from, int(parts[-1]))


def encode_item(item: IngestItem) -> bytes:
    """Return the journal payload of ``item``: a kind byte, then the model's JSON.

    The JSON is the model's field dict as orjson writes it (``None`` as ``null``; derived
    properties such as a tick's ``mid`` are not fields and are recomputed on load): a third
    of what pydantic's serializer costs per tick, and the same document it reads back.

    orjson refuses integers beyond 64 bits and strings with lone surrogates, which only a
    model built without validation holds; the standard library's encoder writes both (the
    surrogates as ``\\u`` escapes), so such an item is still kept: reading it back fails
    validation, and the write path dead-letters it with its bytes.

    Raises:
        ValidationError: ``item`` is not a TickData, CandleData or OrderFlowMetrics,
            holds a value that is not JSON at all, or encodes to more than
            ``MAX_RECORD_BYTES`` (possible only without validation).
    """
    cls = type(item)
    kind = _KIND_OF.get(cls)
    if kind is None:
        msg = f"cannot journal a {cls.__name__}; expected TickData, CandleData or OrderFlowMetrics"
        raise ValidationError(msg)
    try:
        payload = kind + _dumps(item.__dict__)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        try:
            text = json.dumps(
                item.__dict__, ensure_ascii=True, allow_nan=False, separators=(",", ":")
            )
        except (TypeError, ValueError) as exc:
            msg = f"cannot journal this {cls.__name__}: {exc}"
            raise ValidationError(msg) from exc
        payload = kind + text.encode()
    if len(payload) > MAX_RECORD_BYTES:
        # Only a model built without validation gets here (its text fields are bounded):
        # refused before it is acknowledged, since reading would take it for a torn record.
        msg = (
            f"cannot journal this {cls.__name__}: {len(payload):,} bytes, above the "
            f"{MAX_RECORD_BYTES:,}-byte record limit"
        )
        raise ValidationError(msg)
    return payload


def decode_item(payload: bytes) -> IngestItem:
    """Rebuild a model from a journal payload, validating it again.

    Raises:
        ValidationError: Unknown kind byte or data the model refuses.
    """
    cls = _TYPE_OF.get(payload[0]) if payload else None
    if cls is None:
        msg = f"journal record has unknown kind {payload[:1]!r}"
        raise ValidationError(msg)
    return cls.model_validate_json(payload[1:])


def kind_name(payload: bytes) -> str:
    """``"tick"``, ``"candle"``, ``"order_flow"`` or ``"unknown"`` for a payload."""
    return _KIND_NAME.get(payload[0], "unknown") if payload else "unknown"


def _frame(payload: bytes) -> bytes:
    length = _LENGTH.pack(len(payload))
    return _HEADER.pack(len(payload), zlib.crc32(payload, zlib.crc32(length))) + payload


def _parse(
    buf: bytes | memoryview, pos: int, end: int
) -> tuple[list[bytes], int, str | None, bool]:
    """Parse whole records in ``buf[pos:end]``.

    Returns:
        (payloads, position after the last whole record, problem, short) where ``problem``
        describes a corrupt record (bad length or CRC) and ``short`` says the buffer ended
        inside a record (torn, or simply not read yet).
    """
    out: list[bytes] = []
    header = _HEADER.size
    while pos < end:
        if end - pos < header:
            return out, pos, None, True
        length, crc = _HEADER.unpack_from(buf, pos)
        if length == 0 or length > MAX_RECORD_BYTES:
            return out, pos, f"invalid record length {length}", False
        stop = pos + header + length
        if stop > end:
            return out, pos, None, True
        payload = bytes(buf[pos + header : stop])
        if zlib.crc32(payload, zlib.crc32(_LENGTH.pack(length))) != crc:
            return out, pos, "CRC mismatch", False
        out.append(payload)
        pos = stop
    return out, pos, None, False


# --------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    """Make a file creation, rename or deletion in ``path`` durable."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened on Windows
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """Create the directory ``path`` and its missing parents, each one durably: the entry
    of every directory created is synced in its parent (a power loss may otherwise take
    the whole new branch, and what was written under it)."""
    missing: list[Path] = []
    level = path
    while not level.is_dir() and level.parent != level:
        missing.append(level)
        level = level.parent
    if not missing:
        return
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        _fsync_dir(created.parent)


def _sync(fd: int) -> None:
    # fdatasync also flushes the size change an append makes; it skips mtime.
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS/Windows
        os.fsync(fd)


_PWRITE: Final = getattr(os, "pwrite", None)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (the descriptor's position is not used)."""
    view = memoryview(data)
    while view:
        if _PWRITE is not None:
            written = _PWRITE(fd, view, offset)
        else:  # pragma: no cover - Windows
            os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, view)
        view = view[written:]
        offset += written


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` at the descriptor's position (``write`` may take only part)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:  # pragma: no cover - write(2) reports errors instead
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


class _FileLock:
    """An exclusive, non-blocking lock on a file that dies with its process.

    ``flock`` on POSIX: the kernel drops it when the owner exits, however it exits, which is
    exactly the "owner is dead" signal orphan detection needs. The ``filelock`` package
    elsewhere.
    """

    __slots__ = ("__weakref__", "_fallback", "fd", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self._fallback: Any = None

    def try_acquire(self, *, create: bool = True) -> bool:
        if fcntl is None:  # pragma: no cover - Windows
            import filelock

            lock = filelock.FileLock(str(self.path), thread_local=False)
            try:
                lock.acquire(blocking=False)
            except filelock.Timeout:
                return False
            self._fallback = lock
            return True
        fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _held_locks.add(self)
        return True

    def write_owner(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fallback is not None:  # pragma: no cover - Windows
            self._fallback.release()
            self._fallback = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _held_locks.discard(self)
            os.close(fd)  # closing the last descriptor drops the flock

    def forget(self) -> None:
        """Close the descriptor inherited by a forked child without unlocking the parent.

        ``flock`` locks belong to the open file description shared with the parent; an
        explicit unlock would release the parent's lock, a plain close does not.
        """
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        _held_locks.discard(self)


#: Every lock holding a descriptor: a child forked while one is held (an open journal, or
#: another router's orphan probe in a worker thread) closes its copy, or the lock would
#: live as long as the child (``flock`` belongs to the shared open file description).
_held_locks: weakref.WeakSet[_FileLock] = weakref.WeakSet()


def _forget_locks_after_fork() -> None:
    for lock in list(_held_locks):
        lock.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_after_fork)


def _lock_is_free(lock_path: Path) -> bool:
    lock = _FileLock(lock_path)
    if not lock.try_acquire(create=False):
        return False
    lock.release()
    return True


def new_instance_id() -> str:
    """A fresh instance id: ``<host>-<pid>-<random>``, safe as a folder name."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def find_orphans(directory: Path | str, *, exclude: Collection[str] = ()) -> list[Path]:
    """Return the instance folders under ``directory`` whose owner is dead, oldest first.

    A folder counts when it holds a lock file that can be locked without waiting (the
    kernel released it when its owner exited). The probe lock is dropped again at once (an
    owner opening its journal meanwhile waits for it); :meth:`Journal.open` takes it for
    real and fails if another router was quicker.
    Leftovers of an interrupted folder creation (``.tmp-*``) whose lock is free are removed.
    Blocking file I/O: call it with ``asyncio.to_thread`` from async code.

    Args:
        directory: The journal root (``settings.journal_dir``).
        exclude: Instance ids to skip (the caller's own).
    """
    root = Path(directory)
    found: list[tuple[float, Path]] = []
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        name = entry.name
        if not entry.is_dir() or name in exclude or name == DEAD_LETTER_DIR:
            continue
        lock_path = entry / LOCK_NAME
        if name.startswith(_TMP_PREFIX):
            # A folder whose creation was interrupted before any record was written. Only
            # stale ones: a fresh one may belong to a router that is about to lock it.
            with contextlib.suppress(OSError):
                stale = entry.stat().st_mtime < time.time() - _TMP_STALE_SECONDS
                if stale and lock_path.exists() and _lock_is_free(lock_path):
                    _remove_tree(entry, expect_empty_journal=True)
            continue
        if name.startswith(".") or not lock_path.exists():
            continue
        try:
            if not _lock_is_free(lock_path):
                continue
        except FileNotFoundError:  # removed by its adopter in the meantime
            continue
        segments = list(entry.glob(f"*{SEGMENT_SUFFIX}"))
        try:
            age = min((s.stat().st_mtime for s in segments), default=lock_path.stat().st_mtime)
        except FileNotFoundError:
            continue
        found.append((age, entry))
    found.sort()
    return [path for _, path in found]


def _remove_tree(path: Path, *, expect_empty_journal: bool) -> None:
    """Remove a journal folder made only of files this module writes."""
    try:
        children = list(path.iterdir())
    except FileNotFoundError:
        return
    if expect_empty_journal and any(c.name.endswith(SEGMENT_SUFFIX) for c in children):
        return  # not what we expected: leave it for a person to look at
    for child in children:
        if child.is_file():
            child.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()


# --------------------------------------------------------------------------- journal


@dataclass(slots=True)
class _Segment:
    first_lsn: int
    path: Path
    records: int
    size: int  # bytes known to be whole and durable, magic included

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + self.records - 1


@dataclass(frozen=True, slots=True)
class JournalBatch:
    """What one :meth:`Journal.read` returned.

    Attributes:
        records: ``(lsn, payload)`` pairs in LSN order; decode with :func:`decode_item`.
        end_lsn: Every LSN up to this one has been returned or was unreadable (moved
            aside, or its segment file deleted; see :attr:`Journal.problems`); pass it
            to :meth:`Journal.mark_stored` once the records are stored.
    """

    records: list[tuple[int, bytes]]
    end_lsn: int


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Counters of one journal."""

    pending_records: int
    size_bytes: int
    segments: int
    last_lsn: int
    stored_lsn: int
    appends: int
    records_appended: int
    fsyncs: int
    problems: int


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(slots=True)
class _Pending:
    """One append waiting for its group's sync (no payloads: a :meth:`Journal.wait_idle`)."""

    payloads: list[bytes]
    items: Sequence[IngestItem]
    on_durable: Callable[[int, Sequence[IngestItem]], None] | None
    future: asyncio.Future[int]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Written:
    """A group written to its segment, not yet synced."""

    segment: _Segment
    fd: int
    records: int
    size: int


class _Committer:
    """The hand-over point between the event loop and a journal's committer thread.

    The event loop queues appends with :meth:`submit`; the thread gets everything queued
    since it last looked, as one group, from :meth:`take`. ``_wake`` is a lock used as a
    binary semaphore (cheaper than a ``Condition``): the thread blocks on it only after saying
    it is idle, and a submitter releases it only for an idle thread, so handing an append to
    a busy thread costs the event loop a list append under an uncontended lock.
    """

    __slots__ = ("_idle", "_mutex", "_queue", "_stopping", "_wake", "thread")

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # guards _queue, _idle and _stopping
        self._wake = threading.Lock()
        self._wake.acquire()  # held: no wake-up pending
        self._queue: list[_Pending] = []
        self._idle = False
        self._stopping = False
        self.thread: threading.Thread | None = None

    def submit(self, entry: _Pending) -> None:
        """Queue ``entry`` for the next group (event loop side)."""
        with self._mutex:
            self._queue.append(entry)
            if self._idle:
                self._idle = False
                self._wake.release()

    def take(self, *, block: bool) -> list[_Pending] | None:
        """Return everything submitted so far (committer thread side).

        With ``block``, wait while there is nothing; then ``None`` means stopped and drained,
        the thread's cue to exit. Without, ``None`` means nothing is queued.
        """
        while True:
            with self._mutex:
                if self._queue:
                    group, self._queue = self._queue, []
                    return group
                if self._stopping or not block:
                    return None
                self._idle = True
            self._wake.acquire()

    def close(self, journal: Journal) -> None:
        """Mark ``journal`` closed (the thread is idle by now; ``stop`` ends it)."""
        journal._state = _State.CLOSED

    def stop(self) -> None:
        """Let the thread finish what is queued, then exit (any thread; idempotent)."""
        with self._mutex:
            self._stopping = True
            if self._idle:
                self._idle = False
                self._wake.release()


class _InlineCommitter:
    """Group commit without a thread: each event loop commits its own appends.

    :meth:`submit` queues an append and, for the first one since the loop's last commit,
    schedules :meth:`_run` with ``call_soon``; appends made in the rest of that loop
    iteration join the same group. ``_run`` writes and syncs the group in the event loop
    and acknowledges it directly. ``_commit_lock`` keeps groups from two event loops (in
    two threads) from interleaving, so file order, LSN order and acknowledgement order
    stay one.
    """

    __slots__ = ("_commit_lock", "_journal", "_mutex", "_queues", "thread")

    def __init__(self, journal: Journal) -> None:
        self._journal = weakref.ref(journal)
        self._mutex = threading.Lock()  # guards _queues
        self._commit_lock = threading.Lock()
        self._queues: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        self.thread: threading.Thread | None = None  # none: the close path has nothing to join

    def submit(self, entry: _Pending) -> None:
        """Queue ``entry`` for its event loop's next group (that loop's thread)."""
        loop = entry.loop
        with self._mutex:
            queue = self._queues.get(loop)
            if queue is not None:
                queue.append(entry)
                return
            self._queues[loop] = [entry]
        loop.call_soon(self._run, loop)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._mutex:
            group = self._queues.pop(loop, None)
        journal = self._journal()
        if group is None or journal is None:
            return
        with self._commit_lock:
            if journal.is_open:
                outcome = journal._commit(group, None)
            else:  # closed from another event loop since these were queued
                outcome = (group, None, JournalError(f"{journal!r} is closed"))
        journal._settle(*outcome)

    def close(self, journal: Journal) -> None:
        """Mark ``journal`` closed once no other event loop is inside a commit."""
        with self._commit_lock:
            journal._state = _State.CLOSED

    def stop(self) -> None:
        """Nothing runs between groups; pending groups still commit when their loop runs."""


class _AioCommitter:
    """Group commit with Linux AIO: the event loop writes each group and has the kernel
    ``fdatasync`` it in the background, then acknowledges it when the completion arrives.

    The write goes to the page cache (microseconds); the sync is an ``IOCB_CMD_FDSYNC``
    submitted with ``io_submit`` whose completion signals an ``eventfd`` the loop watches.
    So the loop neither waits for the disk nor hands anything to a thread (no wake-ups, no
    GIL hand-offs): while the disk syncs one group it runs other tasks and collects the next
    group, which is written and submitted as soon as the completion is read. One sync is in
    flight at a time, so file order, LSN order and acknowledgement order stay one. Bound to
    the event loop that opened the journal.
    """

    __slots__ = (
        "_ctx",
        "_efd",
        "_inflight",
        "_journal",
        "_loop",
        "_new_request",
        "_queue",
        "_request",
        "_scheduled",
    )

    thread: threading.Thread | None = None  # none: the close path has nothing to join

    def __init__(self, journal: Journal, loop: asyncio.AbstractEventLoop) -> None:
        try:
            import libaio  # type: ignore[import-untyped]
        except (ImportError, OSError) as exc:
            msg = (
                "journal sync 'aio' needs Linux, the libaio package (installed with "
                f"data_manager on Linux) and the system's libaio.so.1: {exc}"
            )
            raise JournalError(msg) from exc
        self._journal = journal
        self._loop = loop
        self._queue: list[_Pending] = []
        self._scheduled = False
        self._inflight: tuple[Any, list[_Pending], _Written] | None = None
        try:
            self._ctx = libaio.AIOContext(4)
            self._efd = libaio.EventFD(0, libaio.EFD_NONBLOCK | libaio.EFD_CLOEXEC)
        except OSError as exc:
            msg = f"cannot set up Linux AIO for {journal.path}: {exc}"
            raise JournalError(msg) from exc
        self._new_request = partial(libaio.AIOBlock, libaio.AIOBLOCK_MODE_FDSYNC, eventfd=self._efd)
        self._request: tuple[int, Any] | None = None  # (fd, its sync request), reused
        loop.add_reader(self._efd.fileno(), self._completed)

    def submit(self, entry: _Pending) -> None:
        """Queue ``entry`` for the next group (event loop thread)."""
        if entry.loop is not self._loop:
            msg = f"{self._journal!r} syncs with Linux AIO in another event loop"
            raise JournalError(msg)
        self._queue.append(entry)
        if self._inflight is None and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._start)

    def _start(self) -> None:
        """Write what is queued as one group and submit its sync."""
        self._scheduled = False
        journal = self._journal
        while self._inflight is None and self._queue:
            group, self._queue = self._queue, []
            try:
                written = journal._write_group(group)
            except Exception as exc:
                journal._settle(group, None, journal._append_error(exc))
                continue
            if written is None:  # only wait_idle markers
                journal._settle(group, journal._next_lsn, None)
                continue
            try:
                if self._request is None or self._request[0] != written.fd:
                    self._request = (written.fd, self._new_request(_FileNo(written.fd)))
                block = self._request[1]
                self._ctx.submit([block])
            except OSError:
                # The kernel would not take the request: sync here instead (blocking).
                logger.warning("journal %s: AIO sync refused; syncing in the loop", journal.path)
                try:
                    first = journal._sync_group(written)
                except JournalError as exc:
                    journal._settle(group, None, exc)
                else:
                    journal._settle(group, first, None)
                continue
            except Exception as exc:
                # Not the kernel's answer but a fault of ours: fail the group, never strand it.
                self._request = None
                journal._settle(group, None, journal._sync_failed(written, exc))
                continue
            self._inflight = (block, group, written)

    def _completed(self) -> None:
        """The eventfd fired: acknowledge the synced group, start the next one."""
        try:
            self._efd.read()
        except BlockingIOError:
            return
        if self._inflight is None:
            return
        events = self._ctx.getEvents(min_nr=0, nr=4, timeout=0)
        if not events:
            return
        (_, res, _), *_ = events
        _, group, written = self._inflight
        self._inflight = None
        journal = self._journal
        if res < 0:
            error = OSError(-res, os.strerror(-res))
            journal._settle(group, None, journal._sync_failed(written, error))
        else:
            journal._settle(group, journal._synced(written), None)
        self._start()

    def close(self, journal: Journal) -> None:
        """Release the AIO context (nothing is queued or in flight after ``wait_idle``)."""
        journal._state = _State.CLOSED
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._efd.fileno())
        self._ctx.close()
        self._efd.close()

    def stop(self) -> None:
        """Nothing runs between groups."""


class _FileNo:
    """What libaio wants as a target: an object with ``fileno()``."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


_AnyCommitter: TypeAlias = "_Committer | _InlineCommitter | _AioCommitter"


#: A synced (or failed) group on its way back: (group, first LSN, None) or (group, None, error).
_Outcome: TypeAlias = tuple[list[_Pending], int | None, JournalError | None]


def _commit_forever(ref: weakref.ref[Journal], committer: _Committer) -> None:
    """A journal's committer thread: write and sync group after group until stopped.

    A group that is synced while more appends are queued is handed back only once the next
    group is written (see :meth:`Journal._commit`). Holds the journal only weakly while
    idle, so a journal dropped without :meth:`Journal.close` is still collected (its
    finalizer stops this thread).
    """
    synced: _Outcome | None = None
    while True:
        group = committer.take(block=synced is None)
        journal = ref()
        if journal is None:
            return
        try:
            if group is not None:
                synced = journal._commit(group, synced)
            elif synced is not None:
                journal._hand_back(*synced)
                synced = None
            else:
                return  # stopped, everything handed back
        except Exception:  # keep committing: later groups must not hang on one bad one
            logger.exception("journal %s: committer failed on a group", journal.path)
            synced = None
        del journal


_open_journals: weakref.WeakSet[Journal] | None = None


def _register_for_fork(journal: Journal) -> None:
    """Make forked children close (not unlock) inherited journal descriptors."""
    global _open_journals
    if _open_journals is None:
        _open_journals = weakref.WeakSet()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_forget_after_fork)
    _open_journals.add(journal)


def _forget_after_fork() -> None:
    for journal in list(_open_journals or ()):
        journal._forget_after_fork()


class Journal:
    """The append-only journal of one router instance.

    Args:
        directory: The journal root shared by every instance on this machine.
        instance_id: This instance's folder name (letters, digits, ``.``, ``_``, ``-``).
        segment_bytes: Size after which a new segment file is started.
        checkpoint_every: Write the checkpoint file after this many records were stored
            (it is also written when a segment is deleted and on close).
        sync: ``"auto"`` (default): ``"aio"`` where Linux AIO works, else ``"thread"``.
            ``"aio"``: the loop writes each group and the kernel syncs it in the
            background (needs the ``libaio`` package). ``"thread"``: a committer thread
            writes and syncs, and the event loop never waits for the disk. ``"loop"``: the
            event loop writes and syncs each group itself, blocking for the sync; no
            hand-offs, most throughput, but every other task on the loop waits too.

    Raises:
        ValidationError: An unusable ``instance_id`` or ``segment_bytes``.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        instance_id: str,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        checkpoint_every: int = 10_000,
        sync: JournalSync = "auto",
    ) -> None:
        if not _INSTANCE_ID.match(instance_id) or instance_id == DEAD_LETTER_DIR:
            msg = f"journal instance id {instance_id!r} is not a usable folder name"
            raise ValidationError(msg)
        if segment_bytes < 1024:
            msg = f"segment_bytes must be at least 1024, got {segment_bytes}"
            raise ValidationError(msg)
        if sync not in ("auto", "thread", "loop", "aio"):
            msg = f"journal sync must be 'auto', 'thread', 'loop' or 'aio', got {sync!r}"
            raise ValidationError(msg)
        self.root = Path(directory)
        self.instance_id = instance_id
        self.path = self.root / instance_id
        self.segment_bytes = segment_bytes
        self.checkpoint_every = max(1, checkpoint_every)
        self.sync: JournalSync = sync
        self.problems: list[str] = []
        self._state = _State.NEW
        # Set once close() has begun (new appends are refused), then once it has finished.
        self._close_done: asyncio.Event | None = None
        self._lock = _FileLock(self.path / LOCK_NAME)
        self._io = threading.Lock()  # guards _segments against the committer and workers
        # Held by whatever rewrites the checkpoint or deletes files (a mark_stored worker,
        # the close): a worker left running by a cancelled mark_stored finishes first.
        self._checkpointing = threading.Lock()
        self._files_final = False  # set by the close, under _checkpointing
        self._segments: list[_Segment] = []
        self._active_fd: int | None = None
        self._active_end = 0  # bytes in the active segment file: records, then zeros
        self._next_lsn = 1
        self._stored_lsn = 0
        self._checkpointed = 0  # the checkpoint file's replay point
        self._checkpointed_stored = 0  # ...and what it says was stored (see _write_checkpoint)
        self._upserts_stored = 0  # see upserts_stored_lsn
        self._hold: int | None = None  # see hold_checkpoint
        self._committer: _AnyCommitter | None = None  # while open
        self._stop_on_collect: weakref.finalize[[], Journal] | None = None
        self._read_cursor: tuple[int, int, int] | None = None  # (segment, offset, next lsn)
        # Segments whose file was deleted under us: first LSN -> last LSN reported lost (each
        # loss is reported once). Guarded by _io.
        self._gone: dict[int, int] = {}
        # The active segment's file was found deleted: the next group starts a new segment.
        self._roll_next = False
        self._appends = 0
        self._records_appended = 0
        self._fsyncs = 0

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r}, state={self._state.value})"

    # ------------------------------------------------------------------ properties

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._state is _State.OPEN

    @property
    def last_lsn(self) -> int:
        """LSN of the newest durable record (0 when there has been none)."""
        return self._next_lsn - 1

    @property
    def stored_lsn(self) -> int:
        """Every record up to this LSN is stored in the database (or dead-lettered)."""
        return self._stored_lsn

    @property
    def upserts_stored_lsn(self) -> int:
        """Records up to this LSN were stored before the journal was opened; a replay stores
        only the ticks among them again (a held checkpoint, see :meth:`hold_checkpoint`):
        a newer version of an upsert may have been stored since."""
        return self._upserts_stored

    def replays(self, lsn: int, payload: bytes) -> bool:
        """Whether a replay stores this record (not yet marked stored) again: all but the
        upserts at or below :attr:`upserts_stored_lsn`."""
        return lsn > self._upserts_stored or kind_name(payload) == "tick"

    def hold_checkpoint(self, lsn: int | None) -> None:
        """Keep the checkpoint (and the segments it frees) at or below ``lsn``; ``None``
        lifts the hold.

        Ticks above the hold are replayed after a crash even when they were stored: the
        router holds back those the data it derives from them (candles, order flow, kept in
        memory until its next maintenance pass) may still miss, so that a router recovering
        after a crash knows which series to rebuild. The checkpoint file also says what was
        stored: upserts below that are not replayed (:attr:`upserts_stored_lsn`). The
        checkpoint never moves back.
        """
        self._hold = lsn

    def _checkpoint_target(self) -> int:
        """What the checkpoint may say: the stored LSN, held back by :meth:`hold_checkpoint`."""
        hold = self._hold
        stored = self._stored_lsn
        if hold is None or hold >= stored:
            return stored
        return max(hold, self._checkpointed)

    @property
    def pending_records(self) -> int:
        """Durable records not yet marked stored."""
        return max(0, self.last_lsn - self._stored_lsn)

    @property
    def size_bytes(self) -> int:
        """Bytes held in segment files."""
        with self._io:
            return sum(s.size for s in self._segments)

    def stats(self) -> JournalStats:
        """Counters for health and metrics (no I/O)."""
        with self._io:
            size = sum(s.size for s in self._segments)
            count = len(self._segments)
        return JournalStats(
            pending_records=self.pending_records,
            size_bytes=size,
            segments=count,
            last_lsn=self.last_lsn,
            stored_lsn=self._stored_lsn,
            appends=self._appends,
            records_appended=self._records_appended,
            fsyncs=self._fsyncs,
            problems=len(self.problems),
        )

    # ------------------------------------------------------------------ open / close

    async def open(self, *, create: bool = True) -> None:
        """Create or take over the instance folder, lock it and scan what it holds.

        Args:
            create: Create the folder when it does not exist (``False`` when adopting an
                orphan: one that vanished was finished by another router).

        Raises:
            JournalLockedError: Another live process holds the lock (or, with
                ``create=False``, the folder is gone).
            JournalError: The folder cannot be created or read.
        """
        if self._state is not _State.NEW:
            msg = f"{self!r} was already opened"
            raise JournalError(msg)
        # The open runs in a worker thread that a cancellation does not stop: if we are
        # cancelled, wait for it and give back what it took (the lock above all), or the
        # folder would stay locked, never adopted, for as long as this process lives.
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_sync, create))
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            await finish_despite_cancel(self._undo_open(opening))
            raise
        except OSError as exc:
            msg = f"cannot open the journal at {self.path}: {exc}"
            raise JournalError(msg) from exc
        if self._closed_meanwhile():
            await asyncio.to_thread(self._close_sync, None)
            msg = f"{self!r} was closed while it was being opened"
            raise JournalError(msg)
        try:
            self._start_committer()
        except BaseException:
            await asyncio.to_thread(self._close_sync, None)
            raise
        self._state = _State.OPEN
        _register_for_fork(self)

    def _closed_meanwhile(self) -> bool:
        """Whether :meth:`close` was called while :meth:`open`'s thread ran."""
        return self._state is _State.CLOSED

    async def _undo_open(self, opening: asyncio.Future[None]) -> None:
        """After a cancelled :meth:`open`: once its thread is done, close what it opened."""
        try:
            await opening
        except Exception:  # it failed, and gave back what it took itself
            return
        await asyncio.to_thread(self._close_sync, None)
        self._state = _State.CLOSED

    def _open_sync(self, create: bool) -> None:
        _make_dirs(self.root)  # a new root must survive a power loss too
        for _ in range(3):
            if not self.path.exists():
                if not create:
                    break
                self._create_locked()
                if self._lock.fd is not None or self._lock._fallback is not None:
                    break
            try:
                if not self._acquire_lock():
                    msg = f"journal {self.path} is held by another running process"
                    raise JournalLockedError(msg)
                break
            except FileNotFoundError:
                continue  # removed by its adopter between our checks
        if self._lock.fd is None and self._lock._fallback is None:
            msg = f"journal {self.path} no longer exists"
            raise JournalLockedError(msg)
        try:
            self._lock.write_owner()
            self._load()
        except BaseException:
            self._lock.release()
            raise

    def _acquire_lock(self) -> bool:
        """Take the lock, waiting a few milliseconds for a holder that lets go at once
        (another router probing for orphans) before calling the journal taken."""
        for attempt in range(_LOCK_ATTEMPTS):
            if attempt:
                time.sleep(_LOCK_RETRY_SECONDS)  # the open's worker thread, not the loop
            if self._lock.try_acquire():
                return True
        return False

    def _create_locked(self) -> None:
        # Create under a temporary name, lock, then rename: a folder is never visible under
        # its final name without its owner's lock, so nobody mistakes it for an orphan.
        tmp = self.root / f"{_TMP_PREFIX}{self.instance_id}-{secrets.token_hex(4)}"
        tmp.mkdir()
        lock = _FileLock(tmp / LOCK_NAME)
        if not lock.try_acquire():  # pragma: no cover - nobody else knows the name
            msg = f"cannot lock fresh journal folder {tmp}"
            raise JournalError(msg)
        try:
            os.rename(tmp, self.path)
        except OSError:
            lock.release()
            vanished = not tmp.exists()
            _remove_tree(tmp, expect_empty_journal=True)
            if vanished or self.path.exists():
                return  # tmp removed by a prober, or created concurrently: try again
            raise
        _fsync_dir(self.root)
        lock.path = self.path / LOCK_NAME
        self._lock = lock

    def _load(self) -> None:
        checkpoint, stored = self._read_checkpoint()
        segments: list[_Segment] = []
        damaged: set[int] = set()  # first LSNs of segments whose damage was reported
        for path in sorted(self.path.iterdir()):
            match = _SEGMENT_NAME.match(path.name)
            if match is None:
                continue
            reported = len(self.problems)
            segment = self._scan_segment(path, int(match.group(1)))
            if segment is not None:
                segments.append(segment)
                if len(self.problems) > reported:
                    damaged.add(segment.first_lsn)
        for older, newer in itertools.pairwise(segments):
            if older.records and older.last_lsn >= newer.first_lsn:
                self._cut_overlap(older, newer.first_lsn - older.first_lsn)
        last = max((s.last_lsn for s in segments if s.records), default=0)
        self._next_lsn = max(last, checkpoint) + 1
        self._stored_lsn = min(checkpoint, self._next_lsn - 1)
        self._checkpointed = self._stored_lsn
        self._checkpointed_stored = self._upserts_stored = min(stored, self._next_lsn - 1)
        keep: list[_Segment] = []
        for segment in segments:
            if segment.records == 0 or segment.last_lsn <= self._stored_lsn:
                segment.path.unlink(missing_ok=True)
            else:
                keep.append(segment)
        if len(keep) != len(segments):
            _fsync_dir(self.path)
        self._segments = keep
        if keep and keep[0].first_lsn > self._stored_lsn + 1:
            # Nothing below the oldest segment is in the journal: stored (a crash between
            # deleting stored segments and rewriting the checkpoint leaves the checkpoint
            # behind) or deleted by hand; the two cannot be told apart, and neither is there
            # to replay.
            self._stored_lsn = keep[0].first_lsn - 1
        for older, newer in itertools.pairwise(keep):
            # Segments are deleted oldest first: a hole between two is a file deleted by
            # someone else (damage moved aside was reported by the scan already).
            if older.last_lsn + 1 < newer.first_lsn and older.first_lsn not in damaged:
                self._problem(
                    f"{self.path}: records {older.last_lsn + 1}..{newer.first_lsn - 1} are "
                    "missing (a segment file was deleted); the others are replayed"
                )
        if self.pending_records:
            logger.info(
                "journal %s holds %d records to replay (%d bytes)",
                self.path,
                self.pending_records,
                sum(s.size for s in keep),
            )

    def _read_checkpoint(self) -> tuple[int, int]:
        """The replay point and the stored LSN: ``"N"``, or ``"N M"`` when the checkpoint was
        held below what was stored (:meth:`hold_checkpoint`)."""
        path = self.path / CHECKPOINT_NAME
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return 0, 0
        except (OSError, UnicodeDecodeError):
            logger.warning("journal checkpoint %s unreadable; replaying everything", path)
            return 0, 0
        parsed = parse_checkpoint(text)
        if parsed is None:
            logger.warning("journal checkpoint %s is damaged; replaying everything", path)
            return 0, 0
        return parsed

    def _scan_segment(self, path: Path, first_lsn: int) -> _Segment | None:
        data = path.read_bytes()
        if len(data) < len(MAGIC):
            # Created, then the process died before the magic reached the disk.
            path.unlink(missing_ok=True)
            return None
        if data[: len(MAGIC)] != MAGIC:
            aside = path.with_name(f"{path.name}.corrupt-0")
            os.rename(path, aside)
            self._problem(f"{path}: unknown segment format; moved to {aside.name}")
            return None
        payloads, pos, problem, short = _parse(data, len(MAGIC), len(data))
        # Zeros after the last record were written ahead of it (the owner did not close the
        # segment): only any other tail is damage.
        if data.count(0, pos) < len(data) - pos:
            reason = problem or ("torn record" if short else "trailing bytes")
            self._quarantine_tail(path, data, pos, reason)
        return _Segment(first_lsn=first_lsn, path=path, records=len(payloads), size=pos)

    def _cut_overlap(self, segment: _Segment, keep: int) -> None:
        """Set aside the records of ``segment`` after its first ``keep``: the next segment
        starts at those LSNs. Only a group whose write or sync failed and whose records could
        not be cut off leaves such records (refused to its callers, then the segment was
        abandoned and the next one took the same LSNs), so they are not replayed."""
        data = segment.path.read_bytes()
        pos = len(MAGIC)
        for _ in range(keep):  # whole records, checked by the scan
            (length,) = _LENGTH.unpack_from(data, pos)
            pos += _HEADER.size + length
        reason = f"{segment.records - keep} records overlapping the next segment's LSNs"
        self._quarantine_tail(segment.path, data, pos, reason)
        segment.records, segment.size = keep, pos

    def _quarantine_tail(self, path: Path, data: bytes, pos: int, reason: str) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{pos}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data[pos:])
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, pos)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.path)
        self._problem(
            f"{path}: {reason} at byte {pos}; {len(data) - pos} bytes moved to {aside.name}"
        )

    def _problem(self, text: str) -> None:
        self.problems.append(text)
        logger.error("journal: %s", text)

    async def wait_idle(self) -> None:
        """Wait until every append already requested is durable (or failed)."""
        committer = self._committer
        if committer is None:
            return
        # A marker without records: the committer hands groups back in order, so when the
        # marker's turn comes every earlier append has been acknowledged (or failed).
        loop = asyncio.get_running_loop()
        marker: asyncio.Future[int] = loop.create_future()
        committer.submit(_Pending([], (), None, marker, loop))
        with contextlib.suppress(JournalError):
            await marker

    async def close(self) -> None:
        """Finish pending appends, release the lock; remove the folder when fully stored.

        A journal with records still to store stays on disk, unlocked, so the next router
        to start adopts it. A cancelled call still closes the journal before the
        cancellation goes through.
        """
        if self._close_done is not None:  # a concurrent close() does the job
            await self._close_done.wait()
            return
        if self._state is not _State.OPEN:
            self._state = _State.CLOSED
            return
        # Appends requested before this call complete; later ones are refused, so none can
        # slip in between the wait below and the committer's shutdown (unsynced, or cut off
        # the segment by the close after it was acknowledged).
        done = self._close_done = asyncio.Event()
        try:
            # Cut short, the close would leave the journal open and locked (never adopted
            # while this process lives), and every later close() would return at once.
            await finish_despite_cancel(self._shut_down())
        finally:
            done.set()

    async def _shut_down(self) -> None:
        """The work of :meth:`close` once it has begun: drain, stop the committer, unlock."""
        await self.wait_idle()
        committer, self._committer = self._committer, None
        assert committer is not None
        committer.close(self)
        try:
            await asyncio.to_thread(self._close_sync, committer)
        except OSError as exc:  # the lock is released; what is on disk replays as it is
            msg = f"cannot finish closing the journal {self.path}: {exc}"
            raise JournalError(msg) from exc
        finally:
            if _open_journals is not None:
                _open_journals.discard(self)

    def _start_committer(self) -> None:
        if self.sync == "loop":
            self._committer = _InlineCommitter(self)
            return
        if self.sync in ("aio", "auto"):
            try:
                self._committer = _AioCommitter(self, asyncio.get_running_loop())
                return
            except JournalError:
                if self.sync == "aio":
                    raise
                logger.debug("journal %s: no Linux AIO; a committer thread syncs", self.path)
        committer = _Committer()
        committer.thread = threading.Thread(
            target=_commit_forever,
            args=(weakref.ref(self), committer),
            name=f"journal-commit-{self.instance_id}",
            daemon=True,
        )
        committer.thread.start()
        self._committer = committer
        self._stop_on_collect = weakref.finalize(self, committer.stop)
        self._stop_on_collect.atexit = False  # a daemon thread: nothing to stop at exit

    def _close_sync(self, committer: _AnyCommitter | None) -> None:
        if self._stop_on_collect is not None:
            self._stop_on_collect.detach()
            self._stop_on_collect = None
        if committer is not None:  # idle by now (close waited): this only ends the thread
            committer.stop()
            if committer.thread is not None:
                committer.thread.join()
        try:
            with self._checkpointing:
                self._finish_files()
        finally:
            self._lock.release()

    def _finish_files(self) -> None:
        """Close the active segment; remove the folder when fully stored, else checkpoint."""
        self._files_final = True
        self._release_active()
        if self.pending_records == 0 and self._checkpoint_target() >= self.last_lsn:
            self._remove_all()
        else:
            self._write_checkpoint()
            logger.warning(
                "journal %s closed with %d records not yet stored (%d to replay); the "
                "next router to start will replay them",
                self.path,
                self.pending_records,
                self.last_lsn - self._checkpointed,
            )

    def _remove_all(self) -> None:
        with self._io:
            segments, self._segments = self._segments, []
        for segment in segments:
            segment.path.unlink(missing_ok=True)
        (self.path / CHECKPOINT_NAME).unlink(missing_ok=True)
        leftovers = [p for p in self.path.iterdir() if p.name != LOCK_NAME]
        if leftovers:  # quarantined tails: keep the folder (and the evidence)
            _fsync_dir(self.path)
            return
        # Unlink the lock file while still holding it, so a prober sees a vanished folder.
        (self.path / LOCK_NAME).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()
        _fsync_dir(self.root)

    def _forget_after_fork(self) -> None:
        # The lock's descriptor is closed by _forget_locks_after_fork, like every held lock.
        if self._active_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._active_fd)
            self._active_fd = None
        self._state = _State.CLOSED
        # The committer thread was not forked along, and the locks it shared may have been
        # held at the fork: they would stay held in this process forever.
        self._committer = None
        self._io = threading.Lock()
        self._checkpointing = threading.Lock()
        if self._stop_on_collect is not None:
            self._stop_on_collect.detach()
            self._stop_on_collect = None

    # ------------------------------------------------------------------ append

    async def append(
        self,
        items: Sequence[IngestItem],
        *,
        on_durable: Callable[[int, Sequence[IngestItem]], None] | None = None,
    ) -> int:
        """Append ``items`` and return the LSN of the last one once it is durable.

        Concurrent callers share one write and one sync. If the caller is cancelled the
        append still completes.

        Args:
            items: Models to journal, in order.
            on_durable: Called as ``on_durable(first_lsn, items)`` right after the sync, in
                LSN order across callers and before any caller resumes; it must not raise.
                Appends of one group that follow each other with the same callback are
                reported in one call (``items`` then holds all of theirs, in order).

        Raises:
            ValidationError: An item is not a supported model.
            JournalError: The journal is not open (or :meth:`close` has begun), or the
                write or sync failed (nothing of this group was kept).
        """
        committer = self._committer
        if self._state is not _State.OPEN or committer is None or self._close_done is not None:
            closing = self._close_done is not None and self._state is _State.OPEN
            msg = f"{self!r} is {'closing' if closing else 'not open'}"
            raise JournalError(msg)
        payloads = [encode_item(item) for item in items]
        if not payloads:
            return self.last_lsn
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        committer.submit(_Pending(payloads, items, on_durable, future, loop))
        # No shield needed: a cancelled caller cancels only its own future; its payloads are
        # already queued, and the committer writes (and reports) them regardless.
        return await future

    def _commit(self, group: list[_Pending], synced: _Outcome | None) -> _Outcome:
        """Write and sync ``group``; hand back ``synced``, the previous one (committer thread).

        The previous group goes back once this one is written, right before its sync: the
        event loop, woken by the hand-back, resumes the previous group's appenders while the
        disk syncs this one. Handing back first would let the woken loop take the GIL while
        the thread frames and writes, and hold this group's sync until the loop goes idle.
        """
        try:
            try:
                written = self._write_group(group)
            finally:
                if synced is not None:
                    self._hand_back(*synced)
            first = self._sync_group(written)
        except Exception as exc:
            return group, None, self._append_error(exc)
        return group, first, None

    def _append_error(self, exc: Exception) -> JournalError:
        """What a failed group's appenders get: a :class:`JournalError` as it is, anything
        else (a bug) logged with its traceback and wrapped. Call it in the ``except``."""
        if isinstance(exc, JournalError):
            return exc
        logger.exception("journal %s: unexpected append failure", self.path)
        return JournalError(f"cannot append to {self.path}: {exc!r}")

    def _hand_back(
        self, group: list[_Pending], first: int | None, error: JournalError | None
    ) -> None:
        # One callback per group: the event loop wakes once, however many appenders it holds.
        loop = group[0].loop
        if any(entry.loop is not loop for entry in group):  # appenders on several loops
            self._hand_back_per_loop(group, first, error)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(self._settle, group, first, error)

    def _hand_back_per_loop(
        self, group: list[_Pending], first: int | None, error: JournalError | None
    ) -> None:
        start = 0
        lsn = first
        for stop in range(1, len(group) + 1):
            if stop < len(group) and group[stop].loop is group[start].loop:
                continue
            run = group[start:stop]
            with contextlib.suppress(RuntimeError):
                run[0].loop.call_soon_threadsafe(self._settle, run, lsn, error)
            if lsn is not None:
                lsn += sum(len(entry.payloads) for entry in run)
            start = stop

    def _settle(self, group: list[_Pending], first: int | None, error: JournalError | None) -> None:
        """Acknowledge (or fail) a group's appenders in LSN order (event loop)."""
        if first is None:
            assert error is not None
            for entry in group:
                if not entry.future.done():
                    entry.future.set_exception(error)
            return
        # Consecutive appends with the same callback are reported in one call (their LSNs
        # follow each other): one call per group of producers instead of one per producer.
        lsn = first
        callback: Callable[[int, Sequence[IngestItem]], None] | None = None
        run_first = 0
        run: list[IngestItem] = []
        for entry in group:
            count = len(entry.payloads)
            if not count:
                continue
            if entry.on_durable is not None and entry.on_durable == callback:
                run.extend(entry.items)
            else:
                if callback is not None:
                    self._report_durable(callback, run_first, run)
                callback, run_first, run = entry.on_durable, lsn, list(entry.items)
            lsn += count
        if callback is not None:
            self._report_durable(callback, run_first, run)
        # Setting a result only schedules its appender: every callback above has run before
        # any appender resumes.
        lsn = first
        for entry in group:
            count = len(entry.payloads)
            if not entry.future.done():
                entry.future.set_result(lsn + count - 1)
            lsn += count

    def _report_durable(
        self, callback: Callable[[int, Sequence[IngestItem]], None], first: int, items: list[Any]
    ) -> None:
        try:
            callback(first, items)
        except Exception:
            logger.exception("journal %s: on_durable callback failed", self.path)

    def _write_group(self, group: list[_Pending]) -> _Written | None:
        """Write one group's records (committer thread); ``None`` when it holds none."""
        # Headers and payloads joined once: no per-record concatenation.
        parts: list[bytes] = []
        header = _HEADER.pack
        length = _LENGTH.pack
        crc32 = zlib.crc32
        for entry in group:
            for payload in entry.payloads:
                size = len(payload)
                parts.append(header(size, crc32(payload, crc32(length(size)))))
                parts.append(payload)
        if not parts:
            return None  # only wait_idle markers
        buf = b"".join(parts)
        try:
            segment = self._active_segment()
        except OSError as exc:
            msg = f"cannot create a journal segment in {self.path}: {exc}"
            raise JournalError(msg) from exc
        assert self._active_fd is not None
        fd = self._active_fd
        try:
            end = segment.size + len(buf)
            if end > self._active_end:
                ahead = end + PREALLOCATE_BYTES
                _write_at(fd, bytes(ahead - self._active_end), self._active_end)
                self._active_end = ahead
            _write_at(fd, buf, segment.size)
        except OSError as exc:
            self._undo_write(fd, segment)
            msg = f"cannot write the journal {segment.path}: {exc}"
            raise JournalError(msg) from exc
        return _Written(segment, fd, len(parts) // 2, len(buf))

    def _sync_group(self, written: _Written | None) -> int:
        """Sync a written group (where the committer runs); return its first LSN."""
        if written is None:
            return self._next_lsn
        try:
            _sync(written.fd)
        except OSError as exc:
            raise self._sync_failed(written, exc) from exc
        return self._synced(written)

    def _sync_failed(self, written: _Written, exc: Exception) -> JournalError:
        """Cut a group whose sync failed off the segment; return the error to report."""
        self._undo_write(written.fd, written.segment)
        return JournalError(f"cannot write the journal {written.segment.path}: {exc}")

    def _synced(self, written: _Written) -> int:
        """Account for a synced group; return its first LSN."""
        segment = written.segment
        first = self._next_lsn
        with self._io:
            segment.records += written.records
            segment.size += written.size
            self._next_lsn = first + written.records
        self._appends += 1
        self._records_appended += written.records
        self._fsyncs += 1
        return first

    def _undo_write(self, fd: int, segment: _Segment) -> None:
        # Cut off whatever part of the failed group reached the file, so the next group
        # starts on a record boundary. If even that fails the segment is abandoned.
        try:
            os.ftruncate(fd, segment.size)
            self._active_end = segment.size  # the zeros ahead went with the rest
            _sync(fd)
        except OSError:
            logger.exception("journal %s: cannot truncate a failed write", segment.path)
            with contextlib.suppress(OSError):
                os.close(fd)
            self._active_fd = None

    def _active_segment(self) -> _Segment:
        with self._io:
            current = self._segments[-1] if self._segments else None
        if (
            current is not None
            and self._active_fd is not None
            and current.size < self.segment_bytes
            and current.first_lsn + current.records == self._next_lsn
            and not self._roll_next  # an attribute test per group, no system call
        ):
            return current
        self._release_active()
        self._roll_next = False  # after: releasing a deleted active segment sets it again
        if current is not None and current.records == 0:
            # Abandoned before its first record was durable (a write failed and could not
            # be cut off): nothing in it was acknowledged, and the new one takes its name.
            current.path.unlink(missing_ok=True)
            with self._io:
                self._segments.remove(current)
        path = self.path / f"{self._next_lsn:020d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, MAGIC)
            _sync(fd)
            _fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        segment = _Segment(first_lsn=self._next_lsn, path=path, records=0, size=len(MAGIC))
        with self._io:
            self._segments.append(segment)
        self._active_fd = fd
        self._active_end = len(MAGIC)
        return segment

    def _release_active(self) -> None:
        """Close the active segment, cutting off the zeros written ahead of its records."""
        fd, self._active_fd = self._active_fd, None
        if fd is None:
            return
        with self._io:
            current = self._segments[-1] if self._segments else None
        if current is not None:
            try:
                deleted = os.fstat(fd).st_nlink == 0
            except OSError:
                deleted = False
            if deleted:  # what it holds goes with the descriptor
                self._report_gone(current, self._stored_lsn + 1, "it was being written")
        try:
            if current is not None and self._active_end > current.size:
                # Not synced: zeros or not, a later scan reads the same records.
                os.ftruncate(fd, current.size)
        except OSError:
            logger.warning("journal %s: cannot trim the segment %s", self.path, current)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ read / checkpoint

    async def read(
        self, after_lsn: int, *, max_records: int = 5_000, max_bytes: int = 8 * 1024 * 1024
    ) -> JournalBatch:
        """Read durable records with an LSN above ``after_lsn``, oldest first.

        A segment whose file was deleted (not by the journal) is reported in
        :attr:`problems` and skipped: its records are lost, the later ones are returned.

        Raises:
            JournalError: A segment could not be read.
        """
        try:
            return await asyncio.to_thread(self._read_sync, after_lsn, max_records, max_bytes)
        except OSError as exc:
            msg = f"cannot read the journal {self.path}: {exc}"
            raise JournalError(msg) from exc

    def _read_sync(self, after_lsn: int, max_records: int, max_bytes: int) -> JournalBatch:
        want = after_lsn + 1
        with self._io:
            segments = [
                _Segment(s.first_lsn, s.path, s.records, s.size)
                for s in self._segments
                if s.records and s.last_lsn >= want
            ]
        records: list[tuple[int, bytes]] = []
        end_lsn = after_lsn
        size = 0
        for segment in segments:
            if len(records) >= max_records or size >= max_bytes:
                break
            cursor = self._read_cursor
            if cursor is not None and cursor[0] == segment.first_lsn and cursor[2] <= want:
                offset, lsn = cursor[1], cursor[2]
            else:
                offset, lsn = len(MAGIC), segment.first_lsn
            try:
                fh = open(segment.path, "rb")  # noqa: SIM115 - closed by the with below
            except FileNotFoundError:
                # Deleted by someone else: its records are lost, the next ones are not.
                note = "later records go to a new segment"
                if self._report_gone(segment, max(lsn, want), note):
                    end_lsn = max(end_lsn, segment.last_lsn)
                lsn, offset = segment.last_lsn + 1, segment.size
                self._read_cursor = (segment.first_lsn, offset, lsn)
                want = max(want, lsn)
                continue
            with fh:
                while (
                    lsn <= segment.last_lsn
                    and offset < segment.size
                    and len(records) < max_records
                    and size < max_bytes
                ):
                    payloads, problem = self._read_chunk(fh, offset, segment.size)
                    if not payloads:
                        self._skip_damaged(segment, offset, lsn, problem)
                        end_lsn = max(end_lsn, segment.last_lsn)
                        lsn, offset = segment.last_lsn + 1, segment.size
                        break
                    for payload in payloads:
                        offset += _HEADER.size + len(payload)
                        if lsn >= want:
                            records.append((lsn, payload))
                            size += len(payload)
                            end_lsn = lsn
                        lsn += 1
                        if len(records) >= max_records or size >= max_bytes:
                            break
            self._read_cursor = (segment.first_lsn, offset, lsn)
            want = max(want, lsn)
        return JournalBatch(records=records, end_lsn=end_lsn)

    @staticmethod
    def _read_chunk(fh: Any, offset: int, limit: int) -> tuple[list[bytes], str]:
        """Read whole records from ``offset`` (at most a chunk, at least one record)."""
        fh.seek(offset)
        chunk = fh.read(min(_READ_CHUNK, limit - offset))
        payloads, _, problem, short = _parse(chunk, 0, len(chunk))
        if not payloads and short and len(chunk) >= _LENGTH.size:
            # One record larger than a chunk: read exactly that record.
            (length,) = _LENGTH.unpack_from(chunk, 0)
            if offset + _HEADER.size + length <= limit:
                fh.seek(offset)
                chunk = fh.read(_HEADER.size + length)
                payloads, _, problem, short = _parse(chunk, 0, len(chunk))
        return payloads, problem or ("torn record" if short else "unreadable record")

    def _skip_damaged(self, segment: _Segment, offset: int, lsn: int, problem: str) -> None:
        # Bytes that passed the scan at open (or were written by us) no longer parse: the
        # disk changed under us. Keep a copy for a person, then move past the damage.
        aside = segment.path.with_name(f"{segment.path.name}.corrupt-{offset}")
        with open(segment.path, "rb") as src:
            src.seek(offset)
            data = src.read(segment.size - offset)
        aside.write_bytes(data)
        self._problem(
            f"{segment.path}: {problem} at byte {offset} while replaying; records "
            f"{lsn}..{segment.last_lsn} ({len(data)} bytes) copied to {aside.name} and skipped"
        )

    def _report_gone(self, segment: _Segment, first: int, note: str) -> bool:
        """Report that the file of ``segment`` was deleted with records ``first`` and up.

        Each record is reported once, however often the loss is found. ``note`` is added
        when ``segment`` is the active one. Returns False when the journal itself deleted
        the segment (its records were stored) and there is nothing to report.
        """
        first = max(first, segment.first_lsn)  # the records before it are in other segments
        with self._io:
            if not any(s.first_lsn == segment.first_lsn for s in self._segments):
                return False
            active = self._segments[-1].first_lsn == segment.first_lsn
            reported = self._gone.get(segment.first_lsn)
            if reported is not None:
                first = max(first, reported + 1)
            self._gone[segment.first_lsn] = max(reported or 0, segment.last_lsn)
        if active:
            self._roll_next = True
        last = segment.last_lsn
        if reported is not None and first > last:
            return True  # reported already
        lost = (
            f"records {first}..{last} are lost"
            if first <= last
            else "it held no record still to store"
        )
        extra = f" ({note})" if active else ""
        self._problem(f"{segment.path}: file deleted while the journal was open{extra}; {lost}")
        return True

    async def mark_stored(self, lsn: int, *, durable: bool = False) -> None:
        """Record that every record up to ``lsn`` is stored; delete segments wholly below.

        The checkpoint file is written every ``checkpoint_every`` records, when a segment is
        deleted and on close; ``durable=True`` writes it now (when it lags), so that a crash
        does not replay these records again. Replaying a tick twice is harmless; replaying
        an upsert twice is not once a newer version that is not in this journal has been
        stored since (a buffered write, or a ``sync`` one).

        Raises:
            JournalError: A segment could not be deleted, or the journal is not open (once
                closed, its folder may belong to the router that adopted it).
        """
        if self._state is not _State.OPEN:
            msg = f"{self!r} is not open; cannot mark records stored"
            raise JournalError(msg)
        lsn = min(lsn, self.last_lsn)
        if lsn <= self._stored_lsn:
            if durable and self._checkpointed_stored < self._stored_lsn:
                lsn = self._stored_lsn  # marked before without a checkpoint: write it now
            else:
                return
        self._stored_lsn = lsn
        target = self._checkpoint_target()
        with self._io:
            dead = [s for s in self._segments[:-1] if s.last_lsn <= target]
        if dead or durable or target - self._checkpointed >= self.checkpoint_every:
            try:
                await asyncio.to_thread(self._checkpoint_and_delete, dead)
            except OSError as exc:
                msg = f"cannot update the journal {self.path}: {exc}"
                raise JournalError(msg) from exc

    def _checkpoint_and_delete(self, dead: list[_Segment]) -> None:
        with self._checkpointing:
            if self._files_final:
                return  # a worker that close() overtook: the close wrote the newer state
            # Delete first: on a full disk the checkpoint (a new file) can be written only once
            # stored segments are gone. A crash in between loses nothing: the older checkpoint
            # replays a little more (idempotently), and the segments left are all newer.
            if dead:
                with self._io:
                    self._segments = [s for s in self._segments if s not in dead]
                    for segment in dead:
                        self._gone.pop(segment.first_lsn, None)
                for segment in dead:
                    segment.path.unlink(missing_ok=True)  # gone already if deleted under us
                _fsync_dir(self.path)
            self._write_checkpoint()
            self._check_active_file()

    def _check_active_file(self) -> None:
        """Report an active segment whose file was deleted, and have the next group start
        a new one (appends to it would be lost with it). A ``stat`` per checkpoint."""
        with self._io:
            active = self._segments[-1] if self._segments else None
            if active is None or not active.records:
                return  # an empty one may be replaced by the committer right now
            active = _Segment(active.first_lsn, active.path, active.records, active.size)
        try:
            os.stat(active.path)
        except FileNotFoundError:
            self._report_gone(active, self._stored_lsn + 1, "later records go to a new segment")
        except OSError as exc:  # a check only: the checkpoint itself is written
            logger.warning("journal %s: cannot check %s: %s", self.path, active.path, exc)

    def _write_checkpoint(self) -> None:
        # Synced before the rename, and the rename synced: a power loss leaves the old
        # checkpoint or the new one, never an empty file in its place (which would only
        # replay everything again, idempotently, but for nothing).
        replay_from = self._checkpoint_target()
        stored = self._stored_lsn
        text = f"{replay_from}\n" if stored == replay_from else f"{replay_from} {stored}\n"
        tmp = self.path / f"{CHECKPOINT_NAME}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path / CHECKPOINT_NAME)
        _fsync_dir(self.path)
        self._checkpointed = replay_from
        self._checkpointed_stored = stored

    def replay(self) -> Iterator[tuple[int, IngestItem]]:
        """Yield every record not yet marked stored, decoded, oldest first; below a held
        checkpoint's stored LSN (:attr:`upserts_stored_lsn`) only the ticks, as the write
        path replays them (a newer version of an upsert may have been stored since).

        Blocking file I/O, for tools and tests; the pipeline uses :meth:`read`. Damage found
        on :meth:`open` is listed in :attr:`problems`; reading stops cleanly at it.

        Raises:
            ValidationError: A record holds data the model refuses.
        """
        after = self._stored_lsn
        while True:
            batch = self._read_sync(after, 1_000, 8 * 1024 * 1024)
            for lsn, payload in batch.records:
                if self.replays(lsn, payload):
                    yield lsn, decode_item(payload)
            if batch.end_lsn <= after:
                return
            after = batch.end_lsn


# --------------------------------------------------------------------------- dead letters


class DeadLetterFile:
    """Items the database refused for good, appended as JSON lines and fsync'd.

    Each line is ``{"time_ms", "kind", "reason", "data"}`` where ``data`` is the model's
    JSON, or ``"raw"`` (latin-1 text) when the bytes could not be parsed. Nothing removes
    the file: a person decides what to do with its lines.
    """

    __slots__ = ("count", "path")

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.count = 0

    async def write(self, entries: Sequence[tuple[bytes, str]], *, time_ms: int) -> None:
        """Append ``(payload, reason)`` pairs.

        Raises:
            JournalError: The file could not be written.
        """
        lines = [self._line(payload, reason, time_ms) for payload, reason in entries]
        try:
            await asyncio.to_thread(self._append, b"".join(lines))
        except OSError as exc:
            msg = f"cannot write the dead-letter file {self.path}: {exc}"
            raise JournalError(msg) from exc
        self.count += len(entries)

    @staticmethod
    def _line(payload: bytes, reason: str, time_ms: int) -> bytes:
        record: dict[str, object] = {
            "time_ms": time_ms,
            "kind": kind_name(payload),
            "reason": reason,
        }
        try:
            record["data"] = orjson.loads(payload[1:])
        except orjson.JSONDecodeError:
            record["raw"] = payload.decode("latin-1")
        return orjson.dumps(record) + b"\n"

    def _append(self, data: bytes) -> None:
        _make_dirs(self.path.parent)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)
