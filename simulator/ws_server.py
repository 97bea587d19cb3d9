"""The WebSocket server: ``websockets`` on its own port, Upbit's upgrade checks, pongs.

REST stays on aiohttp (:mod:`simulator.app`); the two WebSocket endpoints are served by
``websockets.asyncio.server`` so that the broker's aiohttp client and this server are
different implementations. This module is the I/O shell around :class:`simulator.ws.
Connection`:

- :func:`check_upgrade` answers an upgrade the way Upbit would before any frame: 404 off
  the two paths, 400 without upgrade headers, injected refusals and the upgrade limit
  (429/418 with Upbit's text), and on ``/private`` a JWT check when
  ``private_auth_failure="http_401"``;
- :class:`SimServerConnection` turns websockets' automatic pong off: ping frames are
  queued for the connection's ponger, so a stall can withhold the answers;
- :func:`serve_ws` starts the listening socket with Upbit-like settings
  (permessage-deflate when offered unless ``compress=False``, 1 MiB messages, no server
  keepalive pings).
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from simulator.auth import unverified_access_key
from simulator.limits import too_many_text
from simulator.ws import PRIVATE_PATH, PUBLIC_PATH, Connection

if TYPE_CHECKING:
    from websockets.protocol import Event

    from simulator.app import Simulator

__all__ = ["Route", "SimServerConnection", "check_upgrade", "serve_ws"]

log = structlog.get_logger("simulator.ws")

MAX_MESSAGE = 1 << 20
"""Largest client message accepted (bytes); bigger ones are closed with 1009."""
PINGS_HELD = 64
"""Ping frames held unanswered per connection (during a stall); older ones go unanswered,
which RFC 6455 allows: a pong may answer only the most recent ping."""
WRITE_LIMIT = 1 << 16
"""Transport write buffer high-water mark: sends wait (flow control) above it."""


@dataclass(frozen=True, slots=True)
class Route:
    """What the upgrade checks decided for an accepted connection."""

    private: bool
    access_key: str | None
    auth_error: tuple[str, str] | None  # (Upbit name, message) of a bad JWT, in-band mode


class _ManualPongProtocol(ServerProtocol):
    """websockets' server protocol without the automatic pong: a ping is only an event."""

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.PING:
            self.events.append(frame)  # what ServerProtocol does besides sending the pong
            return
        super().recv_frame(frame)


class SimServerConnection(ServerConnection):
    """A websockets server connection whose pings wait for :meth:`next_ping` to answer."""

    def __init__(self, protocol: ServerProtocol, server: Server, **kwargs: Any) -> None:
        # serve() builds a plain ServerProtocol and has no switch for automatic pongs;
        # the subclass only overrides recv_frame, so re-classing the instance is safe.
        protocol.__class__ = _ManualPongProtocol
        super().__init__(protocol, server, **kwargs)
        self.route: Route | None = None
        self.last_frame_at = time.monotonic()
        """When the client last sent any frame (data, ping, pong or close)."""
        self._pings: deque[bytes] = deque(maxlen=PINGS_HELD)
        self._ping_ready = asyncio.Event()

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame):
            self.last_frame_at = time.monotonic()
            if event.opcode is Opcode.PING:
                self._pings.append(bytes(event.data))
                self._ping_ready.set()
                return
        super().process_event(event)

    async def next_ping(self) -> bytes:
        """The payload of the oldest unanswered ping frame (waits for one)."""
        while not self._pings:
            self._ping_ready.clear()
            await self._ping_ready.wait()
        return self._pings.popleft()


def _header(request: Request, name: str) -> str | None:
    values = request.headers.get_all(name)
    return values[0] if values else None


def _is_upgrade(request: Request) -> bool:
    upgrade = (_header(request, "Upgrade") or "").strip().lower()
    connection = ",".join(request.headers.get_all("Connection"))
    tokens = {token.strip().lower() for token in connection.split(",")}
    return upgrade == "websocket" and "upgrade" in tokens


def _respond(status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    """An HTTP answer instead of the upgrade (websockets closes the socket after it)."""
    data = body.encode()
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, data)


def check_upgrade(sim: Simulator, conn: SimServerConnection, request: Request) -> Response | None:
    """Refuse an upgrade like Upbit (an HTTP response) or accept it (None; sets conn.route)."""
    path = urlsplit(request.path).path
    if path not in (PUBLIC_PATH, PRIVATE_PATH):
        return _respond(404, "404: Not Found")
    if not _is_upgrade(request):
        return _respond(400, "WebSocket upgrade expected.")
    private = path == PRIVATE_PATH
    now = time.time()
    refused = sim.faults.refuse_status(now)
    if refused is not None:
        sim.stats.upgrade_refused(refused, path)
        return _respond(refused, too_many_text(refused, sim.faults.refuse_remaining(now)))
    authorization = _header(request, "Authorization")
    access_key = unverified_access_key(authorization) if private else None
    peer = conn.remote_address
    key = f"key:{access_key}" if access_key else f"ip:{peer[0] if peer else 'unknown'}"
    decision = sim.upgrade_limiter.check(key, now)
    if not decision.allowed:
        sim.stats.upgrade_refused(decision.status, path)
        return _respond(decision.status, too_many_text(decision.status, decision.block_seconds))
    auth_error: tuple[str, str] | None = None
    if private:
        auth_error = sim.verify_ws(authorization)
        if auth_error is not None and sim.config.private_auth_failure == "http_401":
            sim.stats.upgrade_refused(401, path)
            body = {"error": {"name": auth_error[0], "message": auth_error[1]}}
            return _respond(401, json.dumps(body), "application/json; charset=utf-8")
    conn.route = Route(private, access_key, auth_error)
    return None


def _handler(sim: Simulator) -> Callable[[ServerConnection], Awaitable[None]]:
    async def handle(ws: ServerConnection) -> None:
        assert isinstance(ws, SimServerConnection)
        route = ws.route
        assert route is not None  # check_upgrade accepted it
        conn = Connection(
            sim,
            ws,
            private=route.private,
            access_key=route.access_key,
            auth_error=route.auth_error,
        )
        sim.stats.upgrade_accepted(conn.path)
        sim.hub.add(conn)
        conn.start()
        log.info(
            "ws_open", conn=conn.id, path=conn.path, remote=conn.remote, compressed=conn.compressed
        )
        try:
            await conn.run()
        finally:
            log.info("ws_closed", conn=conn.id, code=ws.close_code)

    return handle


async def serve_ws(sim: Simulator, host: str, port: int) -> Server:
    """Listen for both WebSocket endpoints on ``host:port`` (0: a free port)."""
    config = sim.config

    def process_request(ws: ServerConnection, request: Request) -> Response | None:
        assert isinstance(ws, SimServerConnection)
        return check_upgrade(sim, ws, request)

    # aiohttp's settings, which this server replaced: plain "permessage-deflate" (15-bit
    # windows, context takeover) at zlib level 1.
    extensions = (
        [ServerPerMessageDeflateFactory(compress_settings={"level": 1})]
        if config.compress
        else None
    )
    return await serve(
        _handler(sim),
        host,
        port,
        compression=None,  # negotiated by ``extensions`` above, with these settings
        extensions=extensions,
        process_request=process_request,
        ping_interval=None,  # Upbit sends no pings; clients keep the connection alive
        max_size=MAX_MESSAGE,
        write_limit=WRITE_LIMIT,
        create_connection=SimServerConnection,
    )
