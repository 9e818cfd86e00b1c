"""Figures, the console table, the machine description and the BENCHMARKS.md writer.

BENCHMARKS.md keeps hand-written prose; the suite only rewrites the blocks between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` markers (one per benchmark group, plus
``machine``), so ``--only`` refreshes one group and leaves the others as they were. Each
group block states the date and command of the run that produced it.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
BENCHMARKS_MD: Final = ROOT / "BENCHMARKS.md"


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return float(statistics.median(values))


# --------------------------------------------------------------------------- CPU use


def machine_cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) clock ticks of the whole machine since boot, from /proc/stat.

    Raises:
        OSError: No /proc/stat (not Linux).
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields), idle


class CpuMeter:
    """CPU time used between :meth:`start` and :meth:`stop`: this process's (every thread,
    user + system) and the whole machine's busy share (None off Linux).

    Throughput alone cannot say whether a figure is limited by the SDK's own CPU or by what
    it waits for; the process's CPU per item can, and the machine's busy share says how much
    room the servers and other processes left.
    """

    def __init__(self) -> None:
        self.process_seconds = 0.0
        self.wall_seconds = 0.0
        self.machine_busy: float | None = None
        self._started: tuple[float, float, tuple[int, int] | None] | None = None

    def start(self) -> None:
        self._started = (time.process_time(), time.perf_counter(), _machine_or_none())

    def stop(self) -> None:
        assert self._started is not None, "CpuMeter.stop() before start()"
        cpu0, wall0, machine0 = self._started
        self.process_seconds = time.process_time() - cpu0
        self.wall_seconds = time.perf_counter() - wall0
        machine1 = _machine_or_none()
        if machine0 is not None and machine1 is not None and machine1[0] > machine0[0]:
            total = machine1[0] - machine0[0]
            self.machine_busy = 1.0 - (machine1[1] - machine0[1]) / total

    def describe(self, items: int, what: str) -> str:
        """E.g. ``this process 37 µs of CPU per acknowledged tick (92 % of one core);
        machine 76 % busy (2 cores)``."""
        per_item = 1e6 * self.process_seconds / max(1, items)
        share = self.process_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
        text = f"this process {per_item:.1f} µs of CPU per {what} ({share:.0%} of one core)"
        if self.machine_busy is not None:
            text += f"; machine {self.machine_busy:.0%} busy ({os.cpu_count()} cores)"
        return text


def _machine_or_none() -> tuple[int, int] | None:
    try:
        return machine_cpu_times()
    except OSError:
        return None


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    """One measured figure, its same-run baseline and its target.

    ``ratio`` is already oriented: for latencies it is SDK / baseline (lower is better), for
    throughputs SDK / baseline as a fraction (higher is better); ``ratio_kind`` says how to
    print it (``"x"`` or ``"%"``).
    """

    name: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    ratio_kind: str = "x"
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Group:
    """The figures of one benchmark (one section of the table and of BENCHMARKS.md)."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def fmt_value(value: float | None, unit: str) -> str:
    """A number with its unit, at a precision that suits its size."""
    if value is None:
        return "—"
    if unit in ("ticks/s", "rows/s", "reads/s", "B"):
        return f"{value:,.0f} {unit}"
    if unit == "%":
        return f"{value:.1f} %"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    if abs(value) >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.2f} {unit}"


def fmt_ratio(fig: Figure) -> str:
    """The ratio column."""
    if fig.ratio is None:
        return "—"
    if fig.ratio_kind == "%":
        return f"{100 * fig.ratio:.0f} %"
    return f"{fig.ratio:.2f}×"


def fmt_met(met: bool | None) -> str:
    """The verdict column."""
    return {True: "yes", False: "**no**", None: "—"}[met]


def _baseline_cell(fig: Figure) -> str:
    if not fig.baseline:
        return "—"
    if fig.baseline_value is None:
        return fig.baseline
    return f"{fmt_value(fig.baseline_value, fig.unit)} ({fig.baseline})"


def print_group(group: Group) -> None:
    """The group as a plain-text table on stdout."""
    print(f"\n== {group.title}  ({group.seconds:.0f} s)")
    if group.error:
        print(f"   FAILED: {group.error}")
    rows = [("figure", "SDK", "baseline", "ratio", "target", "met")]
    for fig in group.figures:
        rows.append(
            (
                fig.name,
                fmt_value(fig.value, fig.unit),
                _baseline_cell(fig),
                fmt_ratio(fig),
                fig.target or "—",
                {True: "yes", False: "NO", None: "-"}[fig.met],
            )
        )
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(rows[0]))]
    for row in rows:
        print("   " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    for fig in group.figures:
        if fig.note:
            print(f"   - {fig.name}: {fig.note}")
    for note in group.notes:
        print(f"   * {note}")


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else platform.machine()


def _ram_gib() -> float | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemTotal:\s*(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) / 1024 / 1024 if found else None


def _package_versions() -> str:
    from importlib import metadata

    parts = []
    for name in ("asyncpg", "redis", "hiredis", "pydantic", "orjson", "sqlalchemy"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


async def describe_servers(postgres_url: str, redis_url: str) -> dict[str, str]:
    """Versions and the settings that move the figures (durability, memory)."""
    import asyncpg
    from redis.asyncio import Redis

    out: dict[str, str] = {}
    conn = await asyncpg.connect(postgres_url, timeout=10)
    try:
        version = await conn.fetchval("SHOW server_version")
        settings = await conn.fetch(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
            ["fsync", "synchronous_commit", "shared_buffers", "full_page_writes"],
        )
        ts = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname='timescaledb'")
    finally:
        await conn.close(timeout=10)
    parts = []
    for row in settings:
        value = row["setting"]
        if row["name"] == "shared_buffers" and row["unit"] == "8kB":
            value = f"{int(value) * 8 // 1024} MB"
        parts.append(f"{row['name']}={value}")
    out["postgres"] = (
        f"PostgreSQL {version}"
        + (f" + TimescaleDB {ts}" if ts else " (no TimescaleDB: plain tables)")
        + f"; {', '.join(sorted(parts))}"
    )
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    product = "Redis"
    version = info.get("redis_version", "?")
    for name in ("dragonfly", "valkey"):
        if info.get(f"{name}_version"):
            product, version = name.capitalize(), info[f"{name}_version"]
    out["redis"] = f"{product} {version}"
    return out


def machine_lines(servers: dict[str, str], origins: tuple[str, str]) -> list[str]:
    """The machine block, one fact per line."""
    ram = _ram_gib()
    return [
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores",
        f"- RAM: {ram:.1f} GiB" if ram is not None else "- RAM: unknown",
        f"- OS: {platform.platform()}",
        f"- Python: {platform.python_implementation()} {sys.version.split()[0]}",
        f"- Packages: {_package_versions()}",
        f"- PostgreSQL: {servers['postgres']} — {origins[0]}",
        f"- Redis protocol: {servers['redis']} — {origins[1]}",
    ]


# --------------------------------------------------------------------------- BENCHMARKS.md


def group_markdown(group: Group, *, date: str, command: str, machine: str) -> str:
    """One group's block (without markers)."""
    lines = [
        f"_Measured {date} with `{command}` on {machine} ({group.seconds:.0f} s)._",
        "",
    ]
    if group.error:
        lines += [f"**This benchmark failed:** `{group.error}`", ""]
    if group.figures:
        lines += [
            "| Figure | SDK | Baseline (same run) | Ratio | Target | Met |",
            "|---|---:|---|---:|---|:-:|",
        ]
        for fig in group.figures:
            lines.append(
                f"| {fig.name} | {fmt_value(fig.value, fig.unit)} | {_baseline_cell(fig)} | "
                f"{fmt_ratio(fig)} | {fig.target or '—'} | {fmt_met(fig.met)} |"
            )
        lines.append("")
    notes = [f"{fig.name}: {fig.note}" for fig in group.figures if fig.note] + group.notes
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def _block(key: str, body: str) -> str:
    return f"<!-- bench:{key} -->\n{body.rstrip()}\n<!-- /bench:{key} -->"


def update_markdown(
    path: Path,
    *,
    template: str,
    blocks: dict[str, str],
    headings: dict[str, str] | None = None,
) -> None:
    """Replace the named marker blocks in ``path`` (created from ``template`` if absent);
    a block not in the file yet is appended under ``headings[key]``."""
    text = path.read_text(encoding="utf-8") if path.exists() else template
    for key, body in blocks.items():
        pattern = re.compile(
            rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->", re.DOTALL
        )
        replacement = _block(key, body)
        if pattern.search(text):
            text = pattern.sub(lambda _m: replacement, text)  # noqa: B023 - used at once
        else:
            heading = (headings or {}).get(key)
            title = f"## {heading}\n\n" if heading else ""
            text = text.rstrip() + "\n\n" + title + replacement + "\n"
    path.write_text(text, encoding="utf-8")


def today() -> str:
    """The run's date, UTC."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
