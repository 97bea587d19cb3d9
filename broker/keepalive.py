"""Is the exchange's application still answering? The pure decision behind the text PING.

WebSocket pings prove only that something answers pongs: a proxy, a load balancer or the
server's WebSocket library may keep doing so while Upbit's application sends nothing. The
application's own sign of life is any frame it sends: data, an error, a subscription
listing, or ``{"status":"UP"}``, its answer to the text message ``PING``.
:class:`AppLiveness` decides, given ``now`` and how many frames the connection has
received so far, when to send a ``PING`` and when to declare the application stalled.

What the broker assumes about Upbit (docs/PROTOCOL.md, sections 4.2 and 11):

- A text ``PING`` is answered by ``{"status":"UP"}``, either once per ``PING`` or every
  ~10 s from then on (the docs allow both readings). Both keep a healthy connection's
  silence under :attr:`AppLiveness.stall_after` (12 s at the default 4 s keepalive), so a
  quiet market never looks stalled.
- A ``PING`` is not a request: it does not count against the 5/s and 100/min message
  budget (the docs name only requests and LIST_SUBSCRIPTIONS; the simulator does not
  count it). The budget is not left to that assumption alone: a ``PING`` goes out only
  after :attr:`AppLiveness.probe_after` seconds without any frame, so a connection
  carrying data sends none, and a silent one sends at most one per
  :attr:`~AppLiveness.probe_after` (10 a minute at the default keepalive).

Pure: no socket, no clock; the link (:mod:`broker.upstream`) calls :meth:`AppLiveness.step`
every :attr:`AppLiveness.poll_every` seconds and carries out what it answers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROBE", "AppLiveness", "Probe", "Stalled"]

PROBE = "PING"
"""The text message Upbit's application answers with ``{"status":"UP"}``."""


@dataclass(frozen=True, slots=True)
class Probe:
    """Send :data:`PROBE` now."""


@dataclass(frozen=True, slots=True)
class Stalled:
    """The application has not answered: report the connection stale and drop it."""

    silent_for: float
    """Seconds since the application's last frame (or since the connection opened)."""
    answered_before: bool
    """False when the application never answered on this connection."""

    @property
    def detail(self) -> str:
        """A sentence for logs and status events."""
        if not self.answered_before:
            return f"no answer to PING within {self.silent_for:.0f} s of connecting"
        return (
            f"nothing from Upbit's application for {self.silent_for:.0f} s "
            "(pongs, but no data and no answer to PING); reconnecting"
        )


class AppLiveness:
    """One connection's application sign of life, and when to ask for one.

    Timings derive from the link's ``keepalive`` (the ping-frame interval, 4 s): a
    ``PING`` after ``1.5 x keepalive`` of silence, a stall after ``3 x keepalive`` of
    silence with a ``PING`` unanswered for at least ``keepalive``. Polled every
    ``keepalive / 8`` (a frame is noticed at the next poll), a stall is declared within
    ``3.25 x keepalive`` (13 s) of the application's last frame. Before the first answer
    the link is not trusted yet: ``PING`` at once, again every ``keepalive``.
    """

    def __init__(self, now: float, frames: int, *, keepalive: float = 4.0) -> None:
        """``frames``: the connection's frame count so far (any later change is a sign
        of life)."""
        self.probe_after = 1.5 * keepalive
        """Seconds of silence after which a ``PING`` asks the application for an answer."""
        self.stall_after = 3.0 * keepalive
        """Seconds of silence after which the application counts as stalled."""
        self.answer_within = keepalive
        """The least time a ``PING`` is given to be answered before a stall is declared."""
        self.poll_every = keepalive / 8
        """How often the link should call :meth:`step`."""
        self._frames = frames
        self._last_sign = now
        self._probed_at: float | None = None
        self._answered = False

    @property
    def answered(self) -> bool:
        """True once the application sent anything on this connection."""
        return self._answered

    def step(self, now: float, frames: int) -> Probe | Stalled | None:
        """What to do at ``now``, given the connection's frame count ``frames``."""
        if frames != self._frames:
            self._frames = frames
            self._last_sign = now
            self._probed_at = None
            self._answered = True
        silent = now - self._last_sign
        probed_at = self._probed_at
        unanswered = None if probed_at is None else now - probed_at
        if unanswered is not None and unanswered >= self.answer_within:
            if silent >= self.stall_after:
                return Stalled(silent, self._answered)
            if not self._answered:  # not trusted yet: ask again, never wait idle
                self._probed_at = now
                return Probe()
        if probed_at is None and (silent >= self.probe_after or not self._answered):
            self._probed_at = now
            return Probe()
        return None
