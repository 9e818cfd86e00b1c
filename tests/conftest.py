"""Shared fixtures: real PostgreSQL and Redis-protocol servers, isolated per test.

The servers come from ``DATA_MANAGER_TEST_POSTGRES_URL`` / ``DATA_MANAGER_TEST_REDIS_URL``
when set; otherwise a throwaway server is started on first use and stopped at the end of the
session (see ``tests/servers.py``). Either way a test only touches what it creates: its own
schema (``pg_schema``) and its own key prefix (``redis_prefix``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from tests.servers import PostgresServer, RedisServer, start_postgres, start_redis

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

POSTGRES_URL_ENV: Final = "DATA_MANAGER_TEST_POSTGRES_URL"
REDIS_URL_ENV: Final = "DATA_MANAGER_TEST_REDIS_URL"
CLEANUP_TIMEOUT: Final = 10.0
_INTEGRATION_DIR: Final = Path(__file__).parent / "integration"
# A test using one of these fixtures needs that server, whatever directory it lives in.
_SERVER_MARKERS: Final = {
    "postgres": {"postgres_url", "pg_schema", "postgres_server_factory"},
    "redis": {"redis_url", "redis_prefix", "redis_server_factory"},
}


def pytest_report_header() -> list[str]:
    """Say where the servers come from, so a CI log answers it."""
    return [
        f"postgres: {f'${POSTGRES_URL_ENV}' if os.environ.get(POSTGRES_URL_ENV) else 'throwaway'}",
        f"redis: {f'${REDIS_URL_ENV}' if os.environ.get(REDIS_URL_ENV) else 'throwaway'}",
    ]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests under tests/integration/ ``integration``, and server users by server."""
    for item in items:
        if _INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)
        fixtures = set(getattr(item, "fixturenames", ()))
        for marker, names in _SERVER_MARKERS.items():
            if fixtures & names:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def postgres_server_factory() -> Iterator[Callable[[], PostgresServer]]:
    """Start a dedicated throwaway PostgreSQL server per call; all stop at session end.

    Always throwaway, even when ``DATA_MANAGER_TEST_POSTGRES_URL`` is set, so fault tests
    can stop, restart or kill it. The handle has ``.url``, ``.stop()``, ``.start()`` (same
    port and data), ``.kill()`` (SIGKILL) and ``.running``.
    """
    with contextlib.ExitStack() as servers:
        yield lambda: servers.enter_context(start_postgres())


@pytest.fixture(scope="session")
def redis_server_factory() -> Iterator[Callable[[], RedisServer]]:
    """Start a dedicated throwaway Redis-protocol server per call; all stop at session end.

    Same handle API as :func:`postgres_server_factory`. The server keeps no data across a
    restart (no persistence).
    """
    with contextlib.ExitStack() as servers:
        yield lambda: servers.enter_context(start_redis())


@pytest.fixture(scope="session")
def postgres_url(postgres_server_factory: Callable[[], PostgresServer]) -> str:
    """``postgresql://postgres@127.0.0.1:PORT/DB`` of the session's PostgreSQL server."""
    return os.environ.get(POSTGRES_URL_ENV) or postgres_server_factory().url


@pytest.fixture(scope="session")
def redis_url(redis_server_factory: Callable[[], RedisServer]) -> str:
    """``redis://127.0.0.1:PORT/0`` of the session's Redis-protocol server."""
    return os.environ.get(REDIS_URL_ENV) or redis_server_factory().url


@pytest_asyncio.fixture(loop_scope="session")
async def pg_schema(postgres_url: str) -> AsyncIterator[str]:
    """A fresh schema (``dmtest_<8 hex>``) in the ``postgres_url`` database, dropped afterwards.

    Only that schema is ever dropped (``CASCADE``, with whatever the test put in it).
    """
    name = f"dmtest_{secrets.token_hex(4)}"
    await _execute(postgres_url, f'CREATE SCHEMA "{name}"')
    yield name
    await _execute(postgres_url, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def _execute(url: str, sql: str) -> None:
    # A connection per call: the test in between may hold, break or restart anything else.
    conn = await asyncpg.connect(url, timeout=CLEANUP_TIMEOUT)
    try:
        await conn.execute(sql, timeout=CLEANUP_TIMEOUT)
    finally:
        await conn.close(timeout=CLEANUP_TIMEOUT)


@pytest_asyncio.fixture(loop_scope="session")
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A unique key prefix (``t<8 hex>``); keys starting with it are deleted afterwards.

    Cleanup uses SCAN + UNLINK on those keys only, never FLUSHDB, since the server may be
    shared.
    """
    prefix = f"t{secrets.token_hex(4)}"
    yield prefix
    client = Redis.from_url(
        redis_url, socket_timeout=CLEANUP_TIMEOUT, socket_connect_timeout=CLEANUP_TIMEOUT
    )
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.unlink(*keys[start : start + 1000])
    finally:
        await client.aclose()
