"""A throwaway Redis Cluster of local ``redis-server`` processes, for the cluster tests.

Three masters, no replicas, created with ``redis-cli --cluster create``::

    with start_redis_cluster() as cluster:
        cluster.nodes[1].kill()    # SIGKILL one master, like a crash
        cluster.nodes[1].start()   # back on its port; it rejoins from its nodes-PORT.conf
        cluster.seeds              # ["127.0.0.1:P1", "127.0.0.1:P2", "127.0.0.1:P3"]

The nodes run with ``cluster-require-full-coverage no``, so while a master is down the others
keep serving their own slots (the default would refuse every command once the lost master is
marked failed), and with a short ``cluster-node-timeout`` so failure detection is quick.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

from tests.servers import (
    HOST,
    START_TIMEOUT,
    RedisServer,
    ServerError,
    free_port,
    launch,
    redis_binary,
)

if TYPE_CHECKING:
    from types import TracebackType

NODE_TIMEOUT_MS: Final = 1000
_POLL_INTERVAL: Final = 0.05


def cluster_unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (for ``pytest.skip``), or None if it can."""
    try:
        redis_binary()
    except ServerError as exc:
        return str(exc)
    if shutil.which("redis-cli") is None and shutil.which("valkey-cli") is None:
        return "no redis-cli/valkey-cli on PATH: cannot create a Redis Cluster"
    return None


def _cli() -> str:
    found = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if found is None:
        msg = "no redis-cli/valkey-cli on PATH"
        raise ServerError(msg)
    return found


def _query(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one command in RESP and return the raw reply (bulk strings up to 64 KiB)."""
    request = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args
    )
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        data = sock.recv(65536)
        if data.startswith(b"$"):
            header, _, body = data.partition(b"\r\n")
            need = int(header[1:]) + 2
            while len(body) < need:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            return body[: need - 2]
        return data


class ClusterNodeServer(RedisServer):
    """One cluster-enabled ``redis-server``; its cluster state lives in ``nodes-PORT.conf``."""

    name = "redis-cluster-node"

    def __init__(self, root: Path, port: int, *, binary: Path) -> None:
        super().__init__(root, port, binary=binary)
        # An explicit bus port: the default, PORT + 10000, may be taken or out of range.
        self.bus_port = free_port()

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.root / f"nodes-{self.port}.conf"),
            "--cluster-port", str(self.bus_port),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--cluster-require-full-coverage", "no",
        ]  # fmt: skip

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{HOST}:{self.port}"

    def cluster_state(self) -> str | None:
        """``ok`` or ``fail`` from CLUSTER INFO; None if the node does not answer."""
        try:
            info = _query(self.port, "CLUSTER", "INFO").decode(errors="replace")
        except OSError:
            return None
        for line in info.splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return None

    def keyslot(self, key: str) -> int:
        """The slot of ``key``, per ``CLUSTER KEYSLOT`` on this node."""
        reply = _query(self.port, "CLUSTER", "KEYSLOT", key)
        return int(reply.strip().lstrip(b":"))

    def owns_key(self, key: str) -> bool:
        """Whether ``key`` is stored on this node right now (``EXISTS`` answers 1)."""
        return _query(self.port, "EXISTS", key).strip() == b":1"

    def node_id(self) -> str:
        """This node's id (``CLUSTER MYID``)."""
        return _query(self.port, "CLUSTER", "MYID").decode()

    def command(self, *args: str) -> bytes:
        """Run one command; the raw RESP reply (bulk strings unwrapped)."""
        return _query(self.port, *args)

    def script_loaded(self, sha: str) -> bool:
        """Whether this node's script cache holds ``sha``."""
        return b"*1\r\n:1" in _query(self.port, "SCRIPT", "EXISTS", sha)


class RedisClusterHandle:
    """The nodes of a throwaway cluster; :meth:`close` stops them and removes their data."""

    def __init__(self, nodes: list[ClusterNodeServer]) -> None:
        self.nodes = nodes

    @property
    def seeds(self) -> list[str]:
        """Every node as ``host:port``."""
        return [node.address for node in self.nodes]

    def node_by_address(self, address: str) -> ClusterNodeServer:
        """The node listening on ``address`` (``host:port``)."""
        for node in self.nodes:
            if node.address == address:
                return node
        msg = f"no node at {address}"
        raise KeyError(msg)

    def wait_ok(self, timeout: float = START_TIMEOUT) -> None:
        """Poll until every running node reports ``cluster_state:ok``.

        Raises:
            ServerError: Not all of them did within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            states = {node.port: node.cluster_state() for node in self.nodes if node.running}
            if states and all(state == "ok" for state in states.values()):
                return
            if time.monotonic() > deadline:
                msg = f"cluster not ok after {timeout:.0f}s: {states}"
                raise ServerError(msg)
            time.sleep(_POLL_INTERVAL)

    def create(self, timeout: float = START_TIMEOUT) -> None:
        """Assign the slots to the (running, empty) nodes and join them into one cluster."""
        done = subprocess.run(
            [
                _cli(),
                "--cluster",
                "create",
                *self.seeds,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if done.returncode != 0:
            output = done.stdout + done.stderr
            msg = f"redis-cli --cluster create failed ({done.returncode}):\n{output}"
            raise ServerError(msg)
        self.wait_ok(timeout)

    def close(self) -> None:
        """Stop every node and remove its directory. Safe to call twice."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_redis_cluster(masters: int = 3, *, timeout: float = START_TIMEOUT) -> RedisClusterHandle:
    """Start ``masters`` cluster-enabled servers and create a cluster of them (no replicas).

    Raises:
        ServerError: A binary is missing, or start-up or cluster creation failed.
    """
    binary = redis_binary()
    nodes: list[ClusterNodeServer] = []
    handle = RedisClusterHandle(nodes)
    try:
        for _ in range(masters):
            node = launch(
                "dm-test-rcluster-",
                lambda root: ClusterNodeServer(root, free_port(), binary=binary),
                lambda node: node.start(timeout),
            )
            nodes.append(node)
        handle.create(timeout)
    except BaseException:
        with contextlib.suppress(ServerError):
            handle.close()
        raise
    return handle
