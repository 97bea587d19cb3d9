"""Client-side routing: topic -> subscriptions, the Clone pattern, isolated callbacks.

Pure enough to test without sockets: :class:`Dispatcher` takes ``(topic, body)`` frames
and hands envelopes to :class:`Subscription` objects; the I/O shell
(:mod:`clients.client`) only reads the sockets and acts on what the dispatcher records
(:attr:`Dispatcher.foreign_epoch`, :attr:`Dispatcher.status_events`).

Per message (the hot path): one dict lookup on the topic bytes, one decode, one
sequence check (:class:`clients.sequence.SequenceTracker`), then each subscription on
the topic either runs its sync callback inline (exceptions caught, logged, counted) or
appends to its own bounded queue (drop-oldest, counted) served by a worker task (async
callbacks) or by ``async for`` (no callback).

The Clone pattern: a new subscription starts *pending* — it buffers (bounded) what its
topics carry while its subscribe request is in flight. :meth:`Dispatcher.activate`
delivers the snapshot first, then the buffered updates newer than it; later updates at
or below a snapshot's ``seq`` are dropped, per subscription, so two subscriptions of
one topic joining at different times each see every update exactly once.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Generic, Protocol, TypeVar

import msgspec
import structlog

from clients.errors import ClientClosed
from clients.sequence import ACCEPT, DUPLICATE, SequenceTracker
from schemas.bus import (
    TOPIC_END,
    ConnectionName,
    Envelope,
    StatusEvent,
    StreamSpec,
    decode_envelope,
)
from schemas.errors import DecodeError

__all__ = [
    "DEFAULT_MAXSIZE",
    "BoundedQueue",
    "Dispatcher",
    "Subscription",
    "is_async_callable",
]

T = TypeVar("T")
DEFAULT_MAXSIZE: Final = 10_000
"""Default bound of a subscription's queue (and of its pending buffer)."""
_LOG_EVERY: Final = 1.0
"""Seconds between two logs of a failing callback (the rest are counted, not logged)."""

_log = structlog.get_logger("clients")


def is_async_callable(fn: object) -> bool:
    """True for ``async def`` functions, partials of them and objects with ``async __call__``."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - want the method, not callable()
    return call is not None and inspect.iscoroutinefunction(call)


class BoundedQueue:
    """A FIFO of envelopes that drops the *oldest* item when full and counts the drops.

    Filled by the event loop thread; emptied by an asyncio consumer (:meth:`get`) or a
    plain thread (:meth:`get_blocking`). Memory is bounded by ``maxsize`` whatever the
    consumer's speed.
    """

    __slots__ = ("_items", "_thread_waiter", "_waiter", "closed", "dropped", "maxsize")

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.dropped = 0
        self.closed = False
        self._items: deque[Envelope] = deque(maxlen=maxsize)
        self._waiter: asyncio.Future[None] | None = None
        self._thread_waiter: threading.Event | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Envelope) -> None:
        """Append ``item``; when full the oldest item is discarded and counted."""
        items = self._items
        if len(items) == self.maxsize:
            self.dropped += 1
        items.append(item)  # deque(maxlen) drops the leftmost atomically
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        thread_waiter = self._thread_waiter
        if thread_waiter is not None:
            thread_waiter.set()

    def get_nowait(self) -> Envelope | None:
        """The oldest item, or None when empty."""
        try:
            return self._items.popleft()
        except IndexError:
            return None

    async def get(self) -> Envelope:
        """Wait for the oldest item; raises :class:`ClientClosed` once closed and empty."""
        items = self._items
        while True:
            if items:
                return items.popleft()
            if self.closed:
                raise ClientClosed("subscription closed")
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None

    def get_blocking(self, timeout: float | None = None) -> Envelope:
        """Block the calling thread for the oldest item.

        Raises :class:`TimeoutError` after ``timeout`` seconds without one, and
        :class:`ClientClosed` once closed and empty.
        """
        items = self._items
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return items.popleft()
            except IndexError:
                pass
            if self.closed:
                raise ClientClosed("subscription closed")
            event = threading.Event()
            self._thread_waiter = event
            # Re-check after publishing the waiter: put() appends, then reads the waiter.
            if not items and not self.closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._thread_waiter = None
                    raise TimeoutError("no message within the timeout")
                event.wait(remaining)
            self._thread_waiter = None

    def close(self) -> None:
        """No more items will come: wake every waiter (queued items stay readable)."""
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._thread_waiter is not None:
            self._thread_waiter.set()


class _Owner(Protocol):
    async def _unsubscribe(self, sub: Subscription[Any]) -> None: ...


class Subscription(Generic[T]):
    """A handle on one subscribe call: its streams, counters and how it delivers.

    Delivery depends on ``callback``: a plain function runs inline in the receive loop;
    an ``async def`` runs in this subscription's own worker task fed by a bounded queue;
    None makes the subscription an async iterator (``async for payload in sub``) over a
    bounded queue. Callbacks get the payload (a :mod:`schemas.upbit` struct); the
    envelope around it (seq, epoch, ``recv_ns``, source) is :attr:`last_envelope` while
    the callback runs or after the iterator yields. ``on_status`` (optional, sync or
    async) receives :class:`schemas.bus.StatusEvent` about these streams: upstream
    down/restored, possible ``gap``, ``source_rest``...
    """

    def __init__(
        self,
        streams: Sequence[StreamSpec],
        callback: Callable[[T], object] | None = None,
        *,
        on_status: Callable[[StatusEvent], object] | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
        owner: _Owner | None = None,
    ) -> None:
        if not streams:
            raise ValueError("a subscription needs at least one stream")
        self.streams: tuple[StreamSpec, ...] = tuple(streams)
        """What was asked for."""
        self.topics: tuple[str, ...] = tuple(dict.fromkeys(s.topic for s in streams))
        """The bus topics (prefixes) delivered here, as confirmed by the broker."""
        self.connection: ConnectionName = "private" if self.streams[0].is_private else "public"
        self.received = 0
        """Data messages delivered (or queued) to this subscription."""
        self.gaps = 0
        """Sequence gaps seen on its topics (each may cover several lost messages)."""
        self.errors = 0
        """Exceptions raised by its callbacks (logged, then ignored)."""
        self.duplicates = 0
        """Updates dropped because the snapshot already covered them."""
        self.last_envelope: Envelope | None = None
        """Envelope of the message being (or last) delivered."""
        self._callback = callback
        self._on_status = on_status
        self._iterator = callback is None
        queued = self._iterator or is_async_callable(callback) or is_async_callable(on_status)
        self._queue: BoundedQueue | None = BoundedQueue(maxsize) if queued else None
        self.maxsize = maxsize
        self._pending: deque[Envelope] | None = deque(maxlen=maxsize)
        self._pending_dropped = 0
        self._floors: dict[str, int] = {}
        self._owner: Callable[[], _Owner | None] = (
            weakref.ref(owner) if owner is not None else lambda: None
        )
        self._last_log = 0.0
        self._unlogged = 0
        self._worker: asyncio.Task[None] | None = None
        self.closed = False

    # ------------------------------------------------------------------ public

    @property
    def dropped(self) -> int:
        """Messages discarded because this subscription's queue or buffer was full."""
        queue = self._queue
        return self._pending_dropped + (queue.dropped if queue is not None else 0)

    @property
    def needs_worker(self) -> bool:
        """True when an async callback must be served by a worker task."""
        return self._queue is not None and not self._iterator

    async def unsubscribe(self) -> None:
        """Stop this subscription and release its streams at the broker (idempotent)."""
        owner = self._owner()
        if owner is not None and not self.closed:
            await owner._unsubscribe(self)
        self._close()

    def __aiter__(self) -> Subscription[T]:
        if not self._iterator:
            raise TypeError("this subscription has a callback; it is not an iterator")
        return self

    async def __anext__(self) -> T:
        """The next payload; ends (StopAsyncIteration) after unsubscribe or close."""
        queue = self._queue
        if queue is None or not self._iterator:
            raise TypeError("this subscription has a callback; it is not an iterator")
        while True:
            try:
                env = await queue.get()
            except ClientClosed:
                raise StopAsyncIteration from None
            item = self._unwrap(env)
            if item is not None:
                return item
            await self._deliver_status(env)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "pending" if self._pending is not None else "live"
        return f"<Subscription {','.join(self.topics)} {state} received={self.received}>"

    # ------------------------------------------------------------------ delivery

    def _offer(self, env: Envelope) -> None:
        """Hot path: deliver one data envelope (or buffer it while pending)."""
        pending = self._pending
        if pending is not None:
            if len(pending) == self.maxsize:
                self._pending_dropped += 1
            pending.append(env)
            return
        if self._floors and self._below_floor(env):
            return
        self.received += 1
        queue = self._queue
        if queue is not None:
            queue.put(env)
            return
        self.last_envelope = env
        try:
            self._callback(env.data)  # type: ignore[misc,arg-type]
        except Exception as exc:
            self._failed(exc)

    def _status(self, env: Envelope) -> None:
        """Deliver a StatusEvent envelope, in order with the data, if anyone listens."""
        if self._on_status is None:
            return
        pending = self._pending
        if pending is not None:
            if len(pending) == self.maxsize:
                self._pending_dropped += 1
            pending.append(env)
            return
        if self._floors and self._below_floor(env):
            return
        queue = self._queue
        if queue is not None:
            queue.put(env)
            return
        self.last_envelope = env
        try:
            self._on_status(env.data)  # type: ignore[arg-type]
        except Exception as exc:
            self._failed(exc)

    def _below_floor(self, env: Envelope) -> bool:
        floor = self._floors.get(env.topic)
        if floor is None:
            return False
        if env.seq <= floor:
            self.duplicates += 1
            return True
        del self._floors[env.topic]  # past the snapshot: no more checks needed
        return False

    def _unwrap(self, env: Envelope) -> T | None:
        self.last_envelope = env
        data = env.data
        if data.__class__ is StatusEvent:
            return None
        return data  # type: ignore[return-value]

    async def _deliver_status(self, env: Envelope) -> None:
        if self._on_status is None:
            return
        try:
            result = self._on_status(env.data)  # type: ignore[arg-type]
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self._failed(exc)

    async def _work(self) -> None:
        """Worker task of an async-callback subscription: one message at a time, in order."""
        queue = self._queue
        assert queue is not None
        callback = self._callback
        assert callback is not None
        while True:
            try:
                env = await queue.get()
            except ClientClosed:
                return
            item = self._unwrap(env)
            if item is None:
                await self._deliver_status(env)
                continue
            try:
                result = callback(item)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """Count a callback's exception and log it, at most once a second."""
        self.errors += 1
        now = time.monotonic()
        if now - self._last_log < _LOG_EVERY:
            self._unlogged += 1
            return
        self._last_log = now
        _log.error(
            "subscription callback failed",
            topics=list(self.topics),
            errors=self.errors,
            suppressed=self._unlogged,
            exc_info=exc,
        )
        self._unlogged = 0

    # ------------------------------------------------------------------ state

    def _suspend(self) -> None:
        """Buffer again until the next snapshot (broker restart or re-hello)."""
        if self._pending is None:
            self._pending = deque(maxlen=self.maxsize)
        self._floors.clear()

    def _close(self) -> None:
        """No more deliveries: the iterator ends once drained, the worker stops now."""
        self.closed = True
        self._pending = None
        if self._queue is not None:
            self._queue.close()
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None


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
        self._subs: dict[str, list[Subscription[Any]]] = {}
        self._routes: dict[bytes, _Route] = {}
        self._retired: set[str] = set()

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
        """Handle one published message, ``topic + TOPIC_END + envelope``.

        False when it was unusable (no topic end, unknown topic, undecodable envelope).
        """
        end = message.find(TOPIC_END)
        if end < 0:
            self.decode_errors += 1
            return False
        topic = message[:end]
        route = self._routes.get(topic)
        if route is None:
            route = self._resolve(topic)
            if route is None:
                self.unrouted += 1
                return False
        try:
            env = decode_envelope(memoryview(message)[end + 1 :])
        except DecodeError:
            self.decode_errors += 1
            return False
        self.received += 1
        self.last_recv_ns = env.recv_ns
        epoch = env.epoch
        if epoch != self.epoch:
            # Reconnecting (epoch None): what arrives before the Welcome was published
            # before our re-subscribe, so the coming snapshot covers it: drop it.
            if self.epoch is not None and epoch not in self._retired:
                self.foreign_epoch = epoch
            return True
        data = env.data
        if route.internal:
            if data.__class__ is StatusEvent:
                self.status_events.append(env)
                self._connection_status(env)
            return True
        verdict = self.tracker.check(env.topic, epoch, env.seq)
        if verdict is not ACCEPT:
            if verdict is DUPLICATE:
                return True
            self._gap(route, env, verdict.missed)
        if data.__class__ is StatusEvent:
            for sub in route.subs:
                sub._status(env)
            return True
        for sub in route.subs:
            sub._offer(env)
        return True

    def _connection_status(self, env: Envelope) -> None:
        """An upstream connection's event goes to every subscription it serves, in order."""
        connection = env.data.connection  # type: ignore[union-attr]
        for sub in self.subscriptions:
            if sub.connection == connection:
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
        has seen nothing of the topic yet; ``seq`` 0 marks a value fetched over REST,
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
        for env in items:  # the snapshot itself is delivered before any floor exists
            if env.seq > 0 and tracker.last_seq(env.topic) is None:
                tracker.baseline(env.topic, env.epoch, env.seq)
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
