"""The asyncio client: find the local broker, subscribe, receive, survive its restarts.

This module is the asyncio shell around :class:`clients.core.ClientCore`, which makes
every control-plane decision (request/reply matching, epochs, reference counts, when to
recover); here are the sockets, futures and tasks that carry them out.

Sockets: a DEALER to the broker's control ROUTER (one msgpack frame per message) and a
SUB to its data PUB (``topic + TOPIC_END + [envelope, ...]``), made by
:mod:`clients.sockets`. Both are plain (synchronous) pyzmq sockets watched with
``loop.add_reader``: when one becomes readable, everything available is read with
``NOBLOCK`` before returning to the loop, so a burst costs one wake-up, not one per
message. Routing, sequences and callbacks live in :mod:`clients.dispatch`, the typed
``subscribe_*`` methods in :mod:`clients.streams`.

Liveness: the client heartbeats every ``heartbeat_interval`` (from the broker's
Welcome). Silence on both sockets for ``interval * liveness`` triggers a health probe
over the control socket; no answer means the broker is gone. The broker publishes
``_heartbeat/`` every interval, so an answered probe after a long silence of the data
socket means that socket dropped the broker (libzmq does, for good, when a peer breaks
the protocol, e.g. sends over ``MAXMSGSIZE``). A new epoch on any envelope or Welcome,
an ``unknown_client`` error, a lost broker or a dropped data socket all lead to the
same recovery: a fresh DEALER (Lazy Pirate) and SUB, hello, re-subscribe everything
with snapshots, tell subscribers (``down`` / ``restored`` status events). No user code
is needed.

Lifetime: ``async with BrokerClient() as client`` or ``await client.close()``. If the
object is dropped without closing, a :func:`weakref.finalize` (which holds the sockets,
never the client) sends Bye and closes everything; background tasks hold only weak
references so they never keep a dropped client alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final, TypeVar

import structlog
import zmq

from clients import sockets
from clients.core import (
    ClientCore,
    HelloRefused,
    Refused,
    Replied,
    Resync,
    Stray,
    Welcomed,
    client_notice,
)
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
    GetSnapshot,
    Health,
    HealthReply,
    HealthRequest,
    Metrics,
    MetricsReply,
    MetricsRequest,
    SnapshotReply,
    StatusEvent,
    StatusState,
    StreamSpec,
    Subscribe,
    SubscribeOk,
    Unsubscribe,
    UnsubscribeOk,
    Welcome,
    decode_broker_message,
    default_endpoints,
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


class _Reset(Exception):
    """A request's socket was replaced while it waited (internal: retried once)."""


class BrokerClient(StreamMethods):
    """Asyncio client of the local upbit-broker.

    With no arguments the endpoints come from :func:`schemas.bus.default_endpoints`
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
            default_control, default_data = default_endpoints(os.environ)
            control = control or default_control
            data = data or default_data
        self.control_endpoint = control
        self.data_endpoint = data
        self.name = name or os.path.basename(sys.argv[0] or "python")
        self.request_timeout = request_timeout
        self.client_id = uuid.uuid4().hex
        self._core = ClientCore(self.client_id, self.name, os.getpid())
        self._dispatcher = Dispatcher()
        self._io: sockets.IO | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._welcomed = asyncio.Event()
        """Mirrors ``core.up`` for waiters (set by :meth:`_sync_up`)."""
        self._connect_lock = asyncio.Lock()
        self._state_lock = asyncio.Lock()
        self._hello_waiter: asyncio.Future[Welcome] | None = None
        self._futures: dict[int, asyncio.Future[BrokerMessage]] = {}
        self._lag_ms = 0.0
        self._resync_task: asyncio.Task[None] | None = None
        self._resync_reason = ""
        self._log = structlog.get_logger("clients").bind(client=self.client_id[:8])

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> BrokerClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while a broker has welcomed this client (False while recovering)."""
        return self._core.up

    @property
    def epoch(self) -> str | None:
        """The welcoming broker's epoch (changes when the broker restarts)."""
        return self._dispatcher.epoch

    async def connect(self) -> None:
        """Open the sockets and hello the broker; raises BrokerUnavailable if none answers."""
        if self._core.closed:
            raise ClientClosed("client closed")
        if self._core.welcome is not None:
            return
        async with self._connect_lock:
            if self._core.welcome is not None:
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
        if self._core.closed:
            return
        self._fail(self._core.close(), ClientClosed("client closed"))
        self._sync_up()
        self._dispatcher.clear()
        tasks = list(self._io.tasks) if self._io is not None else []
        self._shutdown_io()
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in tasks if t is not current), return_exceptions=True)

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        prefixes = [HEARTBEAT_TOPIC, STATUS_TOPIC_PREFIX, *self._dispatcher.prefixes]
        data = sockets.open_sub(ctx, self.data_endpoint, prefixes, hwm=RCVHWM)
        ctrl = sockets.open_dealer(ctx, self.control_endpoint)
        io = sockets.IO(loop, ctrl, data, self._dispatcher)
        self._io = io
        loop.add_reader(io.ctrl.FD, sockets.on_readable, weakref.WeakMethod(self._drain_control))
        loop.add_reader(data.FD, sockets.on_readable, weakref.WeakMethod(self._drain_data))
        self._finalizer = weakref.finalize(self, sockets.release, io)
        self._spawn(sockets.heartbeat_loop(weakref.WeakMethod(self._tick)))
        self._core.heard_data(loop.time())

    def _replace_ctrl(self) -> None:
        """Lazy Pirate: a fresh DEALER, so nothing queued for a dead broker is replayed."""
        io = self._io
        assert io is not None
        ctrl = sockets.open_dealer(zmq.Context.instance(), self.control_endpoint)  # checks first
        with contextlib.suppress(Exception):
            io.loop.remove_reader(io.ctrl.FD)
        sockets.close_ctrl(io.ctrl)
        io.ctrl = ctrl
        io.loop.add_reader(io.ctrl.FD, sockets.on_readable, weakref.WeakMethod(self._drain_control))
        self._fail(self._core.reset(), _Reset())

    def _replace_data(self) -> None:
        """A fresh SUB too: libzmq never reconnects one that dropped a misbehaving peer."""
        io = self._io
        assert io is not None
        prefixes = [HEARTBEAT_TOPIC, STATUS_TOPIC_PREFIX, *self._dispatcher.prefixes]
        data = sockets.open_sub(zmq.Context.instance(), self.data_endpoint, prefixes, hwm=RCVHWM)
        with contextlib.suppress(Exception):
            io.loop.remove_reader(io.data.FD)
        io.data.close(linger=0)
        io.data = data
        io.loop.add_reader(io.data.FD, sockets.on_readable, weakref.WeakMethod(self._drain_data))

    def _shutdown_io(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs sockets.release once and detaches
        self._finalizer = None
        self._io = None
        self._core.disconnect()
        self._sync_up()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        io = self._io
        assert io is not None
        task = io.loop.create_task(coro)
        io.tasks.add(task)
        task.add_done_callback(io.tasks.discard)
        return task

    def _sync_up(self) -> None:
        """Make the waiters' event follow the core's ``up``."""
        if self._core.up:
            self._welcomed.set()
        else:
            self._welcomed.clear()

    def _wake_data(self) -> None:
        io = self._io
        if io is not None:
            io.loop.call_soon(sockets.on_readable, weakref.WeakMethod(self._drain_data))

    # ------------------------------------------------------------------ control plane

    def _send(self, message: ClientMessage) -> None:
        io = self._io
        if io is None:
            raise (
                ClientClosed("client closed")
                if self._core.closed
                else BrokerUnavailable("not connected")
            )
        try:
            io.ctrl.send(encode(message), zmq.NOBLOCK)
        except zmq.Again:
            raise BrokerUnavailable("control queue to the broker is full") from None
        # A send can consume the socket's edge-triggered readiness: look again soon.
        io.loop.call_soon(sockets.on_readable, weakref.WeakMethod(self._drain_control))

    def _drain_control(self) -> None:
        io = self._io
        if io is None:
            return
        recv = io.ctrl.recv
        while True:
            try:
                frame = recv(zmq.NOBLOCK)
            except zmq.ZMQError:  # Again, or the socket was just replaced
                break
            try:
                message = decode_broker_message(frame)
            except DecodeError as exc:
                self._core.heard(io.loop.time())
                self._log.warning("unreadable broker message", error=str(exc))
                continue
            self._on_control(message, io.loop.time())

    def _on_control(self, message: BrokerMessage, now: float) -> None:
        event = self._core.receive(message, now)
        if isinstance(event, Replied | Refused):
            future = self._futures.get(event.req)
            if future is not None and not future.done():
                if isinstance(event, Replied):
                    future.set_result(event.message)
                else:
                    future.set_exception(event.error)
        elif isinstance(event, Welcomed | HelloRefused):
            waiter = self._hello_waiter
            if waiter is not None and not waiter.done():
                if isinstance(event, Welcomed):
                    waiter.set_result(event.welcome)
                else:
                    waiter.set_exception(event.error)
        elif isinstance(event, Resync):
            self._schedule_resync(event.reason)
        elif isinstance(event, Stray):
            self._log.warning("broker error", code=event.code, message=event.message)

    async def _hello(self, limit: float) -> Welcome:
        waiter: asyncio.Future[Welcome] = asyncio.get_running_loop().create_future()
        self._hello_waiter = waiter
        try:
            self._send(self._core.hello())
            return await asyncio.wait_for(waiter, limit)
        except TimeoutError:
            raise BrokerTimeout(f"no welcome within {limit:g} s") from None
        finally:
            self._hello_waiter = None
            self._core.hello_over()

    def _on_welcomed(self, welcome: Welcome) -> None:
        io = self._io
        self._core.welcomed(welcome, io.loop.time() if io is not None else 0.0)
        self._dispatcher.resume(welcome.epoch)
        self._sync_up()

    async def _ensure_welcomed(self) -> None:
        if self._core.closed:
            raise ClientClosed("client closed")
        if self._core.welcome is None:
            await self.connect()
        if not self._core.up:
            try:
                await asyncio.wait_for(self._welcomed.wait(), self.request_timeout)
            except TimeoutError:
                raise BrokerUnavailable("the broker is unavailable (reconnecting)") from None
        if self._core.closed:
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
        req, message = self._core.request(make, expect)  # type: ignore[arg-type]
        future: asyncio.Future[BrokerMessage] = asyncio.get_running_loop().create_future()
        self._futures[req] = future
        try:
            self._send(message)
            reply = await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise BrokerTimeout(f"no reply from the broker within {limit:g} s") from None
        finally:
            self._futures.pop(req, None)
            self._core.abandon(req)
        assert isinstance(reply, expect)  # the core checked the reply's type
        return reply

    def _fail(self, reqs: Iterable[int], exc: BaseException) -> None:
        """Requests that will never be answered fail with ``exc``; so does a hello."""
        for req in reqs:
            future = self._futures.get(req)
            if future is not None and not future.done():
                future.set_exception(exc)
        waiter = self._hello_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(BrokerUnavailable("the connection to the broker was reset"))

    # ------------------------------------------------------------------ liveness, recovery

    def _tick(self) -> float | None:
        """One heartbeat period: beat, re-check readiness, probe a silent broker.

        None ends the heartbeat loop (the client is closed).
        """
        core = self._core
        if core.closed:
            return None
        io = self._io
        if io is None or core.welcome is None:
            return core.tick(0.0).delay
        # Edge-triggered zmq fds can miss a wake-up in rare interleavings: look anyway.
        self._drain_control()
        self._drain_data()
        tick = core.tick(io.loop.time())
        if tick.beat:
            d = self._dispatcher
            dropped = sum(sub.dropped for sub in d.subscriptions)
            with contextlib.suppress(BrokerUnavailable, ClientClosed):
                self._send(core.heartbeat(d.received, d.gaps, self._lag_ms, dropped))
        if tick.probe:
            self._spawn(sockets.run_weak(weakref.WeakMethod(self._probe_once)))
        return tick.delay

    async def _probe_once(self) -> None:
        """Nothing heard for a while: ask for health; no answer means the broker is gone."""
        core = self._core
        try:
            if core.welcome is None:
                return
            reply = await self._request_once(HealthRequest, HealthReply, core.liveness_timeout)
        except _Reset:
            return
        except (BrokerTimeout, BrokerUnavailable):
            self._schedule_resync("the broker stopped answering")
        except BrokerError as exc:
            self._schedule_resync(f"health probe refused ({exc.code})")
        else:
            io = self._io
            now = io.loop.time() if io is not None else 0.0
            resync = core.probe_answered(reply.health.epoch, now)
            if resync is not None:
                self._schedule_resync(resync.reason)
        finally:
            core.probe_over()

    def _schedule_resync(self, reason: str) -> None:
        """Start recovery (once): subscribers hear ``down``, updates buffer meanwhile."""
        if self._io is None or not self._core.begin_resync():
            return
        self._log.warning("reconnecting to the broker", reason=reason)
        self._sync_up()
        self._notify("down", reason)
        self._dispatcher.suspend()
        self._resync_reason = reason
        self._resync_task = self._spawn(
            sockets.retry_loop(weakref.WeakMethod(self._resync_attempt))
        )

    async def _resync_attempt(self) -> bool | None:
        """One recovery attempt; True when done, None when the client went away."""
        done = await self._resync_once(self._resync_reason)
        if done is None or done:
            self._core.resync_done()
            self._resync_task = None
        return done

    async def _resync_once(self, reason: str) -> bool | None:
        """One recovery attempt: fresh DEALER and SUB, hello, re-subscribe with snapshots."""
        async with self._state_lock:
            if self._core.closed or self._io is None:
                return None
            timeout = self._core.recovery_timeout(self.request_timeout)
            self._dispatcher.suspend()
            try:
                self._replace_ctrl()  # UntrustedBroker: an impostor took the path; retried
                self._replace_data()
                self._on_welcomed(await self._hello(timeout))
                await self._resubscribe_all(timeout)
            except (BrokerError, BrokerTimeout, BrokerUnavailable, _Reset):
                self._core.resync_failed()  # retried with backoff; "down" was already told
                self._sync_up()
                return False
            self._log.info("reconnected to the broker", epoch=self._dispatcher.epoch, reason=reason)
            self._notify("restored", f"reconnected after: {reason}")
            return True

    async def _resubscribe_all(self, limit: float) -> None:
        specs = self._core.streams.held
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

    def _notify(
        self, state: StatusState, detail: str, subs: list[Subscription[Any]] | None = None
    ) -> None:
        """A status notice made by the client itself, to each listening subscription."""
        now_ns = time.time_ns()
        epoch = self._dispatcher.epoch or ""
        for sub in self._dispatcher.subscriptions if subs is None else subs:
            if sub._on_status is not None:
                sub._status(
                    client_notice(
                        state, detail, sub.connection, sub.topics, epoch=epoch, now_ns=now_ns
                    )
                )

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
        self._core.heard_data(loop.time())
        if d.last_recv_ns:
            self._lag_ms = max(0.0, (time.time_ns() - d.last_recv_ns) / 1e6)
        if n >= BATCH or d.received >= stop_at:  # more may wait: after other tasks ran
            self._wake_data()
        if d.status_events:
            events, d.status_events = d.status_events, []
            for env in events:
                assert isinstance(env.data, StatusEvent)
                self._core.on_status(env.data)
        if d.foreign_epoch is not None:
            self._schedule_resync(f"broker restarted (epoch {d.foreign_epoch})")

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
            self._wake_data()

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
                if attempt or not recoverable or self._core.closed:
                    raise
                self._schedule_resync(f"subscribe failed ({exc})")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _subscribe_locked(self, sub: Subscription[Any]) -> None:
        """Clone pattern: SUB first, then Subscribe (new streams) / GetSnapshot (held ones)."""
        d = self._dispatcher
        book = self._core.streams
        if not self._core.up:
            raise BrokerUnavailable("the broker is unavailable (reconnecting)")
        self._sub_prefixes(d.add(sub), subscribe=True)
        new, held = book.split(sub.streams)
        timeout = self.request_timeout
        snapshot: list[Envelope] = []
        topics = [book.topic(s) for s in held]
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
                topics.extend(book.adopt(new, ok.topics))
        except BaseException as exc:
            self._sub_prefixes(d.remove(sub), subscribe=False)
            sub._close()
            if isinstance(exc, _Reset):
                raise BrokerUnavailable("the connection to the broker was reset") from None
            raise
        book.hold(sub.streams)
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
            release = self._core.streams.release(sub.streams)
            if not release or not self._core.up:
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
        return self._core.available("public")

    def is_private_available(self) -> bool:
        """Whether myOrder/myAsset can flow now; False when the broker has no keys."""
        return self._core.available("private")

    @property
    def received(self) -> int:
        """Envelopes received on the data socket."""
        return self._dispatcher.received

    @property
    def gaps(self) -> int:
        """Sequence gaps seen over all topics."""
        return self._dispatcher.gaps
