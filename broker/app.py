"""The broker process: wires the bus, the subscription state and the upstream links.

Follow a client's subscribe from here: :class:`broker.control.ControlServer` validates
each stream (:func:`broker.subscriptions.normalize_spec`) and calls
:meth:`Broker.subscribe`; the pure :class:`broker.topics.TopicLifecycle` adds it to the
reference counts and answers with a :class:`broker.topics.TopicPlan` (topics to
activate, the :func:`broker.subscriptions.upstream_plan` per connection), which
:meth:`Broker._carry_out` applies to the publisher, the router and each
:class:`broker.upstream.UpstreamLink`, which sends it to Upbit as one coalesced
request. Data comes back through :class:`broker.routing.DataRouter` to the
:class:`broker.publisher.Publisher`.

Each component gets only the narrow interface it needs (:mod:`broker.ports`), never the
broker itself; this module is the only one that knows them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import signal
import time
from collections.abc import Sequence

import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

from broker.config import ConfigError, Settings, check_ipc
from broker.control import ControlServer
from broker.credentials import Credentials
from broker.exchange import Exchange, UpbitExchange
from broker.fallback import PrivateFallback, PublicFallback
from broker.gateway import Gateway
from broker.handlers import DataHandler, HandlerError, HandlerSet, load_handlers
from broker.health import RateMeter, compute_health, compute_metrics
from broker.http import MonitorServer
from broker.instance import InstanceLock
from broker.keys import serve_curve
from broker.liveness import ClientTable
from broker.logs import get_logger
from broker.ports import LinkWatcher, MonitorCounters, StatusState, status_state
from broker.private_store import PRIVATE_STATE_FILE, PrivateStore, owner_tag
from broker.publisher import Publisher
from broker.quotas import MAX_REQUEST_BYTES, REPLY_QUEUE
from broker.ratelimit import BAN_FILE, BanStore
from broker.rest import RestClient, RestError
from broker.routing import DataRouter
from broker.snapshots import Snapshots
from broker.subscriptions import SubscriptionState, UpstreamStream, carries
from broker.topics import TopicLifecycle, TopicPlan
from broker.trading import Trading
from broker.upstream import ConnectGate, ConnectionName, UpstreamLink, keepalive_setting
from schemas.bus import (
    BROKER_STOPPING,
    CONTROL_ENV,
    DATA_ENV,
    HEARTBEAT_TOPIC,
    Health,
    Metrics,
    Source,
    StatusEvent,
    StreamSpec,
    status_topic,
)
from schemas.trust import is_tcp
from schemas.upbit import UpbitData

__all__ = ["Broker", "BrokerFailed"]

_MARKET_REFRESH = 3600.0
GOODBYE_LINGER_MS = 500
"""How long closing the data socket may take to hand the goodbye to every client."""


class BrokerFailed(RuntimeError):
    """A broker task ended on its own (an unexpected exception): the process must fail."""


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
        self.topics = TopicLifecycle()
        self._pending_routed: frozenset[StreamSpec] | None = None
        self._pending_requests: dict[ConnectionName, frozenset[UpstreamStream]] = {}
        self._flush_scheduled = False
        self.clients = ClientTable()
        self.markets: frozenset[str] | None = None
        self.markets_loaded = asyncio.Event()
        self.rate = RateMeter(time.monotonic())
        self._log = get_logger("broker", epoch=self.epoch)
        self._bans = BanStore.load(settings.state_dir / BAN_FILE)
        self._gate = ConnectGate(self._bans)
        self.rest = RestClient(self.exchange, bans=self._bans)
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._auth: ThreadAuthenticator | None = None
        """The CURVE authenticator (a thread) while the bus is bound with CURVE."""
        self.publisher = Publisher(zmq.Socket.shadow(self._pub.underlying), self.epoch)
        self.links: dict[ConnectionName, UpstreamLink] = {}
        self.credentials = Credentials()
        """The API keys as Upbit last judged them, shared by the private link and REST."""
        self.private_fallback = (
            PrivateFallback(
                self,
                self.state,
                self.rest,
                self._route,
                credentials=self.credentials,
                store=_private_store(settings),
                audit_interval=settings.private_audit,
            )
            if self.exchange.has_private()
            else None
        )
        self.router = DataRouter(
            self.publisher,
            self.exchange,
            on_private=self.private_fallback.observe if self.private_fallback else None,
            handlers=self.handlers,
        )
        self.public_fallback = PublicFallback(self, self.state, self.rest, self.router.route)
        self._watchers: dict[ConnectionName, list[LinkWatcher]] = {
            "public": [self.public_fallback],
            "private": [self.private_fallback] if self.private_fallback else [],
        }
        """Who hears of each link's state changes, and of every change of held streams."""
        self.gateway = Gateway(self.rest, self)
        """Quotation REST for clients, answered from the market cache and REST."""
        self.trading = Trading(
            self.rest,
            self,
            epoch=self.epoch,
            keys=self.exchange.has_private(),
            enabled=settings.trading,
        )
        """Account reads, placements and cancels for clients, with the broker's keys."""
        self.control = ControlServer(
            clients=self.clients,
            subscriptions=self,
            markets=self,
            snapshots=Snapshots(self.publisher, self.rest, self.epoch),
            status=self,
            epoch=self.epoch,
            heartbeat_interval=settings.heartbeat_interval,
            liveness=settings.liveness,
            private_enabled=self.exchange.has_private(),
            quotes=self.gateway,
            trading=self.trading,
            on_welcome=functools.partial(self.publisher.heartbeat, HEARTBEAT_TOPIC),
        )
        self._stop = asyncio.Event()
        self._lock = InstanceLock(settings.control_endpoint)
        self.monitor: MonitorServer | None = None
        """The /metrics and /health endpoint while it serves (UPBIT_BROKER_HTTP)."""
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
                keepalive=keepalive_setting(os.environ),
                credentials=self.credentials if name == "private" else None,
            )

    @property
    def state(self) -> SubscriptionState:
        """The reference counts of what clients hold (read only: change them through
        :meth:`subscribe`, :meth:`unsubscribe` and :meth:`drop_client`)."""
        return self.topics.state

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask :meth:`run` to finish."""
        self._stop.set()

    async def run(self) -> None:
        """Bind the bus, connect upstream and serve until stopped.

        Returns once :meth:`stop` was called (SIGINT, SIGTERM). Every task runs for as
        long as the broker does, so one that ends on its own has failed: it is logged
        with its traceback, the others are stopped and :class:`BrokerFailed` is raised.
        """
        self._lock.acquire()
        try:
            self._bind()
            await self._start_monitor()
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
                trading=self._trading_state(),
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
            failed = sorted(task.get_name() for task in done if task is not stop)
            for task in done:
                if task is stop or task.cancelled():
                    continue
                error = task.exception()
                if error is None:
                    self._log.error("task ended on its own", task=task.get_name())
                else:
                    self._log.error("task failed", task=task.get_name(), exc_info=error)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stop.cancel()
            if failed:
                raise BrokerFailed(f"broker task failed: {', '.join(failed)}")
        finally:
            if self.monitor is not None:
                await self.monitor.close()
            await self.rest.close()
            self._say_goodbye()
            self._pub.close(linger=GOODBYE_LINGER_MS)
            self._router.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            self._lock.release()
            self._log.info("broker stopped")

    def _trading_state(self) -> str:
        """``on``, ``off``, or why trading cannot be on (said in the start line)."""
        if not self.settings.trading:
            return "off"
        if not self.exchange.has_private():
            self._log.warning("UPBIT_BROKER_TRADING is set but the broker has no API keys")
            return "off (no API keys)"
        return "on"

    def _say_goodbye(self) -> None:
        """Tell every client the broker is going (``down``, ``BROKER_STOPPING``), flushed
        with whatever was queued; the data socket lingers so it gets out."""
        now_ms = int(time.time() * 1000)
        for link in ("public", "private"):
            event = StatusEvent(
                connection=link, state="down", detail=BROKER_STOPPING, timestamp=now_ms
            )
            with contextlib.suppress(zmq.ZMQError):
                self.publisher.publish_status(status_topic(link), event)
        with contextlib.suppress(zmq.ZMQError):
            self.publisher.flush()

    def _bind(self) -> None:
        """Bind the bus inside the trust boundary: ipc paths checked before and after
        binding (:mod:`schemas.trust`), tcp sockets as CURVE servers (or public only)."""
        for sock in (self._pub, self._router):
            sock.setsockopt(zmq.LINGER, 0)
        # Per subscriber: past it, that subscriber loses messages (and sees the gap in
        # its sequence numbers) while the broker's memory stays bounded.
        self._pub.setsockopt(zmq.SNDHWM, self.settings.send_hwm)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A client that never reads its replies holds at most REPLY_QUEUE of them, and
        # a message larger than MAX_REQUEST_BYTES costs its sender the connection before
        # the broker reads a byte of it (broker.quotas).
        self._router.setsockopt(zmq.SNDHWM, REPLY_QUEUE)
        self._router.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        bus = (
            (self._pub, DATA_ENV, self.settings.data_endpoint),
            (self._router, CONTROL_ENV, self.settings.control_endpoint),
        )
        tcp = [sock for sock, _, endpoint in bus if is_tcp(endpoint)]
        if tcp and self.settings.curve:
            # Before binding: no peer may connect before the ZAP handler stands.
            self._auth = serve_curve(self._ctx, self.settings.curve_layout, tcp)
        elif tcp and self.settings.public_only:
            self._log.warning(
                "tcp bus without CURVE: anyone who reaches it may read it and talk to it; "
                "serving public data only, private streams are off"
            )
        elif tcp:
            raise ConfigError("a tcp endpoint needs CURVE keys or the public-only switch")
        for sock, name, endpoint in bus:
            check_ipc(name, endpoint)  # the directory may be new since the settings were read
            sock.bind(endpoint)
            check_ipc(name, endpoint)  # and the socket file is ours

    async def _start_monitor(self) -> None:
        """Serve /metrics and /health if configured; ConfigError if the address is taken."""
        if self.settings.http_endpoint is None:
            return
        host, port = self.settings.http_endpoint
        monitor = MonitorServer(self, host, port)
        try:
            await monitor.start()
        except OSError as exc:
            raise ConfigError(f"UPBIT_BROKER_HTTP: cannot listen on {host}:{port}: {exc}") from None
        self.monitor = monitor

    # ------------------------------------------------------------------ state changes

    def subscribe(self, client_id: str, specs: Sequence[StreamSpec]) -> None:
        """``client_id`` holds ``specs`` (validated) from now on."""
        self._carry_out(self.topics.subscribe(client_id, specs))

    def unsubscribe(self, client_id: str, specs: Sequence[StreamSpec]) -> None:
        """``client_id`` releases ``specs``."""
        self._carry_out(self.topics.unsubscribe(client_id, specs))

    def drop_client(self, client_id: str) -> None:
        """Forget a client and release its streams."""
        self.clients.remove(client_id)
        self._carry_out(self.topics.drop_client(client_id))

    def _carry_out(self, plan: TopicPlan) -> None:
        """Apply a topic plan to the publisher, the router and the links, in its order."""
        for topic in plan.activate:
            self.publisher.activate(topic)
            self.router.claim(topic)
        for spec in plan.retire:
            self.publisher.deactivate(spec.topic)
            self.router.forget(spec)
        # What the router routes and each link requests are whole sets, so only the
        # latest matters: a burst of requests (one client's flood, a thousand clients
        # subscribing at once) costs one recomputation per loop turn, not one each.
        if plan.routed is not None:
            self._pending_routed = plan.routed
        self._pending_requests.update(plan.requests)
        if not self._flush_scheduled and (plan.routed is not None or plan.requests):
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_plan)

    def _flush_plan(self) -> None:
        """Hand the latest routed set and link requests to the router and the links."""
        self._flush_scheduled = False
        routed, self._pending_routed = self._pending_routed, None
        requests, self._pending_requests = self._pending_requests, {}
        if routed is not None:
            self.router.set_streams(routed)
        for name, streams in requests.items():
            link = self.links.get(name)
            if link is not None:
                link.set_streams(streams)
        if requests:
            for watchers in self._watchers.values():
                for watcher in watchers:
                    watcher.streams_changed()

    def held(self, client_id: str) -> frozenset[StreamSpec]:
        """The streams ``client_id`` holds now."""
        return self.topics.state.streams_of(client_id)

    def _on_carried(self, link: ConnectionName, carried: frozenset[UpstreamStream]) -> None:
        """The link's upstream request changed: retire released topics it no longer carries."""
        if link == "public":
            self.router.set_carried(carried)
        self._carry_out(self.topics.carried(link, carried))

    def _on_link_status(self, link: ConnectionName, state: str, detail: str) -> None:
        event = status_state(state)
        self.announce(link, event, detail)
        if event == "down":
            # Whatever was in flight is lost: tell every affected topic.
            self.announce(link, "gap", detail, status=False)
        now = time.monotonic()
        for watcher in self._watchers[link]:
            watcher.link_changed(event, now)

    def announce(
        self, link: ConnectionName, state: StatusState, detail: str, *, status: bool = True
    ) -> None:
        """Publish a status event on the link's status topic and on its data topics."""
        now_ms = int(time.time() * 1000)
        topics = sorted(
            spec.topic for spec in self.topics.wanted() if spec.is_private == (link == "private")
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

    def _on_rejected(self, streams: frozenset[UpstreamStream], reason: str) -> None:
        """Upbit refused ``streams`` on their own: tell their owners, and release them.

        The link has split the refused request down to these, so nobody else's streams
        are held back; the owners get an ``error`` status on the topic and lose the
        stream (a subscribe of it again is tried again).
        """
        refused = [spec for spec in self.topics.wanted() if carries(streams, spec)]
        now_ms = int(time.time() * 1000)
        for spec in refused:
            detail = f"Upbit refused this stream ({reason}); it was unsubscribed"
            link: ConnectionName = "private" if spec.is_private else "public"
            self.publisher.publish_status(
                spec.topic,
                StatusEvent(connection=link, state="error", detail=detail, timestamp=now_ms),
            )
            owners = [c for c in self.topics.state.clients() if spec in self.held(c)]
            self._log.error("Upbit refused a stream", stream=spec.topic, owners=len(owners))
            for client in owners:
                self._carry_out(self.topics.unsubscribe(client, [spec]))

    def private_refusal(self) -> str | None:
        """Why private streams are refused now: Upbit rejected the keys (None: they are not)."""
        reason = self.credentials.reason
        if reason is None:
            return None
        return (
            f"Upbit rejected the broker's API keys ({reason}); private streams are "
            "unavailable until they work again (tried once a minute)"
        )

    def is_available(self, private: bool) -> bool:
        """Whether the public (private) side can deliver data right now."""
        link = self.links.get("private" if private else "public")
        if link is None:
            return False
        if private and self.credentials.rejected:
            return False  # permanent until the keys work again: not a blip
        fallback = self.private_fallback if private else self.public_fallback
        return link.stats.state in ("up", "idle") or (fallback is not None and fallback.active)

    def health(self) -> Health:
        """The broker's health right now."""
        private = self.private_fallback
        return compute_health(
            self.links["public"],
            self.links.get("private"),
            public_on_rest=self.public_fallback.active,
            private_on_rest=private is not None and private.active,
            active_subscriptions=len(self.state.all_streams()),
            decode_errors=self.router.decode_errors,
            started=self.started,
            epoch=self.epoch,
            now=time.time(),
        )

    def metrics(self) -> Metrics:
        """The broker's metrics right now, with one row per client."""
        return compute_metrics(
            list(self.links.values()),
            self.clients.all(),
            lambda client_id: len(self.state.streams_of(client_id)),
            messages=self.router.messages,
            decode_errors=self.router.decode_errors,
            per_second=self.rate.per_second,
            handlers=self.handlers.metrics(),
            published=self.publisher.published,
            frames=self.publisher.frames,
            now=time.monotonic(),
        )

    def counters(self) -> MonitorCounters:
        """The running totals behind the metrics, for /metrics."""
        return MonitorCounters(
            messages_by_type=dict(self.router.received),
            rest_calls=dict(self.rest.calls_by_group),
            rest_waits=dict(self.rest.waits),
            rest_wait_seconds=dict(self.rest.wait_seconds),
            rest_throttled=dict(self.rest.throttled),
            upstream_errors={n: link.stats.upstream_errors for n, link in self.links.items()},
            decode_errors=self.router.decode_errors,
            duplicates=self.router.duplicates,
            send_errors=self.publisher.send_errors,
            private_duplicates=self.router.private_duplicates,
            private_recovered=self.private_fallback.recovered if self.private_fallback else 0,
        )

    async def wait_markets(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the market list; True once it is known."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # (wait_for can swallow a cancel on 3.11)
                await self.markets_loaded.wait()
        return self.markets is not None

    def _route(self, message: UpbitData, recv_ns: int, source: Source) -> None:
        # The private fallback is built before the router it feeds (the router observes
        # private events for it): it routes through here.
        self.router.route(message, recv_ns, source)

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
            self.control.prune()
            if now - last_heartbeat >= interval:
                # Every interval, busy or not: a client whose own topics are quiet must
                # still be able to tell a silent market from a dead broker.
                self.publisher.heartbeat(HEARTBEAT_TOPIC)
                last_heartbeat = now

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
            self.gateway.set_markets(markets)
            self.markets = frozenset(m.market for m in markets)
            self.links["public"].set_markets(self.markets)
            self.markets_loaded.set()
            self._log.info("market list loaded", markets=len(self.markets))
            delay = 1.0
            await asyncio.sleep(_MARKET_REFRESH)


def _private_store(settings: Settings) -> PrivateStore:
    """Where the published private state outlives the broker: the state directory, under
    a one-way name of the account (never the keys themselves)."""
    access = "" if settings.access_key is None else settings.access_key.reveal()
    return PrivateStore(
        settings.state_dir / PRIVATE_STATE_FILE, owner_tag(settings.rest_url, access)
    )
