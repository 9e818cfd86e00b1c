"""Servers, namespaces and routers for the benchmark suite.

The suite talks to the servers named by ``DATA_MANAGER_BENCH_POSTGRES_URL`` and
``DATA_MANAGER_BENCH_REDIS_URL``; when one is unset it starts a throwaway server for it with
the test suite's ``tests/servers.py`` (loaded by path, so the benchmarks need no test
package on ``sys.path``). Every benchmark works in a :class:`Namespace` of its own: a fresh
PostgreSQL schema and Redis key prefix, dropped and deleted at the end, plus a scratch folder
under ``.data_manager/`` (the SDK's default journal location, so fsyncs hit the same disk the
SDK uses by default) for journals and an empty configuration folder.

Everything here that a subprocess needs travels as a plain :class:`RouterSpec`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
POSTGRES_ENV: Final = "DATA_MANAGER_BENCH_POSTGRES_URL"
REDIS_ENV: Final = "DATA_MANAGER_BENCH_REDIS_URL"
SCRATCH_PARENT: Final = ROOT / ".data_manager"


@dataclass(frozen=True)
class Servers:
    """Where the benchmarks connect, and where those servers came from."""

    postgres_url: str
    redis_url: str
    postgres_origin: str
    redis_origin: str


def _load_test_servers() -> Any:
    path = ROOT / "tests" / "servers.py"
    spec = importlib.util.spec_from_file_location("_data_manager_bench_test_servers", path)
    if spec is None or spec.loader is None:
        msg = f"cannot load {path}"
        raise RuntimeError(msg)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def servers() -> Iterator[Servers]:
    """Yield the servers to use; throwaway ones are stopped (and their data removed) on exit."""
    pg_url = os.environ.get(POSTGRES_ENV) or None
    redis_url = os.environ.get(REDIS_ENV) or None
    pg_origin = (
        f"${POSTGRES_ENV}"
        if pg_url
        else "throwaway server (tests/servers.py), PostgreSQL's default durability (fsync on)"
    )
    redis_origin = f"${REDIS_ENV}" if redis_url else "throwaway server (tests/servers.py)"
    with contextlib.ExitStack() as stack:
        if pg_url is None or redis_url is None:
            test_servers = _load_test_servers()
            if pg_url is None:
                print("starting a throwaway PostgreSQL server ...", flush=True)
                pg_url = stack.enter_context(
                    test_servers.start_postgres(database="bench", durable=True)
                ).url
            if redis_url is None:
                print("starting a throwaway Redis-protocol server ...", flush=True)
                redis_url = stack.enter_context(test_servers.start_redis()).url
        assert pg_url is not None
        assert redis_url is not None
        yield Servers(pg_url, redis_url, pg_origin, redis_origin)


@dataclass(frozen=True)
class RouterSpec:
    """Everything needed to build a router in any process (picklable)."""

    postgres_url: str
    redis_url: str | None
    schema: str
    prefix: str
    workdir: str
    strategy: Mapping[str, Any] = field(default_factory=dict)

    def with_strategy(self, strategy: Mapping[str, Any]) -> RouterSpec:
        """The same namespace under another routing strategy."""
        return RouterSpec(
            self.postgres_url, self.redis_url, self.schema, self.prefix, self.workdir, strategy
        )


def build_router(spec: RouterSpec, **fields: Any) -> Any:
    """A :class:`data_manager.DataRouter` (not yet initialised) for ``spec``; ``fields``
    are further :class:`~data_manager.settings.DataManagerSettings` fields.

    The configuration folder is an empty one, so nothing in ``./config`` changes what is
    measured; the strategy is fixed (no file watching). Each router gets its own journal
    folder, so no router adopts another's journal mid-benchmark.
    """
    from data_manager import DataRouter
    from data_manager.settings import DataManagerSettings, DragonflySettings, PostgresSettings
    from data_manager.strategy import strategy_from_mapping

    work = Path(spec.workdir)
    config_dir = work / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    journal_dir = Path(tempfile.mkdtemp(prefix="journal-", dir=work))
    dragonfly = (
        DragonflySettings(url=spec.redis_url, key_prefix=spec.prefix)
        if spec.redis_url
        else DragonflySettings()
    )
    settings = DataManagerSettings(
        config_dir=config_dir,
        postgres=PostgresSettings(url=spec.postgres_url, db_schema=spec.schema),
        dragonfly=dragonfly,
        journal_dir=journal_dir,
        watch_strategy=False,
        **fields,
    )
    return DataRouter(settings=settings, strategy=strategy_from_mapping(dict(spec.strategy)))


class Scratch:
    """The run's namespaces and scratch folder; :meth:`cleanup` removes all of them."""

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        SCRATCH_PARENT.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=SCRATCH_PARENT))
        self._schemas: list[str] = []
        self._prefixes: list[str] = []

    def spec(
        self, label: str, strategy: Mapping[str, Any] | None = None, *, l2: bool = True
    ) -> RouterSpec:
        """A fresh namespace (schema + key prefix) for one benchmark."""
        token = secrets.token_hex(4)
        schema = f"bench_{label}_{token}"
        prefix = f"bench{token}"
        self._schemas.append(schema)
        self._prefixes.append(prefix)
        work = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.workdir))
        return RouterSpec(
            self.servers.postgres_url,
            self.servers.redis_url if l2 else None,
            schema,
            prefix,
            str(work),
            dict(strategy or {}),
        )

    async def cleanup(self) -> None:
        """Drop every schema and delete every key this run created; remove the folder."""
        import asyncpg
        from redis.asyncio import Redis

        try:
            if self._schemas:
                conn = await asyncpg.connect(self.servers.postgres_url, timeout=10)
                try:
                    for schema in self._schemas:
                        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', timeout=120)
                finally:
                    await conn.close(timeout=10)
            if self._prefixes:
                client = Redis.from_url(self.servers.redis_url, socket_timeout=10)
                try:
                    for prefix in self._prefixes:
                        batch: list[bytes] = []
                        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                            batch.append(key)
                            if len(batch) >= 1000:
                                await client.unlink(*batch)
                                batch.clear()
                        if batch:
                            await client.unlink(*batch)
                finally:
                    await client.aclose()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
