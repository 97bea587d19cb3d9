"""Reconcile: REST snapshots of orders and balances become exactly the missed events."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from broker.reconcile import CLOSED_MARGIN_MS, CLOSED_WINDOW_MS, PrivateState, closed_window
from schemas.errors import DecodeError
from schemas.rest import RestAccount, RestOrder, RestOrderTrade
from schemas.upbit import AssetBalance, MyAsset, MyOrder

NOW = 1_751_600_000_000
D = Decimal


def order(
    uuid: str,
    *,
    state: str = "wait",
    executed: str = "0",
    remaining: str = "1.0",
    created: str = "2025-07-04T15:00:00+09:00",
    side: str = "bid",
) -> RestOrder:
    return RestOrder(
        uuid=uuid,
        side=side,
        ord_type="limit",
        price=D("140000000"),
        state=state,
        market="KRW-BTC",
        created_at=created,
        volume=D("1.0"),
        remaining_volume=D(remaining),
        executed_volume=D(executed),
        trades_count=0 if executed == "0" else 1,
    )


def fill(uuid: str, volume: str, *, at: str = "15:00:01", trend: str = "up") -> RestOrderTrade:
    return RestOrderTrade(
        market="KRW-BTC",
        uuid=uuid,
        price=D("140000000"),
        volume=D(volume),
        funds=D("140000000") * D(volume),
        side="bid",
        trend=trend,
        created_at=f"2025-07-04T{at}.250000+09:00",
    )


def detailed(uuid: str, *fills: RestOrderTrade, state: str = "done") -> RestOrder:
    """``GET /v1/order`` of a 1.0 BTC bid with ``fills`` (executed = their sum)."""
    executed = sum((f.volume for f in fills), D(0))
    return msgspec.structs.replace(
        order(uuid, state=state, executed=str(executed), remaining=str(D("1.0") - executed)),
        trades=list(fills),
        trades_count=len(fills),
    )


def trades(events: list[MyOrder]) -> list[tuple[str, str, str | None]]:
    return [(ev.uuid, ev.state, ev.trade_uuid) for ev in events]


def ws_order(
    uuid: str,
    *,
    state: str = "wait",
    executed: str = "0",
    remaining: str = "1.0",
    trade_uuid: str | None = None,
) -> MyOrder:
    return MyOrder(
        code="KRW-BTC",
        uuid=uuid,
        ask_bid="BID",
        order_type="limit",
        state=state,
        trade_uuid=trade_uuid,
        executed_volume=D(executed),
        remaining_volume=D(remaining),
        timestamp=NOW - 1,
    )


def account(currency: str, balance: str, locked: str = "0") -> RestAccount:
    return RestAccount(currency=currency, balance=D(balance), locked=D(locked))


def states(events: list[MyOrder]) -> list[tuple[str, str]]:
    return [(ev.uuid, ev.state) for ev in events]


@pytest.fixture
def synced() -> PrivateState:
    """State after the first sync: order A open, 1,000,000 KRW and 2 BTC."""
    state = PrivateState()
    state.baseline([order("A")], [account("KRW", "1000000"), account("BTC", "2.0")])
    return state


# --------------------------------------------------------------------------- orders


def test_baseline_reports_nothing_and_an_unchanged_poll_reports_nothing(
    synced: PrivateState,
) -> None:
    assert synced.open_uuids == ["A"]
    assert synced.missing_uuids([order("A")]) == []
    assert synced.diff_orders([order("A")], {}, NOW) == []
    # Equal Decimals spelled differently are no change.
    assert synced.diff_orders([order("A", executed="0.000", remaining="1")], {}, NOW) == []


def test_an_order_placed_during_the_outage_appears_as_one_event(synced: PrivateState) -> None:
    events = synced.diff_orders(
        [order("B", created="2025-07-04T15:01:00+09:00"), order("A")], {}, NOW
    )
    assert states(events) == [("B", "wait")]
    ev = events[0]
    assert (ev.code, ev.ask_bid, ev.order_type, ev.timestamp) == ("KRW-BTC", "BID", "limit", NOW)
    assert ev.order_timestamp == 1_751_608_860_000
    assert ev.volume == D("1.0")
    assert synced.diff_orders([order("B"), order("A")], {}, NOW) == []


def test_a_partial_fill_is_reported_with_the_new_volumes(synced: PrivateState) -> None:
    events = synced.diff_orders([order("A", executed="0.4", remaining="0.6")], {}, NOW)
    assert states(events) == [("A", "wait")]
    assert (events[0].executed_volume, events[0].remaining_volume) == (D("0.4"), D("0.6"))
    assert synced.diff_orders([order("A", executed="0.4", remaining="0.6")], {}, NOW) == []


def test_a_filled_order_gone_from_the_open_list_is_reported_done_from_closed(
    synced: PrivateState,
) -> None:
    assert synced.missing_uuids([]) == ["A"]
    closed = {"A": order("A", state="done", executed="1.0", remaining="0.0")}
    events = synced.diff_orders([], closed, NOW)
    assert states(events) == [("A", "done")]
    assert events[0].executed_volume == D("1.0")
    # Reported and dropped: the state holds open orders only.
    assert synced.open_uuids == []
    assert synced.missing_uuids([]) == []
    assert synced.diff_orders([], closed, NOW) == []


def test_a_cancelled_order_gone_from_the_open_list_is_reported_cancel(
    synced: PrivateState,
) -> None:
    events = synced.diff_orders([], {"A": order("A", state="cancel")}, NOW)
    assert states(events) == [("A", "cancel")]
    assert synced.open_uuids == []


def test_a_missing_order_without_its_closed_version_stays_known_until_fetched(
    synced: PrivateState,
) -> None:
    assert synced.diff_orders([], {}, NOW) == []
    assert synced.missing_uuids([]) == ["A"]
    synced.forget_order("A")  # e.g. GET /v1/order answered 404
    assert synced.missing_uuids([]) == []


def test_an_order_missing_only_from_an_incomplete_listing_is_not_reported(
    synced: PrivateState,
) -> None:
    # GET /v1/order says it is still open and unchanged: nothing to report.
    assert synced.diff_orders([], {"A": order("A")}, NOW) == []
    assert synced.open_uuids == ["A"]


def test_an_order_born_and_finished_during_the_outage_is_reported_once(
    synced: PrivateState,
) -> None:
    # Without its trades[] (not fetched): its birth, then how it ended.
    closed = {"C": order("C", state="done", executed="1.0", remaining="0.0")}
    events = synced.diff_orders([order("A")], closed, NOW)
    assert states(events) == [("C", "wait"), ("C", "done")]
    birth = events[0]
    assert (birth.executed_volume, birth.remaining_volume, birth.trades_count) == (
        D(0),
        D("1.0"),
        0,
    )
    assert synced.diff_orders([order("A")], closed, NOW) == []


def test_events_are_sorted_by_order_time(synced: PrivateState) -> None:
    events = synced.diff_orders(
        [
            order("B", created="2025-07-04T15:02:00+09:00"),
            order("C", created="2025-07-04T14:00:00+09:00"),
        ],
        {"A": order("A", state="done", executed="1.0", remaining="0.0")},
        NOW,
    )
    assert states(events) == [("C", "wait"), ("A", "done"), ("B", "wait")]


def test_ws_events_update_the_state_so_rest_repeats_nothing(synced: PrivateState) -> None:
    synced.apply_order(ws_order("A", state="trade", executed="0.5", remaining="0.5"))
    assert synced.diff_orders([order("A", executed="0.5", remaining="0.5")], {}, NOW) == []
    synced.apply_order(ws_order("A", state="done", executed="1.0", remaining="0.0"))
    assert synced.open_uuids == []


def test_a_listing_older_than_a_ws_event_produces_nothing(synced: PrivateState) -> None:
    # The WS reported a fill after REST's open list was fetched: the listing is stale.
    synced.apply_order(ws_order("A", state="trade", executed="0.5", remaining="0.5"))
    assert synced.diff_orders([order("A", executed="0.2", remaining="0.8")], {}, NOW) == []
    # ...and an order the WS closed does not come back from a stale listing.
    synced.apply_order(ws_order("A", state="cancel", executed="0.5", remaining="0.5"))
    assert synced.diff_orders([order("A", executed="0.5", remaining="0.5")], {}, NOW) == []
    assert synced.open_uuids == []


def test_a_triggered_watch_order_is_reported_as_wait() -> None:
    state = PrivateState()
    state.baseline([order("W", state="watch")], [])
    assert state.diff_orders([order("W", state="watch")], {}, NOW) == []
    assert states(state.diff_orders([order("W")], {}, NOW)) == [("W", "wait")]


def test_a_malformed_order_raises_before_any_state_changes(synced: PrivateState) -> None:
    with pytest.raises(DecodeError):
        synced.diff_orders([order("B"), order("X", side="sideways")], {}, NOW)
    assert synced.open_uuids == ["A"]


def test_finished_orders_are_remembered_only_up_to_the_bound() -> None:
    state = PrivateState(max_finished=10)
    for i in range(1_000):
        state.apply_order(ws_order(f"o{i}", state="done", executed="1.0", remaining="0"))
    assert state.open_uuids == []
    # The last 10 are still known finished; older ones are forgotten, not leaked.
    assert state.diff_orders([order("o999")], {}, NOW) == []
    assert states(state.diff_orders([order("o0")], {}, NOW)) == [("o0", "wait")]


# ----------------------------------------------------------------- fills and closed


def test_an_order_born_and_filled_during_the_outage_comes_as_wait_each_trade_done(
    synced: PrivateState,
) -> None:
    listed = order("C", state="done", executed="1.0", remaining="0.0")
    # Its listing shows fills nobody saw: its trades[] are fetched.
    assert synced.to_fetch([order("A")], [listed]) == ["C"]
    full = detailed("C", fill("t1", "0.4", at="15:00:01"), fill("t2", "0.6", at="15:00:02"))
    events = synced.diff_orders([order("A")], {"C": full}, NOW)
    assert trades(events) == [
        ("C", "wait", None),
        ("C", "trade", "t1"),
        ("C", "trade", "t2"),
        ("C", "done", None),
    ]
    first, second, done = events[1:]
    assert (first.volume, first.executed_volume, first.remaining_volume) == (
        D("0.4"),
        D("0.4"),
        D("0.6"),
    )
    assert (second.executed_volume, second.remaining_volume, second.trades_count) == (
        D("1.0"),
        D("0.0"),
        2,
    )
    # A buyer took liquidity (trend up), and this is a bid: the taker, not the maker.
    assert first.is_maker is False
    assert first.trade_timestamp == 1_751_608_801_250
    assert done.trade_timestamp == second.trade_timestamp
    # Exactly once: the next poll finds it finished, and asks nothing more of it.
    assert synced.diff_orders([order("A")], {"C": full}, NOW) == []
    assert synced.to_fetch([order("A")], [listed]) == []


def test_fills_the_websocket_delivered_are_not_published_again(synced: PrivateState) -> None:
    synced.apply_order(
        ws_order("A", state="trade", executed="0.4", remaining="0.6", trade_uuid="t1")
    )
    full = detailed("A", fill("t1", "0.4"), fill("t2", "0.6", at="15:00:02"))
    assert trades(synced.diff_orders([], {"A": full}, NOW)) == [
        ("A", "trade", "t2"),
        ("A", "done", None),
    ]


def test_each_fill_is_published_once_across_polls(synced: PrivateState) -> None:
    partial = detailed("A", fill("t1", "0.4"), state="wait")
    assert synced.to_fetch([order("A", executed="0.4", remaining="0.6")]) == ["A"]
    assert trades(synced.diff_orders([partial], {"A": partial}, NOW)) == [("A", "trade", "t1")]
    # Unchanged: nothing to fetch and nothing to publish.
    assert synced.to_fetch([partial]) == []
    assert synced.diff_orders([partial], {"A": partial}, NOW) == []
    full = detailed("A", fill("t1", "0.4"), fill("t2", "0.6", at="15:00:02"))
    assert synced.to_fetch([], [full]) == ["A"]
    assert trades(synced.diff_orders([], {"A": full}, NOW)) == [
        ("A", "trade", "t2"),
        ("A", "done", None),
    ]
    assert synced.diff_orders([], {"A": full}, NOW) == []


def test_a_partly_filled_order_cancelled_during_the_outage_shows_its_fill_then_cancel(
    synced: PrivateState,
) -> None:
    cancelled = detailed("A", fill("t1", "0.3"), state="cancel")
    assert trades(synced.diff_orders([], {"A": cancelled}, NOW)) == [
        ("A", "trade", "t1"),
        ("A", "cancel", None),
    ]


def test_an_order_cancelled_without_a_fill_needs_no_detail(synced: PrivateState) -> None:
    gone = order("D", state="cancel")
    assert synced.to_fetch([order("A")], [gone]) == []
    assert states(synced.diff_orders([order("A")], {"D": gone}, NOW)) == [
        ("D", "wait"),
        ("D", "cancel"),
    ]


def test_known_orders_no_listing_shows_are_fetched(synced: PrivateState) -> None:
    assert synced.to_fetch([], []) == ["A"]
    # Listed closed without new fills: the listing is enough.
    assert synced.to_fetch([], [order("A", state="cancel")]) == []


def test_events_of_several_orders_follow_the_time_they_happened(synced: PrivateState) -> None:
    a = detailed("A", fill("a1", "0.5", at="15:00:03"), fill("a2", "0.5", at="15:00:05"))
    c = msgspec.structs.replace(
        detailed("C", fill("c1", "1.0", at="15:00:04")), created_at="2025-07-04T15:00:02+09:00"
    )
    assert trades(synced.diff_orders([], {"A": a, "C": c}, NOW)) == [
        ("C", "wait", None),
        ("A", "trade", "a1"),
        ("C", "trade", "c1"),
        ("C", "done", None),
        ("A", "trade", "a2"),
        ("A", "done", None),
    ]


def test_trade_uuids_are_remembered_only_up_to_the_bound() -> None:
    state = PrivateState(max_trades=10)
    state.baseline([order("A")], [])
    for i in range(1_000):
        state.apply_order(ws_order("A", state="trade", trade_uuid=f"t{i}"))
    assert len(state.snapshot().trades) == 10
    assert state.snapshot().trades[-1] == "t999"


def test_closed_orders_are_asked_from_a_little_before_the_known_time() -> None:
    assert closed_window(NOW - 5_000, NOW) == (NOW - 5_000 - CLOSED_MARGIN_MS, NOW, True)
    assert closed_window(None, NOW) == (NOW - CLOSED_MARGIN_MS, NOW, True)


def test_closed_orders_older_than_upbits_seven_days_are_not_asked_for() -> None:
    start, end, complete = closed_window(NOW - 30 * 86_400_000, NOW)
    assert not complete
    assert end - start < CLOSED_WINDOW_MS
    assert end - start > CLOSED_WINDOW_MS - 2 * CLOSED_MARGIN_MS


# ---------------------------------------------------------------------- restart


def test_a_restored_state_reports_what_changed_since_it_was_saved(
    synced: PrivateState,
) -> None:
    synced.apply_order(ws_order("A", state="trade", executed="0.4", trade_uuid="t1"))
    synced.apply_order(ws_order("B", state="done", executed="1.0", remaining="0"))
    restarted = PrivateState()
    restarted.restore(synced.snapshot())
    assert restarted.open_uuids == ["A"]
    assert restarted.balances == synced.balances
    full = detailed("A", fill("t1", "0.4"), fill("t2", "0.6", at="15:00:02"))
    finished_before = order("B", state="done", executed="1.0", remaining="0")
    assert restarted.to_fetch([], [full, finished_before]) == ["A"]
    assert trades(restarted.diff_orders([], {"A": full, "B": finished_before}, NOW)) == [
        ("A", "trade", "t2"),
        ("A", "done", None),
    ]
    assert restarted.diff_accounts([account("KRW", "1000000"), account("BTC", "2")], NOW) is None


# ------------------------------------------------------------------------- balances


def test_unchanged_balances_produce_no_event(synced: PrivateState) -> None:
    assert synced.diff_accounts([account("KRW", "1000000.0"), account("BTC", "2")], NOW) is None


def test_only_changed_currencies_are_reported_with_every_digit(synced: PrivateState) -> None:
    ev = synced.diff_accounts(
        [
            account("KRW", "1386929.37231066771348207123", "10329.670127489597585685"),
            account("BTC", "2.0"),
        ],
        NOW,
    )
    assert ev == MyAsset(
        asset_uuid=None,
        assets=[
            AssetBalance(
                currency="KRW",
                balance=D("1386929.37231066771348207123"),
                locked=D("10329.670127489597585685"),
            )
        ],
        asset_timestamp=NOW,
        timestamp=NOW,
        stream_type="REALTIME",
    )
    # A change in the last of 27 digits is a change: no float rounding anywhere.
    ev = synced.diff_accounts(
        [
            account("KRW", "1386929.37231066771348207124", "10329.670127489597585685"),
            account("BTC", "2.0"),
        ],
        NOW,
    )
    assert ev is not None
    assert [a.balance for a in ev.assets] == [D("1386929.37231066771348207124")]


def test_a_currency_that_disappeared_is_reported_as_zero(synced: PrivateState) -> None:
    ev = synced.diff_accounts([account("KRW", "1000000")], NOW)
    assert ev is not None
    assert ev.assets == [AssetBalance(currency="BTC", balance=D(0), locked=D(0))]
    assert synced.balances == {"KRW": (D("1000000"), D(0))}


def test_a_new_currency_is_reported_and_a_zero_one_is_not(synced: PrivateState) -> None:
    accounts = [account("KRW", "1000000"), account("BTC", "2"), account("ETH", "0.5", "0.1")]
    ev = synced.diff_accounts([*accounts, account("XRP", "0")], NOW)
    assert ev is not None
    assert [a.currency for a in ev.assets] == ["ETH"]


def test_ws_asset_events_update_balances_so_rest_repeats_nothing(synced: PrivateState) -> None:
    synced.apply_asset(
        MyAsset(
            asset_uuid="e635f223",
            assets=[
                AssetBalance(currency="BTC", balance=D(0), locked=D(0)),
                AssetBalance(currency="KRW", balance=D("1386929.37"), locked=D(0)),
            ],
            asset_timestamp=NOW,
            timestamp=NOW,
        )
    )
    assert synced.balances == {"KRW": (D("1386929.37"), D(0))}
    assert synced.diff_accounts([account("KRW", "1386929.370")], NOW) is None


# ---------------------------------------------------------------- stream after REST


def asset_event(*balances: tuple[str, str]) -> MyAsset:
    return MyAsset(
        asset_uuid="x",
        assets=[AssetBalance(currency=c, balance=D(b), locked=D(0)) for c, b in balances],
        asset_timestamp=NOW,
        timestamp=NOW,
    )


def test_a_fill_rest_published_first_is_not_news_when_the_stream_brings_it(
    synced: PrivateState,
) -> None:
    # An audit found order B born and filled; the stream then delivers the same story.
    b = detailed("B", fill("B", "1.0"))
    published = synced.diff_orders([], {"B": b}, NOW)
    assert states(published) == [("B", "wait"), ("B", "trade"), ("B", "done")]
    trade_uuid = published[1].trade_uuid
    assert not synced.is_news(ws_order("B"))
    assert not synced.is_news(ws_order("B", state="trade", executed="1.0", trade_uuid=trade_uuid))
    assert not synced.is_news(ws_order("B", state="done", executed="1.0", remaining="0"))
    # Another fill, or another order, is news.
    assert synced.is_news(ws_order("B", state="trade", trade_uuid="another-fill"))
    assert synced.is_news(ws_order("C"))


def test_an_open_orders_event_is_news_unless_it_repeats_what_rest_published(
    synced: PrivateState,
) -> None:
    # An audit published A's fill; the stream's late copies of it are no news.
    (published,) = synced.diff_orders([order("A", executed="0.5", remaining="0.5")], {}, NOW)
    synced.apply_order(published)  # the router feeds REST's own events back: no-op
    assert not synced.is_news(ws_order("A", executed="0.5", remaining="0.5"))
    assert not synced.is_news(ws_order("A"))  # older than what was published
    assert synced.is_news(ws_order("A", executed="0.7", remaining="0.3"))
    assert synced.is_news(ws_order("A", state="cancel"))
    # Once the stream moved A on itself, its events are its own again.
    synced.apply_order(ws_order("A", executed="0.7", remaining="0.3"))
    assert synced.is_news(ws_order("A", executed="0.7", remaining="0.3"))


def test_what_the_baseline_learned_was_never_published_so_the_stream_brings_news(
    synced: PrivateState,
) -> None:
    # An order placed as the broker started: the baseline's REST read saw it, its
    # WebSocket ``wait`` came a moment later. Subscribers never heard of it.
    state = PrivateState()
    state.baseline([order("B")], [account("KRW", "990000", "10000")])
    assert state.is_news(ws_order("B"))
    # myAsset may come minutes late on a first subscription: the baseline read the
    # balance it reports, which nobody published.
    assert state.is_news(
        MyAsset(
            asset_uuid="x",
            assets=[AssetBalance(currency="KRW", balance=D("990000"), locked=D("10000"))],
            asset_timestamp=NOW,
            timestamp=NOW,
        )
    )
    # A currency sold out before the baseline: its zero was never published either.
    assert state.is_news(asset_event(("ETH", "0")))
    assert synced.is_news(ws_order("A"))


def test_an_smp_prevented_event_is_news_even_without_volumes(synced: PrivateState) -> None:
    # A market buy by amount (volumes null): an audit published its wait first, the
    # stream's copy is dropped, but the SMP ``prevented`` after it is REST-invisible news.
    market = msgspec.structs.replace(
        order("M"), ord_type="price", volume=None, remaining_volume=None
    )
    (published,) = synced.diff_orders([order("A"), market], {}, NOW)
    synced.apply_order(published)
    amount = {"executed": "0", "remaining": "1.0"}
    wait = msgspec.structs.replace(ws_order("M", **amount), volume=None, remaining_volume=None)
    assert not synced.is_news(wait)
    prevented = msgspec.structs.replace(wait, state="prevented", prevented_volume=D("0.1"))
    assert synced.is_news(prevented)


def test_a_non_number_from_upstream_raises_no_arithmetic_error(synced: PrivateState) -> None:
    # msgspec decodes "NaN" as Decimal('NaN'), whose ordering raises InvalidOperation.
    nan = D("NaN")
    bad = msgspec.structs.replace(order("A"), executed_volume=nan)
    assert synced.to_fetch([bad]) == []
    assert synced.diff_orders([bad], {}, NOW) == []
    ws = msgspec.structs.replace(ws_order("A"), executed_volume=nan)
    synced.diff_orders([order("A", executed="0.5", remaining="0.5")], {}, NOW)
    assert not synced.is_news(ws)
    synced.apply_order(ws)
    assert synced.open_uuids == ["A"]


def test_a_balance_event_is_news_unless_it_repeats_what_rest_published(
    synced: PrivateState,
) -> None:
    published = synced.diff_accounts([account("KRW", "1000000"), account("BTC", "1.5")], NOW)
    assert published is not None
    synced.apply_asset(published)  # REST's own event fed back: no-op
    assert not synced.is_news(asset_event(("BTC", "1.50")))
    assert synced.is_news(asset_event(("KRW", "1000000"), ("BTC", "1.5")))  # KRW: baseline
    assert synced.is_news(asset_event(("BTC", "1.4")))
    # A -> B -> A: after the stream's B, its A is news again.
    synced.apply_asset(asset_event(("BTC", "1.4")))
    assert synced.is_news(asset_event(("BTC", "1.5")))
    # A currency REST reported gone: the stream's zero for it is a copy.
    gone = synced.diff_accounts([account("KRW", "1000000")], NOW)
    assert gone is not None
    assert not synced.is_news(asset_event(("BTC", "0")))
    assert synced.is_news(asset_event(("ETH", "0")))  # never published: news


def test_currencies_the_stream_reported_during_a_read_keep_their_value(
    synced: PrivateState,
) -> None:
    # REST's BTC may predate the stream's: it stays; KRW is diffed as usual.
    ev = synced.diff_accounts([account("KRW", "900000"), account("BTC", "1.0")], NOW, keep={"BTC"})
    assert ev is not None
    assert [a.currency for a in ev.assets] == ["KRW"]
    assert synced.balances == {"KRW": (D("900000"), D(0)), "BTC": (D("2.0"), D(0))}
    # Kept even when REST no longer lists it.
    assert synced.diff_accounts([account("KRW", "900000")], NOW, keep={"BTC"}) is None
    assert "BTC" in synced.balances
