"""ccxt's Upbit client against the simulator, pointed at it only by overriding its URLs.

ccxt is a test-only dependency. Where ccxt disagrees with docs/PROTOCOL.md it is noted in
comments here (and reported to the lead). Two tests:

* ``test_ccxt_private_rest`` builds a tiny app with only the private routes (plus a
  static ``/v1/market/all`` so ccxt can load markets) and checks that ccxt's JWT signing
  and parsing agree with our exchange endpoints.
* ``test_ccxt_full_simulator`` runs the whole simulator in-process and drives ccxt.pro's
  public and private watchers (ticker, order book, trades, orders, balance).
* ``test_ccxt_orders_through_the_full_simulator`` places, looks up, lists and cancels
  orders through the whole simulator's REST (rate limits and ``Remaining-Req`` included).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator
from decimal import Decimal as D
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from simulator.account import Account
from simulator.auth import JwtVerifier
from simulator.rest_private import add_private_routes
from tests.support import async_wait_until, scaled

if importlib.util.find_spec("ccxt") is None:
    pytest.skip(
        "ccxt is not installed (test-only dependency: pip install ccxt)", allow_module_level=True
    )

import ccxt.pro as ccxtpro

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ACCESS = "ccxt-access-key-0123456789abcdefghijklm"
SECRET = "ccxt-secret-key-ZYXWVUTSRQPONMLKJIHGFED"
ASKS = [(100_000_000.0, 0.5), (100_100_000.0, 1.0)]
BIDS = [(99_900_000.0, 0.5), (99_800_000.0, 1.0)]
MARKETS = [
    {"market": "KRW-BTC", "korean_name": "비트코인", "english_name": "Bitcoin"},
    {"market": "KRW-ETH", "korean_name": "이더리움", "english_name": "Ethereum"},
]


def point_at(exchange: Any, http_base: str, ws_base: str | None = None) -> None:
    """Aim ccxt's upbit at the simulator. ccxt builds REST URLs as
    ``urls['api'][public|private] + '/v1/' + path`` and WS URLs from ``urls['api']['ws']``
    (the private one by appending ``/private``); ``{hostname}`` is imploded in all three."""
    exchange.urls["api"] = {
        "public": http_base,
        "private": http_base,
        "ws": (ws_base or http_base.replace("http", "ws", 1)) + "/websocket/v1",
    }


async def timed(awaitable: Any, seconds: float = 10.0) -> Any:
    return await asyncio.wait_for(awaitable, scaled(seconds))


@contextlib.asynccontextmanager
async def ccxt_upbit(http_base: str, ws_base: str | None = None, **keys: str) -> AsyncIterator[Any]:
    exchange = ccxtpro.upbit({"enableRateLimit": False, **keys})
    point_at(exchange, http_base, ws_base)
    try:
        yield exchange
    finally:
        await exchange.close()


async def test_ccxt_private_rest() -> None:
    account = Account(balances={"KRW": D("100000000"), "BTC": D("1")})
    books = {"KRW-BTC": (ASKS, BIDS), "KRW-ETH": ([(3_000_000.0, 5.0)], [(2_990_000.0, 5.0)])}
    app = web.Application()

    async def market_all(_request: web.Request) -> web.Response:
        return web.json_response(MARKETS)

    app.router.add_get("/v1/market/all", market_all)
    add_private_routes(app, account=account, verifier=JwtVerifier(ACCESS, SECRET), books=books.get)
    server = TestServer(app)
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    try:
        async with ccxt_upbit(base, apiKey=ACCESS, secret=SECRET) as ex:
            balance = await timed(ex.fetch_balance())
            assert balance["KRW"]["free"] == 100_000_000
            assert balance["BTC"]["total"] == 1

            # Limit buy resting below the book; ccxt sends price/volume as strings.
            order = await timed(ex.create_order("BTC/KRW", "limit", "buy", 0.1, 99_000_000))
            assert order["status"] == "open"
            assert order["side"] == "buy"
            assert order["amount"] == 0.1
            assert order["price"] == 99_000_000
            # ccxt quirk: without trades, parse_order leaves fee.cost as the raw string.
            assert float(order["fee"]["cost"]) == 0

            opened = await timed(ex.fetch_open_orders("BTC/KRW"))
            assert [o["id"] for o in opened] == [order["id"]]
            fetched = await timed(ex.fetch_order(order["id"]))
            assert fetched["status"] == "open"
            assert fetched["remaining"] == 0.1

            # ccxt reports the DELETE reply, which (as on Upbit) is the order before cancelling.
            cancelled = await timed(ex.cancel_order(order["id"]))
            assert cancelled["id"] == order["id"]
            again = await timed(ex.fetch_order(order["id"]))
            assert again["status"] == "canceled"
            canceled_list = await timed(ex.fetch_canceled_orders("BTC/KRW"))
            assert [o["id"] for o in canceled_list] == [order["id"]]

            # Market sell: ccxt sends ord_type=market with volume only.
            sell = await timed(ex.create_order("BTC/KRW", "market", "sell", 0.6))
            filled = await timed(ex.fetch_order(sell["id"]))
            assert filled["status"] == "closed"
            assert filled["filled"] == 0.6
            # ccxt derives cost from trades[].funds and fee from paid_fee.
            assert filled["cost"] == 0.5 * 99_900_000 + 0.1 * 99_800_000
            assert float(filled["fee"]["cost"]) == 59_930_000 * 0.0005
            assert len(filled["trades"]) == 2
            closed = await timed(ex.fetch_closed_orders("BTC/KRW"))  # sends state=done
            assert [o["id"] for o in closed] == [sell["id"]]

            # Market buy by cost: ccxt turns amount*price into ord_type=price.
            buy = await timed(ex.create_order("BTC/KRW", "market", "buy", 0.01, 100_000_000))
            assert buy["type"] == "market"
            assert buy["cost"] == 1_000_000

            # Exchange errors map onto ccxt's exception classes.
            with pytest.raises(ccxtpro.InsufficientFunds):
                await timed(ex.create_order("BTC/KRW", "limit", "buy", 50, 99_000_000))
            with pytest.raises(ccxtpro.OrderNotFound):
                await timed(ex.fetch_order("00000000-0000-0000-0000-000000000000"))

        async with ccxt_upbit(base, apiKey=ACCESS, secret="wrong-secret-wrong-secret-wrong") as ex:
            with pytest.raises(ccxtpro.AuthenticationError):
                await timed(ex.fetch_balance())
    finally:
        await server.close()


def _private_subscribed(running: Any) -> bool:
    """True once a private connection's subscription holds both myOrder and myAsset."""
    for conn in list(running.sim.hub.connections.values()):
        info = conn.describe()
        text = json.dumps(info.get("subscription"))
        if info.get("private") and "myOrder" in text and "myAsset" in text:
            return True
    return False


async def test_ccxt_full_simulator() -> None:
    from simulator.app import start_simulator
    from simulator.config import SimConfig

    config = SimConfig(
        access_key=ACCESS,
        secret_key=SECRET,
        balances={"KRW": D("100000000"), "BTC": D("1")},
        rate=20.0,
    )
    async with await start_simulator(config) as running:
        base = running.urls["rest"]
        ws_base = running.urls["ws"].removesuffix("/websocket/v1")
        async with ccxt_upbit(base, ws_base, apiKey=ACCESS, secret=SECRET) as ex:
            # Public streams (one WS connection, full subscription resent on each watch).
            ticker = await timed(ex.watch_ticker("BTC/KRW"))
            assert ticker["symbol"] == "BTC/KRW"
            assert ticker["last"] > 0
            book = await timed(ex.watch_order_book("BTC/KRW"))
            assert book["symbol"] == "BTC/KRW"
            assert book["bids"][0][0] < book["asks"][0][0]
            assert [p for p, _ in book["asks"]] == sorted(p for p, _ in book["asks"])
            # ccxt keeps 15 levels ("upbit always returns ... 15"); Upbit now sends 30.
            assert len(book["asks"]) <= 15
            trades = await timed(ex.watch_trades("BTC/KRW"))
            assert trades
            assert trades[-1]["symbol"] == "BTC/KRW"
            assert trades[-1]["price"] > 0

            # Private streams: myOrder + myAsset on /websocket/v1/private.
            orders_task = asyncio.ensure_future(ex.watch_orders())
            balance_task = asyncio.ensure_future(ex.watch_balance())
            await async_wait_until(
                lambda: _private_subscribed(running), timeout=10, what="private subscription"
            )
            placed = await timed(ex.create_order("BTC/KRW", "market", "sell", 0.01))
            orders = await timed(orders_task)
            assert orders[-1]["id"] == placed["id"]
            assert orders[-1]["symbol"] == "BTC/KRW"
            assert orders[-1]["side"] == "sell"
            balance = await timed(balance_task)
            assert "BTC" in balance

            # Every update lands in ccxt's caches; wait for the final state there.
            def final_order() -> Any:
                cached = [o for o in (ex.orders or []) if o["id"] == placed["id"]]
                return cached[-1] if cached and cached[-1]["status"] == "closed" else None

            done = await async_wait_until(final_order, timeout=10, what="order closed")
            assert done["filled"] == 0.01
            assert done["remaining"] == 0
            assert done["type"] == "market"
            my_trades = [t for t in (ex.myTrades or []) if t["order"] == placed["id"]]
            assert my_trades
            # A market order may sweep several bid levels of a moving book: one trade
            # event per level, every one a taker fill, together the whole amount.
            assert {t["takerOrMaker"] for t in my_trades} == {"taker"}
            assert sum(t["amount"] for t in my_trades) == pytest.approx(0.01)

            def btc_settled() -> bool:
                btc = ex.balance.get("BTC") or {}
                return bool(btc.get("free") == 0.99 and btc.get("used") == 0)

            await async_wait_until(btc_settled, timeout=10, what="BTC balance via myAsset")
            # REST agrees with the stream.
            rest_balance = await timed(ex.fetch_balance())
            assert rest_balance["BTC"]["free"] == 0.99
            fetched = await timed(ex.fetch_order(placed["id"]))
            assert fetched["status"] == "closed"
            assert fetched["filled"] == 0.01


async def test_ccxt_orders_through_the_full_simulator() -> None:
    from simulator.app import start_simulator
    from simulator.config import SimConfig

    config = SimConfig(
        access_key=ACCESS,
        secret_key=SECRET,
        balances={"KRW": D("100000000"), "BTC": D("1")},
        rate=20.0,
    )
    async with (
        await start_simulator(config) as running,
        ccxt_upbit(running.urls["rest"], apiKey=ACCESS, secret=SECRET) as ex,
    ):
        last = (await timed(ex.fetch_ticker("BTC/KRW")))["last"]
        price = int(last * 0.8) // 1000 * 1000  # far below the book, on the 1,000 tick
        resting = await timed(ex.create_order("BTC/KRW", "limit", "buy", 0.001, price))
        assert (resting["status"], resting["price"]) == ("open", price)
        # A second resting order, so the cancel below must pick the right one.
        other = await timed(ex.create_order("BTC/KRW", "limit", "buy", 0.001, price - 1000))
        opened = await timed(ex.fetch_open_orders("BTC/KRW"))
        assert [o["id"] for o in opened] == [other["id"], resting["id"]]  # newest first
        fetched = await timed(ex.fetch_order(resting["id"]))
        assert (fetched["status"], fetched["remaining"]) == ("open", 0.001)

        cancelled = await timed(ex.cancel_order(resting["id"]))
        assert cancelled["id"] == resting["id"]
        assert (await timed(ex.fetch_order(resting["id"])))["status"] == "canceled"
        opened = await timed(ex.fetch_open_orders("BTC/KRW"))
        assert [o["id"] for o in opened] == [other["id"]]

        sold = await timed(ex.create_order("BTC/KRW", "market", "sell", 0.01))
        closed = await timed(ex.fetch_closed_orders("BTC/KRW"))
        assert [o["id"] for o in closed] == [sold["id"]]
        assert closed[0]["filled"] == 0.01
        assert (await timed(ex.fetch_order(sold["id"])))["status"] == "closed"
        # ccxt keeps the last reply's headers: placements count against the order group.
        await timed(ex.create_order("BTC/KRW", "limit", "buy", 0.001, price))
        assert ex.last_response_headers["Remaining-Req"].startswith("group=order; min=1800;")
