"""Logging helpers: rate limiting with a manual clock, redaction, JSON lines."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Final

import pytest

from data_manager.clock import ManualClock
from data_manager.logutil import (
    REDACTED,
    RateLimitedLogger,
    RateLimiter,
    SecretFilter,
    StructuredFormatter,
    configure_logging,
    redact,
)
from data_manager.settings import PostgresSettings

SECRET: Final = "hunter2-never-shown"


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, ListHandler]]:
    logger = logging.getLogger("data_manager.test_logutil")
    handler = ListHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


@pytest.fixture
def sdk_logger() -> Iterator[logging.Logger]:
    """The ``data_manager`` logger, restored after configure_logging() changed it."""
    logger = logging.getLogger("data_manager")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        yield logger
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


# --------------------------------------------------------------------------- rate limiting


def test_rate_limiter_counts_what_it_suppresses() -> None:
    clock = ManualClock()
    limiter = RateLimiter(10.0, clock=clock)
    assert limiter.check("k") == 0  # first occurrence passes
    assert limiter.check("k") is None
    clock.advance(9.9)
    assert limiter.check("k") is None
    assert limiter.pending("k") == 2
    assert limiter.check("other") == 0  # keys are independent
    clock.advance(0.1)
    assert limiter.check("k") == 2  # interval over: passes, with the suppressed count
    assert limiter.pending("k") == 0
    assert limiter.check("k") is None  # a new interval started at the last report
    clock.advance(10.0)
    assert limiter.check("k") == 1


def test_rate_limiter_forgets_the_oldest_key_beyond_its_bound() -> None:
    clock = ManualClock()
    limiter = RateLimiter(60.0, clock=clock, max_keys=2)
    assert limiter.check("a") == 0
    assert limiter.check("b") == 0
    assert limiter.check("c") == 0  # "a" is forgotten
    assert limiter.check("a") == 0  # so it counts as new again
    assert limiter.check("c") is None
    with pytest.raises(ValueError, match="max_keys"):
        RateLimiter(1.0, max_keys=0)
    with pytest.raises(ValueError, match="interval"):
        RateLimiter(float("nan"))


def test_rate_limited_logger_logs_first_then_once_per_interval(
    captured: tuple[logging.Logger, ListHandler],
) -> None:
    logger, handler = captured
    clock = ManualClock()
    rl = RateLimitedLogger(logger, 30.0, clock=clock)
    assert rl.warning("l2", "L2 read failed: %s", "timeout") is True
    for _ in range(5):
        assert rl.warning("l2", "L2 read failed: %s", "timeout") is False
    assert rl.error("db", "batch of %d not stored", 7) is True  # another key
    clock.advance(30.0)
    assert rl.warning("l2", "L2 read failed: %s", "refused") is True

    messages = [r.getMessage() for r in handler.records]
    assert messages == [
        "L2 read failed: timeout",
        "batch of 7 not stored",
        "L2 read failed: refused [5 similar suppressed]",
    ]
    assert [r.levelno for r in handler.records] == [logging.WARNING, logging.ERROR, logging.WARNING]
    assert handler.records[2].suppressed == 5  # type: ignore[attr-defined]
    # The record points at the caller, not at the helper.
    assert {r.funcName for r in handler.records} == {
        "test_rate_limited_logger_logs_first_then_once_per_interval"
    }


def test_rate_limited_logger_keeps_literal_percent_and_exc_info(
    captured: tuple[logging.Logger, ListHandler],
) -> None:
    logger, handler = captured
    clock = ManualClock()
    rl = RateLimitedLogger(logger, 1.0, clock=clock)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rl.exception("k", "100% broken")
        rl.exception("k", "100% broken")
        clock.advance(1.0)
        rl.exception("k", "100% broken", extra={"batch": 3})
    first, second = handler.records
    assert first.getMessage() == "100% broken"
    assert second.getMessage() == "100% broken [1 similar suppressed]"
    assert second.exc_info is not None
    assert second.batch == 3  # type: ignore[attr-defined]


def test_disabled_level_never_touches_the_limiter(
    captured: tuple[logging.Logger, ListHandler],
) -> None:
    logger, handler = captured
    logger.setLevel(logging.ERROR)
    rl = RateLimitedLogger(logger, 60.0, clock=ManualClock())
    assert rl.warning("k", "ignored") is False
    assert rl.limiter.pending("k") == 0
    assert rl.error("k", "shown") is True  # not suppressed by the ignored warning
    assert [r.getMessage() for r in handler.records] == ["shown"]


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"cannot connect to postgresql://app:{SECRET}@db:5432/ticks",
            f"cannot connect to postgresql://app:{REDACTED}@db:5432/ticks",
        ),
        (f"redis://:{SECRET}@cache:6379/0", f"redis://:{REDACTED}@cache:6379/0"),
        (
            f"postgresql+asyncpg://app:{SECRET}@db/x and redis://u:{SECRET}@c/0",
            f"postgresql+asyncpg://app:{REDACTED}@db/x and redis://u:{REDACTED}@c/0",
        ),
        # An unencoded "/" or "@" in the password is still hidden (to the last "@").
        (f"rediss://u:pa/ss@w@{SECRET}@host:1/0", f"rediss://u:{REDACTED}@host:1/0"),
        (f"host=db password={SECRET} user=app", f"host=db password={REDACTED} user=app"),
        (f"PGPASSWORD={SECRET}", f"PGPASSWORD={REDACTED}"),
        (f"{{'password': '{SECRET}'}}", f"{{'password': {REDACTED}}}"),
        (f'{{"api_key": "{SECRET}", "n": 1}}', f'{{"api_key": {REDACTED}, "n": 1}}'),
        (f"Password: {SECRET}", f"Password: {REDACTED}"),
        (f"?u=a&password={SECRET}&ssl=1", f"?u=a&password={REDACTED}&ssl=1"),
        # Left alone: no password in them.
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("postgresql://app@db:5432/ticks", "postgresql://app@db:5432/ticks"),
        ("password_file=/run/secrets/pg", "password_file=/run/secrets/pg"),
        ("saved 5 ticks in 2.1 ms", "saved 5 ticks in 2.1 ms"),
    ],
)  # fmt: skip
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_secret_filter_redacts_message_args_extra_and_traceback(
    captured: tuple[logging.Logger, ListHandler],
) -> None:
    logger, handler = captured
    handler.addFilter(SecretFilter())
    url = f"postgresql://app:{SECRET}@db:5432/ticks"
    try:
        raise ConnectionError(f"could not connect to {url}")
    except ConnectionError:
        logger.exception("connect failed: %s", url, extra={"dsn": url, "attempt": 2})
    record = handler.records[0]
    line = logging.Formatter("%(message)s %(dsn)s %(attempt)s").format(record)
    assert SECRET not in line
    assert "postgresql://app:***@db:5432/ticks" in line
    assert "could not connect to postgresql://app:***@db" in line  # the traceback text
    assert record.attempt == 2  # type: ignore[attr-defined]


def test_secret_filter_survives_a_broken_format_string() -> None:
    logger = logging.getLogger("data_manager.test_logutil")
    record = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 1, "bad %d", (f"password={SECRET}",), None
    )
    assert SecretFilter().filter(record) is True
    assert SECRET not in repr(record.args)


def test_settings_repr_and_target_never_hold_the_password() -> None:
    settings = PostgresSettings(url=f"postgresql://app:{SECRET}@db:5432/ticks")
    assert SECRET not in repr(settings)
    assert SECRET not in settings.target


# --------------------------------------------------------------------------- JSON lines


def test_structured_formatter_writes_parseable_json_lines() -> None:
    formatter = StructuredFormatter(static_fields={"service": "collector", "level": "shadowed"})
    record = logging.makeLogRecord(
        {
            "name": "data_manager.router",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "L2 %s failed after %d ms",
            "args": ("read", 12),
            "created": 1_727_996_400.123,
            "msecs": 123.0,
            "symbols": 3,
            "path": object(),
        }
    )
    line = formatter.format(record)
    assert "\n" not in line
    payload = json.loads(line)
    assert payload["ts"] == "2024-10-03T23:00:00.123Z"
    assert payload["level"] == "WARNING"
    assert payload["logger"] == "data_manager.router"
    assert payload["message"] == "L2 read failed after 12 ms"
    assert payload["symbols"] == 3
    assert payload["service"] == "collector"
    assert payload["extra_level"] == "shadowed"  # never replaces a core key
    assert payload["path"].startswith("<object object")  # str() of what JSON cannot hold
    assert "exc_info" not in payload


def test_structured_formatter_includes_the_traceback() -> None:
    formatter = StructuredFormatter()
    try:
        raise ValueError("bad value")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), exc_info=sys.exc_info()
        )
    payload = json.loads(formatter.format(record))
    assert "ValueError: bad value" in payload["exc_info"]


# --------------------------------------------------------------------------- configure_logging


def test_configure_logging_json_redacted_and_replaceable(sdk_logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = configure_logging(json=True, level="DEBUG", stream=stream)
    assert any(isinstance(f, SecretFilter) for f in handler.filters)
    # A child logger's records pass through the handler's filter (a filter on the
    # data_manager logger itself would not see them).
    logging.getLogger("data_manager.router").warning(
        "cannot reach %s", f"redis://:{SECRET}@cache:6379/0", extra={"tier": "l2"}
    )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    payload = json.loads(lines[0])
    assert payload["message"] == f"cannot reach redis://:{REDACTED}@cache:6379/0"
    assert payload["tier"] == "l2"
    assert payload["logger"] == "data_manager.router"
    assert sdk_logger.propagate is False

    # A second call replaces the handler instead of stacking another.
    text = io.StringIO()
    configure_logging(level=logging.INFO, stream=text)
    assert sum(h is handler for h in sdk_logger.handlers) == 0
    logging.getLogger("data_manager.ingest").info("password=%s", SECRET)
    logging.getLogger("data_manager.ingest").debug("not shown at INFO")
    assert stream.getvalue().count("\n") == 1  # the old handler got nothing more
    out = text.getvalue()
    assert SECRET not in out
    assert f"INFO data_manager.ingest: password={REDACTED}" in out
    assert "not shown" not in out
