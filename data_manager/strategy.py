"""The routing strategy: an immutable value, read as data from a file and hot-swapped.

The file (``config/hot_reload/data_manager_strategy.py`` by default; the router passes
``settings.resolved_strategy_file``, which ``DATA_MANAGER_STRATEGY_FILE`` overrides) holds
exactly one statement, seed 004's assignment::

    DATA_MANAGER_STRATEGY = {
        "routing": {"save_tick": ["timescale", "dragonfly_cache"], ...},
        "cache": {"tick_ttl_seconds": 3600, ...},
        "batch": {...}, "staleness": {...}, "sources": {...}, "aggregation": {...},
    }

It is parsed with :func:`ast.parse` and its value read with :func:`ast.literal_eval`; the
file is **never imported or executed**, so an edit cannot run code inside the router. The
only other thing allowed is a leading module docstring (and comments). Every section and
key is optional; whatever is left out takes the default of :class:`RoutingStrategy`.

Validation is strict: unknown keys (at any level), wrong types (``"3600"`` for a number,
``1`` for a bool), negative or zero durations, non-finite numbers and duplicate dict keys
are :class:`~data_manager.errors.ConfigurationError`; an unknown backend or operation, or a
route the SDK cannot honour, is :class:`~data_manager.errors.RoutingError`. Both are raised
when the strategy *loads*, never at the first request.

Routes name backends by seed 004's names: ``"timescale"`` is the configured database
(PostgreSQL/TimescaleDB, or the embedded SQLite) and ``"dragonfly_cache"`` the L2 cache. The
in-process L1 cache is always consulted first and is not named. Rules:

* every route names ``"timescale"``: writes must be durable, and reads must be able to answer
  from the source of truth (a cache-only read would report "no data" for data that exists);
* a read route ends with ``"timescale"``: caches are tried in order first, the database is
  the last resort;
* a write route is a set of destinations; order carries no meaning, because the cache is
  updated on its own fast path independently of database batching;
* ``get_ticks`` and ``get_candles`` (range reads) are served by the database only: the L2
  cache holds the latest tick and a short candle ring, not history.

:class:`StrategyWatcher` owns the live value. Readers take no lock: ``watcher.current`` is a
plain attribute that a reload replaces with one assignment, after the new value has been
fully parsed and validated. An invalid edit is rejected with an ERROR log naming the
problem, ``last_error`` is set (health shows it) and the last good strategy keeps serving.
Fields in :data:`RESTART_REQUIRED_FIELDS` are refused on reload with "restart required".
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import difflib
import enum
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError

from data_manager.clock import Clock, SystemClock
from data_manager.errors import (
    ConfigurationError,
    DataManagerError,
    RouterClosedError,
    RoutingError,
)
from data_manager.models import MAX_SOURCE_LENGTH, TIMEFRAMES, Timeframe, normalize_symbol

if TYPE_CHECKING:
    import os

__all__ = [
    "BACKENDS",
    "OPERATIONS",
    "READ_OPERATIONS",
    "RESTART_REQUIRED_FIELDS",
    "STRATEGY_VARIABLE",
    "SUPPORTED_BACKENDS",
    "WRITE_OPERATIONS",
    "AggregationStrategy",
    "Backend",
    "BatchStrategy",
    "CacheStrategy",
    "Operation",
    "RoutingStrategy",
    "RoutingTable",
    "SourcesStrategy",
    "StalenessStrategy",
    "StrategyListener",
    "StrategyStatus",
    "StrategyValidator",
    "StrategyWatcher",
    "WatcherState",
    "diff_strategies",
    "load_strategy",
    "parse_strategy",
    "restart_required_changes",
    "strategy_from_mapping",
]

logger = logging.getLogger(__name__)

Backend = Literal["timescale", "timescale_replica", "dragonfly_cache"]
Operation = Literal[
    "save_tick",
    "save_candle",
    "save_order_flow",
    "get_latest_tick",
    "get_latest_candles",
    "get_latest_order_flow",
    "get_ticks",
    "get_candles",
]

#: Backend names a route may use (seed 004's names).
BACKENDS: Final[tuple[Backend, ...]] = ("timescale", "timescale_replica", "dragonfly_cache")
#: Every routed operation, in the order the shipped file lists them.
OPERATIONS: Final[tuple[Operation, ...]] = (
    "save_tick",
    "save_candle",
    "save_order_flow",
    "get_latest_tick",
    "get_latest_candles",
    "get_latest_order_flow",
    "get_ticks",
    "get_candles",
)
WRITE_OPERATIONS: Final[frozenset[Operation]] = frozenset(
    {"save_tick", "save_candle", "save_order_flow"}
)
READ_OPERATIONS: Final[frozenset[Operation]] = frozenset(OPERATIONS) - WRITE_OPERATIONS
_BOTH: Final[frozenset[Backend]] = frozenset({"timescale", "dragonfly_cache"})
_READS: Final[frozenset[Backend]] = frozenset(BACKENDS)
#: ``timescale_replica`` = the configured PostgreSQL read replicas (reads only; what a replica
#: cannot serve — lagging, down, or the router's own recent writes — goes to the primary).
#: Which backends can serve each operation. Range reads need history, which only the
#: database keeps (L2 holds the latest tick/order flow and a ring of recent candles).
SUPPORTED_BACKENDS: Final[Mapping[Operation, frozenset[Backend]]] = MappingProxyType(
    {
        "save_tick": _BOTH,
        "save_candle": _BOTH,
        "save_order_flow": _BOTH,
        "get_latest_tick": _READS,
        "get_latest_candles": _READS,
        "get_latest_order_flow": _READS,
        "get_ticks": frozenset({"timescale", "timescale_replica"}),
        "get_candles": frozenset({"timescale", "timescale_replica"}),
    }
)
_DATABASE: Final = "timescale"
_L2: Final = "dragonfly_cache"
#: The write route that keeps L2's latest values of each read route's data.
_FED_BY: Final[Mapping[Operation, Operation]] = MappingProxyType(
    {
        "get_latest_tick": "save_tick",
        "get_latest_candles": "save_candle",
        "get_latest_order_flow": "save_order_flow",
    }
)

#: The one name the strategy file may assign.
STRATEGY_VARIABLE: Final = "DATA_MANAGER_STRATEGY"

#: Fields a running router cannot apply, as ``section.field`` paths. A reload that changes
#: one is refused ("restart required") and the running strategy keeps serving:
#:
#: * ``cache.candle_ring_size`` — the shape of the shared L2 candle ring; every process
#:   trims it, and processes disagreeing on its length would fight over it.
#: * ``batch.max_queue`` — the write queue's bound is allocated once when the router starts.
#: * ``aggregation.daily_close`` — moves every daily bucket boundary, i.e. the storage key of
#:   aggregated ``1d``/``1w`` candles; switching mid-run would store overlapping days.
#:
#: Connection settings and the L2 key prefix are not part of the strategy at all (they live
#: in :class:`~data_manager.settings.DataManagerSettings`), so no strategy edit can ask for a
#: new connection.
RESTART_REQUIRED_FIELDS: Final[frozenset[str]] = frozenset(
    {"cache.candle_ring_size", "batch.max_queue", "aggregation.daily_close"}
)

#: A strategy file larger than this is refused before parsing (it is a typo'd path, not a
#: strategy).
MAX_STRATEGY_FILE_BYTES: Final = 1 << 20

Route = tuple[Backend, ...]
#: The longest duration a strategy may give (ten years): a TTL beyond it is a typo, and far
#: beyond it one the cache server cannot store (Redis takes milliseconds as 64-bit integers).
MAX_SECONDS: Final = 315_576_000.0
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]


def _check_source_name(value: str) -> str:
    if value != value.strip() or not value or not value.isprintable():
        msg = f"source name {value!r} must be printable with no surrounding whitespace"
        raise ValueError(msg)
    return value


SourceName = Annotated[
    str, Field(min_length=1, max_length=MAX_SOURCE_LENGTH), AfterValidator(_check_source_name)
]


# --------------------------------------------------------------------------- error text


def _short_repr(value: object, limit: int = 40) -> str | None:
    text = repr(value)
    return text if len(text) <= limit else None


def _loc_text(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":
            out += f".{part}" if out else str(part)
    return out


def _known_fields(loc: tuple[int | str, ...]) -> tuple[str, ...]:
    """Field names valid at ``loc``'s parent, for "did you mean" hints."""
    model: type[BaseModel] = RoutingStrategy
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ()
        model = annotation
    return tuple(model.model_fields)


def _format_validation_error(exc: PydanticValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        where = _loc_text(loc)
        text = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc:
            text = "unknown key"
            close = difflib.get_close_matches(str(loc[-1]), _known_fields(loc), n=1)
            if close:
                text += f" (did you mean {close[0]!r}?)"
        else:
            given = err.get("input")
            shown = None if isinstance(given, Mapping) else _short_repr(given)
            if shown is not None and err["type"] != "missing":
                text += f" (got {shown})"
        parts.append(f"{where}: {text}" if where else text)
    return "; ".join(parts)


class _StrategyModel(BaseModel):
    """Base of every strategy section: frozen, typo-proof, strict, SDK errors only."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        revalidate_instances="never",
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except PydanticValidationError as exc:
            msg = f"invalid {type(self).__name__}: {_format_validation_error(exc)}"
            raise ConfigurationError(msg) from exc

    # Tell pydantic this __init__ only wraps errors, so validating a *nested* section does
    # not route through it: nested errors then keep their full path ("cache.tick_ttl_seconds")
    # and all of them are reported, not just the first. (BaseModel and RootModel mark their
    # own __init__ the same way.)
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        """Validate a mapping; raises ConfigurationError (RoutingError for routes)."""
        try:
            return super().model_validate(obj, *args, **kwargs)
        except PydanticValidationError as exc:
            msg = f"invalid {cls.__name__}: {_format_validation_error(exc)}"
            raise ConfigurationError(msg) from exc


# --------------------------------------------------------------------------- sections


def _route(*backends: Backend, doc: str) -> Any:
    # strict=False lets a file's list become the tuple (the model stays immutable).
    return Field(default=backends, strict=False, description=doc)


class RoutingTable(_StrategyModel):
    """Operation → ordered backend names. Read routes are tried in order (after L1)."""

    save_tick: Route = _route("timescale", "dragonfly_cache", doc="Seed 004.")
    save_candle: Route = _route("timescale", "dragonfly_cache", doc="Like save_tick.")
    save_order_flow: Route = _route("timescale", "dragonfly_cache", doc="Like save_tick.")
    get_latest_tick: Route = _route("dragonfly_cache", "timescale", doc="Seed 004.")
    get_latest_candles: Route = _route("dragonfly_cache", "timescale", doc="Cache first.")
    get_latest_order_flow: Route = _route("dragonfly_cache", "timescale", doc="Cache first.")
    get_ticks: Route = _route("timescale", doc="Range read: database only.")
    get_candles: Route = _route("timescale", doc="Range read: database only.")

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: Any) -> Any:
        # Raised as RoutingError (not a pydantic error) so an unknown name is a routing
        # failure with its own type, whichever way the strategy was built.
        if not isinstance(data, Mapping):
            return data
        for operation, route in data.items():
            if operation not in OPERATIONS:
                close = difflib.get_close_matches(str(operation), OPERATIONS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                msg = (
                    f"routing: unknown operation {operation!r}{hint}; known operations: "
                    f"{', '.join(OPERATIONS)}"
                )
                raise RoutingError(msg)
            if isinstance(route, set | frozenset):
                msg = f"{operation} must be a list: the order of a route matters"
                raise ValueError(msg)
            if isinstance(route, list | tuple):
                for index, name in enumerate(route):
                    if name not in BACKENDS:
                        close = difflib.get_close_matches(str(name), BACKENDS, n=1)
                        hint = f" (did you mean {close[0]!r}?)" if close else ""
                        msg = (
                            f"routing.{operation}[{index}]: unknown backend {name!r}{hint}; "
                            f"known backends: {', '.join(BACKENDS)}"
                        )
                        raise RoutingError(msg)
        return data

    @model_validator(mode="after")
    def _honourable(self) -> Self:
        for operation in OPERATIONS:
            route: Route = getattr(self, operation)
            where = f"routing.{operation}"
            if len(set(route)) != len(route):
                msg = f"{where}: {list(route)} names a backend twice"
                raise RoutingError(msg)
            unsupported = [name for name in route if name not in SUPPORTED_BACKENDS[operation]]
            if unsupported and unsupported[0] == "timescale_replica":
                msg = f"{where}: 'timescale_replica' serves reads only; writes go to the primary"
                raise RoutingError(msg)
            if unsupported:
                msg = (
                    f"{where}: {unsupported[0]!r} cannot serve {operation} (it keeps the "
                    f"latest values, not history); use {list(SUPPORTED_BACKENDS[operation])}"
                )
                raise RoutingError(msg)
            if _DATABASE not in route:
                msg = (
                    f"{where}: {list(route)} must include {_DATABASE!r}: writes must be "
                    "durable and reads must be able to answer from the database"
                )
                raise RoutingError(msg)
            if "timescale_replica" in route and route[-2:] != ("timescale_replica", _DATABASE):
                msg = (
                    f"{where}: {list(route)}: 'timescale_replica' must come right before "
                    f"{_DATABASE!r} (what a replica cannot serve goes to the primary)"
                )
                raise RoutingError(msg)
            if operation in READ_OPERATIONS and route[-1] != _DATABASE:
                msg = (
                    f"{where}: {list(route)} must end with {_DATABASE!r}: caches are tried "
                    "first and the database is the last resort"
                )
                raise RoutingError(msg)
        for read, write in _FED_BY.items():
            if _L2 in getattr(self, read) and _L2 not in getattr(self, write):
                msg = (
                    f"routing.{read} reads {_L2!r} but routing.{write} does not write it: "
                    f"it would answer what L2 held before, up to its TTL; add {_L2!r} to "
                    f"{write} or remove it from {read}"
                )
                raise RoutingError(msg)
        return self

    def for_operation(self, operation: str) -> Route:
        """Return the route of ``operation``.

        Raises:
            RoutingError: ``operation`` is not one of :data:`OPERATIONS`.
        """
        if operation not in SUPPORTED_BACKENDS:
            msg = f"no route for unknown operation {operation!r}"
            raise RoutingError(msg)
        route: Route = getattr(self, operation)
        return route


class CacheStrategy(_StrategyModel):
    """Cache lifetimes and bounds. L2 TTLs are seed 004's; L1 ones are a safety net only,
    since pub/sub pushes every write into every process's L1."""

    tick_ttl_seconds: Seconds = Field(default=3600.0, description="L2 latest tick.")
    candle_ttl_seconds: Seconds = Field(default=3600.0, description="L2 candle ring.")
    order_flow_ttl_seconds: Seconds = Field(default=3600.0, description="L2 order flow.")
    l1_tick_ttl_seconds: Seconds = Field(default=60.0, description="L1 latest tick.")
    l1_candle_ttl_seconds: Seconds = Field(default=60.0, description="L1 candle ring.")
    l1_order_flow_ttl_seconds: Seconds = Field(default=60.0, description="L1 order flow.")
    l1_max_entries: int = Field(
        default=50_000, ge=1, le=10_000_000, description="L1 LRU bound (all kinds)."
    )
    candle_ring_size: int = Field(
        default=200,
        ge=1,
        le=10_000,
        description="Latest candles kept per (symbol, timeframe, source); restart required.",
    )


class BatchStrategy(_StrategyModel):
    """The write-behind batcher."""

    size: int = Field(default=100, ge=1, description="Flush when this many are queued.")
    journal_size: int = Field(
        default=2_000,
        ge=1,
        description=(
            "Flush when this many are queued counting journal-mode items, which are on disk "
            "already (fewer database commits); at least `size`, at most `max_batch`."
        ),
    )
    flush_interval_seconds: Seconds = Field(default=1.0, description="...or after this long.")
    max_queue: int = Field(
        default=100_000, ge=1, description="Queue bound (back-pressure); restart required."
    )
    put_timeout_seconds: float | None = Field(
        default=None,
        ge=0,
        description="How long a save waits on a full queue; None waits for ever.",
    )
    max_batch: int = Field(
        default=50_000, ge=1, description="Upper bound of one group commit under load."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.size > self.max_batch:
            msg = f"size ({self.size}) is larger than max_batch ({self.max_batch})"
            raise ValueError(msg)
        if self.max_batch > self.max_queue:
            msg = f"max_batch ({self.max_batch}) is larger than max_queue ({self.max_queue})"
            raise ValueError(msg)
        return self


class StalenessStrategy(_StrategyModel):
    """Age (seconds) past which the latest value is reported stale (seed 000's TTLs).

    ``candle_seconds`` is the threshold for ``1m`` candles (two bars); a longer timeframe
    scales it by its length in minutes (``1h`` → 7200 s) unless ``per_timeframe`` names it.
    Use :meth:`candle_seconds_for`.
    """

    tick_seconds: Seconds = 2.0
    candle_seconds: Seconds = 120.0
    order_flow_seconds: Seconds = 5.0
    per_timeframe: Mapping[Timeframe, Seconds] = Field(
        default_factory=lambda: MappingProxyType({}), strict=False
    )

    _by_timeframe: dict[str, float] = PrivateAttr(default_factory=dict)

    @field_validator("per_timeframe", mode="after")
    @classmethod
    def _freeze(cls, value: Mapping[str, float]) -> Mapping[str, float]:
        return MappingProxyType(dict(value))

    @field_serializer("per_timeframe")
    def _plain(self, value: Mapping[str, float]) -> dict[str, float]:
        return dict(value)

    def model_post_init(self, context: Any, /) -> None:
        scale = self.candle_seconds / 60.0
        overrides: Mapping[str, float] = self.per_timeframe  # type: ignore[assignment]
        self._by_timeframe = {
            tf: overrides.get(tf, length_ms / 1000.0 * scale)
            for tf, length_ms in TIMEFRAMES.items()
        }

    def candle_seconds_for(self, timeframe: str) -> float:
        """Staleness threshold for candles of ``timeframe`` (precomputed; no allocation).

        Raises:
            KeyError: ``timeframe`` is not one of ``models.TIMEFRAMES``.
        """
        # Straight to the private dict: going through pydantic's __getattr__ for a private
        # attribute costs about 20 times more, and staleness is checked per read.
        private = self.__pydantic_private__
        assert private is not None
        table: dict[str, float] = private["_by_timeframe"]
        return table[timeframe]


class SourcesStrategy(_StrategyModel):
    """Which source answers a read that names none."""

    candle_preference: tuple[SourceName, ...] = Field(
        default=(),
        strict=False,
        description="First source with candles wins; empty: the source with the newest one.",
    )

    @field_validator("candle_preference")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            msg = f"{list(value)} names a source twice"
            raise ValueError(msg)
        return value


class AggregationStrategy(_StrategyModel):
    """Ticks → candles inside the router."""

    enabled: bool = True
    timeframes: tuple[Timeframe, ...] = Field(default=("1m", "5m", "1h"), strict=False)
    price: Literal["mid", "bid", "ask", "last"] = "mid"
    disabled_symbols: frozenset[str] = Field(
        default=frozenset(),
        strict=False,
        description="Symbols never aggregated (normalised, so 'EUR_USD' means 'EUR/USD').",
    )
    late_policy: Literal["drop", "rebuild"] = Field(
        default="drop",
        description="A tick older than its closed bucket: drop it, or rebuild that candle.",
    )
    idle_close_grace_seconds: float = Field(
        default=2.0, ge=0, description="Close a bucket this long after its end without ticks."
    )
    daily_close: Literal["utc", "new_york_17"] = Field(
        default="utc", description="Daily bucket boundary; restart required."
    )
    publish_interval_seconds: float = Field(
        default=0.1,
        ge=0,
        le=60,
        description=(
            "Forming bars reach L2, other routers and subscribers at most this often per"
            " series (0: once per event-loop pass); closed bars go at once, and this router's"
            " own reads always see the current bar."
        ),
    )

    @field_validator("timeframes")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            msg = f"{list(value)} names a timeframe twice"
            raise ValueError(msg)
        return value

    @field_validator("disabled_symbols", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if isinstance(value, list | tuple | set | frozenset):
            # normalize_symbol raises the SDK's ValidationError, a ValueError, so pydantic
            # reports it with its field path.
            return frozenset(normalize_symbol(s) if isinstance(s, str) else s for s in value)
        return value

    @field_serializer("disabled_symbols")
    def _sorted(self, value: frozenset[str]) -> list[str]:
        return sorted(value)  # stable dumps, hence a stable content hash


class OrderFlowStrategy(_StrategyModel):
    """Order-flow metrics computed inside the router from ticks with sizes and trades."""

    enabled: bool = True
    window_seconds: float = Field(default=60.0, gt=0, description="Rolling window length.")
    vpin_bucket_volume: float = Field(
        default=1_000_000.0, gt=0, description="Volume per VPIN bucket (instrument units)."
    )
    vpin_buckets: int = Field(default=50, ge=1, description="Buckets averaged by VPIN.")
    publish_interval_seconds: float = Field(
        default=0.1,
        ge=0,
        le=60,
        description=(
            "Metrics reach L1, L2, other routers and subscribers at most this often per symbol"
            " (0: once per event-loop pass); this router's own reads always see the current"
            " metrics."
        ),
    )


class BackupStreamStrategy(_StrategyModel):
    """Publishing accepted batches to the backup stream (when ``backup_stream_url`` is set)."""

    enabled: bool = True


class SubscriptionStrategy(_StrategyModel):
    """Live subscriptions (``subscribe_ticks`` / ``subscribe_candles``)."""

    buffer_size: int = Field(
        default=10_000,
        ge=1,
        description="Items buffered per subscriber; a slow consumer loses the oldest.",
    )


class RoutingStrategy(_StrategyModel):
    """The whole strategy; every section defaults to the built-in values.

    Instances are immutable and compare by value; :attr:`content_hash` identifies the
    content (comments and formatting of the file do not change it).
    """

    version: int | str | None = Field(
        default=None, description="Free label the file may carry; shown in health."
    )
    routing: RoutingTable = Field(default_factory=RoutingTable)
    cache: CacheStrategy = Field(default_factory=CacheStrategy)
    batch: BatchStrategy = Field(default_factory=BatchStrategy)
    staleness: StalenessStrategy = Field(default_factory=StalenessStrategy)
    sources: SourcesStrategy = Field(default_factory=SourcesStrategy)
    aggregation: AggregationStrategy = Field(default_factory=AggregationStrategy)
    order_flow: OrderFlowStrategy = Field(default_factory=OrderFlowStrategy)
    subscriptions: SubscriptionStrategy = Field(default_factory=SubscriptionStrategy)
    backup_stream: BackupStreamStrategy = Field(default_factory=BackupStreamStrategy)

    _content_hash: str = PrivateAttr(default="")

    _SECTIONS: ClassVar[tuple[str, ...]] = (
        "routing",
        "cache",
        "batch",
        "staleness",
        "sources",
        "aggregation",
        "order_flow",
        "subscriptions",
        "backup_stream",
    )

    def model_post_init(self, context: Any, /) -> None:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        self._content_hash = hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def content_hash(self) -> str:
        """16 hex digits of SHA-256 over the canonical JSON form of the strategy."""
        return self._content_hash

    def __hash__(self) -> int:
        return hash(self._content_hash)


# --------------------------------------------------------------------------- comparison


def diff_strategies(old: RoutingStrategy, new: RoutingStrategy) -> tuple[str, ...]:
    """Return the ``section.field`` paths (or ``"version"``) whose values differ."""
    changed: list[str] = []
    if old.version != new.version:
        changed.append("version")
    for section in RoutingStrategy._SECTIONS:
        a, b = getattr(old, section), getattr(new, section)
        if a == b:
            continue
        for name in type(a).model_fields:
            if getattr(a, name) != getattr(b, name):
                changed.append(f"{section}.{name}")
    return tuple(changed)


def restart_required_changes(old: RoutingStrategy, new: RoutingStrategy) -> tuple[str, ...]:
    """Return the changed fields that are in :data:`RESTART_REQUIRED_FIELDS`."""
    return tuple(p for p in diff_strategies(old, new) if p in RESTART_REQUIRED_FIELDS)


def _field_value(strategy: RoutingStrategy, path: str) -> object:
    section, _, name = path.partition(".")
    return getattr(getattr(strategy, section), name) if name else getattr(strategy, section)


# --------------------------------------------------------------------------- parsing

# Nodes ast.literal_eval accepts; anything else is reported by name and line.
_LITERAL_NODES: Final = (ast.Constant, ast.Dict, ast.List, ast.Tuple, ast.Set, ast.Load)
_SIGNS: Final = (ast.UAdd, ast.USub)


def _is_literal_node(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp):  # -5, +1.5; its operator node is then skipped
        return isinstance(node.op, _SIGNS)
    return isinstance(node, (*_LITERAL_NODES, *_SIGNS))


def _statement_kind(node: ast.stmt) -> str:
    kinds = {
        ast.Import: "an import",
        ast.ImportFrom: "an import",
        ast.FunctionDef: "a function definition",
        ast.AsyncFunctionDef: "a function definition",
        ast.ClassDef: "a class definition",
        ast.Expr: "an expression",
        ast.Assign: "an assignment",
        ast.AnnAssign: "an assignment",
        ast.AugAssign: "an augmented assignment",
    }
    return kinds.get(type(node), f"a {type(node).__name__} statement")


def _assigns_strategy(node: ast.stmt) -> bool:
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign):
        targets = [node.target]
    else:
        return False
    return (
        len(targets) == 1
        and isinstance(targets[0], ast.Name)
        and (targets[0].id == STRATEGY_VARIABLE)
    )


def _fail(origin: str, line: int | None, problem: str) -> ConfigurationError:
    where = f"{origin}:{line}" if line is not None else origin
    return ConfigurationError(f"{where}: {problem}")


def _extract_literal(source: str, origin: str) -> object:
    try:
        module = ast.parse(source, filename=origin, mode="exec")
    except SyntaxError as exc:
        raise _fail(origin, exc.lineno, f"syntax error: {exc.msg}") from exc
    except (ValueError, RecursionError, MemoryError) as exc:
        raise _fail(origin, None, f"cannot parse: {exc or type(exc).__name__}") from exc
    body = list(module.body)
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body.pop(0)  # the module docstring
    if not body:
        raise _fail(origin, None, f"no assignment to {STRATEGY_VARIABLE} found")
    statement = body[0]
    if len(body) > 1:
        # Point at the statement that does not belong: the first one that is not the
        # assignment, else the second (a repeated assignment).
        extra = next((s for s in body if not _assigns_strategy(s)), body[1])
        problem = (
            f"the file must hold exactly one statement, {STRATEGY_VARIABLE} = {{...}}; "
            f"this line holds {_statement_kind(extra)} as well ({len(body)} statements)"
        )
        raise _fail(origin, extra.lineno, problem)
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        target: ast.expr = statement.targets[0]
        value: ast.expr | None = statement.value
    elif isinstance(statement, ast.AnnAssign):
        target, value = statement.target, statement.value
    else:
        problem = f"expected {STRATEGY_VARIABLE} = {{...}}, found {_statement_kind(statement)}"
        raise _fail(origin, statement.lineno, problem)
    if not isinstance(target, ast.Name) or target.id != STRATEGY_VARIABLE:
        problem = f"the assignment must be to {STRATEGY_VARIABLE}, not {ast.unparse(target)!r}"
        raise _fail(origin, statement.lineno, problem)
    if value is None:
        raise _fail(origin, statement.lineno, f"{STRATEGY_VARIABLE} has no value")
    for node in ast.walk(value):
        if not _is_literal_node(node):
            snippet = ast.unparse(node)
            snippet = snippet if len(snippet) <= 60 else snippet[:57] + "..."
            problem = (
                f"`{snippet}` is not a literal; the strategy is read as data and never "
                "executed, so only literal dicts, lists, strings, numbers, booleans and "
                "None are allowed"
            )
            raise _fail(origin, getattr(node, "lineno", statement.lineno), problem)
        if isinstance(node, ast.Dict):
            seen: set[object] = set()
            for key in node.keys:
                if isinstance(key, ast.Constant):
                    if key.value in seen:
                        problem = (
                            f"duplicate key {key.value!r} (the later value would silently "
                            "replace the earlier one)"
                        )
                        raise _fail(origin, key.lineno, problem)
                    seen.add(key.value)
    try:
        return ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        problem = f"{STRATEGY_VARIABLE} is not a literal value: {exc}"
        raise _fail(origin, statement.lineno, problem) from exc


def strategy_from_mapping(data: Mapping[str, Any], *, origin: str = "<mapping>") -> RoutingStrategy:
    """Validate a mapping in the file's shape into a :class:`RoutingStrategy`.

    Raises:
        RoutingError: Unknown backend or operation, or a route the SDK cannot honour.
        ConfigurationError: Any other problem, naming the field path.
    """
    if not isinstance(data, Mapping):
        msg = f"{origin}: {STRATEGY_VARIABLE} must be a dict, got {type(data).__name__}"
        raise ConfigurationError(msg)
    try:
        return RoutingStrategy.model_validate(data)
    except RoutingError as exc:
        raise RoutingError(f"{origin}: {exc}") from exc
    except ConfigurationError as exc:
        detail = str(exc).removeprefix("invalid RoutingStrategy: ")
        raise ConfigurationError(f"{origin}: invalid strategy: {detail}") from exc


def parse_strategy(source_text: str | bytes, *, origin: str = "<strategy>") -> RoutingStrategy:
    """Parse the text of a strategy file without executing it.

    Args:
        source_text: The file's content (bytes are decoded as UTF-8).
        origin: Named in every error message, normally the file's path.

    Raises:
        RoutingError: Unknown backend or operation, or a route the SDK cannot honour.
        ConfigurationError: Syntax error (with line), anything but the single literal
            assignment, an invalid value (with its field path).
    """
    if isinstance(source_text, bytes):
        try:
            source_text = source_text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _fail(origin, None, f"not UTF-8 text: {exc}") from exc
    value = _extract_literal(source_text, origin)
    if not isinstance(value, dict):
        problem = f"{STRATEGY_VARIABLE} must be a dict, got {type(value).__name__}"
        raise _fail(origin, None, problem)
    return strategy_from_mapping(value, origin=origin)


def _read_file(path: Path) -> bytes | None:
    """Blocking read; None when the file does not exist."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_STRATEGY_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        msg = f"cannot read strategy file {path}: {exc.strerror or exc}"
        raise ConfigurationError(msg) from exc
    if len(data) > MAX_STRATEGY_FILE_BYTES:
        msg = f"strategy file {path} is larger than {MAX_STRATEGY_FILE_BYTES} bytes"
        raise ConfigurationError(msg)
    return data


def load_strategy(path: str | os.PathLike[str], *, missing_ok: bool = True) -> RoutingStrategy:
    """Read and validate a strategy file (blocking: call it via ``asyncio.to_thread`` from
    async code; :class:`StrategyWatcher` does).

    Args:
        path: The strategy file.
        missing_ok: When the file does not exist, return the built-in defaults (logged at
            INFO) instead of raising. The router passes ``False`` when the file was named
            explicitly (``DATA_MANAGER_STRATEGY_FILE``), so a typo'd path is an error.

    Raises:
        ConfigurationError: Unreadable or invalid file, or missing with ``missing_ok=False``.
        RoutingError: See :func:`parse_strategy`.
    """
    file = Path(path)
    data = _read_file(file)
    if data is None:
        if not missing_ok:
            msg = f"strategy file {file} does not exist"
            raise ConfigurationError(msg)
        logger.info("strategy file %s not found; using the built-in defaults", file)
        return RoutingStrategy()
    return parse_strategy(data, origin=str(file))


# --------------------------------------------------------------------------- watcher

StrategyListener = Callable[[RoutingStrategy, RoutingStrategy], Awaitable[None] | None]
StrategyValidator = Callable[[RoutingStrategy, RoutingStrategy], None]

_FileSignature = tuple[int, int, int, int]  # mtime_ns, size, inode, device
# A file modified this recently may still change within the same mtime tick (coarse
# filesystem timestamps), so its signature is not trusted and the next poll reads it again.
_SETTLE_NS: Final = 2_000_000_000


class WatcherState(enum.Enum):
    """Lifecycle of a :class:`StrategyWatcher`."""

    CREATED = "created"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StrategyStatus:
    """What health reports about the strategy."""

    state: str
    path: str | None
    source: Literal["file", "defaults", "explicit"]
    version: int
    content_hash: str
    label: int | str | None
    last_loaded_at: int | None
    last_error: str | None
    last_error_at: int | None
    reload_count: int
    error_count: int


@dataclass(frozen=True, slots=True)
class _Snapshot:
    kind: Literal["missing", "unchanged", "loaded", "error"]
    signature: _FileSignature | None = None
    digest: bytes = b""
    strategy: RoutingStrategy | None = None
    error: DataManagerError | None = None


def _take_snapshot(
    path: Path, known: _FileSignature | None, known_digests: tuple[bytes, ...]
) -> _Snapshot:
    """Stat, read and parse the file (blocking; runs in a worker thread)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return _Snapshot("missing")
    except OSError as exc:
        msg = f"cannot stat strategy file {path}: {exc.strerror or exc}"
        return _Snapshot("error", error=ConfigurationError(msg))
    signature = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
    if known is not None and signature == known:
        return _Snapshot("unchanged", signature)
    settled = time.time_ns() - st.st_mtime_ns >= _SETTLE_NS
    kept = signature if settled else None
    try:
        data = _read_file(path)
    except ConfigurationError as exc:
        return _Snapshot("error", kept, error=exc)
    if data is None:
        return _Snapshot("missing")
    digest = hashlib.sha256(data).digest()
    if digest in known_digests:
        return _Snapshot("unchanged", kept, digest)
    try:
        strategy = parse_strategy(data, origin=str(path))
    except DataManagerError as exc:
        return _Snapshot("error", kept, digest, error=exc)
    return _Snapshot("loaded", kept, digest, strategy=strategy)


class StrategyWatcher:
    """Owns the live :class:`RoutingStrategy` and swaps it when the file changes.

    Polling, not inotify: one ``stat`` every ``poll_seconds`` in a worker thread works the
    same on bind mounts, network filesystems and Kubernetes ConfigMaps (symlink swaps),
    where file-system events are lost or never delivered. The file is read only when its
    (mtime, size, inode) changes, and parsed only when its bytes change.

    Readers use :attr:`current` without a lock: it is one attribute, replaced by a single
    assignment once the new value is fully validated.

    Args:
        path: The strategy file, or ``None`` to serve the defaults only.
        fixed: A strategy to serve instead of the file; it is never reloaded (``path`` is
            then ignored).
        poll_seconds: Interval of the background check.
        required: A missing file at :meth:`start` is an error instead of "use the
            defaults". Pass ``settings.strategy_file is not None``: a file named explicitly
            must exist, the conventional location may be absent.
        clock: Wall clock for ``last_loaded_at``/``last_error_at`` (Unix ms).

    Before :meth:`start`, :attr:`current` is ``fixed`` or the built-in defaults.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        fixed: RoutingStrategy | None = None,
        poll_seconds: float = 1.0,
        required: bool = False,
        clock: Clock | None = None,
    ) -> None:
        if poll_seconds <= 0:
            msg = f"poll_seconds must be > 0, got {poll_seconds}"
            raise ConfigurationError(msg)
        self.path: Path | None = Path(path) if path is not None and fixed is None else None
        self.current: RoutingStrategy = fixed if fixed is not None else RoutingStrategy()
        self.version = 0
        self.last_error: str | None = None
        self.last_error_at: int | None = None
        self.last_loaded_at: int | None = None
        self.reload_count = 0
        self.error_count = 0
        self._poll_seconds = poll_seconds
        self._watch = False
        self._required = required
        self._clock: Clock = clock or SystemClock()
        self._state = WatcherState.CREATED
        self._source: Literal["file", "defaults", "explicit"] = (
            "explicit" if fixed is not None else "defaults"
        )
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[StrategyListener] = []
        self._validators: list[StrategyValidator] = []
        self._signature: _FileSignature | None = None
        self._digest = b""  # bytes of the file now serving (or last found equal to it)
        self._rejected_digest = b""  # bytes already rejected: not logged again
        self._file_present = False

    # ------------------------------------------------------------------ properties

    @property
    def state(self) -> WatcherState:
        """Lifecycle state."""
        return self._state

    @property
    def content_hash(self) -> str:
        """Content hash of :attr:`current`."""
        return self.current.content_hash

    def status(self) -> StrategyStatus:
        """A snapshot for health output."""
        return StrategyStatus(
            state=self._state.value,
            path=str(self.path) if self.path is not None else None,
            source=self._source,
            version=self.version,
            content_hash=self.current.content_hash,
            label=self.current.version,
            last_loaded_at=self.last_loaded_at,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            reload_count=self.reload_count,
            error_count=self.error_count,
        )

    def add_listener(self, callback: StrategyListener) -> Callable[[], None]:
        """Call ``callback(old, new)`` after every swap (sync or async); returns a remover.

        A listener's exception is logged and does not undo the swap. A listener must not
        call :meth:`check_now` (the check holds its lock while notifying).
        """
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def add_validator(self, callback: StrategyValidator) -> Callable[[], None]:
        """Call ``callback(old, new)`` before every swap; raising a
        :class:`~data_manager.errors.DataManagerError` rejects the new strategy (for checks
        that depend on the running router). Returns a remover."""
        self._validators.append(callback)
        return lambda: self._validators.remove(callback)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self, *, watch: bool = True) -> None:
        """Load the file and, with ``watch``, start the background check.

        A missing file means the built-in defaults (logged at INFO) unless ``required``.
        An invalid file fails here, loudly, rather than at the first request. Without
        ``watch`` only :meth:`check_now` reloads. Calling it again while running is a no-op.

        Raises:
            ConfigurationError: Invalid or unreadable file (or missing and ``required``).
            RoutingError: The file names an unknown backend or operation.
            RouterClosedError: The watcher was closed.
        """
        if self._state is WatcherState.CLOSED:
            msg = "the strategy watcher is closed"
            raise RouterClosedError(msg)
        if self._state is WatcherState.RUNNING:
            return
        if self.path is not None:
            snap = await asyncio.to_thread(_take_snapshot, self.path, None, ())
            if snap.kind == "error":
                assert snap.error is not None
                raise snap.error
            if snap.kind == "missing":
                if self._required:
                    msg = f"strategy file {self.path} does not exist"
                    raise ConfigurationError(msg)
                logger.info("strategy file %s not found; using the built-in defaults", self.path)
                self.current = RoutingStrategy()
                self._source = "defaults"
            else:
                assert snap.strategy is not None
                self.current = snap.strategy
                self._source = "file"
                self._file_present = True
                self._signature, self._digest = snap.signature, snap.digest
        self.version = 1
        self.last_loaded_at = self._clock.time_ms()
        self._state = WatcherState.RUNNING
        logger.info(
            "routing strategy in force from %s (hash %s, label %r)",
            self.path if self._source == "file" else self._source,
            self.current.content_hash,
            self.current.version,
        )
        self._watch = watch and self.path is not None
        if self._watch:
            self._spawn_poller()

    def _spawn_poller(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._poll_loop(), name="data_manager.strategy_watcher"
        )

    def reset_after_fork(self) -> None:
        """Restart the background check in a forked child (call it from the child, inside
        its running loop); the strategy in force is kept.

        If the child goes on running the parent's loop, the inherited poll task is
        cancelled and replaced; if it runs a new loop, the old task and lock belong to a
        loop that never runs again, so they are dropped.
        """
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        old, self._task = self._task, None
        if old is not None and old.get_loop() is loop:
            old.cancel()
        else:
            self._lock = asyncio.Lock()
        self._signature = None  # re-read on the next check: the file may have changed
        if self._state is WatcherState.RUNNING and self._watch and loop is not None:
            self._spawn_poller()

    async def aclose(self) -> None:
        """Stop the background check. Idempotent; the last strategy stays readable."""
        if self._state is WatcherState.CLOSED:
            return
        self._state = WatcherState.CLOSED
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.check_now()
            except Exception:
                # A bug here must not end hot reload for the life of the process.
                self.error_count += 1
                logger.exception("strategy check of %s failed unexpectedly", self.path)

    # ------------------------------------------------------------------ reload

    async def check_now(self) -> bool:
        """Check the file once, now; return True when a new strategy was swapped in.

        Never raises for a bad file: a rejected edit sets :attr:`last_error`, is logged
        at ERROR and leaves :attr:`current` unchanged.

        Raises:
            RouterClosedError: The watcher was closed.
        """
        if self._state is WatcherState.CLOSED:
            msg = "the strategy watcher is closed"
            raise RouterClosedError(msg)
        if self.path is None:
            return False
        async with self._lock:
            return await self._check(self.path)

    async def _check(self, path: Path) -> bool:
        known = (self._digest, self._rejected_digest)
        snap = await asyncio.to_thread(_take_snapshot, path, self._signature, known)
        if snap.kind != "missing":
            self._file_present = True
        if snap.kind == "unchanged":
            self._signature = snap.signature
            if snap.digest and snap.digest == self._digest and self.last_error is not None:
                self._recovered(path)
            return False
        if snap.kind == "missing":
            self._signature = None
            self._rejected_digest = b""  # the same bad text coming back is reported again
            if self._file_present:
                self._file_present = False
                self._reject(
                    f"strategy file {path} has disappeared; the last good strategy keeps serving",
                    level=logging.WARNING,
                )
            return False
        if snap.kind == "error":
            assert snap.error is not None
            self._signature = snap.signature
            self._rejected_digest = snap.digest
            self._reject(str(snap.error))
            return False
        new = snap.strategy
        assert new is not None
        old = self.current
        if new.content_hash == old.content_hash:
            # Comments, formatting, or an edit reverted: nothing to swap.
            self._signature, self._digest = snap.signature, snap.digest
            self._source = "file"
            if self.last_error is not None:
                self._recovered(path)
            return False
        problem = self._refusal(path, old, new)
        if problem is not None:
            self._signature, self._rejected_digest = snap.signature, snap.digest
            self._reject(problem)
            return False
        self.current = new  # the swap: one assignment, readers take no lock
        self._signature, self._digest, self._rejected_digest = snap.signature, snap.digest, b""
        self.version += 1
        self.reload_count += 1
        self.last_loaded_at = self._clock.time_ms()
        self.last_error = None
        self._source = "file"
        logger.info(
            "routing strategy reloaded from %s: version %d, hash %s, label %r, changed: %s",
            path,
            self.version,
            new.content_hash,
            new.version,
            ", ".join(diff_strategies(old, new)) or "-",
        )
        await self._notify(old, new)
        return True

    def _refusal(self, path: Path, old: RoutingStrategy, new: RoutingStrategy) -> str | None:
        restart = restart_required_changes(old, new)
        if restart:
            changes = ", ".join(
                f"{p} {_field_value(old, p)!r} -> {_field_value(new, p)!r}" for p in restart
            )
            return (
                f"{path}: restart required to apply {changes}; the running strategy keeps "
                "serving until the process restarts"
            )
        for validator in self._validators:
            try:
                validator(old, new)
            except DataManagerError as exc:
                return f"{path}: {exc}"
        return None

    def _reject(self, message: str, *, level: int = logging.ERROR) -> None:
        self.last_error = message
        self.last_error_at = self._clock.time_ms()
        self.error_count += 1
        logger.log(
            level,
            "routing strategy reload rejected: %s (still serving version %d, hash %s)",
            message,
            self.version,
            self.current.content_hash,
        )

    def _recovered(self, path: Path) -> None:
        logger.info("strategy file %s agrees with the strategy in force again", path)
        self.last_error = None
        # The rejected text is no longer on disk: if it comes back, it is refused again.
        self._rejected_digest = b""

    async def _notify(self, old: RoutingStrategy, new: RoutingStrategy) -> None:
        for listener in tuple(self._listeners):
            try:
                result = listener(old, new)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # The swap stands; one broken subscriber must not block the others.
                logger.exception("routing strategy listener %r failed", listener)
