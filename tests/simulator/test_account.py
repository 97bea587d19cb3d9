"""Account: locking, taker/maker fills, cancels, refusals and the private events it emits."""

from __future__ import annotations

import json
import os
from decimal import Decimal as D
from pathlib import Path

import pytest

from simulator.account import (
    Account,
    OrderError,
    decimal_str,
    encode_event,
)
from simulator.ws import simplify

ASKS = [(100_000_000.0, 0.5), (100_100_000.0, 1.0), (100_200_000.0, 2.0)]
BIDS = [(99_900_000.0, 0.5), (99_800_000.0, 1.0), (99_700_000.0, 2.0)]
T0 = 1_750_000_000.0

# Every myOrder field of docs/PROTOCOL.md section 3.5, in the documented order.
MYORDER_KEYS = [
    "type", "code", "uuid", "ask_bid", "order_type", "state", "trade_uuid", "price",
    "avg_price", "volume", "remaining_volume", "executed_volume", "trades_count",
    "reserved_fee", "remaining_fee", "paid_fee", "locked", "executed_funds", "time_in_force",
    "trade_fee", "is_maker", "identifier", "smp_type", "prevented_volume", "prevented_locked",
    "trade_timestamp", "order_timestamp", "timestamp", "stream_type",
]  # fmt: skip
MYASSET_KEYS = ["type", "asset_uuid", "assets", "asset_timestamp", "timestamp", "stream_type"]
SAMPLES = (
    Path(
        os.environ.get("UPBIT_SHARED_DIR")
        or Path(__file__).resolve().parents[2].parent / "shared" / "upbit"
    )
    / "samples"
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def account(clock: Clock) -> Account:
    acc = Account(balances={"KRW": D("100000000"), "BTC": D("1")}, clock=clock)
    acc.on_book("KRW-BTC", ASKS, BIDS)
    return acc


@pytest.fixture
def events(account: Account) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    account.add_listener(out.append)
    return out


def kinds(events: list[dict[str, object]]) -> list[str]:
    return [str(e["state"]) if e["type"] == "myOrder" else "asset" for e in events]


def bal(account: Account, cur: str) -> tuple[D, D]:
    b = account.balances()[cur]
    return b.balance, b.locked


def test_resting_limit_bid_locks_funds_and_fee(
    account: Account, events: list[dict[str, object]]
) -> None:
    order = account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("99000000"), volume=D("0.1")
    )
    assert order.state == "wait"
    assert bal(account, "KRW") == (D("90095050.0000"), D("9904950.0000"))
    assert kinds(events) == ["wait", "asset"]
    wait, asset = events
    assert list(wait) == MYORDER_KEYS
    assert wait["price"] == D("99000000")
    assert wait["volume"] == D("0.1")
    assert wait["reserved_fee"] == D("4950")
    assert wait["locked"] == D("9904950")
    assert wait["trade_uuid"] is None
    assert wait["is_maker"] is None
    assert wait["trade_fee"] is None
    assert wait["trade_timestamp"] is None
    assert wait["order_timestamp"] == int(T0 * 1000)
    assert wait["stream_type"] == "REALTIME"
    assert list(asset) == MYASSET_KEYS
    assert asset["assets"] == [
        {"currency": "KRW", "balance": D("90095050"), "locked": D("9904950")}
    ]
    assert account.markets_with_open_orders() == {"KRW-BTC"}


def test_decimal_exactness_matches_upbit_sample(account: Account) -> None:
    # pyupbit's live capture: KRW-XRP bid 10 @ 613 -> reserved_fee 3.065, locked 6133.065.
    order = account.place_order(
        market="KRW-XRP", side="bid", ord_type="limit", price=D("613"), volume=D("10")
    )
    rest = order.to_rest()
    assert rest["reserved_fee"] == "3.065"
    assert rest["locked"] == "6133.065"
    assert rest["remaining_fee"] == "3.065"
    assert rest["paid_fee"] == "0"
    assert rest["price"] == "613"
    assert rest["volume"] == "10"
    assert rest["trades_count"] == 0
    assert str(rest["created_at"]).endswith("+09:00")


def test_crossing_limit_bid_fills_as_taker_across_levels(
    account: Account, events: list[dict[str, object]]
) -> None:
    order = account.place_order(
        market="KRW-BTC",
        side="bid",
        ord_type="limit",
        price=D("100100000"),
        volume=D("0.6"),
        identifier="buy-1",
    )
    assert order.state == "done"
    assert kinds(events) == ["wait", "asset", "trade", "asset", "trade", "asset", "done"]
    first, second = events[2], events[4]
    assert (first["price"], first["volume"]) == (D("100000000"), D("0.5"))
    assert (second["price"], second["volume"]) == (D("100100000"), D("0.1"))
    assert first["is_maker"] is False
    assert first["trade_fee"] == D("25000")
    assert second["trade_fee"] == D("5005")
    assert second["trades_count"] == 2
    assert first["trade_uuid"] != second["trade_uuid"]
    assert first["identifier"] == "buy-1"
    assert first["ask_bid"] == "BID"
    assert second["executed_volume"] == D("0.6")
    assert second["executed_funds"] == D("60010000")
    done = events[-1]
    assert done["locked"] == 0
    assert done["remaining_volume"] == 0
    assert done["paid_fee"] == D("30005")
    assert done["trade_uuid"] is None
    assert done["trade_timestamp"] == int(T0 * 1000)
    # Price improvement is refunded: paid exactly funds + fee.
    assert bal(account, "KRW") == (D("39959995"), D("0"))
    assert bal(account, "BTC") == (D("1.6"), D("0"))
    assert events[3]["assets"] == [
        {"currency": "KRW", "balance": D("39959995"), "locked": D("10015005")},
        {"currency": "BTC", "balance": D("1.5"), "locked": D("0")},
    ]
    rest = order.to_rest(with_trades=True)
    assert rest["state"] == "done"
    assert rest["trades_count"] == 2
    trades = rest["trades"]
    assert isinstance(trades, list)
    assert trades[0]["price"] == "100000000"
    assert trades[0]["trend"] == "up"
    assert trades[0]["funds"] == "50000000"
    assert trades[0]["side"] == "bid"
    assert account.markets_with_open_orders() == set()


def test_partial_taker_fill_then_maker_fills_via_on_book(
    account: Account, events: list[dict[str, object]], clock: Clock
) -> None:
    order = account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("100050000"), volume=D("0.8")
    )
    assert order.state == "wait"
    assert order.executed_volume == D("0.5")
    assert order.locked == D("30030007.5")
    assert order.remaining_fee == D("15007.5")
    assert bal(account, "KRW") == (D("19944992.5"), D("30030007.5"))
    events.clear()

    clock.now += 1
    account.on_book("KRW-BTC", [(100_050_000.0, 0.1), (100_060_000.0, 5.0)], BIDS)
    assert kinds(events) == ["trade", "asset"]
    maker = events[0]
    assert maker["is_maker"] is True
    assert maker["price"] == D("100050000")
    assert maker["volume"] == D("0.1")
    assert maker["remaining_volume"] == D("0.2")
    assert maker["trade_timestamp"] == int((T0 + 1) * 1000)
    # Not crossing: nothing happens.
    account.on_book("KRW-BTC", [(100_070_000.0, 5.0)], BIDS)
    assert len(events) == 2
    # Crossed deeper than the order's price: a maker fills at its own price.
    account.on_book("KRW-BTC", [(100_000_000.0, 1.0)], BIDS)
    assert kinds(events) == ["trade", "asset", "trade", "asset", "done"]
    assert events[2]["price"] == D("100050000")
    assert events[2]["volume"] == D("0.2")
    assert order.state == "done"
    assert order.locked == 0
    assert bal(account, "KRW") == (D("19944992.5"), D("0"))
    assert bal(account, "BTC") == (D("1.8"), D("0"))


def test_resting_orders_share_crossing_liquidity_by_priority(account: Account) -> None:
    high = account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("99990000"), volume=D("0.1")
    )
    low = account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("99980000"), volume=D("0.1")
    )
    account.on_book("KRW-BTC", [(99_970_000.0, 0.15)], [(99_960_000.0, 1.0)])
    assert high.executed_volume == D("0.1")
    assert high.state == "done"
    assert low.executed_volume == D("0.05")
    assert low.state == "wait"


def test_maker_ask_fill(account: Account, events: list[dict[str, object]]) -> None:
    order = account.place_order(
        market="KRW-BTC", side="ask", ord_type="limit", price=D("100500000"), volume=D("0.2")
    )
    assert bal(account, "BTC") == (D("0.8"), D("0.2"))
    assert order.reserved_fee == 0
    assert order.locked == D("0.2")
    account.on_book("KRW-BTC", ASKS, [(100_600_000.0, 0.1)])
    trade = events[-2]
    assert trade["state"] == "trade"
    assert trade["ask_bid"] == "ASK"
    assert trade["is_maker"] is True
    assert trade["trade_fee"] == D("5025")
    assert bal(account, "KRW") == (D("100000000") + D("10050000") - D("5025"), D("0"))
    assert bal(account, "BTC") == (D("0.8"), D("0.1"))
    assert order.to_rest(with_trades=True)["trades"] == [
        {
            "market": "KRW-BTC",
            "uuid": order.trades[0].uuid,
            "price": "100500000",
            "volume": "0.1",
            "funds": "10050000",
            "trend": "up",
            "created_at": order.to_rest(with_trades=True)["trades"][0]["created_at"],  # type: ignore[index]
            "side": "ask",
        }
    ]


def test_market_buy_by_amount_leaves_dust_and_ends_cancel(
    account: Account, events: list[dict[str, object]]
) -> None:
    order = account.place_order(market="KRW-BTC", side="bid", ord_type="price", price=D("5000.5"))
    # Like Upbit's sample: volume rounds down to 8 decimals; the remainder is cancelled.
    assert order.state == "cancel"
    assert order.executed_volume == D("0.00005")
    assert order.executed_funds == D("5000")
    rest = order.to_rest()
    assert rest["volume"] is None
    assert rest["remaining_volume"] is None
    assert rest["reserved_fee"] == "2.50025"
    assert rest["paid_fee"] == "2.5"
    assert rest["remaining_fee"] == "0.00025"
    assert rest["locked"] == "0.50025"
    assert kinds(events) == ["wait", "asset", "trade", "asset", "cancel", "asset"]
    assert events[0]["volume"] is None
    assert events[0]["price"] == D("5000.5")
    assert bal(account, "KRW") == (D("99994997.5"), D("0"))
    assert bal(account, "BTC") == (D("1.00005"), D("0"))


def test_market_buy_spending_exactly_is_done(account: Account) -> None:
    order = account.place_order(market="KRW-BTC", side="bid", ord_type="price", price=D("60010000"))
    assert order.state == "done"
    assert order.executed_volume == D("0.6")
    assert bal(account, "KRW") == (D("100000000") - D("60010000") * D("1.0005"), D("0"))


def test_market_sell_walks_bids(account: Account, events: list[dict[str, object]]) -> None:
    order = account.place_order(market="KRW-BTC", side="ask", ord_type="market", volume=D("0.7"))
    assert order.state == "done"
    assert order.price is None
    assert order.executed_funds == D("69910000")
    assert order.paid_fee == D("34955")
    assert bal(account, "KRW") == (D("169875045"), D("0"))
    assert bal(account, "BTC") == (D("0.3"), D("0"))
    assert events[2]["price"] == D("99900000")
    assert events[2]["ask_bid"] == "ASK"
    assert order.to_rest()["price"] is None


def test_avg_buy_price_from_zero_holdings(clock: Clock) -> None:
    acc = Account(balances={"KRW": D("100000000")}, clock=clock)
    acc.place_order(
        market="KRW-BTC",
        side="bid",
        ord_type="limit",
        price=D("100100000"),
        volume=D("0.6"),
        asks=ASKS,
        bids=BIDS,
    )
    btc = acc.balances()["BTC"]
    assert btc.avg_buy_price == (D("60010000") / D("0.6")).quantize(D("0.00000001"))
    accounts = acc.accounts()
    assert [a["currency"] for a in accounts] == ["KRW", "BTC"]
    assert accounts[1] == {
        "currency": "BTC",
        "balance": "0.6",
        "locked": "0.0",
        "avg_buy_price": "100016666.66666667",
        "avg_buy_price_modified": False,
        "unit_currency": "KRW",
    }


def test_cancel_releases_locked_funds(account: Account, events: list[dict[str, object]]) -> None:
    order = account.place_order(
        market="KRW-BTC",
        side="bid",
        ord_type="limit",
        price=D("99000000"),
        volume=D("0.1"),
        identifier="c-1",
    )
    events.clear()
    cancelled = account.cancel(identifier="c-1")
    assert cancelled is order
    assert order.state == "cancel"
    assert kinds(events) == ["cancel", "asset"]
    assert events[0]["locked"] == D("9904950")  # what it held, as Upbit reports it
    assert bal(account, "KRW") == (D("100000000"), D("0"))
    with pytest.raises(OrderError) as info:
        account.cancel(uuid=order.uuid)
    assert (info.value.name, info.value.status) == ("order_not_found", 404)
    with pytest.raises(OrderError):
        account.cancel(uuid="00000000-0000-0000-0000-000000000000")
    assert account.closed_orders(states=["cancel"]) == [order]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"side": "bid", "ord_type": "limit", "price": "99000000", "volume": "2"},
         "insufficient_funds_bid"),
        ({"side": "ask", "ord_type": "limit", "price": "101000000", "volume": "1.5"},
         "insufficient_funds_ask"),
        ({"side": "ask", "ord_type": "market", "volume": "1.00000001"}, "insufficient_funds_ask"),
        ({"side": "bid", "ord_type": "price", "price": "99999999"}, "insufficient_funds_bid"),
        ({"side": "bid", "ord_type": "limit", "price": "99000000", "volume": "0.00005"},
         "under_min_total_bid"),
        ({"side": "ask", "ord_type": "limit", "price": "101000000", "volume": "0.00004"},
         "under_min_total_ask"),
        ({"side": "ask", "ord_type": "market", "volume": "0.00005"}, "under_min_total_ask"),
        ({"side": "bid", "ord_type": "price", "price": "4999"}, "under_min_total_bid"),
        ({"side": "bid", "ord_type": "price", "price": "10000", "volume": "1"},
         "create_bid_error"),
        ({"side": "ask", "ord_type": "market", "price": "1", "volume": "0.1"},
         "create_ask_error"),
        ({"side": "ask", "ord_type": "price", "price": "10000"}, "create_ask_error"),
        ({"side": "bid", "ord_type": "best", "price": "10000"}, "validation_error"),
        ({"side": "bid", "ord_type": "price", "price": "10000", "time_in_force": "post_only"},
         "invalid_post_only"),
        ({"side": "bid", "ord_type": "limit", "price": "99000000", "volume": "0.000000001"},
         "invalid_parameter"),
        ({"side": "bid", "ord_type": "limit", "price": "-1", "volume": "0.1"},
         "invalid_parameter"),
        ({"side": "buy", "ord_type": "limit", "price": "1", "volume": "1"}, "validation_error"),
        ({"side": "bid", "ord_type": "stop", "price": "1", "volume": "1"}, "validation_error"),
        ({"side": "bid", "ord_type": "limit", "volume": "1"}, "validation_error"),
    ],
)  # fmt: skip
def test_refusals(
    account: Account, events: list[dict[str, object]], kwargs: dict[str, str], name: str
) -> None:
    before = account.balances()
    params = {k: D(v) if k in ("price", "volume") else v for k, v in kwargs.items()}
    with pytest.raises(OrderError) as info:
        account.place_order(market="KRW-BTC", **params)  # type: ignore[arg-type]
    assert info.value.name == name
    assert info.value.status == 400
    assert events == []
    assert account.balances() == before
    assert account.open_orders() == []


def test_side_error_message_matches_upbit(account: Account) -> None:
    with pytest.raises(OrderError) as info:
        account.place_order(market="KRW-BTC", side="", ord_type="limit")
    assert info.value.message == "side is missing, side does not have a valid value"


def test_identifier_is_used_up_even_by_a_refused_order(account: Account) -> None:
    with pytest.raises(OrderError, match="insufficient_funds_bid"):
        account.place_order(
            market="KRW-BTC",
            side="bid",
            ord_type="limit",
            price=D("99000000"),
            volume=D("5"),
            identifier="x",
        )
    with pytest.raises(OrderError, match="duplicated_identifier"):
        account.place_order(
            market="KRW-BTC",
            side="bid",
            ord_type="limit",
            price=D("99000000"),
            volume=D("0.1"),
            identifier="x",
        )
    account.place_order(
        market="KRW-BTC",
        side="bid",
        ord_type="limit",
        price=D("99000000"),
        volume=D("0.1"),
        identifier="y",
    )
    with pytest.raises(OrderError, match="duplicated_identifier"):
        account.place_order(
            market="KRW-BTC", side="ask", ord_type="market", volume=D("0.1"), identifier="y"
        )
    assert account.get_order(identifier="y") is not None
    assert account.get_order(identifier="x") is None


def test_ioc_fills_what_crosses_and_cancels_the_rest(account: Account) -> None:
    order = account.place_order(
        market="KRW-BTC",
        side="bid",
        ord_type="limit",
        price=D("100000000"),
        volume=D("0.8"),
        time_in_force="ioc",
    )
    assert order.state == "cancel"
    assert order.executed_volume == D("0.5")
    assert bal(account, "KRW")[1] == 0
    assert bal(account, "BTC") == (D("1.5"), D("0"))


def test_fok_without_enough_liquidity_trades_nothing(account: Account) -> None:
    order = account.place_order(
        market="KRW-BTC",
        side="bid",
        ord_type="limit",
        price=D("100000000"),
        volume=D("0.8"),
        time_in_force="fok",
    )
    assert order.state == "cancel"
    assert order.trades == []
    assert bal(account, "KRW") == (D("100000000"), D("0"))
    filled = account.place_order(
        market="KRW-BTC",
        side="ask",
        ord_type="limit",
        price=D("99800000"),
        volume=D("0.9"),
        time_in_force="fok",
    )
    assert filled.state == "done"
    assert filled.executed_volume == D("0.9")


def test_post_only(account: Account) -> None:
    crossing = account.place_order(
        market="KRW-BTC",
        side="bid",
        ord_type="limit",
        price=D("100000000"),
        volume=D("0.1"),
        time_in_force="post_only",
    )
    assert crossing.state == "cancel"
    assert crossing.trades == []
    resting = account.place_order(
        market="KRW-BTC",
        side="bid",
        ord_type="limit",
        price=D("99950000"),
        volume=D("0.1"),
        time_in_force="post_only",
    )
    assert resting.state == "wait"


def test_best_orders_take_only_the_best_level(account: Account) -> None:
    bid = account.place_order(
        market="KRW-BTC", side="bid", ord_type="best", price=D("60000000"), time_in_force="ioc"
    )
    assert bid.state == "cancel"
    assert bid.executed_volume == D("0.5")
    ask = account.place_order(
        market="KRW-BTC", side="ask", ord_type="best", volume=D("0.6"), time_in_force="fok"
    )
    assert ask.state == "cancel"
    assert ask.trades == []


def test_closed_history_is_bounded(clock: Clock) -> None:
    acc = Account(balances={"KRW": D("100000000")}, clock=clock, max_closed_orders=3)
    orders = []
    for i in range(5):
        clock.now += 1
        order = acc.place_order(
            market="KRW-BTC",
            side="bid",
            ord_type="limit",
            price=D("1000000"),
            volume=D("0.01"),
            identifier=f"h-{i}",
        )
        acc.cancel(uuid=order.uuid)
        orders.append(order)
    kept = acc.closed_orders()
    assert [o.uuid for o in kept] == [o.uuid for o in orders[2:]]
    assert acc.get_order(uuid=orders[0].uuid) is None
    assert acc.get_order(identifier="h-0") is None
    assert acc.closed_orders(start=T0 + 4.5) == orders[4:]


def test_listener_removal_and_failing_listener(account: Account) -> None:
    seen: list[dict[str, object]] = []

    def boom(_event: dict[str, object]) -> None:
        raise RuntimeError("listener bug")

    account.add_listener(boom)
    remove = account.add_listener(seen.append)
    account.set_balances({"KRW": D("5")})
    assert len(seen) == 1  # the failing listener did not stop delivery
    remove()
    account.set_balances({"KRW": D("6")})
    assert len(seen) == 1


def test_set_balances_and_reset(account: Account, events: list[dict[str, object]]) -> None:
    account.set_balances({"KRW": D("1000000"), "ETH": D("2.5")})
    assert events[-1]["assets"] == [
        {"currency": "KRW", "balance": D("1000000"), "locked": D("0")},
        {"currency": "ETH", "balance": D("2.5"), "locked": D("0")},
    ]
    account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("90000000"), volume=D("0.01")
    )
    account.reset()
    assert account.open_orders() == []
    assert account.markets_with_open_orders() == set()
    assert bal(account, "KRW") == (D("100000000"), D("0"))
    assert "ETH" not in account.balances()


def test_default_balances(clock: Clock) -> None:
    acc = Account(clock=clock)
    balances = acc.balances()
    assert balances["KRW"].balance == D("100000000")
    assert balances["BTC"].balance > 0
    assert balances["ETH"].balance > 0


def test_encode_event_writes_exact_plain_numbers() -> None:
    raw = encode_event(
        {
            "type": "myAsset",
            "assets": [
                {
                    "currency": "KRW",
                    "balance": D("1386929.37231066771348207123"),
                    "locked": D("0.00000005"),
                }
            ],
            "x": None,
        }
    )
    assert b"1386929.37231066771348207123" in raw
    assert b"0.00000005" in raw
    parsed = json.loads(raw, parse_float=D)
    assert parsed["assets"][0]["balance"] == D("1386929.37231066771348207123")


def test_simple_form(account: Account, events: list[dict[str, object]]) -> None:
    account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("99000000"), volume=D("0.1")
    )
    order_simple, asset_simple = simplify(events[0]), simplify(events[1])
    assert order_simple["ty"] == "myOrder"
    assert order_simple["ab"] == "BID"
    assert "tuid" in order_simple
    assert "smpt" in order_simple
    assert "otms" in order_simple
    assert asset_simple["ty"] == "myAsset"
    assert asset_simple["ast"] == [{"cu": "KRW", "b": D("90095050"), "l": D("9904950")}]


def test_decimal_str() -> None:
    assert decimal_str(D("0E-8")) == "0"
    assert decimal_str(D("155772000")) == "155772000"
    assert decimal_str(D("0.00010000")) == "0.0001"


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared Upbit samples not present")
def test_event_keys_match_upbit_samples(account: Account, events: list[dict[str, object]]) -> None:
    my_order = json.loads((SAMPLES / "ws-myorder-default.json").read_text())
    my_asset = json.loads((SAMPLES / "ws-myasset-default.json").read_text())
    account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("100000000"), volume=D("0.1")
    )
    order_events = [e for e in events if e["type"] == "myOrder"]
    asset_events = [e for e in events if e["type"] == "myAsset"]
    assert {e["state"] for e in order_events} == {"wait", "trade", "done"}
    for event in order_events:
        assert list(event) == list(my_order)
    for event in asset_events:
        assert list(event) == list(my_asset)
        assets = event["assets"]
        assert isinstance(assets, list)
        assert all(list(a) == list(my_asset["assets"][0]) for a in assets)


def test_order_chance_has_the_quote_fee_and_minimum_and_both_account_rows(
    account: Account,
) -> None:
    account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("99000000"), volume=D("0.1")
    )
    assert account.order_chance("KRW-BTC") == {
        "bid_fee": "0.0005",
        "ask_fee": "0.0005",
        "maker_bid_fee": "0.0005",
        "maker_ask_fee": "0.0005",
        "market": {
            "id": "KRW-BTC",
            "name": "BTC/KRW",
            "order_types": ["limit"],
            "order_sides": ["ask", "bid"],
            "bid_types": ["best_fok", "best_ioc", "limit", "limit_fok", "limit_ioc", "price"],
            "ask_types": ["best_fok", "best_ioc", "limit", "limit_fok", "limit_ioc", "market"],
            "bid": {"currency": "KRW", "min_total": "5000"},
            "ask": {"currency": "BTC", "min_total": "5000"},
            "max_total": "1000000000",
            "state": "active",
        },
        "bid_account": {"currency": "KRW", "balance": "90095050.0", "locked": "9904950.0",
                        "avg_buy_price": "0", "avg_buy_price_modified": False,
                        "unit_currency": "KRW"},
        "ask_account": {"currency": "BTC", "balance": "1.0", "locked": "0.0",
                        "avg_buy_price": "0", "avg_buy_price_modified": False,
                        "unit_currency": "KRW"},
    }  # fmt: skip


def test_order_chance_of_other_quotes_and_of_a_currency_not_held(account: Account) -> None:
    chance = account.order_chance("BTC-ETH")
    assert {chance[k] for k in ("bid_fee", "ask_fee", "maker_bid_fee", "maker_ask_fee")} == {
        "0.0025"
    }
    market = chance["market"]
    assert isinstance(market, dict)
    assert (market["name"], market["max_total"]) == ("ETH/BTC", "5")
    assert market["bid"] == {"currency": "BTC", "min_total": "0.00005"}
    assert market["ask"] == {"currency": "ETH", "min_total": "0.00005"}
    assert chance["bid_account"] == account.accounts()[1]  # the BTC row
    assert chance["ask_account"] == {
        "currency": "ETH", "balance": "0.0", "locked": "0.0", "avg_buy_price": "0",
        "avg_buy_price_modified": False, "unit_currency": "KRW",
    }  # fmt: skip
    assert [row["currency"] for row in account.accounts()] == ["KRW", "BTC"]  # ETH not added
    usdt = account.order_chance("USDT-BTC")["market"]
    assert isinstance(usdt, dict)
    assert "max_total" not in usdt  # no published maximum for this quote: none advertised
    assert usdt["bid"] == {"currency": "USDT", "min_total": "0.5"}
