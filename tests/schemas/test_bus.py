"""schemas.bus: round trips of every message and payload, topic layout, malformed input."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas.bus import (
    ALL_STREAM_TYPES,
    HEARTBEAT_TOPIC,
    PRIVATE_STREAM_TYPES,
    PROTOCOL_VERSION,
    PUBLIC_STREAM_TYPES,
    STATUS_TOPIC_PREFIX,
    BrokerHeartbeat,
    BrokerMessage,
    Bye,
    ClientMessage,
    ClientMetrics,
    ConnectionHealth,
    Envelope,
    ErrorReply,
    GetSnapshot,
    Health,
    HealthReply,
    HealthRequest,
    Heartbeat,
    Hello,
    Metrics,
    MetricsReply,
    MetricsRequest,
    Payload,
    SnapshotReply,
    StatusEvent,
    StreamSpec,
    Subscribe,
    SubscribeOk,
    Unsubscribe,
    UnsubscribeOk,
    Welcome,
    batch_header,
    decode_batch,
    decode_broker_message,
    decode_client_message,
    decode_envelope,
    encode,
    format_level,
    pack_published,
    split_published,
    status_topic,
    topic_for,
)
from schemas.errors import DecodeError
from schemas.upbit import (
    CANDLE_TYPES,
    DATA_TYPES,
    AssetBalance,
    Candle,
    MyAsset,
    MyOrder,
    Orderbook,
    OrderbookUnit,
    Ticker,
    Trade,
    decode_frame,
)

SHARED = Path(
    os.environ.get("UPBIT_SHARED_DIR")
    or Path(__file__).resolve().parents[2].parent / "shared" / "upbit"
)
SAMPLES = SHARED / "samples"

BIG = Decimal("1386929.37231066771348207123")
"""More digits than a float holds: must survive every encode/decode untouched."""

# ------------------------------------------------------------------------------- payloads

TICKER = Ticker(
    code="KRW-BTC",
    opening_price=31883000.0,
    high_price=32310000.0,
    low_price=31855000.0,
    trade_price=32287000.0,
    prev_closing_price=31883000.0,
    change="RISE",
    change_price=404000.0,
    signed_change_price=404000.0,
    change_rate=0.0126713295,
    signed_change_rate=0.0126713295,
    trade_volume=0.03103806,
    acc_trade_volume=2429.58834336,
    acc_trade_volume_24h=7158.8028356,
    acc_trade_price=78039261076.5124,
    acc_trade_price_24h=228827082483.70728,
    trade_date="20230221",
    trade_time="074102",
    trade_timestamp=1676965262139,
    ask_bid="ASK",
    acc_ask_volume=1146.25573608,
    acc_bid_volume=1283.33260728,
    market_state="ACTIVE",
    is_trading_suspended=False,
    timestamp=1676965262177,
    stream_type="REALTIME",
)
TRADE = Trade(
    code="KRW-BTC",
    trade_price=109847000.0,
    trade_volume=0.00509799,
    ask_bid="ASK",
    prev_closing_price=109165000.0,
    change="RISE",
    change_price=682000.0,
    trade_date="2026-08-26",
    trade_time="07:15:54",
    trade_timestamp=1787728554797,
    timestamp=1787728554853,
    sequential_id=17877285547970000,  # above 2**53: must stay an exact int
    best_ask_price=109867000.0,
    best_ask_size=0.0099545,
    stream_type="SNAPSHOT",
)
ORDERBOOK = Orderbook(
    code="KRW-BTC",
    total_ask_size=4.79158413,
    total_bid_size=2.65609625,
    orderbook_units=[
        OrderbookUnit(ask_price=137002000, bid_price=137001000, ask_size=0.106, bid_size=0.036),
        OrderbookUnit(ask_price=137023000, bid_price=137000000, ask_size=0.061, bid_size=0.335),
    ],
    timestamp=1746601573804,
    level=10000.0,
    stream_type="SNAPSHOT",
)
CANDLES: list[Payload] = [
    DATA_TYPES[t](
        code="KRW-BTC",
        candle_date_time_utc="2026-08-26T08:08:00",
        candle_date_time_kst="2026-08-26T17:08:00",
        opening_price=109715000.0,
        high_price=109756000.0,
        low_price=109714000.0,
        trade_price=109756000.0,
        candle_acc_trade_volume=0.71326612,
        candle_acc_trade_price=78269528.64757,
        timestamp=1787731717049,
    )
    for t in CANDLE_TYPES
]
MY_ORDER = MyOrder(
    code="KRW-BTC",
    uuid="ac2dc2a3-fce9-40a2-a4f6-5987c25c438f",
    ask_bid="BID",
    order_type="limit",
    state="trade",
    trade_uuid="68315169-fba4-4175-ade3-aff14a616657",
    price=BIG,
    avg_price=Decimal("0.00145372"),
    volume=Decimal("30925891.29839369"),
    remaining_volume=Decimal("0"),
    executed_volume=Decimal("30925891.29839369"),
    trades_count=1,
    reserved_fee=Decimal("44.23943970238218"),
    remaining_fee=Decimal("0.0000000000000000000001"),
    paid_fee=Decimal("22.467660028283017"),
    locked=BIG,
    executed_funds=Decimal("44935.32005656603"),
    trade_fee=Decimal("22.467660028283017"),
    is_maker=True,
    identifier="test-1",
    smp_type="cancel_maker",
    prevented_volume=Decimal("1.174291929"),
    prevented_locked=Decimal("0.001706246173"),
    trade_timestamp=1710751590421,
    order_timestamp=1710751590000,
    timestamp=1710751597500,
    stream_type="REALTIME",
)
MY_ASSET = MyAsset(
    asset_uuid="e635f223-1609-4969-8fb6-4376937baad6",
    assets=[
        AssetBalance(currency="KRW", balance=BIG, locked=Decimal("10329.670127489597")),
        AssetBalance(currency="BTC", balance=Decimal("0.00000001"), locked=Decimal("0")),
    ],
    asset_timestamp=1710146517259,
    timestamp=1710146517267,
    stream_type="REALTIME",
)
STATUS = StatusEvent(
    connection="public",
    state="gap",
    detail="seq jumped",
    topics=["ticker/KRW-BTC/"],
    timestamp=1,
)
BEAT = BrokerHeartbeat(timestamp=1787731717049)

PAYLOADS: list[Payload] = [TICKER, TRADE, ORDERBOOK, *CANDLES, MY_ORDER, MY_ASSET, STATUS, BEAT]


def payload_id(payload: Payload) -> str:
    return type(payload).__name__


def payload_topic(payload: Payload) -> str:
    """The topic the broker would publish ``payload`` on."""
    if isinstance(payload, StatusEvent):
        return status_topic(payload.connection)
    if isinstance(payload, BrokerHeartbeat):
        return HEARTBEAT_TOPIC
    if isinstance(payload, Orderbook):
        return topic_for("orderbook", payload.code, len(payload.orderbook_units), payload.level)
    if isinstance(payload, MyAsset):
        return topic_for("myAsset")
    return topic_for(payload.type, payload.code)


def envelope(payload: Payload, seq: int = 1) -> Envelope:
    return Envelope(
        topic=payload_topic(payload),
        seq=seq,
        epoch="0f9c2b1e",
        recv_ns=1_787_731_717_049_123_456,
        source="websocket",
        data=payload,
    )


def test_every_data_type_and_candle_subclass_has_a_payload() -> None:
    built = {type(p) for p in PAYLOADS}
    assert set(DATA_TYPES.values()) <= built
    assert {StatusEvent, BrokerHeartbeat} <= built
    assert len(CANDLES) == len(CANDLE_TYPES) == 9
    assert all(isinstance(c, Candle) for c in CANDLES)


# ------------------------------------------------------------------------- envelopes


@pytest.mark.parametrize("payload", PAYLOADS, ids=payload_id)
def test_envelope_round_trips_every_payload_type(payload: Payload) -> None:
    env = envelope(payload, seq=42)
    decoded = decode_envelope(encode(env))
    assert decoded == env
    assert type(decoded.data) is type(payload)
    assert decoded.source == "websocket"


def test_envelope_keeps_rest_source() -> None:
    env = msgspec.structs.replace(envelope(TICKER), source="rest")
    assert decode_envelope(encode(env)).source == "rest"


def test_decimal_fields_keep_full_precision_through_an_envelope() -> None:
    order = decode_envelope(encode(envelope(MY_ORDER))).data
    assert isinstance(order, MyOrder)
    assert order.price == BIG
    assert str(order.price) == "1386929.37231066771348207123"
    assert order.remaining_fee == Decimal("1E-22")
    asset = decode_envelope(encode(envelope(MY_ASSET))).data
    assert isinstance(asset, MyAsset)
    assert str(asset.assets[0].balance) == "1386929.37231066771348207123"
    assert str(asset.assets[1].balance) == "1E-8"


def test_large_ids_stay_exact_ints() -> None:
    trade = decode_envelope(encode(envelope(TRADE))).data
    assert isinstance(trade, Trade)
    assert trade.sequential_id == 17877285547970000
    assert isinstance(trade.sequential_id, int)


SAMPLE_FILES = [
    "ws-ticker-default.json",
    "ws-trade-default.json",
    "ws-trade-simple.json",
    "ws-orderbook-default.json",
    "ws-orderbook-simple-list.json",
    "ws-candle-1m-default.json",
    "ws-myorder-default.json",
    "ws-myasset-default.json",
]


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_real_samples_round_trip_inside_envelopes(name: str) -> None:
    path = SAMPLES / name
    if not path.exists():
        pytest.skip(f"Upbit corpus not found at {SAMPLES} (set UPBIT_SHARED_DIR)")
    messages = decode_frame(path.read_bytes())
    assert messages
    for seq, message in enumerate(messages, start=1):
        assert isinstance(message, tuple(DATA_TYPES.values()))
        payload: Payload = message  # type: ignore[assignment]
        env = envelope(payload, seq)
        assert decode_envelope(encode(env)) == env


def test_sample_myorder_keeps_its_decimal_text() -> None:
    path = SAMPLES / "ws-myorder-default.json"
    if not path.exists():
        pytest.skip(f"Upbit corpus not found at {SAMPLES}")
    (order,) = decode_frame(path.read_bytes())
    assert isinstance(order, MyOrder)
    decoded = decode_envelope(encode(envelope(order))).data
    assert isinstance(decoded, MyOrder)
    assert str(decoded.reserved_fee) == "44.23943970238218"
    assert str(decoded.prevented_locked) == "0.001706246173"


# ------------------------------------------------------------------- control messages

SPECS = [
    StreamSpec("ticker", "KRW-BTC"),
    StreamSpec("orderbook", "KRW-ETH", 15, 0.1),
    StreamSpec("myOrder"),
    StreamSpec("myAsset"),
]

CLIENT_MESSAGES: list[ClientMessage] = [
    Hello(client_id="c-1", name="strategy", pid=4242, protocol=PROTOCOL_VERSION),
    Hello(client_id="c-2"),
    Subscribe(req=1, streams=SPECS, snapshot=False),
    Subscribe(req=2, streams=[]),
    Unsubscribe(req=3, streams=SPECS[:2]),
    GetSnapshot(req=4, streams=SPECS),
    Heartbeat(received=10_000, gaps=2, lag_ms=1.25),
    Heartbeat(),
    HealthRequest(req=5),
    MetricsRequest(req=6),
    Bye(),
]

CONNECTION = ConnectionHealth(
    state="up", source="websocket", since=1.5, reconnects=2, last_message_timestamp=3.25
)
HEALTH = Health(
    status="degraded",
    uptime_seconds=12.5,
    last_message_timestamp=None,
    connection_quality="good",
    active_subscriptions=3,
    public=CONNECTION,
    private=None,
    epoch="0f9c2b1e",
)
METRICS = Metrics(
    active_connections=2,
    total_subscriptions=5,
    messages_per_second=120.5,
    average_latency_ms=0.8,
    error_rate_percent=0.0,
    memory_usage_mb=42.0,
    messages_total=123_456_789,
    clients=[
        ClientMetrics(
            client_id="c-1",
            name="strategy",
            streams=3,
            received=99,
            gaps=0,
            lag_ms=0.5,
            last_seen_seconds=0.1,
        )
    ],
)

BROKER_MESSAGES: list[BrokerMessage] = [
    Welcome(
        epoch="0f9c2b1e",
        protocol=PROTOCOL_VERSION,
        heartbeat_interval=1.0,
        liveness=3,
        public_available=True,
        private_available=False,
    ),
    SubscribeOk(
        req=1,
        topics=[payload_topic(p) for p in (TICKER, ORDERBOOK, MY_ORDER)],
        snapshot=[envelope(TICKER), envelope(ORDERBOOK, 7), envelope(MY_ORDER, 3)],
    ),
    SubscribeOk(req=2, topics=[], snapshot=[]),
    UnsubscribeOk(req=3),
    SnapshotReply(req=4, items=[envelope(p) for p in PAYLOADS], missing=["trade/KRW-XRP/"]),
    SnapshotReply(req=5, items=[]),
    HealthReply(req=6, health=HEALTH),
    HealthReply(
        req=7, health=msgspec.structs.replace(HEALTH, private=CONNECTION, status="healthy")
    ),
    MetricsReply(req=8, metrics=METRICS),
    ErrorReply(req=9, code="invalid_code", message="KRW-NOPE is not listed"),
    ErrorReply(req=None, code="bad_message", message="unreadable"),
]


def message_id(message: Any) -> str:
    return type(message).__name__


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=message_id)
def test_client_messages_round_trip(message: ClientMessage) -> None:
    decoded = decode_client_message(encode(message))
    assert decoded == message
    assert type(decoded) is type(message)


@pytest.mark.parametrize("message", BROKER_MESSAGES, ids=message_id)
def test_broker_messages_round_trip(message: BrokerMessage) -> None:
    decoded = decode_broker_message(encode(message))
    assert decoded == message
    assert type(decoded) is type(message)


def test_every_message_class_is_covered() -> None:
    client = {type(m) for m in CLIENT_MESSAGES}
    broker = {type(m) for m in BROKER_MESSAGES}
    assert client == {
        Hello,
        Subscribe,
        Unsubscribe,
        GetSnapshot,
        Heartbeat,
        HealthRequest,
        MetricsRequest,
        Bye,
    }
    assert broker == {
        Welcome,
        SubscribeOk,
        UnsubscribeOk,
        SnapshotReply,
        HealthReply,
        MetricsReply,
        ErrorReply,
    }


def test_subscribe_ok_snapshot_envelopes_decode_to_typed_payloads() -> None:
    message = BROKER_MESSAGES[1]
    decoded = decode_broker_message(encode(message))
    assert isinstance(decoded, SubscribeOk)
    assert [type(e.data) for e in decoded.snapshot] == [Ticker, Orderbook, MyOrder]
    order = decoded.snapshot[2].data
    assert isinstance(order, MyOrder)
    assert str(order.price) == "1386929.37231066771348207123"


def test_defaults_are_filled_in_when_decoding() -> None:
    hello = decode_client_message(msgspec.msgpack.encode({"op": "hello", "client_id": "x"}))
    assert hello == Hello(client_id="x", name="", pid=0, protocol=PROTOCOL_VERSION)
    sub = decode_client_message(
        msgspec.msgpack.encode({"op": "subscribe", "req": 1, "streams": [{"type": "myAsset"}]})
    )
    assert sub == Subscribe(req=1, streams=[StreamSpec("myAsset")], snapshot=True)


# ----------------------------------------------------------------------------- topics

TOPIC_CASES: list[tuple[StreamSpec, str]] = [
    (StreamSpec("ticker", "KRW-BTC"), "ticker/KRW-BTC/"),
    (StreamSpec("trade", "KRW-BTC"), "trade/KRW-BTC/"),
    (StreamSpec("orderbook", "KRW-BTC"), "orderbook/KRW-BTC/30/0/"),
    (StreamSpec("orderbook", "KRW-BTC", 5), "orderbook/KRW-BTC/5/0/"),
    (StreamSpec("orderbook", "KRW-BTC", 15, 10000), "orderbook/KRW-BTC/15/10000/"),
    (StreamSpec("orderbook", "KRW-BTC", 30, 10000.0), "orderbook/KRW-BTC/30/10000/"),
    (StreamSpec("orderbook", "BTC-ETH", 1, 0.1), "orderbook/BTC-ETH/1/0.1/"),
    (StreamSpec("myOrder", "KRW-BTC"), "myOrder/KRW-BTC/"),
    (StreamSpec("myOrder"), "myOrder/"),
    (StreamSpec("myAsset"), "myAsset/"),
    (StreamSpec("myAsset", "KRW-BTC"), "myAsset/"),
    *((StreamSpec(t, "KRW-BTC"), f"{t}/KRW-BTC/") for t in CANDLE_TYPES),
]


@pytest.mark.parametrize(("spec", "topic"), TOPIC_CASES, ids=str)
def test_topic_layout(spec: StreamSpec, topic: str) -> None:
    assert spec.topic == topic
    assert topic_for(spec.type, spec.code, spec.depth, spec.level) == topic
    assert topic.endswith("/")
    assert topic.isascii()


def test_candle_topics_spell_the_unit() -> None:
    assert topic_for("candle.1m", "KRW-BTC") == "candle.1m/KRW-BTC/"
    assert topic_for("candle.240m", "KRW-BTC") == "candle.240m/KRW-BTC/"


def test_status_and_heartbeat_topics() -> None:
    assert status_topic("public") == "_status/public/"
    assert status_topic("private") == "_status/private/"
    assert HEARTBEAT_TOPIC == "_heartbeat/"
    assert status_topic("public").startswith(STATUS_TOPIC_PREFIX)
    assert status_topic("private").startswith(STATUS_TOPIC_PREFIX)


@pytest.mark.parametrize("type_", sorted(ALL_STREAM_TYPES - {"myAsset", "myOrder"}))
def test_market_types_need_a_code(type_: str) -> None:
    with pytest.raises(ValueError, match="needs a market code"):
        topic_for(type_)


def test_every_topic_ends_with_a_slash() -> None:
    topics = [
        topic_for(t, "KRW-BTC", depth, level)
        for t in ALL_STREAM_TYPES
        for depth in (None, 1, 5, 15, 30)
        for level in (None, 0, 1, 0.1, 10000.0)
    ]
    topics += [payload_topic(p) for p in PAYLOADS]
    topics += [topic_for("myOrder"), status_topic("public"), status_topic("private")]
    assert all(t.endswith("/") for t in topics), [t for t in topics if not t.endswith("/")]


def zmq_matches(sub_prefix: str, topic: str) -> bool:
    """ZeroMQ SUB filtering: a message passes when its topic frame starts with the prefix."""
    return topic.encode("ascii").startswith(sub_prefix.encode("ascii"))


@pytest.mark.parametrize("type_", sorted(ALL_STREAM_TYPES - {"myAsset"}))
def test_a_code_never_prefix_matches_a_longer_code(type_: str) -> None:
    for depth, level in [(None, None), (15, 0.1), (30, 10000)]:
        eth = topic_for(type_, "KRW-ETH", depth, level)
        ethw = topic_for(type_, "KRW-ETHW", depth, level)
        assert zmq_matches(eth, eth)
        assert not zmq_matches(eth, ethw), (eth, ethw)
        assert not zmq_matches(ethw, eth)


def test_orderbook_depths_and_levels_never_prefix_match_each_other() -> None:
    topics = {
        topic_for("orderbook", "KRW-BTC", depth, level)
        for depth in (1, 5, 15, 30)
        for level in (0, 1, 10, 100, 0.1, 1000.5)
    }
    assert len(topics) == 24
    for a in topics:
        for b in topics - {a}:
            assert not zmq_matches(a, b), (a, b)


def test_useful_prefixes_match_their_families() -> None:
    assert zmq_matches("ticker/", topic_for("ticker", "KRW-BTC"))
    assert not zmq_matches("ticker/", topic_for("trade", "KRW-BTC"))
    assert zmq_matches("myOrder/", topic_for("myOrder", "KRW-BTC"))
    assert zmq_matches(topic_for("myOrder"), topic_for("myOrder", "KRW-ETHW"))
    assert not zmq_matches("myOrder/", topic_for("myAsset"))
    assert zmq_matches(STATUS_TOPIC_PREFIX, status_topic("private"))
    assert not zmq_matches(STATUS_TOPIC_PREFIX, HEARTBEAT_TOPIC)
    assert not zmq_matches("candle.1m/", topic_for("candle.10m", "KRW-BTC"))


@pytest.mark.parametrize(
    ("level", "text"),
    [
        (None, "0"),
        (0, "0"),
        (0.0, "0"),
        (10000, "10000"),
        (10000.0, "10000"),
        (0.1, "0.1"),
        (1, "1"),
        (1.5, "1.5"),
    ],
)
def test_format_level_canonical_forms(level: float | None, text: str) -> None:
    assert format_level(level) == text


def test_int_and_float_levels_share_a_topic() -> None:
    assert topic_for("orderbook", "KRW-BTC", 30, 10000) == topic_for(
        "orderbook", "KRW-BTC", 30, 10000.0
    )
    assert topic_for("orderbook", "KRW-BTC", None, None) == topic_for("orderbook", "KRW-BTC", 30, 0)


# ------------------------------------------------------------------------- StreamSpec


def test_stream_spec_is_private() -> None:
    assert sorted(PRIVATE_STREAM_TYPES) == ["myAsset", "myOrder"]
    assert PUBLIC_STREAM_TYPES.isdisjoint(PRIVATE_STREAM_TYPES)
    for t in PRIVATE_STREAM_TYPES:
        assert StreamSpec(t).is_private
    for t in PUBLIC_STREAM_TYPES:
        assert not StreamSpec(t, "KRW-BTC").is_private


def test_stream_spec_is_frozen_and_hashable() -> None:
    a = StreamSpec("orderbook", "KRW-BTC", 15, 0.1)
    b = StreamSpec("orderbook", "KRW-BTC", 15, 0.1)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, StreamSpec("orderbook", "KRW-BTC", 30, 0.1)}) == 2
    assert {a: "x"}[b] == "x"
    with pytest.raises(AttributeError):
        a.code = "KRW-ETH"  # type: ignore[misc]


def test_stream_spec_omits_defaults_on_the_wire() -> None:
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(StreamSpec("myAsset"))) == {
        "type": "myAsset"
    }


# -------------------------------------------------------------------- malformed input

DECODERS = [decode_client_message, decode_broker_message, decode_envelope]


@pytest.mark.parametrize("decode", DECODERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\xc1garbage\xff", b"not msgpack at all"],
    ids=["empty", "reserved-byte", "garbage", "text"],
)
def test_garbage_raises_decode_error(decode: Any, data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("invalid ")


@pytest.mark.parametrize(
    ("decode", "data", "what"),
    [
        (decode_client_message, encode(CLIENT_MESSAGES[0]), "client message"),
        (decode_broker_message, encode(BROKER_MESSAGES[1]), "broker message"),
        (decode_envelope, encode(envelope(MY_ORDER)), "envelope"),
    ],
    ids=["client", "broker", "envelope"],
)
def test_truncated_msgpack_raises_decode_error(decode: Any, data: bytes, what: str) -> None:
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(DecodeError, match=f"invalid {what}: .*truncated") as info:
            decode(data[:cut])
        assert info.value.path is None
        assert info.value.__cause__ is None  # raised "from None": msgspec's error stays hidden


def test_unknown_op_names_the_op_field() -> None:
    with pytest.raises(DecodeError, match="'nope'") as info:
        decode_client_message(msgspec.msgpack.encode({"op": "nope", "req": 1}))
    assert info.value.path == "$.op"
    assert "(at $.op)" in str(info.value)


def test_missing_op_is_a_decode_error() -> None:
    with pytest.raises(DecodeError) as info:
        decode_client_message(msgspec.msgpack.encode({"req": 1}))
    assert info.value.path is not None
    assert "op" in str(info.value)


def test_client_message_is_not_a_broker_message() -> None:
    with pytest.raises(DecodeError) as info:
        decode_broker_message(encode(Subscribe(req=1, streams=[])))
    assert info.value.path == "$.op"
    with pytest.raises(DecodeError):
        decode_client_message(encode(UnsubscribeOk(req=1)))


@pytest.mark.parametrize(
    ("raw", "path", "words"),
    [
        ({"op": "subscribe", "req": "x", "streams": []}, "$.req", "Expected `int`, got `str`"),
        ({"op": "subscribe", "req": 1}, "$.streams", "missing required field"),
        ({"op": "subscribe", "req": 1, "streams": [{"type": 1}]}, "$.streams[0].type", "`str`"),
        (
            {"op": "get_snapshot", "req": 1, "streams": [{"type": "orderbook", "depth": "30"}]},
            "$.streams[0].depth",
            "Expected `int | null`, got `str`",
        ),
        ({"op": "hello", "client_id": None}, "$.client_id", "`str`"),
        ({"op": "heartbeat", "lag_ms": "slow"}, "$.lag_ms", "`float`"),
        ({"op": "health", "req": 1.5}, "$.req", "`int`"),
    ],
)
def test_wrong_field_types_name_the_path(raw: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_client_message(msgspec.msgpack.encode(raw))
    assert info.value.path == path
    message = str(info.value)
    assert message.startswith("invalid client message: ")
    assert words in message
    assert f"(at {path})" in message


def test_bad_broker_reply_fields_name_the_path() -> None:
    raw = {"op": "error", "req": None, "code": "no_such_code", "message": "x"}
    with pytest.raises(DecodeError) as info:
        decode_broker_message(msgspec.msgpack.encode(raw))
    assert info.value.path == "$.code"


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (["t/", 1, "e", 1, "websocket"], "$"),
        (["t/", "1", "e", 1, "websocket", {"type": "heartbeat", "timestamp": 1}], "$[1]"),
        (["t/", 1, "e", 1, "carrier-pigeon", {"type": "heartbeat", "timestamp": 1}], "$[4]"),
        (["t/", 1, "e", 1, "rest", {"type": "nope"}], "$[5].type"),
        (["t/", 1, "e", 1, "rest", {"type": "trade", "code": "KRW-BTC"}], "$[5].trade_price"),
        (["t/", 1, "e", 1, "rest", {"timestamp": 1}], "$[5].type"),
        ({"topic": "t/"}, "$"),
    ],
)
def test_bad_envelopes_name_the_path(raw: Any, path: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_envelope(msgspec.msgpack.encode(raw))
    assert info.value.path == path
    assert str(info.value).startswith("invalid envelope: ")


def test_decimal_field_with_garbage_is_a_decode_error() -> None:
    raw = msgspec.to_builtins(envelope(MY_ORDER))
    raw[5]["price"] = "lots"
    with pytest.raises(DecodeError) as info:
        decode_envelope(msgspec.msgpack.encode(raw))
    assert info.value.path == "$[5].price"


def test_a_published_message_is_one_frame_that_splits_back_into_topic_and_envelopes() -> None:
    envelope = Envelope("ticker/KRW-ETH/", 3, "e", 1, "websocket", BrokerHeartbeat(timestamp=1))
    body = encode(envelope)
    message = pack_published(b"ticker/KRW-ETH/", body)
    # A SUB matches on the message's first bytes: ETH's topic never prefixes ETHW's.
    assert message.startswith(b"ticker/KRW-ETH/")
    assert not pack_published(b"ticker/KRW-ETHW/", body).startswith(b"ticker/KRW-ETH/\x00")
    topic, rest = split_published(message)
    assert topic == b"ticker/KRW-ETH/"
    assert decode_batch(rest) == [envelope]
    with pytest.raises(DecodeError, match="topic end"):
        split_published(b"ticker/KRW-ETH/" + body.replace(b"\x00", b""))


@pytest.mark.parametrize("count", [1, 2, 15, 16, 17, 300])
def test_a_batch_of_any_size_decodes_to_its_envelopes_in_order(count: int) -> None:
    # Around the msgpack fixarray / array16 boundary (16) and past MAX_BATCH.
    envelopes = [
        Envelope("trade/KRW-BTC/", seq, "e", seq, "websocket", BrokerHeartbeat(timestamp=seq))
        for seq in range(1, count + 1)
    ]
    message = pack_published(b"trade/KRW-BTC/", *(encode(e) for e in envelopes))
    assert decode_batch(split_published(message)[1]) == envelopes
    assert batch_header(count) == msgspec.msgpack.encode([None] * count)[: len(batch_header(count))]


def test_an_empty_or_malformed_batch_is_a_decode_error_naming_the_path() -> None:
    with pytest.raises(DecodeError, match="without envelopes"):
        decode_batch(split_published(pack_published(b"t/"))[1])
    good = encode(envelope(TRADE))
    with pytest.raises(DecodeError) as info:
        decode_batch(batch_header(2) + good + msgspec.msgpack.encode(["t/", "x"]))
    assert (info.value.path or "").startswith("$[1]")
    assert str(info.value).startswith("invalid published batch: ")
    with pytest.raises(DecodeError):  # protocol 2: one bare envelope, not a batch
        decode_batch(good)


# ----------------------------------------------------------------------------- contract


def test_an_orderbook_without_depth_is_the_default_depth() -> None:
    from schemas.bus import DEFAULT_ORDERBOOK_DEPTH, ORDERBOOK_DEPTHS

    assert DEFAULT_ORDERBOOK_DEPTH == 30
    assert DEFAULT_ORDERBOOK_DEPTH in ORDERBOOK_DEPTHS
    assert topic_for("orderbook", "KRW-BTC") == topic_for("orderbook", "KRW-BTC", 30)


def test_status_state_lists_every_state_and_the_event_uses_it() -> None:
    from typing import get_args, get_type_hints

    from schemas.bus import StatusState

    states = set(get_args(StatusState))
    assert states == {
        "connecting",
        "up",
        "idle",
        "down",
        "reconnecting",
        "restored",
        "stale",
        "gap",
        "source_rest",
        "source_websocket",
        "error",
        "auth_failed",
    }
    assert get_type_hints(StatusEvent)["state"] == StatusState
    doc = StatusEvent.__doc__ or ""
    assert all(f"``{state}``" in doc for state in states)  # each one documented


def test_a_status_event_with_an_unknown_state_does_not_decode() -> None:
    bad = msgspec.msgpack.encode({"type": "status", "connection": "public", "state": "weird"})
    with pytest.raises(msgspec.ValidationError, match="state"):
        msgspec.msgpack.decode(bad, type=StatusEvent)


def test_default_endpoints_live_in_the_runtime_dir_and_create_nothing(tmp_path: Path) -> None:
    from schemas.bus import default_endpoints, runtime_dir_path

    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    run = tmp_path / "upbit-broker"
    assert runtime_dir_path(env) == run
    assert default_endpoints(env) == (f"ipc://{run}/control.sock", f"ipc://{run}/data.sock")
    assert not run.exists()


def test_without_xdg_the_runtime_dir_is_per_user_in_the_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from schemas.bus import runtime_dir_path

    monkeypatch.setattr(tempfile, "tempdir", None)
    expected = tmp_path / f"upbit-broker-{os.getuid()}"
    assert runtime_dir_path({"TMPDIR": str(tmp_path)}) == expected
    assert not expected.exists()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    assert runtime_dir_path({"TMPDIR": "/elsewhere"}).parent == tmp_path / "t"


def test_endpoint_variables_override_the_defaults() -> None:
    from schemas.bus import CONTROL_ENV, DATA_ENV, default_endpoints

    env = {CONTROL_ENV: "tcp://127.0.0.1:5555", DATA_ENV: "inproc://data"}
    assert (CONTROL_ENV, DATA_ENV) == ("UPBIT_BROKER_CONTROL", "UPBIT_BROKER_DATA")
    assert default_endpoints(env) == ("tcp://127.0.0.1:5555", "inproc://data")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UPBIT_BROKER_CONTROL", "http://x"),
        ("UPBIT_BROKER_DATA", "ipc://"),
        ("UPBIT_BROKER_DATA", "ipc:///" + "p" * 120),
    ],
)
def test_a_bad_endpoint_is_an_error_naming_the_variable(name: str, value: str) -> None:
    from schemas.bus import EndpointError, default_endpoints

    with pytest.raises(EndpointError, match=name) as info:
        default_endpoints({"UPBIT_BROKER_CONTROL": "inproc://c", name: value})
    assert isinstance(info.value, ValueError)


def test_the_message_bound_sits_far_above_a_published_batch() -> None:
    from schemas.bus import MAX_BATCH_BYTES, MAX_MESSAGE_BYTES

    assert MAX_MESSAGE_BYTES == 16 * 1024 * 1024
    assert MAX_MESSAGE_BYTES >= 1000 * MAX_BATCH_BYTES


def test_a_deeply_nested_client_message_is_a_decode_error() -> None:
    for bomb in (b"\x81\xa1a" * 10_000 + b"\xc0", b"\x91" * 100_000 + b"\xc0"):
        with pytest.raises(DecodeError):
            decode_client_message(bomb)
        with pytest.raises(DecodeError):
            decode_broker_message(bomb)
