"""Client-side routing: topic -> subscriptions, the Clone pattern, sequences.

Pure enough to test without sockets: :class:`Dispatcher` takes published messages
(``topic + TOPIC_END + [envelope, ...]``, :func:`schemas.bus.split_published`) and hands
envelopes to :class:`clients.subscription.Subscription` objects; the I/O shell
(:mod:`clients.client`) only reads the sockets and acts on what the dispatcher records
(:attr:`Dispatcher.foreign_epoch`, :attr:`Dispatcher.status_events`).

Per published message (the hot path): one dict lookup on the topic bytes and one
decode of its batch of envelopes; then per envelope one sequence check
(:class:`clients.sequence.SequenceTracker`), and each subscription on the topic takes
it (callback inline or its own bounded queue).

The Clone pattern: a new subscription starts *pending* — it buffers (bounded) what its
topics carry while its subscribe request is in flight. :meth:`Dispatcher.activate`
delivers the snapshot first, then the buffered updates newer than it; later updates at
or below a snapshot's ``seq`` are dropped, per subscription, so two subscriptions of
one topic joining at different times each see every update exactly once.

Status events: the broker publishes each event about a connection on its status topic
(``_status/public/``, with the topics it affects) and a copy on each of those data topics
(in order with their data). A subscription gets the status topic's event once, naming
its own topics; the copies only advance the topics' sequences. Events published on a
data topic alone (a ``gap``, a refused stream's ``error``) reach its subscriptions,
naming that topic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from clients.sequence import ACCEPT, DUPLICATE, SequenceTracker
from clients.subscription import DEFAULT_MAXSIZE, BoundedQueue, Subscription, is_async_callable
from schemas.bus import Envelope, StatusEvent, decode_batch, split_published
from schemas.errors import DecodeError

__all__ = [
    "DEFAULT_MAXSIZE",
    "BoundedQueue",
    "Dispatcher",
    "Subscription",
    "is_async_callable",
]


class _Route:
    """Subscriptions fed by one concrete topic (``internal`` for ``_status/``, ``_heartbeat/``)."""

    __slots__ = ("internal", "subs", "topic")

    def __init__(self, topic: str, subs: tuple[Subscription[Any], ...], internal: bool) -> None:
        self.topic = topic
        self.subs = subs
        self.internal = internal


class Dispatcher:
    """Routes published frames to subscriptions; tracks sequences and the broker epoch.

    It never does I/O. After feeding frames, the shell reads :attr:`foreign_epoch` (an
    envelope came from another broker epoch: hello and resubscribe) and drains
    :attr:`status_events` (events from ``_status/...``, already passed on to the
    subscriptions of that connection).
    """

    def __init__(self) -> None:
        self.epoch: str | None = None
        """The welcomed broker's epoch; None while (re)connecting (data is dropped)."""
        self.tracker = SequenceTracker()
        self.received = 0
        """Envelopes decoded."""
        self.decode_errors = 0
        self.unrouted = 0
        """Frames for topics nobody here wants any more (after an unsubscribe)."""
        self.gaps = 0
        self.missed = 0
        self.last_recv_ns = 0
        """``recv_ns`` of the newest envelope: the broker's receive time, for lag."""
        self.foreign_epoch: str | None = None
        self.status_events: list[Envelope] = []
        self.heartbeats = 0
        """Broker heartbeats received (of the current epoch)."""
        self._announced: dict[str, StatusEvent] = {}
        """The last event of each connection's status topic: its copies are not told again."""
        self._subs: dict[str, list[Subscription[Any]]] = {}
        self._routes: dict[bytes, _Route] = {}
        self._retired: set[str] = set()
        self._delivered: dict[str, tuple[str, int]] = {}
        """``(epoch, seq)`` per topic delivered before the last suspend (see activate)."""

    # ------------------------------------------------------------------ registry

    @property
    def prefixes(self) -> list[str]:
        """Every topic prefix some subscription needs on the SUB socket."""
        return list(self._subs)

    @property
    def subscriptions(self) -> list[Subscription[Any]]:
        """Every live subscription, each once."""
        return list(dict.fromkeys(s for subs in self._subs.values() for s in subs))

    def add(self, sub: Subscription[Any]) -> list[str]:
        """Register ``sub`` (pending); returns the prefixes new to the SUB socket."""
        new = [t for t in sub.topics if t not in self._subs]
        for topic in sub.topics:
            self._subs.setdefault(topic, []).append(sub)
        self._reroute()
        return new

    def remove(self, sub: Subscription[Any]) -> list[str]:
        """Unregister ``sub``; returns the prefixes the SUB socket no longer needs."""
        gone: list[str] = []
        for topic in sub.topics:
            subs = self._subs.get(topic)
            if subs is None or sub not in subs:
                continue
            subs.remove(sub)
            if not subs:
                del self._subs[topic]
                gone.append(topic)
        self._reroute()
        return gone

    def retopic(self, sub: Subscription[Any], topics: Sequence[str]) -> tuple[list[str], list[str]]:
        """Adopt the broker's topics for ``sub``; returns SUB prefixes (added, removed)."""
        if set(topics) == set(sub.topics):
            return [], []
        removed = self.remove(sub)
        sub.topics = tuple(dict.fromkeys(topics))
        added = self.add(sub)
        return [t for t in added if t not in removed], [t for t in removed if t not in added]

    def _reroute(self) -> None:
        """Recompute cached routes after a registry change (rare; routing stays O(1))."""
        for key, route in list(self._routes.items()):
            if route.internal:
                continue
            subs = self._match(route.topic)
            if subs:
                route.subs = subs
            else:
                del self._routes[key]
                self.tracker.forget(route.topic)

    def _match(self, topic: str) -> tuple[Subscription[Any], ...]:
        found: dict[Subscription[Any], None] = {}
        end = topic.find("/")
        while end != -1:
            for sub in self._subs.get(topic[: end + 1], ()):
                found[sub] = None
            end = topic.find("/", end + 1)
        return tuple(found)

    def _resolve(self, key: bytes) -> _Route | None:
        topic = key.decode("ascii", "replace")
        if topic.startswith("_"):
            route = _Route(topic, (), internal=True)
        else:
            subs = self._match(topic)
            if not subs:
                return None
            route = _Route(topic, subs, internal=False)
        self._routes[key] = route
        return route

    def matches(self, sub: Subscription[Any], topic: str) -> bool:
        """True when ``topic`` is delivered to ``sub`` (exact topic or under a prefix)."""
        return any(topic.startswith(prefix) for prefix in sub.topics)

    # ------------------------------------------------------------------ hot path

    def dispatch(self, message: bytes) -> bool:
        """Handle one published message, ``topic + TOPIC_END + [envelope, ...]``.

        False when it was unusable (no topic end, unknown topic, undecodable batch).
        """
        try:
            topic, body = split_published(message)
        except DecodeError:
            self.decode_errors += 1
            return False
        route = self._routes.get(topic)
        if route is None:
            route = self._resolve(topic)
            if route is None:
                self.unrouted += 1
                return False
        try:
            batch = decode_batch(body)
        except DecodeError:
            self.decode_errors += 1
            return False
        self.received += len(batch)
        self.last_recv_ns = batch[-1].recv_ns
        tracker = self.tracker
        for env in batch:
            epoch = env.epoch
            if epoch != self.epoch:
                # Reconnecting (epoch None): what arrives before the Welcome was published
                # before our re-subscribe, so the coming snapshot covers it: drop it.
                if self.epoch is not None and epoch not in self._retired:
                    self.foreign_epoch = epoch
                continue
            data = env.data
            if route.internal:
                if data.__class__ is StatusEvent:
                    self.status_events.append(env)
                    self._connection_status(env)
                else:
                    self.heartbeats += 1
                continue
            verdict = tracker.check(env.topic, epoch, env.seq)
            if verdict is not ACCEPT:
                if verdict is DUPLICATE:
                    continue
                self._gap(route, env, verdict.missed)
            if data.__class__ is StatusEvent:
                self._topic_status(route, env)
                continue
            for sub in route.subs:
                sub._offer(env)
        return True

    def _connection_status(self, env: Envelope) -> None:
        """An upstream connection's event goes to every subscription it serves, in order,
        naming that subscription's topics."""
        event = env.data
        assert isinstance(event, StatusEvent)
        self._announced[event.connection] = event
        for sub in self.subscriptions:
            if sub.connection == event.connection:
                told = msgspec.structs.replace(event, topics=list(sub.topics))
                sub._status(msgspec.structs.replace(env, data=told))

    def _topic_status(self, route: _Route, env: Envelope) -> None:
        """An event on a data topic: a copy of the status topic's last one is not told
        again; one of its own goes to the topic's subscriptions, naming the topic."""
        event = env.data
        assert isinstance(event, StatusEvent)
        last = self._announced.get(event.connection)
        if (
            last is not None
            and last.state == event.state
            and last.timestamp == event.timestamp
            and last.detail == event.detail
        ):
            return
        if not event.topics:
            env = msgspec.structs.replace(
                env, data=msgspec.structs.replace(event, topics=[env.topic])
            )
        for sub in route.subs:
            sub._status(env)

    def _gap(self, route: _Route, env: Envelope, missed: int) -> None:
        self.gaps += 1
        self.missed += missed
        for sub in route.subs:
            sub.gaps += 1
            if sub._on_status is not None:
                notice = StatusEvent(
                    connection=sub.connection,
                    state="gap",
                    detail=f"{missed} message(s) lost before seq {env.seq}",
                    topics=[env.topic],
                    timestamp=env.recv_ns // 1_000_000,
                )
                sub._status(msgspec.structs.replace(env, data=notice))

    # ------------------------------------------------------------------ Clone pattern

    def activate(self, sub: Subscription[Any], snapshot: Iterable[Envelope]) -> None:
        """Deliver ``snapshot`` to the pending ``sub``, then what it buffered past it.

        A snapshot value with ``seq`` > 0 becomes the topic's baseline when this client
        has seen nothing of the topic yet (a replay brings several values of a topic, in
        order: the last is the baseline); ``seq`` 0 marks a value fetched over REST,
        outside the topic's sequence, which sets no baseline.
        """
        if sub.closed:
            return
        epoch = self.epoch
        buffered = sub._pending or ()
        sub._pending = None
        floors = sub._floors
        floors.clear()
        items = [env for env in snapshot if env.epoch == epoch]
        tracker = self.tracker
        delivered = self._delivered
        fresh = {env.topic for env in items if tracker.last_seq(env.topic) is None}
        for env in items:  # the snapshot itself is delivered before any floor exists
            if env.seq > 0 and env.topic in fresh:
                tracker.baseline(env.topic, env.epoch, env.seq)
            if env.seq > 0 and delivered.get(env.topic) == (env.epoch, env.seq):
                continue  # this client got that very message before it recovered
            if env.data.__class__ is StatusEvent:
                sub._status(env)
            else:
                sub._offer(env)
        for env in items:
            if env.seq > floors.get(env.topic, 0):
                floors[env.topic] = env.seq
        for env in buffered:
            if env.epoch != epoch:
                continue
            if env.data.__class__ is StatusEvent:
                sub._status(env)
            else:
                sub._offer(env)

    def suspend(self) -> None:
        """The broker is gone or restarted: forget sequences, buffer until resubscribed."""
        if self.epoch is not None:
            self._retired.add(self.epoch)
        # What was delivered, so that a re-subscribe to the same broker (an expired
        # client) does not deliver the last value of a topic a second time.
        self._delivered.update(self.tracker.positions())
        self.epoch = None
        self.foreign_epoch = None
        self.tracker.reset()
        for sub in self.subscriptions:
            sub._suspend()

    def resume(self, epoch: str) -> None:
        """A broker with ``epoch`` welcomed us: track sequences against it."""
        self._retired.discard(epoch)
        self.epoch = epoch
        self.foreign_epoch = None

    def clear(self) -> None:
        """Close and forget every subscription (client closed)."""
        for sub in self.subscriptions:
            sub._close()
        self._subs.clear()
        self._routes.clear()
        self.tracker.reset()
