"""Fixtures for integration tests that need more than PostgreSQL and Redis: NATS JetStream,
and a PostgreSQL primary with a streaming replica (``cluster``, one pair per module).

``nats_url`` comes from ``DATA_MANAGER_TEST_NATS_URL`` when set (a test then only touches
the streams it creates, under names of its own); otherwise a throwaway ``nats-server -js``
is started on first use (``tests/servers_nats.py``). Without a NATS binary and without the
variable, the tests that need NATS are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Final

import pytest

from tests.servers import ServerError
from tests.servers_nats import NatsServer, nats_binary, start_nats
from tests.servers_replica import ReplicaServer, start_replica

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.servers import PostgresServer

NATS_URL_ENV: Final = "DATA_MANAGER_TEST_NATS_URL"


@pytest.fixture(scope="session")
def nats_server_factory() -> Iterator[Callable[[], NatsServer]]:
    """Start a dedicated throwaway NATS server (JetStream on) per call; all stop at the end.

    Always throwaway, even when ``DATA_MANAGER_TEST_NATS_URL`` is set, so fault tests can
    stop, restart or kill it. The handle has ``.url``, ``.stop()``, ``.start()`` (same port,
    same JetStream store), ``.kill()`` (SIGKILL) and ``.running``.
    """
    try:
        nats_binary()
    except ServerError as exc:
        pytest.skip(f"NATS tests need a nats-server binary: {exc}")
    with contextlib.ExitStack() as servers:
        yield lambda: servers.enter_context(start_nats())


@pytest.fixture(scope="session")
def nats_url(request: pytest.FixtureRequest) -> str:
    """``nats://127.0.0.1:PORT`` of the session's NATS server (JetStream enabled)."""
    url = os.environ.get(NATS_URL_ENV)
    if url:
        return url
    # Looked up only here, so a run with the variable set needs no binary at all.
    factory: Callable[[], NatsServer] = request.getfixturevalue("nats_server_factory")
    return factory().url


@pytest.fixture(scope="module")
def cluster(
    postgres_server_factory: Callable[[], PostgresServer],
) -> Iterator[tuple[PostgresServer, ReplicaServer]]:
    """A dedicated primary and a streaming replica of it, for this module."""
    primary = postgres_server_factory()
    with start_replica(primary) as replica:
        yield primary, replica
