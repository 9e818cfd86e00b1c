"""Live subscriptions: bounded per-subscriber buffers fed by local saves and the cache bus.

A subscriber that falls behind loses its *oldest* buffered items (counted in ``dropped``):
memory stays bounded whatever the consumer does, and what it reads next is the freshest
data. Updates from other processes arrive through the L2 pub/sub bus, which coalesces per
key under bursts, so a remote subscriber may skip intermediate values of one symbol, never
the latest one.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from data_manager.models import CandleData, OrderFlowMetrics, TickData

__all__ = ["Subscription", "SubscriptionHub"]

T = TypeVar("T", TickData, CandleData, OrderFlowMetrics)


class Subscription(Generic[T]):
    """An async iterator of live updates; also an async context manager.

    ``async for tick in router.subscribe_ticks(["EUR/USD"]): ...`` — leaving the loop (or
    ``await sub.aclose()``) unsubscribes.

    ``async for`` iterates through an async generator (:meth:`__aiter__`) whose ``finally``
    unsubscribes, so ``break``, ``return``, an exception or a cancellation in the loop body
    releases the subscription: the generator is finalised as soon as the loop drops it (the
    event loop's async-generator hooks run its ``aclose``). A subscription is therefore good
    for one ``async for`` loop. Calling ``anext(sub)`` / ``sub.__anext__()`` directly
    reads the same buffer and never unsubscribes by itself; use ``aclose()`` or
    ``async with`` then.
    """

    __slots__ = (
        "__weakref__",
        "_buffer",
        "_closed",
        "_event",
        "_on_close",
        "dropped",
        "kind",
        "match",
    )

    def __init__(
        self,
        kind: type[T],
        match: Callable[[T], bool],
        *,
        buffer_size: int,
        on_close: Callable[[Subscription[T]], None],
    ) -> None:
        self.kind: type[T] = kind
        self.match: Callable[[T], bool] = match
        self._buffer: deque[T] = deque(maxlen=buffer_size)
        self._event = asyncio.Event()
        self._closed = False
        self._on_close: Callable[[Subscription[T]], None] = on_close
        #: Items discarded because the consumer fell ``buffer_size`` items behind.
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Items buffered and not yet read."""
        return len(self._buffer)

    def offer(self, item: T) -> None:
        """Buffer ``item`` (drop-oldest when full). Never blocks."""
        buffer = self._buffer
        if len(buffer) == buffer.maxlen:
            self.dropped += 1
        buffer.append(item)
        self._event.set()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[T, None]:
        # Not ``self``: a plain iterator is never told that its loop was left.
        try:
            while True:
                while not self._buffer:
                    if self._closed:
                        return
                    self._event.clear()
                    await self._event.wait()
                yield self._buffer.popleft()
        finally:
            self._close()

    async def __anext__(self) -> T:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        return self._buffer.popleft()

    async def __aenter__(self) -> Subscription[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unsubscribe; a pending ``async for`` ends after the buffered items."""
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._event.set()
            self._on_close(self)


class SubscriptionHub:
    """The router's set of subscriptions; ``dispatch`` costs one check when there are none.

    Subscriptions are held weakly: one its owner dropped without iterating or closing it
    (an ``async for`` never started) is forgotten once collected, instead of buffering and
    being offered every item for the router's lifetime.
    """

    __slots__ = ("_closed_dropped", "_subs")

    def __init__(self) -> None:
        self._subs: weakref.WeakSet[Subscription[Any]] = weakref.WeakSet()
        self._closed_dropped = 0  # items dropped by subscriptions closed since

    def __bool__(self) -> bool:
        return bool(self._subs)

    def __len__(self) -> int:
        return len(self._subs)

    def add(self, sub: Subscription[T]) -> Subscription[T]:
        """Register ``sub``."""
        self._subs.add(sub)
        return sub

    def remove(self, sub: Subscription[T]) -> None:
        """Forget ``sub`` (idempotent)."""
        if sub in self._subs:
            self._subs.discard(sub)
            self._closed_dropped += sub.dropped

    def dispatch(self, item: TickData | CandleData | OrderFlowMetrics) -> None:
        """Offer ``item`` to every matching subscription."""
        kind = type(item)
        for sub in self._subs:
            if sub.kind is kind and sub.match(item):
                sub.offer(item)

    def dropped(self) -> int:
        """Items dropped across all subscriptions, closed ones included (slow consumers)."""
        return self._closed_dropped + sum(sub.dropped for sub in self._subs)

    def close_all(self) -> None:
        """End every subscription (the router is closing)."""
        for sub in list(self._subs):
            sub._closed = True
            sub._event.set()
            self._closed_dropped += sub.dropped
        self._subs.clear()
