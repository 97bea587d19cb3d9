"""The application-liveness decision on a fake clock: when to PING, when it is a stall."""

from __future__ import annotations

import pytest

from broker.config import ConfigError
from broker.keepalive import AppLiveness, Probe, Stalled
from broker.upstream import KEEPALIVE_ENV, keepalive_setting

KEEPALIVE = 4.0


def answered_at(now: float = 0.0) -> AppLiveness:
    """A tracker whose application answered at ``now`` (the link is up)."""
    app = AppLiveness(now - 0.1, 0, keepalive=KEEPALIVE)
    assert app.step(now - 0.1, 0) == Probe()
    assert app.step(now, 1) is None
    assert app.answered
    return app


def run(app: AppLiveness, start: float, end: float, frames: int) -> list[tuple[float, object]]:
    """Step every poll from ``start`` to ``end`` with a fixed frame count: what happened."""
    seen: list[tuple[float, object]] = []
    t = start
    while t <= end + 1e-9:
        action = app.step(t, frames)
        if action is not None:
            seen.append((round(t, 3), action))
        t += app.poll_every
    return seen


def test_a_new_connection_is_probed_at_once_and_again_every_keepalive_until_it_answers() -> None:
    app = AppLiveness(100.0, 7, keepalive=KEEPALIVE)
    assert not app.answered
    assert run(app, 100.0, 108.0, 7) == [(100.0, Probe()), (104.0, Probe()), (108.0, Probe())]
    assert app.step(108.5, 8) is None
    assert app.answered


def test_a_new_connection_that_never_answers_is_stalled_after_three_keepalives() -> None:
    app = AppLiveness(0.0, 0, keepalive=KEEPALIVE)
    events = run(app, 0.0, 12.0, 0)
    assert events[-1] == (12.0, Stalled(12.0, answered_before=False))
    assert "of connecting" in Stalled(12.0, answered_before=False).detail


def test_a_connection_carrying_data_is_never_probed() -> None:
    app = answered_at(0.0)
    frames = 1
    t = 0.0
    while t < 120.0:  # a frame every 5 s: always under the 6 s of silence that probes
        t += app.poll_every
        if t % 5.0 < app.poll_every:
            frames += 1
        assert app.step(t, frames) is None


def test_a_silent_connection_is_probed_after_one_and_a_half_keepalives_once() -> None:
    app = answered_at(0.0)
    events = run(app, 0.5, 11.5, 1)
    assert events == [(6.0, Probe())]


def test_an_answer_to_the_probe_keeps_a_quiet_connection_alive_indefinitely() -> None:
    app = answered_at(0.0)
    frames = 1
    probes = 0
    t = 0.0
    while t < 600.0:  # ten minutes of a market with no events, answering every PING
        t += app.poll_every
        action = app.step(t, frames)
        assert not isinstance(action, Stalled), f"a quiet market looked stalled at {t}"
        if isinstance(action, Probe):
            probes += 1
            frames += 1  # {"status":"UP"}, read by the next poll
    # At most one PING per 6 s of silence: ~10 a minute, never a burst.
    assert 90 <= probes <= 100


def test_status_every_ten_seconds_after_one_ping_also_counts_as_alive() -> None:
    # The other reading of Upbit's docs: UP every ~10 s, whatever the PINGs.
    app = answered_at(0.0)
    frames = 1
    t = 0.0
    while t < 300.0:
        t += app.poll_every
        if t % 10.0 < app.poll_every:
            frames += 1
        assert not isinstance(app.step(t, frames), Stalled)


def test_an_application_that_stops_answering_is_stalled_within_the_bound() -> None:
    app = answered_at(50.0)
    # The last frame came just after the poll at 50.0: seen only at the next poll.
    events = run(app, 50.5, 70.0, 2)
    probes = [t for t, a in events if isinstance(a, Probe)]
    stalls = [(t, a) for t, a in events if isinstance(a, Stalled)]
    assert probes == [56.5]
    t, stall = stalls[0]
    assert isinstance(stall, Stalled)
    assert stall.answered_before
    # 12 s of silence from the poll that saw the last frame; 13 s bound from the frame.
    assert t == 62.5
    assert t - 50.0 <= 3.25 * KEEPALIVE
    assert "no answer to PING" in stall.detail


def test_no_stall_without_a_probe_unanswered_for_a_keepalive() -> None:
    # The broker itself froze for 20 s (no polls): its silence is no proof of a stall.
    app = answered_at(0.0)
    assert app.step(20.0, 1) == Probe()
    assert app.step(22.0, 1) is None  # the PING has 4 s to be answered
    assert app.step(23.0, 2) is None  # and was
    assert app.step(24.0, 2) is None


def test_an_unanswered_probe_after_a_freeze_is_a_stall_a_keepalive_later() -> None:
    app = answered_at(0.0)
    assert app.step(20.0, 1) == Probe()
    assert app.step(23.9, 1) is None
    assert app.step(24.0, 1) == Stalled(24.0, answered_before=True)


def test_timings_scale_with_the_keepalive() -> None:
    app = AppLiveness(0.0, 0, keepalive=1.0)
    assert (app.probe_after, app.stall_after, app.answer_within, app.poll_every) == (
        1.5,
        3.0,
        1.0,
        0.125,
    )


def test_the_keepalive_interval_defaults_to_four_seconds_and_tests_may_shrink_it() -> None:
    assert keepalive_setting({}) == 4.0
    assert keepalive_setting({KEEPALIVE_ENV: "1.5"}) == 1.5
    for bad in ("0", "-1", "soon", "1000"):
        with pytest.raises(ConfigError, match=KEEPALIVE_ENV):
            keepalive_setting({KEEPALIVE_ENV: bad})
