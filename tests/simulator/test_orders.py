"""Self-match prevention (SMP) and order options when an order meets our own resting orders.

Pure: an :class:`Account` on a fake clock with a fixed book. The book's best ask is
100,000,000 and best bid 99,900,000; our own resting ask at 99,950,000 sits inside the
spread, so a crossing bid meets it before the market's asks.
"""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from simulator.account import Account, Balance, Order, OrderError

ASKS = [(100_000_000.0, 0.5), (100_100_000.0, 1.0)]
BIDS = [(99_900_000.0, 0.5), (99_800_000.0, 1.0)]
T0 = 1_750_000_000.0
OWN_ASK = D("99950000")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 0.001  # strictly increasing creation times
        return self.now


@pytest.fixture
def account() -> Account:
    acc = Account(balances={"KRW": D("100000000"), "BTC": D("1")}, clock=Clock())
    acc.on_book("KRW-BTC", ASKS, BIDS)
    return acc


@pytest.fixture
def events(account: Account) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    account.add_listener(out.append)
    return out


def own_ask(account: Account, volume: str = "0.2") -> Order:
    order = account.place_order(
        market="KRW-BTC", side="ask", ord_type="limit", price=OWN_ASK, volume=D(volume)
    )
    assert order.state == "wait"
    return order


def bid(account: Account, volume: str, smp: str | None, **extra: object) -> Order:
    return account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("100000000"),
        volume=D(volume), smp_type=smp, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def states(events: list[dict[str, object]], order: Order) -> list[object]:
    return [e["state"] for e in events if e["type"] == "myOrder" and e["uuid"] == order.uuid]


def test_default_smp_is_cancel_maker(account: Account) -> None:
    maker = own_ask(account)
    taker = bid(account, "0.3", None)
    assert taker.smp_type == "cancel_maker"
    assert taker.to_rest()["smp_type"] == "cancel_maker"
    assert maker.state == "cancel"
    assert maker.prevented_volume == D("0.2")
    assert maker.prevented_locked == D("0.2")
    assert maker.trades == []
    # The taker skipped our own ask and filled at the market's ask.
    assert taker.state == "done"
    assert [(t.price, t.volume) for t in taker.trades] == [(D("100000000"), D("0.3"))]
    assert account.balances()["BTC"].locked == 0


def test_cancel_taker_keeps_the_maker(account: Account, events: list[dict[str, object]]) -> None:
    maker = own_ask(account)
    taker = bid(account, "0.3", "cancel_taker")
    assert maker.state == "wait"
    assert maker.remaining_volume == D("0.2")
    assert taker.state == "cancel"
    assert taker.trades == []
    assert taker.prevented_volume == D("0.3")
    assert taker.prevented_locked == D("0.3") * D("100000000") * D("1.0005")
    assert taker.locked == 0
    assert account.balances()["KRW"] == Balance(balance=D("100000000"))
    assert states(events, taker) == ["wait", "cancel"]


def test_reduce_takes_the_overlap_off_both(
    account: Account, events: list[dict[str, object]]
) -> None:
    maker = own_ask(account, "0.2")
    taker = bid(account, "0.3", "reduce")
    assert maker.state == "cancel"
    assert maker.prevented_volume == D("0.2")
    assert states(events, maker) == ["wait", "cancel"]
    # The taker lost 0.2 to SMP, then bought the remaining 0.1 from the market.
    assert taker.prevented_volume == D("0.2")
    assert taker.prevented_locked == D("0.2") * D("100000000") * D("1.0005")
    assert taker.executed_volume == D("0.1")
    assert taker.remaining_volume == 0
    assert taker.state == "done"
    assert states(events, taker) == ["wait", "prevented", "trade", "done"]
    assert account.balances()["KRW"].locked == 0


def test_reduce_leaving_the_maker_open(account: Account) -> None:
    maker = own_ask(account, "0.5")
    taker = bid(account, "0.2", "reduce")
    assert taker.state == "cancel"  # nothing left of it, none of it traded
    assert taker.trades == []
    assert maker.state == "wait"
    assert maker.remaining_volume == D("0.3")
    assert maker.prevented_volume == D("0.2")
    assert account.balances()["BTC"] == Balance(balance=D("0.7"), locked=D("0.3"))


def test_none_self_trades(account: Account) -> None:
    maker = own_ask(account, "0.2")
    taker = bid(account, "0.3", "none")
    assert maker.state == "done"
    assert [(t.price, t.is_maker) for t in maker.trades] == [(OWN_ASK, True)]
    assert taker.state == "done"
    assert [(t.price, t.volume, t.is_maker) for t in taker.trades] == [
        (OWN_ASK, D("0.2"), False),
        (D("100000000"), D("0.1"), False),
    ]


def test_market_buy_by_amount_with_cancel_taker(account: Account) -> None:
    own_ask(account)
    taker = account.place_order(
        market="KRW-BTC", side="bid", ord_type="price", price=D("10000000"),
        smp_type="cancel_taker",
    )  # fmt: skip
    assert taker.state == "cancel"
    assert taker.trades == []
    assert taker.prevented_locked == D("10000000") * D("1.0005")
    assert account.balances()["KRW"].balance == D("100000000")


def test_market_sell_meets_own_bid_by_smp(account: Account) -> None:
    maker = account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("99950000"), volume=D("0.1")
    )
    taker = account.place_order(
        market="KRW-BTC", side="ask", ord_type="market", volume=D("0.3"), smp_type="reduce"
    )
    assert maker.state == "cancel"
    assert maker.prevented_volume == D("0.1")
    assert taker.prevented_volume == D("0.1")
    assert [(t.price, t.volume) for t in taker.trades] == [(D("99900000"), D("0.2"))]
    assert taker.state == "done"
    assert account.balances()["KRW"].locked == 0


def test_orders_that_do_not_reach_our_own_are_untouched(account: Account) -> None:
    maker = own_ask(account)
    taker = account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("99940000"), volume=D("0.1"),
        smp_type="cancel_taker",
    )  # fmt: skip
    assert (maker.state, taker.state) == ("wait", "wait")


def test_fok_counts_only_what_can_be_met(account: Account) -> None:
    maker = own_ask(account, "0.2")
    # 0.6 at <= 100,000,000: the market has 0.5 there and our own 0.2 would be cancelled
    # as maker, so the order cannot be met and nothing happens, to either order.
    taker = bid(account, "0.6", "cancel_maker", time_in_force="fok")
    assert taker.state == "cancel"
    assert taker.trades == []
    assert maker.state == "wait"
    # With reduce, the 0.2 prevented counts towards the whole: 0.4 trades.
    reduced = bid(account, "0.6", "reduce", time_in_force="fok")
    assert (reduced.prevented_volume, reduced.executed_volume) == (D("0.2"), D("0.4"))
    assert reduced.state == "done"
    assert maker.state == "cancel"


def test_best_ioc_meets_own_order_at_the_best_price(account: Account) -> None:
    maker = own_ask(account, "0.2")
    taker = account.place_order(
        market="KRW-BTC", side="bid", ord_type="best", price=D("50000000"),
        time_in_force="ioc", smp_type="none",
    )  # fmt: skip
    # The best price is our own ask; a best order trades at that price only.
    assert [(t.price, t.volume) for t in taker.trades] == [(OWN_ASK, D("0.2"))]
    assert taker.state == "cancel"
    assert maker.state == "done"


def test_post_only_and_smp(account: Account) -> None:
    own_ask(account)
    with pytest.raises(OrderError) as err:
        bid(account, "0.1", "reduce", time_in_force="post_only")
    assert err.value.name == "invalid_post_only"
    resting = account.place_order(
        market="KRW-BTC", side="bid", ord_type="limit", price=D("99000000"), volume=D("0.1"),
        time_in_force="post_only",
    )  # fmt: skip
    assert (resting.state, resting.smp_type) == ("wait", "none")
    crossing = bid(account, "0.1", "none", time_in_force="post_only")
    assert crossing.state == "cancel"
    assert crossing.trades == []


def test_unknown_smp_type_is_refused(account: Account) -> None:
    with pytest.raises(OrderError) as err:
        bid(account, "0.1", "both")
    assert err.value.name == "validation_error"


@pytest.mark.parametrize(
    ("side", "price", "name"),
    [("bid", "99950500", "invalid_price_bid"), ("ask", "100000000.5", "invalid_price_ask")],
)
def test_limit_price_off_the_tick_is_refused(
    account: Account, side: str, price: str, name: str
) -> None:
    with pytest.raises(OrderError) as err:
        account.place_order(
            market="KRW-BTC", side=side, ord_type="limit", price=D(price), volume=D("0.1")
        )
    assert err.value.name == name
    assert account.open_orders() == []
    ok = account.place_order(
        market="KRW-XRP", side="bid", ord_type="limit", price=D("612"), volume=D("10")
    )
    assert ok.state == "wait"
