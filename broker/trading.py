"""Account and orders through the broker: Upbit's exchange REST calls with the broker's keys.

Programs ask the broker (:class:`schemas.bus.AccountQuery`, :class:`schemas.bus.PlaceOrder`,
:class:`schemas.bus.CancelOrder`) instead of holding keys and pacing themselves: the
keys stay in the broker, and every process on the machine shares the pocket's ``order``
and ``default`` budgets. Orders go first on the REST queue (:attr:`Priority.ORDER`).

The pure part validates a request as a whole (:func:`plan_placement`,
:func:`plan_cancel`, :func:`plan_query`; :class:`TradingInvalid` names the bad field),
makes identifiers (:class:`Identifiers`) and decides what a lost placement answer means
(:class:`LostPlacement`). :class:`Trading` is the thin shell on
:class:`broker.rest.RestClient`.

Every placement carries an ``identifier``: the caller's, or one made here (the broker's
epoch and a counter, so unique across restarts). When the answer to ``POST /v1/orders``
is lost (a timeout, a dropped connection, a 5xx, a body that does not decode) the order
may or may not exist; it is never sent again. It is looked up by its identifier until
found (answered as placed) or certainly absent (``order_not_placed``: placing it again
with the same identifier cannot double it, Upbit refuses a used identifier); if Upbit
cannot be asked at all, ``order_unknown``. An order found is the placement's only if
its fields match and it is not older than the send (:func:`foreign_order`): a caller
may reuse an identifier, and then Upbit refused the placement. Two placements with one
identifier are never in flight at once (the second is refused ``busy``, unsent), so no
lookup can find the other's order. Whatever else Upbit refuses comes back with its
error name and message; nothing else is retried.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, TypeVar

import msgspec

from broker.ports import MarketList
from broker.ratelimit import Priority
from broker.rest import RestClient, RestError
from broker.subscriptions import SpecError, normalize_code
from broker.upbit_auth import QueryValue
from schemas.bus import (
    AccountQuery,
    CancelledOrder,
    CancelOrder,
    ErrorCode,
    ErrorReply,
    OrderChance,
    OrderReply,
    PlaceOrder,
)
from schemas.errors import DecodeError
from schemas.rest import RestAccount, RestOrder, order_created_ms

__all__ = [
    "AMOUNT_MAX",
    "ANSWER_WITHIN",
    "BATCH_CANCEL_MAX",
    "LOOKUP_DELAYS",
    "LOOKUP_LEAST",
    "LOOKUP_TIMEOUT",
    "LOOKUP_WAIT",
    "ORDER_HTTP",
    "ORDER_WAIT",
    "REUSE_MARGIN",
    "BatchCancelAnswer",
    "BatchCancelOrders",
    "Foreign",
    "Identifiers",
    "LookAgain",
    "LostPlacement",
    "NotPlaced",
    "OrderPlan",
    "Placed",
    "QueryPlan",
    "Trading",
    "TradingInvalid",
    "Unknown",
    "answer_lost",
    "foreign_order",
    "plan_cancel",
    "plan_placement",
    "plan_query",
    "trading_refusal",
]

T = TypeVar("T")

SIDES: Final = frozenset({"bid", "ask"})
ORD_TYPES: Final = frozenset({"limit", "price", "market", "best"})
TIME_IN_FORCE: Final = frozenset({"ioc", "fok", "post_only"})
SMP_TYPES: Final = frozenset({"cancel_maker", "cancel_taker", "reduce"})
OPEN_STATES: Final = frozenset({"wait", "watch"})
CLOSED_STATES: Final = frozenset({"done", "cancel"})
BATCH_CANCEL_MAX: Final = 20
"""Most orders one batch cancel (``DELETE /v1/orders/uuids``) takes, as Upbit says."""
IDENTIFIER_MAX: Final = 100
"""Longest identifier accepted (printable ASCII, no spaces)."""
ORDER_WAIT: Final = 10.0
"""Longest wait for a slot of the ``order`` group: past it the order is refused, unsent."""
ORDER_HTTP: Final = 8.0
"""Longest wait for Upbit's answer to a placement once sent (it normally takes well
under a second); past it the answer counts as lost and the order is looked up."""
ANSWER_WITHIN: Final = 25.0
"""Seconds from a placement's arrival within which its caller is answered, with
``order_unknown`` if it must be: the client waits 30 s (``clients.client.ORDER_TIMEOUT``),
and an answer after it gave up would tell it nothing. Queue, placement and lookups
share it; lookups stop early rather than run past it."""
LOOKUP_TIMEOUT: Final = 3.0
"""Longest wait for the answer to one lookup once sent."""
LOOKUP_LEAST: Final = 0.5
"""A lookup needs at least this much of the answer's time left to be worth making."""
LOOKUP_DELAYS: Final = (0.25, 0.5, 1.0, 2.0)
"""Seconds before each lookup of a placement whose answer was lost."""
LOOKUP_WAIT: Final = 2.0
"""Longest wait for a slot of the ``default`` group per lookup: the caller is waiting
(its client gives up after 30 s), and a lookup not made counts as failed, not hung."""
SETTLE: Final = 1.0
"""Seconds after the loss from which "not found" is believed: an order Upbit was still
writing when the connection dropped shows up within them."""

AMOUNT_MAX: Final = 40
"""Longest price or volume text accepted (digits and a point)."""
REUSE_MARGIN: Final = 60.0
"""Seconds an order found by a placement's identifier may seem older than the
placement's send and still be taken for it (``created_at`` has whole seconds, and
Upbit's clock and this machine's differ a little)."""

_AMOUNT_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_IDENTIFIER_RE: Final = re.compile(r"[\x21-\x7e]{1," + str(IDENTIFIER_MAX) + "}")
_UUID_RE: Final = re.compile(r"[0-9A-Za-z-]{1,64}")


class TradingInvalid(ValueError):
    """A trading request the broker refuses before any REST call; ``code`` for the bus."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code


def _shown(text: str, limit: int = 40) -> str:
    """A caller's value as quoted in a refusal: repr, cut to ``limit`` characters."""
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def _field(name: str, problem: str) -> TradingInvalid:
    return TradingInvalid("invalid_field", f"{name}: {problem}")


# ---------------------------------------------------------------------------- validation


@dataclass(frozen=True, slots=True)
class OrderPlan:
    """A validated placement: the body for ``POST /v1/orders`` (in Upbit's order)."""

    params: dict[str, str]
    identifier: str


def _amount(name: str, text: str | None) -> str | None:
    """``text`` as plain positive decimal digits (kept as written), None if absent.

    Only ASCII digits with an optional fraction: Python's Decimal also reads exponents,
    underscores and other scripts' digits, which Upbit would refuse (using up the
    identifier) or read otherwise.
    """
    if text is None:
        return None
    plain = text.strip()
    if len(plain) > AMOUNT_MAX or not _AMOUNT_RE.fullmatch(plain):
        shown = repr(plain[:40]) + ("…" if len(plain) > 40 else "")
        raise _field(
            name, f"{shown} is not plain decimal digits (like 0.001; at most {AMOUNT_MAX} long)"
        )
    if Decimal(plain) <= 0:
        raise _field(name, f"{plain!r} must be a number > 0")
    return plain


def _identifier(name: str, text: str) -> str:
    if not _IDENTIFIER_RE.fullmatch(text):
        raise _field(name, f"must be 1 to {IDENTIFIER_MAX} printable ASCII characters, no spaces")
    return text


def _uuid(name: str, text: str) -> str:
    if not _UUID_RE.fullmatch(text):
        raise _field(name, f"{text[:80]!r} is not an order uuid")
    return text


def _market(code: str, markets: Collection[str] | None) -> str:
    try:
        return normalize_code(code, markets)
    except SpecError as exc:
        raise TradingInvalid(exc.code, f"market: {exc}") from None


def plan_placement(
    message: PlaceOrder, markets: Collection[str] | None, make_identifier: Callable[[], str]
) -> OrderPlan:
    """Validate ``message`` as a whole; the body to send. TradingInvalid names the field.

    Which amounts an ``ord_type`` needs is checked here (Upbit would refuse anyway, but
    a refused order still uses up its identifier there).
    """
    market = _market(message.market, markets)
    if message.side not in SIDES:
        raise _field("side", f"{_shown(message.side)} is not bid or ask")
    if message.ord_type not in ORD_TYPES:
        raise _field(
            "ord_type", f"{_shown(message.ord_type)} is not one of {', '.join(sorted(ORD_TYPES))}"
        )
    volume = _amount("volume", message.volume)
    price = _amount("price", message.price)
    kind, side, tif = message.ord_type, message.side, message.time_in_force
    needs = {
        "limit": ("volume", "price"),
        "price": ("price",),
        "market": ("volume",),
        "best": ("price",) if side == "bid" else ("volume",),
    }[kind]
    given = {"volume": volume, "price": price}
    for name in ("volume", "price"):
        if name in needs and given[name] is None:
            raise _field(name, f"a {kind} {side} order needs it")
        if name not in needs and given[name] is not None:
            raise _field(name, f"a {kind} {side} order takes none")
    if kind == "price" and side != "bid":
        raise _field("ord_type", "price (a market buy by amount) is for bids only")
    if kind == "market" and side != "ask":
        raise _field("ord_type", "market (a market sell by volume) is for asks only")
    if tif is not None:
        if tif not in TIME_IN_FORCE:
            raise _field("time_in_force", f"{_shown(tif)} is not ioc, fok or post_only")
        if tif == "post_only" and kind != "limit":
            raise _field("time_in_force", "post_only is for limit orders only")
        if kind in ("price", "market"):
            raise _field("time_in_force", f"a {kind} order takes none")
    elif kind == "best":
        raise _field("time_in_force", "a best order needs ioc or fok")
    smp = message.smp_type
    if smp is not None and smp not in SMP_TYPES:
        raise _field("smp_type", f"{_shown(smp)} is not one of {', '.join(sorted(SMP_TYPES))}")
    identifier = (
        make_identifier()
        if message.identifier is None
        else _identifier("identifier", message.identifier)
    )
    params: dict[str, str] = {"market": market, "side": side, "ord_type": kind}
    if volume is not None:
        params["volume"] = volume
    if price is not None:
        params["price"] = price
    if tif is not None:
        params["time_in_force"] = tif
    if smp is not None:
        params["smp_type"] = smp
    params["identifier"] = identifier
    return OrderPlan(params, identifier)


@dataclass(frozen=True, slots=True)
class QueryPlan:
    """A validated exchange call: method, path, parameters and the reply it makes."""

    method: str
    path: str
    params: dict[str, QueryValue]
    reply: str
    """``accounts``, ``chance``, ``order``, ``orders`` or ``batch``."""


def plan_cancel(message: CancelOrder) -> QueryPlan:
    """Exactly one of uuid, identifier, uuids, identifiers; TradingInvalid else."""
    given = [
        name
        for name, value in (
            ("uuid", message.uuid),
            ("identifier", message.identifier),
            ("uuids", message.uuids),
            ("identifiers", message.identifiers),
        )
        if value
    ]
    if len(given) != 1:
        raise _field(
            "uuid", "give exactly one of uuid, identifier, uuids, identifiers"
            f" (got {', '.join(given) or 'none'})"
        )  # fmt: skip
    if message.uuid:
        return QueryPlan("DELETE", "/v1/order", {"uuid": _uuid("uuid", message.uuid)}, "order")
    if message.identifier:
        identifier = _identifier("identifier", message.identifier)
        return QueryPlan("DELETE", "/v1/order", {"identifier": identifier}, "order")
    name = given[0]
    keys = message.uuids or message.identifiers
    if len(keys) > BATCH_CANCEL_MAX:
        raise _field(name, f"{len(keys)} orders; at most {BATCH_CANCEL_MAX} at once")
    check = _uuid if name == "uuids" else _identifier
    listed = list(dict.fromkeys(check(f"{name}[{i}]", k) for i, k in enumerate(keys)))
    return QueryPlan("DELETE", "/v1/orders/uuids", {f"{name}[]": listed}, "batch")


def _states(states: Sequence[str], allowed: frozenset[str]) -> list[str]:
    for i, state in enumerate(states):
        if state not in allowed:
            listed = ", ".join(sorted(allowed))
            raise _field(f"states[{i}]", f"{_shown(state)} is not one of {listed}")
    return list(dict.fromkeys(states))


def _bounded(name: str, value: int | None, low: int, high: int) -> int | None:
    if value is not None and (isinstance(value, bool) or not low <= value <= high):
        raise _field(name, f"{value!r} must be {low} to {high}")
    return value


def _time(name: str, text: str | None) -> str | None:
    if text is not None and not re.fullmatch(r"[0-9T:+\-.Z ]{1,40}", text):
        raise _field(name, f"{text[:60]!r} is not ISO 8601 or epoch milliseconds")
    return text


def plan_query(message: AccountQuery, markets: Collection[str] | None) -> QueryPlan:
    """Validate a read of the account; TradingInvalid names the field."""
    kind = message.kind
    if kind == "accounts":
        return QueryPlan("GET", "/v1/accounts", {}, "accounts")
    if kind == "chance":
        if message.market is None:
            raise _field("market", "an order chance is of one market")
        return QueryPlan(
            "GET", "/v1/orders/chance", {"market": _market(message.market, markets)}, "chance"
        )
    if kind == "order":
        if (message.uuid is None) == (message.identifier is None):
            raise _field("uuid", "give exactly one of uuid and identifier")
        if message.uuid is not None:
            return QueryPlan("GET", "/v1/order", {"uuid": _uuid("uuid", message.uuid)}, "order")
        assert message.identifier is not None
        identifier = _identifier("identifier", message.identifier)
        return QueryPlan("GET", "/v1/order", {"identifier": identifier}, "order")
    params: dict[str, QueryValue] = {}
    if message.market is not None:
        params["market"] = _market(message.market, markets)
    if kind == "open_orders":
        if message.states:
            params["states[]"] = _states(message.states, OPEN_STATES)
        if _bounded("page", message.page, 1, 1_000_000) is not None:
            params["page"] = message.page  # type: ignore[assignment]
        if _bounded("limit", message.limit, 1, 100) is not None:
            params["limit"] = message.limit  # type: ignore[assignment]
        path = "/v1/orders/open"
    else:
        if message.states:
            params["states[]"] = _states(message.states, CLOSED_STATES)
        if message.page is not None:
            raise _field("page", "closed orders have no pages; narrow start_time/end_time")
        for name, value in (("start_time", message.start_time), ("end_time", message.end_time)):
            if _time(name, value) is not None:
                params[name] = value  # type: ignore[assignment]
        if _bounded("limit", message.limit, 1, 1000) is not None:
            params["limit"] = message.limit  # type: ignore[assignment]
        path = "/v1/orders/closed"
    if message.order_by is not None:
        if message.order_by not in ("asc", "desc"):
            raise _field("order_by", f"{_shown(message.order_by)} is not asc or desc")
        params["order_by"] = message.order_by
    return QueryPlan("GET", path, params, "orders")


def trading_refusal(
    message: AccountQuery | PlaceOrder | CancelOrder, *, keys: bool, enabled: bool
) -> ErrorReply | None:
    """Why ``message`` is refused at once (no keys; trading switched off), else None."""
    if not keys:
        return ErrorReply(
            message.req,
            "private_unavailable",
            "the broker has no API keys (UPBIT_ACCESS_KEY, UPBIT_SECRET_KEY): "
            "no account or order calls",
        )
    if not enabled and not isinstance(message, AccountQuery):
        return ErrorReply(
            message.req,
            "trading_disabled",
            "trading is switched off at this broker (set UPBIT_BROKER_TRADING=1 to "
            "place and cancel orders); nothing was sent to Upbit",
        )
    return None


# ---------------------------------------------------------------------------- identifiers


class Identifiers:
    """Identifiers for placements that bring none: ``<prefix><epoch>-<n>``.

    The epoch is the broker's random per-start id, so two brokers (or one restarted)
    never make the same identifier; the counter makes each unique within a run.
    """

    def __init__(self, epoch: str, prefix: str = "ub-") -> None:
        self._stem = f"{prefix}{epoch}-"
        self._count = 0

    def __call__(self) -> str:
        """The next identifier."""
        self._count += 1
        return f"{self._stem}{self._count}"


# ---------------------------------------------------------------------------- lost answers


def answer_lost(error: RestError) -> bool:
    """Whether a placement that failed with ``error`` may still exist at Upbit.

    Unsent (no slot) and refused (4xx, 418) placements are certainly not placed; a
    transport failure, a 5xx or a 2xx whose body did not decode may be. So may one that
    Upbit answered 429 and then either refused as ``duplicated_identifier`` when sent
    again (the 429'd send was carried out after all) or that found no slot to be sent
    again: a 429 means "not carried out", but the first case shows it can be untrue.
    """
    if not error.sent:
        return False
    if error.resent and (error.name == "duplicated_identifier" or error.status == 429):
        return True
    return error.status == 0 or error.status >= 500 or 200 <= error.status < 300


@dataclass(frozen=True, slots=True)
class Placed:
    """The order was found: it is on the exchange."""

    order: RestOrder


@dataclass(frozen=True, slots=True)
class NotPlaced:
    """Upbit has no order with the identifier, well after the loss: it was not placed."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """Upbit could not be asked often enough: whether the order exists is unknown."""

    why: str


@dataclass(frozen=True, slots=True)
class LookAgain:
    """Look the order up again at ``at``."""

    at: float


Verdict = Placed | NotPlaced | Unknown | LookAgain


class LostPlacement:
    """Decides, lookup by lookup, what a placement whose answer was lost became.

    Feed each lookup's outcome (:meth:`found`, :meth:`missing`, :meth:`failed`) with the
    time; the verdict says to look again (when), or that the order is placed, not
    placed, or unknown. "Not found" counts only from ``lost_at + settle`` on. No lookup
    starts with less than :data:`LOOKUP_LEAST` left before ``deadline`` (when the
    caller must have its answer): the outcome is then unknown.
    """

    def __init__(
        self,
        lost_at: float,
        *,
        delays: Sequence[float] = LOOKUP_DELAYS,
        settle: float = SETTLE,
        deadline: float = math.inf,
    ) -> None:
        self._lost_at = lost_at
        self._delays = tuple(delays)
        self._settle = settle
        self._deadline = deadline
        self._tries = 0
        self._why = "no lookup answered"

    def first(self) -> LookAgain | Unknown:
        """When to look first (unknown at once if no lookup fits before the deadline)."""
        return self._at(self._lost_at + self._delays[0])

    def found(self, order: RestOrder) -> Placed:
        """A lookup found the order."""
        self._tries += 1
        return Placed(order)

    def missing(self, now: float) -> NotPlaced | LookAgain | Unknown:
        """A lookup at ``now`` answered ``order_not_found``."""
        self._tries += 1
        if now >= self._lost_at + self._settle:
            return NotPlaced()
        self._why = "Upbit did not know the order yet"
        return self._next(now)

    def failed(self, now: float, why: str) -> LookAgain | Unknown:
        """A lookup at ``now`` got no answer (``why``: what went wrong)."""
        self._tries += 1
        self._why = why
        return self._next(now)

    def out_of_time(self) -> Unknown:
        """The answer is due before another lookup could be made."""
        return Unknown(f"{self._why}; no time left to look again before answering")

    def _next(self, now: float) -> LookAgain | Unknown:
        if self._tries >= len(self._delays):
            return Unknown(self._why)
        return self._at(now + self._delays[self._tries])

    def _at(self, at: float) -> LookAgain | Unknown:
        if at + LOOKUP_LEAST > self._deadline:
            return self.out_of_time()
        return LookAgain(at)


@dataclass(frozen=True, slots=True)
class Foreign:
    """The order found by a placement's identifier is not that placement's.

    ``certain``: its fields differ, so it is another order and the placement (Upbit
    refuses a used identifier) was not placed. Else it only predates the placement's
    send: most likely an earlier order, unless the clocks differ by that much.
    """

    certain: bool
    why: str


def foreign_order(order: RestOrder, plan: OrderPlan, sent_at: float) -> Foreign | None:
    """Whether ``order``, found by ``plan``'s identifier, is not what ``plan`` placed.

    ``sent_at``: wall-clock seconds when the placement was sent. The fields the plan
    gave must match (an amount Upbit leaves null is not compared), and the order must
    not be older than the send by more than :data:`REUSE_MARGIN`. None: it can be.
    """
    params = plan.params
    for name, found in (("market", order.market), ("side", order.side)):
        if found != params[name]:
            return Foreign(True, f"its {name} is {found[:40]!r}, not {params[name]!r}")
    if order.ord_type != params["ord_type"]:
        return Foreign(True, f"its ord_type is {order.ord_type[:40]!r}, not {params['ord_type']!r}")
    for name, amount in (("price", order.price), ("volume", order.volume)):
        given = params.get(name)
        if given is not None and amount is not None and amount != Decimal(given):
            return Foreign(True, f"its {name} is {amount}, not {given}")
    try:
        created = order_created_ms(order) / 1000
    except DecodeError:
        return None
    if created < sent_at - REUSE_MARGIN:
        return Foreign(
            False,
            f"it was created at {order.created_at}, {sent_at - created:.0f} s before this "
            "placement was sent",
        )
    return None


# ---------------------------------------------------------------------------- the shell


class BatchCancelOrders(msgspec.Struct, frozen=True):
    """One half of a batch cancel's answer: how many, and which."""

    count: int = 0
    orders: list[CancelledOrder] = []


class BatchCancelAnswer(msgspec.Struct, frozen=True):
    """Upbit's answer to ``DELETE /v1/orders/uuids``."""

    success: BatchCancelOrders = BatchCancelOrders()
    failed: BatchCancelOrders = BatchCancelOrders()


def rest_refusal(req: int, error: RestError) -> ErrorReply:
    """The reply for an exchange call that failed with ``error`` (Upbit's name kept)."""
    if not error.sent:
        return ErrorReply(req, "rate_limited", f"not sent: {error}")
    if error.status == 0:
        return ErrorReply(req, "upstream_unavailable", f"Upbit unreachable: {error}")
    if error.status == 418:
        return ErrorReply(req, "rate_limited", str(error))
    return ErrorReply(
        req,
        "upstream_error",
        f"Upbit refused: {error}",
        upbit_name=error.name,
        upbit_message=error.upbit_message,
    )


class Trading:
    """Answers account reads, placements and cancels with Upbit's REST API."""

    def __init__(
        self,
        rest: RestClient,
        markets: MarketList,
        *,
        epoch: str,
        keys: bool,
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` paces lookups; ``wall`` (epoch seconds) dates a placement's send
        against the ``created_at`` of an order found by its identifier."""
        self._rest = rest
        self._markets = markets
        self._keys = keys
        self.enabled = enabled
        """Whether orders may be placed and cancelled (``UPBIT_BROKER_TRADING``)."""
        self._identifiers = Identifiers(epoch)
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._placing: set[str] = set()
        """Identifiers of placements in flight: a second one at once is refused."""
        self.placed = 0
        self.resolved = 0
        """Placements whose answer was lost and that were found by their identifier."""

    def refusal(self, message: AccountQuery | PlaceOrder | CancelOrder) -> ErrorReply | None:
        """Why ``message`` is refused at once, else None (see :func:`trading_refusal`)."""
        return trading_refusal(message, keys=self._keys, enabled=self.enabled)

    async def answer(
        self, message: AccountQuery | PlaceOrder | CancelOrder, owner: str = ""
    ) -> OrderReply | ErrorReply:
        """The reply to ``message``: validated first, then REST calls, errors as replies.

        ``owner``: the client asking; clients take turns for the REST slots."""
        refused = self.refusal(message)
        if refused is not None:
            return refused
        try:
            if isinstance(message, PlaceOrder):
                deadline = self._clock() + ANSWER_WITHIN
                plan = plan_placement(message, self._markets.markets, self._identifiers)
                if plan.identifier in self._placing:
                    return ErrorReply(
                        message.req,
                        "busy",
                        f"a placement with identifier {plan.identifier!r} is in flight "
                        "already; nothing was sent (wait for its answer)",
                    )
                self._placing.add(plan.identifier)
                try:
                    return await self._place(message.req, plan, owner, deadline)
                finally:
                    self._placing.discard(plan.identifier)
            query = (
                plan_cancel(message)
                if isinstance(message, CancelOrder)
                else plan_query(message, self._markets.markets)
            )
        except TradingInvalid as exc:
            return ErrorReply(message.req, exc.code, str(exc))
        priority = Priority.ORDER if isinstance(message, CancelOrder) else Priority.ACCOUNT
        try:
            return await self._call(message.req, query, priority, owner)
        except RestError as exc:
            return rest_refusal(message.req, exc)

    async def _call(self, req: int, plan: QueryPlan, priority: int, owner: str) -> OrderReply:
        async def fetch(kind: type[T]) -> T:
            return await self._rest.exchange(
                plan.method, plan.path, "default", kind, plan.params,
                priority=priority, owner=owner,
            )  # fmt: skip

        if plan.reply == "accounts":
            return OrderReply(req, "accounts", accounts=await fetch(list[RestAccount]))
        if plan.reply == "chance":
            return OrderReply(req, "chance", chance=await fetch(OrderChance))
        if plan.reply == "order":
            return OrderReply(req, "order", order=await fetch(RestOrder))
        if plan.reply == "orders":
            return OrderReply(req, "orders", orders=await fetch(list[RestOrder]))
        batch = await fetch(BatchCancelAnswer)
        return OrderReply(req, "batch", cancelled=batch.success.orders, failed=batch.failed.orders)

    async def _place(
        self, req: int, plan: OrderPlan, owner: str, deadline: float
    ) -> OrderReply | ErrorReply:
        sent_at = self._wall()
        try:
            order = await self._rest.exchange(
                "POST", "/v1/orders", "order", RestOrder, plan.params,
                body=True, priority=Priority.ORDER, max_wait=ORDER_WAIT, owner=owner,
                timeout=ORDER_HTTP,
            )  # fmt: skip
        except RestError as exc:
            if not answer_lost(exc):
                return rest_refusal(req, exc)
            # (duplicated_identifier on a resend: taken by this very placement's 429'd send)
            loss = f"a 429, then {exc}" if exc.name == "duplicated_identifier" else str(exc)
            return await self._resolve(req, plan, sent_at, loss, owner, deadline=deadline)
        self.placed += 1
        return OrderReply(req, "order", order=order)

    async def _resolve(
        self, req: int, plan: OrderPlan, sent_at: float, loss: str, owner: str, *, deadline: float
    ) -> OrderReply | ErrorReply:
        """Look a placement whose answer was lost up by its identifier; never resend it.

        An order found is the placement's only if :func:`foreign_order` says it can be:
        a caller may have reused an identifier, and Upbit refused the placement for it.
        Each lookup's wait for a slot and for its answer fit in what is left before
        ``deadline``, when the caller must have its answer.
        """
        identifier = plan.identifier
        lost = LostPlacement(self._clock(), deadline=deadline)
        verdict: Verdict = lost.first()
        while isinstance(verdict, LookAgain):
            await self._sleep(max(verdict.at - self._clock(), 0.0))
            left = deadline - self._clock()
            if left < LOOKUP_LEAST:  # woken late: no lookup fits any more
                verdict = lost.out_of_time()
                break
            try:
                order = await self._rest.exchange(
                    "GET", "/v1/order", "default", RestOrder, {"identifier": identifier},
                    priority=Priority.ORDER, max_wait=min(LOOKUP_WAIT, 0.4 * left),
                    owner=owner, timeout=min(LOOKUP_TIMEOUT, 0.6 * left),
                )  # fmt: skip
            except RestError as exc:
                if exc.name == "order_not_found":
                    verdict = lost.missing(self._clock())
                else:
                    verdict = lost.failed(self._clock(), str(exc))
            else:
                verdict = lost.found(order)
        if isinstance(verdict, Placed):
            foreign = foreign_order(verdict.order, plan, sent_at)
            if foreign is not None:
                return _not_its_order(req, identifier, verdict.order, foreign, loss)
            self.placed += 1
            self.resolved += 1
            return OrderReply(req, "order", order=verdict.order, resolved=True)
        if isinstance(verdict, NotPlaced):
            return ErrorReply(
                req,
                "order_not_placed",
                f"Upbit's answer was lost ({loss}) and it has no order {identifier!r}: "
                "not placed; placing it again with the same identifier cannot double it",
            )
        return ErrorReply(
            req,
            "order_unknown",
            f"Upbit's answer was lost ({loss}) and whether order {identifier!r} exists is "
            f"unknown ({verdict.why}); look it up by its identifier",
        )


def _not_its_order(
    req: int, identifier: str, order: RestOrder, foreign: Foreign, loss: str
) -> ErrorReply:
    """The reply when a lost placement's identifier names another order."""
    found = f"identifier {identifier!r} names order {order.uuid[:64]!r}, but {foreign.why}"
    if foreign.certain:
        return ErrorReply(
            req,
            "order_not_placed",
            f"Upbit's answer was lost ({loss}) and {found}: the identifier was used "
            "before, so Upbit refused this placement; not placed",
        )
    return ErrorReply(
        req,
        "order_unknown",
        f"Upbit's answer was lost ({loss}) and {found}: most likely the identifier was "
        "used before and Upbit refused this placement; check your orders before placing "
        "again, with a new identifier",
    )
