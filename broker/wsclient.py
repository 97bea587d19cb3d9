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
import urllib.request
from types import SimpleNamespace
from typing import Literal
from urllib.parse import urlsplit

import aiohttp

from broker.rest import http_session

__all__ = [
    "ConnectFailed",
    "UpgradeRefused",
    "WebSocket",
    "WsClient",
    "proxy_for",
    "use_fast_zlib",
]

WebSocket = aiohttp.ClientWebSocketResponse[Literal[False]]
"""A connection whose text frames arrive as bytes (``decode_text=False``)."""

MAX_FRAME = 2**24
"""Largest frame accepted (bytes); Upbit's largest, a 30-unit orderbook, is ~4 KB."""
MAX_REFUSAL_BODY = 4096
"""Bytes of a refused upgrade's body kept for parsing (Upbit's are a few dozen)."""


def use_fast_zlib() -> str:
    """Have aiohttp inflate with zlib-ng when it is installed; returns the backend's name.

    permessage-deflate inflation is a third of the broker's CPU per compressed
    30-level orderbook: 4.6 us with the standard zlib, 3.5 us with zlib-ng (same bytes
    out). Process-wide (aiohttp's REST gzip too); call it once before connecting.
    """
    try:
        from zlib_ng import zlib_ng
    except ImportError:  # optional ("fast" extra): the standard zlib works, just slower
        return "zlib"
    aiohttp.set_zlib_backend(zlib_ng)
    return "zlib-ng"


class UpgradeRefused(Exception):
    """The server answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"upgrade refused with HTTP {status}")
        self.status = status
        self.body = body


class ConnectFailed(Exception):
    """The connection could not be opened (network, TLS, timeout, bad handshake)."""


def proxy_for(url: str, env_proxies: dict[str, str] | None = None) -> str | None:
    """The proxy to reach ``url`` through, from the environment, or None.

    Like the ``websockets`` library: ``wss://`` looks at ``WSS_PROXY`` then
    ``HTTPS_PROXY``, ``ws://`` at ``WS_PROXY`` then ``HTTP_PROXY``; ``NO_PROXY`` wins.
    aiohttp tunnels through ``http://`` proxies only: another kind raises ConnectFailed
    rather than silently connecting directly. Read here instead of aiohttp's
    ``trust_env``, which would also send ``~/.netrc`` credentials to Upbit as Basic auth.
    """
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies() if env_proxies is None else env_proxies
    keys = ("wss", "https") if parts.scheme == "wss" else ("ws", "http")
    proxy = next((proxies[k] for k in keys if proxies.get(k)), None)
    if proxy is None:
        return None
    if urlsplit(proxy).scheme != "http":
        raise ConnectFailed(f"proxy {urlsplit(proxy).scheme}:// is not supported (http:// only)")
    return proxy


class WsClient:
    """One aiohttp session for a link's successive connections.

    Create and close it inside the running event loop. Proxies: :func:`proxy_for`.
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
            session = self._session = http_session(trace_configs=[trace])
        self._refusal_body = ""
        proxy = proxy_for(url)
        try:
            async with asyncio.timeout(self._open_timeout):
                return await session.ws_connect(
                    url,
                    headers=headers,
                    proxy=proxy,
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
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            # ValueError: aiohttp's answer to headers or a URL it cannot use.
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
