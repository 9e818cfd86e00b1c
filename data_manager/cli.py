"""The ``data-manager`` command line (also ``python -m data_manager``).

Every command reads its configuration like the SDK does (``DATA_MANAGER_*`` variables, the
static JSON files, ``POSTGRES_HOST`` & co.), so ``data-manager health`` checks exactly what
a service on the same machine would use.

Long commands (``demo``, ``import``, ``export``, ``journal replay``) stop cleanly on SIGINT
or SIGTERM: the signal cancels the running work, the router's ``close()`` still runs (what
is queued is flushed; what cannot be stored stays in the local journal for the next router),
and the exit code is 128 + the signal number (130, 143). That close gets
``--shutdown-timeout`` seconds (``DATA_MANAGER_SHUTDOWN_TIMEOUT``, default 10), like
``close(timeout=...)``: past it, the flush is cut short as a second signal cuts it, and what
is not stored yet stays in the journal, so a database that hangs cannot hold the process
past a container's grace period. Heavy modules are imported inside the commands, so
``--help`` answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import enum
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from data_manager.errors import DataManagerError

if TYPE_CHECKING:
    from data_manager.health import HealthCheckResponse
    from data_manager.interop import ImportReport, Kind
    from data_manager.lifecycle import RetentionReport, RetentionSettings
    from data_manager.router import DataRouter
    from data_manager.settings import DataManagerSettings

__all__ = ["EXIT_INTERRUPTED", "HEALTH_EXIT", "app", "main"]

T = TypeVar("T")

app = typer.Typer(
    name="data-manager",
    help="Market data SDK: demo, health, schema, import/export, retention, journal, metrics.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)
retention_app = typer.Typer(
    help="Show or apply the data retention (how long ticks, candles and order flow are kept).",
    no_args_is_help=True,
)
journal_app = typer.Typer(
    help="Inspect the local write journals, or replay orphaned ones into the database.",
    no_args_is_help=True,
)
app.add_typer(retention_app, name="retention")
app.add_typer(journal_app, name="journal")

console = Console()
err_console = Console(stderr=True)

#: Exit codes of `health`: 0 healthy, 1 degraded, 2 unhealthy (or the check itself failed).
HEALTH_EXIT: Final[dict[str, int]] = {"healthy": 0, "degraded": 1, "unhealthy": 2}
#: Exit code after SIGINT / SIGTERM: 128 + the signal number.
EXIT_INTERRUPTED: Final = {signal.SIGINT: 130, signal.SIGTERM: 143}
#: Exit code of a command that failed (bad input, unreachable database, ...).
EXIT_FAILED: Final = 2
#: Seconds the work stopped by a signal (the router's close, mostly) may take to finish.
DEFAULT_SHUTDOWN_TIMEOUT: Final = 10.0
_shutdown_timeout: contextvars.ContextVar[float] = contextvars.ContextVar(
    "shutdown_timeout", default=DEFAULT_SHUTDOWN_TIMEOUT
)

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


class FileKind(enum.StrEnum):
    """What an import or export file holds."""

    ticks = "ticks"
    candles = "candles"


KindOption = Annotated[FileKind, typer.Option("--kind", "-k", help="What the file holds.")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class Interrupted(Exception):
    """The command was stopped by a signal; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def run_async(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work()`` on a fresh event loop; SIGINT/SIGTERM cancel it cleanly.

    The signal handler cancels the main task, so ``async with DataRouter()`` blocks unwind
    and ``close()`` runs (flush, journal what cannot be stored). A second signal during that
    shutdown cancels again, i.e. forces the exit; so does the shutdown timeout
    (``--shutdown-timeout``) when it passes first. Cancelled, the write path's close stops
    waiting for the flush and journals what is left, as after its own timeout.

    Raises:
        Interrupted: A signal stopped the work.
    """

    shutdown_timeout = _shutdown_timeout.get()

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        received: list[int] = []
        deadline: list[asyncio.TimerHandle] = []

        def cut_short() -> None:
            err_console.print(
                f"[yellow]still shutting down after {shutdown_timeout:g} s: stopping; what is "
                "not stored yet stays in the journal[/]"
            )
            task.cancel()

        def on_signal(signum: int) -> None:
            received.append(signum)
            task.cancel()
            if not deadline:
                # Bounds the close the cancellation starts (``close(timeout=...)`` for
                # routers the command does not close itself, such as the demo's).
                deadline.append(loop.call_later(shutdown_timeout, cut_short))

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
        try:
            return await work()
        except asyncio.CancelledError:
            if received:
                raise Interrupted(received[0]) from None
            raise
        finally:
            for handle in deadline:
                handle.cancel()
            for sig in installed:
                loop.remove_signal_handler(sig)

    return asyncio.run(main())


@app.callback()
def _options(
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout",
            envvar="DATA_MANAGER_SHUTDOWN_TIMEOUT",
            min=0,
            help="After SIGINT/SIGTERM, seconds the router's close may spend flushing; what "
            "is not stored by then stays in the local journal for the next router.",
        ),
    ] = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """Market data SDK: demo, health, schema, import/export, retention, journal, metrics."""
    _shutdown_timeout.set(shutdown_timeout)


def _fail(what: str, exc: BaseException) -> typer.Exit:
    err_console.print(f"[red]{what} failed:[/] {exc}")
    return typer.Exit(EXIT_FAILED)


def _unexpected(exc: BaseException) -> str:
    """One line for an error from outside the SDK (its type says more than its text)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _interrupted(exc: Interrupted, what: str) -> typer.Exit:
    err_console.print(f"[yellow]{what} stopped by {signal.Signals(exc.signum).name}[/]")
    return typer.Exit(EXIT_INTERRUPTED.get(signal.Signals(exc.signum), 128 + exc.signum))


def _settings(**overrides: Any) -> DataManagerSettings:
    from data_manager.settings import DataManagerSettings

    return DataManagerSettings(**overrides)


def _router(settings: DataManagerSettings | None = None) -> DataRouter:
    """A router on ``settings`` (default: the environment's).

    Raises:
        ConfigurationError: The settings are invalid, or name no usable store.
    """
    from data_manager.errors import ConfigurationError
    from data_manager.router import DataRouter

    if settings is None:
        settings = _settings()
    if not settings.postgres.configured and not settings.sqlite_path:
        # Without this, an empty variable reaches the SQLite driver as an in-memory URL
        # and fails there with a TypeError (a traceback, and exit 1 = "degraded").
        msg = (
            "DATA_MANAGER_SQLITE_PATH is empty and no PostgreSQL host is configured; set "
            "it to a file path (or ':memory:'), or unset it for the default file"
        )
        raise ConfigurationError(msg)
    return DataRouter(settings)


def _print_json(data: Any) -> None:
    # Plain print: no colours or wrapping, so other programs can parse it.
    print(json.dumps(data, indent=2, default=str))


def _parse_time_option(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    from data_manager.interop import parse_timestamp

    try:
        return parse_timestamp(value, field=name)
    except DataManagerError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"--{name}") from exc


# --------------------------------------------------------------------------- demo / health


@app.command()
def demo(
    ticks: Annotated[
        int, typer.Option(help="How many synthetic ticks to ingest.", min=100)
    ] = 50_000,
    verbose: Verbose = False,
) -> None:
    """Feed a synthetic FX stream through the router, build candles, read them back.

    With no database configured this runs on the embedded SQLite store: no servers needed.

    Example: `data-manager demo --ticks 100000`
    """
    from data_manager.demo import run_demo

    _setup_logging(verbose)
    try:
        run_async(lambda: run_demo(n_ticks=ticks, console=console))
    except Interrupted as exc:
        raise _interrupted(exc, "demo") from exc
    except DataManagerError as exc:
        raise _fail("demo", exc) from exc


@app.command()
def health(
    as_json: AsJson = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds to keep trying to connect (default: the configured "
            "init deadline, at most 10).",
            min=0,
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Check every backend; exit 0 when healthy, 1 when degraded, 2 when unhealthy.

    Degraded means the database answers but something else does not (the L2 cache, a
    circuit breaker, a journal backlog). Suitable for container health checks.

    Example: `data-manager health --json`
    """
    _setup_logging(verbose)

    async def run() -> HealthCheckResponse:
        settings = _settings()
        deadline = timeout if timeout is not None else min(settings.init_deadline_seconds, 10.0)
        settings = settings.model_copy(update={"init_deadline_seconds": deadline})
        async with _router(settings) as router:
            return await router.health_check()

    try:
        report = run_async(run)
    except Interrupted as exc:
        raise _interrupted(exc, "health") from exc
    except Exception as exc:  # a probe must read any failed check as unhealthy
        # Exit 1 means "degraded": an unexpected error must not pass for that (nor print a
        # traceback into a probe's log); --verbose logs the traceback.
        reason = str(exc) if isinstance(exc, DataManagerError) else _unexpected(exc)
        if not isinstance(exc, DataManagerError):
            logging.getLogger(__name__).info("the health check failed", exc_info=exc)
        if as_json:
            _print_json({"status": "unhealthy", "reason": reason})
        else:
            err_console.print(f"[red]unhealthy:[/] {reason}")
        raise typer.Exit(HEALTH_EXIT["unhealthy"]) from exc
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        colour = {"healthy": "green", "degraded": "yellow", "unhealthy": "red"}[report.status]
        console.print(f"[{colour} bold]{report.status}[/] — {report.reason}")
        for name, db in report.databases.items():
            latency = f"{db.latency_ms:.2f} ms" if db.latency_ms is not None else "-"
            ts = f", timescaledb {db.timescaledb_version}" if db.timescaledb else ""
            console.print(f"  {name}: {db.target} reachable={db.reachable} {latency}{ts}")
        cache = report.cache
        if cache.l2_configured:
            console.print(f"  l2: {cache.l2_target} reachable={cache.l2_reachable}")
        else:
            console.print("  l2: not configured")
        wp = report.write_path
        console.print(
            f"  write path: mode={wp.default_mode} queue={wp.queue_depth} "
            f"journal={wp.journal_records} circuit={wp.circuit}"
        )
    raise typer.Exit(HEALTH_EXIT[report.status])


@app.command("init-db")
def init_db(verbose: Verbose = False) -> None:
    """Create the schema, or migrate an older one forward (idempotent).

    Example: `POSTGRES_HOST=db POSTGRES_DB=market data-manager init-db`
    """
    _setup_logging(verbose)

    async def run() -> str:
        async with _router() as router:
            info = await router.storage.create_schema()
            ts = " with TimescaleDB" if info.timescaledb else ""
            return f"{router.storage.target}: schema v{info.version}{ts}"

    try:
        console.print(run_async(run))
    except Interrupted as exc:
        raise _interrupted(exc, "init-db") from exc
    except DataManagerError as exc:
        raise _fail("init-db", exc) from exc


# --------------------------------------------------------------------------- import / export


def _progress(unit: str) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        count,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        # No bar when stderr is a file or a pipe: it would only add noise there.
        disable=not err_console.is_terminal,
    )


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="CSV (with a header line) or Parquet file.")],
    kind: KindOption,
    symbol: Annotated[
        str | None, typer.Option(help="Symbol for rows without one (missing column or cell).")
    ] = None,
    source: Annotated[str | None, typer.Option(help="Source for rows without one.")] = None,
    timeframe: Annotated[
        str | None, typer.Option(help="Timeframe for candle rows without one.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Rows per stored batch (one COPY each).", min=1)
    ] = 10_000,
    file_format: Annotated[
        str | None, typer.Option("--format", help="csv or parquet (default: from the suffix).")
    ] = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Import ticks or candles from a CSV or Parquet file.

    Columns are the model's fields (`symbol, timestamp, bid, ask, source, ...` for ticks;
    `symbol, timeframe, timestamp, open, high, low, close, source, ...` for candles); times
    are Unix ms or ISO-8601 with a timezone. Every row is validated: rejected rows are
    reported per reason with their first line numbers, the good ones are stored in batches
    (COPY on PostgreSQL). Re-running an import stores nothing twice.

    Exit code: 0 all rows stored, 1 some rows rejected, 2 failed, 130/143 interrupted.

    Examples:

    `data-manager import eurusd_ticks.csv --kind ticks --source polygon`

    `data-manager import bars.parquet --kind candles --symbol EUR/USD --timeframe 1h`
    """
    from data_manager.interop import ImportReport, detect_format, import_file

    _setup_logging(verbose)
    data_kind: Kind = "ticks" if kind is FileKind.ticks else "candles"
    try:
        fmt = detect_format(file, file_format)
    except DataManagerError as exc:
        raise typer.BadParameter(str(exc), param_hint="FILE") from exc
    report = ImportReport(path=str(file), kind=data_kind, format=fmt)

    async def run() -> None:
        with _progress("bytes" if fmt == "csv" else "rows") as bar:
            task = bar.add_task(f"importing {file.name}", total=None)

            def advance(position: int, total: int | None) -> None:
                bar.update(task, completed=position, total=total)

            async with _router() as router:
                await import_file(
                    router,
                    file,
                    kind=data_kind,
                    symbol=symbol,
                    source=source,
                    timeframe=timeframe,
                    batch_size=batch_size,
                    file_format=fmt,
                    progress=advance,
                    report=report,
                )

    try:
        run_async(run)
    except Interrupted as exc:
        _print_import(report, as_json)
        err_console.print(
            f"stored every accepted row up to line {report.last_line}; running the same "
            "import again is safe (nothing is stored twice)"
        )
        raise _interrupted(exc, "import") from exc
    except (DataManagerError, OSError) as exc:
        if report.batches:
            _print_import(report, as_json)
        raise _fail("import", exc) from exc
    _print_import(report, as_json)
    raise typer.Exit(1 if report.rejected else 0)


def _print_import(report: ImportReport, as_json: bool) -> None:
    if as_json:
        _print_json(report.to_dict())
        return
    rate = report.rows / report.seconds if report.seconds else 0.0
    console.print(
        f"{report.path}: {report.rows:,} rows read, [green]{report.accepted:,} accepted[/], "
        f"[{'red' if report.rejected else 'green'}]{report.rejected:,} rejected[/]; "
        f"{report.stored:,} new rows stored in {report.batches} batches "
        f"({report.seconds:.1f} s, {rate:,.0f} rows/s)"
    )
    if report.reasons:
        table = Table(title="rejected rows")
        for col in ("reason", "rows", "first lines", "example"):
            table.add_column(col, overflow="fold")
        for key, reason in sorted(report.reasons.items(), key=lambda kv: -kv[1].count):
            table.add_row(
                key,
                f"{reason.count:,}",
                ", ".join(map(str, reason.first_lines)),
                reason.example,
            )
        console.print(table)


@app.command("export")
def export(
    file: Annotated[str, typer.Argument(help="Output .csv or .parquet file; '-' = CSV to stdout.")],
    kind: KindOption,
    symbol: Annotated[
        list[str], typer.Option("--symbol", "-s", help="Symbol to export (repeatable).")
    ],
    timeframe: Annotated[str | None, typer.Option(help="Candle timeframe (candles).")] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="Only this source (default: ticks of every source; the preferred candle source)."
        ),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(help="Inclusive start: ISO-8601 with a timezone, or Unix ms."),
    ] = None,
    end: Annotated[
        str | None, typer.Option(help="Exclusive end: ISO-8601 with a timezone, or Unix ms.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Rows per read and per written chunk.", min=1)
    ] = 50_000,
    file_format: Annotated[
        str | None, typer.Option("--format", help="csv or parquet (default: from the suffix).")
    ] = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Export ticks or candles of a time range to CSV or Parquet, streaming.

    Rows are read and written a chunk at a time, so memory stays bounded however large the
    range. The files have the columns `import` reads, so an export imports back unchanged.

    Examples:

    `data-manager export eurusd.parquet -k ticks -s EUR/USD --start 2024-10-01T00:00Z`

    `data-manager export - --kind candles -s EUR/USD --timeframe 1h > eurusd_1h.csv`
    """
    from data_manager.interop import ExportReport, detect_format, export_file

    _setup_logging(verbose)
    data_kind: Kind = "ticks" if kind is FileKind.ticks else "candles"
    start_ms = _parse_time_option(start, "start")
    end_ms = _parse_time_option(end, "end")
    if data_kind == "candles" and timeframe is None:
        raise typer.BadParameter("exporting candles needs --timeframe", param_hint="--timeframe")
    try:
        fmt = detect_format(file, file_format)
    except DataManagerError as exc:
        raise typer.BadParameter(str(exc), param_hint="FILE") from exc
    report = ExportReport(path=file, kind=data_kind, format=fmt)
    out = err_console if file == "-" else console

    async def run() -> None:
        with _progress("rows") as bar:
            task = bar.add_task(f"exporting {data_kind}", total=None)
            async with _router() as router:
                await export_file(
                    router,
                    file,
                    kind=data_kind,
                    symbols=symbol,
                    timeframe=timeframe,
                    source=source,
                    start=start_ms,
                    end=end_ms,
                    file_format=fmt,
                    batch_size=batch_size,
                    progress=lambda rows: bar.update(task, completed=rows),
                    report=report,
                )

    try:
        run_async(run)
    except Interrupted as exc:
        raise _interrupted(exc, "export") from exc
    except (DataManagerError, OSError) as exc:  # OSError: writing the file (disk full, ...)
        raise _fail("export", exc) from exc
    if as_json and file != "-":
        _print_json(report.to_dict())
    else:
        per = ", ".join(f"{s}: {n:,}" for s, n in report.per_symbol.items())
        out.print(f"wrote {report.rows:,} {data_kind} to {file} ({per}) in {report.seconds:.1f} s")


# --------------------------------------------------------------------------- retention


def _retention_policy(
    settings: DataManagerSettings,
    ticks_days: float | None,
    candles_days: float | None,
    order_flow_days: float | None,
    timeframe_days: list[str] | None,
) -> RetentionSettings:
    from pydantic import ValidationError as PydanticValidationError

    from data_manager.errors import ConfigurationError
    from data_manager.lifecycle import RetentionSettings, retention_settings

    base = retention_settings(settings)
    update: dict[str, Any] = {}
    if ticks_days is not None:
        update["ticks_days"] = ticks_days
    if candles_days is not None:
        update["candles_days"] = candles_days
    if order_flow_days is not None:
        update["order_flow_days"] = order_flow_days
    if timeframe_days:
        per: dict[str, float | None] = {str(k): v for k, v in base.candles_timeframe_days.items()}
        for item in timeframe_days:
            tf, sep, days = item.partition("=")
            if not sep:
                msg = f"expected TIMEFRAME=DAYS (e.g. 1m=90, 1d=forever), got {item!r}"
                raise typer.BadParameter(msg, param_hint="--timeframe-days")
            if days.strip() in ("forever", "none", ""):
                per[tf.strip()] = None
                continue
            try:
                per[tf.strip()] = float(days)
            except ValueError as exc:
                msg = f"expected a number of days or 'forever' after {tf.strip()}=, got {days!r}"
                raise typer.BadParameter(msg, param_hint="--timeframe-days") from exc
        update["candles_timeframe_days"] = per
    try:
        return RetentionSettings.model_validate({**base.model_dump(), **update})
    except PydanticValidationError as exc:
        parts = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = ".".join(str(p) for p in err["loc"])
            what = err["msg"].removeprefix("Value error, ")
            parts.append(what if not loc or what.startswith(loc) else f"{loc}: {what}")
        raise typer.BadParameter("; ".join(parts)) from exc
    except (ValueError, ConfigurationError) as exc:
        raise typer.BadParameter(str(exc)) from exc


TicksDays = Annotated[
    float | None, typer.Option(help="Override: keep ticks this many days.", min=0)
]
CandlesDays = Annotated[
    float | None, typer.Option(help="Override: keep candles (every timeframe) this long.", min=0)
]
OrderFlowDays = Annotated[
    float | None, typer.Option(help="Override: keep order flow this many days.", min=0)
]
TimeframeDays = Annotated[
    list[str] | None,
    typer.Option(help="Override one timeframe: TF=DAYS or TF=forever (repeatable)."),
]


def _print_retention(report: RetentionReport, as_json: bool, *, title: str) -> None:
    if as_json:
        _print_json(report.to_dict())
        return
    mode = "TimescaleDB" if report.timescaledb else "delete job"
    now = datetime.fromtimestamp(report.now_ms / 1000, tz=UTC).isoformat(timespec="seconds")
    console.print(f"[bold]{title}[/] (now {now}, {mode})")
    if not report.outcomes:
        console.print("  no retention configured: everything is kept")
    table = Table()
    for col in ("data", "keep (days)", "delete before", "method", "rows"):
        table.add_column(col)
    for o in report.outcomes:
        cutoff = datetime.fromtimestamp(o.rule.cutoff_ms / 1000, tz=UTC)
        table.add_row(
            o.rule.label,
            f"{o.rule.days:g}",
            cutoff.isoformat(timespec="seconds"),
            o.method,
            f"{o.rows:,}",
        )
    if report.outcomes:
        console.print(table)
    for note in report.compression:
        console.print(f"  compression: {note}")


def _retention_run(
    *,
    dry_run: bool,
    now: str | None,
    ticks_days: float | None,
    candles_days: float | None,
    order_flow_days: float | None,
    timeframe_days: list[str] | None,
) -> RetentionReport:
    from data_manager.lifecycle import apply_retention

    now_ms = _parse_time_option(now, "now")

    async def run() -> RetentionReport:
        settings = _settings()
        policy = _retention_policy(
            settings, ticks_days, candles_days, order_flow_days, timeframe_days
        )
        async with _router(settings) as router:
            return await apply_retention(router, policy=policy, now_ms=now_ms, dry_run=dry_run)

    return run_async(run)


@retention_app.command("show")
def retention_show(
    now: Annotated[str | None, typer.Option(help="Count back from this time.")] = None,
    ticks_days: TicksDays = None,
    candles_days: CandlesDays = None,
    order_flow_days: OrderFlowDays = None,
    timeframe_days: TimeframeDays = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Show the retention in force and how many rows are past it (changes nothing).

    Configure it with `DATA_MANAGER_RETENTION__TICKS_DAYS`, `__CANDLES_DAYS`,
    `__CANDLES_TIMEFRAME_DAYS` (JSON, e.g. `{"1m": 90, "1d": null}`), `__ORDER_FLOW_DAYS`.

    Example: `data-manager retention show --json`
    """
    _setup_logging(verbose)
    try:
        report = _retention_run(
            dry_run=True,
            now=now,
            ticks_days=ticks_days,
            candles_days=candles_days,
            order_flow_days=order_flow_days,
            timeframe_days=timeframe_days,
        )
    except Interrupted as exc:
        raise _interrupted(exc, "retention show") from exc
    except DataManagerError as exc:
        raise _fail("retention show", exc) from exc
    _print_retention(report, as_json, title="retention")


@retention_app.command("apply")
def retention_apply(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be deleted.")
    ] = False,
    now: Annotated[str | None, typer.Option(help="Count back from this time.")] = None,
    ticks_days: TicksDays = None,
    candles_days: CandlesDays = None,
    order_flow_days: OrderFlowDays = None,
    timeframe_days: TimeframeDays = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Delete what is older than the retention (TimescaleDB: install retention and
    compression policies and drop expired chunks).

    Safe to run from cron; an interrupted run leaves the rest for the next one.

    Examples:

    `data-manager retention apply --dry-run`

    `data-manager retention apply --ticks-days 30 --timeframe-days 1m=90`
    """
    _setup_logging(verbose)
    try:
        report = _retention_run(
            dry_run=dry_run,
            now=now,
            ticks_days=ticks_days,
            candles_days=candles_days,
            order_flow_days=order_flow_days,
            timeframe_days=timeframe_days,
        )
    except Interrupted as exc:
        raise _interrupted(exc, "retention apply") from exc
    except DataManagerError as exc:
        raise _fail("retention apply", exc) from exc
    _print_retention(report, as_json, title="retention dry run" if dry_run else "retention applied")


# --------------------------------------------------------------------------- journal


@dataclass
class InstanceJournal:
    """One instance's journal folder, as read from disk."""

    instance_id: str
    state: Literal["live", "orphan"]
    pending_records: int = 0
    bytes: int = 0
    segments: int = 0
    stored_lsn: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class JournalSummary:
    """Every instance journal under one root, plus dead letters and damage found."""

    root: str
    instances: list[InstanceJournal] = field(default_factory=list)
    dead_letters: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def orphans(self) -> int:
        """Journals whose owner is dead."""
        return sum(1 for i in self.instances if i.state == "orphan")

    @property
    def orphan_records(self) -> int:
        """Records waiting in orphaned journals."""
        return sum(i.pending_records for i in self.instances if i.state == "orphan")

    @property
    def orphan_bytes(self) -> int:
        """Segment bytes of orphaned journals."""
        return sum(i.bytes for i in self.instances if i.state == "orphan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "root": self.root,
            "orphans": self.orphans,
            "orphan_records": self.orphan_records,
            "orphan_bytes": self.orphan_bytes,
            "instances": [vars(i) for i in self.instances],
            "dead_letters": self.dead_letters,
            "problems": self.problems,
        }


def inspect_journals(root: Path) -> JournalSummary:
    """Read every instance journal under ``root`` without changing it (blocking I/O).

    Records are counted by parsing the segments with the journal's own framing (length and
    CRC checked); those at or below the checkpoint are already stored and not counted.
    Owners are told apart by their lock: an orphan's lock is free (its process is gone).
    """
    from data_manager.journal import (
        CHECKPOINT_NAME,
        DEAD_LETTER_DIR,
        LOCK_NAME,
        MAGIC,
        SEGMENT_SUFFIX,
        _parse,
        find_orphans,
        kind_name,
        parse_checkpoint,
    )

    summary = JournalSummary(root=str(root))
    if not root.is_dir():
        return summary
    orphans = {p.name for p in find_orphans(root)}
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.startswith(".") or entry.name == DEAD_LETTER_DIR:
            continue
        if not (entry / LOCK_NAME).exists():
            continue
        inst = InstanceJournal(entry.name, "orphan" if entry.name in orphans else "live")
        try:
            checkpoint = parse_checkpoint((entry / CHECKPOINT_NAME).read_text(encoding="ascii"))
            inst.stored_lsn = 0 if checkpoint is None else checkpoint[0]
        except FileNotFoundError:
            pass
        for segment in sorted(entry.glob(f"*{SEGMENT_SUFFIX}")):
            try:
                data = segment.read_bytes()
                first = int(segment.name.removesuffix(SEGMENT_SUFFIX))
            except (OSError, ValueError) as exc:
                summary.problems.append(f"{segment}: unreadable ({exc})")
                continue
            inst.segments += 1
            inst.bytes += len(data)
            if data[: len(MAGIC)] != MAGIC:
                summary.problems.append(f"{segment}: not a journal segment")
                continue
            payloads, pos, problem, _short = _parse(data, len(MAGIC), len(data))
            for i, payload in enumerate(payloads):
                if first + i > inst.stored_lsn:
                    inst.pending_records += 1
                    name = kind_name(payload)
                    inst.kinds[name] = inst.kinds.get(name, 0) + 1
            if pos < len(data) and inst.state == "orphan":
                # A live owner may be mid-write; a dead one left a torn tail (never acked).
                why = problem or "torn record"
                summary.problems.append(
                    f"{segment}: {why} at byte {pos}; the replay moves it aside"
                )
        summary.problems += [f"{p}: damaged bytes kept aside" for p in entry.glob("*.corrupt-*")]
        summary.instances.append(inst)
    dead = root / DEAD_LETTER_DIR
    if dead.is_dir():
        for path in sorted(dead.glob("*.jsonl")):
            with path.open("rb") as fh:
                summary.dead_letters[str(path)] = sum(1 for _ in fh)
    return summary


def _journal_root(directory: Path | None) -> Path:
    if directory is not None:
        return directory
    return _settings().journal_dir


@journal_app.command("inspect")
def journal_inspect(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Journal root (default: DATA_MANAGER_JOURNAL_DIR)."),
    ] = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """List the instance journals: owner alive or orphaned, records to replay, bytes.

    Reads only; a journal whose owner died (an orphan) is replayed by the next router that
    starts, or now with `data-manager journal replay`.

    Example: `data-manager journal inspect --dir /var/lib/app/.data_manager/journal`
    """
    _setup_logging(verbose)
    try:
        summary = inspect_journals(_journal_root(directory))
    except (DataManagerError, OSError) as exc:
        raise _fail("journal inspect", exc) from exc
    if as_json:
        _print_json(summary.to_dict())
        return
    console.print(f"[bold]journal root[/] {summary.root}")
    if not summary.instances:
        console.print("  no instance journals")
    else:
        table = Table()
        for col in ("instance", "state", "pending records", "bytes", "segments", "kinds"):
            table.add_column(col)
        for inst in summary.instances:
            kinds = ", ".join(f"{k}: {n:,}" for k, n in sorted(inst.kinds.items()))
            table.add_row(
                inst.instance_id,
                inst.state,
                f"{inst.pending_records:,}",
                f"{inst.bytes:,}",
                str(inst.segments),
                kinds or "-",
            )
        console.print(table)
    for problem in summary.problems:
        console.print(f"  [yellow]{problem}[/]")
    for path, lines in summary.dead_letters.items():
        console.print(f"  dead letters: {path} ({lines:,} items the database refused)")
    console.print(
        f"{summary.orphans} orphaned, {summary.orphan_records:,} records to replay "
        f"({summary.orphan_bytes:,} bytes)"
    )


@journal_app.command("replay")
def journal_replay(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Journal root (default: DATA_MANAGER_JOURNAL_DIR)."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Give up waiting for the database after this many seconds.")
    ] = 300.0,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Replay orphaned journals into the database now, and report the counts.

    A router adopts the journals of dead instances when it starts; this starts one, waits
    until what it adopted is stored, and closes. Replays are idempotent. Exit code 0 when
    nothing is left, 1 when records remain (the database failed or the timeout passed).

    Example: `data-manager journal replay --timeout 60`
    """
    _setup_logging(verbose)
    try:
        # Inside the try: invalid settings are a failure (exit 2), not a traceback.
        root = _journal_root(directory)
        before = inspect_journals(root)
    except (DataManagerError, OSError) as exc:
        raise _fail("journal replay", exc) from exc

    async def run() -> None:
        settings = _settings(journal_dir=root)
        async with _router(settings) as router:
            deadline = asyncio.get_running_loop().time() + timeout
            try:
                async with asyncio.timeout_at(deadline):
                    await router.flush()
            except TimeoutError:
                err_console.print(f"[yellow]replay not finished after {timeout:g} s[/]")
            # The close gets what is left of --timeout (the rest stays in the journal): a
            # database that hangs must not hold the command past it.
            left = deadline - asyncio.get_running_loop().time()
            await router.close(timeout=max(0.0, left))

    try:
        run_async(run)
        after = inspect_journals(root)
    except Interrupted as exc:
        raise _interrupted(exc, "journal replay") from exc
    except (DataManagerError, OSError) as exc:
        raise _fail("journal replay", exc) from exc
    replayed = max(0, before.orphan_records - after.orphan_records)
    result = {
        "root": str(root),
        "orphans_before": before.orphans,
        "records_before": before.orphan_records,
        "replayed": replayed,
        "orphans_left": after.orphans,
        "records_left": after.orphan_records,
    }
    if as_json:
        _print_json(result)
    else:
        console.print(
            f"replayed {replayed:,} records from {before.orphans} orphaned journal(s); "
            f"{after.orphan_records:,} records left in {after.orphans}"
        )
    raise typer.Exit(1 if after.orphan_records else 0)


# --------------------------------------------------------------------------- bench / metrics


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def bench(ctx: typer.Context) -> None:
    """Run the benchmarks: `python -m benchmarks ARGS...` (arguments are passed through).

    Needs a source checkout (the benchmarks are not installed with the package).

    Examples: `data-manager bench`, `data-manager bench -- --help`
    """
    cmd = [sys.executable, "-m", "benchmarks", *ctx.args]
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    if (root / "benchmarks").is_dir():
        # Found from any working directory, without touching relative paths in ARGS.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it finish its own way
        code = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code if code >= 0 else 128 - code)


@app.command("serve-metrics")
def serve_metrics(
    port: Annotated[int, typer.Option(help="TCP port for /metrics.", min=1, max=65535)] = 9464,
    addr: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    verbose: Verbose = False,
) -> None:
    """Serve the router's Prometheus metrics over HTTP until SIGINT or SIGTERM.

    Example: `data-manager serve-metrics --port 9464 --addr 0.0.0.0`
    """
    _setup_logging(verbose)
    try:
        from data_manager import metrics
    except ImportError as exc:
        raise _fail("serve-metrics", exc) from exc

    async def run() -> None:
        async with _router() as router:
            server = await _maybe_await(metrics.serve_metrics(router, port, addr))
            url = getattr(server, "url", f"http://{addr}:{port}/metrics")
            console.print(f"serving metrics on {url} (Ctrl-C to stop)")
            try:
                await asyncio.Event().wait()  # until a signal cancels us
            finally:
                aclose = getattr(server, "aclose", None)
                await _maybe_await(aclose() if aclose is not None else server.shutdown())

    try:
        run_async(run)
    except Interrupted:
        err_console.print("metrics server stopped")
    except (DataManagerError, OSError) as exc:
        raise _fail("serve-metrics", exc) from exc


async def _maybe_await(value: Any) -> Any:
    return await value if isinstance(value, Awaitable) else value


def main() -> None:
    """Entry point of the ``data-manager`` script."""
    app()


# --------------------------------------------------------------------------- replay


class StreamKindOption(enum.StrEnum):
    """What ``replay --kind`` may select."""

    tick = "tick"
    candle = "candle"
    order_flow = "order_flow"


@app.command("replay")
def replay(
    from_stream: Annotated[
        str | None,
        typer.Option(
            "--from-stream",
            help="nats://host:4222 (JetStream) or redis://host:6379/0 (Redis stream). "
            "Default: DATA_MANAGER_BACKUP_STREAM_URL.",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Start, as stream time: Unix ms or ISO-8601 (UTC without an offset). "
            "Default: everything the stream still holds."
        ),
    ] = None,
    kind: Annotated[
        StreamKindOption | None, typer.Option("--kind", "-k", help="Only this kind.")
    ] = None,
    stream: Annotated[
        str | None,
        typer.Option(
            help="JetStream stream name. Default: DATA_MANAGER_BACKUP_STREAM_NAME (DM_BACKUP).",
            show_default=False,
        ),
    ] = None,
    subject_prefix: Annotated[str, typer.Option(help="JetStream subject prefix.")] = "dm.backup",
    key: Annotated[
        str | None,
        typer.Option(
            help="Redis stream key. Default: DATA_MANAGER_BACKUP_STREAM_KEY (dm:backup:v1).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Items per database write.", min=1)
    ] = 10_000,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Rebuild or back-fill the database from the backup stream.

    Reads the stream from --since to its end (as it was when the replay started) and
    writes through the storage's idempotent writes: running the same replay twice leaves
    the same rows. --since is the time the stream stored a message, so data that was
    spooled during a stream outage and published later is included. The stream URL, name
    and key default to the ones the router publishes to (`DATA_MANAGER_BACKUP_STREAM_URL`,
    `_NAME`, `_KEY`); the options override them.

    Exit code: 0 done, 1 some messages could not be decoded (skipped, logged), 2 failed,
    130/143 interrupted.

    Examples:

    `data-manager replay --since 2024-10-03T00:00:00Z` (the configured stream)

    `data-manager replay --from-stream nats://127.0.0.1:4222 --since 2024-10-03T00:00:00Z`

    `data-manager replay --from-stream redis://127.0.0.1:6379/0 --key dm:backup:v1 --kind tick`
    """
    from data_manager.stream import ReplayReport, parse_since, replay_from_stream

    _setup_logging(verbose)
    try:
        since_ms = parse_since(since) if since is not None else None
    except DataManagerError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from exc

    async def run() -> ReplayReport:
        from data_manager.errors import ConfigurationError

        # What the router publishes to, unless an option says otherwise.
        settings = _settings()
        url = from_stream
        if url is None:
            if settings.backup_stream_url is None:
                msg = (
                    "no stream to replay from: pass --from-stream or set "
                    "DATA_MANAGER_BACKUP_STREAM_URL"
                )
                raise ConfigurationError(msg)
            url = settings.backup_stream_url.get_secret_value()
        with _progress("items") as bar:
            task = bar.add_task("replaying", total=None)

            def advance(report: ReplayReport) -> None:
                bar.update(task, completed=report.items)

            async with _router(settings) as router:
                await router.storage.create_schema()  # a rebuild may start from nothing
                return await replay_from_stream(
                    router.storage,
                    url,
                    since_ms=since_ms,
                    kind=kind.value if kind is not None else None,
                    batch_size=batch_size,
                    stream=stream if stream is not None else settings.backup_stream_name,
                    subject_prefix=subject_prefix,
                    key=key if key is not None else settings.backup_stream_key,
                    on_progress=advance,
                )

    try:
        report = run_async(run)
    except Interrupted as exc:
        err_console.print("running the same replay again is safe (nothing is stored twice)")
        raise _interrupted(exc, "replay") from exc
    except DataManagerError as exc:
        raise _fail("replay", exc) from exc
    if as_json:
        _print_json(dataclasses.asdict(report))
    else:
        rate = report.items / report.seconds if report.seconds else 0.0
        console.print(
            f"{report.source}: {report.messages:,} messages, {report.items:,} items "
            f"({report.ticks:,} ticks, {report.candles:,} candles, {report.order_flow:,} "
            f"order flow), {report.rows_written:,} rows new or changed, "
            f"[{'red' if report.invalid_messages else 'green'}]"
            f"{report.invalid_messages:,} invalid messages[/] "
            f"({report.seconds:.1f} s, {rate:,.0f} items/s)"
        )
    raise typer.Exit(1 if report.invalid_messages else 0)
