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

Liveness: a broker whose process dies has its connections closed by the kernel, which a
monitor on the data socket reports at once: a SIGKILLed broker is reported within
milliseconds (``tests/integration/test_outage.py``). A broker that is alive but silent
(frozen, or its host unreachable over tcp) publishes no ``_heartbeat/``: a data socket
silent for 3 intervals (:data:`clients.core.LOST_AFTER`, checked every quarter interval)
means it is gone. A broker that stops on SIGTERM/SIGINT says goodbye (a ``down`` status,
detail ``broker stopping``): reported at once. A new epoch on any envelope or Welcome,
an ``unknown_client`` error, a lost or departing broker, or a dropped data socket all
lead to the same recovery: a fresh DEALER (Lazy Pirate) and SUB, hello, re-subscribe
everything with snapshots. Each subscription hears, once: ``down``, a ``gap`` per topic,
``reconnecting``, then ``restored`` once its upstream connection carries data again. No
user code is needed.

Heartbeats do not depend on user code returning. A sync callback runs inline on the
event loop, so a callback that blocks for 5 s stops the loop for 5 s; the broker expires
a client silent for ``interval * liveness`` (3 s by default). So heartbeats go out from
a daemon thread of their own, on the control DEALER itself, under a lock that every use
of that socket takes (libzmq sockets may change threads behind a full memory barrier,
which the lock gives). Two alternatives were weighed: a heartbeat DEALER of its own
would be another client to the broker (it knows clients by their ROUTER identity, which
two sockets cannot share), and ZMTP heartbeats (``ZMQ_HEARTBEAT_IVL``) keep the TCP/IPC
session alive but never reach the broker's liveness table, which only application
messages refresh. A callback blocked for 5 s at a 0.5 s interval keeps its client
(``test_a_callback_blocking_for_longer_than_the_expiry_keeps_its_client``).

Lifetime: ``async with BrokerClient() as client`` or ``await client.close()``. If the
object is dropped without closing, a :func:`weakref.finalize` (which holds the sockets,
never the client) sends Bye and closes everything; background tasks hold only weak
references so they never keep a dropped client alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, TypeVar

import structlog
import zmq

from clients import sockets
from clients.core import (
    LOST_AFTER,
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
    AccountQuery,
    BrokerMessage,
    CancelledOrder,
    CancelOrder,
    ClientMessage,
    ConnectionName,
    Envelope,
    GetSnapshot,
    Health,
    HealthReply,
    HealthRequest,
    Metrics,
    MetricsReply,
    MetricsRequest,
    OrderChance,
    OrderReply,
    PlaceOrder,
    Quote,
    QuoteReply,
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
from schemas.rest import (
    RestAccount,
    RestCandle,
    RestMarket,
    RestOrder,
    RestOrderbook,
    RestTicker,
    RestTrade,
)

__all__ = ["Amount", "BrokerClient", "StatusCallback", "amount_text", "new_identifier"]

R = TypeVar("R")

BATCH: Final = 4096
"""Messages handled per wake-up before yielding to other tasks (fairness under load)."""
RCVHWM: Final = 10_000
"""SUB queue bound inside ZeroMQ, in frames of 1 to 16 messages and at most 8 KB: 10,000
messages at low rates, at most ~80 MB under load (~0.5 s at 120k msg/s); past it the
broker's PUB drops for this client only, and the client counts the gap."""
IDLE_BEAT: Final = 0.25
"""Seconds the heartbeat thread waits while the client sends no heartbeats."""
CANDLE_PAGE_WAIT: Final = 0.25
"""Extra seconds a :meth:`BrokerClient.candles` request waits per 200 candles: the broker
pages them past Upbit's 200 per call, paced by the host's candle budget (10 calls/s)."""
ORDER_TIMEOUT: Final = 30.0
"""Seconds a placement or cancel may take: it queues behind the pocket's order budget
(about 9 a second for every program together), and a placement whose answer Upbit lost
is looked up by its identifier for a few seconds more."""

Amount = Decimal | str | int | float
"""A price or volume: kept exactly as written (a float goes by its shortest repr)."""


def amount_text(value: Amount | None) -> str | None:
    """``value`` as decimal text without an exponent, None if None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise TypeError("an amount must be a number, not a bool")
    number = value if isinstance(value, Decimal) else Decimal(repr(value))
    return format(number, "f")


def new_identifier() -> str:
    """A fresh order identifier (random, so unique across programs and restarts)."""
    return f"c-{uuid.uuid4().hex}"


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
        self._ctrl_lock = threading.Lock()
        """Held for every use of the control DEALER: the heartbeat thread shares it."""
        self._beat_counters: tuple[int, int, float, int] = (0, 0, 0.0, 0)
        """What the next heartbeat reports (set on the loop, read by the heartbeat thread)."""
        self._beat_stop: threading.Event | None = None
        self._held_epoch: str | None = None
        """The broker epoch our streams were last (re)subscribed in: a recovery to
        another one asks for its private messages so far (replay)."""
        self._data_seen: asyncio.Future[None] | None = None
        """Done once the current SUB has received a broker heartbeat: its connection is
        live and the broker has every topic prefix of it (sent before the heartbeat's,
        :meth:`_sub_order`; see :meth:`_data_path`); failed when the client closes or
        counts the broker gone first."""
        self._heartbeats_before = 0
        """Heartbeats counted when the SUB was (re)opened: one more means it is live."""
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
            self._held_epoch = welcome.epoch

    async def close(self) -> None:
        """Say Bye, close the sockets, end every subscription and task. Idempotent."""
        if self._core.closed:
            return
        self._fail(self._core.close(), ClientClosed("client closed"))
        self._data_lost(ClientClosed("client closed"))
        self._sync_up()
        self._dispatcher.clear()
        tasks = list(self._io.tasks) if self._io is not None else []
        self._shutdown_io()
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in tasks if t is not current), return_exceptions=True)

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        data = sockets.open_sub(ctx, self.data_endpoint, self._sub_order(), hwm=RCVHWM)
        ctrl = sockets.open_dealer(ctx, self.control_endpoint)
        io = sockets.IO(loop, ctrl, data, self._dispatcher)
        self._io = io
        self._await_data(loop)
        loop.add_reader(io.ctrl.FD, sockets.on_readable, weakref.WeakMethod(self._drain_control))
        loop.add_reader(data.FD, sockets.on_readable, weakref.WeakMethod(self._drain_data))
        loop.add_reader(io.monitor.FD, sockets.on_readable, weakref.WeakMethod(self._check_link))
        self._finalizer = weakref.finalize(self, sockets.release, io)
        self._spawn(sockets.heartbeat_loop(weakref.WeakMethod(self._tick)))
        self._core.heard_data(loop.time())
        stop = self._beat_stop = threading.Event()
        threading.Thread(
            target=_beat_forever,
            args=(weakref.WeakMethod(self._beat_once), stop),
            name="upbit-broker-heartbeat",
            daemon=True,
        ).start()

    def _replace_ctrl(self) -> None:
        """Lazy Pirate: a fresh DEALER, so nothing queued for a dead broker is replayed."""
        io = self._io
        assert io is not None
        ctrl = sockets.open_dealer(zmq.Context.instance(), self.control_endpoint)  # checks first
        with contextlib.suppress(Exception):
            io.loop.remove_reader(io.ctrl.FD)
        with self._ctrl_lock:
            sockets.close_ctrl(io.ctrl)
            io.ctrl = ctrl
        io.loop.add_reader(io.ctrl.FD, sockets.on_readable, weakref.WeakMethod(self._drain_control))
        self._fail(self._core.reset(), _Reset())

    def _await_data(self, loop: asyncio.AbstractEventLoop) -> None:
        """A fresh SUB is not live until a heartbeat more than so far comes through it."""
        self._data_seen = _data_waiter(loop)
        self._heartbeats_before = self._dispatcher.heartbeats

    def _sub_order(self) -> list[str]:
        """A fresh SUB's prefixes, the heartbeat's last: the broker applies one SUB's
        prefixes in the order sent, so its heartbeat reaching us means every other
        prefix is in place (:meth:`_data_path`), not just the first few."""
        return [STATUS_TOPIC_PREFIX, *self._dispatcher.prefixes, HEARTBEAT_TOPIC]

    def _replace_data(self) -> None:
        """A fresh SUB too: libzmq never reconnects one that dropped a misbehaving peer."""
        io = self._io
        assert io is not None
        data = sockets.open_sub(
            zmq.Context.instance(), self.data_endpoint, self._sub_order(), hwm=RCVHWM
        )
        monitor = sockets.watch_disconnect(data)
        with contextlib.suppress(Exception):
            io.loop.remove_reader(io.data.FD)
        with contextlib.suppress(Exception):
            io.loop.remove_reader(io.monitor.FD)
        sockets.close_watched(io.data, io.monitor)
        io.data, io.monitor = data, monitor
        self._data_lost(BrokerUnavailable("the data socket was replaced"))
        self._await_data(io.loop)
        io.loop.add_reader(io.data.FD, sockets.on_readable, weakref.WeakMethod(self._drain_data))
        io.loop.add_reader(monitor.FD, sockets.on_readable, weakref.WeakMethod(self._check_link))

    def _shutdown_io(self) -> None:
        if self._beat_stop is not None:
            self._beat_stop.set()
            self._beat_stop = None
        if self._finalizer is not None:
            with self._ctrl_lock:
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
            with self._ctrl_lock:
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
        lock = self._ctrl_lock
        while True:
            try:
                with lock:
                    frame = recv(zmq.NOBLOCK)
            except zmq.ZMQError:  # Again, or the socket was just replaced
                break
            try:
                message = decode_broker_message(frame)
            except DecodeError as exc:
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
            async with asyncio.timeout(limit):  # (not wait_for: it can swallow a cancel)
                return await waiter
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
                async with asyncio.timeout(self.request_timeout):
                    await self._welcomed.wait()
            except TimeoutError:
                raise BrokerUnavailable("the broker is unavailable (reconnecting)") from None
        if self._core.closed:
            raise ClientClosed("client closed")

    async def _request(
        self, make: Callable[[int], ClientMessage], expect: type[R], timeout: float | None = None
    ) -> R:
        """A user request: waits while the client reconnects, and is retried once when
        the broker restarted or forgot us meanwhile (recovery uses _request_once).
        ``timeout`` replaces ``request_timeout`` for requests known to take longer."""
        for attempt in range(2):
            await self._ensure_welcomed()
            try:
                limit = self.request_timeout if timeout is None else timeout
                return await self._request_once(make, expect, limit)
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
            async with asyncio.timeout(limit):
                reply = await future
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
        """A quarter heartbeat period: re-check readiness, note the counters the next
        heartbeat reports, recover from a lost broker.

        None ends the loop (the client is closed).
        """
        core = self._core
        if core.closed:
            return None
        io = self._io
        if io is None or core.welcome is None:
            return core.tick(0.0).delay
        # Edge-triggered zmq fds can miss a wake-up in rare interleavings: look anyway.
        # Data read first: after the loop was blocked (a slow callback), what waits in
        # the socket is not silence.
        self._drain_control()
        self._drain_data()
        d = self._dispatcher
        dropped = sum(sub.dropped for sub in d.subscriptions)
        self._beat_counters = (d.received, d.gaps, self._lag_ms, dropped)
        self._check_link()
        tick = core.tick(io.loop.time())
        if tick.lost:
            silence = LOST_AFTER * core.welcome.heartbeat_interval
            self._schedule_resync(f"no heartbeat from the broker for {silence:g} s")
        return tick.delay

    def _check_link(self) -> None:
        """The data connection dropped (the broker's process died, or it dropped us):
        recover now rather than after :data:`LOST_AFTER` silent intervals."""
        io = self._io
        if io is not None and sockets.disconnected(io.monitor):
            self._schedule_resync("the broker closed the connection")

    def _beat_once(self) -> float:
        """Heartbeat thread: send a heartbeat when one is due; seconds until the next.

        Runs outside the event loop; touches the control socket only under its lock.
        """
        with self._ctrl_lock:
            io = self._io
            due = self._core.beat_due(time.monotonic()) if io is not None else None
            if io is None or due is None:
                return IDLE_BEAT
            if due > 0:
                return due
            beat = self._core.heartbeat(*self._beat_counters)
            with contextlib.suppress(zmq.ZMQError):  # full or closed: the next one goes
                io.ctrl.send(encode(beat), zmq.NOBLOCK)
        # The send may consume the socket's edge-triggered readiness: the loop looks.
        with contextlib.suppress(RuntimeError):  # its loop is closed
            io.loop.call_soon_threadsafe(
                sockets.on_readable, weakref.WeakMethod(self._drain_control)
            )
        return self._core.beat_due(time.monotonic()) or IDLE_BEAT

    def _schedule_resync(self, reason: str) -> None:
        """Start recovery (once): subscribers hear ``down``, updates buffer meanwhile."""
        if self._io is None or not self._core.begin_resync():
            return
        self._log.warning("reconnecting to the broker", reason=reason)
        self._data_lost(BrokerUnavailable(f"the broker is unavailable (reconnecting: {reason})"))
        self._sync_up()
        self._notify("down", reason)
        self._notify("gap", f"updates may be lost: {reason}", per_topic=True)
        self._notify("reconnecting", "reconnecting to the broker")
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
                welcome = await self._hello(timeout)
                # Another broker than the one our streams were held by: its private
                # messages so far were published before we were back (replay them).
                restarted = self._held_epoch not in (None, welcome.epoch)
                self._on_welcomed(welcome)
                await self._data_path(timeout)
                await self._resubscribe_all(timeout, replay=restarted)
                self._held_epoch = welcome.epoch
                health = await self._request_once(HealthRequest, HealthReply, timeout)
            except (BrokerError, BrokerTimeout, BrokerUnavailable, _Reset):
                self._core.resync_failed()  # retried with backoff; "down" was already told
                self._sync_up()
                return False
            self._log.info("reconnected to the broker", epoch=self._dispatcher.epoch, reason=reason)
            # "restored" where the upstream connection carries data now; elsewhere the
            # broker's own "up" says it later (each subscription maps it to "restored").
            carrying = _carrying(health.health)
            subs = [s for s in self._dispatcher.subscriptions if s.connection in carrying]
            self._notify("restored", f"reconnected after: {reason}", subs)
            return True

    async def _data_path(self, limit: float) -> None:
        """Wait until the SUB has received a heartbeat (one comes every interval).

        A SUB misses what is published before its connection is up and its
        subscriptions reached the broker (the slow joiner). The heartbeat's prefix is
        sent last, so its first heartbeat means every other prefix is in place; any
        other message (a status event, on a prefix sent first) would not. A topic's
        snapshot and sequence numbers cover a topic that already had a value; not one
        born after the request (a private event the request itself brings out, e.g. the
        first REST sync of a restarted broker): published before the SUB was live, it
        was lost with no gap to tell. So nothing is asked before the data path is live.
        """
        seen = self._data_seen
        if seen is None or (seen.done() and not seen.exception()):
            return
        try:
            async with asyncio.timeout(limit):
                await asyncio.shield(seen)
        except TimeoutError:
            raise BrokerTimeout(
                f"the broker answered but nothing arrived on its data socket "
                f"({self.data_endpoint}) within {limit:g} s"
            ) from None

    def _data_lost(self, error: BrokerUnavailable | ClientClosed) -> None:
        """Wake whoever waits for the current SUB's first message with ``error``: the
        client closes, or the broker is gone and a recovery will replace the SUB."""
        seen = self._data_seen
        if seen is not None and not seen.done():
            seen.set_exception(error)

    async def _resubscribe_all(self, limit: float, *, replay: bool = False) -> None:
        """Subscribe every held stream again, with snapshots; ``replay``: the broker
        restarted, so its private messages so far come too (:class:`Subscribe`)."""
        specs = self._core.streams.held
        snapshot: list[Envelope] = []
        cut: list[str] = []  # private topics whose replay misses their oldest messages
        failed: dict[str, BrokerError] = {}
        if specs:
            try:
                ok = await self._request_once(
                    lambda r: Subscribe(r, specs, replay=replay), SubscribeOk, limit
                )
                snapshot = ok.snapshot
                cut = ok.cut
            except BrokerError as exc:
                if exc.code == "unknown_client":
                    raise
                # One stream the new broker refuses must not cost the others.
                for spec in specs:
                    try:
                        ok = await self._request_once(
                            lambda r, s=spec: Subscribe(r, [s], replay=replay),  # type: ignore[misc]
                            SubscribeOk,
                            limit,
                        )
                        snapshot.extend(ok.snapshot)
                        cut.extend(ok.cut)
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
            if replay and any(d.matches(sub, topic) for topic in cut):
                self._notify(
                    "gap", "the restarted broker no longer keeps its first private messages", [sub]
                )

    def _notify(
        self,
        state: StatusState,
        detail: str,
        subs: list[Subscription[Any]] | None = None,
        *,
        per_topic: bool = False,
    ) -> None:
        """A status notice made by the client itself, to each listening subscription
        (``per_topic``: one notice for each of its topics)."""
        now_ns = time.time_ns()
        epoch = self._dispatcher.epoch or ""
        for sub in self._dispatcher.subscriptions if subs is None else subs:
            if sub._on_status is None:
                continue
            for topics in [[t] for t in sub.topics] if per_topic else [sub.topics]:
                sub._status(
                    client_notice(state, detail, sub.connection, topics, epoch=epoch, now_ns=now_ns)
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
        seen = self._data_seen
        if seen is not None and not seen.done() and d.heartbeats > self._heartbeats_before:
            seen.set_result(None)
        if d.last_recv_ns:
            self._lag_ms = max(0.0, (time.time_ns() - d.last_recv_ns) / 1e6)
        if n >= BATCH or d.received >= stop_at:  # more may wait: after other tasks ran
            self._wake_data()
        if d.status_events:
            events, d.status_events = d.status_events, []
            for env in events:
                assert isinstance(env.data, StatusEvent)
                goodbye = self._core.on_status(env.data)
                if goodbye is not None:
                    self._schedule_resync(goodbye.reason)
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
        try:
            await self._data_path(timeout)
        except BaseException:
            self._sub_prefixes(d.remove(sub), subscribe=False)
            sub._close()
            raise
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

    async def _quote(
        self, make: Callable[[int], Quote], timeout: float | None = None
    ) -> QuoteReply:
        return await self._request(make, QuoteReply, timeout)

    async def markets(self) -> list[RestMarket]:
        """Every market Upbit lists, with names and warnings (the broker's cached list)."""
        return (await self._quote(lambda r: Quote(r, "markets"))).markets

    async def candles(
        self, code: str, unit: str = "1m", *, count: int = 1, to: str | datetime | None = None
    ) -> list[RestCandle]:
        """Up to ``count`` (at most 10,000) candles of ``code`` before ``to``, newest first.

        ``unit``: ``1s``, ``1m``, ``3m``, ``5m``, ``10m``, ``15m``, ``30m``, ``60m``,
        ``240m``, ``days``, ``weeks``, ``months``, ``years``. ``to``: an ISO 8601 text or
        a datetime (no zone means UTC); None for the latest candles.
        """
        when = to.isoformat() if isinstance(to, datetime) else to
        pages = -(-max(count, 1) // 200)
        return (
            await self._quote(
                lambda r: Quote(r, "candles", [code], unit=unit, count=count, to=when),
                self.request_timeout + pages * CANDLE_PAGE_WAIT,
            )
        ).candles

    async def tickers(self, codes: str | Iterable[str]) -> list[RestTicker]:
        """Current tickers of ``codes`` (REST: every field, accumulated values included)."""
        listed = [codes] if isinstance(codes, str) else list(codes)
        return (await self._quote(lambda r: Quote(r, "tickers", listed))).tickers

    async def orderbooks(
        self, codes: str | Iterable[str], *, depth: int | None = None, level: float | None = None
    ) -> list[RestOrderbook]:
        """Current orderbooks of ``codes``: ``depth`` levels (1 to 30, default 30),
        grouped by ``level`` (KRW markets; an unsupported level gives no book)."""
        listed = [codes] if isinstance(codes, str) else list(codes)
        return (
            await self._quote(lambda r: Quote(r, "orderbooks", listed, depth=depth, level=level))
        ).orderbooks

    async def trades(self, code: str, *, count: int = 50) -> list[RestTrade]:
        """The latest ``count`` (1 to 500) trades of ``code``, newest first."""
        return (await self._quote(lambda r: Quote(r, "trades", [code], count=count))).trades

    # ------------------------------------------------------------------ account, orders

    async def _account(
        self, make: Callable[[int], ClientMessage], timeout: float | None = None
    ) -> OrderReply:
        return await self._request(make, OrderReply, timeout)

    async def accounts(self) -> list[RestAccount]:
        """The balances of the broker's Upbit account (needs keys at the broker)."""
        return (await self._account(lambda r: AccountQuery(r, "accounts"))).accounts

    async def order_chance(self, market: str) -> OrderChance:
        """Fees, order types, limits and both balances of ``market`` for ordering."""
        reply = await self._account(lambda r: AccountQuery(r, "chance", market=market))
        assert reply.chance is not None  # the broker fills it for this kind
        return reply.chance

    async def get_order(
        self, uuid: str | None = None, *, identifier: str | None = None
    ) -> RestOrder:
        """One order by ``uuid`` or ``identifier``, with its trades (``order.trades``)."""
        reply = await self._account(
            lambda r: AccountQuery(r, "order", uuid=uuid, identifier=identifier)
        )
        assert reply.order is not None
        return reply.order

    async def open_orders(
        self,
        market: str | None = None,
        *,
        states: Iterable[str] = (),
        page: int | None = None,
        limit: int | None = None,
        order_by: str | None = None,
    ) -> list[RestOrder]:
        """Open orders (``states``: ``wait``, ``watch``), one page of up to ``limit`` (100)."""
        listed = list(states)
        reply = await self._account(
            lambda r: AccountQuery(
                r, "open_orders", market=market, states=listed, page=page, limit=limit,
                order_by=order_by,
            )
        )  # fmt: skip
        return reply.orders

    async def closed_orders(
        self,
        market: str | None = None,
        *,
        states: Iterable[str] = (),
        start_time: str | datetime | None = None,
        end_time: str | datetime | None = None,
        limit: int | None = None,
        order_by: str | None = None,
    ) -> list[RestOrder]:
        """Closed orders (``states``: ``done``, ``cancel``) in a window of at most 7 days
        (Upbit's default: the last 7 days), up to ``limit`` (1000)."""
        listed = list(states)
        start = start_time.isoformat() if isinstance(start_time, datetime) else start_time
        end = end_time.isoformat() if isinstance(end_time, datetime) else end_time
        reply = await self._account(
            lambda r: AccountQuery(
                r, "closed_orders", market=market, states=listed, start_time=start,
                end_time=end, limit=limit, order_by=order_by,
            )
        )  # fmt: skip
        return reply.orders

    async def place_order(
        self,
        market: str,
        side: str,
        ord_type: str = "limit",
        *,
        volume: Amount | None = None,
        price: Amount | None = None,
        identifier: str | None = None,
        time_in_force: str | None = None,
        smp_type: str | None = None,
    ) -> RestOrder:
        """Place an order with the broker's keys (trading must be on at the broker).

        ``side``: ``bid`` (buy) or ``ask`` (sell). ``ord_type``: ``limit`` (``price``
        and ``volume``), ``price`` (market buy for ``price`` KRW), ``market`` (market
        sell of ``volume``), ``best`` (with ``time_in_force`` ``ioc`` or ``fok``).
        ``time_in_force``: ``ioc``, ``fok``, ``post_only``. ``smp_type``:
        ``cancel_maker``, ``cancel_taker``, ``reduce``. ``identifier``: your unique key
        of the order; one is made when None. The order is sent once: if its outcome is
        unknown (the broker's answer lost), the error names the identifier to look it
        up with :meth:`get_order`. Upbit's refusals raise BrokerError with
        ``upbit_name`` and ``upbit_message``.
        """
        key = identifier if identifier is not None else new_identifier()
        message = functools.partial(
            PlaceOrder,
            market=market,
            side=side,
            ord_type=ord_type,
            volume=amount_text(volume),
            price=amount_text(price),
            identifier=key,
            time_in_force=time_in_force,
            smp_type=smp_type,
        )
        reply = await self._order(message, key)
        assert reply.order is not None
        return reply.order

    async def cancel_order(
        self, uuid: str | None = None, *, identifier: str | None = None
    ) -> RestOrder:
        """Cancel one order by ``uuid`` or ``identifier``; the order as Upbit took the cancel."""
        reply = await self._order(lambda r: CancelOrder(r, uuid=uuid, identifier=identifier))
        assert reply.order is not None
        return reply.order

    async def cancel_orders(
        self, uuids: Iterable[str] = (), *, identifiers: Iterable[str] = ()
    ) -> tuple[list[CancelledOrder], list[CancelledOrder]]:
        """Cancel up to 20 orders at once by ``uuids`` or ``identifiers``:
        ``(cancelled, failed)`` as Upbit answered."""
        by_uuid, by_identifier = list(uuids), list(identifiers)
        reply = await self._order(
            lambda r: CancelOrder(r, uuids=by_uuid, identifiers=by_identifier)
        )
        return reply.cancelled, reply.failed

    async def _order(
        self, make: Callable[[int], ClientMessage], identifier: str = ""
    ) -> OrderReply:
        """A placement or cancel: sent at most once (a lost answer is never re-sent)."""
        limit = max(self.request_timeout, ORDER_TIMEOUT)
        which = f" (identifier {identifier!r})" if identifier else ""
        for attempt in range(2):
            await self._ensure_welcomed()
            try:
                return await self._request_once(make, OrderReply, limit)
            except _Reset:
                raise BrokerUnavailable(
                    f"the connection to the broker was reset while it had the request{which}: "
                    "it may have been carried out; look it up before sending it again"
                ) from None
            except BrokerTimeout:
                raise BrokerTimeout(
                    f"no answer from the broker within {limit:g} s{which}: the request may "
                    "have been carried out; look it up before sending it again"
                ) from None
            except BrokerError as exc:
                # unknown_client: the broker refused it unread, so sending it again is safe.
                if exc.code != "unknown_client" or attempt:
                    raise
                self._schedule_resync("the broker does not know this client")
        raise AssertionError("unreachable")  # pragma: no cover

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


def _data_waiter(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """A fresh SUB's "heard something" future (its failure need not be awaited)."""
    future: asyncio.Future[None] = loop.create_future()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def _carrying(health: Health) -> set[ConnectionName]:
    """The upstream connections that carry data now, by the broker's health."""
    carrying: set[ConnectionName] = set()
    if health.public.state == "up":
        carrying.add("public")
    if health.private is not None and health.private.state == "up":
        carrying.add("private")
    return carrying


def _beat_forever(beat: weakref.WeakMethod[Callable[[], float]], stop: threading.Event) -> None:
    """The heartbeat thread: beat until stopped or the client is gone (weakly held)."""
    while not stop.is_set():
        fn = beat()
        if fn is None:
            return
        try:
            delay = fn()
        except Exception:  # a bug here must not silence the heartbeats for good
            structlog.get_logger("clients").exception("heartbeat failed")
            delay = IDLE_BEAT
        del fn
        stop.wait(delay)
