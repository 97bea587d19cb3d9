"""REST quotation endpoints (no auth), fed by the same markets as the WebSocket.

Routes: /v1/market/all, /v1/ticker, /v1/ticker/all, /v1/orderbook,
/v1/orderbook/instruments, /v1/trades/ticks, /v1/candles/seconds,
/v1/candles/minutes/{unit}, /v1/candles/days, /v1/candles/weeks, /v1/candles/months.

Quotation errors carry an INTEGER name (docs/PROTOCOL.md section 5.2). Numbers are JSON
numbers. Rate limits and ``Remaining-Req`` are applied by the middleware in
``simulator.app``. A market used here stays active (ticking) for
``rest_activation_seconds`` so a REST poller sees it move.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from simulator.market import (
    DAY,
    KST_OFFSET_MS,
    PRICE_SCALE,
    SIZE_SCALE,
    VALUE_SCALE,
    Candle,
    MarketState,
    fmt_date,
    fmt_datetime,
    fmt_time,
    level_to_atoms,
    orderbook_fields,
)

if TYPE_CHECKING:
    from simulator.app import Simulator

__all__ = ["QuotationError", "add_public_routes"]

MISSING = "Missing request parameter error. Check the required parameters!"
INVALID = "Invalid parameter. Check the given value!"
MINUTE_UNITS = (1, 3, 5, 10, 15, 30, 60, 240)
_encoder = msgspec.json.Encoder(decimal_format="number")


def dumps(obj: object) -> str:
    """JSON text with numbers as numbers and UTF-8 (not \\u-escaped) names."""
    return _encoder.encode(obj).decode()


class QuotationError(Exception):
    """A quotation error: HTTP status doubles as the integer ``name``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> web.Response:
        return web.json_response(
            {"error": {"name": self.status, "message": self.message}},
            status=self.status,
            dumps=dumps,
        )


def _markets_param(request: web.Request, name: str = "markets") -> list[str]:
    raw = request.query.get(name, "")
    codes = [c.strip() for c in raw.split(",") if c.strip()]
    if not codes:
        raise QuotationError(400, MISSING)
    return codes


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise QuotationError(400, INVALID) from None
    if not lo <= value <= hi:
        raise QuotationError(400, INVALID)
    return value


def _parse_to(raw: str | None) -> int | None:
    """A candle ``to`` (ISO-8601; no zone means UTC) as epoch ms, exclusive upper bound."""
    if not raw:
        return None
    text = re.sub(r" (\d{2}:?\d{2})$", r"+\1", raw.strip())  # '+' decoded as space
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise QuotationError(400, INVALID) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _px(atoms: int) -> float:
    return atoms / PRICE_SCALE


def _sz(atoms: int) -> float:
    return atoms / SIZE_SCALE


def rest_ticker(state: MarketState, now_ms: int) -> dict[str, object]:
    """GET /v1/ticker item: the WS ticker's numbers with REST field names and formats."""
    f = state.ticker_fields(now_ms)
    trade_ts = f["trade_timestamp"]
    assert isinstance(trade_ts, int)
    return {
        "market": state.code,
        "trade_date": fmt_date(trade_ts, ""),
        "trade_time": fmt_time(trade_ts, ""),
        "trade_date_kst": fmt_date(trade_ts, "", KST_OFFSET_MS),
        "trade_time_kst": fmt_time(trade_ts, "", KST_OFFSET_MS),
        "trade_timestamp": trade_ts,
        "opening_price": f["opening_price"],
        "high_price": f["high_price"],
        "low_price": f["low_price"],
        "trade_price": f["trade_price"],
        "prev_closing_price": f["prev_closing_price"],
        "change": f["change"],
        "change_price": f["change_price"],
        "change_rate": f["change_rate"],
        "signed_change_price": f["signed_change_price"],
        "signed_change_rate": f["signed_change_rate"],
        "trade_volume": f["trade_volume"],
        "acc_trade_price": f["acc_trade_price"],
        "acc_trade_price_24h": f["acc_trade_price_24h"],
        "acc_trade_volume": f["acc_trade_volume"],
        "acc_trade_volume_24h": f["acc_trade_volume_24h"],
        "highest_52_week_price": f["highest_52_week_price"],
        "highest_52_week_date": f["highest_52_week_date"],
        "lowest_52_week_price": f["lowest_52_week_price"],
        "lowest_52_week_date": f["lowest_52_week_date"],
        "timestamp": now_ms,
    }


def _candle_base(code: str, c: Candle) -> dict[str, object]:
    return {
        "market": code,
        "candle_date_time_utc": fmt_datetime(c.start),
        "candle_date_time_kst": fmt_datetime(c.start, KST_OFFSET_MS),
        "opening_price": _px(c.open),
        "high_price": _px(c.high),
        "low_price": _px(c.low),
        "trade_price": _px(c.close),
        "timestamp": c.last_ts,
        "candle_acc_trade_price": c.value / VALUE_SCALE,
        "candle_acc_trade_volume": _sz(c.volume),
    }


def _select(candles: Iterable[Candle], to_ms: int | None, count: int) -> list[Candle]:
    """Newest first, strictly before ``to``, at most ``count``."""
    out: list[Candle] = []
    for c in reversed(list(candles)):
        if to_ms is not None and c.start >= to_ms:
            continue
        out.append(c)
        if len(out) >= count:
            break
    return out


def _aggregate(days: Iterable[Candle], period_start: Callable[[int], int]) -> list[Candle]:
    """Roll day candles up into weeks or months (oldest first)."""
    out: list[Candle] = []
    for d in days:
        start = period_start(d.start)
        if out and out[-1].start == start:
            cur = out[-1]
            cur.high = max(cur.high, d.high)
            cur.low = min(cur.low, d.low)
            cur.close = d.close
            cur.volume += d.volume
            cur.value += d.value
            cur.last_ts = d.last_ts
        else:
            c = d.copy()
            c.start = start
            out.append(c)
    return out


def _week_start(ms: int) -> int:
    day = datetime.fromtimestamp(ms / 1000, UTC)
    monday = day - timedelta(days=day.weekday())
    return int(monday.replace(hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)


def _month_start(ms: int) -> int:
    day = datetime.fromtimestamp(ms / 1000, UTC)
    first = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return int(first.timestamp() * 1000)


def add_public_routes(app: web.Application, sim: Simulator) -> None:
    """Register the quotation routes for ``sim`` on ``app``."""
    exchange = sim.exchange

    def market(code: str, now: float) -> MarketState:
        if not exchange.known(code):
            raise QuotationError(404, "Code not found")
        state = exchange.touch(code, now)
        sim.wake_ticker()
        return state

    def wrap(
        fn: Callable[[web.Request, float], object],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return web.json_response(fn(request, time.time()), dumps=dumps)
            except QuotationError as exc:
                return exc.response()

        return handler

    def market_all(request: web.Request, now: float) -> object:
        details = request.query.get("is_details") or request.query.get("isDetails") or ""
        with_details = details.lower() == "true"
        out: list[dict[str, object]] = []
        for info in exchange.infos.values():
            item: dict[str, object] = {
                "market": info.code,
                "korean_name": info.korean_name,
                "english_name": info.english_name,
            }
            if with_details:
                item["market_event"] = {
                    "warning": info.warning,
                    "caution": {
                        name: name in info.cautions
                        for name in (
                            "PRICE_FLUCTUATIONS",
                            "TRADING_VOLUME_SOARING",
                            "DEPOSIT_AMOUNT_SOARING",
                            "GLOBAL_PRICE_DIFFERENCES",
                            "CONCENTRATION_OF_SMALL_ACCOUNTS",
                        )
                    },
                }
            out.append(item)
        return out

    def ticker(request: web.Request, now: float) -> object:
        codes = _markets_param(request)
        states = [market(code, now) for code in codes]
        now_ms = int(now * 1000)
        return [rest_ticker(st, now_ms) for st in states]

    def ticker_all(request: web.Request, now: float) -> object:
        quotes = _markets_param(request, "quote_currencies")
        known_quotes = {info.quote for info in exchange.infos.values()}
        if any(q not in known_quotes for q in quotes):
            raise QuotationError(404, "Code not found")
        now_ms = int(now * 1000)
        return [
            rest_ticker(market(info.code, now), now_ms)
            for q in quotes
            for info in exchange.infos.values()
            if info.quote == q
        ]

    def orderbook(request: web.Request, now: float) -> object:
        codes = _markets_param(request)
        raw_level = request.query.get("level")
        level = 0
        if raw_level not in (None, ""):
            parsed = level_to_atoms(raw_level)
            if parsed is None:
                raise QuotationError(400, INVALID)
            level = parsed
        raw_count = request.query.get("count")
        count = 30
        if raw_count not in (None, ""):
            try:
                count = int(raw_count or "")
            except ValueError:
                raise QuotationError(400, INVALID) from None
            if not 1 <= count <= 30:
                count = 30
        now_ms = int(now * 1000)
        out: list[dict[str, object]] = []
        for code in codes:
            st = market(code, now)
            lv = level if st.quote == "KRW" else 0
            if lv not in st.supported_levels():
                continue  # unsupported level: no data (an empty array overall)
            asks, bids = st.book_snapshot()
            value: int | float = lv // PRICE_SCALE if lv % PRICE_SCALE == 0 else lv / PRICE_SCALE
            f = orderbook_fields(
                code, st.quote, asks, bids, now_ms, count=count, level=lv, level_value=value
            )
            out.append(
                {
                    "market": code,
                    "timestamp": now_ms,
                    "total_ask_size": f["total_ask_size"],
                    "total_bid_size": f["total_bid_size"],
                    "orderbook_units": f["orderbook_units"],
                    "level": f["level"],
                }
            )
        return out

    def instruments(request: web.Request, now: float) -> object:
        out: list[dict[str, object]] = []
        for code in _markets_param(request):
            st = market(code, now)
            tick = st.tick_at(st.best_bid)
            out.append(
                {
                    "market": code,
                    "quote_currency": st.quote,
                    "tick_size": _decimal_text(tick),
                    "supported_levels": [_decimal_text(lv) for lv in st.supported_levels()],
                }
            )
        return out

    def trades_ticks(request: web.Request, now: float) -> object:
        code = request.query.get("market", "").strip()
        if not code:
            raise QuotationError(400, MISSING)
        st = market(code, now)
        count = _int_param(request, "count", 1, 1, 500)
        days_ago = _int_param(request, "days_ago", 0, 1, 7) if request.query.get("days_ago") else 0
        cursor_raw = request.query.get("cursor")
        cursor: int | None = None
        if cursor_raw:
            try:
                cursor = int(cursor_raw)
            except ValueError:
                raise QuotationError(400, INVALID) from None
        day_start = int(now * 1000) - int(now * 1000) % (DAY * 1000) - days_ago * DAY * 1000
        upper = day_start + DAY * 1000
        to_raw = request.query.get("to")
        if to_raw:
            m = re.fullmatch(r"(\d{2}):?(\d{2}):?(\d{2})", to_raw.strip())
            if m is None:
                raise QuotationError(400, INVALID)
            hh, mm, ss = (int(x) for x in m.groups())
            upper = day_start + ((hh * 60 + mm) * 60 + ss) * 1000
        lower = day_start if (days_ago or to_raw) else 0
        out: list[dict[str, object]] = []
        for t in reversed(st.trades):
            if cursor is not None and t.seq >= cursor:
                continue
            if t.ts >= upper or t.ts < lower:
                continue
            diff = t.price - t.prev_close
            out.append(
                {
                    "market": code,
                    "trade_date_utc": fmt_date(t.ts),
                    "trade_time_utc": fmt_time(t.ts),
                    "timestamp": t.ts,
                    "trade_price": _px(t.price),
                    "trade_volume": _sz(t.volume),
                    "prev_closing_price": _px(t.prev_close),
                    "change_price": _px(diff),
                    "ask_bid": t.ask_bid,
                    "sequential_id": t.seq,
                }
            )
            if len(out) >= count:
                break
        return out

    def candle_request(request: web.Request, now: float) -> tuple[MarketState, int | None, int]:
        code = request.query.get("market", "").strip()
        if not code:
            raise QuotationError(400, MISSING)
        st = market(code, now)
        count = _int_param(request, "count", 1, 1, 200)
        return st, _parse_to(request.query.get("to")), count

    def candles_seconds(request: web.Request, now: float) -> object:
        st, to_ms, count = candle_request(request, now)
        return [_candle_base(st.code, c) for c in _select(st.candles[1], to_ms, count)]

    def candles_minutes(request: web.Request, now: float) -> object:
        try:
            unit = int(request.match_info["unit"])
        except ValueError:
            raise QuotationError(400, INVALID) from None
        if unit not in MINUTE_UNITS:
            raise QuotationError(400, INVALID)
        st, to_ms, count = candle_request(request, now)
        out = []
        for c in _select(st.candles[unit * 60], to_ms, count):
            item = _candle_base(st.code, c)
            item["unit"] = unit
            out.append(item)
        return out

    def candles_days(request: web.Request, now: float) -> object:
        st, to_ms, count = candle_request(request, now)
        convert = request.query.get("converting_price_unit")
        out = []
        for c in _select(st.candles[DAY], to_ms, count):
            item = _candle_base(st.code, c)
            diff = c.close - c.prev_close
            item["prev_closing_price"] = _px(c.prev_close)
            item["change_price"] = _px(diff)
            item["change_rate"] = round(diff / c.prev_close, 10) if c.prev_close else 0.0
            if convert:
                item["converted_trade_price"] = _px(c.close)
            out.append(item)
        return out

    def periodic(period_start: Callable[[int], int]) -> Callable[[web.Request, float], object]:
        def handler(request: web.Request, now: float) -> object:
            st, to_ms, count = candle_request(request, now)
            rolled = _aggregate(st.candles[DAY], period_start)
            out = []
            for c in _select(rolled, to_ms, count):
                item = _candle_base(st.code, c)
                item["first_day_of_period"] = fmt_date(c.start)
                out.append(item)
            return out

        return handler

    routes: list[tuple[str, Callable[[web.Request, float], object]]] = [
        ("/v1/market/all", market_all),
        ("/v1/ticker", ticker),
        ("/v1/ticker/all", ticker_all),
        ("/v1/orderbook", orderbook),
        ("/v1/orderbook/instruments", instruments),
        ("/v1/trades/ticks", trades_ticks),
        ("/v1/candles/seconds", candles_seconds),
        ("/v1/candles/minutes/{unit}", candles_minutes),
        ("/v1/candles/days", candles_days),
        ("/v1/candles/weeks", periodic(_week_start)),
        ("/v1/candles/months", periodic(_month_start)),
    ]
    for path, fn in routes:
        app.router.add_get(path, wrap(fn))


def _decimal_text(atoms: int) -> str:
    whole, frac = divmod(atoms, PRICE_SCALE)
    if not frac:
        return str(whole)
    return f"{whole}.{frac:08d}".rstrip("0")
