"""The application-stall fault: pongs keep coming, the exchange's application does not."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection

from tests.simulator.conftest import (
    SimFactory,
    collect_until,
    control,
    open_ws,
    recv_until,
    send,
)
from tests.support import scaled

T = {"ticket": "test"}
TICKER = {"type": "ticker", "codes": ["KRW-BTC"]}


async def drain(ws: ClientConnection, quiet: float = 0.3) -> None:
    """Read until nothing has arrived for ``quiet`` seconds (what was in flight)."""
    while True:
        try:
            await asyncio.wait_for(ws.recv(), quiet)
        except TimeoutError:
            return


async def test_app_stall_answers_pings_but_sends_no_data_no_up_and_ignores_requests(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim(rate=40.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "trade", "codes": ["KRW-BTC"]})
        await recv_until(ws, lambda m: m.get("stream_type") == "REALTIME")
        answer = await control(sim, "stall", {"seconds": 2.0, "kind": "app"})
        assert answer["kind"] == "app"
        await drain(ws)
        # The network layer lives: a ping frame is answered at once.
        await asyncio.wait_for(await ws.ping(), scaled(1))
        # The application does not: no UP, no data, no answer to a request.
        await ws.send("PING")
        await send(ws, T, TICKER)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)
        (conn,) = (await control(sim, "connections"))["connections"]
        assert conn["ignored"] == 2
        assert conn["pings"] == 0
        assert len(conn["requests"]) == 1  # only the trade request before the stall
        # After the stall, data of the old subscription flows again: the ticker request
        # sent during the stall was lost, not held.
        msgs = await collect_until(
            ws, lambda m: m.get("stream_type") == "REALTIME", timeout=5, what="data again"
        )
        assert all(m.get("type") != "ticker" for m in msgs)
        await ws.send("PING")
        await recv_until(ws, lambda m: m == {"status": "UP"}, what="UP after the stall")


async def test_app_stall_of_one_path_leaves_the_other_answering(make_sim: SimFactory) -> None:
    sim = await make_sim()
    await control(sim, "stall", {"seconds": 30, "path": "/websocket/v1/private", "kind": "app"})
    async with open_ws(sim.urls["ws"]) as ws:
        await ws.send("PING")
        await recv_until(ws, lambda m: m == {"status": "UP"}, what="UP on the public path")


async def test_app_stall_shows_in_faults_ends_with_zero_and_on_reset(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim()
    await control(sim, "stall", {"seconds": 60, "kind": "app"})
    faults = (await control(sim, ""))["faults"]
    assert set(faults["app_stall"]) == {"*"}
    assert faults["stall"] == {}
    async with open_ws(sim.urls["ws"]) as ws:
        await ws.send("PING")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)
        assert await control(sim, "stall", {"seconds": 0, "kind": "app"}) == {
            "stalled_until": None,
            "kind": "app",
        }
        await ws.send("PING")
        await recv_until(ws, lambda m: m == {"status": "UP"}, what="UP once the stall ended")
    await control(sim, "stall", {"seconds": 60, "kind": "app"})
    await control(sim, "reset", {})
    assert (await control(sim, ""))["faults"]["app_stall"] == {}


async def test_a_stall_kind_other_than_link_or_app_is_refused(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{sim.urls['control']}/stall", json={"seconds": 1, "kind": "network"}
        ) as resp,
    ):
        assert resp.status == 400
