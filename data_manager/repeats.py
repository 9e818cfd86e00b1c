"""Telling a tick saved again from a new one, for the data derived from ticks.

Storage keeps a tick once however often it is saved (its key is the symbol, source, timestamp
and content digest), so a feed that delivers at least once — resending its last ticks after a
reconnect — changes no row. The candles, order flow and processors a router derives must count
such a repeat once too, or they drift from what ``rebuild_candles`` computes from the stored
ticks. :class:`RepeatFilter` remembers the last ticks of every series to recognise one.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from data_manager.models import TickData
from data_manager.storage.base import tick_content_key

#: Ticks remembered per (symbol, source): a resend of more than the last this many is
#: counted again (documented in the README's limitations).
DEFAULT_DEPTH: Final = 32


class _Recent:
    __slots__ = ("newest", "ticks")

    def __init__(self, depth: int) -> None:
        self.newest = -1  # the newest timestamp among the ticks remembered so far
        self.ticks: deque[TickData] = deque(maxlen=depth)


class RepeatFilter:
    """Remembers the last ``depth`` ticks of every (symbol, source) series.

    A tick is a repeat when storage would not store it again: a remembered tick of its series
    has the same timestamp and content (:func:`~data_manager.storage.base.tick_content_key`:
    prices, sizes, ``seq``, aggressor; not ``received_at``). A tick newer than every
    remembered one of its series costs one comparison; an older or equal one is compared with
    the remembered ticks of the same timestamp.

    Args:
        depth: Ticks remembered per series.
    """

    __slots__ = ("_depth", "_series")

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        self._depth = depth
        self._series: dict[tuple[str, str], _Recent] = {}

    def is_repeat(self, tick: TickData, series: tuple[str, str]) -> bool:
        """Whether ``tick`` (of ``series``, its ``(symbol, source)``) repeats a remembered
        tick; a new one is remembered."""
        recent = self._series.get(series)
        ts = tick.timestamp
        if recent is None:
            recent = self._series[series] = _Recent(self._depth)
        if ts > recent.newest:
            recent.newest = ts
        elif _remembered(recent.ticks, tick, ts):
            return True
        recent.ticks.append(tick)
        return False


def _remembered(ticks: deque[TickData], tick: TickData, ts: int) -> bool:
    content: int | None = None
    for old in ticks:
        if old.timestamp == ts:
            if content is None:
                content = tick_content_key(tick)
            if tick_content_key(old) == content:
                return True
    return False
