"""WebSocket rate limits over real sockets: upgrades (429, then 418 with a growing
block) and per-connection request limits (5/s and 100/min)."""

from __future__ import annotations

import re

import pytest
from websockets.exceptions import InvalidStatus

from tests.simulator.conftest import (
    SimFactory,
    collect_until,
    control,
    make_jwt,
    open_ws,
    recv_frame,
    recv_until,
    send,
)

T = {"ticket": "test"}
SECRET = "s" * 64


def block_seconds(body: bytes) -> float:
    match = re.search(rb"blocked for ([0-9.]+) seconds", body)
    assert match, body
    return float(match.group(1))


async def refused(url: str, **kwargs: object) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(url, **kwargs):
            pass
    response = info.value.response
    return response.status_code, bytes(response.body or b"")


async def test_upgrades_over_the_limit_get_429_then_418_with_growing_blocks(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim(upgrade_limit=2, teapot_after=2, block_base=30.0)
    url = sim.urls["ws"]
    async with open_ws(url), open_ws(url):
        assert (await refused(url)) == (429, b"Too many API requests.")
        assert (await refused(url))[0] == 429
        status, body = await refused(url)
        assert status == 418
        first = block_seconds(body)
        status, body = await refused(url)  # trying again during the block grows it
        assert status == 418
        assert block_seconds(body) > first
    stats = await control(sim, "stats")
    assert stats["upgrades"]["accepted"] == 2
    assert stats["upgrades"]["refused_by_status"] == {"429": 2, "418": 2}


async def test_private_upgrades_are_limited_per_access_key(make_sim: SimFactory) -> None:
    sim = await make_sim(upgrade_limit=1, access_key="ak", secret_key=SECRET)
    url = sim.urls["ws_private"]

    def auth(key: str) -> dict[str, object]:
        return {"additional_headers": {"Authorization": f"Bearer {make_jwt(key, SECRET)}"}}

    async with open_ws(url, **auth("ak")):
        assert (await refused(url, **auth("ak")))[0] == 429
        async with open_ws(url, **auth("other-key")):  # another pocket has its own budget
            pass


async def test_more_than_5_requests_a_second_are_refused_in_band(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        for _ in range(10):  # PING is a keepalive, not a counted request
            await ws.send("PING")
        for _ in range(6):
            await send(ws, T, {"method": "LIST_SUBSCRIPTIONS"})
        msgs = await collect_until(ws, lambda m: "error" in m)
        assert msgs.count({"status": "UP"}) == 10
        assert sum(1 for m in msgs if m.get("method") == "LIST_SUBSCRIPTIONS") == 5
        assert msgs[-1]["error"]["name"] == "Too Many Requests"
        # The refused request was ignored: the earlier subscription stays as it was.
        conns = await control(sim, "connections")
        log = conns["connections"][0]["requests"]
        assert [r["accepted"] for r in log] == [True] * 5 + [False]
        assert log[-1]["error"] == "Too Many Requests"


async def test_more_than_100_requests_a_minute_are_refused(make_sim: SimFactory) -> None:
    sim = await make_sim(ws_message_limits=((1000, 1.0), (100, 60.0)))
    async with open_ws(sim.urls["ws"]) as ws:
        for i in range(101):
            await send(ws, {"ticket": f"t{i}"}, {"method": "LIST_SUBSCRIPTIONS"})
        replies = [await recv_frame(ws) for _ in range(101)]
        assert all(r.get("method") == "LIST_SUBSCRIPTIONS" for r in replies[:100])
        assert replies[100]["error"]["name"] == "Too Many Requests"


async def test_persistent_violations_escalate_to_teapot_errors(make_sim: SimFactory) -> None:
    sim = await make_sim(ws_message_limits=((1, 10.0),), teapot_after=1, block_base=2.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "ticker", "codes": ["KRW-BTC"]})
        await send(ws, T, {"type": "trade", "codes": ["KRW-BTC"]})
        await send(ws, T, {"type": "trade", "codes": ["KRW-BTC"]})
        first = await recv_until(ws, lambda m: "error" in m)
        assert first["error"]["name"] == "Too Many Requests"
        second = await recv_until(ws, lambda m: "error" in m)
        assert second["error"]["name"] == "I'm a teapot"
        assert "blocked for 2 seconds" in second["error"]["message"]
        ticker = await recv_until(ws, lambda m: m.get("stream_type") == "REALTIME")
        assert ticker["type"] == "ticker", "the accepted subscription keeps flowing"
