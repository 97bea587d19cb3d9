"""schemas.rest: REST bodies (docs/PROTOCOL.md §8) and their conversion to WebSocket structs."""

from decimal import Decimal
from typing import Any

import msgspec
import pytest

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
    AssetBalance,
    Candle1m,
    Candle1s,
    Candle240m,
    MyAsset,
    MyOrder,
    Orderbook,
    OrderbookUnit,
    Ticker,
    Trade,
    decode_frame,
)

TICKER = b"""[{"market":"KRW-BTC","trade_date":"20250704","trade_time":"051400",
 "trade_date_kst":"20250704","trade_time_kst":"141400","trade_timestamp":1751606040365,
 "opening_price":148737000,"high_price":149360000,"low_price":148288000,"trade_price":148601000,
 "prev_closing_price":148737000,"change":"FALL","change_price":136000,"change_rate":0.0009143656,
 "signed_change_price":-136000,"signed_change_rate":-0.0009143656,"trade_volume":0.00016823,
 "acc_trade_price":31615925234.05438,"acc_trade_price_24h":178448329314.96686,
 "acc_trade_volume":212.38911576,"acc_trade_volume_24h":1198.26954807,
 "highest_52_week_price":163325000,"highest_52_week_date":"2025-01-20",
 "lowest_52_week_price":72100000,"lowest_52_week_date":"2024-08-05","timestamp":1751606040403}]"""
ORDERBOOK = b"""[{"market":"KRW-BTC","timestamp":1751606867762,"total_ask_size":10.37591054,
 "total_bid_size":9.49577219,"orderbook_units":[{"ask_price":148520000,"bid_price":148490000,
 "ask_size":0.0134662,"bid_size":0.04296774}],"level":10000}]"""
TRADES = b"""[{"market":"KRW-BTC","trade_date_utc":"2025-06-27","trade_time_utc":"23:59:59",
 "timestamp":1751068799336,"trade_price":147058000,"trade_volume":0.00006043,
 "prev_closing_price":146852000,"change_price":206000,"ask_bid":"BID",
 "sequential_id":17510687993360000},
 {"market":"BTC-ETH","trade_date_utc":"2018-11-22","trade_time_utc":"13:55:24",
 "timestamp":1542894924397,"trade_price":0.02914289,"trade_volume":0.20074397,
 "prev_closing_price":0.02966,"change_price":-0.00051711,"ask_bid":"ASK",
 "sequential_id":15428949259430000}]"""
CANDLES = b"""[{"market":"KRW-BTC","candle_date_time_utc":"2018-04-18T10:16:00",
 "candle_date_time_kst":"2018-04-18T19:16:00","opening_price":8615000,"high_price":8618000,
 "low_price":8611000,"trade_price":8616000,"timestamp":1524046594584,
 "candle_acc_trade_price":60018891.90054,"candle_acc_trade_volume":6.96780929,"unit":1}]"""
ACCOUNTS = b"""[{"currency":"KRW","balance":"1000000.0","locked":"0.0","avg_buy_price":"0",
  "avg_buy_price_modified":false,"unit_currency":"KRW"},
 {"currency":"BTC","balance":"2.00000000000000000000001","locked":"0.0",
  "avg_buy_price":"140000000","avg_buy_price_modified":false,"unit_currency":"KRW"}]"""
ORDER = b"""{"uuid":"d098ceaf-6811-4df8-97f2-b7e01aefc03f","side":"bid","ord_type":"limit",
 "price":"140000000","state":"done","market":"KRW-BTC","created_at":"2025-07-04T15:00:00+09:00",
 "volume":"1.0","remaining_volume":"0.0","executed_volume":"1.0","reserved_fee":"0.0",
 "remaining_fee":"0.0","paid_fee":"70000.0","locked":"0.0","prevented_volume":"0",
 "prevented_locked":"0","trades_count":1}"""
ORDER_WITH_TRADES = b"""{"market":"KRW-BTC","uuid":"3944c2c1-bd8c-441a-aa25-2370d08217a9",
 "side":"bid","ord_type":"price","price":"6000","state":"cancel",
 "created_at":"2025-08-09T16:52:11+09:00","executed_volume":"0.00003736","reserved_fee":"3",
 "remaining_fee":"0.00010408","paid_fee":"2.99989592","locked":"0.20826408",
 "prevented_locked":"0","trades_count":2,"trades":[
 {"market":"KRW-BTC","uuid":"e3","price":"160000000","volume":"0.00002","funds":"3200",
  "trend":"up","created_at":"2025-08-09T16:52:11.176073+09:00","side":"bid"},
 {"market":"KRW-BTC","uuid":"e4","price":"170000000","volume":"0.00001736","funds":"2951.2",
  "side":"bid"}]}"""
MARKETS = """[{"market":"KRW-BTC","korean_name":"비트코인","english_name":"Bitcoin",
  "market_event":{"warning":false,"caution":{"PRICE_FLUCTUATIONS":false,
  "TRADING_VOLUME_SOARING":true}}},
 {"market":"BTC-ETH","korean_name":"이더리움","english_name":"Ethereum"}]"""


def encode(message: Any) -> bytes:
    """JSON as the broker would republish it (Decimal as a number)."""
    return msgspec.json.Encoder(decimal_format="number").encode(message)


# ------------------------------------------------------------------------------ decoding


def test_market_list() -> None:
    markets = decode_rest_list(MARKETS, RestMarket)
    assert [m.market for m in markets] == ["KRW-BTC", "BTC-ETH"]
    event = markets[0].market_event
    assert event is not None
    assert event.warning is False
    assert event.caution["TRADING_VOLUME_SOARING"] is True
    assert markets[1].market_event is None
    assert markets[1].korean_name == "이더리움"


def test_accounts_are_exact_decimals() -> None:
    accounts = decode_rest_list(ACCOUNTS, RestAccount)
    assert accounts[1].balance == Decimal("2.00000000000000000000001")
    assert accounts[0].avg_buy_price == Decimal(0)
    assert accounts[0].unit_currency == "KRW"


def test_legacy_account_keys_are_tolerated() -> None:
    body = (
        b'[{"currency":"BTC","balance":"0.005","locked":"0.0",'
        b'"avg_krw_buy_price":"7446000","modified":false}]'
    )
    (account,) = decode_rest_list(body, RestAccount)
    assert account.balance == Decimal("0.005")
    assert account.avg_buy_price is None
    assert account.unit_currency is None


def test_order_with_trades_and_nulls() -> None:
    order = decode_rest(ORDER_WITH_TRADES, RestOrder)
    assert order.volume is None
    assert order.remaining_volume is None
    assert order.trades is not None
    assert len(order.trades) == 2
    assert order.trades[0].funds == Decimal("3200")
    assert order.trades[1].trend is None
    market_sell = decode_rest(
        b'{"uuid":"u","side":"ask","ord_type":"market","price":null,"state":"done",'
        b'"market":"KRW-LTC","created_at":"2021-03-21T14:43:40+09:00","trades_count":1}',
        RestOrder,
    )
    assert market_sell.price is None
    assert market_sell.trades is None


def test_orderbook_ticker_trade_candle_instruments() -> None:
    (book,) = decode_rest_list(ORDERBOOK, RestOrderbook)
    assert book.level == 10000
    assert book.orderbook_units == [
        OrderbookUnit(
            ask_price=148520000, bid_price=148490000, ask_size=0.0134662, bid_size=0.04296774
        )
    ]
    (ticker,) = decode_rest_list(TICKER, RestTicker)
    assert ticker.signed_change_price == -136000
    assert ticker.trade_date_kst == "20250704"
    trades = decode_rest_list(TRADES, RestTrade)
    assert trades[0].sequential_id == 17510687993360000
    assert trades[1].change_price == -0.00051711
    (candle,) = decode_rest_list(CANDLES, RestCandle)
    assert candle.unit == 1
    assert candle.first_day_of_period is None
    days = decode_rest(
        b'{"market":"KRW-BTC","candle_date_time_utc":"2018-04-18T00:00:00",'
        b'"candle_date_time_kst":"2018-04-18T09:00:00","opening_price":8450000,"high_price":8679000,'
        b'"low_price":8445000,"trade_price":8626000,"timestamp":1524046650532,'
        b'"candle_acc_trade_price":107184005903.68721,"candle_acc_trade_volume":12505.93101659,'
        b'"prev_closing_price":8450000,"change_price":176000,"change_rate":0.0208284024}',
        RestCandle,
    )
    assert days.unit is None
    assert days.change_rate == 0.0208284024
    (instrument,) = decode_rest_list(
        b'[{"market":"KRW-BTC","quote_currency":"KRW","tick_size":1000,"supported_levels":["1","10000"]}]',
        RestOrderbookInstrument,
    )
    assert instrument.supported_levels == [1.0, 10000.0]


def test_numeric_strings_are_accepted_but_garbage_is_not() -> None:
    body = (
        b'[{"market":"USDT-BTC","trade_date_utc":"2024-03-13","trade_time_utc":"10:59:31",'
        b'"timestamp":"1710327571922","trade_price":"73249.66500000","trade_volume":"0.00840925",'
        b'"prev_closing_price":"71126.14598036","change_price":"2123.51901964","ask_bid":"ASK",'
        b'"sequential_id":"17103275719220001"}]'
    )
    (trade,) = decode_rest_list(body, RestTrade)
    assert trade.timestamp == 1710327571922
    assert trade.trade_price == 73249.665
    assert trade.sequential_id == 17103275719220001
    with pytest.raises(DecodeError) as info:
        decode_rest_list(body.replace(b'"73249.66500000"', b'"abc"'), RestTrade)
    assert info.value.path == "$[0].trade_price"


@pytest.mark.parametrize(
    ("body", "name"),
    [
        (b'{"error":{"name":404,"message":"Code not found"}}', 404),
        (b'{"error":{"name":"invalid_parameter","message":"x"}}', "invalid_parameter"),
    ],
)
def test_error_bodies(body: bytes, name: int | str) -> None:
    error = decode_rest(body, RestError)
    assert error.error.name == name


@pytest.mark.parametrize(
    ("body", "kind", "path"),
    [
        (ORDERBOOK[:-3], RestOrderbook, None),
        (b"Too many API requests.", RestError, None),
        (b"\xff\xfe", RestError, None),
        (ORDER, RestOrder, "$"),  # an object where a list is expected
        (
            ORDERBOOK.replace(b'"ask_size":0.0134662,', b""),
            RestOrderbook,
            "$[0].orderbook_units[0].ask_size",
        ),
        (ACCOUNTS.replace(b'"1000000.0"', b'"1,000,000"'), RestAccount, "$[0].balance"),
    ],
    ids=["truncated", "text-body", "non-utf8", "object-not-list", "missing-nested", "bad-decimal"],
)
def test_malformed_rest_bodies(body: bytes, kind: type[Any], path: str | None) -> None:
    with pytest.raises(DecodeError) as info:
        decode_rest_list(body, kind)
    assert info.value.path == path


def test_single_body_decoder_rejects_a_list() -> None:
    with pytest.raises(DecodeError) as info:
        decode_rest(ORDERBOOK, RestOrderbook)
    assert info.value.path == "$"
    assert "RestOrderbook" in str(info.value)


# --------------------------------------------------------------------------- conversions


def test_ticker_conversion() -> None:
    (rest,) = decode_rest_list(TICKER, RestTicker)
    ticker = rest_ticker_to_ticker(rest)
    assert type(ticker) is Ticker
    assert ticker.code == "KRW-BTC"
    assert ticker.trade_price == 148601000
    assert (ticker.trade_date, ticker.trade_time) == ("20250704", "051400")
    assert ticker.timestamp == 1751606040403  # Upbit's own time by default
    assert ticker.trade_timestamp == 1751606040365
    assert ticker.signed_change_rate == -0.0009143656
    assert ticker.ask_bid is None
    assert ticker.acc_bid_volume is None
    assert ticker.stream_type == "REALTIME"
    snapshot = rest_ticker_to_ticker(rest, stream_type="SNAPSHOT", now_ms=1751606041000)
    assert (snapshot.timestamp, snapshot.stream_type) == (1751606041000, "SNAPSHOT")
    assert decode_frame(encode(ticker)) == [ticker]


def test_orderbook_conversion() -> None:
    (rest,) = decode_rest_list(ORDERBOOK, RestOrderbook)
    book = rest_orderbook_to_orderbook(rest)
    assert type(book) is Orderbook
    assert (book.code, book.level, book.timestamp) == ("KRW-BTC", 10000, 1751606867762)
    assert book.orderbook_units[0].bid_size == 0.04296774
    assert rest_orderbook_to_orderbook(rest, now_ms=5).timestamp == 5
    assert decode_frame(encode(book)) == [book]


def test_trade_conversion_sign_and_formats() -> None:
    rise, fall = (rest_trade_to_trade(t) for t in decode_rest_list(TRADES, RestTrade))
    assert type(rise) is Trade
    assert (rise.change, rise.change_price) == ("RISE", 206000)
    assert (fall.change, fall.change_price) == ("FALL", 0.00051711)
    assert (rise.trade_date, rise.trade_time) == ("2025-06-27", "23:59:59")
    assert rise.trade_timestamp == rise.timestamp == 1751068799336
    assert rise.sequential_id == 17510687993360000
    assert rise.best_ask_price is None
    assert decode_frame(encode(rise)) == [rise]
    compact = RestTrade(
        market="KRW-BTC",
        trade_date_utc="20180418",
        trade_time_utc="101958",
        timestamp=1524046798000,
        trade_price=8616000,
        trade_volume=0.03060688,
        prev_closing_price=8616000,
        ask_bid="ASK",
        sequential_id=1,
    )
    even = rest_trade_to_trade(compact, now_ms=1524046799000)
    assert (even.trade_date, even.trade_time) == ("2018-04-18", "10:19:58")
    assert (even.change, even.change_price, even.timestamp) == ("EVEN", 0, 1524046799000)


def test_trade_without_sequential_id_is_rejected() -> None:
    body = (
        b'[{"market":"KRW-BTC","trade_date_utc":"2018-04-18","trade_time_utc":"10:19:58",'
        b'"timestamp":1524046798000,"trade_price":8616000,"trade_volume":0.03060688,'
        b'"prev_closing_price":8450000,"chane_price":166000,"ask_bid":"ASK"}]'
    )
    (rest,) = decode_rest_list(body, RestTrade)
    with pytest.raises(DecodeError) as info:
        rest_trade_to_trade(rest)
    assert info.value.path == "$.sequential_id"


def test_candle_conversion() -> None:
    (rest,) = decode_rest_list(CANDLES, RestCandle)
    candle = rest_candle_to_candle(rest, "candle.1m")
    assert type(candle) is Candle1m
    assert candle.type == "candle.1m"
    assert candle.candle_acc_trade_price == 60018891.90054
    assert candle.timestamp == 1524046594584
    assert decode_frame(encode(candle)) == [candle]
    with pytest.raises(ValueError, match="unit 1"):
        rest_candle_to_candle(rest, "candle.3m")
    with pytest.raises(ValueError, match="not a WebSocket candle type"):
        rest_candle_to_candle(rest, "candle.1d")
    seconds = msgspec.structs.replace(rest, unit=None)
    assert type(rest_candle_to_candle(seconds, "candle.1s")) is Candle1s
    four_hours = msgspec.structs.replace(rest, unit=240)
    assert type(rest_candle_to_candle(four_hours, "candle.240m", now_ms=7)) is Candle240m


def test_order_conversion() -> None:
    order = rest_order_to_my_order(decode_rest(ORDER, RestOrder), now_ms=1751608900000)
    assert type(order) is MyOrder
    assert (order.code, order.ask_bid, order.order_type, order.state) == (
        "KRW-BTC",
        "BID",
        "limit",
        "done",
    )
    assert order.order_timestamp == 1751608800000  # 2025-07-04T06:00:00Z
    assert order.timestamp == 1751608900000
    assert order.paid_fee == Decimal("70000.0")
    assert order.trade_uuid is None
    assert order.is_maker is None
    assert decode_frame(encode(order)) == [order]


def test_order_conversion_fills_funds_and_average_from_trades() -> None:
    order = rest_order_to_my_order(decode_rest(ORDER_WITH_TRADES, RestOrder), 1)
    assert order.order_type == "price"
    assert order.executed_funds == Decimal("6151.2")
    assert order.avg_price == Decimal("6151.2") / Decimal("0.00003736")
    assert order.order_timestamp == 1754725931000


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"side": "buy"}, "$.side"),
        ({"created_at": "yesterday"}, "$.created_at"),
        ({"created_at": "2025-07-04T15:00:00"}, "$.created_at"),
    ],
)
def test_order_conversion_rejects_bad_values(change: dict[str, str], path: str) -> None:
    order = msgspec.structs.replace(decode_rest(ORDER, RestOrder), **change)
    with pytest.raises(DecodeError) as info:
        rest_order_to_my_order(order, 1)
    assert info.value.path == path


def test_accounts_conversion() -> None:
    asset = rest_accounts_to_my_asset(decode_rest_list(ACCOUNTS, RestAccount), now_ms=42)
    assert type(asset) is MyAsset
    assert asset.assets == [
        AssetBalance(currency="KRW", balance=Decimal("1000000.0"), locked=Decimal("0.0")),
        AssetBalance(
            currency="BTC", balance=Decimal("2.00000000000000000000001"), locked=Decimal("0.0")
        ),
    ]
    assert (asset.asset_uuid, asset.asset_timestamp, asset.timestamp) == (None, 42, 42)
    assert decode_frame(encode(asset)) == [asset]


@pytest.mark.parametrize("depth", [10_000, 100_000])
@pytest.mark.parametrize(
    "body",
    [
        lambda d: b"[" * d + b"]" * d,
        lambda d: b'{"a":' * d + b"1" + b"}" * d,
        lambda d: TICKER[:-2] + b',"extra":' + b"[" * d + b"]" * d + b"}]",
    ],
    ids=["arrays", "objects", "in-a-field"],
)
@pytest.mark.parametrize("kind", [RestTicker, RestOrder, RestError, RestMarket])
def test_deeply_nested_bodies_are_decode_errors(depth: int, body: Any, kind: type[Any]) -> None:
    """A REST body nested 10,000 deep raised RecursionError, past every handler."""
    data: bytes = body(depth)
    for decode in (decode_rest_list, decode_rest):
        with pytest.raises(DecodeError) as info:
            decode(data, kind)
        if "nested too deeply" in str(info.value):
            assert info.value.path is None
            assert isinstance(info.value.__cause__, RecursionError)
    with pytest.raises(DecodeError, match="nested too deeply"):
        decode_rest(b'{"a":' * depth + b"1" + b"}" * depth, kind)
    with pytest.raises(DecodeError, match="nested too deeply"):
        decode_rest_list(b"[" + b'{"a":' * depth + b"1" + b"}" * depth + b"]", kind)
