"""The publisher's batching: a frame per topic per event-loop turn, order where it matters.

Pure logic on a recording socket (no ZeroMQ); the loop is a real asyncio loop, since a
batch is what one loop turn queued.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

from broker.publisher import JOURNAL, Publisher, _chunks
from schemas.bus import MAX_BATCH, MAX_BATCH_BYTES, StatusEvent
from schemas.upbit import AssetBalance, MyAsset
from tests.broker.test_routing import RecordingSocket, my_order

TICKER = "ticker/KRW-BTC/"
TRADE = "trade/KRW-BTC/"
ETH_TRADE = "trade/KRW-ETH/"


def publisher() -> tuple[Publisher, RecordingSocket]:
    socket = RecordingSocket()
    return Publisher(socket, "e"), socket  # type: ignore[arg-type]


def status(detail: str) -> StatusEvent:
    return StatusEvent(connection="public", state="stale", detail=detail, timestamp=1)


def asset() -> MyAsset:
    balance = AssetBalance(currency="KRW", balance=Decimal("1"), locked=Decimal("0"))
    return MyAsset(asset_uuid="a", assets=[balance], asset_timestamp=1, timestamp=1)


def in_one_turn(pub: Publisher, *steps: tuple[str, str, int]) -> None:
    """Run ``(kind, topic, n)`` steps in one loop turn, then let the flush run."""

    async def main() -> None:
        for kind, topic, n in steps:
            if kind == "data":
                pub.publish(topic, my_order(f"KRW-{n}"), n)
            elif kind == "private":
                pub.publish_in_order(topic, my_order(f"KRW-{n}"), n)
            elif kind == "asset":
                pub.publish_in_order(topic, asset(), n)
            else:
                pub.publish_status(topic, status(str(n)))
        await asyncio.sleep(0)  # the turn ends: the scheduled flush runs

    asyncio.run(main())


def test_a_turn_sends_one_frame_per_topic_in_order_of_first_message() -> None:
    pub, socket = publisher()
    in_one_turn(
        pub,
        ("data", TICKER, 1),
        ("data", TRADE, 2),
        ("data", TICKER, 3),
        ("data", ETH_TRADE, 4),
        ("data", TRADE, 5),
        ("data", TICKER, 6),
    )
    assert socket.frames == [3, 2, 1]
    assert [(t, e.seq, e.recv_ns) for t, e in socket.sent] == [
        (TICKER, 1, 1),
        (TICKER, 2, 3),
        (TICKER, 3, 6),
        (TRADE, 1, 2),
        (TRADE, 2, 5),
        (ETH_TRADE, 1, 4),
    ]
    assert (pub.published, pub.frames) == (6, 3)


def test_a_long_queue_is_split_into_frames_of_at_most_max_batch() -> None:
    pub, socket = publisher()
    count = 2 * MAX_BATCH + 3
    in_one_turn(pub, *(("data", TRADE, n) for n in range(count)))
    assert socket.frames == [MAX_BATCH, MAX_BATCH, 3]
    assert [e.seq for _, e in socket.sent] == list(range(1, count + 1))


def test_a_frame_stops_before_the_envelope_that_would_pass_the_byte_limit() -> None:
    # It bounds a stalled client's queue in bytes: ZeroMQ counts frames, not bytes.
    third = MAX_BATCH_BYTES // 3
    bodies = [bytes([n]) * third for n in range(7)]
    runs = _chunks(bodies)
    assert [len(run) for run in runs] == [3, 3, 1]
    assert [b for run in runs for b in run] == bodies
    assert all(sum(map(len, run)) <= MAX_BATCH_BYTES for run in runs)
    huge = [b"x" * (MAX_BATCH_BYTES + 1), b"y", b"z" * MAX_BATCH_BYTES]
    assert _chunks(huge) == [[huge[0]], [huge[1]], [huge[2]]]  # one too big goes alone
    small = [b"s"] * (MAX_BATCH + 1)
    assert [len(run) for run in _chunks(small)] == [MAX_BATCH, 1]


def test_the_next_turn_starts_new_frames() -> None:
    pub, socket = publisher()
    in_one_turn(pub, ("data", TRADE, 1), ("data", TRADE, 2))
    in_one_turn(pub, ("data", TRADE, 3))
    assert socket.frames == [2, 1]
    assert [e.seq for _, e in socket.sent] == [1, 2, 3]


def test_a_status_event_keeps_its_place_among_every_topic() -> None:
    # Data queued before a status event is sent before it, whatever its topic; data
    # after it follows it, even on a topic that had data queued before.
    pub, socket = publisher()
    in_one_turn(
        pub,
        ("data", TICKER, 1),
        ("data", TRADE, 2),
        ("status", "_status/public/", 3),
        ("data", TICKER, 4),
        ("status", TICKER, 5),
        ("data", TICKER, 6),
    )
    order = [(t, type(e.data).__name__, e.seq) for t, e in socket.sent]
    assert order == [
        (TICKER, "MyOrder", 1),
        (TRADE, "MyOrder", 1),
        ("_status/public/", "StatusEvent", 1),
        (TICKER, "MyOrder", 2),
        (TICKER, "StatusEvent", 3),
        (TICKER, "MyOrder", 4),
    ]


def test_private_streams_keep_their_order_across_topics() -> None:
    # An order's fill, then the balance it changed, then the next fill of another
    # market: a client must see them in that order, not grouped by topic.
    pub, socket = publisher()
    in_one_turn(
        pub,
        ("private", "myOrder/KRW-BTC/", 1),
        ("data", TRADE, 2),
        ("asset", "myAsset/", 3),
        ("private", "myOrder/KRW-ETH/", 4),
        ("private", "myOrder/KRW-BTC/", 5),
        ("asset", "myAsset/", 6),
    )
    assert [(t, e.recv_ns) for t, e in socket.sent] == [
        ("myOrder/KRW-BTC/", 1),
        (TRADE, 2),
        ("myAsset/", 3),
        ("myOrder/KRW-ETH/", 4),
        ("myOrder/KRW-BTC/", 5),
        ("myAsset/", 6),
    ]


def test_a_dropped_frame_counts_every_message_it_carried() -> None:
    socket = RecordingSocket(fail=True)
    pub = Publisher(socket, "e")  # type: ignore[arg-type]
    in_one_turn(pub, ("data", TRADE, 1), ("data", TRADE, 2), ("data", TICKER, 3))
    assert (pub.send_errors, pub.published, pub.frames) == (3, 0, 0)
    assert pub.cached(TRADE) is not None  # the last value is kept for the next subscriber


def test_the_journal_keeps_every_private_message_in_order_and_only_those() -> None:
    pub, _ = publisher()
    pub.activate("myOrder/")
    pub.activate(TRADE)
    pub.publish_in_order("myOrder/KRW-BTC/", my_order("KRW-BTC"), 1)
    pub.publish(TRADE, my_order("KRW-BTC"), 2)  # a public stream: not journaled
    pub.publish_in_order("myOrder/KRW-ETH/", my_order("KRW-ETH"), 3)
    pub.publish_in_order("myOrder/KRW-BTC/", my_order("KRW-BTC"), 4)
    assert [(e.topic, e.seq) for e in pub.journal(["myOrder/"])] == [
        ("myOrder/KRW-BTC/", 1),
        ("myOrder/KRW-ETH/", 1),
        ("myOrder/KRW-BTC/", 2),
    ]
    assert [e.seq for e in pub.journal(["myOrder/KRW-BTC/"])] == [1, 2]
    assert pub.journal(["myAsset/"]) == []
    for i in range(JOURNAL):  # bounded: the oldest go first
        pub.publish_in_order("myOrder/KRW-XRP/", my_order("KRW-XRP"), 10 + i)
    kept = pub.journal(["myOrder/KRW-XRP/"])
    assert len(kept) == JOURNAL
    assert all(e.topic == "myOrder/KRW-XRP/" for e in kept)


def test_a_topic_the_journal_dropped_whole_comes_back_as_its_newest_and_as_cut() -> None:
    # Otherwise a client replaying after a restart would see nothing of KRW-BTC and
    # believe it never had an order there: it gets the newest message and is told the
    # topic's replay is cut (a gap). Topics come in the order they were last published,
    # whatever their times (one REST sync stamps all it finds alike), and whether or not
    # anyone holds them right now.
    pub, _ = publisher()
    pub.activate("myOrder/")
    pub.activate("myAsset/")
    pub.publish_in_order("myAsset/", my_order("KRW-BTC"), 5)
    pub.publish_in_order("myOrder/KRW-BTC/", my_order("KRW-BTC"), 5)
    pub.publish_in_order("myOrder/KRW-ETH/", my_order("KRW-ETH"), 5)
    pub.publish_in_order("myOrder/KRW-BTC/", my_order("KRW-BTC"), 5)
    pub.publish_in_order("myAsset/", my_order("KRW-BTC"), 5)  # the balance after the fill
    assert pub.journal_cut(["myOrder/", "myAsset/"]) == []
    pub.deactivate("myAsset/")
    for i in range(JOURNAL):
        pub.publish_in_order("myOrder/KRW-XRP/", my_order("KRW-XRP"), 10 + i)
    replay = pub.journal(["myOrder/", "myAsset/"])
    assert [(e.topic, e.seq) for e in replay[:4]] == [
        ("myOrder/KRW-ETH/", 1),
        ("myOrder/KRW-BTC/", 2),
        ("myAsset/", 2),
        ("myOrder/KRW-XRP/", 1),
    ]
    assert len(replay) == JOURNAL + 3
    assert pub.journal_cut(["myOrder/", "myAsset/"]) == [
        "myAsset/",
        "myOrder/KRW-BTC/",
        "myOrder/KRW-ETH/",
    ]
    assert pub.journal_cut(["myOrder/KRW-XRP/"]) == []
    pub.publish_in_order("myOrder/KRW-XRP/", my_order("KRW-XRP"), 99)
    assert pub.journal_cut(["myOrder/KRW-XRP/"]) == ["myOrder/KRW-XRP/"]


def test_a_private_message_leaves_at_once_not_at_the_end_of_the_turn() -> None:
    # Its state was saved as published just before: a broker killed before the end of
    # the turn would have saved it but never sent it, and its successor would not
    # send it either.
    pub, socket = publisher()
    pub.activate("myOrder/")

    async def main() -> list[str]:
        pub.publish_in_order("myOrder/KRW-BTC/", my_order("KRW-BTC"), 1)
        return [topic for topic, _ in socket.sent]  # before the turn ends

    assert asyncio.run(main()) == ["myOrder/KRW-BTC/"]
