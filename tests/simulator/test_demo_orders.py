"""Demo orders (``upbit-sim --demo-orders``): the simulator trades on its own account."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from simulator.cli import build_parser, config_from_args
from simulator.demo import DEMO_PREFIX, Cancel, DemoTrader, Place
from tests.simulator.conftest import SimFactory, collect_until, expect_silence, make_jwt, open_ws
from tests.simulator.conftest import send as send_request

ACCESS = "test-access-key"
SECRET = "test-secret-key-" + "x" * 48
ASKS = [(101_000.0, 1.0), (102_000.0, 1.0)]
BIDS = [(100_000.0, 1.0), (99_000.0, 1.0)]


def auth() -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {make_jwt(ACCESS, SECRET)}"}}


def places(trader: DemoTrader, n: int) -> list[Place]:
    out = []
    for _ in range(n):
        action = trader.next_action(0.0, ASKS, BIDS, [])
        assert isinstance(action, Place)
        out.append(action)
    return out


def test_a_taker_order_crosses_the_book_at_the_best_opposite_price() -> None:
    [order] = places(DemoTrader(taker_share=1.0), 1)
    assert (order.side, order.price, order.taker) == ("bid", Decimal("101000.0"), True)
    assert order.identifier.startswith(DEMO_PREFIX)


def test_a_resting_order_waits_one_level_behind_the_best_own_price() -> None:
    buy, sell = places(DemoTrader(taker_share=0.0), 2)
    assert (buy.side, buy.price, buy.taker) == ("bid", Decimal("99000.0"), False)
    assert (sell.side, sell.price) == ("ask", Decimal("102000.0"))


def test_sides_alternate_and_each_order_is_worth_the_notional_at_most() -> None:
    orders = places(DemoTrader(notional=Decimal("20000")), 6)
    assert [o.side for o in orders] == ["bid", "ask"] * 3
    for order in orders:
        total = order.price * order.volume
        assert Decimal("19999") < total <= Decimal("20000")
    assert len({o.identifier for o in orders}) == 6


def test_a_resting_order_is_cancelled_after_rest_for_and_nothing_is_placed_meanwhile() -> None:
    trader = DemoTrader(rest_for=5.0)
    assert trader.next_action(104.9, ASKS, BIDS, [("u1", 100.0)]) is None
    assert trader.next_action(105.0, ASKS, BIDS, [("u1", 100.0)]) == Cancel("u1")


def test_an_empty_book_places_nothing() -> None:
    assert DemoTrader().next_action(0.0, [], BIDS, []) is None


def test_the_cli_flag_turns_demo_orders_on() -> None:
    parser = build_parser()
    assert not config_from_args(parser.parse_args([])).demo_orders
    cfg = config_from_args(
        parser.parse_args(["--demo-orders", "--demo-interval", "0.5", "--demo-market", "krw-eth"])
    )
    assert (cfg.demo_orders, cfg.demo_interval, cfg.demo_market) == (True, 0.5, "KRW-ETH")


async def test_demo_orders_appear_on_the_private_stream_and_change_state(
    make_sim: SimFactory,
) -> None:
    sim = await make_sim(access_key=ACCESS, secret_key=SECRET, demo_orders=True, demo_interval=0.2)
    async with open_ws(sim.urls["ws_private"], **auth()) as ws:
        await send_request(ws, {"ticket": "demo"}, {"type": "myOrder"}, {"type": "myAsset"})
        seen = await collect_until(
            ws,
            lambda m: m.get("type") == "myOrder" and m["state"] in ("done", "cancel"),
            timeout=10.0,
            what="a demo order that finished",
        )
    orders = [m for m in seen if m["type"] == "myOrder"]
    finished = orders[-1]
    states = [m["state"] for m in orders if m["uuid"] == finished["uuid"]]
    assert states[0] == "wait"
    assert finished["identifier"].startswith(DEMO_PREFIX)
    assert any(m["type"] == "myAsset" for m in seen)


async def test_without_the_flag_the_account_stays_quiet(make_sim: SimFactory) -> None:
    sim = await make_sim(access_key=ACCESS, secret_key=SECRET)
    async with open_ws(sim.urls["ws_private"], **auth()) as ws:
        await send_request(ws, {"ticket": "quiet"}, {"type": "myOrder"}, {"type": "myAsset"})
        await expect_silence(ws, 1.0)
