"""Public WebSocket requests: validation errors, replace semantics, formats, orderbook
shapes, snapshot/realtime flags, LIST_SUBSCRIPTIONS and unknown codes."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import pytest

from simulator.market import default_markets
from simulator.ws import WsRequestError, parse_request
from tests.simulator.conftest import (
    Message,
    SimFactory,
    collect_until,
    control,
    expect_silence,
    flatten,
    open_ws,
    recv_frame,
    recv_until,
    send,
)

KNOWN = {m.code for m in default_markets()}
T = {"ticket": "test"}
BTC = ["KRW-BTC"]


def known(code: str) -> bool:
    return code in KNOWN


def dec(x: Any) -> Decimal:
    return Decimal(str(x))


@pytest.mark.parametrize(
    ("request_text", "name"),
    [
        ("not json", "WRONG_FORMAT"),
        ('{"ticket": "t"}', "WRONG_FORMAT"),
        ('[{"ticket": "t"}, "ticker"]', "WRONG_FORMAT"),
        ("[]", "NO_TICKET"),
        ('[{"type": "ticker", "codes": ["KRW-BTC"]}]', "NO_TICKET"),
        ('[{"ticket": ["t"]}, {"type": "ticker", "codes": ["KRW-BTC"]}]', "WRONG_FORMAT"),
        ('[{"ticket": "t"}]', "NO_TYPE"),
        ('[{"ticket": "t"}, {"codes": ["KRW-BTC"]}]', "NO_TYPE"),
        ('[{"ticket": "t"}, {"type": "ticker"}]', "NO_CODES"),
        ('[{"ticket": "t"}, {"type": "ticker", "codes": []}]', "NO_CODES"),
        ('[{"ticket": "t"}, {"type": "ticker", "codes": "KRW-BTC"}]', "WRONG_FORMAT"),
        ('[{"ticket": "t"}, {"type": "ticker", "codes": [1]}]', "WRONG_FORMAT"),
        ('[{"ticket": "t"}, {"type": 7, "codes": ["KRW-BTC"]}]', "WRONG_FORMAT"),
        ('[{"ticket": "t"}, {"type": "candle", "codes": ["KRW-BTC"]}]', "INVALID_PARAM"),
        ('[{"ticket": "t"}, {"type": "myOrder"}]', "INVALID_PARAM"),
        (
            '[{"ticket": "t"}, {"type": "ticker", "codes": ["KRW-BTC"]}, {"format": "XML"}]',
            "INVALID_PARAM",
        ),
        (
            '[{"ticket": "t"}, {"type": "ticker", "codes": ["KRW-BTC"]}, {"format": 1}]',
            "WRONG_FORMAT",
        ),
        (
            '[{"ticket": "t"}, {"type": "trade", "codes": ["KRW-BTC"], "is_only_snapshot": 1}]',
            "WRONG_FORMAT",
        ),
        (
            '[{"ticket": "t"}, {"type": "orderbook", "codes": ["KRW-BTC"], "level": "abc"}]',
            "WRONG_FORMAT",
        ),
        (
            '[{"ticket": "t"}, {"type": "orderbook", "codes": ["KRW-BTC"], "level": -5}]',
            "INVALID_PARAM",
        ),
        ('[{"ticket": "t"}, {"method": "UNSUBSCRIBE"}]', "INVALID_PARAM"),
    ],
)
def test_bad_requests_get_upbits_error_names(request_text: str, name: str) -> None:
    with pytest.raises(WsRequestError) as info:
        parse_request(request_text, private=False, known=known)
    assert info.value.name == name
    assert info.value.frame() == {"error": {"name": name, "message": info.value.message}}


@pytest.mark.parametrize(
    ("request_text", "name"),
    [
        ('[{"ticket": "t"}, {"type": "ticker", "codes": ["KRW-BTC"]}]', "INVALID_PARAM"),
        ('[{"ticket": "t"}, {"type": "myAsset", "codes": []}]', "WRONG_FORMAT"),
        ('[{"ticket": "t"}, {"type": "myOrder", "codes": "KRW-BTC"}]', "WRONG_FORMAT"),
    ],
)
def test_private_endpoint_validation(request_text: str, name: str) -> None:
    with pytest.raises(WsRequestError) as info:
        parse_request(request_text, private=True, known=known)
    assert info.value.name == name


def test_objects_are_found_by_key_and_flags_accept_both_spellings() -> None:
    req = parse_request(
        json.dumps(
            [
                {"format": "SIMPLE"},
                {"type": "ticker", "codes": ["KRW-BTC"], "isOnlySnapshot": True},
                {"type": "trade", "codes": ["KRW-BTC"], "is_only_realtime": True},
                {"type": "orderbook", "codes": ["KRW-BTC.5", "BTC-ETH"], "level": "10000"},
                {"ticket": "late"},
            ]
        ),
        private=False,
        known=known,
    )
    assert (req.ticket, req.format) == ("late", "SIMPLE")
    ticker, trade, book = req.types
    assert ticker.only_snapshot
    assert not ticker.only_realtime
    assert trade.only_realtime
    assert not trade.only_snapshot
    assert book.level == 10000
    assert [(t.code, t.count, t.level) for t in book.targets] == [
        ("KRW-BTC", 5, 10_000 * 100_000_000),
        ("BTC-ETH", 30, 0),  # level only applies to KRW markets
    ]


# -- over a real socket ------------------------------------------------------------------


async def test_a_bad_request_gets_one_binary_error_frame(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, {"type": "ticker", "codes": BTC})
        assert await recv_frame(ws) == {
            "error": {"name": "NO_TICKET", "message": "No ticket in the request."}
        }
        await expect_silence(ws, 0.3)
        await ws.send("[]")
        assert (await recv_frame(ws))["error"]["name"] == "NO_TICKET"


async def test_a_new_request_replaces_the_whole_subscription(make_sim: SimFactory) -> None:
    sim = await make_sim(rate=40.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "ticker", "codes": BTC})
        await recv_until(ws, lambda m: m["type"] == "ticker" and m["stream_type"] == "REALTIME")
        await send(ws, T, {"type": "orderbook", "codes": BTC})
        await recv_until(ws, lambda m: m["type"] == "orderbook", what="orderbook snapshot")
        after = await collect_until(
            ws,
            lambda m: m["type"] == "orderbook" and m["stream_type"] == "REALTIME",
            what="orderbook realtime",
        )
        after += await collect_until(ws, lambda m: m["stream_type"] == "REALTIME")
        assert {m["type"] for m in after} == {"orderbook"}, "ticker stopped"


async def test_a_bad_request_keeps_the_previous_subscription(make_sim: SimFactory) -> None:
    sim = await make_sim(rate=40.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "trade", "codes": BTC}, {"format": "SIMPLE"})
        await recv_until(ws, lambda m: m.get("st") == "SNAPSHOT")
        await send(ws, T, {"type": "orderbook"})
        error = await recv_until(ws, lambda m: "error" in m)
        assert error["error"]["name"] == "NO_CODES"
        msg = await recv_until(ws, lambda m: m.get("st") == "REALTIME")
        assert msg["ty"] == "trade", "still the old subscription, still SIMPLE"


@pytest.mark.parametrize("fmt", ["DEFAULT", "SIMPLE", "JSON_LIST", "SIMPLE_LIST"])
async def test_each_format_shapes_the_frames(make_sim: SimFactory, fmt: str) -> None:
    sim = await make_sim(rate=40.0)
    simple = fmt.startswith("SIMPLE")
    listed = fmt.endswith("LIST")
    async with open_ws(sim.urls["ws"]) as ws:
        await send(
            ws,
            T,
            {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
            {"type": "trade", "codes": BTC},
            {"format": fmt},
        )
        frames: list[Any] = []
        while sum(len(flatten(f)) for f in frames) < 8:
            frames.append(await recv_frame(ws))
        for frame in frames:
            assert isinstance(frame, list) == listed
        messages = [m for f in frames for m in flatten(f)]
        type_key, stream_key = ("ty", "st") if simple else ("type", "stream_type")
        assert all(type_key in m and stream_key in m for m in messages)
        first = messages[0]
        assert first[stream_key] == "SNAPSHOT"
        if simple:
            ticker = next(m for m in messages if m["ty"] == "ticker")
            assert {"cd", "tp", "scr", "atv24h", "tms"} <= ticker.keys()
            assert "trade_price" not in ticker
        else:
            ticker = next(m for m in messages if m["type"] == "ticker")
            assert {"code", "trade_price", "acc_trade_volume_24h", "timestamp"} <= ticker.keys()
    if listed:
        # The three snapshots are pending together, so they share the first frame.
        assert len(flatten(frames[0])) == 3


async def test_orderbook_count_suffix_truncates_and_totals_match(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        await send(
            ws,
            T,
            {"type": "orderbook", "codes": ["KRW-BTC.5", "KRW-ETH.7", "KRW-XRP.1", "BTC-ETH"]},
        )
        counts: dict[str, int] = {}
        while len(counts) < 4:
            msg = await recv_frame(ws)
            if msg["stream_type"] != "SNAPSHOT":
                continue
            units = msg["orderbook_units"]
            counts[msg["code"]] = len(units)
            assert dec(msg["total_ask_size"]) == sum(dec(u["ask_size"]) for u in units)
            assert dec(msg["total_bid_size"]) == sum(dec(u["bid_size"]) for u in units)
            assert all(u["bid_price"] < u["ask_price"] for u in units[:1])
            asks = [u["ask_price"] for u in units]
            bids = [u["bid_price"] for u in units]
            assert asks == sorted(asks)
            assert bids == sorted(bids, reverse=True)
            assert msg["level"] == 0
        # 7 is not one of 1/5/15/30: the default 30 applies
        assert counts == {"KRW-BTC": 5, "KRW-ETH": 30, "KRW-XRP": 1, "BTC-ETH": 30}


async def test_level_groups_krw_books_and_is_ignored_on_btc_markets(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        await send(
            ws,
            T,
            {"type": "orderbook", "codes": ["KRW-BTC"], "level": "10000"},
            {"type": "orderbook", "codes": ["KRW-ETH"]},
            {"type": "orderbook", "codes": ["BTC-ETH"], "level": 10000},
        )
        got: dict[str, Message] = {}
        while len(got) < 3:
            msg = await recv_frame(ws)
            got[msg["code"]] = msg
        krw = got["KRW-BTC"]
        assert krw["level"] == 10000
        assert all(u["ask_price"] % 10000 == 0 for u in krw["orderbook_units"])
        assert got["KRW-ETH"]["level"] == 0
        assert got["BTC-ETH"]["level"] == 0
        assert len(got["BTC-ETH"]["orderbook_units"]) == 30
        # An unsupported level on a KRW market yields no data at all.
        await send(ws, T, {"type": "orderbook", "codes": ["KRW-BTC"], "level": 7})
        await send(ws, T, {"type": "ticker", "codes": ["KRW-ETH"]})
        msgs = await collect_until(ws, lambda m: m["type"] == "ticker")
        assert all(m["code"] != "KRW-BTC" or m["level"] == 10000 for m in msgs[:-1])


async def test_snapshot_comes_first_then_realtime(make_sim: SimFactory) -> None:
    sim = await make_sim(rate=40.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]})
        first = [await recv_frame(ws), await recv_frame(ws)]
        assert [(m["code"], m["stream_type"]) for m in first] == [
            ("KRW-BTC", "SNAPSHOT"),
            ("KRW-ETH", "SNAPSHOT"),
        ]
        later = await recv_until(ws, lambda m: m["stream_type"] == "REALTIME")
        assert later["type"] == "ticker"


@pytest.mark.parametrize("flag", ["is_only_snapshot", "isOnlySnapshot"])
async def test_only_snapshot_sends_one_snapshot_and_no_stream(
    make_sim: SimFactory, flag: str
) -> None:
    sim = await make_sim(rate=40.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(
            ws,
            T,
            {"type": "ticker", "codes": BTC, flag: True},
            {"type": "trade", "codes": ["KRW-ETH"]},
        )
        msgs: list[Message] = []
        for _ in range(4):  # several realtime trades mark the passing of time
            msgs += await collect_until(ws, lambda m: m["stream_type"] == "REALTIME")
        tickers = [m for m in msgs if m["type"] == "ticker"]
        assert [t["stream_type"] for t in tickers] == ["SNAPSHOT"]


@pytest.mark.parametrize("flag", ["is_only_realtime", "isOnlyRealtime"])
async def test_only_realtime_skips_the_snapshot(make_sim: SimFactory, flag: str) -> None:
    sim = await make_sim(rate=40.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "ticker", "codes": BTC, flag: True})
        first = await recv_frame(ws)
        assert (first["type"], first["stream_type"]) == ("ticker", "REALTIME")


async def test_list_subscriptions_reports_the_streams(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, {"method": "LIST_SUBSCRIPTIONS"}, {"ticket": "q"})
        assert await recv_frame(ws) == {"method": "LIST_SUBSCRIPTIONS", "result": [], "ticket": "q"}
        await send(
            ws,
            {"ticket": "sub"},
            {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
            {"type": "orderbook", "codes": ["KRW-BTC.5"], "level": 10000},
            {"type": "trade", "codes": ["KRW-XRP"], "is_only_snapshot": True},
        )
        await send(ws, {"ticket": "q2"}, {"method": "LIST_SUBSCRIPTIONS"})
        reply = await recv_until(ws, lambda m: "method" in m)
        assert reply == {
            "method": "LIST_SUBSCRIPTIONS",
            "result": [
                {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
                {"type": "orderbook", "codes": ["KRW-BTC.5"], "level": 10000},
            ],
            "ticket": "q2",
        }
        # A format in LIST_SUBSCRIPTIONS switches the connection's format.
        await send(ws, {"ticket": "q3"}, {"method": "LIST_SUBSCRIPTIONS"}, {"format": "SIMPLE"})
        simple = await recv_until(ws, lambda m: "mthd" in m)
        assert simple["rslt"][1] == {"ty": "orderbook", "cds": ["KRW-BTC.5"], "lv": 10000}
        assert simple["tckt"] == "q3"
        data = await recv_until(ws, lambda m: m.get("st") == "REALTIME")
        assert data["ty"] in ("ticker", "orderbook")


async def test_text_ping_is_answered_up_in_a_binary_frame(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        for _ in range(3):
            await ws.send("PING")
            assert await recv_frame(ws) == {"status": "UP"}
        conns = await control(sim, "connections")
        assert conns["connections"][0]["pings"] == 3
        assert conns["connections"][0]["requests"] == []


async def test_unknown_and_lowercase_codes_give_no_data_by_default(make_sim: SimFactory) -> None:
    sim = await make_sim(rate=40.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "ticker", "codes": ["KRW-NOPE", "krw-eth", "KRW-BTC"]})
        msgs: list[Message] = []
        for _ in range(3):
            msgs += await collect_until(ws, lambda m: m.get("stream_type") == "REALTIME")
        assert {m.get("code") for m in msgs} == {"KRW-BTC"}
        assert not any("error" in m for m in msgs)


async def test_unknown_codes_can_be_configured_to_fail(make_sim: SimFactory) -> None:
    sim = await make_sim(unknown_codes="error")
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "ticker", "codes": ["KRW-BTC", "krw-eth"]})
        error = await recv_frame(ws)
        assert error["error"]["name"] == "INVALID_PARAM"
        assert "krw-eth" in error["error"]["message"]
        await expect_silence(ws, 0.3)


async def test_ws_ping_frames_get_pongs(make_sim: SimFactory) -> None:
    sim = await make_sim()
    async with open_ws(sim.urls["ws"]) as ws:
        for _ in range(3):
            waiter = await ws.ping()
            await asyncio.wait_for(waiter, 5)
