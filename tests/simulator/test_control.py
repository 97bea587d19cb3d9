"""The /_sim control API: inspection and injected faults."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from websockets.exceptions import InvalidStatus
from yarl import URL

from simulator.app import RunningSimulator
from tests.simulator.conftest import (
    SimFactory,
    collect_until,
    control,
    get_json,
    open_ws,
    recv_frame,
    recv_until,
    rest_auth,
    send,
)
from tests.support import scaled

T = {"ticket": "test"}

# The simulator's demo secret is shorter than PyJWT recommends; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


async def test_connections_show_subscription_format_and_every_request(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "ticker", "codes": ["KRW-BTC"]}, {"format": "SIMPLE"})
        await send(ws, T, {"type": "ticker"})
        await recv_until(ws, lambda m: "error" in m)
        (conn,) = (await control(sim, "connections"))["connections"]
        assert conn["path"] == "/websocket/v1"
        assert conn["remote"].startswith("127.0.0.1:")
        assert conn["format"] == "SIMPLE"
        assert conn["subscription"] == [
            {"ticket": "test"},
            {"type": "ticker", "codes": ["KRW-BTC"]},
            {"format": "SIMPLE"},
        ]
        first, second = conn["requests"]
        assert first["accepted"] is True
        assert first["error"] is None
        assert (second["accepted"], second["error"]) == (False, "NO_CODES")
        assert second["ts"] >= first["ts"] > 0
        assert '"type": "ticker"' in second["data"]
    closed = await control(sim, "connections?closed=1")
    assert closed["connections"][0]["closed"] is True
    assert (await control(sim, "connections"))["connections"] == []


async def test_drop_aborts_sockets_without_a_close_frame(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "ticker", "codes": ["KRW-BTC"]})
        await recv_frame(ws)
        assert await control(sim, "drop", {"path": "/websocket/v1/private"}) == {"dropped": 0}
        assert await control(sim, "drop", {}) == {"dropped": 1}
        await asyncio.wait_for(ws.wait_closed(), scaled(5))
        assert ws.close_code == 1006  # abnormal closure: no close frame from the server
        assert ws.protocol.close_rcvd is None


async def test_stall_withholds_data_pings_and_pongs_then_resumes(make_sim: SimFactory) -> None:
    sim = await make_sim(rate=40.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "orderbook", "codes": ["KRW-BTC"]})
        await recv_until(ws, lambda m: m.get("stream_type") == "REALTIME")
        await control(sim, "stall", {"seconds": 1.5})
        # Whatever was already in flight drains quickly; then nothing at all.
        while True:
            try:
                await asyncio.wait_for(ws.recv(), 0.2)
            except TimeoutError:
                break
        pong = await ws.ping()
        await ws.send("PING")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pong), 0.4)
        # Resumes by itself: the pong, the UP and data arrive.
        await asyncio.wait_for(pong, scaled(5))
        msgs = await collect_until(ws, lambda m: m.get("stream_type") == "REALTIME")
        assert {"status": "UP"} in msgs


async def test_refuse_upgrades_for_a_while(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    await control(sim, "refuse_upgrades", {"seconds": 30, "status": 418})
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(sim.urls["ws"]):
            pass
    assert info.value.response.status_code == 418
    assert b"blocked for" in (info.value.response.body or b"")
    stats = await control(sim, "stats")
    assert stats["upgrades"]["refused_by_status"] == {"418": 1}
    assert [(e["path"], e["status"]) for e in stats["upgrades"]["log"]] == [("/websocket/v1", 418)]
    await control(sim, "refuse_upgrades", {"seconds": 0, "status": 429})
    async with open_ws(sim.urls["ws"]):
        pass


async def test_rest_fail_makes_v1_routes_fail(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    url = sim.urls["rest"] + "/v1/ticker"
    await control(sim, "rest_fail", {"seconds": 30, "status": 500})
    status, body, headers = await get_json(http, url, markets="KRW-BTC")
    assert status == 500
    assert body["error"]["name"] == 500
    assert "Remaining-Req" in headers
    await control(sim, "rest_fail", {"seconds": 30, "status": 429})
    status, body, _ = await get_json(http, url, markets="KRW-BTC")
    assert (status, body) == (429, "Too many API requests.")
    stats = await control(sim, "stats")
    assert stats["rest"]["groups"]["ticker"]["failed"] == 2
    await control(sim, "rest_fail", {"seconds": 0, "status": 500})
    status, _, _ = await get_json(http, url, markets="KRW-BTC")
    assert status == 200
    status, _, _ = await get_json(http, sim.urls["control"] + "/stats")
    assert status == 200


async def signed(
    sim: RunningSimulator, method: str, path: str, params: dict[str, Any]
) -> tuple[int, Any]:
    """One signed exchange call: JSON body for POST, query string otherwise."""
    url, headers = sim.urls["rest"] + path, {"Authorization": rest_auth(params)}
    async with aiohttp.ClientSession() as http:
        if method == "POST":
            request = http.post(url, json=params, headers=headers)
        else:
            request = http.request(method, url, params=params, headers=headers)
        async with request as resp:
            return resp.status, await resp.json()


async def unanswered(sim: RunningSimulator, method: str, path: str, params: dict[str, Any]) -> None:
    """Send one signed call over a bare socket and assert that no byte of a reply came
    back before the connection ended. (A bare socket because aiohttp's client resends an
    idempotent request once on a dropped connection, with the same spent JWT nonce.)"""
    url = URL(sim.urls["rest"])
    assert url.host is not None
    assert url.port is not None
    if method == "POST":
        target, body = path, json.dumps(params).encode()
    else:
        target, body = f"{path}?{urlencode(params)}", b""
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Authorization: {rest_auth(params)}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        try:
            reply = await asyncio.wait_for(reader.read(), scaled(5))
        except ConnectionResetError:
            reply = b""
        assert reply == b"", reply
    finally:
        writer.close()


def limit_bid(identifier: str) -> dict[str, Any]:
    return {"market": "KRW-BTC", "side": "bid", "ord_type": "limit", "price": "1000000",
            "volume": "0.01", "identifier": identifier}  # fmt: skip


async def test_rest_drop_carries_orders_out_but_loses_the_replies(make_sim: SimFactory) -> None:
    sim = await make_sim()
    answer = await control(sim, "rest_drop", {"path": "/v1/orders", "method": "POST", "count": 2})
    assert answer == {"path": "/v1/orders", "method": "POST", "count": 2}
    assert (await control(sim, ""))["faults"]["rest_drop"] == {"POST /v1/orders": 2}
    for identifier in ("lost-1", "lost-2"):
        await unanswered(sim, "POST", "/v1/orders", limit_bid(identifier))
        status, order = await signed(sim, "GET", "/v1/order", {"identifier": identifier})
        assert (status, order["state"]) == (200, "wait"), "placed although the reply was lost"
    status, order = await signed(sim, "POST", "/v1/orders", limit_bid("answered"))
    assert (status, order["identifier"]) == (201, "answered"), "count 2 drops two replies only"
    status, listed = await signed(sim, "GET", "/v1/orders/open", {"market": "KRW-BTC"})
    assert sorted(o["identifier"] for o in listed) == ["answered", "lost-1", "lost-2"]
    stats = await control(sim, "stats")
    assert stats["rest"]["dropped"] == 2
    assert (await control(sim, ""))["faults"]["rest_drop"] == {}


async def test_rest_drop_matches_method_and_path_and_carries_out_a_cancel(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim()
    _, order = await signed(sim, "POST", "/v1/orders", limit_bid("to-cancel"))
    await control(sim, "rest_drop", {"path": "/v1/order", "method": "DELETE"})
    status, _ = await signed(sim, "GET", "/v1/order", {"uuid": order["uuid"]})
    assert status == 200, "a GET of the same path is not dropped"
    await unanswered(sim, "DELETE", "/v1/order", {"uuid": order["uuid"]})
    status, got = await signed(sim, "GET", "/v1/order", {"uuid": order["uuid"]})
    assert (status, got["state"]) == (200, "cancel")
    status, got = await signed(sim, "DELETE", "/v1/order", {"uuid": order["uuid"]})
    assert (status, got["error"]["name"]) == (404, "order_not_found")


async def test_reset_and_count_0_clear_rest_drop(make_sim: SimFactory) -> None:
    sim = await make_sim()
    await control(sim, "rest_drop", {"path": "/v1/orders", "count": 5})
    await control(sim, "reset", {})
    status, _ = await signed(sim, "POST", "/v1/orders", limit_bid("after-reset"))
    assert status == 201
    await control(sim, "rest_drop", {"path": "/v1/orders", "count": 5})
    await control(sim, "rest_drop", {"path": "/v1/orders", "count": 0})
    status, _ = await signed(sim, "POST", "/v1/orders", limit_bid("after-zero"))
    assert status == 201
    assert (await control(sim, "stats"))["rest"]["dropped"] == 0


async def test_rate_changes_the_event_rate(make_sim: SimFactory) -> None:
    sim = await make_sim(rate=40.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "orderbook", "codes": ["KRW-BTC"]})
        await recv_until(ws, lambda m: m["stream_type"] == "REALTIME")
        assert await control(sim, "rate", {"per_second": 0}) == {
            "per_second": 0.0,
            "firehose": False,
            "firehose_rate": 0.0,
        }
        while True:  # drain what was in flight, then silence
            try:
                await asyncio.wait_for(ws.recv(), 0.3)
            except TimeoutError:
                break
        await control(sim, "rate", {"per_second": 200})
        msgs = [await recv_frame(ws) for _ in range(20)]
        span = msgs[-1]["timestamp"] - msgs[0]["timestamp"]
        assert span < 1000, "20 books at ~200/s arrive well within a second"


async def test_reset_clears_faults_counters_and_logs(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "ticker", "codes": ["KRW-BTC"]})
        await recv_frame(ws)
        await control(sim, "rest_fail", {"seconds": 60, "status": 500})
        await control(sim, "stall", {"seconds": 60})
        await get_json(http, sim.urls["rest"] + "/v1/market/all")
        assert await control(sim, "reset", {}) == {"reset": True}
        stats = await control(sim, "stats")
        assert stats["rest"]["requests"] == 0
        assert stats["ws"]["requests"] == 0
        assert stats["upgrades"]["accepted"] == 0
        (conn,) = (await control(sim, "connections"))["connections"]
        assert conn["requests"] == []
        info = await control(sim, "")
        assert info["faults"] == {
            "stall": {},
            "app_stall": {},
            "refuse_upgrades": None,
            "rest_fail": None,
            "rest_drop": {},
        }
        status, _, _ = await get_json(http, sim.urls["rest"] + "/v1/market/all")
        assert status == 200
        msg = await recv_until(ws, lambda m: m.get("stream_type") == "REALTIME", timeout=5)
        assert msg["type"] == "ticker", "subscriptions survive a reset"


async def test_stats_count_upgrades_requests_and_rest_groups(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "ticker", "codes": ["KRW-BTC"]})
        await send(ws, {"type": "ticker"})
        await ws.send("PING")
        await recv_until(ws, lambda m: m.get("status") == "UP")
    for _ in range(3):
        await get_json(http, sim.urls["rest"] + "/v1/ticker", markets="KRW-BTC")
    await get_json(http, sim.urls["rest"] + "/v1/market/all")
    stats = await control(sim, "stats")
    assert stats["upgrades"]["accepted"] == 1
    assert stats["ws"]["requests"] == 2
    assert stats["ws"]["accepted"] == 1
    assert stats["ws"]["errors"] == 1
    assert stats["ws"]["pings"] == 1
    assert stats["rest"]["groups"]["ticker"]["ok"] == 3
    assert stats["rest"]["groups"]["market"]["requests"] == 1
    assert stats["rest"]["requests"] == 4


async def test_control_rejects_bad_bodies(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    for path, body in [
        ("stall", {"seconds": "x"}),
        ("refuse_upgrades", {"seconds": 1, "status": 500}),
        ("rest_fail", {"seconds": 1, "status": 404}),
        ("rest_drop", {"method": "POST"}),
        ("rest_drop", {"path": "/_sim/reset"}),
        ("rest_drop", {"path": "/v1/orders", "method": "PATCH"}),
        ("rest_drop", {"path": "/v1/orders", "count": -1}),
        ("rest_drop", {"path": "/v1/orders", "count": 1.5}),
        ("rest_drop", {"path": "/v1/orders", "count": True}),
        ("rate", {"per_second": -1}),
        ("rate", {"firehose": "yes"}),
        ("rate", {"firehose_rate": -5}),
        ("rate", {"firehose_rate": True}),
    ]:
        async with http.post(f"{sim.urls['control']}/{path}", json=body) as resp:
            assert resp.status == 400, path
    async with http.post(f"{sim.urls['control']}/drop", data=b"not json") as resp:
        assert resp.status == 400


async def test_a_firehose_cap_must_be_finite(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with aiohttp.ClientSession() as http:
        for cap in ("Infinity", "NaN"):  # what json.loads accepts beyond JSON
            async with http.post(
                f"{sim.urls['control']}/rate",
                data=f'{{"firehose_rate": {cap}}}',
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 400, cap
                assert "finite" in (await resp.text())
