"""The ``data-manager`` command line (also ``python -m data_manager``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer
from rich.console import Console

from data_manager.errors import DataManagerError
from data_manager.health import HealthCheckResponse
from data_manager.router import DataRouter

__all__ = ["app", "main"]

app = typer.Typer(
    name="data-manager",
    help="Market data SDK: demo, health, schema management.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

#: Exit codes of `health`: 0 healthy, 1 degraded, 2 unhealthy (or the check itself failed).
HEALTH_EXIT: dict[str, int] = {"healthy": 0, "degraded": 1, "unhealthy": 2}

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def demo(
    ticks: Annotated[
        int, typer.Option(help="How many synthetic ticks to ingest.", min=100)
    ] = 50_000,
    verbose: Verbose = False,
) -> None:
    """Feed a synthetic FX stream through the router, build candles, read them back.

    With no database configured this runs on the embedded SQLite store: no servers needed.
    """
    from data_manager.demo import run_demo

    _setup_logging(verbose)
    try:
        asyncio.run(run_demo(n_ticks=ticks, console=console))
    except DataManagerError as exc:
        err_console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def health(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    verbose: Verbose = False,
) -> None:
    """Check every backend; exit 0 when healthy, 1 when degraded, 2 when unhealthy."""
    _setup_logging(verbose)

    async def run() -> HealthCheckResponse:
        async with DataRouter() as router:
            return await router.health_check()

    try:
        report = asyncio.run(run())
    except DataManagerError as exc:
        if as_json:
            console.print_json(data={"status": "unhealthy", "reason": str(exc)})
        else:
            err_console.print(f"[red]unhealthy:[/] {exc}")
        raise typer.Exit(HEALTH_EXIT["unhealthy"]) from exc
    if as_json:
        console.print_json(report.model_dump_json())
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
    """Create the schema, or migrate an older one forward (idempotent)."""
    _setup_logging(verbose)

    async def run() -> str:
        async with DataRouter() as router:
            info = await router.storage.create_schema()
            ts = " with TimescaleDB" if info.timescaledb else ""
            return f"{router.storage.target}: schema v{info.version}{ts}"

    try:
        console.print(asyncio.run(run()))
    except DataManagerError as exc:
        err_console.print(f"[red]init-db failed:[/] {exc}")
        raise typer.Exit(2) from exc


def main() -> None:
    """Entry point of the ``data-manager`` script."""
    app()
