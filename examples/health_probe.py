"""A health probe: exit 0 when healthy, 1 when degraded, 2 when unhealthy.

Run::

    python examples/health_probe.py          # one line per backend
    python examples/health_probe.py --json   # the full report

For a Docker ``HEALTHCHECK`` or a Kubernetes exec probe. It reads the same configuration as
the services (``POSTGRES_HOST``, ``DRAGONFLY_HOST``, ``DATA_MANAGER_*``) and gives up
connecting after ``--timeout`` seconds, so a probe never hangs. (``data-manager health`` is
the same check as a command.)
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from data_manager import DataManagerError, DataManagerSettings, DataRouter

EXIT = {"healthy": 0, "degraded": 1, "unhealthy": 2}


async def probe(connect_seconds: float, as_json: bool) -> int:
    settings = DataManagerSettings().model_copy(update={"init_deadline_seconds": connect_seconds})
    try:
        async with DataRouter(settings) as router:
            report = await router.health_check()
    except DataManagerError as exc:  # the database could not even be reached
        print(f"unhealthy: {exc}", file=sys.stderr)
        return EXIT["unhealthy"]
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        print(f"{report.status}: {report.reason}")
        for name, db in report.databases.items():
            print(f"  {name} {db.target}: reachable={db.reachable} latency={db.latency_ms}")
        cache = report.cache
        l2 = f"{cache.l2_target} reachable={cache.l2_reachable}" if cache.l2_configured else "-"
        print(f"  l2: {l2}")
    return EXIT[report.status]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the whole report")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to connect")
    args = parser.parse_args()
    sys.exit(asyncio.run(probe(args.timeout, args.json)))


if __name__ == "__main__":
    main()
