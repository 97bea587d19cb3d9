"""The bus protocol shared by the broker and its clients.

Two planes, both msgpack-encoded with msgspec:

* **data** — the broker's PUB socket sends single-frame messages
  ``topic + b"\\x00" + [envelope, ...]`` (:func:`pack_published` /
  :func:`split_published` / :func:`decode_batch`). ``topic`` is ASCII built by
  :func:`topic_for`, so a SUB subscribes by topic prefix as usual; then comes a msgpack
  array of 1 to :data:`MAX_BATCH` envelopes of that topic (at most
  :data:`MAX_BATCH_BYTES` of them, unless one is larger), oldest first. An
  :class:`Envelope` carries a per-topic sequence number, the broker epoch, the receive
  time, the source (``websocket`` or ``rest``) and the typed payload (an Upbit struct
  from :mod:`schemas.upbit`, a :class:`StatusEvent` or a :class:`BrokerHeartbeat`).
  The broker batches what one topic got in one event-loop turn (protocol 3): under
  load a ZeroMQ message, with its ``send``, ``recv`` and I/O-thread work on both ends,
  carries many Upbit messages instead of one, at no added latency.
* **control** — a client's DEALER talks to the broker's ROUTER with single-frame
  messages: a :data:`ClientMessage` up, a :data:`BrokerMessage` down.

Topic layout (the one place it is written down)::

    ticker/KRW-BTC/                 trade/KRW-BTC/            candle.1m/KRW-BTC/
    orderbook/KRW-BTC/30/0/         (code / depth / grouping level)
    myOrder/KRW-BTC/                (one topic per market; "myOrder/" = all markets)
    myAsset/
    _status/public/  _status/private/                      _heartbeat/
    _client/                        (made by the client library itself, never published)

Every topic ends with ``/`` so ``ticker/KRW-ETH/`` never prefix-matches
``ticker/KRW-ETHW/``. Useful prefixes: ``ticker/`` (all tickers), ``myOrder/``
(all orders), ``_status/`` (every status event).

Endpoints: :func:`default_endpoints` says where the local broker listens
(``UPBIT_BROKER_CONTROL`` / ``UPBIT_BROKER_DATA``, else ipc sockets in the per-user
runtime directory); it only computes, creating and checking nothing (the broker
creates and guards the directory, :mod:`broker.config`).

Decoders are built once at import and reused. Malformed input raises
:class:`schemas.errors.DecodeError` with the path of the bad field.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Final, Literal

import msgspec

from schemas.errors import DECODE_FAILURES, DecodeError, wrap_msgspec_error
from schemas.rest import (
    RestAccount,
    RestCandle,
    RestMarket,
    RestOrder,
    RestOrderbook,
    RestTicker,
    RestTrade,
)
from schemas.upbit import CANDLE_TYPES, UpbitData

__all__ = [
    "ALL_STREAM_TYPES",
    "BROKER_STOPPING",
    "CLIENT_TOPIC",
    "CONTROL_ENV",
    "DATA_ENV",
    "DEFAULT_ORDERBOOK_DEPTH",
    "HEARTBEAT_TOPIC",
    "IPC_PATH_MAX",
    "MAX_BATCH",
    "MAX_BATCH_BYTES",
    "MAX_MESSAGE_BYTES",
    "ORDERBOOK_DEPTHS",
    "PRIVATE_STREAM_TYPES",
    "PROTOCOL_VERSION",
    "PUBLIC_STREAM_TYPES",
    "STATUS_TOPIC_PREFIX",
    "TOPIC_END",
    "AccountKind",
    "AccountQuery",
    "BrokerHeartbeat",
    "BrokerMessage",
    "Bye",
    "CancelOrder",
    "CancelledOrder",
    "ChanceMarket",
    "ChanceSide",
    "ClientMessage",
    "ClientMetrics",
    "ConnectionHealth",
    "DecodeError",
    "EndpointError",
    "Envelope",
    "ErrorCode",
    "ErrorReply",
    "GetSnapshot",
    "HandlerMetrics",
    "Health",
    "HealthReply",
    "HealthRequest",
    "Heartbeat",
    "Hello",
    "Metrics",
    "MetricsReply",
    "MetricsRequest",
    "OrderChance",
    "OrderReply",
    "Payload",
    "PlaceOrder",
    "Quote",
    "QuoteKind",
    "QuoteReply",
    "SnapshotReply",
    "StatusEvent",
    "StatusState",
    "StreamSpec",
    "Subscribe",
    "SubscribeOk",
    "Unsubscribe",
    "UnsubscribeOk",
    "Welcome",
    "batch_header",
    "decode_batch",
    "decode_broker_message",
    "decode_client_message",
    "decode_envelope",
    "default_endpoints",
    "encode",
    "format_level",
    "pack_published",
    "runtime_dir_path",
    "split_published",
    "status_topic",
    "topic_for",
]

PROTOCOL_VERSION: Final = 3
"""Bumped on any incompatible change; a broker refuses a hello with another version.

3: a data message carries a batch, ``topic + TOPIC_END + [envelope, ...]``.
2: one envelope per message, ``topic + TOPIC_END + envelope`` (1: two frames).
"""

MAX_BATCH: Final = 16
"""Most envelopes one published message carries."""

MAX_BATCH_BYTES: Final = 8192
"""Most bytes of envelopes one published message carries, unless one envelope is larger.

ZeroMQ's high-water marks count messages, so this bounds what a stalled client can
hold: ``UPBIT_BROKER_SEND_HWM`` frames of at most 8 KB (three 30-level orderbooks, ten
tickers, sixteen trades). 8 KB is also what ZeroMQ's I/O thread writes at a time.
"""

MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
"""Largest ZeroMQ message a bus peer accepts (``zmq.MAXMSGSIZE``), 16 MiB.

A published message holds at most :data:`MAX_BATCH_BYTES` of envelopes unless one
envelope is larger (a 30-level orderbook is a few KB); the big legitimate messages are
control replies (a snapshot of every held stream, metrics with one row per client), a
few MB at the very most. 16 MiB sits far above both, and a hostile or broken peer
cannot make the reader allocate more than that for one message: ZeroMQ drops the
connection instead.
"""

TOPIC_END: Final = b"\x00"
"""Ends the topic in a published message; topics are ASCII and never contain it."""

PUBLIC_STREAM_TYPES: Final[frozenset[str]] = frozenset(
    {"ticker", "trade", "orderbook", *CANDLE_TYPES}
)
PRIVATE_STREAM_TYPES: Final[frozenset[str]] = frozenset({"myOrder", "myAsset"})
ALL_STREAM_TYPES: Final[frozenset[str]] = PUBLIC_STREAM_TYPES | PRIVATE_STREAM_TYPES
ORDERBOOK_DEPTHS: Final[tuple[int, ...]] = (1, 5, 15, 30)
"""Depths Upbit serves (``CODE.N``); anything else falls back to 30 upstream."""
DEFAULT_ORDERBOOK_DEPTH: Final = 30
"""Levels of an orderbook asked for without a depth (what Upbit sends by default)."""

STATUS_TOPIC_PREFIX: Final = "_status/"
BROKER_STOPPING: Final = "broker stopping"
"""``detail`` of the ``down`` status a broker publishes on its status topics as it stops
on purpose: clients report ``down`` at once instead of waiting for silence."""
HEARTBEAT_TOPIC: Final = "_heartbeat/"
CLIENT_TOPIC: Final = "_client/"
"""Topic of the status notices a client library makes itself (broker lost / restored,
``seq`` 0); never published by the broker."""

Source = Literal["websocket", "rest"]
ConnectionName = Literal["public", "private"]


def format_level(level: float | None) -> str:
    """Canonical text for an orderbook grouping level: ``10000``, ``0.1``, ``0``."""
    if not level:
        return "0"
    if float(level).is_integer():
        return str(int(level))
    return repr(float(level))


def topic_for(
    type_: str, code: str | None = None, depth: int | None = None, level: float | None = None
) -> str:
    """The PUB topic of one stream; see the module docstring for the layout."""
    if type_ == "myAsset":
        return "myAsset/"
    if code is None:
        if type_ == "myOrder":
            return "myOrder/"
        raise ValueError(f"stream type {type_!r} needs a market code")
    if type_ == "orderbook":
        return f"orderbook/{code}/{depth or DEFAULT_ORDERBOOK_DEPTH}/{format_level(level)}/"
    return f"{type_}/{code}/"


def status_topic(connection: ConnectionName) -> str:
    """Topic of the status events about one upstream connection."""
    return f"{STATUS_TOPIC_PREFIX}{connection}/"


# ----------------------------------------------------------------------------- endpoints

CONTROL_ENV: Final = "UPBIT_BROKER_CONTROL"
"""Environment variable naming the broker's control (ROUTER) endpoint."""
DATA_ENV: Final = "UPBIT_BROKER_DATA"
"""Environment variable naming the broker's data (PUB) endpoint."""
IPC_PATH_MAX: Final = 107
"""Longest ``ipc://`` path the kernel accepts (sun_path is 108 bytes with the NUL)."""
_SCHEMES: Final = frozenset({"ipc", "tcp", "inproc"})


class EndpointError(ValueError):
    """An endpoint setting is unusable; the message names the variable."""


def runtime_dir_path(env: Mapping[str, str]) -> Path:
    """Where the per-user ipc sockets live; computed only, nothing is created.

    ``$XDG_RUNTIME_DIR/upbit-broker``, else ``upbit-broker-<uid>`` in the temporary
    directory (``tempfile.tempdir``, ``TMPDIR``, ``TEMP``, ``TMP``, else ``/tmp``).
    """
    base = env.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "upbit-broker"
    temp = (
        tempfile.tempdir or env.get("TMPDIR") or env.get("TEMP") or env.get("TMP") or "/tmp"  # noqa: S108
    )
    return Path(os.path.abspath(temp)) / f"upbit-broker-{os.getuid()}"


def _endpoint(env: Mapping[str, str], name: str, default_file: str) -> str:
    value = env.get(name)
    if not value:
        value = f"ipc://{runtime_dir_path(env) / default_file}"
        if len(value.encode()) - len("ipc://") > IPC_PATH_MAX:
            raise EndpointError(
                f"{name} is unset and the default ipc path {value} is longer than "
                f"{IPC_PATH_MAX} bytes: set {name} (or a shorter XDG_RUNTIME_DIR)"
            )
        return value
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in _SCHEMES or not rest:
        raise EndpointError(
            f"{name}={value!r} is not a ZeroMQ endpoint (ipc://PATH, tcp://HOST:PORT or "
            "inproc://NAME)"
        )
    if scheme == "ipc" and len(rest.encode()) > IPC_PATH_MAX:
        raise EndpointError(
            f"{name}: ipc path is {len(rest.encode())} bytes; the limit is {IPC_PATH_MAX}"
        )
    return value


def default_endpoints(env: Mapping[str, str]) -> tuple[str, str]:
    """``(control, data)`` endpoints of the local broker, from ``env`` or the defaults.

    Pure: validates and computes, creates nothing. Raises :class:`EndpointError` (a
    ValueError) naming the variable when a value is unusable.
    """
    return (
        _endpoint(env, CONTROL_ENV, "control.sock"),
        _endpoint(env, DATA_ENV, "data.sock"),
    )


class StreamSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    """One stream a client wants: a type, a market code and orderbook options.

    ``code`` is None for ``myAsset`` and for ``myOrder`` on every market. ``depth`` and
    ``level`` apply to ``orderbook`` only (None means Upbit's defaults:
    :data:`DEFAULT_ORDERBOOK_DEPTH` and 0).
    """

    type: str
    code: str | None = None
    depth: int | None = None
    level: float | None = None

    @property
    def topic(self) -> str:
        """The topic this stream is published on (and the SUB prefix to use)."""
        return topic_for(self.type, self.code, self.depth, self.level)

    @property
    def is_private(self) -> bool:
        """True for streams that need API keys (myOrder, myAsset)."""
        return self.type in PRIVATE_STREAM_TYPES


# ---------------------------------------------------------------------------- data plane


StatusState = Literal[
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
]
"""Every value :attr:`StatusEvent.state` takes; see :class:`StatusEvent` for each."""


class StatusEvent(msgspec.Struct, tag="status", tag_field="type", omit_defaults=True):
    """A machine-readable event about an upstream connection or a topic.

    ``state`` (:data:`StatusState`) is one of:

    * ``connecting`` - the first connection to Upbit is being opened;
    * ``up`` - the connection carries data (it answered a ping);
    * ``idle`` - the connection is closed on purpose: nobody wants its streams;
    * ``down`` - the connection was lost (or the client lost the broker); data stops;
    * ``reconnecting`` - a connection that was up is being opened again;
    * ``restored`` - it is back after ``reconnecting`` (or the client re-subscribed to
      a restarted broker); streams were requested again;
    * ``stale`` - the connection is up but a topic's data is older than it should be;
    * ``gap`` - on a data topic: updates may have been missed before the next one;
    * ``source_rest`` / ``source_websocket`` - the topic's data now comes from REST
      polling / from the WebSocket stream again;
    * ``error`` - Upbit (or the broker) rejected a request for these streams;
    * ``auth_failed`` - Upbit refused the broker's API keys: private streams cannot
      run until the keys are fixed.
    """

    connection: ConnectionName
    state: StatusState
    detail: str = ""
    topics: list[str] = []
    timestamp: int = 0


class BrokerHeartbeat(msgspec.Struct, tag="heartbeat", tag_field="type"):
    """Published on ``_heartbeat/`` while the bus is idle: a quiet market, not a dead broker."""

    timestamp: int


Payload = UpbitData | StatusEvent | BrokerHeartbeat


class Envelope(msgspec.Struct, array_like=True):
    """One published message: per-topic sequence, epoch, times, source and payload.

    ``seq`` starts at 1 per topic per epoch and grows by one per message, so a client
    that sees ``seq`` jump knows it missed messages. ``recv_ns`` is the broker's
    wall-clock receive time (``time.time_ns()``).
    """

    topic: str
    seq: int
    epoch: str
    recv_ns: int
    source: Source
    data: Payload


# ------------------------------------------------------------------------- control plane


class Hello(msgspec.Struct, tag="hello", tag_field="op"):
    """First message of a client: who it is and which protocol it speaks."""

    client_id: str
    name: str = ""
    pid: int = 0
    protocol: int = PROTOCOL_VERSION


class Subscribe(msgspec.Struct, tag="subscribe", tag_field="op"):
    """Add streams; the reply carries their last values (the Clone pattern).

    ``replay``: a client back after the broker restarted asks, for its private streams,
    for every message this broker published on them (its journal, oldest first) instead
    of the last value: what the new broker's first REST sync published before the
    client returned reaches it too. A broker that predates it ignores the field.
    """

    req: int
    streams: list[StreamSpec]
    snapshot: bool = True
    replay: bool = False


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="op"):
    """Release streams this client subscribed to."""

    req: int
    streams: list[StreamSpec]


class GetSnapshot(msgspec.Struct, tag="get_snapshot", tag_field="op"):
    """Ask for the current value of streams, subscribed or not."""

    req: int
    streams: list[StreamSpec]


class Heartbeat(msgspec.Struct, tag="heartbeat", tag_field="op", omit_defaults=True):
    """Client liveness, with the client's own counters for per-client metrics."""

    received: int = 0
    gaps: int = 0
    lag_ms: float = 0.0
    dropped: int = 0
    """Messages the client discarded itself (its bounded queues were full)."""


class HealthRequest(msgspec.Struct, tag="health", tag_field="op"):
    """Ask for the broker's health."""

    req: int


class MetricsRequest(msgspec.Struct, tag="metrics", tag_field="op"):
    """Ask for the broker's metrics."""

    req: int


class Bye(msgspec.Struct, tag="bye", tag_field="op"):
    """The client is leaving: release everything now instead of waiting for expiry."""


QuoteKind = Literal["markets", "candles", "tickers", "orderbooks", "trades"]
"""The Upbit quotation calls the broker runs for clients (:class:`Quote`)."""


class Quote(msgspec.Struct, tag="quote", tag_field="op", omit_defaults=True):
    """Run one Upbit quotation REST call through the broker (its limits, its cache).

    ``codes``: markets for tickers and orderbooks, exactly one for candles and trades,
    none for markets. ``unit`` (candles): ``1s``, ``1m``/``3m``/``5m``/``10m``/``15m``/
    ``30m``/``60m``/``240m``, ``days``, ``weeks``, ``months``, ``years``. ``count``:
    candles (paged past Upbit's 200) and trades. ``to`` (candles): ISO 8601, candles
    before it. ``depth``/``level``: orderbooks. Added in protocol 3 (a new message).
    """

    req: int
    kind: QuoteKind
    codes: list[str] = []
    unit: str | None = None
    count: int | None = None
    to: str | None = None
    depth: int | None = None
    level: float | None = None


AccountKind = Literal["accounts", "chance", "order", "open_orders", "closed_orders"]
"""The reads of the broker's account (:class:`AccountQuery`)."""


class AccountQuery(msgspec.Struct, tag="account", tag_field="op", omit_defaults=True):
    """Read the broker's Upbit account with its keys (no trading switch needed).

    ``kind``: ``accounts`` (balances), ``chance`` (fees and limits of ``market``),
    ``order`` (one order by ``uuid`` or ``identifier``, with its trades),
    ``open_orders`` (``market``, ``states`` of ``wait``/``watch``, ``page``, ``limit``
    up to 100) or ``closed_orders`` (``market``, ``states`` of ``done``/``cancel``,
    ``start_time``/``end_time`` ISO 8601 or epoch ms, ``limit`` up to 1000);
    ``order_by`` ``asc`` or ``desc`` for the lists. Added in protocol 3 (a new message).
    """

    req: int
    kind: AccountKind
    market: str | None = None
    uuid: str | None = None
    identifier: str | None = None
    states: list[str] = []
    page: int | None = None
    limit: int | None = None
    order_by: str | None = None
    start_time: str | None = None
    end_time: str | None = None


class PlaceOrder(msgspec.Struct, tag="place_order", tag_field="op", omit_defaults=True):
    """Place one order on Upbit with the broker's keys (only with trading switched on).

    ``side`` ``bid``/``ask``; ``ord_type`` ``limit`` (``price`` and ``volume``),
    ``price`` (a market buy for ``price`` KRW), ``market`` (a market sell of ``volume``)
    or ``best`` (``price`` for a bid, ``volume`` for an ask; needs ``time_in_force``
    ``ioc`` or ``fok``). ``time_in_force``: ``ioc``, ``fok``, ``post_only``.
    ``smp_type``: ``cancel_maker``, ``cancel_taker``, ``reduce``. ``identifier``: the
    caller's unique key of the order; the broker makes one when it is None. Amounts are
    decimal text, sent to Upbit as written. Added in protocol 3 (a new message).
    """

    req: int
    market: str
    side: str
    ord_type: str
    volume: str | None = None
    price: str | None = None
    identifier: str | None = None
    time_in_force: str | None = None
    smp_type: str | None = None


class CancelOrder(msgspec.Struct, tag="cancel_order", tag_field="op", omit_defaults=True):
    """Cancel orders (only with trading switched on): one by ``uuid`` or ``identifier``,
    or up to 20 at once by ``uuids`` or ``identifiers`` (exactly one of the four).
    Added in protocol 3 (a new message)."""

    req: int
    uuid: str | None = None
    identifier: str | None = None
    uuids: list[str] = []
    identifiers: list[str] = []


ClientMessage = (
    Hello
    | Subscribe
    | Unsubscribe
    | GetSnapshot
    | Heartbeat
    | HealthRequest
    | MetricsRequest
    | Bye
    | Quote
    | AccountQuery
    | PlaceOrder
    | CancelOrder
)


class Welcome(msgspec.Struct, tag="welcome", tag_field="op"):
    """Reply to hello: the broker's epoch and the heartbeat contract."""

    epoch: str
    protocol: int
    heartbeat_interval: float
    liveness: int
    public_available: bool
    private_available: bool


class SubscribeOk(msgspec.Struct, tag="subscribed", tag_field="op"):
    """Subscribe accepted: the topics to SUB to and the last values known so far.

    ``cut``: with ``replay``, the private topics whose replay misses their oldest
    messages (the broker's journal is bounded): their subscribers have a gap.
    """

    req: int
    topics: list[str]
    snapshot: list[Envelope]
    cut: list[str] = []


class UnsubscribeOk(msgspec.Struct, tag="unsubscribed", tag_field="op"):
    """Unsubscribe done."""

    req: int


class SnapshotReply(msgspec.Struct, tag="snapshot", tag_field="op"):
    """Current values; ``missing`` lists topics with no value yet."""

    req: int
    items: list[Envelope]
    missing: list[str] = []


class ConnectionHealth(msgspec.Struct):
    """State of one upstream connection."""

    state: str
    source: Source
    since: float
    reconnects: int
    last_message_timestamp: float | None
    carried_streams: int = 0
    """Streams Upbit sends on it now, counting any nobody subscribed to (released ones,
    and ones requested ahead of demand while requests are scarce)."""
    requests_left: int | None = None
    """Subscription requests the broker still allows itself this minute (of 90; Upbit
    allows 100 per connection); None when it does not apply."""


class Health(msgspec.Struct):
    """The broker's health, as the original design names it."""

    status: Literal["healthy", "degraded", "critical"]
    uptime_seconds: float
    last_message_timestamp: float | None
    connection_quality: Literal["excellent", "good", "poor"]
    active_subscriptions: int
    public: ConnectionHealth
    private: ConnectionHealth | None
    epoch: str


class HealthReply(msgspec.Struct, tag="health", tag_field="op"):
    """Reply to :class:`HealthRequest`."""

    req: int
    health: Health


class ClientMetrics(msgspec.Struct):
    """What the broker knows of one client: its streams, lag and losses."""

    client_id: str
    name: str
    streams: int
    received: int
    gaps: int
    lag_ms: float
    last_seen_seconds: float
    dropped: int = 0


class HandlerMetrics(msgspec.Struct):
    """What one pluggable data handler did (see :mod:`broker.handlers`)."""

    name: str
    types: list[str]
    handled: int
    """Messages it returned for publishing (changed or not)."""
    dropped: int
    """Messages it chose to drop (returned None)."""
    errors: int
    """Messages lost because it raised or returned another class."""
    last_error: str = ""


class Metrics(msgspec.Struct):
    """The broker's metrics, as the original design names them, plus per-client rows."""

    active_connections: int
    total_subscriptions: int
    messages_per_second: float
    average_latency_ms: float
    error_rate_percent: float
    memory_usage_mb: float
    messages_total: int
    clients: list[ClientMetrics]
    handlers: list[HandlerMetrics] = msgspec.field(default_factory=list)
    published_messages: int = 0
    """Envelopes sent on the data plane (data and status events) since start."""
    published_frames: int = 0
    """ZeroMQ frames they went out in: ``published_messages / published_frames`` is the
    mean batch, about 1 at low rates and up to ``MAX_BATCH`` when one topic is busy."""


class MetricsReply(msgspec.Struct, tag="metrics", tag_field="op"):
    """Reply to :class:`MetricsRequest`."""

    req: int
    metrics: Metrics


ErrorCode = Literal[
    "bad_message",
    "protocol_version",
    "unknown_client",
    "unknown_type",
    "invalid_code",
    "unknown_code",
    "invalid_option",
    "private_unavailable",
    "too_many_streams",
    "upstream_error",
    "upstream_unavailable",
    "internal",
    "invalid_field",
    "rate_limited",
    "quota_exceeded",
    "busy",
    "trading_disabled",
    "order_not_placed",
    "order_unknown",
]


class ErrorReply(msgspec.Struct, tag="error", tag_field="op"):
    """A request failed: a machine-readable ``code`` and a human ``message``.

    ``req`` is the failing request's id, or None when the message could not be read.
    ``unknown_client`` means the broker does not know this client (it restarted or
    expired it): send hello again and re-subscribe.

    Trading (protocol 3): ``trading_disabled`` - the broker's trading switch is off;
    ``order_not_placed`` - Upbit's answer to a placement was lost and the order is
    certainly not on the exchange (placing it again with the same identifier is safe);
    ``order_unknown`` - the answer was lost and Upbit could not be asked whether the
    order exists (look it up by its identifier). When Upbit itself refused a request,
    ``upbit_name`` and ``upbit_message`` carry its error exactly (code
    ``upstream_error``); else they are empty.
    """

    req: int | None
    code: ErrorCode
    message: str
    upbit_name: str = ""
    upbit_message: str = ""


class QuoteReply(msgspec.Struct, tag="quote", tag_field="op", omit_defaults=True):
    """Answer to :class:`Quote`: Upbit's REST items, in Upbit's order, in the one list
    its ``kind`` fills (candles and trades newest first)."""

    req: int
    kind: QuoteKind
    markets: list[RestMarket] = []
    candles: list[RestCandle] = []
    tickers: list[RestTicker] = []
    orderbooks: list[RestOrderbook] = []
    trades: list[RestTrade] = []


class ChanceSide(msgspec.Struct, omit_defaults=True):
    """One side of a market's order constraints (``market.bid`` / ``market.ask``)."""

    currency: str
    price_unit: Decimal | None = None
    min_total: Decimal | None = None


class ChanceMarket(msgspec.Struct, omit_defaults=True):
    """A market's order constraints in an order chance: types, sides, totals, state."""

    id: str
    name: str | None = None
    order_types: list[str] = []
    order_sides: list[str] = []
    bid_types: list[str] = []
    ask_types: list[str] = []
    bid: ChanceSide | None = None
    ask: ChanceSide | None = None
    max_total: Decimal | None = None
    state: str | None = None


class OrderChance(msgspec.Struct, omit_defaults=True):
    """Upbit's order chance of one market: fees, constraints and both accounts.

    Amounts are ``Decimal`` (Upbit sends them as text, some as numbers)."""

    market: ChanceMarket
    bid_fee: Decimal | None = None
    ask_fee: Decimal | None = None
    maker_bid_fee: Decimal | None = None
    maker_ask_fee: Decimal | None = None
    bid_account: RestAccount | None = None
    ask_account: RestAccount | None = None


class CancelledOrder(msgspec.Struct, omit_defaults=True):
    """One order of a batch cancel's answer (``uuid`` the key asked for when unknown)."""

    uuid: str | None = None
    market: str | None = None
    identifier: str | None = None


class OrderReply(msgspec.Struct, tag="orders", tag_field="op", omit_defaults=True):
    """Answer to :class:`AccountQuery`, :class:`PlaceOrder` and :class:`CancelOrder`.

    ``kind`` says which fields it fills: ``accounts``; ``chance``; ``order`` (one order:
    a placed one, a cancelled one as Upbit accepted the cancel, or one looked up);
    ``orders`` (open or closed orders, Upbit's order); ``cancelled`` and ``failed``
    (a batch cancel). ``resolved`` is True when a placement's answer was lost and the
    order was found by its identifier instead. Added in protocol 3 (a new message).
    """

    req: int
    kind: Literal["accounts", "chance", "order", "orders", "batch"]
    accounts: list[RestAccount] = []
    chance: OrderChance | None = None
    order: RestOrder | None = None
    orders: list[RestOrder] = []
    cancelled: list[CancelledOrder] = []
    failed: list[CancelledOrder] = []
    resolved: bool = False


BrokerMessage = (
    Welcome
    | SubscribeOk
    | UnsubscribeOk
    | SnapshotReply
    | HealthReply
    | MetricsReply
    | ErrorReply
    | QuoteReply
    | OrderReply
)

_encoder = msgspec.msgpack.Encoder()
# Annotated rather than cast at the call: older msgspec stubs type a union decoder as
# Decoder[Any], newer ones exactly; the annotation type-checks under both.
_client_decoder: msgspec.msgpack.Decoder[ClientMessage] = msgspec.msgpack.Decoder(ClientMessage)
_broker_decoder: msgspec.msgpack.Decoder[BrokerMessage] = msgspec.msgpack.Decoder(BrokerMessage)
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_batch_decoder = msgspec.msgpack.Decoder(list[Envelope])


def encode(message: ClientMessage | BrokerMessage | Envelope) -> bytes:
    """Encode any bus message to msgpack bytes."""
    return _encoder.encode(message)


def decode_client_message(data: bytes) -> ClientMessage:
    """Decode what a client sent to the broker; raises DecodeError on bad input."""
    try:
        return _client_decoder.decode(data)
    except DECODE_FAILURES as exc:
        raise wrap_msgspec_error(exc, "client message") from None


def decode_broker_message(data: bytes) -> BrokerMessage:
    """Decode what the broker sent to a client; raises DecodeError on bad input."""
    try:
        return _broker_decoder.decode(data)
    except DECODE_FAILURES as exc:
        raise wrap_msgspec_error(exc, "broker message") from None


_FIXARRAY: Final = tuple(bytes((0x90 | n,)) for n in range(16))


def batch_header(count: int) -> bytes:
    """The msgpack array header of a batch of ``count`` (1 to 65,535) encoded envelopes."""
    if count < 16:
        return _FIXARRAY[count]
    return b"\xdc" + count.to_bytes(2, "big")


def pack_published(topic: bytes, *envelopes: bytes) -> bytes:
    """One published message: ``topic``, :data:`TOPIC_END`, then the encoded envelopes."""
    return topic + TOPIC_END + batch_header(len(envelopes)) + b"".join(envelopes)


def split_published(message: bytes) -> tuple[bytes, memoryview]:
    """``(topic, envelope bytes)`` of a published message; raises DecodeError."""
    end = message.find(TOPIC_END)
    if end < 0:
        raise DecodeError("published message without a topic end (protocol 1 sender?)")
    return message[:end], memoryview(message)[end + 1 :]


def decode_batch(data: bytes | memoryview) -> list[Envelope]:
    """Decode the envelopes of one published message; raises DecodeError on bad input.

    ``data`` is what :func:`split_published` returns after the topic. An empty batch is
    malformed: the broker never sends one.
    """
    try:
        batch = _batch_decoder.decode(data)
    except DECODE_FAILURES as exc:
        raise wrap_msgspec_error(exc, "published batch") from None
    if not batch:
        raise DecodeError("published batch without envelopes", path="$")
    return batch


def decode_envelope(data: bytes | memoryview) -> Envelope:
    """Decode one encoded :class:`Envelope` (a snapshot item, a batch element)."""
    try:
        return _envelope_decoder.decode(data)
    except DECODE_FAILURES as exc:
        raise wrap_msgspec_error(exc, "envelope") from None
