"""The client's sockets and the loop callbacks that reach it through weak references.

:class:`IO` holds what a :func:`weakref.finalize` must release (sockets, tasks, the
dispatcher) and nothing that points back at the client, so a client dropped without
``close()`` is still collected and its sockets closed. The module-level callbacks take
a weak reference for the same reason: a reader registered with the loop or a
background task never keeps a dropped client alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import TYPE_CHECKING, Any, Final

import zmq

from clients.dispatch import Dispatcher
from schemas.bus import Bye, encode

if TYPE_CHECKING:
    from clients.client import BrokerClient

__all__ = [
    "BYE_LINGER_MS",
    "IO",
    "close_ctrl",
    "heartbeat_loop",
    "on_ctrl_readable",
    "on_data_readable",
    "probe",
    "release",
    "resync_loop",
]

BYE_LINGER_MS: Final = 100
"""The control socket lingers this long on close so the Bye gets out (never blocks)."""


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
    if sock.closed:
        return
    with contextlib.suppress(zmq.ZMQError):
        sock.send(encode(Bye()), zmq.NOBLOCK)
    sock.close(linger=BYE_LINGER_MS)


def on_ctrl_readable(ref: weakref.ReferenceType[BrokerClient]) -> None:
    client = ref()
    if client is not None:
        client._drain_control()


def on_data_readable(ref: weakref.ReferenceType[BrokerClient]) -> None:
    client = ref()
    if client is not None:
        client._drain_data()


async def heartbeat_loop(ref: weakref.ReferenceType[BrokerClient]) -> None:
    """Beat, watch for silence, re-arm the readers; holds the client only while working."""
    while True:
        client = ref()
        if client is None or client._closed:
            return
        try:
            delay = client._tick()
        except Exception:  # a bug here must not silence the heartbeats for good
            client._log.exception("heartbeat tick failed")
            delay = 0.25
        del client
        await asyncio.sleep(delay)


async def probe(ref: weakref.ReferenceType[BrokerClient]) -> None:
    client = ref()
    if client is not None:
        await client._probe_once()


async def resync_loop(ref: weakref.ReferenceType[BrokerClient], reason: str) -> None:
    """Hello + re-subscribe until it works, backing off; stops if the client goes away."""
    delay = 0.1
    while True:
        client = ref()
        if client is None or client._closed:
            return
        try:
            done = await client._resync_once(reason)
        except Exception:  # keep trying: giving up would leave the client deaf forever
            client._log.exception("reconnect attempt crashed")
            done = False
        if done:
            client._resync_task = None
            return
        del client
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
