"""Publish each trade, ticker and orderbook once across WebSocket and REST fallback.

When the broker switches a stream WebSocket -> REST -> WebSocket, the sources overlap:
``/v1/trades/ticks`` returns recent trades the WebSocket already delivered, and the
WebSocket's snapshot on (re)subscribe repeats the latest trade. :class:`TradeDeduper`
remembers recent ``sequential_id``\\ s per market so every trade goes out once.
:func:`ticker_fingerprint` and :func:`orderbook_fingerprint` let the router skip a
REST poll that returns what the topic already holds. Both are pure and bounded: old ids and
least-recently used keys are dropped, and forgetting only ever risks a duplicate, never
a lost message.

Memory (tracemalloc, CPython 3.11, 64-bit): 110 bytes per remembered trade id, so the
default 2,000 ids cost ~220 KB per market with a full window; trades of ~250 markets
with full windows hold ~55 MB, hence the caps on both ids per market and markets.

Feed WebSocket trades through the same deduper as REST ones, so the first poll after a
switch does not repeat what the WebSocket published last.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable

from schemas.upbit import Orderbook, Ticker, Trade

__all__ = [
    "DEFAULT_MAX_CODES",
    "DEFAULT_MAX_IDS_PER_CODE",
    "TradeDeduper",
    "orderbook_fingerprint",
    "ticker_fingerprint",
]

DEFAULT_MAX_IDS_PER_CODE = 2_000
"""Ids remembered per market: REST returns at most 500 trades per call (we ask far
fewer), and the WebSocket snapshot repeats one, so 2,000 covers any overlap with room."""
DEFAULT_MAX_CODES = 1_024
"""Markets remembered at once (Upbit lists a few hundred); the least recently used
market is forgotten first."""


class _Window:
    """The last ``maxlen`` ids of one market: a deque for age, a set for lookup."""

    __slots__ = ("ids", "order")

    def __init__(self) -> None:
        self.order: deque[int] = deque()
        self.ids: set[int] = set()


class TradeDeduper:
    """Remembers recent trade ``sequential_id``\\ s per market to drop repeats.

    ``sequential_id`` is unique but not guaranteed ordered (docs/PROTOCOL.md §3.2), so this
    never compares ids: it keeps the last ``max_ids_per_code`` ids *seen* (arrival
    order) in a set. Record every trade that is published, from either source.
    """

    def __init__(
        self,
        *,
        max_ids_per_code: int = DEFAULT_MAX_IDS_PER_CODE,
        max_codes: int = DEFAULT_MAX_CODES,
    ) -> None:
        if max_ids_per_code < 1 or max_codes < 1:
            raise ValueError(
                f"max_ids_per_code and max_codes must be >= 1, "
                f"got {max_ids_per_code!r} and {max_codes!r}"
            )
        self._max_ids = max_ids_per_code
        self._max_codes = max_codes
        self._codes: OrderedDict[str, _Window] = OrderedDict()

    def seen(self, code: str, sequential_id: int) -> bool:
        """True if this trade was seen before (a duplicate); else record it, False."""
        window = self._codes.get(code)
        if window is None:
            if len(self._codes) >= self._max_codes:
                self._codes.popitem(last=False)
            window = self._codes[code] = _Window()
        else:
            self._codes.move_to_end(code)
            if sequential_id in window.ids:
                return True
        window.ids.add(sequential_id)
        window.order.append(sequential_id)
        if len(window.order) > self._max_ids:
            window.ids.discard(window.order.popleft())
        return False

    def fresh(self, trades: Iterable[Trade]) -> list[Trade]:
        """The trades of ``trades`` not seen before, in the given order; records them.

        REST returns trades newest first: reverse them before publishing, not here.
        """
        return [t for t in trades if not self.seen(t.code, t.sequential_id)]

    def forget(self, code: str) -> None:
        """Drop everything remembered for ``code`` (its trade stream was released)."""
        self._codes.pop(code, None)

    def remembered(self, code: str) -> int:
        """How many ids are remembered for ``code`` (for tests and health)."""
        window = self._codes.get(code)
        return 0 if window is None else len(window.order)

    @property
    def code_count(self) -> int:
        """Markets with remembered ids."""
        return len(self._codes)


def ticker_fingerprint(t: Ticker) -> Hashable:
    """What makes a ticker new: its last trade (time, price) and the day's volume so far."""
    return (t.trade_timestamp, t.trade_price, t.acc_trade_volume)


def orderbook_fingerprint(ob: Orderbook) -> Hashable:
    """What makes an orderbook new: its time, totals and every unit (units are frozen)."""
    return (ob.timestamp, ob.total_ask_size, ob.total_bid_size, tuple(ob.orderbook_units))
