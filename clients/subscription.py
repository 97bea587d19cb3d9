"""One subscription: its callback or queue, its pending buffer, its counters.

A :class:`Subscription` is what ``subscribe_*`` returns. The dispatcher
(:mod:`clients.dispatch`) hands it envelopes; it runs a sync callback inline (exceptions
caught, logged, counted), or appends to its own :class:`BoundedQueue` (drop-oldest,
counted) served by a worker task (async callbacks) or by ``async for`` (no callback).
While its subscribe request is in flight it is *pending* and buffers what its topics
carry (bounded), so the snapshot can be delivered first and nothing after it is lost.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, Protocol, TypeVar

import msgspec
import structlog

from clients.core import LINK_STATES, link_transition
from clients.errors import ClientClosed
from schemas.bus import ConnectionName, Envelope, StatusEvent, StatusState, StreamSpec

__all__ = ["DEFAULT_MAXSIZE", "BoundedQueue", "Subscription", "is_async_callable"]

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
        self._link_state: StatusState | None = None
        """The connection state last told to ``on_status`` (see :func:`link_transition`)."""
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

    def next_blocking(
        self,
        timeout: float | None = None,
        *,
        run_async: Callable[[Awaitable[object]], object] | None = None,
    ) -> T:
        """The next payload, for a consumer *thread* (what :class:`clients.SyncSubscription`
        reads); the blocking twin of ``__anext__``.

        Status events met on the way go to ``on_status`` first; the awaitable an async
        handler returns is handed to ``run_async`` (which runs it on the client's loop).
        Raises TimeoutError after ``timeout`` s without a payload, ClientClosed once
        closed and drained, TypeError when this subscription has a callback.
        """
        queue = self._queue
        if queue is None or not self._iterator:
            raise TypeError("this subscription has a callback; it is not an iterator")
        while True:
            env = queue.get_blocking(timeout)
            item = self._unwrap(env)
            if item is not None:
                return item
            handler = self._on_status
            if handler is None or not isinstance(env.data, StatusEvent):
                continue
            try:
                result = handler(env.data)
                if inspect.isawaitable(result):
                    if run_async is not None:
                        run_async(result)
                    elif inspect.iscoroutine(result):
                        result.close()  # no loop to run it on: never awaited, say nothing
            except Exception as exc:
                self._failed(exc)

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
        """Deliver a StatusEvent envelope, in order with the data, if anyone listens.

        A connection state is told only when it changes (:func:`link_transition`): the
        broker's event, its copies and the client's own notices all meet here.
        """
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
        event = env.data
        assert isinstance(event, StatusEvent)
        if event.state in LINK_STATES:
            told = link_transition(self._link_state, event.state)
            if told is None:
                return
            self._link_state = told
            if told != event.state:
                env = msgspec.structs.replace(env, data=msgspec.structs.replace(event, state=told))
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
