"""Both WebSocket endpoints: request parsing, formats, per-connection state and fan-out.

``/websocket/v1`` serves ticker, trade, orderbook and candle.*; ``/websocket/v1/private``
serves myOrder and myAsset for a JWT-authenticated client. Layout:

- :func:`parse_request` (pure) turns one client text frame into a :class:`Request` or
  raises :class:`WsRequestError` with Upbit's error name.
- :class:`Connection` holds one socket's subscription, format, request log and a bounded
  send queue drained by its own sender task (binary frames; list formats batch whatever
  is pending per flush).
- :class:`Hub` indexes realtime subscriptions by (type, code) and fans market events and
  account events out to connections, encoding each event once per format.
- The ``websockets`` server around it (own port, upgrade checks, pongs) is
  :mod:`simulator.ws_server`; REST stays on aiohttp (:mod:`simulator.app`).

Decisions on points docs/PROTOCOL.md leaves UNCONFIRMED (defaults per its section 11.1):

- Every server frame is BINARY UTF-8 JSON, including ``{"status":"UP"}``, errors and the
  LIST_SUBSCRIPTIONS answer. Errors and status frames are never wrapped in a list and use
  full key names; the LIST_SUBSCRIPTIONS answer uses SIMPLE keys under SIMPLE formats.
- A bad request gets ONE error frame, the connection stays open and the previous
  subscription keeps flowing. A valid request replaces the whole subscription and the
  connection's format, drops queued data of the old subscription, and sends one SNAPSHOT
  per (type object, code) in request order before REALTIME data.
- Objects are found by key: the first object with ``ticket`` / ``format`` / ``method``,
  every object with ``type``; an object with none of these is ``NO_TYPE``. No ticket:
  ``NO_TICKET``; not a JSON array of objects or a field of the wrong JSON type:
  ``WRONG_FORMAT``; unknown type, format value or method: ``INVALID_PARAM``; missing or
  empty ``codes`` on a public type: ``NO_CODES``; ``codes`` on myAsset: ``WRONG_FORMAT``.
- Public types on the private endpoint and private types on the public one are unknown
  types there: ``INVALID_PARAM``.
- Unknown or lowercase codes (and a ``.N`` suffix on a non-orderbook type): by default
  (``unknown_codes="ignore"``) accepted silently and never produce data, like an
  unsupported orderbook level; ``unknown_codes="error"`` answers ``INVALID_PARAM``.
- ``.N`` on orderbook codes: N in 1/5/15/30, any other number means 30; totals cover the
  units sent; a grouped (``level``) book may have fewer units than asked. ``level`` on a
  BTC/USDT market is ignored and reported as 0; an unsupported level on a KRW market
  yields no data. LIST_SUBSCRIPTIONS echoes codes as requested (with ``.N``), lists
  ``level`` for orderbook, ``codes: []`` for an all-markets myOrder, no codes for
  myAsset, and leaves out is_only_snapshot objects (they do not stream).
- ``is_only_snapshot`` wins when both flags are true. snake_case and camelCase accepted.
- Text ``PING`` -> one ``{"status":"UP"}``; it is not a request: not rate-limited, not in
  the request log (counted under ``pings``). WS ping frames get pongs (answered by this
  module, not by websockets' automatic pong, so a stall can withhold them).
- Stalls (``POST /_sim/stall``): a link stall holds everything back, pongs included, and
  lets it go when it ends; an application stall keeps answering ping frames but sends no
  data and no ``{"status":"UP"}`` and ignores every text frame received meanwhile (counted
  under ``ignored``), like an exchange whose application hangs behind a live proxy.
- Per-connection limits (5/s and 100/min): an over-limit request is ignored and answered
  ``{"error":{"name":"Too Many Requests",...}}``; repeated violations escalate to
  ``"I'm a teapot"`` errors whose message carries the block time. The socket stays open.
- Private endpoint with a missing or bad JWT: the upgrade is accepted, the first request
  is answered ``INVALID_AUTH`` and the socket closed with 1008
  (``private_auth_failure="http_401"`` refuses the upgrade with 401 instead).
- Idle: closed with 1000 after ``idle_timeout`` seconds without any frame either way.
- Slow clients: each connection's queue holds ``send_queue_max`` messages; past that the
  connection is aborted (``slow_client="disconnect"``, default) or the oldest queued
  messages are dropped (``"drop_oldest"``). The sender writes only as fast as the
  socket drains, so simulator memory stays bounded either way.
- Firehose: each connection's subscribed streams are pre-encoded once and re-sent as fast
  as the socket drains (only timestamps and trade sequential_ids change). Without
  permessage-deflate, frames are framed here and written in large batches to the
  connection's transport (the last one of a batch through ``websockets``, whose
  ``send`` waits for the socket to drain); with it, every frame goes through
  ``websockets``' compressor (much slower; use ``--no-compress``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.protocol import State

from simulator.limits import Throttle
from simulator.market import (
    CANDLE_UNITS,
    PRICE_SCALE,
    MarketEvent,
    MarketState,
    level_to_atoms,
    orderbook_fields,
)

if TYPE_CHECKING:
    from simulator.app import Simulator
    from simulator.ws_server import SimServerConnection

__all__ = [
    "FORMATS",
    "PRIVATE_PATH",
    "PRIVATE_TYPES",
    "PUBLIC_PATH",
    "PUBLIC_TYPES",
    "Connection",
    "Hub",
    "Request",
    "Target",
    "TypeRequest",
    "WsRequestError",
    "parse_request",
    "simplify",
]

log = structlog.get_logger("simulator.ws")

PUBLIC_PATH = "/websocket/v1"
PRIVATE_PATH = "/websocket/v1/private"
FORMATS = ("DEFAULT", "SIMPLE", "JSON_LIST", "SIMPLE_LIST")
PUBLIC_TYPES = frozenset({"ticker", "trade", "orderbook", *(f"candle.{u}" for u in CANDLE_UNITS)})
PRIVATE_TYPES = frozenset({"myOrder", "myAsset"})
ORDERBOOK_COUNTS = frozenset({1, 5, 15, 30})
DEFAULT_ORDERBOOK_COUNT = 30

ERROR_MESSAGES = {
    "INVALID_AUTH": "인증 정보가 올바르지 않습니다.",
    "WRONG_FORMAT": "Wrong request format.",
    "NO_TICKET": "No ticket in the request.",
    "NO_TYPE": "No type in a data type object.",
    "NO_CODES": "No codes in a data type object.",
    "INVALID_PARAM": "Invalid parameter.",
    "Too Many Requests": "Too many requests. Wait and try again.",
}

# -- SIMPLE format key maps (docs/PROTOCOL.md sections 2.7 and 3) ------------------------------

_COMMON = {"type": "ty", "code": "cd", "timestamp": "tms", "stream_type": "st"}
TICKER_SIMPLE = {
    **_COMMON,
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
}
TRADE_SIMPLE = {
    **_COMMON,
    "trade_price": "tp",
    "trade_volume": "tv",
    "ask_bid": "ab",
    "prev_closing_price": "pcp",
    "change": "c",
    "change_price": "cp",
    "trade_date": "td",
    "trade_time": "ttm",
    "trade_timestamp": "ttms",
    "sequential_id": "sid",
    "best_ask_price": "bap",
    "best_ask_size": "bas",
    "best_bid_price": "bbp",
    "best_bid_size": "bbs",
}
ORDERBOOK_SIMPLE = {
    **_COMMON,
    "total_ask_size": "tas",
    "total_bid_size": "tbs",
    "orderbook_units": "obu",
    "level": "lv",
}
ORDERBOOK_UNIT_SIMPLE = {"ask_price": "ap", "bid_price": "bp", "ask_size": "as", "bid_size": "bs"}
CANDLE_SIMPLE = {
    **_COMMON,
    "candle_date_time_utc": "cdttmu",
    "candle_date_time_kst": "cdttmk",
    "opening_price": "op",
    "high_price": "hp",
    "low_price": "lp",
    "trade_price": "tp",
    "candle_acc_trade_volume": "catv",
    "candle_acc_trade_price": "catp",
}
MYORDER_SIMPLE = {
    **_COMMON,
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
}
MYASSET_SIMPLE = {
    **_COMMON,
    "asset_uuid": "astuid",
    "assets": "ast",
    "asset_timestamp": "asttms",
}
MYASSET_ITEM_SIMPLE = {"currency": "cu", "balance": "b", "locked": "l"}
LIST_SIMPLE = {"method": "mthd", "result": "rslt", "ticket": "tckt"}
LIST_ITEM_SIMPLE = {"type": "ty", "codes": "cds", "level": "lv"}

_NESTED: dict[str, Mapping[str, str]] = {
    "orderbook_units": ORDERBOOK_UNIT_SIMPLE,
    "assets": MYASSET_ITEM_SIMPLE,
    "result": LIST_ITEM_SIMPLE,
}


def _key_map(msg: Mapping[str, object]) -> Mapping[str, str]:
    kind = msg.get("type")
    if kind == "ticker":
        return TICKER_SIMPLE
    if kind == "trade":
        return TRADE_SIMPLE
    if kind == "orderbook":
        return ORDERBOOK_SIMPLE
    if kind == "myOrder":
        return MYORDER_SIMPLE
    if kind == "myAsset":
        return MYASSET_SIMPLE
    if isinstance(kind, str) and kind.startswith("candle."):
        return CANDLE_SIMPLE
    if "method" in msg:
        return LIST_SIMPLE
    return {}


def simplify(msg: Mapping[str, object]) -> dict[str, object]:
    """The SIMPLE-format version of a DEFAULT message (unknown keys pass unchanged)."""
    keys = _key_map(msg)
    out: dict[str, object] = {}
    for key, value in msg.items():
        nested = _NESTED.get(key)
        if nested is not None and isinstance(value, list):
            out[keys.get(key, key)] = [
                {nested.get(k, k): v for k, v in item.items()} if isinstance(item, dict) else item
                for item in value
            ]
        else:
            out[keys.get(key, key)] = value
    return out


_encoder = msgspec.json.Encoder(decimal_format="number")
encode_json = _encoder.encode


def _frame_header(length: int) -> bytes:
    """Header of one unmasked, final, binary WebSocket frame (RFC 6455 section 5.2)."""
    if length < 126:
        return struct.pack("!BB", 0x82, length)
    if length < 65536:
        return struct.pack("!BBH", 0x82, 126, length)
    return struct.pack("!BBQ", 0x82, 127, length)


# -- request parsing ---------------------------------------------------------------------


class WsRequestError(Exception):
    """A request Upbit would answer with ``{"error": {"name", "message"}}``."""

    def __init__(self, name: str, detail: str | None = None) -> None:
        self.name = name
        base = ERROR_MESSAGES.get(name, name)
        self.message = f"{base} ({detail})" if detail else base
        super().__init__(self.message)

    def frame(self) -> dict[str, object]:
        return {"error": {"name": self.name, "message": self.message}}


@dataclass(frozen=True, slots=True)
class Target:
    """One code of a type object: where data goes and how an orderbook is shaped."""

    code: str  # plain market code (no .N suffix)
    count: int = DEFAULT_ORDERBOOK_COUNT
    level: int = 0  # grouping unit in price atoms; 0 = none
    known: bool = True

    @property
    def level_value(self) -> int | float:
        if self.level % PRICE_SCALE == 0:
            return self.level // PRICE_SCALE
        return self.level / PRICE_SCALE


@dataclass(slots=True)
class TypeRequest:
    """One data type object of a request."""

    type: str
    codes: list[str] | None  # as requested (None: absent)
    level: int | float | None
    only_snapshot: bool
    only_realtime: bool
    targets: list[Target] = field(default_factory=list)

    def listing(self) -> dict[str, object]:
        """This object's LIST_SUBSCRIPTIONS entry."""
        item: dict[str, object] = {"type": self.type}
        if self.type != "myAsset":
            item["codes"] = list(self.codes or [])
        if self.type == "orderbook":
            item["level"] = self.level if self.level is not None else 0
        return item


@dataclass(slots=True)
class Request:
    """A parsed client request: a subscription or a LIST_SUBSCRIPTIONS call."""

    ticket: str
    format: str | None
    method: str | None
    types: list[TypeRequest]
    raw: object = None


def _flag(obj: Mapping[str, object], snake: str, camel: str) -> bool:
    value = obj.get(snake, obj.get(camel, False))
    if value is None:
        return False
    if not isinstance(value, bool):
        raise WsRequestError("WRONG_FORMAT", f"{snake} must be a boolean")
    return value


def _level(obj: Mapping[str, object]) -> tuple[int, int | float | None]:
    if "level" not in obj or obj["level"] is None:
        return 0, None
    raw = obj["level"]
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise WsRequestError("WRONG_FORMAT", "level must be a number")
    atoms = level_to_atoms(raw)
    if atoms is None:
        try:
            float(raw)
        except ValueError:
            raise WsRequestError("WRONG_FORMAT", "level must be a number") from None
        raise WsRequestError("INVALID_PARAM", "unsupported level")
    value: int | float = atoms // PRICE_SCALE if atoms % PRICE_SCALE == 0 else atoms / PRICE_SCALE
    return atoms, value


def _target(
    kind: str, code: str, level: int, known: Callable[[str], bool], unknown_codes: str
) -> Target:
    plain, count = code, DEFAULT_ORDERBOOK_COUNT
    if kind == "orderbook" and "." in code:
        plain, _, suffix = code.partition(".")
        if suffix.isdigit():
            n = int(suffix)
            count = n if n in ORDERBOOK_COUNTS else DEFAULT_ORDERBOOK_COUNT
        else:
            plain = code  # not a count: an unknown code
    ok = known(plain)
    if not ok and unknown_codes == "error":
        raise WsRequestError("INVALID_PARAM", f"unknown code {code!r}")
    quote_is_krw = plain.startswith("KRW-")
    return Target(plain, count, level if quote_is_krw else 0, ok)


def parse_request(
    data: str,
    *,
    private: bool,
    known: Callable[[str], bool],
    unknown_codes: str = "ignore",
) -> Request:
    """Parse one client text frame; raise :class:`WsRequestError` like Upbit would."""
    try:
        raw = json.loads(data)
    except ValueError:
        raise WsRequestError("WRONG_FORMAT", "not JSON") from None
    if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
        raise WsRequestError("WRONG_FORMAT", "a request is a JSON array of objects")
    objects: list[dict[str, Any]] = raw

    ticket_obj = next((o for o in objects if "ticket" in o), None)
    if ticket_obj is None:
        raise WsRequestError("NO_TICKET")
    ticket = ticket_obj["ticket"]
    if isinstance(ticket, bool) or not isinstance(ticket, str | int):
        raise WsRequestError("WRONG_FORMAT", "ticket must be a string")
    if ticket == "":
        raise WsRequestError("NO_TICKET")

    fmt: str | None = None
    format_obj = next((o for o in objects if "format" in o), None)
    if format_obj is not None:
        value = format_obj["format"]
        if not isinstance(value, str):
            raise WsRequestError("WRONG_FORMAT", "format must be a string")
        if value not in FORMATS:
            raise WsRequestError("INVALID_PARAM", f"unknown format {value!r}")
        fmt = value

    method_obj = next((o for o in objects if "method" in o and "type" not in o), None)
    if method_obj is not None:
        method = method_obj["method"]
        if not isinstance(method, str):
            raise WsRequestError("WRONG_FORMAT", "method must be a string")
        if method != "LIST_SUBSCRIPTIONS":
            raise WsRequestError("INVALID_PARAM", f"unknown method {method!r}")
        return Request(str(ticket), fmt, method, [], raw)

    type_objs: list[dict[str, Any]] = []
    for obj in objects:
        if "type" in obj:
            type_objs.append(obj)
        elif not ({"ticket", "format", "method"} & obj.keys()):
            raise WsRequestError("NO_TYPE")
    if not type_objs:
        raise WsRequestError("NO_TYPE")

    allowed = PRIVATE_TYPES if private else PUBLIC_TYPES
    types: list[TypeRequest] = []
    for obj in type_objs:
        kind = obj["type"]
        if not isinstance(kind, str):
            raise WsRequestError("WRONG_FORMAT", "type must be a string")
        if kind not in allowed:
            raise WsRequestError("INVALID_PARAM", f"unsupported type {kind!r} on this endpoint")
        only_snapshot = _flag(obj, "is_only_snapshot", "isOnlySnapshot")
        only_realtime = _flag(obj, "is_only_realtime", "isOnlyRealtime")
        codes = obj.get("codes")
        if kind == "myAsset":
            if "codes" in obj:
                raise WsRequestError("WRONG_FORMAT", "myAsset takes no codes")
        elif codes is None:
            if kind != "myOrder":
                raise WsRequestError("NO_CODES")
        elif not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
            raise WsRequestError("WRONG_FORMAT", "codes must be an array of strings")
        elif not codes and kind != "myOrder":
            raise WsRequestError("NO_CODES")
        level_atoms, level_value = _level(obj) if kind == "orderbook" else (0, None)
        tr = TypeRequest(kind, codes, level_value, only_snapshot, only_realtime)
        seen: set[str] = set()
        for code in codes or []:
            if code not in seen:
                seen.add(code)
                tr.targets.append(_target(kind, code, level_atoms, known, unknown_codes))
        types.append(tr)
    return Request(str(ticket), fmt, None, types, raw)


# -- connections -------------------------------------------------------------------------

_ids = itertools.count(1)
_SENTINEL_TS = 1357913579135  # 13 digits, like a ms timestamp
_SENTINEL_SEQ = 24680246802468024  # 17 digits, like ts_ms * 10000 + n


class _Template:
    """A pre-encoded frame with fixed-width slots for the timestamp and sequential_id."""

    __slots__ = ("header", "is_trade", "parts", "slots")

    def __init__(self, payload: bytes, is_trade: bool) -> None:
        ts_b, seq_b = b"%d" % _SENTINEL_TS, b"%d" % _SENTINEL_SEQ
        self.parts: list[bytes] = []
        self.slots: list[int] = []  # 0: timestamp, 1: sequential_id
        rest = payload
        while True:
            i, j = rest.find(ts_b), rest.find(seq_b)
            if i < 0 and j < 0:
                break
            if j < 0 or (0 <= i < j):
                self.parts.append(rest[:i])
                self.slots.append(0)
                rest = rest[i + len(ts_b) :]
            else:
                self.parts.append(rest[:j])
                self.slots.append(1)
                rest = rest[j + len(seq_b) :]
        self.parts.append(rest)
        self.header = _frame_header(len(payload))
        self.is_trade = is_trade

    def payload(self, ts: bytes, seq: bytes) -> bytes:
        values = (ts, seq)
        out = [self.parts[0]]
        for slot, part in zip(self.slots, self.parts[1:], strict=True):
            out.append(values[slot])
            out.append(part)
        return b"".join(out)


class Connection:
    """One WebSocket client: subscription, format, request log and a bounded send queue."""

    def __init__(
        self,
        sim: Simulator,
        ws: SimServerConnection,
        *,
        private: bool,
        access_key: str | None = None,
        auth_error: tuple[str, str] | None = None,
    ) -> None:
        self.sim = sim
        self.id = next(_ids)
        self.ws = ws
        self.private = private
        self.path = PRIVATE_PATH if private else PUBLIC_PATH
        peer = ws.remote_address
        self.remote = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        self.transport = ws.transport
        self.access_key = access_key
        self.auth_error = auth_error
        self.opened_at = time.time()
        self.closed_at: float | None = None
        self.closed = False
        self.close_code: int | None = None
        self.format = "DEFAULT"
        self.ticket: str | None = None
        self.subscription: Request | None = None
        self.version = 0
        self.realtime: list[tuple[str, Target]] = []
        self.my_order: frozenset[str] | None = None  # None: not subscribed; empty: all
        self.my_asset = False
        self.requests: deque[dict[str, object]] = deque(maxlen=sim.config.max_request_log)
        self.queue: deque[tuple[bool, bytes]] = deque()
        self.wakeup = asyncio.Event()
        self.last_activity = time.monotonic()
        self.messages_sent = 0
        self.frames_sent = 0
        self.dropped = 0
        self.pings = 0
        self.ignored = 0
        self.pending_close: tuple[int, str] | None = None
        cfg = sim.config
        self.throttle: Throttle | None = (
            Throttle(cfg.ws_message_limits, sim.escalation) if cfg.limits_enabled else None
        )
        self.compressed = any(isinstance(e, PerMessageDeflate) for e in ws.protocol.extensions)
        self._tasks: list[asyncio.Task[None]] = []

    # -- info -----------------------------------------------------------------------------

    @property
    def simple(self) -> bool:
        return self.format in ("SIMPLE", "SIMPLE_LIST")

    @property
    def listed(self) -> bool:
        return self.format in ("JSON_LIST", "SIMPLE_LIST")

    def describe(self) -> dict[str, object]:
        """This connection as GET /_sim/connections reports it."""
        return {
            "id": self.id,
            "path": self.path,
            "remote": self.remote,
            "private": self.private,
            "authenticated": self.private and self.auth_error is None,
            "opened_at": self.opened_at,
            "closed": self.closed,
            "closed_at": self.closed_at,
            "close_code": self.close_code,
            "format": self.format,
            "subscription": None if self.subscription is None else self.subscription.raw,
            "ticket": self.ticket,
            "compressed": self.compressed,
            "requests": list(self.requests),
            "pings": self.pings,
            "ignored": self.ignored,
            "messages_sent": self.messages_sent,
            "frames_sent": self.frames_sent,
            "queued": len(self.queue),
            "dropped": self.dropped,
        }

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._sender(), name=f"ws-sender-{self.id}"),
            asyncio.create_task(self._ponger(), name=f"ws-ponger-{self.id}"),
            asyncio.create_task(self._idle_watch(), name=f"ws-idle-{self.id}"),
        ]

    async def run(self) -> None:
        """Read client data frames until the socket closes."""
        ws = self.ws
        try:
            while True:
                try:
                    data = await ws.recv()
                except ConnectionClosed:
                    break
                self.last_activity = time.monotonic()
                await self.sim.wait_unstalled(self.path)
                if self.sim.faults.app_stall_remaining(self.path, time.time()) > 0:
                    self.ignored += 1  # the application hangs: PING and requests are lost
                    continue
                if isinstance(data, str):
                    self._on_text_safely(data)
                else:
                    self._on_text_safely(bytes(data).decode("utf-8", "replace"))
        finally:
            await self.finish()

    async def finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.closed_at = time.time()
        self.close_code = self.ws.close_code
        self.sim.hub.remove(self)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.ws.state is not State.CLOSED:
            with contextlib.suppress(Exception):
                await self.ws.close()
        self.queue.clear()

    async def close(self, code: int, reason: str) -> None:
        """Close with a close frame (``code``, ``reason``) and wait for the handshake."""
        await self.ws.close(code, reason)

    def abort(self) -> None:
        """Cut the TCP connection without a close frame (client sees 1006)."""
        self.transport.abort()

    def silenced(self) -> bool:
        """True while a stall of either kind keeps this connection's data back."""
        now = time.time()
        faults = self.sim.faults
        return faults.stall_remaining(self.path, now) > 0 or (
            faults.app_stall_remaining(self.path, now) > 0
        )

    async def wait_heard(self) -> None:
        """Return once no stall of either kind covers this connection's path."""
        while True:
            now = time.time()
            faults = self.sim.faults
            remaining = max(
                faults.stall_remaining(self.path, now), faults.app_stall_remaining(self.path, now)
            )
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, 0.05))

    async def _ponger(self) -> None:
        """Answer ping frames in order; a stall holds the answers back."""
        ws = self.ws
        while not self.closed:
            data = await ws.next_ping()
            await self.sim.wait_unstalled(self.path)
            with contextlib.suppress(ConnectionClosed):
                await ws.pong(data)
                self.last_activity = time.monotonic()

    async def _idle_watch(self) -> None:
        timeout = self.sim.config.idle_timeout
        if timeout <= 0:
            return
        while not self.closed:
            last = max(self.last_activity, self.ws.last_frame_at)
            remaining = last + timeout - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(remaining)
                continue
            if self.sim.stall_remaining(self.path) > 0:
                await self.sim.wait_unstalled(self.path)
                self.last_activity = time.monotonic()
                continue
            log.info("ws_idle_close", conn=self.id, timeout=timeout)
            await self.ws.close(1000, "idle timeout")
            return

    # -- inbound --------------------------------------------------------------------------

    def _on_text_safely(self, text: str) -> None:
        try:
            self.on_text(text)
        except Exception:  # a simulator bug must not look like a protocol behaviour
            log.exception("ws_request_failed", conn=self.id)

    def on_text(self, text: str) -> None:
        """Handle one client text frame: PING, LIST_SUBSCRIPTIONS or a subscription."""
        sim = self.sim
        if text.strip() == "PING":
            self.pings += 1
            sim.stats.ws_pings += 1
            self.send_control({"status": "UP"})
            return
        now = time.time()
        entry: dict[str, object] = {
            "ts": now,
            "data": text[:8192],
            "accepted": False,
            "error": None,
        }
        self.requests.append(entry)
        sim.stats.ws_requests += 1
        error = self._handle(text, now, entry)
        if error is not None:
            entry["error"] = error.name
            entry["message"] = error.message
            sim.stats.ws_errors += 1
            self.send_control(error.frame())
        else:
            entry["accepted"] = True
            sim.stats.ws_accepted += 1

    def _handle(self, text: str, now: float, entry: dict[str, object]) -> WsRequestError | None:
        sim = self.sim
        if self.auth_error is not None:
            self.pending_close = (1008, "invalid auth")
            return WsRequestError("INVALID_AUTH")
        if self.throttle is not None:
            decision = self.throttle.check(now)
            if decision.status == 429:
                sim.stats.ws_rate_limited += 1
                return WsRequestError("Too Many Requests")
            if decision.status == 418:
                sim.stats.ws_rate_limited += 1
                err = WsRequestError("I'm a teapot")
                err.message = f"Too many requests; blocked for {decision.block_seconds:g} seconds."
                return err
        try:
            req = parse_request(
                text,
                private=self.private,
                known=sim.exchange.known,
                unknown_codes=sim.config.unknown_codes,
            )
        except WsRequestError as exc:
            return exc
        if req.method == "LIST_SUBSCRIPTIONS":
            # A format here switches the whole connection too (docs/PROTOCOL.md section 2.6).
            if req.format is not None and req.format != self.format:
                self.format = req.format
                self.queue = deque(item for item in self.queue if not item[0])
            entry["method"] = req.method
            self.send_control(self._listing(req.ticket))
            return None
        self._subscribe(req, now)
        return None

    def _listing(self, ticket: str) -> dict[str, object]:
        result: list[dict[str, object]] = []
        if self.subscription is not None:
            result = [t.listing() for t in self.subscription.types if not t.only_snapshot]
        msg: dict[str, object] = {
            "method": "LIST_SUBSCRIPTIONS",
            "result": result,
            "ticket": ticket,
        }
        return simplify(msg) if self.simple else msg

    def _subscribe(self, req: Request, now: float) -> None:
        """Replace the whole subscription (Upbit's overwrite semantics)."""
        sim = self.sim
        hub = sim.hub
        hub.unregister(self)
        self.queue = deque(item for item in self.queue if not item[0])
        self.subscription = req
        self.format = req.format or "DEFAULT"
        self.ticket = req.ticket
        self.version += 1
        if self.private:
            self._subscribe_private(req)
            self.wakeup.set()
            return
        exchange = sim.exchange
        realtime: list[tuple[str, Target]] = []
        for tr in req.types:
            for target in tr.targets:
                if not target.known:
                    continue
                state = exchange.state(target.code, now)
                if tr.type == "orderbook" and target.level not in _supported(state, target):
                    continue
                if tr.only_snapshot or not tr.only_realtime:
                    snap = snapshot_fields(state, tr.type, target, int(now * 1000))
                    if snap is not None:
                        self.send_data(self._encode(snap, "SNAPSHOT"))
                if not tr.only_snapshot:
                    realtime.append((tr.type, target))
        hub.register(self, realtime, now)
        self.wakeup.set()

    def _subscribe_private(self, req: Request) -> None:
        order_codes: set[str] | None = None
        all_orders = False
        self.my_asset = False
        for tr in req.types:
            if tr.only_snapshot:
                continue  # private streams have no snapshot
            if tr.type == "myAsset":
                self.my_asset = True
            elif tr.type == "myOrder":
                if not tr.targets:
                    all_orders = True
                else:
                    order_codes = (order_codes or set()) | {t.code for t in tr.targets}
        if all_orders:
            self.my_order = frozenset()
        else:
            self.my_order = None if order_codes is None else frozenset(order_codes)
        self.sim.hub.register_private(self)

    # -- outbound -------------------------------------------------------------------------

    def _encode(self, fields: Mapping[str, object], stream_type: str) -> bytes:
        msg = dict(fields)
        msg["stream_type"] = stream_type
        return encode_json(simplify(msg) if self.simple else msg)

    def send_control(self, obj: Mapping[str, object]) -> None:
        self._enqueue(False, encode_json(obj))

    def send_data(self, payload: bytes) -> None:
        self._enqueue(True, payload)

    def _enqueue(self, is_data: bool, payload: bytes) -> None:
        if self.closed:
            return
        queue = self.queue
        if len(queue) >= self.sim.config.send_queue_max:
            if self.sim.config.slow_client == "drop_oldest":
                queue.popleft()
                self.dropped += 1
                self.sim.stats.ws_dropped += 1
            else:
                log.warning("ws_slow_client_disconnect", conn=self.id, queued=len(queue))
                self.sim.stats.ws_slow_disconnects += 1
                self.dropped += len(queue)
                queue.clear()
                self.abort()
                return
        queue.append((is_data, payload))
        self.wakeup.set()

    async def _sender(self) -> None:
        sim = self.sim
        while not self.closed:
            await self.wakeup.wait()
            self.wakeup.clear()
            await self.wait_heard()
            try:
                if sim.firehose and (self.realtime or self.queue):
                    await self._firehose()
                else:
                    await self._flush()
                if self.pending_close is not None and not self.queue:
                    code, reason = self.pending_close
                    await self.ws.close(code, reason)
                    return
            except (ConnectionError, RuntimeError, ConnectionClosed):
                self.abort()
                return
            except Exception:
                log.exception("ws_sender_failed", conn=self.id)
                self.abort()
                return

    def _frames(self) -> list[bytes]:
        """Take everything queued and turn it into frame payloads."""
        queue = self.queue
        payloads: list[bytes] = []
        listed = self.listed
        batch_max = max(1, self.sim.config.list_batch_max)
        batch: list[bytes] = []
        while queue:
            is_data, payload = queue.popleft()
            self.messages_sent += 1
            if listed and is_data:
                batch.append(payload)
                if len(batch) >= batch_max:
                    payloads.append(b"[" + b",".join(batch) + b"]")
                    batch = []
                continue
            if batch:
                payloads.append(b"[" + b",".join(batch) + b"]")
                batch = []
            payloads.append(payload)
        if batch:
            payloads.append(b"[" + b",".join(batch) + b"]")
        return payloads

    async def _flush(self) -> None:
        while self.queue and not self.closed:
            payloads = self._frames()
            await self._write(payloads)

    async def _write(self, payloads: list[bytes]) -> None:
        """Send binary frames; without compression, frame them here and write in one go."""
        ws = self.ws
        if not payloads:
            return
        if ws.state is not State.OPEN:  # closing: nothing more to send; don't spin
            await ws.wait_closed()
            return
        self.frames_sent += len(payloads)
        self.sim.stats.ws_frames_sent += len(payloads)
        self.last_activity = time.monotonic()
        if self.compressed:
            for payload in payloads:
                await ws.send(payload)
            return
        if len(payloads) > 1:
            # Whole frames in one write while the connection is OPEN (checked above, no
            # await since): they cannot interleave with websockets' own frames.
            transport = self.transport
            if transport.is_closing():
                raise ConnectionResetError("transport closing")
            transport.write(b"".join([_frame_header(len(p)) + p for p in payloads[:-1]]))
        # The last frame goes through websockets: its send() waits for the socket to drain.
        await ws.send(payloads[-1])

    async def _firehose(self) -> None:
        """Send every subscribed stream as fast as the socket drains, until switched off."""
        sim = self.sim
        version = -1
        templates: list[_Template] = []
        counter = 0
        paced_since = time.monotonic()
        paced_sent = 0
        cap = -1.0
        while sim.firehose and not self.closed:
            if cap != sim.firehose_rate:  # (re)start pacing from now at the new cap
                cap = sim.firehose_rate
                paced_since, paced_sent = time.monotonic(), 0
            batch = max(1, sim.config.firehose_batch)
            if cap > 0:  # small bursts (~5 ms of the cap) so the pace is smooth
                batch = max(1, min(batch, int(cap / 200)))
                now = time.monotonic()
                # Time spent idle (no streams, a stall, a slow reader) is no credit: at
                # most one burst may be owed, never a backlog sent at full speed.
                paced_since = max(paced_since, now - (paced_sent + batch) / cap)
                due = paced_since + paced_sent / cap - now
                if due > 0:
                    await asyncio.sleep(min(due, 0.05))  # then look at the cap again
                    continue
            if self.queue:
                await self._flush()
            if version != self.version:
                version = self.version
                templates = self._templates()
            if not templates:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            await self.wait_heard()
            now_ms = int(time.time() * 1000)
            ts = b"%d" % now_ms
            picked = [templates[(counter + i) % len(templates)] for i in range(batch)]
            counter += batch
            trades = sum(1 for t in picked if t.is_trade)
            seq = sim.exchange.reserve_seq(trades, now_ms) if trades else 0
            payloads: list[bytes] = []
            for tpl in picked:
                if tpl.is_trade:
                    payloads.append(tpl.payload(ts, b"%d" % seq))
                    seq += 1
                else:
                    payloads.append(tpl.payload(ts, b""))
            self.messages_sent += len(payloads)
            paced_sent += len(payloads)
            sim.stats.ws_firehose_messages += len(payloads)
            await self._write(payloads)
            await asyncio.sleep(0)  # let readers, REST and other connections run

    def _templates(self) -> list[_Template]:
        now = time.time()
        out: list[_Template] = []
        for kind, target in self.realtime:
            state = self.sim.exchange.state(target.code, now)
            fields = snapshot_fields(state, kind, target, _SENTINEL_TS)
            if fields is None:
                continue
            fields = dict(fields)
            if kind == "trade":
                fields["sequential_id"] = _SENTINEL_SEQ
                fields["trade_timestamp"] = _SENTINEL_TS
            payload = self._encode(fields, "REALTIME")
            if self.listed:
                payload = b"[" + payload + b"]"
            out.append(_Template(payload, kind == "trade"))
        return out


def _supported(state: MarketState, target: Target) -> list[int]:
    if not target.code.startswith("KRW-"):
        return [0]
    return state.supported_levels()


def snapshot_fields(
    state: MarketState, kind: str, target: Target, ts: int
) -> dict[str, object] | None:
    """The current value of one stream (DEFAULT fields), or None when there is none yet."""
    if kind == "ticker":
        return state.ticker_fields(ts)
    if kind == "trade":
        if state.last_trade is None:
            return None
        fields = state.trade_fields(state.last_trade, ts)
        return fields
    if kind == "orderbook":
        asks, bids = state.book_snapshot()
        return orderbook_fields(
            state.code,
            state.quote,
            asks,
            bids,
            ts,
            count=target.count,
            level=target.level,
            level_value=target.level_value,
        )
    unit = kind.removeprefix("candle.")
    period = CANDLE_UNITS.get(unit)
    if period is None:
        return None
    candle = state.latest_candle(period)
    if candle is None:
        return None
    return state.candle_fields(unit, candle, ts)


# -- fan-out -----------------------------------------------------------------------------


class Hub:
    """All open connections, the realtime index and the fan-out of events."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.connections: dict[int, Connection] = {}
        self.closed: deque[dict[str, object]] = deque(maxlen=sim.config.max_closed_connections)
        self._index: dict[tuple[str, str], dict[Connection, list[Target]]] = {}
        self._private: set[Connection] = set()

    def add(self, conn: Connection) -> None:
        self.connections[conn.id] = conn

    def remove(self, conn: Connection) -> None:
        self.unregister(conn)
        self._private.discard(conn)
        if self.connections.pop(conn.id, None) is not None:
            self.closed.append(conn.describe())

    def register(self, conn: Connection, realtime: list[tuple[str, Target]], now: float) -> None:
        conn.realtime = realtime
        for kind, target in realtime:
            self._index.setdefault((kind, target.code), {}).setdefault(conn, []).append(target)
            self.sim.exchange.watch(target.code, now)
        if realtime:
            self.sim.wake_ticker()

    def unregister(self, conn: Connection) -> None:
        now = time.time()
        for kind, target in conn.realtime:
            subs = self._index.get((kind, target.code))
            if subs is not None and subs.pop(conn, None) is not None and not subs:
                del self._index[(kind, target.code)]
            self.sim.exchange.unwatch(target.code, now)
        conn.realtime = []
        conn.my_order = None
        conn.my_asset = False
        self._private.discard(conn)

    def register_private(self, conn: Connection) -> None:
        if conn.my_order is not None or conn.my_asset:
            self._private.add(conn)

    def publish(self, event: MarketEvent) -> None:
        """Send one market event to every realtime subscriber of its (type, code)."""
        subs = self._index.get((event.type, event.code))
        if not subs:
            return
        sim = self.sim
        for conn, targets in list(subs.items()):
            if sim.firehose or conn.silenced():
                continue
            simple = conn.simple
            for target in targets:
                key = (simple, target.count, target.level)
                payload = event.cache.get(key)
                if payload is None:
                    payload = _encode_event(event, simple, target)
                    event.cache[key] = payload
                conn.send_data(payload)

    def publish_account(self, event: Mapping[str, object]) -> None:
        """Send one myOrder / myAsset event to the private subscribers that want it."""
        if not self._private:
            return
        kind = event.get("type")
        msg = dict(event)
        msg.setdefault("stream_type", "REALTIME")
        encoded: dict[bool, bytes] = {}
        for conn in list(self._private):
            if conn.silenced():
                continue
            if kind == "myOrder":
                codes = conn.my_order
                if codes is None or (codes and event.get("code") not in codes):
                    continue
            elif kind == "myAsset":
                if not conn.my_asset:
                    continue
            else:
                continue
            payload = encoded.get(conn.simple)
            if payload is None:
                payload = encode_json(simplify(msg) if conn.simple else msg)
                encoded[conn.simple] = payload
            conn.send_data(payload)

    def wake_all(self) -> None:
        for conn in self.connections.values():
            conn.wakeup.set()

    def iter_connections(self, path: str | None = None) -> Iterable[Connection]:
        return [c for c in self.connections.values() if path is None or c.path == path]


def _encode_event(event: MarketEvent, simple: bool, target: Target) -> bytes:
    if event.type == "orderbook":
        quote = event.code.split("-", 1)[0]
        fields = orderbook_fields(
            event.code,
            quote,
            event.asks,
            event.bids,
            event.ts,
            count=target.count,
            level=target.level,
            level_value=target.level_value,
        )
    else:
        fields = dict(event.fields or {})
    fields["stream_type"] = "REALTIME"
    return encode_json(simplify(fields) if simple else fields)
