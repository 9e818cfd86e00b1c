"""Telling a tick saved again from a new one, for the data derived from ticks.

Storage keeps a tick once however often it is saved (its key is the symbol, source, timestamp
and content digest), so a feed that delivers at least once — resending its last ticks after a
reconnect — changes no row. The candles, order flow and processors a router derives must count
such a repeat once too, or they drift from what ``rebuild_candles`` computes from the stored
ticks. :class:`RepeatFilter` remembers the last ticks of every series to recognise one.
"""

from __future__ import annotations

import operator
from collections import deque
from typing import Any, Final

from data_manager.models import TickData
from data_manager.storage.base import TICK_CONTENT_FIELDS

#: Ticks remembered per (symbol, source): a resend of more than the last this many is
#: counted again (documented in the README's limitations).
DEFAULT_DEPTH: Final = 16
#: Most contents remembered for the newest millisecond of a series (a burst of ticks that
#: share one timestamp is recognised within this bound).
_MAX_AT_NEWEST: Final = 1024


_IDENTITY: Final = operator.itemgetter("timestamp", *TICK_CONTENT_FIELDS)


def tick_identity(tick: TickData) -> tuple[Any, ...]:
    """What storage tells ticks of one series apart by: the timestamp and the content that
    :func:`~data_manager.storage.base.tick_content_key` digests (not ``received_at``)."""
    identity: tuple[Any, ...] = _IDENTITY(tick.__dict__)
    return identity


class _Recent:
    __slots__ = ("at_newest", "newest", "ticks")

    def __init__(self, depth: int) -> None:
        self.newest = -1  # the newest timestamp seen
        self.ticks: deque[TickData] = deque(maxlen=depth)
        # Identities of the ticks at ``newest``, built once a second tick shares it.
        self.at_newest: set[tuple[Any, ...]] | None = None


class RepeatFilter:
    """Remembers the last ``depth`` ticks of every (symbol, source) series.

    A tick is a repeat when storage would not store it again: a remembered tick of its series
    has the same :func:`tick_identity`. A tick newer than every one seen in its series costs
    one comparison; one at the newest timestamp is looked up in that millisecond's set of
    identities; an older one is compared with the remembered ticks of its timestamp.

    Args:
        depth: Ticks remembered per series (besides the newest millisecond's identities).
    """

    __slots__ = ("_depth", "_series")

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        self._depth = depth
        self._series: dict[tuple[str, str], _Recent] = {}

    def is_repeat(self, tick: TickData, series: tuple[str, str]) -> bool:
        """Whether ``tick`` (of ``series``, its ``(symbol, source)``) repeats a remembered
        tick; a new one is remembered."""
        recent = self._series.get(series)
        if recent is None:
            recent = self._series[series] = _Recent(self._depth)
        ts = tick.timestamp
        if ts > recent.newest:
            recent.newest = ts
            recent.at_newest = None
            recent.ticks.append(tick)
            return False
        identity = tick_identity(tick)
        if ts == recent.newest:
            seen = recent.at_newest
            if seen is None:
                seen = recent.at_newest = {
                    tick_identity(old) for old in recent.ticks if old.timestamp == ts
                }
            if identity in seen:
                return True
            if len(seen) < _MAX_AT_NEWEST:
                seen.add(identity)
        elif any(old.timestamp == ts and tick_identity(old) == identity for old in recent.ticks):
            return True
        recent.ticks.append(tick)
        return False
