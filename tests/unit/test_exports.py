"""The public surface: everything importable from `data_manager`, sorted, complete."""

from __future__ import annotations

import data_manager
from data_manager import errors

SEED_004_ERRORS = {
    "DatabaseConnectionError",
    "QueryTimeoutError",
    "QueryExecutionError",
    "CacheError",
    "ValidationError",
    "ConfigurationError",
    "ConnectionPoolExhaustedError",
    "RoutingError",
    "CircuitBreakerOpenError",
    "RetryExhaustedError",
}


def test_all_is_sorted_and_importable() -> None:
    assert data_manager.__all__ == sorted(data_manager.__all__, key=str.casefold)
    for name in data_manager.__all__:
        assert hasattr(data_manager, name), name


def test_seed_004_api_is_exported() -> None:
    wanted = {"DataRouter", "TickData", "CandleData", "OrderFlowMetrics", "DataManagerSettings"}
    assert wanted | SEED_004_ERRORS | {"DataManagerError"} <= set(data_manager.__all__)


def test_error_tree() -> None:
    for name in SEED_004_ERRORS:
        cls = getattr(data_manager, name)
        assert issubclass(cls, data_manager.DataManagerError)
        assert cls.__doc__
    exc = data_manager.QueryTimeoutError("slow", timeout_seconds=1.5)
    assert exc.timeout_seconds == 1.5
    for name in errors.__all__:
        if name.endswith("Error"):
            assert issubclass(getattr(errors, name), data_manager.DataManagerError)


def test_no_builtin_shadowing() -> None:
    assert "ConnectionError" not in dir(errors)
    assert "TimeoutError" not in errors.__all__
