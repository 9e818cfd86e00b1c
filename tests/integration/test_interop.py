"""Interop on real stores: streamed candle reads, DataFrames/Arrow, CSV/Parquet import and
export (bad rows, round trips, cancellation), and bounded memory over 1M streamed ticks."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import psutil
import pytest
import pytest_asyncio

from data_manager import (
    CandleData,
    ConfigurationError,
    DataManagerSettings,
    DataRouter,
    PostgresSettings,
    RouterClosedError,
    TickData,
    ValidationError,
    interop,
)
from data_manager.interop import (
    CANDLE_COLUMNS,
    TICK_COLUMNS,
    ImportReport,
    export_file,
    get_candles_df,
    get_ticks_df,
    import_file,
    iter_candles,
    parse_timestamp,
)
from data_manager.strategy import RoutingStrategy, strategy_from_mapping

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

T0: Final = 1_727_996_400_000  # 2024-10-03T23:00:00Z
MINUTE: Final = 60_000
SYM: Final = "EUR/USD"


def plain() -> RoutingStrategy:
    """Only what a test saves reaches storage (no aggregation or order flow)."""
    return strategy_from_mapping(
        {"aggregation": {"enabled": False}, "order_flow": {"enabled": False}}
    )


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("POSTGRES_", "DRAGONFLY_")) or (
            name.startswith("DATA_MANAGER_") and not name.startswith("DATA_MANAGER_TEST_")
        ):
            monkeypatch.delenv(name)


def embedded_settings(tmp_path: Path, name: str = "store") -> DataManagerSettings:
    return DataManagerSettings(
        sqlite_path=str(tmp_path / f"{name}.sqlite3"),
        journal_dir=tmp_path / f"{name}-journal",
        watch_strategy=False,
    )


@pytest.fixture(params=["embedded", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> DataManagerSettings:
    if request.param == "embedded":
        return embedded_settings(tmp_path)
    return DataManagerSettings(
        postgres=PostgresSettings(
            url=request.getfixturevalue("postgres_url"),
            db_schema=request.getfixturevalue("pg_schema"),
            pool_min=1,
            pool_max=4,
        ),
        journal_dir=tmp_path / "journal",
        watch_strategy=False,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def router(settings: DataManagerSettings) -> AsyncIterator[DataRouter]:
    async with DataRouter(settings, strategy=plain()) as opened:
        yield opened


def tick(i: int, *, symbol: str = SYM, **extra: Any) -> TickData:
    return TickData(
        symbol=symbol,
        timestamp=T0 + i,
        bid=1.1 + i * 1e-6,
        ask=1.1002 + i * 1e-6,
        source="polygon",
        seq=i,
        **extra,
    )


def candle(i: int, *, timeframe: str = "1m", source: str = "polygon", **extra: Any) -> CandleData:
    bar = {"1m": MINUTE, "1h": 60 * MINUTE}[timeframe]
    price = 1.08 + i * 1e-5
    return CandleData(
        symbol=SYM,
        timeframe=timeframe,
        timestamp=T0 + i * bar,
        open=price,
        high=price + 0.0004,
        low=price - 0.0003,
        close=price + 0.0001,
        source=source,
        **extra,
    )


# --------------------------------------------------------------------------- layout


def test_columns_are_the_model_fields() -> None:
    # A new model field must show up in files and DataFrames, not be dropped silently.
    assert [n for n, _ in TICK_COLUMNS] == list(TickData.model_fields)
    assert [n for n, _ in CANDLE_COLUMNS] == list(CandleData.model_fields)


def test_parse_timestamp_forms() -> None:
    assert parse_timestamp("1727996400000") == T0
    assert parse_timestamp("2024-10-03T23:00:00Z") == T0
    assert parse_timestamp("2024-10-04T01:00:00.001+02:00") == T0 + 1
    assert parse_timestamp(T0) == T0
    with pytest.raises(ValidationError, match="no timezone"):
        parse_timestamp("2024-10-03T23:00:00")
    with pytest.raises(ValidationError, match="seconds"):
        parse_timestamp("1727996400")
    with pytest.raises(ValidationError, match="neither Unix ms nor ISO-8601"):
        parse_timestamp("yesterday")


# --------------------------------------------------------------------------- streaming


async def test_iter_candles_equals_range_read(
    router: DataRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(interop, "MIN_WINDOW_BARS", 1)  # many windows over 250 candles
    await router.save_candles_bulk(candle(i) for i in range(250))
    # An older, second source: "any source" must pick the same one get_candles picks.
    await router.save_candles_bulk(candle(i, source="older") for i in range(-20, 10))
    start, end = T0 + 3 * MINUTE, T0 + 241 * MINUTE
    expected = await router.get_candles(SYM, "1m", start, end)
    assert [c.timestamp for c in expected] == [T0 + i * MINUTE for i in range(3, 241)]
    got = [c async for c in iter_candles(router, SYM, "1m", start, end, batch_size=7)]
    assert got == expected
    older = [
        c async for c in iter_candles(router, "EURUSD", "1m", T0 - MINUTE, end, source="older")
    ]
    assert [c.timestamp for c in older] == [T0 + i * MINUTE for i in range(-1, 10)]
    assert [c async for c in iter_candles(router, SYM, "5m", T0, end)] == []  # no such series


async def test_iter_candles_validates(router: DataRouter) -> None:
    with pytest.raises(ValidationError, match="timeframe"):
        _ = [c async for c in iter_candles(router, SYM, "2m", T0, T0 + 1)]
    with pytest.raises(ValidationError, match="before start"):
        _ = [c async for c in iter_candles(router, SYM, "1m", T0 + 1, T0)]
    with pytest.raises(ValidationError, match="source"):
        _ = [c async for c in iter_candles(router, SYM, "1m", T0, T0 + 1, source=7)]  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="source"):
        _ = [c async for c in iter_candles(router, SYM, "1m", T0, T0 + 1, source="x" * 65)]
    # Trimmed as writes trim it: the series written as "older" is found.
    await router.save_candles_bulk([candle(0, source="older")])
    found = [c async for c in iter_candles(router, SYM, "1m", T0, T0 + 1, source=" older ")]
    assert [c.source for c in found] == ["older"]


@pytest.mark.parametrize("bad", ["x", None, 0, -5, 1.5, True, 2**63])
async def test_iter_candles_refuses_a_bad_batch_size_as_iter_ticks_does(
    router: DataRouter, bad: Any
) -> None:
    await router.save_candles_bulk([candle(0)])
    await router.save_ticks([tick(0)])
    with pytest.raises(ValidationError) as from_ticks:
        _ = [t async for t in router.iter_ticks(SYM, T0, T0 + MINUTE, batch_size=bad)]
    with pytest.raises(ValidationError) as from_function:
        _ = [c async for c in iter_candles(router, SYM, "1m", T0, T0 + MINUTE, batch_size=bad)]
    with pytest.raises(ValidationError) as from_router:
        _ = [c async for c in router.iter_candles(SYM, "1m", T0, T0 + MINUTE, batch_size=bad)]
    assert str(from_function.value) == str(from_router.value) == str(from_ticks.value)
    assert str(from_ticks.value).startswith("batch_size must be a positive int")
    assert [c async for c in router.iter_candles(SYM, "1m", T0, T0 + MINUTE, batch_size=1)] == [
        candle(0)
    ]


# --------------------------------------------------------------------------- DataFrames


async def test_pandas_frames(router: DataRouter) -> None:
    pd = pytest.importorskip("pandas")
    await router.save_ticks([tick(i, volume=float(i)) for i in range(5)])
    await router.save_candles_bulk(candle(i, num_trades=i) for i in range(3))
    df = await get_ticks_df(router, SYM, T0, T0 + 100)
    assert list(df.columns) == [n for n, _ in TICK_COLUMNS] + ["mid", "spread"]
    assert len(df) == 5
    assert df["timestamp"].iloc[0] == pd.Timestamp(T0, unit="ms", tz="UTC")
    assert df["seq"].tolist() == [0, 1, 2, 3, 4]
    assert df["volume"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert df["mid"].iloc[1] == pytest.approx(tick(1).mid)
    assert df["aggressor"].isna().all()
    assert df["received_at"].isna().all()
    cdf = await get_candles_df(router, SYM, "1m", T0, T0 + 10 * MINUTE)
    assert list(cdf.columns) == [n for n, _ in CANDLE_COLUMNS]
    assert cdf["close"].tolist() == [candle(i).close for i in range(3)]
    assert cdf["num_trades"].tolist() == [0, 1, 2]
    assert cdf["is_closed"].all()
    empty = await get_ticks_df(router, "GBP/USD", T0, T0 + 100)
    assert len(empty) == 0
    assert list(empty.columns) == list(df.columns)


async def test_polars_and_arrow_frames(router: DataRouter) -> None:
    pl = pytest.importorskip("polars")
    pa = pytest.importorskip("pyarrow")
    await router.save_ticks([tick(i) for i in range(4)])
    await router.save_candles_bulk(candle(i) for i in range(3))
    pdf = await get_ticks_df(router, SYM, T0, T0 + 100, backend="polars")
    assert pdf.height == 4
    assert pdf.schema["timestamp"] == pl.Datetime("ms", "UTC")
    assert pdf["seq"].to_list() == [0, 1, 2, 3]
    table = await get_candles_df(router, SYM, "1m", T0, T0 + 10 * MINUTE, backend="arrow")
    assert table.num_rows == 3
    assert table.schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")
    assert table.column("open").to_pylist() == [candle(i).open for i in range(3)]


async def test_missing_library_names_the_extra(
    router: DataRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "polars", None)  # makes `import polars` fail
    with pytest.raises(ConfigurationError, match=r"data_manager\[polars\]"):
        await get_ticks_df(router, SYM, T0, T0 + 1, backend="polars")
    with pytest.raises(ValidationError, match="backend"):
        await get_ticks_df(router, SYM, T0, T0 + 1, backend="excel")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- import


BAD_CSV: Final = """symbol,timestamp,bid,ask,source,volume
EUR/USD,1727996400000,1.1,1.1002,polygon,5
EUR/USD,1727996400001,1.1,1.0,polygon,
EURUSD,2024-10-03T23:00:00.002Z,1.1,1.1003,polygon,1

EUR/USD,1727996400,1.1,1.1002,polygon,
EUR/USD,1727996400004,nan,1.1002,polygon,
,1727996400005,1.1,1.1002,,
EUR/USD,1727996400006,1.1,1.1002
EUR/USD,2024-10-03T23:00:00.007,1.1,1.1002,polygon,
EUR/USD,1727996400008,1.2,1.1,polygon,
"EUR/USD",1727996400009,1.1,1.1004,polygon,2
"""


async def test_import_reports_bad_rows_and_stores_good_ones(
    router: DataRouter, tmp_path: Path
) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(BAD_CSV)
    seen: list[tuple[int, int | None]] = []
    report = await import_file(
        router,
        path,
        kind="ticks",
        source="fallback",
        batch_size=2,
        progress=lambda pos, total: seen.append((pos, total)),
    )
    # Line 5 is blank: skipped, not a row.
    assert (report.rows, report.accepted, report.rejected) == (10, 3, 7)
    assert report.stored == 3
    assert report.batches == 2
    assert report.last_line == 12
    assert not report.interrupted
    reasons = {key: (r.count, r.first_lines) for key, r in report.reasons.items()}
    assert reasons == {
        "ask N is below bid N for EUR/USD": (2, [3, 11]),
        "timestamp=N looks like seconds, not Unix milliseconds": (1, [6]),
        "bid: Input should be a finite number": (1, [7]),
        "symbol: Field required": (1, [8]),
        "expected N fields, found N": (1, [9]),
        "timestamp '…' has no timezone; add a Z or +hh:mm suffix": (1, [10]),
    }
    assert report.reasons["expected N fields, found N"].example == "expected 6 fields, found 4"
    assert seen
    assert seen[-1][1] == path.stat().st_size
    stored = await router.get_ticks(SYM, T0, T0 + 100)
    assert [(t.timestamp, t.source, t.volume) for t in stored] == [
        (T0, "polygon", 5.0),
        (T0 + 2, "polygon", 1.0),
        (T0 + 9, "polygon", 2.0),
    ]
    # --source filled the empty cell of line 8 (which failed for its missing symbol only).
    again = await import_file(router, path, kind="ticks", source="fallback")
    assert again.accepted == 3
    assert again.stored == 0  # idempotent


@pytest.mark.parametrize(("suffix", "separator"), [("csv", ","), ("tsv", "\t")])
async def test_import_candles_with_defaults(
    router: DataRouter, tmp_path: Path, suffix: str, separator: str
) -> None:
    path = tmp_path / f"bars.{suffix}"
    path.write_text(
        "timestamp,open,high,low,close,volume,is_closed\n"
        "2024-10-03T23:00:00Z,1.1,1.2,1.0,1.15,10,true\n"
        "1727996460000,1.15,1.16,1.14,1.155,,false\n"
        "1727996520000,1.15,1.1,1.14,1.155,,\n".replace(",", separator)
    )
    report = await import_file(
        router, path, kind="candles", symbol="eur_usd", source="hist", timeframe="1m"
    )
    assert (report.accepted, report.rejected) == (2, 1)
    assert list(report.reasons) == ["high N is below low N"]
    rows = await router.get_candles(SYM, "1m", T0, T0 + 10 * MINUTE, source="hist")
    assert [(c.timestamp, c.is_closed, c.volume) for c in rows] == [
        (T0, True, 10.0),
        (T0 + MINUTE, False, None),
    ]


async def test_import_refuses_unknown_or_missing_columns(
    router: DataRouter, tmp_path: Path
) -> None:
    path = tmp_path / "x.csv"
    path.write_text("symbol,timestamp,bid,ask,source,colour\n")
    with pytest.raises(ValidationError, match=r"unknown column.*'colour'"):
        await import_file(router, path, kind="ticks")
    # A repeated column: which of the two values is meant cannot be known.
    path.write_text("symbol,timestamp,bid,ask,source,bid\nEUR/USD,1,1.0,1.1,x,1.05\n")
    with pytest.raises(ValidationError, match=r"column\(s\) 'bid' given more than once"):
        await import_file(router, path, kind="ticks")
    path.write_text("timestamp,bid,ask\n")
    with pytest.raises(ValidationError, match=r"missing column.*--symbol, --source"):
        await import_file(router, path, kind="ticks")
    with pytest.raises(ValidationError, match="no such file"):
        await import_file(router, tmp_path / "absent.csv", kind="ticks")
    with pytest.raises(ValidationError, match="format"):
        await import_file(router, tmp_path / "ticks.xlsx", kind="ticks")


@pytest.mark.parametrize(
    ("content", "said"),
    [
        # The first read decodes ~8 KB at once: a bad byte in the header or a few lines
        # below it fails while the header is read, not in the rows.
        (b"symbol,timestamp,bid,ask,source,caf\xe9\n", "not UTF-8 text (near line 1)"),
        (
            b"symbol,timestamp,bid,ask,source,use_case\n"
            b"EUR/USD,1727996400000,1.1,1.1002,csv,spot\n"
            b"EUR/USD,1727996400001,1.1,1.1002,csv,caf\xe9\n",
            "not UTF-8 text (near line 3)",
        ),
        # Past the first read: the line holding the byte, not the reader's last line.
        (
            b"symbol,timestamp,bid,ask,source,use_case\n"
            + b"".join(b"EUR/USD,%d,1.1,1.1002,csv,spot\n" % (T0 + i) for i in range(2000))
            + b"EUR/USD,1727996500000,1.1,1.1002,csv,caf\xe9\n",
            "not UTF-8 text (near line 2002)",
        ),
        (b'"' + b"s" * 200_000 + b'",timestamp\n', "CSV syntax error near line 1: field larger"),
    ],
    ids=["header", "third-line", "line-2002", "huge-header-field"],
)
async def test_a_csv_unreadable_as_text_is_a_validation_error(
    router: DataRouter, tmp_path: Path, content: bytes, said: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(ValidationError, match=re.escape(said)):
        await import_file(router, path, kind="ticks", batch_size=100)


async def test_cancelled_import_keeps_what_it_stored(router: DataRouter, tmp_path: Path) -> None:
    path = tmp_path / "many.csv"
    lines = ["symbol,timestamp,bid,ask,source"]
    lines += [f"EUR/USD,{T0 + i},1.1,1.1002,polygon" for i in range(100)]
    path.write_text("\n".join(lines) + "\n")
    report = ImportReport(path=str(path), kind="ticks", format="csv")
    task: asyncio.Task[ImportReport] | None = None

    def stop_after_first_batch(_pos: int, _total: int | None) -> None:
        assert task is not None
        task.cancel()

    task = asyncio.create_task(
        import_file(
            router,
            path,
            kind="ticks",
            batch_size=10,
            progress=stop_after_first_batch,
            report=report,
        )
    )
    with pytest.raises(asyncio.CancelledError):
        await task
    assert report.interrupted
    assert report.accepted == report.stored == 10
    assert report.last_line == 11
    # The cancellation may land inside the next batch's write, before or after its commit:
    # what is stored is the reported prefix, perhaps plus that whole batch, nothing else.
    stored = [t.timestamp - T0 for t in await router.get_ticks(SYM, T0, T0 + 1000)]
    assert stored in (list(range(10)), list(range(20)))


# --------------------------------------------------------------------------- export


def rich_ticks() -> list[TickData]:
    """Ticks exercising every column: None and set optionals, awkward floats, both sides."""
    out = []
    for i in range(60):
        extra: dict[str, Any] = {}
        if i % 2:
            extra.update(volume=0.1 + i / 3, bid_size=1e6, ask_size=2.5e5, exchange=i)
        if i % 3 == 0:
            extra.update(last_price=1.1001, last_size=1 / 3, aggressor="buy" if i % 2 else "sell")
        if i % 5 == 0:
            extra.update(use_case="fx,spot", event_type='quote "x"', received_at=T0 + i + 7)
        out.append(tick(i, **extra))
    out.append(tick(100, symbol="GBP/USD"))
    return out


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
async def test_export_import_round_trip(router: DataRouter, tmp_path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    ticks = rich_ticks()
    await router.save_ticks(ticks)
    candles = [candle(i, volume=i * 1.5, vwap=1.08, num_trades=i) for i in range(30)]
    candles.append(candle(30, is_closed=False, start_time=T0, end_time=T0 + 5))
    await router.save_candles_bulk(candles)
    tick_file, candle_file = tmp_path / f"t.{fmt}", tmp_path / f"c.{fmt}"
    exported = await export_file(
        router, tick_file, kind="ticks", symbols=[SYM, "GBPUSD"], batch_size=7
    )
    assert exported.rows == 61
    assert exported.per_symbol == {SYM: 60, "GBP/USD": 1}
    exported = await export_file(
        router, candle_file, kind="candles", symbols=[SYM], timeframe="1m", batch_size=4
    )
    assert exported.rows == 31
    if fmt == "tsv":
        assert candle_file.read_text().startswith("symbol\ttimeframe\ttimestamp\topen\t")

    # Into a fresh embedded store, then compare row for row.
    async with DataRouter(embedded_settings(tmp_path, "copy"), strategy=plain()) as other:
        t_report = await import_file(other, tick_file, kind="ticks", batch_size=13)
        c_report = await import_file(other, candle_file, kind="candles")
        assert (t_report.accepted, t_report.rejected) == (61, 0)
        assert (c_report.accepted, c_report.rejected) == (31, 0)
        for sym in (SYM, "GBP/USD"):
            assert await other.get_ticks(sym, T0, T0 + 1000) == await router.get_ticks(
                sym, T0, T0 + 1000
            )
        assert await other.get_candles(SYM, "1m", T0, T0 + 60 * MINUTE) == candles


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
async def test_an_empty_event_type_round_trips_where_the_format_can_say_so(
    router: DataRouter, tmp_path: Path, fmt: str
) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    ticks = [tick(0, event_type=""), tick(1), tick(2, event_type="trade", use_case="")]
    candles = [candle(0, event_type=""), candle(1)]
    await router.save_ticks(ticks)
    await router.save_candles_bulk(candles)
    tick_file, candle_file = tmp_path / f"t.{fmt}", tmp_path / f"c.{fmt}"
    await export_file(router, tick_file, kind="ticks", symbols=[SYM])
    await export_file(router, candle_file, kind="candles", symbols=[SYM], timeframe="1m")
    async with DataRouter(embedded_settings(tmp_path, "copy"), strategy=plain()) as other:
        await import_file(other, tick_file, kind="ticks")
        await import_file(other, candle_file, kind="candles")
        got_ticks = await other.get_ticks(SYM, T0, T0 + 10)
        got_candles = await other.get_candles(SYM, "1m", T0, T0 + 10 * MINUTE)
    if fmt == "parquet":  # "" and null are different values: "" comes back as ""
        assert got_ticks == ticks
        assert got_candles == candles
    else:  # CSV has no null: an empty cell is a missing value, so the default applies
        assert [t.event_type for t in got_ticks] == ["quote", "quote", "trade"]
        assert [c.event_type for c in got_candles] == ["ohlcv", "ohlcv"]


async def test_a_parquet_null_event_type_takes_the_default(
    router: DataRouter, tmp_path: Path
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "nulls.parquet"
    table = pa.table(
        {
            "symbol": [SYM, SYM],
            "timestamp": [T0, T0 + 1],
            "bid": [1.1, 1.1],
            "ask": [1.1002, 1.1002],
            "source": ["pq", "pq"],
            "event_type": pa.array([None, ""], type=pa.string()),
            "use_case": pa.array([None, None], type=pa.string()),
        }
    )
    pq.write_table(table, path)
    report = await import_file(router, path, kind="ticks")
    assert (report.accepted, report.rejected) == (2, 0)
    stored = await router.get_ticks(SYM, T0, T0 + 10, source="pq")
    assert [(t.event_type, t.use_case) for t in stored] == [("quote", ""), ("", "")]


async def test_export_range_and_arguments(router: DataRouter, tmp_path: Path) -> None:
    await router.save_ticks([tick(i) for i in range(10)])
    out = tmp_path / "part.csv"
    report = await export_file(router, out, kind="ticks", symbols=[SYM], start=T0 + 2, end=T0 + 5)
    assert report.rows == 3
    lines = out.read_text().splitlines()
    assert lines[0].startswith("symbol,timestamp,bid,ask,source,")
    assert [line.split(",")[1] for line in lines[1:]] == [str(T0 + i) for i in (2, 3, 4)]
    with pytest.raises(ValidationError, match="timeframe"):
        await export_file(router, out, kind="candles", symbols=[SYM])
    with pytest.raises(ValidationError, match="symbol"):
        await export_file(router, out, kind="ticks", symbols=[])
    names = ["absent/out.csv"] + (["absent/out.parquet"] if find_spec("pyarrow") else [])
    for name in names:
        with pytest.raises(ValidationError, match=r"cannot write .* no such folder"):
            await export_file(router, tmp_path / name, kind="ticks", symbols=[SYM])
    assert not (tmp_path / "absent").exists()
    with pytest.raises(ValidationError, match="it is a folder"):
        await export_file(router, tmp_path, kind="ticks", symbols=[SYM], file_format="csv")


# --------------------------------------------------------------------------- memory


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)
async def test_streaming_a_million_ticks_stays_in_bounded_memory(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    n, chunk = 1_000_000, 50_000
    settings = DataManagerSettings(
        postgres=PostgresSettings(url=postgres_url, db_schema=pg_schema, pool_min=1, pool_max=4),
        journal_dir=tmp_path / "journal",
        watch_strategy=False,
    )
    async with DataRouter(settings, strategy=plain()) as router:
        for start in range(0, n, chunk):
            await router.save_ticks(
                [
                    TickData(symbol=SYM, timestamp=T0 + i, bid=1.1, ask=1.1002, source="m", seq=i)
                    for i in range(start, start + chunk)
                ]
            )
        process = psutil.Process()
        gc.collect()
        base = peak = process.memory_info().rss
        count = 0
        last = T0 - 1
        async for item in router.iter_ticks(SYM, T0, T0 + n, batch_size=10_000):
            assert item.timestamp > last  # oldest first, nothing repeated
            last = item.timestamp
            count += 1
            if count % 25_000 == 0:
                peak = max(peak, process.memory_info().rss)
        assert count == n
        growth_mb = (peak - base) / 2**20
        # Holding 1M TickData at once takes well over 1 GB; a stream holds one fetch.
        assert growth_mb < 100, f"RSS grew {growth_mb:.0f} MB while streaming"


async def test_a_stream_left_open_across_close_ends_with_an_error(
    settings: DataManagerSettings, request: pytest.FixtureRequest
) -> None:
    router = DataRouter(settings, strategy=plain())
    await router.initialize()
    await router.save_ticks(
        [TickData(symbol=SYM, timestamp=T0 + i, bid=1.1, ask=1.1002, source="m") for i in range(50)]
    )
    stream = router.iter_ticks(SYM, T0, T0 + 50, batch_size=10)
    assert (await anext(stream)).timestamp == T0
    await router.close()  # closes the stream's cursor: its connection and transaction end
    if settings.postgres.configured:
        import asyncpg

        conn = await asyncpg.connect(request.getfixturevalue("postgres_url"))
        try:
            open_transactions = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
                "AND query LIKE $1",
                f"%{settings.postgres.db_schema}%ticks%",
            )
        finally:
            await conn.close()
        assert open_transactions == 0
    with pytest.raises(RouterClosedError, match="closed while iter_ticks"):
        await anext(stream)  # not a silent end: the rest was never read
