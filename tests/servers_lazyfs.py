"""A throwaway LazyFS mount for the power-loss tests of journal mode.

LazyFS (https://github.com/dsrhaslab/lazyfs) is a FUSE file system with a page cache of its
own: file data reaches its backing folder only when the application syncs it (``fsync``,
``fdatasync``), and ``lazyfs::clear-cache`` drops everything unsynced, as a power loss
would. Metadata (creating, renaming, removing files) goes to the backing folder at once, so
a missing directory sync goes unnoticed; a missing data sync does not.

LazyFS is not on any package registry: the tests that need it run only when
``DATA_MANAGER_TEST_LAZYFS`` names its ``lazyfs`` executable (built from source; its
``libpcache.so`` must be findable, e.g. through ``LD_LIBRARY_PATH``) and ``/dev/fuse`` is
usable. Same lifecycle as the servers in ``tests/servers.py``: one child process, its files
in a fresh temporary directory that :meth:`LazyFS.close` removes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Final

from tests.servers import (
    _POLL_INTERVAL,
    START_TIMEOUT,
    STOP_TIMEOUT,
    ServerError,
    ServerProcess,
    launch,
)

LAZYFS_ENV: Final = "DATA_MANAGER_TEST_LAZYFS"


def lazyfs_binary() -> Path | None:
    """The ``lazyfs`` executable named by ``DATA_MANAGER_TEST_LAZYFS``, or None."""
    named = os.environ.get(LAZYFS_ENV)
    return Path(named) if named else None


def _mounted(path: Path) -> bool:
    with open("/proc/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


class LazyFS(ServerProcess):
    """A LazyFS mount (``mount``) over a backing folder (``disk``). Create it with
    :func:`start_lazyfs`.

    ``disk`` is what a power loss would leave: only data that was synced, once
    :meth:`power_loss` has dropped the rest.
    """

    name = "lazyfs"
    stop_signal = signal.SIGTERM  # libfuse unmounts on SIGTERM

    def __init__(self, root: Path, *, binary: Path) -> None:
        super().__init__(root, 0)
        self.binary = binary
        self.mount = root / "mnt"
        self.disk = root / "disk"
        self._faults = root / "faults.fifo"
        self._done = root / "done.fifo"
        self._config = root / "lazyfs.toml"
        self.mount.mkdir()
        self.disk.mkdir()
        self._config.write_text(
            "[faults]\n"
            f'fifo_path="{self._faults}"\n'
            f'fifo_path_completed="{self._done}"\n'
            "[cache]\n"
            "apply_eviction=false\n"
            "[cache.simple]\n"
            'custom_size="256mb"\n'
            "blocks_per_page=1\n"
            "[filesystem]\n"
            "log_all_operations=false\n"
            'logfile=""\n',  # its standard output: the server log
            encoding="utf-8",
        )

    @property
    def url(self) -> str:
        return f"lazyfs://{self.mount}"

    def _command(self) -> list[str]:
        return [
            str(self.binary), str(self.mount),
            "--config-path", str(self._config),
            "-o", "modules=subdir", "-o", f"subdir={self.disk}",
            "-f",
        ]  # fmt: skip

    def _is_ready(self, pid: int) -> bool:
        return _mounted(self.mount) and self._done.exists()

    def power_loss(self, timeout: float = STOP_TIMEOUT) -> None:
        """Drop every byte of file data that was not synced, and wait until it is gone."""
        # Open the completion FIFO first (non-blocking) so LazyFS's answer has a reader.
        done = os.open(self._done, os.O_RDONLY | os.O_NONBLOCK)
        try:
            with open(self._faults, "w", encoding="utf-8") as faults:
                faults.write("lazyfs::clear-cache\n")
            answer = b""
            deadline = time.monotonic() + timeout
            while b"finished::clear-cache" not in answer:
                if time.monotonic() > deadline:
                    msg = f"lazyfs did not clear its cache in {timeout:.0f}s:\n{self.log_tail()}"
                    raise ServerError(msg)
                try:
                    answer += os.read(done, 256)
                except BlockingIOError:
                    time.sleep(_POLL_INTERVAL)
        finally:
            os.close(done)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Unmount and stop LazyFS (unsynced data is not written back)."""
        if self.running:
            subprocess.run(["fusermount3", "-u", str(self.mount)], check=False, capture_output=True)
        super().stop(timeout)
        if _mounted(self.mount):  # LazyFS died without unmounting
            subprocess.run(["umount", "-l", str(self.mount)], check=False, capture_output=True)


def start_lazyfs(binary: Path, *, timeout: float = START_TIMEOUT) -> LazyFS:
    """Mount a throwaway LazyFS and return it.

    Raises:
        ServerError: It did not mount within ``timeout`` seconds (the log tail is in the
            message).
    """
    return launch(
        # No "-" before the random part: LazyFS ignores a --config-path value containing
        # "-o" (any case; it takes it for the next option) and looks for config/default.toml,
        # which mkdtemp's random letters made happen about once in 37 starts.
        "dm-test-lazyfs_",
        lambda root: LazyFS(root, binary=binary),
        lambda fs: fs.start(timeout),
    )
