"""The benchmark suite behind ``python -m benchmarks`` (and ``python3 bootstrap.py bench``).

Usage::

    python -m benchmarks                 # full run (~10 minutes on 2 cores), updates BENCHMARKS.md
    python -m benchmarks --quick         # small N, about a minute, prints only
    python -m benchmarks --only ingest   # one group (repeatable); updates only its section
    python -m benchmarks --no-write      # never touch BENCHMARKS.md

Servers: ``DATA_MANAGER_BENCH_POSTGRES_URL`` / ``DATA_MANAGER_BENCH_REDIS_URL`` when set,
else throwaway servers started with ``tests/servers.py``. Each benchmark uses its own
PostgreSQL schema and Redis key prefix and removes them afterwards.

Groups (each figure is printed next to a baseline measured in the same run, the ratio, and
the target from the issues; a missed target is reported, never hidden):

* ``reads`` — L1 hits, L2 hits with a cold L1, the database fallback (issue 3);
* ``propagation`` — ``save_tick`` in one process to L1 in two others (issue 3);
* ``hitrates`` — one collector, 8 reader processes: hit rate per tier, age of served values;
* ``ingest`` — throughput against raw COPY and per-row INSERT, ``save_tick`` latency,
  journal group commit, save-to-commit latency, peak RSS, aggregation cost (issues 4, 5);
* ``stream`` — ingest with the backup stream off, on NATS JetStream, on Redis Streams.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import time
import traceback
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from benchmarks._report import (
    BENCHMARKS_MD,
    Group,
    describe_servers,
    group_markdown,
    machine_cpu_times,
    machine_lines,
    print_group,
    today,
    update_markdown,
)
from benchmarks._servers import POSTGRES_ENV, REDIS_ENV, Scratch, Servers, servers

#: name -> (module, title); the order is the run order.
GROUPS: Final[dict[str, tuple[str, str]]] = {
    "reads": ("benchmarks._reads", "1. Read path (issue 3)"),
    "propagation": ("benchmarks._bus", "2. Propagation to other processes (issue 3)"),
    "hitrates": ("benchmarks._bus", "3. Hit rates and age of served values (issue 3)"),
    "ingest": ("benchmarks._ingest", "4. Ingest (issues 4 and 5)"),
    "stream": ("benchmarks._stream", "5. Backup stream"),
}

TEMPLATE: Final = """# Benchmarks

Produced by `python -m benchmarks` (also `python3 bootstrap.py bench`); see
`benchmarks/suite.py` for the options. Every SDK figure sits next to a baseline measured in
the same run on the same machine, with the ratio and the target set by the issues. The
sections between `<!-- bench:… -->` markers are rewritten by the suite; the rest is prose.

## Machine

<!-- bench:machine -->
<!-- /bench:machine -->

## 1. Read path

<!-- bench:reads -->
<!-- /bench:reads -->

## 2. Propagation

<!-- bench:propagation -->
<!-- /bench:propagation -->

## 3. Hit rates

<!-- bench:hitrates -->
<!-- /bench:hitrates -->

## 4. Ingest

<!-- bench:ingest -->
<!-- /bench:ingest -->

## 5. Backup stream

<!-- bench:stream -->
<!-- /bench:stream -->
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="data_manager benchmarks, each beside a baseline measured in the same run.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small N: a sanity run of about a minute"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(GROUPS),
        metavar="NAME",
        help=f"run only this group (repeatable): {', '.join(GROUPS)}",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each group, wait up to this long for other processes to leave the CPUs "
        "idle (below 15 %% busy); the busy share seen is reported either way",
    )
    parser.add_argument(
        "--tag",
        metavar="NAME",
        help="write to BENCHMARKS.md sections of their own, suffixed with NAME (e.g. a run "
        "against other servers), instead of the main ones",
    )
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update BENCHMARKS.md (default: yes for a full run, no with --quick)",
    )
    return parser.parse_args(argv)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def command_line(argv: list[str]) -> str:
    """The command as a reader would type it (server URLs from the environment included,
    passwords masked)."""
    env = [
        f"{name}={_redact(os.environ[name])}"
        for name in (POSTGRES_ENV, REDIS_ENV)
        if os.environ.get(name)
    ]
    return " ".join([*env, "python -m benchmarks", *argv])


def background_busy(seconds: float = 1.0) -> float | None:
    """Share of the machine's CPU time that other processes used over ``seconds`` while
    this suite was idle (None where /proc/stat does not exist)."""
    try:
        total0, idle0 = machine_cpu_times()
        time.sleep(seconds)
        total1, idle1 = machine_cpu_times()
    except OSError:
        return None
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else None


def wait_quiet(limit: float, threshold: float = 0.15) -> float | None:
    """Sample the background load; with ``limit`` > 0 keep sampling until it drops below
    ``threshold`` or ``limit`` seconds pass. Returns the last sample."""
    deadline = time.monotonic() + limit
    busy = background_busy()
    while busy is not None and busy > threshold and time.monotonic() < deadline:
        busy = background_busy()
    return busy


async def _run_groups(
    srv: Servers, names: list[str], quick: bool, quiet: float
) -> tuple[list[Group], dict[str, str]]:
    scratch = Scratch(srv)
    groups: list[Group] = []
    try:
        info = await describe_servers(srv.postgres_url, srv.redis_url)
        print(f"PostgreSQL: {info['postgres']}\nRedis: {info['redis']}", flush=True)
        for name in names:
            module_name, title = GROUPS[name]
            module = importlib.import_module(module_name)
            busy = await asyncio.to_thread(wait_quiet, quiet)
            load = f"{busy:.0%}" if busy is not None else "unknown"
            print(f"\nrunning {name} (other processes kept the CPUs {load} busy) ...", flush=True)
            started = time.perf_counter()
            try:
                group: Group = await getattr(module, f"run_{name}")(scratch, quick=quick)
            except Exception as exc:  # report the failure, keep running the other groups
                traceback.print_exc()
                group = Group(name, title, error=f"{type(exc).__name__}: {exc}")
            group.title = title
            group.seconds = time.perf_counter() - started
            group.notes.append(
                f"just before this group, other processes kept the {os.cpu_count()} CPUs "
                f"{load} busy"
                + (" — figures are pessimistic" if busy is not None and busy > 0.15 else "")
            )
            print_group(group)
            groups.append(group)
    finally:
        await scratch.cleanup()
    return groups, info


def main(argv: list[str] | None = None) -> int:
    """Run the selected groups, print the table, update BENCHMARKS.md; 1 if a group failed."""
    raw_argv = sys.argv[1:] if argv is None else argv
    args = parse_args(raw_argv)
    names = [n for n in GROUPS if args.only is None or n in args.only]
    write = (not args.quick) if args.write is None else args.write
    started = time.perf_counter()
    with servers() as srv:
        groups, info = asyncio.run(_run_groups(srv, names, args.quick, args.wait_quiet))
        origins = (srv.postgres_origin, srv.redis_origin)
    total = time.perf_counter() - started
    missed = [f.name for g in groups for f in g.figures if f.met is False]
    failed = [g.key for g in groups if g.error]
    print(
        f"\nfinished in {total:.0f} s; {len(missed)} target(s) missed"
        + (f": {'; '.join(missed)}" if missed else "")
    )
    if failed:
        print(f"FAILED groups: {', '.join(failed)}")
    if write:
        date = today()
        command = command_line(raw_argv)
        lines = machine_lines(info, origins)
        short = lines[0].removeprefix("- CPU: ")
        suffix = f"-{args.tag}" if args.tag else ""
        blocks = {
            f"machine{suffix}": "\n".join(
                [
                    f"Last written {date} by `{command}`" + (" (quick run)" if args.quick else ""),
                    "",
                    *lines,
                ]
            )
        }
        headings = {f"machine{suffix}": f"Machine — {args.tag}"}
        for group in groups:
            blocks[f"{group.key}{suffix}"] = group_markdown(
                group,
                date=date,
                command=command,
                machine=short,
            )
            headings[f"{group.key}{suffix}"] = f"{group.title.split(' (')[0]} — {args.tag}"
        update_markdown(BENCHMARKS_MD, template=TEMPLATE, blocks=blocks, headings=headings)
        print(f"wrote {BENCHMARKS_MD}")
    return 1 if failed else 0
