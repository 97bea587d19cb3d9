"""The broker process: wires the bus, the subscription state and the upstream links.

Follow a client's subscribe from here: :meth:`Broker._on_subscribe` validates each
stream (:func:`broker.subscriptions.normalize_spec`), adds it to the reference-counted
:class:`broker.subscriptions.SubscriptionState`, and :meth:`Broker._replan` turns the
union into an :func:`broker.subscriptions.upstream_plan` per connection, which the
:class:`broker.upstream.UpstreamLink` sends to Upbit as one coalesced request. Data
comes back through :class:`broker.routing.DataRouter` to the
:class:`broker.publisher.Publisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import signal
import time
from collections.abc import Iterable, Sequence

import zmq
import zmq.asyncio

from broker.config import ConfigError, Settings
from broker.control import ControlServer
from broker.exchange import Exchange, UpbitExchange
from broker.fallback import PrivateFallback, PublicFallback
from broker.handlers import DataHandler, HandlerError, HandlerSet, load_handlers
from broker.health import RateMeter
from broker.instance import InstanceLock
from broker.liveness import ClientTable
from broker.logs import get_logger
from broker.publisher import Publisher
from broker.ratelimit import BanStore
from broker.rest import RestClient, RestError
from broker.routing import DataRouter
from broker.subscriptions import (
    SubscriptionState,
    UpstreamStream,
    carries,
    upstream_plan,
)
from broker.upstream import ConnectGate, ConnectionName, UpstreamLink
from schemas.bus import HEARTBEAT_TOPIC, StatusEvent, StreamSpec, status_topic

__all__ = ["Broker"]

_MARKET_REFRESH = 3600.0


class Broker:
    """One broker: the only holder of Upbit connections on this machine."""

    def __init__(
        self,
        settings: Settings,
        exchange: Exchange | None = None,
        *,
        handlers: Sequence[DataHandler] | None = None,
    ) -> None:
        """Build the broker; ``handlers`` replace those named in ``settings.handlers``.

        Raises ConfigError when a configured handler cannot be loaded, HandlerError when
        a handler given here is not one.
        """
        self.settings = settings
        if handlers is None:
            try:
                self.handlers = HandlerSet(load_handlers(settings.handlers))
            except HandlerError as exc:
                raise ConfigError(f"UPBIT_BROKER_HANDLERS: {exc}") from None
        else:
            self.handlers = HandlerSet(handlers)
        self.epoch = secrets.token_hex(8)
        self.started = time.time()
        self.exchange: Exchange = exchange or UpbitExchange(settings)
        self.state = SubscriptionState()
        self.clients = ClientTable()
        self.markets: frozenset[str] | None = None
        self.markets_loaded = asyncio.Event()
        self.rate = RateMeter(time.monotonic())
        self._log = get_logger("broker", epoch=self.epoch)
        self._bans = BanStore.load(settings.state_dir / "bans.json")
        self._gate = ConnectGate(self._bans)
        self.rest = RestClient(self.exchange, bans=self._bans)
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._router = self._ctx.socket(zmq.ROUTER)
        self.publisher = Publisher(zmq.Socket.shadow(self._pub.underlying), self.epoch)
        self.links: dict[ConnectionName, UpstreamLink] = {}
        self.private_fallback = PrivateFallback(self) if self.exchange.has_private() else None
        self.router = DataRouter(
            self.publisher,
            self.exchange,
            on_private=self.private_fallback.observe if self.private_fallback else None,
            handlers=self.handlers,
        )
        self.public_fallback = PublicFallback(self)
        self.control = ControlServer(self)
        self._lingering: set[StreamSpec] = set()
        """Released streams Upbit still sends (their topics stay published and cached)."""
        self._stop = asyncio.Event()
        self._lock = InstanceLock(settings.control_endpoint)
        for name in ("public", "private") if self.exchange.has_private() else ("public",):
            self.links[name] = UpstreamLink(
                name,
                self.exchange,
                self._gate,
                on_frame=self.router.on_frame,
                on_status=self._on_link_status,
                on_rejected=self._on_rejected,
                on_carried=functools.partial(self._on_carried, name),
                widen_types=settings.widen_types if name == "public" else (),
                coalesce=settings.coalesce_window,
            )

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask :meth:`run` to finish."""
        self._stop.set()

    async def run(self) -> None:
        """Bind the bus, connect upstream and serve until stopped."""
        self._lock.acquire()
        try:
            self._bind()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
            self._log.info(
                "broker started",
                control=self.settings.control_endpoint,
                data=self.settings.data_endpoint,
                upstream=self.exchange.ws_url(False),
                private=self.exchange.has_private(),
                pid=os.getpid(),
            )
            tasks = [
                asyncio.create_task(self.control.serve(self._router), name="control"),
                asyncio.create_task(self._housekeeping(), name="housekeeping"),
                asyncio.create_task(self._refresh_markets(), name="markets"),
                *(asyncio.create_task(link.run(), name=n) for n, link in self.links.items()),
                asyncio.create_task(self.public_fallback.run(), name="public-fallback"),
            ]
            if self.private_fallback is not None:
                tasks.append(
                    asyncio.create_task(self.private_fallback.run(), name="private-fallback")
                )
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and task.exception() is not None:
                    self._log.error(
                        "task failed", task=task.get_name(), error=repr(task.exception())
                    )
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stop.cancel()
        finally:
            await self.rest.close()
            self.publisher.flush()
            self._pub.close(linger=0)
            self._router.close(linger=0)
            self._ctx.term()
            self._lock.release()
            self._log.info("broker stopped")

    def _bind(self) -> None:
        for sock in (self._pub, self._router):
            sock.setsockopt(zmq.LINGER, 0)
        # Per subscriber: past it, that subscriber loses messages (and sees the gap in
        # its sequence numbers) while the broker's memory stays bounded.
        self._pub.setsockopt(zmq.SNDHWM, self.settings.send_hwm)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.SNDHWM, 10_000)
        self._pub.bind(self.settings.data_endpoint)
        self._router.bind(self.settings.control_endpoint)

    # ------------------------------------------------------------------ state changes

    def apply(self, added: Iterable[StreamSpec], removed: Iterable[StreamSpec]) -> None:
        """Reflect streams whose reference count crossed zero on topics and upstream.

        A released stream's topic stays published (and its last value cached) for as
        long as Upbit still sends it: see :meth:`_on_carried`.
        """
        changed = False
        for spec in added:
            if spec in self._lingering:
                self._lingering.discard(spec)
            else:
                self.publisher.activate(spec.topic)
                self.router.claim(spec.topic)
            changed = True
        for spec in removed:
            self._lingering.add(spec)
            changed = True
        if changed:
            self._replan()

    def _on_carried(self, link: ConnectionName, carried: frozenset[UpstreamStream]) -> None:
        """The link's upstream request changed: retire released topics it no longer carries."""
        private = link == "private"
        if not private:
            self.router.set_carried(carried)
        retired = [
            spec
            for spec in self._lingering
            if spec.is_private == private and not carries(carried, spec)
        ]
        for spec in retired:
            self._lingering.discard(spec)
            self.publisher.deactivate(spec.topic)
            self.router.forget(spec)
        if retired:
            self.router.set_streams(self.state.all_streams() | self._lingering)

    def _replan(self) -> None:
        streams = self.state.all_streams()
        self.router.set_streams(streams | self._lingering)
        plan = upstream_plan(streams)
        public = frozenset(plan.public)
        private = frozenset(plan.private)
        self.links["public"].set_streams(public)
        if "private" in self.links:
            self.links["private"].set_streams(private)

    def _on_link_status(self, link: ConnectionName, state: str, detail: str) -> None:
        self.announce(link, state, detail)
        if state == "down":
            # Whatever was in flight is lost: tell every affected topic.
            self.announce(link, "gap", detail, status=False)

    def announce(
        self, link: ConnectionName, state: str, detail: str, *, status: bool = True
    ) -> None:
        """Publish a status event on the link's status topic and on its data topics."""
        now_ms = int(time.time() * 1000)
        topics = sorted(
            spec.topic
            for spec in self.state.all_streams()
            if spec.is_private == (link == "private")
        )
        event = StatusEvent(connection=link, state=state, detail=detail, timestamp=now_ms)
        if status:
            self.publisher.publish_status(
                status_topic(link),
                StatusEvent(
                    connection=link, state=state, detail=detail, topics=topics, timestamp=now_ms
                ),
            )
        for topic in topics:
            self.publisher.publish_status(topic, event)

    def _on_rejected(self, streams: frozenset[UpstreamStream]) -> None:
        self._log.error("Upbit rejected streams", count=len(streams))

    def is_available(self, private: bool) -> bool:
        """Whether the public (private) side can deliver data right now."""
        link = self.links.get("private" if private else "public")
        if link is None:
            return False
        fallback = self.private_fallback if private else self.public_fallback
        return link.stats.state in ("up", "idle") or (fallback is not None and fallback.active)

    # ------------------------------------------------------------------ background

    async def _housekeeping(self) -> None:
        interval = self.settings.heartbeat_interval
        last_heartbeat = 0.0
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            self.rate.update(self.router.messages, now)
            for client_id in self.clients.expired(now, interval, self.settings.liveness):
                self._log.info("client expired", client=client_id)
                self.drop_client(client_id)
            if now - last_heartbeat >= interval:
                # Every interval, busy or not: a client whose own topics are quiet must
                # still be able to tell a silent market from a dead broker.
                self.publisher.heartbeat(HEARTBEAT_TOPIC)
                last_heartbeat = now

    def drop_client(self, client_id: str) -> None:
        """Forget a client and release its streams."""
        self.clients.remove(client_id)
        self.apply((), self.state.drop_client(client_id))

    async def _refresh_markets(self) -> None:
        delay = 1.0
        while True:
            try:
                markets = await self.rest.markets()
            except RestError as exc:
                self._log.warning("market list unavailable", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            self.markets = frozenset(m.market for m in markets)
            self.links["public"].set_markets(self.markets)
            self.markets_loaded.set()
            self._log.info("market list loaded", markets=len(self.markets))
            delay = 1.0
            await asyncio.sleep(_MARKET_REFRESH)
