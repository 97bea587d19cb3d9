"""The upstream WebSocket opener against a real aiohttp server on loopback.

What matters to the broker: a refused upgrade keeps its status *and body* (Upbit's 418
body carries the block time), text frames arrive as bytes, the requested headers are
sent, and every other failure is one :class:`ConnectFailed`.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from broker.wsclient import ConnectFailed, UpgradeRefused, WsClient, proxy_for

BAN_BODY = '{"error":{"name":"too_many_requests","message":"blocked for 42 seconds"}}'


UPGRADES: list[str] = []
"""Paths and queries of the upgrade requests the server received."""


async def _upgrade(request: web.Request) -> web.StreamResponse:
    UPGRADES.append(request.path_qs)
    if request.query.get("drop"):  # the connection dies before any answer
        assert request.transport is not None
        request.transport.abort()
        return web.Response()
    if request.query.get("refuse"):
        status = int(request.query["refuse"])
        return web.Response(status=status, text=BAN_BODY, content_type="application/json")
    ws = web.WebSocketResponse(compress=True)  # used only when the client offers it
    await ws.prepare(request)
    await ws.send_str('{"auth":"' + request.headers.get("Authorization", "") + '"}')
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/ws", _upgrade)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", [418, 429])
async def test_refused_upgrade_keeps_status_and_body(server: str, status: int) -> None:
    client = WsClient()
    try:
        with pytest.raises(UpgradeRefused) as info:
            await client.connect(f"{server}?refuse={status}", {}, compression=False)
    finally:
        await client.close()
    assert info.value.status == status
    assert info.value.body == BAN_BODY


async def test_connects_sends_headers_and_reads_text_as_bytes(server: str) -> None:
    client = WsClient()
    try:
        # A refusal first: the next connection must not inherit its body or fail.
        with pytest.raises(UpgradeRefused):
            await client.connect(f"{server}?refuse=429", {}, compression=True)
        ws = await client.connect(server, {"Authorization": "Bearer x"}, compression=True)
        first = await ws.receive()
        assert first.type is WSMsgType.TEXT
        assert first.data == b'{"auth":"Bearer x"}'
        await ws.send_str("echo")
        assert (await ws.receive()).data == b"echo"
        await ws.close()
    finally:
        await client.close()


async def test_an_upgrade_whose_answer_is_lost_is_sent_once(server: str) -> None:
    # aiohttp would send the GET again by itself, with the same JWT (a spent nonce:
    # 401, read as rejected keys). The link reconnects with a fresh token instead.
    client = WsClient()
    UPGRADES.clear()
    try:
        with pytest.raises(ConnectFailed):
            await client.connect(f"{server}?drop=1", {}, compression=False)
    finally:
        await client.close()
    assert UPGRADES == ["/ws?drop=1"]


async def test_unreachable_port_is_connect_failed() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connection refused
        client = WsClient()
        try:
            with pytest.raises(ConnectFailed, match="ClientConnectorError"):
                await client.connect(f"ws://127.0.0.1:{port}/ws", {}, compression=False)
        finally:
            await client.close()


async def test_silent_server_times_out_as_connect_failed() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts TCP, never answers the upgrade
        port = listener.getsockname()[1]
        client = WsClient(open_timeout=0.3)
        try:
            with pytest.raises(ConnectFailed, match="TimeoutError"):
                await client.connect(f"ws://127.0.0.1:{port}/ws", {}, compression=False)
        finally:
            await client.close()


async def test_netrc_credentials_are_never_sent(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's trust_env would send ~/.netrc as Basic auth, to Upbit or next to a JWT."""
    netrc = tmp_path / "netrc"
    netrc.write_text("default login alice password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    client = WsClient()
    try:
        ws = await client.connect(server, {}, compression=False)
        assert (await ws.receive()).data == b'{"auth":""}'
        await ws.close()
        bearer = await client.connect(server, {"Authorization": "Bearer x"}, compression=False)
        assert (await bearer.receive()).data == b'{"auth":"Bearer x"}'
        await bearer.close()
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("url", "proxies", "expected"),
    [
        ("wss://api.upbit.com/websocket/v1", {}, None),
        ("wss://api.upbit.com/websocket/v1", {"https": "http://proxy:3128"}, "http://proxy:3128"),
        (
            "wss://api.upbit.com/websocket/v1",
            {"wss": "http://a:1", "https": "http://b:2"},
            "http://a:1",
        ),
        ("ws://api.upbit.com/websocket/v1", {"https": "http://proxy:3128"}, None),
        ("ws://api.upbit.com/websocket/v1", {"http": "http://proxy:3128"}, "http://proxy:3128"),
    ],
)
def test_the_proxy_comes_from_the_environment_like_websockets(
    url: str, proxies: dict[str, str], expected: str | None
) -> None:
    assert proxy_for(url, proxies) == expected


def test_a_proxy_aiohttp_cannot_use_is_an_error_not_a_direct_connection() -> None:
    with pytest.raises(ConnectFailed, match="socks5:// is not supported"):
        proxy_for("wss://api.upbit.com/websocket/v1", {"https": "socks5://proxy:1080"})


def test_no_proxy_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "api.upbit.com")
    assert proxy_for("wss://api.upbit.com/x", {"https": "http://proxy:3128"}) is None


async def test_compressed_frames_read_the_same_with_zlib_ng(server: str) -> None:
    """zlib-ng (the "fast" extra) inflates permessage-deflate to the very same bytes."""
    from aiohttp.compression_utils import ZLibBackend

    from broker.wsclient import use_fast_zlib

    pytest.importorskip("zlib_ng")
    before = ZLibBackend._zlib_backend
    try:
        assert use_fast_zlib() == "zlib-ng"
        from zlib_ng import zlib_ng

        assert ZLibBackend._zlib_backend is zlib_ng
        frames = [b'{"n":%d,"pad":"%s"}' % (i, b"x" * (i * 97 % 3000)) for i in range(50)]
        client = WsClient()
        try:
            ws = await client.connect(server, {}, compression=True)
            assert ws.compress, "the server did not negotiate permessage-deflate"
            await ws.receive()  # the greeting
            for frame in frames:
                await ws.send_str(frame.decode())
            assert [(await ws.receive()).data for _ in frames] == frames
            await ws.close()
        finally:
            await client.close()
    finally:
        aiohttp.set_zlib_backend(before)
