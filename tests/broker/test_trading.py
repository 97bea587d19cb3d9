"""Trading through the broker without sockets: validation, identifiers and what a lost
placement answer means (pure, on a fake clock), the Trading shell over a recording fake
of Upbit's REST, and the control plane's limits on it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar, cast

import msgspec
import pytest
from aiohttp import web

from broker.control import MAX_TRADING, TRADES_ALWAYS, TRADES_PER_CLIENT, ControlServer
from broker.liveness import ClientTable
from broker.ratelimit import Priority
from broker.rest import RestClient, RestError
from broker.trading import (
    ANSWER_WITHIN,
    BATCH_CANCEL_MAX,
    LOOKUP_DELAYS,
    LOOKUP_LEAST,
    LOOKUP_TIMEOUT,
    LOOKUP_WAIT,
    ORDER_HTTP,
    REUSE_MARGIN,
    SETTLE,
    BatchCancelAnswer,
    Identifiers,
    LookAgain,
    LostPlacement,
    NotPlaced,
    OrderPlan,
    Placed,
    Trading,
    TradingInvalid,
    Unknown,
    answer_lost,
    foreign_order,
    plan_cancel,
    plan_placement,
    plan_query,
    trading_refusal,
)
from broker.upbit_auth import QueryValue
from clients.client import ORDER_TIMEOUT
from schemas.bus import (
    AccountQuery,
    CancelOrder,
    ErrorReply,
    Hello,
    OrderChance,
    OrderReply,
    PlaceOrder,
    Welcome,
    decode_broker_message,
    encode,
)
from schemas.rest import RestOrder, decode_rest
from tests.broker.conftest import FakeUpbit
from tests.broker.test_control import FakeBroker, control_over
from tests.broker.test_rest import client as rest_client

T = TypeVar("T")
MARKETS = frozenset({"KRW-BTC", "KRW-ETH"})


def fixed_id() -> str:
    return "made-1"


def limit_bid(req: int = 1, **changes: Any) -> PlaceOrder:
    fields: dict[str, Any] = {
        "market": "KRW-BTC",
        "side": "bid",
        "ord_type": "limit",
        "price": "100000",
        "volume": "0.01",
    }
    fields.update(changes)
    return PlaceOrder(req, **fields)


CREATED_AT = "2026-12-06T10:00:00+09:00"
CREATED = datetime.fromisoformat(CREATED_AT).timestamp()
"""When :func:`order` was created, in epoch seconds: the fake wall clock's time."""


def order(identifier: str = "made-1", state: str = "wait", **changes: Any) -> RestOrder:
    fields: dict[str, Any] = {
        "uuid": "u-1",
        "side": "bid",
        "ord_type": "limit",
        "price": Decimal(100000),
        "state": state,
        "market": "KRW-BTC",
        "created_at": CREATED_AT,
        "identifier": identifier,
    }
    fields.update(changes)
    return RestOrder(**fields)


# ------------------------------------------------------------------ placement (pure)


def test_a_limit_order_keeps_its_amounts_as_written_and_gets_an_identifier() -> None:
    plan = plan_placement(limit_bid(market="krw-btc", volume=" 0.0100 "), MARKETS, fixed_id)
    assert plan.params == {
        "market": "KRW-BTC",
        "side": "bid",
        "ord_type": "limit",
        "volume": "0.0100",
        "price": "100000",
        "identifier": "made-1",
    }
    assert plan.identifier == "made-1"


def test_the_callers_identifier_is_kept_and_options_go_along() -> None:
    plan = plan_placement(
        limit_bid(identifier="mine-7", time_in_force="post_only", smp_type="cancel_maker"),
        MARKETS,
        fixed_id,
    )
    assert plan.identifier == "mine-7"
    assert (plan.params["time_in_force"], plan.params["smp_type"]) == ("post_only", "cancel_maker")


@pytest.mark.parametrize(
    ("message", "needs"),
    [
        (PlaceOrder(1, "KRW-BTC", "bid", "price", price="5000"), {"price"}),
        (PlaceOrder(1, "KRW-BTC", "ask", "market", volume="0.1"), {"volume"}),
        (PlaceOrder(1, "KRW-BTC", "bid", "best", price="5000", time_in_force="ioc"), {"price"}),
        (PlaceOrder(1, "KRW-BTC", "ask", "best", volume="1", time_in_force="fok"), {"volume"}),
    ],
)
def test_each_order_type_takes_the_amounts_upbit_wants(
    message: PlaceOrder, needs: set[str]
) -> None:
    params = plan_placement(message, MARKETS, fixed_id).params
    assert {"price", "volume"} & params.keys() == needs


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (limit_bid(side="buy"), "side"),
        (limit_bid(ord_type="stop"), "ord_type"),
        (limit_bid(price=None), "price"),
        (limit_bid(volume="abc"), "volume"),
        (limit_bid(volume="-1"), "volume"),
        (limit_bid(price="NaN"), "price"),
        (PlaceOrder(1, "KRW-BTC", "bid", "price", price="5000", volume="1"), "volume"),
        (PlaceOrder(1, "KRW-BTC", "ask", "price", price="5000"), "ord_type"),
        (PlaceOrder(1, "KRW-BTC", "bid", "best", price="5000"), "time_in_force"),
        (
            PlaceOrder(1, "KRW-BTC", "ask", "market", volume="1", time_in_force="ioc"),
            "time_in_force",
        ),
        (limit_bid(time_in_force="gtc"), "time_in_force"),
        (
            PlaceOrder(1, "KRW-BTC", "bid", "best", price="1", time_in_force="post_only"),
            "time_in_force",
        ),
        (limit_bid(smp_type="both"), "smp_type"),
        (limit_bid(identifier="has space"), "identifier"),
        (limit_bid(identifier=""), "identifier"),
    ],
)
def test_a_bad_placement_is_refused_naming_the_field(message: PlaceOrder, field: str) -> None:
    with pytest.raises(TradingInvalid) as bad:
        plan_placement(message, MARKETS, fixed_id)
    assert bad.value.code == "invalid_field"
    assert str(bad.value).startswith(f"{field}:")


@pytest.mark.parametrize(
    "text",
    [
        "1e3",
        "1E-5",
        "1e400",
        "1_000",
        "\u0661\u0662",  # Arabic-Indic digits: Decimal reads them, Upbit would not
        "\uff11\uff12",  # full-width digits
        "+5",
        ".5",
        "5.",
        "0x10",
        "Infinity",
        "-0.1",
        "0",
        "0.000",
        "1" * 300,
        "1." + "1" * 300,
    ],
)
def test_an_amount_that_is_not_plain_decimal_digits_is_refused_and_not_echoed_whole(
    text: str,
) -> None:
    with pytest.raises(TradingInvalid) as bad:
        plan_placement(limit_bid(volume=text), MARKETS, fixed_id)
    assert str(bad.value).startswith("volume:")
    assert len(str(bad.value)) < 200


@pytest.mark.parametrize("text", ["0.00000001", "123456789", "1.5", "0001.10", " 2 "])
def test_plain_decimal_amounts_go_as_written(text: str) -> None:
    plan = plan_placement(limit_bid(price=text), MARKETS, fixed_id)
    assert plan.params["price"] == text.strip()


@pytest.mark.parametrize("field", ["side", "ord_type", "time_in_force", "smp_type"])
def test_a_huge_bad_value_is_named_but_not_echoed_whole(field: str) -> None:
    with pytest.raises(TradingInvalid) as bad:
        plan_placement(limit_bid(1, **{field: "x" * 10_000}), MARKETS, fixed_id)
    assert str(bad.value).startswith(f"{field}:")
    assert len(str(bad.value)) < 200


def test_a_huge_bad_read_value_is_not_echoed_whole() -> None:
    for message in (
        AccountQuery(1, "open_orders", states=["w" * 10_000]),
        AccountQuery(1, "open_orders", order_by="d" * 10_000),
    ):
        with pytest.raises(TradingInvalid) as bad:
            plan_query(message, MARKETS)
        assert len(str(bad.value)) < 200


def test_an_unlisted_market_is_refused_before_upbit_sees_it() -> None:
    with pytest.raises(TradingInvalid) as unknown:
        plan_placement(limit_bid(market="KRW-NOPE"), MARKETS, fixed_id)
    assert unknown.value.code == "unknown_code"
    # Without a market list, the form is checked and Upbit judges the rest.
    assert (
        plan_placement(limit_bid(market="krw-nope"), None, fixed_id).params["market"] == "KRW-NOPE"
    )


# ------------------------------------------------------------------ cancels and reads (pure)


def test_a_cancel_takes_exactly_one_key() -> None:
    assert plan_cancel(CancelOrder(1, uuid="abc-1")).params == {"uuid": "abc-1"}
    by_id = plan_cancel(CancelOrder(1, identifier="mine"))
    assert (by_id.method, by_id.path, by_id.params) == (
        "DELETE",
        "/v1/order",
        {"identifier": "mine"},
    )
    batch = plan_cancel(CancelOrder(1, identifiers=["a", "b", "a"]))
    assert (batch.path, batch.params, batch.reply) == (
        "/v1/orders/uuids",
        {"identifiers[]": ["a", "b"]},
        "batch",
    )
    for bad in (CancelOrder(1), CancelOrder(1, uuid="a", identifier="b")):
        with pytest.raises(TradingInvalid, match="exactly one"):
            plan_cancel(bad)


def test_a_batch_cancel_takes_at_most_twenty() -> None:
    keys = [f"u-{i}" for i in range(BATCH_CANCEL_MAX + 1)]
    with pytest.raises(TradingInvalid, match="uuids: 21 orders"):
        plan_cancel(CancelOrder(1, uuids=keys))
    with pytest.raises(TradingInvalid, match=r"uuids\[1\]"):
        plan_cancel(CancelOrder(1, uuids=["ok-1", "not a uuid"]))


def test_reads_become_upbits_calls_with_checked_parameters() -> None:
    assert plan_query(AccountQuery(1, "accounts"), MARKETS).path == "/v1/accounts"
    chance = plan_query(AccountQuery(1, "chance", market="krw-eth"), MARKETS)
    assert (chance.path, chance.params) == ("/v1/orders/chance", {"market": "KRW-ETH"})
    opened = plan_query(
        AccountQuery(1, "open_orders", market="KRW-BTC", states=["watch"], limit=50), MARKETS
    )
    assert (opened.path, opened.params) == (
        "/v1/orders/open",
        {"market": "KRW-BTC", "states[]": ["watch"], "limit": 50},
    )
    closed = plan_query(
        AccountQuery(1, "closed_orders", start_time="2026-12-01T00:00:00+09:00", order_by="asc"),
        None,
    )
    assert closed.params == {"start_time": "2026-12-01T00:00:00+09:00", "order_by": "asc"}


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (AccountQuery(1, "chance"), "market"),
        (AccountQuery(1, "order"), "uuid"),
        (AccountQuery(1, "order", uuid="a", identifier="b"), "uuid"),
        (AccountQuery(1, "open_orders", states=["wait", "done"]), "states[1]"),
        (AccountQuery(1, "open_orders", limit=101), "limit"),
        (AccountQuery(1, "closed_orders", limit=0), "limit"),
        (AccountQuery(1, "closed_orders", page=2), "page"),
        (AccountQuery(1, "closed_orders", end_time="yesterday"), "end_time"),
        (AccountQuery(1, "open_orders", order_by="newest"), "order_by"),
    ],
)
def test_a_bad_read_is_refused_naming_the_field(message: AccountQuery, field: str) -> None:
    with pytest.raises(TradingInvalid) as bad:
        plan_query(message, MARKETS)
    assert str(bad.value).startswith(f"{field}:")


def test_without_keys_nothing_and_with_trading_off_only_reads_are_served() -> None:
    read, place, cancel = AccountQuery(1, "accounts"), limit_bid(), CancelOrder(1, uuid="a")
    for message in (read, place, cancel):
        refused = trading_refusal(message, keys=False, enabled=True)
        assert refused is not None
        assert refused.code == "private_unavailable"
    assert trading_refusal(read, keys=True, enabled=False) is None
    for message in (place, cancel):
        off = trading_refusal(message, keys=True, enabled=False)
        assert off is not None
        assert off.code == "trading_disabled"
        assert "UPBIT_BROKER_TRADING" in off.message
        assert trading_refusal(message, keys=True, enabled=True) is None


def test_identifiers_are_unique_within_a_run_and_across_epochs() -> None:
    first, second = Identifiers("aaaa"), Identifiers("bbbb")
    made = [first() for _ in range(3)] + [second() for _ in range(3)]
    assert len(set(made)) == 6
    assert made[0] == "ub-aaaa-1"


# ------------------------------------------------------------------ lost answers (pure)


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (RestError(0, "POST /v1/orders failed: ServerDisconnectedError"), True),
        (RestError(500, "no body"), True),
        (RestError(503, "no body"), True),
        (RestError(200, "unexpected body from /v1/orders"), True),
        (RestError(400, "x", name="insufficient_funds_bid"), False),
        (RestError(418, "blocked"), False),
        (RestError(429, "REST group order is rate limited", sent=False), False),
        (RestError(0, "not sent", sent=False), False),
    ],
)
def test_only_an_answer_that_may_hide_a_placed_order_counts_as_lost(
    error: RestError, lost: bool
) -> None:
    assert answer_lost(error) is lost


def test_a_lost_placement_found_by_identifier_is_placed() -> None:
    lost = LostPlacement(100.0)
    assert lost.first() == LookAgain(100.0 + LOOKUP_DELAYS[0])
    assert lost.found(order()) == Placed(order())


def test_not_found_counts_only_once_the_order_had_time_to_show() -> None:
    lost = LostPlacement(100.0)
    early = lost.missing(100.0 + LOOKUP_DELAYS[0])
    assert early == LookAgain(100.0 + LOOKUP_DELAYS[0] + LOOKUP_DELAYS[1])
    assert lost.missing(100.0 + SETTLE) == NotPlaced()


def test_lookups_that_all_fail_leave_the_outcome_unknown() -> None:
    lost = LostPlacement(0.0)
    now, verdict = 0.0, cast(object, lost.first())
    for _ in LOOKUP_DELAYS:
        assert isinstance(verdict, LookAgain)
        now = verdict.at
        verdict = lost.failed(now, "HTTP 503")
    assert verdict == Unknown("HTTP 503")


def test_a_failed_lookup_then_not_found_after_settling_is_not_placed() -> None:
    lost = LostPlacement(0.0)
    again = lost.failed(0.25, "timeout")
    assert isinstance(again, LookAgain)
    assert lost.missing(again.at + SETTLE) == NotPlaced()


def limit_plan(identifier: str = "made-1", **changes: Any) -> OrderPlan:
    return plan_placement(limit_bid(identifier=identifier, **changes), MARKETS, fixed_id)


def test_an_order_found_by_identifier_with_the_placements_fields_and_time_is_its() -> None:
    plan = limit_plan(volume="0.0100")
    assert foreign_order(order(volume=Decimal("0.01")), plan, CREATED) is None
    # created_at has whole seconds, and clocks differ a little.
    assert foreign_order(order(), plan, CREATED + 5) is None
    assert foreign_order(order(), plan, CREATED + REUSE_MARGIN - 1) is None
    # A body whose created_at cannot be read is judged by its fields alone.
    assert foreign_order(order(created_at="soon"), plan, CREATED) is None
    # Market orders come back with the amount they did not take as null.
    market_sell = plan_placement(
        PlaceOrder(1, "KRW-BTC", "ask", "market", volume="0.5"), MARKETS, fixed_id
    )
    found = order(side="ask", ord_type="market", price=None, volume=Decimal("0.5"))
    assert foreign_order(found, market_sell, CREATED) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"price": Decimal(99000)},
        {"volume": Decimal("0.02")},
        {"market": "KRW-ETH"},
        {"side": "ask"},
        {"ord_type": "best"},
    ],
)
def test_an_order_found_by_identifier_with_other_fields_is_certainly_anothers(
    changes: dict[str, Any],
) -> None:
    found = order(**{"volume": Decimal("0.01"), **changes})
    foreign = foreign_order(found, limit_plan(), CREATED)
    assert foreign is not None
    assert foreign.certain
    assert next(iter(changes)) in foreign.why


def test_an_order_found_by_identifier_made_before_the_placement_was_sent_is_an_earlier_one() -> (
    None
):
    foreign = foreign_order(order(), limit_plan(), CREATED + REUSE_MARGIN + 1)
    assert foreign is not None
    assert not foreign.certain
    assert CREATED_AT in foreign.why


def test_an_order_chance_decodes_with_amounts_as_text_or_numbers() -> None:
    body = b"""{"bid_fee":"0.0005","ask_fee":"0.0005","maker_bid_fee":"0.0005",
      "maker_ask_fee":"0.0005","market":{"id":"KRW-BTC","name":"BTC/KRW",
      "order_types":["limit"],"order_sides":["ask","bid"],"bid_types":["best_fok","limit"],
      "bid":{"currency":"KRW","price_unit":null,"min_total":5000},
      "ask":{"currency":"BTC","min_total":"5000"},"max_total":"1000000000.0","state":"active"},
      "bid_account":{"currency":"KRW","balance":"0.34","locked":"4999.9","avg_buy_price":"0",
      "avg_buy_price_modified":true,"unit_currency":"KRW"},
      "ask_account":{"currency":"BTC","balance":"0.00048","locked":"0.0"}}"""
    chance = decode_rest(body, OrderChance)
    assert chance.market.bid is not None
    assert chance.market.ask is not None
    assert chance.market.bid.min_total == chance.market.ask.min_total == Decimal(5000)
    assert chance.bid_fee == Decimal("0.0005")
    assert chance.ask_account is not None
    assert chance.ask_account.balance == Decimal("0.00048")
    reply = OrderReply(1, "chance", chance=chance)
    assert decode_broker_message(encode(reply)) == reply


# ------------------------------------------------------------------ the shell (fake REST)

Call = tuple[str, str, str, dict[str, QueryValue], int, bool]


class FakeRest(RestClient):
    """Records every exchange call and answers from a script (no HTTP at all)."""

    def __init__(
        self, script: Callable[[Call], object], clock: Clock | None = None
    ) -> None:  # nothing goes out
        self.recorded: list[Call] = []
        self.max_waits: list[float | None] = []
        """The ``max_wait`` of each call, in order."""
        self.timeouts: list[float | None] = []
        """The ``timeout`` of each call, in order."""
        self._clock = clock
        """Moved on by a call answered :data:`HANG` (it took its whole wait)."""
        self.owners: list[str] = []
        """The client each call was made for, in order."""
        self._script = script

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
        call = (method, path, group, dict(params or {}), priority, body)
        self.recorded.append(call)
        self.owners.append(owner)
        self.max_waits.append(max_wait)
        self.timeouts.append(timeout)
        answer = self._script(call)
        if answer is HANG:
            # The slot came as late as allowed, then no answer within the timeout.
            assert self._clock is not None
            assert max_wait is not None
            assert timeout is not None
            self._clock.now += max_wait + timeout
            answer = RestError(0, f"{method} {path} failed: TimeoutError")
        if isinstance(answer, RestError):
            raise answer
        return cast(T, answer)


HANG = object()
"""A script's answer for a call that waits out its slot and its timeout, then fails."""


class Markets:
    markets: frozenset[str] | None = MARKETS

    async def wait_markets(self, timeout: float) -> bool:
        return True


class Clock:
    """A fake monotonic clock that sleeping moves forward."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def trading(
    rest: FakeRest, clock: Clock | None = None, *, enabled: bool = True, wall: float = CREATED
) -> Trading:
    """The shell on ``rest``; its wall clock stands at ``wall`` (when :func:`order` was
    made, so orders found by identifier are as new as the placement)."""
    clock = clock or Clock()
    return Trading(
        rest,
        Markets(),
        epoch="e1",
        keys=True,
        enabled=enabled,
        clock=clock,
        sleep=clock.sleep,
        wall=lambda: wall + clock.now,
    )


def posts(rest: FakeRest) -> list[Call]:
    return [c for c in rest.recorded if c[0] == "POST"]


async def test_a_placement_goes_first_on_the_order_group_as_a_json_body() -> None:
    rest = FakeRest(lambda call: order(str(call[3]["identifier"])))
    reply = await trading(rest).answer(limit_bid(identifier="mine-1"))
    assert isinstance(reply, OrderReply)
    assert reply.order == order("mine-1")
    assert not reply.resolved
    ((method, path, group, params, priority, body),) = rest.recorded
    assert (method, path, group, priority, body) == (
        "POST",
        "/v1/orders",
        "order",
        Priority.ORDER,
        True,
    )
    assert params["identifier"] == "mine-1"


async def test_a_lost_answer_is_never_sent_again_but_found_by_identifier() -> None:
    def script(call: Call) -> object:
        if call[0] == "POST":
            return RestError(0, "POST /v1/orders failed: ServerDisconnectedError")
        if len(call[3]) and sum(c[0] == "GET" for c in rest.recorded) < 2:
            return RestError(404, "order_not_found: x", name="order_not_found")
        return order("mine-2")

    rest = FakeRest(script)
    clock = Clock()
    reply = await trading(rest, clock).answer(limit_bid(identifier="mine-2"))
    assert isinstance(reply, OrderReply)
    assert (reply.order, reply.resolved) == (order("mine-2"), True)
    assert len(posts(rest)) == 1
    lookups = [c for c in rest.recorded if c[0] == "GET"]
    assert [(c[1], c[3], c[4]) for c in lookups] == [
        ("/v1/order", {"identifier": "mine-2"}, Priority.ORDER)
    ] * 2
    assert clock.now == pytest.approx(sum(LOOKUP_DELAYS[:2]))


async def test_a_lost_answer_for_an_order_upbit_never_saw_is_not_placed() -> None:
    def script(call: Call) -> object:
        if call[0] == "POST":
            return RestError(502, "no body")
        return RestError(404, "order_not_found: x", name="order_not_found")

    rest = FakeRest(script)
    reply = await trading(rest).answer(limit_bid(identifier="mine-3"))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "order_not_placed"
    assert "mine-3" in reply.message
    assert len(posts(rest)) == 1


async def test_a_lost_answer_upbit_cannot_be_asked_about_is_unknown() -> None:
    rest = FakeRest(lambda call: RestError(0, f"{call[0]} {call[1]} failed: TimeoutError"))
    reply = await trading(rest).answer(limit_bid(identifier="mine-4"))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "order_unknown"
    assert "mine-4" in reply.message
    assert len(posts(rest)) == 1
    assert len(rest.recorded) == 1 + len(LOOKUP_DELAYS)
    # Each lookup waits for a slot briefly: all of them end well inside the client's
    # wait for the answer, so the caller learns the outcome instead of timing out.
    assert rest.max_waits[1:] == [LOOKUP_WAIT] * len(LOOKUP_DELAYS)
    assert rest.timeouts == [ORDER_HTTP] + [LOOKUP_TIMEOUT] * len(LOOKUP_DELAYS)


async def test_a_placement_is_answered_before_its_client_gives_up_however_slow_upbit_is() -> None:
    # Every call waits as long as it may for a slot and then for an answer that never
    # comes: the caller still hears order_unknown in time, never a client timeout.
    clock = Clock()
    rest = FakeRest(lambda call: HANG, clock)
    reply = await trading(rest, clock).answer(limit_bid(identifier="slow-1"))
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == "order_unknown"
    assert "slow-1" in reply.message
    assert len(posts(rest)) == 1
    assert len(rest.recorded) > 1  # it did look
    assert clock.now <= ANSWER_WITHIN < ORDER_TIMEOUT
    assert all(t is not None and t > 0 for t in rest.timeouts)


async def test_a_lookup_woken_late_is_not_made_with_no_time_left() -> None:
    # The event loop may wake a lookup well after its time (a busy machine): a lookup
    # then made with the time left would get a negative timeout, which aiohttp reads
    # as none at all.
    class LateClock(Clock):
        async def sleep(self, seconds: float) -> None:
            self.now += seconds + 7.0

    clock = LateClock()
    clock.now = 0.0
    rest = FakeRest(lambda call: HANG, clock)
    t = Trading(
        rest, Markets(), epoch="e1", keys=True, enabled=True,
        clock=clock, sleep=clock.sleep, wall=lambda: CREATED + clock.now,
    )  # fmt: skip
    reply = await t.answer(limit_bid(identifier="late-1"))
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == "order_unknown"
    assert all(t is not None and t > 0 for t in rest.timeouts), rest.timeouts
    assert all(w is not None and w >= 0 for w in rest.max_waits), rest.max_waits
    assert clock.now <= ANSWER_WITHIN + 7.0  # at most the one late wake-up past it


async def test_a_placement_answered_429_and_not_sent_again_is_looked_up() -> None:
    def script(call: Call) -> object:
        if call[0] == "POST":
            return RestError(429, "REST group order is rate limited (after 429)", resent=True)
        return order("mine-429", volume=Decimal("0.01"))

    rest = FakeRest(script)
    reply = await trading(rest).answer(limit_bid(identifier="mine-429"))
    assert isinstance(reply, OrderReply), reply
    assert reply.resolved
    assert len(posts(rest)) == 1


def test_no_lookup_starts_too_close_to_the_answers_deadline() -> None:
    lost = LostPlacement(0.0, deadline=LOOKUP_DELAYS[0] + LOOKUP_LEAST / 2)
    assert isinstance(lost.first(), Unknown)
    lost = LostPlacement(0.0, deadline=10.0)
    again = lost.failed(9.4, "HTTP 503")
    assert isinstance(again, Unknown)
    assert "no time left" in again.why


async def test_upbits_refusal_comes_back_with_its_name_and_is_not_retried() -> None:
    refusal = RestError(
        400,
        "insufficient_funds_bid: 주문가능한 금액(KRW)이 부족합니다.",
        name="insufficient_funds_bid",
        upbit_message="주문가능한 금액(KRW)이 부족합니다.",
    )
    rest = FakeRest(lambda call: refusal)
    reply = await trading(rest).answer(limit_bid())
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.upbit_name, reply.upbit_message) == (
        "upstream_error",
        "insufficient_funds_bid",
        "주문가능한 금액(KRW)이 부족합니다.",
    )
    assert len(rest.recorded) == 1


async def test_an_order_that_found_no_slot_in_time_was_not_sent() -> None:
    rest = FakeRest(lambda call: RestError(429, "REST group order is rate limited", sent=False))
    reply = await trading(rest).answer(limit_bid())
    assert isinstance(reply, ErrorReply)
    assert reply.code == "rate_limited"
    assert "not sent" in reply.message
    assert len(rest.recorded) == 1


async def test_cancels_go_first_and_reads_at_account_priority() -> None:
    rest = FakeRest(lambda call: order() if call[1] == "/v1/order" else [])
    t = trading(rest)
    assert isinstance(await t.answer(CancelOrder(1, uuid="u-1")), OrderReply)
    assert isinstance(await t.answer(AccountQuery(2, "open_orders")), OrderReply)
    (cancel, read) = rest.recorded
    assert (cancel[0], cancel[2], cancel[4]) == ("DELETE", "default", Priority.ORDER)
    assert (read[0], read[2], read[4]) == ("GET", "default", Priority.ACCOUNT)


async def test_a_batch_cancel_answer_is_split_into_cancelled_and_failed() -> None:
    body = (
        b'{"success":{"count":1,"orders":[{"uuid":"u-1","market":"KRW-BTC","identifier":"a"}]},'
        b'"failed":{"count":1,"orders":[{"uuid":"b","market":null,"identifier":null}]}}'
    )

    rest = FakeRest(lambda call: msgspec.json.decode(body, type=BatchCancelAnswer))
    reply = await trading(rest).answer(CancelOrder(1, identifiers=["a", "b"]))
    assert isinstance(reply, OrderReply)
    assert [c.identifier for c in reply.cancelled] == ["a"]
    assert [f.uuid for f in reply.failed] == ["b"]


async def test_with_trading_off_nothing_reaches_upbit() -> None:
    rest = FakeRest(lambda call: order())
    reply = await trading(rest, enabled=False).answer(limit_bid())
    assert isinstance(reply, ErrorReply)
    assert reply.code == "trading_disabled"
    assert rest.recorded == []


async def test_every_call_for_a_client_is_queued_as_that_clients_own() -> None:
    # Clients take turns for the REST slots (broker.ratelimit.PriorityGate): the
    # placement, the lookups after a lost answer, reads and cancels all carry the owner.
    def script(call: Call) -> object:
        if call[0] == "POST":
            return RestError(0, "POST /v1/orders failed: ServerDisconnectedError")
        return order("own-1")

    rest = FakeRest(script)
    shell = trading(rest)
    assert isinstance(await shell.answer(limit_bid(identifier="own-1"), "c1"), OrderReply)
    await shell.answer(AccountQuery(2, "accounts"), "c2")
    await shell.answer(CancelOrder(3, uuid="u-1"), "c3")
    assert rest.owners[0] == "c1"  # the POST
    assert set(rest.owners[1:-2]) == {"c1"}  # its lookups
    assert rest.owners[-2:] == ["c2", "c3"]


async def test_a_lost_answer_whose_identifier_names_another_order_is_not_placed() -> None:
    """A caller reusing an identifier: Upbit refused the placement as a duplicate, the
    answer was lost, and the lookup finds the identifier's earlier, different order."""

    def script(call: Call) -> object:
        if call[0] == "POST":
            return RestError(0, "POST /v1/orders failed: ServerDisconnectedError")
        return order("again-1", uuid="u-old", price=Decimal(50000), state="done")

    rest = FakeRest(script)
    reply = await trading(rest).answer(limit_bid(identifier="again-1"))
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == "order_not_placed"
    assert "u-old" in reply.message
    assert "again-1" in reply.message
    assert len(posts(rest)) == 1


async def test_a_lost_answer_whose_identifier_names_an_earlier_order_is_not_taken_for_it() -> None:
    """Same fields, but the order found was made long before this placement was sent:
    it is not answered as placed (nor as certainly not placed: clocks may differ)."""

    def script(call: Call) -> object:
        if call[0] == "POST":
            return RestError(502, "no body")
        return order("again-2", uuid="u-old", volume=Decimal("0.01"))

    rest = FakeRest(script)
    reply = await trading(rest, wall=CREATED + 3600).answer(limit_bid(identifier="again-2"))
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == "order_unknown"
    assert "u-old" in reply.message
    assert len(posts(rest)) == 1


async def test_a_second_placement_with_an_identifier_in_flight_is_refused_unsent() -> None:
    """Two callers (or one retrying) with the same identifier at once: were the first's
    answer lost, its lookup would find the second's order and answer it as its own."""
    release = asyncio.Event()

    async def held(call: Call) -> object:
        await release.wait()
        return order(str(call[3]["identifier"]), volume=Decimal("0.01"))

    class HeldRest(FakeRest):
        async def exchange(self, *args: Any, **kwargs: Any) -> Any:
            answer = await super().exchange(*args, **kwargs)
            return await cast(Any, answer)

    rest = HeldRest(held)
    t = trading(rest)
    first = asyncio.ensure_future(t.answer(limit_bid(1, identifier="same-1")))
    await asyncio.sleep(0)
    second = await t.answer(limit_bid(2, identifier="same-1"))
    assert isinstance(second, ErrorReply)
    assert (second.req, second.code) == (2, "busy")
    assert "same-1" in second.message
    assert len(posts(rest)) == 1
    release.set()
    assert isinstance(await first, OrderReply)
    # Once the first is answered, the identifier is Upbit's to judge again.
    assert isinstance(await t.answer(limit_bid(3, identifier="same-1")), OrderReply)
    assert len(posts(rest)) == 2


def duplicated(*, resent: bool) -> RestError:
    return RestError(
        400,
        "duplicated_identifier: identifier is duplicated.",
        name="duplicated_identifier",
        upbit_message="identifier is duplicated.",
        resent=resent,
    )


async def test_a_resend_after_a_429_refused_as_a_duplicate_is_found_as_placed() -> None:
    """Upbit's 429 says "not carried out", so the placement went again; had the first
    send been carried out anyway, the resend is refused as a duplicate while the order
    rests: the caller must learn it was placed, not that Upbit refused it."""

    def script(call: Call) -> object:
        if call[0] == "POST":
            return duplicated(resent=True)
        return order("dup-1", volume=Decimal("0.01"))

    rest = FakeRest(script)
    reply = await trading(rest).answer(limit_bid(identifier="dup-1"))
    assert isinstance(reply, OrderReply), reply
    assert reply.resolved
    assert reply.order == order("dup-1", volume=Decimal("0.01"))
    assert len(posts(rest)) == 1


async def test_a_duplicate_identifier_sent_once_is_upbits_refusal_as_is() -> None:
    """A caller reusing an identifier gets Upbit's refusal, no order of another time."""
    rest = FakeRest(lambda call: duplicated(resent=False))
    reply = await trading(rest).answer(limit_bid(identifier="dup-2"))
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.upbit_name) == ("upstream_error", "duplicated_identifier")
    assert rest.recorded == posts(rest)


DUPLICATED = {"error": {"name": "duplicated_identifier", "message": "identifier is duplicated."}}


async def test_the_rest_client_says_when_a_refusal_came_after_a_resend_on_429(
    upbit: FakeUpbit,
) -> None:
    answers = iter(
        [
            web.Response(text="Too many API requests.", status=429),
            web.json_response(DUPLICATED, status=400),
            web.json_response(DUPLICATED, status=400),
        ]
    )
    upbit.reply = lambda request: next(answers)
    rest = rest_client(upbit.base)
    params: dict[str, QueryValue] = {"market": "KRW-BTC", "identifier": "x"}
    try:
        with pytest.raises(RestError) as after_429:
            await rest.exchange("POST", "/v1/orders", "order", RestOrder, params, body=True)
        assert (after_429.value.name, after_429.value.resent) == ("duplicated_identifier", True)
        with pytest.raises(RestError) as at_once:
            await rest.exchange("POST", "/v1/orders", "order", RestOrder, params, body=True)
        assert (at_once.value.name, at_once.value.resent) == ("duplicated_identifier", False)
    finally:
        await rest.close()
    assert len(upbit.seen) == 3


# ------------------------------------------------------------------ control dispatch


class HeldTrading:
    """A trading service that answers only when released (trading on, keys present)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.release = asyncio.Event()
        self.asked: list[object] = []
        self.enabled = enabled

    def refusal(self, message: AccountQuery | PlaceOrder | CancelOrder) -> ErrorReply | None:
        return trading_refusal(message, keys=True, enabled=self.enabled)

    async def answer(
        self, message: AccountQuery | PlaceOrder | CancelOrder, owner: str = ""
    ) -> OrderReply | ErrorReply:
        self.asked.append(message)
        await self.release.wait()
        return OrderReply(message.req, "accounts")


def control_with(service: HeldTrading | None) -> ControlServer:
    return control_over(FakeBroker(ClientTable()), private_enabled=True, trading=service)


def hello(control: ControlServer, identity: bytes) -> None:
    ((_, reply),) = control.handle([identity, encode(Hello(client_id="x"))], 1.0)
    assert isinstance(reply, Welcome)


def refusal(control: ControlServer, identity: bytes, message: object) -> ErrorReply:
    ((_, reply),) = control.handle([identity, encode(message)], 1.0)  # type: ignore[arg-type]
    assert isinstance(reply, ErrorReply), reply
    return reply


async def test_a_client_has_a_bounded_number_of_trading_requests_in_flight() -> None:
    service = HeldTrading()
    control = control_with(service)
    hello(control, b"\x00a")
    hello(control, b"\x00b")
    for req in range(TRADES_PER_CLIENT):
        assert control.handle([b"\x00a", encode(limit_bid(req=req))], 1.0) == []
    busy = refusal(control, b"\x00a", AccountQuery(99, "accounts"))
    assert (busy.req, busy.code) == (99, "busy")
    assert "nothing was sent" in busy.message
    assert control.handle([b"\x00b", encode(AccountQuery(1, "accounts"))], 1.0) == []
    await asyncio.sleep(0)
    assert len(service.asked) == TRADES_PER_CLIENT + 1
    service.release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert control.handle([b"\x00a", encode(AccountQuery(100, "accounts"))], 1.0) == []
    await asyncio.sleep(0)


async def test_clients_that_fill_the_broker_do_not_shut_another_out() -> None:
    service = HeldTrading()
    control = control_with(service)
    hogs = [bytes([0, i]) for i in range(MAX_TRADING // TRADES_PER_CLIENT)]
    for identity in [*hogs, b"\x00z"]:
        hello(control, identity)
    for identity in hogs:
        for req in range(TRADES_PER_CLIENT):
            assert control.handle([identity, encode(limit_bid(req=req))], 1.0) == []
    await asyncio.sleep(0)
    assert len(service.asked) == MAX_TRADING
    assert refusal(control, hogs[0], AccountQuery(8, "accounts")).code == "busy"
    # Someone else still gets TRADES_ALWAYS requests in.
    for req in range(TRADES_ALWAYS):
        assert control.handle([b"\x00z", encode(AccountQuery(req, "accounts"))], 1.0) == []
    assert refusal(control, b"\x00z", AccountQuery(9, "accounts")).code == "busy"
    service.release.set()
    for _ in range(5):
        await asyncio.sleep(0)


def test_trading_off_is_refused_at_once_without_starting_anything() -> None:
    service = HeldTrading(enabled=False)
    control = control_with(service)
    hello(control, b"\x00a")
    assert refusal(control, b"\x00a", limit_bid(req=3)).code == "trading_disabled"
    assert service.asked == []


def test_a_broker_without_trading_refuses_account_calls() -> None:
    control = control_with(None)
    hello(control, b"\x00a")
    assert refusal(control, b"\x00a", AccountQuery(1, "accounts")).code == "unknown_type"


def test_a_placement_with_a_missing_field_is_a_bad_message_naming_it() -> None:
    control = control_with(HeldTrading())
    hello(control, b"\x00a")
    raw = msgspec.msgpack.encode(
        {"op": "place_order", "req": 4, "market": "KRW-BTC", "side": "bid"}
    )
    ((_, reply),) = control.handle([b"\x00a", raw], 1.0)
    assert isinstance(reply, ErrorReply)
    assert (reply.req, reply.code) == (4, "bad_message")
    assert "ord_type" in reply.message
