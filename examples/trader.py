"""A small trader: warms up on candle history, follows tickers, places and cancels limit
orders through the broker, and prints its fills from ``myOrder``.

The strategy is a toy on purpose (copy the plumbing, not the idea): a moving average of
the last ``--window`` one-minute closes; while the price is below it, keep one bid
resting ``--offset`` below the price; when the price moves away, cancel it and place a
new one. A negative offset bids above the price: a marketable limit bid that fills at
once. Every call goes through the broker, so this program holds no API keys and
shares the host's rate limits with every other program. The broker must run with keys
and ``UPBIT_BROKER_TRADING=1`` (``scripts/demo`` does, against the simulator).
``--seconds`` and ``--until-fills`` bound a run (a test, a trial).

Every order carries this program's own identifier, so after a crash it can find what it
left behind (``get_order(identifier=...)``); on exit it cancels what it still has open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import deque
from decimal import ROUND_DOWN, Decimal

from clients import BrokerClient, BrokerError
from schemas.upbit import MyOrder, Ticker


def krw_tick(price: Decimal) -> Decimal:
    """Upbit's KRW price unit for ``price`` (the common bands; enough for a demo)."""
    for floor, tick in (
        (2_000_000, 1000), (1_000_000, 500), (500_000, 100), (100_000, 50), (10_000, 10),
        (1_000, 1), (100, Decimal("0.1")), (10, Decimal("0.01")),
    ):  # fmt: skip
        if price >= floor:
            return Decimal(tick)
    return Decimal("0.001")


def on_tick(price: Decimal) -> Decimal:
    """``price`` rounded down onto its tick."""
    tick = krw_tick(price)
    return (price / tick).to_integral_value(ROUND_DOWN) * tick


class Trader:
    """The strategy's state: closes for the average, and the one resting order."""

    def __init__(self, client: BrokerClient, code: str, args: argparse.Namespace) -> None:
        self.client = client
        self.code = code
        self.krw = Decimal(str(args.krw))
        self.offset = Decimal(str(args.offset))
        self.closes: deque[Decimal] = deque(maxlen=args.window)
        self.resting: str | None = None
        """Identifier of our open bid, if any."""
        self.resting_price = Decimal(0)
        self.busy = False
        self.count = 0
        self.stem = f"trader-{int(time.time())}"
        self.fills = 0
        self.until_fills: int | None = args.until_fills
        self.enough = asyncio.Event()
        """Set once ``until_fills`` of our orders' fills were seen."""

    async def warm_up(self) -> None:
        """Fill the average from the broker's candle history (newest first)."""
        candles = await self.client.candles(self.code, "1m", count=self.closes.maxlen or 20)
        for candle in reversed(candles):
            self.closes.append(Decimal(str(candle.trade_price)))
        print(f"warmed up on {len(candles)} candles of {self.code}", flush=True)

    def average(self) -> Decimal:
        return sum(self.closes, Decimal(0)) / max(len(self.closes), 1)

    async def on_ticker(self, ticker: Ticker) -> None:
        """Re-quote the bid when the price moved; nothing while a call is in flight."""
        price = Decimal(str(ticker.trade_price))
        self.closes.append(price)
        if self.busy:
            return
        self.busy = True
        try:
            wanted = on_tick(price * (1 - self.offset)) if price < self.average() else None
            # Re-quote only when the price moved by half the offset: cancels cost budget.
            drift = self.resting_price * self.offset / 2
            moved = wanted is None or abs(wanted - self.resting_price) > drift
            if self.resting is not None and moved:
                await self.cancel()
            if wanted is not None and self.resting is None:
                await self.bid(wanted)
        except BrokerError as exc:
            # Upbit's own refusal (insufficient_funds_bid, ...) says exactly what is wrong.
            why = exc.upbit_message or exc.message
            print(f"refused: {exc.code} {exc.upbit_name} {why}", flush=True)
        finally:
            self.busy = False

    async def bid(self, price: Decimal) -> None:
        self.count += 1
        identifier = f"{self.stem}-{self.count}"
        volume = (self.krw / price).quantize(Decimal("0.00000001"), ROUND_DOWN)
        # Resting from now on: its myOrder events may come before the broker's answer.
        self.resting, self.resting_price = identifier, price
        try:
            order = await self.client.place_order(
                self.code, "bid", "limit", price=price, volume=volume, identifier=identifier
            )
        except BrokerError as exc:
            if exc.code != "order_unknown":  # unknown: it may be there; cancel() finds it
                self.resting = None
            raise
        print(f"placed  {identifier} bid {volume} @ {price} ({order.state})", flush=True)

    async def cancel(self) -> None:
        identifier, self.resting = self.resting, None
        if identifier is None:
            return
        try:
            await self.client.cancel_order(identifier=identifier)
            print(f"cancel  {identifier}", flush=True)
        except BrokerError as exc:
            if exc.upbit_name not in ("order_not_found", "canceled_order", "done_order"):
                raise
            print(f"gone    {identifier} ({exc.upbit_name})", flush=True)  # filled meanwhile

    def on_order(self, order: MyOrder) -> None:
        """Print our orders' fills (``trade`` events: price and volume are the fill's);
        other programs' orders on the account are not ours to report."""
        identifier = order.identifier or ""
        if not identifier.startswith(self.stem + "-"):
            return
        if order.state == "trade":
            fill = f"{order.ask_bid} {order.volume} @ {order.price}"
            print(f"fill    {identifier} {fill}", flush=True)
            self.fills += 1
            if self.until_fills is not None and self.fills >= self.until_fills:
                self.enough.set()
        elif order.state == "done":
            print(f"done    {identifier}", flush=True)
            if identifier == self.resting:
                self.resting = None  # filled: nothing left to cancel


async def main(args: argparse.Namespace) -> None:
    async with BrokerClient(name="trader") as client:
        balances = {a.currency: a.balance for a in await client.accounts()}
        print(f"KRW available: {balances.get('KRW', 0)}", flush=True)
        trader = Trader(client, args.code, args)
        await trader.warm_up()
        await client.subscribe_my_order(args.code, trader.on_order)
        await client.subscribe_ticker(args.code, trader.on_ticker)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(trader.enough.wait(), args.seconds)
        finally:
            with contextlib.suppress(BrokerError):
                await trader.cancel()
        print(f"stopped after {trader.fills} fills", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("code", nargs="?", default="KRW-BTC", help="market (default KRW-BTC)")
    parser.add_argument("--window", type=int, default=20, help="closes in the average")
    parser.add_argument("--offset", type=float, default=0.001, help="bid below price (0.001)")
    parser.add_argument("--krw", type=float, default=10_000, help="KRW per order (10000)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after (forever)")
    parser.add_argument("--until-fills", type=int, default=None, help="stop after N fills")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args()))
