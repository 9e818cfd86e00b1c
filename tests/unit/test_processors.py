"""Real-time processors: the shipped SMA/RSI, and the registry's isolation and timing."""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_manager.clock import ManualClock
from data_manager.errors import ConfigurationError, ValidationError
from data_manager.models import TickData
from data_manager.processors import (
    IncrementalRSI,
    IncrementalSMA,
    ProcessorOutput,
    ProcessorRegistry,
    TickProcessor,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

T0 = 1_727_996_400_000

# StockCharts' RSI worked example (14 periods, Wilder smoothing) and its published values.
STOCKCHARTS_CLOSES = [
    44.3389, 44.0902, 44.1497, 43.6124, 44.3278, 44.8264, 45.0955, 45.4245, 45.8433,
    46.0826, 45.8931, 46.0328, 45.6140, 46.2820, 46.2820, 46.0028, 46.0328, 46.4116,
    46.2222, 45.6439, 46.2122, 46.2521, 45.7137, 46.4515, 45.7835, 45.3548, 44.0288,
    44.1783, 44.2181, 44.5672, 43.4205, 42.6628, 43.1314,
]  # fmt: skip
STOCKCHARTS_RSI = [
    70.53, 66.32, 66.55, 69.41, 66.36, 57.97, 62.93, 63.26, 56.06, 62.38, 54.71, 50.42,
    39.99, 41.46, 41.87, 45.46, 37.30, 33.08, 37.77,
]  # fmt: skip


def tick(price: float, *, symbol: str = "EUR/USD", ts: int = T0, **extra: Any) -> TickData:
    return TickData(symbol=symbol, timestamp=ts, bid=price, ask=price, source="feed", **extra)


def feed(processor: TickProcessor, prices: Sequence[float], **extra: Any) -> list[object | None]:
    return [processor.on_tick(tick(p, ts=T0 + i, **extra)) for i, p in enumerate(prices)]


def reference_rsi(prices: Sequence[float], period: int) -> list[float | None]:
    changes = [b - a for a, b in itertools.pairwise(prices)]
    out: list[float | None] = [None]
    gain = loss = 0.0
    for i, change in enumerate(changes):
        up, down = max(change, 0.0), max(-change, 0.0)
        if i < period:
            gain += up / period
            loss += down / period
            if i < period - 1:
                out.append(None)
                continue
        else:
            gain = (gain * (period - 1) + up) / period
            loss = (loss * (period - 1) + down) / period
        out.append(50.0 if gain + loss == 0 else 100 - 100 / (1 + gain / loss) if loss else 100.0)
    return out


# --------------------------------------------------------------------------- SMA


@settings(max_examples=50, deadline=None)
@given(
    prices=st.lists(st.floats(0.5, 2.0, allow_nan=False), min_size=1, max_size=120),
    period=st.integers(1, 20),
)
def test_sma_matches_brute_force(prices: list[float], period: int) -> None:
    sma = IncrementalSMA(period)
    got = feed(sma, prices)
    for i, value in enumerate(got):
        if i + 1 < period:
            assert value is None
        else:
            assert value == pytest.approx(sum(prices[i + 1 - period : i + 1]) / period)


def test_sma_per_symbol_and_price_choice() -> None:
    sma = IncrementalSMA(2, price="last")
    assert sma.name == "sma2"
    assert sma.period == 2
    assert sma.on_tick(tick(1.0)) is None  # no last price: skipped
    assert sma.on_tick(tick(1.0, last_price=1.0)) is None
    assert sma.on_tick(tick(150.0, symbol="USD/JPY", last_price=150.0)) is None
    assert sma.on_tick(tick(1.0, last_price=2.0)) == 1.5
    assert sma.value("EUR/USD") == 1.5
    assert sma.value("USD/JPY") is None
    mid = IncrementalSMA(1, price="mid")
    assert mid.on_tick(TickData(symbol="X", timestamp=T0, bid=1.0, ask=2.0, source="s")) == 1.5


# --------------------------------------------------------------------------- RSI


def test_rsi_matches_the_published_wilder_example() -> None:
    rsi = IncrementalRSI(14)
    got = feed(rsi, STOCKCHARTS_CLOSES)
    assert got[:14] == [None] * 14
    assert [round(v, 2) for v in got[14:] if isinstance(v, float)] == STOCKCHARTS_RSI


@settings(max_examples=50, deadline=None)
@given(
    prices=st.lists(st.integers(90, 110), min_size=1, max_size=80),
    period=st.integers(1, 15),
)
def test_rsi_matches_reference_and_stays_in_range(prices: list[int], period: int) -> None:
    got = feed(IncrementalRSI(period), [float(p) for p in prices])
    want = reference_rsi([float(p) for p in prices], period)
    for value, expected in zip(got, want, strict=True):
        if expected is None:
            assert value is None
        else:
            assert isinstance(value, float)
            assert 0.0 <= value <= 100.0
            assert value == pytest.approx(expected, abs=1e-9)


def test_rsi_flat_and_one_sided_markets() -> None:
    assert feed(IncrementalRSI(2), [1.0, 1.0, 1.0])[-1] == 50.0
    assert feed(IncrementalRSI(2), [1.0, 1.1, 1.2])[-1] == 100.0
    assert feed(IncrementalRSI(2), [1.2, 1.1, 1.0])[-1] == 0.0


@pytest.mark.parametrize("period", [0, -1, 2.5, True])
def test_invalid_period(period: Any) -> None:
    with pytest.raises(ValidationError):
        IncrementalSMA(period)
    with pytest.raises(ValidationError):
        IncrementalRSI(period)


def test_invalid_price_and_symbols() -> None:
    with pytest.raises(ValidationError):
        IncrementalSMA(3, price="close")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        IncrementalRSI(3, symbols="EUR/USD")


# --------------------------------------------------------------------------- registry


class Recorder:
    """A processor that records what it saw and returns a fixed value."""

    def __init__(self, name: str, symbols: frozenset[str] | None = None, value: object = 1):
        self.name = name
        self.symbols = symbols
        self.value = value
        self.seen: list[str] = []

    def on_tick(self, tick: TickData) -> object | None:
        self.seen.append(tick.symbol)
        return self.value


class Failing:
    name = "boom"
    symbols = None

    def __init__(self) -> None:
        self.calls = 0

    def on_tick(self, tick: TickData) -> object | None:
        self.calls += 1
        msg = f"bad tick {self.calls}"
        raise RuntimeError(msg)


class FakeTimer:
    """perf_counter stand-in that moves only when a processor 'spends' time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Heavy:
    """A processor whose calls take the given durations on the fake timer."""

    name = "heavy"
    symbols = None

    def __init__(self, timer: FakeTimer, durations: list[float]) -> None:
        self.timer = timer
        self.durations = durations

    def on_tick(self, tick: TickData) -> object | None:
        self.timer.now += self.durations.pop(0)
        return None


def test_registry_runs_processors_for_their_symbols() -> None:
    registry = ProcessorRegistry()
    everything = Recorder("all")
    eur_only = Recorder("eur", symbols=frozenset({"EUR_USD"}), value=2)  # normalised
    silent = Recorder("silent", value=None)
    for processor in (everything, eur_only, silent):
        registry.register(processor)
    assert registry.names == ("all", "eur", "silent")

    assert registry.process(tick(1.1)) == [ProcessorOutput("all", 1), ProcessorOutput("eur", 2)]
    assert registry.process(tick(150.0, symbol="USD/JPY")) == [ProcessorOutput("all", 1)]
    assert eur_only.seen == ["EUR/USD"]
    assert silent.seen == ["EUR/USD", "USD/JPY"]
    assert registry.unregister("all") is everything
    assert registry.unregister("missing") is None
    assert registry.process(tick(1.1)) == [ProcessorOutput("eur", 2)]
    assert registry.ticks == 3
    assert registry.stats()["eur"].calls == 2


def test_registry_with_shipped_processors() -> None:
    registry = ProcessorRegistry()
    registry.register(IncrementalSMA(2))
    registry.register(IncrementalRSI(2, symbols=["eur/usd"]))
    outputs = [registry.process(tick(p, ts=T0 + i)) for i, p in enumerate([1.0, 1.2, 1.1])]
    assert outputs[0] == []
    assert outputs[1] == [ProcessorOutput("sma2", pytest.approx(1.1))]
    assert [o.processor for o in outputs[2]] == ["sma2", "rsi2"]
    assert outputs[2][1].value == pytest.approx(100 * 0.2 / 0.3)


def test_registry_refuses_duplicates_and_non_processors() -> None:
    registry = ProcessorRegistry()
    registry.register(Recorder("x"))
    with pytest.raises(ConfigurationError, match="already registered"):
        registry.register(Recorder("x"))
    with pytest.raises(ConfigurationError, match="TickProcessor"):
        registry.register(object())  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ProcessorRegistry(slow_threshold=0)


def test_processor_errors_are_isolated_counted_and_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    registry = ProcessorRegistry(clock=clock, log_interval=60.0)
    failing = Failing()
    registry.register(failing)
    registry.register(Recorder("after"))
    caplog.set_level(logging.ERROR, logger="data_manager.processors")

    for _ in range(5):
        assert registry.process(tick(1.1)) == [ProcessorOutput("after", 1)]
    stats = registry.stats()["boom"]
    assert (stats.calls, stats.errors) == (5, 5)
    assert stats.last_error == "RuntimeError('bad tick 5')"
    assert len(caplog.records) == 1  # once, with the traceback
    assert caplog.records[0].exc_info is not None
    assert "'boom'" in caplog.records[0].getMessage()

    clock.advance(60.0)
    registry.process(tick(1.1))
    assert len(caplog.records) == 2
    assert "4 similar errors" in caplog.records[1].getMessage()
    assert registry.stats()["after"].errors == 0


def test_an_exception_whose_repr_fails_is_isolated_too() -> None:
    class Unprintable(Exception):
        def __repr__(self) -> str:
            raise RuntimeError("repr failed")

    class Raising:
        name = "unprintable"
        symbols = None

        def on_tick(self, tick: TickData) -> None:
            raise Unprintable

    registry = ProcessorRegistry()
    registry.register(Raising())
    assert registry.process(tick(1.1)) == []
    stats = registry.stats()["unprintable"]
    assert stats.errors == 1
    assert stats.last_error == "<Unprintable: repr() failed>"


def test_base_exceptions_propagate() -> None:
    class Interrupting:
        name = "interrupt"
        symbols = None

        def on_tick(self, tick: TickData) -> object | None:
            raise KeyboardInterrupt

    registry = ProcessorRegistry()
    registry.register(Interrupting())
    with pytest.raises(KeyboardInterrupt):
        registry.process(tick(1.1))


def test_slow_processor_is_flagged_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    timer = FakeTimer()
    registry = ProcessorRegistry(slow_threshold=0.001, timer=timer)
    registry.register(Heavy(timer, [0.005] * 40 + [0.00001] * 100))
    registry.register(Recorder("light"))
    caplog.set_level(logging.INFO, logger="data_manager.processors")

    registry.process(tick(1.1))
    first = registry.stats()["heavy"]
    assert first.slow_calls == 1
    assert not first.slow
    for _ in range(39):
        registry.process(tick(1.1))
    slow = registry.stats()["heavy"]
    assert slow.slow
    assert slow.slow_calls == 40
    assert slow.max_seconds == pytest.approx(0.005)
    assert slow.total_seconds == pytest.approx(0.2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "slow" in warnings[0].getMessage()

    for _ in range(100):
        registry.process(tick(1.1))
    recovered = registry.stats()["heavy"]
    assert not recovered.slow
    assert recovered.slow_calls == 40
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert registry.stats()["light"].max_seconds == 0.0  # the heavy one's time is not its
