"""What one upstream connection should send next: the request policy, without I/O.

Upbit serves ONE subscription per connection: each request replaces the previous one in
full, and there is no unsubscribe. It allows 5 messages a second and 100 a minute on a
connection, and answers a request only when it refuses it (an error frame). Everything
that follows from that lives in :class:`RequestPolicy`: what was sent, the last request
Upbit accepted, refusals, widening while requests are scarce, pacing the budget,
checking Upbit's LIST_SUBSCRIPTIONS answer, and closing a connection nobody needs.

The policy touches no socket and reads no clock: the shell (:mod:`broker.upstream`)
passes ``now`` (a monotonic time: a wall-clock step must not stall or burst requests),
feeds it what happened (connected, sent, an error, a listing) and asks
:meth:`RequestPolicy.next_request` what to do: send a :class:`Subscribe` or a
:class:`ListSubscriptions`, :class:`Close` the connection, or :class:`Wait`. What the
connection carries, and what Upbit refused, comes back as events (:class:`Carried`,
:class:`Refused`, :class:`Mismatch`).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, Protocol

from broker.ratelimit import TokenBucket, Window, WindowLimiter
from broker.subscriptions import UpstreamStream, request_target, widen_request
from schemas.upbit import SubscriptionList

__all__ = [
    "CONFIRM_AFTER",
    "ERROR_WINDOW",
    "MAX_LINGERING",
    "MESSAGE_LIMITS",
    "MIN_WAIT",
    "PACING_BURST",
    "PROBE_WINDOW",
    "REMOVAL_RETRY",
    "SCARCE_HEADROOM",
    "Action",
    "Carried",
    "Close",
    "ErrorVerdict",
    "Event",
    "ListSubscriptions",
    "Mismatch",
    "Refused",
    "Request",
    "RequestPolicy",
    "RequestRules",
    "Subscribe",
    "Wait",
]

SCARCE_HEADROOM = 82
"""Requests left this minute (of 90) below which requests count as scarce: after nine in
a minute, demand is churning (bench/agility.py). Then released streams are not dropped
upstream (a removal is not worth a request; every request goes to additions), and a
request adding a stream carries its siblings too
(:func:`broker.subscriptions.widen_request`), so the next new code is already flowing.
The tenth request, the first to widen, is still inside the burst the pacing allows
(PACING_BURST) and goes out at once. One threshold for both: a request that dropped the
siblings an earlier request added would only have to add them again."""
REMOVAL_RETRY = 2.0
"""Seconds before a deferred removal is tried again."""
PACING_BURST = 10
"""Requests a connection may send back to back before the per-minute budget is paced
(the rest of it spread evenly over the minute; see :class:`TokenBucket`)."""
MAX_LINGERING = 500
"""Streams nobody wants (released or widened) kept in a request at most: bounds the
request's size, and fits ``ticker`` and ``trade`` of every KRW market (about 2 x 230)."""
ERROR_WINDOW = 10.0
"""Seconds after a request within which an error frame is taken as its answer: Upbit
answers only refusals, and names no ticket in them."""

CONFIRM_AFTER = 5.0
"""Seconds after a request that added streams before LIST_SUBSCRIPTIONS checks that the
exchange took it, and again this often while no listing answers. Upbit answers only
refusals: a request its application never processed (it stalled for a moment without
the connection looking down) would otherwise go unnoticed until the next regular check
(``verify_interval``), and a client that subscribed then would get nothing for a minute."""

PROBE_WINDOW = 2.0
"""While a refused request is split to find the stream Upbit will not serve, seconds a
probe goes unanswered before it counts as accepted (Upbit refuses within milliseconds)
and the next probe may go."""
MIN_WAIT = 0.001
"""Shortest :class:`Wait`: a budget delay computed in floats may be a rounding error
away from zero, and waiting that long would change nothing."""
MESSAGE_LIMITS: tuple[Window, ...] = ((4, 1.0), (90, 60.0))
"""The budget the broker allows itself per connection, under Upbit's 5/s and 100/min."""


# ---------------------------------------------------------------------------- exchange


@dataclass(frozen=True)
class ErrorVerdict:
    """What an exchange's error frame means for the last request.

    ``refused``: the exchange will not serve it (bad codes, format, auth); sending it
    again would be refused again. ``throttled``: it was not served because too many
    messages were sent; the same request may go again after ``retry_after`` seconds.
    """

    kind: Literal["refused", "throttled"]
    retry_after: float = 0.0


class RequestRules(Protocol):
    """What the policy needs to know of the exchange (:class:`broker.exchange.Exchange`)."""

    def classify_error(self, name: str, message: str) -> ErrorVerdict:
        """How an error frame named ``name`` bears on the last request."""
        ...

    def compare_listing(
        self, intended: Collection[UpstreamStream], listing: SubscriptionList
    ) -> tuple[frozenset[UpstreamStream], frozenset[UpstreamStream]]:
        """``(missing, unexpected)`` streams of a listing against what was requested."""
        ...


# ---------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Subscribe:
    """Send the one request that makes the connection carry exactly ``streams``.

    Snapshots are asked for ``new`` streams only; ``widened`` are those of them nobody
    asked for, carried ahead of demand because requests are scarce.
    """

    streams: frozenset[UpstreamStream]
    new: frozenset[UpstreamStream]
    widened: frozenset[UpstreamStream] = frozenset()


@dataclass(frozen=True)
class ListSubscriptions:
    """Ask the exchange what this connection carries (answered by a listing)."""


@dataclass(frozen=True)
class Close:
    """Close the connection: the only way to carry nothing, as Upbit has no unsubscribe."""

    reason: str


@dataclass(frozen=True)
class Wait:
    """Nothing to send before ``seconds`` from now, unless an input changes something."""

    seconds: float


Request = Subscribe | ListSubscriptions
Action = Subscribe | ListSubscriptions | Close | Wait


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Carried:
    """The connection now carries ``streams`` (what the last accepted request asked for)."""

    streams: frozenset[UpstreamStream]


@dataclass(frozen=True)
class Refused:
    """The exchange refused ``streams``: the stream a refused request was split down to
    (its owners must be told, and it is left out of every request while it is wanted),
    or, with ``plain_from_now``, the widened part of a request.

    ``plain_from_now``: the refused request was widened, so the size may be the cause;
    requests on this connection are not widened any more.
    """

    streams: frozenset[UpstreamStream]
    name: str
    plain_from_now: bool = False


@dataclass(frozen=True)
class Mismatch:
    """A listing differs from the last request; the full request is sent again."""

    missing: frozenset[UpstreamStream]
    unexpected: frozenset[UpstreamStream]


Event = Carried | Refused | Mismatch


# ---------------------------------------------------------------------------- policy


class RequestPolicy:
    """The request policy of one connection (public or private), across reconnects.

    Inputs: :meth:`set_target` (what clients want), :meth:`set_markets` (for widening),
    :meth:`on_connected`, :meth:`on_sent`, :meth:`on_error`, :meth:`on_listing`,
    :meth:`on_disconnected`. Output: :meth:`next_request`, and the events the inputs
    return.
    """

    def __init__(
        self,
        rules: RequestRules,
        *,
        coalesce: float = 0.05,
        message_limits: Collection[Window] = MESSAGE_LIMITS,
        verify_interval: float = 60.0,
        idle_close: float = 30.0,
        widen_types: Collection[str] = (),
        confirm_after: float | None = None,
    ) -> None:
        """``widen_types``: stream types widened while requests are scarce (none: never).
        ``confirm_after``: seconds after a request that added streams before a listing
        checks the exchange took it (:data:`CONFIRM_AFTER`; None: only every
        ``verify_interval``)."""
        self._rules = rules
        self._confirm_after = confirm_after
        self._coalesce = coalesce
        self._verify_interval = verify_interval
        self._idle_close = idle_close
        self._widen_types = frozenset(widen_types)
        self._markets: frozenset[str] | None = None
        self._limiter = WindowLimiter(message_limits)
        longest = max(self._limiter.windows, key=lambda w: w[1])
        self._pace = TokenBucket.pacing(longest, min(PACING_BURST, longest[0] - 1))
        self._target: frozenset[UpstreamStream] = frozenset()
        self._connected = False
        self._sent: frozenset[UpstreamStream] | None = None
        """What the last accepted request asked for; None: unknown or nothing sent."""
        self._last_good: frozenset[UpstreamStream] = frozenset()
        """What was carried before the last request: Upbit keeps it when it refuses one."""
        self._rejected: frozenset[UpstreamStream] | None = None
        self._excluded: dict[UpstreamStream, str] = {}
        """Streams the exchange refused on their own: left out while they are wanted."""
        self._suspects: list[frozenset[UpstreamStream]] = []
        """Groups of streams a refused request added, to be tried one group at a time:
        one client's bad stream must not keep everyone else's new streams out."""
        self._probe: frozenset[UpstreamStream] | None = None
        """The suspect group the last request tried, until it is refused or accepted."""
        self._widened: frozenset[UpstreamStream] = frozenset()
        self._widen_off = False
        """The exchange refused a widened request on this connection: plain requests only."""
        self._sent_at = -math.inf
        self._changed = False
        """A new request is on its way: a listing arriving now describes an older one."""
        self._due = math.inf
        """When to consider the subscription again (coalescing, deferred removals)."""
        self._verify_at = math.inf
        self._confirming = False
        """A request added streams and no listing has confirmed it yet."""
        self._listed: frozenset[UpstreamStream] | None = None
        """The request in force when the outstanding LIST_SUBSCRIPTIONS was sent."""
        self._empty_since = math.inf

    # ------------------------------------------------------------------ queries

    @property
    def target(self) -> frozenset[UpstreamStream]:
        """The streams clients want on this connection."""
        return self._target

    @property
    def carried(self) -> frozenset[UpstreamStream]:
        """The streams the last accepted request asked for (what the exchange sends now)."""
        return self._sent or frozenset()

    @property
    def widening(self) -> bool:
        """Whether scarce requests on this connection may carry siblings ahead of demand."""
        return bool(self._widen_types) and not self._widen_off

    def requests_left(self, now: float) -> int:
        """Requests this connection's budget still allows in the current minute."""
        return self._limiter.headroom(now)

    # ------------------------------------------------------------------ inputs

    def set_target(self, streams: frozenset[UpstreamStream], now: float) -> None:
        """Carry exactly ``streams`` from now on (sent after the coalescing window)."""
        if streams == self._target:
            return
        if not streams:
            self._empty_since = now
        elif not self._target:
            self._empty_since = math.inf
        self._target = streams
        self._excluded = {s: why for s, why in self._excluded.items() if s in streams}
        self._suspects = [g & streams for g in self._suspects if g & streams]
        self._changed = True
        self._due = min(self._due, now + self._coalesce)

    def set_markets(self, markets: Collection[str]) -> None:
        """The exchange's markets: the siblings a widened request may carry."""
        self._markets = frozenset(markets)

    def on_connected(self, now: float) -> None:
        """A fresh connection: it carries nothing and has its whole budget."""
        self._connected = True
        self._sent = None
        self._limiter.reset()  # the exchange counts messages per connection
        self._pace.reset()
        self._widen_off = False
        self._widened = frozenset()
        self._listed = None
        self._probe = None
        self._changed = True
        self._due = now + self._coalesce  # subscribes arriving with the connection join in
        self._verify_at = now + self._verify_interval
        self._empty_since = now if not self._target else math.inf

    def on_disconnected(self) -> tuple[Event, ...]:
        """The connection is gone, and with it everything it carried."""
        self._connected = False
        self._confirming = False
        self._due = self._verify_at = math.inf
        self._listed = None
        return self._set_sent(None)

    def on_sent(self, request: Request, now: float) -> tuple[Event, ...]:
        """``request`` (from :meth:`next_request`) went out at ``now``."""
        self._limiter.record(now)
        self._pace.try_acquire(now)
        confirm = self._confirm_after
        if isinstance(request, ListSubscriptions):
            wait = confirm if confirm is not None and self._confirming else math.inf
            self._verify_at = now + min(wait, self._verify_interval)
            self._listed = self._sent
            return ()
        if confirm is not None and request.streams - (self._sent or frozenset()):
            self._confirming = True  # new streams: check the exchange took them, soon
            self._verify_at = min(self._verify_at, now + confirm)
        self._last_good = self._sent or frozenset()
        self._widened = request.widened
        self._sent_at = now
        self._changed = False
        if self._suspects:
            # Trying one group of suspects: the next step waits for Upbit's verdict.
            self._probe = self._suspects[0] & request.streams
            self._due = now + PROBE_WINDOW
            return self._set_sent(request.streams)
        # Extras (released or widened) go once the budget allows: look again then.
        wanted = self._wanted()
        self._due = now + REMOVAL_RETRY if request.streams != wanted else math.inf
        return self._set_sent(request.streams)

    def on_error(self, name: str, message: str, now: float) -> tuple[Event, ...]:
        """An error frame: the exchange did not take the last request, and keeps the one
        before it (Upbit answers only refusals). Errors long after a request are not
        about it and change nothing."""
        request = self._sent
        if request is None or now - self._sent_at >= ERROR_WINDOW:
            return ()
        verdict = self._rules.classify_error(name, message)
        events: list[Event] = []
        if verdict.kind == "throttled":
            # Not served, not refused: the same request goes again once allowed.
            self._limiter.block_until(now + verdict.retry_after)
            self._rejected = None
            self._schedule_now(now)
        elif self._widened:
            # The request was bigger than clients asked for: what they asked for has
            # not been refused, so ask again, plainly, as the size may be the cause.
            self._rejected = None
            self._schedule_now(now)
            plain = not self._widen_off
            self._widen_off = True
            events.append(Refused(request - self._last_good, name, plain_from_now=plain))
        else:
            added = request - self._last_good
            self._probe = None
            if len(added) == 1:
                # Found: this stream alone is refused. Its owners are told; everyone
                # else's streams go on without it.
                (stream,) = added
                self._excluded[stream] = f"{name}: {message}" if message else name
                self._suspects = [g - added for g in self._suspects if g - added]
                events.append(Refused(added, name))
            elif added:
                # Somewhere in what this request added is a stream Upbit will not
                # serve: try the halves one at a time, the rest of the request with them.
                ordered = sorted(added, key=UpstreamStream.sort_key)
                half = len(ordered) // 2
                rest = [g - added for g in self._suspects if g - added]
                self._suspects = [frozenset(ordered[:half]), frozenset(ordered[half:]), *rest]
            else:
                self._rejected = request
            self._schedule_now(now)
        self._widened = frozenset()
        events.extend(self._set_sent(self._last_good))
        return tuple(events)

    def on_listing(self, listing: SubscriptionList, now: float) -> tuple[Event, ...]:
        """The answer to :class:`ListSubscriptions`: on any difference from the request in
        force, forget what was sent so the full request (with snapshots) goes again."""
        listed, self._listed = self._listed, None
        intended = self._sent
        if intended is None or self._changed or listed != intended:
            return ()  # a request sent since the listing was asked makes it stale
        if self._confirming and self._connected:  # answered: back to the regular checks
            self._confirming = False
            self._verify_at = now + self._verify_interval
        missing, unexpected = self._rules.compare_listing(intended, listing)
        if not missing and not unexpected:
            return ()
        self._sent = None  # unknown now; not reported: the next request settles it
        self._schedule_now(now)
        return (Mismatch(missing, unexpected),)

    # ------------------------------------------------------------------ output

    def next_request(self, now: float) -> Action | None:
        """What to do at ``now``; None while disconnected.

        Sending is left to the caller, who reports it with :meth:`on_sent`; until then
        the same request is returned again. A :class:`Wait` may be cut short by any input.
        """
        if not self._connected:
            return None
        if not self._target:
            # Upbit has no unsubscribe: carrying nothing means closing. A new subscription
            # often follows soon, so keep the connection (and the streams, unpublished)
            # for a while rather than spend connects on it.
            closing = self._empty_since + self._idle_close
            if now >= closing:
                return Close(f"no streams to carry for {self._idle_close:g} s")
            return Wait(closing - now)
        if self._probe is not None and now >= self._sent_at + PROBE_WINDOW:
            # No refusal in time: the probed group is served; on to the next one.
            accepted = self._probe
            self._probe = None
            self._suspects = [g - accepted for g in self._suspects if g - accepted]
            self._schedule_now(now)
        waits: list[float] = []
        if now >= self._due:
            subscribe = self._subscription(now)
            if subscribe is not None:
                delay = self._budget_delay(now)
                if delay <= 0.0:
                    return subscribe
                waits.append(delay)
        if self._due > now:
            waits.append(self._due - now)
        if now >= self._verify_at and (self._sent is None or self._changed):
            self._verify_at = now + self._verify_interval  # nothing settled to verify
        if now >= self._verify_at:
            delay = self._budget_delay(now)
            if delay <= 0.0:
                return ListSubscriptions()
            waits.append(delay)
        else:
            waits.append(self._verify_at - now)
        return Wait(max(min(waits), MIN_WAIT))

    # ------------------------------------------------------------------ internals

    def _subscription(self, now: float) -> Subscribe | None:
        """The request to send now, or None (and when to look again) when none is due."""
        target = self._wanted()
        if self._suspects:
            # Everything not under suspicion, plus the next group of suspects.
            untried = frozenset().union(*self._suspects[1:])
            streams = target - untried
            if streams == self._sent:
                self._settle(math.inf)
                return None
            return Subscribe(streams, streams - (self._sent or frozenset()))
        if target in (self._sent, self._rejected):
            self._settle(math.inf)
            return None
        streams = self._request_for(now)
        if streams == self._sent:
            self._settle(now + REMOVAL_RETRY)  # only removals, and budget is scarce
            return None
        # Widened streams get their snapshot too: the router keeps it unclaimed for
        # whoever subscribes next (DataRouter.claim).
        new = streams - (self._sent or frozenset())
        return Subscribe(streams, new, new - target)

    def _request_for(self, now: float) -> frozenset[UpstreamStream]:
        """What to request: the target, plus, while the budget is scarce, released
        streams and the siblings of new ones (see SCARCE_HEADROOM)."""
        headroom = self._limiter.headroom(now)
        target = self._wanted()
        streams = request_target(
            target,
            self._sent,
            headroom=headroom,
            min_headroom=SCARCE_HEADROOM,
            max_lingering=MAX_LINGERING,
        )
        if self.widening and self._markets is not None and headroom < SCARCE_HEADROOM:
            streams = widen_request(
                streams,
                self._sent,
                markets=self._markets,
                types=self._widen_types,
                limit=MAX_LINGERING - len(streams - target),
            )
        return streams

    def _wanted(self) -> frozenset[UpstreamStream]:
        """The target without the streams the exchange refused on their own."""
        if not self._excluded:
            return self._target
        return self._target - self._excluded.keys()

    def _budget_delay(self, now: float) -> float:
        """Seconds until one more message fits the budget: the windows, paced by a token
        bucket, so a busy minute spreads its requests instead of spending them in 20 s
        and then sending nothing for 40 s."""
        return max(self._limiter.delay(now), self._pace.delay(now))

    def _settle(self, due: float) -> None:
        self._changed = False
        self._due = due

    def _schedule_now(self, now: float) -> None:
        self._changed = True
        self._due = now

    def _set_sent(self, streams: frozenset[UpstreamStream] | None) -> tuple[Event, ...]:
        self._sent = streams
        return (Carried(streams or frozenset()),)
