"""REST fallback and reconciliation: data keeps coming when a WebSocket cannot run.

:class:`PublicFallback` watches the public link. When it has been down (dropped,
stalled, refused) for longer than ``grace``, it polls REST for the subscribed tickers,
orderbooks and trades (planned by :class:`broker.pollplan.PollPlanner` within the
quotation limits, at the lowest priority) and publishes them on the same topics with
``source="rest"``; a ``source_rest`` status event says so, and ``source_websocket``
when the stream is back. Trades are de-duplicated by ``sequential_id`` across both
switches (:class:`broker.dedupe.TradeDeduper`, inside the router).

:class:`PrivateFallback` does the same for myOrder/myAsset with keys: while the
private link is down it polls open and closed orders, the fills of those that
progressed, and balances, and publishes what changed (``wait``, each ``trade``,
``done`` / ``cancel``, once each); after the link returns, one more REST
reconciliation publishes whatever changed between the last poll and the reconnect.
While the link is up it audits too, every ``audit_interval``: a stream can lose events
without ever looking down (a stall shorter than its detection; the exchange's side
dropping what it held), and only REST can tell. What an audit finds is published with
``source="rest"`` and counted (``private_recovered``); a WebSocket event that arrives
after REST published it is dropped (:meth:`broker.reconcile.PrivateState.is_news`).
Both diff against :class:`broker.reconcile.PrivateState`, which the router keeps
current from WebSocket events too, and which :mod:`broker.private_store` saves so a
restarted broker reports what it missed while it was down.

Neither polls its link: the broker hands each link's state changes to
:meth:`~PublicFallback.link_changed` and every change of what clients hold to
:meth:`~PublicFallback.streams_changed` (:class:`broker.ports.LinkWatcher`); the
fallback wakes on those, and on its own timers (the grace period, the poll cycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import cast

from broker.credentials import Credentials, rejects_keys
from broker.logs import get_logger
from broker.pollplan import PollCall, PollPlanner
from broker.ports import LINK_OK_STATES, Announcer, Route, StatusState, StreamsView
from broker.private_store import PrivateStore, SavedPrivate
from broker.ratelimit import ORDER_RESERVE, steady_time
from broker.reconcile import PrivateState, closed_window
from broker.rest import PRIORITY_POLL, RestClient, RestError
from schemas.bus import DEFAULT_ORDERBOOK_DEPTH, PRIVATE_STREAM_TYPES, Source
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

__all__ = ["VERIFIED_LAG_MAX", "PrivateFallback", "PublicFallback"]

VERIFIED_LAG_MAX = 60.0
"""Seconds before now that the private state may be claimed known from at most (the
last REST sync's start, when audits run): with the 60 s margin of the closed-order
query, a window of two minutes, which the remembered orders and fills cover for any
account the order group's 12/s allows."""

IDLE_RETRY = 1.0
"""Seconds before a step that could do nothing useful (a failed baseline, a poll plan
without calls) is tried again."""
DEFAULT_AUDIT_INTERVAL = 30.0
"""Seconds between two REST audits of the account while the private link is up: 3-4
calls of the ``default`` group (30/s) each, about 0.5 % of its budget, and an event the
stream lost reaches subscribers within this long."""
RACED_AUDIT_DELAY = 5.0
"""Seconds before the next audit when balances are in doubt: the stream delivered while
REST was being read, or it changed a balance REST had published (news, or a held-back
older value: the next read tells)."""


class _Supervisor:
    """What both fallbacks share: the watched link's state, and waking up on changes."""

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._down_since: float | None = None
        """Monotonic time the link stopped carrying data (None while it is fine)."""
        self._wake = asyncio.Event()

    def link_changed(self, state: StatusState, now: float) -> None:
        """The watched link reported ``state`` at monotonic time ``now``."""
        if state in LINK_OK_STATES:
            self._down_since = None
        elif self._down_since is None:
            self._down_since = now
        self._wake.set()

    def streams_changed(self) -> None:
        """What clients hold changed: look again."""
        self._wake.set()

    def _down_for(self, now: float) -> float | None:
        return None if self._down_since is None else now - self._down_since

    async def run(self) -> None:
        """Supervise the link forever: one step per change or timer."""
        while True:
            self._wake.clear()
            wait = await self._step()
            if wait is None or wait > 0:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancel that arrives in the turn the event is set, and a broker
                # stopping cancels each task once, then waits for it forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            else:
                await asyncio.sleep(0)

    async def _step(self) -> float | None:
        """Act on the current state; how long to wait for the next step (None: a change)."""
        raise NotImplementedError


class PublicFallback(_Supervisor):
    """Serves public streams over REST while the public WebSocket is down."""

    def __init__(
        self,
        announcer: Announcer,
        streams: StreamsView,
        rest: RestClient,
        route: Route,
        *,
        grace: float = 3.0,
    ) -> None:
        super().__init__(grace)
        self._announcer = announcer
        self._streams_view = streams
        self._rest = rest
        self._route = route
        # Polls are below order priority: the gate leaves them ORDER_RESERVE fewer.
        self._planner = PollPlanner(reserve=ORDER_RESERVE)
        self.active = False
        self.polls = 0
        self.failures = 0
        self._log = get_logger("fallback", link="public")

    def _streams(self) -> tuple[list[str], list[tuple[str, float, int]], list[str]]:
        tickers: list[str] = []
        books: list[tuple[str, float, int]] = []
        trades: list[str] = []
        for spec in self._streams_view.all_streams():
            if spec.code is None:
                continue
            if spec.type == "ticker":
                tickers.append(spec.code)
            elif spec.type == "orderbook":
                books.append((spec.code, spec.level or 0.0, spec.depth or DEFAULT_ORDERBOOK_DEPTH))
            elif spec.type == "trade":
                trades.append(spec.code)
        return tickers, books, trades

    async def _step(self) -> float | None:
        down_for = self._down_for(time.monotonic())
        tickers, books, trades = self._streams()
        wanted = bool(tickers or books or trades)
        if down_for is None or not wanted or down_for < self._grace:
            # Below the grace with the fallback on: the link came back in between.
            if self.active:
                self._switch(active=False)
            if down_for is None or not wanted:
                return None
            return self._grace - down_for
        if not self.active:
            self._switch(active=True)
        self._planner.update(tickers=tickers, orderbooks=books, trades=trades)
        now = steady_time()
        delay = self._planner.delay(now)
        if delay > 0:
            return delay
        calls = self._planner.next_cycle(now)
        if not calls:
            return IDLE_RETRY
        await asyncio.gather(*(self._poll(call) for call in calls))
        return 0.0

    def _switch(self, *, active: bool) -> None:
        self.active = active
        state: StatusState = "source_rest" if active else "source_websocket"
        detail = (
            "public WebSocket unavailable: polling REST"
            if active
            else "public WebSocket restored: streaming again"
        )
        self._log.warning("public data source switched", state=state)
        self._announcer.announce("public", state, detail)

    async def _poll(self, call: PollCall) -> None:
        rest = self._rest
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
        if self._down_since is None:
            return  # the stream came back while this call was in flight
        for payload in payloads:
            self._route(payload, now_ns, "rest")


class PrivateFallback(_Supervisor):
    """Polls orders and balances while the private link is down; reconciles after.

    Each sync reads the open orders, the orders closed since what is known
    (``known_ms``: when the link went down, or the start of the last sync), the fills
    of the orders that progressed, and the balances; it publishes what consumers
    missed, each state and fill once (:class:`broker.reconcile.PrivateState`). With a
    ``store``, what was published is saved (at most once per ``save_interval``) and a
    restarted broker reports what changed since, instead of a silent baseline.
    """

    def __init__(
        self,
        announcer: Announcer,
        streams: StreamsView,
        rest: RestClient,
        route: Route,
        *,
        grace: float = 3.0,
        interval: float = 1.0,
        credentials: Credentials | None = None,
        store: PrivateStore | None = None,
        save_interval: float = 1.0,
        audit_interval: float = DEFAULT_AUDIT_INTERVAL,
    ) -> None:
        """``credentials``: the broker's keys, shared with the private link: rejected
        ones are tried once a minute at most, by either of them. ``store``: where the
        published state outlives the process (None: nowhere). ``audit_interval``:
        seconds between REST audits while the link is up (0: none)."""
        super().__init__(grace)
        self._announcer = announcer
        self._streams_view = streams
        self._rest = rest
        self._route = route
        self._interval = interval
        self._audit_interval = audit_interval
        self._next_audit = 0.0
        """Monotonic time the next audit is due while the link is up."""
        self._synced_ms = 0
        """Wall time (ms) the last successful sync began: an audit asks for the orders
        closed since then."""
        self._streamed: set[str] | None = None
        """While a sync reads REST: the currencies the WebSocket reported meanwhile (REST's
        balances of those may predate what the stream said: they are not diffed)."""
        self.audits = 0
        self.recovered = 0
        """Events audits published that the live stream had not delivered."""
        self._credentials = credentials if credentials is not None else Credentials()
        self.state = PrivateState()
        self.active = False
        self.reconciliations = 0
        self.failures = 0
        self._synced = False
        self._needs_reconcile = False
        self._next_poll = 0.0
        """Monotonic time the next outage poll is due (one per ``interval`` at most)."""
        self._known_ms: int | None = None
        """Wall time (ms) up to which every change was published; None: now (the link
        delivers). The closed orders after it are asked (:func:`closed_window`)."""
        self._store = store
        self._saved = store.load() if store is not None else None
        """A previous broker's state, taken on the first sync (then None)."""
        self._restored = False
        """The first sync starts from a saved state: it publishes what changed."""
        self._save_interval = save_interval
        self._dirty = False
        self._next_save = 0.0
        self._log = get_logger("fallback", link="private")
        if self._saved is not None:
            self._log.info(
                "saved private state found: changes since then are reported",
                known_ms=self._saved.known_ms,
                orders=len(self._saved.snapshot.orders),
            )

    def observe(self, event: MyOrder | MyAsset, source: Source = "websocket") -> bool:
        """Keep the known state current from every private event; whether to publish it.

        A WebSocket event REST reconciliation already published is not news
        (:meth:`PrivateState.is_news`): False, and nothing changes. REST's own events
        were diffed against the state: always published.
        """
        if source == "websocket":
            if self._streamed is not None and isinstance(event, MyAsset):
                self._streamed.update(asset.currency for asset in event.assets)
            if not self.state.is_news(event):
                return False
            if isinstance(event, MyAsset) and self.state.overrides_rest(event):
                self._audit_soon()
        if isinstance(event, MyOrder):
            self.state.apply_order(event)
        else:
            self.state.apply_asset(event)
        self._mark_dirty()
        if self._store is not None and self._synced:
            # Saved before the event leaves (the publisher sends at the end of this
            # loop turn): a broker killed right after publishing it must not publish it
            # again after a restart. Private events are few; a save is one small write.
            self._next_save = 0.0
            self._persist(time.monotonic())
        return True

    @property
    def reconcile_pending(self) -> bool:
        """An outage was seen: one more REST pass is owed once the link is back."""
        return self._needs_reconcile

    def _audit_soon(self) -> None:
        """Balances are in doubt: the next audit within :data:`RACED_AUDIT_DELAY`."""
        soon = time.monotonic() + RACED_AUDIT_DELAY
        if self._audit_interval > 0 and (self._next_audit == 0.0 or soon < self._next_audit):
            self._next_audit = soon
            self._wake.set()

    def link_changed(self, state: StatusState, now: float) -> None:
        """The private link reported ``state``: remember since when changes may be missed."""
        if state not in LINK_OK_STATES and self._known_ms is None:
            self._known_ms = self._verified_ms()
        super().link_changed(state, now)

    def _verified_ms(self) -> int:
        """Until when the account is known for certain, in epoch ms.

        Not "now", though the link looks up: a stall nothing detected may have cost the
        stream events just before (that is why audits exist). The start of the last REST
        sync that succeeded is certain; whatever closed after it is listed again after
        an outage or a restart, and what was already published is remembered (finished
        orders, fills), so nothing comes twice. But the remembered lists are bounded
        (a saved state keeps 2,000 of each): at most :data:`VERIFIED_LAG_MAX` back, so
        audits failing for hours cannot widen the window past what they cover (a busy
        account's older orders would come again). With audits off nothing checks the
        stream: now.
        """
        now_ms = int(time.time() * 1000)
        if self._audit_interval > 0 and self._synced_ms:
            return max(self._synced_ms, now_ms - int(VERIFIED_LAG_MAX * 1000))
        return now_ms

    def _wanted(self) -> bool:
        return any(spec.type in PRIVATE_STREAM_TYPES for spec in self._streams_view.all_streams())

    async def _step(self) -> float | None:
        wait = await self._supervise()
        save_wait = self._persist(time.monotonic())
        if save_wait is None:
            return wait
        return save_wait if wait is None else min(wait, save_wait)

    async def _supervise(self) -> float | None:
        if not self._wanted():
            if self._synced and self._store is not None:
                # Nobody follows the account: what is saved would go stale unseen.
                self._dirty = False
                with contextlib.suppress(OSError):
                    self._store.clear()
            self._synced = False
            return None
        if not self._synced:
            if self._saved is not None:
                # A previous broker published up to then: report what changed since.
                self.state.restore(self._saved.snapshot)
                self._known_ms = self._saved.known_ms
                self._saved = None
                self._restored = True
            # Else the baseline the first outage's changes are diffed against.
            if not await self._sync(publish=self._restored):
                return IDLE_RETRY
            self._synced = True
            self._restored = False
            self._mark_dirty()
            return 0.0
        down_for = self._down_for(time.monotonic())
        if down_for is None:
            if not self._needs_reconcile:
                return await self._audit()
            # Whatever changed between the last poll and the reconnect.
            self._next_audit = time.monotonic() + self._audit_interval
            if await self._sync(publish=True):
                self._needs_reconcile = False
                self.reconciliations += 1
            if self.active:
                self.active = False
                self._announcer.announce(
                    "private",
                    "source_websocket",
                    "private WebSocket restored; reconciled over REST",
                )
            return None if not self._needs_reconcile else IDLE_RETRY
        self._needs_reconcile = True
        if down_for < self._grace:
            return self._grace - down_for
        if self._credentials.rejected:
            # Not an outage REST can bridge: the same keys sign those calls. Their one
            # try a minute (shared with the link) tells when they work again.
            wait = self._credentials.wait(time.monotonic())
            if wait > 0.0:
                return wait
            await self._sync(publish=True)
            return self._interval
        if not self.active:
            self.active = True
            self._announcer.announce(
                "private", "source_rest", "private WebSocket unavailable: polling REST"
            )
        now = time.monotonic()
        if now < self._next_poll:
            return self._next_poll - now
        await self._sync(publish=True)
        self._next_poll = time.monotonic() + self._interval
        return self._interval

    async def _audit(self) -> float | None:
        """While the link is up: compare REST with what was published, every
        ``audit_interval``; publish what the stream lost. The wait until the next one.
        Rejected keys keep the schedule: :meth:`_sync` tries them once a minute at most,
        and audits resume once Upbit takes them again."""
        if self._audit_interval <= 0:
            return None
        now = time.monotonic()
        if self._next_audit == 0.0:
            self._next_audit = now + self._audit_interval  # just synced: not yet
        if now < self._next_audit:
            return self._next_audit - now
        self._next_audit = now + self._audit_interval
        if await self._sync(publish=True, audit=True):
            self.audits += 1
        return max(0.0, self._next_audit - time.monotonic())

    def _closed_window(self, now_ms: int) -> tuple[int, int]:
        """``start_time``, ``end_time`` of the closed orders to ask for: since the link
        went down, or (link up: an audit) since the last sync began."""
        known = self._known_ms if self._known_ms is not None else (self._synced_ms or None)
        start, end, complete = closed_window(known, now_ms)
        if not complete:
            self._log.warning(
                "orders closed more than 7 days ago cannot be listed: not reported",
                known_ms=self._known_ms,
            )
        return start, end

    async def _sync(self, *, publish: bool, audit: bool = False) -> bool:
        """Fetch orders and balances; publish the differences (or just learn them).

        ``audit``: the link is up, so what is found is what the stream lost (logged
        and counted). A currency the stream reported while REST was read may be older
        in REST's answer: it is not diffed (orders are safe, they only move forward)
        and the next audit comes sooner. An answer the diff cannot take (upstream sent
        nonsense) is a failed sync, logged: never the end of this task (nor the broker).
        """
        rest = self._rest
        credentials = self._credentials
        if not credentials.take_try(time.monotonic()):
            return False  # rejected keys: their one try a minute is not due
        started_ms = int(time.time() * 1000)
        streamed: set[str] = set()
        self._streamed = streamed
        try:
            orders = await rest.open_orders()
            closed_list: list[RestOrder] = []
            if publish:
                closed_list = await rest.closed_orders(*self._closed_window(started_ms))
            accounts = await rest.accounts()
            if not publish:
                self.state.baseline(orders, accounts)
                self._synced_at(started_ms)
                return True
            later: dict[str, RestOrder] = {o.uuid: o for o in closed_list}
            for uuid in self.state.to_fetch(orders, closed_list):
                try:
                    later[uuid] = await rest.order(uuid)
                except RestError as exc:
                    if exc.status != 404:
                        raise
                    if uuid not in later:
                        self.state.forget_order(uuid)
            now_ms = int(time.time() * 1000)
            events: list[MyOrder | MyAsset] = list(self.state.diff_orders(orders, later, now_ms))
            asset = self.state.diff_accounts(accounts, now_ms, keep=streamed)
            if asset is not None:
                events.append(asset)
            if streamed:  # the stream spoke meanwhile: those currencies are looked at again
                self._audit_soon()
        except (RestError, DecodeError) as exc:
            self.failures += 1
            if isinstance(exc, RestError) and rejects_keys(exc.status, exc.name):
                reason = str(exc)[:200]
                if credentials.on_rejected(reason, time.monotonic()):
                    self._log.error(
                        "Upbit rejected the API keys; trying them again once a minute",
                        reason=reason,
                    )
                    self._announcer.announce(
                        "private", "auth_failed", f"Upbit rejected the API keys: {reason}"
                    )
                return False
            self._log.warning("private REST sync failed", error=str(exc)[:200])
            return False
        except Exception as exc:  # nonsense from upstream must not end the task
            self.failures += 1
            self._log.error("private REST answer not usable", error=type(exc).__name__)
            return False
        finally:
            self._streamed = None
        if credentials.on_accepted():
            self._log.info("Upbit accepts the API keys again")
        now_ns = time.time_ns()
        for event in events:
            self._route(cast(UpbitData, event), now_ns, "rest")
        if events and audit:
            self.recovered += len(events)
            self._log.warning(
                "the private WebSocket missed events: published from REST", events=len(events)
            )
        elif events:
            self._log.info("private changes published from REST", events=len(events))
        self._synced_at(started_ms)
        return True

    def _synced_at(self, started_ms: int) -> None:
        """A sync that began at ``started_ms`` succeeded: everything before is known."""
        self._synced_ms = started_ms
        self._known_ms = None if self._down_since is None else started_ms
        self._mark_dirty()

    # ------------------------------------------------------------------- persistence

    def _mark_dirty(self) -> None:
        if self._store is not None and not self._dirty:
            self._dirty = True
            self._wake.set()

    def _persist(self, now: float) -> float | None:
        """Save the state if it changed and the last save is old enough; the wait before
        the next save is due (None: nothing to save)."""
        if self._store is None or not self._dirty or not self._synced:
            return None
        if now < self._next_save:
            return self._next_save - now
        known_ms = self._verified_ms() if self._known_ms is None else self._known_ms
        self._dirty = False
        self._next_save = now + self._save_interval
        try:
            self._store.save(SavedPrivate(snapshot=self.state.snapshot(), known_ms=known_ms))
        except OSError as exc:
            self._log.warning("private state not saved", error=type(exc).__name__)
        return None
