"""Upbit WebSocket messages (server → client) as msgspec Structs, and the frame decoder.

Field names and types follow docs/PROTOCOL.md §3. Every data struct (:class:`Ticker`,
:class:`Trade`, :class:`Orderbook`, the ``Candle*`` classes, :class:`MyOrder`,
:class:`MyAsset`) is a member of the tagged union :data:`UpbitData` on tag field
``"type"`` with Upbit's own type strings as tags; the class attribute ``type`` gives the
same string (``msg.type == "ticker"``). Structs are frozen and ``gc=False``.

Numbers: market data (prices, sizes, volumes, rates) are ``float``. Private money
amounts (MyOrder price/volumes/fees/funds/locked/avg_price/prevented_*, MyAsset
balance/locked) are ``decimal.Decimal``, decoded straight from the JSON number text so
``1386929.37231066771348207123`` keeps every digit. Ids and times (``sequential_id``,
``*timestamp``) are ``int`` (exact above 2**53). msgspec encodes Decimal as a JSON
*string* by default; use ``msgspec.json.Encoder(decimal_format="number")`` to
reproduce Upbit's wire form. Unknown keys (``trade_status``, ``market_state_for_ios``,
future additions) are ignored; fields Upbit omits in some eras (``stream_type``,
``best_*`` on trades, ``level`` on orderbooks, deprecated ticker flags) default to None.

Formats: :func:`decode_frame` accepts any frame (``bytes`` or ``str``): ``DEFAULT`` and
``SIMPLE`` (one object), ``JSON_LIST`` and ``SIMPLE_LIST`` (a non-empty array of
objects), plus ``{"status":"UP"}``, ``{"error":{...}}`` and the LIST_SUBSCRIPTIONS reply.
It always returns a list. SIMPLE messages come back as the *same* classes as DEFAULT
ones (decoded through private structs with the abbreviated keys, then converted), so
re-encoding them, e.g. inside a bus envelope, yields DEFAULT keys. :data:`SIMPLE_KEYS`
holds the key tables (useful to emit SIMPLE frames).

Speed: decoders are built once at import. A DEFAULT data object, or a JSON_LIST frame,
is one ``Decoder.decode`` call: no ``json.loads``, no dict. Measured with compact frames
(msgspec 0.22, CPython 3.11, this dev box): ticker 1.2 µs (~850k/s), trade 0.7 µs,
candle 0.5 µs, 30-level orderbook 4.4 µs, myOrder 3.1 µs; SIMPLE ticker 4.1 µs (second
decode + conversion); ``{"status":"UP"}`` 1.4 µs (key-inspection path).

Legacy frames (decision): the 2018 shape with ``"market"`` / ``"mk"`` instead of
``type``/``code`` (and no ``stream_type``) is **rejected** with a DecodeError whose
message starts "legacy 2018 Upbit frame". The current API never sends it (docs/PROTOCOL.md
§3), and decoding it would mean guessing the message type from its other keys.

Errors: anything malformed raises :class:`schemas.errors.DecodeError` with ``path`` set
to the bad field (``$.trade_price``, ``$[1].obu[0].ap`` ...): truncated JSON, invalid
UTF-8, wrong types, missing required fields, unknown ``type``, empty list frames, list
items that are not objects, and objects that are no Upbit message at all; also frames
nested too deeply to decode (path None), which msgspec reports as a RecursionError.
"""

import functools
import operator
import typing
from collections.abc import Mapping
from decimal import Decimal
from types import GenericAlias
from typing import Any, ClassVar, Final, TypeAlias

import msgspec
from msgspec import NODEFAULT, Raw, Struct

from schemas.errors import DECODE_FAILURES, DecodeError, wrap_msgspec_error

__all__ = [
    "CANDLE_TYPES",
    "DATA_TYPES",
    "SIMPLE_KEYS",
    "AssetBalance",
    "Candle",
    "Candle1m",
    "Candle1s",
    "Candle3m",
    "Candle5m",
    "Candle10m",
    "Candle15m",
    "Candle30m",
    "Candle60m",
    "Candle240m",
    "MyAsset",
    "MyOrder",
    "Orderbook",
    "OrderbookUnit",
    "Status",
    "SubscriptionEntry",
    "SubscriptionList",
    "Ticker",
    "Trade",
    "UpbitData",
    "UpbitError",
    "UpbitErrorBody",
    "UpbitMessage",
    "decode_frame",
]


class _Data(Struct, kw_only=True, frozen=True, gc=False, tag_field="type"):
    """Common config of the data structs (tagged on ``"type"``); not itself a message."""

    type: ClassVar[str]


class Ticker(_Data, tag="ticker", kw_only=True, frozen=True):
    """``ticker`` (현재가). Date ``yyyyMMdd``, time ``HHmmss`` (UTC), unlike trade.

    ``ask_bid`` / ``acc_ask_volume`` / ``acc_bid_volume`` are None only on tickers
    built from REST by the fallback (REST /v1/ticker lacks them).
    """

    type: ClassVar[str] = "ticker"
    code: str
    opening_price: float
    high_price: float
    low_price: float
    trade_price: float
    prev_closing_price: float
    change: str
    change_price: float
    signed_change_price: float
    change_rate: float
    signed_change_rate: float
    trade_volume: float
    acc_trade_volume: float
    acc_trade_volume_24h: float
    acc_trade_price: float
    acc_trade_price_24h: float
    trade_date: str
    trade_time: str
    trade_timestamp: int
    ask_bid: str | None = None
    acc_ask_volume: float | None = None
    acc_bid_volume: float | None = None
    highest_52_week_price: float | None = None
    highest_52_week_date: str | None = None
    lowest_52_week_price: float | None = None
    lowest_52_week_date: str | None = None
    market_state: str | None = None
    is_trading_suspended: bool | None = None
    delisting_date: str | None = None
    market_warning: str | None = None
    timestamp: int
    stream_type: str | None = None


class Trade(_Data, tag="trade", kw_only=True, frozen=True):
    """``trade`` (체결). Date ``yyyy-MM-dd``, time ``HH:mm:ss`` (UTC); ``best_*`` since 2024-11."""

    type: ClassVar[str] = "trade"
    code: str
    trade_price: float
    trade_volume: float
    ask_bid: str
    prev_closing_price: float
    change: str
    change_price: float
    trade_date: str
    trade_time: str
    trade_timestamp: int
    timestamp: int
    sequential_id: int
    best_ask_price: float | None = None
    best_ask_size: float | None = None
    best_bid_price: float | None = None
    best_bid_size: float | None = None
    stream_type: str | None = None


class OrderbookUnit(Struct, kw_only=True, frozen=True, gc=False):
    """One orderbook level: the i-th best ask paired with the i-th best bid."""

    ask_price: float
    bid_price: float
    ask_size: float
    bid_size: float


class Orderbook(_Data, tag="orderbook", kw_only=True, frozen=True):
    """``orderbook`` (호가): a full top-N snapshot every message; index 0 is the best level."""

    type: ClassVar[str] = "orderbook"
    code: str
    total_ask_size: float
    total_bid_size: float
    orderbook_units: list[OrderbookUnit]
    timestamp: int
    level: float | None = None
    stream_type: str | None = None


class Candle(_Data, kw_only=True, frozen=True):
    """Base of the ``candle.{unit}`` messages; decode yields one of its tagged subclasses."""

    code: str
    candle_date_time_utc: str
    candle_date_time_kst: str
    opening_price: float
    high_price: float
    low_price: float
    trade_price: float
    candle_acc_trade_volume: float
    candle_acc_trade_price: float
    timestamp: int
    stream_type: str | None = None


class Candle1s(Candle, tag="candle.1s", frozen=True):
    """1-second candle."""

    type: ClassVar[str] = "candle.1s"


class Candle1m(Candle, tag="candle.1m", frozen=True):
    """1-minute candle."""

    type: ClassVar[str] = "candle.1m"


class Candle3m(Candle, tag="candle.3m", frozen=True):
    """3-minute candle."""

    type: ClassVar[str] = "candle.3m"


class Candle5m(Candle, tag="candle.5m", frozen=True):
    """5-minute candle."""

    type: ClassVar[str] = "candle.5m"


class Candle10m(Candle, tag="candle.10m", frozen=True):
    """10-minute candle."""

    type: ClassVar[str] = "candle.10m"


class Candle15m(Candle, tag="candle.15m", frozen=True):
    """15-minute candle."""

    type: ClassVar[str] = "candle.15m"


class Candle30m(Candle, tag="candle.30m", frozen=True):
    """30-minute candle."""

    type: ClassVar[str] = "candle.30m"


class Candle60m(Candle, tag="candle.60m", frozen=True):
    """60-minute candle."""

    type: ClassVar[str] = "candle.60m"


class Candle240m(Candle, tag="candle.240m", frozen=True):
    """240-minute candle."""

    type: ClassVar[str] = "candle.240m"


class MyOrder(_Data, tag="myOrder", kw_only=True, frozen=True):
    """``myOrder`` (private): an order changed or filled. Money amounts are Decimal.

    Upbit sends many fields as null on some states (e.g. a fresh market buy), so all but
    the identity fields are optional. ``trade_*`` / ``is_maker`` are set when
    ``state == "trade"``.
    """

    type: ClassVar[str] = "myOrder"
    code: str
    uuid: str
    ask_bid: str
    order_type: str
    state: str
    trade_uuid: str | None = None
    price: Decimal | None = None
    avg_price: Decimal | None = None
    volume: Decimal | None = None
    remaining_volume: Decimal | None = None
    executed_volume: Decimal | None = None
    trades_count: int | None = None
    reserved_fee: Decimal | None = None
    remaining_fee: Decimal | None = None
    paid_fee: Decimal | None = None
    locked: Decimal | None = None
    executed_funds: Decimal | None = None
    time_in_force: str | None = None
    trade_fee: Decimal | None = None
    is_maker: bool | None = None
    identifier: str | None = None
    smp_type: str | None = None
    prevented_volume: Decimal | None = None
    prevented_locked: Decimal | None = None
    trade_timestamp: int | None = None
    order_timestamp: int | None = None
    timestamp: int
    stream_type: str | None = None


class AssetBalance(Struct, kw_only=True, frozen=True, gc=False):
    """One ``myAsset.assets[]`` item: available ``balance`` and ``locked`` in orders."""

    currency: str
    balance: Decimal
    locked: Decimal


class MyAsset(_Data, tag="myAsset", kw_only=True, frozen=True):
    """``myAsset`` (private): balances that changed. No ``code``.

    ``asset_uuid`` is None only on snapshots built from REST /v1/accounts.
    """

    type: ClassVar[str] = "myAsset"
    asset_uuid: str | None = None
    assets: list[AssetBalance]
    asset_timestamp: int
    timestamp: int
    stream_type: str | None = None


class Status(Struct, frozen=True, gc=False):
    """``{"status":"UP"}``: the reply to a text ``PING``."""

    status: str


class UpbitErrorBody(Struct, frozen=True, gc=False):
    """Inside an error frame: ``name`` is a code like ``INVALID_AUTH`` (int on some REST)."""

    name: str | int
    message: str


class UpbitError(Struct, frozen=True, gc=False):
    """``{"error":{"name":..,"message":..}}``: Upbit rejected a request (docs/PROTOCOL.md §5.1)."""

    error: UpbitErrorBody


class SubscriptionEntry(Struct, kw_only=True, frozen=True, gc=False):
    """One ``result[]`` item of a LIST_SUBSCRIPTIONS reply (``codes`` absent for myAsset)."""

    type: str
    codes: list[str] | None = None
    level: float | None = None


class SubscriptionList(Struct, kw_only=True, frozen=True, gc=False):
    """Reply to ``{"method":"LIST_SUBSCRIPTIONS"}``: what this connection is subscribed to."""

    method: str
    result: list[SubscriptionEntry]
    ticket: str | int | None = None


UpbitData: TypeAlias = (
    Ticker
    | Trade
    | Orderbook
    | Candle1s
    | Candle1m
    | Candle3m
    | Candle5m
    | Candle10m
    | Candle15m
    | Candle30m
    | Candle60m
    | Candle240m
    | MyOrder
    | MyAsset
)
"""Tagged union (tag field ``"type"``) of every Upbit data message."""

UpbitMessage: TypeAlias = UpbitData | Status | UpbitError | SubscriptionList
"""Anything :func:`decode_frame` can return."""

_DATA_CLASSES: Final[tuple[type[_Data], ...]] = typing.get_args(UpbitData)
DATA_TYPES: Final[dict[str, type]] = {cls.type: cls for cls in _DATA_CLASSES}
"""Upbit type string (``"ticker"``, ``"candle.1m"``, ...) → struct class."""
CANDLE_TYPES: Final[tuple[str, ...]] = tuple(t for t in DATA_TYPES if t.startswith("candle."))
"""The candle type strings, shortest interval first."""

# ------------------------------------------------------------------------------- SIMPLE


def _keys(table: str) -> dict[str, str]:
    """Parse ``"default=simple default=simple ..."`` into a key table."""
    return dict(pair.split("=", 1) for pair in table.split())


_CANDLE_KEYS: Final = _keys(
    """
    code=cd candle_date_time_utc=cdttmu candle_date_time_kst=cdttmk opening_price=op
    high_price=hp low_price=lp trade_price=tp candle_acc_trade_volume=catv
    candle_acc_trade_price=catp timestamp=tms stream_type=st
    """
)
SIMPLE_KEYS: Final[Mapping[type, Mapping[str, str]]] = {
    Ticker: _keys(
        """
        code=cd opening_price=op high_price=hp low_price=lp trade_price=tp
        prev_closing_price=pcp change=c change_price=cp signed_change_price=scp
        change_rate=cr signed_change_rate=scr trade_volume=tv acc_trade_volume=atv
        acc_trade_volume_24h=atv24h acc_trade_price=atp acc_trade_price_24h=atp24h
        trade_date=tdt trade_time=ttm trade_timestamp=ttms ask_bid=ab acc_ask_volume=aav
        acc_bid_volume=abv highest_52_week_price=h52wp highest_52_week_date=h52wdt
        lowest_52_week_price=l52wp lowest_52_week_date=l52wdt market_state=ms
        is_trading_suspended=its delisting_date=dd market_warning=mw timestamp=tms
        stream_type=st
        """
    ),
    Trade: _keys(
        """
        code=cd trade_price=tp trade_volume=tv ask_bid=ab prev_closing_price=pcp change=c
        change_price=cp trade_date=td trade_time=ttm trade_timestamp=ttms timestamp=tms
        sequential_id=sid best_ask_price=bap best_ask_size=bas best_bid_price=bbp
        best_bid_size=bbs stream_type=st
        """
    ),
    OrderbookUnit: _keys("ask_price=ap bid_price=bp ask_size=as bid_size=bs"),
    Orderbook: _keys(
        """
        code=cd total_ask_size=tas total_bid_size=tbs orderbook_units=obu timestamp=tms
        level=lv stream_type=st
        """
    ),
    Candle: _CANDLE_KEYS,
    **{DATA_TYPES[t]: _CANDLE_KEYS for t in CANDLE_TYPES},
    MyOrder: _keys(
        """
        code=cd uuid=uid ask_bid=ab order_type=ot state=s trade_uuid=tuid price=p
        avg_price=ap volume=v remaining_volume=rv executed_volume=ev trades_count=tc
        reserved_fee=rsf remaining_fee=rmf paid_fee=pf locked=l executed_funds=ef
        time_in_force=tif trade_fee=tf is_maker=im identifier=id smp_type=smpt
        prevented_volume=pv prevented_locked=pl trade_timestamp=ttms order_timestamp=otms
        timestamp=tms stream_type=st
        """
    ),
    AssetBalance: _keys("currency=cu balance=b locked=l"),
    MyAsset: _keys(
        "asset_uuid=astuid assets=ast asset_timestamp=asttms timestamp=tms stream_type=st"
    ),
    SubscriptionEntry: _keys("type=ty codes=cds level=lv"),
    SubscriptionList: _keys("method=mthd result=rslt ticket=tckt"),
}
"""SIMPLE-format key of every field, per class (docs/PROTOCOL.md §3 and §2.7 tables).

The SIMPLE tag field is ``"ty"`` (same values as ``type``). Candle subclasses share
the :class:`Candle` table.
"""


def _simple_twin(cls: type[Struct], tag: str | None, nested: Mapping[str, Any]) -> type[Struct]:
    """A private struct with ``cls``'s fields under their SIMPLE keys (``ty``-tagged)."""
    specs: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for field in msgspec.structs.fields(cls):
        ftype = nested.get(field.name, field.type)
        if field.default is NODEFAULT:
            specs.append((field.name, ftype))
        else:
            specs.append((field.name, ftype, field.default))
    options: dict[str, Any] = {}
    if tag is not None:
        options = {"tag_field": "ty", "tag": tag}
    return msgspec.defstruct(
        f"_{cls.__name__}Simple",
        specs,
        kw_only=True,
        gc=False,
        rename=dict(SIMPLE_KEYS[cls]),
        module=__name__,
        **options,
    )


def _list_of(item: Any) -> Any:
    """``list[item]`` for a class only known at runtime."""
    return GenericAlias(list, (item,))


_UNIT_SIMPLE: Final = _simple_twin(OrderbookUnit, None, {})
_ASSET_SIMPLE: Final = _simple_twin(AssetBalance, None, {})
_ENTRY_SIMPLE: Final = _simple_twin(SubscriptionEntry, None, {})
_NESTED: Final[Mapping[type, Mapping[str, Any]]] = {
    Orderbook: {"orderbook_units": _list_of(_UNIT_SIMPLE)},
    MyAsset: {"assets": _list_of(_ASSET_SIMPLE)},
}
_SIMPLE_TO_DEFAULT: Final[dict[type, type]] = {
    _simple_twin(cls, cls.type, _NESTED.get(cls, {})): cls for cls in _DATA_CLASSES
}
_SUBSCRIPTIONS_SIMPLE: Final = _simple_twin(
    SubscriptionList, None, {"result": _list_of(_ENTRY_SIMPLE)}
)
_SIMPLE_TO_DEFAULT[_SUBSCRIPTIONS_SIMPLE] = SubscriptionList

# ------------------------------------------------------------------------------ decoding

_ERRORS: Final = DECODE_FAILURES  # hostile nesting included: never a RecursionError out
_SIMPLE_DATA: Final[Any] = functools.reduce(
    operator.or_, [cls for cls, base in _SIMPLE_TO_DEFAULT.items() if base is not SubscriptionList]
)
# One decoder per format accepts both a single object and a list frame (JSON_LIST/SIMPLE_LIST).
_DEFAULT: Final[msgspec.json.Decoder[Any]] = msgspec.json.Decoder(UpbitData | list[UpbitData])
_SIMPLE: Final[msgspec.json.Decoder[Any]] = msgspec.json.Decoder(
    _SIMPLE_DATA | _list_of(_SIMPLE_DATA)
)
_TOP: Final[msgspec.json.Decoder[dict[str, Raw] | list[Raw]]] = msgspec.json.Decoder(
    dict[str, Raw] | list[Raw]
)
_KEYS: Final[msgspec.json.Decoder[dict[str, Raw]]] = msgspec.json.Decoder(dict[str, Raw])
_BY_KEY: Final[tuple[tuple[str, msgspec.json.Decoder[Any], str], ...]] = (
    # (key that identifies the shape, decoder, what it is); checked in this order
    ("type", msgspec.json.Decoder(UpbitData), "Upbit message"),
    ("ty", msgspec.json.Decoder(_SIMPLE_DATA), "Upbit SIMPLE message"),
    ("status", msgspec.json.Decoder(Status), "Upbit status frame"),
    ("error", msgspec.json.Decoder(UpbitError), "Upbit error frame"),
    ("method", msgspec.json.Decoder(SubscriptionList), "LIST_SUBSCRIPTIONS reply"),
    ("mthd", msgspec.json.Decoder(_SUBSCRIPTIONS_SIMPLE), "SIMPLE LIST_SUBSCRIPTIONS reply"),
)
_EMPTY_LIST: Final = (
    "invalid Upbit frame: empty list, a JSON_LIST/SIMPLE_LIST frame holds >= 1 message (at $)"
)


def decode_frame(data: bytes | str) -> list[UpbitMessage]:
    """Decode one WebSocket frame (any format) into its messages; raises DecodeError.

    A DEFAULT data object or JSON_LIST frame is a single msgspec decode; SIMPLE frames
    cost a second decode plus a conversion; anything else (status, error, subscription
    list, mixed lists, malformed input) falls back to key inspection.
    """
    try:
        decoded = _DEFAULT.decode(data)
    except _ERRORS:
        return _decode_simple_or_other(data)
    if type(decoded) is list:
        if not decoded:
            raise DecodeError(_EMPTY_LIST, path="$")
        return decoded
    return [decoded]


def _to_default(message: Any) -> Any:
    """Convert a private SIMPLE struct to its public class (a no-op for public ones)."""
    cls = _SIMPLE_TO_DEFAULT.get(type(message))
    if cls is None:
        return message
    return msgspec.convert(message, cls, from_attributes=True)


def _decode_simple_or_other(data: bytes | str) -> list[UpbitMessage]:
    """Second try: a SIMPLE / SIMPLE_LIST data frame, else the slow classifying path."""
    try:
        decoded = _SIMPLE.decode(data)
    except _ERRORS:
        return _decode_other(data)
    if type(decoded) is list:
        return [_to_default(item) for item in decoded]
    return [_to_default(decoded)]


def _decode_other(data: bytes | str) -> list[UpbitMessage]:
    """Slow path: find out what each object is from its keys, then decode it."""
    try:
        top = _TOP.decode(data)
    except _ERRORS as exc:
        raise wrap_msgspec_error(exc, "Upbit frame") from exc
    if isinstance(top, dict):
        return [_decode_object(data, top, "$")]
    if not top:
        raise DecodeError(_EMPTY_LIST, path="$")
    messages: list[UpbitMessage] = []
    for index, raw in enumerate(top):
        at = f"$[{index}]"
        try:
            keys = _KEYS.decode(raw)
        except _ERRORS as exc:
            raise wrap_msgspec_error(exc, "Upbit list frame item", at=at) from exc
        messages.append(_decode_object(raw, keys, at))
    return messages


def _decode_object(buf: bytes | str, keys: Mapping[str, Raw], at: str) -> UpbitMessage:
    """Decode one JSON object whose top-level keys are ``keys``; ``at`` is its path."""
    for key, decoder, what in _BY_KEY:
        if key in keys:
            try:
                message = decoder.decode(buf)
            except _ERRORS as exc:
                raise wrap_msgspec_error(exc, what, at=at) from exc
            return _to_default(message)  # type: ignore[no-any-return]
    for legacy in ("market", "mk"):
        if legacy in keys:
            raise DecodeError(
                f"legacy 2018 Upbit frame ({legacy!r} key instead of 'type'/'code'): "
                f"not supported, the current API always sends 'type' and 'code' (at {at}.{legacy})",
                path=f"{at}.{legacy}",
            )
    raise DecodeError(
        "invalid Upbit frame: object is no Upbit message (no 'type'/'ty', 'status', "
        f"'error' or 'method' key; keys: {sorted(keys)[:8]}) (at {at}.type)",
        path=f"{at}.type",
    )
