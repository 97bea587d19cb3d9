"""REST quotation endpoints and the REST limits every /v1 route shares."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from simulator.app import RunningSimulator
from simulator.rest_public import INVALID, MISSING
from tests.simulator.conftest import SimFactory, control, get_json

HEADER = re.compile(r"^group=([a-z\-]+); min=1800; sec=(\d+)$")


def dec(x: Any) -> Decimal:
    return Decimal(str(x))


@pytest.fixture
async def rest(make_sim: SimFactory) -> RunningSimulator:
    return await make_sim(limits_enabled=False)


async def test_every_v1_response_has_remaining_req(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    base = sim.urls["rest"]
    cases = [
        ("/v1/market/all", 200, "market"),
        ("/v1/ticker?markets=KRW-BTC", 200, "ticker"),
        ("/v1/ticker?markets=KRW-NOPE", 404, "ticker"),
        ("/v1/orderbook", 400, "orderbook"),
        ("/v1/candles/minutes/1?market=KRW-BTC", 200, "candle"),
        ("/v1/trades/ticks?market=KRW-BTC", 200, "trade"),
        ("/v1/accounts", 401, "default"),
        ("/v1/no/such/route", 404, "default"),
    ]
    for path, status, group in cases:
        async with http.get(base + path) as resp:
            assert resp.status == status, path
            match = HEADER.match(resp.headers["Remaining-Req"])
            assert match, resp.headers["Remaining-Req"]
            assert match.group(1) == group, path
    async with http.get(base + "/v1/ticker?markets=KRW-ETH") as resp:
        assert resp.headers["Remaining-Req"] == "group=ticker; min=1800; sec=7"


async def test_over_the_limit_is_plain_text_429_then_418_with_growing_block(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(rest_limits={"ticker": (3, 1.0)}, teapot_after=1, block_base=30.0)
    url = sim.urls["rest"] + "/v1/ticker?markets=KRW-BTC"
    statuses = []
    bodies = []
    for _ in range(6):
        async with http.get(url) as resp:
            statuses.append(resp.status)
            bodies.append(await resp.text())
            if resp.status != 200:
                assert resp.content_type == "text/plain"
                assert resp.headers["Remaining-Req"] == "group=ticker; min=1800; sec=0"
    assert statuses == [200, 200, 200, 429, 418, 418]
    assert bodies[3] == "Too many API requests."
    blocks = [float(re.search(r"blocked for ([0-9.]+) seconds", b).group(1)) for b in bodies[4:]]  # type: ignore[union-attr]
    assert blocks[1] > blocks[0] == 30.0
    # Other groups keep their own budget.
    async with http.get(sim.urls["rest"] + "/v1/market/all") as resp:
        assert resp.status == 200
    stats = await control(sim, "stats")
    assert stats["rest"]["groups"]["ticker"] == {
        "requests": 6, "ok": 3, "429": 1, "418": 2, "failed": 0
    }  # fmt: skip


async def test_market_all_with_and_without_details(
    rest: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    status, plain, _ = await get_json(http, rest.urls["rest"] + "/v1/market/all")
    assert status == 200
    assert len(plain) == 300
    btc = next(m for m in plain if m["market"] == "KRW-BTC")
    assert btc == {"market": "KRW-BTC", "korean_name": "비트코인", "english_name": "Bitcoin"}
    _, detailed, _ = await get_json(http, rest.urls["rest"] + "/v1/market/all", is_details="true")
    event = detailed[0]["market_event"]
    assert set(event) == {"warning", "caution"}
    assert set(event["caution"]) >= {"PRICE_FLUCTUATIONS", "TRADING_VOLUME_SOARING"}


async def test_ticker_and_ticker_all(rest: RunningSimulator, http: aiohttp.ClientSession) -> None:
    base = rest.urls["rest"]
    status, body, _ = await get_json(http, base + "/v1/ticker", markets="KRW-BTC,BTC-ETH")
    assert status == 200
    assert [t["market"] for t in body] == ["KRW-BTC", "BTC-ETH"]
    t = body[0]
    assert re.fullmatch(r"\d{8}", t["trade_date"])
    assert re.fullmatch(r"\d{6}", t["trade_time"])
    assert re.fullmatch(r"\d{8}", t["trade_date_kst"])
    assert isinstance(t["trade_price"], float)
    assert isinstance(t["timestamp"], int)
    assert dec(t["change_price"]) == abs(dec(t["trade_price"]) - dec(t["prev_closing_price"]))
    status, body, _ = await get_json(http, base + "/v1/ticker/all", quote_currencies="BTC,USDT")
    assert status == 200
    assert {t["market"].split("-")[0] for t in body} == {"BTC", "USDT"}
    assert len(body) == 130


@pytest.mark.parametrize(
    ("path", "params", "status", "message"),
    [
        ("/v1/ticker", {}, 400, MISSING),
        ("/v1/ticker", {"markets": "KRW-BTC,KRW-NOPE"}, 404, "Code not found"),
        ("/v1/ticker/all", {"quote_currencies": "EUR"}, 404, "Code not found"),
        ("/v1/orderbook", {"markets": "krw-btc"}, 404, "Code not found"),
        ("/v1/trades/ticks", {"market": "KRW-BTC", "count": "x"}, 400, INVALID),
        ("/v1/trades/ticks", {"market": "KRW-BTC", "count": "501"}, 400, INVALID),
        ("/v1/candles/minutes/2", {"market": "KRW-BTC"}, 400, INVALID),
        ("/v1/candles/days", {"market": "KRW-BTC", "to": "yesterday"}, 400, INVALID),
        ("/v1/candles/seconds", {}, 400, MISSING),
    ],
)
async def test_quotation_errors_use_integer_names(
    rest: RunningSimulator,
    http: aiohttp.ClientSession,
    path: str,
    params: dict[str, str],
    status: int,
    message: str,
) -> None:
    got, body, _ = await get_json(http, rest.urls["rest"] + path, **params)
    assert got == status
    assert body == {"error": {"name": status, "message": message}}


async def test_orderbook_count_level_and_unsupported_level(
    rest: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    base = rest.urls["rest"] + "/v1/orderbook"
    _, body, _ = await get_json(http, base, markets="KRW-BTC,BTC-ETH", count="15")
    assert [len(b["orderbook_units"]) for b in body] == [15, 15]
    for book in body:
        units = book["orderbook_units"]
        assert dec(book["total_ask_size"]) == sum(dec(u["ask_size"]) for u in units)
        assert units[0]["bid_price"] < units[0]["ask_price"]
    _, grouped, _ = await get_json(http, base, markets="KRW-BTC,BTC-ETH", level="10000")
    assert [b["level"] for b in grouped] == [10000, 0]
    assert all(u["bid_price"] % 10000 == 0 for u in grouped[0]["orderbook_units"])
    _, none, _ = await get_json(http, base, markets="KRW-BTC", level="7")
    assert none == []
    _, fallback, _ = await get_json(http, base, markets="KRW-BTC", count="99")
    assert len(fallback[0]["orderbook_units"]) == 30
    _, instruments, _ = await get_json(
        http, rest.urls["rest"] + "/v1/orderbook/instruments", markets="KRW-BTC"
    )
    assert instruments == [
        {
            "market": "KRW-BTC",
            "quote_currency": "KRW",
            "tick_size": "1000",
            "supported_levels": ["0", "10000", "100000", "1000000"],
        }
    ]


async def test_trades_ticks_newest_first_with_cursor_paging(
    rest: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    url = rest.urls["rest"] + "/v1/trades/ticks"
    _, page1, _ = await get_json(http, url, market="KRW-XRP", count="10")
    assert len(page1) == 10
    ids = [t["sequential_id"] for t in page1]
    assert ids == sorted(ids, reverse=True)
    t = page1[0]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", t["trade_date_utc"])
    assert re.fullmatch(r"\d{2}:\d{2}:\d{2}", t["trade_time_utc"])
    assert t["ask_bid"] in ("ASK", "BID")
    assert set(t) == {
        "market", "trade_date_utc", "trade_time_utc", "timestamp", "trade_price",
        "trade_volume", "prev_closing_price", "change_price", "ask_bid", "sequential_id",
    }  # fmt: skip
    _, page2, _ = await get_json(http, url, market="KRW-XRP", count="10", cursor=str(ids[-1]))
    assert page2
    assert all(x["sequential_id"] < ids[-1] for x in page2)
    _, default_count, _ = await get_json(http, url, market="KRW-XRP")
    assert len(default_count) == 1


async def test_candles_seconds_minutes_days(
    rest: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    base = rest.urls["rest"] + "/v1/candles"
    _, minutes, _ = await get_json(http, base + "/minutes/1", market="KRW-ETH", count="3")
    assert 1 <= len(minutes) <= 3
    starts = [c["candle_date_time_utc"] for c in minutes]
    assert starts == sorted(starts, reverse=True)
    c = minutes[0]
    assert c["unit"] == 1
    assert starts[0].endswith(":00")
    assert c["low_price"] <= c["opening_price"] <= c["high_price"]
    assert c["low_price"] <= c["trade_price"] <= c["high_price"]
    assert c["candle_date_time_kst"] != c["candle_date_time_utc"]
    # `to` is exclusive; "+09:00" survives the query string.
    _, before, _ = await get_json(
        http, base + "/minutes/1", market="KRW-ETH", count="200", to=starts[0] + "Z"
    )
    assert all(x["candle_date_time_utc"] < starts[0] for x in before)
    kst_to = c["candle_date_time_kst"] + "+09:00"
    _, before_kst, _ = await get_json(
        http, base + "/minutes/1", market="KRW-ETH", count="200", to=kst_to
    )
    assert before_kst == before
    _, seconds, _ = await get_json(http, base + "/seconds", market="KRW-ETH", count="5")
    assert seconds
    assert "unit" not in seconds[0]
    _, days, _ = await get_json(http, base + "/days", market="KRW-ETH")
    day = days[0]
    assert day["candle_date_time_utc"].endswith("T00:00:00")
    assert day["candle_date_time_kst"].endswith("T09:00:00")
    assert dec(day["change_price"]) == dec(day["trade_price"]) - dec(day["prev_closing_price"])
    _, weeks, _ = await get_json(http, base + "/weeks", market="KRW-ETH")
    assert weeks[0]["first_day_of_period"] <= day["candle_date_time_utc"][:10]
