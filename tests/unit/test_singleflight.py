"""Unit tests of SingleFlight: concurrent loads of one key collapse into one."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from data_manager.cache.singleflight import SingleFlight

if TYPE_CHECKING:
    from collections.abc import Callable

N = 50


async def _until(predicate: Callable[[], bool], *, spins: int = 1000) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded, no wall-clock wait)."""
    for _ in range(spins):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


class Loader:
    """A loader that blocks until released and counts its invocations."""

    def __init__(self, result: object = None, error: BaseException | None = None) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = False
        self.result = result if result is not None else object()
        self.error = error

    async def __call__(self) -> object:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        self.finished = True
        if self.error is not None:
            raise self.error
        return self.result


async def test_concurrent_callers_share_one_load() -> None:
    sf = SingleFlight()
    loader = Loader()
    tasks = [asyncio.create_task(sf.do("k", loader)) for _ in range(N)]
    await loader.started.wait()
    await _until(lambda: sf.calls == N)
    assert sf.inflight == 1
    loader.release.set()
    results = await asyncio.gather(*tasks)
    assert loader.calls == 1
    assert all(r is loader.result for r in results)
    assert (sf.calls, sf.loads, sf.shared) == (N, 1, N - 1)
    assert sf.inflight == 0


async def test_exception_reaches_every_caller_and_is_not_cached() -> None:
    sf = SingleFlight()
    boom = RuntimeError("backend down")
    loader = Loader(error=boom)
    tasks = [asyncio.create_task(sf.do("k", loader)) for _ in range(N)]
    await loader.started.wait()
    loader.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is boom for r in results)
    assert loader.calls == 1
    assert sf.inflight == 0
    # The next call loads again.
    ok = Loader()
    ok.release.set()
    assert await sf.do("k", ok) is ok.result
    assert sf.loads == 2


async def test_cancelling_a_waiting_caller_does_not_cancel_the_load() -> None:
    sf = SingleFlight()
    loader = Loader()
    leader = asyncio.create_task(sf.do("k", loader))
    await loader.started.wait()
    waiters = [asyncio.create_task(sf.do("k", loader)) for _ in range(3)]
    await _until(lambda: sf.calls == 4)
    waiters[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]
    assert sf.inflight == 1  # the load is still running for the others
    loader.release.set()
    results = await asyncio.gather(leader, *waiters[1:])
    assert all(r is loader.result for r in results)
    assert loader.calls == 1
    assert loader.finished


async def test_cancelling_the_leading_caller_hands_the_load_to_a_waiter() -> None:
    sf = SingleFlight()
    loader = Loader()
    leader = asyncio.create_task(sf.do("k", loader))
    await loader.started.wait()
    waiters = [asyncio.create_task(sf.do("k", loader)) for _ in range(3)]
    await _until(lambda: sf.shared == 3)
    loader.started.clear()
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    await loader.started.wait()  # one waiter started a new load; the others joined it
    assert (loader.calls, sf.loads, sf.inflight) == (2, 2, 1)
    loader.release.set()
    results = await asyncio.gather(*waiters)
    assert all(r is loader.result for r in results)
    assert sf.inflight == 0


async def test_cancelled_leader_without_waiters_frees_the_key() -> None:
    sf = SingleFlight()
    loader = Loader()
    leader = asyncio.create_task(sf.do("k", loader))
    await loader.started.wait()
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert sf.inflight == 0
    assert not loader.finished
    ok = Loader()
    ok.release.set()
    assert await sf.do("k", ok) is ok.result


async def test_loader_cancelled_from_inside_reaches_callers_and_frees_key() -> None:
    sf = SingleFlight()
    loader = Loader(error=asyncio.CancelledError())
    tasks = [asyncio.create_task(sf.do("k", loader)) for _ in range(3)]
    await loader.started.wait()
    loader.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert sf.inflight == 0


async def test_distinct_keys_load_independently() -> None:
    sf = SingleFlight()
    a, b = Loader(result="a"), Loader(result="b")
    ta = asyncio.create_task(sf.do(("tick", "EUR/USD", None), a))
    tb = asyncio.create_task(sf.do(("tick", "GBP/USD", None), b))
    await a.started.wait()
    await b.started.wait()
    assert sf.inflight == 2
    a.release.set()
    b.release.set()
    assert await ta == "a"
    assert await tb == "b"
    assert (sf.loads, sf.shared) == (2, 0)


async def test_sequential_calls_each_load() -> None:
    sf = SingleFlight()
    seen: list[int] = []

    async def load() -> int:
        seen.append(len(seen))
        return len(seen)

    assert await sf.do("k", load) == 1
    assert await sf.do("k", load) == 2
    assert (sf.calls, sf.loads, sf.shared) == (2, 2, 0)
