"""Opening upstream WebSockets with aiohttp, keeping what a refused upgrade said.

The broker reads every upstream frame on one core, so the WebSocket reader's cost per
frame bounds its throughput: aiohttp's C frame parser reads a frame in about 2 us, the
``websockets`` library in about 5 us (bench/throughput.py, "aiohttp reader" row).

aiohttp drops the body of a refused upgrade, and Upbit puts the length of a 418 block
in that body. A request trace reads the body before aiohttp discards the response, so
:class:`UpgradeRefused` carries it and the connect gate can wait the block out.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Literal

import aiohttp

__all__ = ["ConnectFailed", "UpgradeRefused", "WebSocket", "WsClient"]

WebSocket = aiohttp.ClientWebSocketResponse[Literal[False]]
"""A connection whose text frames arrive as bytes (``decode_text=False``)."""

MAX_FRAME = 2**24
"""Largest frame accepted (bytes); Upbit's largest, a 30-unit orderbook, is ~4 KB."""
MAX_REFUSAL_BODY = 4096
"""Bytes of a refused upgrade's body kept for parsing (Upbit's are a few dozen)."""


class UpgradeRefused(Exception):
    """The server answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"upgrade refused with HTTP {status}")
        self.status = status
        self.body = body


class ConnectFailed(Exception):
    """The connection could not be opened (network, TLS, timeout, bad handshake)."""


class WsClient:
    """One aiohttp session for a link's successive connections.

    Create and close it inside the running event loop. ``trust_env``: a proxy named by
    ``WSS_PROXY`` / ``WS_PROXY`` (an ``http://`` proxy) is used, ``NO_PROXY`` honoured.
    """

    def __init__(self, *, open_timeout: float = 10.0, close_timeout: float = 0.5) -> None:
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._session: aiohttp.ClientSession | None = None
        self._refusal_body = ""

    async def connect(self, url: str, headers: dict[str, str], *, compression: bool) -> WebSocket:
        """Open a WebSocket; pings are answered by the caller (``autoping`` is off).

        Raises :class:`UpgradeRefused` for an HTTP answer other than 101 and
        :class:`ConnectFailed` for anything else that prevents the connection.
        """
        session = self._session
        if session is None or session.closed:
            trace = aiohttp.TraceConfig()
            trace.on_request_end.append(self._keep_refusal_body)
            session = self._session = aiohttp.ClientSession(trace_configs=[trace], trust_env=True)
        self._refusal_body = ""
        try:
            async with asyncio.timeout(self._open_timeout):
                return await session.ws_connect(
                    url,
                    headers=headers,
                    autoping=False,
                    autoclose=True,
                    # A peer that stopped answering pings will not answer a close either:
                    # waiting long for it only delays the reconnect.
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self._close_timeout),
                    max_msg_size=MAX_FRAME,
                    compress=15 if compression else 0,
                    decode_text=False,  # msgspec decodes bytes; skip the str round trip
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 101:  # upgraded, but the handshake headers were wrong
                raise ConnectFailed(f"bad handshake: {exc.message}") from None
            raise UpgradeRefused(exc.status, self._refusal_body) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {str(exc)[:200]}") from None

    async def close(self) -> None:
        """Close the session and any connection still open."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _keep_refusal_body(
        self,
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        response = params.response
        if response.status != 101:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                body = await response.content.read(MAX_REFUSAL_BODY)
                self._refusal_body = body.decode("utf-8", "replace")
