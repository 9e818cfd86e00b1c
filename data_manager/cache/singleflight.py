"""Collapse concurrent loads of the same key into one backend read.

When a hot key misses in L1 (at startup, after an expiry or after the cache was cleared),
every engine coroutine asking for it at once would otherwise send its own query to L2 and the
database. :class:`SingleFlight` runs the loader in the first caller and makes the others await
its outcome.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Hashable

__all__ = ["SingleFlight"]

T = TypeVar("T")


class _Abandoned(Exception):
    """The caller running a load was cancelled: the callers waiting on it start over."""


class SingleFlight:
    """Share one in-flight load per key among concurrent callers.

    One instance serves loads of any result type; the key says what is loaded, so callers
    using the same key must expect the same type (include the data type in the key).
    Single event loop only: not thread-safe.

    Semantics:

    * The first caller for a key runs ``loader()`` itself (no task: a miss with nobody else
      waiting costs one future, not a task and a shield, ~18 µs less per miss); callers
      arriving while it runs await its outcome, and all get its result or its exception.
    * Waiting callers await through :func:`asyncio.shield`, so cancelling one of them (e.g.
      its request timed out) affects neither the load nor the others. Cancelling the caller
      that runs the load cancels the load; the callers waiting on it then start over, one of
      them running a new load. Nothing is lost either way: a load only fills caches.
    * A loader that raises :class:`asyncio.CancelledError` by itself (its caller was not
      cancelled) cancels every caller of the group.
    * The key is forgotten as soon as the load finishes: a caller arriving afterwards starts
      a fresh load, and a failure is never cached.
    """

    __slots__ = ("_calls", "_inflight", "_loads", "_shared")

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[Any]] = {}
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
        """Times a call joined a load already in flight instead of starting one."""
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
            asyncio.CancelledError: This caller was cancelled, or the loader raised it.
        """
        self._calls += 1
        while True:
            future = self._inflight.get(key)
            if future is None:
                return await self._lead(key, loader)
            self._shared += 1
            try:
                return await asyncio.shield(cast("asyncio.Future[T]", future))
            except _Abandoned:
                continue  # its runner was cancelled: load again (or join whoever does)

    async def _lead(self, key: Hashable, loader: Callable[[], Awaitable[T]]) -> T:
        self._loads += 1
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await loader()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                future.set_exception(_Abandoned())
            else:
                future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]
            if not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning without waiters
