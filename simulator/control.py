"""The control API under ``/_sim`` (JSON), with the fault state and counters it drives.

Tests and benchmarks use it to look inside the simulator and to inject failures:

- ``GET  /_sim``                  base URLs and the effective settings
- ``GET  /_sim/connections``      open WebSocket connections (``?closed=1`` adds recently
  closed ones): id, path, remote, format, last accepted request, every request received
  (timestamp, text, accepted or error name), counters
- ``GET  /_sim/stats``            counters: upgrades, WS requests, REST requests per group
- ``GET  /_sim/markets``          the market list with materialized/active flags
- ``POST /_sim/drop``             ``{"path"?}`` abort WS connections: no close frame (1006)
- ``POST /_sim/stall``            ``{"seconds", "path"?, "kind"?}`` for N seconds, sockets
  open; 0 ends a stall. ``kind: "link"`` (default): send nothing, answer no PING and no
  ping frame (a dead path). ``kind: "app"``: ping frames still get pongs (the network
  layer lives) but no data, no ``{"status":"UP"}`` and requests are ignored (the
  exchange's application stalled)
- ``POST /_sim/refuse_upgrades``  ``{"seconds", "status": 429|418}``
- ``POST /_sim/rest_fail``        ``{"seconds", "status": 500|429}`` for every /v1 route
- ``POST /_sim/rest_drop``        ``{"path", "method"?: "POST", "count"?: 1}`` lose replies:
  the next ``count`` requests with that method and exact ``/v1`` path that pass the rate
  limits are carried out (the order placed, the cancel done), then the connection is reset
  with no response. Counts per method+path; a new call replaces that count, 0 removes it
- ``POST /_sim/rate``             ``{"per_second"?: X, "firehose"?: bool, "firehose_rate"?: X}``
  (``firehose_rate``: messages/s per connection the firehose is held to; 0 = unlimited)
- ``POST /_sim/reset``            clear faults (rest_drop included), limits, counters,
  request logs, account
- ``POST /_sim/orders``           registered by ``simulator.rest_private`` (no JWT)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from aiohttp import web

if TYPE_CHECKING:
    from simulator.app import Simulator

__all__ = ["STALL_KINDS", "Faults", "StallKind", "Stats", "add_control_routes"]

StallKind = Literal["link", "app"]
STALL_KINDS: dict[object, StallKind] = {"link": "link", "app": "app"}
"""``link``: a dead path (no pongs either); ``app``: pongs, but no application answers."""

UPGRADE_LOG_MAX = 2_000
"""Upgrade attempts remembered for /_sim/stats (tests count them per second)."""


class Faults:
    """Injected failures, each with an end time (pure: callers pass ``now``)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """No faults."""
        self._stall: dict[str | None, float] = {}
        self._app_stall: dict[str | None, float] = {}
        self._refuse_until = 0.0
        self._refuse_status = 429
        self._rest_fail_until = 0.0
        self._rest_fail_status = 500
        self._rest_drop: dict[tuple[str, str], int] = {}

    def stall(
        self, seconds: float, now: float, path: str | None = None, kind: StallKind = "link"
    ) -> float:
        """Stall ``path`` (every path when None) for ``seconds``; 0 ends that stall.

        ``kind="link"``: nothing at all comes back, pongs included. ``kind="app"``: pongs
        still come (a proxy or the WebSocket library answers them), nothing else does.
        """
        stalls = self._stall if kind == "link" else self._app_stall
        until = now + max(0.0, seconds)
        if seconds <= 0:
            stalls.pop(path, None)
            if path is None:
                stalls.clear()
        else:
            stalls[path] = until
        return until

    def stall_remaining(self, path: str, now: float) -> float:
        """Seconds left of a link stall (no pongs either) on ``path``."""
        until = max(self._stall.get(None, 0.0), self._stall.get(path, 0.0))
        return max(0.0, until - now)

    def app_stall_remaining(self, path: str, now: float) -> float:
        """Seconds left of an application stall (pongs only) on ``path``."""
        until = max(self._app_stall.get(None, 0.0), self._app_stall.get(path, 0.0))
        return max(0.0, until - now)

    def refuse_upgrades(self, seconds: float, status: int, now: float) -> None:
        self._refuse_until = now + max(0.0, seconds)
        self._refuse_status = status

    def refuse_status(self, now: float) -> int | None:
        return self._refuse_status if now < self._refuse_until else None

    def refuse_remaining(self, now: float) -> float:
        return max(0.0, self._refuse_until - now)

    def rest_fail(self, seconds: float, status: int, now: float) -> None:
        self._rest_fail_until = now + max(0.0, seconds)
        self._rest_fail_status = status

    def rest_fail_status(self, now: float) -> int | None:
        return self._rest_fail_status if now < self._rest_fail_until else None

    def rest_drop(self, method: str, path: str, count: int) -> None:
        """Lose the replies to the next ``count`` ``method path`` requests (0 cancels)."""
        key = (method.upper(), path)
        if count > 0:
            self._rest_drop[key] = count
        else:
            self._rest_drop.pop(key, None)

    def take_rest_drop(self, method: str, path: str) -> bool:
        """True when this request's reply is to be lost (and one fewer remains)."""
        key = (method.upper(), path)
        left = self._rest_drop.get(key, 0)
        if left <= 0:
            return False
        if left == 1:
            del self._rest_drop[key]
        else:
            self._rest_drop[key] = left - 1
        return True

    def describe(self, now: float) -> dict[str, object]:
        return {
            "stall": {(k or "*"): round(v - now, 3) for k, v in self._stall.items() if v > now},
            "app_stall": {
                (k or "*"): round(v - now, 3) for k, v in self._app_stall.items() if v > now
            },
            "refuse_upgrades": (
                {"status": self._refuse_status, "remaining": round(self._refuse_until - now, 3)}
                if now < self._refuse_until
                else None
            ),
            "rest_fail": (
                {
                    "status": self._rest_fail_status,
                    "remaining": round(self._rest_fail_until - now, 3),
                }
                if now < self._rest_fail_until
                else None
            ),
            "rest_drop": {f"{m} {p}": n for (m, p), n in self._rest_drop.items()},
        }


@dataclasses.dataclass
class Stats:
    """Counters reported by GET /_sim/stats."""

    upgrades_accepted: int = 0
    upgrades_refused_by_status: dict[str, int] = dataclasses.field(default_factory=dict)
    upgrades_refused_by_path: dict[str, int] = dataclasses.field(default_factory=dict)
    ws_requests: int = 0
    ws_accepted: int = 0
    ws_errors: int = 0
    ws_rate_limited: int = 0
    ws_pings: int = 0
    ws_frames_sent: int = 0
    ws_firehose_messages: int = 0
    ws_dropped: int = 0
    ws_slow_disconnects: int = 0
    rest_dropped: int = 0
    """REST replies lost on purpose (``/_sim/rest_drop``) after the request was carried out."""
    rest: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    upgrade_log: collections.deque[tuple[float, str, int]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=UPGRADE_LOG_MAX)
    )
    """Every upgrade attempt: (wall time, path, status; 101 = accepted), newest last."""

    def upgrade_accepted(self, path: str) -> None:
        self.upgrades_accepted += 1
        self.upgrade_log.append((time.time(), path, 101))

    def upgrade_refused(self, status: int, path: str) -> None:
        self.upgrade_log.append((time.time(), path, status))
        key = str(status)
        self.upgrades_refused_by_status[key] = self.upgrades_refused_by_status.get(key, 0) + 1
        self.upgrades_refused_by_path[path] = self.upgrades_refused_by_path.get(path, 0) + 1

    def rest_count(self, group: str, outcome: str) -> None:
        """Count one REST request of ``group``; outcome is "ok", "429", "418" or "failed"."""
        counts = self.rest.setdefault(
            group, {"requests": 0, "ok": 0, "429": 0, "418": 0, "failed": 0}
        )
        counts["requests"] += 1
        counts[outcome] = counts.get(outcome, 0) + 1

    def snapshot(self) -> dict[str, object]:
        refused = sum(self.upgrades_refused_by_status.values())
        rest_total = sum(c["requests"] for c in self.rest.values())
        return {
            "upgrades": {
                "accepted": self.upgrades_accepted,
                "refused": refused,
                "refused_by_status": dict(self.upgrades_refused_by_status),
                "refused_by_path": dict(self.upgrades_refused_by_path),
                "log": [{"t": t, "path": p, "status": s} for t, p, s in self.upgrade_log],
            },
            "ws": {
                "requests": self.ws_requests,
                "accepted": self.ws_accepted,
                "errors": self.ws_errors,
                "rate_limited": self.ws_rate_limited,
                "pings": self.ws_pings,
                "frames_sent": self.ws_frames_sent,
                "firehose_messages": self.ws_firehose_messages,
                "dropped": self.ws_dropped,
                "slow_disconnects": self.ws_slow_disconnects,
            },
            "rest": {
                "requests": rest_total,
                "dropped": self.rest_dropped,
                "groups": {k: dict(v) for k, v in self.rest.items()},
            },
        }


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bad(message: str) -> web.Response:
    return web.json_response({"error": {"name": "bad_request", "message": message}}, status=400)


async def _body(request: web.Request) -> dict[str, object]:
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.text() or "{}")
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"name": "bad_request", "message": "body is not JSON"}}),
            content_type="application/json",
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"name": "bad_request", "message": "body is not an object"}}),
            content_type="application/json",
        )
    return body


def _seconds(body: dict[str, object]) -> float | None:
    value = body.get("seconds")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def add_control_routes(app: web.Application, sim: Simulator) -> None:
    """Register the /_sim routes for ``sim`` on ``app``."""

    async def info(request: web.Request) -> web.Response:
        cfg = dataclasses.asdict(sim.config)
        cfg.pop("secret_key", None)
        cfg["balances"] = None if sim.config.balances is None else len(sim.config.balances)
        return web.json_response(
            {
                "urls": sim.urls,
                "config": cfg,
                "rate": sim.exchange.rate,
                "firehose": sim.firehose,
                "faults": sim.faults.describe(time.time()),
                "private_routes": sim.private_routes,
            }
        )

    async def connections(request: web.Request) -> web.Response:
        items = [c.describe() for c in sim.hub.connections.values()]
        if request.query.get("closed") in ("1", "true", "yes"):
            items = list(sim.hub.closed) + items
        return web.json_response({"connections": items})

    async def stats(request: web.Request) -> web.Response:
        out = sim.stats.snapshot()
        out["connections_open"] = len(sim.hub.connections)
        out["markets_active"] = len(sim.exchange.active_codes())
        out["markets_materialized"] = len(sim.exchange.materialized())
        return web.json_response(out)

    async def markets(request: web.Request) -> web.Response:
        active = set(sim.exchange.active_codes())
        made = set(sim.exchange.materialized())
        return web.json_response(
            [
                {"market": code, "materialized": code in made, "active": code in active}
                for code in sim.exchange.infos
            ]
        )

    async def drop(request: web.Request) -> web.Response:
        body = await _body(request)
        path = body.get("path")
        if path is not None and not isinstance(path, str):
            return _bad("path must be a string")
        conns = list(sim.hub.iter_connections(path))
        for conn in conns:
            conn.abort()
        return web.json_response({"dropped": len(conns)})

    async def stall(request: web.Request) -> web.Response:
        body = await _body(request)
        seconds = _seconds(body)
        path = body.get("path")
        if seconds is None:
            return _bad("seconds must be a number >= 0")
        if path is not None and not isinstance(path, str):
            return _bad("path must be a string")
        kind = STALL_KINDS.get(body.get("kind", "link"))
        if kind is None:
            return _bad('kind must be "link" or "app"')
        until = sim.faults.stall(seconds, time.time(), path, kind)
        sim.hub.wake_all()
        return web.json_response({"stalled_until": until if seconds > 0 else None, "kind": kind})

    async def refuse_upgrades(request: web.Request) -> web.Response:
        body = await _body(request)
        seconds = _seconds(body)
        status = body.get("status", 429)
        if seconds is None or status not in (429, 418):
            return _bad("need seconds >= 0 and status 429 or 418")
        assert isinstance(status, int)
        sim.faults.refuse_upgrades(seconds, status, time.time())
        return web.json_response({"status": status, "seconds": seconds})

    async def rest_fail(request: web.Request) -> web.Response:
        body = await _body(request)
        seconds = _seconds(body)
        status = body.get("status", 500)
        if seconds is None or status not in (500, 429):
            return _bad("need seconds >= 0 and status 500 or 429")
        assert isinstance(status, int)
        sim.faults.rest_fail(seconds, status, time.time())
        return web.json_response({"status": status, "seconds": seconds})

    async def rest_drop(request: web.Request) -> web.Response:
        body = await _body(request)
        path, method, count = body.get("path"), body.get("method", "POST"), body.get("count", 1)
        if not isinstance(path, str) or not path.startswith("/v1/"):
            return _bad("path must be a /v1/... string")
        if not isinstance(method, str) or method.upper() not in ("GET", "POST", "DELETE"):
            return _bad("method must be GET, POST or DELETE")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            return _bad("count must be an integer >= 0")
        sim.faults.rest_drop(method, path, count)
        return web.json_response({"path": path, "method": method.upper(), "count": count})

    async def rate(request: web.Request) -> web.Response:
        body = await _body(request)
        per_second = body.get("per_second")
        firehose = body.get("firehose")
        cap = body.get("firehose_rate")
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, int | float) or not 0 <= cap < math.inf
        ):
            return _bad("firehose_rate must be a finite number >= 0")
        if per_second is not None:
            if isinstance(per_second, bool) or not isinstance(per_second, int | float):
                return _bad("per_second must be a number")
            if per_second < 0:
                return _bad("per_second must be >= 0")
            sim.set_rate(float(per_second))
        if firehose is not None and not isinstance(firehose, bool):
            return _bad("firehose must be a boolean")
        if firehose is not None or cap is not None:
            sim.set_firehose(
                sim.firehose if firehose is None else firehose,
                None if cap is None else float(cap),
            )
        return web.json_response(
            {
                "per_second": sim.exchange.rate,
                "firehose": sim.firehose,
                "firehose_rate": sim.firehose_rate,
            }
        )

    async def reset(request: web.Request) -> web.Response:
        sim.reset()
        return web.json_response({"reset": True})

    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/_sim", info),
        ("GET", "/_sim/", info),
        ("GET", "/_sim/connections", connections),
        ("GET", "/_sim/stats", stats),
        ("GET", "/_sim/markets", markets),
        ("POST", "/_sim/drop", drop),
        ("POST", "/_sim/stall", stall),
        ("POST", "/_sim/refuse_upgrades", refuse_upgrades),
        ("POST", "/_sim/rest_fail", rest_fail),
        ("POST", "/_sim/rest_drop", rest_drop),
        ("POST", "/_sim/rate", rate),
        ("POST", "/_sim/reset", reset),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
