"""The server fixtures work: isolation helpers, and stop/start/kill of dedicated servers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import pytest
import redis.exceptions
from redis.asyncio import Redis

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.servers import PostgresServer, RedisServer

TIMEOUT = 10.0


async def _pg_fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url, timeout=TIMEOUT)
    try:
        return await conn.fetchval(sql, timeout=TIMEOUT)
    finally:
        await conn.close(timeout=TIMEOUT)


async def _redis_roundtrip(url: str, key: str) -> object:
    client = Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    try:
        await client.set(key, b"v")
        return await client.get(key)
    finally:
        await client.aclose()


async def test_pg_schema_is_fresh_and_usable(postgres_url: str, pg_schema: str) -> None:
    conn = await asyncpg.connect(postgres_url, timeout=TIMEOUT)
    try:
        await conn.execute(f'SET search_path TO "{pg_schema}"', timeout=TIMEOUT)
        assert await conn.fetchval("SELECT 1", timeout=TIMEOUT) == 1
        assert await conn.fetchval("SELECT current_schema()", timeout=TIMEOUT) == pg_schema
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1",
            pg_schema,
            timeout=TIMEOUT,
        )
        assert tables == 0
        await conn.execute("CREATE TABLE t (x int)", timeout=TIMEOUT)
    finally:
        await conn.close(timeout=TIMEOUT)


async def test_redis_prefix_set_get(redis_url: str, redis_prefix: str) -> None:
    client = Redis.from_url(redis_url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    try:
        assert [key async for key in client.scan_iter(match=f"{redis_prefix}*")] == []
        await client.set(f"{redis_prefix}:k", b"v")
        assert await client.get(f"{redis_prefix}:k") == b"v"
    finally:
        await client.aclose()


async def test_redis_server_stop_start_kill(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    assert await _redis_roundtrip(server.url, "k") == b"v"

    server.stop()
    assert not server.running
    with pytest.raises(redis.exceptions.ConnectionError):
        await _redis_roundtrip(server.url, "k")

    server.start()
    assert await _redis_roundtrip(server.url, "k") == b"v"

    server.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        await _redis_roundtrip(server.url, "k")
    server.start()
    assert await _redis_roundtrip(server.url, "k") == b"v"


@pytest.mark.slow
async def test_postgres_server_stop_start_kill(
    postgres_server_factory: Callable[[], PostgresServer],
) -> None:
    server = postgres_server_factory()
    await _pg_fetchval(server.url, "CREATE TABLE survives (x int)")

    server.stop()
    assert not server.running
    with pytest.raises(OSError):  # connection refused
        await _pg_fetchval(server.url, "SELECT 1")

    server.start()
    assert await _pg_fetchval(server.url, "SELECT count(*) FROM survives") == 0

    server.kill()
    with pytest.raises(OSError):
        await _pg_fetchval(server.url, "SELECT 1")
    server.start()  # crash recovery on the same data directory
    assert await _pg_fetchval(server.url, "SELECT count(*) FROM survives") == 0
