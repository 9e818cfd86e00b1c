"""Collapse concurrent loads of the same key into one backend read.

When a hot key misses in L1 (at startup, after an expiry or after the cache was cleared),
every engine coroutine asking for it at once would otherwise send its own query to L2 and the
database. :class:`SingleFlight` runs the first caller's loader as a task and makes the others
await that same task.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Hashable

__all__ = ["SingleFlight"]

T = TypeVar("T")


class SingleFlight:
    """Share one in-flight load per key among concurrent callers.

    One instance serves loads of any result type; the key says what is loaded, so callers
    using the same key must expect the same type (include the data type in the key).
    Single event loop only: not thread-safe.

    Semantics:

    * The first caller for a key starts ``loader()`` in a task; callers arriving while it
      runs await the same task, and all get its result or its exception.
    * Each caller awaits through :func:`asyncio.shield`, so cancelling one caller (e.g. its
      request timed out) neither cancels the load nor the other callers. If every caller is
      cancelled the load still runs to completion, so whatever it writes to the caches on the
      way is not lost.
    * The key is forgotten as soon as the load finishes: a caller arriving afterwards starts
      a fresh load, and a failure is never cached.
    """

    __slots__ = ("_calls", "_inflight", "_loads", "_shared")

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Task[Any]] = {}
        self._calls = 0
        self._loads = 0
        self._shared = 0

    @property
    def calls(self) -> int:
        """Calls to :meth:`do`."""
        return self._calls

    @property
    def loads(self) -> int:
        """Loader invocations (one per collapsed group of calls)."""
        return self._loads

    @property
    def shared(self) -> int:
        """Calls that joined a load already in flight instead of starting one."""
        return self._shared

    @property
    def inflight(self) -> int:
        """Keys with a load currently running."""
        return len(self._inflight)

    async def do(self, key: Hashable, loader: Callable[[], Awaitable[T]]) -> T:
        """Return ``await loader()``, sharing one run among concurrent callers of ``key``.

        Args:
            key: Identifies what is loaded; hashable, e.g. ``("tick", symbol, source)``.
            loader: Called at most once per collapsed group, by the first caller.

        Returns:
            The loader's result (the same object for every caller of the group).

        Raises:
            Exception: Whatever the loader raised, re-raised in every caller of the group.
            asyncio.CancelledError: This caller was cancelled (the load goes on), or the
                load itself was cancelled.
        """
        self._calls += 1
        task = self._inflight.get(key)
        if task is None:
            self._loads += 1
            task = asyncio.get_running_loop().create_task(self._run(key, loader))
            task.add_done_callback(partial(self._done, key))
            self._inflight[key] = task
        else:
            self._shared += 1
        return await asyncio.shield(cast("asyncio.Task[T]", task))

    async def _run(self, key: Hashable, loader: Callable[[], Awaitable[T]]) -> T:
        try:
            return await loader()
        finally:
            # Forget the key the moment the load ends, before any waiter resumes, so no
            # later caller can join a finished load.
            self._forget(key, asyncio.current_task())

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        # A task cancelled before its first step never runs _run's ``finally``; forget it here.
        self._forget(key, task)
        # When every caller was cancelled before a load failed, nobody awaits the task; reading
        # the exception keeps asyncio from logging "Task exception was never retrieved".
        if not task.cancelled():
            task.exception()

    def _forget(self, key: Hashable, task: asyncio.Task[Any] | None) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
