"""The upstream link's run loop, without any server: what it does with no streams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from broker import upstream
from broker.ratelimit import BanStore
from broker.subscriptions import UpstreamStream, widen_request
from broker.upstream import MAX_LINGERING, ConnectGate, UpstreamLink


class NoExchange:
    """Fails the test if the link ever tries to connect."""

    def ws_url(self, private: bool) -> str:
        raise AssertionError("the link connected although it carries nothing")

    def connect_headers(self, private: bool) -> dict[str, str]:
        raise AssertionError("the link connected although it carries nothing")


def idle_link(states: list[str]) -> UpstreamLink:
    return UpstreamLink(
        "public",
        NoExchange(),  # type: ignore[arg-type]
        ConnectGate(BanStore()),
        on_frame=lambda frame, now: None,
        on_status=lambda name, state, detail: states.append(state),
    )


@pytest.mark.timeout(10, method="signal")  # a spinning loop never yields: only a signal ends it
async def test_a_subscribe_undone_before_the_link_runs_leaves_it_waiting_not_spinning() -> None:
    states: list[str] = []
    link = idle_link(states)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.sleep(0.01)  # the link waits for streams
        link.set_streams(frozenset({UpstreamStream("ticker", "KRW-BTC")}))
        link.set_streams(frozenset())  # released before the link task ran again
        for _ in range(100):  # the loop must keep turning: the link has to wait again
            await asyncio.sleep(0)
        assert not task.done()
        assert link.stats.state == "idle"
        assert link.stats.connects == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_streams_wake_an_idle_link(monkeypatch: pytest.MonkeyPatch) -> None:
    states: list[str] = []
    link = idle_link(states)
    attempts: list[Any] = []

    async def no_connect(client: Any) -> None:
        attempts.append(client)
        link.set_streams(frozenset())  # nothing to carry any more: back to idle

    monkeypatch.setattr(link, "_connect", no_connect)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.sleep(0.01)
        link.set_streams(frozenset({UpstreamStream("ticker", "KRW-BTC")}))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if attempts:
                break
        assert len(attempts) == 1
        assert states[:1] == ["connecting"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


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
    link = UpstreamLink(
        "public",
        exchange,  # type: ignore[arg-type]
        ConnectGate(BanStore()),
        on_frame=lambda frame, now: None,
        on_status=lambda name, state, detail: None,
    )
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({UpstreamStream("ticker", "KRW-BTC")}))
        for _ in range(300):  # first retry within ~0.2 s (backoff), deadline 3 s
            await asyncio.sleep(0.01)
            if exchange.calls >= 2:
                break
        assert exchange.calls >= 2
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_widening_waits_for_scarcity_and_stops_after_upbit_refuses_a_widened_request() -> None:
    btc = UpstreamStream("ticker", "KRW-BTC")
    sibling = UpstreamStream("ticker", "KRW-ETH")
    limits: list[int] = []

    def widen(
        target: frozenset[UpstreamStream], sent: frozenset[UpstreamStream] | None, limit: int
    ) -> frozenset[UpstreamStream]:
        limits.append(limit)
        return target | {sibling}

    link = UpstreamLink(
        "public",
        NoExchange(),  # type: ignore[arg-type]
        ConnectGate(BanStore()),
        on_frame=lambda frame, now: None,
        on_status=lambda name, state, detail: None,
        message_limits=[(90, 60.0)],
        widen=widen,
    )
    wanted = frozenset({btc})
    assert link._target(wanted) == wanted, "widened with the budget untouched"
    now = time.monotonic()
    for _ in range(8):
        assert link._limiter.try_acquire(now)
    assert link._target(wanted) == wanted, "the ninth request was widened"
    assert link._limiter.try_acquire(now)
    assert link._target(wanted) == {btc, sibling}, "the tenth request was not widened"
    assert limits == [MAX_LINGERING]

    # Upbit answers the widened request with an error: widening is off from then on.
    link._set_sent(frozenset({btc, sibling}))
    link._widened = frozenset({sibling})
    link._sent_at = time.monotonic()
    link.on_upstream_error("INVALID_PARAM", "too many codes")
    assert link.carried == frozenset()
    assert link._target(wanted) == wanted


class Recorder:
    """A local WebSocket server that records every text frame it receives."""

    def __init__(self) -> None:
        self.connections = 0
        self.received: list[str] = []
        self.url = ""

    async def upgrade(self, request: web.Request) -> web.StreamResponse:
        self.connections += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                self.received.append(msg.data)
        return ws


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    app = web.Application()
    app.router.add_get("/ws", rec.upgrade)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"ws://127.0.0.1:{port}/ws"
    try:
        yield rec
    finally:
        await runner.cleanup()


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class CodesExchange(NoExchange):
    """Requests are the JSON list of their codes; the first one may fail to build."""

    def __init__(self, url: str, *, fail_first: bool = False) -> None:
        self.url = url
        self.fail_first = fail_first
        self.built = 0

    def ws_url(self, private: bool) -> str:
        return self.url

    def connect_headers(self, private: bool) -> dict[str, str]:
        return {}

    def subscription_message(self, streams: Any, new: Any) -> str:
        self.built += 1
        if self.fail_first and self.built == 1:
            raise RuntimeError("request builder bug")
        return json.dumps([s.code for s in streams])

    def list_subscriptions_message(self) -> str:
        return "LIST"


async def test_a_failing_sender_drops_the_connection_and_the_next_one_subscribes(
    recorder: Recorder,
) -> None:
    link = UpstreamLink(
        "public",
        CodesExchange(recorder.url, fail_first=True),  # type: ignore[arg-type]
        ConnectGate(BanStore()),
        on_frame=lambda frame, now: None,
        on_status=lambda name, state, detail: None,
        coalesce=0.0,
    )
    task = asyncio.create_task(link.run())
    try:
        link.set_streams(frozenset({UpstreamStream("ticker", "KRW-BTC")}))
        await until(lambda: recorder.received, "a request after the failed one", timeout=5)
        assert recorder.connections == 2
        assert link.stats.reconnects == 1
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


MARKETS = [f"KRW-C{i:02d}" for i in range(40)]


def widening_link(url: str, window: float) -> UpstreamLink:
    return UpstreamLink(
        "public",
        CodesExchange(url),  # type: ignore[arg-type]
        ConnectGate(BanStore()),
        on_frame=lambda frame, now: None,
        on_status=lambda name, state, detail: None,
        coalesce=0.0,
        message_limits=[(90, window)],
        verify_interval=1000,
        widen=lambda target, sent, limit: widen_request(
            target, sent, markets=MARKETS, types={"ticker"}, limit=limit
        ),
    )


async def ten_requests(link: UpstreamLink, recorder: Recorder) -> set[UpstreamStream]:
    """One request per new code, ten of them; returns what is wanted."""
    wanted: set[UpstreamStream] = set()
    for i in range(10):
        wanted.add(UpstreamStream("ticker", MARKETS[i]))
        link.set_streams(frozenset(wanted))
        await until(lambda: len(recorder.received) > i, f"request {i + 1}")  # noqa: B023
    return wanted


async def test_the_tenth_request_widens_and_the_request_narrows_once_the_budget_recovers(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream, "REMOVAL_RETRY", 0.1)
    # Budget windows of 3 s instead of 60 s: it recovers while the test waits.
    link = widening_link(recorder.url, 3.0)
    task = asyncio.create_task(link.run())
    try:
        wanted = await ten_requests(link, recorder)
        sizes = [len(json.loads(r)) for r in recorder.received]
        assert sizes == [1, 2, 3, 4, 5, 6, 7, 8, 9, len(MARKETS)]
        await until(lambda: link.carried == wanted, "the request to narrow back", timeout=15)
        assert json.loads(recorder.received[-1]) == sorted(str(s.code) for s in wanted)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_refused_widened_request_is_sent_again_plainly(recorder: Recorder) -> None:
    link = widening_link(recorder.url, 60.0)
    task = asyncio.create_task(link.run())
    try:
        wanted = await ten_requests(link, recorder)
        assert len(json.loads(recorder.received[-1])) == len(MARKETS)
        # What the reader does with Upbit's answer to it:
        link.on_upstream_error("INVALID_PARAM", "too many codes")
        await until(lambda: len(recorder.received) == 11, "the plain request")
        assert json.loads(recorder.received[-1]) == sorted(str(s.code) for s in wanted)
        assert link.carried == wanted
        # Plain from then on, on this connection, although requests are still scarce.
        wanted.add(UpstreamStream("ticker", MARKETS[10]))
        link.set_streams(frozenset(wanted))
        await until(lambda: len(recorder.received) == 12, "the next request")
        assert link.carried == wanted
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
