"""Configuration: :class:`DataManagerSettings`, read once at the edge (the router's construction).

Precedence, highest first:

1. an explicit settings object / keyword arguments (``DataManagerSettings(postgres=...)``);
2. ``DATA_MANAGER_*`` environment variables (nested with ``__``, e.g.
   ``DATA_MANAGER_POSTGRES__HOST``);
3. the static JSON files ``static/postgresql.json`` and ``static/dragonflydb.json`` in the
   configuration folder: literal values, or ``"ENV:NAME"`` references resolved from the
   environment (an unset ``NAME`` falls back to the file named by ``NAME_FILE``, else the
   value is treated as absent);
4. the defaults in this module.

The configuration folder is ``DATA_MANAGER_CONFIG_DIR``, else ``./config`` when it exists,
else the defaults shipped inside the package, so an installed SDK works from any directory.

A backend is configured when its resolved host is non-empty. Passwords are ``SecretStr``
and never appear in ``repr``, logs, errors or health output.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from data_manager.errors import ConfigurationError
from data_manager.models import Timeframe

__all__ = [
    "DEFAULT_SQLITE_PATH",
    "DataManagerSettings",
    "DragonflySettings",
    "JournalSync",
    "PostgresReplicaSettings",
    "PostgresSettings",
    "RetentionSettings",
    "WriteMode",
    "resolve_config_dir",
]

WriteMode = Literal["buffered", "journal", "sync"]
#: Who writes and syncs a journal's groups: Linux ``aio`` from the event loop, a committer
#: ``thread``, or the event ``loop`` blocking for each sync; ``auto`` is aio, else thread.
JournalSync = Literal["auto", "thread", "loop", "aio"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

#: Embedded SQLite file used when no PostgreSQL host is configured.
DEFAULT_SQLITE_PATH: Final = ".data_manager/data_manager.sqlite3"
_PACKAGE_DEFAULTS: Final = Path(__file__).parent / "_defaults"
_STATIC_FILES: Final = {"postgres": "postgresql.json", "dragonfly": "dragonflydb.json"}


def resolve_config_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the configuration folder: explicit > ``DATA_MANAGER_CONFIG_DIR`` > ``./config``
    (when it exists) > the defaults shipped in the package."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("DATA_MANAGER_CONFIG_DIR")
    if from_env:
        return Path(from_env)
    local = Path.cwd() / "config"
    if (local / "static").is_dir() or (local / "hot_reload").is_dir():
        return local
    return _PACKAGE_DEFAULTS


def _read_secret_file(path: str | os.PathLike[str], *, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        msg = f"cannot read {what} from {os.fspath(path)!r}: {exc.strerror}"
        raise ConfigurationError(msg) from exc


#: The longest ``statement_timeout`` PostgreSQL takes (milliseconds in a 32-bit int).
MAX_STATEMENT_TIMEOUT: Final = (2**31 - 1) / 1000

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_+.-]*")


@dataclass(frozen=True, slots=True)
class _UrlForm:
    """How a backend's ``url`` maps onto its fields.

    Only the listed schemes are accepted (a ``mysql://`` or ``http://`` URL is a mistake,
    not a server to try), and only the listed query parameters: one the SDK would not apply
    (``sslmode`` before it was supported, say) must not be dropped in silence. Messages
    never repeat the URL: it may hold a password.
    """

    what: str
    schemes: frozenset[str]
    #: Also accept SQLAlchemy's ``<prefix><driver>://`` (the SDK picks the driver itself).
    driver_prefix: str | None
    user_field: str
    path_field: str
    #: Query parameter -> the field it sets.
    query_fields: Mapping[str, str]

    def parse(self, raw: object) -> dict[str, Any]:
        url = raw.get_secret_value() if isinstance(raw, SecretStr) else str(raw)
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in self.schemes and not (
            self.driver_prefix and scheme.startswith(self.driver_prefix)
        ):
            allowed = ", ".join(f"{name}://" for name in sorted(self.schemes))
            given = f"{scheme}://" if _NAME.fullmatch(scheme) else "(none)"
            msg = f"{self.what} URL scheme {given} is not supported; use {allowed}"
            raise ValueError(msg)
        parsed: dict[str, Any] = {}
        try:
            hostname, port = parts.hostname, parts.port
        except ValueError:  # a port that is not a number, or out of range
            # Never the exception's text: it quotes the URL, which may hold the password.
            msg = (
                f"{self.what} URL has an invalid port (a '/', '#' or '?' in the password "
                "must be percent-encoded)"
            )
            raise ValueError(msg) from None
        if hostname:
            # libpq's other spelling of a Unix socket folder: the host percent-encoded
            # (postgresql://%2Fvar%2Frun%2Fpostgresql/db). ``hostname`` is lower-cased, and a
            # folder's name is not: decode the host as written.
            parsed["host"] = _raw_host(parts.netloc) if "%" in hostname else hostname
        if port:
            parsed["port"] = port
        if parts.username:
            parsed[self.user_field] = unquote(parts.username)
        if parts.password:
            parsed["password"] = unquote(parts.password)
        path = parts.path.lstrip("/")
        if "@" in path:
            # user:pass/word@host/db splits at the first '/': the rest of the password, the
            # host and the database would be taken for a database name (and shown).
            msg = (
                f"{self.what} URL has a '@' after its host (a '/', '#' or '?' in the password "
                "must be percent-encoded)"
            )
            raise ValueError(msg)
        if path:
            parsed[self.path_field] = unquote(path)
        if scheme == "rediss":
            parsed["ssl"] = True
        # After the URL's own parts: as in libpq, ?host=/socket/folder wins over a netloc.
        for name, values in parse_qs(parts.query, keep_blank_values=True).items():
            field = self.query_fields.get(name)
            if field is None:
                known = ", ".join(sorted(self.query_fields)) or "none"
                # A name that is not one may be the tail of a password with a raw '?'.
                shown = repr(name) if _NAME.fullmatch(name) else "that is not a name"
                msg = f"{self.what} URL parameter {shown} is not supported (supported: {known})"
                raise ValueError(msg)
            if len(values) > 1:
                msg = f"{self.what} URL parameter {name!r} is given {len(values)} times"
                raise ValueError(msg)
            if values[0]:  # an empty value is the default, as in libpq
                parsed[field] = values[0]
        return parsed


def _raw_host(netloc: str) -> str:
    """The host of ``netloc`` as written (case kept), percent-decoded."""
    host = netloc.rpartition("@")[2]
    if not host.startswith("["):  # an IPv6 literal has no percent-encoding to undo
        host = host.partition(":")[0]
    return unquote(host)


_POSTGRES_URL: Final = _UrlForm(
    what="PostgreSQL",
    schemes=frozenset({"postgresql", "postgres"}),
    driver_prefix="postgresql+",
    user_field="user",
    path_field="database",
    # libpq's spelling: ?host=/var/run/postgresql reaches a Unix socket folder.
    query_fields=MappingProxyType(
        {
            "host": "host",
            "port": "port",
            "user": "user",
            "sslmode": "sslmode",
            "application_name": "application_name",
            "connect_timeout": "connect_timeout",
        }
    ),
)
_REDIS_URL: Final = _UrlForm(
    what="Redis",
    schemes=frozenset({"redis", "rediss"}),
    driver_prefix=None,
    user_field="username",
    path_field="db",
    query_fields=MappingProxyType({"db": "db"}),
)


class _Backend(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The section name in messages (``postgres.pool_min: ...``).
    _section: ClassVar[str]
    #: How ``url`` is read (see :class:`_UrlForm`).
    _url_form: ClassVar[_UrlForm]

    def __init__(self, **values: Any) -> None:
        # Built on its own (not inside DataManagerSettings, which reports for all sections),
        # a bad value is the SDK's ConfigurationError too.
        try:
            super().__init__(**values)
        except PydanticValidationError as exc:
            # Not chained: pydantic's error quotes the input, which may hold a password (a
            # traceback would print it). Kept aside for a caller that formats it itself.
            error = ConfigurationError(_format_settings_error(exc, self._section))
            error.validation_error = exc  # type: ignore[attr-defined]
            raise error from None

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("url"):
            return data
        raw = data["url"]
        # What the URL says wins over fields merged in from lower-precedence sources.
        return {
            **{k: v for k, v in data.items() if k != "url"},
            **cls._url_form.parse(raw),
            "url": raw,
        }

    @property
    def configured(self) -> bool:
        """True when a host is set."""
        return bool(getattr(self, "host", ""))


class PostgresReplicaSettings(BaseModel):
    """One read replica (a hot standby); every field left out is the primary's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: SecretStr | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    database: str | None = None
    user: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    sslmode: SslMode | None = None
    connect_timeout: float | None = Field(default=None, gt=0)
    statement_timeout: float | None = Field(default=None, gt=0, le=MAX_STATEMENT_TIMEOUT)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        data = {"url": data} if isinstance(data, str) else data
        if isinstance(data, dict) and data.get("url"):
            # Refused now, not when the replica is opened: the URL's scheme, parameters and
            # the values they set (checked as the primary's fields are).
            try:
                PostgresSettings.model_validate({"url": data["url"]})
            except ConfigurationError as exc:  # PostgresSettings.__init__ wraps pydantic's
                cause = getattr(exc, "validation_error", None)
                detail = (
                    _settings_errors(cause, "url")
                    if isinstance(cause, PydanticValidationError)
                    else str(exc)
                )
                raise ValueError(detail) from None
        return data


class PostgresSettings(_Backend):
    """PostgreSQL/TimescaleDB connection. Empty ``host`` means "use the embedded SQLite"."""

    _section: ClassVar[str] = "postgres"
    _url_form: ClassVar[_UrlForm] = _POSTGRES_URL

    url: SecretStr | None = Field(default=None, description="postgresql://user:pw@host:port/db")
    host: str = ""
    port: int = Field(default=5432, ge=1, le=65535)
    database: str | None = None
    user: str = "postgres"
    password: SecretStr | None = None
    password_file: Path | None = None
    sslmode: SslMode | None = None
    db_schema: str = Field(
        default="public",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="PostgreSQL schema (namespace) that holds the SDK's tables.",
    )
    pool_min: int = Field(default=5, description="Connections kept open (pool_size); at least 1.")
    pool_max: int = Field(default=20, ge=1, description="Upper bound of open connections.")
    pool_timeout: float = Field(default=5.0, gt=0, description="Seconds to wait for a free one.")
    hot_read_connections: int = Field(
        default=2,
        ge=0,
        description=(
            "Pooled connections kept checked out for latest-row reads (0: none); part of"
            " pool_max and capped at a quarter of it, so writers always find connections."
        ),
    )
    connect_timeout: float = Field(default=5.0, gt=0)
    statement_timeout: float = Field(
        default=30.0,
        gt=0,
        le=MAX_STATEMENT_TIMEOUT,
        description="Server-side, seconds (PostgreSQL takes at most 2**31 - 1 ms).",
    )
    application_name: str = "data_manager"
    replicas: tuple[PostgresReplicaSettings, ...] = Field(
        default=(), description="Read replicas (hot standbys) for the timescale_replica route."
    )
    replica_max_lag_seconds: float = Field(default=5.0, gt=0)
    replica_max_lag_bytes: int | None = Field(default=None, ge=0)
    replica_check_interval: float = Field(default=1.0, gt=0)

    @field_validator("pool_min")
    @classmethod
    def _check_pool_min(cls, value: int) -> int:
        # SQLAlchemy's QueuePool reads pool_size 0 as "no limit": pool_max would bound nothing.
        if value < 1:
            msg = (
                f"pool_min must be at least 1 (got {value}): a pool of size 0 opens any "
                "number of connections, so pool_max would not bound them"
            )
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _check(self) -> PostgresSettings:
        if self.pool_max < self.pool_min:
            msg = f"postgres pool max ({self.pool_max}) is below pool min ({self.pool_min})"
            raise ValueError(msg)
        if self.replicas and self.replica_check_interval >= self.replica_max_lag_seconds:
            msg = "replica_check_interval must be shorter than replica_max_lag_seconds"
            raise ValueError(msg)
        return self

    @property
    def hot_read_lane(self) -> int:
        """Connections actually reserved for latest-row reads (capped at pool_max // 4)."""
        return min(self.hot_read_connections, self.pool_max // 4)

    def replica_settings(self) -> list[PostgresSettings]:
        """Each replica's full settings: its own fields over the primary's."""
        base = self.model_dump(exclude={"url", "replicas"})
        out = []
        for replica in self.replicas:
            own = {k: v for k, v in replica.model_dump(exclude={"url"}).items() if v is not None}
            values = {**base, **own}
            if replica.url is not None:
                values["url"] = replica.url  # what the URL says wins (see _Backend._from_url)
            out.append(PostgresSettings.model_validate(values))
        return out

    def resolved_password(self) -> str | None:
        """The password, from ``password`` or ``password_file``; never logged."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return _read_secret_file(self.password_file, what="the PostgreSQL password")
        return None

    @property
    def target(self) -> str:
        """``host:port/database`` for messages; never contains the password."""
        return f"postgresql {self.host}:{self.port}/{self.database}"


class DragonflySettings(_Backend):
    """The L2 cache and pub/sub bus: DragonflyDB in production, any Redis-protocol server."""

    _section: ClassVar[str] = "dragonfly"
    _url_form: ClassVar[_UrlForm] = _REDIS_URL

    url: SecretStr | None = Field(default=None, description="redis://user:pw@host:port/db")
    host: str = ""
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    username: str | None = Field(default=None, description="Redis 6+ ACL user name.")
    password: SecretStr | None = None
    password_file: Path | None = None
    ssl: bool = False
    ssl_ca_certs: Path | None = None
    key_prefix: str = Field(default="dm", pattern=r"^[A-Za-z0-9_.\-]{1,32}$")
    pool_max: int = Field(default=50, ge=1)
    socket_timeout: float = Field(default=0.5, gt=0)
    connect_timeout: float = Field(default=1.0, gt=0)
    cluster_nodes: tuple[str, ...] = Field(
        default=(),
        description="Redis Cluster / DragonflyDB cluster seed nodes, host:port each; when set, "
        "host, port and db are not used.",
    )
    bus_on_channel_node: bool | None = Field(
        default=None,
        description="Publish and subscribe on the master owning the bus channel's slot "
        "(needed where nodes do not forward pub/sub); None: automatic (on for DragonflyDB).",
    )

    @model_validator(mode="after")
    def _check_cluster(self) -> DragonflySettings:
        if self.cluster_nodes:
            from data_manager.cache.cluster import parse_node

            for node in self.cluster_nodes:
                parse_node(node)  # raises ConfigurationError naming the bad node
            if self.db != 0:
                msg = "a Redis Cluster has only database 0; unset db"
                raise ValueError(msg)
        return self

    @property
    def configured(self) -> bool:
        """True when a host or cluster seed nodes are set."""
        return bool(self.host or self.cluster_nodes)

    def resolved_password(self) -> str | None:
        """The password, from ``password`` or ``password_file``; never logged."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return _read_secret_file(self.password_file, what="the cache password")
        return None

    @property
    def target(self) -> str:
        """``host:port/db`` (or the cluster seeds) for messages; never contains the password."""
        if self.cluster_nodes:
            return f"redis cluster {','.join(self.cluster_nodes)}"
        return f"redis {self.host}:{self.port}/{self.db}"


class RetentionSettings(BaseModel):
    """How long each kind of data is kept (``None``: for ever). See the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ticks_days: float | None = Field(default=None, gt=0, description="Keep ticks this long.")
    order_flow_days: float | None = Field(default=None, gt=0)
    candles_days: float | None = Field(
        default=None, gt=0, description="Keep candles of every timeframe this long..."
    )
    candles_timeframe_days: dict[Timeframe, float | None] = Field(
        default_factory=dict,
        description="...except these timeframes (None keeps that timeframe for ever).",
    )
    replay_horizon_days: float = Field(
        default=7.0,
        gt=0,
        description="How far back journal replays and late ticks may still write.",
    )
    compression: bool = Field(default=True, description="TimescaleDB compression policies.")
    compress_after_days: float | None = Field(
        default=None, gt=0, description="Compress chunks older than this; default: the horizon."
    )
    delete_batch_rows: int = Field(default=50_000, ge=1, description="Rows per delete batch.")

    # ``gt=0`` lets infinity through (and float("inf") parses from "inf"); a cutoff an
    # infinite number of days back cannot be computed, and "for ever" is spelt None.
    @field_validator("ticks_days", "order_flow_days", "candles_days")
    @classmethod
    def _finite_retention(cls, days: float | None, info: ValidationInfo) -> float | None:
        if days is not None and not math.isfinite(days):
            msg = (
                f"{info.field_name} must be a finite number of days, got {days}; leave it "
                "unset (None) to keep that data for ever"
            )
            raise ValueError(msg)
        return days

    @field_validator("replay_horizon_days", "compress_after_days")
    @classmethod
    def _finite_days(cls, days: float | None, info: ValidationInfo) -> float | None:
        if days is not None and not math.isfinite(days):
            msg = f"{info.field_name} must be a finite number of days, got {days}"
            raise ValueError(msg)
        return days

    @model_validator(mode="after")
    def _check(self) -> RetentionSettings:
        for tf, days in self.candles_timeframe_days.items():
            if days is not None and not (math.isfinite(days) and days > 0):
                msg = (
                    f"candles_timeframe_days[{tf!r}] must be a finite number of days > 0, got "
                    f"{days}; null keeps that timeframe for ever"
                )
                raise ValueError(msg)
        if self.compress_after_days is not None and (
            self.compress_after_days < self.replay_horizon_days
        ):
            msg = (
                f"compress_after_days ({self.compress_after_days:g}) is inside the replay "
                f"horizon ({self.replay_horizon_days:g} days); replays would write into "
                "compressed chunks"
            )
            raise ValueError(msg)
        return self

    @property
    def compress_after(self) -> float:
        """Days after which TimescaleDB chunks are compressed."""
        return self.compress_after_days or self.replay_horizon_days


class DataManagerSettings(BaseSettings):
    """Everything the router needs to start. See the module docstring for precedence."""

    model_config = SettingsConfigDict(
        env_prefix="DATA_MANAGER_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
    )

    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    dragonfly: DragonflySettings = Field(default_factory=DragonflySettings)
    sqlite_path: str = Field(
        default=DEFAULT_SQLITE_PATH,
        description="Embedded SQLite file used when no PostgreSQL host is set; ':memory:' "
        "gives an in-process database.",
    )
    config_dir: Path | None = None
    strategy_file: Path | None = Field(
        default=None,
        description="Routing strategy file; default <config_dir>/hot_reload/"
        "data_manager_strategy.py.",
    )
    write_mode: WriteMode = "buffered"
    journal_dir: Path = Path(".data_manager/journal")
    journal_sync: JournalSync = Field(
        default="auto",
        description="Who writes and fsyncs journal-mode groups: 'aio' (the loop writes, Linux "
        "AIO syncs in the background; needs the libaio package), a committer 'thread' (the "
        "event loop never waits for the disk), or the event 'loop' itself (no hand-offs, "
        "most throughput, but the loop stalls for each sync); 'auto' is aio where it "
        "works, else thread.",
    )
    init_deadline_seconds: float = Field(
        default=30.0, ge=0, description="How long initialize() keeps retrying to connect."
    )
    health_timeout_seconds: float = Field(default=2.0, gt=0)
    strategy_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often the strategy file is checked for edits."
    )
    watch_strategy: bool = True
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on this port (0: a free one); None: off.",
    )
    metrics_addr: str = Field(default="127.0.0.1", description="Address the metrics server binds.")
    backup_stream_url: SecretStr | None = Field(
        default=None,
        description="Backup stream for every accepted batch: nats://host:4222 (JetStream) or "
        "redis://host:6379/0 (Redis Streams); None: off.",
    )
    retention: RetentionSettings = Field(
        default_factory=RetentionSettings,
        description="How long each kind of data is kept (DATA_MANAGER_RETENTION__TICKS_DAYS...).",
    )
    backup_stream_name: str = Field(default="DM_BACKUP", description="JetStream stream name.")
    backup_stream_key: str = Field(default="dm:backup:v1", description="Redis Streams key.")
    backup_stream_maxlen: int = Field(
        default=10_000, ge=1, description="Redis Streams MAXLEN (messages kept)."
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except PydanticValidationError as exc:
            # Not chained: pydantic's error quotes the input, which may hold a password.
            raise ConfigurationError(_format_settings_error(exc)) from None
        except SettingsError as exc:
            # pydantic-settings could not decode a variable (a JSON value that is not JSON);
            # its message names only the top-level field, so find the variable itself.
            raise ConfigurationError(_format_env_error(type(self), exc)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, StaticJsonSource(settings_cls, init_settings))

    @model_validator(mode="after")
    def _require_when_configured(self) -> DataManagerSettings:
        if self.postgres.configured and not self.postgres.database:
            ref = _static_env_ref(self.config_dir, "postgres", ("connection", "database"))
            names = " or ".join(n for n in (ref, "DATA_MANAGER_POSTGRES__DATABASE") if n)
            msg = f"PostgreSQL host {self.postgres.host!r} is set but no database is: set {names}"
            raise ConfigurationError(msg)
        return self

    @property
    def resolved_config_dir(self) -> Path:
        """The configuration folder in force."""
        return resolve_config_dir(self.config_dir)

    @property
    def resolved_strategy_file(self) -> Path:
        """The routing strategy file in force."""
        if self.strategy_file is not None:
            return self.strategy_file
        return self.resolved_config_dir / "hot_reload" / "data_manager_strategy.py"


def _format_settings_error(exc: PydanticValidationError, section: str = "") -> str:
    return "invalid data_manager configuration: " + _settings_errors(exc, section)


def _settings_errors(exc: PydanticValidationError, section: str) -> str:
    """``section.field: message`` of each error, joined; never the input (a secret)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in (section, *err["loc"]) if p != "")
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _format_env_error(settings_cls: type[BaseSettings], exc: SettingsError) -> str:
    """Name the ``DATA_MANAGER_*`` variables pydantic-settings cannot decode (never their
    values: a replica URL may hold a password)."""
    source = EnvSettingsSource(settings_cls)
    prefix = str(settings_cls.model_config.get("env_prefix", "")).lower()
    bad: list[str] = []
    for name, value in sorted(os.environ.items()):
        if not name.lower().startswith(prefix):
            continue
        # The source decodes one variable at a time, exactly as it does at construction.
        source.env_vars = {name.lower(): value}
        try:
            source()
        except (SettingsError, ValueError) as decode_error:
            cause = decode_error.__cause__ or decode_error
            bad.append(f"{name} must be JSON ({cause})")
    if not bad:
        return f"invalid data_manager configuration: {exc}"
    hint = (
        'e.g. {"1m": 90, "1d": null} for a mapping, ["host1:7000", "host2:7000"] for a '
        "list; strings inside are double-quoted"
    )
    return f"invalid data_manager configuration: {'; '.join(bad)}; {hint}"


# --------------------------------------------------------------------------- static JSON

# Seed 004 layout -> settings field. Unknown keys are reported, never silently ignored.
_POSTGRES_LAYOUT: Final[dict[tuple[str, str], str]] = {
    ("connection", "host"): "host",
    ("connection", "port"): "port",
    ("connection", "database"): "database",
    ("connection", "user"): "user",
    ("connection", "password"): "password",
    ("connection", "password_file"): "password_file",
    ("connection", "sslmode"): "sslmode",
    ("connection", "schema"): "db_schema",
    ("connection", "application_name"): "application_name",
    ("pool", "min"): "pool_min",
    ("pool", "max"): "pool_max",
    ("pool", "timeout_seconds"): "pool_timeout",
    ("pool", "hot_read_connections"): "hot_read_connections",
    ("timeouts", "connect_seconds"): "connect_timeout",
    ("timeouts", "statement_seconds"): "statement_timeout",
    ("replicas", "urls"): "replicas",
    ("replicas", "max_lag_seconds"): "replica_max_lag_seconds",
    ("replicas", "max_lag_bytes"): "replica_max_lag_bytes",
    ("replicas", "check_interval_seconds"): "replica_check_interval",
}
_DRAGONFLY_LAYOUT: Final[dict[tuple[str, str], str]] = {
    ("connection", "host"): "host",
    ("connection", "port"): "port",
    ("connection", "db"): "db",
    ("connection", "username"): "username",
    ("connection", "password"): "password",
    ("connection", "password_file"): "password_file",
    ("connection", "ssl"): "ssl",
    ("connection", "ssl_ca_certs"): "ssl_ca_certs",
    ("connection", "cluster_nodes"): "cluster_nodes",
    ("cache", "key_prefix"): "key_prefix",
    ("pool", "max"): "pool_max",
    ("timeouts", "socket_seconds"): "socket_timeout",
    ("timeouts", "connect_seconds"): "connect_timeout",
}
_LAYOUTS: Final = {"postgres": _POSTGRES_LAYOUT, "dragonfly": _DRAGONFLY_LAYOUT}


def _resolve_env_value(value: Any) -> tuple[bool, Any]:
    """Resolve ``"ENV:NAME"``: (found, value). Unset NAME falls back to ``NAME_FILE``."""
    if not (isinstance(value, str) and value.startswith("ENV:")):
        return True, value
    name = value[4:].strip()
    env_value = os.environ.get(name)
    if env_value not in (None, ""):
        return True, env_value
    file_path = os.environ.get(f"{name}_FILE")
    if file_path:
        return True, _read_secret_file(file_path, what=name)
    return False, None


def _load_static(config_dir: Path, section: str) -> dict[str, Any]:
    path = config_dir / "static" / _STATIC_FILES[section]
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        msg = f"cannot read {path}: {exc}"
        raise ConfigurationError(msg) from exc
    if not isinstance(raw, dict):
        msg = f"{path} must hold a JSON object"
        raise ConfigurationError(msg)
    layout = _LAYOUTS[section]
    out: dict[str, Any] = {}
    for group, body in raw.items():
        if group.startswith("_"):  # "_comment" and the like
            continue
        if not isinstance(body, dict):
            msg = f"{path}: {group!r} must be an object"
            raise ConfigurationError(msg)
        for key, value in body.items():
            field = layout.get((group, key))
            if field is None:
                msg = f"{path}: unknown setting {group}.{key}"
                raise ConfigurationError(msg)
            if isinstance(value, list):  # e.g. replica URLs: unset ENV: items are dropped
                resolved_items = [
                    item
                    for found, item in map(_resolve_env_value, value)
                    if found and item not in (None, "")
                ]
                if resolved_items:
                    out[field] = resolved_items
                continue
            found, resolved = _resolve_env_value(value)
            if found and resolved not in (None, ""):
                out[field] = resolved
    return out


def _static_env_ref(config_dir: Path | None, section: str, key: tuple[str, str]) -> str | None:
    """The ``ENV:`` name the static file uses for ``key``, for error messages."""
    path = resolve_config_dir(config_dir) / "static" / _STATIC_FILES[section]
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        value = raw[key[0]][key[1]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value[4:] if isinstance(value, str) and value.startswith("ENV:") else None


class StaticJsonSource(PydanticBaseSettingsSource):
    """Reads ``static/postgresql.json`` and ``static/dragonflydb.json`` (seed 004 format)."""

    def __init__(
        self, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource
    ) -> None:
        super().__init__(settings_cls)
        self._init_settings = init_settings

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole mapping

    def __call__(self) -> dict[str, Any]:
        explicit = self._init_settings().get("config_dir")
        config_dir = resolve_config_dir(explicit)
        data: dict[str, Any] = {}
        for section in _STATIC_FILES:
            values = _load_static(config_dir, section)
            if values:
                data[section] = values
        return data
