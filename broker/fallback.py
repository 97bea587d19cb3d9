"""REST fallback and reconciliation: data keeps coming when a WebSocket cannot run.

:class:`PublicFallback` watches the public link. When it has been down (dropped,
stalled, refused) for longer than ``grace``, it polls REST for the subscribed tickers,
orderbooks and trades (planned by :class:`broker.pollplan.PollPlanner` within the
quotation limits, at the lowest priority) and publishes them on the same topics with
``source="rest"``; a ``source_rest`` status event says so, and ``source_websocket``
when the stream is back. Trades are de-duplicated by ``sequential_id`` across both
switches (:class:`broker.dedupe.TradeDeduper`, inside the router).

:class:`PrivateFallback` does the same for myOrder/myAsset with keys: while the
private link is down it polls open orders and balances and publishes what changed;
after the link returns, one more REST reconciliation publishes whatever changed
between the last poll and the reconnect. Both diff against
:class:`broker.reconcile.PrivateState`, which the router keeps current from WebSocket
events too.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

from broker.logs import get_logger
from broker.pollplan import PollCall, PollPlanner
from broker.reconcile import PrivateState
from broker.rest import PRIORITY_POLL, RestError
from schemas.bus import PRIVATE_STREAM_TYPES
from schemas.errors import DecodeError
from schemas.rest import (
    RestOrder,
    RestOrderbook,
    RestTicker,
    RestTrade,
    rest_orderbook_to_orderbook,
    rest_ticker_to_ticker,
    rest_trade_to_trade,
)
from schemas.upbit import MyAsset, MyOrder, UpbitData

if TYPE_CHECKING:
    from broker.app import Broker

__all__ = ["PrivateFallback", "PublicFallback"]

TICK = 0.25
"""How often the fallbacks look at their link (a supervision tick, not a data timer)."""


class PublicFallback:
    """Serves public streams over REST while the public WebSocket is down."""

    def __init__(self, broker: Broker, *, grace: float = 3.0) -> None:
        self._broker = broker
        self._grace = grace
        self._planner = PollPlanner()
        self.active = False
        self.polls = 0
        self.failures = 0
        self._log = get_logger("fallback", link="public")

    def _streams(self) -> tuple[list[str], list[tuple[str, float, int]], list[str]]:
        tickers: list[str] = []
        books: list[tuple[str, float, int]] = []
        trades: list[str] = []
        for spec in self._broker.state.all_streams():
            if spec.code is None:
                continue
            if spec.type == "ticker":
                tickers.append(spec.code)
            elif spec.type == "orderbook":
                books.append((spec.code, spec.level or 0.0, spec.depth or 30))
            elif spec.type == "trade":
                trades.append(spec.code)
        return tickers, books, trades

    async def run(self) -> None:
        """Supervise the public link forever; poll while it is down."""
        link = self._broker.links["public"]
        while True:
            down_for = link.down_for(time.time())
            tickers, books, trades = self._streams()
            wanted = bool(tickers or books or trades)
            if down_for is None or down_for < self._grace or not wanted:
                if self.active and (down_for is None or not wanted):
                    self._switch(active=False)
                await asyncio.sleep(TICK)
                continue
            if not self.active:
                self._switch(active=True)
            self._planner.update(tickers=tickers, orderbooks=books, trades=trades)
            now = time.time()
            delay = self._planner.delay(now)
            if delay > 0:
                await asyncio.sleep(min(delay, TICK))
                continue
            await asyncio.gather(*(self._poll(call) for call in self._planner.next_cycle(now)))

    def _switch(self, *, active: bool) -> None:
        self.active = active
        state = "source_rest" if active else "source_websocket"
        detail = (
            "public WebSocket unavailable: polling REST"
            if active
            else "public WebSocket restored: streaming again"
        )
        self._log.warning("public data source switched", state=state)
        self._broker.announce("public", state, detail)

    async def _poll(self, call: PollCall) -> None:
        rest = self._broker.rest
        now_ns = time.time_ns()
        try:
            payloads: list[UpbitData]
            if call.group == "ticker":
                tickers = await rest.get_list(
                    call.path, call.group, RestTicker, call.params, priority=PRIORITY_POLL
                )
                payloads = [rest_ticker_to_ticker(t) for t in tickers]
            elif call.group == "orderbook":
                books = await rest.get_list(
                    call.path, call.group, RestOrderbook, call.params, priority=PRIORITY_POLL
                )
                payloads = [rest_orderbook_to_orderbook(b) for b in books]
            else:
                ticks = await rest.get_list(
                    call.path, call.group, RestTrade, call.params, priority=PRIORITY_POLL
                )
                # Newest first on the wire: publish in the order they happened.
                payloads = [rest_trade_to_trade(t) for t in reversed(ticks)]
        except (RestError, DecodeError) as exc:
            self.failures += 1
            self._log.warning("REST poll failed", path=call.path, error=str(exc)[:200])
            return
        self.polls += 1
        if self._broker.links["public"].is_up:
            return  # the stream came back while this call was in flight
        for payload in payloads:
            self._broker.router.route(payload, now_ns, "rest")


class PrivateFallback:
    """Polls orders and balances while the private link is down; reconciles after."""

    def __init__(self, broker: Broker, *, grace: float = 3.0, interval: float = 1.0) -> None:
        self._broker = broker
        self._grace = grace
        self._interval = interval
        self.state = PrivateState()
        self.active = False
        self.reconciliations = 0
        self.failures = 0
        self._synced = False
        self._needs_reconcile = False
        self._log = get_logger("fallback", link="private")

    def observe(self, event: MyOrder | MyAsset) -> None:
        """Keep the known state current from every published private event."""
        if isinstance(event, MyOrder):
            self.state.apply_order(event)
        else:
            self.state.apply_asset(event)

    def _wanted(self) -> bool:
        return any(spec.type in PRIVATE_STREAM_TYPES for spec in self._broker.state.all_streams())

    async def run(self) -> None:
        """Supervise the private link forever."""
        link = self._broker.links["private"]
        while True:
            if not self._wanted():
                self._synced = False
                await asyncio.sleep(TICK)
                continue
            down_for = link.down_for(time.time())
            if not self._synced:
                await self._sync(publish=False)
            elif down_for is None:
                if self._needs_reconcile:
                    # Whatever changed between the last poll and the reconnect.
                    if await self._sync(publish=True):
                        self._needs_reconcile = False
                        self.reconciliations += 1
                    if self.active:
                        self.active = False
                        self._broker.announce(
                            "private",
                            "source_websocket",
                            "private WebSocket restored; reconciled over REST",
                        )
            elif down_for >= self._grace:
                self._needs_reconcile = True
                if not self.active:
                    self.active = True
                    self._broker.announce(
                        "private", "source_rest", "private WebSocket unavailable: polling REST"
                    )
                await self._sync(publish=True)
                await asyncio.sleep(self._interval)
                continue
            else:
                self._needs_reconcile = True
            await asyncio.sleep(TICK)

    async def _sync(self, *, publish: bool) -> bool:
        """Fetch orders and balances; publish the differences (or just learn them)."""
        rest = self._broker.rest
        try:
            orders = await rest.open_orders()
            accounts = await rest.accounts()
            if not publish:
                self.state.baseline(orders, accounts)
                self._synced = True
                return True
            closed: dict[str, RestOrder] = {}
            for uuid in self.state.missing_uuids(orders):
                try:
                    closed[uuid] = await rest.order(uuid)
                except RestError as exc:
                    if exc.status == 404:
                        self.state.forget_order(uuid)
                    else:
                        raise
            now_ms = int(time.time() * 1000)
            events: list[MyOrder | MyAsset] = list(self.state.diff_orders(orders, closed, now_ms))
            asset = self.state.diff_accounts(accounts, now_ms)
            if asset is not None:
                events.append(asset)
        except (RestError, DecodeError) as exc:
            self.failures += 1
            self._log.warning("private REST sync failed", error=str(exc)[:200])
            return False
        now_ns = time.time_ns()
        for event in events:
            self._broker.router.route(cast(UpbitData, event), now_ns, "rest")
        if events:
            self._log.info("private changes published from REST", events=len(events))
        return True
