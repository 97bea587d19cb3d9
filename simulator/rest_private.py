"""The simulator's Upbit exchange REST endpoints (JWT-verified) and account control routes.

Thin aiohttp handlers over :class:`simulator.account.Account`: every ``/v1`` call is
verified with :class:`simulator.auth.JwtVerifier` against the parameters it carries. Errors
use the exchange envelope ``{"error": {"name": "<string>", "message": "..."}}``
(docs/PROTOCOL.md section 5.2). Rate limiting is not done here: the app's middleware
covers every ``/v1`` path (``POST /v1/orders`` is the ``order`` group).

Simulator choices where the notes are silent (UNCONFIRMED on Upbit):

* GET and DELETE take their parameters from the query string **or** from a body, form
  (``application/x-www-form-urlencoded``, as pyupbit's ``requests.get(data=...)`` sends)
  or JSON. The query_hash input is the parameters' unencoded query string however they
  came: the percent-decoded query string, the percent-decoded form body, or the JSON body
  rendered as for POST; with both a query string and a body, the two joined by ``&``.
* The batch cancels ``DELETE /v1/orders/open`` and ``DELETE /v1/orders/uuids`` read the
  query string only (Upbit documents that they do not take a body); a body is ignored,
  so a client that signed body parameters is refused ``invalid_query_payload``.
* Batch cancel answers ``{"success": {"count", "orders"}, "failed": {"count",
  "orders"}}`` with ``uuid``, ``market`` and ``identifier`` per order; an order not
  found or not open goes to ``failed`` (with ``market`` null when unknown).
  ``DELETE /v1/orders/uuids`` takes up to 20 ``uuids[]`` or ``identifiers[]``;
  ``DELETE /v1/orders/open`` takes ``cancel_side`` (all/bid/ask), ``pairs`` or
  ``quote_currencies`` (not both), ``excluded_pairs``, ``count`` (1-300, default 20) and
  ``order_by``, and cancels only ``wait`` orders.
* ``GET /v1/orders/chance`` takes ``market`` (query or body, like the other GETs); a
  missing market is ``validation_error`` "market is missing", an unknown one
  ``validation_error`` "market does not have a valid value" (as for ``POST /v1/orders``).
  The answer is :meth:`simulator.account.Account.order_chance`: the quote currency's fee
  for all four fees, its minimum total on both sides, no ``price_unit`` (the tick depends
  on the price), and the two account rows, zeros for a currency not held.
* The legacy listing ``GET /v1/orders`` (deprecated by Upbit in favour of
  ``/v1/orders/open``, ``/closed`` and ``/uuids`` but still served, and still what
  pyupbit's ``get_order(ticker)`` calls) takes ``market``, ``uuids[]``, ``identifiers[]``,
  ``state`` (default ``wait``) or ``states[]`` (not both; open and closed states not mixed,
  as Upbit documents since 2021-03-22), ``page`` (default 1), ``limit`` (1-100, default 100)
  and ``order_by``. Every filter given must hold (``uuids[]`` and ``identifiers[]``
  together narrow, they do not add); closed orders come from the kept history, with no
  time window.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from simulator.account import CLOSED_STATES, KST, OPEN_STATES, Account, Order, OrderError
from simulator.auth import AuthError, JwtVerifier, body_query_string, request_query_string

__all__ = ["BATCH_CANCEL_MAX", "BooksFn", "add_private_routes", "body_params"]

Level = tuple[float, float]
BooksFn = Callable[[str], tuple[list[Level], list[Level]] | None]

_WEEK = 7 * 86400.0
BATCH_CANCEL_MAX = 20  # DELETE /v1/orders/uuids takes at most 20 orders (Upbit's docs)
_dumps = functools.partial(json.dumps, ensure_ascii=False)


class _RequestError(Exception):
    """A 4xx answer with an exchange error name."""

    def __init__(self, name: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.name = name
        self.message = message
        self.status = status


def _error(name: str, message: str, status: int) -> web.Response:
    return web.json_response(
        {"error": {"name": name, "message": message}}, status=status, dumps=_dumps
    )


def _ok(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _invalid(name: str) -> _RequestError:
    return _RequestError("validation_error", f"{name} does not have a valid value")


# -- parameter helpers ---------------------------------------------------------------------


class _Query:
    """Decoded GET/DELETE parameters, keeping repeats (``states[]=a&states[]=b``)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def one(self, name: str) -> str | None:
        values = [v for k, v in self.pairs if k == name]
        if len(values) > 1:
            raise _invalid(name)
        return values[0] if values else None

    def many(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]

    def int_in(self, name: str, default: int, low: int, high: int) -> int:
        text = self.one(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise _invalid(name) from None
        if not low <= value <= high:
            raise _invalid(name)
        return value

    def order_by(self) -> str:
        value = self.one("order_by") or "desc"
        if value not in ("asc", "desc"):
            raise _invalid("order_by")
        return value

    def states(self, allowed: Sequence[str], default: Sequence[str]) -> list[str]:
        single = self.one("state")
        several = self.many("states[]")
        if single is not None and several:
            raise _RequestError("validation_error", "state and states[] cannot be used together")
        chosen = [single] if single is not None else several or list(default)
        for state in chosen:
            if state not in allowed:
                raise _invalid("state")
        return chosen


def _json_text(value: object) -> str:
    """A JSON body scalar as a query parameter value (as :func:`body_query_string` writes)."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    return str(value)


def body_params(text: str, content_type: str) -> tuple[list[tuple[str, str]], list[str]] | None:
    """Parameters of a GET/DELETE body and the query_hash inputs they may have been signed
    with: JSON when the content type says so or the text is a JSON object, else a form.
    None for a body that is neither."""
    stripped = text.strip()
    if content_type == "application/json" or stripped.startswith("{"):
        try:
            body = json.loads(stripped, parse_float=str, parse_int=str)
        except ValueError:
            return None
        if not isinstance(body, dict):
            return None
        pairs: list[tuple[str, str]] = []
        for key, value in body.items():
            items = value if isinstance(value, list) else [value]
            pairs.extend((key, _json_text(item)) for item in items)
        as_json = body_query_string(body.items())
        as_python = body_query_string(body.items(), python=True)
        return pairs, [as_json] if as_json == as_python else [as_json, as_python]
    return parse_qsl(stripped, keep_blank_values=True), [request_query_string(stripped)]


def _parse_time(text: str, name: str) -> float:
    """``start_time``/``end_time``: epoch ms or ISO-8601 (naive = KST); epoch seconds out."""
    if text.isdigit():
        return int(text) / 1000.0
    try:
        stamp = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        raise _invalid(name) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=KST)
    return stamp.astimezone(UTC).timestamp()


def _decimal_param(body: Mapping[str, Any], name: str) -> Decimal | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):  # numbers arrive as their literal text, see read_body
        raise _invalid(name)
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise _invalid(name) from None
    if not number.is_finite():
        raise _invalid(name)
    return number


def _str_param(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(name)
    return value


def _order_list(orders: list[Order], order_by: str) -> list[dict[str, object]]:
    ordered = orders if order_by == "asc" else list(reversed(orders))
    return [o.to_rest() for o in ordered]


# -- routes ----------------------------------------------------------------------------------


def add_private_routes(
    app: web.Application,
    *,
    account: Account,
    verifier: JwtVerifier,
    books: BooksFn,
    known: Callable[[str], bool] | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Register the exchange endpoints (``/v1/accounts``, ``/v1/orders*``, ``/v1/order``)
    and the unauthenticated controls ``POST /_sim/orders`` and ``POST /_sim/account``.

    ``known`` tells whether a market code exists without touching its book (default: it
    has a book)."""
    is_known = known or (lambda code: books(code) is not None)

    def authenticate(request: web.Request, *query_strings: str) -> None:
        """Verify the JWT; with several candidate hash inputs, any one may match."""
        header = request.headers.get("Authorization")
        for i, query_string in enumerate(query_strings):
            try:
                verifier.verify(header, query_string)
                return
            except AuthError as exc:  # the nonce is only spent once the hash matched
                if exc.name != "invalid_query_payload" or i == len(query_strings) - 1:
                    raise

    async def read_body(request: web.Request) -> tuple[dict[str, Any] | None, list[str]]:
        """The JSON body (numbers kept as their literal text) and its query_hash inputs."""
        text = await request.text()
        if not text.strip():
            return {}, [""]
        try:
            body = json.loads(text, parse_float=str, parse_int=str)
        except ValueError:
            return None, [""]
        if not isinstance(body, dict):
            return None, [""]
        as_json = body_query_string(body.items())
        as_python = body_query_string(body.items(), python=True)
        return body, [as_json] if as_json == as_python else [as_json, as_python]

    def place(body: Mapping[str, Any]) -> Order:
        market = _str_param(body, "market")
        if market is None:
            raise _RequestError("validation_error", "market is missing")
        side = _str_param(body, "side")
        if side not in ("bid", "ask"):
            raise _RequestError(
                "validation_error", "side is missing, side does not have a valid value"
            )
        ord_type = _str_param(body, "ord_type")
        if ord_type is None:
            raise _RequestError(
                "validation_error", "ord_type is missing, ord_type does not have a valid value"
            )
        identifier = body.get("identifier")
        if identifier is not None and not isinstance(identifier, str):
            raise _invalid("identifier")
        book = books(market)
        if book is None:
            raise _invalid("market")
        asks, bids = book
        return account.place_order(
            market=market,
            side=side,
            ord_type=ord_type,
            price=_decimal_param(body, "price"),
            volume=_decimal_param(body, "volume"),
            identifier=identifier,
            time_in_force=_str_param(body, "time_in_force"),
            smp_type=_str_param(body, "smp_type"),
            asks=asks,
            bids=bids,
        )

    def guarded(
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            try:
                response: web.StreamResponse = await handler(request)
            except AuthError as exc:
                return _error(exc.name, exc.message, exc.status)
            except (OrderError, _RequestError) as exc:
                return _error(exc.name, exc.message, exc.status)
            return response

        return wrapper

    async def get_query(request: web.Request, *, query_only: bool = False) -> _Query:
        """Verified parameters of a GET/DELETE, from the query string and/or the body."""
        raw = request.rel_url.raw_query_string
        pairs = parse_qsl(raw, keep_blank_values=True)
        hash_inputs = [request_query_string(raw)]
        text = "" if query_only or not request.can_read_body else await request.text()
        if text.strip():
            parsed = body_params(text, request.content_type)
            if parsed is None:
                authenticate(request, *hash_inputs)
                raise _RequestError("validation_error", "the request body cannot be parsed")
            body_pairs, body_inputs = parsed
            pairs += body_pairs
            prefix = hash_inputs[0] + "&" if hash_inputs[0] else ""
            hash_inputs = [prefix + b for b in body_inputs]
        authenticate(request, *hash_inputs)
        return _Query(pairs)

    @guarded
    async def get_accounts(request: web.Request) -> web.StreamResponse:
        await get_query(request)
        return _ok(account.accounts())

    @guarded
    async def get_order_chance(request: web.Request) -> web.StreamResponse:
        market = (await get_query(request)).one("market")
        if market is None:
            raise _RequestError("validation_error", "market is missing")
        if not is_known(market):
            raise _invalid("market")
        return _ok(account.order_chance(market))

    @guarded
    async def post_orders(request: web.Request) -> web.StreamResponse:
        body, hash_inputs = await read_body(request)
        authenticate(request, *hash_inputs)
        if body is None:
            raise _RequestError("validation_error", "the request body must be a JSON object")
        order = place(body)
        reply, order.placed = order.placed or order.to_rest(), None
        return _ok(reply, status=201)

    @guarded
    async def get_open_orders(request: web.Request) -> web.StreamResponse:
        query = await get_query(request)
        states = query.states(("wait", "watch"), ("wait",))
        page = query.int_in("page", 1, 1, 1_000_000)
        limit = query.int_in("limit", 100, 1, 100)
        order_by = query.order_by()
        orders = account.open_orders(market=query.one("market"), states=states)
        ordered = _order_list(orders, order_by)
        return _ok(ordered[(page - 1) * limit : page * limit])

    @guarded
    async def get_orders_legacy(request: web.Request) -> web.StreamResponse:
        query = await get_query(request)
        states = query.states(OPEN_STATES + CLOSED_STATES, ("wait",))
        if set(states) & set(OPEN_STATES) and set(states) & set(CLOSED_STATES):
            raise _RequestError(
                "validation_error",
                "open (wait, watch) and closed (done, cancel) states cannot be mixed",
            )
        page = query.int_in("page", 1, 1, 1_000_000)
        limit = query.int_in("limit", 100, 1, 100)
        order_by = query.order_by()
        market = query.one("market")
        uuids, identifiers = set(query.many("uuids[]")), set(query.many("identifiers[]"))
        if states[0] in OPEN_STATES:
            orders = account.open_orders(market=market, states=states)
        else:
            orders = account.closed_orders(market=market, states=states)
        chosen = [
            o
            for o in orders
            if (not uuids or o.uuid in uuids) and (not identifiers or o.identifier in identifiers)
        ]
        return _ok(_order_list(chosen, order_by)[(page - 1) * limit : page * limit])

    @guarded
    async def get_closed_orders(request: web.Request) -> web.StreamResponse:
        query = await get_query(request)
        states = query.states(("done", "cancel"), ("done", "cancel"))
        limit = query.int_in("limit", 100, 1, 1000)
        order_by = query.order_by()
        start_text, end_text = query.one("start_time"), query.one("end_time")
        start = None if start_text is None else _parse_time(start_text, "start_time")
        end = None if end_text is None else _parse_time(end_text, "end_time")
        if start is None and end is None:
            end = clock()
            start = end - _WEEK
        elif start is None:
            assert end is not None
            start = end - _WEEK
        elif end is None:
            end = start + _WEEK
        if end < start or end - start > _WEEK:
            raise _RequestError("validation_error", "the time range must be at most 7 days")
        orders = account.closed_orders(
            market=query.one("market"), states=states, start=start, end=end
        )
        ordered = _order_list(orders, order_by)
        return _ok(ordered[:limit])

    def lookup(query: _Query) -> Order:
        order_uuid, identifier = query.one("uuid"), query.one("identifier")
        if order_uuid is None and identifier is None:
            raise _RequestError("validation_error", "uuid or identifier is required")
        order = account.get_order(uuid=order_uuid, identifier=identifier)
        if order is None:
            raise _RequestError("order_not_found", "주문을 찾지 못했습니다.", 404)
        return order

    @guarded
    async def get_order(request: web.Request) -> web.StreamResponse:
        order = lookup(await get_query(request))
        return _ok(order.to_rest(with_trades=True))

    @guarded
    async def delete_order(request: web.Request) -> web.StreamResponse:
        order = lookup(await get_query(request))
        before = order.to_rest()  # Upbit answers with the order as it was when accepted
        account.cancel(uuid=order.uuid)
        return _ok(before)

    def cancel_batch(orders: list[tuple[str, Order | None]]) -> dict[str, object]:
        """Cancel each order that is open; the batch answer with successes and failures."""
        success: list[dict[str, object]] = []
        failed: list[dict[str, object]] = []
        for key, order in orders:
            if order is None or not order.is_open:
                entry: dict[str, object] = {"uuid": order.uuid if order else key,
                         "market": order.market if order else None,
                         "identifier": order.identifier if order else None}  # fmt: skip
                failed.append(entry)
                continue
            account.cancel(uuid=order.uuid)
            success.append(
                {"uuid": order.uuid, "market": order.market, "identifier": order.identifier}
            )
        return {
            "success": {"count": len(success), "orders": success},
            "failed": {"count": len(failed), "orders": failed},
        }

    @guarded
    async def delete_orders_by_uuids(request: web.Request) -> web.StreamResponse:
        query = await get_query(request, query_only=True)
        uuids, identifiers = query.many("uuids[]"), query.many("identifiers[]")
        if bool(uuids) == bool(identifiers):
            raise _RequestError(
                "validation_error", "exactly one of uuids[] or identifiers[] is required"
            )
        keys = uuids or identifiers
        if len(keys) > BATCH_CANCEL_MAX:
            raise _invalid("uuids[]" if uuids else "identifiers[]")
        found = [
            (key, account.get_order(uuid=key) if uuids else account.get_order(identifier=key))
            for key in dict.fromkeys(keys)
        ]
        return _ok(cancel_batch(found))

    @guarded
    async def delete_open_orders(request: web.Request) -> web.StreamResponse:
        query = await get_query(request, query_only=True)
        side = query.one("cancel_side") or "all"
        if side not in ("all", "bid", "ask"):
            raise _invalid("cancel_side")
        pairs_text, quotes_text = query.one("pairs"), query.one("quote_currencies")
        if pairs_text is not None and quotes_text is not None:
            raise _RequestError(
                "validation_error", "pairs and quote_currencies cannot be used together"
            )
        pairs = set(filter(None, (pairs_text or "").split(",")))
        quotes = set(filter(None, (quotes_text or "").split(",")))
        excluded = set(filter(None, (query.one("excluded_pairs") or "").split(",")))
        if len(pairs) > 20 or len(excluded) > 20:
            raise _invalid("pairs" if len(pairs) > 20 else "excluded_pairs")
        count = query.int_in("count", 20, 1, 300)
        order_by = query.order_by()
        chosen = [
            o
            for o in account.open_orders(states=("wait",))
            if side in ("all", o.side)
            and (not pairs or o.market in pairs)
            and (not quotes or o.quote in quotes)
            and o.market not in excluded
        ]
        if order_by == "desc":
            chosen.reverse()
        return _ok(cancel_batch([(o.uuid, o) for o in chosen[:count]]))

    @guarded
    async def get_orders_by_uuids(request: web.Request) -> web.StreamResponse:
        query = await get_query(request)
        uuids, identifiers = query.many("uuids[]"), query.many("identifiers[]")
        if bool(uuids) == bool(identifiers):
            raise _RequestError(
                "validation_error", "exactly one of uuids[] or identifiers[] is required"
            )
        keys = uuids or identifiers
        if len(keys) > 100:
            raise _invalid("uuids[]" if uuids else "identifiers[]")
        market = query.one("market")
        order_by = query.order_by()
        found: dict[str, Order] = {}
        for key in keys:
            order = account.get_order(uuid=key) if uuids else account.get_order(identifier=key)
            if order is not None and (market is None or order.market == market):
                found[order.uuid] = order
        orders = sorted(found.values(), key=lambda o: o.created)
        return _ok(_order_list(orders, order_by))

    @guarded
    async def sim_orders(request: web.Request) -> web.StreamResponse:
        body, _ = await read_body(request)
        if body is None:
            raise _RequestError("validation_error", "the request body must be a JSON object")
        order = place(body)
        order.placed = None
        return _ok(order.to_rest(with_trades=True), status=201)

    @guarded
    async def sim_account(request: web.Request) -> web.StreamResponse:
        body, _ = await read_body(request)
        if body is None:
            raise _RequestError("validation_error", "the request body must be a JSON object")
        if body.get("reset") in (True, "true"):
            account.reset()
        balances = body.get("balances", {})
        if not isinstance(balances, dict):
            raise _invalid("balances")
        parsed: dict[str, Decimal] = {}
        for currency, amount in balances.items():
            value = _decimal_param({"amount": amount}, "amount")
            if value is None or value < 0:
                raise _invalid(f"balances.{currency}")
            parsed[str(currency).upper()] = value
        account.set_balances(parsed)
        return _ok(account.accounts())

    app.router.add_get("/v1/accounts", get_accounts)
    app.router.add_post("/v1/orders", post_orders)
    app.router.add_get("/v1/orders", get_orders_legacy)
    app.router.add_get("/v1/orders/chance", get_order_chance)
    app.router.add_get("/v1/orders/open", get_open_orders)
    app.router.add_get("/v1/orders/closed", get_closed_orders)
    app.router.add_get("/v1/orders/uuids", get_orders_by_uuids)
    app.router.add_delete("/v1/orders/uuids", delete_orders_by_uuids)
    app.router.add_delete("/v1/orders/open", delete_open_orders)
    app.router.add_get("/v1/order", get_order)
    app.router.add_delete("/v1/order", delete_order)
    app.router.add_post("/_sim/orders", sim_orders)
    app.router.add_post("/_sim/account", sim_account)
