"""schemas.upbit: every message type in both key sets, list frames, precision, errors."""

import json
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from schemas.errors import DecodeError
from schemas.upbit import (
    CANDLE_TYPES,
    DATA_TYPES,
    SIMPLE_KEYS,
    AssetBalance,
    Candle,
    Candle1m,
    Candle240m,
    MyAsset,
    MyOrder,
    Orderbook,
    OrderbookUnit,
    Status,
    SubscriptionEntry,
    SubscriptionList,
    Ticker,
    Trade,
    UpbitData,
    UpbitError,
    UpbitMessage,
    decode_frame,
)

# --------------------------------------------------------------------------------------
# The SIMPLE key tables, transcribed independently from docs/PROTOCOL.md §3 / §2.7 (default
# key -> SIMPLE key). Nested tables are keyed "<list field>[]".

TICKER_KEYS = {
    "type": "ty",
    "code": "cd",
    "opening_price": "op",
    "high_price": "hp",
    "low_price": "lp",
    "trade_price": "tp",
    "prev_closing_price": "pcp",
    "change": "c",
    "change_price": "cp",
    "signed_change_price": "scp",
    "change_rate": "cr",
    "signed_change_rate": "scr",
    "trade_volume": "tv",
    "acc_trade_volume": "atv",
    "acc_trade_volume_24h": "atv24h",
    "acc_trade_price": "atp",
    "acc_trade_price_24h": "atp24h",
    "trade_date": "tdt",
    "trade_time": "ttm",
    "trade_timestamp": "ttms",
    "ask_bid": "ab",
    "acc_ask_volume": "aav",
    "acc_bid_volume": "abv",
    "highest_52_week_price": "h52wp",
    "highest_52_week_date": "h52wdt",
    "lowest_52_week_price": "l52wp",
    "lowest_52_week_date": "l52wdt",
    "market_state": "ms",
    "is_trading_suspended": "its",
    "delisting_date": "dd",
    "market_warning": "mw",
    "timestamp": "tms",
    "stream_type": "st",
}
TRADE_KEYS = {
    "type": "ty",
    "code": "cd",
    "trade_price": "tp",
    "trade_volume": "tv",
    "ask_bid": "ab",
    "prev_closing_price": "pcp",
    "change": "c",
    "change_price": "cp",
    "trade_date": "td",
    "trade_time": "ttm",
    "trade_timestamp": "ttms",
    "timestamp": "tms",
    "sequential_id": "sid",
    "best_ask_price": "bap",
    "best_ask_size": "bas",
    "best_bid_price": "bbp",
    "best_bid_size": "bbs",
    "stream_type": "st",
}
UNIT_KEYS = {"ask_price": "ap", "bid_price": "bp", "ask_size": "as", "bid_size": "bs"}
ORDERBOOK_KEYS = {
    "type": "ty",
    "code": "cd",
    "total_ask_size": "tas",
    "total_bid_size": "tbs",
    "orderbook_units": "obu",
    "timestamp": "tms",
    "level": "lv",
    "stream_type": "st",
}
CANDLE_KEYS = {
    "type": "ty",
    "code": "cd",
    "candle_date_time_utc": "cdttmu",
    "candle_date_time_kst": "cdttmk",
    "opening_price": "op",
    "high_price": "hp",
    "low_price": "lp",
    "trade_price": "tp",
    "candle_acc_trade_volume": "catv",
    "candle_acc_trade_price": "catp",
    "timestamp": "tms",
    "stream_type": "st",
}
MYORDER_KEYS = {
    "type": "ty",
    "code": "cd",
    "uuid": "uid",
    "ask_bid": "ab",
    "order_type": "ot",
    "state": "s",
    "trade_uuid": "tuid",
    "price": "p",
    "avg_price": "ap",
    "volume": "v",
    "remaining_volume": "rv",
    "executed_volume": "ev",
    "trades_count": "tc",
    "reserved_fee": "rsf",
    "remaining_fee": "rmf",
    "paid_fee": "pf",
    "locked": "l",
    "executed_funds": "ef",
    "time_in_force": "tif",
    "trade_fee": "tf",
    "is_maker": "im",
    "identifier": "id",
    "smp_type": "smpt",
    "prevented_volume": "pv",
    "prevented_locked": "pl",
    "trade_timestamp": "ttms",
    "order_timestamp": "otms",
    "timestamp": "tms",
    "stream_type": "st",
}
ASSET_KEYS = {"currency": "cu", "balance": "b", "locked": "l"}
MYASSET_KEYS = {
    "type": "ty",
    "asset_uuid": "astuid",
    "assets": "ast",
    "asset_timestamp": "asttms",
    "timestamp": "tms",
    "stream_type": "st",
}
ENTRY_KEYS = {"type": "ty", "codes": "cds", "level": "lv"}
SUBSCRIPTIONS_KEYS = {"method": "mthd", "result": "rslt", "ticket": "tckt"}

# Per message type: (top-level table, {list field: item table}).
KEYS_BY_TYPE: dict[str, tuple[dict[str, str], dict[str, dict[str, str]]]] = {
    "ticker": (TICKER_KEYS, {}),
    "trade": (TRADE_KEYS, {}),
    "orderbook": (ORDERBOOK_KEYS, {"orderbook_units": UNIT_KEYS}),
    **{t: (CANDLE_KEYS, {}) for t in CANDLE_TYPES},
    "myOrder": (MYORDER_KEYS, {}),
    "myAsset": (MYASSET_KEYS, {"assets": ASSET_KEYS}),
    "LIST_SUBSCRIPTIONS": (SUBSCRIPTIONS_KEYS, {"result": ENTRY_KEYS}),
}

# --------------------------------------------------------------------------------------
# One DEFAULT message per type, every field present, with values from Upbit's documented
# examples (docs/PROTOCOL.md §3).

TICKER: dict[str, Any] = {
    "type": "ticker",
    "code": "KRW-BTC",
    "opening_price": 31883000,
    "high_price": 32310000,
    "low_price": 31855000,
    "trade_price": 32287000,
    "prev_closing_price": 31883000.0,
    "acc_trade_price": 78039261076.51241,
    "change": "RISE",
    "change_price": 404000.0,
    "signed_change_price": 404000.0,
    "change_rate": 0.0126713295,
    "signed_change_rate": 0.0126713295,
    "ask_bid": "ASK",
    "trade_volume": 0.03103806,
    "acc_trade_volume": 2429.58834336,
    "trade_date": "20230221",
    "trade_time": "074102",
    "trade_timestamp": 1676965262139,
    "acc_ask_volume": 1146.25573608,
    "acc_bid_volume": 1283.33260728,
    "highest_52_week_price": 57678000.0,
    "highest_52_week_date": "2022-03-28",
    "lowest_52_week_price": 20700000.0,
    "lowest_52_week_date": "2022-12-30",
    "market_state": "ACTIVE",
    "is_trading_suspended": False,
    "delisting_date": None,
    "market_warning": "NONE",
    "timestamp": 1676965262177,
    "acc_trade_price_24h": 228827082483.70729,
    "acc_trade_volume_24h": 7158.8028356,
    "stream_type": "REALTIME",
}
TRADE: dict[str, Any] = {
    "type": "trade",
    "code": "KRW-BTC",
    "timestamp": 1787728554853,
    "trade_date": "2026-08-26",
    "trade_time": "07:15:54",
    "trade_timestamp": 1787728554797,
    "trade_price": 109847000.0,
    "trade_volume": 0.00509799,
    "ask_bid": "ASK",
    "prev_closing_price": 109165000.0,
    "change": "RISE",
    "change_price": 682000.0,
    "sequential_id": 17877285547970000,
    "best_ask_price": 109867000,
    "best_ask_size": 0.0099545,
    "best_bid_price": 109847000,
    "best_bid_size": 0.1583673,
    "stream_type": "SNAPSHOT",
}
ORDERBOOK: dict[str, Any] = {
    "type": "orderbook",
    "code": "KRW-BTC",
    "timestamp": 1746601573804,
    "total_ask_size": 4.79158413,
    "total_bid_size": 2.65609625,
    "orderbook_units": [
        {
            "ask_price": 137002000,
            "bid_price": 137001000,
            "ask_size": 0.10623869,
            "bid_size": 0.03656812,
        },
        {
            "ask_price": 137023000,
            "bid_price": 137000000,
            "ask_size": 0.06144079,
            "bid_size": 0.33543284,
        },
    ],
    "stream_type": "SNAPSHOT",
    "level": 0,
}
CANDLE: dict[str, Any] = {
    "type": "candle.1m",
    "code": "KRW-BTC",
    "candle_date_time_utc": "2026-08-26T08:08:00",
    "candle_date_time_kst": "2026-08-26T17:08:00",
    "opening_price": 109715000.0,
    "high_price": 109756000.0,
    "low_price": 109714000.0,
    "trade_price": 109756000.0,
    "candle_acc_trade_volume": 0.71326612,
    "candle_acc_trade_price": 78269528.64757,
    "timestamp": 1787731717049,
    "stream_type": "SNAPSHOT",
}
MYORDER_TEXT = """{"type":"myOrder","code":"KRW-BTC","uuid":"ac2dc2a3-fce9-40a2-a4f6-5987c25c438f",
 "ask_bid":"BID","order_type":"limit","state":"trade",
 "trade_uuid":"68315169-fba4-4175-ade3-aff14a616657","price":0.001453,
 "avg_price":0.00145372,"volume":30925891.29839369,"remaining_volume":29968038.09235948,
 "executed_volume":30925891.29839369,"trades_count":1,"reserved_fee":44.23943970238218,
 "remaining_fee":21.77177967409916,"paid_fee":22.467660028283017,"locked":43565.33112787242,
 "executed_funds":44935.32005656603,"time_in_force":null,"trade_fee":22.467660028283017,
 "is_maker":true,"identifier":"test-1","smp_type":"cancel_maker",
 "prevented_volume":1.174291929,"prevented_locked":0.001706246173,
 "trade_timestamp":1710751590421,"order_timestamp":1710751590000,
 "timestamp":1710751597500,"stream_type":"REALTIME"}"""
MYASSET_TEXT = """{"type":"myAsset","asset_uuid":"e635f223-1609-4969-8fb6-4376937baad6",
 "assets":[{"currency":"KRW","balance":1386929.37231066771348207123,"locked":10329.670127489597585685}],
 "asset_timestamp":1710146517259,"timestamp":1710146517267,"stream_type":"REALTIME"}"""


def _load_exact(text: str) -> dict[str, Any]:
    """json.loads keeping every digit (floats as Decimal)."""
    value: dict[str, Any] = json.loads(text, parse_float=Decimal)
    return value


MYORDER = _load_exact(MYORDER_TEXT)
MYASSET = _load_exact(MYASSET_TEXT)
SUBSCRIPTIONS: dict[str, Any] = {
    "method": "LIST_SUBSCRIPTIONS",
    "result": [
        {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
        {"type": "orderbook", "codes": ["KRW-BTC", "KRW-ETH"], "level": 0},
        {"type": "myAsset"},
    ],
    "ticket": "unique uuid",
}


def dumps(obj: Any) -> bytes:
    """Compact JSON, with Decimal written as a JSON number (all its digits)."""
    return msgspec.json.Encoder(decimal_format="number").encode(obj)


def to_simple(message: dict[str, Any]) -> dict[str, Any]:
    """Rename a DEFAULT message's keys (and nested ones) to the SIMPLE key set."""
    kind = message.get("type") or message["method"]
    top, nested = KEYS_BY_TYPE[kind]
    out: dict[str, Any] = {}
    for key, value in message.items():
        out[top[key]] = value
        if key in nested:
            out[top[key]] = [{nested[key][k]: v for k, v in item.items()} for item in value]
    return out


def candle_of(type_: str) -> dict[str, Any]:
    """The candle example relabelled as ``type_``."""
    return {**CANDLE, "type": type_}


ALL_DATA: list[dict[str, Any]] = [
    TICKER,
    TRADE,
    ORDERBOOK,
    *(candle_of(t) for t in CANDLE_TYPES),
    MYORDER,
    MYASSET,
]


def one(frame: bytes | str) -> UpbitMessage:
    """Decode a frame that must hold exactly one message."""
    messages = decode_frame(frame)
    assert len(messages) == 1
    return messages[0]


def assert_matches(message: Any, source: dict[str, Any]) -> None:
    """Every DEFAULT key of ``source`` equals the decoded attribute (Decimal exactly)."""
    for key, expected in source.items():
        if key == "type":
            assert message.type == expected
            continue
        actual = getattr(message, key)
        if isinstance(expected, list) and expected and isinstance(expected[0], dict):
            assert len(actual) == len(expected)
            for item, item_source in zip(actual, expected, strict=True):
                assert_matches(item, item_source)
        elif isinstance(actual, Decimal):
            assert actual == Decimal(str(expected)), key
        elif isinstance(actual, float):
            assert actual == float(expected), key
        else:
            assert actual == expected, key


# ----------------------------------------------------------------------------- the types


def test_data_types_and_tags() -> None:
    assert set(DATA_TYPES) == {
        "ticker",
        "trade",
        "orderbook",
        "myOrder",
        "myAsset",
        *(f"candle.{u}" for u in ("1s", "1m", "3m", "5m", "10m", "15m", "30m", "60m", "240m")),
    }
    assert (
        tuple(f"candle.{u}" for u in ("1s", "1m", "3m", "5m", "10m", "15m", "30m", "60m", "240m"))
        == CANDLE_TYPES
    )
    for type_, cls in DATA_TYPES.items():
        struct: Any = cls  # DATA_TYPES is typed dict[str, type]
        assert struct.__struct_config__.tag == type_
        assert struct.__struct_config__.tag_field == "type"
        assert struct.type == type_
    assert all(issubclass(DATA_TYPES[t], Candle) for t in CANDLE_TYPES)


def test_simple_keys_match_protocol_tables() -> None:
    expected: dict[type[msgspec.Struct], dict[str, str]] = {
        Ticker: TICKER_KEYS,
        Trade: TRADE_KEYS,
        Orderbook: ORDERBOOK_KEYS,
        OrderbookUnit: UNIT_KEYS,
        Candle: CANDLE_KEYS,
        MyOrder: MYORDER_KEYS,
        MyAsset: MYASSET_KEYS,
        AssetBalance: ASSET_KEYS,
        SubscriptionList: SUBSCRIPTIONS_KEYS,
        SubscriptionEntry: ENTRY_KEYS,
    }
    for cls, table in expected.items():
        fields = {field.name for field in msgspec.structs.fields(cls)}
        without_tag = {k: v for k, v in table.items() if k != "type" or "type" in fields}
        assert dict(SIMPLE_KEYS[cls]) == without_tag, cls
        assert set(without_tag) == fields, cls  # the table covers every field


@pytest.mark.parametrize("source", ALL_DATA, ids=lambda m: str(m["type"]))
def test_every_type_in_both_key_sets(source: dict[str, Any]) -> None:
    default = one(dumps(source))
    simple = one(dumps(to_simple(source)))
    assert type(default) is DATA_TYPES[source["type"]]
    assert type(simple) is type(default)  # SIMPLE yields the very same class
    assert simple == default
    assert_matches(default, source)
    # str frames decode the same as bytes frames
    assert one(dumps(source).decode()) == default


@pytest.mark.parametrize("source", ALL_DATA, ids=lambda m: str(m["type"]))
def test_reencoding_gives_default_keys_and_round_trips(source: dict[str, Any]) -> None:
    message = one(dumps(to_simple(source)))
    wire = msgspec.json.Encoder(decimal_format="number").encode(message)
    assert b'"type":' in wire
    assert b'"ty":' not in wire
    assert one(wire) == message
    # the bus carries these structs in msgpack, inside a union tagged on "type"
    packed = msgspec.msgpack.encode(message)
    assert msgspec.msgpack.decode(packed, type=UpbitData) == message


def test_json_list_frame_with_several_items() -> None:
    frame = dumps([TICKER, TRADE, ORDERBOOK, CANDLE, MYORDER, MYASSET])
    messages = decode_frame(frame)
    assert [type(m) for m in messages] == [Ticker, Trade, Orderbook, Candle1m, MyOrder, MyAsset]
    for message, source in zip(
        messages, [TICKER, TRADE, ORDERBOOK, CANDLE, MYORDER, MYASSET], strict=True
    ):
        assert_matches(message, source)


def test_simple_list_frame_with_several_items() -> None:
    sources = [TICKER, TRADE, ORDERBOOK, candle_of("candle.240m"), MYORDER, MYASSET]
    messages = decode_frame(dumps([to_simple(s) for s in sources]))
    assert [type(m) for m in messages] == [Ticker, Trade, Orderbook, Candle240m, MyOrder, MyAsset]
    assert messages == [one(dumps(s)) for s in sources]


def test_mixed_list_frame_goes_through_the_slow_path() -> None:
    frame = dumps([to_simple(TRADE), TICKER, {"status": "UP"}])
    messages = decode_frame(frame)
    assert [type(m) for m in messages] == [Trade, Ticker, Status]


def test_decimal_precision_default_and_simple() -> None:
    for frame in (MYASSET_TEXT, dumps(to_simple(MYASSET))):
        asset = one(frame)
        assert isinstance(asset, MyAsset)
        assert asset.assets[0].balance == Decimal("1386929.37231066771348207123")
        assert str(asset.assets[0].locked) == "10329.670127489597585685"
    order = one(MYORDER_TEXT)
    assert isinstance(order, MyOrder)
    assert order.paid_fee == Decimal("22.467660028283017")
    assert order.prevented_locked == Decimal("0.001706246173")
    assert order.price == Decimal("0.001453")
    assert order.is_maker is True
    assert order.time_in_force is None


def test_big_ints_stay_exact() -> None:
    trade = one(dumps({**TRADE, "sequential_id": 16186782720000001}))
    assert isinstance(trade, Trade)
    assert trade.sequential_id == 16186782720000001
    assert type(trade.sequential_id) is int


def test_optional_fields_default_to_none_and_extra_keys_are_ignored() -> None:
    old_trade = {k: v for k, v in TRADE.items() if not k.startswith("best_")}
    trade = one(dumps(old_trade))
    assert isinstance(trade, Trade)
    assert trade.best_ask_price is None
    assert trade.best_bid_size is None
    book = one(dumps({k: v for k, v in ORDERBOOK.items() if k not in ("level", "stream_type")}))
    assert isinstance(book, Orderbook)
    assert book.level is None
    assert book.stream_type is None
    ticker = one(dumps({**TICKER, "trade_status": None, "market_state_for_ios": None, "new": 1}))
    assert ticker == one(dumps(TICKER))
    fresh = {k: v for k, v in MYORDER.items() if k in ("type", "code", "uuid", "ask_bid")}
    order = one(dumps({**fresh, "order_type": "price", "state": "wait", "timestamp": 1}))
    assert isinstance(order, MyOrder)
    assert order.volume is None
    assert order.trade_fee is None
    assert order.order_timestamp is None


def test_status_error_and_subscription_frames() -> None:
    assert one(b'{"status":"UP"}') == Status(status="UP")
    error = one('{"error":{"name":"INVALID_AUTH","message":"인증 정보가 올바르지 않습니다."}}')
    assert isinstance(error, UpbitError)
    assert error.error.name == "INVALID_AUTH"
    assert error.error.message.startswith("인증")
    numeric = one(b'{"error":{"name":400,"message":"x"}}')
    assert isinstance(numeric, UpbitError)
    assert numeric.error.name == 400
    default = one(dumps(SUBSCRIPTIONS))
    simple = one(dumps(to_simple(SUBSCRIPTIONS)))
    assert isinstance(default, SubscriptionList)
    assert simple == default
    assert default.result[1] == SubscriptionEntry(
        type="orderbook", codes=["KRW-BTC", "KRW-ETH"], level=0
    )
    assert default.result[2].codes is None
    assert default.ticket == "unique uuid"


def test_structs_are_frozen() -> None:
    ticker = one(dumps(TICKER))
    assert isinstance(ticker, Ticker)
    with pytest.raises(AttributeError):
        ticker.trade_price = 1.0  # type: ignore[misc]


# ------------------------------------------------------------------------------- errors


def _error(frame: bytes | str) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_frame(frame)
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.mark.parametrize(
    ("frame", "path"),
    [
        (dumps({**TICKER, "trade_price": "abc"}), "$.trade_price"),
        (dumps({**to_simple(TICKER), "tp": "abc"}), "$.tp"),
        (dumps([TICKER, {**TRADE, "trade_price": "abc"}]), "$[1].trade_price"),
        (dumps([to_simple(TICKER), {**to_simple(TRADE), "sid": 1.5}]), "$[1].sid"),
        (dumps({k: v for k, v in TICKER.items() if k != "code"}), "$.code"),
        (
            dumps(
                {**ORDERBOOK, "orderbook_units": [{"ask_price": 1, "bid_price": 1, "ask_size": 1}]}
            ),
            "$.orderbook_units[0].bid_size",
        ),
        (
            dumps({**to_simple(ORDERBOOK), "obu": [{"ap": 1, "bp": 1, "as": "x", "bs": 1}]}),
            "$.obu[0].as",
        ),
        (
            dumps({**MYASSET, "assets": [{"currency": "KRW", "balance": "abc", "locked": 0}]}),
            "$.assets[0].balance",
        ),
        (dumps({**TICKER, "type": "announcement"}), "$.type"),
        (dumps({**to_simple(TICKER), "ty": "tickr"}), "$.ty"),
        (b"[]", "$"),
        (dumps([TICKER, 5]), "$[1]"),
        (dumps([TICKER, "ticker"]), "$[1]"),
        (b"5", "$"),
        (b'"ticker"', "$"),
        (b"{}", "$.type"),
        (b'{"code":"KRW-BTC"}', "$.type"),
        (b'{"error":{"name":"X"}}', "$.error.message"),
        (b'{"status":1}', "$.status"),
        (b'{"method":"LIST_SUBSCRIPTIONS","result":[{"codes":["X"]}]}', "$.result[0].type"),
    ],
    ids=[
        "wrong-type",
        "wrong-type-simple",
        "wrong-type-in-list",
        "wrong-type-in-simple-list",
        "missing-field",
        "missing-nested-field",
        "wrong-nested-simple",
        "bad-decimal",
        "unknown-type",
        "unknown-simple-type",
        "empty-list",
        "list-with-int",
        "list-with-str",
        "scalar-frame",
        "string-frame",
        "empty-object",
        "no-type",
        "error-without-message",
        "status-not-str",
        "subscription-entry-without-type",
    ],
)
def test_malformed_frames_name_the_path(frame: bytes, path: str) -> None:
    error = _error(frame)
    assert error.path == path
    assert str(error).endswith(f"(at {path})")


def test_wrong_type_message_is_readable() -> None:
    error = _error(dumps({**TICKER, "trade_price": "abc"}))
    assert str(error) == ("invalid Upbit message: Expected `float`, got `str` (at $.trade_price)")
    assert isinstance(error.__cause__, msgspec.ValidationError)


@pytest.mark.parametrize(
    "frame",
    [dumps(TICKER)[:-5], dumps(TICKER)[:1], b"", b'{"type":"ticker",', dumps([TICKER])[:-1]],
    ids=["cut-end", "one-byte", "empty", "cut-key", "cut-list"],
)
def test_truncated_json(frame: bytes) -> None:
    error = _error(frame)
    assert "truncated" in str(error) or "malformed" in str(error)
    assert error.path is None


def test_non_utf8_bytes() -> None:
    inside_string = dumps(TICKER).replace(b"KRW-BTC", b"KRW-\xff\xfe")
    assert "UTF-8" in str(_error(inside_string))
    assert _error(b"\xff" + dumps(TICKER)).path is None
    assert "UTF-8" in str(_error('{"status":"\ud800"}'))  # lone surrogate in a str frame


def test_trailing_garbage_is_rejected() -> None:
    assert "trailing" in str(_error(dumps(TICKER) + b" x"))


def test_legacy_2018_frames_are_rejected_with_reason() -> None:
    legacy_default = {k: v for k, v in TICKER.items() if k not in ("type", "code", "stream_type")}
    error = _error(dumps({"market": "KRW-BTC", **legacy_default}))
    assert error.path == "$.market"
    assert str(error).startswith("legacy 2018 Upbit frame")
    legacy_simple = {
        "mk": "KRW-BTC",
        **{k: v for k, v in to_simple(TRADE).items() if k not in ("ty", "cd")},
    }
    error = _error(dumps(legacy_simple))
    assert error.path == "$.mk"
    assert "legacy 2018" in str(error)


def _nested(depth: int, shape: str) -> bytes:
    """A frame ``depth`` arrays/objects deep, alone or inside an otherwise good frame."""
    arrays = b"[" * depth + b"]" * depth
    objects = b'{"a":' * depth + b"1" + b"}" * depth
    good = dumps(TICKER)
    return {
        "arrays": arrays,
        "objects": objects,
        "in-a-field": good[:-1] + b',"extra":' + arrays + b"}",
        "in-a-list-item": b"[" + good + b"," + good[:-1] + b',"x":' + objects + b"}]",
        "status-field": b'{"status":' + arrays + b"}",
    }[shape]


@pytest.mark.parametrize("depth", [10_000, 100_000])
@pytest.mark.parametrize(
    "shape", ["arrays", "objects", "in-a-field", "in-a-list-item", "status-field"]
)
@pytest.mark.parametrize("as_str", [False, True], ids=["bytes", "str"])
def test_deeply_nested_frames_are_decode_errors(depth: int, shape: str, as_str: bool) -> None:
    """One hostile frame must not end the broker: RecursionError becomes a DecodeError."""
    frame = _nested(depth, shape)
    error = _error(frame.decode() if as_str else frame)
    assert "nested too deeply" in str(error)
    assert error.path is None
    assert isinstance(error.__cause__, RecursionError)
    assert decode_frame(dumps(TICKER)) == decode_frame(dumps(TICKER).decode())  # still works
