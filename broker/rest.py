"""Upbit REST, rate-limit safe: market list, snapshots on demand, fallback polling.

Every call goes through the :class:`broker.ratelimit.RestLimiter` of its group: it
waits when the group's budget (or a ``Remaining-Req: sec=0``) says so, backs off on
429 and stops the group during a 418 block. Bodies are decoded with the REST structs of
:mod:`schemas.rest`; a body that does not decode becomes a :class:`RestError` (never a
crash), and authenticated calls sign a fresh JWT for each request.

A :class:`RestError`'s message reaches clients (a failed snapshot), so it never carries
an upstream body as is: an error body may echo the request, JWT and access key
included. It says the status, Upbit's error name and message when the body has them,
else a short excerpt, always masked (:func:`broker.logs.mask`) and bounded. Credentials
in the configured URL (``https://user:password@host``) are dropped: Upbit's REST API
takes none, and aiohttp refuses them next to the JWT of an exchange call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
from yarl import URL

from broker.exchange import Exchange
from broker.logs import get_logger, mask
from broker.ratelimit import (
    BanStore,
    Priority,
    PriorityGate,
    RestJob,
    RestLimiter,
    ban_seconds,
    parse_block_seconds,
    parse_remaining_req,
    steady_time,
)
from broker.upbit_auth import QueryValue, query_string
from schemas.errors import DecodeError
from schemas.rest import (
    RestAccount,
    RestCandle,
    RestMarket,
    RestOrder,
    RestOrderbook,
    RestTicker,
    RestTrade,
    decode_rest,
    decode_rest_list,
    order_created_ms,
)
from schemas.rest import RestError as RestErrorEnvelope

__all__ = ["PRIORITY_POLL", "PRIORITY_SNAPSHOT", "RestClient", "RestError", "http_session"]

PRIORITY_SNAPSHOT: Final = int(Priority.QUOTATION)
"""A client is waiting for this answer (get_snapshot, market list)."""
PRIORITY_POLL: Final = int(Priority.QUOTATION) + 1
"""Background polling of the REST fallback: goes last."""

T = TypeVar("T")

ERROR_MESSAGE_LIMIT: Final = 300
"""Longest message a :class:`RestError` carries from an error body (after masking)."""
_EXCERPT_LIMIT: Final = 120
"""Longest excerpt of a body that is no Upbit error envelope."""
_MASK_WINDOW: Final = 65_536
"""Bytes of a body masked before an excerpt is cut from it: a JWT or key that starts in
the excerpt ends well inside, so it is masked whole, never cut into a partial leak."""

_CLOSED_PAGE: Final = 1000
"""Orders per ``GET /v1/orders/closed`` call (Upbit's maximum ``limit``)."""

_MINUTE_UNITS = {"1m": 1, "3m": 3, "5m": 5, "10m": 10, "15m": 15, "30m": 30, "60m": 60, "240m": 240}


def http_session(**options: Any) -> aiohttp.ClientSession:
    """An aiohttp session that sends each request once (REST calls and WebSocket
    upgrades alike; ``options`` go to :class:`aiohttp.ClientSession`).

    aiohttp sends a GET or DELETE again by itself when the connection drops before the
    answer; the copy carries the same JWT, whose nonce Upbit refuses (401
    ``nonce_used``, which would read as rejected keys), and a lost cancel would go out
    twice. Whether and how to try again is the caller's decision (a fresh token each
    time; an order is looked up, never resent). aiohttp has no public switch for this
    (its own test client turns it off the same way); the locked version is checked by
    ``tests/broker/test_rest.py``.
    """
    session = aiohttp.ClientSession(**options)
    session._retry_connection = False
    return session


class RestError(Exception):
    """A REST call failed: HTTP status (0 for transport errors) and a safe message.

    ``name`` and ``upbit_message`` are Upbit's error name and message when the body was
    its error envelope (masked and bounded like the message), else empty. ``sent`` is
    False when the request never left the broker (no slot of its group in time): for an
    order that means it was certainly not placed. ``resent``: Upbit answered 429 to an
    earlier send of this request, so it went out again (a 429 means "not carried out";
    were that ever untrue, an order's resend is refused ``duplicated_identifier``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        name: str = "",
        upbit_message: str = "",
        sent: bool = True,
        resent: bool = False,
    ) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.name = name
        self.upbit_message = upbit_message
        self.sent = sent
        self.resent = resent


class RestClient:
    """Thin aiohttp shell around Upbit's REST API, with limits per group."""

    def __init__(
        self,
        exchange: Exchange,
        *,
        bans: BanStore | None = None,
        timeout: float = 10.0,
        max_wait: float = 30.0,
    ) -> None:
        self._exchange = exchange
        self._log = get_logger("rest")
        self._base_url = _without_credentials(exchange.rest_url)
        if self._base_url != exchange.rest_url:
            self._log.warning(
                "credentials in the REST URL (UPBIT_REST_URL) are ignored: Upbit takes none",
                url=self._base_url,
            )
        self._limiter = RestLimiter(bans=bans)
        self._gate: PriorityGate[asyncio.Future[None]] = PriorityGate(self._limiter)
        self._pump_handle: asyncio.TimerHandle | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_wait = max_wait
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0
        self.failures = 0
        self.calls_by_group: Counter[str] = Counter()
        """Requests sent, per rate-limit group (read by /metrics)."""
        self.waits: Counter[str] = Counter()
        """Requests that had to queue for a slot of their group."""
        self.wait_seconds: dict[str, float] = {}
        """Seconds spent queueing, per group."""
        self.throttled: Counter[tuple[str, int]] = Counter()
        """``(group, status)`` -> 429 and 418 answers Upbit gave."""

    @property
    def limiter(self) -> RestLimiter:
        """The limiter, for health and tests."""
        return self._limiter

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------- pacing

    def _pump(self) -> None:
        """Release every queued request the limits allow now; come back when more can go."""
        self._pump_handle = None
        now = steady_time()
        for job in self._gate.release(now):
            if not job.payload.done():
                job.payload.set_result(None)
        delay = self._gate.next_delay(now)
        if delay is not None:
            loop = asyncio.get_running_loop()
            self._pump_handle = loop.call_later(max(delay, 0.005), self._pump)

    async def _slot(self, group: str, priority: int, deadline: float, owner: str = "") -> None:
        """Wait for a request slot of ``group``; more urgent priorities go first, and
        owners of one priority take turns (:class:`broker.ratelimit.PriorityGate`)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        job = RestJob(group, priority, future, owner)
        self._gate.submit(job)
        if self._pump_handle is not None:
            self._pump_handle.cancel()
        self._pump()
        if future.done():
            return
        self.waits[group] += 1
        started = time.monotonic()
        try:
            # (not wait_for: on Python 3.11 it can swallow the caller's cancel)
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                await future
        except TimeoutError:
            wait = self._limiter.delay(group, steady_time())
            raise RestError(
                429, f"REST group {group} is rate limited for {wait:.1f} s", sent=False
            ) from None
        finally:
            if future.cancelled():  # timed out or the caller went: no slot for it later
                self._gate.withdraw(job)
            waited = time.monotonic() - started
            self.wait_seconds[group] = self.wait_seconds.get(group, 0.0) + waited

    async def _request(
        self,
        method: str,
        path: str,
        group: str,
        params: Mapping[str, QueryValue] | None = None,
        *,
        auth: bool = False,
        priority: int = PRIORITY_SNAPSHOT,
        body: bool = False,
        max_wait: float | None = None,
        owner: str = "",
        timeout: float | None = None,
    ) -> bytes:
        if self._session is None:
            self._session = http_session(timeout=self._timeout)
        deadline = time.monotonic() + (self._max_wait if max_wait is None else max_wait)
        query = query_string(params) if params else ""
        # Sent as written: Upbit wants array keys' brackets unencoded (states[]=wait).
        in_query = bool(params) and not body
        url = URL(
            f"{self._base_url}{path}" + (f"?{_wire_query(params or {})}" if in_query else ""),
            encoded=True,
        )
        # A body (POST /v1/orders) is JSON in the order of ``params``: Upbit hashes its
        # ``k=v&...`` form, which is ``query`` above.
        payload = json.dumps(dict(params or {})).encode() if body else None
        # A caller with a deadline of its own shortens each attempt (never lengthens it).
        # aiohttp would read zero or less as "no limit at all": refuse it unsent instead.
        if timeout is not None and timeout <= 0:
            raise RestError(0, f"{method} {path} not sent: no time left for an answer", sent=False)
        http_timeout = (
            aiohttp.ClientTimeout(total=min(timeout, self._timeout.total or timeout))
            if timeout is not None
            else None
        )
        resent = False
        while True:
            try:
                await self._slot(group, priority, deadline, owner)
            except RestError as exc:
                if not resent:
                    raise
                # This send is not made, but an earlier one was (and answered 429).
                raise RestError(429, f"{exc} (after Upbit answered 429)", resent=True) from None
            headers = self._exchange.rest_headers(query or None) if auth else {}
            if payload is not None:
                headers["Content-Type"] = "application/json; charset=utf-8"
            self.calls += 1
            self.calls_by_group[group] += 1
            try:
                async with self._session.request(
                    method, url, headers=headers, data=payload, skip_auto_headers=("Origin",),
                    timeout=http_timeout,
                ) as response:  # fmt: skip
                    answer = await response.read()
                    remaining = parse_remaining_req(response.headers.get("Remaining-Req", ""))
                    if remaining is not None:
                        self._limiter.on_remaining(remaining[0], remaining[1], steady_time())
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                # ValueError: aiohttp refusing the request itself (a URL it cannot use);
                # a RestError like any failed call, so no caller's task dies of it.
                self.failures += 1
                raise RestError(0, f"{method} {path} failed: {type(exc).__name__}") from None
            if status in (429, 418):
                self.throttled[group, status] += 1
            if status == 429:
                self.failures += 1
                self._limiter.on_429(group, steady_time())
                resent = True
                continue
            if status == 418:
                self.failures += 1
                seconds = ban_seconds(parse_block_seconds(answer.decode("utf-8", "replace")))
                self._limiter.on_418(group, steady_time(), seconds)
                raise RestError(418, f"Upbit blocked REST group {group} for {seconds:.0f} s")
            if status >= 400:
                self.failures += 1
                name, message = _error_parts(answer)
                raise RestError(
                    status, _error_text(answer), name=name, upbit_message=message, resent=resent
                )
            self._limiter.on_success(group, steady_time())
            return answer

    async def _get(
        self,
        path: str,
        group: str,
        kind: type[T],
        params: Mapping[str, QueryValue] | None = None,
        *,
        auth: bool = False,
        priority: int = PRIORITY_SNAPSHOT,
    ) -> T:
        body = await self._request("GET", path, group, params, auth=auth, priority=priority)
        try:
            return decode_rest(body, kind)
        except DecodeError as exc:
            self.failures += 1
            raise RestError(200, f"unexpected body from {path}: {_bounded(str(exc))}") from None

    async def get_list(
        self,
        path: str,
        group: str,
        kind: type[T],
        params: Mapping[str, QueryValue] | None = None,
        *,
        auth: bool = False,
        priority: int = PRIORITY_SNAPSHOT,
    ) -> list[T]:
        """GET a JSON array of ``kind`` (used directly by the fallback poller)."""
        body = await self._request("GET", path, group, params, auth=auth, priority=priority)
        try:
            return decode_rest_list(body, kind)
        except DecodeError as exc:
            self.failures += 1
            raise RestError(200, f"unexpected body from {path}: {_bounded(str(exc))}") from None

    async def exchange(
        self,
        method: str,
        path: str,
        group: str,
        kind: type[T],
        params: Mapping[str, QueryValue] | None = None,
        *,
        body: bool = False,
        priority: int = Priority.ACCOUNT,
        max_wait: float | None = None,
        owner: str = "",
        timeout: float | None = None,
    ) -> T:
        """One signed exchange call decoded as ``kind`` (orders, cancels, order reads).

        ``body``: ``params`` go as a JSON body (``POST /v1/orders``), else in the query.
        ``max_wait``: longest wait for a slot of ``group`` (then RestError, not sent).
        ``owner``: the client it is for (clients take turns for the group's slots).
        ``timeout``: longest wait for the answer once sent, if shorter than the session's.
        """
        answer = await self._request(
            method, path, group, params, auth=True, priority=priority, body=body,
            max_wait=max_wait, owner=owner, timeout=timeout,
        )  # fmt: skip
        try:
            return decode_rest(answer, kind)
        except DecodeError as exc:
            self.failures += 1
            raise RestError(200, f"unexpected body from {path}: {_bounded(str(exc))}") from None

    # ------------------------------------------------------------- quotation

    async def markets(self) -> list[RestMarket]:
        """Every listed market with its names and warnings (``GET /v1/market/all``,
        ``is_details=true``: the ``market_event`` flags clients see through the broker)."""
        params: dict[str, QueryValue] = {"is_details": "true"}
        return await self.get_list("/v1/market/all", "market", RestMarket, params)

    async def tickers(self, codes: Sequence[str]) -> list[RestTicker]:
        """Tickers of ``codes`` (chunked: very long lists break HTTP clients)."""
        result: list[RestTicker] = []
        for start in range(0, len(codes), 100):
            chunk = ",".join(codes[start : start + 100])
            result += await self.get_list("/v1/ticker", "ticker", RestTicker, {"markets": chunk})
        return result

    async def orderbooks(
        self, codes: Sequence[str], *, level: float | None = None, count: int = 30
    ) -> list[RestOrderbook]:
        """Orderbooks of ``codes`` at one grouping level."""
        params: dict[str, QueryValue] = {"markets": ",".join(codes), "count": count}
        if level:
            params["level"] = str(level)
        return await self.get_list("/v1/orderbook", "orderbook", RestOrderbook, params)

    async def trades(self, code: str, count: int = 50) -> list[RestTrade]:
        """Latest trades of one market, newest first."""
        params: dict[str, QueryValue] = {"market": code, "count": count}
        return await self.get_list("/v1/trades/ticks", "trade", RestTrade, params)

    async def candles(self, code: str, unit: str, count: int = 1) -> list[RestCandle]:
        """Latest candles of one market for a WebSocket unit (``1s``, ``1m``, ...)."""
        params: dict[str, QueryValue] = {"market": code, "count": count}
        if unit == "1s":
            return await self.get_list("/v1/candles/seconds", "candle", RestCandle, params)
        minutes = _MINUTE_UNITS[unit]
        return await self.get_list(f"/v1/candles/minutes/{minutes}", "candle", RestCandle, params)

    # ------------------------------------------------------------- exchange

    async def accounts(self) -> list[RestAccount]:
        """Balances (needs keys)."""
        return await self.get_list(
            "/v1/accounts", "default", RestAccount, auth=True, priority=Priority.ACCOUNT
        )

    async def open_orders(self, *, max_pages: int = 20) -> list[RestOrder]:
        """Every open order (``wait`` and ``watch``), all pages (needs keys)."""
        orders: list[RestOrder] = []
        for page in range(1, max_pages + 1):
            params: dict[str, QueryValue] = {
                "states[]": ["wait", "watch"],
                "page": page,
                "limit": 100,
            }
            batch = await self.get_list(
                "/v1/orders/open",
                "default",
                RestOrder,
                params,
                auth=True,
                priority=Priority.ACCOUNT,
            )
            orders += batch
            if len(batch) < 100:
                break
        return orders

    async def closed_orders(
        self, start_ms: int, end_ms: int, *, max_pages: int = 20
    ) -> list[RestOrder]:
        """Orders closed (``done``, ``cancel``) in ``start_ms``..``end_ms``, every page.

        Oldest first, 1000 a call; a full page continues from its last order's time (the
        listing has no page number), so an order on that boundary comes twice and is
        kept once. The window must be 7 days at most (Upbit refuses more;
        :func:`broker.reconcile.closed_window` makes it). Past ``max_pages`` the rest is
        left out (a ``RestError`` would lose all of it).
        """
        found: dict[str, RestOrder] = {}
        start = start_ms
        for _ in range(max_pages):
            params: dict[str, QueryValue] = {
                "states[]": ["done", "cancel"],
                "start_time": start,
                "end_time": end_ms,
                "limit": _CLOSED_PAGE,
                "order_by": "asc",
            }
            batch = await self.get_list(
                "/v1/orders/closed",
                "default",
                RestOrder,
                params,
                auth=True,
                priority=Priority.ACCOUNT,
            )
            for o in batch:
                found.setdefault(o.uuid, o)
            if len(batch) < _CLOSED_PAGE:
                break
            try:
                last = order_created_ms(batch[-1])
            except DecodeError as exc:
                raise RestError(200, f"unexpected body from /v1/orders/closed: {exc}") from None
            # A page of one millisecond cannot move on: take one more ms (rare; logged).
            if last <= start:
                self._log.warning("closed orders: a full page within one ms", at=start)
                last = start + 1
            start = last
        return list(found.values())

    async def order(self, uuid: str) -> RestOrder:
        """One order by uuid (needs keys)."""
        return await self._get(
            "/v1/order", "default", RestOrder, {"uuid": uuid}, auth=True, priority=Priority.ACCOUNT
        )


def _wire_query(params: Mapping[str, QueryValue]) -> str:
    """The query string on the wire: values percent-encoded, ``[]`` in keys kept as is."""
    pairs: list[str] = []
    for key, value in params.items():
        values = value if isinstance(value, list | tuple) else [value]
        pairs += [f"{quote(key, safe='[]')}={quote(str(v), safe=',')}" for v in values]
    return "&".join(pairs)


def _without_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part (unchanged when it has none)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _bounded(text: str, limit: int = ERROR_MESSAGE_LIMIT) -> str:
    """``text`` masked, on one line, and cut to ``limit`` characters (masked first: a
    secret cut in two would no longer be recognised)."""
    flat = " ".join(mask(text[:_MASK_WINDOW]).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _error_parts(body: bytes) -> tuple[str, str]:
    """Upbit's error name and message from an error envelope (masked, bounded), or
    empty strings when the body is none."""
    try:
        error = decode_rest(body, RestErrorEnvelope)
    except DecodeError:
        return "", ""
    return _bounded(str(error.error.name), 80), _bounded(error.error.message)


def _error_text(body: bytes) -> str:
    """A safe, short message from an error body: Upbit's error name and message when it
    is an error envelope, else a short excerpt; masked and bounded either way."""
    try:
        error = decode_rest(body, RestErrorEnvelope)
    except DecodeError:
        text = body[:_MASK_WINDOW].decode("utf-8", "replace")
        if not text.strip():
            return "no body"
        excerpt = _bounded(text, _EXCERPT_LIMIT)
        return f"{excerpt} ({len(body)} bytes)" if len(body) > _EXCERPT_LIMIT else excerpt
    return _bounded(f"{error.error.name}: {error.error.message}")
