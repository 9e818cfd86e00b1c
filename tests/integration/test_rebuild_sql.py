"""``rebuild_candles`` in SQL: the database's aggregation equals the streaming aggregator's
and live ingestion's, on SQLite and PostgreSQL (plain, and TimescaleDB's statement run on
emulated ``time_bucket``/``first``/``last``; on a real TimescaleDB when
``DATA_MANAGER_TEST_TIMESCALEDB_URL`` names one).

Ties: storage keeps no arrival order, so a rebuild takes the ticks of one millisecond in key
order ``(source, content_key)``; live ingestion is fed in that order here so the three agree.
SQLite may sum floats its own way (compensated from 3.43 on), so volume and VWAP are compared
with ``math.isclose(rel_tol=1e-12)`` there; everything else must be equal.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_manager import DataManagerSettings, DataRouter, TickData
from data_manager.aggregation import bucket_bounds
from data_manager.clock import ManualClock
from data_manager.errors import ValidationError
from data_manager.models import TIMEFRAMES
from data_manager.settings import PostgresSettings
from data_manager.storage import candle_sql, postgres, sqlite
from data_manager.storage.base import tick_content_key
from data_manager.strategy import strategy_from_mapping

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable
    from pathlib import Path

    from data_manager.models import CandleData

SYM: Final = "EUR/USD"
T0: Final = 1_727_996_400_000  # 2024-10-03T23:00:00Z (a Thursday), an hour boundary
SECOND: Final = 1_000
MINUTE: Final = 60_000
HOUR: Final = 3_600_000
DAY: Final = 86_400_000
WEEK: Final = 7 * DAY
SOURCES: Final = ("a", "b", "c")
#: Everything a test writes lies in here (weekly buckets start up to 6 days before T0;
#: a random stream ends at most 2 h + 40 x 2 days after T0).
SPAN: Final = (T0 - WEEK, T0 + 12 * WEEK)
TIMESCALEDB_URL_ENV: Final = "DATA_MANAGER_TEST_TIMESCALEDB_URL"

# TimescaleDB's time_bucket (default origin: Monday 2000-01-03 UTC) and first/last with
# their tie rule (strict comparison: the first row met wins), for the one signature the
# SDK's statement calls them with: (double precision, numeric key).
EMULATION: Final = """
CREATE FUNCTION {s}.time_bucket(bucket_width interval, ts timestamptz) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT date_bin(bucket_width, ts, TIMESTAMPTZ '2000-01-03 00:00:00+00') $$;
CREATE TYPE {s}.bookend AS (value double precision, key numeric);
CREATE FUNCTION {s}.first_step(state {s}.bookend, value double precision, key numeric)
    RETURNS {s}.bookend LANGUAGE sql IMMUTABLE
    AS $$ SELECT CASE WHEN state IS NULL OR key < (state).key
                      THEN ROW(value, key)::{s}.bookend ELSE state END $$;
CREATE FUNCTION {s}.last_step(state {s}.bookend, value double precision, key numeric)
    RETURNS {s}.bookend LANGUAGE sql IMMUTABLE
    AS $$ SELECT CASE WHEN state IS NULL OR key > (state).key
                      THEN ROW(value, key)::{s}.bookend ELSE state END $$;
CREATE FUNCTION {s}.bookend_value(state {s}.bookend) RETURNS double precision
    LANGUAGE sql IMMUTABLE AS $$ SELECT (state).value $$;
CREATE AGGREGATE {s}.first(double precision, numeric)
    (SFUNC = {s}.first_step, STYPE = {s}.bookend, FINALFUNC = {s}.bookend_value);
CREATE AGGREGATE {s}.last(double precision, numeric)
    (SFUNC = {s}.last_step, STYPE = {s}.bookend, FINALFUNC = {s}.bookend_value);
"""


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """Where the routers of one test keep their data, and what their SQL rebuilds used."""

    name: str
    make_settings: Callable[[Path], DataManagerSettings]
    #: SQLite may sum floats differently from Python in the last bits.
    approx_sums: bool
    #: Schema TimescaleDB's functions must come from (None: plain SQL expected).
    timescaledb_schema: str | None = None
    #: The ``timescaledb_schema`` of every statement built for a rebuild (None on SQLite).
    sql_calls: list[str | None] = field(default_factory=list)
    _journals: int = 0

    def settings(self, tmp_path: Path) -> DataManagerSettings:
        self._journals += 1
        return self.make_settings(tmp_path / f"journal{self._journals}")


@dataclass
class Spec:
    name: str
    postgres_url: str | None = None
    pg_schema: str | None = None


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("timescaledb-emulated", marks=pytest.mark.postgres),
    ]
)
def spec(request: pytest.FixtureRequest) -> Spec:
    if request.param == "sqlite":
        return Spec("sqlite")
    return Spec(
        request.param,
        postgres_url=request.getfixturevalue("postgres_url"),
        pg_schema=request.getfixturevalue("pg_schema"),
    )


@pytest_asyncio.fixture(loop_scope="session")
async def backend(
    spec: Spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Backend]:
    if spec.postgres_url is None or spec.pg_schema is None:
        path = str(tmp_path / "rebuild.sqlite3")
        found = Backend(
            "sqlite",
            lambda journal: DataManagerSettings(
                sqlite_path=path, watch_strategy=False, journal_dir=journal
            ),
            approx_sums=True,
        )
        _spy_sqlite(monkeypatch, found)
        yield found
        return
    url, schema = spec.postgres_url, spec.pg_schema
    found = Backend(
        spec.name, lambda journal: _pg_settings(url, schema, journal), approx_sums=False
    )
    if spec.name == "timescaledb-emulated":
        await _execute(url, EMULATION.format(s=f'"{schema}"'))
        # The catalog probe now answers "the extension's functions live in this schema".
        monkeypatch.setattr(postgres, "TIMESCALEDB_SCHEMA_SQL", f"SELECT '{schema}'::text")
        found.timescaledb_schema = schema
    else:
        # A given server may have TimescaleDB in the database: then the real statement runs.
        found.timescaledb_schema = await _fetchval(url, postgres.TIMESCALEDB_SCHEMA_SQL)
    _spy_postgres(monkeypatch, found)
    yield found


def _spy_postgres(monkeypatch: pytest.MonkeyPatch, backend: Backend) -> None:
    build = postgres.postgres_buckets_sql

    def spy(*args: Any, **kwargs: Any) -> str:
        backend.sql_calls.append(kwargs["timescaledb_schema"])
        return build(*args, **kwargs)

    monkeypatch.setattr(postgres, "postgres_buckets_sql", spy)


def _spy_sqlite(monkeypatch: pytest.MonkeyPatch, backend: Backend) -> None:
    build = sqlite.sqlite_buckets_sql

    def spy(*args: Any, **kwargs: Any) -> str:
        backend.sql_calls.append(None)
        return build(*args, **kwargs)

    monkeypatch.setattr(sqlite, "sqlite_buckets_sql", spy)


def _pg_settings(url: str, schema: str, journal: Path) -> DataManagerSettings:
    return DataManagerSettings(
        postgres=PostgresSettings(url=url, db_schema=schema, pool_min=1, pool_max=4),
        watch_strategy=False,
        journal_dir=journal,
    )


async def _fetchval(url: str, sql: str) -> Any:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(sql, timeout=10)
    finally:
        await conn.close(timeout=10)


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(sql, timeout=10)
    finally:
        await conn.close(timeout=10)


# --------------------------------------------------------------------------- running


def tick(
    ts: int,
    bid: float,
    source: str = "a",
    *,
    spread: float = 0.0002,
    **extra: Any,
) -> TickData:
    return TickData(symbol=SYM, timestamp=ts, bid=bid, ask=bid + spread, source=source, **extra)


def key_order(ticks: Iterable[TickData]) -> list[TickData]:
    """The stored ticks in the order a rebuild takes them (duplicates are stored once)."""
    unique = {(t.source, t.timestamp, tick_content_key(t)): t for t in ticks}
    return [unique[k] for k in sorted(unique, key=lambda k: (k[1], k[0], k[2]))]


@dataclass
class Outcome:
    live: list[CandleData]
    sql: list[CandleData]
    stream: list[CandleData]
    written_sql: int
    written_stream: int


def _strategy(timeframe: str, price: str, daily_close: str = "utc") -> Any:
    return strategy_from_mapping(
        {
            "aggregation": {
                "timeframes": [timeframe],
                "price": price,
                "daily_close": daily_close,
                # Closed by the clock exactly when a rebuild closes them: at their end.
                "idle_close_grace_seconds": 0,
            }
        }
    )


async def stored(router: DataRouter, timeframe: str) -> list[CandleData]:
    out: list[CandleData] = []
    for source in SOURCES:
        out += await router.storage.candles_range(SYM, timeframe, *SPAN, source=f"agg:{source}")
    return out


async def three_ways(
    backend: Backend,
    tmp_path: Path,
    ticks: list[TickData],
    *,
    timeframe: str,
    price: str,
    now_ms: int,
) -> Outcome:
    """Aggregate ``ticks`` live, then rebuild them in SQL, then by streaming."""
    ordered = key_order(ticks)
    start, end = ordered[0].timestamp, ordered[-1].timestamp + 1
    # The router's own maintenance pass runs on a real-time timer and may come in the
    # middle of the loop below (a slow machine): the clock stays at the first tick while
    # the ticks are saved, so that pass cannot close a bucket a later tick belongs to.
    clock = ManualClock(wall_ms=start)
    async with DataRouter(
        settings=backend.settings(tmp_path),
        clock=clock,
        strategy=_strategy(timeframe, price),
    ) as router:
        # The database may hold the previous example's rows.
        await router.delete_range(SYM, *SPAN, "ticks")
        await router.delete_range(SYM, *SPAN, "candles")
        for t in ordered:
            await router.save_tick(t)
        clock.advance((now_ms - start) / 1000)
        await router.run_maintenance()
        await router.flush()
        live = await stored(router, timeframe)
        await router.delete_range(SYM, *SPAN, "candles")
        written_sql = await router.rebuild_candles(SYM, timeframe, start, end, method="sql")
        sql = await stored(router, timeframe)
        await router.delete_range(SYM, *SPAN, "candles")
        written_stream = await router.rebuild_candles(SYM, timeframe, start, end, method="stream")
        stream = await stored(router, timeframe)
    return Outcome(live, sql, stream, written_sql, written_stream)


def assert_candles_equal(got: list[CandleData], want: list[CandleData], *, approx: bool) -> None:
    sums = {"volume", "vwap"}
    assert [c.model_dump(exclude=sums) for c in got] == [c.model_dump(exclude=sums) for c in want]
    for g, w in zip(got, want, strict=True):
        for name in sums:
            a, b = getattr(g, name), getattr(w, name)
            if approx and a is not None and b is not None:
                assert math.isclose(a, b, rel_tol=1e-12), (name, g, w)
            else:
                assert a == b, (name, g, w)


def assert_agree(outcome: Outcome, backend: Backend) -> None:
    assert outcome.live, "the scenario produced no candle"
    assert_candles_equal(outcome.stream, outcome.live, approx=False)
    assert_candles_equal(outcome.sql, outcome.stream, approx=backend.approx_sums)
    assert outcome.written_sql == outcome.written_stream == len(outcome.live)
    # The SQL rebuild really ran the statement this backend should use.
    assert backend.sql_calls
    assert set(backend.sql_calls) == {backend.timescaledb_schema}


def quote_beside(trade: TickData, *, before: bool) -> TickData:
    """A quote in the trade's millisecond whose content key sorts before (or after) it."""
    key = tick_content_key(trade)
    for i in range(100):
        quote = tick(trade.timestamp, trade.bid + i * 1e-5, trade.source)
        if (tick_content_key(quote) < key) is before:
            return quote
    raise AssertionError("no such quote")  # pragma: no cover - 2**-100


def fixed_ticks() -> list[TickData]:
    """Three sources over three days: ties, mixed volume, trades among quotes, a source
    whose last day holds only quotes."""
    first_trade = tick(T0 + 2_500, 1.1001, last_price=1.1002, last_size=0.5)
    last_trade = tick(T0 + 30_000, 1.0998, last_price=1.0999)
    return [
        # a: quotes and trades, two quotes in one millisecond, volume on some ticks only;
        # the first and last trades of the first minute share their millisecond with a
        # quote that sorts before / after them (in "last" mode, open and close skip it).
        tick(T0 + 1_000, 1.1000),
        tick(T0 + 1_000, 1.1003),
        tick(T0 + 2_500, 1.1001, volume=2.0),
        first_trade,
        quote_beside(first_trade, before=True),
        last_trade,
        quote_beside(last_trade, before=False),
        tick(T0 + 59_999, 1.1004, volume=0.0),
        tick(T0 + 60_000, 1.1005, last_price=1.1006, last_size=1e6 / 3),
        tick(T0 + 60_000, 1.1002, last_price=1.1003, last_size=0.1),
        tick(T0 + HOUR + 5, 1.1010, volume=3.3),
        tick(T0 + DAY + 7, 1.1020, last_price=1.1021),
        tick(T0 + 2 * DAY + 11, 1.1030, volume=1.25, last_price=1.1031),
        # b: quotes only, no volume anywhere (tick volume).
        tick(T0 + 1_000, 1.2000, "b"),
        tick(T0 + 61_000, 1.2002, "b", spread=0.0004),
        tick(T0 + 61_000, 1.1998, "b"),
        tick(T0 + 3 * HOUR, 1.1990, "b"),
        # c: a trade on day 1, then only quotes two days later (they close day 1's buckets
        # in "last" mode although they carry no price).
        tick(T0 + 5_000, 1.3000, "c", last_price=1.3001, volume=7.0),
        tick(T0 + 2 * DAY + 100, 1.3010, "c"),
        tick(T0 + 2 * DAY + 200, 1.3011, "c"),
    ]


# --------------------------------------------------------------------------- the three agree


@pytest.mark.parametrize("price", ["mid", "last"])
@pytest.mark.parametrize("timeframe", ["1m", "1h", "1w"])
async def test_fixed_stream_sql_equals_stream_equals_live(
    backend: Backend, tmp_path: Path, timeframe: str, price: str
) -> None:
    ticks = fixed_ticks()
    # The clock stands inside the last bucket of "a": it stays forming, the others closed.
    now = T0 + 2 * DAY + 12
    outcome = await three_ways(
        backend, tmp_path, ticks, timeframe=timeframe, price=price, now_ms=now
    )
    assert_agree(outcome, backend)
    assert any(not c.is_closed for c in outcome.live)
    if timeframe != "1w":  # all in one week, which has not ended
        assert any(c.is_closed for c in outcome.live)


TIMEFRAME_CHOICES: Final = ("1m", "5m", "1h", "1w")
GAPS: Final = (0, 0, 1, 999, 20 * SECOND, 61 * SECOND, 7 * MINUTE, 3 * HOUR, 2 * DAY)
VOLUMES: Final = (None, None, 0.0, 0.5, 0.7, 3.3, 1e6 / 3)


@st.composite
def streams(draw: st.DrawFn) -> list[TickData]:
    ts = T0 + draw(st.integers(0, 2 * HOUR))
    base = draw(st.sampled_from([1.1, 110.79]))  # a JPY-like price rounds differently
    out: list[TickData] = []
    for _ in range(draw(st.integers(1, 40))):
        ts += draw(st.sampled_from(GAPS))
        bid = base + draw(st.integers(0, 6)) * 0.0001
        spread = draw(st.sampled_from([0.0001, 0.0003]))
        extra: dict[str, Any] = {"volume": draw(st.sampled_from(VOLUMES))}
        if draw(st.booleans()):  # a trade
            extra["last_price"] = bid + draw(st.sampled_from([0.0, 0.00005, spread]))
            extra["last_size"] = draw(st.sampled_from(VOLUMES))
        out.append(tick(ts, bid, draw(st.sampled_from(SOURCES)), spread=spread, **extra))
    return out


@pytest.mark.slow
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ticks=streams(),
    timeframe=st.sampled_from(TIMEFRAME_CHOICES),
    price=st.sampled_from(["mid", "bid", "ask", "last"]),
    clock=st.sampled_from(["inside", "at_end", "far"]),
)
async def test_random_streams_sql_equals_stream_equals_live(
    backend: Backend,
    tmp_path: Path,
    ticks: list[TickData],
    timeframe: str,
    price: str,
    clock: str,
) -> None:
    newest = max(t.timestamp for t in ticks)
    end = bucket_bounds(newest, timeframe)[1]
    now = {"inside": end - 1, "at_end": end, "far": end + 8 * WEEK}[clock]
    if price == "last" and not any(t.last_price is not None for t in ticks):
        ticks = [*ticks, tick(newest, 1.1, "a", last_price=1.1001)]
    backend.sql_calls.clear()
    outcome = await three_ways(
        backend, tmp_path, ticks, timeframe=timeframe, price=price, now_ms=now
    )
    assert_agree(outcome, backend)


# --------------------------------------------------------------------------- closing


@pytest.mark.parametrize("method", ["sql", "stream"])
async def test_last_bucket_forming_until_the_clock_passes_its_end(
    backend: Backend, tmp_path: Path, method: Literal["sql", "stream"]
) -> None:
    clock = ManualClock(wall_ms=T0 + 90_000)
    async with DataRouter(
        settings=backend.settings(tmp_path), clock=clock, strategy=_strategy("1m", "mid")
    ) as router:
        await router.save_ticks(
            [tick(T0 + 1_000, 1.1), tick(T0 + 61_000, 1.1001), tick(T0 + 62_000, 1.2, "b")]
        )
        written = await router.rebuild_candles(SYM, "1m", T0, T0 + 62_001, method=method)
        assert written == 3
        flags = [(c.source, c.timestamp, c.is_closed) for c in await stored(router, "1m")]
        assert flags == [
            ("agg:a", T0, True),  # closed by the next tick of "a"
            ("agg:a", T0 + 60_000, False),  # ends at T0 + 120 s, after the clock
            ("agg:b", T0 + 60_000, False),
        ]
        clock.advance(30.0)  # now = T0 + 120 s: the last buckets have ended
        assert await router.rebuild_candles(SYM, "1m", T0, T0 + 62_001, method=method) == 2
        assert all(c.is_closed for c in await stored(router, "1m"))


@pytest.mark.parametrize("method", ["sql", "stream"])
async def test_a_quote_closes_a_bucket_in_last_mode_across_days(
    backend: Backend, tmp_path: Path, method: Literal["sql", "stream"]
) -> None:
    # The clock is before every bucket's end: only event time closes anything.
    clock = ManualClock(wall_ms=T0)
    async with DataRouter(
        settings=backend.settings(tmp_path), clock=clock, strategy=_strategy("1m", "last")
    ) as router:
        await router.save_ticks(
            [
                tick(T0 + 1_000, 1.1, last_price=1.1001, last_size=2.0),
                tick(T0 + 3 * DAY, 1.1),  # a quote in a later chunk: no candle of its own
                tick(T0 + 2_000, 1.2, "b", last_price=1.2001),
                # c: only its opening trade has a size.
                tick(T0 + 3_000, 110.79, "c", last_price=110.7955, last_size=3.3),
                tick(T0 + 4_000, 110.80, "c", last_price=110.801),
            ]
        )
        written = await router.rebuild_candles(SYM, "1m", T0, T0 + 3 * DAY + 1, method=method)
        assert written == 3
        candles = await stored(router, "1m")
        assert [(c.source, c.is_closed, c.num_trades) for c in candles] == [
            ("agg:a", True, 1),
            ("agg:b", False, 1),
            ("agg:c", False, 2),
        ]
        assert candles[0].vwap == pytest.approx(1.1001)
        assert candles[1].vwap is None
        assert candles[1].volume == 1.0  # tick volume
        assert candles[2].vwap == pytest.approx(110.7955)  # ticks without a size count 0
        assert candles[2].volume == 3.3


async def test_ties_are_taken_in_key_order_whatever_the_arrival_order(
    backend: Backend, tmp_path: Path
) -> None:
    same_ms = [tick(T0 + 1_000, 1.1 + i * 1e-4, source) for i in range(4) for source in "ab"]
    ticks = [*same_ms, tick(T0 + 2_000, 1.2), tick(T0 + 2_000, 1.2, "b")]
    ordered = key_order(ticks)
    async with DataRouter(
        settings=backend.settings(tmp_path),
        clock=ManualClock(wall_ms=SPAN[1]),
        strategy=_strategy("1m", "mid"),
    ) as router:
        await router.save_ticks(ordered[::-1])  # stored in the reverse of key order
        results = []
        for method, source in [("stream", None), ("sql", None), ("stream", "a"), ("stream", "b")]:
            await router.delete_range(SYM, *SPAN, "candles")
            await router.rebuild_candles(SYM, "1m", T0, T0 + 2_001, method=method, source=source)  # type: ignore[arg-type]
            results.append(await stored(router, "1m"))
        stream, sql, *per_source = results
    assert_candles_equal(sql, stream, approx=backend.approx_sums)
    assert stream == [c for rows in per_source for c in rows]  # one source: content_key order
    for candle in stream:
        first = next(t for t in ordered if f"agg:{t.source}" == candle.source)
        assert candle.open == first.mid  # the lowest content_key, not the first stored


# --------------------------------------------------------------------------- choosing


async def test_calendar_buckets_refuse_sql_and_auto_streams_them(
    backend: Backend, tmp_path: Path
) -> None:
    strategy = strategy_from_mapping(
        {"aggregation": {"timeframes": ["1m"], "daily_close": "new_york_17"}}
    )
    ticks = [tick(T0 + i * 7 * HOUR, 1.1 + i * 1e-4, volume=1.0) for i in range(12)]
    end = ticks[-1].timestamp + 1
    async with DataRouter(
        settings=backend.settings(tmp_path),
        clock=ManualClock(wall_ms=SPAN[1]),
        strategy=strategy,
    ) as router:
        await router.save_ticks(ticks)
        for timeframe in ("4h", "1d", "1w"):
            with pytest.raises(ValidationError, match="daylight saving"):
                await router.rebuild_candles(SYM, timeframe, T0, end, method="sql")
            backend.sql_calls.clear()
            written = await router.rebuild_candles(SYM, timeframe, T0, end)
            assert backend.sql_calls == []  # "auto" streamed them
            auto = await stored(router, timeframe)
            assert written == len(auto) > 0
            await router.delete_range(SYM, *SPAN, "candles", timeframe=timeframe)
            await router.rebuild_candles(SYM, timeframe, T0, end, method="stream")
            assert await stored(router, timeframe) == auto
            # New York alignment: the daily bar starts at 17:00 New York, not midnight UTC.
            if timeframe == "1d":
                assert all(c.timestamp % DAY != 0 for c in auto)
        # An hour or less is the same grid in New York: "auto" does it in SQL.
        assert await router.rebuild_candles(SYM, "1h", T0, end) == 12
        assert backend.sql_calls


async def test_unknown_method_is_refused(tmp_path: Path) -> None:
    settings_ = DataManagerSettings(
        sqlite_path=":memory:", watch_strategy=False, journal_dir=tmp_path / "j"
    )
    async with DataRouter(settings=settings_) as router:
        with pytest.raises(ValidationError, match="method"):
            await router.rebuild_candles(SYM, "1m", T0, T0 + 1, method="fast")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the SQL text


def test_timescaledb_statement_uses_time_bucket_first_and_last() -> None:
    sql = candle_sql.postgres_buckets_sql(
        "dm", "1w", price="last", by_source=True, timescaledb_schema="public"
    )
    assert "\"public\".time_bucket(INTERVAL '604800000 milliseconds', ts) AS bucket" in sql
    assert '"public".first(px, k) FILTER (WHERE px IS NOT NULL)' in sql
    assert '"public".last(px, k) FILTER (WHERE px IS NOT NULL)' in sql
    assert f"extract(epoch FROM ts) * {1000 * 2**64} + content_key AS k" in sql
    assert "sum(vol ORDER BY ts, content_key)" in sql
    assert "last_price AS px" in sql
    assert 'FROM "dm".ticks' in sql
    assert "AND source = $4" in sql
    assert "array_agg" not in sql


def test_plain_postgres_statement_bins_on_the_sdk_grid() -> None:
    sql = candle_sql.postgres_buckets_sql(
        "dm", "1w", price="mid", by_source=False, timescaledb_schema=None
    )
    weeks = (
        "date_bin(INTERVAL '604800000 milliseconds', ts, TIMESTAMPTZ '1970-01-05T00:00:00+00:00')"
    )
    assert f"{weeks} AS bucket" in sql  # Monday 1970-01-05: weeks start on Monday
    assert "(array_agg(px ORDER BY ts, content_key)" in sql
    assert "(bid + ask) / 2 AS px" in sql
    assert "time_bucket" not in sql
    assert "first(" not in sql
    assert "$4" not in sql


@pytest.mark.parametrize("daily_close", ["utc", "new_york_17"])
@pytest.mark.parametrize("timeframe", list(TIMEFRAMES))
def test_sql_bucketable_is_exactly_the_fixed_grid(timeframe: str, daily_close: Any) -> None:
    length, origin = candle_sql.bucket_grid(timeframe)
    on_grid = all(
        bucket_bounds(ts, timeframe, daily_close=daily_close)
        == (ts - (ts - origin) % length, ts - (ts - origin) % length + length)
        for ts in range(T0, T0 + 400 * DAY, 7 * HOUR + 13 * MINUTE + 1)
    )
    assert candle_sql.sql_bucketable(timeframe, daily_close) is on_grid


@pytest.mark.parametrize("timeframe", list(TIMEFRAMES))
def test_rebuild_chunks_tile_the_range_newest_first(timeframe: str) -> None:
    first = bucket_bounds(T0, timeframe)[0]
    last = bucket_bounds(T0 + 17 * DAY + 5, timeframe)[1]
    chunks = candle_sql.rebuild_chunks(first, last, timeframe)
    assert chunks[0][1] == last
    assert chunks[-1][0] == first
    for (lo, hi), (_, older_hi) in itertools.pairwise(chunks):
        assert older_hi == lo < hi
    length = TIMEFRAMES[timeframe]
    assert all((lo - first) % length == 0 for lo, _ in chunks)
    assert max(hi - lo for lo, hi in chunks) == max(length, DAY)


# --------------------------------------------------------------------------- real TimescaleDB


@pytest_asyncio.fixture(loop_scope="session")
async def timescaledb(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Backend]:
    """A schema on the TimescaleDB named by ``DATA_MANAGER_TEST_TIMESCALEDB_URL``."""
    url = os.environ.get(TIMESCALEDB_URL_ENV)
    if not url:
        pytest.skip(f"set {TIMESCALEDB_URL_ENV} to a PostgreSQL with TimescaleDB to run this")
    conn = await asyncpg.connect(url, timeout=10)
    try:
        extension = await conn.fetchval(candle_sql.TIMESCALEDB_SCHEMA_SQL)
    finally:
        await conn.close(timeout=10)
    assert extension is not None, f"{TIMESCALEDB_URL_ENV}: no timescaledb extension there"
    schema = f"dmtest_{secrets.token_hex(4)}"
    await _execute(url, f'CREATE SCHEMA "{schema}"')
    found = Backend(
        "timescaledb",
        lambda journal: _pg_settings(url, schema, journal),
        approx_sums=False,
        timescaledb_schema=extension,
    )
    _spy_postgres(monkeypatch, found)
    try:
        yield found
    finally:
        await _execute(url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.parametrize("price", ["mid", "last"])
@pytest.mark.parametrize("timeframe", ["1m", "1h", "1w"])
async def test_real_timescaledb_sql_equals_stream_equals_live(
    timescaledb: Backend, tmp_path: Path, timeframe: str, price: str
) -> None:
    ticks = fixed_ticks()
    outcome = await three_ways(
        timescaledb,
        tmp_path,
        ticks,
        timeframe=timeframe,
        price=price,
        now_ms=T0 + 2 * DAY + 12,
    )
    assert_agree(outcome, timescaledb)
