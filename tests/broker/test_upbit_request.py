"""Upbit request building: the full union each time, snapshots only for new streams."""

from __future__ import annotations

import json

import pytest

from broker.subscriptions import UpstreamStream, upstream_plan
from broker.upbit_request import (
    build_list_subscriptions,
    build_request,
    parse_list_subscriptions,
    subscription_mismatch,
    wire_code,
)
from schemas.bus import StreamSpec
from schemas.upbit import SubscriptionList, decode_frame

T_BTC = UpstreamStream("ticker", "KRW-BTC")
T_ETH = UpstreamStream("ticker", "KRW-ETH")
TR_BTC = UpstreamStream("trade", "KRW-BTC")


def ob(code: str, depth: int = 30, level: float = 0.0) -> UpstreamStream:
    return UpstreamStream("orderbook", code, depth, level)


def request(streams: list[UpstreamStream], new: list[UpstreamStream] | None = None) -> object:
    text = build_request(streams, new=streams if new is None else new, ticket="t")
    return json.loads(text)


def test_a_first_request_asks_snapshots_for_everything() -> None:
    text = build_request([TR_BTC, T_ETH, T_BTC], new=[TR_BTC, T_ETH, T_BTC], ticket="t")
    assert text == (
        '[{"ticket":"t"},'
        '{"type":"ticker","codes":["KRW-BTC","KRW-ETH"]},'
        '{"type":"trade","codes":["KRW-BTC"]},'
        '{"format":"DEFAULT"}]'
    )


def test_existing_streams_are_realtime_only_and_new_ones_get_a_snapshot() -> None:
    old = upstream_plan([StreamSpec("ticker", "KRW-BTC"), StreamSpec("trade", "KRW-BTC")])
    plan = upstream_plan(
        [
            StreamSpec("ticker", "KRW-BTC"),
            StreamSpec("ticker", "KRW-ETH"),
            StreamSpec("trade", "KRW-BTC"),
        ]
    )
    message = request(list(plan.public), list(plan.new_since(old)))
    assert message == [
        {"ticket": "t"},
        {"type": "ticker", "codes": ["KRW-ETH"]},
        {"type": "ticker", "codes": ["KRW-BTC"], "is_only_realtime": True},
        {"type": "trade", "codes": ["KRW-BTC"], "is_only_realtime": True},
        {"format": "DEFAULT"},
    ]


def test_a_request_with_nothing_new_asks_no_snapshot_at_all() -> None:
    message = request([T_BTC, TR_BTC], [])
    assert message == [
        {"ticket": "t"},
        {"type": "ticker", "codes": ["KRW-BTC"], "is_only_realtime": True},
        {"type": "trade", "codes": ["KRW-BTC"], "is_only_realtime": True},
        {"format": "DEFAULT"},
    ]


def test_orderbook_codes_carry_a_suffix_below_30_and_levels_get_their_own_object() -> None:
    message = request([ob("KRW-BTC", 30), ob("KRW-ETH", 5), ob("KRW-BTC", 15, 10000.0)])
    assert message == [
        {"ticket": "t"},
        {"type": "orderbook", "codes": ["KRW-BTC", "KRW-ETH.5"]},
        {"type": "orderbook", "codes": ["KRW-BTC.15"], "level": 10000},
        {"format": "DEFAULT"},
    ]


def test_fractional_levels_are_sent_as_numbers() -> None:
    message = request([ob("KRW-XRP", 30, 0.1)])
    assert message == [
        {"ticket": "t"},
        {"type": "orderbook", "codes": ["KRW-XRP"], "level": 0.1},
        {"format": "DEFAULT"},
    ]


def test_my_order_on_all_markets_and_my_asset_carry_no_codes_and_no_flags() -> None:
    plan = upstream_plan(
        [StreamSpec("myOrder"), StreamSpec("myOrder", "KRW-BTC"), StreamSpec("myAsset")]
    )
    message = request(list(plan.private), [])
    assert message == [
        {"ticket": "t"},
        {"type": "myAsset"},
        {"type": "myOrder"},
        {"format": "DEFAULT"},
    ]


def test_my_order_codes_are_listed_when_nobody_wants_all_markets() -> None:
    message = request([UpstreamStream("myOrder", "KRW-ETH"), UpstreamStream("myOrder", "KRW-BTC")])
    assert message == [
        {"ticket": "t"},
        {"type": "myOrder", "codes": ["KRW-BTC", "KRW-ETH"]},
        {"format": "DEFAULT"},
    ]


def test_output_does_not_depend_on_input_order() -> None:
    streams = [T_ETH, ob("KRW-BTC", 5), TR_BTC, T_BTC, UpstreamStream("candle.1m", "KRW-BTC")]
    new = [T_ETH, TR_BTC]
    first = build_request(streams, new=new, ticket="t", fmt="SIMPLE")
    second = build_request(streams[::-1], new=set(new), ticket="t", fmt="SIMPLE")
    assert first == second
    assert json.loads(first)[-1] == {"format": "SIMPLE"}


def test_the_ticket_comes_first_and_the_format_last() -> None:
    message = json.loads(build_request([T_BTC], new=[], ticket="abc", fmt="JSON_LIST"))
    assert message[0] == {"ticket": "abc"}
    assert message[-1] == {"format": "JSON_LIST"}


@pytest.mark.parametrize(
    ("streams", "kwargs", "match"),
    [
        ([], {}, "nothing to subscribe"),
        ([T_BTC, UpstreamStream("myAsset")], {}, "public and private"),
        ([T_BTC], {"ticket": ""}, "ticket"),
        ([T_BTC], {"fmt": "XML"}, "format"),
    ],
)
def test_requests_that_cannot_be_sent_raise(
    streams: list[UpstreamStream], kwargs: dict[str, str], match: str
) -> None:
    args = {"ticket": "t", "fmt": "DEFAULT", **kwargs}
    with pytest.raises(ValueError, match=match):
        build_request(streams, new=[], ticket=args["ticket"], fmt=args["fmt"])


def test_wire_code_suffixes_shallow_orderbooks_only() -> None:
    assert wire_code(ob("KRW-BTC", 1)) == "KRW-BTC.1"
    assert wire_code(ob("KRW-BTC", 30)) == "KRW-BTC"
    assert wire_code(T_BTC) == "KRW-BTC"
    with pytest.raises(ValueError, match="no code"):
        wire_code(UpstreamStream("myAsset"))


# ---------------------------------------------------------------------- LIST_SUBSCRIPTIONS


def listed(frame: str) -> set[UpstreamStream]:
    (reply,) = decode_frame(frame)
    assert isinstance(reply, SubscriptionList)
    return parse_list_subscriptions(reply)


def test_list_subscriptions_request_is_ticket_then_method() -> None:
    assert json.loads(build_list_subscriptions("t")) == [
        {"ticket": "t"},
        {"method": "LIST_SUBSCRIPTIONS"},
    ]
    with pytest.raises(ValueError, match="ticket"):
        build_list_subscriptions("")


def test_list_subscriptions_answer_becomes_upstream_streams() -> None:
    streams = listed(
        '{"method":"LIST_SUBSCRIPTIONS","result":['
        '{"type":"ticker","codes":["KRW-BTC","KRW-ETH"]},'
        '{"type":"orderbook","codes":["KRW-BTC.5","KRW-ETH"],"level":10000}],'
        '"ticket":"t"}'
    )
    assert streams == {
        T_BTC,
        T_ETH,
        UpstreamStream("orderbook", "KRW-BTC", 5, 10000.0),
        UpstreamStream("orderbook", "KRW-ETH", None, 10000.0),
    }


def test_simple_format_private_answer_is_understood() -> None:
    streams = listed(
        '{"mthd":"LIST_SUBSCRIPTIONS","rslt":[{"ty":"myAsset"},{"ty":"myOrder"}],"tckt":"t"}'
    )
    assert streams == {UpstreamStream("myAsset"), UpstreamStream("myOrder")}


def test_what_upbit_lists_matches_what_was_asked() -> None:
    plan = upstream_plan(
        [
            StreamSpec("ticker", "KRW-BTC"),
            StreamSpec("orderbook", "KRW-BTC", 5, 0.0),
            StreamSpec("orderbook", "KRW-ETH", 30, 0.0),
        ]
    )
    echoed = listed(
        '{"method":"LIST_SUBSCRIPTIONS","result":[{"type":"ticker","codes":["KRW-BTC"]},'
        '{"type":"orderbook","codes":["KRW-BTC.5","KRW-ETH"],"level":0}],"ticket":"t"}'
    )
    stripped = listed(
        '{"method":"LIST_SUBSCRIPTIONS","result":[{"type":"ticker","codes":["KRW-BTC"]},'
        '{"type":"orderbook","codes":["KRW-BTC","KRW-ETH"],"level":0}],"ticket":"t"}'
    )
    assert subscription_mismatch(plan.public, echoed) == (frozenset(), frozenset())
    assert subscription_mismatch(plan.public, stripped) == (frozenset(), frozenset())


def test_a_mismatch_names_missing_and_unexpected_streams() -> None:
    intended = [T_BTC, ob("KRW-BTC", 15)]
    upbit = {T_ETH, ob("KRW-BTC", 5)}
    missing, unexpected = subscription_mismatch(intended, upbit)
    assert missing == {T_BTC, ob("KRW-BTC", 15)}
    assert unexpected == {T_ETH, ob("KRW-BTC", 5)}
