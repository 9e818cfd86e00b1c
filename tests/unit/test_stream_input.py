"""What the backup stream does with items it cannot publish: never a dead or wedged task.

The server side is a stand-in (``_send`` keeps the messages, or fails while ``down``); the
spool is a real journal in a temporary folder.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

import orjson
import pytest

from data_manager.breaker import CircuitBreaker
from data_manager.errors import BackupStreamError, ValidationError
from data_manager.models import TickData
from data_manager.stream import DEFAULT_MESSAGE_BYTES, _BackupStreamBase, decode_batch_message

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from data_manager.journal import IngestItem
    from data_manager.stream import _Message

T0: Final = 1_727_996_400_000
DEADLINE: Final = 10.0


def ticks(start: int, count: int) -> list[TickData]:
    return [
        TickData(symbol="EUR/USD", timestamp=T0 + seq, bid=1.1, ask=1.1002, source="t", seq=seq)
        for seq in range(start, start + count)
    ]


def unencodable(seq: int) -> TickData:
    """A tick of the right class holding a value that is not JSON (built without validation:
    ``model_construct``, since ``model_copy(update=...)`` validates)."""
    tick = ticks(seq, 1)[0]
    return TickData.model_construct(
        tick.model_fields_set, **{**tick.__dict__, "use_case": object()}
    )


class _Stream(_BackupStreamBase):
    backend = "fake"

    def __init__(self, spool_dir: Path | None = None) -> None:
        super().__init__(
            "fake",
            spool_dir=spool_dir,
            instance_id=None,
            max_pending_items=100_000,
            coalesce_items=10_000,
            max_message_bytes=DEFAULT_MESSAGE_BYTES,
            drain_records=5_000,
            retry_interval=0.001,
            breaker=CircuitBreaker("fake", failure_threshold=1, reset_timeout=0.01),
            clock=None,
        )
        self.down = False
        self.sent: list[_Message] = []

    async def _connect(self) -> None:
        if self.down:
            msg = "the stand-in server is down"
            raise BackupStreamError(msg)

    async def _send(self, message: _Message) -> bool:
        self.sent.append(message)
        return True

    async def _disconnect(self) -> None:
        pass

    def published(self) -> list[IngestItem]:
        return [item for m in self.sent for item in decode_batch_message(m.payload).items]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll with a deadline (the spooler writes through a worker thread)."""
    stop = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > stop:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_publish_batch_refuses_a_non_model_item_up_front() -> None:
    stream = _Stream()
    await stream.start()
    junk: list[Any] = [*ticks(0, 2), {"symbol": "EUR/USD"}]
    with pytest.raises(ValidationError, match="dict"):
        stream.publish_batch(junk)
    stats = stream.stats()
    assert stats.accepted_items == stats.pending_items == 0  # nothing of that batch queued
    stream.publish_batch(ticks(2, 3))
    await stream.flush(timeout=DEADLINE)
    await stream.aclose()
    assert stream.published() == ticks(2, 3)


async def test_a_non_model_item_in_backlog_mode_cannot_stop_the_spooler(tmp_path: Path) -> None:
    stream = _Stream(tmp_path)
    stream.down = True
    await stream.start()
    stream.publish_batch(ticks(0, 5))
    await until(lambda: stream.stats().spool_records == 5, "the first batch to be spooled")
    junk: list[Any] = [*ticks(5, 2), "not a tick"]
    with pytest.raises(ValidationError):
        stream.publish_batch(junk)  # in backlog mode this went straight to the spooler
    stream.publish_batch(ticks(7, 3))
    await until(lambda: stream.stats().spool_records == 8, "the next batch to be spooled")
    stream.down = False
    await stream.flush(timeout=DEADLINE)
    await stream.aclose()
    assert stream.published() == [*ticks(0, 5), *ticks(7, 3)]


async def test_an_unspoolable_item_is_dropped_and_the_spooler_goes_on(tmp_path: Path) -> None:
    stream = _Stream(tmp_path)
    stream.down = True
    await stream.start()
    stream.publish_batch(ticks(0, 5))
    await until(lambda: stream.stats().spool_records == 5, "the first batch to be spooled")
    stream.publish_batch([*ticks(5, 2), unencodable(7), *ticks(8, 2)])
    stream.publish_batch(ticks(10, 5))
    await until(lambda: stream.stats().spool_records == 14, "the other items to be spooled")
    stream.down = False
    await stream.flush(timeout=DEADLINE)
    stats = stream.stats()
    await stream.aclose()
    assert stats.dropped_items == 1
    assert stream.published() == [*ticks(0, 7), *ticks(8, 7)]


async def test_an_unencodable_item_is_dropped_and_the_rest_published() -> None:
    stream = _Stream()
    await stream.start()
    stream.publish_batch([*ticks(0, 3), unencodable(3), *ticks(4, 3)])
    stream.publish_batch(ticks(7, 2))
    await stream.flush(timeout=DEADLINE)  # not retried for ever
    stats = stream.stats()
    await stream.aclose()
    assert stats.dropped_items == 1
    assert stats.published_items == 8
    assert stream.published() == [*ticks(0, 3), *ticks(4, 5)]


@pytest.mark.parametrize("kind", [["tick"], {"tick": 1}, None, 7, True, "ticks"])
def test_a_message_whose_kind_is_not_a_known_name_is_a_validation_error(kind: object) -> None:
    # replay_from_stream counts a ValidationError as an invalid message and goes on; any
    # other error (a list or an object is not hashable) would stop the whole replay.
    payload = orjson.dumps(
        {"v": 1, "type": "batch", "kind": kind, "batch_id": "b", "origin": "o", "items": []}
    )
    with pytest.raises(ValidationError, match="needs a known 'kind'"):
        decode_batch_message(payload)


def test_a_huge_unknown_kind_is_shown_briefly() -> None:
    payload = orjson.dumps(
        {"v": 1, "type": "batch", "kind": ["x"] * 100_000, "batch_id": "b", "origin": "o"}
    )
    with pytest.raises(ValidationError) as caught:
        decode_batch_message(payload)
    assert len(str(caught.value)) < 200  # logged once per skipped message
