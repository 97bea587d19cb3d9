"""The control plane: the ROUTER socket where clients hello, subscribe and beat.

Each request is answered on the same ROUTER identity, with ``ROUTER_MANDATORY`` and
``NOBLOCK``: a vanished or congested client costs one dropped reply, never a stalled
broker. Unreadable or unknown messages get an :class:`schemas.bus.ErrorReply` with
``bad_message``; the broker never raises on what a client sends. Every request is
validated as a whole before it changes any state, so one client's bad code cannot
touch anybody else's streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from broker.health import compute_health, compute_metrics
from broker.logs import get_logger
from broker.rest import RestError
from broker.snapshots import fetch_snapshot
from broker.subscriptions import SpecError, normalize_spec
from schemas.bus import (
    PROTOCOL_VERSION,
    BrokerMessage,
    Bye,
    ClientMessage,
    ErrorReply,
    GetSnapshot,
    HealthReply,
    HealthRequest,
    Heartbeat,
    Hello,
    MetricsReply,
    MetricsRequest,
    SnapshotReply,
    StreamSpec,
    Subscribe,
    SubscribeOk,
    Unsubscribe,
    UnsubscribeOk,
    Welcome,
    decode_client_message,
    encode,
)
from schemas.errors import DecodeError

if TYPE_CHECKING:
    from broker.app import Broker

__all__ = ["ControlServer"]

MAX_STREAMS_PER_REQUEST = 1000
MARKETS_WAIT = 10.0


class ControlServer:
    """Reads client requests from the ROUTER socket and answers them."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._socket: zmq.Socket[bytes] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests = 0
        self.errors = 0
        self.unroutable = 0
        self._log = get_logger("control")

    async def serve(self, socket: zmq.asyncio.Socket) -> None:
        """Answer requests until cancelled."""
        # Replies go through a synchronous shadow: NOBLOCK errors surface right here.
        self._socket = zmq.Socket.shadow(socket.underlying)
        while True:
            frames = await socket.recv_multipart()
            self.requests += 1
            identity = frames[0]
            if len(frames) != 2:
                self._reply(identity, ErrorReply(None, "bad_message", "expected one frame"))
                continue
            try:
                message = decode_client_message(frames[1])
            except DecodeError as exc:
                self._reply(identity, ErrorReply(None, "bad_message", str(exc)))
                continue
            try:
                self._dispatch(identity, message)
            except Exception as exc:  # never let one request kill the broker
                self._log.exception("request failed", op=type(message).__name__)
                self._reply(
                    identity,
                    ErrorReply(
                        getattr(message, "req", None),
                        "internal",
                        f"internal error ({type(exc).__name__})",
                    ),
                )

    # ---------------------------------------------------------------- dispatch

    def _dispatch(self, identity: bytes, message: ClientMessage) -> None:
        broker = self._broker
        now = time.monotonic()
        if isinstance(message, Hello):
            self._hello(identity, message, now)
            return
        client = identity.hex()
        if not broker.clients.known(client):
            req = getattr(message, "req", None)
            if not isinstance(message, Bye):
                self._reply(
                    identity, ErrorReply(req, "unknown_client", "unknown client: send hello first")
                )
            return
        broker.clients.touch(client, now)
        if isinstance(message, Heartbeat):
            broker.clients.report(
                client, message.received, message.gaps, message.lag_ms, message.dropped
            )
        elif isinstance(message, Subscribe):
            if broker.markets is None:
                self._spawn(self._subscribe_when_ready(identity, client, message))
            else:
                self._subscribe(identity, client, message)
        elif isinstance(message, Unsubscribe):
            self._unsubscribe(identity, client, message)
        elif isinstance(message, GetSnapshot):
            self._spawn(self._get_snapshot(identity, message))
        elif isinstance(message, HealthRequest):
            self._reply(identity, HealthReply(message.req, compute_health(broker)))
        elif isinstance(message, MetricsRequest):
            self._reply(identity, MetricsReply(message.req, compute_metrics(broker)))
        elif isinstance(message, Bye):
            self._log.info("client left", client=client)
            broker.drop_client(client)

    def _hello(self, identity: bytes, message: Hello, now: float) -> None:
        broker = self._broker
        if message.protocol != PROTOCOL_VERSION:
            self._reply(
                identity,
                ErrorReply(
                    None,
                    "protocol_version",
                    f"broker speaks protocol {PROTOCOL_VERSION}, client sent {message.protocol}",
                ),
            )
            return
        client = identity.hex()
        if broker.clients.known(client):
            broker.drop_client(client)  # a re-hello starts afresh
        broker.clients.add(client, now, name=message.name, pid=message.pid)
        self._log.info("client joined", client=client, name=message.name, pid=message.pid)
        self._reply(
            identity,
            Welcome(
                epoch=broker.epoch,
                protocol=PROTOCOL_VERSION,
                heartbeat_interval=broker.settings.heartbeat_interval,
                liveness=broker.settings.liveness,
                public_available=broker.is_available(private=False),
                private_available=broker.is_available(private=True),
            ),
        )

    def _validate(self, streams: list[StreamSpec]) -> list[StreamSpec]:
        if len(streams) > MAX_STREAMS_PER_REQUEST:
            raise SpecError(
                "too_many_streams",
                f"{len(streams)} streams in one request; the limit is {MAX_STREAMS_PER_REQUEST}",
            )
        broker = self._broker
        return [
            normalize_spec(
                spec, markets=broker.markets, private_available=broker.exchange.has_private()
            )
            for spec in streams
        ]

    def _subscribe(self, identity: bytes, client: str, message: Subscribe) -> None:
        broker = self._broker
        try:
            specs = self._validate(message.streams)
        except SpecError as exc:
            self.errors += 1
            self._reply(identity, ErrorReply(message.req, exc.code, str(exc)))
            return
        if not broker.clients.known(client):
            self._reply(identity, ErrorReply(message.req, "unknown_client", "client expired"))
            return
        added = broker.state.add(client, specs)
        broker.apply(added, ())
        topics = [spec.topic for spec in specs]
        snapshot = broker.publisher.last_values(topics) if message.snapshot else []
        self._reply(identity, SubscribeOk(message.req, topics, snapshot))

    async def _subscribe_when_ready(self, identity: bytes, client: str, message: Subscribe) -> None:
        try:
            await asyncio.wait_for(self._broker.markets_loaded.wait(), MARKETS_WAIT)
        except TimeoutError:
            # Without a market list codes are checked by syntax only (logged once).
            self._log.warning("market list still unavailable; validating codes by syntax")
        self._subscribe(identity, client, message)

    def _unsubscribe(self, identity: bytes, client: str, message: Unsubscribe) -> None:
        broker = self._broker
        try:
            specs = self._validate(message.streams)
        except SpecError as exc:
            self._reply(identity, ErrorReply(message.req, exc.code, str(exc)))
            return
        broker.apply((), broker.state.remove(client, specs))
        self._reply(identity, UnsubscribeOk(message.req))

    async def _get_snapshot(self, identity: bytes, message: GetSnapshot) -> None:
        broker = self._broker
        if broker.markets is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(broker.markets_loaded.wait(), MARKETS_WAIT)
        try:
            specs = self._validate(message.streams)
        except SpecError as exc:
            self._reply(identity, ErrorReply(message.req, exc.code, str(exc)))
            return
        try:
            items, missing = await fetch_snapshot(broker, specs)
        except RestError as exc:
            self._reply(identity, ErrorReply(message.req, "upstream_error", str(exc)))
            return
        self._reply(identity, SnapshotReply(message.req, items, missing))

    # ---------------------------------------------------------------- plumbing

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reply(self, identity: bytes, message: BrokerMessage) -> None:
        if isinstance(message, ErrorReply):
            self._log.info("request refused", code=message.code, message=message.message[:200])
        if self._socket is None:
            return
        try:
            self._socket.send_multipart((identity, encode(message)), zmq.NOBLOCK)
        except zmq.ZMQError:
            # Peer gone (EHOSTUNREACH under ROUTER_MANDATORY) or congested (EAGAIN).
            self.unroutable += 1
