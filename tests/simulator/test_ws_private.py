"""The private WebSocket: JWT on the upgrade, myOrder/myAsset from the account."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from websockets.exceptions import InvalidStatus

from simulator.app import RunningSimulator
from tests.simulator.conftest import (
    SimFactory,
    collect_until,
    control,
    expect_silence,
    make_jwt,
    open_ws,
    recv_frame,
    recv_until,
    send,
)

ACCESS = "test-access-key"
SECRET = "test-secret-key-" + "x" * 48
T = {"ticket": "private"}


def auth(token: str | None = None) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {token or make_jwt(ACCESS, SECRET)}"}}


@pytest.fixture
async def psim(make_sim: SimFactory) -> RunningSimulator:
    return await make_sim(access_key=ACCESS, secret_key=SECRET)


async def place(sim: RunningSimulator, **order: Any) -> Any:
    return await control(sim, "orders", order)


async def test_my_order_and_my_asset_follow_the_account(psim: RunningSimulator) -> None:
    async with open_ws(psim.urls["ws_private"], **auth()) as ws:
        await send(ws, T, {"type": "myOrder"}, {"type": "myAsset"})
        await expect_silence(ws, 0.2)  # private streams have no snapshot
        order = await place(
            psim, market="KRW-BTC", side="bid", ord_type="limit", price="1000000", volume="0.01"
        )
        msgs = await collect_until(ws, lambda m: m.get("type") == "myAsset")
        mine = next(m for m in msgs if m["type"] == "myOrder")
        assert mine["uuid"] == order["uuid"]
        assert (mine["code"], mine["state"], mine["stream_type"]) == ("KRW-BTC", "wait", "REALTIME")
        asset = msgs[-1]
        assert any(a["currency"] == "KRW" for a in asset["assets"])


async def test_private_simple_format_uses_abbreviated_keys(psim: RunningSimulator) -> None:
    async with open_ws(psim.urls["ws_private"], **auth()) as ws:
        await send(
            ws, T, {"type": "myOrder", "codes": []}, {"type": "myAsset"}, {"format": "SIMPLE_LIST"}
        )
        await place(psim, market="KRW-ETH", side="bid", ord_type="limit", price="1000", volume="10")
        everything: list[dict[str, Any]] = []
        while not any(m["ty"] == "myAsset" for m in everything):
            frame = await recv_frame(ws)
            assert isinstance(frame, list)
            assert frame
            everything += frame
        order = next(m for m in everything if m["ty"] == "myOrder")
        assert {"cd", "uid", "ab", "ot", "s", "st"} <= order.keys()
        asset = next(m for m in everything if m["ty"] == "myAsset")
        assert {"astuid", "ast", "asttms", "tms"} <= asset.keys()
        assert {"cu", "b", "l"} <= asset["ast"][0].keys()


async def test_my_order_codes_filter_the_orders(psim: RunningSimulator) -> None:
    async with open_ws(psim.urls["ws_private"], **auth()) as ws:
        await send(ws, T, {"type": "myOrder", "codes": ["KRW-ETH"]})
        await place(
            psim, market="KRW-BTC", side="bid", ord_type="limit", price="1000000", volume="0.01"
        )
        await place(psim, market="KRW-ETH", side="bid", ord_type="limit", price="1000", volume="10")
        msg = await recv_frame(ws)
        assert (msg["type"], msg["code"]) == ("myOrder", "KRW-ETH")
        await send(ws, {"ticket": "q"}, {"method": "LIST_SUBSCRIPTIONS"})
        listing = await recv_until(ws, lambda m: m.get("method") == "LIST_SUBSCRIPTIONS")
        assert listing["result"] == [{"type": "myOrder", "codes": ["KRW-ETH"]}]


async def test_private_request_errors(psim: RunningSimulator) -> None:
    async with open_ws(psim.urls["ws_private"], **auth()) as ws:
        await send(ws, T, {"type": "myAsset", "codes": ["KRW-BTC"]})
        assert (await recv_frame(ws))["error"]["name"] == "WRONG_FORMAT"
        await send(ws, T, {"type": "ticker", "codes": ["KRW-BTC"]})
        assert (await recv_frame(ws))["error"]["name"] == "INVALID_PARAM"
    async with open_ws(psim.urls["ws"]) as ws:
        await send(ws, T, {"type": "myAsset"})
        assert (await recv_frame(ws))["error"]["name"] == "INVALID_PARAM"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Bearer " + make_jwt(ACCESS, "wrong-secret-" + "y" * 52)},
        {"Authorization": "Bearer " + make_jwt("other-key", SECRET)},
    ],
)
async def test_bad_auth_is_refused_in_band_then_closed(
    psim: RunningSimulator, headers: dict[str, str]
) -> None:
    async with open_ws(psim.urls["ws_private"], additional_headers=headers) as ws:
        await ws.send("PING")
        assert await recv_frame(ws) == {"status": "UP"}
        await send(ws, T, {"type": "myAsset"})
        error = await recv_frame(ws)
        assert error == {
            "error": {"name": "INVALID_AUTH", "message": "인증 정보가 올바르지 않습니다."}
        }
        await ws.wait_closed()
        assert ws.close_code == 1008


async def test_a_reused_nonce_is_invalid_auth(psim: RunningSimulator) -> None:
    token = make_jwt(ACCESS, SECRET, nonce="0b3b6f4e-3a44-4bd5-9d7b-6b6c8f5f7a10")
    async with open_ws(psim.urls["ws_private"], **auth(token)) as ws:
        await send(ws, T, {"type": "myAsset"})
        await expect_silence(ws, 0.2)
    async with open_ws(psim.urls["ws_private"], **auth(token)) as ws:
        await send(ws, T, {"type": "myAsset"})
        assert (await recv_frame(ws))["error"]["name"] == "INVALID_AUTH"


async def test_bad_auth_can_refuse_the_upgrade_with_401(make_sim: SimFactory) -> None:
    sim = await make_sim(access_key=ACCESS, secret_key=SECRET, private_auth_failure="http_401")
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(sim.urls["ws_private"]):
            pass
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(response.body or b"")["error"]["name"] == "no_authorization_token"
    async with open_ws(sim.urls["ws_private"], **auth()):
        pass


async def test_resting_orders_fill_as_the_market_moves(make_sim: SimFactory) -> None:
    """A limit buy at the best bid rests, then fills once the asks come down to it."""
    sim = await make_sim(access_key=ACCESS, secret_key=SECRET, rate=0.0)  # frozen for now
    async with open_ws(sim.urls["ws_private"], **auth()) as ws:
        await send(ws, T, {"type": "myOrder"})
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                sim.urls["rest"] + "/v1/orderbook", params={"markets": "KRW-ATOM", "count": "1"}
            ) as resp,
        ):
            top = (await resp.json())[0]["orderbook_units"][0]
        order = await place(
            sim,
            market="KRW-ATOM",
            side="bid",
            ord_type="limit",
            price=str(top["bid_price"]),
            volume="100",
        )
        assert order["state"] == "wait"
        await control(sim, "rate", {"per_second": 2000})
        states = []
        while "done" not in states:
            msg = await recv_until(ws, lambda m: m.get("uuid") == order["uuid"], timeout=20)
            states.append(msg["state"])
        assert states[0] == "wait"
        assert "trade" in states
