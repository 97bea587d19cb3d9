"""Decode every published Upbit message in the shared corpus (samples/ and frames/).

Files are discovered at collection time, so new ones are picked up. The corpus lives
next to the repository (``../shared/upbit``) or wherever ``UPBIT_SHARED_DIR`` points.
Each decoded message is compared field by field with the file's own JSON (numbers parsed
exactly), and a few files get hand-written value checks on top.
"""

import json
import os
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas.bus import OrderChance
from schemas.errors import DecodeError
from schemas.rest import (
    RestAccount,
    RestCandle,
    RestError,
    RestMarket,
    RestOrder,
    RestOrderbook,
    RestOrderbookInstrument,
    RestTicker,
    RestTrade,
    decode_rest,
    decode_rest_list,
    rest_accounts_to_my_asset,
    rest_candle_to_candle,
    rest_order_to_my_order,
    rest_orderbook_to_orderbook,
    rest_ticker_to_ticker,
    rest_trade_to_trade,
)
from schemas.upbit import (
    DATA_TYPES,
    Candle1m,
    Candle15m,
    MyAsset,
    MyOrder,
    Orderbook,
    Status,
    SubscriptionList,
    Ticker,
    Trade,
    UpbitError,
    decode_frame,
)
from tests.schemas.test_upbit import KEYS_BY_TYPE

SHARED = Path(
    os.environ.get("UPBIT_SHARED_DIR")
    or Path(__file__).resolve().parents[2].parent / "shared" / "upbit"
)
FILES = sorted(
    f"{folder}/{path.name}"
    for folder in ("samples", "frames")
    for path in (SHARED / folder).glob("*.json")
)
MISSING = pytest.mark.skip(reason=f"Upbit corpus not found at {SHARED} (set UPBIT_SHARED_DIR)")
WS_FILES: list[Any] = [f for f in FILES if f.split("/")[1].startswith("ws-")] or [
    pytest.param("absent", marks=MISSING)
]
REST_FILES: list[Any] = [f for f in FILES if f.split("/")[1].startswith("rest-")] or [
    pytest.param("absent", marks=MISSING)
]

# Keys real traffic carries that the structs deliberately drop (docs/PROTOCOL.md §3.1, §8).
IGNORED_KEYS = {
    "trade_status",  # legacy ticker keys, often null
    "market_state_for_ios",
    "ts",
    "msfi",
    "avg_krw_buy_price",  # pre-2019 /v1/accounts
    "modified",
    "chane_price",  # typo in an old docs example of /v1/trades/ticks
    "ask_fee",  # 2018 order trades[]
    "bid_fee",
}
# REST kind by file-name prefix (longest first); None = not a fallback body, skipped.
REST_KINDS: list[tuple[str, type[Any] | None]] = [
    ("rest-orderbook-instruments", RestOrderbookInstrument),
    ("rest-orderchance", OrderChance),
    ("rest-orderbook", RestOrderbook),
    ("rest-accounts", RestAccount),
    ("rest-candles", RestCandle),
    ("rest-deposit", None),
    ("rest-withdraw", None),
    ("rest-markets", RestMarket),
    ("rest-market", RestMarket),
    ("rest-orders", RestOrder),
    ("rest-order", RestOrder),
    ("rest-ticker", RestTicker),
    ("rest-trades", RestTrade),
    ("rest-error", RestError),
]


def read(name: str) -> bytes:
    """Raw bytes of a corpus file given as ``folder/file.json``."""
    return (SHARED / name).read_bytes()


def exact_json(data: bytes) -> Any:
    """The file's JSON with every number exact (floats as Decimal)."""
    return json.loads(data, parse_float=Decimal)


def to_default_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A SIMPLE object re-keyed to DEFAULT names (unknown keys kept as they are)."""
    if "ty" not in raw and "mthd" not in raw:
        return raw
    kind = raw.get("ty") or raw["mthd"]
    top, nested = KEYS_BY_TYPE[kind]
    inverse = {simple: default for default, simple in top.items()}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = inverse.get(key, key)
        out[name] = value
        if name in nested:
            item_inverse = {simple: default for default, simple in nested[name].items()}
            out[name] = [{item_inverse.get(k, k): v for k, v in item.items()} for item in value]
    return out


def compare(actual: Any, expected: Any, where: str) -> None:
    """Assert a decoded value equals the source JSON value (recursively, exactly)."""
    if isinstance(actual, msgspec.Struct):
        assert isinstance(expected, dict), where
        fields = actual.__struct_fields__
        for key, value in expected.items():
            if key in IGNORED_KEYS:
                continue
            if key == "type" and "type" not in fields:
                assert actual.type == value, where  # type: ignore[attr-defined]
                continue
            assert key in fields, f"{where}: key {key!r} has no field in {type(actual).__name__}"
            compare(getattr(actual, key), value, f"{where}.{key}")
    elif isinstance(actual, list):
        assert isinstance(expected, list), where
        assert len(actual) == len(expected), where
        for index, (item, value) in enumerate(zip(actual, expected, strict=True)):
            compare(item, value, f"{where}[{index}]")
    elif isinstance(actual, float):
        assert actual == float(expected), where
    elif isinstance(actual, Decimal):
        assert actual == Decimal(str(expected)), where
    elif isinstance(actual, int) and not isinstance(actual, bool) and isinstance(expected, str):
        assert actual == int(expected), where  # re-encoded recordings stringify numbers
    else:
        assert actual == expected, where


def is_legacy(raw: Any) -> bool:
    """A 2018 frame: "market"/"mk" instead of type/code (rejected by design)."""
    return (
        isinstance(raw, dict)
        and not {"type", "ty"} & raw.keys()
        and bool({"market", "mk"} & raw.keys())
    )


def rest_kind(name: str) -> type[Any] | None:
    """The REST struct for a corpus file name."""
    base = name.split("/")[1]
    for prefix, kind in REST_KINDS:
        if base.startswith(prefix):
            return kind
    raise AssertionError(f"no REST kind for {name}: add it to REST_KINDS")


def decode_rest_file(name: str) -> Any:
    """A REST corpus file decoded as its struct (a list for array bodies)."""
    kind = rest_kind(name)
    assert kind is not None
    data = read(name)
    if data.lstrip().startswith(b"["):
        return decode_rest_list(data, kind)
    return decode_rest(data, kind)


# --------------------------------------------------------------------------- every file


@pytest.mark.parametrize("name", WS_FILES)
def test_websocket_file(name: str) -> None:
    data = read(name)
    raw = exact_json(data)
    if name.split("/")[1].startswith("ws-request-"):
        # client -> server requests: one JSON array holding a ticket object
        assert isinstance(raw, list)
        assert raw
        assert any(isinstance(item, dict) and isinstance(item.get("ticket"), str) for item in raw)
        return
    if is_legacy(raw):
        with pytest.raises(DecodeError, match=r"^legacy 2018 Upbit frame") as info:
            decode_frame(data)
        assert info.value.path in ("$.market", "$.mk")
        return
    messages = decode_frame(data)
    assert messages == decode_frame(data.decode("utf-8"))  # str frames too
    items = raw if isinstance(raw, list) else [raw]
    assert len(messages) == len(items)
    for index, (message, item) in enumerate(zip(messages, items, strict=True)):
        source = to_default_keys(item)
        kind = source.get("type")
        if kind is not None:
            assert type(message) is DATA_TYPES[kind]
        compare(message, source, f"{name}[{index}]")


@pytest.mark.parametrize("name", REST_FILES)
def test_rest_file(name: str) -> None:
    kind = rest_kind(name)
    if kind is None:
        assert isinstance(json.loads(read(name)), dict | list)
        pytest.skip(f"{name}: not a body the REST fallback reads (valid JSON, no struct)")
    decoded = decode_rest_file(name)
    compare(decoded, exact_json(read(name)), name)
    # every fallback body also converts to a valid WebSocket message
    for item in decoded if isinstance(decoded, list) else [decoded]:
        converted = convert(item)
        if converted is not None:
            assert decode_frame(
                msgspec.json.Encoder(decimal_format="number").encode(converted)
            ) == [converted]
    if kind is RestAccount:
        asset = rest_accounts_to_my_asset(decoded, now_ms=1)
        assert [a.balance for a in asset.assets] == [a.balance for a in decoded]


def convert(item: Any) -> Any:
    """The WS message a REST item converts to (None if it has no WS counterpart)."""
    if isinstance(item, RestTicker):
        return rest_ticker_to_ticker(item)
    if isinstance(item, RestOrderbook):
        return rest_orderbook_to_orderbook(item)
    if isinstance(item, RestTrade):
        if item.sequential_id is None:
            with pytest.raises(DecodeError):
                rest_trade_to_trade(item)
            return None
        return rest_trade_to_trade(item)
    if isinstance(item, RestCandle) and item.unit is not None:
        return rest_candle_to_candle(item, f"candle.{item.unit}m")
    if isinstance(item, RestOrder):
        return rest_order_to_my_order(item, now_ms=1)
    return None


def test_corpus_is_not_empty() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"Upbit corpus not found at {SHARED} (set UPBIT_SHARED_DIR)")
    assert len(FILES) > 10


# ------------------------------------------------------------------- hand-written checks


def _ws(name: str) -> list[Any]:
    return decode_frame(read(name))


def _check_ticker_sample(m: list[Any]) -> None:
    (t,) = m
    assert isinstance(t, Ticker)
    assert (t.code, t.trade_price, t.change, t.stream_type) == (
        "KRW-BTC",
        32287000.0,
        "RISE",
        "REALTIME",
    )
    assert t.acc_trade_price_24h == 228827082483.70728
    assert t.delisting_date is None
    assert t.is_trading_suspended is False


def _check_simple_trade_sample(m: list[Any]) -> None:
    (t,) = m
    assert isinstance(t, Trade)
    assert (t.code, t.trade_price, t.change, t.stream_type) == (
        "KRW-BTC",
        6759000.0,
        "FALL",
        "SNAPSHOT",
    )
    assert (t.trade_date, t.trade_time, t.sequential_id) == (
        "2020-03-15",
        "07:27:08",
        1584257228000000,
    )


def _check_simple_list_sample(m: list[Any]) -> None:
    (b,) = m
    assert isinstance(b, Orderbook)
    assert (b.code, b.level, b.total_ask_size, b.stream_type) == (
        "KRW-BTC",
        10000,
        17.12835169,
        None,
    )
    assert b.orderbook_units[0].ask_price == 148880000
    assert b.orderbook_units[0].bid_size == 0.34809059


def _check_tiny_numbers(m: list[Any]) -> None:
    (t,) = m
    assert isinstance(t, Trade)
    assert (t.code, t.trade_price, t.change_price) == ("BTC-ITAM", 1.13e-06, 6e-08)
    assert t.sequential_id == 16186782720000000  # > 2**53, still exact


def _check_long_decimals(m: list[Any]) -> None:
    (a,) = m
    assert isinstance(a, MyAsset)
    assert a.assets[0].balance == Decimal("1386929.37231066771348207123")
    assert a.assets[0].locked == Decimal("10329.670127489597585685")
    assert (a.asset_uuid, a.asset_timestamp) == (
        "e635f223-1609-4969-8fb6-4376937baad6",
        1710146517259,
    )


def _check_sparse_my_order(m: list[Any]) -> None:
    (o,) = m
    assert isinstance(o, MyOrder)
    assert (o.code, o.state, o.trade_uuid, o.is_maker) == ("SGD-XRP", "trade", None, None)
    assert o.volume == Decimal("30925891.29839369")
    assert o.reserved_fee == Decimal("44.23943970238218")


def _check_book_30(m: list[Any]) -> None:
    (b,) = m
    assert isinstance(b, Orderbook)
    assert (b.level, len(b.orderbook_units), b.stream_type) == (10000, 30, "SNAPSHOT")
    assert b.orderbook_units[0].ask_price == 109950000.0


def _check_book_e_notation(m: list[Any]) -> None:
    (b,) = m
    assert isinstance(b, Orderbook)
    assert len(b.orderbook_units) == 15
    assert b.orderbook_units[-1].bid_price == 9.9e-07
    assert b.level is None


def _check_jkorf_book(m: list[Any]) -> None:
    (b,) = m
    assert isinstance(b, Orderbook)
    assert (b.code, b.level, b.stream_type, len(b.orderbook_units)) == ("KRW-ETH", None, None, 5)


def _check_candle_15m(m: list[Any]) -> None:
    (c,) = m
    assert isinstance(c, Candle15m)
    assert c.type == "candle.15m"
    assert (c.candle_date_time_kst, c.candle_acc_trade_price) == (
        "2026-08-26T17:00:00",
        398651814.32878,
    )


def _check_simple_candle(m: list[Any]) -> None:
    (c,) = m
    assert type(c).__name__ == "Candle1s"
    assert (c.code, c.candle_acc_trade_volume, c.timestamp) == (
        "KRW-BTC",
        0.00033557,
        1751855364161,
    )


def _check_even_ticker(m: list[Any]) -> None:
    (t,) = m
    assert isinstance(t, Ticker)
    assert (t.code, t.change, t.change_rate, t.stream_type) == ("KRW-XRP", "EVEN", 0.0, "REALTIME")


def _check_subscriptions(m: list[Any]) -> None:
    (s,) = m
    assert isinstance(s, SubscriptionList)
    assert s.method == "LIST_SUBSCRIPTIONS"
    assert [(e.type, e.codes, e.level) for e in s.result] == [
        ("ticker", ["KRW-BTC", "KRW-ETH"], None),
        ("orderbook", ["KRW-BTC", "KRW-ETH"], 0),
    ]


def _check_error(m: list[Any]) -> None:
    (e,) = m
    assert isinstance(e, UpbitError)
    assert e.error.name == "INVALID_AUTH"


def _check_status(m: list[Any]) -> None:
    assert m == [Status(status="UP")]


def _check_candle_1m(m: list[Any]) -> None:
    (c,) = m
    assert isinstance(c, Candle1m)
    assert c.trade_price == 109756000.0


def _check_pre_2024_trade(m: list[Any]) -> None:
    (t,) = m
    assert isinstance(t, Trade)
    assert (t.trade_price, t.best_ask_price, t.sequential_id) == (6747000, None, 1584508285000002)


WS_CHECKS: dict[str, Callable[[list[Any]], None]] = {
    "samples/ws-ticker-default.json": _check_ticker_sample,
    "samples/ws-trade-simple.json": _check_simple_trade_sample,
    "samples/ws-orderbook-simple-list.json": _check_simple_list_sample,
    "samples/ws-candle-1m-default.json": _check_candle_1m,
    "samples/ws-error-invalid-auth.json": _check_error,
    "samples/ws-status-up.json": _check_status,
    "frames/ws-trade-simple-cryptofeed-3.json": _check_tiny_numbers,
    "frames/ws-myasset-default-upbitdocs-1.json": _check_long_decimals,
    "frames/ws-myasset-jsonlist-upbitdocs-1.json": _check_long_decimals,
    "frames/ws-myorder-default-ccxt-1.json": _check_sparse_my_order,
    "frames/ws-orderbook-default-upbitdocs-2.json": _check_book_30,
    "frames/ws-orderbook-simple-cryptofeed-3.json": _check_book_e_notation,
    "frames/ws-orderbook-default-jkorf-1.json": _check_jkorf_book,
    "frames/ws-candle-default-upbitdocs-4.json": _check_candle_15m,
    "frames/ws-candle-simple-upbitdocs-1.json": _check_simple_candle,
    "frames/ws-ticker-simple-pyrepr-2.json": _check_even_ticker,
    "frames/ws-subscriptions-default-upbitdocs-1.json": _check_subscriptions,
    "frames/ws-trade-default-ccxt-1.json": _check_pre_2024_trade,
}


@pytest.mark.parametrize("name", sorted(WS_CHECKS))
def test_websocket_values(name: str) -> None:
    if not (SHARED / name).is_file():
        pytest.skip(f"{name} not in the corpus")
    WS_CHECKS[name](_ws(name))


def _check_rest_trades(d: Any) -> None:
    (t,) = d
    assert (t.sequential_id, t.trade_volume, t.trade_date_utc) == (
        17510687993360000,
        6.043e-05,
        "2025-06-27",
    )


def _check_legacy_accounts(d: Any) -> None:
    assert [(a.currency, a.balance, a.avg_buy_price) for a in d] == [
        ("BTC", Decimal("0.005"), None),
        ("ETH", Decimal("0.1"), None),
    ]


def _check_quotation_error(d: Any) -> None:
    assert d.error.name == 400
    assert d.error.message.startswith("Type mismatch")


def _check_stringified_candle(d: Any) -> None:
    (c,) = d
    assert (c.unit, c.timestamp, c.trade_price) == (60, 1710328237828, 73578.655)


def _check_order_with_trades(d: Any) -> None:
    assert d.ord_type == "market"
    assert d.price is None
    assert d.trades[0].funds == Decimal("7394.19175")
    order = rest_order_to_my_order(d, now_ms=1)
    assert (order.ask_bid, order.executed_funds) == ("ASK", Decimal("7394.19175"))


def _check_market_events(d: Any) -> None:
    assert [(m.market, m.market_event.warning) for m in d] == [
        ("KRW-BTC", False),
        ("KRW-ETH", True),
    ]


REST_CHECKS: dict[str, Callable[[Any], None]] = {
    "samples/rest-trades-ticks.json": _check_rest_trades,
    "frames/rest-accounts-rest-ccxt-1.json": _check_legacy_accounts,
    "frames/rest-error-rest-upbitdocs-4.json": _check_quotation_error,
    "frames/rest-candles-rest-ccxtstatic-1.json": _check_stringified_candle,
    "frames/rest-order-rest-ccxt-2.json": _check_order_with_trades,
    "frames/rest-markets-rest-upbitdocs-1.json": _check_market_events,
}


@pytest.mark.parametrize("name", sorted(REST_CHECKS))
def test_rest_values(name: str) -> None:
    if not (SHARED / name).is_file():
        pytest.skip(f"{name} not in the corpus")
    REST_CHECKS[name](decode_rest_file(name))
