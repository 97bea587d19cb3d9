"""Which quotation REST calls the public fallback makes each cycle, within the limits.

While a public stream is served over REST, something must decide what to ask Upbit
and how often without ever outrunning the per-IP quotation groups (docs/PROTOCOL.md §6.1:
``ticker``, ``orderbook`` and ``trade`` allow 10 calls/s each; we plan for
:data:`broker.ratelimit.DEFAULT_REST_MARGIN` of that, 8/s). :class:`PollPlanner`
batches codes into as few calls as Upbit allows and, when one group has more calls
than its budget, rotates through them over several cycles (least recently polled
first), so every cycle stays within budget and every stream gets its turn.

Pure: ``now`` is passed in, nothing is sent. The caller still paces each call with
:class:`broker.ratelimit.RestLimiter`, which also sees snapshot requests, 429s and bans.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from broker.ratelimit import DEFAULT_REST_MARGIN, REST_GROUP_LIMITS, Window, with_margin

__all__ = [
    "DEFAULT_TRADE_COUNT",
    "MAX_TRADE_COUNT",
    "ORDERBOOK_BATCH",
    "TICKER_BATCH",
    "OrderbookStream",
    "PollCall",
    "PollPlanner",
]

TICKER_BATCH: Final = 100
"""Codes per ``/v1/ticker`` call: very long ``markets=`` lists break HTTP clients
(docs/PROTOCOL.md §8.1; pyupbit chunks at 200), and 100 covers Upbit's KRW market in 3 calls."""
ORDERBOOK_BATCH: Final = 15
"""Codes per ``/v1/orderbook`` call. Upbit documents no cap, but a 30-level book is
~3 KB of JSON against ~0.7 KB for a ticker: 15 books (~45 KB) keep a response below a
full 100-ticker one, so decoding one response stays short on the event loop and a slow
or failed call delays at most 15 books."""
DEFAULT_TRADE_COUNT: Final = 30
"""Trades asked per ``/v1/trades/ticks`` call when every trade code is polled each cycle."""
MAX_TRADE_COUNT: Final = 500
"""Upbit's maximum ``count`` for ``/v1/trades/ticks``."""
_GROUPS: Final = ("ticker", "orderbook", "trade")

OrderbookStream = tuple[str, float, int]
"""``(code, level, depth)`` of an orderbook stream served over REST (normalized spec)."""


@dataclass(frozen=True, slots=True)
class PollCall:
    """One REST request to make: its rate-limit ``group``, ``path`` and query ``params``.

    ``codes`` are the markets the response covers (the same as in ``params``, parsed).
    """

    group: str
    path: str
    params: dict[str, str | int]
    codes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Key:
    """Identity of a planned call in its group's rotation (level/depth: orderbook only)."""

    codes: tuple[str, ...]
    level: float = 0.0
    depth: int = 0


def _chunks(codes: list[str], size: int) -> list[tuple[str, ...]]:
    return [tuple(codes[i : i + size]) for i in range(0, len(codes), size)]


def _level_text(level: float) -> str:
    """``10000.0`` -> ``"10000"``, ``1e-07`` -> ``"0.0000001"``: never exponent notation."""
    if level.is_integer():
        return str(int(level))
    return format(Decimal(repr(level)), "f")


class PollPlanner:
    """Plans the REST calls of each polling cycle for the streams served over REST.

    Tickers: one ``/v1/ticker`` call per :data:`TICKER_BATCH` codes. Orderbooks: one
    stream per ``(code, level)`` at the deepest depth wanted (fan out shallower depths
    with :func:`broker.subscriptions.fan_out_orderbook`, as for the WebSocket), batched
    per ``(level, depth)`` by :data:`ORDERBOOK_BATCH`. Trades: one ``/v1/trades/ticks``
    call per code. A group never gets more than its budget of calls per cycle (limit x
    margin - ``reserve``); extra calls wait for later cycles, and a trade call then asks
    for proportionally more trades (capped at 500) since its code waits longer.
    """

    def __init__(
        self,
        *,
        limits: Mapping[str, Window] = REST_GROUP_LIMITS,
        margin: float = DEFAULT_REST_MARGIN,
        reserve: int = 0,
        min_cycle: float = 1.0,
        trade_count: int = DEFAULT_TRADE_COUNT,
    ) -> None:
        """``reserve``: calls per window left to others (snapshot requests share the groups).

        ``min_cycle``: shortest cycle in seconds, to poll less often than the budget allows.
        """
        if not min_cycle > 0:
            raise ValueError(f"min_cycle must be > 0, got {min_cycle!r}")
        if not 1 <= trade_count <= MAX_TRADE_COUNT:
            raise ValueError(f"trade_count must be in 1..{MAX_TRADE_COUNT}, got {trade_count!r}")
        self._windows: dict[str, tuple[int, float]] = {}
        for group in _GROUPS:
            count, seconds = with_margin(limits[group], margin)
            if count - reserve < 1:
                raise ValueError(
                    f"reserve {reserve} leaves no budget for group {group!r} ({count} per window)"
                )
            self._windows[group] = (count - reserve, seconds)
        self._min_cycle = float(min_cycle)
        self._trade_count = trade_count
        # Per group, its planned calls least recently polled first.
        self._rotations: dict[str, OrderedDict[_Key, None]] = {g: OrderedDict() for g in _GROUPS}
        self._next_at = -math.inf

    # ------------------------------------------------------------------------ inputs

    def update(
        self,
        *,
        tickers: Iterable[str] = (),
        orderbooks: Iterable[OrderbookStream] = (),
        trades: Iterable[str] = (),
    ) -> None:
        """Set the streams served over REST (replaces the previous set).

        Calls that stay planned keep their turn; new ones go first, so a stream that
        just fell back to REST is polled in the next cycle.
        """
        depths: dict[tuple[str, float], int] = {}
        for code, level, depth in orderbooks:
            key = (code, float(level))
            depths[key] = max(depths.get(key, 0), depth)
        by_book: dict[tuple[float, int], list[str]] = {}
        for (code, level), depth in depths.items():
            by_book.setdefault((level, depth), []).append(code)
        wanted = {
            "ticker": [_Key(c) for c in _chunks(sorted(set(tickers)), TICKER_BATCH)],
            "orderbook": [
                _Key(chunk, level, depth)
                for (level, depth), codes in sorted(by_book.items())
                for chunk in _chunks(sorted(codes), ORDERBOOK_BATCH)
            ],
            "trade": [_Key((c,)) for c in sorted(set(trades))],
        }
        for group, keys in wanted.items():
            old = self._rotations[group]
            keep = set(keys)
            rotation: OrderedDict[_Key, None] = OrderedDict.fromkeys(
                k for k in keys if k not in old
            )
            rotation.update((k, None) for k in old if k in keep)
            self._rotations[group] = rotation

    # ----------------------------------------------------------------------- budgets

    def budget(self, group: str) -> int:
        """Most calls of ``group`` planned in one cycle."""
        return self._windows[group][0]

    @property
    def cycle_seconds(self) -> float:
        """Seconds between cycles: the longest budget window of the groups in use.

        Each group's calls in a cycle are capped at its budget per window, so one cycle
        per window keeps every group within its limit (8 calls per 1 s by default).
        """
        seconds = [self._windows[group][1] for group in _GROUPS if self._rotations[group]]
        return max([self._min_cycle, *seconds])

    def rounds(self, group: str) -> int:
        """Cycles it takes to poll every planned call of ``group`` once (>= 1)."""
        return max(1, math.ceil(len(self._rotations[group]) / self.budget(group)))

    def refresh_seconds(self, group: str) -> float:
        """Seconds between two polls of the same stream of ``group`` (its staleness bound)."""
        return self.rounds(group) * self.cycle_seconds

    def planned(self, group: str) -> int:
        """Calls of ``group`` in one full rotation (all its streams once)."""
        return len(self._rotations[group])

    # ------------------------------------------------------------------------ cycles

    def delay(self, now: float) -> float:
        """Seconds until :meth:`next_cycle` will plan calls again (0.0: now)."""
        return max(0.0, self._next_at - now)

    def next_cycle(self, now: float) -> list[PollCall]:
        """The calls of the cycle starting at ``now``; ``[]`` if the cycle is not due yet.

        Ticker calls come first, then orderbooks, then trades; within a group, the
        least recently polled first.
        """
        if now < self._next_at:
            return []
        calls: list[PollCall] = []
        for group in _GROUPS:
            keys = self._rotations[group]
            for key in list(keys)[: self.budget(group)]:
                keys.move_to_end(key)
                calls.append(self._call(group, key))
        if calls:
            self._next_at = now + self.cycle_seconds
        return calls

    def _call(self, group: str, key: _Key) -> PollCall:
        if group == "ticker":
            return PollCall(group, "/v1/ticker", {"markets": ",".join(key.codes)}, key.codes)
        if group == "orderbook":
            params: dict[str, str | int] = {"markets": ",".join(key.codes), "count": key.depth}
            if key.level:
                params["level"] = _level_text(key.level)
            return PollCall(group, "/v1/orderbook", params, key.codes)
        count = min(MAX_TRADE_COUNT, self._trade_count * self.rounds(group))
        return PollCall(
            group, "/v1/trades/ticks", {"market": key.codes[0], "count": count}, key.codes
        )
