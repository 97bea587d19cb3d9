"""Upbit-style rate limits with escalation: pure logic, every call takes ``now``.

Windows are *sliding* (no more than N accepted requests in any window-long interval),
which is at least as strict as Upbit's per-second windows, so a client that passes here
passes there. Rejected requests do not consume budget.

Escalation (docs/PROTOCOL.md section 6.3): over the limit -> 429; once more than
``teapot_after`` violations fall within ``teapot_window`` seconds, the violation starts a
418 block of ``block_base`` seconds; every request that arrives during a block is
answered 418 and grows the block (x ``block_growth``, capped at ``block_max``);
``block_reset`` seconds without a violation forget the block history.

REST: :class:`RestLimiter` is applied by the simulator's aiohttp middleware
(``simulator.app``) to EVERY ``/v1/...`` route by method and path, including the private
routes registered by ``simulator.rest_private.add_private_routes``, and it sets the
``Remaining-Req`` header. Route handlers therefore need no limiter call; the ``limiter``
argument handed to ``add_private_routes`` is this object, for information only.
:func:`rest_group` is the path -> group table.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Mapping, Sequence

__all__ = [
    "QUOTATION_GROUPS",
    "Decision",
    "KeyedThrottles",
    "RestLimiter",
    "SlidingWindow",
    "Throttle",
    "rest_group",
    "too_many_text",
]

QUOTATION_GROUPS = frozenset({"market", "candle", "trade", "ticker", "orderbook"})


class SlidingWindow:
    """At most ``limit`` accepted events in any ``window``-second interval."""

    __slots__ = ("_times", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        cutoff = now - self.window
        times = self._times
        while times and times[0] <= cutoff:
            times.popleft()

    def remaining(self, now: float) -> int:
        self._expire(now)
        return max(0, self.limit - len(self._times))

    def allows(self, now: float) -> bool:
        return self.remaining(now) > 0

    def record(self, now: float) -> None:
        self._times.append(now)

    def empty(self, now: float) -> bool:
        self._expire(now)
        return not self._times


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one request: status 200 (go), 429 or 418 (blocked for block_seconds)."""

    status: int
    remaining: int
    block_seconds: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.status == 200


@dataclasses.dataclass(frozen=True, slots=True)
class Escalation:
    """Parameters of the 429 -> 418 escalation."""

    teapot_after: int = 3
    teapot_window: float = 10.0
    block_base: float = 5.0
    block_growth: float = 2.0
    block_max: float = 600.0
    block_reset: float = 600.0


class Throttle:
    """Several sliding windows that must all allow a request, plus 429/418 escalation."""

    __slots__ = (
        "_blocked_until",
        "_blocks",
        "_esc",
        "_last_violation",
        "_violations",
        "windows",
    )

    def __init__(self, windows: Sequence[tuple[int, float]], escalation: Escalation) -> None:
        self.windows = [SlidingWindow(limit, window) for limit, window in windows]
        self._esc = escalation
        self._violations: deque[float] = deque()
        self._blocks = 0
        self._blocked_until = -math.inf
        self._last_violation = -math.inf

    def remaining(self, now: float) -> int:
        return min((w.remaining(now) for w in self.windows), default=0)

    def _block(self, now: float) -> Decision:
        esc = self._esc
        duration = min(esc.block_max, esc.block_base * esc.block_growth**self._blocks)
        self._blocks += 1
        self._violations.clear()
        self._blocked_until = now + duration
        self._last_violation = now
        return Decision(418, 0, duration)

    def check(self, now: float) -> Decision:
        """Decide on a request arriving at ``now`` and record it when accepted."""
        if now < self._blocked_until:
            return self._block(now)
        if now - self._last_violation > self._esc.block_reset:
            self._blocks = 0
        if all(w.allows(now) for w in self.windows):
            for w in self.windows:
                w.record(now)
            return Decision(200, self.remaining(now))
        self._last_violation = now
        violations = self._violations
        cutoff = now - self._esc.teapot_window
        while violations and violations[0] <= cutoff:
            violations.popleft()
        if len(violations) >= self._esc.teapot_after:
            return self._block(now)
        violations.append(now)
        return Decision(429, 0)

    def idle(self, now: float) -> bool:
        """True when forgetting this throttle changes nothing (for pruning)."""
        return (
            now >= self._blocked_until
            and now - self._last_violation > self._esc.block_reset
            and all(w.empty(now) for w in self.windows)
        )


class KeyedThrottles:
    """One :class:`Throttle` per key (IP, access key, connection), pruned when idle."""

    def __init__(
        self, windows: Sequence[tuple[int, float]], escalation: Escalation, *, enabled: bool
    ) -> None:
        self.windows = tuple(windows)
        self.escalation = escalation
        self.enabled = enabled
        self._by_key: dict[str, Throttle] = {}
        self._calls = 0

    def check(self, key: str, now: float) -> Decision:
        if not self.enabled:
            return Decision(200, self.windows[0][0] if self.windows else 0)
        self._calls += 1
        if self._calls % 1024 == 0:
            self.prune(now)
        throttle = self._by_key.get(key)
        if throttle is None:
            throttle = self._by_key[key] = Throttle(self.windows, self.escalation)
        return throttle.check(now)

    def prune(self, now: float) -> None:
        for key in [k for k, t in self._by_key.items() if t.idle(now)]:
            del self._by_key[key]

    def __len__(self) -> int:
        return len(self._by_key)

    def reset(self) -> None:
        self._by_key.clear()


def rest_group(method: str, path: str) -> str:
    """Upbit's rate-limit group of a REST call (docs/PROTOCOL.md section 6.1)."""
    if path.startswith("/v1/market/"):
        return "market"
    if path.startswith("/v1/candles/"):
        return "candle"
    if path.startswith("/v1/trades/"):
        return "trade"
    if path in ("/v1/ticker", "/v1/ticker/all"):
        return "ticker"
    if path.startswith("/v1/orderbook"):
        return "orderbook"
    method = method.upper()
    if method == "POST" and path in ("/v1/orders", "/v1/orders/cancel_and_new"):
        return "order"
    if method == "POST" and path == "/v1/orders/test":
        return "order-test"
    if method == "DELETE" and path == "/v1/orders/open":
        return "order-cancel-all"
    return "default"


class RestLimiter:
    """Per-group REST limits: quotation groups keyed by IP, exchange groups by access key.

    Call :meth:`check` once per request; the ``Remaining-Req`` header value comes from
    :meth:`header`. ``check(group, key, now)`` returns a :class:`Decision`.
    """

    def __init__(
        self,
        limits: Mapping[str, tuple[int, float]],
        escalation: Escalation,
        *,
        enabled: bool = True,
    ) -> None:
        self.limits = dict(limits)
        self.enabled = enabled
        self._groups = {
            name: KeyedThrottles([lw], escalation, enabled=enabled)
            for name, lw in self.limits.items()
        }
        self._fallback = self._groups.get("default") or KeyedThrottles(
            [(30, 1.0)], escalation, enabled=enabled
        )

    def check(self, group: str, key: str, now: float) -> Decision:
        return self._groups.get(group, self._fallback).check(f"{group}|{key}", now)

    @staticmethod
    def header(group: str, decision: Decision) -> str:
        """``Remaining-Req`` value; ``min`` is Upbit's deprecated fixed field."""
        return f"group={group}; min=1800; sec={decision.remaining}"

    def reset(self) -> None:
        for throttles in self._groups.values():
            throttles.reset()
        self._fallback.reset()


def too_many_text(status: int, block_seconds: float) -> str:
    """Upbit's plain-text answer to a throttled request: 429, or 418 with the block time."""
    if status == 418:
        return f"I'm a teapot. Too many API requests; blocked for {block_seconds:g} seconds."
    return "Too many API requests."
