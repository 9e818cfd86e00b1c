"""``received_before`` on ``iter_ticks`` and ``aggregate_tick_buckets``, on every backend:
SQLite (file and ``:memory:``), PostgreSQL (plain, TimescaleDB's statement on emulated
``time_bucket``/``first``/``last``) and :class:`ReplicatedStorage` (which passes it to the
primary).

Only ticks with ``received_at`` unset or below the bound are streamed or aggregated; without
the bound everything is, through the same statements as before the option existed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import pytest
import pytest_asyncio

from data_manager.errors import ValidationError
from data_manager.models import TickData
from data_manager.settings import PostgresSettings
from data_manager.storage import candle_sql, postgres, sqlite
from data_manager.storage.base import TickBucket, tick_content_key
from data_manager.storage.postgres import PostgresStorage
from data_manager.storage.replicas import ReplicatedStorage
from data_manager.storage.sqlite import SQLiteStorage
from tests.integration.test_rebuild_sql import EMULATION, _execute

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable
    from pathlib import Path

    from data_manager.aggregation import PriceField
    from data_manager.storage.base import Storage

SYM: Final = "EUR/USD"
T0: Final = 1_727_996_400_000  # 2024-10-03T23:00:00Z, a minute boundary
MINUTE: Final = 60_000
SPAN: Final = (T0 - MINUTE, T0 + 3 * MINUTE)
#: The moment a router started: ticks it received from here on are left out.
CUT: Final = T0 + 10 * MINUTE


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str
    storage: Storage
    #: Keyword arguments of every bucket statement built (PostgreSQL and SQLite builders).
    sql_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Spec:
    """Which backend to build (resolved synchronously, so server fixtures can be requested
    per parameter)."""

    name: str
    postgres_url: str | None = None
    pg_schema: str | None = None


@pytest.fixture(
    params=[
        "sqlite",
        "sqlite-memory",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("timescaledb-emulated", marks=pytest.mark.postgres),
        pytest.param("replicated", marks=pytest.mark.postgres),
    ]
)
def spec(request: pytest.FixtureRequest) -> Spec:
    if request.param.startswith("sqlite"):
        return Spec(request.param)
    return Spec(
        request.param,
        postgres_url=request.getfixturevalue("postgres_url"),
        pg_schema=request.getfixturevalue("pg_schema"),
    )


@pytest_asyncio.fixture(loop_scope="session")
async def backend(
    spec: Spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Backend]:
    """A connected storage with its schema created, its bucket statements recorded."""
    storage: Storage
    if spec.postgres_url is not None and spec.pg_schema is not None:
        url, schema = spec.postgres_url, spec.pg_schema
        primary = PostgresStorage(
            PostgresSettings(url=url, db_schema=schema, pool_min=1, pool_max=4)
        )
        storage = primary
        if spec.name == "replicated":
            storage = ReplicatedStorage(primary, [], lag_check_interval=None)
        elif spec.name == "timescaledb-emulated":
            await _execute(url, EMULATION.format(s=f'"{schema}"'))
            # The catalog probe now answers "the extension's functions live in this schema".
            monkeypatch.setattr(postgres, "TIMESCALEDB_SCHEMA_SQL", f"SELECT '{schema}'::text")
    elif spec.name == "sqlite":
        storage = SQLiteStorage(tmp_path / "received.sqlite3")
    else:
        storage = SQLiteStorage(":memory:")
    found = Backend(spec.name, storage)
    for module, name in ((postgres, "postgres_buckets_sql"), (sqlite, "sqlite_buckets_sql")):
        monkeypatch.setattr(module, name, _spy(getattr(module, name), found.sql_calls))
    await storage.connect()
    await storage.create_schema()
    try:
        yield found
    finally:
        await storage.close()


def _spy(build: Callable[..., str], calls: list[dict[str, Any]]) -> Callable[..., str]:
    def spy(*args: Any, **kwargs: Any) -> str:
        calls.append(kwargs)
        return build(*args, **kwargs)

    return spy


# --------------------------------------------------------------------------- ticks


def tick(
    ts: int,
    bid: float,
    *,
    received_at: int | None,
    source: str = "a",
    volume: float | None = None,
    **kw: Any,
) -> TickData:
    return TickData(
        symbol=SYM,
        timestamp=ts,
        bid=bid,
        ask=round(bid + 0.0002, 6),
        source=source,
        volume=volume,
        received_at=received_at,
        **kw,
    )


def tied(
    ts: int, near: TickData, *, below: bool, received_at: int, base: float, volume: float
) -> TickData:
    """A tick at ``ts`` whose content key sorts below (or above) ``near``'s: a tick left out
    that the open (or close) probe would otherwise pick."""
    key = tick_content_key(near)
    for i in range(1, 1000):
        candidate = tick(ts, round(base + i * 1e-5, 6), received_at=received_at, volume=volume)
        if (tick_content_key(candidate) < key) == below:
            return candidate
    raise AssertionError("no content key on the wanted side")  # pragma: no cover


def dataset() -> tuple[list[TickData], dict[str, TickData]]:
    """Ticks of two sources over two one-minute buckets, received before, at and after
    :data:`CUT` (or never stamped); ``named`` picks out those a test reasons about."""
    k1 = tick(T0 + 1_000, 1.1, received_at=None, volume=1.0)
    k2 = tick(T0 + 3_000, 1.05, received_at=CUT - 1, volume=2.0)
    k3 = tick(T0 + 5_000, 1.12, received_at=T0, volume=4.0)
    named = {
        "k1": k1,
        "k2": k2,
        "k3": k3,
        # Left out by CUT: at the open's and the close's millisecond, on the side of the
        # content key that would make them open and close; a new high, a later low.
        "x1": tied(T0 + 1_000, k1, below=True, received_at=CUT, base=0.95, volume=100.0),
        "x2": tick(T0 + 2_000, 1.3, received_at=CUT + 5, volume=100.0),
        "x3": tied(T0 + 5_000, k3, below=False, received_at=CUT, base=0.97, volume=100.0),
        "x4": tick(T0 + 6_000, 1.0, received_at=CUT + MINUTE, volume=100.0),
        # The next bucket of "a" holds only ticks left out.
        "x5": tick(T0 + MINUTE + 1, 1.2, received_at=CUT, volume=100.0),
        # Source "b": trades (volume from last_size), and a quote alone in the next bucket.
        "k4": tick(T0 + 500, 1.2, received_at=None, source="b", last_price=1.2001, last_size=3.0),
        "x6": tick(T0 + 700, 1.25, received_at=CUT, source="b", last_price=1.4, last_size=50.0),
        "k5": tick(T0 + MINUTE + 10, 1.21, received_at=CUT - MINUTE, source="b"),
    }
    return list(named.values()), named


def kept(ticks: Iterable[TickData], received_before: int | None) -> list[TickData]:
    return [
        t
        for t in ticks
        if received_before is None or t.received_at is None or t.received_at < received_before
    ]


def key_order(ticks: Iterable[TickData]) -> list[TickData]:
    return sorted(ticks, key=lambda t: (t.timestamp, tick_content_key(t)))


def reference_buckets(
    ticks: Iterable[TickData], price: PriceField, *, source: str | None = None
) -> list[TickBucket]:
    """What ``aggregate_tick_buckets`` must return for ``ticks`` (one-minute buckets)."""
    groups: dict[tuple[str, int], list[TickData]] = {}
    for t in key_order(ticks):
        if source is None or t.source == source:
            groups.setdefault((t.source, t.timestamp - t.timestamp % MINUTE), []).append(t)
    out = []
    for (src, start), members in sorted(groups.items()):
        priced = [(t, t.mid if price == "mid" else t.last_price) for t in members]
        priced = [(t, px) for t, px in priced if px is not None]
        pxs = [px for _, px in priced]
        vols = [
            (px, v)
            for t, px in priced
            if (v := t.last_size if t.volume is None else t.volume) is not None
        ]
        out.append(
            TickBucket(
                source=src,
                start=start,
                num_trades=len(pxs),
                open=pxs[0] if pxs else None,
                high=max(pxs, default=None),
                low=min(pxs, default=None),
                close=pxs[-1] if pxs else None,
                first_ts=priced[0][0].timestamp if priced else None,
                last_ts=priced[-1][0].timestamp if priced else None,
                volume_count=len(vols),
                volume=sum(v for _, v in vols) if vols else None,
                notional=sum(px * v for px, v in vols) if vols else None,
            )
        )
    return out


def assert_buckets(actual: list[TickBucket], expected: list[TickBucket]) -> None:
    """Equal, sums to 1e-12 (SQLite adds them in its own order)."""
    assert [b._replace(volume=None, notional=None) for b in actual] == [
        b._replace(volume=None, notional=None) for b in expected
    ]
    for got, want in zip(actual, expected, strict=True):
        for name in ("volume", "notional"):
            g, w = getattr(got, name), getattr(want, name)
            assert (g is None) == (w is None), (name, got, want)
            if g is not None:
                assert math.isclose(g, w, rel_tol=1e-12), (name, got, want)


def identity(ticks: Iterable[TickData]) -> list[tuple[str, int, int]]:
    return [(t.source, t.timestamp, tick_content_key(t)) for t in ticks]


# --------------------------------------------------------------------------- tests


async def test_received_before_keeps_unstamped_and_earlier_ticks(backend: Backend) -> None:
    s = backend.storage
    ticks, named = dataset()
    assert await s.write_ticks(ticks) == len(ticks)

    buckets = await s.aggregate_tick_buckets(SYM, "1m", *SPAN, price="mid", received_before=CUT)
    # Spelled out once: "a" at T0 keeps k1, k2, k3 only; its next bucket disappears.
    a0 = buckets[0]
    k1, k2, k3 = named["k1"], named["k2"], named["k3"]
    assert (a0.source, a0.start, a0.num_trades) == ("a", T0, 3)
    assert (a0.open, a0.high, a0.low, a0.close) == (k1.mid, k3.mid, k2.mid, k3.mid)
    assert (a0.first_ts, a0.last_ts, a0.volume_count, a0.volume) == (
        k1.timestamp,
        k3.timestamp,
        3,
        7.0,
    )
    assert [(b.source, b.start) for b in buckets] == [("a", T0), ("b", T0), ("b", T0 + MINUTE)]

    streamed = [t async for t in s.iter_ticks(SYM, *SPAN, received_before=CUT)]
    assert sorted(identity(streamed)) == sorted(identity(kept(ticks, CUT)))
    assert {t.received_at for t in streamed} == {None, CUT - 1, CUT - MINUTE, T0}


@pytest.mark.parametrize(
    "received_before",
    [None, T0, CUT - 1, CUT, CUT + 1, CUT + 6, CUT + MINUTE + 1, 10**15],
    ids=lambda v: "none" if v is None else str(v - CUT if abs(v - CUT) < 10**9 else v),
)
async def test_every_read_returns_exactly_the_kept_subset(
    backend: Backend, received_before: int | None
) -> None:
    s = backend.storage
    ticks, _ = dataset()
    await s.write_ticks(ticks)
    subset = kept(ticks, received_before)
    if received_before is None:
        assert subset == ticks

    for batch_size in (1, 2, 10_000):  # SQLite pages with keyset queries
        streamed = [
            t
            async for t in s.iter_ticks(
                SYM, *SPAN, batch_size=batch_size, received_before=received_before
            )
        ]
        assert sorted(identity(streamed)) == sorted(identity(subset))
        assert [t.timestamp for t in streamed] == sorted(t.timestamp for t in subset)
        assert {identity([t])[0]: t for t in streamed} == {identity([t])[0]: t for t in subset}
    only_a = [
        t
        async for t in s.iter_ticks(
            SYM, *SPAN, source="a", batch_size=1, received_before=received_before
        )
    ]
    assert identity(only_a) == identity(key_order(t for t in subset if t.source == "a"))

    assert_buckets(
        await s.aggregate_tick_buckets(
            SYM, "1m", *SPAN, price="mid", received_before=received_before
        ),
        reference_buckets(subset, "mid"),
    )
    assert_buckets(
        await s.aggregate_tick_buckets(
            SYM, "1m", *SPAN, price="mid", source="a", received_before=received_before
        ),
        reference_buckets(subset, "mid", source="a"),
    )
    # "last": a quote-only bucket still gives a row (num_trades 0).
    assert_buckets(
        await s.aggregate_tick_buckets(
            SYM, "1m", *SPAN, price="last", source="b", received_before=received_before
        ),
        reference_buckets(subset, "last", source="b"),
    )

    # Without the bound the statements are the plain ones; with it they filter.
    assert {c["received_before"] for c in backend.sql_calls} == {received_before is not None}
    if backend.name == "timescaledb-emulated":
        assert all(c["timescaledb_schema"] is not None for c in backend.sql_calls)


async def test_the_default_is_no_bound(backend: Backend) -> None:
    s = backend.storage
    ticks, _ = dataset()
    await s.write_ticks(ticks)
    assert sorted(identity([t async for t in s.iter_ticks(SYM, *SPAN)])) == sorted(identity(ticks))
    assert_buckets(
        await s.aggregate_tick_buckets(SYM, "1m", *SPAN, price="mid"),
        reference_buckets(ticks, "mid"),
    )
    assert [c["received_before"] for c in backend.sql_calls] == [False]


@pytest.mark.parametrize("bad", ["1727996400000", 1.7e12, True, False, [CUT]])
async def test_a_bound_that_is_not_an_int_is_refused(backend: Backend, bad: Any) -> None:
    s = backend.storage
    with pytest.raises(ValidationError, match="received_before must be Unix ms"):
        await s.aggregate_tick_buckets(SYM, "1m", *SPAN, price="mid", received_before=bad)
    with pytest.raises(ValidationError, match="received_before must be Unix ms"):
        async with contextlib.aclosing(s.iter_ticks(SYM, *SPAN, received_before=bad)) as it:
            await anext(it)


@pytest.mark.parametrize("by_source", [False, True])
@pytest.mark.parametrize("timescaledb_schema", [None, "ts_ext"])
def test_postgres_statement_without_bound_is_unchanged(
    by_source: bool, timescaledb_schema: str | None
) -> None:
    build = candle_sql.postgres_buckets_sql.__wrapped__
    plain = build(
        "dm", "1m", price="mid", by_source=by_source, timescaledb_schema=timescaledb_schema
    )
    assert "received_at" not in plain
    assert plain == build(
        "dm",
        "1m",
        price="mid",
        by_source=by_source,
        timescaledb_schema=timescaledb_schema,
        received_before=False,
    )
    bounded = build(
        "dm",
        "1m",
        price="mid",
        by_source=by_source,
        timescaledb_schema=timescaledb_schema,
        received_before=True,
    )
    last = "$5" if by_source else "$4"
    assert f"(received_at IS NULL OR received_at < {last})" in bounded


@pytest.mark.parametrize("by_source", [False, True])
def test_sqlite_statement_without_bound_is_unchanged(by_source: bool) -> None:
    build = candle_sql.sqlite_buckets_sql.__wrapped__
    plain = build("1m", price="last", by_source=by_source)
    assert "received_at" not in plain
    assert plain == build("1m", price="last", by_source=by_source, received_before=False)
    bounded = build("1m", price="last", by_source=by_source, received_before=True)
    last = "?5" if by_source else "?4"
    # The range and both open/close probes.
    assert bounded.count(f"(received_at IS NULL OR received_at < {last})") == 3
