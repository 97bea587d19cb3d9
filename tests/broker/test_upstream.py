"""The upstream link as a shell: frames reach its policy, the policy's requests reach the
socket, stalls are reported, and the run loop survives failures.

What to send and when is tested on a fake clock in test_request_policy.py; these tests
use a local WebSocket server and check only that the link carries it out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from broker.config import Settings
from broker.exchange import UpbitExchange
from broker.ratelimit import BanStore
from broker.subscriptions import UpstreamStream
from broker.upstream import ConnectGate, UpstreamLink
from schemas.upbit import SubscriptionList, UpbitError, UpbitMessage
from tests.support import scaled

BTC = UpstreamStream("ticker", "KRW-BTC")


class NoExchange:
    """Fails the test if the link ever tries to connect."""

    def ws_url(self, private: bool) -> str:
        raise AssertionError("the link connected although it carries nothing")

    def connect_headers(self, private: bool) -> dict[str, str]:
        raise AssertionError("the link connected although it carries nothing")


def idle_link(states: list[str], exchange: object | None = None) -> UpstreamLink:
    return UpstreamLink(
        "public",
        exchange or NoExchange(),  # type: ignore[arg-type]
        ConnectGate(BanStore()),
        on_frame=lambda frame, now: None,
        on_status=lambda name, state, detail: states.append(state),
    )


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# ---------------------------------------------------------------------------- run loop


@pytest.mark.timeout(10, method="signal")  # a spinning loop never yields: only a signal ends it
async def test_a_subscribe_undone_before_the_link_runs_leaves_it_waiting_not_spinning() -> None:
    states: list[str] = []
    link = idle_link(states)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.sleep(0.01)  # the link waits for streams
        link.set_streams(frozenset({BTC}))
        link.set_streams(frozenset())  # released before the link task ran again
        for _ in range(100):  # the loop must keep turning: the link has to wait again
            await asyncio.sleep(0)
        assert not task.done()
        assert link.stats.state == "idle"
        assert link.stats.connects == 0
    finally:
        await stop(task)


class ReleasingExchange(NoExchange):
    """Counts connect attempts; each one releases every stream, then fails."""

    def __init__(self) -> None:
        self.attempts = 0
        self.link: UpstreamLink | None = None

    def ws_url(self, private: bool) -> str:
        return "ws://127.0.0.1:9/websocket/v1"

    def connect_headers(self, private: bool) -> dict[str, str]:
        self.attempts += 1
        assert self.link is not None
        self.link.set_streams(frozenset())  # nothing to carry any more: back to idle
        raise RuntimeError("no connection in this test")


async def test_streams_wake_an_idle_link_and_releasing_them_idles_it_again() -> None:
    states: list[str] = []
    exchange = ReleasingExchange()
    link = exchange.link = idle_link(states, exchange)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.sleep(0)  # the link waits for streams
        assert states == []
        link.set_streams(frozenset({BTC}))
        await until(lambda: exchange.attempts == 1, "a connect attempt")
        await until(lambda: states[-1:] == ["idle"], "the link to idle again", timeout=3)
        assert states == ["connecting", "idle"]
        assert exchange.attempts == 1
    finally:
        await stop(task)


class ExplodingExchange(NoExchange):
    """Its headers cannot be built (a bug, or a library refusing them)."""

    def __init__(self) -> None:
        self.calls = 0

    def ws_url(self, private: bool) -> str:
        return "ws://127.0.0.1:9/websocket/v1"

    def connect_headers(self, private: bool) -> dict[str, str]:
        self.calls += 1
        raise RuntimeError("cannot sign")


async def test_a_crashing_connect_attempt_is_retried_not_fatal() -> None:
    exchange = ExplodingExchange()
    link = idle_link([], exchange)
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({BTC}))
        await until(lambda: exchange.calls >= 2, "a second attempt", timeout=3)
        assert not task.done()
    finally:
        await stop(task)


# ---------------------------------------------------------------------------- a server


def codes_of(request: str) -> list[str]:
    """The codes an Upbit request subscribes, sorted."""
    return sorted(code for obj in json.loads(request) for code in obj.get("codes", []))


class Upstream:
    """A local WebSocket server recording each text frame; ``answer`` may reply to one.

    Like Upbit, it answers the text ``PING`` with ``{"status":"UP"}`` (counted in
    ``pings``, not recorded). Connections numbered in ``stalls`` (from 1) answer only
    their first ping frame: they come up, then stall. Connection ``n`` in ``mute``
    answers only its first ``mute[n]`` PINGs, and pongs all along: its application
    stalls behind a live network layer.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.received: list[str] = []
        self.answer: Callable[[str], str | None] = lambda text: None
        self.stalls: set[int] = set()
        self.mute: dict[int, int] = {}
        self.pings = 0
        self.url = ""

    @property
    def requests(self) -> list[list[str]]:
        return [codes_of(t) for t in self.received if "LIST_SUBSCRIPTIONS" not in t]

    @property
    def listings_asked(self) -> int:
        return sum(1 for text in self.received if "LIST_SUBSCRIPTIONS" in text)

    async def upgrade(self, request: web.Request) -> web.StreamResponse:
        self.connections += 1
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        stalls = self.connections in self.stalls
        answers_left = self.mute.get(self.connections, -1)
        pongs = 0
        async for msg in ws:
            if msg.type is WSMsgType.PING and not (stalls and pongs):
                await ws.pong(msg.data)
                pongs += 1
            elif msg.type is WSMsgType.TEXT and msg.data == "PING":
                if answers_left != 0:
                    answers_left -= 1
                    self.pings += 1
                    await ws.send_bytes(b'{"status":"UP"}')
            elif msg.type is WSMsgType.TEXT:
                self.received.append(msg.data)
                reply = self.answer(msg.data)
                if reply is not None:
                    await ws.send_str(reply)
        return ws


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    app = web.Application()
    app.router.add_get("/ws", server.upgrade)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"ws://127.0.0.1:{port}/ws"
    try:
        yield server
    finally:
        await runner.cleanup()


class FlakyExchange(UpbitExchange):
    """Upbit's requests and frames; building the first request may fail (a bug)."""

    def __init__(self, url: str, *, fail_first: bool = False) -> None:
        super().__init__(dataclasses.replace(Settings(), ws_url=url))
        self.fail_first = fail_first
        self.built = 0

    def subscription_message(
        self, streams: Sequence[UpstreamStream], new: Collection[UpstreamStream]
    ) -> str:
        self.built += 1
        if self.fail_first and self.built == 1:
            raise RuntimeError("request builder bug")
        return super().subscription_message(streams, new)


class Reports:
    """What a link tells its owner."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.details: list[str] = []
        self.carried: list[frozenset[UpstreamStream]] = []
        self.rejected: list[tuple[frozenset[UpstreamStream], str]] = []


def served_link(
    server: Upstream, reports: Reports, *, fail_first: bool = False, **kwargs: Any
) -> UpstreamLink:
    exchange = FlakyExchange(server.url, fail_first=fail_first)

    def control(frame: bytes | str, now: int) -> list[UpbitMessage]:
        # What the router hands back: the frames that are not data.
        messages = exchange.decode(frame)
        return [m for m in messages if isinstance(m, UpbitError | SubscriptionList)]

    def status(name: str, state: str, detail: str) -> None:
        reports.states.append(state)
        reports.details.append(detail)

    return UpstreamLink(
        "public",
        exchange,
        ConnectGate(BanStore()),
        on_frame=control,
        on_status=status,
        on_carried=reports.carried.append,
        on_rejected=lambda streams, reason: reports.rejected.append((streams, reason)),
        coalesce=0.0,
        **kwargs,
    )


def error_frame(name: str, message: str) -> str:
    return json.dumps({"error": {"name": name, "message": message}})


def listing_frame(codes: list[str]) -> str:
    result = [{"type": "ticker", "codes": codes}]
    return json.dumps({"method": "LIST_SUBSCRIPTIONS", "result": result, "ticket": "t"})


# ---------------------------------------------------------------------------- requests


async def test_wanted_streams_reach_the_socket_and_are_reported_carried(
    upstream: Upstream,
) -> None:
    reports = Reports()
    link = served_link(upstream, reports)
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({BTC}))
        await until(lambda: upstream.requests == [["KRW-BTC"]], "the request")
        await until(lambda: reports.carried == [frozenset({BTC})], "the carried streams")
        assert link.carried == {BTC}
        assert reports.states == ["connecting", "up"]
        assert link.stats.requests_sent == 1
        assert link.requests_left(time.monotonic()) == 89
    finally:
        await stop(task)


async def test_a_failing_request_builder_drops_the_connection_and_the_next_one_subscribes(
    upstream: Upstream,
) -> None:
    reports = Reports()
    link = served_link(upstream, reports, fail_first=True)
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({BTC}))
        await until(lambda: upstream.requests, "a request after the failed one", timeout=5)
        assert upstream.connections == 2
        assert link.stats.reconnects == 1
        assert not task.done()
    finally:
        await stop(task)


MARKETS = [f"KRW-C{i:02d}" for i in range(40)]


async def test_markets_and_widened_types_reach_the_policy_and_a_refusal_reaches_it_back(
    upstream: Upstream,
) -> None:
    reports = Reports()
    # Only the minute window: the ten requests go out at once (the burst).
    link = served_link(upstream, reports, widen_types={"ticker"}, message_limits=[(90, 60.0)])
    link.set_markets(MARKETS)
    refused = False

    def refuse_the_widened_request(text: str) -> str | None:
        nonlocal refused
        if text.startswith("[") and len(codes_of(text)) == len(MARKETS) and not refused:
            refused = True
            return error_frame("INVALID_PARAM", "too many codes")
        return None

    upstream.answer = refuse_the_widened_request
    task = asyncio.create_task(link.run())
    try:
        for i in range(10):
            link.set_streams(frozenset(UpstreamStream("ticker", c) for c in MARKETS[: i + 1]))
            await until(lambda: len(upstream.requests) > i, f"request {i + 1}")  # noqa: B023
        assert upstream.requests[-1] == MARKETS, "the tenth request was not widened"
        # Upbit's error frame reaches the policy: the same streams go again, plainly.
        await until(lambda: len(upstream.requests) == 11, "the plain request")
        assert upstream.requests[-1] == MARKETS[:10]
        # Only its widening was refused, which is nobody's stream: no owner is told.
        assert reports.rejected == []
        await until(lambda: len(reports.carried) == 12, "carried streams reported")
        assert reports.carried[-3:] == [
            frozenset(UpstreamStream("ticker", c) for c in MARKETS),
            frozenset(UpstreamStream("ticker", c) for c in MARKETS[:9]),
            frozenset(UpstreamStream("ticker", c) for c in MARKETS[:10]),
        ]
        assert link.stats.upstream_errors == 1
    finally:
        await stop(task)


async def test_a_listing_that_differs_makes_the_link_send_the_request_again(
    upstream: Upstream,
) -> None:
    reports = Reports()
    link = served_link(upstream, reports, verify_interval=0.1)
    upstream.answer = lambda text: (
        listing_frame(["KRW-ETH"]) if "LIST_SUBSCRIPTIONS" in text else None
    )
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({BTC}))
        await until(lambda: len(upstream.requests) >= 2, "the request sent again")
        assert upstream.listings_asked >= 1
        assert upstream.requests[:2] == [["KRW-BTC"], ["KRW-BTC"]]
        assert link.stats.mismatches >= 1
        assert link.stats.verifications >= 1
        assert upstream.connections == 1
    finally:
        await stop(task)


async def test_a_link_left_with_no_streams_closes_its_connection_after_the_idle_time(
    upstream: Upstream,
) -> None:
    reports = Reports()
    link = served_link(upstream, reports, idle_close=0.2)
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({BTC}))
        await until(lambda: upstream.requests, "the request")
        link.set_streams(frozenset())
        await until(lambda: link.stats.state == "idle", "the link to close and idle")
        assert reports.states == ["connecting", "up", "idle"]
        assert reports.carried[-1] == frozenset()
        assert upstream.connections == 1
    finally:
        await stop(task)


# ---------------------------------------------------------------------------- stalls


async def test_a_stalled_connection_is_reported_stale_then_dropped_and_restored(
    upstream: Upstream,
) -> None:
    reports = Reports()
    link = served_link(upstream, reports, keepalive=0.2)
    upstream.stalls = {1}
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({BTC}))
        await until(lambda: "reconnecting" in reports.states, "a reconnect", timeout=5)
        assert reports.states[:5] == ["connecting", "up", "stale", "down", "reconnecting"]
        assert "ping" in reports.details[2]
        await until(lambda: "restored" in reports.states, "the link restored", timeout=5)
        await until(lambda: len(upstream.requests) == 2, "every stream requested again")
        assert upstream.requests == [["KRW-BTC"], ["KRW-BTC"]]
    finally:
        await stop(task)


async def test_a_connection_whose_application_stops_answering_is_reported_stale_and_restored(
    upstream: Upstream,
) -> None:
    reports = Reports()
    link = served_link(upstream, reports, keepalive=0.2)
    upstream.mute = {1: 1}  # answers the PING that brings it up, then only pongs
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({BTC}))
        await until(lambda: "restored" in reports.states, "the link restored", timeout=5)
        assert reports.states[:5] == ["connecting", "up", "stale", "down", "reconnecting"]
        assert "no data and no answer to PING" in reports.details[2]
        await until(lambda: len(upstream.requests) == 2, "every stream requested again")
        assert upstream.requests == [["KRW-BTC"], ["KRW-BTC"]]
    finally:
        await stop(task)


async def test_a_connection_whose_application_never_answers_is_never_reported_up(
    upstream: Upstream,
) -> None:
    reports = Reports()
    link = served_link(upstream, reports, keepalive=0.2)
    upstream.mute = {1: 0}  # pongs, but no answer to PING at all
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({BTC}))
        await until(lambda: "up" in reports.states, "the second connection up", timeout=5)
        # Never up before, so the second attempt is a first connect, not a reconnect.
        assert reports.states == ["connecting", "down", "connecting", "up"]
        assert upstream.connections == 2
        await until(lambda: upstream.requests, "the request, on the second connection")
    finally:
        await stop(task)


async def test_a_quiet_connection_that_answers_ping_stays_up(upstream: Upstream) -> None:
    reports = Reports()
    # No data ever comes (the server sends none): only UP answers show it is alive.
    link = served_link(upstream, reports, keepalive=0.2)
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({BTC}))
        # Twenty PINGs, one per 0.3 s of silence: ~6 s, ten times the 0.6 s stall bound.
        await until(lambda: upstream.pings >= 20, "PINGs on the quiet connection", timeout=15)
        assert reports.states == ["connecting", "up"]
        assert upstream.connections == 1
        assert upstream.requests == [["KRW-BTC"]]
    finally:
        await stop(task)
