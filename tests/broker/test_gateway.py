"""Quotation through the broker without sockets: validation and candle paging (pure), the
gateway over a recording fake of Upbit's REST, and the control plane's dispatch of it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

import msgspec
import pytest

from broker.control import MAX_PENDING, QUOTES_PER_CLIENT, ControlServer
from broker.gateway import (
    CANDLE_PAGE,
    MAX_CANDLES,
    MAX_CODES,
    CandlePager,
    Gateway,
    QuoteInvalid,
    normalize_to,
    plan_quote,
)
from broker.liveness import ClientTable
from broker.rest import PRIORITY_POLL, PRIORITY_SNAPSHOT, RestClient, RestError
from broker.upbit_auth import QueryValue
from schemas.bus import ErrorReply, Hello, Quote, QuoteReply, Welcome, encode
from schemas.rest import RestCandle, RestMarket, RestMarketEvent
from tests.broker.test_control import FakeBroker, control_over

T = TypeVar("T")
MARKETS = frozenset({"KRW-BTC", "KRW-ETH", "BTC-ETH"})
START = datetime(2025, 6, 27, tzinfo=UTC)


def candle(minutes_before: int) -> RestCandle:
    """A 1-minute candle ``minutes_before`` minutes before :data:`START`."""
    at = START - timedelta(minutes=minutes_before)
    text = f"{at:%Y-%m-%dT%H:%M:%S}"
    return RestCandle(
        market="KRW-BTC",
        candle_date_time_utc=text,
        candle_date_time_kst=text,
        opening_price=1.0,
        high_price=1.0,
        low_price=1.0,
        trade_price=1.0,
        timestamp=0,
        candle_acc_trade_price=0.0,
        candle_acc_trade_volume=0.0,
        unit=1,
    )


# ------------------------------------------------------------------ validation (pure)


def test_every_kind_is_planned_with_normalized_codes_and_defaults() -> None:
    assert plan_quote(Quote(1, "markets"), MARKETS).kind == "markets"
    tickers = plan_quote(Quote(1, "tickers", ["krw-btc", "KRW-ETH", "KRW-BTC"]), MARKETS)
    assert tickers.codes == ("KRW-BTC", "KRW-ETH")
    books = plan_quote(Quote(1, "orderbooks", ["KRW-BTC"], depth=5, level=1000.0), MARKETS)
    assert (books.depth, books.level) == (5, 1000.0)
    assert plan_quote(Quote(1, "orderbooks", ["KRW-BTC"]), MARKETS).depth == 30
    assert plan_quote(Quote(1, "trades", ["KRW-BTC"], count=500), MARKETS).count == 500
    candles = plan_quote(Quote(1, "candles", ["KRW-BTC"], unit="240m", count=450), MARKETS)
    assert (candles.path, candles.count, candles.to) == ("/v1/candles/minutes/240", 450, None)
    for unit, path in [("1s", "/v1/candles/seconds"), ("years", "/v1/candles/years")]:
        assert plan_quote(Quote(1, "candles", ["KRW-BTC"], unit=unit), MARKETS).path == path


@pytest.mark.parametrize(
    ("message", "code", "says"),
    [
        (Quote(1, "tickers", ["KRW-XYZ"]), "unknown_code", "KRW-XYZ"),
        (Quote(1, "tickers", ["BTC"]), "invalid_code", "QUOTE-BASE"),
        (Quote(1, "tickers", []), "invalid_code", "at least one"),
        (Quote(1, "tickers", ["KRW-BTC"] * (MAX_CODES + 1)), "too_many_streams", "1000"),
        (Quote(1, "markets", ["KRW-BTC"]), "invalid_code", "no market codes"),
        (Quote(1, "trades", ["KRW-BTC", "KRW-ETH"]), "invalid_code", "exactly one"),
        (Quote(1, "trades", ["KRW-BTC"], count=501), "invalid_option", "1 to 500"),
        (Quote(1, "candles", ["KRW-BTC"], unit="2m"), "invalid_option", "2m"),
        (Quote(1, "candles", ["KRW-BTC"], unit="1m", count=0), "invalid_option", "count 0"),
        (
            Quote(1, "candles", ["KRW-BTC"], unit="1m", count=MAX_CANDLES + 1),
            "invalid_option",
            "1 to 10000",
        ),
        (Quote(1, "candles", ["KRW-BTC"], unit="1m", to="yesterday"), "invalid_option", "ISO"),
        (Quote(1, "orderbooks", ["KRW-BTC"], depth=31), "invalid_option", "1 to 30"),
        (Quote(1, "orderbooks", ["KRW-BTC"], level=-1.0), "invalid_option", ">= 0"),
    ],
)
def test_a_bad_request_is_refused_with_a_code_and_a_reason(
    message: Quote, code: str, says: str
) -> None:
    with pytest.raises(QuoteInvalid) as caught:
        plan_quote(message, MARKETS)
    assert caught.value.code == code
    assert says in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-06-27T09:00:00+09:00", "2025-06-27T00:00:00Z"),
        ("2025-06-27 00:00:00", "2025-06-27T00:00:00Z"),
        ("2025-06-27T00:00:00Z", "2025-06-27T00:00:00Z"),
        ("2025-06-27T00:00:00.250", "2025-06-27T00:00:01Z"),
    ],
)
def test_to_becomes_utc_and_a_fraction_rounds_up(text: str, expected: str) -> None:
    assert normalize_to(text) == expected


# ------------------------------------------------------------------ paging (pure)


def test_paging_asks_200_at_a_time_each_page_ending_before_the_oldest_so_far() -> None:
    pager = CandlePager(450, None)
    calls = []
    offset = 0
    while (call := pager.next_call()) is not None:
        calls.append(call)
        count, _ = call
        pager.add([candle(offset + i) for i in range(count)], count)
        offset += count
    assert [count for count, _ in calls] == [CANDLE_PAGE, CANDLE_PAGE, 50]
    assert calls[0][1] is None
    assert calls[1][1] == f"{START - timedelta(minutes=199):%Y-%m-%dT%H:%M:%S}Z"
    assert calls[2][1] == f"{START - timedelta(minutes=399):%Y-%m-%dT%H:%M:%S}Z"
    assert len(pager.candles) == 450
    assert pager.candles == [candle(i) for i in range(450)]


def test_paging_stops_when_the_history_runs_out() -> None:
    pager = CandlePager(1000, "2025-06-27T00:00:00Z")
    assert pager.next_call() == (CANDLE_PAGE, "2025-06-27T00:00:00Z")
    pager.add([candle(i) for i in range(30)], CANDLE_PAGE)
    assert pager.next_call() is None
    assert len(pager.candles) == 30


def test_an_inclusive_boundary_keeps_each_candle_once() -> None:
    pager = CandlePager(300, None)
    pager.add([candle(i) for i in range(200)], 200)
    # Should Upbit include the boundary, the next page starts with the last one again.
    pager.add([candle(i) for i in range(199, 399)], 100)
    assert len(pager.candles) == 300
    assert len({c.candle_date_time_utc for c in pager.candles}) == 300
    assert pager.next_call() is None


def test_a_page_of_nothing_new_ends_paging() -> None:
    pager = CandlePager(400, None)
    pager.add([candle(i) for i in range(200)], 200)
    pager.add([candle(199)], 200)
    assert pager.next_call() is None


# ------------------------------------------------------------------ the gateway (fake REST)


class FakeRest(RestClient):
    """Records every REST call and answers from a script (no HTTP at all)."""

    def __init__(self) -> None:  # no session, no limiter: nothing here goes out
        self.recorded: list[tuple[str, dict[str, QueryValue], int]] = []
        self.failure: RestError | None = None

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
        self.recorded.append((path, dict(params or {}), priority))
        if self.failure is not None:
            raise self.failure
        if kind is RestCandle:
            count = int(cast(int, (params or {})["count"]))
            to = (params or {}).get("to")
            skip = 0 if to is None else self.minutes_before(str(to)) + 1
            return cast(list[T], [candle(skip + i) for i in range(count)])
        return []

    @staticmethod
    def minutes_before(to: str) -> int:
        at = datetime.fromisoformat(to)
        return int((START - at).total_seconds() // 60)


class Markets:
    """The MarketList port: loaded or not."""

    def __init__(self, loaded: bool) -> None:
        self.markets: frozenset[str] | None = MARKETS if loaded else None

    async def wait_markets(self, timeout: float) -> bool:
        return self.markets is not None


LISTED = [
    RestMarket(market=code, korean_name=code, english_name=code, market_event=RestMarketEvent())
    for code in sorted(MARKETS)
]


def gateway(rest: FakeRest, *, loaded: bool = True) -> Gateway:
    g = Gateway(rest, Markets(loaded))
    if loaded:
        g.set_markets(LISTED)
    return g


async def test_markets_come_from_the_cache_without_a_rest_call() -> None:
    rest = FakeRest()
    reply = await gateway(rest).answer(Quote(3, "markets"))
    assert isinstance(reply, QuoteReply)
    assert (reply.req, reply.markets) == (3, LISTED)
    assert rest.recorded == []


async def test_candles_are_paged_at_the_priority_of_a_waiting_client() -> None:
    rest = FakeRest()
    reply = await gateway(rest).answer(Quote(4, "candles", ["KRW-BTC"], unit="1m", count=450))
    assert isinstance(reply, QuoteReply)
    assert reply.candles == [candle(i) for i in range(450)]
    assert [params["count"] for _, params, _ in rest.recorded] == [200, 200, 50]
    assert {path for path, _, _ in rest.recorded} == {"/v1/candles/minutes/1"}
    assert {priority for _, _, priority in rest.recorded} == {PRIORITY_SNAPSHOT}
    assert PRIORITY_SNAPSHOT < PRIORITY_POLL  # above background polling


async def test_a_bad_request_makes_no_rest_call() -> None:
    rest = FakeRest()
    reply = await gateway(rest).answer(Quote(5, "trades", ["KRW-NOPE"]))
    assert isinstance(reply, ErrorReply)
    assert (reply.req, reply.code) == (5, "unknown_code")
    assert rest.recorded == []


async def test_upbit_refusing_is_an_upstream_error_with_upbits_name_and_message() -> None:
    rest = FakeRest()
    rest.failure = RestError(404, "404: Code not found")
    reply = await gateway(rest).answer(Quote(6, "tickers", ["KRW-BTC"]))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "upstream_error"
    assert "404: Code not found" in reply.message


async def test_upbit_unreachable_is_upstream_unavailable() -> None:
    rest = FakeRest()
    rest.failure = RestError(0, "GET /v1/ticker failed: ClientConnectorError")
    reply = await gateway(rest).answer(Quote(7, "tickers", ["KRW-BTC"]))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "upstream_unavailable"


async def test_without_a_market_list_nothing_is_checked_or_fetched() -> None:
    rest = FakeRest()
    reply = await gateway(rest, loaded=False).answer(Quote(8, "tickers", ["KRW-BTC"]))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "upstream_unavailable"
    assert rest.recorded == []


# ------------------------------------------------------------------ control dispatch


class HeldQuotes:
    """A quote service that answers only when released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.asked: list[Quote] = []

    async def answer(self, message: Quote) -> QuoteReply | ErrorReply:
        self.asked.append(message)
        await self.release.wait()
        return QuoteReply(message.req, message.kind)


def control_with(quotes: HeldQuotes | None) -> ControlServer:
    return control_over(FakeBroker(ClientTable()), quotes=quotes)


def hello(control: ControlServer, identity: bytes) -> None:
    ((_, reply),) = control.handle([identity, encode(Hello(client_id="x"))], 1.0)
    assert isinstance(reply, Welcome)


def refusal(control: ControlServer, identity: bytes, message: Quote) -> ErrorReply:
    ((_, reply),) = control.handle([identity, encode(message)], 1.0)
    assert isinstance(reply, ErrorReply), reply
    return reply


async def test_a_client_has_at_most_two_quotes_in_flight_and_others_are_unaffected() -> None:
    quotes = HeldQuotes()
    control = control_with(quotes)
    hello(control, b"\x00a")
    hello(control, b"\x00b")
    for req in range(QUOTES_PER_CLIENT):
        assert control.handle([b"\x00a", encode(Quote(req, "markets"))], 1.0) == []
    busy = refusal(control, b"\x00a", Quote(9, "markets"))
    assert (busy.req, busy.code) == (9, "busy")
    assert control.handle([b"\x00b", encode(Quote(1, "markets"))], 1.0) == []
    await asyncio.sleep(0)
    assert len(quotes.asked) == QUOTES_PER_CLIENT + 1
    quotes.release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    # Answered, so the client may ask again.
    assert control.handle([b"\x00a", encode(Quote(10, "markets"))], 1.0) == []


async def test_quotes_past_the_pending_bound_are_refused_busy() -> None:
    quotes = HeldQuotes()
    control = control_with(quotes)
    identities = [bytes([0, i]) for i in range(MAX_PENDING + 1)]
    for identity in identities:
        hello(control, identity)
    for identity in identities[:MAX_PENDING]:
        assert control.handle([identity, encode(Quote(1, "markets"))], 1.0) == []
    assert refusal(control, identities[-1], Quote(2, "markets")).code == "busy"
    quotes.release.set()
    await asyncio.sleep(0)


def test_a_broker_without_a_gateway_refuses_quotes() -> None:
    control = control_with(None)
    hello(control, b"\x00a")
    assert refusal(control, b"\x00a", Quote(1, "markets")).code == "unknown_type"


def test_an_unknown_kind_is_refused_bad_message_naming_the_field() -> None:
    control = control_with(HeldQuotes())
    hello(control, b"\x00a")
    raw = msgspec.msgpack.encode({"op": "quote", "req": 4, "kind": "orders"})
    ((_, reply),) = control.handle([b"\x00a", raw], 1.0)
    assert isinstance(reply, ErrorReply)
    assert (reply.req, reply.code) == (4, "bad_message")
    assert "kind" in reply.message
