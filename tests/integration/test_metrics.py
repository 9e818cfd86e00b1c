"""Prometheus export: a real router, its metrics served over HTTP, scraped and parsed.

Scrapes run in a worker thread (``asyncio.to_thread``): the collector hands its snapshot to
the router's event loop, which must be free to run it — exactly as in production, where
Prometheus scrapes from outside.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import urllib.request
from typing import TYPE_CHECKING, Final

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

import data_manager.metrics as metrics_module
from data_manager import (
    ConfigurationError,
    DataManagerSettings,
    DataRouter,
    DragonflySettings,
    PostgresSettings,
    TickData,
    __version__,
)
from data_manager.metrics import (
    LATENCY_BUCKETS,
    METRICS,
    HistogramRecorder,
    RouterCollector,
    metrics_table,
    register_router,
    serve_metrics,
)
from data_manager.processors import IncrementalSMA
from data_manager.strategy import RoutingStrategy, strategy_from_mapping

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

T0: Final = 1_727_996_400_000
SYM: Final = "EUR/USD"
SCRAPE_TIMEOUT: Final = 10.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No configuration leaks in from the machine: explicit settings say everything."""
    for name in list(os.environ):
        if name.startswith(("POSTGRES_", "DRAGONFLY_")) or (
            name.startswith("DATA_MANAGER_") and not name.startswith("DATA_MANAGER_TEST_")
        ):
            monkeypatch.delenv(name)


def plain() -> RoutingStrategy:
    """Only what the test saves is written: no derived candles or order flow."""
    return strategy_from_mapping(
        {"aggregation": {"enabled": False}, "order_flow": {"enabled": False}}
    )


def tick(ts: int, symbol: str = SYM, bid: float = 1.1) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=bid, ask=bid + 0.0002, source="feed")


def parse(body: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported"
    return samples[key]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def scrape(url: str) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body: bytes = response.read()
            return body.decode()

    return parse(await asyncio.to_thread(get))


@pytest.fixture
async def sqlite_router(tmp_path: Path) -> AsyncIterator[DataRouter]:
    settings = DataManagerSettings(
        sqlite_path=str(tmp_path / "db.sqlite3"),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
    )
    async with DataRouter(settings, strategy=plain()) as router:
        yield router


# --------------------------------------------------------------------------- embedded store


async def test_sqlite_router_metrics_over_http(sqlite_router: DataRouter) -> None:
    router = sqlite_router
    saved = 25
    for i in range(saved):
        await router.save_tick(tick(T0 + i))
    await router.flush()
    assert await router.get_latest_tick(SYM) is not None  # L1 hit
    assert await router.get_latest_tick("GBP/USD") is None  # L1 miss, database read

    server = serve_metrics(router, 0)
    try:
        assert server.port > 0
        s = await scrape(server.url)

        assert value(s, "data_manager_collector_up") == 1
        assert value(s, "data_manager_router_open") == 1
        assert value(s, "data_manager_info", version=__version__, database="sqlite",
                     write_mode="buffered") == 1  # fmt: skip
        assert value(s, "data_manager_writes_accepted_total") == saved
        assert value(s, "data_manager_writes_stored_total") == saved
        # Every stored item went through a batch: the batch-size histogram sums to them.
        assert value(s, "data_manager_write_batch_size_sum") == saved
        batches = value(s, "data_manager_write_batch_size_count")
        assert 1 <= batches <= saved
        assert value(s, "data_manager_write_batch_size_bucket", le="+Inf") == batches
        assert value(s, "data_manager_write_flush_seconds_count") == batches
        assert value(s, "data_manager_write_flush_seconds_sum") > 0
        assert value(s, "data_manager_write_queue_depth") == 0
        assert value(s, "data_manager_journal_records") == 0
        assert value(s, "data_manager_write_retries_total") == 0
        assert value(s, "data_manager_circuit_state", backend="database", state="closed") == 1
        assert value(s, "data_manager_circuit_state", backend="database", state="open") == 0

        assert value(s, "data_manager_cache_reads_total", tier="l1", result="hit") == 1
        assert value(s, "data_manager_cache_reads_total", tier="l1", result="miss") == 1
        assert value(s, "data_manager_database_reads_total") == 1
        assert value(s, "data_manager_l1_lookups_total", kind="tick", result="hit") == 1
        assert value(s, "data_manager_l1_entries") >= 1
        assert value(s, "data_manager_l1_enabled") == 1
        assert value(s, "data_manager_pool_max_connections", backend="sqlite") >= 1
        assert value(s, "data_manager_strategy_reload_errors_total") == 0
        # No L2 configured: no L2 or bus series, rather than zeros that look like a cache.
        assert not {n for n in names(s) if n.startswith(("data_manager_l2_", "data_manager_bus_"))}
        assert (
            "data_manager_cache_reads_total",
            frozenset({("tier", "l2"), ("result", "hit")}),
        ) not in s
        # The process-level collectors ride along in the default registry.
        assert "process_cpu_seconds_total" in names(s)

        # Counters move between scrapes: one more L1 hit.
        await router.get_latest_tick(SYM)
        again = await scrape(server.url)
        assert value(again, "data_manager_cache_reads_total", tier="l1", result="hit") == 2
        assert value(again, "data_manager_event_loop_lag_seconds") >= 0
    finally:
        await server.aclose()
    # The port is released.
    with pytest.raises(OSError):  # refused: urllib's URLError is an OSError
        await asyncio.to_thread(urllib.request.urlopen, server.url, timeout=2)


async def test_processor_and_subscription_metrics(sqlite_router: DataRouter) -> None:
    router = sqlite_router
    router.register_processor(IncrementalSMA(3, name="sma3"))
    sub = router.subscribe_ticks([SYM])
    for i in range(4):
        await router.save_tick(tick(T0 + i))
    registry = register_router(router)
    # Called on the router's own loop: the collector reads directly (no thread hop).
    s = parse(generate_latest(registry).decode())
    assert value(s, "data_manager_processor_calls_total", processor="sma3") == 4
    assert value(s, "data_manager_processor_errors_total", processor="sma3") == 0
    assert value(s, "data_manager_processor_slow", processor="sma3") == 0
    assert value(s, "data_manager_subscriptions") == 1
    assert value(s, "data_manager_event_loop_lag_seconds") == 0
    await sub.aclose()


async def test_read_latency_histogram_when_the_router_records_it(
    sqlite_router: DataRouter,
) -> None:
    recorder = HistogramRecorder()
    for seconds in (0.0004, 0.003, 0.003, 30.0):
        recorder.observe(seconds)
    # What the router keeps once it times its L2/database reads (see the metrics docs).
    sqlite_router._read_latency = {("database", "get_latest_tick"): recorder}  # type: ignore[attr-defined]
    s = parse(generate_latest(register_router(sqlite_router)).decode())
    name = "data_manager_read_latency_seconds"
    labels = {"backend": "database", "operation": "get_latest_tick"}
    assert value(s, f"{name}_bucket", le="0.0005", **labels) == 1
    assert value(s, f"{name}_bucket", le="0.005", **labels) == 3
    assert value(s, f"{name}_bucket", le="10.0", **labels) == 3
    assert value(s, f"{name}_bucket", le="+Inf", **labels) == 4
    assert value(s, f"{name}_count", **labels) == 4
    assert value(s, f"{name}_sum", **labels) == pytest.approx(30.0064)


async def test_blocked_event_loop_gives_collector_up_zero(
    sqlite_router: DataRouter, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve_metrics(sqlite_router, 0, snapshot_timeout=0.2)
    try:
        # Scraping *on* the loop thread blocks the loop the snapshot needs: the collector
        # must give up after its timeout instead of hanging the scrape.
        with (
            caplog.at_level(logging.WARNING, logger="data_manager.metrics"),
            urllib.request.urlopen(server.url, timeout=SCRAPE_TIMEOUT) as response,  # noqa: ASYNC210
        ):
            s = parse(response.read().decode())
        ours = {key: v for key, v in s.items() if key[0].startswith("data_manager_")}
        assert ours == {("data_manager_collector_up", frozenset()): 0.0}
        assert "process_cpu_seconds_total" in names(s)  # the rest of the registry answers
        assert any("did not answer" in r.getMessage() for r in caplog.records)
        # The loop is free again: the next scrape works.
        assert value(await scrape(server.url), "data_manager_collector_up") == 1
    finally:
        await server.aclose()


async def test_closed_router_still_exports_its_counters(tmp_path: Path) -> None:
    settings = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "journal"
    )
    router = DataRouter(settings, strategy=plain())
    registry = register_router(router)
    s = parse(generate_latest(registry).decode())
    assert value(s, "data_manager_router_open") == 0
    assert "data_manager_writes_accepted_total" not in names(s)  # no write path yet
    async with router:
        await router.save_tick(tick(T0))
    s = parse(generate_latest(registry).decode())
    assert value(s, "data_manager_router_open") == 0
    assert value(s, "data_manager_writes_accepted_total") == 1
    assert value(s, "data_manager_writes_stored_total") == 1  # close() flushed it


async def test_one_router_per_registry(sqlite_router: DataRouter, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    register_router(sqlite_router, registry)
    other = DataRouter(
        DataManagerSettings(sqlite_path=":memory:", journal_dir=tmp_path / "other"),
        strategy=plain(),
    )
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register_router(other, registry)


async def test_port_in_use_is_a_configuration_error(sqlite_router: DataRouter) -> None:
    first = serve_metrics(sqlite_router, 0)
    try:
        registry = CollectorRegistry()
        with pytest.raises(ConfigurationError, match=str(first.port)):
            serve_metrics(sqlite_router, first.port, registry=registry)
        # The failed attempt left the caller's registry as it found it.
        assert list(registry.collect()) == []
    finally:
        await first.aclose()


# --------------------------------------------------------------------------- PostgreSQL + L2


@pytest.mark.postgres
@pytest.mark.redis
async def test_postgres_and_l2_router_metrics_over_http(
    postgres_url: str, pg_schema: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    settings = DataManagerSettings(
        postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema, pool_min=1, pool_max=4),
        dragonfly=DragonflySettings(url=redis_url, key_prefix=redis_prefix),
        watch_strategy=False,
        journal_dir=tmp_path / "journal",
        backup_stream_url=redis_url,
        backup_stream_key=f"{redis_prefix}:backup",  # deleted with the prefix
    )
    saved = 40
    async with DataRouter(settings, strategy=plain()) as router:
        for i in range(saved):
            await router.save_tick(tick(T0 + i, bid=1.1 + i * 1e-5))
        await router.flush()
        assert router._backup is not None
        await router._backup.flush(timeout=10)
        assert router._bus is not None
        await router._bus.flush()  # the fast path has written L2
        router.cache.l1.clear()
        assert await router.get_latest_tick(SYM) is not None  # L1 miss, L2 hit
        assert await router.get_latest_tick("GBP/USD") is None  # L1, L2 miss; database

        server = serve_metrics(router, 0)
        try:
            s = await scrape(server.url)
        finally:
            await server.aclose()

    assert value(s, "data_manager_collector_up") == 1
    assert value(s, "data_manager_info", version=__version__, database="postgresql",
                 write_mode="buffered") == 1  # fmt: skip
    assert value(s, "data_manager_writes_accepted_total") == saved
    assert value(s, "data_manager_writes_stored_total") == saved
    assert value(s, "data_manager_write_batch_size_sum") == saved
    assert value(s, "data_manager_cache_reads_total", tier="l1", result="miss") == 2
    assert value(s, "data_manager_cache_reads_total", tier="l1", result="hit") == 0
    assert value(s, "data_manager_cache_reads_total", tier="l2", result="hit") == 1
    assert value(s, "data_manager_cache_reads_total", tier="l2", result="miss") == 1
    assert value(s, "data_manager_cache_reads_total", tier="l2", result="error") == 0
    assert value(s, "data_manager_database_reads_total") == 1
    assert value(s, "data_manager_l1_clears_total") == 1
    # Each save offered one update to the fast path; bursts coalesce, nothing dropped.
    published = value(s, "data_manager_bus_updates_total", result="published")
    coalesced = value(s, "data_manager_bus_updates_total", result="coalesced")
    assert published >= 1
    assert published + coalesced == saved
    assert value(s, "data_manager_bus_updates_total", result="dropped") == 0
    assert value(s, "data_manager_bus_candles_retried_total") == 0
    assert value(s, "data_manager_bus_series_reset_total") == 0
    assert value(s, "data_manager_bus_connected") == 1
    assert value(s, "data_manager_l2_writes_total") >= 1
    assert value(s, "data_manager_l2_errors_total") == 0
    assert value(s, "data_manager_circuit_state", backend="l2", state="closed") == 1
    assert value(s, "data_manager_circuit_state", backend="database", state="closed") == 1
    assert value(s, "data_manager_pool_max_connections", backend="postgresql") == 4
    in_use = value(s, "data_manager_pool_connections", backend="postgresql", state="in_use")
    idle = value(s, "data_manager_pool_connections", backend="postgresql", state="idle")
    assert in_use + idle >= 1
    assert value(s, "data_manager_backup_stream_up") == 1
    assert value(s, "data_manager_backup_stream_published_total") == saved
    assert value(s, "data_manager_backup_stream_failures_total") == 0
    assert value(s, "data_manager_backup_stream_dropped_total") == 0
    assert value(s, "data_manager_backup_stream_pending_items") == 0


# --------------------------------------------------------------------------- the table


def test_every_metric_is_documented_and_exportable(tmp_path: Path) -> None:
    doc = metrics_module.__doc__ or ""
    table = metrics_table()
    assert len({spec.name for spec in METRICS}) == len(METRICS)
    for spec in METRICS:
        assert spec.name.startswith("data_manager_")
        assert f"\n{spec.name} (" in doc, f"{spec.name} missing from the module docstring"
        assert f"| `{spec.name}` |" in table
        if spec.type == "counter":
            assert spec.name.endswith("_total")
        else:
            assert not spec.name.endswith("_total")
        assert "symbol" not in spec.labels
    # describe() (used for duplicate detection) covers every metric, sample-free.
    router = DataRouter(
        DataManagerSettings(sqlite_path=":memory:", journal_dir=tmp_path / "journal"),
        strategy=plain(),
    )
    described = list(RouterCollector(router).describe())
    assert len(described) == len(METRICS)
    assert all(not family.samples for family in described)


def test_histogram_recorder_uses_le_semantics() -> None:
    recorder = HistogramRecorder((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 7.0):
        recorder.observe(v)
    snap = recorder.snapshot()
    assert snap.counts == (2, 2, 1)
    assert snap.cumulative() == [(1.0, 2), (2.0, 4), (math.inf, 5)]
    assert snap.count == 5
    assert snap.sum == pytest.approx(12.0)
    assert HistogramRecorder().snapshot().bounds == LATENCY_BUCKETS
    for bad in ((), (2.0, 1.0), (1.0, 1.0), (1.0, math.inf)):
        with pytest.raises(ValueError, match="bounds"):
            HistogramRecorder(bad)


def test_importing_the_module_loads_no_exporter_code() -> None:
    import subprocess
    import sys

    code = (
        "import sys, data_manager.metrics, data_manager.logutil; "
        "print(sorted(m for m in ('prometheus_client', 'http.server') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
