"""Subscriptions: spec validation, reference counts, the upstream plan, orderbook fan-out."""

from __future__ import annotations

import math

import pytest

from broker.subscriptions import (
    PRIVATE_UNAVAILABLE_MESSAGE,
    SpecError,
    SubscriptionState,
    UpstreamPlan,
    UpstreamStream,
    carries,
    fan_out_orderbook_depths,
    normalize_spec,
    orderbook_key,
    request_target,
    truncate_orderbook,
    upstream_plan,
    widen_request,
)
from schemas.bus import StreamSpec
from schemas.upbit import Orderbook, OrderbookUnit

MARKETS = frozenset({"KRW-BTC", "KRW-ETH", "KRW-XRP", "BTC-ETH", "USDT-BTC", "KRW-1INCH"})


def norm(spec: StreamSpec, *, markets: frozenset[str] | None = MARKETS) -> StreamSpec:
    return normalize_spec(spec, markets=markets, private_available=True)


def error_code(spec: StreamSpec, *, private_available: bool = True) -> str:
    with pytest.raises(SpecError) as info:
        normalize_spec(spec, markets=MARKETS, private_available=private_available)
    return info.value.code


def ob(code: str, depth: int = 30, level: float = 0.0) -> StreamSpec:
    return StreamSpec("orderbook", code, depth, level)


# ------------------------------------------------------------------------ normalize_spec


def test_lowercase_codes_are_uppercased() -> None:
    assert norm(StreamSpec("ticker", "krw-btc")) == StreamSpec("ticker", "KRW-BTC")


def test_codes_whose_base_starts_with_a_digit_are_valid() -> None:
    assert norm(StreamSpec("trade", "KRW-1INCH")).code == "KRW-1INCH"


def test_orderbook_defaults_become_explicit_so_equal_streams_compare_equal() -> None:
    implicit = norm(StreamSpec("orderbook", "KRW-BTC"))
    explicit = norm(StreamSpec("orderbook", "krw-btc", 30, 0))
    assert implicit == explicit == StreamSpec("orderbook", "KRW-BTC", 30, 0.0)
    assert hash(implicit) == hash(explicit)
    assert implicit.topic == "orderbook/KRW-BTC/30/0/"


def test_orderbook_level_is_kept_as_float() -> None:
    spec = norm(StreamSpec("orderbook", "KRW-BTC", 5, 10000))
    assert spec == StreamSpec("orderbook", "KRW-BTC", 5, 10000.0)
    assert isinstance(spec.level, float)


def test_unknown_type_is_rejected_with_the_type_named() -> None:
    with pytest.raises(SpecError, match="'tickr'") as info:
        norm(StreamSpec("tickr", "KRW-BTC"))
    assert info.value.code == "unknown_type"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "code", ["KRW_BTC", "KRWBTC", "KRW-", "-BTC", "KRW-BTC-X", "krw-b\u0131t", ""]
)
def test_malformed_codes_are_invalid_code(code: str) -> None:
    assert error_code(StreamSpec("ticker", code)) == "invalid_code"


def test_a_depth_suffix_in_the_code_is_refused_with_a_hint() -> None:
    with pytest.raises(SpecError, match="depth=15") as info:
        norm(StreamSpec("orderbook", "KRW-BTC.15"))
    assert info.value.code == "invalid_code"


def test_codes_missing_from_the_market_list_are_unknown_code() -> None:
    with pytest.raises(SpecError, match="KRW-NOPE") as info:
        norm(StreamSpec("ticker", "krw-nope"))
    assert info.value.code == "unknown_code"


def test_without_a_market_list_only_the_syntax_is_checked() -> None:
    assert norm(StreamSpec("ticker", "KRW-NOPE"), markets=None).code == "KRW-NOPE"


@pytest.mark.parametrize("type_", ["ticker", "trade", "orderbook", "candle.1m"])
def test_public_types_need_a_code(type_: str) -> None:
    assert error_code(StreamSpec(type_)) == "invalid_code"


def test_my_asset_takes_no_code() -> None:
    assert error_code(StreamSpec("myAsset", "KRW-BTC")) == "invalid_option"
    assert norm(StreamSpec("myAsset")) == StreamSpec("myAsset")


def test_my_order_code_is_optional() -> None:
    assert norm(StreamSpec("myOrder")) == StreamSpec("myOrder")
    assert norm(StreamSpec("myOrder", "krw-eth")) == StreamSpec("myOrder", "KRW-ETH")
    assert error_code(StreamSpec("myOrder", "KRW-NOPE")) == "unknown_code"


@pytest.mark.parametrize(
    "spec",
    [
        StreamSpec("ticker", "KRW-BTC", depth=5),
        StreamSpec("trade", "KRW-BTC", level=0),
        StreamSpec("candle.1s", "KRW-BTC", depth=30),
        StreamSpec("myOrder", depth=5),
    ],
)
def test_depth_and_level_apply_to_orderbook_only(spec: StreamSpec) -> None:
    assert error_code(spec) == "invalid_option"


@pytest.mark.parametrize("depth", [0, 2, 10, 31, -1])
def test_orderbook_depths_upbit_does_not_serve_are_invalid_option(depth: int) -> None:
    with pytest.raises(SpecError, match=str(depth)) as info:
        norm(ob("KRW-BTC", depth))
    assert info.value.code == "invalid_option"


@pytest.mark.parametrize("level", [-1.0, math.nan, math.inf])
def test_negative_or_non_finite_levels_are_invalid_option(level: float) -> None:
    assert error_code(ob("KRW-BTC", 30, level)) == "invalid_option"


def test_non_zero_levels_exist_on_krw_markets_only() -> None:
    assert error_code(ob("BTC-ETH", 30, 0.1)) == "invalid_option"
    assert norm(ob("BTC-ETH", 30, 0)).level == 0.0


@pytest.mark.parametrize("spec", [StreamSpec("myOrder"), StreamSpec("myAsset")])
def test_private_streams_without_keys_say_which_keys_are_missing(spec: StreamSpec) -> None:
    with pytest.raises(SpecError) as info:
        normalize_spec(spec, markets=MARKETS, private_available=False)
    assert info.value.code == "private_unavailable"
    assert str(info.value) == PRIVATE_UNAVAILABLE_MESSAGE


# --------------------------------------------------------------------- SubscriptionState

T_BTC = StreamSpec("ticker", "KRW-BTC")
T_ETH = StreamSpec("ticker", "KRW-ETH")
TR_BTC = StreamSpec("trade", "KRW-BTC")
OB_BTC = ob("KRW-BTC")


def test_refcounts_across_three_clients_with_overlapping_streams() -> None:
    state = SubscriptionState()
    assert state.add("a", [T_BTC, T_ETH]) == [T_BTC, T_ETH]
    assert state.add("b", [T_BTC, TR_BTC]) == [TR_BTC]
    assert state.add("c", [T_BTC, T_ETH, OB_BTC]) == [OB_BTC]
    assert (state.refcount(T_BTC), state.refcount(T_ETH), state.refcount(TR_BTC)) == (3, 2, 1)
    assert state.stream_count == 4
    assert state.subscription_count == 7
    assert state.client_count == 3

    assert state.remove("a", [T_BTC, T_ETH]) == []
    assert state.remove("c", [T_ETH]) == [T_ETH]
    assert state.drop_client("b") == [TR_BTC]
    assert state.all_streams() == {T_BTC, OB_BTC}
    assert state.drop_client("c") == [OB_BTC, T_BTC]
    assert state.all_streams() == frozenset()
    assert state.clients() == []


def test_subscribing_the_same_stream_twice_counts_once() -> None:
    state = SubscriptionState()
    assert state.add("a", [T_BTC, T_BTC]) == [T_BTC]
    assert state.add("a", [T_BTC]) == []
    assert state.refcount(T_BTC) == 1
    assert state.remove("a", [T_BTC]) == [T_BTC]


def test_removing_a_stream_the_client_does_not_hold_changes_nothing() -> None:
    state = SubscriptionState()
    state.add("a", [T_BTC])
    state.add("b", [T_ETH])
    assert state.remove("a", [T_ETH]) == []
    assert state.remove("nobody", [T_BTC]) == []
    assert state.refcount(T_ETH) == 1
    assert state.drop_client("nobody") == []


def test_a_client_with_no_streams_left_is_forgotten() -> None:
    state = SubscriptionState()
    state.add("a", [T_BTC])
    state.add("b", [])
    assert state.clients() == ["a"]
    state.remove("a", [T_BTC])
    assert state.clients() == []
    assert state.streams_of("a") == frozenset()


def test_streams_of_lists_one_clients_streams() -> None:
    state = SubscriptionState()
    state.add("a", [T_BTC, OB_BTC])
    state.add("b", [T_ETH])
    assert state.streams_of("a") == {T_BTC, OB_BTC}


# ------------------------------------------------------------------------- upstream_plan


def test_the_plan_is_the_union_whatever_the_order() -> None:
    one = upstream_plan([T_BTC, T_ETH, TR_BTC, T_BTC])
    two = upstream_plan([TR_BTC, T_ETH, T_BTC])
    assert one == two
    assert hash(one) == hash(two)
    assert one.public == (
        UpstreamStream("ticker", "KRW-BTC"),
        UpstreamStream("ticker", "KRW-ETH"),
        UpstreamStream("trade", "KRW-BTC"),
    )
    assert one.private == ()


def test_orderbook_streams_merge_to_the_deepest_depth_per_code_and_level() -> None:
    plan = upstream_plan(
        [
            ob("KRW-BTC", 5),
            ob("KRW-BTC", 15),
            ob("KRW-BTC", 1),
            ob("KRW-BTC", 5, 10000.0),
            ob("KRW-ETH", 1),
            ob("KRW-ETH", 5),
        ]
    )
    assert set(plan.public) == {
        UpstreamStream("orderbook", "KRW-BTC", 15, 0.0),
        UpstreamStream("orderbook", "KRW-BTC", 5, 10000.0),
        UpstreamStream("orderbook", "KRW-ETH", 5, 0.0),
    }


def test_my_order_for_all_markets_covers_every_code() -> None:
    plan = upstream_plan([StreamSpec("myOrder", "KRW-BTC"), StreamSpec("myOrder")])
    assert plan.private == (UpstreamStream("myOrder"),)


def test_my_order_codes_are_united_when_nobody_wants_all_markets() -> None:
    plan = upstream_plan(
        [StreamSpec("myOrder", "KRW-ETH"), StreamSpec("myOrder", "KRW-BTC"), StreamSpec("myAsset")]
    )
    assert plan.private == (
        UpstreamStream("myAsset"),
        UpstreamStream("myOrder", "KRW-BTC"),
        UpstreamStream("myOrder", "KRW-ETH"),
    )
    assert plan.public == ()


def test_public_and_private_streams_are_split() -> None:
    plan = upstream_plan([T_BTC, StreamSpec("myAsset"), StreamSpec("candle.1m", "KRW-BTC")])
    assert all(not s.is_private for s in plan.public)
    assert plan.private == (UpstreamStream("myAsset"),)
    assert plan.streams == plan.public + plan.private


def test_dropping_a_client_shrinks_the_plan() -> None:
    state = SubscriptionState()
    state.add("a", [T_BTC, ob("KRW-BTC", 5)])
    state.add("b", [T_BTC, ob("KRW-BTC", 30), TR_BTC])
    before = upstream_plan(state.all_streams())
    assert UpstreamStream("orderbook", "KRW-BTC", 30, 0.0) in before.public

    state.drop_client("b")
    after = upstream_plan(state.all_streams())
    assert after != before
    assert after.public == (
        UpstreamStream("orderbook", "KRW-BTC", 5, 0.0),
        UpstreamStream("ticker", "KRW-BTC"),
    )


def test_an_empty_plan_is_empty_and_equals_the_default() -> None:
    assert upstream_plan([]) == UpstreamPlan()
    assert upstream_plan([]).is_empty
    assert not upstream_plan([T_BTC]).is_empty


def test_new_since_lists_streams_that_need_a_snapshot() -> None:
    old = upstream_plan([T_BTC, ob("KRW-BTC", 5)])
    new = upstream_plan([T_BTC, T_ETH, ob("KRW-BTC", 15)])
    assert new.new_since(old) == {
        UpstreamStream("ticker", "KRW-ETH"),
        UpstreamStream("orderbook", "KRW-BTC", 15, 0.0),
    }
    assert new.new_since(None) == frozenset(new.streams)
    assert new.new_since(new) == frozenset()


# ------------------------------------------------------------------------ orderbook fan-out


def book(n: int, *, level: float | None = 0.0, code: str = "KRW-BTC") -> Orderbook:
    units = [
        OrderbookUnit(ask_price=100.0 + i, bid_price=99.0 - i, ask_size=0.1 * (i + 1), bid_size=1.0)
        for i in range(n)
    ]
    return Orderbook(
        code=code,
        total_ask_size=sum(u.ask_size for u in units),
        total_bid_size=sum(u.bid_size for u in units),
        orderbook_units=units,
        timestamp=1_746_601_573_804,
        level=level,
        stream_type="REALTIME",
    )


def test_fan_out_depths_lists_every_depth_per_code_and_level_deepest_first() -> None:
    table = fan_out_orderbook_depths(
        [ob("KRW-BTC", 5), ob("KRW-BTC", 30), ob("KRW-BTC", 1), ob("KRW-BTC", 15, 1000.0), T_BTC]
    )
    assert table == {("KRW-BTC", 0.0): (30, 5, 1), ("KRW-BTC", 1000.0): (15,)}


def test_truncating_keeps_the_best_levels_and_recomputes_totals() -> None:
    full = book(30)
    top5 = truncate_orderbook(full, 5)
    assert top5.orderbook_units == full.orderbook_units[:5]
    assert top5.total_ask_size == pytest.approx(0.1 + 0.2 + 0.3 + 0.4 + 0.5)
    assert top5.total_bid_size == pytest.approx(5.0)
    assert (top5.code, top5.timestamp, top5.level) == (full.code, full.timestamp, full.level)
    assert len(full.orderbook_units) == 30  # the original is untouched


def test_truncating_a_book_already_that_shallow_returns_it_unchanged() -> None:
    shallow = book(3)
    assert truncate_orderbook(shallow, 5) is shallow
    assert truncate_orderbook(shallow, 3) is shallow


def test_orderbook_key_ignores_a_suffix_echo_and_a_missing_level() -> None:
    assert orderbook_key(book(1, level=None, code="KRW-BTC.5")) == ("KRW-BTC", 0.0)
    assert orderbook_key(book(1, level=10000)) == ("KRW-BTC", 10000.0)


# ----------------------------------------------------------- request budget and carrying


def _ticker(code: str) -> UpstreamStream:
    return UpstreamStream("ticker", code, None, None)


def test_with_budget_to_spare_the_request_is_exactly_what_is_wanted() -> None:
    sent = frozenset({_ticker("KRW-BTC"), _ticker("KRW-ETH")})
    wanted = frozenset({_ticker("KRW-BTC")})
    assert request_target(wanted, sent, headroom=80) == wanted


def test_when_budget_is_scarce_released_streams_stay_and_cost_nothing_to_re_add() -> None:
    sent = frozenset({_ticker("KRW-BTC"), _ticker("KRW-ETH")})
    wanted = frozenset({_ticker("KRW-BTC")})
    # Only a removal: the target equals what was sent, so no request is needed.
    assert request_target(wanted, sent, headroom=10) == sent
    # An addition carries the released stream along instead of dropping it.
    grown = wanted | {_ticker("KRW-XRP")}
    assert request_target(grown, sent, headroom=10) == sent | {_ticker("KRW-XRP")}


def test_lingering_streams_are_bounded_and_never_doubled_with_another_depth() -> None:
    deep = UpstreamStream("orderbook", "KRW-BTC", 15, 0.0)
    shallow = UpstreamStream("orderbook", "KRW-BTC", 5, 0.0)
    many = frozenset(_ticker(f"KRW-C{i}") for i in range(50))
    target = request_target(frozenset({shallow}), many | {deep}, headroom=0, max_lingering=10)
    assert shallow in target
    assert deep not in target
    assert len(target) == 11
    assert request_target(frozenset({shallow}), None, headroom=0) == {shallow}


WIDE_MARKETS = frozenset({"KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "BTC-ETH", "USDT-BTC"})


def _trade(code: str) -> UpstreamStream:
    return UpstreamStream("trade", code, None, None)


def test_a_widened_request_carries_every_market_of_the_new_codes_quote() -> None:
    sent = frozenset({_ticker("KRW-BTC")})
    target = sent | {_ticker("KRW-XRP"), _trade("BTC-ETH")}
    widened = widen_request(
        target, sent, markets=WIDE_MARKETS, types={"ticker", "trade"}, limit=100
    )
    assert widened == target | {_ticker("KRW-ETH"), _ticker("KRW-SOL")}
    # Nothing new, nothing to widen: a removal-only request stays as it is.
    assert widen_request(sent, sent, markets=WIDE_MARKETS, types={"ticker"}, limit=100) == sent


def test_widening_skips_other_types_orderbooks_and_codes_already_requested() -> None:
    book = UpstreamStream("orderbook", "KRW-BTC", 15, 0.0)
    target = frozenset({book, _trade("KRW-BTC"), _trade("KRW-ETH"), _ticker("KRW-SOL")})
    sent = frozenset({_trade("KRW-ETH")})
    widened = widen_request(
        target, sent, markets=WIDE_MARKETS, types={"orderbook", "trade"}, limit=100
    )
    # Trades of the other KRW markets; no orderbook however configured; no ticker
    # (not a widened type); KRW-ETH's trade is requested already.
    assert widened - target == {_trade("KRW-XRP"), _trade("KRW-SOL")}


def test_widening_stops_at_its_limit() -> None:
    target = frozenset({_ticker("KRW-BTC"), _trade("KRW-BTC")})
    widened = widen_request(target, None, markets=WIDE_MARKETS, types={"ticker", "trade"}, limit=4)
    assert len(widened - target) == 4
    assert widen_request(target, None, markets=WIDE_MARKETS, types={"ticker"}, limit=0) == target


def test_carries_matches_what_an_upstream_request_delivers() -> None:
    carried = frozenset(
        {
            UpstreamStream("orderbook", "KRW-BTC", 15, 0.0),
            UpstreamStream("myOrder", None, None, None),
            _ticker("KRW-ETH"),
        }
    )
    assert carries(carried, StreamSpec("orderbook", "KRW-BTC", 5, 0.0))
    assert not carries(carried, StreamSpec("orderbook", "KRW-BTC", 30, 0.0))
    assert not carries(carried, StreamSpec("orderbook", "KRW-BTC", 5, 1000.0))
    assert carries(carried, StreamSpec("myOrder", "KRW-XRP"))
    assert carries(carried, StreamSpec("ticker", "KRW-ETH"))
    assert not carries(carried, StreamSpec("ticker", "KRW-ETHW"))
    assert not carries(carried, StreamSpec("myAsset"))


@pytest.mark.parametrize("level", [1e300, 5.0, 12345.0, 0.5, 1e9, 1e-8])
def test_a_level_upbit_does_not_group_by_is_refused_before_it_reaches_the_shared_request(
    level: float,
) -> None:
    with pytest.raises(SpecError, match="power of ten") as info:
        norm(ob("KRW-BTC", 30, level))
    assert info.value.code == "invalid_option"


@pytest.mark.parametrize("level", [0.1, 1.0, 1000.0, 1e8, 1e-7])
def test_powers_of_ten_are_levels_and_come_out_canonical(level: float) -> None:
    spec = norm(ob("KRW-BTC", 30, level * (1 + 1e-12)))
    assert spec.level == level
    assert spec.topic == ob("KRW-BTC", 30, level).topic
