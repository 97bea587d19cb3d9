"""The client's control plane without I/O: what to send, what a reply means, when to recover.

:class:`ClientCore` takes broker messages and the current time (``now``) and returns
decisions; it never touches a socket, a task or a clock. It matches replies to requests
by request id (and checks the reply's type), remembers the welcoming broker's epoch and
decides when to resync (another epoch, ``unknown_client``, silence), counts who holds
each stream (:class:`StreamBook`: what a subscribe must ask for, what an unsubscribe
releases, what a recovery re-subscribes), follows the upstream availability, and times
liveness. The asyncio shell (:mod:`clients.client`) owns the
sockets and futures and acts on these decisions; the blocking client
(:mod:`clients.sync`) drives that same shell from its thread.

Liveness: the broker publishes ``_heartbeat/`` every interval, busy or not, so a data
socket silent for :data:`LOST_AFTER` intervals means the broker is gone or frozen (a
SIGKILL is noticed at once: the shell watches the data connection drop); a broker that
stops on purpose says goodbye first (a ``down`` status with :data:`BROKER_STOPPING`).
Either way the client reports ``down`` once and recovers. :func:`link_transition` keeps
the status events a subscription sees exact: each transition once, in order.

Sequence and gap tracking of the data plane is :mod:`clients.sequence` (through
:mod:`clients.dispatch`), also pure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from clients.errors import BrokerError
from schemas.bus import (
    BROKER_STOPPING,
    CLIENT_TOPIC,
    BrokerMessage,
    ClientMessage,
    ConnectionName,
    Envelope,
    ErrorReply,
    Heartbeat,
    Hello,
    StatusEvent,
    StatusState,
    StreamSpec,
    Welcome,
)

__all__ = [
    "BROKER_STOPPING",
    "CLIENT_TOPIC",
    "IDLE_TICK",
    "LOST_AFTER",
    "ClientCore",
    "Event",
    "HelloRefused",
    "Refused",
    "Replied",
    "Resync",
    "Stray",
    "StreamBook",
    "Tick",
    "Welcomed",
    "client_notice",
    "link_transition",
]

M = TypeVar("M", bound=ClientMessage)

IDLE_TICK: Final = 0.25
"""Seconds between two ticks while no broker has welcomed the client yet."""
TICKS_PER_INTERVAL: Final = 4
"""Liveness is checked this often per heartbeat interval (beats go once per interval)."""
LOST_AFTER: Final = 3.0
"""Heartbeat intervals of data silence after which the broker counts as gone (the
broker's own default liveness for clients, and the ZeroMQ guide's): two missed beats of
slack, so a broker busy for a moment on a loaded machine is not reported ``down`` to
every client at once. A broker that dies is noticed sooner: its kernel closes the
connection, which the client's socket monitor reports within milliseconds."""
LINK_STATES: Final[frozenset[StatusState]] = frozenset(
    {"connecting", "up", "idle", "down", "reconnecting", "restored", "auth_failed"}
)
"""States of a connection as a whole (the others are about topics: gap, source, ...)."""
_DOWN_STATES: Final[frozenset[StatusState]] = frozenset(
    {"down", "connecting", "reconnecting", "auth_failed"}
)
_UP_STATES: Final[frozenset[StatusState]] = frozenset(
    {"up", "idle", "restored", "source_rest", "source_websocket"}
)


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Replied:
    """The awaited reply to request ``req``."""

    req: int
    message: BrokerMessage


@dataclass(frozen=True, slots=True)
class Refused:
    """Request ``req`` failed: the broker refused it or answered with the wrong type."""

    req: int
    error: BrokerError


@dataclass(frozen=True, slots=True)
class Welcomed:
    """The answer to the hello in flight."""

    welcome: Welcome


@dataclass(frozen=True, slots=True)
class HelloRefused:
    """The broker refused the hello in flight (e.g. ``protocol_version``)."""

    error: BrokerError


@dataclass(frozen=True, slots=True)
class Resync:
    """The broker restarted or forgot this client: hello again and re-subscribe."""

    reason: str


@dataclass(frozen=True, slots=True)
class Stray:
    """An error nobody waits for: worth a log line, nothing more."""

    code: str
    message: str


Event = Replied | Refused | Welcomed | HelloRefused | Resync | Stray


@dataclass(frozen=True, slots=True)
class Tick:
    """What one liveness check asks of the shell (heartbeats: :meth:`ClientCore.beat_due`)."""

    delay: float
    """Seconds until the next tick."""
    lost: bool = False
    """No broker heartbeat for :data:`LOST_AFTER` intervals: the broker is gone."""


# ---------------------------------------------------------------------------- streams


class StreamBook:
    """Reference counts of the streams this client holds at the broker.

    Keyed by the stream's topic as the client spells it; remembers the topic the broker
    confirmed for it (normally the same), so a later subscriber of a held stream is
    routed the same way.
    """

    __slots__ = ("_refs", "_specs", "_topics")

    def __init__(self) -> None:
        self._refs: dict[str, int] = {}
        self._specs: dict[str, StreamSpec] = {}
        self._topics: dict[str, str] = {}

    def split(self, streams: Iterable[StreamSpec]) -> tuple[list[StreamSpec], list[StreamSpec]]:
        """``(new, held)``: streams to Subscribe to, and held ones to ask a snapshot of."""
        new: list[StreamSpec] = []
        held: list[StreamSpec] = []
        for spec in streams:
            (held if spec.topic in self._refs else new).append(spec)
        return new, held

    def topic(self, spec: StreamSpec) -> str:
        """The topic the broker confirmed for a held ``spec``."""
        return self._topics[spec.topic]

    def adopt(self, new: Sequence[StreamSpec], topics: Sequence[str]) -> list[str]:
        """Record the broker's confirmed topics of ``new`` streams; returns them."""
        adopted: list[str] = []
        for spec, topic in zip(new, topics, strict=False):
            self._specs[spec.topic] = spec
            self._topics[spec.topic] = topic
            adopted.append(topic)
        return adopted

    def hold(self, streams: Iterable[StreamSpec]) -> None:
        """One more subscription holds each of ``streams``."""
        for spec in streams:
            self._refs[spec.topic] = self._refs.get(spec.topic, 0) + 1

    def release(self, streams: Iterable[StreamSpec]) -> list[StreamSpec]:
        """One subscription less; returns the streams nobody here holds any more."""
        gone: list[StreamSpec] = []
        for spec in streams:
            count = self._refs.get(spec.topic, 0) - 1
            if count > 0:
                self._refs[spec.topic] = count
                continue
            self._refs.pop(spec.topic, None)
            self._topics.pop(spec.topic, None)
            gone.append(self._specs.pop(spec.topic, spec))
        return gone

    def refs(self, spec: StreamSpec) -> int:
        """How many subscriptions hold ``spec``."""
        return self._refs.get(spec.topic, 0)

    @property
    def held(self) -> list[StreamSpec]:
        """Every stream to re-subscribe after a broker restart (each once)."""
        return list(self._specs.values())


# ---------------------------------------------------------------------------- core


class ClientCore:
    """The control plane of one client: requests, epoch, liveness, recovery decisions.

    Lifecycle: :meth:`hello` / :meth:`welcomed` connect it; :meth:`begin_resync` ...
    :meth:`resync_done` recover it; :meth:`disconnect` forgets the broker (sockets gone)
    and :meth:`close` ends it. :attr:`up` is True while a broker has welcomed it and no
    recovery runs: only then do requests go out.
    """

    def __init__(self, client_id: str, name: str, pid: int) -> None:
        self.client_id = client_id
        self.name = name
        self.pid = pid
        self.streams = StreamBook()
        """Who holds which stream (reference counts)."""
        self.welcome: Welcome | None = None
        """The last Welcome; None before the first connect and after a disconnect."""
        self.up = False
        self.recovering = False
        """A recovery runs (from :meth:`begin_resync` until :meth:`resync_done`)."""
        self.closed = False
        self.hello_pending = False
        self._public = False
        self._private = False
        self._next_req = 1
        self._pending: dict[int, type[BrokerMessage]] = {}
        self._last_data = 0.0
        self._last_beat = float("-inf")

    # ------------------------------------------------------------------ requests

    def hello(self) -> Hello:
        """The Hello to send; its Welcome will come back as :class:`Welcomed`."""
        self.hello_pending = True
        return Hello(client_id=self.client_id, name=self.name, pid=self.pid)

    def hello_over(self) -> None:
        """No Welcome is awaited any more (answered, timed out or reset)."""
        self.hello_pending = False

    def request(self, make: Callable[[int], M], expect: type[BrokerMessage]) -> tuple[int, M]:
        """``(req, message)``: a request with a fresh id, whose reply must be an ``expect``."""
        req = self._next_req
        self._next_req += 1
        self._pending[req] = expect
        return req, make(req)

    def abandon(self, req: int) -> None:
        """Stop waiting for ``req`` (timed out, cancelled): a late reply is ignored."""
        self._pending.pop(req, None)

    @property
    def pending(self) -> list[int]:
        """Requests awaiting a reply."""
        return list(self._pending)

    def reset(self) -> list[int]:
        """The control socket is replaced: nothing in flight will be answered.

        Returns the requests that fail (the shell retries them once).
        """
        failed = list(self._pending)
        self._pending.clear()
        return failed

    def receive(self, message: BrokerMessage, now: float) -> Event | None:
        """What a message from the broker means; None when it needs nothing."""
        if isinstance(message, Welcome):
            if self.hello_pending:
                self.hello_pending = False
                return Welcomed(message)
            if self.welcome is not None and message.epoch != self.welcome.epoch:
                return Resync(f"broker restarted (epoch {message.epoch})")
            return None
        req = message.req
        expect = self._pending.pop(req, None) if req is not None else None
        if isinstance(message, ErrorReply):
            error = BrokerError(
                message.code,
                message.message,
                upbit_name=message.upbit_name,
                upbit_message=message.upbit_message,
            )
            if req is not None and expect is not None:
                return Refused(req, error)
            if message.code == "unknown_client":  # the answer to a heartbeat
                return Resync("the broker does not know this client")
            if self.hello_pending:  # e.g. protocol_version
                self.hello_pending = False
                return HelloRefused(error)
            return Stray(message.code, message.message)
        if req is None or expect is None:
            return None  # late (timed out) or duplicate
        if not isinstance(message, expect):
            error = BrokerError("bad_message", f"unexpected reply {type(message).__name__}")
            return Refused(req, error)
        return Replied(req, message)

    # ------------------------------------------------------------------ connection

    def welcomed(self, welcome: Welcome, now: float) -> None:
        """A broker welcomed us: requests may go out; availability from its Welcome."""
        self.welcome = welcome
        self.up = True
        self._public = welcome.public_available
        self._private = welcome.private_available
        self._last_data = now

    @property
    def epoch(self) -> str | None:
        """The welcoming broker's epoch (None before the first Welcome)."""
        return self.welcome.epoch if self.welcome is not None else None

    def check_epoch(self, epoch: str) -> Resync | None:
        """A Resync when ``epoch`` (seen in a health reply or an envelope) is not ours."""
        if epoch != self.epoch:
            return Resync(f"broker restarted (epoch {epoch})")
        return None

    def disconnect(self) -> None:
        """The sockets are gone: the next request connects afresh."""
        self.welcome = None
        self.up = False
        self.hello_pending = False
        self._pending.clear()

    def close(self) -> list[int]:
        """The client closes; returns the requests that will never be answered."""
        self.closed = True
        self.up = False
        failed = self.reset()
        self.disconnect()
        return failed

    # ------------------------------------------------------------------ recovery

    def begin_resync(self) -> bool:
        """Whether to start a recovery now (once: not while one runs, nor when closed).

        Starting marks the client down: no requests go out, nothing is available.
        """
        if self.closed or self.welcome is None or self.recovering:
            return False
        self.recovering = True
        self.up = False
        self._public = self._private = False
        return True

    def resync_failed(self) -> None:
        """An attempt failed (it will be retried): stay down."""
        self.up = False

    def resync_done(self) -> None:
        """Recovery is over (it worked, or the client went away)."""
        self.recovering = False

    def recovery_timeout(self, request_timeout: float) -> float:
        """Seconds one recovery step may take: never longer than the broker's liveness."""
        if self.welcome is None:
            return request_timeout
        return min(request_timeout, self.liveness_timeout)

    @property
    def liveness_timeout(self) -> float:
        """Silence after which the broker counts as gone (its heartbeat contract)."""
        welcome = self.welcome
        assert welcome is not None, "no broker welcomed this client"
        return welcome.heartbeat_interval * welcome.liveness

    # ------------------------------------------------------------------ liveness

    def heard_data(self, now: float) -> None:
        """Something arrived on the data socket at ``now``."""
        self._last_data = now

    def tick(self, now: float) -> Tick:
        """A quarter of a heartbeat period: is the broker lost?

        It publishes ``_heartbeat/`` every interval, so a data socket silent for
        :data:`LOST_AFTER` intervals means it is gone, or that socket dropped it (libzmq
        drops, for good, a peer that broke the protocol, e.g. sent over ``MAXMSGSIZE``):
        the same recovery (fresh sockets, hello) fixes both.
        """
        welcome = self.welcome
        if welcome is None or self.closed:
            return Tick(IDLE_TICK)
        interval = welcome.heartbeat_interval
        delay = interval / TICKS_PER_INTERVAL
        if self.recovering:
            return Tick(delay)
        return Tick(delay, lost=now - self._last_data > LOST_AFTER * interval)

    def beat_due(self, now: float) -> float | None:
        """Seconds until the next heartbeat (0: send one now and count it sent), or None
        while no heartbeat goes out (not welcomed, recovering, closed).

        For a heartbeat sender that runs apart from the event loop, so a user callback
        that blocks the loop cannot get this client expired by the broker.
        """
        welcome = self.welcome
        if welcome is None or self.closed or self.recovering:
            return None
        due = self._last_beat + welcome.heartbeat_interval - now
        if due > 0:
            return due
        self._last_beat = now
        return 0.0

    @staticmethod
    def heartbeat(received: int, gaps: int, lag_ms: float, dropped: int) -> Heartbeat:
        """The heartbeat carrying this client's counters (for the broker's metrics)."""
        return Heartbeat(received=received, gaps=gaps, lag_ms=round(lag_ms, 3), dropped=dropped)

    # ------------------------------------------------------------------ availability

    def on_status(self, event: StatusEvent) -> Resync | None:
        """Availability follows the upstream connections' state changes; a Resync when
        the event is the broker's goodbye (it stops: recover, do not wait for silence)."""
        if not self.up:
            return None
        if event.state == "down" and event.detail == BROKER_STOPPING:
            return Resync("the broker is stopping")
        if event.state in _DOWN_STATES:
            available = False
        elif event.state in _UP_STATES:
            available = True
        else:
            return None
        if event.connection == "public":
            self._public = available
        else:
            self._private = available
        return None

    def available(self, connection: ConnectionName) -> bool:
        """Whether that side's data flows now (Welcome, then status events)."""
        if not self.up:
            return False
        return self._public if connection == "public" else self._private


def link_transition(last: StatusState | None, state: StatusState) -> StatusState | None:
    """What a subscription whose connection was last reported ``last`` is told of
    ``state``: None for no change (a copy, or the client's own notice already said it).

    After ``reconnecting`` (told by the client when it lost the broker, or by the broker
    when it lost Upbit), ``connecting`` says nothing new and ``up`` is the ``restored``.
    Topic states (``gap``, ``source_rest``, ...) always pass.
    """
    if state not in LINK_STATES:
        return state
    if state == last:
        return None
    if last == "reconnecting":
        if state == "connecting":
            return None
        if state == "up":
            return "restored"
    if last == "restored" and state == "up":
        return None
    return state


def client_notice(
    state: StatusState,
    detail: str,
    connection: ConnectionName,
    topics: Sequence[str],
    *,
    epoch: str,
    now_ns: int,
) -> Envelope:
    """A status notice made by the client itself (topic ``_client/``, seq 0)."""
    event = StatusEvent(
        connection=connection,
        state=state,
        detail=detail,
        topics=list(topics),
        timestamp=now_ns // 1_000_000,
    )
    return Envelope(CLIENT_TOPIC, 0, epoch, now_ns, "websocket", event)
