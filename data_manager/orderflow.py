"""Order-flow metrics computed incrementally from ticks: OFI, volume delta, imbalance, VWAP
and VPIN toxicity.

Everything is pure computation (no I/O, no wall clock); :class:`OrderFlowCalculator` keeps a
rolling window per symbol in event time with running sums, so each tick costs O(1)
amortised.

Formulas
    **Order-flow imbalance (OFI)** — Cont, Kukanov & Stoikov (2014), "The Price Impact of
    Order Book Events", *Journal of Financial Econometrics* 12(1), eq. (2), best-level
    definition. For consecutive top-of-book snapshots ``n-1, n`` with bid/ask prices ``P``
    and sizes ``q``::

        e_n = 1{P^b_n >= P^b_{n-1}} q^b_n - 1{P^b_n <= P^b_{n-1}} q^b_{n-1}
            - 1{P^a_n <= P^a_{n-1}} q^a_n + 1{P^a_n >= P^a_{n-1}} q^a_{n-1}

    and OFI over a window is ``Σ e_n``. Positive OFI is net buying pressure (bids growing or
    stepping up, asks shrinking or stepping down). Only ticks carrying both ``bid_size`` and
    ``ask_size`` are snapshots; a tick without sizes contributes nothing and does not break
    the chain (the next snapshot is compared with the last one that had sizes). Snapshots are
    chained per (symbol, tick source): books of different venues are never differenced.

    **Trades.** A tick is a trade when it carries a traded size (``last_size``, else
    ``volume``) greater than zero and either an ``aggressor`` or a ``last_price``. Its price
    is ``last_price``, else the mid. A plain quote carrying a ``volume`` is not a trade.

    **Volume delta** ``= V_buy - V_sell`` over the window, from trades with an aggressor
    (trades without one count for VWAP and ``num_trades`` only).
    **Imbalance** ``= (V_buy - V_sell) / (V_buy + V_sell)`` in [-1, 1], 0 without volume.
    **VWAP** ``= Σ p·q / Σ q`` over the window's trades, ``None`` without trades.

    **Toxicity (VPIN)** — Easley, López de Prado & O'Hara (2012), "Flow Toxicity and
    Liquidity in a High-Frequency World", *Review of Financial Studies* 25(5), eq. (5)::

        VPIN = Σ_{τ} |V^B_τ - V^S_τ| / (n · V)

    over the last ``n`` full volume buckets of size ``V`` (``n`` = ``vpin_buckets``, or fewer
    while fewer buckets have filled). The paper classifies volume in bulk from price changes
    because its data has no trade sides; here the aggressor side is given, so each trade's
    volume goes to its side directly. A trade larger than the current bucket's remaining
    capacity is split across as many buckets as it fills. VPIN is ``None`` until one bucket
    is full. It is a volume clock, so it ignores ``window_ms``.

Window
    ``[t - window_ms, t]`` where ``t`` is the latest event time seen for the symbol (both ends
    inclusive). A tick older than ``t`` but still inside the window is counted as if it
    arrived at ``t`` (the window stays sorted, eviction stays O(1)); a tick older than
    ``t - window_ms`` is ignored entirely and counted in ``stats.late_ignored``.
    Running sums are recomputed from the window every so often, so float drift from
    repeated subtraction stays bounded.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from data_manager.errors import ValidationError
from data_manager.models import OrderFlowMetrics, TickData, construct_unchecked

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["OrderFlowCalculator", "OrderFlowStats", "ofi_event", "vpin"]

# Relative tolerance for "this volume bucket is full": a bucket of 0.3 filled by three 0.1
# trades holds 0.30000000000000004, which must close it rather than spill 4e-17 over.
_BUCKET_TOLERANCE: Final = 1e-9
# Running sums are rebuilt from the window after this many evictions (or the window's
# length, whichever is larger): O(1) amortised, and drift cannot accumulate without bound.
_RESUM_EVERY: Final = 4096


def ofi_event(
    previous: tuple[float, float, float, float], current: tuple[float, float, float, float]
) -> float:
    """One OFI term ``e_n`` (Cont, Kukanov & Stoikov 2014, eq. 2).

    Args:
        previous: Snapshot ``n-1`` as ``(bid, bid_size, ask, ask_size)``.
        current: Snapshot ``n`` as ``(bid, bid_size, ask, ask_size)``.
    """
    prev_bid, prev_bid_size, prev_ask, prev_ask_size = previous
    bid, bid_size, ask, ask_size = current
    e = 0.0
    if bid >= prev_bid:
        e += bid_size
    if bid <= prev_bid:
        e -= prev_bid_size
    if ask <= prev_ask:
        e -= ask_size
    if ask >= prev_ask:
        e += prev_ask_size
    return e


def vpin(imbalances: Iterable[float], bucket_volume: float) -> float | None:
    """VPIN from full-bucket order imbalances ``|V_buy - V_sell|`` (Easley et al. 2012).

    Args:
        imbalances: ``|V_buy - V_sell|`` of each full bucket considered.
        bucket_volume: The bucket size ``V``.

    Returns:
        ``Σ imbalances / (n · V)`` clamped to [0, 1], or ``None`` when there is no bucket.
    """
    values = list(imbalances)
    if not values:
        return None
    return min(1.0, max(0.0, sum(values) / (len(values) * bucket_volume)))


@dataclass(slots=True)
class OrderFlowStats:
    """Counters of an :class:`OrderFlowCalculator`.

    Attributes:
        ticks: Ticks passed to ``update``.
        snapshots: Ticks that were book snapshots (carried both sizes).
        trades: Ticks that were trades.
        late_ignored: Ticks older than their symbol's window, ignored.
    """

    ticks: int = 0
    snapshots: int = 0
    trades: int = 0
    late_ignored: int = 0


# One window entry: (event time, e_n, buy volume, sell volume, traded volume, price·volume,
# is a trade). A tuple, not an object: cheaper to build and to unpack on eviction.
_Entry = tuple[int, float, float, float, float, float, int]


class _SymbolFlow:
    """Rolling window, running sums, VPIN buckets and last book per source, of one symbol."""

    __slots__ = (
        "books",
        "bucket_buy",
        "bucket_fill",
        "bucket_sell",
        "buy",
        "evictions",
        "full_buckets",
        "full_sum",
        "ofi",
        "pv",
        "sell",
        "trade_count",
        "traded",
        "watermark",
        "window",
    )

    def __init__(self, vpin_buckets: int) -> None:
        # Last snapshot per tick source: (bid, bid_size, ask, ask_size).
        self.books: dict[str, tuple[float, float, float, float]] = {}
        self.window: deque[_Entry] = deque()
        self.watermark = 0
        self.ofi = 0.0
        self.buy = 0.0
        self.sell = 0.0
        self.traded = 0.0
        self.pv = 0.0
        self.trade_count = 0
        self.evictions = 0
        # VPIN: the filling bucket, and |V_buy - V_sell| of the last full ones.
        self.bucket_buy = 0.0
        self.bucket_sell = 0.0
        self.bucket_fill = 0.0
        self.full_buckets: deque[float] = deque(maxlen=vpin_buckets)
        self.full_sum = 0.0

    def resum(self) -> None:
        """Rebuild the running sums from the window (bounds float drift)."""
        ofi = buy = sell = traded = pv = 0.0
        trades = 0
        for _, e, b, s, q, p, is_trade in self.window:
            ofi += e
            buy += b
            sell += s
            traded += q
            pv += p
            trades += is_trade
        self.ofi, self.buy, self.sell, self.traded, self.pv = ofi, buy, sell, traded, pv
        self.trade_count = trades
        self.evictions = 0


_OFM_FIELDS_SET: Final = set(OrderFlowMetrics.model_fields)


def _unchecked_metrics(values: dict[str, Any]) -> OrderFlowMetrics:
    """OrderFlowMetrics from values already clamped to their valid ranges (every field, in
    declaration order); see :func:`data_manager.models.construct_unchecked`."""
    return construct_unchecked(OrderFlowMetrics, values, _OFM_FIELDS_SET)


class OrderFlowCalculator:
    """Rolling order-flow metrics for any number of symbols (state keyed by symbol).

    Synchronous and not thread-safe: call it from one thread. See the module docstring for
    the formulas and their references.

    Args:
        window_ms: Length of the rolling window, ms.
        vpin_bucket_volume: Volume ``V`` of one VPIN bucket (same unit as trade sizes); a
            common choice is a fiftieth of the average daily volume.
        vpin_buckets: Number ``n`` of full buckets VPIN averages over.
        source: ``source`` of the metrics produced.

    Raises:
        ValidationError: A parameter is out of range.
    """

    __slots__ = ("_bucket_volume", "_flows", "_n_buckets", "_source", "_window_ms", "stats")

    def __init__(
        self,
        *,
        window_ms: int = 60_000,
        vpin_bucket_volume: float,
        vpin_buckets: int = 50,
        source: str = "sdk",
    ) -> None:
        if not isinstance(window_ms, int) or isinstance(window_ms, bool) or window_ms <= 0:
            msg = f"window_ms must be a positive integer, got {window_ms!r}"
            raise ValidationError(msg)
        if not vpin_bucket_volume > 0 or vpin_bucket_volume == float("inf"):
            msg = f"vpin_bucket_volume must be a positive finite number, got {vpin_bucket_volume!r}"
            raise ValidationError(msg)
        if not isinstance(vpin_buckets, int) or vpin_buckets < 1:
            msg = f"vpin_buckets must be an integer >= 1, got {vpin_buckets!r}"
            raise ValidationError(msg)
        if not isinstance(source, str) or not source.strip() or not source.isprintable():
            msg = f"source must be non-empty printable text, got {source!r}"
            raise ValidationError(msg)
        self._window_ms = window_ms
        self._bucket_volume = float(vpin_bucket_volume)
        self._n_buckets = vpin_buckets
        self._source = source.strip()
        self._flows: dict[str, _SymbolFlow] = {}
        self.stats = OrderFlowStats()

    @property
    def window_ms(self) -> int:
        """Length of the rolling window, ms."""
        return self._window_ms

    def update(self, tick: TickData) -> OrderFlowMetrics | None:
        """Feed one tick; return the symbol's metrics as of its latest event time.

        Returns:
            The metrics, or ``None`` when the tick contributes nothing: neither a book
            snapshot following an earlier one of the same source, nor a trade (or it is
            older than the window).
        """
        if self.feed(tick):
            return self._metrics(tick.symbol, self._flows[tick.symbol])
        return None

    def feed(self, tick: TickData) -> bool:
        """Feed one tick without building the metrics (:meth:`latest` builds them later).

        Returns:
            Whether the tick changed the symbol's metrics (what :meth:`update` returns
            metrics for).
        """
        stats = self.stats
        stats.ticks += 1
        symbol = tick.symbol
        flow = self._flows.get(symbol)
        if flow is None:
            flow = self._flows[symbol] = _SymbolFlow(self._n_buckets)
        ts = tick.timestamp
        watermark = flow.watermark
        if ts < watermark:
            if ts < watermark - self._window_ms:
                stats.late_ignored += 1
                return False
            ts = watermark  # counted as arriving at the latest event time seen

        # Order-flow imbalance e_n (Cont, Kukanov & Stoikov 2014).
        e = 0.0
        is_event = False
        bid_size = tick.bid_size
        ask_size = tick.ask_size
        if bid_size is not None and ask_size is not None:
            stats.snapshots += 1
            books = flow.books
            book = (tick.bid, bid_size, tick.ask, ask_size)
            previous = books.get(tick.source)
            books[tick.source] = book
            if previous is not None:
                is_event = True
                e = ofi_event(previous, book)

        # Trades.
        size = tick.last_size
        if size is None:
            size = tick.volume
        aggressor = tick.aggressor
        last_price = tick.last_price
        buy = sell = traded = pv = 0.0
        is_trade = 0
        if size is not None and size > 0 and (aggressor is not None or last_price is not None):
            stats.trades += 1
            is_trade = 1
            traded = size
            pv = size * (last_price if last_price is not None else (tick.bid + tick.ask) / 2)
            if aggressor == "buy":
                buy = size
            elif aggressor == "sell":
                sell = size
            if aggressor is not None:
                self._fill_vpin(flow, buy, sell)

        if not is_event and not is_trade:
            return False

        flow.watermark = ts
        window = flow.window
        window.append((ts, e, buy, sell, traded, pv, is_trade))
        flow.ofi += e
        flow.buy += buy
        flow.sell += sell
        flow.traded += traded
        flow.pv += pv
        flow.trade_count += is_trade
        horizon = ts - self._window_ms
        if window[0][0] < horizon:
            self._evict(flow, horizon)
        return True

    def _evict(self, flow: _SymbolFlow, horizon: int) -> None:
        window = flow.window
        popleft = window.popleft
        ofi = flow.ofi
        buy = flow.buy
        sell = flow.sell
        traded = flow.traded
        pv = flow.pv
        trades = flow.trade_count
        evicted = 0
        while window and window[0][0] < horizon:
            _, e, b, s, q, p, is_trade = popleft()
            ofi -= e
            buy -= b
            sell -= s
            traded -= q
            pv -= p
            trades -= is_trade
            evicted += 1
        flow.ofi, flow.buy, flow.sell, flow.traded, flow.pv = ofi, buy, sell, traded, pv
        flow.trade_count = trades
        flow.evictions += evicted
        if flow.evictions >= max(_RESUM_EVERY, len(window)):
            flow.resum()

    def _fill_vpin(self, flow: _SymbolFlow, buy: float, sell: float) -> None:
        """Pour one classified trade into equal-volume buckets, splitting it as needed.

        The buckets a large trade fills whole are counted, not poured one by one: each holds
        one side only (imbalance = the bucket volume), and only the last ``vpin_buckets``
        are kept, so a trade of any size costs the same (a loop per bucket took seconds for
        a trade of 10^7 bucket volumes, and never ended once the bucket volume was below
        the trade size's float resolution).
        """
        capacity = self._bucket_volume
        tolerance = capacity * _BUCKET_TOLERANCE
        remaining = buy + sell  # one of them is 0
        is_buy = buy > 0
        room = capacity - flow.bucket_fill
        if remaining > room + tolerance:  # completes the bucket in progress, and more
            self._add_to_bucket(flow, room, is_buy)
            remaining -= room
            if remaining <= tolerance:
                return
            # Whole buckets first, leaving the last part (more than the tolerance, up to one
            # bucket and the tolerance) to pour as usual. fmod is exact, whatever the sizes.
            rest = math.fmod(remaining, capacity)
            if rest <= tolerance:
                rest += capacity
            whole = round((remaining - rest) / capacity)
            self._push_buckets(flow, capacity, whole)
            remaining = rest
        self._add_to_bucket(flow, remaining, is_buy)

    def _add_to_bucket(self, flow: _SymbolFlow, volume: float, is_buy: bool) -> None:
        """Add one side's ``volume`` to the bucket in progress; push it once full."""
        if is_buy:
            flow.bucket_buy += volume
        else:
            flow.bucket_sell += volume
        flow.bucket_fill += volume
        capacity = self._bucket_volume
        if flow.bucket_fill >= capacity - capacity * _BUCKET_TOLERANCE:
            self._push_buckets(flow, abs(flow.bucket_buy - flow.bucket_sell), 1)
            flow.bucket_buy = flow.bucket_sell = flow.bucket_fill = 0.0

    @staticmethod
    def _push_buckets(flow: _SymbolFlow, imbalance: float, count: int) -> None:
        """Append ``count`` full buckets of ``imbalance`` (only the newest are kept)."""
        full = flow.full_buckets
        assert full.maxlen is not None
        if count >= full.maxlen:
            full.extend(itertools.repeat(imbalance, full.maxlen))
            flow.full_sum = imbalance * full.maxlen
            return
        for _ in range(count):
            if len(full) == full.maxlen:
                flow.full_sum -= full[0]  # about to be pushed out
            full.append(imbalance)
            flow.full_sum += imbalance
        if len(full) == full.maxlen and flow.full_sum < 0:
            flow.full_sum = sum(full)  # drift guard; sums of |x| are never < 0

    def _metrics(self, symbol: str, flow: _SymbolFlow) -> OrderFlowMetrics:
        if flow.trade_count <= 0:
            # No trade left in the window: make the trade sums exact zeros again.
            flow.buy = flow.sell = flow.traded = flow.pv = 0.0
            flow.trade_count = 0
        buy = flow.buy if flow.buy > 0 else 0.0
        sell = flow.sell if flow.sell > 0 else 0.0
        total = buy + sell
        imbalance = (buy - sell) / total if total > 0 else 0.0
        if imbalance > 1.0:
            imbalance = 1.0
        elif imbalance < -1.0:
            imbalance = -1.0
        traded = flow.traded
        vwap = flow.pv / traded if traded > 0 and flow.pv > 0 else None
        full = flow.full_buckets
        toxicity: float | None = None
        if full:
            toxicity = flow.full_sum / (len(full) * self._bucket_volume)
            toxicity = 1.0 if toxicity > 1.0 else (0.0 if toxicity < 0.0 else toxicity)
        return _unchecked_metrics(
            {
                "symbol": symbol,
                "timestamp": flow.watermark,
                "window_ms": self._window_ms,
                "ofi": flow.ofi,
                "volume_delta": buy - sell,
                "buy_volume": buy,
                "sell_volume": sell,
                "imbalance": imbalance,
                "vwap": vwap,
                "toxicity": toxicity,
                "num_trades": flow.trade_count,
                "source": self._source,
            }
        )

    def latest(self, symbol: str) -> OrderFlowMetrics | None:
        """Return the symbol's current metrics (window as of its last contributing tick).

        Returns:
            ``None`` when no tick of the symbol has contributed yet.
        """
        flow = self._flows.get(symbol)
        if flow is None or not flow.watermark:
            return None
        return self._metrics(symbol, flow)

    def reset(self, symbol: str | None = None) -> None:
        """Forget one symbol's state, or every symbol's."""
        if symbol is None:
            self._flows.clear()
        else:
            self._flows.pop(symbol, None)
