"""The asyncio client: find the local broker, subscribe, receive, survive its restarts.

Sockets: a DEALER to the broker's control ROUTER (one msgpack frame per message) and a
SUB to its data PUB (``topic + TOPIC_END + [envelope, ...]``). Both are plain (synchronous)
pyzmq sockets watched with ``loop.add_reader``: when one becomes readable, everything available is
read with ``NOBLOCK`` before returning to the loop, so a burst costs one wake-up, not
one per message. Routing, sequences and callbacks live in :mod:`clients.dispatch`, the
sockets and loop callbacks in :mod:`clients.sockets`, the typed ``subscribe_*`` methods
in :mod:`clients.streams`.

Liveness: the client heartbeats every ``heartbeat_interval`` (from the broker's
Welcome). Silence on both sockets for ``interval * liveness`` triggers a health probe
over the control socket (the broker publishes ``_heartbeat/`` only when its bus is
idle, so a busy bus with none of *our* topics is silent too); no answer means the
broker is gone. A new epoch on any envelope or Welcome, an ``unknown_client`` error or
a lost broker all lead to the same recovery: a fresh DEALER (Lazy Pirate), hello,
re-subscribe everything with snapshots, tell subscribers (``down`` / ``restored``
status events). No user code is needed.

Lifetime: ``async with BrokerClient() as client`` or ``await client.close()``. If the
object is dropped without closing, a :func:`weakref.finalize` (which holds the sockets,
never the client) sends Bye and closes everything; background tasks hold only weak
references so they never keep a dropped client alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

import structlog
import zmq

from broker.config import bus_endpoints
from clients import sockets
from clients.dispatch import Dispatcher
from clients.errors import BrokerError, BrokerTimeout, BrokerUnavailable, ClientClosed
from clients.streams import StatusCallback, StreamMethods, candle_type, stream_specs
from clients.subscription import Subscription
from schemas.bus import (
    HEARTBEAT_TOPIC,
    STATUS_TOPIC_PREFIX,
    BrokerMessage,
    ClientMessage,
    Envelope,
    ErrorReply,
    GetSnapshot,
    Health,
    HealthReply,
    HealthRequest,
    Heartbeat,
    Hello,
    Metrics,
    MetricsReply,
    MetricsRequest,
    SnapshotReply,
    StatusEvent,
    StreamSpec,
    Subscribe,
    SubscribeOk,
    Unsubscribe,
    UnsubscribeOk,
    Welcome,
    decode_broker_message,
    encode,
)
from schemas.errors import DecodeError

__all__ = ["BrokerClient", "StatusCallback"]

R = TypeVar("R")

BATCH: Final = 4096
"""Messages handled per wake-up before yielding to other tasks (fairness under load)."""
RCVHWM: Final = 10_000
"""SUB queue bound inside ZeroMQ, in frames of 1 to 16 messages and at most 8 KB: 10,000
messages at low rates, at most ~80 MB under load (~0.5 s at 120k msg/s); past it the
broker's PUB drops for this client only, and the client counts the gap."""
_DOWN_STATES: Final = frozenset({"down", "connecting", "reconnecting"})
_UP_STATES: Final = frozenset({"up", "idle", "restored", "source_rest", "source_websocket"})
_CLIENT_TOPIC: Final = "_client/"
"""Topic of status notices the client makes itself (broker lost / restored)."""


class _Reset(Exception):
    """A request's socket was replaced while it waited (internal: retried once)."""


class BrokerClient(StreamMethods):
    """Asyncio client of the local upbit-broker.

    With no arguments the endpoints come from :func:`broker.config.bus_endpoints`
    (``UPBIT_BROKER_CONTROL`` / ``UPBIT_BROKER_DATA`` or the per-user defaults). The
    first request connects lazily; :meth:`connect` does it eagerly and raises
    :class:`BrokerUnavailable` if no broker answers within ``request_timeout``. One
    client belongs to the event loop it connected on.
    """

    def __init__(
        self,
        control: str | None = None,
        data: str | None = None,
        *,
        name: str = "",
        request_timeout: float = 5.0,
    ) -> None:
        if control is None or data is None:
            default_control, default_data = bus_endpoints()
            control = control or default_control
            data = data or default_data
        self.control_endpoint = control
        self.data_endpoint = data
        self.name = name or os.path.basename(sys.argv[0] or "python")
        self.request_timeout = request_timeout
        self.client_id = uuid.uuid4().hex
        self._dispatcher = Dispatcher()
        self._io: sockets.IO | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._welcome: Welcome | None = None
        self._welcomed = asyncio.Event()
        self._connect_lock = asyncio.Lock()
        self._state_lock = asyncio.Lock()
        self._hello_waiter: asyncio.Future[Welcome] | None = None
        self._pending: dict[int, asyncio.Future[BrokerMessage]] = {}
        self._req = itertools.count(1)
        self._refs: dict[str, int] = {}
        """Subscriptions per stream (keyed by the stream's topic as the client spells it)."""
        self._specs: dict[str, StreamSpec] = {}
        self._topics: dict[str, str] = {}
        """Client topic -> the topic the broker confirmed (normally the same)."""
        self._public = False
        self._private = False
        self._closed = False
        self._last_rx = 0.0
        self._lag_ms = 0.0
        self._probe_task: asyncio.Task[None] | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self._log = structlog.get_logger("clients").bind(client=self.client_id[:8])
        self._ref = weakref.ref(self)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> BrokerClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while a broker has welcomed this client (False while recovering)."""
        return self._welcomed.is_set()

    @property
    def epoch(self) -> str | None:
        """The welcoming broker's epoch (changes when the broker restarts)."""
        return self._dispatcher.epoch

    async def connect(self) -> None:
        """Open the sockets and hello the broker; raises BrokerUnavailable if none answers."""
        if self._closed:
            raise ClientClosed("client closed")
        if self._welcome is not None:
            return
        async with self._connect_lock:
            if self._welcome is not None:
                return
            if self._io is None:
                self._open(asyncio.get_running_loop())
            try:
                welcome = await self._hello(self.request_timeout)
            except (BrokerTimeout, BrokerUnavailable):
                self._shutdown_io()
                raise BrokerUnavailable(
                    f"no broker answered at {self.control_endpoint} within "
                    f"{self.request_timeout:g} s (is upbit-broker running?)"
                ) from None
            self._on_welcomed(welcome)

    async def close(self) -> None:
        """Say Bye, close the sockets, end every subscription and task. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._welcomed.clear()
        self._fail_pending(ClientClosed("client closed"))
        self._dispatcher.clear()
        tasks = list(self._io.tasks) if self._io is not None else []
        self._shutdown_io()
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in tasks if t is not current), return_exceptions=True)

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        data: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
        data.setsockopt(zmq.LINGER, 0)
        data.setsockopt(zmq.RCVHWM, RCVHWM)
        data.connect(self.data_endpoint)
        for prefix in (HEARTBEAT_TOPIC, STATUS_TOPIC_PREFIX, *self._dispatcher.prefixes):
            data.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        io = sockets.IO(loop, self._new_ctrl(ctx), data, self._dispatcher)
        self._io = io
        loop.add_reader(io.ctrl.FD, sockets.on_ctrl_readable, self._ref)
        loop.add_reader(data.FD, sockets.on_data_readable, self._ref)
        self._finalizer = weakref.finalize(self, sockets.release, io)
        self._spawn(sockets.heartbeat_loop(self._ref))
        self._last_rx = loop.time()

    def _new_ctrl(self, ctx: zmq.Context[Any]) -> zmq.Socket[bytes]:
        ctrl: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        ctrl.setsockopt(zmq.LINGER, 0)
        ctrl.connect(self.control_endpoint)
        return ctrl

    def _replace_ctrl(self) -> None:
        """Lazy Pirate: a fresh DEALER, so nothing queued for a dead broker is replayed."""
        io = self._io
        assert io is not None
        with contextlib.suppress(Exception):
            io.loop.remove_reader(io.ctrl.FD)
        sockets.close_ctrl(io.ctrl)
        io.ctrl = self._new_ctrl(zmq.Context.instance())
        io.loop.add_reader(io.ctrl.FD, sockets.on_ctrl_readable, self._ref)
        self._fail_pending(_Reset())

    def _shutdown_io(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs sockets.release once and detaches
        self._finalizer = None
        self._io = None
        self._welcome = None

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        io = self._io
        assert io is not None
        task = io.loop.create_task(coro)
        io.tasks.add(task)
        task.add_done_callback(io.tasks.discard)
        return task

    # ------------------------------------------------------------------ control plane

    def _send(self, message: ClientMessage) -> None:
        io = self._io
        if io is None:
            raise (
                ClientClosed("client closed")
                if self._closed
                else BrokerUnavailable("not connected")
            )
        try:
            io.ctrl.send(encode(message), zmq.NOBLOCK)
        except zmq.Again:
            raise BrokerUnavailable("control queue to the broker is full") from None
        # A send can consume the socket's edge-triggered readiness: look again soon.
        io.loop.call_soon(sockets.on_ctrl_readable, self._ref)

    def _drain_control(self) -> None:
        io = self._io
        if io is None:
            return
        recv = io.ctrl.recv
        got = False
        while True:
            try:
                frame = recv(zmq.NOBLOCK)
            except zmq.ZMQError:  # Again, or the socket was just replaced
                break
            got = True
            try:
                message = decode_broker_message(frame)
            except DecodeError as exc:
                self._log.warning("unreadable broker message", error=str(exc))
                continue
            self._on_control(message)
        if got:
            self._last_rx = io.loop.time()

    def _on_control(self, message: BrokerMessage) -> None:
        if isinstance(message, Welcome):
            waiter = self._hello_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
            elif self._welcome is not None and message.epoch != self._dispatcher.epoch:
                self._schedule_resync(f"broker restarted (epoch {message.epoch})")
            return
        req = message.req
        future = self._pending.get(req) if req is not None else None
        if isinstance(message, ErrorReply):
            if future is None:
                waiter = self._hello_waiter
                if message.code == "unknown_client":  # the answer to a heartbeat
                    self._schedule_resync("the broker does not know this client")
                elif waiter is not None and not waiter.done():  # e.g. protocol_version
                    waiter.set_exception(BrokerError(message.code, message.message))
                else:
                    self._log.warning("broker error", code=message.code, message=message.message)
                return
            if not future.done():
                future.set_exception(BrokerError(message.code, message.message))
            return
        if future is not None and not future.done():
            future.set_result(message)

    async def _hello(self, limit: float) -> Welcome:
        waiter: asyncio.Future[Welcome] = asyncio.get_running_loop().create_future()
        self._hello_waiter = waiter
        try:
            self._send(Hello(client_id=self.client_id, name=self.name, pid=os.getpid()))
            return await asyncio.wait_for(waiter, limit)
        except TimeoutError:
            raise BrokerTimeout(f"no welcome within {limit:g} s") from None
        finally:
            self._hello_waiter = None

    def _on_welcomed(self, welcome: Welcome) -> None:
        self._welcome = welcome
        self._public = welcome.public_available
        self._private = welcome.private_available
        self._dispatcher.resume(welcome.epoch)
        self._welcomed.set()

    async def _ensure_welcomed(self) -> None:
        if self._closed:
            raise ClientClosed("client closed")
        if self._welcome is None:
            await self.connect()
        if not self._welcomed.is_set():
            try:
                await asyncio.wait_for(self._welcomed.wait(), self.request_timeout)
            except TimeoutError:
                raise BrokerUnavailable("the broker is unavailable (reconnecting)") from None
        if self._closed:
            raise ClientClosed("client closed")

    async def _request(self, make: Callable[[int], ClientMessage], expect: type[R]) -> R:
        """A user request: waits while the client reconnects, and is retried once when
        the broker restarted or forgot us meanwhile (recovery uses _request_once)."""
        for attempt in range(2):
            await self._ensure_welcomed()
            try:
                return await self._request_once(make, expect, self.request_timeout)
            except _Reset:
                if attempt:
                    raise BrokerUnavailable("the connection to the broker was reset") from None
            except BrokerError as exc:
                if exc.code != "unknown_client" or attempt:
                    raise
                self._schedule_resync("the broker does not know this client")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request_once(
        self, make: Callable[[int], ClientMessage], expect: type[R], limit: float
    ) -> R:
        req = next(self._req)
        future: asyncio.Future[BrokerMessage] = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        try:
            self._send(make(req))
            reply = await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise BrokerTimeout(f"no reply from the broker within {limit:g} s") from None
        finally:
            self._pending.pop(req, None)
        if not isinstance(reply, expect):
            raise BrokerError("bad_message", f"unexpected reply {type(reply).__name__}")
        return reply

    def _fail_pending(self, exc: BaseException) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        waiter = self._hello_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(BrokerUnavailable("the connection to the broker was reset"))

    # ------------------------------------------------------------------ liveness, recovery

    def _tick(self) -> float:
        """One heartbeat period: beat, re-check readiness, probe a silent broker."""
        io = self._io
        welcome = self._welcome
        if io is None or welcome is None:
            return 0.25
        interval = welcome.heartbeat_interval
        # Edge-triggered zmq fds can miss a wake-up in rare interleavings: look anyway.
        self._drain_control()
        self._drain_data()
        if self._resync_task is not None:
            return interval
        d = self._dispatcher
        with contextlib.suppress(BrokerUnavailable, ClientClosed):
            dropped = sum(sub.dropped for sub in d.subscriptions)
            self._send(
                Heartbeat(
                    received=d.received,
                    gaps=d.gaps,
                    lag_ms=round(self._lag_ms, 3),
                    dropped=dropped,
                )
            )
        silent = io.loop.time() - self._last_rx
        if silent > interval * welcome.liveness and self._probe_task is None:
            self._probe_task = self._spawn(sockets.probe(self._ref))
        return interval

    async def _probe_once(self) -> None:
        """Nothing heard for a while: ask for health; no answer means the broker is gone."""
        welcome = self._welcome
        try:
            if welcome is None:
                return
            timeout = welcome.heartbeat_interval * welcome.liveness
            reply = await self._request_once(HealthRequest, HealthReply, timeout)
        except _Reset:
            return
        except (BrokerTimeout, BrokerUnavailable):
            self._schedule_resync("the broker stopped answering")
        except BrokerError as exc:
            self._schedule_resync(f"health probe refused ({exc.code})")
        else:
            if reply.health.epoch != self._dispatcher.epoch:
                self._schedule_resync(f"broker restarted (epoch {reply.health.epoch})")
        finally:
            self._probe_task = None

    def _schedule_resync(self, reason: str) -> None:
        """Start recovery (once): subscribers hear ``down``, updates buffer meanwhile."""
        if self._closed or self._io is None or self._welcome is None:
            return
        if self._resync_task is not None:
            return
        self._log.warning("reconnecting to the broker", reason=reason)
        self._welcomed.clear()
        self._public = self._private = False
        self._notify("down", reason)
        self._dispatcher.suspend()
        self._resync_task = self._spawn(sockets.resync_loop(self._ref, reason))

    async def _resync_once(self, reason: str) -> bool:
        """One recovery attempt: fresh DEALER, hello, re-subscribe with snapshots."""
        async with self._state_lock:
            if self._closed or self._io is None:
                return True
            welcome = self._welcome
            timeout = self.request_timeout
            if welcome is not None:
                timeout = min(timeout, welcome.heartbeat_interval * welcome.liveness)
            self._dispatcher.suspend()
            self._replace_ctrl()
            try:
                self._on_welcomed(await self._hello(timeout))
                await self._resubscribe_all(timeout)
            except (BrokerError, BrokerTimeout, BrokerUnavailable, _Reset):
                self._welcomed.clear()  # retried with backoff; "down" was already told
                return False
            self._log.info("reconnected to the broker", epoch=self._dispatcher.epoch, reason=reason)
            self._notify("restored", f"reconnected after: {reason}")
            return True

    async def _resubscribe_all(self, limit: float) -> None:
        specs = list(self._specs.values())
        snapshot: list[Envelope] = []
        failed: dict[str, BrokerError] = {}
        if specs:
            try:
                ok = await self._request_once(lambda r: Subscribe(r, specs), SubscribeOk, limit)
                snapshot = ok.snapshot
            except BrokerError as exc:
                if exc.code == "unknown_client":
                    raise
                # One stream the new broker refuses must not cost the others.
                for spec in specs:
                    try:
                        ok = await self._request_once(
                            lambda r, s=spec: Subscribe(r, [s]),  # type: ignore[misc]
                            SubscribeOk,
                            limit,
                        )
                        snapshot.extend(ok.snapshot)
                    except BrokerError as one:
                        if one.code == "unknown_client":
                            raise
                        failed[spec.topic] = one
        d = self._dispatcher
        for sub in d.subscriptions:
            d.activate(sub, [env for env in snapshot if d.matches(sub, env.topic)])
            errors = [failed[s.topic] for s in sub.streams if s.topic in failed]
            if errors:
                self._notify("error", "; ".join(str(e) for e in errors), [sub])

    def _notify(self, state: str, detail: str, subs: list[Subscription[Any]] | None = None) -> None:
        """A status notice made by the client itself (topic ``_client/``, seq 0)."""
        now_ns = time.time_ns()
        for sub in self._dispatcher.subscriptions if subs is None else subs:
            if sub._on_status is None:
                continue
            event = StatusEvent(
                connection=sub.connection,
                state=state,
                detail=detail,
                topics=list(sub.topics),
                timestamp=now_ns // 1_000_000,
            )
            epoch = self._dispatcher.epoch or ""
            sub._status(Envelope(_CLIENT_TOPIC, 0, epoch, now_ns, "websocket", event))

    # ------------------------------------------------------------------ data plane

    def _drain_data(self) -> None:
        """Hot path: read every frame available (up to BATCH messages) without awaiting."""
        io = self._io
        if io is None:
            return
        sock = io.data
        recv = sock.recv
        d = self._dispatcher
        dispatch = d.dispatch
        noblock = zmq.NOBLOCK
        # Bounded in messages (a frame carries up to 16) and in frames (undecodable
        # ones count no message).
        stop_at = d.received + BATCH
        n = 0
        try:
            while n < BATCH and d.received < stop_at:
                # One frame per message (topic + TOPIC_END + envelopes): nothing to
                # realign after a malformed one.
                dispatch(recv(noblock))
                n += 1
        except zmq.Again:
            pass
        except zmq.ZMQError:  # closed under us (client closing)
            return
        if not n:
            return
        loop = io.loop
        self._last_rx = loop.time()
        if d.last_recv_ns:
            self._lag_ms = max(0.0, (time.time_ns() - d.last_recv_ns) / 1e6)
        if n >= BATCH or d.received >= stop_at:  # more may wait: after other tasks ran
            loop.call_soon(sockets.on_data_readable, self._ref)
        if d.status_events:
            events, d.status_events = d.status_events, []
            self._on_status_events(events)
        if d.foreign_epoch is not None:
            self._schedule_resync(f"broker restarted (epoch {d.foreign_epoch})")

    def _on_status_events(self, events: list[Envelope]) -> None:
        """Availability follows the upstream connections' state changes."""
        for env in events:
            event = env.data
            assert isinstance(event, StatusEvent)
            available: bool | None = None
            if event.state in _DOWN_STATES:
                available = False
            elif event.state in _UP_STATES:
                available = True
            if available is not None and self._welcomed.is_set():
                if event.connection == "public":
                    self._public = available
                else:
                    self._private = available

    def _sub_prefixes(self, prefixes: Iterable[str], *, subscribe: bool) -> None:
        io = self._io
        if io is None:
            return
        option = zmq.SUBSCRIBE if subscribe else zmq.UNSUBSCRIBE
        changed = False
        for prefix in prefixes:
            io.data.setsockopt(option, prefix.encode())
            changed = True
        if changed:
            io.loop.call_soon(sockets.on_data_readable, self._ref)

    # ------------------------------------------------------------------ subscriptions

    async def _subscribe(
        self,
        streams: list[StreamSpec],
        callback: Callable[[Any], object] | None,
        on_status: StatusCallback | None,
        maxsize: int,
    ) -> Subscription[Any]:
        for attempt in range(2):
            await self._ensure_welcomed()
            sub: Subscription[Any] = Subscription(
                streams, callback, on_status=on_status, maxsize=maxsize, owner=self
            )
            try:
                async with self._state_lock:
                    await self._subscribe_locked(sub)
                return sub
            except (BrokerUnavailable, BrokerError) as exc:
                recoverable = isinstance(exc, BrokerUnavailable) or exc.code == "unknown_client"
                if attempt or not recoverable or self._closed:
                    raise
                self._schedule_resync(f"subscribe failed ({exc})")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _subscribe_locked(self, sub: Subscription[Any]) -> None:
        """Clone pattern: SUB first, then Subscribe (new streams) / GetSnapshot (held ones)."""
        d = self._dispatcher
        if not self._welcomed.is_set():
            raise BrokerUnavailable("the broker is unavailable (reconnecting)")
        self._sub_prefixes(d.add(sub), subscribe=True)
        new = [s for s in sub.streams if s.topic not in self._refs]
        held = [s for s in sub.streams if s.topic in self._refs]
        timeout = self.request_timeout
        snapshot: list[Envelope] = []
        topics = [self._topics[s.topic] for s in held]
        try:
            # Snapshot of held streams first: if the Subscribe then fails, the broker
            # is left holding nothing new for us.
            if held:
                reply = await self._request_once(
                    lambda r: GetSnapshot(r, held), SnapshotReply, timeout
                )
                snapshot.extend(reply.items)
            if new:
                ok = await self._request_once(lambda r: Subscribe(r, new), SubscribeOk, timeout)
                snapshot.extend(ok.snapshot)
                for spec, topic in zip(new, ok.topics, strict=False):
                    self._specs[spec.topic] = spec
                    self._topics[spec.topic] = topic
                    topics.append(topic)
        except BaseException as exc:
            self._sub_prefixes(d.remove(sub), subscribe=False)
            sub._close()
            if isinstance(exc, _Reset):
                raise BrokerUnavailable("the connection to the broker was reset") from None
            raise
        for spec in sub.streams:
            self._refs[spec.topic] = self._refs.get(spec.topic, 0) + 1
        added, removed = d.retopic(sub, topics)
        self._sub_prefixes(added, subscribe=True)
        self._sub_prefixes(removed, subscribe=False)
        if sub.needs_worker:
            sub._worker = self._spawn(sub._work())
        if d.epoch is not None:  # else a recovery started meanwhile and will activate it
            d.activate(sub, snapshot)

    async def _unsubscribe(self, sub: Subscription[Any]) -> None:
        """Called by :meth:`Subscription.unsubscribe`: release streams no one else here uses."""
        async with self._state_lock:
            if sub.closed:
                return
            self._sub_prefixes(self._dispatcher.remove(sub), subscribe=False)
            sub._close()
            release: list[StreamSpec] = []
            for spec in sub.streams:
                count = self._refs.get(spec.topic, 0) - 1
                if count > 0:
                    self._refs[spec.topic] = count
                    continue
                self._refs.pop(spec.topic, None)
                self._topics.pop(spec.topic, None)
                release.append(self._specs.pop(spec.topic, spec))
            if not release or self._closed or not self._welcomed.is_set():
                return  # a recovery re-subscribes only what is still held
            try:
                await self._request_once(
                    lambda r: Unsubscribe(r, release), UnsubscribeOk, self.request_timeout
                )
            except (BrokerUnavailable, BrokerTimeout, _Reset) as exc:
                self._log.info("unsubscribe not confirmed", error=repr(exc))
            except BrokerError as exc:
                if exc.code != "unknown_client":
                    raise
                self._schedule_resync("the broker does not know this client")

    @property
    def subscriptions(self) -> list[Subscription[Any]]:
        """Every live subscription of this client."""
        return self._dispatcher.subscriptions

    # ------------------------------------------------------------------ requests

    async def get_snapshot(
        self,
        type_: str,
        codes: str | Iterable[str] | None = None,
        *,
        depth: int | None = None,
        level: float | None = None,
        unit: str | None = None,
    ) -> list[Envelope]:
        """Current values of streams, subscribed or not (``type_`` e.g. ``"ticker"``).

        ``type_="candle"`` takes ``unit`` (default 1m); ``"candle.5m"`` works too.
        Values the broker had to fetch over REST carry ``seq == 0``.
        """
        if type_ == "candle" or unit is not None:
            type_ = candle_type(unit or "1m")
        if type_ == "myAsset":
            streams = [StreamSpec("myAsset")]
        else:
            streams = stream_specs(
                type_, codes, depth=depth, level=level, optional=type_ == "myOrder"
            )
        reply = await self._request(lambda r: GetSnapshot(r, streams), SnapshotReply)
        return reply.items

    async def health(self) -> Health:
        """The broker's health (status, uptime, upstream connections, epoch)."""
        return (await self._request(HealthRequest, HealthReply)).health

    async def metrics(self) -> Metrics:
        """The broker's metrics, with one row per client (lag, gaps)."""
        return (await self._request(MetricsRequest, MetricsReply)).metrics

    def is_public_available(self) -> bool:
        """Whether public market data flows now (Welcome, then status events). No I/O."""
        return self._public and self._welcomed.is_set()

    def is_private_available(self) -> bool:
        """Whether myOrder/myAsset can flow now; False when the broker has no keys."""
        return self._private and self._welcomed.is_set()

    @property
    def received(self) -> int:
        """Envelopes received on the data socket."""
        return self._dispatcher.received

    @property
    def gaps(self) -> int:
        """Sequence gaps seen over all topics."""
        return self._dispatcher.gaps
