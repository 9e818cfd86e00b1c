"""Configuration precedence, static JSON, ENV references, secrets."""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path

import pytest

from data_manager import (
    ConfigurationError,
    DataManagerSettings,
    DragonflySettings,
    PostgresSettings,
)
from data_manager.settings import RetentionSettings

ENV_NAMES = (
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_PASSWORD_FILE",
    "POSTGRES_SSLMODE",
    "DRAGONFLY_HOST",
    "DRAGONFLY_PORT",
    "DRAGONFLY_USERNAME",
    "DRAGONFLY_PASSWORD",
    "DATA_MANAGER_CONFIG_DIR",
    "DATA_MANAGER_POSTGRES__HOST",
    "DATA_MANAGER_POSTGRES__PORT",
    "DATA_MANAGER_POSTGRES__URL",
    "DATA_MANAGER_SQLITE_PATH",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./config here: the packaged defaults apply


def write_static(folder: Path, name: str, body: dict[str, object]) -> Path:
    static = folder / "static"
    static.mkdir(parents=True, exist_ok=True)
    (static / name).write_text(json.dumps(body))
    return folder


def test_nothing_configured_means_embedded_and_no_l2() -> None:
    s = DataManagerSettings()
    assert not s.postgres.configured
    assert not s.dragonfly.configured
    assert s.sqlite_path.endswith("data_manager.sqlite3")


def test_shipped_static_files_read_seed_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_HOST", "db.internal")
    monkeypatch.setenv("POSTGRES_PORT", "6543")
    monkeypatch.setenv("POSTGRES_DB", "market")
    monkeypatch.setenv("POSTGRES_USER", "collector")
    monkeypatch.setenv("POSTGRES_PASSWORD", "s3cr3t-pw")
    monkeypatch.setenv("DRAGONFLY_HOST", "cache.internal")
    monkeypatch.setenv("DRAGONFLY_PASSWORD", "cache-pw")
    s = DataManagerSettings()
    assert (s.postgres.host, s.postgres.port, s.postgres.database) == (
        "db.internal",
        6543,
        "market",
    )
    assert s.postgres.user == "collector"
    assert s.postgres.resolved_password() == "s3cr3t-pw"
    assert (s.postgres.pool_min, s.postgres.pool_max) == (5, 20)
    assert s.dragonfly.host == "cache.internal"
    assert s.dragonfly.resolved_password() == "cache-pw"


def test_precedence_explicit_over_env_over_static_over_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = write_static(
        tmp_path / "cfg",
        "postgresql.json",
        {"connection": {"host": "from-json", "port": 1111, "database": "d"}, "pool": {"min": 2}},
    )
    monkeypatch.setenv("DATA_MANAGER_CONFIG_DIR", str(cfg))
    s = DataManagerSettings()
    assert (s.postgres.host, s.postgres.port, s.postgres.pool_min) == ("from-json", 1111, 2)
    assert s.postgres.pool_max == 20  # code default
    monkeypatch.setenv("DATA_MANAGER_POSTGRES__PORT", "2222")
    s = DataManagerSettings()
    assert s.postgres.port == 2222  # env beats JSON
    assert s.postgres.host == "from-json"
    explicit = DataManagerSettings(postgres=PostgresSettings(host="explicit", database="e"))
    assert explicit.postgres.host == "explicit"
    assert explicit.postgres.port == 5432  # the explicit object is taken whole


def test_env_reference_to_a_file_for_passwords(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n")
    monkeypatch.setenv("POSTGRES_HOST", "db")
    monkeypatch.setenv("POSTGRES_DB", "d")
    monkeypatch.setenv("POSTGRES_PASSWORD_FILE", str(secret))
    assert DataManagerSettings().postgres.resolved_password() == "from-a-file"


def test_missing_required_variable_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_HOST", "db")
    with pytest.raises(ConfigurationError, match="POSTGRES_DB"):
        DataManagerSettings()


def test_invalid_values_are_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_HOST", "db")
    monkeypatch.setenv("POSTGRES_DB", "d")
    monkeypatch.setenv("POSTGRES_PORT", "not-a-port")
    with pytest.raises(ConfigurationError, match="port"):
        DataManagerSettings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATA_MANAGER_RETENTION__CANDLES_TIMEFRAME_DAYS", "{1m: 90}"),  # keys unquoted
        ("DATA_MANAGER_DRAGONFLY__CLUSTER_NODES", "node1:7000,node2:7000"),
        ("DATA_MANAGER_POSTGRES__REPLICAS", "postgresql://app:s3cr3t-pw@replica1:5432/market"),
        ("DATA_MANAGER_RETENTION", "{ticks_days: 30}"),
    ],
)
def test_a_variable_that_is_not_json_names_itself(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv("DATA_MANAGER_POSTGRES__HOST", "db")  # not JSON, and need not be
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=rf"{name} must be JSON") as caught:
        DataManagerSettings()
    assert "POSTGRES__HOST" not in str(caught.value)
    assert "s3cr3t-pw" not in str(caught.value)  # values are never echoed


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("DATA_MANAGER_RETENTION__TICKS_DAYS", "inf", r"retention\.ticks_days: .*finite.*for ever"),
        ("DATA_MANAGER_RETENTION__ORDER_FLOW_DAYS", "Infinity", "order_flow_days.*finite"),
        ("DATA_MANAGER_RETENTION__CANDLES_TIMEFRAME_DAYS", '{"1m": "inf"}', r"\['1m'\].*finite"),
        ("DATA_MANAGER_RETENTION__CANDLES_TIMEFRAME_DAYS", '{"1m": "nan"}', r"\['1m'\].*finite"),
        ("DATA_MANAGER_RETENTION__REPLAY_HORIZON_DAYS", "inf", "replay_horizon_days.*finite"),
    ],
)
def test_an_infinite_retention_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, match: str
) -> None:
    # "For ever" is None (unset); an infinite cutoff cannot be computed.
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=match):
        DataManagerSettings()
    with pytest.raises(ValueError, match="finite"):
        RetentionSettings(candles_days=float("inf"))
    assert RetentionSettings(candles_timeframe_days={"1d": None}).candles_timeframe_days == {
        "1d": None
    }


def test_journal_sync_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DataManagerSettings().journal_sync == "auto"
    monkeypatch.setenv("DATA_MANAGER_JOURNAL_SYNC", "loop")
    assert DataManagerSettings().journal_sync == "loop"
    monkeypatch.setenv("DATA_MANAGER_JOURNAL_SYNC", "aio")
    assert DataManagerSettings().journal_sync == "aio"
    monkeypatch.setenv("DATA_MANAGER_JOURNAL_SYNC", "disk")
    with pytest.raises(ConfigurationError, match="journal_sync"):
        DataManagerSettings()


def test_unknown_static_key_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = write_static(tmp_path / "c", "postgresql.json", {"connection": {"hots": "typo"}})
    monkeypatch.setenv("DATA_MANAGER_CONFIG_DIR", str(cfg))
    with pytest.raises(ConfigurationError, match=r"connection\.hots"):
        DataManagerSettings()


def test_local_config_folder_is_used_when_present(tmp_path: Path) -> None:
    write_static(tmp_path / "config", "dragonflydb.json", {"connection": {"host": "local-cfg"}})
    assert DataManagerSettings().dragonfly.host == "local-cfg"


def test_url_parsing_and_secrets_never_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_MANAGER_POSTGRES__URL", "postgresql://u:topsecret@h:5433/d")
    s = DataManagerSettings()
    assert (s.postgres.host, s.postgres.port, s.postgres.user, s.postgres.database) == (
        "h",
        5433,
        "u",
        "d",
    )
    assert s.postgres.resolved_password() == "topsecret"
    for text in (repr(s), str(s), repr(s.postgres), s.postgres.target):
        assert "topsecret" not in text


def test_url_query_parameters_are_applied_and_a_socket_folder_is_a_host() -> None:
    s = DataManagerSettings(
        postgres={"url": "postgresql://u:pw@/d?host=/var/run/postgresql&port=5433&sslmode=require"}
    )
    assert (s.postgres.host, s.postgres.port, s.postgres.database, s.postgres.sslmode) == (
        "/var/run/postgresql",
        5433,
        "d",
        "require",
    )
    assert s.postgres.configured  # a socket folder is a server, not "use the embedded SQLite"
    assert DataManagerSettings(dragonfly={"url": "redis://c:6380?db=3"}).dragonfly.db == 3


@pytest.mark.parametrize(
    ("section", "url", "message"),
    [
        ("postgres", "mysql://u:topsecret@h/d", "scheme mysql:// is not supported"),
        ("postgres", "h:5432/d", "scheme h:// is not supported"),
        ("postgres", "postgresql://u:topsecret@h/d?gssencmode=disable", "'gssencmode'"),
        ("postgres", "postgresql://u:topsecret@h/d?sslmode=a&sslmode=b", "given 2 times"),
        ("postgres", "postgresql://u:topsecret@h:70000/d", "invalid port"),
        ("dragonfly", "http://u:topsecret@c:6379/0", "scheme http:// is not supported"),
        ("dragonfly", "unix:///tmp/redis.sock", "scheme unix:// is not supported"),
        ("dragonfly", "redis://u:topsecret@c/0?protocol=3", "'protocol'"),
        # A raw '/', '#' or '?' in a password: the message must not quote what follows.
        ("postgres", "postgresql://u:top/topsecret@h:5432/d", "invalid port"),
        ("postgres", "postgresql://u:top#topsecret@h:5432/d", "invalid port"),
        ("postgres", "postgresql://u:top?topsecret@h:5432/d", "invalid port"),
        ("postgres", "postgresql://u@h/d?topsecret@h", "parameter that is not a name"),
        ("dragonfly", "redis://u:top?topsecret@c:6379/0", "invalid port"),
        # ...after digits it reads as a port: the rest of the password, the host and the
        # database were taken for a database name, shown wherever the target is.
        ("postgres", "postgresql://u:2024/topsecret@h.example.com/d", "'@' after its host"),
        ("dragonfly", "redis://:2024/topsecret@c/0", "'@' after its host"),
    ],
)
def test_a_url_the_sdk_would_misread_is_refused_without_its_password(
    section: str, url: str, message: str
) -> None:
    # A wrong scheme or an unknown parameter was dropped in silence before: a mysql:// URL
    # was tried as PostgreSQL, and ?host=/socket/folder left no host, so SQLite was used.
    with pytest.raises(ConfigurationError, match=f"{section}: .*{re.escape(message)}") as info:
        DataManagerSettings(**{section: {"url": url}})
    assert "topsecret" not in "".join(traceback.format_exception(info.value))  # chain too
    cls = PostgresSettings if section == "postgres" else DragonflySettings
    with pytest.raises(ConfigurationError, match=re.escape(message)) as info:
        cls(url=url)
    assert "topsecret" not in "".join(traceback.format_exception(info.value))


def test_a_cluster_node_given_as_a_url_is_refused_without_its_password() -> None:
    node = "redis://:topsecret@127.0.0.1:7000"  # (a literal here would be in the traceback)
    with pytest.raises(ConfigurationError, match="host:port") as info:
        DataManagerSettings(dragonfly={"cluster_nodes": [node]})
    assert "topsecret" not in "".join(traceback.format_exception(info.value))


def test_a_statement_timeout_postgresql_cannot_take_is_refused() -> None:
    # Milliseconds in a 32-bit int: beyond, every connection failed at initialize().
    with pytest.raises(ConfigurationError, match="statement_timeout"):
        PostgresSettings(statement_timeout=1e30)
    assert PostgresSettings(statement_timeout=86_400).statement_timeout == 86_400


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://r/d", r"postgres\.replicas\.0: url: .*mysql://"),
        ("postgresql://r/d?sslmode=requird", r"postgres\.replicas\.0: url\.sslmode: "),
        ("postgresql://r/d?connect_timeout=0", r"postgres\.replicas\.0: url\.connect_timeout: "),
    ],
)
def test_a_replica_url_is_checked_with_the_settings(url: str, message: str) -> None:
    # Not when the replica is opened, blaming the primary's field.
    with pytest.raises(ConfigurationError, match=message):
        DataManagerSettings(postgres={"host": "h", "database": "d", "replicas": [url]})


def test_a_percent_encoded_socket_folder_is_decoded_with_its_case() -> None:
    # libpq's other spelling of ?host=: the host percent-encoded. urlsplit's hostname is
    # lower-cased and still encoded; it was taken as a TCP host name "%2fvar%2frun%2fpg".
    s = DataManagerSettings(postgres={"url": "postgresql://u@%2FVar%2FRun%2FPG:5433/d"})
    assert (s.postgres.host, s.postgres.port, s.postgres.database) == ("/Var/Run/PG", 5433, "d")
    assert DataManagerSettings(postgres={"url": "postgresql://u@DB.Example/d"}).postgres.host == (
        "db.example"
    )


def test_driver_schemes_empty_values_and_a_query_host_are_read_as_libpq_does() -> None:
    s = DataManagerSettings(
        postgres={"url": "postgresql+psycopg://u@localhost/d?host=/tmp/pg&sslmode=&port=5433"}
    )
    # The query's host wins over the URL's; an empty value is the default.
    assert (s.postgres.host, s.postgres.port, s.postgres.sslmode) == ("/tmp/pg", 5433, None)


def test_backend_settings_built_alone_raise_the_sdks_error() -> None:
    with pytest.raises(ConfigurationError, match=r"dragonfly\.port: "):
        DragonflySettings(port=0)
    with pytest.raises(ConfigurationError, match=r"postgres\.statement_timeout: "):
        PostgresSettings(statement_timeout=0)


def test_tls_and_acl_username(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_HOST", "db")
    monkeypatch.setenv("POSTGRES_DB", "d")
    monkeypatch.setenv("POSTGRES_SSLMODE", "verify-full")
    monkeypatch.setenv("DRAGONFLY_HOST", "c")
    monkeypatch.setenv("DRAGONFLY_USERNAME", "engine")
    s = DataManagerSettings()
    assert s.postgres.sslmode == "verify-full"
    assert s.dragonfly.username == "engine"
    monkeypatch.setenv("POSTGRES_SSLMODE", "sometimes")
    with pytest.raises(ConfigurationError, match="sslmode"):
        DataManagerSettings()


def test_repo_config_matches_packaged_defaults() -> None:
    root = Path(__file__).resolve().parents[2]
    for rel in ("static/postgresql.json", "static/dragonflydb.json"):
        assert (root / "config" / rel).read_bytes() == (
            root / "data_manager" / "_defaults" / rel
        ).read_bytes()


@pytest.mark.parametrize("pool_min", [0, -1])
def test_pool_min_below_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pool_min: int
) -> None:
    # SQLAlchemy's pool treats pool_size 0 as "no limit": pool_max would bound nothing.
    message = "pool_min must be at least 1"
    with pytest.raises(ConfigurationError, match=message):
        PostgresSettings(pool_min=pool_min, pool_max=2)
    with pytest.raises(ConfigurationError, match=message):
        DataManagerSettings(postgres={"pool_min": pool_min, "pool_max": 2})
    monkeypatch.setenv("DATA_MANAGER_POSTGRES__POOL_MIN", str(pool_min))
    with pytest.raises(ConfigurationError, match=message):
        DataManagerSettings()
    monkeypatch.delenv("DATA_MANAGER_POSTGRES__POOL_MIN")
    folder = write_static(tmp_path / "cfg", "postgresql.json", {"pool": {"min": pool_min}})
    monkeypatch.setenv("DATA_MANAGER_CONFIG_DIR", str(folder))
    with pytest.raises(ConfigurationError, match=message):
        DataManagerSettings()
    assert PostgresSettings(pool_min=1, pool_max=2).pool_min == 1
