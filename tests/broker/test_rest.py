"""broker.rest against a local HTTP server: errors that leak nothing, hostile bodies, URLs.

The server (``upbit``, tests/broker/conftest.py) is an in-process aiohttp app on port 0
that answers what each test scripts, and records what it was sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from broker.config import Secret, Settings
from broker.exchange import UpbitExchange
from broker.ratelimit import MAX_BAN_SECONDS
from broker.rest import ERROR_MESSAGE_LIMIT, RestClient, RestError
from schemas.rest import RestAccount, RestTicker
from tests.broker.conftest import FakeUpbit, Reply

ACCESS = "Rq7yXw2LmN4pZt8KvB1cHs5DgF9jUe3aTo6iEl0M"
SECRET = "sK3jD9fL2hG7aQ1wE5rT8yU4iO6pZ0xC2vB7nM1q"
URL_PASSWORD = "url-pa55w0rd-never-shown"


def client(rest_url: str) -> RestClient:
    settings = Settings(rest_url=rest_url, access_key=Secret(ACCESS), secret_key=Secret(SECRET))
    return RestClient(UpbitExchange(settings), max_wait=5.0)


def echo(status: int, shape: str) -> Reply:
    """An error reply that echoes the request's Authorization header, as some do."""

    def reply(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        text = f"refused {request.method} {request.path_qs}; {auth}; access_key={ACCESS}"
        if shape == "envelope":
            body = {"error": {"name": "invalid_access_key", "message": text}}
            return web.json_response(body, status=status)
        if shape == "json-dump":
            return web.json_response({"request": {"headers": dict(request.headers)}}, status=status)
        if shape == "huge":
            return web.Response(text=f"{text} " + "x" * 1_000_000, status=status)
        return web.Response(text=f"<html><pre>{text}</pre></html>", status=status)

    return reply


def assert_safe(message: str, token: str) -> None:
    assert token.removeprefix("Bearer ") not in message
    assert "eyJ" not in message
    assert ACCESS not in message
    assert SECRET not in message
    assert len(message) <= ERROR_MESSAGE_LIMIT + 40


@pytest.mark.parametrize("shape", ["envelope", "json-dump", "html", "huge"])
async def test_an_error_body_echoing_the_request_reaches_no_client(
    upbit: FakeUpbit, shape: str
) -> None:
    upbit.reply = echo(401, shape)
    rest = client(upbit.base)
    try:
        with pytest.raises(RestError) as info:
            await rest.order("9ca023a5-851b-4fec-9f0a-48cd83c2eaae")
    finally:
        await rest.close()
    token = upbit.seen[0]["Authorization"]
    assert token.startswith("Bearer eyJ")  # the request did carry a JWT...
    message = str(info.value)
    assert_safe(message, token)  # ...that the error does not
    assert info.value.status == 401
    assert message.startswith("HTTP 401: ")
    if shape == "envelope":
        assert "invalid_access_key: refused GET /v1/order" in message
        assert "access_key=***" in message
    if shape == "huge":
        assert "bytes)" in message


async def test_a_quotation_error_envelope_keeps_name_and_message(upbit: FakeUpbit) -> None:
    upbit.reply = lambda request: web.json_response(
        {"error": {"name": 404, "message": "Code not found"}}, status=404
    )
    rest = client(upbit.base)
    try:
        with pytest.raises(RestError) as info:
            await rest.tickers(["KRW-NOPE"])
    finally:
        await rest.close()
    assert str(info.value) == "HTTP 404: 404: Code not found"


DEEP = 100_000


@pytest.mark.parametrize("depth", [10_000, DEEP])
@pytest.mark.parametrize(
    "body",
    [
        lambda d: b"[" * d + b"]" * d,
        lambda d: b'{"a":' * d + b"1" + b"}" * d,
        lambda d: b'[{"market":"KRW-BTC","x":' + b"[" * d + b"]" * d + b"}]",
    ],
    ids=["arrays", "objects", "in-a-field"],
)
async def test_a_deeply_nested_body_is_a_rest_error(
    upbit: FakeUpbit, depth: int, body: Callable[[int], bytes]
) -> None:
    """One hostile REST body raised RecursionError past every handler of the broker."""
    data = body(depth)
    upbit.reply = lambda request: web.Response(body=data, content_type="application/json")
    rest = client(upbit.base)
    try:
        with pytest.raises(RestError) as listed:
            await rest.tickers(["KRW-BTC"])
        with pytest.raises(RestError) as single:
            await rest.order("u-1")
        with pytest.raises(RestError) as accounts:
            await rest.get_list("/v1/accounts", "default", RestAccount, auth=True)
    finally:
        await rest.close()
    for info in (listed, single, accounts):
        assert info.value.status == 200
        assert str(info.value).startswith("HTTP 200: unexpected body from /v1/")
        assert len(str(info.value)) <= ERROR_MESSAGE_LIMIT + 60


@pytest.mark.parametrize("status", [400, 418])
async def test_a_deeply_nested_error_body_is_a_rest_error(upbit: FakeUpbit, status: int) -> None:
    data = b'{"error":' * DEEP + b"1" + b"}" * DEEP
    upbit.reply = lambda request: web.Response(body=data, status=status)
    rest = client(upbit.base)
    try:
        with pytest.raises(RestError) as info:
            await rest.get_list("/v1/ticker", "ticker", RestTicker, {"markets": "KRW-BTC"})
    finally:
        await rest.close()
    assert info.value.status == status
    assert len(str(info.value)) <= ERROR_MESSAGE_LIMIT + 60


async def test_an_endless_418_stops_the_group_for_the_cap_only(upbit: FakeUpbit) -> None:
    upbit.reply = lambda request: web.Response(text=f"blocked for {'9' * 400} seconds", status=418)
    rest = client(upbit.base)
    try:
        with pytest.raises(RestError) as info:
            await rest.markets()
    finally:
        await rest.close()
    assert (
        str(info.value) == f"HTTP 418: Upbit blocked REST group market for {MAX_BAN_SECONDS:.0f} s"
    )
    now = time.time()
    for group in ("market", "ticker"):  # the IP's groups stop, for an hour at most
        assert now < rest.limiter.blocked_until(group, now) <= now + MAX_BAN_SECONDS


async def test_credentials_in_the_rest_url_are_dropped_and_never_logged(
    upbit: FakeUpbit,
) -> None:
    """A ``user:password@`` REST URL made every exchange call raise ValueError, which
    killed the private fallback task; the password was logged too."""
    with_credentials = upbit.base.replace("http://", f"http://svc:{URL_PASSWORD}@")
    upbit.reply = lambda request: web.json_response([])
    with capture_logs() as events:
        rest = client(with_credentials)
        try:
            assert await rest.accounts() == []
            assert await rest.open_orders() == []
            assert await rest.markets() == []
        finally:
            await rest.close()
    assert [h["Authorization"][:10] for h in upbit.seen[:2]] == ["Bearer eyJ"] * 2
    assert "Authorization" not in upbit.seen[2]  # no Basic auth from the URL either
    assert URL_PASSWORD not in json.dumps(events, default=str)
    warnings = [e for e in events if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "UPBIT_REST_URL" in warnings[0]["event"]
    assert warnings[0]["url"] == upbit.base


def dropped(request: web.Request) -> web.Response:
    """Carry the request out, then cut the connection before any byte of the answer."""
    assert request.transport is not None
    request.transport.abort()
    return web.Response(status=200)


@pytest.mark.parametrize("shape", ["fresh", "reused"])
async def test_a_call_whose_answer_is_lost_is_sent_once_and_fails(
    upbit: FakeUpbit, shape: str
) -> None:
    # aiohttp sends a GET or DELETE again by itself when the connection drops; signed
    # with the same JWT, Upbit answers the copy 401 nonce_used, which reads as rejected
    # keys, and a cancel would be sent twice. The broker decides what to retry.
    rest = client(upbit.base)
    try:
        if shape == "reused":
            await rest.accounts()  # a keep-alive connection to lose
        upbit.reply = dropped
        before = len(upbit.seen)
        with pytest.raises(RestError) as caught:
            await rest.accounts()
        assert caught.value.status == 0, caught.value
        sent = len(upbit.seen) - before  # (never print ``seen``: it holds the JWTs)
        assert sent == 1, f"the request went out {sent} times"
    finally:
        await rest.close()


async def test_a_caller_with_a_deadline_waits_no_longer_for_the_answer(upbit: FakeUpbit) -> None:
    # A placement's lookups must answer the client in time: a lookup that hangs gives
    # up at its own timeout, not the session's ten seconds.
    answered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await answered.wait()
        return web.json_response({})

    upbit.reply = slow
    rest = client(upbit.base)
    try:
        started = time.monotonic()
        with pytest.raises(RestError) as caught:
            await rest.exchange("GET", "/v1/order", "default", RestAccount, timeout=0.3)
        took = time.monotonic() - started
        assert caught.value.status == 0
        assert "TimeoutError" in str(caught.value)
        assert took < 5.0, f"waited {took:.1f} s"
    finally:
        answered.set()
        await rest.close()


async def test_a_call_with_no_time_left_is_not_sent(upbit: FakeUpbit) -> None:
    rest = client(upbit.base)
    try:
        for timeout in (0.0, -0.5):
            with pytest.raises(RestError) as caught:
                await rest.exchange("GET", "/v1/order", "default", RestAccount, timeout=timeout)
            assert not caught.value.sent
        assert upbit.seen == []
    finally:
        await rest.close()


async def test_a_429_whose_resend_finds_no_slot_says_it_was_sent(upbit: FakeUpbit) -> None:
    # The first send went out and was answered 429; the resend found no slot in time.
    # The caller must know the request did reach Upbit (an order may be looked up).
    upbit.reply = lambda request: web.Response(status=429, text="Too Many Requests")
    rest = client(upbit.base)
    try:
        with pytest.raises(RestError) as caught:
            await rest.exchange(
                "POST", "/v1/orders", "order", RestAccount, {"market": "KRW-BTC"},
                body=True, max_wait=0.3,
            )  # fmt: skip
        assert (caught.value.status, caught.value.sent, caught.value.resent) == (429, True, True)
        assert len(upbit.seen) == 1
    finally:
        await rest.close()


async def test_a_wall_clock_stepped_forward_frees_no_window(
    upbit: FakeUpbit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NTP (or a person) stepping the clock forward must not let a second burst go
    # inside the same real second: Upbit counts real time.
    arrived: list[float] = []

    def stamp(request: web.Request) -> web.Response:
        arrived.append(time.monotonic())
        return web.json_response([])

    upbit.reply = stamp
    rest = client(upbit.base)
    try:
        # Calls below order priority may take 7 of the group's 8 a second at once (one
        # is kept for an order): a burst that fills their share.
        await asyncio.gather(*(rest.tickers(["KRW-BTC"]) for _ in range(7)))
        assert rest.waits["ticker"] == 0, "the first burst did not go at once"
        stepped = time.time() + 3600.0
        monkeypatch.setattr(time, "time", lambda: stepped)
        await rest.tickers(["KRW-BTC"])
        assert rest.waits["ticker"] == 1, "the eighth went inside the first's second"
        assert arrived[7] - arrived[6] >= 0.5
    finally:
        await rest.close()


async def test_calls_that_gave_up_waiting_take_no_slot_from_later_ones(upbit: FakeUpbit) -> None:
    # A call whose slot wait timed out was told "not sent": its queued place must not
    # spend a slot of the group later, or a burst of timed-out calls shuts out the next
    # window's live ones.
    rest = client(upbit.base)
    try:
        while rest.limiter.try_acquire("order", time.time()):
            pass  # this window is spent
        gave_up = [
            rest.exchange("GET", "/v1/accounts", "order", list[RestAccount], max_wait=0.05)
            for _ in range(20)
        ]
        for result in await asyncio.gather(*gave_up, return_exceptions=True):
            assert isinstance(result, RestError), result
            assert not result.sent
        assert (
            await rest.exchange("GET", "/v1/accounts", "order", list[RestAccount], max_wait=1.5)
            == []
        )
    finally:
        await rest.close()
