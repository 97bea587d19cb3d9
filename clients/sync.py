"""Blocking client for programs without asyncio: the same API, no ``await``.

:class:`SyncBrokerClient` runs a :class:`clients.client.BrokerClient` on a private
event loop in a daemon thread and waits for each call's result. Callbacks run in that
thread (sync ones inline, ``async def`` ones in their worker task), so they must not
call the blocking client methods themselves (that would wait on its own thread: a
RuntimeError says so). Subscriptions without a callback are plain iterators::

    with SyncBrokerClient() as client:
        sub = client.subscribe_trade("KRW-BTC")
        for trade in sub.iter(timeout=10):   # ends after 10 s without a trade
            print(trade.trade_price)

Dropping the client (or interpreter exit) closes it through a ``weakref.finalize``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, Generic, TypeVar

from clients.client import BrokerClient
from clients.errors import ClientClosed
from clients.streams import StatusCallback
from clients.subscription import DEFAULT_MAXSIZE, Subscription
from schemas.bus import Envelope, Health, Metrics, StatusEvent, StreamSpec
from schemas.upbit import Candle, MyAsset, MyOrder, Orderbook, Ticker, Trade

__all__ = ["SyncBrokerClient", "SyncSubscription"]

T = TypeVar("T")
R = TypeVar("R")
_STOP_TIMEOUT = 5.0


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="upbit-broker-client", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def in_thread(self) -> bool:
        """True when called from the loop's own thread (a callback)."""
        return threading.current_thread() is self.thread

    def run(self, coro: Coroutine[Any, Any, R], timeout: float | None) -> R:
        """Run ``coro`` on the loop and wait for its result."""
        if self.in_thread():
            coro.close()
            raise RuntimeError(
                "a blocking SyncBrokerClient method was called from a callback (the "
                "client's own thread); use an async callback with the BrokerClient instead"
            )
        if self.loop.is_closed():
            coro.close()
            raise ClientClosed("client closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop and (from another thread) wait for the thread to end."""
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_thread():
            self.thread.join(_STOP_TIMEOUT)


def _shutdown(runner: _LoopThread, client: BrokerClient) -> None:
    """Finalizer: close the async client on its loop, then stop the loop."""
    if runner.loop.is_closed():
        return
    if runner.in_thread():  # dropped inside a callback: cannot wait on ourselves
        runner.loop.create_task(client.close())
        runner.loop.call_soon(runner.loop.stop)
        return
    with contextlib.suppress(Exception):
        runner.run(client.close(), _STOP_TIMEOUT)
    runner.stop()


class SyncSubscription(Generic[T]):
    """Blocking view of a :class:`clients.dispatch.Subscription`; iterable without callback."""

    def __init__(self, sub: Subscription[T], runner: _LoopThread) -> None:
        self._sub = sub
        self._runner = runner

    @property
    def streams(self) -> tuple[StreamSpec, ...]:
        """What was asked for."""
        return self._sub.streams

    @property
    def topics(self) -> tuple[str, ...]:
        """The bus topics delivered here."""
        return self._sub.topics

    @property
    def received(self) -> int:
        """Data messages delivered or queued."""
        return self._sub.received

    @property
    def dropped(self) -> int:
        """Messages dropped (oldest first) because the queue was full."""
        return self._sub.dropped

    @property
    def gaps(self) -> int:
        """Sequence gaps seen on these topics."""
        return self._sub.gaps

    @property
    def errors(self) -> int:
        """Exceptions raised by the callbacks."""
        return self._sub.errors

    @property
    def last_envelope(self) -> Envelope | None:
        """Envelope of the message being (or last) delivered."""
        return self._sub.last_envelope

    @property
    def closed(self) -> bool:
        """True after unsubscribe or client close."""
        return self._sub.closed

    def unsubscribe(self) -> None:
        """Stop and release the streams at the broker (idempotent)."""
        if self._sub.closed or self._runner.loop.is_closed():
            self._sub._close()
            return
        self._runner.run(self._sub.unsubscribe(), None)

    def get(self, timeout: float | None = None) -> T:
        """The next payload; TimeoutError after ``timeout`` s, ClientClosed once closed."""
        queue = self._sub._queue
        if queue is None or self._sub.needs_worker:
            raise TypeError("this subscription has a callback; it is not an iterator")
        while True:
            env = queue.get_blocking(timeout)
            item = self._sub._unwrap(env)
            if item is not None:
                return item
            self._status(env.data)

    def _status(self, event: object) -> None:
        handler = self._sub._on_status
        if handler is None or not isinstance(event, StatusEvent):
            return
        try:
            result = handler(event)
            if inspect.isawaitable(result):
                self._runner.run(_await(result), None)
        except Exception as exc:
            self._sub._failed(exc)

    def iter(self, timeout: float | None = None) -> Iterator[T]:
        """Payloads until closed, or until ``timeout`` s pass without one."""
        while True:
            try:
                yield self.get(timeout)
            except (TimeoutError, ClientClosed):
                return

    def __iter__(self) -> Iterator[T]:
        return self.iter()

    def __repr__(self) -> str:
        return f"<SyncSubscription {','.join(self.topics)} received={self.received}>"


async def _await(awaitable: Any) -> None:
    await awaitable


class SyncBrokerClient:
    """Blocking twin of :class:`clients.client.BrokerClient` (same names, no await)."""

    def __init__(
        self,
        control: str | None = None,
        data: str | None = None,
        *,
        name: str = "",
        request_timeout: float = 5.0,
    ) -> None:
        self._client = BrokerClient(control, data, name=name, request_timeout=request_timeout)
        self._runner = _LoopThread()
        # Internal timeouts bound every call; this only guards against a wedged loop.
        self._wait = request_timeout * 4 + 5.0
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._client)

    @property
    def client(self) -> BrokerClient:
        """The asyncio client underneath (use only from callbacks, on its loop)."""
        return self._client

    def _call(self, coro: Coroutine[Any, Any, R]) -> R:
        return self._runner.run(coro, self._wait)

    def _wrap(self, sub: Subscription[T]) -> SyncSubscription[T]:
        return SyncSubscription(sub, self._runner)

    def connect(self) -> None:
        """Hello the broker now; raises BrokerUnavailable if none answers."""
        self._call(self._client.connect())

    def close(self) -> None:
        """Bye, close sockets, stop the client thread. Idempotent."""
        self._finalizer()

    def __enter__(self) -> SyncBrokerClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True while a broker has welcomed this client."""
        return self._client.connected

    def subscribe_ticker(
        self,
        codes: str | Iterable[str],
        callback: Callable[[Ticker], object] | None = None,
        *,
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> SyncSubscription[Ticker]:
        """Tickers of ``codes``; see :meth:`BrokerClient.subscribe_ticker`."""
        c = self._client
        return self._wrap(
            self._call(c.subscribe_ticker(codes, callback, on_status=on_status, maxsize=maxsize))
        )

    def subscribe_trade(
        self,
        codes: str | Iterable[str],
        callback: Callable[[Trade], object] | None = None,
        *,
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> SyncSubscription[Trade]:
        """Trades of ``codes``."""
        c = self._client
        return self._wrap(
            self._call(c.subscribe_trade(codes, callback, on_status=on_status, maxsize=maxsize))
        )

    def subscribe_orderbook(
        self,
        codes: str | Iterable[str],
        callback: Callable[[Orderbook], object] | None = None,
        *,
        depth: int | None = None,
        level: float | None = None,
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> SyncSubscription[Orderbook]:
        """Orderbooks of ``codes`` at ``depth`` / ``level``."""
        coro = self._client.subscribe_orderbook(
            codes, callback, depth=depth, level=level, on_status=on_status, maxsize=maxsize
        )
        return self._wrap(self._call(coro))

    def subscribe_candle(
        self,
        codes: str | Iterable[str],
        callback: Callable[[Candle], object] | None = None,
        *,
        unit: str = "1m",
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> SyncSubscription[Candle]:
        """Candles of ``codes`` in ``unit``."""
        coro = self._client.subscribe_candle(
            codes, callback, unit=unit, on_status=on_status, maxsize=maxsize
        )
        return self._wrap(self._call(coro))

    def subscribe_my_order(
        self,
        codes: str | Iterable[str] | None = None,
        callback: Callable[[MyOrder], object] | None = None,
        *,
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> SyncSubscription[MyOrder]:
        """Your orders (every market when ``codes`` is None)."""
        coro = self._client.subscribe_my_order(
            codes, callback, on_status=on_status, maxsize=maxsize
        )
        return self._wrap(self._call(coro))

    def subscribe_my_asset(
        self,
        callback: Callable[[MyAsset], object] | None = None,
        *,
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> SyncSubscription[MyAsset]:
        """Your balances."""
        coro = self._client.subscribe_my_asset(callback, on_status=on_status, maxsize=maxsize)
        return self._wrap(self._call(coro))

    def get_snapshot(
        self,
        type_: str,
        codes: str | Iterable[str] | None = None,
        *,
        depth: int | None = None,
        level: float | None = None,
        unit: str | None = None,
    ) -> list[Envelope]:
        """Current values; see :meth:`BrokerClient.get_snapshot`."""
        coro = self._client.get_snapshot(type_, codes, depth=depth, level=level, unit=unit)
        return self._call(coro)

    def health(self) -> Health:
        """The broker's health."""
        return self._call(self._client.health())

    def metrics(self) -> Metrics:
        """The broker's metrics."""
        return self._call(self._client.metrics())

    def is_public_available(self) -> bool:
        """Whether public data flows now."""
        return self._client.is_public_available()

    def is_private_available(self) -> bool:
        """Whether private streams flow now (False without keys at the broker)."""
        return self._client.is_private_available()
