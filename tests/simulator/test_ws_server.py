"""The WebSocket server shell: its own port, HTTP answers off the upgrade path,
permessage-deflate negotiation and the going-away close at shutdown."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from simulator.cli import build_parser, config_from_args
from simulator.config import SimConfig
from tests.simulator.conftest import SimFactory, control, get_json, open_ws
from tests.support import scaled


def test_the_ws_port_is_the_next_one_or_a_free_one_when_rest_takes_a_free_one() -> None:
    assert SimConfig(port=8765).ws_port_for(8765) == 8766
    assert SimConfig(port=0).ws_port_for(40123) == 0  # both ports picked by the OS
    assert SimConfig(port=8765, ws_port=9000).ws_port_for(8765) == 9000
    assert SimConfig(port=0, ws_port=0).ws_port_for(40123) == 0


def test_the_cli_takes_a_ws_port() -> None:
    default = config_from_args(build_parser().parse_args([]))
    assert (default.port, default.ws_port_for(default.port)) == (8765, 8766)
    chosen = config_from_args(build_parser().parse_args(["--port", "7000", "--ws-port", "7100"]))
    assert chosen.ws_port_for(chosen.port) == 7100


async def test_websockets_have_a_port_of_their_own(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    assert sim.ws_port != sim.port
    assert sim.urls["ws"] == f"ws://127.0.0.1:{sim.ws_port}/websocket/v1"
    # The REST port points a misconfigured client at the right URL.
    status, body, _ = await get_json(http, sim.urls["rest"] + "/websocket/v1")
    assert status == 404
    assert sim.urls["ws"] in body
    # The WS port answers plain HTTP like the aiohttp server did.
    ws_http = f"http://127.0.0.1:{sim.ws_port}"
    status, body, headers = await get_json(http, ws_http + "/websocket/v1")
    assert (status, body) == (400, "WebSocket upgrade expected.")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    status, _, _ = await get_json(http, ws_http + "/v1/market/all")
    assert status == 404
    assert (await control(sim, "stats"))["upgrades"]["log"] == []


@pytest.mark.parametrize("compress", [True, False])
async def test_deflate_is_negotiated_when_offered_unless_switched_off(
    make_sim: SimFactory, compress: bool
) -> None:
    sim = await make_sim(compress=compress)
    async with open_ws(sim.urls["ws"]) as ws:  # websockets offers permessage-deflate
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
        (conn,) = (await control(sim, "connections"))["connections"]
    if compress:
        assert extensions == "permessage-deflate"  # no parameters: 15-bit windows
        assert conn["compressed"] is True
    else:
        assert extensions is None
        assert conn["compressed"] is False


async def test_an_aiohttp_client_gets_compressed_binary_frames(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(sim.urls["ws"], compress=15) as ws,
    ):
        assert ws.compress == 15
        await ws.send_str('[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"]}]')
        msg = await ws.receive(timeout=scaled(5))
        assert msg.type is aiohttp.WSMsgType.BINARY
        assert b'"code":"KRW-BTC"' in msg.data


async def test_closing_the_simulator_closes_sockets_going_away(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        await sim.close()
        await asyncio.wait_for(ws.wait_closed(), scaled(5))
        assert (ws.close_code, ws.close_reason) == (1001, "shutdown")
