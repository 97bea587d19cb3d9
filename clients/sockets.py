"""The client's sockets, and the loop callbacks that reach the client only weakly.

:func:`open_dealer` and :func:`open_sub` make the two sockets with the client's trust
settings: the endpoint checked first (:func:`check_endpoint`: an ipc path another user
could control is refused; a tcp socket is a CURVE client when the environment names the
keys), a random routing id of our own on the DEALER, and a bound on the size of any
message either socket accepts (:data:`schemas.bus.MAX_MESSAGE_BYTES`). Both run before
every connect and every reconnect, so a socket planted later is refused too. :class:`IO`
holds what a :func:`weakref.finalize` must release (sockets, tasks, the dispatcher) and
nothing that points back at the client, so a client dropped without ``close()`` is
still collected and its sockets closed. The loop callbacks take weak methods for the
same reason: a reader registered with the loop or a background task never keeps a
dropped client alive, and this module knows nothing of the client but those methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import struct
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog
import zmq
from zmq.utils import z85

from clients.dispatch import Dispatcher
from clients.errors import UntrustedBroker
from schemas.bus import MAX_MESSAGE_BYTES, Bye, encode
from schemas.trust import CLIENT_CERT_ENV, SERVER_KEY_ENV, ipc_problem, is_tcp

__all__ = [
    "BYE_LINGER_MS",
    "IO",
    "ROUTING_ID_BYTES",
    "CurveKeys",
    "check_endpoint",
    "close_ctrl",
    "close_watched",
    "curve_keys",
    "disconnected",
    "heartbeat_loop",
    "new_routing_id",
    "on_readable",
    "open_dealer",
    "open_sub",
    "release",
    "retry_loop",
    "run_weak",
    "watch_disconnect",
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


@dataclass(frozen=True)
class CurveKeys:
    """What a CURVE client needs (z85): the broker's public key and our own key pair."""

    server: bytes
    public: bytes
    secret: bytes = b""

    def __repr__(self) -> str:  # the secret key never shows
        return f"CurveKeys(server={self.server!r}, public={self.public!r})"


def _load_cert(path: str, name: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth  # only clients on tcp read certificates

    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise UntrustedBroker(name, f"cannot read the certificate {path}: {exc}") from None
    if secret and secret_key is None:
        raise UntrustedBroker(name, f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key


def curve_keys(env: Mapping[str, str] | None = None) -> CurveKeys | None:
    """The CURVE keys named by ``UPBIT_BROKER_SERVER_KEY`` and ``UPBIT_BROKER_CLIENT_CERT``
    (None when neither is set); UntrustedBroker when only one is, or one is unreadable."""
    env = os.environ if env is None else env
    server = env.get(SERVER_KEY_ENV, "").strip()
    cert = env.get(CLIENT_CERT_ENV, "").strip()
    if not server and not cert:
        return None
    if not server or not cert:
        missing = SERVER_KEY_ENV if not server else CLIENT_CERT_ENV
        raise UntrustedBroker(missing, "is not set: CURVE needs both of the broker's variables")
    if len(server) == 40 and not os.path.exists(server):
        try:
            server_key = z85.encode(z85.decode(server))
        except (ValueError, KeyError):
            raise UntrustedBroker(SERVER_KEY_ENV, "is not a z85 key nor a file") from None
    else:
        server_key, _ = _load_cert(server, SERVER_KEY_ENV, secret=False)
    public, secret_key = _load_cert(cert, CLIENT_CERT_ENV, secret=True)
    assert secret_key is not None
    return CurveKeys(server_key, public, secret_key)


def check_endpoint(endpoint: str, env: Mapping[str, str] | None = None) -> CurveKeys | None:
    """Refuse (UntrustedBroker) an endpoint that may lead to someone else; the CURVE keys
    to use on it (tcp with keys configured), else None."""
    problem = ipc_problem(endpoint)
    if problem is not None:  # logged too: a reconnect that keeps refusing says why
        _log.warning("refusing the broker endpoint", path=problem.path, reason=problem.reason)
        raise UntrustedBroker(problem.path, problem.reason)
    return curve_keys(env) if is_tcp(endpoint) else None


def _connect(sock: zmq.Socket[bytes], endpoint: str, curve: CurveKeys | None) -> None:
    if curve is not None:  # libzmq proves the broker's key in the handshake
        sock.curve_serverkey = curve.server
        sock.curve_publickey = curve.public
        sock.curve_secretkey = curve.secret
    sock.connect(endpoint)


def open_dealer(
    ctx: zmq.Context[Any],
    endpoint: str,
    *,
    max_message: int = MAX_MESSAGE_BYTES,
    env: Mapping[str, str] | None = None,
) -> zmq.Socket[bytes]:
    """A DEALER to the broker's control ROUTER, with a fresh random routing id.

    Raises UntrustedBroker, before any socket exists, if the endpoint fails the checks.
    """
    curve = check_endpoint(endpoint, env)
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, new_routing_id())
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    _connect(sock, endpoint, curve)
    return sock


def open_sub(
    ctx: zmq.Context[Any],
    endpoint: str,
    prefixes: list[str],
    *,
    hwm: int,
    max_message: int = MAX_MESSAGE_BYTES,
    env: Mapping[str, str] | None = None,
) -> zmq.Socket[bytes]:
    """A SUB to the broker's data PUB, subscribed to ``prefixes``.

    Raises UntrustedBroker, before any socket exists, if the endpoint fails the checks.
    """
    curve = check_endpoint(endpoint, env)
    sock: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    _connect(sock, endpoint, curve)
    for prefix in prefixes:
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    return sock


def watch_disconnect(sock: zmq.Socket[bytes]) -> zmq.Socket[bytes]:
    """A monitor of ``sock`` that reports only a dropped connection.

    When the broker's process dies, its kernel closes the connection and libzmq reports
    it here within a millisecond: the client learns of a crash at once instead of after
    :data:`clients.core.LOST_AFTER` silent heartbeat intervals, so that silence bound
    can be long enough that a broker merely busy for a moment is not declared gone.
    """
    return sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)


def disconnected(monitor: zmq.Socket[bytes]) -> bool:
    """Read every pending monitor event: did the connection drop since the last look?"""
    dropped = False
    while True:
        try:
            frames = monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return dropped
        except zmq.ZMQError:  # closed under us: the socket is being replaced
            return dropped
        # Frame 0: the event id (uint16) then a value (uint32), in native byte order.
        if frames and len(frames[0]) >= 2:
            (event,) = struct.unpack_from("=H", frames[0])
            dropped = dropped or event == zmq.EVENT_DISCONNECTED


def close_watched(sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
    """Close a socket and its :func:`watch_disconnect` monitor, at once."""
    with contextlib.suppress(zmq.ZMQError):
        sock.disable_monitor()
    monitor.close(linger=0)
    sock.close(linger=0)


class IO:
    """The resources a finalizer must release; holds no reference to the client."""

    __slots__ = ("ctrl", "data", "dispatcher", "loop", "monitor", "tasks")

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
        self.monitor = watch_disconnect(data)
        """Reports the data connection dropping: a crashed broker, noticed at once."""
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
        for sock in (io.ctrl, io.data, io.monitor):
            if not sock.closed and not io.loop.is_closed():
                with contextlib.suppress(Exception):
                    io.loop.remove_reader(sock.FD)
        close_ctrl(io.ctrl)
        close_watched(io.data, io.monitor)

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
