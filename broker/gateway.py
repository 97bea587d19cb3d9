"""Quotation REST through the broker: Upbit's market list, candles, tickers, orderbooks and
trades on a client's request, under the host's shared REST limits.

Programs ask the broker (:class:`schemas.bus.Quote`) instead of calling Upbit
themselves, so every process on the machine shares one budget per rate-limit group and
nobody earns the host a 429 or a 418 block. The pure part (:func:`plan_quote`,
:class:`CandlePager`) validates a request as a whole before any REST call and pages
candles past Upbit's 200 per call; :class:`Gateway` is the thin shell that runs the
calls on :class:`broker.rest.RestClient` at the priority of a waiting client (above
background polling, below orders) and answers :class:`schemas.bus.QuoteReply` or
:class:`schemas.bus.ErrorReply`. The market list is never fetched per request: it is
the broker's hourly cache (with names and warnings), handed in by :meth:`set_markets`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from broker.ports import MarketList
from broker.rest import PRIORITY_SNAPSHOT, RestClient, RestError
from broker.subscriptions import SpecError, normalize_code
from broker.upbit_auth import QueryValue
from schemas.bus import ErrorCode, ErrorReply, Quote, QuoteReply
from schemas.rest import RestCandle, RestMarket

__all__ = [
    "CANDLE_PAGE",
    "CANDLE_PATHS",
    "FETCHING",
    "MAX_CANDLES",
    "MAX_CODES",
    "MAX_TRADES",
    "CandlePager",
    "Gateway",
    "QuoteInvalid",
    "QuotePlan",
    "normalize_to",
    "plan_quote",
]

CANDLE_PATHS: Final[dict[str, str]] = {
    "1s": "/v1/candles/seconds",
    **{f"{n}m": f"/v1/candles/minutes/{n}" for n in (1, 3, 5, 10, 15, 30, 60, 240)},
    "days": "/v1/candles/days",
    "weeks": "/v1/candles/weeks",
    "months": "/v1/candles/months",
    "years": "/v1/candles/years",
}
"""Candle units a client may ask for, and Upbit's path of each."""
CANDLE_PAGE: Final = 200
"""Most candles Upbit returns per call."""
MAX_CANDLES: Final = 10_000
"""Most candles one request may ask for: 50 calls, about 5 s of the host's candle budget."""
MAX_TRADES: Final = 500
"""Most trades one request may ask for (Upbit's maximum ``count``)."""
MAX_CODES: Final = 1000
"""Most market codes in one tickers or orderbooks request."""
CODES_PER_CALL: Final = 100
"""Codes per REST call (very long query strings break HTTP clients)."""
MAX_DEPTH: Final = 30
"""Deepest orderbook Upbit's REST serves."""
FETCHING: Final = 4
"""Quote requests that run REST calls at the same time; the others wait their turn."""
MARKETS_WAIT: Final = 3.0
"""How long a request waits for the first market list before ``upstream_unavailable``."""


class QuoteInvalid(ValueError):
    """A quote request the broker refuses before any REST call; ``code`` for the bus."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code


@dataclass(frozen=True, slots=True)
class QuotePlan:
    """A validated quote request: normalized codes and Upbit parameters."""

    kind: str
    codes: tuple[str, ...] = ()
    path: str = ""
    count: int = 1
    to: str | None = None
    depth: int = MAX_DEPTH
    level: float = 0.0


def _count(value: int | None, default: int, limit: int, what: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not 1 <= value <= limit:
        raise QuoteInvalid("invalid_option", f"{what} count {value!r} must be 1 to {limit}")
    return value


def _codes(codes: Sequence[str], markets: Collection[str], *, one: bool, what: str) -> list[str]:
    if one and len(codes) != 1:
        raise QuoteInvalid("invalid_code", f"{what} takes exactly one market code")
    if not codes:
        raise QuoteInvalid("invalid_code", f"{what} needs at least one market code")
    if len(codes) > MAX_CODES:
        raise QuoteInvalid(
            "too_many_streams", f"{len(codes)} codes in one request; the limit is {MAX_CODES}"
        )
    try:
        normalized = [normalize_code(code, markets) for code in codes]
    except SpecError as exc:
        raise QuoteInvalid(exc.code, str(exc)) from None
    return list(dict.fromkeys(normalized))


def normalize_to(text: str) -> str:
    """A candle ``to`` (ISO 8601; no zone means UTC, as at Upbit) as ``...THH:MM:SSZ``.

    Fractions of a second round up: ``to`` is exclusive and candles start on whole
    seconds, so none that a fractional ``to`` would include is lost. QuoteInvalid else.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise QuoteInvalid(
            "invalid_option",
            f"to={text!r} is not an ISO 8601 time like '2025-06-27T00:00:00Z'",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return f"{moment:%Y-%m-%dT%H:%M:%S}Z"


def plan_quote(message: Quote, markets: Collection[str]) -> QuotePlan:
    """Validate ``message`` as a whole against the listed ``markets``; QuoteInvalid else."""
    kind = message.kind
    if kind == "markets":
        if message.codes:
            raise QuoteInvalid("invalid_code", "markets takes no market codes")
        return QuotePlan(kind)
    if kind == "tickers":
        return QuotePlan(kind, tuple(_codes(message.codes, markets, one=False, what=kind)))
    if kind == "orderbooks":
        codes = _codes(message.codes, markets, one=False, what=kind)
        depth = _count(message.depth, MAX_DEPTH, MAX_DEPTH, "orderbook depth:")
        level = 0.0 if message.level is None else message.level
        if isinstance(level, bool) or not math.isfinite(level) or level < 0:
            raise QuoteInvalid("invalid_option", f"level {level!r} must be a finite number >= 0")
        return QuotePlan(kind, tuple(codes), depth=depth, level=float(level))
    if kind == "trades":
        codes = _codes(message.codes, markets, one=True, what=kind)
        return QuotePlan(kind, tuple(codes), count=_count(message.count, 1, MAX_TRADES, "trades"))
    if kind == "candles":
        codes = _codes(message.codes, markets, one=True, what=kind)
        path = CANDLE_PATHS.get(message.unit or "")
        if path is None:
            raise QuoteInvalid(
                "invalid_option",
                f"candle unit {message.unit!r} is not one of {', '.join(CANDLE_PATHS)}",
            )
        count = _count(message.count, 1, MAX_CANDLES, "candles")
        to = None if message.to is None else normalize_to(message.to)
        return QuotePlan(kind, tuple(codes), path=path, count=count, to=to)
    raise QuoteInvalid("unknown_type", f"unknown quote kind {kind!r}")  # pragma: no cover


class CandlePager:
    """Pages of at most :data:`CANDLE_PAGE` candles, newest first, until ``count``.

    Each next page ends before the oldest candle so far; a candle seen twice (should
    Upbit's ``to`` be inclusive) is kept once; a short or stale page means the history
    is exhausted.
    """

    def __init__(self, count: int, to: str | None) -> None:
        self._left = count
        self._to = to
        self._done = False
        self._seen: set[str] = set()
        self.candles: list[RestCandle] = []
        """What the pages gave so far, newest first."""

    def next_call(self) -> tuple[int, str | None] | None:
        """``(count, to)`` of the next REST call, or None when done."""
        if self._done or self._left <= 0:
            return None
        return min(CANDLE_PAGE, self._left), self._to

    def add(self, page: Sequence[RestCandle], asked: int) -> None:
        """Take one page that answered a call for ``asked`` candles."""
        fresh = [c for c in page if c.candle_date_time_utc not in self._seen]
        fresh = fresh[: self._left]
        self._seen.update(c.candle_date_time_utc for c in fresh)
        self.candles += fresh
        self._left -= len(fresh)
        if len(page) < asked or not fresh:
            self._done = True
        else:
            self._to = min(c.candle_date_time_utc for c in page) + "Z"


class Gateway:
    """Answers :class:`schemas.bus.Quote` from the market cache and Upbit's REST API."""

    def __init__(self, rest: RestClient, markets: MarketList) -> None:
        self._rest = rest
        self._markets = markets
        self._list: tuple[RestMarket, ...] | None = None
        self._codes: frozenset[str] = frozenset()
        self._fetching = asyncio.Semaphore(FETCHING)

    def set_markets(self, markets: Sequence[RestMarket]) -> None:
        """The market list was (re)loaded: serve and validate against it from now on."""
        self._list = tuple(markets)
        self._codes = frozenset(m.market for m in markets)

    async def answer(self, message: Quote) -> QuoteReply | ErrorReply:
        """The reply to ``message``: validated first, then REST calls, errors as replies."""
        if self._list is None and not (
            await self._markets.wait_markets(MARKETS_WAIT) and self._list is not None
        ):
            return ErrorReply(message.req, "upstream_unavailable", _NO_MARKETS)
        try:
            plan = plan_quote(message, self._codes)
        except QuoteInvalid as exc:
            return ErrorReply(message.req, exc.code, str(exc))
        if plan.kind == "markets":
            return QuoteReply(message.req, "markets", markets=list(self._list or ()))
        try:
            async with self._fetching:
                return await self._fetch(message.req, plan)
        except RestError as exc:
            if exc.status == 0:
                return ErrorReply(message.req, "upstream_unavailable", f"Upbit unreachable: {exc}")
            return ErrorReply(message.req, "upstream_error", f"Upbit refused: {exc}")

    async def _fetch(self, req: int, plan: QuotePlan) -> QuoteReply:
        rest = self._rest
        chunks = [
            plan.codes[i : i + CODES_PER_CALL] for i in range(0, len(plan.codes), CODES_PER_CALL)
        ]
        if plan.kind == "tickers":
            return QuoteReply(req, "tickers", tickers=await rest.tickers(plan.codes))
        if plan.kind == "orderbooks":
            books = []
            for chunk in chunks:
                books += await rest.orderbooks(chunk, level=plan.level, count=plan.depth)
            return QuoteReply(req, "orderbooks", orderbooks=books)
        if plan.kind == "trades":
            return QuoteReply(req, "trades", trades=await rest.trades(plan.codes[0], plan.count))
        pager = CandlePager(plan.count, plan.to)
        while (call := pager.next_call()) is not None:
            count, to = call
            params: dict[str, QueryValue] = {"market": plan.codes[0], "count": count}
            if to is not None:
                params["to"] = to
            page = await rest.get_list(
                plan.path, "candle", RestCandle, params, priority=PRIORITY_SNAPSHOT
            )
            pager.add(page, count)
        return QuoteReply(req, "candles", candles=pager.candles)


_NO_MARKETS = (
    "Upbit's market list is not available yet (Upbit unreachable?), so no request can be "
    "checked; try again"
)
