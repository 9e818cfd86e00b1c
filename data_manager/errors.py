"""The SDK's exception tree; every error the SDK raises is a :class:`DataManagerError`.

The names are seed 004's public API. The tree is shallow and answers "should I retry?"::

    DataManagerError
    ├── DatabaseConnectionError       transient: database unreachable / refused
    ├── QueryTimeoutError             transient: statement or call timed out (.timeout_seconds)
    ├── QueryExecutionError           permanent: bad SQL, constraint, data the DB refused
    ├── CacheError                    a cache-side failure
    │   └── CacheUnavailableError     transient: L2 unreachable, slow or its breaker is open
    ├── ValidationError               permanent: bad input; nothing was written
    ├── ConfigurationError            permanent: settings, strategy or config files are wrong
    ├── ConnectionPoolExhaustedError  transient: no pooled connection within the pool timeout
    ├── RoutingError                  permanent: a strategy names an unknown backend/route
    ├── CircuitBreakerOpenError       transient: calls are short-circuited until a probe passes
    ├── RetryExhaustedError           transient errors kept failing past the retry budget
    ├── BackpressureTimeoutError      the write queue stayed full past the configured wait
    ├── BackupStreamError             the backup stream cannot be reached, written or read
    ├── JournalError                  the local journal cannot be written, read or opened
    │   └── JournalLockedError        another live process holds that journal's lock
    └── RouterClosedError             the router was closed (or never initialised)

Driver exceptions are translated at the backend boundary by the ``map_*_errors`` context
managers below and always chained (``raise ... from exc``), so the cause stays visible.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Final

import sqlalchemy.exc as sa_exc

__all__ = [
    "BackpressureTimeoutError",
    "BackupStreamError",
    "CacheError",
    "CacheUnavailableError",
    "CircuitBreakerOpenError",
    "ConfigurationError",
    "ConnectionPoolExhaustedError",
    "DataManagerError",
    "DatabaseConnectionError",
    "DatabaseUnavailableError",
    "JournalError",
    "JournalLockedError",
    "QueryExecutionError",
    "QueryTimeoutError",
    "RetryExhaustedError",
    "RouterClosedError",
    "RoutingError",
    "ValidationError",
    "map_database_errors",
]


class DataManagerError(Exception):
    """Root of every error the SDK raises."""


class DatabaseConnectionError(DataManagerError):
    """The database is unreachable or refused the connection."""


class DatabaseUnavailableError(DatabaseConnectionError):
    """The database answers but cannot carry out the statement now: its disk is full, it is
    read-only (a standby, a failover under way), the statement lost a deadlock or a lock
    wait, or the server hit an I/O error. Transient like an unreachable database: the data
    is not at fault, so the write path retries, then journals it, instead of dead-lettering
    it."""


class QueryTimeoutError(DataManagerError):
    """A statement or a call exceeded its time budget."""

    def __init__(self, message: str, *, timeout_seconds: float | None = None) -> None:
        super().__init__(message)
        self.timeout_seconds = timeout_seconds


class QueryExecutionError(DataManagerError):
    """The database rejected a statement (bad SQL, constraint, invalid data)."""


class CacheError(DataManagerError):
    """A cache operation failed."""


class CacheUnavailableError(CacheError):
    """The L2 cache is unreachable, too slow, or its circuit breaker is open."""


class ValidationError(DataManagerError, ValueError):
    """Input failed validation; nothing was written."""


class ConfigurationError(DataManagerError):
    """Settings, static configuration or the routing strategy are invalid."""


class ConnectionPoolExhaustedError(DataManagerError):
    """No pooled connection became free within the pool timeout."""


class RoutingError(DataManagerError):
    """A routing strategy names a backend or operation that does not exist."""


class CircuitBreakerOpenError(DataManagerError):
    """The circuit breaker is open; the call was not attempted."""


class RetryExhaustedError(DataManagerError):
    """A transient failure persisted through every retry attempt."""


class BackpressureTimeoutError(DataManagerError):
    """The write queue stayed full for longer than the configured wait."""


class BackupStreamError(DataManagerError):
    """The backup stream could not be reached, written or read."""


class JournalError(DataManagerError):
    """The local journal could not be written, read or opened."""


class JournalLockedError(JournalError):
    """Another live process holds this journal's lock."""


class RouterClosedError(DataManagerError):
    """The router is closed or was never initialised."""


#: Errors worth retrying: the same call may succeed a moment later.
TRANSIENT_ERRORS: Final[tuple[type[DataManagerError], ...]] = (
    DatabaseConnectionError,
    QueryTimeoutError,
    ConnectionPoolExhaustedError,
)

# asyncpg / PostgreSQL SQLSTATE classes that mean "the connection is gone or was refused".
_CONNECTION_SQLSTATES: Final = ("08", "57P01", "57P02", "57P03", "53300")
# ... and those that mean "the server cannot do it now": disk full, serialization failure,
# deadlock, completion unknown, lock not available, read-only transaction (a standby or a
# failover), system and I/O errors. Exact codes, not classes: 53400 (a configured limit such
# as temp_file_limit), 53200 (out of shared memory: max_locks_per_transaction, which a batch
# spanning many chunks can exceed every time) and 58P01/58P02 (a missing or duplicate file)
# fail the same statement again, and retried they would hold every later write back; as
# QueryExecutionError the batch is split, and only what fails alone is dead-lettered.
_UNAVAILABLE_SQLSTATES: Final = frozenset(
    {"53100", "40001", "40P01", "40003", "55P03", "25006", "58000", "58030"}
)
_TIMEOUT_SQLSTATES: Final = ("57014",)  # query_canceled (statement_timeout)


def _sqlstate(exc: BaseException) -> str | None:
    """Return the SQLSTATE carried by a driver exception, if any."""
    for candidate in (exc, getattr(exc, "orig", None), getattr(exc, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


def _describe(exc: BaseException) -> str:
    """Return a one-line description of a driver error without statement parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def map_database_errors(*, target: str, timeout_seconds: float | None = None) -> Iterator[None]:
    """Translate driver exceptions raised inside the block into the SDK's tree.

    Args:
        target: Where the statement went, e.g. ``"postgresql 127.0.0.1:5432"``; never
            contains a password.
        timeout_seconds: The time budget in force, reported by :class:`QueryTimeoutError`.

    Raises:
        DataManagerError: One of its subclasses, chained to the driver exception.
    """
    try:
        yield
    except DataManagerError:
        raise
    except sa_exc.TimeoutError as exc:  # SQLAlchemy's QueuePool checkout timeout
        msg = f"no free connection to {target} within the pool timeout"
        raise ConnectionPoolExhaustedError(msg) from exc
    except TimeoutError as exc:
        msg = f"call to {target} timed out after {timeout_seconds}s"
        raise QueryTimeoutError(msg, timeout_seconds=timeout_seconds) from exc
    except (ConnectionError, socket.gaierror, OSError) as exc:
        msg = f"cannot reach {target}: {exc.__class__.__name__}: {exc}"
        raise DatabaseConnectionError(msg) from exc
    except Exception as exc:
        _raise_translated(exc, target=target, timeout_seconds=timeout_seconds)
        raise  # pragma: no cover - _raise_translated always raises


def _raise_translated(exc: Exception, *, target: str, timeout_seconds: float | None) -> None:
    state = _sqlstate(exc)
    detail = _describe(exc)
    sqlite_code = _sqlite_code(exc)
    if sqlite_code in _SQLITE_BUSY_CODES:
        msg = f"{target} stayed locked by another writer past the busy timeout: {detail}"
        raise QueryTimeoutError(msg, timeout_seconds=timeout_seconds) from exc
    if sqlite_code in _SQLITE_UNREACHABLE_CODES:
        msg = f"cannot open {target}: {detail}"
        raise DatabaseConnectionError(msg) from exc
    if sqlite_code in _SQLITE_UNAVAILABLE_CODES:
        msg = f"{target} cannot take the statement now: {detail}"
        raise DatabaseUnavailableError(msg) from exc
    if state is not None and state.startswith(_TIMEOUT_SQLSTATES):
        msg = f"statement on {target} cancelled by statement_timeout: {detail}"
        raise QueryTimeoutError(msg, timeout_seconds=timeout_seconds) from exc
    if state is not None and state.startswith(_CONNECTION_SQLSTATES):
        msg = f"connection to {target} failed: {detail}"
        raise DatabaseConnectionError(msg) from exc
    if state in _UNAVAILABLE_SQLSTATES:
        msg = f"{target} cannot take the statement now ({state}): {detail}"
        raise DatabaseUnavailableError(msg) from exc
    orig = getattr(exc, "orig", None)
    if isinstance(exc, sa_exc.DBAPIError) and (
        exc.connection_invalidated or isinstance(orig, ConnectionError | OSError)
    ):
        msg = f"connection to {target} was lost: {detail}"
        raise DatabaseConnectionError(msg) from exc
    if _is_connection_class(exc) or _is_connection_class(orig):
        msg = f"connection to {target} failed: {detail}"
        raise DatabaseConnectionError(msg) from exc
    msg = f"statement on {target} failed: {detail}"
    raise QueryExecutionError(msg) from exc


# SQLite primary result codes (the low byte of an extended code).
_SQLITE_BUSY_CODES: Final = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
_SQLITE_UNREACHABLE_CODES: Final = frozenset({10, 14})  # SQLITE_IOERR, SQLITE_CANTOPEN
_SQLITE_UNAVAILABLE_CODES: Final = frozenset({7, 13})  # SQLITE_NOMEM, SQLITE_FULL


def _sqlite_code(exc: BaseException) -> int | None:
    """Return the primary SQLite result code carried by a ``sqlite3`` error, if any."""
    for candidate in (exc, getattr(exc, "orig", None)):
        code = getattr(candidate, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF
    return None


def _is_connection_class(exc: object) -> bool:
    """Recognise asyncpg/aiosqlite connection-level errors by class, without importing them."""
    if exc is None:
        return False
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "InterfaceError" in names and str(exc).endswith("connection is closed"):
        return True  # asyncpg's answer when a call is made on a connection already closed
    return (
        bool(
            names
            & {
                "ConnectionDoesNotExistError",
                "PostgresConnectionError",
                "ConnectionFailureError",
                "CannotConnectNowError",
            }
        )
        and "InterfaceWarning" not in names
    )
