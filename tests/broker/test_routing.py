"""The data path without sockets: decode once, fan out by topic, sequence, cache, dedupe."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
import zmq

from broker.config import Settings
from broker.exchange import UpbitExchange
from broker.publisher import Publisher
from broker.reconcile import PrivateState
from broker.routing import TOPIC_CACHE_LIMIT, DataRouter
from broker.subscriptions import UpstreamStream
from schemas.bus import Envelope, StreamSpec, decode_batch, split_published
from schemas.upbit import (
    DATA_TYPES,
    AssetBalance,
    MyAsset,
    MyOrder,
    Orderbook,
    Ticker,
    Trade,
    decode_frame,
)
from tests.schemas.test_upbit import CANDLE, TICKER


class RecordingSocket:
    """Stands in for the PUB socket: keeps what would have been sent."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, Envelope]] = []
        self.frames: list[int] = []
        """Envelopes per frame sent."""
        self.fail = fail

    def send(self, frame: bytes, flags: int = 0) -> None:
        if self.fail:
            raise zmq.Again()
        assert not flags & zmq.SNDMORE, "a message is one frame"
        topic, body = split_published(frame)
        batch = decode_batch(body)
        self.frames.append(len(batch))
        for envelope in batch:
            assert envelope.topic == topic.decode()
            self.sent.append((envelope.topic, envelope))


def make(*specs: StreamSpec) -> tuple[DataRouter, Publisher, RecordingSocket]:
    socket = RecordingSocket()
    publisher = Publisher(socket, "epoch1")  # type: ignore[arg-type]
    router = DataRouter(publisher, UpbitExchange(Settings()))
    for spec in specs:
        publisher.activate(spec.topic)
    router.set_streams(specs)
    return router, publisher, socket


def book(code: str, units: int, stream_type: str = "REALTIME") -> bytes:
    return json.dumps(
        {
            "type": "orderbook",
            "code": code,
            "timestamp": 1,
            "total_ask_size": float(units),
            "total_bid_size": float(units) * 2,
            "orderbook_units": [
                {"ask_price": 100 + i, "bid_price": 99 - i, "ask_size": 1.0, "bid_size": 2.0}
                for i in range(units)
            ],
            "stream_type": stream_type,
            "level": 0,
        }
    ).encode()


def trade(code: str, sid: int) -> dict[str, Any]:
    return {
        "type": "trade",
        "code": code,
        "timestamp": 1,
        "trade_date": "2026-11-26",
        "trade_time": "00:00:00",
        "trade_timestamp": 1,
        "trade_price": 100.0,
        "trade_volume": 1.0,
        "ask_bid": "BID",
        "prev_closing_price": 99.0,
        "change": "RISE",
        "change_price": 1.0,
        "sequential_id": sid,
        "stream_type": "REALTIME",
    }


def test_only_subscribed_topics_are_published_with_per_topic_sequences() -> None:
    router, _, socket = make(StreamSpec("trade", "KRW-BTC"))
    for sid in (1, 2, 3):
        router.on_frame(json.dumps(trade("KRW-BTC", sid)).encode(), 10)
        router.on_frame(json.dumps(trade("KRW-ETH", sid)).encode(), 10)
    assert [(t, e.seq) for t, e in socket.sent] == [("trade/KRW-BTC/", n) for n in (1, 2, 3)]
    assert all(e.epoch == "epoch1" and e.source == "websocket" for _, e in socket.sent)


def test_one_upstream_book_feeds_every_depth_with_totals_over_the_units_kept() -> None:
    router, publisher, socket = make(
        StreamSpec("orderbook", "KRW-BTC", 5, 0.0), StreamSpec("orderbook", "KRW-BTC", 30, 0.0)
    )
    router.on_frame(book("KRW-BTC", 30), 10)
    by_topic = {t: e.data for t, e in socket.sent}
    five = by_topic["orderbook/KRW-BTC/5/0/"]
    assert isinstance(five, Orderbook)
    assert len(five.orderbook_units) == 5
    assert five.total_ask_size == 5.0
    assert five.total_bid_size == 10.0
    full = by_topic["orderbook/KRW-BTC/30/0/"]
    assert isinstance(full, Orderbook)
    assert len(full.orderbook_units) == 30
    assert publisher.cached("orderbook/KRW-BTC/5/0/") is not None


def test_a_deeper_topic_waits_for_the_new_snapshot_before_getting_books() -> None:
    shallow = StreamSpec("orderbook", "KRW-BTC", 5, 0.0)
    deep = StreamSpec("orderbook", "KRW-BTC", 15, 0.0)
    router, publisher, socket = make(shallow)
    publisher.activate(deep.topic)
    router.set_streams([shallow, deep])
    router.on_frame(book("KRW-BTC", 5), 10)  # still the old 5-level stream
    assert [t for t, _ in socket.sent] == ["orderbook/KRW-BTC/5/0/"]
    router.on_frame(book("KRW-BTC", 15, "SNAPSHOT"), 11)
    assert [t for t, _ in socket.sent][1:] == ["orderbook/KRW-BTC/15/0/", "orderbook/KRW-BTC/5/0/"]


def test_a_trade_is_published_once_whichever_source_brings_it() -> None:
    router, _, socket = make(StreamSpec("trade", "KRW-BTC"))
    router.on_frame(json.dumps(trade("KRW-BTC", 7)).encode(), 10)
    router.route(msgspec.convert(trade("KRW-BTC", 7), Trade), 11, "rest")
    router.route(msgspec.convert(trade("KRW-BTC", 8), Trade), 12, "rest")
    router.on_frame(json.dumps([trade("KRW-BTC", 8), trade("KRW-BTC", 9)]).encode(), 13)
    assert [(e.data.sequential_id, e.source) for _, e in socket.sent] == [  # type: ignore[union-attr]
        (7, "websocket"),
        (8, "rest"),
        (9, "websocket"),
    ]
    assert router.duplicates == 2


def test_bad_frames_are_counted_not_raised_and_errors_go_back_to_the_link() -> None:
    router, _, socket = make(StreamSpec("trade", "KRW-BTC"))
    assert router.on_frame(b"\xff{not json", 1) is None
    assert router.on_frame(b'{"type":"trade","code":"KRW-BTC"}', 1) is None
    assert router.decode_errors == 2
    assert "missing" in router.last_decode_error.lower() or "$" in router.last_decode_error
    assert router.on_frame(b'{"status":"UP"}', 1) is None
    extra = router.on_frame(b'{"error":{"name":"INVALID_PARAM","message":"bad"}}', 1)
    assert extra is not None
    assert extra == decode_frame(b'{"error":{"name":"INVALID_PARAM","message":"bad"}}')
    assert socket.sent == []


def test_a_full_pub_queue_drops_and_counts_instead_of_blocking() -> None:
    socket = RecordingSocket(fail=True)
    publisher = Publisher(socket, "e")  # type: ignore[arg-type]
    router = DataRouter(publisher, UpbitExchange(Settings()))
    publisher.activate("trade/KRW-BTC/")
    router.on_frame(json.dumps(trade("KRW-BTC", 1)).encode(), 1)
    assert publisher.send_errors == 1
    assert publisher.published == 0


def test_deactivating_a_topic_forgets_its_last_value_but_not_its_sequence() -> None:
    router, publisher, socket = make(StreamSpec("trade", "KRW-BTC"))
    router.on_frame(json.dumps(trade("KRW-BTC", 1)).encode(), 1)
    publisher.deactivate("trade/KRW-BTC/")
    assert publisher.cached("trade/KRW-BTC/") is None
    publisher.activate("trade/KRW-BTC/")
    router.on_frame(json.dumps(trade("KRW-BTC", 2)).encode(), 2)
    assert [e.seq for _, e in socket.sent] == [1, 2]


def test_candles_are_published_on_their_type_and_market() -> None:
    router, _, socket = make(StreamSpec("candle.1m", "KRW-BTC"))
    router.on_frame(json.dumps(CANDLE).encode(), 5)
    router.on_frame(json.dumps({**CANDLE, "code": "KRW-ETH"}).encode(), 6)
    router.on_frame(json.dumps({**CANDLE, "type": "candle.5m"}).encode(), 7)
    assert [(t, e.seq, e.recv_ns) for t, e in socket.sent] == [("candle.1m/KRW-BTC/", 1, 5)]


def test_every_upbit_data_type_has_a_route() -> None:
    router, _, _ = make()
    assert set(DATA_TYPES.values()) <= set(router._routes)


def my_order(code: str) -> MyOrder:
    return MyOrder(
        code=code,
        uuid=f"u-{code}",
        ask_bid="BID",
        order_type="limit",
        state="wait",
        executed_volume=Decimal("0"),
        remaining_volume=Decimal("1"),
        timestamp=1,
    )


def recorder(seen: list[MyOrder | MyAsset], *, news: bool = True) -> Any:
    """An observer that records what it is shown and answers ``news``."""

    def observe(message: MyOrder | MyAsset, source: str) -> bool:
        seen.append(message)
        return news

    return observe


def test_private_messages_reach_the_observer_and_their_topics() -> None:
    seen: list[MyOrder | MyAsset] = []
    socket = RecordingSocket()
    publisher = Publisher(socket, "e")  # type: ignore[arg-type]
    router = DataRouter(publisher, UpbitExchange(Settings()), on_private=recorder(seen))
    asset = MyAsset(
        asset_uuid="a",
        assets=[AssetBalance(currency="KRW", balance=Decimal("1"), locked=Decimal("0"))],
        asset_timestamp=1,
        timestamp=1,
    )
    router.route(my_order("KRW-BTC"), 1, "websocket")
    router.route(asset, 1, "websocket")
    assert socket.sent == []  # nobody subscribed, yet the observer saw both
    assert seen == [my_order("KRW-BTC"), asset]

    publisher.activate("myOrder/KRW-ETH/")  # one market only
    router.route(my_order("KRW-BTC"), 2, "websocket")
    router.route(my_order("KRW-ETH"), 2, "websocket")
    assert [t for t, _ in socket.sent] == ["myOrder/KRW-ETH/"]

    publisher.activate("myOrder/")  # every market, on per-market topics
    publisher.activate("myAsset/")
    router.route(my_order("KRW-BTC"), 3, "rest")
    router.route(asset, 3, "rest")
    assert [(t, e.source) for t, e in socket.sent[1:]] == [
        ("myOrder/KRW-BTC/", "rest"),
        ("myAsset/", "rest"),
    ]


def test_a_rest_ticker_equal_to_the_last_one_is_not_published_again() -> None:
    router, _, socket = make(StreamSpec("ticker", "KRW-BTC"))
    frame = json.dumps(TICKER).encode()
    router.on_frame(frame, 1)
    same = msgspec.json.decode(frame, type=Ticker)
    router.route(same, 2, "rest")  # REST saw nothing new: no message
    router.route(msgspec.structs.replace(same, trade_price=2.0), 3, "rest")
    router.on_frame(frame, 4)  # the stream is published even when unchanged
    assert [(e.seq, e.source) for _, e in socket.sent] == [
        (1, "websocket"),
        (2, "rest"),
        (3, "websocket"),
    ]


def test_a_carried_stream_nobody_wants_keeps_its_latest_value_for_the_first_subscriber() -> None:
    router, publisher, socket = make()
    router.set_carried({UpstreamStream("trade", "KRW-ETH"), UpstreamStream("ticker", "KRW-ETH")})
    for sid in (1, 2):
        router.on_frame(json.dumps(trade("KRW-ETH", sid)).encode(), sid * 10)
    router.on_frame(json.dumps(trade("KRW-XRP", 1)).encode(), 5)  # not carried: not kept
    assert socket.sent == []
    assert router.unclaimed == 1

    publisher.activate("trade/KRW-ETH/")
    router.claim("trade/KRW-ETH/")
    cached = publisher.cached("trade/KRW-ETH/")
    assert cached is not None
    assert isinstance(cached.data, Trade)
    assert (cached.data.sequential_id, cached.recv_ns, cached.seq) == (2, 20, 1)
    assert router.unclaimed == 0
    # The claimed trade counts as published: Upbit's own copy of it is a duplicate.
    router.on_frame(json.dumps(trade("KRW-ETH", 2)).encode(), 30)
    router.on_frame(json.dumps(trade("KRW-ETH", 3)).encode(), 40)
    assert [e.data.sequential_id for _, e in socket.sent] == [2, 3]  # type: ignore[union-attr]
    router.claim("trade/KRW-BTC/")  # nothing kept: nothing published
    assert len(socket.sent) == 2


def test_a_stream_no_longer_requested_keeps_nothing_not_even_frames_still_in_flight() -> None:
    router, publisher, socket = make()
    router.set_carried({UpstreamStream("trade", "KRW-ETH")})
    router.on_frame(json.dumps(trade("KRW-ETH", 1)).encode(), 1)
    assert router.unclaimed == 1
    router.set_carried(set())  # a narrower request went out
    assert router.unclaimed == 0
    # Upbit had sent this before the new request took effect: kept, it would be handed
    # out as a snapshot much later.
    router.on_frame(json.dumps(trade("KRW-ETH", 2)).encode(), 2)
    assert router.unclaimed == 0
    publisher.activate("trade/KRW-ETH/")
    router.claim("trade/KRW-ETH/")
    assert socket.sent == []


def test_the_topic_cache_stays_bounded_whatever_codes_arrive() -> None:
    """Codes are whatever upstream frames say: the cache of topic strings must not grow
    with every distinct one, and an evicted topic still routes right."""
    router, _, socket = make(StreamSpec("ticker", "KRW-BTC"), StreamSpec("trade", "KRW-BTC"))
    router.on_frame(json.dumps({**TICKER, "code": "KRW-BTC"}).encode(), 10)
    router.on_frame(json.dumps(trade("KRW-BTC", 1)).encode(), 10)
    for n in range(3 * TOPIC_CACHE_LIMIT):
        code = f"KRW-X{n}"
        router.on_frame(json.dumps({**TICKER, "code": code}).encode(), 11)
        router.on_frame(json.dumps(trade(code, n)).encode(), 11)
        assert router.cached_topics <= 2 * TOPIC_CACHE_LIMIT
    assert router.cached_topics >= TOPIC_CACHE_LIMIT  # still a cache, not emptied
    router.on_frame(json.dumps({**TICKER, "code": "KRW-BTC", "trade_price": 1.0}).encode(), 12)
    router.on_frame(json.dumps(trade("KRW-BTC", 2)).encode(), 12)
    assert [(t, e.seq, e.recv_ns) for t, e in socket.sent] == [
        ("ticker/KRW-BTC/", 1, 10),
        ("trade/KRW-BTC/", 1, 10),
        ("ticker/KRW-BTC/", 2, 12),
        ("trade/KRW-BTC/", 2, 12),
    ]


def test_a_private_event_the_observer_has_seen_published_is_dropped_and_counted() -> None:
    seen: list[MyOrder | MyAsset] = []
    socket = RecordingSocket()
    publisher = Publisher(socket, "e")  # type: ignore[arg-type]
    router = DataRouter(publisher, UpbitExchange(Settings()), on_private=recorder(seen, news=False))
    publisher.activate("myOrder/")
    router.route(my_order("KRW-BTC"), 1, "websocket")
    assert seen == [my_order("KRW-BTC")]
    assert socket.sent == []
    assert router.private_duplicates == 1
    assert router.duplicates == 0  # the trade counter is another story


def test_a_private_amount_that_is_not_a_number_is_a_bad_frame_not_a_dead_link() -> None:
    # msgspec decodes "sNaN" to Decimal('sNaN'); the private state comparing it raised
    # InvalidOperation out of on_frame, which ended the link task and so the broker.
    state = PrivateState()

    def observe(message: MyOrder | MyAsset, source: str) -> bool:
        if not state.is_news(message):
            return False
        if isinstance(message, MyAsset):
            state.apply_asset(message)
        return True

    socket = RecordingSocket()
    publisher = Publisher(socket, "e")  # type: ignore[arg-type]
    router = DataRouter(publisher, UpbitExchange(Settings()), on_private=observe)
    publisher.activate("myAsset/")
    frame = (
        b'{"type":"myAsset","asset_uuid":"x","assets":[{"currency":"KRW",'
        b'"balance":"sNaN","locked":"0"}],"asset_timestamp":1,"timestamp":1}'
    )
    assert router.on_frame(frame, 1) is None
    assert router.decode_errors == 1
    assert "KRW" not in state.balances
    assert socket.sent == []
    good = frame.replace(b"sNaN", b"5")
    assert router.on_frame(good, 1) is None
    assert len(socket.sent) == 1
