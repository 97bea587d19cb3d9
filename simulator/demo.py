"""Demo orders: the simulator trades on its own account now and then (``--demo-orders``).

Without them the offline demo's order monitor has nothing to show: nobody places
orders on the simulated account. :class:`DemoTrader` (pure: the book, the open demo
orders and ``now`` in, one :class:`Place` or :class:`Cancel` out) alternates buys and
sells of a small amount: most cross the book and fill at once (``wait``, ``trade``,
``done``), the others rest one level behind the best price, where the moving market
may fill them or the trader cancels them after ``rest_for`` seconds. Sides alternate
so the balances stay where they started. :func:`run_demo_orders` is its I/O shell.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Sequence
from decimal import ROUND_DOWN, Decimal
from typing import Protocol

import structlog

from simulator.account import Account, OrderError

__all__ = ["DEMO_PREFIX", "Cancel", "DemoHost", "DemoTrader", "Place", "run_demo_orders"]

DEMO_PREFIX = "demo-"
"""Identifier prefix of the demo orders: the trader touches no other order."""
_VOLUME_QUANTUM = Decimal("0.00000001")

log = structlog.get_logger("simulator.demo")

Level = tuple[float, float]


class DemoHost(Protocol):
    """What the demo needs of the simulator: its account and a market's current book."""

    account: Account

    def books(self, code: str) -> tuple[list[Level], list[Level]] | None:
        """The book of ``code`` (asks, bids; best first), None for an unknown code."""
        ...


@dataclasses.dataclass(frozen=True)
class Place:
    """Place a limit order of ``volume`` at ``price`` (``side`` is ``bid`` or ``ask``)."""

    side: str
    price: Decimal
    volume: Decimal
    identifier: str
    taker: bool
    """True when the price crosses the book: the order fills at once."""


@dataclasses.dataclass(frozen=True)
class Cancel:
    """Cancel the resting demo order ``uuid``."""

    uuid: str


class DemoTrader:
    """Decides the next demo action; touches no account, no clock and no socket."""

    def __init__(
        self,
        *,
        seed: int = 1,
        notional: Decimal = Decimal("20000"),
        taker_share: float = 0.6,
        rest_for: float = 6.0,
    ) -> None:
        self._rng = random.Random(seed)
        self.notional = notional
        """Quote currency per order (KRW 20,000 by default: above Upbit's 5,000 minimum)."""
        self.taker_share = taker_share
        self.rest_for = rest_for
        self._count = 0

    def next_action(
        self,
        now: float,
        asks: Sequence[Level],
        bids: Sequence[Level],
        resting: Sequence[tuple[str, float]],
    ) -> Place | Cancel | None:
        """The action due at ``now``, given the book and the open demo orders.

        ``resting`` holds (uuid, created) of the open demo orders. An order resting for
        ``rest_for`` seconds is cancelled first; while one rests nothing new is placed,
        so at most one demo order is open at a time. None when the book is empty.
        """
        for uuid, created in resting:
            if now - created >= self.rest_for:
                return Cancel(uuid)
        if resting or not asks or not bids:
            return None
        self._count += 1
        side = "bid" if self._count % 2 else "ask"
        taker = self._rng.random() < self.taker_share
        if taker:  # cross the spread: fills against the best level at once
            price = asks[0][0] if side == "bid" else bids[0][0]
        else:  # one level behind the best own-side price: rests until the market moves
            own = bids if side == "bid" else asks
            price = own[min(1, len(own) - 1)][0]
        exact = Decimal(repr(price))
        volume = (self.notional / exact).quantize(_VOLUME_QUANTUM, rounding=ROUND_DOWN)
        return Place(side, exact, volume, f"{DEMO_PREFIX}{self._count}", taker)


async def run_demo_orders(sim: DemoHost, market: str, interval: float, seed: int = 1) -> None:
    """Every ``interval`` seconds, apply the trader's next action to ``sim``'s account."""
    trader = DemoTrader(seed=seed)
    while True:
        await asyncio.sleep(interval)
        book = sim.books(market)  # also keeps the market moving, so resting orders fill
        if book is None:
            log.warning("demo_market_unknown", market=market)
            return
        asks, bids = book
        mine = [
            (o.uuid, o.created)
            for o in sim.account.open_orders(market=market)
            if (o.identifier or "").startswith(DEMO_PREFIX)
        ]
        action = trader.next_action(time.time(), asks, bids, mine)  # orders carry wall time
        try:
            if isinstance(action, Cancel):
                sim.account.cancel(uuid=action.uuid)
                log.info("demo_order_cancelled", market=market, uuid=action.uuid)
            elif isinstance(action, Place):
                order = sim.account.place_order(
                    market=market,
                    side=action.side,
                    ord_type="limit",
                    price=action.price,
                    volume=action.volume,
                    identifier=action.identifier,
                    asks=asks,
                    bids=bids,
                )
                log.info(
                    "demo_order_placed",
                    market=market,
                    side=action.side,
                    price=str(action.price),
                    volume=str(action.volume),
                    state=order.state,
                )
        except OrderError as exc:  # e.g. a balance spent by hand through the REST API
            log.warning("demo_order_refused", market=market, error=exc.name, message=str(exc))
