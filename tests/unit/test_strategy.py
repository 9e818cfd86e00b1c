"""The routing strategy: parsing as data, validation, and the hot-reloading watcher."""

from __future__ import annotations

import asyncio
import logging
import os
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from data_manager import strategy as strategy_module
from data_manager.clock import ManualClock
from data_manager.errors import ConfigurationError, RouterClosedError, RoutingError
from data_manager.strategy import (
    MAX_SECONDS,
    RESTART_REQUIRED_FIELDS,
    CacheStrategy,
    RoutingStrategy,
    StrategyWatcher,
    WatcherState,
    diff_strategies,
    load_strategy,
    parse_strategy,
    restart_required_changes,
    strategy_from_mapping,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "hot_reload" / "data_manager_strategy.py"
PACKAGED = (
    Path(strategy_module.__file__).parent / "_defaults" / "hot_reload" / "data_manager_strategy.py"
)
LOGGER = "data_manager.strategy"

SEED_004 = textwrap.dedent(
    """\
    DATA_MANAGER_STRATEGY = {
        "routing": {
            "save_tick": ["timescale", "dragonfly_cache"],
            "get_latest_tick": ["dragonfly_cache", "timescale"]
        },
        "cache": {
            "tick_ttl_seconds": 3600,
            "candle_ttl_seconds": 3600
        }
    }
    """
)


def strategy_text(*, tick_ttl: int = 3600, batch_size: int = 100, extra: str = "") -> str:
    """A valid file whose two marker values sit in different sections."""
    return textwrap.dedent(
        f'''\
        """Test strategy."""
        # a comment
        DATA_MANAGER_STRATEGY = {{
            "routing": {{"get_latest_tick": ["dragonfly_cache", "timescale"]}},
            "cache": {{"tick_ttl_seconds": {tick_ttl}{extra}}},
            "batch": {{"size": {batch_size}}},
        }}
        '''
    )


@pytest.fixture
def strategy_file(tmp_path: Path) -> Path:
    path = tmp_path / "data_manager_strategy.py"
    path.write_text(strategy_text(tick_ttl=100, batch_size=10), encoding="utf-8")
    return path


@pytest.fixture
async def watcher(strategy_file: Path) -> AsyncIterator[StrategyWatcher]:
    w = StrategyWatcher(strategy_file, clock=ManualClock())
    await w.start(watch=False)
    try:
        yield w
    finally:
        await w.aclose()


def rewrite(path: Path, text: str | bytes) -> None:
    """Replace the file's content (blocking on purpose: the tests drive the watcher)."""
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


def remove(path: Path) -> None:
    path.unlink()


def stat(path: Path) -> os.stat_result:
    return path.stat()


# --------------------------------------------------------------------------- the value


def test_defaults_match_the_seeds() -> None:
    s = RoutingStrategy()
    # Seed 004's routes and TTLs.
    assert s.routing.save_tick == ("timescale", "dragonfly_cache")
    assert s.routing.get_latest_tick == ("dragonfly_cache", "timescale")
    assert s.routing.get_ticks == ("timescale",)
    assert s.cache.tick_ttl_seconds == 3600
    assert s.cache.candle_ttl_seconds == 3600
    assert s.cache.l1_tick_ttl_seconds < s.cache.tick_ttl_seconds
    assert s.cache.candle_ring_size == 200
    # Seed 000's staleness TTLs.
    assert (s.staleness.tick_seconds, s.staleness.candle_seconds) == (2, 120)
    assert s.staleness.order_flow_seconds == 5
    assert s.batch.size == 100
    assert s.batch.put_timeout_seconds is None
    assert s.aggregation.timeframes == ("1m", "5m", "1h")
    assert s.aggregation.daily_close == "utc"
    assert s.sources.candle_preference == ()
    assert s.version is None
    assert len(s.content_hash) == 16
    assert s == RoutingStrategy()
    assert s.content_hash == RoutingStrategy().content_hash


def test_seed_004_example_parses() -> None:
    s = parse_strategy(SEED_004, origin="seed-004")
    assert s.routing.save_tick == ("timescale", "dragonfly_cache")
    assert s.routing.get_latest_tick == ("dragonfly_cache", "timescale")
    assert s.cache.tick_ttl_seconds == 3600
    assert s == RoutingStrategy()  # everything else keeps its default


def test_shipped_file_parses_and_equals_the_defaults() -> None:
    assert load_strategy(SHIPPED, missing_ok=False) == RoutingStrategy()


def test_package_copy_is_byte_identical_to_the_shipped_file() -> None:
    assert PACKAGED.read_bytes() == SHIPPED.read_bytes()


def test_strategy_is_immutable() -> None:
    s = RoutingStrategy()
    with pytest.raises(Exception, match="frozen"):
        s.cache.tick_ttl_seconds = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.staleness.per_timeframe["1m"] = 1  # type: ignore[index]


def test_content_hash_ignores_comments_and_layout_but_not_values() -> None:
    a = parse_strategy(strategy_text(tick_ttl=100))
    b = parse_strategy("# header\n" + strategy_text(tick_ttl=100).replace("    ", "  "))
    c = parse_strategy(strategy_text(tick_ttl=101))
    assert a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash


def test_staleness_scales_with_timeframe_unless_overridden() -> None:
    s = parse_strategy(
        'DATA_MANAGER_STRATEGY = {"staleness": {"candle_seconds": 90, '
        '"per_timeframe": {"1h": 5400}}}'
    )
    assert s.staleness.candle_seconds_for("1m") == 90
    assert s.staleness.candle_seconds_for("5m") == 450
    assert s.staleness.candle_seconds_for("1h") == 5400
    assert s.staleness.candle_seconds_for("4h") == 4 * 60 * 90
    with pytest.raises(KeyError):
        s.staleness.candle_seconds_for("2m")


def test_disabled_symbols_are_normalised() -> None:
    s = parse_strategy(
        'DATA_MANAGER_STRATEGY = {"aggregation": {"disabled_symbols": ["eur_usd", "EURUSD", '
        '"AAPL"]}}'
    )
    assert s.aggregation.disabled_symbols == frozenset({"EUR/USD", "AAPL"})


def test_annotated_assignment_and_version_label_are_accepted() -> None:
    s = parse_strategy('DATA_MANAGER_STRATEGY: dict = {"version": "2024-10-03.1"}')
    assert s.version == "2024-10-03.1"


def test_route_lookup_by_name() -> None:
    s = RoutingStrategy()
    assert s.routing.for_operation("get_latest_candles") == ("dragonfly_cache", "timescale")
    with pytest.raises(RoutingError, match="unknown operation"):
        s.routing.for_operation("get_everything")


def test_direct_construction_raises_sdk_errors_with_field_paths() -> None:
    with pytest.raises(ConfigurationError, match=r"cache\.tick_ttl_seconds") as info:
        RoutingStrategy.model_validate({"cache": {"tick_ttl_seconds": -1, "l1_max_entries": 0}})
    assert "cache.l1_max_entries" in str(info.value)  # every problem, not just the first
    with pytest.raises(ConfigurationError, match="invalid CacheStrategy: tick_ttl_seconds"):
        CacheStrategy(tick_ttl_seconds=-1)
    # Past ten years: a typo, and far past it a TTL the cache server cannot store.
    for huge in (1e16, float("inf")):
        with pytest.raises(ConfigurationError, match="tick_ttl_seconds"):
            CacheStrategy(tick_ttl_seconds=huge)
    assert CacheStrategy(tick_ttl_seconds=MAX_SECONDS).tick_ttl_seconds == MAX_SECONDS
    with pytest.raises(RoutingError, match="unknown backend 'clickhouse'"):
        strategy_from_mapping({"routing": {"get_candles": ["clickhouse", "timescale"]}})


# --------------------------------------------------------------------------- rejected text

BAD_EDITS: dict[str, tuple[str, type[Exception], str]] = {
    "syntax error": (
        'DATA_MANAGER_STRATEGY = {\n    "cache": {"tick_ttl_seconds": 5,\n',
        ConfigurationError,
        "syntax error",
    ),
    "unknown backend": (
        'DATA_MANAGER_STRATEGY = {"routing": {"save_tick": ["timescale", "dragonfly"]}}',
        RoutingError,
        "routing.save_tick[1]: unknown backend 'dragonfly'",
    ),
    "unknown operation": (
        'DATA_MANAGER_STRATEGY = {"routing": {"save_tik": ["timescale"]}}',
        RoutingError,
        "unknown operation 'save_tik'",
    ),
    "negative ttl": (
        'DATA_MANAGER_STRATEGY = {"cache": {"tick_ttl_seconds": -5}}',
        ConfigurationError,
        "cache.tick_ttl_seconds: Input should be greater than 0",
    ),
    "function call": (
        'DATA_MANAGER_STRATEGY = {"cache": {"tick_ttl_seconds": int("5")}}',
        ConfigurationError,
        "`int('5')` is not a literal",
    ),
    "import call": (
        'DATA_MANAGER_STRATEGY = __import__("os").system("touch /tmp/pwned")',
        ConfigurationError,
        "is not a literal",
    ),
    "name reference": (
        'DATA_MANAGER_STRATEGY = {"cache": {"tick_ttl_seconds": TTL}}',
        ConfigurationError,
        "`TTL` is not a literal",
    ),
    "arithmetic": (
        'DATA_MANAGER_STRATEGY = {"cache": {"tick_ttl_seconds": 60 * 60}}',
        ConfigurationError,
        "`60 * 60` is not a literal",
    ),
    "two assignments": (
        "DATA_MANAGER_STRATEGY = {}\nDATA_MANAGER_STRATEGY = {}\n",
        ConfigurationError,
        ":2: the file must hold exactly one statement",
    ),
    "import statement": (
        "import os\nDATA_MANAGER_STRATEGY = {}\n",
        ConfigurationError,
        ":1: the file must hold exactly one statement",
    ),
    "wrong name": (
        'DATA_MANAGER_STRATEGIES = {"cache": {}}',
        ConfigurationError,
        "must be to DATA_MANAGER_STRATEGY, not 'DATA_MANAGER_STRATEGIES'",
    ),
    "unknown key": (
        'DATA_MANAGER_STRATEGY = {"cache": {"tick_ttl": 5}}',
        ConfigurationError,
        "cache.tick_ttl: unknown key (did you mean 'tick_ttl_seconds'?)",
    ),
    "unknown section": (
        'DATA_MANAGER_STRATEGY = {"caches": {}}',
        ConfigurationError,
        "caches: unknown key (did you mean 'cache'?)",
    ),
    "duplicate key": (
        'DATA_MANAGER_STRATEGY = {"cache": {}, "cache": {"tick_ttl_seconds": 1}}',
        ConfigurationError,
        "duplicate key 'cache'",
    ),
    "string for a number": (
        'DATA_MANAGER_STRATEGY = {"cache": {"tick_ttl_seconds": "3600"}}',
        ConfigurationError,
        "cache.tick_ttl_seconds: Input should be a valid number",
    ),
    "infinite number": (
        'DATA_MANAGER_STRATEGY = {"cache": {"tick_ttl_seconds": 1e999}}',
        ConfigurationError,
        "finite number",
    ),
    "unknown timeframe": (
        'DATA_MANAGER_STRATEGY = {"staleness": {"per_timeframe": {"2m": 5}}}',
        ConfigurationError,
        "staleness.per_timeframe.2m",
    ),
    "cache-only read": (
        'DATA_MANAGER_STRATEGY = {"routing": {"get_latest_tick": ["dragonfly_cache"]}}',
        RoutingError,
        "must include 'timescale'",
    ),
    "database before cache": (
        'DATA_MANAGER_STRATEGY = {"routing": {"get_latest_tick": '
        '["timescale", "dragonfly_cache"]}}',
        RoutingError,
        "must end with 'timescale'",
    ),
    "cache for a range read": (
        'DATA_MANAGER_STRATEGY = {"routing": {"get_ticks": ["dragonfly_cache", "timescale"]}}',
        RoutingError,
        "'dragonfly_cache' cannot serve get_ticks",
    ),
    "cache read that no write feeds": (
        'DATA_MANAGER_STRATEGY = {"routing": {"save_tick": ["timescale"]}}',
        RoutingError,
        "routing.get_latest_tick reads 'dragonfly_cache' but routing.save_tick does not write",
    ),
    "candle cache read that no write feeds": (
        'DATA_MANAGER_STRATEGY = {"routing": {"save_candle": ["timescale"]}}',
        RoutingError,
        "routing.get_latest_candles reads 'dragonfly_cache' but routing.save_candle",
    ),
    "order-flow cache read that no write feeds": (
        'DATA_MANAGER_STRATEGY = {"routing": {"save_order_flow": ["timescale"]}}',
        RoutingError,
        "routing.get_latest_order_flow reads 'dragonfly_cache' but routing.save_order_flow",
    ),
    "batch larger than its bound": (
        'DATA_MANAGER_STRATEGY = {"batch": {"size": 60000}}',
        ConfigurationError,
        "batch: size (60000) is larger than max_batch (50000)",
    ),
    "not a dict": ("DATA_MANAGER_STRATEGY = []", ConfigurationError, "must be a dict"),
    "empty file": ("# nothing here\n", ConfigurationError, "no assignment"),
}


def test_a_strategy_without_l2_for_ticks_drops_it_from_both_routes() -> None:
    s = parse_strategy(
        'DATA_MANAGER_STRATEGY = {"routing": {"save_tick": ["timescale"], '
        '"get_latest_tick": ["timescale"]}}'
    )
    assert s.routing.save_tick == ("timescale",)
    assert s.routing.get_latest_tick == ("timescale",)
    assert "dragonfly_cache" in s.routing.get_latest_candles  # the other data keep L2


@pytest.mark.parametrize(("text", "error", "message"), BAD_EDITS.values(), ids=BAD_EDITS)
def test_bad_text_is_refused_naming_the_problem(
    text: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        parse_strategy(text, origin="/etc/dm/strategy.py")
    assert message in str(info.value)
    assert str(info.value).startswith("/etc/dm/strategy.py")


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigurationError, match=r"^f\.py:3: syntax error"):
        parse_strategy('"""doc"""\nDATA_MANAGER_STRATEGY = {\n  "cache": {]}', origin="f.py")


# --------------------------------------------------------------------------- the watcher


async def test_watcher_loads_the_file(watcher: StrategyWatcher, strategy_file: Path) -> None:
    assert watcher.state is WatcherState.RUNNING
    assert watcher.current.cache.tick_ttl_seconds == 100
    assert watcher.version == 1
    assert watcher.last_error is None
    assert watcher.last_loaded_at == ManualClock().time_ms()
    status = watcher.status()
    assert (status.source, status.path) == ("file", str(strategy_file))
    assert status.content_hash == watcher.content_hash == watcher.current.content_hash


@pytest.mark.parametrize(("text", "error", "message"), BAD_EDITS.values(), ids=BAD_EDITS)
async def test_bad_edit_keeps_the_last_good_strategy(
    watcher: StrategyWatcher,
    strategy_file: Path,
    caplog: pytest.LogCaptureFixture,
    text: str,
    error: type[Exception],
    message: str,
) -> None:
    good = watcher.current
    rewrite(strategy_file, text)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert await watcher.check_now() is False
    assert watcher.current is good
    assert watcher.version == 1
    assert watcher.error_count == 1
    assert watcher.last_error is not None
    assert message in watcher.last_error
    assert str(strategy_file) in watcher.last_error
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert message in errors[0].getMessage()

    # The same broken content is not reported again on the next check.
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert await watcher.check_now() is False
    assert watcher.error_count == 1

    # Fixing the file swaps it in and clears the error.
    rewrite(strategy_file, strategy_text(tick_ttl=200, batch_size=20))
    assert await watcher.check_now() is True
    assert watcher.current.cache.tick_ttl_seconds == 200
    assert watcher.last_error is None
    assert watcher.version == 2


async def test_unknown_backend_fails_at_start_not_at_first_request(tmp_path: Path) -> None:
    path = tmp_path / "s.py"
    rewrite(path, 'DATA_MANAGER_STRATEGY = {"routing": {"save_tick": ["timescale", "redis"]}}')
    w = StrategyWatcher(path)
    with pytest.raises(RoutingError, match="unknown backend 'redis'"):
        await w.start(watch=False)
    assert w.state is WatcherState.CREATED
    await w.aclose()


async def test_restart_required_field_is_refused(
    watcher: StrategyWatcher, strategy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = watcher.current
    rewrite(
        strategy_file, strategy_text(tick_ttl=100, batch_size=10, extra=', "candle_ring_size": 500')
    )
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert await watcher.check_now() is False
    assert watcher.current is good
    assert watcher.last_error is not None
    assert "restart required" in watcher.last_error
    assert "cache.candle_ring_size 200 -> 500" in watcher.last_error
    assert any("restart required" in r.getMessage() for r in caplog.records)

    # Reverting the edit clears the error without a swap.
    rewrite(strategy_file, strategy_text(tick_ttl=100, batch_size=10))
    assert await watcher.check_now() is False
    assert watcher.last_error is None
    assert watcher.current is good


@pytest.mark.parametrize("revert", ["same bytes", "comment only"])
async def test_bad_edit_coming_back_after_a_revert_is_refused_again(
    watcher: StrategyWatcher,
    strategy_file: Path,
    caplog: pytest.LogCaptureFixture,
    revert: str,
) -> None:
    good_text = strategy_text(tick_ttl=100, batch_size=10)  # what the fixture wrote
    bad_text = strategy_text(tick_ttl=-5, batch_size=10)
    rewrite(strategy_file, bad_text)
    assert await watcher.check_now() is False
    assert watcher.last_error is not None
    rewrite(strategy_file, good_text if revert == "same bytes" else good_text + "# fixed\n")
    assert await watcher.check_now() is False
    assert watcher.last_error is None

    # The same broken text again: the file no longer holds the strategy in force.
    rewrite(strategy_file, bad_text)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert await watcher.check_now() is False
    assert watcher.last_error is not None
    assert "tick_ttl_seconds" in watcher.last_error
    assert watcher.error_count == 2
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.ERROR]


def test_restart_required_fields_are_detected() -> None:
    old = RoutingStrategy()
    new = strategy_from_mapping({"batch": {"max_queue": 60_000}, "cache": {"tick_ttl_seconds": 5}})
    assert diff_strategies(old, new) == ("cache.tick_ttl_seconds", "batch.max_queue")
    assert restart_required_changes(old, new) == ("batch.max_queue",)
    assert {"cache.candle_ring_size", "batch.max_queue", "aggregation.daily_close"} == set(
        RESTART_REQUIRED_FIELDS
    )
    for path in RESTART_REQUIRED_FIELDS:  # every listed field exists
        section, name = path.split(".")
        assert name in type(getattr(old, section)).model_fields


async def test_valid_edit_is_swapped_atomically_under_concurrent_readers(
    watcher: StrategyWatcher, strategy_file: Path
) -> None:
    # Two versions whose marker values live in different sections: a reader that saw a
    # half-built value would see a mixed pair.
    complete = {(100.0, 10), (200.0, 20)}
    versions = [
        strategy_text(tick_ttl=200, batch_size=20),
        strategy_text(tick_ttl=100, batch_size=10),
    ]
    stop = threading.Event()
    thread_seen: list[tuple[float, int]] = []

    def thread_reader() -> None:
        while not stop.is_set():
            s = watcher.current
            thread_seen.append((s.cache.tick_ttl_seconds, s.batch.size))
            time.sleep(0)  # release the GIL so the swap interleaves with reads

    task_seen: list[tuple[float, int]] = []

    async def task_reader() -> None:
        while not stop.is_set():
            s = watcher.current
            task_seen.append((s.cache.tick_ttl_seconds, s.batch.size))
            await asyncio.sleep(0)  # yield to the swapping coroutine; no waiting

    threads = [threading.Thread(target=thread_reader) for _ in range(2)]
    for t in threads:
        t.start()
    tasks = [asyncio.create_task(task_reader()) for _ in range(4)]
    try:
        for i in range(12):
            rewrite(strategy_file, versions[i % 2])
            assert await watcher.check_now() is True
    finally:
        stop.set()
        for t in threads:
            t.join()
        await asyncio.gather(*tasks)
    assert watcher.version == 13
    assert watcher.reload_count == 12
    assert set(task_seen) == complete  # both versions observed, nothing else
    assert set(thread_seen) <= complete
    assert thread_seen


async def test_listeners_get_old_and_new(watcher: StrategyWatcher, strategy_file: Path) -> None:
    calls: list[tuple[float, float]] = []
    async_calls: list[float] = []

    def listener(old: RoutingStrategy, new: RoutingStrategy) -> None:
        calls.append((old.cache.tick_ttl_seconds, new.cache.tick_ttl_seconds))

    async def async_listener(old: RoutingStrategy, new: RoutingStrategy) -> None:
        async_calls.append(new.cache.tick_ttl_seconds)

    def broken(old: RoutingStrategy, new: RoutingStrategy) -> None:
        raise RuntimeError("listener bug")

    watcher.add_listener(broken)
    remove = watcher.add_listener(listener)
    watcher.add_listener(async_listener)
    rewrite(strategy_file, strategy_text(tick_ttl=300, batch_size=10))
    assert await watcher.check_now() is True
    assert calls == [(100.0, 300.0)]
    assert async_calls == [300.0]
    assert watcher.current.cache.tick_ttl_seconds == 300  # a failing listener undoes nothing

    remove()
    rewrite(strategy_file, strategy_text(tick_ttl=400, batch_size=10))
    assert await watcher.check_now() is True
    assert calls == [(100.0, 300.0)]
    assert async_calls == [300.0, 400.0]


async def test_listener_not_called_for_a_comment_only_edit(
    watcher: StrategyWatcher, strategy_file: Path
) -> None:
    calls: list[RoutingStrategy] = []
    watcher.add_listener(lambda old, new: calls.append(new))
    rewrite(strategy_file, "# reformatted\n" + strategy_text(tick_ttl=100, batch_size=10))
    assert await watcher.check_now() is False
    assert calls == []
    assert watcher.version == 1


async def test_validator_can_refuse_a_swap(watcher: StrategyWatcher, strategy_file: Path) -> None:
    def no_big_ttl(old: RoutingStrategy, new: RoutingStrategy) -> None:
        if new.cache.tick_ttl_seconds > 1000:
            raise ConfigurationError("tick TTL above 1000 s needs the big cache")

    watcher.add_validator(no_big_ttl)
    rewrite(strategy_file, strategy_text(tick_ttl=5000, batch_size=10))
    assert await watcher.check_now() is False
    assert watcher.last_error is not None
    assert "needs the big cache" in watcher.last_error
    assert watcher.current.cache.tick_ttl_seconds == 100


async def test_file_deleted_mid_run_keeps_the_last_good(
    watcher: StrategyWatcher, strategy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = watcher.current
    remove(strategy_file)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await watcher.check_now() is False
        assert await watcher.check_now() is False
    assert watcher.current is good
    assert watcher.last_error is not None
    assert "disappeared" in watcher.last_error
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # reported once, not on every poll

    rewrite(strategy_file, strategy_text(tick_ttl=250, batch_size=10))
    assert await watcher.check_now() is True
    assert watcher.current.cache.tick_ttl_seconds == 250
    assert watcher.last_error is None


async def test_same_size_rewrite_within_one_mtime_tick_is_seen(
    watcher: StrategyWatcher, strategy_file: Path
) -> None:
    before = stat(strategy_file)
    rewrite(strategy_file, strategy_text(tick_ttl=101, batch_size=10))  # same length
    os.utime(strategy_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert stat(strategy_file).st_size == before.st_size
    assert await watcher.check_now() is True
    assert watcher.current.cache.tick_ttl_seconds == 101


async def test_missing_file_at_start_means_defaults(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "absent.py"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with StrategyWatcher(path, poll_seconds=3600) as w:
            assert w.current == RoutingStrategy()
            assert w.status().source == "defaults"
            assert w.last_error is None
            # The file appearing later is loaded like any edit.
            rewrite(path, strategy_text(tick_ttl=42))
            assert await w.check_now() is True
            assert w.current.cache.tick_ttl_seconds == 42
    assert any("not found" in r.getMessage() for r in caplog.records)
    assert w.state is WatcherState.CLOSED


async def test_missing_required_file_is_an_error(tmp_path: Path) -> None:
    w = StrategyWatcher(tmp_path / "typo.py", required=True)
    with pytest.raises(ConfigurationError, match="does not exist"):
        await w.start()
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_strategy(tmp_path / "typo.py", missing_ok=False)
    assert load_strategy(tmp_path / "typo.py") == RoutingStrategy()


async def test_non_utf8_file_is_refused(watcher: StrategyWatcher, strategy_file: Path) -> None:
    rewrite(strategy_file, b"DATA_MANAGER_STRATEGY = {'version': '\xff'}")
    assert await watcher.check_now() is False
    assert watcher.last_error is not None
    assert "not UTF-8" in watcher.last_error


async def test_fixed_strategy_is_never_reloaded(strategy_file: Path) -> None:
    fixed = strategy_from_mapping({"cache": {"tick_ttl_seconds": 7}})
    async with StrategyWatcher(strategy_file, fixed=fixed) as w:
        assert w.current is fixed
        assert w.path is None
        assert await w.check_now() is False
        assert w.status().source == "explicit"


async def test_background_polling_picks_up_an_edit(strategy_file: Path) -> None:
    swapped = asyncio.Event()
    async with StrategyWatcher(strategy_file, poll_seconds=0.01) as w:
        w.add_listener(lambda old, new: swapped.set())
        rewrite(strategy_file, strategy_text(tick_ttl=600, batch_size=10))
        await asyncio.wait_for(swapped.wait(), timeout=10)
        assert w.current.cache.tick_ttl_seconds == 600
    assert w.state is WatcherState.CLOSED


async def test_polling_survives_reset_after_fork(strategy_file: Path) -> None:
    swapped = asyncio.Event()
    async with StrategyWatcher(strategy_file, poll_seconds=0.01) as w:
        w.add_listener(lambda old, new: swapped.set())
        w.reset_after_fork()
        rewrite(strategy_file, strategy_text(tick_ttl=700, batch_size=10))
        await asyncio.wait_for(swapped.wait(), timeout=10)
        assert w.current.cache.tick_ttl_seconds == 700
        assert w.reload_count == 1


async def test_closed_watcher_refuses_use(strategy_file: Path) -> None:
    w = StrategyWatcher(strategy_file)
    await w.start(watch=False)
    await w.aclose()
    await w.aclose()  # idempotent
    with pytest.raises(RouterClosedError):
        await w.check_now()
    with pytest.raises(RouterClosedError):
        await w.start()
    assert w.current.cache.tick_ttl_seconds == 100  # still readable


def test_poll_interval_must_be_positive(strategy_file: Path) -> None:
    with pytest.raises(ConfigurationError, match="poll_seconds"):
        StrategyWatcher(strategy_file, poll_seconds=0)
