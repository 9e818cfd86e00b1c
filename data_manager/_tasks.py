"""Small asyncio helpers shared by the write path and the importers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["finish_despite_cancel"]

_T = TypeVar("_T")


async def finish_despite_cancel(work: Awaitable[_T]) -> _T:
    """Await ``work`` to its end even if the calling task is cancelled meanwhile.

    For clean-up that must not be cut short (giving back a lock, closing a file under a
    worker thread): :func:`asyncio.shield` protects ``work`` from one cancellation only,
    and a second one (a caller's timeout, then its own ``cancel()``) would leave the
    clean-up unfinished behind it. Every cancellation that arrives meanwhile is held back
    until ``work`` is done, then the last one is raised.

    Returns:
        What ``work`` returned, if the caller was not cancelled.

    Raises:
        asyncio.CancelledError: The caller was cancelled while waiting (``work`` finished
            first; an exception of its own is then dropped, as the caller is gone).
        Exception: What ``work`` raised, if the caller was not cancelled.
    """
    inner = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not inner.done():
        try:
            await asyncio.wait((inner,))
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        if not inner.cancelled():
            inner.exception()  # retrieved: no "never retrieved" warning for a caller gone
        raise cancelled
    return inner.result()
