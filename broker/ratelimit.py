"""Rate limiters for Upbit: WebSocket windows, REST groups, backoff and persisted bans.

Upbit answers an over-limit request with 429 and keeps answering 418 (a ban that grows
with every repeat) if the client insists, so the broker must never be the one that
overshoots. Everything here is pure: callers pass ``now`` (seconds on one clock of their
choice, normally ``time.monotonic()``) and nothing sleeps or touches a socket. Only
:meth:`BanStore.load` / :meth:`BanStore.save` touch the file system, and a
:class:`BanStore` holds wall-clock epoch seconds because it must survive a restart
(carry a ban over to another clock with :meth:`BanStore.remaining`).

* :class:`WindowLimiter` — several ``(count, seconds)`` sliding windows at once, e.g.
  WebSocket messages per connection (Upbit: 5/s and 100/min; we use 4/s and 90/min).
* :class:`RestLimiter` — per REST group, a window with a margin and a guard against
  arrival jitter (:func:`jitter_guard`), learning from the ``Remaining-Req`` header,
  backing off on 429 and stopping on 418.
* :class:`PriorityGate` — which pending REST jobs may go now, orders first.
* :class:`Backoff` — exponential backoff with full jitter and a cap.
* :class:`BanStore` — ``{kind: until_epoch_seconds}`` in a 0600 JSON file.

Bans are capped at :data:`MAX_BAN_SECONDS` whatever a 418 body says (see there).
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import random
import re
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Final, Generic, TypeVar

from broker.logs import get_logger

__all__ = [
    "BAN_FILE",
    "DEFAULT_BLOCK_SECONDS",
    "DEFAULT_REST_MARGIN",
    "EXCHANGE_GROUPS",
    "MAX_BAN_SECONDS",
    "ORDER_RESERVE",
    "QUOTATION_GROUPS",
    "REST_BAN_PREFIX",
    "REST_GROUP_LIMITS",
    "UNKNOWN_GROUP_LIMIT",
    "WS_CONNECT_WINDOWS",
    "WS_MESSAGE_WINDOWS",
    "Backoff",
    "BanStore",
    "Priority",
    "PriorityGate",
    "RestJob",
    "RestLimiter",
    "TokenBucket",
    "WindowLimiter",
    "ban_seconds",
    "jitter_guard",
    "parse_block_seconds",
    "parse_remaining_req",
    "steady_time",
    "wall_offset",
    "with_margin",
]

Window = tuple[int, float]
"""``(count, seconds)``: at most ``count`` events in any ``seconds``-long span."""

WS_MESSAGE_WINDOWS: Final[tuple[Window, ...]] = ((4, 1.0), (90, 60.0))
"""Requests per WebSocket connection: Upbit allows 5/s and 100/min; we leave margin."""
WS_CONNECT_WINDOWS: Final[tuple[Window, ...]] = ((4, 1.0),)
"""WebSocket handshakes: Upbit allows 5/s (per IP, or per pocket with a JWT)."""

REST_GROUP_LIMITS: Final[Mapping[str, Window]] = {
    "market": (10, 1.0),
    "candle": (10, 1.0),
    "trade": (10, 1.0),
    "ticker": (10, 1.0),
    "orderbook": (10, 1.0),
    "default": (30, 1.0),
    "order": (12, 1.0),
    "order-test": (8, 1.0),
    "order-cancel-all": (1, 2.0),
}
"""Upbit's documented REST limits per group (docs/PROTOCOL.md §6.1), before margin."""
QUOTATION_GROUPS: Final = frozenset({"market", "candle", "trade", "ticker", "orderbook"})
"""Groups measured per IP: a 418 on one of them blocks the IP, so all of them stop."""
EXCHANGE_GROUPS: Final = frozenset({"default", "order", "order-test", "order-cancel-all"})
"""Groups measured per pocket: a 418 on one of them blocks the pocket, so all stop."""
UNKNOWN_GROUP_LIMIT: Final[Window] = (10, 1.0)
"""Limit assumed for a group Upbit names that we do not know (before margin)."""
DEFAULT_REST_MARGIN: Final = 0.8
"""Fraction of Upbit's REST budget we use: 10/s becomes 8/s, 1 per 2 s becomes 1 per 2.5 s."""
ORDER_RESERVE: Final = 1
"""Slots of every REST window that jobs below :attr:`Priority.ORDER` leave free
(:class:`PriorityGate`): the fallback's poll plan counts without them."""
DEFAULT_BLOCK_SECONDS: Final = 60.0
"""Ban assumed after a 418 whose block time we cannot read: long, since guessing short
and retrying into the ban makes Upbit lengthen it."""
MAX_BAN_SECONDS: Final = 3600.0
"""Longest ban the broker honours, whatever a 418 body states (even ``inf``).

The body is free text from the other end (or from anything in between), and a ban is
saved across restarts: believed as stated, one odd body would stop a kind of request
for days. Upbit's documented blocks are minutes long; after an hour the broker tries
once, and if the ban still holds, that request's 418 arms a new one (capped again)."""
BAN_FILE: Final = "bans.json"
"""Name of the :class:`BanStore` file in the broker's state directory."""
REST_BAN_PREFIX: Final = "rest:"
"""BanStore kind prefix of REST group bans (``rest:ticker``)."""
REMAINING_ZERO_HOLD: Final = 1.0
"""After ``sec=0`` or a 429, wait this long: we cannot see Upbit's second boundary, and
a full second from now is always past it."""


def with_margin(window: Window, margin: float) -> Window:
    """Scale ``(count, seconds)`` down to ``margin`` of its rate.

    The count is floored; when that leaves less than one event, the period is stretched
    instead (``(1, 2.0)`` at 0.8 becomes ``(1, 2.5)``).
    """
    count, seconds = window
    if not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be in (0, 1], got {margin!r}")
    scaled = count * margin
    if scaled >= 1.0:
        return (math.floor(scaled + 1e-9), seconds)
    return (1, seconds / scaled)


def jitter_guard(window: Window, margin: float) -> Window | None:
    """Upbit's full count over a period stretched by ``1 / margin``, or None.

    The margin window alone lets a whole burst go at the end of one second and the next
    burst at the start of the following one. Upbit stamps requests when they arrive, so
    when the first burst is delayed on the way (a busy network, a busy server) and the
    second is not, the exchange sees both inside one of its seconds and answers 429.
    Never more than Upbit's count in any ``seconds / margin`` of our own clock keeps
    that from happening while arrivals jitter by less than the stretch (0.25 s at 0.8),
    and costs nothing in sustained rate: ``count * margin`` per ``seconds``, the margin
    window's own. None when the margin window already stretches the period.
    """
    count, seconds = window
    if count * margin < 1.0:
        return None
    return (count, seconds / margin)


_EPOCH_AT_MONOTONIC_ZERO: Final = time.time() - time.monotonic()


def steady_time() -> float:
    """Epoch seconds that never step: the wall clock read once, then the monotonic clock.

    Windows and bans compare times taken seconds apart. Read from a wall clock that NTP
    (or a person) steps in between, a step forward frees every window at once (a burst
    Upbit answers 429) and a step back holds them for as long as the step (orders
    refused ``rate_limited``). Epoch-like, so a ban saved in ``bans.json`` means the
    same to the next broker, give or take the clock's drift over this one's uptime.
    """
    return _EPOCH_AT_MONOTONIC_ZERO + time.monotonic()


def wall_offset() -> float:
    """Seconds the wall clock is ahead of :func:`steady_time` now, 0.0 within a second.

    The two agree when the broker starts and part only when the wall clock is stepped
    or the machine was suspended (the monotonic clock stops then). A saved ban must be
    wall-clock time, which the next broker and ``upbit-broker ban`` read; under a
    second of difference is drift, not worth a correction.
    """
    offset = time.time() - steady_time()
    return offset if abs(offset) >= 1.0 else 0.0


# ------------------------------------------------------------------------------ windows


class WindowLimiter:
    """Several sliding windows at once; an event goes only if every window has room.

    It keeps the timestamps of the last ``max(count)`` events (a bounded deque), so
    "at most ``count`` in any ``seconds``-long span" holds exactly, not on average.
    ``reserve`` keeps that many slots free in every window (for higher-priority users).
    ``block_until`` adds an outside stop (a ban), honoured by :meth:`delay`.
    """

    __slots__ = ("_blocked_until", "_stamps", "_windows")

    def __init__(self, windows: Iterable[Window]) -> None:
        self._windows = tuple((int(c), float(s)) for c, s in windows)
        if not self._windows:
            raise ValueError("a WindowLimiter needs at least one (count, seconds) window")
        for count, seconds in self._windows:
            if count < 1 or not seconds > 0:
                raise ValueError(f"bad window ({count}, {seconds}): need count >= 1, seconds > 0")
        self._stamps: deque[float] = deque(maxlen=max(c for c, _ in self._windows))
        self._blocked_until = -math.inf

    def headroom(self, now: float) -> int:
        """Events still allowed by the longest window right now (budget left this minute)."""
        count, seconds = max(self._windows, key=lambda w: w[1])
        used = sum(1 for stamp in self._stamps if stamp > now - seconds)
        return max(0, count - used)

    @classmethod
    def ws_messages(cls) -> WindowLimiter:
        """A limiter for the requests sent on one WebSocket connection."""
        return cls(WS_MESSAGE_WINDOWS)

    @classmethod
    def ws_connects(cls) -> WindowLimiter:
        """A limiter for WebSocket handshakes."""
        return cls(WS_CONNECT_WINDOWS)

    @property
    def windows(self) -> tuple[Window, ...]:
        """The ``(count, seconds)`` windows enforced."""
        return self._windows

    def delay(self, now: float, *, reserve: int = 0) -> float:
        """Seconds until one more event fits every window (0.0: it fits now)."""
        wait = self._blocked_until - now
        stamps = self._stamps
        n = len(stamps)
        for count, seconds in self._windows:
            allowed = max(1, count - reserve)
            if n >= allowed:
                # The allowed-th most recent event must have left the window.
                wait = max(wait, stamps[n - allowed] + seconds - now)
        return wait if wait > 0.0 else 0.0

    def try_acquire(self, now: float, *, reserve: int = 0) -> bool:
        """Take a slot at ``now`` if every window has one; False (and no change) if not."""
        if self.delay(now, reserve=reserve) > 0.0:
            return False
        self._stamps.append(now)
        return True

    def record(self, now: float) -> None:
        """Count an event that happened anyway (so later ones stay within the windows)."""
        self._stamps.append(now)

    def block_until(self, until: float) -> None:
        """Refuse every event before ``until`` (a ban); a shorter block never shortens one."""
        self._blocked_until = max(self._blocked_until, until)

    def blocked_until(self, now: float) -> float:
        """The end of the current block, or 0.0 when not blocked."""
        return self._blocked_until if self._blocked_until > now else 0.0

    def reset(self) -> None:
        """Forget past events and blocks (e.g. a new connection has a fresh budget)."""
        self._stamps.clear()
        self._blocked_until = -math.inf


class TokenBucket:
    """Paces a budget: ``burst`` events at once, then ``rate`` per second on average.

    Upbit's 100 messages a minute is a sliding window: spent greedily (4/s), a busy
    minute's budget is gone in ~20 s and then nothing may be sent for up to 40 s, so a
    new subscription waits that long. In front of the window, a bucket with
    ``burst + 60 * rate`` no larger than the window's count never empties the window
    and spreads requests evenly when demand exceeds it (bench/agility.py).
    """

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, burst: int, rate: float) -> None:
        if burst < 1 or not rate > 0:
            raise ValueError(f"bad token bucket ({burst}, {rate}): need burst >= 1, rate > 0")
        self._burst = float(burst)
        self._rate = float(rate)
        self._tokens = self._burst
        self._at = -math.inf

    @classmethod
    def pacing(cls, window: Window, burst: int) -> TokenBucket:
        """A bucket that spends at most ``window``'s count in any of its spans."""
        count, seconds = window
        if burst >= count:
            raise ValueError(f"burst {burst} leaves nothing to pace in window {window}")
        return cls(burst, (count - burst) / seconds)

    def _refill(self, now: float) -> None:
        if now > self._at:
            elapsed = now - self._at
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._at = now

    def delay(self, now: float) -> float:
        """Seconds until a token is available (0.0: now)."""
        self._refill(now)
        missing = 1.0 - self._tokens
        return missing / self._rate if missing > 0 else 0.0

    def try_acquire(self, now: float) -> bool:
        """Take a token at ``now`` if one is available."""
        if self.delay(now) > 0.0:
            return False
        self._tokens -= 1.0
        return True

    def reset(self) -> None:
        """Full again (a new connection has a fresh budget)."""
        self._tokens = self._burst
        self._at = -math.inf


# ------------------------------------------------------------------------------ backoff


class Backoff:
    """Exponential backoff with full jitter: delay n is uniform in [0, min(cap, first*2^n)).

    Full jitter spreads retries of many clients apart; with the default ``first=1.0``
    the first retry comes within a second. ``rng`` returns floats in [0, 1) and is
    injectable for tests.
    """

    __slots__ = ("_attempts", "_cap", "_first", "_rng")

    def __init__(
        self, first: float = 1.0, cap: float = 30.0, rng: Callable[[], float] = random.random
    ) -> None:
        if not 0.0 < first <= cap:
            raise ValueError(f"need 0 < first <= cap, got first={first!r}, cap={cap!r}")
        self._first = first
        self._cap = cap
        self._rng = rng
        self._attempts = 0

    @property
    def attempts(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempts

    def ceiling(self) -> float:
        """Upper bound of the next delay."""
        return min(self._cap, self._first * 2.0 ** min(self._attempts, 64))

    def next_delay(self) -> float:
        """The next delay in seconds; each call doubles the ceiling up to the cap."""
        delay = self._rng() * self.ceiling()
        self._attempts += 1
        return delay

    def reset(self) -> None:
        """Start over after a success."""
        self._attempts = 0


# ------------------------------------------------------------------- response parsing

_GROUP_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]*")
_NUMBER: Final = r"(\d+(?:\.\d+)?)"
_DURATION_RE: Final = re.compile(
    # A number starts only where no digit precedes it and is taken whole (possessive):
    # otherwise every position of a long digit run starts a number that backtracks
    # over the run, and a 20 KB run of digits in a 418 body took a minute to read.
    r"(?<!\d)(\d++(?:\.\d++)?)\s*+"
    r"(milliseconds?|msecs?|ms|seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h"
    r"|시간|초|분)(?![a-z])",
    re.IGNORECASE,
)
_KEYWORD_RE: Final = re.compile(r"(?:block|ban|retry|wait)[^0-9]{0,30}?" + _NUMBER, re.IGNORECASE)
_KEYWORD_KEY_RE: Final = re.compile(r"block|ban|retry|wait|second", re.IGNORECASE)
_UNIT_SECONDS: Final[Mapping[str, float]] = {
    "ms": 0.001,
    "msec": 0.001,
    "msecs": 0.001,
    "millisecond": 0.001,
    "milliseconds": 0.001,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "분": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "시간": 3600.0,
}


def parse_remaining_req(value: str | None) -> tuple[str, int] | None:
    """``(group, sec)`` from ``Remaining-Req: group=default; min=1800; sec=29``.

    Tolerates a missing (deprecated) ``min``, extra spaces, any field order and case;
    anything without a readable group and ``sec`` gives None.
    """
    if not value:
        return None
    fields: dict[str, str] = {}
    for part in value.split(";"):
        key, sep, val = part.partition("=")
        if sep:
            fields[key.strip().lower()] = val.strip()
    group = fields.get("group", "").lower()
    sec = fields.get("sec", "")
    if not _GROUP_RE.fullmatch(group) or not sec.isascii() or not sec.isdigit():
        return None
    return group, int(sec)


def _text_seconds(text: str) -> float | None:
    """Seconds named in free text: the sum of every ``<number> <unit>`` ("1분 30초" = 90),
    else a bare number after block/ban/retry/wait ("block time: 30")."""
    total = 0.0
    found = False
    for match in _DURATION_RE.finditer(text):
        total += float(match.group(1)) * _UNIT_SECONDS.get(match.group(2).lower(), 1.0)
        found = True
    if found:
        return total
    keyword = _KEYWORD_RE.search(text)
    return float(keyword.group(1)) if keyword else None


def _json_seconds(node: object, key: str = "") -> Iterator[float]:
    """Every block time found in a decoded JSON document (strings and named numbers)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _json_seconds(v, str(k))
    elif isinstance(node, list):
        for item in node:
            yield from _json_seconds(item, key)
    elif isinstance(node, str):
        seconds = _text_seconds(node)
        if seconds is not None:
            yield seconds
    elif (
        isinstance(node, int | float)
        and not isinstance(node, bool)
        and _KEYWORD_KEY_RE.search(key)
        and node >= 0  # NaN and negative durations are no block time; inf is (capped)
    ):
        yield float(node)


def parse_block_seconds(body: str) -> float | None:
    """The block time a 418 response states, in seconds (at most :data:`MAX_BAN_SECONDS`);
    None when it states none.

    Upbit documents that the 418 body carries the block time but not its format, so
    this accepts "... 30 seconds", "block time: 30s", "1분 30초", "Retry-After: 30" and a
    JSON body holding such text or a numeric ``block``/``retry``/``wait`` field. When
    several candidates appear the longest wins. Callers fall back to
    :data:`DEFAULT_BLOCK_SECONDS` on None (``RestLimiter.on_418`` does). Any body is
    read in linear time, and one nested too deeply for ``json`` is read as text.
    """
    try:
        candidates = list(_json_seconds(json.loads(body)))
    except (ValueError, RecursionError):
        candidates = []
    seconds = max(candidates) if candidates else _text_seconds(body)
    return None if seconds is None else min(seconds, MAX_BAN_SECONDS)


def ban_seconds(block_seconds: float | None) -> float:
    """How long to stop after a 418 stating ``block_seconds``: 1 s to :data:`MAX_BAN_SECONDS`.

    None or NaN (nothing readable) means :data:`DEFAULT_BLOCK_SECONDS`; ``inf`` and
    anything longer than the cap mean the cap; zero or negative mean one second.
    """
    if block_seconds is None or math.isnan(block_seconds):
        return DEFAULT_BLOCK_SECONDS
    return min(max(block_seconds, 1.0), MAX_BAN_SECONDS)


# ---------------------------------------------------------------------------- REST groups


@dataclass(slots=True)
class _GroupState:
    limiter: WindowLimiter
    backoff: Backoff
    hold_until: float = -math.inf
    """Set by ``sec=0`` and 429: a short stop of this group only."""


class RestLimiter:
    """Per-group REST limiter: windows with margin, ``Remaining-Req``, 429 backoff, 418 bans.

    Before a request: wait until ``delay(group, now) == 0``, then :meth:`on_request`
    (or use :meth:`try_acquire`, which checks and counts). After it: feed the
    ``Remaining-Req`` header to :meth:`on_remaining_req` (or its parsed form to
    :meth:`on_remaining`) and the outcome to :meth:`on_success`, :meth:`on_429` or
    :meth:`on_418`. A 418 stops every group of the same measurement unit (all quotation
    groups share the IP, all exchange groups the pocket): Upbit blocks "the same IP /
    pocket", and a request sent into a ban lengthens it. Unknown groups get
    :data:`UNKNOWN_GROUP_LIMIT` and stop alone.

    With ``bans``, 418s are recorded there as ``rest:<group>`` and bans found there at
    construction are honoured; ``now`` must then be epoch seconds (:func:`steady_time`).
    """

    def __init__(
        self,
        *,
        bans: BanStore | None = None,
        limits: Mapping[str, Window] = REST_GROUP_LIMITS,
        margin: float = DEFAULT_REST_MARGIN,
        backoff_first: float = 1.0,
        backoff_cap: float = 30.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        with_margin(UNKNOWN_GROUP_LIMIT, margin)  # validate the margin now, not later
        self._limits = dict(limits)
        self._margin = margin
        self._backoff_first = backoff_first
        self._backoff_cap = backoff_cap
        self._rng = rng
        self._groups: dict[str, _GroupState] = {}
        self._bans = bans
        if bans is not None:
            for kind, until in bans.entries().items():
                if kind.startswith(REST_BAN_PREFIX):
                    self.block(kind.removeprefix(REST_BAN_PREFIX), until)

    def _state(self, group: str) -> _GroupState:
        state = self._groups.get(group)
        if state is None:
            limit = self._limits.get(group, UNKNOWN_GROUP_LIMIT)
            guard = jitter_guard(limit, self._margin)
            windows = [with_margin(limit, self._margin)] + ([guard] if guard else [])
            state = _GroupState(
                WindowLimiter(windows),
                Backoff(self._backoff_first, self._backoff_cap, self._rng),
            )
            self._groups[group] = state
        return state

    def window(self, group: str) -> Window:
        """The ``(count, seconds)`` window enforced for ``group`` (margin applied)."""
        return self._state(group).limiter.windows[0]

    def windows(self, group: str) -> tuple[Window, ...]:
        """Every window enforced for ``group``: the margin's, then the jitter guard."""
        return self._state(group).limiter.windows

    def delay(self, group: str, now: float, *, reserve: int = 0) -> float:
        """Seconds until a request of ``group`` may be sent (0.0: now)."""
        state = self._state(group)
        return max(state.limiter.delay(now, reserve=reserve), state.hold_until - now, 0.0)

    def try_acquire(self, group: str, now: float, *, reserve: int = 0) -> bool:
        """Count a request of ``group`` at ``now`` if allowed; False (no change) if not."""
        state = self._state(group)
        if state.hold_until > now:
            return False
        return state.limiter.try_acquire(now, reserve=reserve)

    def on_request(self, group: str, now: float) -> None:
        """Count a request of ``group`` sent at ``now`` (after waiting out :meth:`delay`)."""
        self._state(group).limiter.record(now)

    def on_remaining(self, group: str, sec: int, now: float) -> None:
        """Learn from ``Remaining-Req``'s ``sec``: 0 holds ``group`` for a second.

        Upbit's count covers every client of the IP or pocket, so it can run out before
        our own window does.
        """
        if sec <= 0:
            state = self._state(group)
            state.hold_until = max(state.hold_until, now + REMAINING_ZERO_HOLD)

    def on_remaining_req(self, value: str | None, now: float) -> tuple[str, int] | None:
        """Parse a ``Remaining-Req`` header and apply :meth:`on_remaining`.

        Returns the parsed ``(group, sec)``; an unreadable header is ignored (None).
        """
        parsed = parse_remaining_req(value)
        if parsed is not None:
            self.on_remaining(parsed[0], parsed[1], now)
        return parsed

    def on_success(self, group: str, now: float) -> None:
        """A request of ``group`` succeeded: the next 429 starts backing off from scratch."""
        del now  # part of the uniform signature; success needs no time
        self._state(group).backoff.reset()

    def on_429(self, group: str, now: float) -> float:
        """Back off ``group`` after a 429; returns the wait (1 s + jittered exponential).

        The second is Upbit's advice (wait for the next second); the growing jitter keeps
        repeated 429s from turning into a 418.
        """
        state = self._state(group)
        wait = REMAINING_ZERO_HOLD + state.backoff.next_delay()
        state.hold_until = max(state.hold_until, now + wait)
        return wait

    def on_418(self, group: str, now: float, block_seconds: float | None) -> float:
        """Stop ``group`` and its unit peers for the stated block; returns when it ends.

        ``block_seconds`` None (unreadable body) means :data:`DEFAULT_BLOCK_SECONDS`; at
        least one second and at most :data:`MAX_BAN_SECONDS` are waited
        (:func:`ban_seconds`). The ban is recorded in ``bans`` if given.
        """
        until = now + ban_seconds(block_seconds)
        self.block(group, until)
        if self._bans is not None:
            self._bans.block(REST_BAN_PREFIX + group, until)
        return until

    def block(self, group: str, until: float) -> None:
        """Stop ``group`` and its unit peers until ``until`` (also used to restore a ban)."""
        for peer in self.unit_of(group):
            self._state(peer).limiter.block_until(until)

    def blocked_until(self, group: str, now: float) -> float:
        """End of the 418 ban on ``group``, or 0.0 when it is not banned."""
        return self._state(group).limiter.blocked_until(now)

    @staticmethod
    def unit_of(group: str) -> frozenset[str]:
        """The groups a ban on ``group`` stops: its IP's or pocket's groups, or itself."""
        if group in QUOTATION_GROUPS:
            return QUOTATION_GROUPS
        if group in EXCHANGE_GROUPS:
            return EXCHANGE_GROUPS
        return frozenset({group})


# ------------------------------------------------------------------------------ priority


class Priority(IntEnum):
    """REST job priority, most urgent first: orders, then account, then polling."""

    ORDER = 0
    ACCOUNT = 1
    QUOTATION = 2


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RestJob(Generic[T]):
    """A REST request waiting for its group's budget; ``payload`` is the caller's."""

    group: str
    priority: int
    payload: T
    owner: str = ""
    """Whose request it is (a client's id; "" for the broker's own): jobs of one
    priority are shared out between owners (see :class:`PriorityGate`)."""


@dataclass(order=True, slots=True)
class _Queued(Generic[T]):
    priority: int
    turn: int
    seq: int
    job: RestJob[T] = field(compare=False)


class PriorityGate(Generic[T]):
    """Releases pending REST jobs within the group limits, most urgent first.

    Within a group, jobs leave by priority, then by their owner's turn, then in
    submission order. Turns are start-time fair queueing within one priority: a job's
    turn is one past its owner's previous job's of that priority, and never behind the
    turn last released there, so owners take turns one job at a time: a client that
    queues many calls delays another's call by at most one of its own, and one that
    keeps calling cannot shut another out (nor do its queued reads delay its own
    cancel). A job whose caller gave up is :meth:`withdraw`-n: it takes no slot. Jobs below
    :attr:`Priority.ORDER` leave ``reserve`` slots of every window free, so a burst of
    polling never takes the budget an order needs a moment later.
    """

    def __init__(self, limiter: RestLimiter, *, reserve: int = ORDER_RESERVE) -> None:
        self._limiter = limiter
        self._reserve = reserve
        self._queues: dict[str, list[_Queued[T]]] = {}
        self._seq = itertools.count()
        self._waiting: Counter[tuple[str, int, str]] = Counter()
        """(group, priority, owner) -> jobs queued (an owner with none is forgotten)."""
        self._last: dict[tuple[str, int, str], int] = {}
        """(group, priority, owner) -> the turn of the owner's latest queued job."""
        self._now: dict[tuple[str, int], int] = {}
        """(group, priority) -> the turn of the job released last (the virtual clock)."""

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def submit(self, job: RestJob[T]) -> None:
        """Queue a job."""
        key = (job.group, job.priority, job.owner)
        turn = max(self._now.get(key[:2], 0), self._last.get(key, -1) + 1)
        self._last[key] = turn
        self._waiting[key] += 1
        heapq.heappush(
            self._queues.setdefault(job.group, []),
            _Queued(job.priority, turn, next(self._seq), job),
        )

    def withdraw(self, job: RestJob[T]) -> None:
        """Forget a queued ``job`` whose caller stopped waiting (timed out, cancelled),
        so it takes no slot; nothing happens if it already left the queue."""
        queue = self._queues.get(job.group, [])
        for i, item in enumerate(queue):
            if item.job is job:
                queue[i] = queue[-1]
                queue.pop()
                heapq.heapify(queue)
                self._left(job)
                if not queue:
                    del self._queues[job.group]
                return

    def _left(self, job: RestJob[T]) -> None:
        """Count ``job`` out of its owner's waiting jobs; forget an owner with none."""
        key = (job.group, job.priority, job.owner)
        self._waiting[key] -= 1
        if self._waiting[key] <= 0:  # its turns are all behind the clock now
            del self._waiting[key]
            self._last.pop(key, None)

    def _reserve_for(self, priority: int) -> int:
        return 0 if priority <= Priority.ORDER else self._reserve

    def release(self, now: float) -> list[RestJob[T]]:
        """Jobs that may be sent now (their slots are taken), most urgent first."""
        released: list[_Queued[T]] = []
        for group, queue in self._queues.items():
            while queue:
                head = queue[0]
                reserve = self._reserve_for(head.priority)
                if not self._limiter.try_acquire(group, now, reserve=reserve):
                    break
                item = heapq.heappop(queue)
                released.append(item)
                clock = (group, item.priority)
                self._now[clock] = max(self._now.get(clock, 0), item.turn)
                self._left(item.job)
        self._queues = {g: q for g, q in self._queues.items() if q}
        released.sort()
        return [item.job for item in released]

    def next_delay(self, now: float) -> float | None:
        """Seconds until :meth:`release` can hand out another job; None if none is pending."""
        delays = [
            self._limiter.delay(group, now, reserve=self._reserve_for(queue[0].priority))
            for group, queue in self._queues.items()
            if queue
        ]
        return min(delays) if delays else None


# ----------------------------------------------------------------------------- ban store


class BanStore:
    """Bans that must outlive the broker: ``{kind: until_epoch_seconds}`` in a JSON file.

    Kinds name what is banned: ``"ws-connect"``, ``"rest:ticker"``... Times in memory
    are :func:`steady_time` (what the limiters compare with); in the file they are
    wall-clock (:func:`wall_offset` converts), so they mean the same to the next broker
    however this one's clock moved; use :meth:`remaining` to carry a ban to a monotonic
    clock. A store read with
    :meth:`load` writes itself back on every :meth:`block` that changes it: a ban is
    rare, and one forgotten in a crash gets longer when the next broker runs into it.
    A missing file loads as empty; an unreadable one too, with a warning (worst case:
    one more 418, stored again). No ban is loaded longer than :data:`MAX_BAN_SECONDS`
    from the time it is loaded, so a huge one in the file cannot outlive the cap.
    ``upbit-broker ban --clear`` forgets every ban (``upbit-broker ban`` shows them).
    """

    def __init__(
        self, bans: Mapping[str, float] | None = None, *, path: str | os.PathLike[str] | None = None
    ) -> None:
        self._bans: dict[str, float] = {
            kind: float(until) for kind, until in (bans or {}).items() if math.isfinite(until)
        }
        self.path = None if path is None else Path(path)
        """Where :meth:`block` writes through; None for a memory-only store."""
        self.save_error: OSError | None = None
        """Why the last write-through failed (the ban still holds in memory); None if it worked."""

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, now: float | None = None) -> BanStore:
        """Read the store at ``path``; it writes back there.

        Absent: empty. Corrupt (not JSON, not an object, a ban that is not a finite
        number): what is unreadable is ignored with a warning. Bans ending after
        ``now`` (default: :func:`steady_time`) + :data:`MAX_BAN_SECONDS` end then instead.
        """
        log = get_logger("bans", path=str(path))
        try:
            raw: object = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("ban file unreadable: ignored", error=f"{type(exc).__name__}: {exc}")
            raw = {}
        if not isinstance(raw, dict):
            log.warning("ban file is not a JSON object: ignored", found=type(raw).__name__)
            raw = {}
        latest = (steady_time() if now is None else now) + MAX_BAN_SECONDS
        offset = wall_offset()
        bans: dict[str, float] = {}
        for kind, until in raw.items():
            number = isinstance(until, int | float) and not isinstance(until, bool)
            if number and math.isfinite(until):
                bans[str(kind)] = min(float(until) - offset, latest)
                continue
            log.warning("ban entry unreadable: ignored", kind=str(kind)[:40])
        return cls(bans, path=path)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temp file + rename in the same directory), mode 0600, in
        wall-clock time."""
        target = Path(path)
        offset = wall_offset()
        wall = {kind: until + offset for kind, until in self._bans.items()}
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(wall, handle, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def block(self, kind: str, until: float) -> bool:
        """Record a ban of ``kind`` until ``until``; a shorter one never shortens it.

        Returns True when the store changed. A loaded store then saves itself; a failed
        save is kept in :attr:`save_error`, not raised, so the ban still works in memory.
        ``until`` must be finite (get the duration from :func:`ban_seconds`): ValueError.
        """
        if not math.isfinite(until):
            raise ValueError(f"ban of {kind!r} until {until!r}: not a finite time")
        if until <= self._bans.get(kind, -math.inf):
            return False
        self._bans[kind] = until
        if self.path is not None:
            try:
                self.save(self.path)
            except OSError as exc:
                self.save_error = exc
            else:
                self.save_error = None
        return True

    def blocked_until(self, kind: str, now: float) -> float:
        """End of the ban on ``kind``, or 0.0 when it is not banned at ``now``."""
        until = self._bans.get(kind, 0.0)
        return until if until > now else 0.0

    def remaining(self, kind: str, now: float) -> float:
        """Seconds left on the ban of ``kind`` (0.0 when none)."""
        return max(0.0, self.blocked_until(kind, now) - now)

    def clear(self, kind: str) -> None:
        """Forget the ban of ``kind`` (in memory; :meth:`save` to persist)."""
        self._bans.pop(kind, None)

    def clear_all(self) -> dict[str, float]:
        """Forget every ban (in memory; :meth:`save` to persist); returns what was there."""
        cleared, self._bans = self._bans, {}
        return cleared

    def prune(self, now: float) -> bool:
        """Drop expired bans (in memory); True when anything was dropped."""
        expired = [kind for kind, until in self._bans.items() if until <= now]
        for kind in expired:
            del self._bans[kind]
        return bool(expired)

    def active(self, now: float) -> dict[str, float]:
        """Every ban still in force at ``now``."""
        return {kind: until for kind, until in self._bans.items() if until > now}

    def entries(self) -> dict[str, float]:
        """Every stored ban, expired or not."""
        return dict(self._bans)
