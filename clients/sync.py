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
Every blocking method is made from the :class:`BrokerClient` coroutine method of the
same name (:class:`_Blocking`, :class:`_BlockingSubscribe`): one definition of each
parameter list and docstring, no hand-written mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

from clients.client import ORDER_TIMEOUT, BrokerClient
from clients.errors import ClientClosed
from clients.subscription import Subscription
from schemas.bus import Envelope, StreamSpec

__all__ = ["SyncBrokerClient", "SyncSubscription"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
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
    """Blocking view of a :class:`clients.Subscription`; iterable without callback."""

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
            return  # a closed client already ended its subscriptions
        self._runner.run(self._sub.unsubscribe(), None)

    def get(self, timeout: float | None = None) -> T:
        """The next payload; TimeoutError after ``timeout`` s, ClientClosed once closed."""
        return self._sub.next_blocking(timeout, run_async=self._run_status)

    def _run_status(self, awaitable: Awaitable[object]) -> None:
        """Run an async ``on_status`` handler's awaitable on the client's loop."""
        self._runner.run(_await(awaitable), None)

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


async def _await(awaitable: Awaitable[object]) -> None:
    await awaitable


class _Blocking(Generic[P, R]):
    """A blocking method made from a :class:`BrokerClient` coroutine method.

    Same parameters and docstring; the call runs on the client's loop and waits.
    """

    def __init__(self, method: Callable[Concatenate[BrokerClient, P], Coroutine[Any, Any, R]]):
        self._method = method
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, obj: SyncBrokerClient, owner: type[Any]) -> Callable[P, R]: ...
    def __get__(self, obj: SyncBrokerClient | None, owner: type[Any]) -> Self | Callable[P, R]:
        if obj is None:
            return self
        method = self._method
        client = obj.client

        @functools.wraps(method)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            return obj._call(method(client, *args, **kwargs))

        return call


class _BlockingSubscribe(Generic[P, T]):
    """A blocking ``subscribe_*`` made from the :class:`BrokerClient` one.

    Same parameters and docstring; returns a :class:`SyncSubscription`.
    """

    def __init__(
        self,
        method: Callable[Concatenate[BrokerClient, P], Coroutine[Any, Any, Subscription[T]]],
    ):
        self._method = method
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(
        self, obj: SyncBrokerClient, owner: type[Any]
    ) -> Callable[P, SyncSubscription[T]]: ...
    def __get__(
        self, obj: SyncBrokerClient | None, owner: type[Any]
    ) -> Self | Callable[P, SyncSubscription[T]]:
        if obj is None:
            return self
        method = self._method
        client = obj.client

        @functools.wraps(method)
        def call(*args: P.args, **kwargs: P.kwargs) -> SyncSubscription[T]:
            return SyncSubscription(obj._call(method(client, *args, **kwargs)), obj._runner)

        return call


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
        self._wait = max(request_timeout * 4, request_timeout + ORDER_TIMEOUT) + 5.0
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._client)

    @property
    def client(self) -> BrokerClient:
        """The asyncio client underneath (use only from callbacks, on its loop)."""
        return self._client

    def _call(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run a coroutine of the client on its loop and wait for its result."""
        return self._runner.run(coro, self._wait)

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

    def is_public_available(self) -> bool:
        """Whether public data flows now."""
        return self._client.is_public_available()

    def is_private_available(self) -> bool:
        """Whether private streams flow now (False without keys at the broker)."""
        return self._client.is_private_available()

    connect = _Blocking(BrokerClient.connect)
    get_snapshot = _Blocking(BrokerClient.get_snapshot)
    health = _Blocking(BrokerClient.health)
    metrics = _Blocking(BrokerClient.metrics)
    markets = _Blocking(BrokerClient.markets)
    candles = _Blocking(BrokerClient.candles)
    tickers = _Blocking(BrokerClient.tickers)
    orderbooks = _Blocking(BrokerClient.orderbooks)
    trades = _Blocking(BrokerClient.trades)
    accounts = _Blocking(BrokerClient.accounts)
    order_chance = _Blocking(BrokerClient.order_chance)
    get_order = _Blocking(BrokerClient.get_order)
    open_orders = _Blocking(BrokerClient.open_orders)
    closed_orders = _Blocking(BrokerClient.closed_orders)
    place_order = _Blocking(BrokerClient.place_order)
    cancel_order = _Blocking(BrokerClient.cancel_order)
    cancel_orders = _Blocking(BrokerClient.cancel_orders)
    subscribe_ticker = _BlockingSubscribe(BrokerClient.subscribe_ticker)
    subscribe_trade = _BlockingSubscribe(BrokerClient.subscribe_trade)
    subscribe_orderbook = _BlockingSubscribe(BrokerClient.subscribe_orderbook)
    subscribe_candle = _BlockingSubscribe(BrokerClient.subscribe_candle)
    subscribe_my_order = _BlockingSubscribe(BrokerClient.subscribe_my_order)
    subscribe_my_asset = _BlockingSubscribe(BrokerClient.subscribe_my_asset)
