"""The simulator process: an aiohttp app for HTTP and a ``websockets`` server for WS.

- REST under ``/v1/...`` (quotation: :mod:`simulator.rest_public`; exchange:
  :mod:`simulator.rest_private`), every ``/v1`` response passing through
  :func:`rest_middleware` (group limits, ``Remaining-Req``, injected REST failures);
- control API under ``/_sim`` (:mod:`simulator.control`), on the same port as REST;
- public WebSocket ``/websocket/v1`` and private ``/websocket/v1/private`` on a port of
  their own (``websockets`` cannot share aiohttp's listening socket): protocol in
  :mod:`simulator.ws`, server in :mod:`simulator.ws_server`.

:class:`Simulator` owns the state; a central ticker task advances the markets and fans
events out. :func:`start_simulator` runs it in-process (tests) and returns a
:class:`RunningSimulator` with the URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from websockets.asyncio.server import Server

from simulator.account import Account
from simulator.auth import AuthError, JwtVerifier, unverified_access_key
from simulator.config import SimConfig
from simulator.control import Faults, Stats, add_control_routes
from simulator.demo import run_demo_orders
from simulator.limits import (
    QUOTATION_GROUPS,
    Escalation,
    KeyedThrottles,
    RestLimiter,
    rest_group,
    too_many_text,
)
from simulator.market import Exchange, MarketEvent
from simulator.rest_private import add_private_routes
from simulator.rest_public import add_public_routes
from simulator.ws import PRIVATE_PATH, PUBLIC_PATH, Hub
from simulator.ws_server import serve_ws

__all__ = ["RunningSimulator", "Simulator", "build_app", "rest_middleware", "start_simulator"]

log = structlog.get_logger("simulator")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SIM_KEY: web.AppKey[Simulator] = web.AppKey("sim")


class Simulator:
    """All simulator state: markets, connections, limits, faults, counters, account."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.exchange = Exchange(
            seed=config.seed,
            rate=config.rate,
            trade_ratio=config.trade_ratio,
            backfill_trades=config.backfill_trades,
            rest_activation_seconds=config.rest_activation_seconds,
        )
        self.escalation = Escalation(
            teapot_after=config.teapot_after,
            teapot_window=config.teapot_window,
            block_base=config.block_base,
            block_growth=config.block_growth,
            block_max=config.block_max,
            block_reset=config.block_reset,
        )
        self.upgrade_limiter = KeyedThrottles(
            [(config.upgrade_limit, config.upgrade_window)],
            self.escalation,
            enabled=config.limits_enabled,
        )
        self.rest_limiter = RestLimiter(
            config.rest_limits, self.escalation, enabled=config.limits_enabled
        )
        self.faults = Faults()
        self.stats = Stats()
        self.hub = Hub(self)
        self.firehose = config.firehose
        self.firehose_rate = 0.0
        """Messages/s per connection the firehose is held to (0: as fast as sockets drain)."""
        self.urls: dict[str, Any] = {}
        self.verifier = JwtVerifier(config.access_key, config.secret_key)
        self.account = Account(balances=config.balances)
        self.account.add_listener(self.hub.publish_account)
        self.private_routes = True
        self._wake = asyncio.Event()
        self._ticker_task: asyncio.Task[None] | None = None
        self._demo_task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._ticker_task = asyncio.create_task(self._ticker(), name="sim-ticker")
        cfg = self.config
        if cfg.demo_orders:
            demo = run_demo_orders(self, cfg.demo_market, cfg.demo_interval, cfg.seed)
            self._demo_task = asyncio.create_task(demo, name="sim-demo-orders")

    async def stop(self) -> None:
        """Close every WebSocket (going away), then stop the ticker."""
        conns = list(self.hub.connections.values())
        if conns:
            closes = [asyncio.create_task(c.close(1001, "shutdown")) for c in conns]
            _done, pending = await asyncio.wait(closes, timeout=1.0)
            for task in pending:
                task.cancel()
            for conn in conns:
                conn.abort()
        for background in (self._demo_task, self._ticker_task):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background

    async def _ticker(self) -> None:
        """Advance the markets and fan their events out, sleeping until the next is due."""
        while True:
            now = time.time()
            try:
                events = self.exchange.advance(now)
                self._dispatch(events)
            except Exception:  # pragma: no cover - a bug here must not stop the market
                log.exception("ticker_failed")
            due = self.exchange.next_due()
            delay = min(max(due - time.time(), 0.001), 0.5)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _dispatch(self, events: list[MarketEvent]) -> None:
        hub = self.hub
        with_orders = self.account.markets_with_open_orders()
        for event in events:
            hub.publish(event)
            if event.type == "orderbook" and event.code in with_orders:
                state = self.exchange.state(event.code, time.time())
                asks, bids = state.book_floats()
                self.account.on_book(event.code, asks, bids)

    def wake_ticker(self) -> None:
        self._wake.set()

    # -- helpers used by the endpoints -----------------------------------------------------

    def verify_ws(self, authorization: str | None) -> tuple[str, str] | None:
        """None when the private upgrade's JWT is good, else (Upbit name, message)."""
        try:
            self.verifier.verify(authorization, None, check_nonce=self.config.ws_check_nonce)
        except AuthError as exc:
            return exc.name, exc.message
        return None

    def books(
        self, code: str
    ) -> tuple[list[tuple[float, float]], list[tuple[float, float]]] | None:
        """The current book of ``code`` for the account; keeps that market moving."""
        if not self.exchange.known(code):
            return None
        state = self.exchange.pin(code, time.time())
        self.wake_ticker()
        return state.book_floats()

    def stall_remaining(self, path: str) -> float:
        return self.faults.stall_remaining(path, time.time())

    async def wait_unstalled(self, path: str) -> None:
        """Return once no stall covers ``path`` (immediately when none does)."""
        while True:
            remaining = self.faults.stall_remaining(path, time.time())
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, 0.05))

    def set_rate(self, per_second: float) -> None:
        self.exchange.set_rate(per_second, time.time())
        self.wake_ticker()

    def set_firehose(self, on: bool, rate: float | None = None) -> None:
        """Switch the firehose; ``rate`` caps it per connection (0 lifts the cap)."""
        self.firehose = on
        if rate is not None:
            self.firehose_rate = rate
        self.hub.wake_all()

    def reset(self) -> None:
        """Clear faults, limits, counters, request logs and the account (not the sockets)."""
        now = time.time()
        self.faults.clear()
        self.stats = Stats()
        self.upgrade_limiter.reset()
        self.rest_limiter.reset()
        for conn in self.hub.connections.values():
            conn.requests.clear()
            conn.pings = 0
            if conn.throttle is not None:
                conn.throttle = type(conn.throttle)(self.config.ws_message_limits, self.escalation)
        self.hub.closed.clear()
        self.account.reset()
        self.exchange.reset(now)
        self.exchange.set_rate(self.config.rate, now)
        self.firehose = self.config.firehose
        self.firehose_rate = 0.0
        self.hub.wake_all()
        self.wake_ticker()


def too_many_response(status: int, block_seconds: float) -> web.Response:
    """Upbit-style throttling answer: plain text, 429 or 418 with the block time."""
    return web.Response(
        status=status, text=too_many_text(status, block_seconds), content_type="text/plain"
    )


def _remote_ip(request: web.Request) -> str:
    return request.remote or "unknown"


@web.middleware
async def rest_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Apply Upbit's REST group limits, ``Remaining-Req`` and injected failures to /v1
    (``rest_fail`` before the handler; ``rest_drop`` after it, in place of the reply)."""
    path = request.path
    if not path.startswith("/v1/"):
        return await handler(request)
    sim = request.app[SIM_KEY]
    group = rest_group(request.method, path)
    now = time.time()
    if group in QUOTATION_GROUPS:
        key = f"ip:{_remote_ip(request)}"
    else:
        access_key = unverified_access_key(request.headers.get("Authorization"))
        key = f"key:{access_key}" if access_key else f"ip:{_remote_ip(request)}"
    failing = sim.faults.rest_fail_status(now)
    if failing is not None:
        sim.stats.rest_count(group, "failed")
        if failing == 429:
            resp = too_many_response(429, 0)
        else:
            name: int | str = failing if group in QUOTATION_GROUPS else "server_error"
            resp = web.json_response(
                {"error": {"name": name, "message": "Internal Server Error"}}, status=failing
            )
        resp.headers["Remaining-Req"] = f"group={group}; min=1800; sec=0"
        return resp
    decision = sim.rest_limiter.check(group, key, now)
    header = RestLimiter.header(group, decision)
    if not decision.allowed:
        sim.stats.rest_count(group, str(decision.status))
        resp = too_many_response(decision.status, decision.block_seconds)
        resp.headers["Remaining-Req"] = header
        return resp
    sim.stats.rest_count(group, "ok")
    drop = sim.faults.take_rest_drop(request.method, path)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["Remaining-Req"] = header
        raise
    finally:
        if drop:  # carried out, whatever the outcome; only the reply is lost
            _reset_connection(request, sim)
    response.headers["Remaining-Req"] = header
    return response


def _reset_connection(request: web.Request, sim: Simulator) -> None:
    """Lose the reply to a request that was carried out: reset the TCP connection (RST,
    not FIN, so no client takes it for a keep-alive close), before any byte is written.
    aiohttp then fails to write the response and moves on."""
    sim.stats.rest_dropped += 1
    transport = request.transport
    if transport is None:  # pragma: no cover - the client is already gone
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def build_app(sim: Simulator) -> web.Application:
    """The aiohttp application serving REST and the control API (not the WebSockets)."""
    app = web.Application(middlewares=[rest_middleware])
    app[SIM_KEY] = sim

    async def elsewhere(request: web.Request) -> web.Response:
        ws = sim.urls.get("ws_private" if request.path == PRIVATE_PATH else "ws", "")
        return web.Response(status=404, text=f"WebSocket endpoints have a port of their own: {ws}")

    app.router.add_get(PUBLIC_PATH, elsewhere)
    app.router.add_get(PRIVATE_PATH, elsewhere)
    add_public_routes(app, sim)
    add_private_routes(
        app,
        account=sim.account,
        verifier=sim.verifier,
        books=sim.books,
        known=sim.exchange.known,
    )
    add_control_routes(app, sim)
    return app


@dataclasses.dataclass
class RunningSimulator:
    """A simulator serving in this event loop; ``urls`` has rest, ws, ws_private, control.

    ``port`` serves REST and the control API, ``ws_port`` both WebSocket endpoints.
    """

    sim: Simulator
    runner: web.AppRunner
    ws_server: Server
    urls: dict[str, Any]
    host: str
    port: int
    ws_port: int

    async def close(self) -> None:
        await self.sim.stop()
        self.ws_server.close()
        await self.ws_server.wait_closed()
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _urls(host: str, port: int, ws_port: int) -> dict[str, Any]:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    if ":" in shown:
        shown = f"[{shown}]"
    base, ws_base = f"{shown}:{port}", f"{shown}:{ws_port}"
    return {
        "rest": f"http://{base}",
        "ws": f"ws://{ws_base}{PUBLIC_PATH}",
        "ws_private": f"ws://{ws_base}{PRIVATE_PATH}",
        "control": f"http://{base}/_sim",
        "pid": os.getpid(),
    }


async def start_simulator(config: SimConfig | None = None, **overrides: Any) -> RunningSimulator:
    """Start a simulator in the running loop (``overrides`` replace config fields)."""
    cfg = dataclasses.replace(config or SimConfig(), **overrides)
    sim = Simulator(cfg)
    app = build_app(sim)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        ws_server = await serve_ws(sim, cfg.host, cfg.ws_port_for(port))
    except BaseException:
        await runner.cleanup()
        raise
    ws_port = int(ws_server.sockets[0].getsockname()[1])
    sim.urls = _urls(cfg.host, port, ws_port)
    sim.start()
    log.info("simulator_started", **{k: v for k, v in sim.urls.items() if k != "pid"})
    return RunningSimulator(sim, runner, ws_server, sim.urls, cfg.host, port, ws_port)
