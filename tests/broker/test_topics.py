"""Topic lifecycle: reference-count changes and carried streams in, plans out."""

from __future__ import annotations

from broker.subscriptions import UpstreamStream
from broker.topics import TopicLifecycle, TopicPlan
from schemas.bus import StreamSpec

BTC = StreamSpec("ticker", "KRW-BTC")
ETH = StreamSpec("ticker", "KRW-ETH")
BOOK_5 = StreamSpec("orderbook", "KRW-BTC", 5, 0.0)
BOOK_15 = StreamSpec("orderbook", "KRW-BTC", 15, 0.0)
ORDERS = StreamSpec("myOrder")
ASSET = StreamSpec("myAsset")

UP_BTC = UpstreamStream("ticker", "KRW-BTC")
UP_ETH = UpstreamStream("ticker", "KRW-ETH")


def test_the_first_subscriber_activates_the_topic_and_requests_the_stream() -> None:
    topics = TopicLifecycle()
    plan = topics.subscribe("a", [BTC])
    assert plan.activate == ("ticker/KRW-BTC/",)
    assert plan.routed == frozenset({BTC})
    assert plan.requests == {"public": {UP_BTC}, "private": frozenset()}


def test_a_second_subscriber_of_the_same_stream_changes_nothing() -> None:
    topics = TopicLifecycle()
    topics.subscribe("a", [BTC])
    plan = topics.subscribe("b", [BTC])
    assert plan.is_empty
    assert plan == TopicPlan()


def test_the_last_release_keeps_the_topic_lingering_and_drops_it_from_the_request() -> None:
    topics = TopicLifecycle()
    topics.subscribe("a", [BTC, ETH])
    plan = topics.unsubscribe("a", [BTC])
    assert plan.activate == ()
    assert plan.retire == ()
    assert plan.routed == frozenset({BTC, ETH}), "a lingering stream is still routed"
    assert plan.requests["public"] == {UP_ETH}
    assert topics.lingering == {BTC}
    assert topics.wanted() == {ETH}


def test_a_release_shared_by_another_client_leaves_everything_as_it_is() -> None:
    topics = TopicLifecycle()
    topics.subscribe("a", [BTC])
    topics.subscribe("b", [BTC])
    assert topics.unsubscribe("a", [BTC]).is_empty
    assert topics.lingering == frozenset()


def test_a_lingering_topic_is_retired_once_its_link_no_longer_carries_it() -> None:
    topics = TopicLifecycle()
    topics.subscribe("a", [BTC, ETH])
    topics.unsubscribe("a", [BTC])
    still = topics.carried("public", frozenset({UP_BTC, UP_ETH}))
    assert still.is_empty, "Upbit still sends it (a scarce request kept it)"
    plan = topics.carried("public", frozenset({UP_ETH}))
    assert plan.retire == (BTC,)
    assert plan.routed == frozenset({ETH})
    assert plan.activate == ()
    assert plan.requests == {}
    assert topics.lingering == frozenset()


def test_subscribing_again_while_lingering_needs_no_activation() -> None:
    topics = TopicLifecycle()
    topics.subscribe("a", [BTC])
    topics.unsubscribe("a", [BTC])
    plan = topics.subscribe("b", [BTC])
    assert plan.activate == (), "the topic never stopped being published"
    assert plan.requests["public"] == {UP_BTC}
    assert topics.lingering == frozenset()
    assert topics.carried("public", frozenset()).is_empty, "an active topic is never retired"


def test_a_retired_topic_is_activated_again_on_the_next_subscribe() -> None:
    topics = TopicLifecycle()
    topics.subscribe("a", [BTC])
    topics.unsubscribe("a", [BTC])
    topics.carried("public", frozenset())
    assert topics.subscribe("a", [BTC]).activate == ("ticker/KRW-BTC/",)


def test_a_dropped_client_releases_everything_it_held() -> None:
    topics = TopicLifecycle()
    topics.subscribe("a", [BTC, ORDERS])
    topics.subscribe("b", [ETH])
    plan = topics.drop_client("a")
    assert topics.lingering == {BTC, ORDERS}
    assert plan.requests == {"public": {UP_ETH}, "private": frozenset()}
    assert topics.drop_client("nobody").is_empty


def test_each_link_retires_only_its_own_lingering_topics() -> None:
    topics = TopicLifecycle()
    topics.subscribe("a", [BTC, ORDERS, ASSET])
    topics.drop_client("a")
    public = topics.carried("public", frozenset())
    assert public.retire == (BTC,)
    assert topics.lingering == {ORDERS, ASSET}
    private = topics.carried("private", frozenset({UpstreamStream("myAsset")}))
    assert private.retire == (ORDERS,)
    assert topics.lingering == {ASSET}


def test_private_streams_are_requested_on_the_private_link() -> None:
    topics = TopicLifecycle()
    plan = topics.subscribe("a", [StreamSpec("myOrder", "KRW-BTC"), ORDERS, ASSET])
    assert plan.requests["public"] == frozenset()
    assert plan.requests["private"] == {UpstreamStream("myOrder"), UpstreamStream("myAsset")}


def test_a_shallower_book_lingers_while_the_deeper_request_still_covers_it() -> None:
    topics = TopicLifecycle()
    topics.subscribe("a", [BOOK_5])
    topics.subscribe("b", [BOOK_15])
    plan = topics.unsubscribe("a", [BOOK_5])
    deep = UpstreamStream("orderbook", "KRW-BTC", 15, 0.0)
    assert plan.requests["public"] == {deep}
    assert topics.carried("public", frozenset({deep})).is_empty
    assert topics.unsubscribe("b", [BOOK_15]).requests["public"] == frozenset()
    retired = topics.carried("public", frozenset())
    assert set(retired.retire) == {BOOK_5, BOOK_15}
    assert retired.routed == frozenset()


def test_plans_list_retired_topics_in_a_stable_order() -> None:
    topics = TopicLifecycle()
    topics.subscribe("a", [ETH, BTC])
    topics.drop_client("a")
    assert topics.carried("public", frozenset()).retire == (BTC, ETH)
