"""Upbit REST bodies a fallback poller needs (docs/PROTOCOL.md §8) and their conversion to
the WebSocket structs of :mod:`schemas.upbit`, so consumers see one shape whatever the
source.

Decoding (:func:`decode_rest`, :func:`decode_rest_list`) uses decoders built once per
struct and is **lenient on number spellings** (msgspec ``strict=False``): a numeric string
such as ``"73249.665"`` is accepted where a number is expected, because recorders and
some fixtures stringify numbers; genuinely wrong values (``"abc"``) still fail. Exchange
amounts (accounts, orders) are strings on the wire and decode to ``Decimal`` exactly.
Unknown keys are ignored; fields that only some endpoints/periods/eras send are
optional. Malformed input raises :class:`schemas.errors.DecodeError` with the path
(None for a body nested too deeply to decode, which msgspec reports as RecursionError).

Conversions keep Upbit's data times: ``timestamp`` of a converted ticker, orderbook,
trade or candle is the REST body's ``timestamp`` unless ``now_ms`` is given. Orders and
accounts carry no message time, so ``now_ms`` is required there. Fields REST does not
serve are None (e.g. a ticker's ``ask_bid``, a trade's ``best_*``, myAsset's
``asset_uuid``).
"""

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, TypeVar

import msgspec
from msgspec import Struct

from schemas.errors import DECODE_FAILURES, DecodeError, wrap_msgspec_error
from schemas.upbit import (
    CANDLE_TYPES,
    AssetBalance,
    Candle,
    MyAsset,
    MyOrder,
    Orderbook,
    OrderbookUnit,
    Ticker,
    Trade,
)

__all__ = [
    "RestAccount",
    "RestCandle",
    "RestError",
    "RestErrorBody",
    "RestMarket",
    "RestMarketEvent",
    "RestOrder",
    "RestOrderTrade",
    "RestOrderbook",
    "RestOrderbookInstrument",
    "RestOrderbookUnit",
    "RestTicker",
    "RestTrade",
    "decode_rest",
    "decode_rest_list",
    "order_created_ms",
    "rest_accounts_to_my_asset",
    "rest_candle_to_candle",
    "rest_order_birth",
    "rest_order_fills",
    "rest_order_to_my_order",
    "rest_orderbook_to_orderbook",
    "rest_ticker_to_ticker",
    "rest_trade_to_trade",
]

T = TypeVar("T")


class _Rest(Struct, kw_only=True, frozen=True, gc=False):
    """Common config of the REST structs."""


class RestMarketEvent(_Rest, kw_only=True, frozen=True):
    """``market_event`` of /v1/market/all?is_details=true: warning flag and caution flags."""

    warning: bool = False
    caution: dict[str, bool] = {}


class RestMarket(_Rest, kw_only=True, frozen=True):
    """One item of GET /v1/market/all (``market_event`` only with ``is_details=true``)."""

    market: str
    korean_name: str
    english_name: str
    market_warning: str | None = None
    market_event: RestMarketEvent | None = None


class RestTicker(_Rest, kw_only=True, frozen=True):
    """One item of GET /v1/ticker or /v1/ticker/all. Date ``yyyyMMdd``, time ``HHmmss``."""

    market: str
    trade_date: str
    trade_time: str
    trade_date_kst: str | None = None
    trade_time_kst: str | None = None
    trade_timestamp: int
    opening_price: float
    high_price: float
    low_price: float
    trade_price: float
    prev_closing_price: float
    change: str
    change_price: float
    change_rate: float
    signed_change_price: float
    signed_change_rate: float
    trade_volume: float
    acc_trade_price: float
    acc_trade_price_24h: float
    acc_trade_volume: float
    acc_trade_volume_24h: float
    highest_52_week_price: float | None = None
    highest_52_week_date: str | None = None
    lowest_52_week_price: float | None = None
    lowest_52_week_date: str | None = None
    timestamp: int


RestOrderbookUnit = OrderbookUnit
"""REST orderbook units have exactly the WebSocket unit's fields."""


class RestOrderbook(_Rest, kw_only=True, frozen=True):
    """One item of GET /v1/orderbook (``level`` absent before the grouping feature)."""

    market: str
    timestamp: int
    total_ask_size: float
    total_bid_size: float
    orderbook_units: list[OrderbookUnit]
    level: float | None = None


class RestOrderbookInstrument(_Rest, kw_only=True, frozen=True):
    """One item of GET /v1/orderbook/instruments: tick size and the grouping levels a
    market supports (levels are strings on the wire, floats here)."""

    market: str
    quote_currency: str | None = None
    tick_size: float | None = None
    supported_levels: list[float] = []


class RestTrade(_Rest, kw_only=True, frozen=True):
    """One item of GET /v1/trades/ticks. ``change_price`` is *signed* here (abs on WS).

    Date ``yyyy-MM-dd`` and time ``HH:mm:ss`` (UTC) under ``*_utc`` names. Very old docs
    examples lack ``sequential_id`` and misspell ``change_price``; both are optional.
    """

    market: str
    trade_date_utc: str
    trade_time_utc: str
    timestamp: int
    trade_price: float
    trade_volume: float
    prev_closing_price: float
    change_price: float | None = None
    ask_bid: str
    sequential_id: int | None = None


class RestCandle(_Rest, kw_only=True, frozen=True):
    """One item of GET /v1/candles/{seconds,minutes/N,days,weeks,months,years}.

    ``unit``: minutes only; ``prev_closing_price`` / ``change_*`` /
    ``converted_trade_price``: days; ``first_day_of_period``: weeks and longer.
    """

    market: str
    candle_date_time_utc: str
    candle_date_time_kst: str
    opening_price: float
    high_price: float
    low_price: float
    trade_price: float
    timestamp: int
    candle_acc_trade_price: float
    candle_acc_trade_volume: float
    unit: int | None = None
    prev_closing_price: float | None = None
    change_price: float | None = None
    change_rate: float | None = None
    converted_trade_price: float | None = None
    first_day_of_period: str | None = None


class RestAccount(_Rest, kw_only=True, frozen=True):
    """One item of GET /v1/accounts; amounts are strings on the wire, Decimal here."""

    currency: str
    balance: Decimal
    locked: Decimal
    avg_buy_price: Decimal | None = None
    avg_buy_price_modified: bool | None = None
    unit_currency: str | None = None


class RestOrderTrade(_Rest, kw_only=True, frozen=True):
    """One fill in ``trades[]`` of GET /v1/order."""

    market: str
    uuid: str
    price: Decimal
    volume: Decimal
    funds: Decimal
    side: str
    trend: str | None = None
    created_at: str | None = None


class RestOrder(_Rest, kw_only=True, frozen=True):
    """An order object (POST /v1/orders, GET/DELETE /v1/order, the order lists).

    ``side`` is ``bid``/``ask``; ``ord_type`` ``limit``/``price``/``market``/``best``;
    ``trades`` only on single-order queries. Market orders send ``price`` or
    ``volume`` as null/absent.
    """

    uuid: str
    side: str
    ord_type: str
    price: Decimal | None = None
    state: str
    market: str
    created_at: str
    volume: Decimal | None = None
    remaining_volume: Decimal | None = None
    executed_volume: Decimal | None = None
    reserved_fee: Decimal | None = None
    remaining_fee: Decimal | None = None
    paid_fee: Decimal | None = None
    locked: Decimal | None = None
    trades_count: int | None = None
    avg_price: Decimal | None = None
    executed_funds: Decimal | None = None
    time_in_force: str | None = None
    identifier: str | None = None
    smp_type: str | None = None
    prevented_volume: Decimal | None = None
    prevented_locked: Decimal | None = None
    trades: list[RestOrderTrade] | None = None


class RestErrorBody(_Rest, frozen=True):
    """Inside a REST error: ``name`` is the HTTP status (int) on quotation endpoints and
    a string code (``invalid_parameter``) on exchange endpoints."""

    name: int | str
    message: str


class RestError(_Rest, frozen=True):
    """A REST error body ``{"error":{"name":..,"message":..}}`` (docs/PROTOCOL.md §5.2)."""

    error: RestErrorBody


# ------------------------------------------------------------------------------ decoding

_ERRORS: Final = DECODE_FAILURES  # hostile nesting included: never a RecursionError out
_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(target: Any) -> msgspec.json.Decoder[Any]:
    """The cached lenient decoder for ``target`` (built on first use)."""
    decoder = _DECODERS.get(target)
    if decoder is None:
        decoder = _DECODERS[target] = msgspec.json.Decoder(target, strict=False)
    return decoder


for _kind in (
    RestMarket,
    RestTicker,
    RestOrderbook,
    RestOrderbookInstrument,
    RestTrade,
    RestCandle,
    RestAccount,
    RestOrder,
    RestError,
):
    _decoder(_kind)
    _decoder(list[_kind])  # type: ignore[valid-type]


def decode_rest(data: bytes | str, kind: type[T]) -> T:
    """Decode one REST body (a single JSON object) as ``kind``; raises DecodeError."""
    try:
        return _decoder(kind).decode(data)  # type: ignore[no-any-return]
    except _ERRORS as exc:
        raise wrap_msgspec_error(exc, f"REST {kind.__name__}") from exc


def decode_rest_list(data: bytes | str, kind: type[T]) -> list[T]:
    """Decode a REST body that is a JSON array of ``kind``; raises DecodeError."""
    try:
        return _decoder(list[kind]).decode(data)  # type: ignore[valid-type, no-any-return]
    except _ERRORS as exc:
        raise wrap_msgspec_error(exc, f"REST list of {kind.__name__}") from exc


# --------------------------------------------------------------------------- conversions


def _compact(text: str) -> str:
    """``2025-06-27`` / ``23:59:59`` → ``20250627`` / ``235959`` (WS ticker style)."""
    return text.replace("-", "").replace(":", "")


def _dashed_date(text: str) -> str:
    """``20250627`` → ``2025-06-27`` (WS trade style); other spellings unchanged."""
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


def _colon_time(text: str) -> str:
    """``235959`` → ``23:59:59`` (WS trade style); other spellings unchanged."""
    if len(text) == 6 and text.isdigit():
        return f"{text[:2]}:{text[2:4]}:{text[4:]}"
    return text


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND: Final = timedelta(milliseconds=1)


def _iso_to_ms(text: str, path: str) -> int:
    """Epoch milliseconds of an ISO-8601 time with offset (``...T15:42:23+09:00``)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise DecodeError(f"invalid ISO-8601 time {text!r}", path=path) from exc
    if moment.tzinfo is None:
        raise DecodeError(f"ISO-8601 time without UTC offset {text!r}", path=path)
    return (moment - _EPOCH) // _MILLISECOND


def rest_ticker_to_ticker(
    t: RestTicker, *, stream_type: str = "REALTIME", now_ms: int | None = None
) -> Ticker:
    """A WS :class:`Ticker` from a REST ticker (``ask_bid``/``acc_*_volume``/states None)."""
    return Ticker(
        code=t.market,
        opening_price=t.opening_price,
        high_price=t.high_price,
        low_price=t.low_price,
        trade_price=t.trade_price,
        prev_closing_price=t.prev_closing_price,
        change=t.change,
        change_price=t.change_price,
        signed_change_price=t.signed_change_price,
        change_rate=t.change_rate,
        signed_change_rate=t.signed_change_rate,
        trade_volume=t.trade_volume,
        acc_trade_volume=t.acc_trade_volume,
        acc_trade_volume_24h=t.acc_trade_volume_24h,
        acc_trade_price=t.acc_trade_price,
        acc_trade_price_24h=t.acc_trade_price_24h,
        trade_date=_compact(t.trade_date),
        trade_time=_compact(t.trade_time),
        trade_timestamp=t.trade_timestamp,
        highest_52_week_price=t.highest_52_week_price,
        highest_52_week_date=t.highest_52_week_date,
        lowest_52_week_price=t.lowest_52_week_price,
        lowest_52_week_date=t.lowest_52_week_date,
        timestamp=t.timestamp if now_ms is None else now_ms,
        stream_type=stream_type,
    )


def rest_orderbook_to_orderbook(
    o: RestOrderbook, *, stream_type: str = "REALTIME", now_ms: int | None = None
) -> Orderbook:
    """A WS :class:`Orderbook` from a REST orderbook (units are shared, they are frozen)."""
    return Orderbook(
        code=o.market,
        total_ask_size=o.total_ask_size,
        total_bid_size=o.total_bid_size,
        orderbook_units=list(o.orderbook_units),
        timestamp=o.timestamp if now_ms is None else now_ms,
        level=o.level,
        stream_type=stream_type,
    )


def rest_trade_to_trade(
    t: RestTrade, *, stream_type: str = "REALTIME", now_ms: int | None = None
) -> Trade:
    """A WS :class:`Trade` from a REST trade tick.

    ``change`` comes from the sign of REST's signed ``change_price`` (or of
    ``trade_price - prev_closing_price`` when absent) and ``change_price`` becomes its
    absolute value, as on WS. ``trade_timestamp`` is REST's ``timestamp``. A tick with
    no ``sequential_id`` cannot be deduplicated and raises DecodeError.
    """
    if t.sequential_id is None:
        raise DecodeError("REST trade has no sequential_id", path="$.sequential_id")
    signed = t.change_price
    if signed is None:
        signed = t.trade_price - t.prev_closing_price
    change = "RISE" if signed > 0 else "FALL" if signed < 0 else "EVEN"
    return Trade(
        code=t.market,
        trade_price=t.trade_price,
        trade_volume=t.trade_volume,
        ask_bid=t.ask_bid,
        prev_closing_price=t.prev_closing_price,
        change=change,
        change_price=abs(signed),
        trade_date=_dashed_date(t.trade_date_utc),
        trade_time=_colon_time(t.trade_time_utc),
        trade_timestamp=t.timestamp,
        timestamp=t.timestamp if now_ms is None else now_ms,
        sequential_id=t.sequential_id,
        stream_type=stream_type,
    )


_CANDLE_CLASSES: Final[dict[str, type[Candle]]] = {cls.type: cls for cls in Candle.__subclasses__()}


def rest_candle_to_candle(
    c: RestCandle, type_: str, *, stream_type: str = "REALTIME", now_ms: int | None = None
) -> Candle:
    """A WS candle of type ``type_`` (``"candle.1m"``...) from a REST candle.

    Raises ValueError if ``type_`` is no WS candle type or contradicts the REST
    ``unit`` (a ``minutes/3`` candle cannot become ``candle.1m``).
    """
    cls = _CANDLE_CLASSES.get(type_)
    if cls is None:
        raise ValueError(f"not a WebSocket candle type: {type_!r} (one of {CANDLE_TYPES})")
    if c.unit is not None and type_ != f"candle.{c.unit}m":
        raise ValueError(f"REST candle of unit {c.unit} minutes cannot become {type_!r}")
    return cls(
        code=c.market,
        candle_date_time_utc=c.candle_date_time_utc,
        candle_date_time_kst=c.candle_date_time_kst,
        opening_price=c.opening_price,
        high_price=c.high_price,
        low_price=c.low_price,
        trade_price=c.trade_price,
        candle_acc_trade_volume=c.candle_acc_trade_volume,
        candle_acc_trade_price=c.candle_acc_trade_price,
        timestamp=c.timestamp if now_ms is None else now_ms,
        stream_type=stream_type,
    )


_SIDES: Final = {"bid": "BID", "ask": "ASK"}


def _sum(values: Iterable[Decimal]) -> Decimal:
    """Exact Decimal sum (``sum()`` would start from int 0 and type as ``Decimal | int``)."""
    total = Decimal(0)
    for value in values:
        total += value
    return total


def rest_order_to_my_order(o: RestOrder, now_ms: int, *, stream_type: str = "REALTIME") -> MyOrder:
    """A WS :class:`MyOrder` (an order-state event, not a fill) from a REST order.

    ``side`` bid/ask → ``ask_bid`` BID/ASK, ``ord_type`` → ``order_type``,
    ``created_at`` → ``order_timestamp`` (ms), ``timestamp`` = ``now_ms``. Missing
    ``executed_funds`` / ``avg_price`` are computed from ``trades[]`` when present, and
    ``trade_timestamp`` is the last fill's time there.
    """
    ask_bid = _SIDES.get(o.side)
    if ask_bid is None:
        raise DecodeError(f"REST order side {o.side!r} is neither 'bid' nor 'ask'", path="$.side")
    executed_funds = o.executed_funds
    avg_price = o.avg_price
    if o.trades:
        funds = _sum(trade.funds for trade in o.trades)
        volume = _sum(trade.volume for trade in o.trades)
        if executed_funds is None:
            executed_funds = funds
        if avg_price is None and volume:
            avg_price = funds / volume
    return MyOrder(
        code=o.market,
        uuid=o.uuid,
        ask_bid=ask_bid,
        order_type=o.ord_type,
        state=o.state,
        price=o.price,
        avg_price=avg_price,
        volume=o.volume,
        remaining_volume=o.remaining_volume,
        executed_volume=o.executed_volume,
        trades_count=o.trades_count,
        reserved_fee=o.reserved_fee,
        remaining_fee=o.remaining_fee,
        paid_fee=o.paid_fee,
        locked=o.locked,
        executed_funds=executed_funds,
        time_in_force=o.time_in_force,
        identifier=o.identifier,
        smp_type=o.smp_type,
        prevented_volume=o.prevented_volume,
        prevented_locked=o.prevented_locked,
        trade_timestamp=_last_fill_ms(o),
        order_timestamp=_iso_to_ms(o.created_at, "$.created_at"),
        timestamp=now_ms,
        stream_type=stream_type,
    )


def _fill_ms(fill: RestOrderTrade) -> int | None:
    """Time of one fill; None when absent or unreadable (Upbit's own docs show a
    truncated offset there): a fill's time is informative, never worth the order."""
    if fill.created_at is None:
        return None
    try:
        return _iso_to_ms(fill.created_at, "$.trades[].created_at")
    except DecodeError:
        return None


def _last_fill_ms(o: RestOrder) -> int | None:
    """Time of the order's last fill in ``trades[]`` (None without one)."""
    return _fill_ms(o.trades[-1]) if o.trades else None


def order_created_ms(o: RestOrder) -> int:
    """Epoch milliseconds of an order's ``created_at`` (DecodeError if it is no ISO time)."""
    return _iso_to_ms(o.created_at, "$.created_at")


def rest_order_birth(o: RestOrder, now_ms: int, *, stream_type: str = "REALTIME") -> MyOrder:
    """The ``wait`` (or ``watch``) event the order had when it was placed.

    Rebuilt from a later REST view: nothing executed, the whole volume remaining; what
    that view cannot tell of the start (``locked``, ``avg_price``) is None.
    """
    ev = rest_order_to_my_order(o, now_ms, stream_type=stream_type)
    zero = Decimal(0)
    return msgspec.structs.replace(
        ev,
        state="watch" if o.state == "watch" else "wait",
        avg_price=None,
        remaining_volume=o.volume,
        executed_volume=zero,
        trades_count=0,
        remaining_fee=o.reserved_fee,
        paid_fee=zero,
        locked=None,
        executed_funds=zero,
        prevented_volume=None,
        prevented_locked=None,
    )


def rest_order_fills(o: RestOrder, now_ms: int, *, stream_type: str = "REALTIME") -> list[MyOrder]:
    """One ``trade`` event per item of ``o.trades`` (GET /v1/order), as the WebSocket
    sends them: the fill's ``trade_uuid``, price and volume, the order's running totals.

    ``is_maker`` follows from ``trend`` (``up``: a buyer took liquidity); REST has no
    per-fill fee, so ``trade_fee``, ``paid_fee``, ``remaining_fee`` and ``locked`` are None.
    """
    base = rest_order_to_my_order(o, now_ms, stream_type=stream_type)
    events: list[MyOrder] = []
    volume = funds = Decimal(0)
    for i, fill in enumerate(o.trades or (), start=1):
        volume += fill.volume
        funds += fill.funds
        at = _fill_ms(fill)
        is_maker = None if fill.trend is None else (fill.trend == "up") != (o.side == "bid")
        events.append(
            msgspec.structs.replace(
                base,
                state="trade",
                trade_uuid=fill.uuid,
                price=fill.price,
                volume=fill.volume,
                avg_price=funds / volume if volume else None,
                remaining_volume=None if o.volume is None else o.volume - volume,
                executed_volume=volume,
                trades_count=i,
                remaining_fee=None,
                paid_fee=None,
                locked=None,
                executed_funds=funds,
                trade_fee=None,
                is_maker=is_maker,
                trade_timestamp=at,
            )
        )
    return events


def rest_accounts_to_my_asset(
    accounts: Sequence[RestAccount], now_ms: int, *, stream_type: str = "REALTIME"
) -> MyAsset:
    """A WS :class:`MyAsset` listing every account balance (``asset_uuid`` None)."""
    return MyAsset(
        assets=[
            AssetBalance(currency=a.currency, balance=a.balance, locked=a.locked) for a in accounts
        ],
        asset_timestamp=now_ms,
        timestamp=now_ms,
        stream_type=stream_type,
    )
