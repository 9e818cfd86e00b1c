"""The ``data-manager`` CLI and the runnable examples, as separate processes against real
servers: help, health exit codes, import with bad rows, export/import round trips, retention,
journal inspect/replay after a database outage, SIGTERM during long work, bench, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from data_manager import DataManagerSettings, DataRouter, PostgresSettings, TickData
from data_manager.cli import inspect_journals
from data_manager.strategy import RoutingStrategy, strategy_from_mapping
from data_manager.stream import encode_batch_message
from tests.servers import free_port

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.servers import PostgresServer

ROOT: Final = Path(__file__).resolve().parents[2]
T0: Final = 1_727_996_400_000  # 2024-10-03T23:00:00Z
DEADLINE: Final = 60.0
COMMANDS: Final = (
    (),
    ("demo",),
    ("health",),
    ("init-db",),
    ("import",),
    ("export",),
    ("retention",),
    ("retention", "show"),
    ("retention", "apply"),
    ("journal",),
    ("journal", "inspect"),
    ("journal", "replay"),
    ("bench",),
    ("serve-metrics",),
)


# --------------------------------------------------------------------------- helpers


def base_env(tmp_path: Path) -> dict[str, str]:
    """The machine's environment without any data_manager configuration, plus local paths."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSTGRES_", "DRAGONFLY_"))
        and not (k.startswith("DATA_MANAGER_") and not k.startswith("DATA_MANAGER_TEST_"))
    }
    env.update(
        DATA_MANAGER_JOURNAL_DIR=str(tmp_path / "journal"),
        DATA_MANAGER_SQLITE_PATH=str(tmp_path / "store.sqlite3"),
        DATA_MANAGER_WATCH_STRATEGY="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        COLUMNS="200",  # wide help and tables, no wrapping surprises
    )
    return env


def with_postgres(env: dict[str, str], url: str, schema: str) -> dict[str, str]:
    parts = urlsplit(url)
    out = dict(env)
    out.update(
        POSTGRES_HOST=parts.hostname or "127.0.0.1",
        POSTGRES_PORT=str(parts.port or 5432),
        POSTGRES_DB=parts.path.lstrip("/"),
        POSTGRES_USER=parts.username or "postgres",
        DATA_MANAGER_POSTGRES__DB_SCHEMA=schema,
    )
    if parts.password:
        out["POSTGRES_PASSWORD"] = parts.password
    return out


def with_redis(env: dict[str, str], url: str, prefix: str) -> dict[str, str]:
    parts = urlsplit(url)
    out = dict(env)
    out.update(
        DRAGONFLY_HOST=parts.hostname or "127.0.0.1",
        DRAGONFLY_PORT=str(parts.port or 6379),
        DATA_MANAGER_DRAGONFLY__KEY_PREFIX=prefix,
    )
    return out


def cli(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "data_manager", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "data_manager", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


async def pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return [tuple(r) for r in await conn.fetch(sql, timeout=10)]
    finally:
        await conn.close(timeout=10)


async def pg_count(url: str, schema: str, table: str = "ticks") -> int:
    rows = await pg_rows(url, f'SELECT count(*) FROM "{schema}".{table}')
    return int(rows[0][0])


def held_strategy() -> RoutingStrategy:
    """No derived data, and batches that never leave before close()."""
    return strategy_from_mapping(
        {
            "aggregation": {"enabled": False},
            "order_flow": {"enabled": False},
            "batch": {"size": 50_000, "flush_interval_seconds": 3600},  # nothing leaves early
        }
    )


async def until(condition: Callable[[], Any], what: str) -> None:
    """Poll another process's progress with a deadline."""
    deadline = time.monotonic() + DEADLINE
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def write_ticks_csv(path: Path, n: int, *, bad_every: int = 0) -> int:
    """``n`` tick rows (every ``bad_every``-th with ask below bid); returns the good ones."""
    good = 0
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["symbol", "timestamp", "bid", "ask", "source", "volume", "seq"])
        for i in range(n):
            bad = bad_every and i % bad_every == bad_every - 1
            ask = 1.0 if bad else 1.1002 + (i % 7) * 1e-5
            out.writerow(["EUR/USD", T0 + i, 1.1, ask, "csv", i % 13 or "", i])
            good += not bad
    return good


# --------------------------------------------------------------------------- help


def test_every_command_has_help(tmp_path: Path) -> None:
    env = base_env(tmp_path)

    def run(args: tuple[str, ...]) -> tuple[tuple[str, ...], subprocess.CompletedProcess[str]]:
        return args, cli(*args, "--help", env=env, cwd=tmp_path, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, COMMANDS))
    for args, proc in results:
        assert proc.returncode == 0, f"{args}: {explain(proc)}"
        assert "Usage" in proc.stdout, args
    commands = dict(results)
    for name in ("import", "export", "retention", "journal", "bench", "serve-metrics"):
        assert name in commands[()].stdout
    assert "Example" in commands[("import",)].stdout


# --------------------------------------------------------------------------- health


@pytest.mark.postgres
@pytest.mark.redis
def test_health_exit_codes(
    tmp_path: Path, postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str
) -> None:
    env = base_env(tmp_path)
    pg = with_postgres(env, postgres_url, pg_schema)

    healthy = cli("health", "--json", env=with_redis(pg, redis_url, redis_prefix), cwd=tmp_path)
    assert healthy.returncode == 0, explain(healthy)
    assert json.loads(healthy.stdout)["status"] == "healthy"

    # Redis down: the database answers, the cache does not -> degraded.
    no_redis = with_redis(pg, f"redis://127.0.0.1:{free_port()}/0", redis_prefix)
    degraded = cli("health", "--json", env=no_redis, cwd=tmp_path)
    assert degraded.returncode == 1, explain(degraded)
    report = json.loads(degraded.stdout)
    assert report["status"] == "degraded"
    assert report["cache"]["l2_reachable"] is False

    # PostgreSQL on a closed port -> unhealthy, quickly.
    closed = dict(pg, POSTGRES_PORT=str(free_port()))
    began = time.monotonic()
    down = cli("health", "--json", "--timeout", "1", env=closed, cwd=tmp_path)
    assert down.returncode == 2, explain(down)
    assert json.loads(down.stdout)["status"] == "unhealthy"
    assert time.monotonic() - began < 30
    plain = cli("health", "--timeout", "1", env=closed, cwd=tmp_path)
    assert plain.returncode == 2
    assert "unhealthy" in plain.stderr


def test_health_of_the_embedded_store(tmp_path: Path) -> None:
    proc = cli("health", env=base_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert "healthy" in proc.stdout
    assert "l2: not configured" in proc.stdout


def test_health_with_a_variable_that_is_not_json_is_unhealthy(tmp_path: Path) -> None:
    env = dict(base_env(tmp_path), DATA_MANAGER_RETENTION__CANDLES_TIMEFRAME_DAYS="{1m: 90}")
    proc = cli("health", "--json", env=env, cwd=tmp_path)
    assert proc.returncode == 2, explain(proc)  # a broken configuration, not a traceback
    report = json.loads(proc.stdout)
    assert report["status"] == "unhealthy"
    assert "DATA_MANAGER_RETENTION__CANDLES_TIMEFRAME_DAYS must be JSON" in report["reason"]


# --------------------------------------------------------------------------- import / export


@pytest.mark.postgres
async def test_import_reports_bad_rows_and_stores_the_good_ones(
    tmp_path: Path, postgres_url: str, pg_schema: str
) -> None:
    path = tmp_path / "ticks.csv"
    good = write_ticks_csv(path, 1000, bad_every=100)
    with path.open("a") as fh:
        fh.write("EUR/USD,1727996400,1.1,1.1002,csv,,\n")  # seconds, not ms: line 1002
    env = with_postgres(base_env(tmp_path), postgres_url, pg_schema)
    proc = cli(
        "import", str(path), "--kind", "ticks", "--batch-size", "300", "--json",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, explain(proc)  # completed, with rejected rows
    report = json.loads(proc.stdout)
    assert (report["rows"], report["accepted"], report["rejected"]) == (1001, good, 11)
    assert report["stored"] == good == 990
    reasons = report["reasons"]
    assert reasons["ask N is below bid N for EUR/USD"]["count"] == 10
    assert reasons["ask N is below bid N for EUR/USD"]["first_lines"] == [101, 201, 301, 401, 501]
    assert reasons["timestamp=N looks like seconds, not Unix milliseconds"]["first_lines"] == [1002]
    rows = await pg_rows(postgres_url, f'SELECT seq FROM "{pg_schema}".ticks ORDER BY seq')
    assert [r[0] for r in rows] == [i for i in range(1000) if i % 100 != 99]

    table = cli("import", str(path), "--kind", "ticks", env=env, cwd=tmp_path)
    assert table.returncode == 1
    assert "0 new rows stored" in table.stdout  # the re-run stores nothing twice
    assert "rejected rows" in table.stdout


@pytest.mark.postgres
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_import_round_trip(
    tmp_path: Path, postgres_url: str, pg_schema: str, fmt: str
) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    source = tmp_path / "source.csv"
    write_ticks_csv(source, 700)
    candles = tmp_path / "bars.csv"
    candles.write_text(
        "timestamp,open,high,low,close,volume\n"
        + "".join(
            f"{T0 + i * 3_600_000},1.1,1.2,1.0,{1.1 + i / 1000},{i or ''}\n" for i in range(50)
        )
    )
    pg = with_postgres(base_env(tmp_path), postgres_url, pg_schema)
    for args in (
        ("import", str(source), "-k", "ticks"),
        ("import", str(candles), "-k", "candles", "--symbol", "EURUSD", "--timeframe", "1h",
         "--source", "hist"),
    ):  # fmt: skip
        proc = cli(*args, env=pg, cwd=tmp_path)
        assert proc.returncode == 0, explain(proc)

    def export(env: dict[str, str], name: str) -> tuple[Path, Path]:
        ticks_out, bars_out = tmp_path / f"{name}-t.{fmt}", tmp_path / f"{name}-c.{fmt}"
        for args in (
            ("export", str(ticks_out), "-k", "ticks", "-s", "EUR/USD", "--start",
             "2024-10-03T23:00:00.100Z", "--end", str(T0 + 650), "--batch-size", "64"),
            ("export", str(bars_out), "-k", "candles", "-s", "EUR/USD", "--timeframe", "1h"),
        ):  # fmt: skip
            proc = cli(*args, "--json", env=env, cwd=tmp_path)
            assert proc.returncode == 0, explain(proc)
        return ticks_out, bars_out

    ticks_a, bars_a = export(pg, "pg")
    # Into the embedded store (another backend), then out again: the same rows.
    embedded = base_env(tmp_path)
    for path, kind in ((ticks_a, "ticks"), (bars_a, "candles")):
        proc = cli("import", str(path), "-k", kind, "--json", env=embedded, cwd=tmp_path)
        assert proc.returncode == 0, explain(proc)
        assert json.loads(proc.stdout)["rejected"] == 0
    ticks_b, bars_b = export(embedded, "sqlite")
    if fmt == "csv":
        assert ticks_a.read_text() == ticks_b.read_text()
        assert bars_a.read_text() == bars_b.read_text()
        assert len(ticks_a.read_text().splitlines()) == 1 + 550  # [T0+100, T0+650)
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        assert pq.read_table(ticks_a).equals(pq.read_table(ticks_b))
        assert pq.read_table(bars_a).equals(pq.read_table(bars_b))
        assert pq.read_table(ticks_a).num_rows == 550


# --------------------------------------------------------------------------- failures


def one_line_failure(proc: subprocess.CompletedProcess[str], said: str) -> None:
    """Exit 2 with a one-line message on stderr, as every failed command reports it."""
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, explain(proc)
    assert said in lines[0], explain(proc)


def test_an_empty_sqlite_path_is_a_configuration_failure(tmp_path: Path) -> None:
    env = dict(base_env(tmp_path), DATA_MANAGER_SQLITE_PATH="")
    health = cli("health", env=env, cwd=tmp_path)
    one_line_failure(health, "DATA_MANAGER_SQLITE_PATH is empty")  # unhealthy, not "degraded"
    as_json = cli("health", "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 2, explain(as_json)
    assert "DATA_MANAGER_SQLITE_PATH is empty" in json.loads(as_json.stdout)["reason"]
    one_line_failure(cli("init-db", env=env, cwd=tmp_path), "init-db failed")


def test_journal_replay_with_invalid_settings_is_a_failure(tmp_path: Path) -> None:
    env = dict(base_env(tmp_path), DATA_MANAGER_WRITE_MODE="bogus")
    for command in ("inspect", "replay"):
        proc = cli("journal", command, env=env, cwd=tmp_path)
        one_line_failure(proc, f"journal {command} failed")
        assert "write_mode" in proc.stderr, explain(proc)


def test_import_of_a_file_that_is_not_utf8_is_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(
        b"symbol,timestamp,bid,ask,source,use_case\n"
        b"EUR/USD,1727996400000,1.1,1.1002,csv,spot\n"
        b"EUR/USD,1727996400001,1.1,1.1002,csv,caf\xe9\n"  # Latin-1, in the first read
    )
    proc = cli("import", str(path), "--kind", "ticks", env=base_env(tmp_path), cwd=tmp_path)
    one_line_failure(proc, "import failed: the file is not UTF-8 text (near line 3)")


def test_export_into_a_missing_folder_is_a_failure(tmp_path: Path) -> None:
    target = tmp_path / "absent" / "out.csv"
    proc = cli("export", str(target), "-k", "ticks", "-s", "EUR/USD", env=base_env(tmp_path),
               cwd=tmp_path)  # fmt: skip
    one_line_failure(proc, "export failed: cannot write")
    assert "no such folder" in proc.stderr, explain(proc)
    assert not target.parent.exists()


# --------------------------------------------------------------------------- retention


@pytest.mark.postgres
async def test_retention_dry_run_then_apply(
    tmp_path: Path, postgres_url: str, pg_schema: str
) -> None:
    path = tmp_path / "ticks.csv"
    write_ticks_csv(path, 100)  # T0 .. T0+99
    env = with_postgres(base_env(tmp_path), postgres_url, pg_schema)
    assert cli("import", str(path), "-k", "ticks", env=env, cwd=tmp_path).returncode == 0
    now = str(T0 + 86_400_000 + 40)  # one day after T0+40: ticks before T0+40 expire
    dry = cli(
        "retention", "apply", "--dry-run", "--ticks-days", "1", "--now", now, "--json",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert dry.returncode == 0, explain(dry)
    assert json.loads(dry.stdout)["rules"][0]["rows"] == 40
    assert await pg_count(postgres_url, pg_schema) == 100
    show = cli("retention", "show", env=env, cwd=tmp_path)
    assert show.returncode == 0, explain(show)
    assert "everything is kept" in show.stdout  # nothing configured in the environment
    applied = cli(
        "retention", "apply", "--ticks-days", "1", "--now", now, "--json", env=env, cwd=tmp_path
    )
    assert applied.returncode == 0, explain(applied)
    assert json.loads(applied.stdout)["rows"] == 40
    rows = await pg_rows(postgres_url, f'SELECT min(seq), count(*) FROM "{pg_schema}".ticks')
    assert rows == [(40, 60)]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--ticks-days", "inf"), "ticks_days must be a finite number of days"),
        (
            ("--timeframe-days", "1m=ninety"),
            "a number of days or 'forever' after 1m=, got 'ninety'",
        ),
    ],
)
def test_retention_with_bad_days_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    proc = cli("retention", "show", *args, env=base_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    assert said in " ".join(proc.stderr.split()), explain(proc)  # rich wraps the box


# --------------------------------------------------------------------------- journal


@pytest.mark.slow
@pytest.mark.postgres
async def test_journal_inspect_and_replay_after_an_outage(
    tmp_path: Path, postgres_server_factory: Callable[[], PostgresServer]
) -> None:
    server = postgres_server_factory()
    schema, journal, n = "cli_journal", tmp_path / "journal", 500
    settings = DataManagerSettings(
        postgres=PostgresSettings(url=server.url, db_schema=schema, pool_min=1, pool_max=2),
        journal_dir=journal,
        watch_strategy=False,
    )
    router = DataRouter(settings, strategy=held_strategy())
    await router.initialize()
    for i in range(n):
        await router.save_tick(
            TickData(symbol="EUR/USD", timestamp=T0 + i, bid=1.1, ask=1.1002, source="j", seq=i)
        )
    await asyncio.to_thread(server.stop)
    await router.close(timeout=5)  # the database is down: what is queued goes to the journal
    assert inspect_journals(journal).orphan_records == n

    env = with_postgres(base_env(tmp_path), server.url, schema)
    seen = cli("journal", "inspect", "--dir", str(journal), "--json", env=env, cwd=tmp_path)
    assert seen.returncode == 0, explain(seen)
    summary = json.loads(seen.stdout)
    assert (summary["orphans"], summary["orphan_records"]) == (1, n)
    assert summary["instances"][0]["kinds"] == {"tick": n}
    table = cli("journal", "inspect", "--dir", str(journal), env=env, cwd=tmp_path)
    assert f"1 orphaned, {n} records to replay" in table.stdout

    await asyncio.to_thread(server.start)
    replay = cli("journal", "replay", "--dir", str(journal), "--json", env=env, cwd=tmp_path)
    assert replay.returncode == 0, explain(replay)
    result = json.loads(replay.stdout)
    assert (result["records_before"], result["replayed"], result["records_left"]) == (n, n, 0)
    rows = await pg_rows(server.url, f'SELECT count(*), count(DISTINCT seq) FROM "{schema}".ticks')
    assert rows == [(n, n)]
    assert inspect_journals(journal).instances == []


@pytest.mark.slow
@pytest.mark.postgres
async def test_journal_replay_with_a_hanging_database_ends_within_its_timeout(
    tmp_path: Path, postgres_url: str, pg_schema: str
) -> None:
    journal, n = tmp_path / "journal", 50
    settings = DataManagerSettings(
        postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema, pool_min=1, pool_max=2),
        journal_dir=journal,
        watch_strategy=False,
    )
    lock = await asyncpg.connect(postgres_url, timeout=10)
    try:
        router = DataRouter(settings, strategy=held_strategy())
        await router.initialize()
        # The database hangs (it neither answers nor refuses): every write waits on the lock.
        async with lock.transaction():
            await lock.execute(f'LOCK TABLE "{pg_schema}".ticks IN ACCESS EXCLUSIVE MODE')
            for i in range(n):
                await router.save_tick(
                    TickData(
                        symbol="EUR/USD", timestamp=T0 + i, bid=1.1, ask=1.1002, source="j", seq=i
                    )
                )
            await router.close(timeout=1)  # what the database did not take goes to the journal
            assert inspect_journals(journal).orphan_records == n

            env = with_postgres(base_env(tmp_path), postgres_url, pg_schema)
            began = time.monotonic()
            # Far below the statement timeout (30 s) a close without a bound would wait for.
            replay = await asyncio.to_thread(
                cli, "journal", "replay", "--dir", str(journal), "--timeout", "1", "--json",
                env=env, cwd=tmp_path, timeout=25,
            )  # fmt: skip
            took = time.monotonic() - began
    finally:
        await lock.close(timeout=10)
    assert replay.returncode == 1, explain(replay)
    assert json.loads(replay.stdout)["records_left"] == n
    assert "replay not finished after 1 s" in replay.stderr
    assert took < 25


# --------------------------------------------------------------------------- signals


@pytest.mark.slow
@pytest.mark.postgres
async def test_sigterm_during_import_stops_cleanly(
    tmp_path: Path, postgres_url: str, pg_schema: str
) -> None:
    path = tmp_path / "big.csv"
    write_ticks_csv(path, 400_000)
    env = with_postgres(base_env(tmp_path), postgres_url, pg_schema)
    proc = spawn("import", str(path), "-k", "ticks", "--batch-size", "2000", "--json", env=env,
                 cwd=tmp_path)  # fmt: skip

    async def some_stored() -> bool:
        with contextlib.suppress(asyncpg.UndefinedTableError):
            return await pg_count(postgres_url, pg_schema) > 0
        return False

    try:
        await until(some_stored, "the first batches")
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, f"{proc.returncode}\n{out}\n{err}"
    assert "stopped by SIGTERM" in err
    report = json.loads(out)
    assert report["interrupted"] is True
    stored = await pg_count(postgres_url, pg_schema)
    assert 0 < report["stored"] < 400_000
    # The batch in flight at the signal is all or nothing.
    assert stored in (report["stored"], report["stored"] + 2000)
    assert inspect_journals(tmp_path / "journal").instances == []  # closed, nothing left


@pytest.mark.slow
async def test_sigterm_during_demo_flushes_and_closes(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    proc = spawn("demo", "--ticks", "5000000", env=env, cwd=tmp_path)
    db = tmp_path / "store.sqlite3"

    def stored() -> int:
        try:
            with contextlib.closing(sqlite3.connect(str(db), timeout=5)) as conn:
                return int(conn.execute("SELECT count(*) FROM ticks").fetchone()[0])
        except sqlite3.OperationalError:  # not created yet
            return 0

    async def started() -> bool:
        return await asyncio.to_thread(stored) > 0

    try:
        await until(started, "the demo's first stored ticks")
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, f"{proc.returncode}\n{out}\n{err}"
    assert "demo stopped by SIGTERM" in err
    assert "unclosed DataRouter" not in err
    summary = inspect_journals(tmp_path / "journal")
    assert summary.orphan_records == 0  # everything accepted was flushed at close
    assert await asyncio.to_thread(stored) > 0


@pytest.mark.slow
@pytest.mark.postgres
async def test_sigterm_with_a_hanging_database_exits_within_the_shutdown_timeout(
    tmp_path: Path, postgres_url: str, pg_schema: str
) -> None:
    env = with_postgres(base_env(tmp_path), postgres_url, pg_schema)
    env["DATA_MANAGER_SHUTDOWN_TIMEOUT"] = "1"
    proc = spawn("demo", "--ticks", "5000000", env=env, cwd=tmp_path)
    lock = await asyncpg.connect(postgres_url, timeout=10)
    try:

        async def started() -> bool:
            with contextlib.suppress(asyncpg.UndefinedTableError):
                return await pg_count(postgres_url, pg_schema) > 0
            return False

        async def writer_blocked() -> bool:
            # Another session: within the lock's transaction pg_stat_activity is a snapshot.
            rows = await pg_rows(
                postgres_url,
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                f" AND application_name = 'data_manager' AND query LIKE '%{pg_schema}\".ticks%'",
            )
            return bool(rows)

        await until(started, "the demo's first stored ticks")
        # The database hangs (it neither answers nor refuses): every write waits on the lock.
        async with lock.transaction():
            await lock.execute(f'LOCK TABLE "{pg_schema}".ticks IN ACCESS EXCLUSIVE MODE')
            await until(writer_blocked, "a write waiting on the lock")
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # Well inside a container's grace period, and far below the statement timeout
            # (30 s) a close without a bound would wait for, attempt after attempt.
            out, err = await asyncio.to_thread(proc.communicate, timeout=20)
            took = time.monotonic() - began
    finally:
        await lock.close(timeout=10)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, f"{proc.returncode}\n{out}\n{err}"
    assert "still shutting down after 1 s" in err
    assert took < 20
    # What the hanging database did not take is in the journal, for the next router.
    assert inspect_journals(tmp_path / "journal").orphan_records > 0


# --------------------------------------------------------------------------- replay


def batch(i: int) -> bytes:
    tick = TickData(symbol="EUR/USD", timestamp=T0 + i, bid=1.1, ask=1.1002, source="r", seq=i)
    return encode_batch_message("tick", f"b{i}", "test", [tick])


async def add_messages(url: str, key: str, payloads: list[bytes]) -> None:
    client = Redis.from_url(url, socket_timeout=10)
    try:
        for payload in payloads:
            await client.xadd(key, {"kind": "tick", "payload": payload})
    finally:
        await client.aclose()


def stored_seqs(tmp_path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(str(tmp_path / "store.sqlite3"), timeout=5)) as db:
        return [row[0] for row in db.execute("SELECT seq FROM ticks ORDER BY seq")]


async def test_replay_reads_the_configured_stream_unless_told_otherwise(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:named-backup"
    await add_messages(redis_url, key, [batch(0), batch(1)])
    env = base_env(tmp_path)
    unset = cli("replay", env=env, cwd=tmp_path)
    one_line_failure(unset, "pass --from-stream or set DATA_MANAGER_BACKUP_STREAM_URL")

    configured = dict(
        env, DATA_MANAGER_BACKUP_STREAM_URL=redis_url, DATA_MANAGER_BACKUP_STREAM_KEY=key
    )
    # Explicit options win: another key holds nothing.
    other = cli("replay", "--key", f"{redis_prefix}:other", "--json", env=configured,
                cwd=tmp_path)  # fmt: skip
    assert other.returncode == 0, explain(other)
    assert json.loads(other.stdout)["messages"] == 0
    proc = cli("replay", "--json", env=configured, cwd=tmp_path)  # URL and key from settings
    assert proc.returncode == 0, explain(proc)
    report = json.loads(proc.stdout)
    assert (report["messages"], report["ticks"], report["invalid_messages"]) == (2, 2, 0)
    assert stored_seqs(tmp_path) == [0, 1]


async def test_replay_skips_a_malformed_message_and_goes_on(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    key = f"{redis_prefix}:backup"
    bad_kinds: list[object] = [["tick"], {"tick": 1}]
    bad = [
        orjson.dumps(
            {"v": 1, "type": "batch", "kind": k, "batch_id": "x", "origin": "o", "items": []}
        )
        for k in bad_kinds
    ]
    await add_messages(redis_url, key, [batch(0), bad[0], batch(1), bad[1], batch(2)])
    proc = cli("replay", "--from-stream", redis_url, "--key", key, "--json",
               env=base_env(tmp_path), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1, explain(proc)  # some messages could not be decoded
    report = json.loads(proc.stdout)
    assert (report["messages"], report["ticks"], report["invalid_messages"]) == (3, 3, 2)
    assert stored_seqs(tmp_path) == [0, 1, 2]


# --------------------------------------------------------------------------- bench / metrics


def test_bench_passes_its_arguments_through(tmp_path: Path) -> None:
    fake = tmp_path / "benchmarks"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import json, sys\nprint(json.dumps(sys.argv[1:]))\nsys.exit(3)\n"
    )
    # `python -m` looks in the working directory first, so this stands in for the suite.
    proc = cli("bench", "--quick", "--ticks", "10", "extra", env=base_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 3, explain(proc)
    assert json.loads(proc.stdout) == ["--quick", "--ticks", "10", "extra"]


def test_serve_metrics_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = spawn("serve-metrics", "--port", str(port), env=base_env(tmp_path), cwd=tmp_path)
    body = ""
    try:
        deadline = time.monotonic() + DEADLINE
        while not body:
            assert proc.poll() is None, f"serve-metrics exited: {proc.communicate()}"
            assert time.monotonic() < deadline, "the metrics endpoint never answered"
            try:
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = response.read().decode()
            except OSError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"{out}\n{err}"
    assert "data_manager" in body


# --------------------------------------------------------------------------- examples


def example(
    name: str, *args: str, env: dict[str, str], cwd: Path, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def server_env(
    tmp_path: Path, postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str
) -> dict[str, str]:
    env = with_postgres(base_env(tmp_path), postgres_url, pg_schema)
    return with_redis(env, redis_url, redis_prefix)


@pytest.mark.parametrize(
    ("name", "args", "expect"),
    [
        ("collector.py", ("--ticks", "3000"), "saved 3,000 ticks"),
        ("engine.py", ("--iterations", "2", "--interval", "0.1"), "SMA5"),
        ("bulk_import.py", ("--rows", "800"), "800 rows: 797 accepted, 3 rejected"),
        ("health_probe.py", ("--json",), '"status": "healthy"'),
    ],
)
def test_examples_run_against_the_servers(
    tmp_path: Path, server_env: dict[str, str], name: str, args: tuple[str, ...], expect: str
) -> None:
    proc = example(name, *args, env=server_env, cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert expect in proc.stdout


@pytest.mark.slow
def test_multiprocess_demo(tmp_path: Path, server_env: dict[str, str]) -> None:
    proc = example(
        "multiprocess_demo.py", "--engines", "2", "--ticks", "600", env=server_env, cwd=tmp_path
    )
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.count("latest tick is the collector's last: True") == 2


def test_multiprocess_demo_says_what_it_needs(tmp_path: Path) -> None:
    proc = example("multiprocess_demo.py", env=base_env(tmp_path), cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "POSTGRES_HOST and DRAGONFLY_HOST" in proc.stderr
