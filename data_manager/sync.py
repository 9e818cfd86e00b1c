"""A synchronous facade over :class:`data_manager.DataRouter`, for scripts and notebooks.

::

    from data_manager.sync import DataRouter

    with DataRouter() as router:
        router.save_tick(tick)
        candles = router.get_latest_candles("EUR/USD", "1m", 100)
        df = router.get_candles_df("EUR/USD", "1h", start, end)

The facade runs a private event loop in a background thread and hands every call to it with
``asyncio.run_coroutine_threadsafe``, then waits for the answer. That works the same whether
or not the calling thread runs an event loop of its own: inside Jupyter (whose loop is
running in the main thread), inside an ``async def``, in a plain script, or from several
threads at once. The calling thread blocks while it waits (it is a synchronous API);
nothing it waits for needs its loop, so nothing deadlocks.

The methods have the async router's names and arguments. Streaming reads
(:meth:`SyncDataRouter.iter_ticks`, :meth:`SyncDataRouter.iter_candles`) are plain
generators that fetch ``batch_size`` items per hop between the threads.

:meth:`SyncDataRouter.close` flushes, closes the router and stops the thread; leaving a
``with`` block does it too, and so does interpreter exit for a facade never closed (or the
garbage collector, for one dropped without closing). It cannot be called from the facade's
own loop (a subscription or processor callback): it would wait for the loop it blocks. A
facade does not survive ``fork()``: create it in the process that uses it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.thread  # registers its exit hook before ours: see _close_at_exit
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

from data_manager.errors import DataManagerError, RouterClosedError
from data_manager.router import USE_DEFAULT
from data_manager.router import DataRouter as AsyncDataRouter

if TYPE_CHECKING:
    from types import TracebackType

    from data_manager.clock import Clock
    from data_manager.health import HealthCheckResponse
    from data_manager.interop import DataFrameBackend
    from data_manager.lifecycle import RetentionReport, RetentionSettings
    from data_manager.models import CandleData, OrderFlowMetrics, TickData
    from data_manager.router import StalenessReport, _UseDefault
    from data_manager.settings import DataManagerSettings, WriteMode
    from data_manager.storage.base import DataKind
    from data_manager.strategy import RoutingStrategy

__all__ = ["DataRouter", "SyncDataRouter"]

P = ParamSpec("P")
T = TypeVar("T")
Item = TypeVar("Item")

#: Seconds :meth:`SyncDataRouter.close` waits for the loop thread to stop.
_JOIN_TIMEOUT: Final = 30.0

logger = logging.getLogger(__name__)

#: Closes scheduled on a facade's loop by a finalizer that ran on that loop's thread; held
#: here because a loop keeps only weak references to its tasks.
_CLOSING: set[asyncio.Task[None]] = set()
#: Facades not closed yet, for :func:`_close_at_exit`.
_OPEN: weakref.WeakSet[SyncDataRouter] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    try:
        loop.run_forever()
    finally:
        try:
            # Whatever is still scheduled (nothing, after the router closed) is cancelled.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _shutdown(
    loop: asyncio.AbstractEventLoop,
    thread: threading.Thread,
    router: AsyncDataRouter | None,
    timeout: float | None,
) -> None:
    """Close the router on its loop, then stop the loop and join its thread (idempotent).

    On the loop's own thread (a facade dropped there, so its finalizer runs there) waiting
    would block the loop the close needs: the close is scheduled on the loop instead, and
    the loop stops once it is done.
    """
    if loop.is_closed() or not thread.is_alive():
        return
    if thread is threading.current_thread():
        loop.call_soon_threadsafe(_spawn_close, loop, router, timeout)
        return
    try:
        if router is not None:
            future = asyncio.run_coroutine_threadsafe(router.close(timeout), loop)
            future.result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_JOIN_TIMEOUT)


def _spawn_close(
    loop: asyncio.AbstractEventLoop, router: AsyncDataRouter | None, timeout: float | None
) -> None:
    task = loop.create_task(_close_then_stop(loop, router, timeout))
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


async def _close_then_stop(
    loop: asyncio.AbstractEventLoop, router: AsyncDataRouter | None, close_timeout: float | None
) -> None:
    try:
        if router is not None:
            await router.close(close_timeout)
    except DataManagerError:
        # Nobody waits for this close to report to: log it, as an unclosed facade would.
        logger.warning("closing a dropped SyncDataRouter failed", exc_info=True)
    finally:
        loop.stop()


def _close_at_exit() -> None:
    """Close every facade still open, before the interpreter's thread pools shut down.

    ``weakref.finalize`` runs its exit callbacks from ``atexit``, i.e. after
    ``concurrent.futures`` has shut down every thread pool, the event loops' default
    executors included; the router's close then fails at its first ``asyncio.to_thread``
    (the journal's close), leaving the journal open and the rest of the close undone.
    ``threading._register_atexit`` hooks run earlier, before non-daemon threads are joined,
    in reverse order of registration: ``concurrent.futures.thread`` registers its own hook
    when imported (this module imports it first), so this one runs before it.
    """
    for facade in list(_OPEN):
        try:
            facade._finalizer()
        except Exception:
            # An exception here would end the interpreter's thread shutdown early (the
            # thread pools would not be joined): report it and close the other facades.
            logger.exception("closing %r at interpreter exit failed", facade)


def _register_exit_hook() -> None:
    global _exit_hook_registered
    with _exit_hook_lock:
        if _exit_hook_registered:
            return
        # CPython's (private) hook for "before threads are joined", the one
        # concurrent.futures itself uses; there is no public equivalent (atexit runs too
        # late). Where it is missing, or the interpreter is already exiting, the
        # weakref.finalize atexit callback remains the fallback.
        register = getattr(threading, "_register_atexit", None)
        if register is None:
            return
        try:
            register(_close_at_exit)
        except RuntimeError:  # "can't register atexit after shutdown"
            return
        _exit_hook_registered = True


def _prefetch(batch_size: object) -> int:
    """Items a sync iterator takes per hop: the batch size when it is one (the router
    validates it and raises its own error on the first item otherwise)."""
    return batch_size if type(batch_size) is int and batch_size > 0 else 1


class SyncDataRouter:
    """The :class:`~data_manager.router.DataRouter` API, synchronous.

    Args:
        settings: As for the async router (read from the environment when omitted).
        clock: Time source (tests).
        strategy: A fixed routing strategy instead of the hot-reloaded file.

    Use it as ``with SyncDataRouter() as router: ...`` or call :meth:`initialize` and
    :meth:`close` yourself.
    """

    def __init__(
        self,
        settings: DataManagerSettings | None = None,
        *,
        clock: Clock | None = None,
        strategy: RoutingStrategy | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=_run_loop, args=(self._loop, ready), name="data_manager-sync", daemon=True
        )
        self._thread.start()
        ready.wait()
        self._closed = False
        self._router: AsyncDataRouter | None = None
        try:
            # Built on the loop it will run on (its primitives bind to that loop).
            self._router = self._call(self._build, settings, clock, strategy)
        except BaseException:
            _shutdown(self._loop, self._thread, None, None)
            raise
        # A daemon thread keeps no process alive; this finalizer (also run at interpreter
        # exit, see _close_at_exit) closes the router so buffered writes are flushed even
        # without close().
        self._finalizer = weakref.finalize(
            self, _shutdown, self._loop, self._thread, self._router, None
        )
        _OPEN.add(self)
        _register_exit_hook()

    @staticmethod
    async def _build(
        settings: DataManagerSettings | None,
        clock: Clock | None,
        strategy: RoutingStrategy | None,
    ) -> AsyncDataRouter:
        return AsyncDataRouter(settings, clock=clock, strategy=strategy)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.router.state.value
        return f"<SyncDataRouter {state}>"

    # ------------------------------------------------------------------ plumbing

    @property
    def router(self) -> AsyncDataRouter:
        """The async router underneath; use it only from coroutines given to :meth:`run`."""
        if self._router is None:
            msg = "SyncDataRouter is closed"
            raise RouterClosedError(msg)
        return self._router

    def _call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._closed:
            msg = "SyncDataRouter is closed; create a new one"
            raise RouterClosedError(msg)
        if threading.current_thread() is self._thread:
            msg = (
                "a SyncDataRouter method was called from its own event loop (e.g. inside a "
                "subscription or processor callback); use the async router there: "
                "`sync_router.router`"
            )
            raise DataManagerError(msg)

        async def call() -> T:
            return await fn(*args, **kwargs)

        future = asyncio.run_coroutine_threadsafe(call(), self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            # Ctrl-C in a notebook: stop the work instead of leaving it running unseen.
            future.cancel()
            raise
        except concurrent.futures.CancelledError as exc:
            msg = "the call was cancelled because the router is closing"
            raise RouterClosedError(msg) from exc

    def run(self, fn: Callable[[AsyncDataRouter], Awaitable[T]]) -> T:
        """Run ``fn(async_router)`` on the facade's loop and return its result.

        For anything the facade does not wrap: ``sync_router.run(lambda r: r.run_maintenance())``.
        """
        return self._call(fn, self.router)

    def _stream(self, agen: AsyncIterator[Item], chunk: int) -> Generator[Item, None, None]:
        """Iterate ``agen`` in this thread, ``chunk`` items per hop to the loop's thread."""

        async def take() -> list[Item]:
            out: list[Item] = []
            async for item in agen:
                out.append(item)
                if len(out) >= chunk:
                    break
            return out

        try:
            while True:
                items = self._call(take)
                yield from items
                if len(items) < chunk:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self._closed:
                # Releases a server-side cursor at once when the caller stops early.
                self._call(aclose)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SyncDataRouter:
        self.initialize()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def initialize(self) -> None:
        """Connect and start (see :meth:`DataRouter.initialize`)."""
        self._call(self.router.initialize)

    def close(self, timeout: float | None = None) -> None:
        """Flush, close the router and stop the loop thread. Idempotent.

        Args:
            timeout: Seconds to wait for the flush (what is left stays in the journal).

        Raises:
            DataManagerError: Called from the facade's own event loop (e.g. inside a
                subscription or processor callback), where waiting for the close would
                block the loop that runs it; use ``await sync_router.router.close()``
                there, or close the facade from another thread.
        """
        if self._closed:
            return
        if threading.current_thread() is self._thread:
            msg = (
                "SyncDataRouter.close() was called from its own event loop (e.g. inside a "
                "subscription or processor callback), where it would wait for itself; close "
                "it from another thread, or use the async router there: `sync_router.router`"
            )
            raise DataManagerError(msg)
        self._closed = True
        _OPEN.discard(self)
        self._finalizer.detach()
        _shutdown(self._loop, self._thread, self._router, timeout)
        self._router = None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    # ------------------------------------------------------------------ writes

    def save_tick(self, tick: TickData, *, mode: WriteMode | _UseDefault = USE_DEFAULT) -> None:
        """See :meth:`DataRouter.save_tick`."""
        self._call(self.router.save_tick, tick, mode=mode)

    def save_candle(
        self, candle: CandleData, *, mode: WriteMode | _UseDefault = USE_DEFAULT
    ) -> None:
        """See :meth:`DataRouter.save_candle`."""
        self._call(self.router.save_candle, candle, mode=mode)

    def save_order_flow(
        self, metrics: OrderFlowMetrics, *, mode: WriteMode | _UseDefault = USE_DEFAULT
    ) -> None:
        """See :meth:`DataRouter.save_order_flow`."""
        self._call(self.router.save_order_flow, metrics, mode=mode)

    def save_ticks(self, ticks: Iterable[TickData]) -> int:
        """See :meth:`DataRouter.save_ticks` (the iterable is consumed in this thread)."""
        return self._call(self.router.save_ticks, list(ticks))

    def save_candles_bulk(self, candles: Iterable[CandleData]) -> int:
        """See :meth:`DataRouter.save_candles_bulk`."""
        return self._call(self.router.save_candles_bulk, list(candles))

    def flush(self) -> None:
        """See :meth:`DataRouter.flush`."""
        self._call(self.router.flush)

    # ------------------------------------------------------------------ reads

    def get_latest_tick(self, symbol: str, *, source: str | None = None) -> TickData | None:
        """See :meth:`DataRouter.get_latest_tick`."""
        return self._call(self.router.get_latest_tick, symbol, source=source)

    def get_latest_candles(
        self, symbol: str, timeframe: str, limit: int = 100, *, source: str | None = None
    ) -> list[CandleData]:
        """See :meth:`DataRouter.get_latest_candles`."""
        return self._call(self.router.get_latest_candles, symbol, timeframe, limit, source=source)

    def get_latest_order_flow(
        self, symbol: str, *, source: str | None = None
    ) -> OrderFlowMetrics | None:
        """See :meth:`DataRouter.get_latest_order_flow`."""
        return self._call(self.router.get_latest_order_flow, symbol, source=source)

    def get_ticks(
        self,
        symbol: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        limit: int | None = None,
    ) -> list[TickData]:
        """See :meth:`DataRouter.get_ticks`."""
        return self._call(self.router.get_ticks, symbol, start, end, source=source, limit=limit)

    def get_candles(
        self,
        symbol: str,
        timeframe: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
    ) -> list[CandleData]:
        """See :meth:`DataRouter.get_candles`."""
        return self._call(self.router.get_candles, symbol, timeframe, start, end, source=source)

    def iter_ticks(
        self,
        symbol: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        batch_size: int = 10_000,
    ) -> Generator[TickData, None, None]:
        """Stream ticks in ``[start, end)`` oldest first (see :meth:`DataRouter.iter_ticks`)."""
        agen = self.router.iter_ticks(symbol, start, end, source=source, batch_size=batch_size)
        return self._stream(agen, _prefetch(batch_size))

    def iter_candles(
        self,
        symbol: str,
        timeframe: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        batch_size: int = 10_000,
    ) -> Generator[CandleData, None, None]:
        """Stream candles in ``[start, end)`` (see :func:`data_manager.interop.iter_candles`)."""
        from data_manager.interop import iter_candles

        agen = iter_candles(
            self.router, symbol, timeframe, start, end, source=source, batch_size=batch_size
        )
        return self._stream(agen, _prefetch(batch_size))

    def get_ticks_df(
        self,
        symbol: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        backend: DataFrameBackend = "pandas",
    ) -> Any:
        """Ticks as a DataFrame or Arrow table (see :func:`data_manager.interop.get_ticks_df`)."""
        from data_manager.interop import get_ticks_df

        return self._call(
            get_ticks_df, self.router, symbol, start, end, source=source, backend=backend
        )

    def get_candles_df(
        self,
        symbol: str,
        timeframe: str,
        start: int | datetime,
        end: int | datetime,
        *,
        source: str | None = None,
        backend: DataFrameBackend = "pandas",
    ) -> Any:
        """Candles as a DataFrame or Arrow table (see
        :func:`data_manager.interop.get_candles_df`)."""
        from data_manager.interop import get_candles_df

        return self._call(
            get_candles_df,
            self.router,
            symbol,
            timeframe,
            start,
            end,
            source=source,
            backend=backend,
        )

    def check_staleness(
        self, symbol: str, *, timeframe: str = "1m", source: str | None = None
    ) -> StalenessReport:
        """See :meth:`DataRouter.check_staleness`."""
        return self._call(self.router.check_staleness, symbol, timeframe=timeframe, source=source)

    def warm_start(self, symbols: list[str], timeframes: list[str], limit: int = 100) -> int:
        """See :meth:`DataRouter.warm_start`."""
        return self._call(self.router.warm_start, symbols, timeframes, limit)

    def health_check(self) -> HealthCheckResponse:
        """See :meth:`DataRouter.health_check`."""
        return self._call(self.router.health_check)

    # ------------------------------------------------------------------ lifecycle of data

    def delete_range(
        self,
        symbol: str,
        start: int | datetime,
        end: int | datetime,
        kind: DataKind,
        *,
        timeframe: str | None = None,
    ) -> int:
        """Delete a symbol's rows in ``[start, end)`` (see
        :func:`data_manager.lifecycle.delete_range`)."""
        from data_manager.lifecycle import delete_range

        return self._call(delete_range, self.router, symbol, start, end, kind, timeframe=timeframe)

    def apply_retention(
        self,
        *,
        policy: RetentionSettings | None = None,
        now_ms: int | None = None,
        dry_run: bool = False,
    ) -> RetentionReport:
        """Expire old rows (see :func:`data_manager.lifecycle.apply_retention`)."""
        from data_manager.lifecycle import apply_retention

        return self._call(
            apply_retention, self.router, policy=policy, now_ms=now_ms, dry_run=dry_run
        )


#: ``from data_manager.sync import DataRouter`` reads like the async API.
DataRouter = SyncDataRouter
