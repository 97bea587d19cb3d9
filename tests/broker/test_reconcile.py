"""Reconcile: REST snapshots of orders and balances become exactly the missed events."""

from __future__ import annotations

from decimal import Decimal

import pytest

from broker.reconcile import PrivateState
from schemas.errors import DecodeError
from schemas.rest import RestAccount, RestOrder
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


def ws_order(
    uuid: str, *, state: str = "wait", executed: str = "0", remaining: str = "1.0"
) -> MyOrder:
    return MyOrder(
        code="KRW-BTC",
        uuid=uuid,
        ask_bid="BID",
        order_type="limit",
        state=state,
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
    closed = {"C": order("C", state="done", executed="1.0", remaining="0.0")}
    assert states(synced.diff_orders([order("A")], closed, NOW)) == [("C", "done")]
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
