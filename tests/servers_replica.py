"""A streaming replica (hot standby) of a throwaway PostgreSQL server, for read-replica tests.

::

    primary = start_postgres()           # or postgres_server_factory()
    with start_replica(primary) as replica:
        replica.url                      # a read-only hot standby on its own port
        replica.stop(); replica.start()  # same port, same data directory, streaming again

The replica is a physical copy taken with ``pg_basebackup -R -X stream``: ``-R`` writes
``standby.signal`` and the ``primary_conninfo`` that points back at the primary, so on start it
replays the primary's WAL over a streaming-replication connection. The primary needs nothing
beyond what ``initdb`` gives it since PostgreSQL 10 (``wal_level=replica``, ``max_wal_senders``,
``hot_standby``, and ``pg_hba.conf`` lines that let localhost replicate with the cluster's
``trust`` authentication). The same rules as ``tests/servers.py`` apply: a fresh temporary
directory, a free loopback port, and ``nobody`` as the server user when the suite runs as root.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.servers import (
    HOST,
    START_TIMEOUT,
    PostgresServer,
    _accepts_connections,
    _server_user,
    _usable_bindir,
    free_port,
    launch,
    postgres_bindir,
)

__all__ = ["ReplicaServer", "start_replica"]


class ReplicaServer(PostgresServer):
    """A hot standby streaming from :attr:`primary`. Create it with :func:`start_replica`."""

    name = "postgres replica"

    def __init__(
        self,
        root: Path,
        port: int,
        *,
        bindir: Path,
        database: str,
        user: tuple[int, int] | None,
        primary: PostgresServer,
    ) -> None:
        super().__init__(root, port, bindir=bindir, database=database, user=user)
        self.primary = primary

    def _is_ready(self, pid: int) -> bool:
        # A hot standby that accepts read-only connections reports "standby" in line 8 of
        # postmaster.pid, not "ready" (that one is for a server that accepts writes).
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(pid)
            and lines[7].strip() in ("standby", "ready")
            and _accepts_connections(self.port)
        )

    def base_backup(self) -> None:
        """Copy the running primary into :attr:`data_dir` and configure it as its standby."""
        self._run_tool(
            "pg_basebackup",
            "-h", HOST,
            "-p", str(self.primary.port),
            "-U", "postgres",
            "-D", str(self.data_dir),
            "-R",  # standby.signal + primary_conninfo
            "-X", "stream",  # the WAL written during the copy comes along
            "-c", "fast",  # checkpoint now rather than waiting for the next one
            "--no-sync",
        )  # fmt: skip


def start_replica(primary: PostgresServer, *, timeout: float = START_TIMEOUT) -> ReplicaServer:
    """Take a base backup of ``primary`` and start it as a streaming hot standby.

    Args:
        primary: A running throwaway server (from ``start_postgres``); it must stay up while
            the copy is taken.
        timeout: Seconds to wait for the standby to accept read-only connections.

    Raises:
        ServerError: No binaries, or ``pg_basebackup`` or start-up failed (the tool's output
            or the log tail is in the message).
    """

    def build(root: Path) -> ReplicaServer:
        user = _server_user()
        if user is not None:
            os.chown(root, *user)
        bindir = _usable_bindir(postgres_bindir(), root, user)
        return ReplicaServer(
            root,
            free_port(),
            bindir=bindir,
            database=primary.database,
            user=user,
            primary=primary,
        )

    def start(replica: ReplicaServer) -> None:
        replica.base_backup()
        replica.start(timeout)

    return launch("dm-test-pg-replica-", build, start)
