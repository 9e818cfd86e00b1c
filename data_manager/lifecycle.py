"""Data lifecycle: retention per data type and timeframe, compression, and range deletes.

Configuration is :class:`RetentionSettings` (``DataManagerSettings.retention``), so it comes
from an explicit settings object or from the environment::

    DATA_MANAGER_RETENTION__TICKS_DAYS=30
    DATA_MANAGER_RETENTION__ORDER_FLOW_DAYS=30
    DATA_MANAGER_RETENTION__CANDLES_DAYS=730                 # every timeframe...
    DATA_MANAGER_RETENTION__CANDLES_TIMEFRAME_DAYS='{"1m": 90, "1d": null}'  # ...but these
    DATA_MANAGER_RETENTION__REPLAY_HORIZON_DAYS=7
    DATA_MANAGER_RETENTION__COMPRESS_AFTER_DAYS=14           # TimescaleDB only

Nothing is ever deleted unless a retention is set (the default keeps everything). A row is
expired when its ``ts`` (the bucket start, for candles) is strictly before the cutoff,
``now - days``: a row exactly at the cutoff is kept.

How it is applied (:func:`apply_retention`, or ``data-manager retention apply`` from cron):

* **TimescaleDB** (detected on the server): a table with one retention for all its rows
  (ticks, order flow, and candles when no timeframe has its own) gets TimescaleDB's
  ``add_retention_policy``, and the chunks already past the cutoff are dropped at once with
  ``drop_chunks``. TimescaleDB drops whole chunks only, so the expired rows left in the chunk
  holding the cutoff are then deleted in batches by primary key (chunk exclusion keeps that
  to the one chunk): after a run nothing before the cutoff is left, as on the other
  backends. Between runs the policy's own job still drops whole chunks only, so a row can
  outlive its cutoff by up to one chunk interval (a day for ticks). A table without such a
  retention (none set, or candles with per-timeframe rules) has any policy an earlier run
  installed removed, so TimescaleDB's job stops dropping its chunks. Compression
  (``add_compression_policy``) only covers chunks older than the replay horizon: journal
  replays and late-tick rebuilds write up to that far back, and writing into compressed
  chunks is slow or refused. With ``compression`` off, the compression policies are removed
  (chunks already compressed stay compressed and readable).
* **Plain PostgreSQL and SQLite**, and candles with per-timeframe retention everywhere: a
  delete job that removes expired rows in batches of ``delete_batch_rows`` (picked by
  ``ctid`` on PostgreSQL, by primary key elsewhere), one short transaction per batch, so
  neither readers nor the write path wait long.

:func:`delete_range` removes one symbol's rows in ``[start, end)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from sqlalchemy import any_, delete, func, literal_column, select, tuple_

from data_manager.errors import CacheError, ValidationError, map_database_errors
from data_manager.models import (
    MIN_TIMESTAMP_MS,
    TIMEFRAMES,
    epoch_ms_range,
    normalize_symbol,
    timeframe_ms,
    to_epoch_ms,
)
from data_manager.settings import RetentionSettings
from data_manager.storage.schema import quote_ident

if TYPE_CHECKING:
    from sqlalchemy import Delete, Select
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.sql.elements import ColumnClause

    from data_manager.router import DataRouter
    from data_manager.settings import DataManagerSettings
    from data_manager.storage.base import DataKind
    from data_manager.storage.schema import Tables

__all__ = [
    "DAY_MS",
    "RetentionOutcome",
    "RetentionReport",
    "RetentionRule",
    "RetentionSettings",
    "apply_retention",
    "delete_range",
    "plan_retention",
    "retention_settings",
    "timescale_compression_sql",
    "timescale_retention_sql",
]

logger = logging.getLogger(__name__)

DAY_MS: Final = 86_400_000
_KINDS: Final = ("ticks", "candles", "order_flow")
#: TimescaleDB ``compress_segmentby`` / ``compress_orderby`` per table: the key columns every
#: read filters on segment, the rest of the primary key orders (TimescaleDB requires every
#: column of a unique index in one or the other).
_SEGMENT_BY: Final = {
    "ticks": "symbol, source",
    "candles": "symbol, timeframe, source",
    "order_flow": "symbol, source",
}
_ORDER_BY: Final = {
    "ticks": "ts DESC, content_key",
    "candles": "ts DESC",
    "order_flow": "ts DESC, window_ms",
}

Method = Literal["delete", "timescaledb_policy"]


def retention_settings(settings: DataManagerSettings) -> RetentionSettings:
    """The retention configured in ``settings`` (``DATA_MANAGER_RETENTION__*``)."""
    return settings.retention


@dataclass(frozen=True, slots=True)
class RetentionRule:
    """One expiry: rows of ``kind`` (one timeframe's candles, or all) with ts < cutoff."""

    kind: DataKind
    timeframe: str | None
    days: float
    cutoff_ms: int

    @property
    def label(self) -> str:
        """``ticks``, ``candles``, ``candles 1m``, ..."""
        return self.kind if self.timeframe is None else f"{self.kind} {self.timeframe}"


def plan_retention(policy: RetentionSettings, now_ms: int) -> list[RetentionRule]:
    """The rules ``policy`` implies at ``now_ms``: cutoff = now - days (rows before it go).

    A cutoff before the earliest timestamp a row can have is that timestamp (nothing is
    older): a retention of millions of days asks for no deletion, not for an error.
    """

    def rule(kind: DataKind, days: float, timeframe: str | None = None) -> RetentionRule:
        span = days * DAY_MS
        cutoff = MIN_TIMESTAMP_MS if span >= now_ms - MIN_TIMESTAMP_MS else now_ms - round(span)
        return RetentionRule(kind, timeframe, days, cutoff)

    rules: list[RetentionRule] = []
    if policy.ticks_days is not None:
        rules.append(rule("ticks", policy.ticks_days))
    overrides: dict[str, float | None] = {
        str(tf): days for tf, days in policy.candles_timeframe_days.items()
    }
    if not overrides:
        if policy.candles_days is not None:
            rules.append(rule("candles", policy.candles_days))
    else:
        for tf in TIMEFRAMES:
            days = overrides.get(tf, policy.candles_days)
            if days is not None:
                rules.append(rule("candles", days, tf))
    if policy.order_flow_days is not None:
        rules.append(rule("order_flow", policy.order_flow_days))
    return rules


@dataclass
class RetentionOutcome:
    """What happened to one rule."""

    rule: RetentionRule
    method: Method
    rows: int = 0  # deleted (or, in a dry run, that would be deleted)
    batches: int = 0
    chunks_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        r = self.rule
        return {
            "kind": r.kind,
            "timeframe": r.timeframe,
            "days": r.days,
            "cutoff_ms": r.cutoff_ms,
            "cutoff": _iso(r.cutoff_ms),
            "method": self.method,
            "rows": self.rows,
            "batches": self.batches,
            "chunks_dropped": self.chunks_dropped,
        }


@dataclass
class RetentionReport:
    """What :func:`apply_retention` did (or, with ``dry_run``, would do)."""

    now_ms: int
    dry_run: bool
    timescaledb: bool
    outcomes: list[RetentionOutcome] = field(default_factory=list)
    compression: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        """Rows deleted (or that would be) across every rule."""
        return sum(o.rows for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "now_ms": self.now_ms,
            "now": _iso(self.now_ms),
            "dry_run": self.dry_run,
            "timescaledb": self.timescaledb,
            "rows": self.rows,
            "rules": [o.to_dict() for o in self.outcomes],
            "compression": self.compression,
            "seconds": round(self.seconds, 3),
        }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- SQL


def _expired(tables: Tables, kind: DataKind, cutoff_ms: int, timeframe: str | None) -> list[Any]:
    t = tables.data_table(kind)
    where: list[Any] = [t.c.ts < cutoff_ms]
    if timeframe is not None:
        where.append(t.c.timeframe == timeframe)
    return where


def _delete_batch_stmt(
    tables: Tables,
    kind: DataKind,
    cutoff_ms: int,
    timeframe: str | None,
    limit: int,
    *,
    by_ctid: bool,
) -> Delete:
    """``DELETE`` at most ``limit`` expired rows.

    On plain PostgreSQL (``by_ctid``) the victims are picked by ``ctid`` and deleted with
    ``ctid = ANY(ARRAY(...))``: one scan that stops after ``limit`` matches, then a TID scan,
    however large the table. Elsewhere by primary key: SQLite probes its key index per victim,
    and on TimescaleDB hypertables a ``ctid`` is not unique (it repeats across chunks), while
    chunk exclusion keeps the scan to the expired chunks.
    """
    t = tables.data_table(kind)
    expired = _expired(tables, kind, cutoff_ms, timeframe)
    if by_ctid:
        ctid: ColumnClause[Any] = literal_column("ctid")
        victims = select(ctid).where(*expired).limit(limit).scalar_subquery()
        return delete(t).where(ctid == any_(func.array(victims)))
    key = list(t.primary_key.columns)
    chosen = select(*key).where(*expired).limit(limit)
    return delete(t).where(tuple_(*key).in_(chosen))


def _count_stmt(
    tables: Tables, kind: DataKind, cutoff_ms: int, timeframe: str | None
) -> Select[Any]:
    t = tables.data_table(kind)
    return select(func.count()).select_from(t).where(*_expired(tables, kind, cutoff_ms, timeframe))


def _interval(days: float) -> str:
    return f"INTERVAL '{round(days * 86_400)} seconds'"


def timescale_retention_sql(relation: str, days: float | None) -> list[str]:
    """Statements that (re)install a TimescaleDB retention policy on ``relation`` (a quoted,
    schema-qualified name): remove any old one, then add one with ``drop_after = days``.
    ``days=None`` only removes it: the table keeps every row.

    Its first run is a day out (its schedule interval): :func:`apply_retention` has just
    expired the same rows itself, against its own ``now_ms``, while the job counts from the
    server clock and would otherwise start at once, racing that work.
    """
    remove = f"SELECT remove_retention_policy('{relation}'::regclass, if_exists => TRUE)"
    if days is None:
        return [remove]
    return [
        remove,
        f"SELECT add_retention_policy('{relation}'::regclass, drop_after => {_interval(days)}, "
        "initial_start => now() + INTERVAL '1 day')",
    ]


def timescale_compression_sql(
    relation: str, table: str, days: float | None, *, enable: bool
) -> list[str]:
    """Statements that turn on compression of ``relation`` (when ``enable``: it is not on
    yet) and (re)install a compression policy for chunks older than ``days``.
    ``days=None`` only removes the policy (``enable`` is then ignored): chunks already
    compressed stay compressed, and new ones are left alone."""
    remove = f"SELECT remove_compression_policy('{relation}'::regclass, if_exists => TRUE)"
    if days is None:
        return [remove]
    statements = []
    if enable:
        statements.append(
            f"ALTER TABLE {relation} SET (timescaledb.compress, "
            f"timescaledb.compress_segmentby = '{_SEGMENT_BY[table]}', "
            f"timescaledb.compress_orderby = '{_ORDER_BY[table]}')"
        )
    statements += [
        remove,
        f"SELECT add_compression_policy('{relation}'::regclass, "
        f"compress_after => {_interval(days)})",
    ]
    return statements


class _Maintenance:
    """Runs maintenance statements on the router's storage, one transaction per call.

    The storage protocol has no statement for table-wide maintenance yet, so this reaches
    for each backend's engine (``_require``) and, on SQLite, its writer lock
    (``_connection(write=True)``), exactly as the backends' own ``delete_range`` does.
    """

    def __init__(self, router: DataRouter) -> None:
        # Maintenance writes go to the primary, also when reads may use replicas.
        storage: Any = getattr(router.storage, "primary", router.storage)
        self.storage: Any = storage
        self.kind: str = storage.kind
        self.tables: Tables = storage.tables  # both backends expose their Core tables
        self.db_schema: str | None = (
            router.settings.postgres.db_schema if self.kind == "postgresql" else None
        )

    def relation(self, table: str) -> str:
        """Quoted, schema-qualified table name (PostgreSQL)."""
        assert self.db_schema is not None
        return f"{quote_ident(self.db_schema)}.{table}"

    async def _run(self, work: Any) -> Any:
        storage = self.storage
        if self.kind == "sqlite":
            async with storage._connection(write=True) as conn:
                result = await work(conn)
                await conn.commit()
            return result
        engine = storage._require()
        with map_database_errors(target=storage.target, timeout_seconds=storage._timeout):
            async with engine.begin() as conn:
                return await work(conn)

    async def rowcount(self, stmt: Any) -> int:
        async def work(conn: AsyncConnection) -> int:
            return int((await conn.execute(stmt)).rowcount)

        return cast("int", await self._run(work))

    async def scalar(self, stmt: Any) -> Any:
        async def work(conn: AsyncConnection) -> Any:
            return (await conn.execute(stmt)).scalar()

        return await self._run(work)

    async def script(self, statements: list[str]) -> list[Any]:
        async def work(conn: AsyncConnection) -> list[Any]:
            out = []
            for sql in statements:
                result = await conn.exec_driver_sql(sql)
                out.append(result.scalar() if result.returns_rows else None)
            return out

        return cast("list[Any]", await self._run(work))


# --------------------------------------------------------------------------- retention


async def apply_retention(
    router: DataRouter,
    *,
    policy: RetentionSettings | None = None,
    now_ms: int | None = None,
    dry_run: bool = False,
) -> RetentionReport:
    """Expire what ``policy`` says is too old (see the module docstring for how).

    Args:
        router: An open router.
        policy: The retention; default ``router.settings.retention``.
        now_ms: The time cutoffs count back from (Unix ms); default now.
        dry_run: Count the expired rows instead of deleting them; change no policy.

    Returns:
        Per rule: the method used and the rows deleted (or that would be).

    Raises:
        DatabaseConnectionError, QueryTimeoutError, QueryExecutionError: The database
            failed; batches deleted before the failure stay deleted (the job is idempotent:
            run it again).
    """
    policy = policy if policy is not None else retention_settings(router.settings)
    now = time.time_ns() // 1_000_000 if now_ms is None else to_epoch_ms(now_ms, field="now_ms")
    started = time.perf_counter()
    db = _Maintenance(router)
    health = await db.storage.ping()
    timescale = db.kind == "postgresql" and health.reachable and health.timescaledb
    report = RetentionReport(now_ms=now, dry_run=dry_run, timescaledb=timescale)
    rules = plan_retention(policy, now)
    hypertables = await _hypertables(db) if timescale else {}
    # A policy from an earlier run would go on dropping chunks past a cutoff that no longer
    # applies: only tables with one retention for all their rows keep one.
    uniform = {r.kind for r in rules if r.timeframe is None}
    stale = [db.relation(t) for t in hypertables if t not in uniform]
    if stale and not dry_run:
        await db.script([s for r in stale for s in timescale_retention_sql(r, None)])
    for rule in rules:
        # A table created before the extension was installed is a plain table: no
        # TimescaleDB policy can be added to it, so its rows are deleted like anywhere else.
        hypertable = rule.kind in hypertables
        if hypertable and rule.timeframe is None:
            report.outcomes.append(
                await _timescale_rule(db, rule, batch=policy.delete_batch_rows, dry_run=dry_run)
            )
        else:
            report.outcomes.append(
                await _delete_rule(
                    db, rule, batch=policy.delete_batch_rows, dry_run=dry_run, timescale=hypertable
                )
            )
    if timescale:
        report.compression = await _timescale_compression(db, policy, hypertables, dry_run=dry_run)
    report.seconds = time.perf_counter() - started
    return report


async def _delete_rule(
    db: _Maintenance, rule: RetentionRule, *, batch: int, dry_run: bool, timescale: bool
) -> RetentionOutcome:
    outcome = RetentionOutcome(rule, "delete")
    if dry_run:
        count = _count_stmt(db.tables, rule.kind, rule.cutoff_ms, rule.timeframe)
        outcome.rows = int(await db.scalar(count) or 0)
        return outcome
    await _delete_batches(
        db, rule, outcome, batch=batch, by_ctid=db.kind == "postgresql" and not timescale
    )
    if outcome.rows:
        logger.info(
            "retention: deleted %d %s rows before %s",
            outcome.rows,
            rule.label,
            _iso(rule.cutoff_ms),
        )
    return outcome


async def _delete_batches(
    db: _Maintenance, rule: RetentionRule, outcome: RetentionOutcome, *, batch: int, by_ctid: bool
) -> None:
    """Delete ``rule``'s expired rows, at most ``batch`` per transaction, counting into
    ``outcome``."""
    stmt = _delete_batch_stmt(
        db.tables, rule.kind, rule.cutoff_ms, rule.timeframe, batch, by_ctid=by_ctid
    )
    while True:
        deleted = await db.rowcount(stmt)
        outcome.rows += deleted
        outcome.batches += 1
        if deleted < batch:
            break
        await asyncio.sleep(0)  # let the write path in between batches


async def _timescale_rule(
    db: _Maintenance, rule: RetentionRule, *, batch: int, dry_run: bool
) -> RetentionOutcome:
    outcome = RetentionOutcome(rule, "timescaledb_policy")
    relation = db.relation(rule.kind)
    if dry_run:
        stmt = _count_stmt(db.tables, rule.kind, rule.cutoff_ms, None)
        outcome.rows = int(await db.scalar(stmt) or 0)
        return outcome
    before = int(await db.scalar(_count_stmt(db.tables, rule.kind, rule.cutoff_ms, None)) or 0)
    await db.script(timescale_retention_sql(relation, rule.days))
    # The policy's job runs on its own schedule; drop what is already expired now.
    dropped = await db.script(
        [
            f"SELECT count(*) FROM drop_chunks('{relation}'::regclass, "
            f"older_than => to_timestamp({rule.cutoff_ms} / 1000.0))"
        ]
    )
    outcome.chunks_dropped = int(dropped[0] or 0)
    # drop_chunks leaves the chunk holding the cutoff alone: delete its expired rows by key
    # (a ctid repeats across chunks), so the cutoff is exact here too and a dry run's count
    # is what a real run removes.
    await _delete_batches(db, rule, outcome, batch=batch, by_ctid=False)
    after = int(await db.scalar(_count_stmt(db.tables, rule.kind, rule.cutoff_ms, None)) or 0)
    outcome.rows = before - after
    return outcome


async def _hypertables(db: _Maintenance) -> dict[str, bool]:
    """The data tables that are hypertables, each with whether compression is enabled on it."""
    assert db.db_schema is not None
    found = {}
    for table in _KINDS:
        enabled = await db.script(
            [
                "SELECT compression_enabled FROM timescaledb_information.hypertables "
                f"WHERE hypertable_schema = '{db.db_schema}' AND hypertable_name = '{table}'"
            ]
        )
        if enabled[0] is not None:
            found[table] = bool(enabled[0])
    return found


async def _timescale_compression(
    db: _Maintenance, policy: RetentionSettings, hypertables: dict[str, bool], *, dry_run: bool
) -> list[str]:
    notes = []
    for table in _KINDS:
        if table not in hypertables:
            notes.append(f"{table}: not a hypertable; no compression")
            continue
        enabled = hypertables[table]
        if not policy.compression:
            # A policy needs compression enabled on the table: none can exist otherwise.
            if not enabled:
                continue
            note = f"{table}: compression off; no new chunks are compressed"
            if dry_run:
                notes.append(f"{note} (dry run: no change)")
                continue
            await db.script(
                timescale_compression_sql(db.relation(table), table, None, enable=False)
            )
            notes.append(note)
            continue
        days = policy.compress_after
        note = f"{table}: compress chunks older than {days:g} days"
        if dry_run:
            notes.append(f"{note} (dry run: no change)")
            continue
        await db.script(
            timescale_compression_sql(db.relation(table), table, days, enable=not enabled)
        )
        notes.append(note)
    return notes


# --------------------------------------------------------------------------- range delete


async def delete_range(
    router: DataRouter,
    symbol: str,
    start: int | datetime,
    end: int | datetime,
    kind: DataKind,
    *,
    timeframe: str | None = None,
) -> int:
    """Delete ``symbol``'s rows of ``kind`` with ``start <= ts < end``.

    What the router accepted before the call is flushed first, so a queued write cannot
    bring a deleted row back. Afterwards the symbol's entries are dropped from this router's
    L1 and, for ``kind``, from L2, so the next read comes from the database. Other processes'
    L1 may serve a deleted latest value until it is replaced or its L1 TTL passes.

    Args:
        timeframe: Only this timeframe's candles (``kind="candles"`` only).

    Returns:
        How many rows were deleted.

    Raises:
        ValidationError: Unknown kind or timeframe, naive datetimes, ``end`` before ``start``.
    """
    if kind not in _KINDS:
        msg = f"unknown kind {kind!r}; expected ticks, candles or order_flow"
        raise ValidationError(msg)
    if timeframe is not None:
        if kind != "candles":
            msg = "timeframe only applies to kind='candles'"
            raise ValidationError(msg)
        timeframe_ms(timeframe)
    sym = normalize_symbol(symbol)
    start_ms, end_ms = epoch_ms_range(start, end)
    await router.flush()
    await router.cache.flush()  # L2 writes in flight land now, not after the keys are dropped
    deleted = await router.storage.delete_range(sym, start_ms, end_ms, kind, timeframe=timeframe)
    router.cache.l1.invalidate_symbol(sym)
    await _drop_l2(router, sym, kind, timeframe)
    return deleted


async def _drop_l2(router: DataRouter, symbol: str, kind: DataKind, timeframe: str | None) -> None:
    l2 = router.cache.l2
    if l2 is None:
        return
    from data_manager.cache.redis import map_redis_errors

    tf = "*" if timeframe is None else _glob_escape(timeframe)
    sym = _glob_escape(symbol)
    base = f"{_glob_escape(l2.key_prefix)}:v1:{{{sym}}}:"
    patterns = {
        "ticks": [f"{base}tick", f"{base}tick:*"],
        "order_flow": [f"{base}of", f"{base}of:*"],
        "candles": [f"{base}candles:{tf}:*", f"{base}cfloor:{tf}:*"],
    }[kind]
    try:
        with map_redis_errors(router.settings.dragonfly.target):
            await l2.drop_keys(patterns, slot_key=l2.tick_key(symbol))
    except CacheError:
        # The cache is optional: its entries expire with their TTL.
        logger.warning("delete_range: could not drop %s entries of %s from L2", kind, symbol)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
