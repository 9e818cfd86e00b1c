"""Logging helpers: rate limiting for hot paths, JSON lines, and secret redaction.

The SDK logs through the standard :mod:`logging` module under the ``data_manager`` logger
tree and installs no handler of its own. Applications that want the SDK's opinion call
:func:`configure_logging` once at start-up::

    from data_manager.logutil import configure_logging

    configure_logging(json=True)  # one JSON object per line on stderr, secrets redacted

Three pieces, usable on their own:

* :class:`RateLimitedLogger` (built on :class:`RateLimiter`): a warning that can fire on
  every call of a hot path (a cache that is down, a database refusing batches) is logged
  the first time, then at most once per interval per key, with the number of occurrences
  it suppressed in between. The clock is injectable, so tests move time by hand.
* :class:`StructuredFormatter`: JSON lines with ``ts``, ``level``, ``logger``,
  ``message``, then every field passed with ``extra=``, and ``exc_info`` when there is a
  traceback.
* :class:`SecretFilter`: redacts what looks like a password — the password of a URL
  (``scheme://user:PASSWORD@host``) and ``password=...``-style pairs — in the message, the
  ``extra`` fields and the traceback text. The SDK never logs secrets on purpose (passwords
  are ``SecretStr`` and targets print without them); this filter is the second line of
  defence, against a driver error message that quotes a connection string.

A filter attached to a *logger* only sees records logged on that very logger, not those of
its children (``data_manager.router`` and so on), so :func:`configure_logging` attaches
:class:`SecretFilter` to the handler it installs. Applications with their own handlers do
the same: ``handler.addFilter(SecretFilter())``.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from typing import IO, TYPE_CHECKING, Any, Final

import orjson

from data_manager.clock import Clock, SystemClock

if TYPE_CHECKING:
    from collections.abc import Hashable, Mapping

__all__ = [
    "REDACTED",
    "RateLimitedLogger",
    "RateLimiter",
    "SecretFilter",
    "StructuredFormatter",
    "configure_logging",
    "redact",
]

#: What replaces a secret in redacted text.
REDACTED: Final = "***"

#: Plain-text layout used by :func:`configure_logging` when ``json`` is False.
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# ----------------------------------------------------------------------------- rate limiting


class _KeyState:
    __slots__ = ("logged_at", "suppressed")

    def __init__(self, logged_at: float) -> None:
        self.logged_at = logged_at
        self.suppressed = 0


class RateLimiter:
    """Decides, per key, whether an event may be reported now.

    The first event of a key passes; later ones pass when ``interval`` seconds have gone
    by since the last one that passed, and the ones in between are counted. A burst's tail
    is therefore reported with the next event after the interval (there is no timer: an
    event that never comes again is never reported).

    Args:
        interval: Seconds between two reports of the same key.
        clock: Time source (its ``monotonic()``); tests pass
            :class:`~data_manager.clock.ManualClock`.
        max_keys: Keys remembered; the least recently reported is forgotten beyond it (with
            its pending count), so a key built from unbounded data cannot grow memory.

    Thread-safe: a lock guards the table (uncontended, it costs well under a microsecond,
    and it is only taken on the paths that log).
    """

    __slots__ = ("_clock", "_interval", "_keys", "_lock", "_max_keys")

    def __init__(
        self, interval: float = 60.0, *, clock: Clock | None = None, max_keys: int = 1024
    ) -> None:
        if not interval >= 0:
            msg = f"interval must be >= 0 seconds, got {interval}"
            raise ValueError(msg)
        if max_keys < 1:
            msg = f"max_keys must be >= 1, got {max_keys}"
            raise ValueError(msg)
        self._interval = interval
        self._clock: Clock = clock or SystemClock()
        self._max_keys = max_keys
        self._keys: OrderedDict[Hashable, _KeyState] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def interval(self) -> float:
        """Seconds between two reports of the same key."""
        return self._interval

    def check(self, key: Hashable) -> int | None:
        """Record one event of ``key``.

        Returns:
            ``None`` when the event must be suppressed; otherwise how many events of this
            key were suppressed since it was last reported (0 the first time).
        """
        now = self._clock.monotonic()
        with self._lock:
            state = self._keys.get(key)
            if state is None:
                self._keys[key] = _KeyState(now)
                if len(self._keys) > self._max_keys:
                    self._keys.popitem(last=False)
                return 0
            if now - state.logged_at < self._interval:
                state.suppressed += 1
                return None
            suppressed = state.suppressed
            state.logged_at = now
            state.suppressed = 0
            self._keys.move_to_end(key)
            return suppressed

    def pending(self, key: Hashable) -> int:
        """Events of ``key`` suppressed and not yet reported."""
        with self._lock:
            state = self._keys.get(key)
            return 0 if state is None else state.suppressed


class RateLimitedLogger:
    """A :class:`logging.Logger` front that logs each key at most once per interval.

    ``rl.warning("l2-read", "L2 read failed: %s", exc)`` logs the first time, then stays
    silent for ``interval`` seconds for the key ``"l2-read"``; the next record that gets
    through says how many were suppressed (``" [N similar suppressed]"`` appended to the
    message, and ``suppressed=N`` as an ``extra`` field for structured output).

    A disabled level costs one ``isEnabledFor`` check and never touches the limiter.
    Keys should be a few fixed strings (or tuples of a few values), never per-symbol data.

    Args:
        logger: Where records go.
        interval: Seconds between two records of the same key.
        clock: Time source for the interval (injectable for tests).
        max_keys: See :class:`RateLimiter`.
    """

    __slots__ = ("limiter", "logger")

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        *,
        clock: Clock | None = None,
        max_keys: int = 1024,
    ) -> None:
        self.logger = logger
        self.limiter = RateLimiter(interval, clock=clock, max_keys=max_keys)

    def debug(self, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        """Log at DEBUG unless ``key`` was logged less than an interval ago."""
        return self._log(logging.DEBUG, key, msg, args, **kwargs)

    def info(self, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        """Log at INFO unless ``key`` was logged less than an interval ago."""
        return self._log(logging.INFO, key, msg, args, **kwargs)

    def warning(self, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        """Log at WARNING unless ``key`` was logged less than an interval ago."""
        return self._log(logging.WARNING, key, msg, args, **kwargs)

    def error(self, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        """Log at ERROR unless ``key`` was logged less than an interval ago."""
        return self._log(logging.ERROR, key, msg, args, **kwargs)

    def exception(self, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        """Log at ERROR with the current exception's traceback (rate-limited)."""
        kwargs.setdefault("exc_info", True)
        return self._log(logging.ERROR, key, msg, args, **kwargs)

    def log(self, level: int, key: Hashable, msg: str, *args: object, **kwargs: Any) -> bool:
        """Log at ``level`` unless ``key`` was logged less than an interval ago.

        Keyword arguments are those of :meth:`logging.Logger.log` (``exc_info``,
        ``extra``, ``stack_info``, ``stacklevel``).

        Returns:
            True when a record was emitted.
        """
        return self._log(level, key, msg, args, **kwargs)

    def _log(
        self,
        level: int,
        key: Hashable,
        msg: str,
        args: tuple[object, ...],
        *,
        exc_info: Any = None,
        extra: Mapping[str, object] | None = None,
        stack_info: bool = False,
        stacklevel: int = 1,
    ) -> bool:
        logger = self.logger
        if not logger.isEnabledFor(level):
            return False
        suppressed = self.limiter.check(key)
        if suppressed is None:
            return False
        if suppressed:
            if not args:
                msg = msg.replace("%", "%%")  # it is about to become a format string
            msg = f"{msg} [%d similar suppressed]"
            args = (*args, suppressed)
            extra = {**(extra or {}), "suppressed": suppressed}
        # +2: this method and the public one, so %(funcName)s names the caller.
        logger.log(
            level,
            msg,
            *args,
            exc_info=exc_info,
            extra=extra,
            stack_info=stack_info,
            stacklevel=stacklevel + 2,
        )
        return True


# ----------------------------------------------------------------------------- redaction

# scheme://user:PASSWORD@host. The password is matched greedily up to the last "@" before
# whitespace or a quote: a password with a raw "/" or "@" (invalid, but it happens in the
# very error messages worth logging) is then still hidden. Over-redacting a rare URL with
# "@" in its query string is the accepted cost.
_URL_PASSWORD: Final = re.compile(r"""(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#'"]*):[^\s'"]*@""")
# Cheap pre-check (substring search, ~20x faster than any regex here): the pair pattern
# below backtracks over every word, so it only runs on a message that names a secret.
_SECRET_WORDS: Final = ("passw", "pwd", "secret", "token", "apikey", "api_key", "api-key")
# password=..., PGPASSWORD=..., "api_key": "...", secret: ..., token=...
_SECRET_PAIR: Final = re.compile(
    r"""(?P<key>[\w.\-]*(?:passw(?:or)?d|pwd|secret|token|api[_\-]?key)[\w.\-]*)"""
    r"""(?P<sep>['"]?\s*[=:]\s*)"""
    r"""(?P<value>'[^']*'|"[^"]*"|[^\s,;&'")\]}]+)""",
    re.IGNORECASE,
)


def _redact_pair(match: re.Match[str]) -> str:
    if match["key"].lower().endswith("_file"):
        return match[0]  # password_file=/run/secrets/x names a file, not a secret
    return f"{match['key']}{match['sep']}{REDACTED}"


def redact(text: str) -> str:
    """Return ``text`` with URL passwords and ``password=``-style values replaced by ``***``.

    >>> redact("postgresql://app:s3cr3t@db:5432/ticks")
    'postgresql://app:***@db:5432/ticks'
    >>> redact("host=db password=s3cr3t user=app")
    'host=db password=*** user=app'
    """
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    lowered = text.lower()
    if not any(word in lowered for word in _SECRET_WORDS):
        return text
    return _SECRET_PAIR.sub(_redact_pair, text)


# LogRecord attributes that are not ``extra`` fields ("message" and "asctime" are set by
# formatters; "taskName" exists from Python 3.12).
_RECORD_FIELDS: Final = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class SecretFilter(logging.Filter):
    """Redact passwords from records: message, string ``extra`` fields, traceback text.

    Attach it to handlers (see the module docstring for why not to loggers). It never
    drops a record. The message is rendered (``msg % args``) to be checked; when it
    changes, the record carries the redacted text with no args, so every later handler and
    formatter sees the redacted version. A traceback is rendered once here for the same
    reason (formatters reuse ``record.exc_text``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always returns True."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):
            # A broken format string: logging will report it, possibly printing msg and
            # args; make sure those are clean.
            record.msg = redact(str(record.msg))
            if isinstance(record.args, tuple):
                record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        else:
            clean = redact(message)
            if clean != message:
                record.msg = clean
                record.args = None
        fields = record.__dict__
        for name in fields.keys() - _RECORD_FIELDS:  # the extra fields, if any
            value = fields[name]
            if isinstance(value, str):
                clean = redact(value)
                if clean != value:
                    fields[name] = clean
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


# ----------------------------------------------------------------------------- JSON lines

_CORE_KEYS: Final = frozenset({"ts", "level", "logger", "message", "exc_info", "stack_info"})


def _json_default(value: object) -> str:
    return str(value)


class StructuredFormatter(logging.Formatter):
    """Format records as one JSON object per line.

    Keys: ``ts`` (UTC, RFC 3339 with milliseconds), ``level``, ``logger``, ``message``,
    then every ``extra`` field (one that would shadow a core key is written as
    ``extra_<name>``), then ``exc_info`` and ``stack_info`` when present. Values JSON
    cannot represent are written with ``str()``.

    Args:
        static_fields: Fields added to every line (for example ``{"service": "collector"}``).
    """

    def __init__(self, *, static_fields: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self._static = dict(static_fields or {})

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line (no trailing newline)."""
        created = record.created
        payload: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in self._static.items():
            payload[f"extra_{name}" if name in _CORE_KEYS else name] = value
        for name, value in record.__dict__.items():
            if name not in _RECORD_FIELDS:
                payload[f"extra_{name}" if name in _CORE_KEYS else name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc_info"] = record.exc_text
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(payload, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()


# ----------------------------------------------------------------------------- set-up


class _SDKHandler(logging.StreamHandler[IO[str]]):
    """The handler :func:`configure_logging` installs (so a second call replaces it)."""


def configure_logging(
    *,
    json: bool = False,
    level: int | str = logging.INFO,
    stream: IO[str] | None = None,
    propagate: bool = False,
    static_fields: Mapping[str, object] | None = None,
) -> logging.Handler:
    """Send the SDK's logs (the ``data_manager`` logger tree) to a stream, secrets redacted.

    Calling it again replaces the handler installed by the previous call. Nothing else in
    the logging configuration is touched, except ``propagate`` of the ``data_manager``
    logger.

    Args:
        json: One JSON object per line (:class:`StructuredFormatter`) instead of text.
        level: Level of the ``data_manager`` logger.
        stream: Where to write; default ``sys.stderr``.
        propagate: Also pass records on to the root logger's handlers (they then receive
            the redacted record). Off by default so that a root handler does not print
            every line twice.
        static_fields: With ``json``, fields added to every line.

    Returns:
        The installed handler (with :class:`SecretFilter` attached).
    """
    logger = logging.getLogger("data_manager")
    for old in [h for h in logger.handlers if isinstance(h, _SDKHandler)]:
        logger.removeHandler(old)
    handler = _SDKHandler(stream if stream is not None else sys.stderr)
    formatter: logging.Formatter = (
        StructuredFormatter(static_fields=static_fields) if json else logging.Formatter(TEXT_FORMAT)
    )
    handler.setFormatter(formatter)
    handler.addFilter(SecretFilter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
    return handler
