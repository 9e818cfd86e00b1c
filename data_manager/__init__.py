"""data_manager: one async entry point to market data.

``from data_manager import DataRouter, TickData, CandleData`` — see the README for the quick
start. This module only re-exports; it builds no objects.
"""

from data_manager.errors import (
    BackpressureTimeoutError,
    BackupStreamError,
    CacheError,
    CacheUnavailableError,
    CircuitBreakerOpenError,
    ConfigurationError,
    ConnectionPoolExhaustedError,
    DatabaseConnectionError,
    DatabaseUnavailableError,
    DataManagerError,
    JournalError,
    JournalLockedError,
    QueryExecutionError,
    QueryTimeoutError,
    RetryExhaustedError,
    RouterClosedError,
    RoutingError,
    ValidationError,
)
from data_manager.health import HealthCheckResponse
from data_manager.models import (
    TIMEFRAMES,
    CandleData,
    OrderFlowMetrics,
    TickData,
    normalize_symbol,
)
from data_manager.router import USE_DEFAULT, DataRouter, StalenessReport
from data_manager.settings import DataManagerSettings, DragonflySettings, PostgresSettings

__version__ = "0.1.0"

# Sorted case-insensitively (a test checks it).
__all__ = [
    "BackpressureTimeoutError",
    "BackupStreamError",
    "CacheError",
    "CacheUnavailableError",
    "CandleData",
    "CircuitBreakerOpenError",
    "ConfigurationError",
    "ConnectionPoolExhaustedError",
    "DatabaseConnectionError",
    "DatabaseUnavailableError",
    "DataManagerError",
    "DataManagerSettings",
    "DataRouter",
    "DragonflySettings",
    "HealthCheckResponse",
    "JournalError",
    "JournalLockedError",
    "normalize_symbol",
    "OrderFlowMetrics",
    "PostgresSettings",
    "QueryExecutionError",
    "QueryTimeoutError",
    "RetryExhaustedError",
    "RouterClosedError",
    "RoutingError",
    "StalenessReport",
    "TickData",
    "TIMEFRAMES",
    "USE_DEFAULT",
    "ValidationError",
]
