"""The client's sockets, and the loop callbacks that reach the client only weakly.

:func:`open_dealer` and :func:`open_sub` make the two sockets with the client's trust
settings: a random routing id of our own on the DEALER, and a bound on the size of any
message either socket accepts (:data:`schemas.bus.MAX_MESSAGE_BYTES`). :class:`IO`
holds what a :func:`weakref.finalize` must release (sockets, tasks, the dispatcher) and
nothing that points back at the client, so a client dropped without ``close()`` is
still collected and its sockets closed. The loop callbacks take weak methods for the
same reason: a reader registered with the loop or a background task never keeps a
dropped client alive, and this module knows nothing of the client but those methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
import zmq

from clients.dispatch import Dispatcher
from schemas.bus import MAX_MESSAGE_BYTES, Bye, encode

__all__ = [
    "BYE_LINGER_MS",
    "IO",
    "ROUTING_ID_BYTES",
    "close_ctrl",
    "heartbeat_loop",
    "new_routing_id",
    "on_readable",
    "open_dealer",
    "open_sub",
    "release",
    "retry_loop",
    "run_weak",
]

BYE_LINGER_MS: Final = 100
"""The control socket lingers this long on close so the Bye gets out (never blocks)."""
ROUTING_ID_BYTES: Final = 16
"""Length of the routing id the client gives each DEALER it opens."""

_log = structlog.get_logger("clients")


def new_routing_id() -> bytes:
    """16 random bytes, the first non-zero: libzmq's own ids start with a zero byte.

    Our own unguessable id means another local process cannot predict it, and the
    broker can tell a client's id from one libzmq made up.
    """
    return bytes((secrets.randbelow(255) + 1,)) + secrets.token_bytes(ROUTING_ID_BYTES - 1)


def open_dealer(
    ctx: zmq.Context[Any], endpoint: str, *, max_message: int = MAX_MESSAGE_BYTES
) -> zmq.Socket[bytes]:
    """A DEALER to the broker's control ROUTER, with a fresh random routing id."""
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, new_routing_id())
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.connect(endpoint)
    return sock


def open_sub(
    ctx: zmq.Context[Any],
    endpoint: str,
    prefixes: list[str],
    *,
    hwm: int,
    max_message: int = MAX_MESSAGE_BYTES,
) -> zmq.Socket[bytes]:
    """A SUB to the broker's data PUB, subscribed to ``prefixes``."""
    sock: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.connect(endpoint)
    for prefix in prefixes:
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    return sock


class IO:
    """The resources a finalizer must release; holds no reference to the client."""

    __slots__ = ("ctrl", "data", "dispatcher", "loop", "tasks")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ctrl: zmq.Socket[bytes],
        data: zmq.Socket[bytes],
        dispatcher: Dispatcher,
    ) -> None:
        self.loop = loop
        self.ctrl = ctrl
        self.data = data
        self.dispatcher = dispatcher
        """Its subscriptions are ended too, so a held iterator does not wait forever."""
        self.tasks: set[asyncio.Task[Any]] = set()


def release(io: IO) -> None:
    """Finalizer: cancel tasks, stop watching the sockets, say Bye, close. Idempotent."""

    def shutdown() -> None:
        if not io.loop.is_closed():
            io.dispatcher.clear()
        for task in list(io.tasks):
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                task.cancel()
        for sock in (io.ctrl, io.data):
            if not sock.closed and not io.loop.is_closed():
                with contextlib.suppress(Exception):
                    io.loop.remove_reader(sock.FD)
        close_ctrl(io.ctrl)
        io.data.close(linger=0)

    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is io.loop or io.loop.is_closed() or not io.loop.is_running():
        shutdown()
    else:  # dropped in another thread while the loop runs: release in the loop's thread
        with contextlib.suppress(RuntimeError):
            io.loop.call_soon_threadsafe(shutdown)


def close_ctrl(sock: zmq.Socket[bytes]) -> None:
    """Say Bye (if it can go out at once) and close the control socket."""
    if sock.closed:
        return
    with contextlib.suppress(zmq.ZMQError):
        sock.send(encode(Bye()), zmq.NOBLOCK)
    sock.close(linger=BYE_LINGER_MS)


def on_readable(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    """Loop reader callback: drain a socket if its client still exists."""
    drain = method()
    if drain is not None:
        drain()


async def heartbeat_loop(tick: weakref.WeakMethod[Callable[[], float | None]]) -> None:
    """Call ``tick`` and sleep what it returns, until it returns None or its client is gone."""
    while True:
        fn = tick()
        if fn is None:
            return
        try:
            delay = fn()
        except Exception:  # a bug here must not silence the heartbeats for good
            _log.exception("heartbeat tick failed")
            delay = 0.25
        del fn
        if delay is None:
            return
        await asyncio.sleep(delay)


async def run_weak(method: weakref.WeakMethod[Callable[[], Awaitable[None]]]) -> None:
    """Run a coroutine method if its client still exists."""
    fn = method()
    if fn is not None:
        await fn()


async def retry_loop(
    attempt: weakref.WeakMethod[Callable[[], Awaitable[bool | None]]],
    *,
    first_delay: float = 0.1,
    max_delay: float = 2.0,
) -> None:
    """Await ``attempt`` until it returns True or None (give up), backing off between."""
    delay = first_delay
    while True:
        fn = attempt()
        if fn is None:
            return
        try:
            done = await fn()
        except Exception:  # keep trying: giving up would leave the client deaf forever
            _log.exception("reconnect attempt crashed")
            done = False
        del fn
        if done is None or done:
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)
