"""Fixtures shared by the unit tests: event loops running in threads of their own."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator

WAIT: Final = 30.0  # a deadline for threads that must not hang the suite, never a measurement


class LoopThread:
    """An event loop running in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture
def loops() -> Iterator[tuple[LoopThread, LoopThread]]:
    """Two event loops, each in its own thread; stopped and closed afterwards."""
    pair = (LoopThread(), LoopThread())
    yield pair
    for lt in pair:
        lt.stop()
