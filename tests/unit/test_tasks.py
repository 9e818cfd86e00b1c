"""finish_despite_cancel: clean-up that no number of cancellations cuts short."""

from __future__ import annotations

import asyncio

import pytest

from data_manager._tasks import finish_despite_cancel


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.mark.parametrize("cancels", [1, 2, 5])
async def test_the_work_finishes_however_often_the_caller_is_cancelled(cancels: int) -> None:
    gate = asyncio.Event()
    finished: list[str] = []

    async def clean_up() -> str:
        await gate.wait()
        finished.append("closed")
        return "closed"

    caller = asyncio.create_task(finish_despite_cancel(clean_up()))
    await _settle()
    for _ in range(cancels):
        caller.cancel()
        await _settle()
        assert not caller.done()  # held back while the clean-up runs
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished == ["closed"]


async def test_without_a_cancellation_the_result_or_error_comes_through() -> None:
    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    async def broken() -> None:
        await asyncio.sleep(0)
        raise OSError("disk gone")

    assert await finish_despite_cancel(value()) == 7
    with pytest.raises(OSError, match="disk gone"):
        await finish_despite_cancel(broken())


async def test_a_cancelled_caller_gets_the_cancellation_not_the_works_error() -> None:
    gate = asyncio.Event()
    ran: list[str] = []

    async def broken() -> None:
        await gate.wait()
        ran.append("failed")
        raise OSError("disk gone")

    caller = asyncio.create_task(finish_despite_cancel(broken()))
    await _settle()
    caller.cancel()
    await _settle()
    gate.set()
    outcome = await asyncio.gather(caller, return_exceptions=True)
    assert type(outcome[0]) is asyncio.CancelledError
    assert ran == ["failed"]
