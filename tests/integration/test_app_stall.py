"""Application stalls behind live pongs, and quiet markets, with real processes.

The simulator's ``kind: "app"`` stall keeps answering WebSocket pings while sending no
data and no ``{"status":"UP"}``: only the broker's text ``PING`` check can see it. A quiet
market is the opposite case: no data either, but the application answers ``PING``, and
the connection must stay up. Times as in test_resilience.py (one machine, one clock).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest

from tests.integration.conftest import BrokerProc, Sim, broker_env, run_broker_proc
from tests.integration.test_resilience import (  # noqa: F401 (pair: a fixture)
    PUBLIC,
    Checks,
    Figures,
    all_records,
    check_clients,
    first_rest,
    live_public,
    pair,
    rest_flowing,
    rounded,
    soft_wait,
    status_at,
    statuses_seen,
    topics_flowing,
    union_time,
    within,
    ws_back,
)
from tests.integration.test_sharing import Agent
from tests.support import scaled, wait_until

DETECT_APP_STALL = 15.0
"""An application stall is reported within 15 s (13 s by design at the 4 s keepalive:
a PING after 6 s of silence, the stall at 12 s, polled every 0.5 s)."""
GRACE = 3.0
"""The public REST fallback starts after the link has been down this long."""
QUIET_KEEPALIVE = 2.0
"""The quiet-market broker's keepalive: half the default, so every bound is halved too."""
QUIET_FOR = 15.0
"""Quiet time watched: at the halved keepalive, worth 30 s at the default one."""


def test_an_app_stall_of_30s_is_detected_served_from_rest_and_restored(
    sim: Sim,
    broker: BrokerProc,
    pair: list[Agent],  # noqa: F811 (the fixture imported above)
) -> None:
    checks = Checks("app stall 30 s")
    stall = 30.0
    answer = sim.control("stall", {"seconds": stall, "path": PUBLIC, "kind": "app"})
    stall_end = float(answer["stalled_until"])
    figures = Figures("app stall 30 s", stall_end - stall)

    stale = soft_wait(lambda: status_at(pair, "stale", figures.fault_at), DETECT_APP_STALL + 5)
    down = soft_wait(lambda: status_at(pair, "down", figures.fault_at), 5)
    since = down or figures.fault_at + DETECT_APP_STALL
    # Meanwhile REST carries the data (the fallback reacts to the link going down).
    rest_all = rest_flowing(pair, since, min(GRACE + 7, stall_end - time.time()))
    figures.mark("stale", stale)
    figures.mark("down", down)
    figures.mark("first_rest_data_after_down", first_rest(pair, since), since=down)
    figures.mark("rest_data_on_every_topic_after_down", rest_all, since=down)

    restored_at = union_time(sim, stall_end - time.time() + DETECT_APP_STALL, since)
    back_at = ws_back(pair, max(restored_at or 0.0, stall_end), DETECT_APP_STALL)
    restored = status_at(pair, "restored", stall_end)
    early_restored = [
        m["ts"] / 1000 - figures.fault_at
        for m in all_records(pair)
        if m.get("status") == "restored" and figures.fault_at <= m["ts"] / 1000 < stall_end
    ]
    figures.mark("restored_after_stall_end", restored, since=stall_end)
    figures.mark("union_upstream_after_stall_end", restored_at, since=stall_end)
    figures.mark("websocket_data_after_stall_end", back_at, since=stall_end)
    figures.show()

    v = figures.values
    checks.check(
        within(v["stale"], scaled(DETECT_APP_STALL)),
        f"app stall reported stale after {rounded(v['stale'])} s (bound {DETECT_APP_STALL:g} s)",
    )
    checks.check(
        within(v["down"], scaled(DETECT_APP_STALL)),
        f"link down after {rounded(v['down'])} s (bound {DETECT_APP_STALL:g} s)",
    )
    checks.check(stale is None or down is None or stale <= down, "stale came after down")
    checks.check(rest_all is not None, "no REST data on every topic during the stall")
    checks.check(not early_restored, f"'restored' while the app was stalled: {early_restored}")
    checks.check(
        within(v["restored_after_stall_end"], scaled(DETECT_APP_STALL)),
        "no 'restored' within 15 s of the stall's end",
    )
    checks.check(
        within(v["websocket_data_after_stall_end"], scaled(DETECT_APP_STALL)),
        "websocket data not back on every topic within 15 s of the stall's end",
    )
    check_clients(
        checks,
        pair,
        figures.fault_at,
        {"stale", "down", "reconnecting", "restored", "source_rest", "source_websocket"},
        stall_end,
    )
    checks.verify()


@pytest.fixture
def quiet_broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    """A broker with the keepalive halved, over a market with no events at all."""
    sim.control("rate", {"per_second": 0})
    env = broker_env(sim, extra={"UPBIT_BROKER_KEEPALIVE": f"{QUIET_KEEPALIVE:g}"})
    try:
        yield from run_broker_proc(env, monkeypatch)
    finally:
        sim.control("rate", {"per_second": 20})  # the module's simulator, as it was


def test_a_quiet_market_answering_ping_keeps_its_connection(
    sim: Sim, quiet_broker: BrokerProc
) -> None:
    agent = Agent("Q", quiet_broker.env, ["ticker:KRW-BTC"])
    try:
        wait_until(
            lambda: topics_flowing(agent, 0.0, "websocket", {"ticker/KRW-BTC/"}),
            timeout=15,
            what="the ticker's snapshot over the WebSocket",
        )
        conn = wait_until(lambda: live_public(sim), timeout=5, what="one public connection")
        assert conn is not None
        start = time.time()
        # A PING after every 3 s of silence: enough of them means QUIET_FOR has passed
        # with the application answering each one (a condition, not a sleep).
        probe_every = 1.5 * QUIET_KEEPALIVE
        wanted = math.ceil(QUIET_FOR / probe_every) + 1
        wait_until(
            lambda: (live_public(sim) or {}).get("pings", 0) >= wanted,
            timeout=scaled(QUIET_FOR * 2),
            what=f"{wanted} PINGs on the quiet connection",
        )
        quiet_for = time.time() - start
        now = live_public(sim)
        assert now is not None
        assert now["id"] == conn["id"], "the quiet connection was replaced"
        closed = [c for c in sim.connections(PUBLIC, closed=True) if c.get("closed")]
        assert closed == [], f"a public connection was closed: {closed}"
        assert quiet_for >= QUIET_FOR - probe_every
        seen = statuses_seen(agent, start)
        assert not seen & {"stale", "down", "reconnecting", "restored"}, seen
        assert not [m for m in agent.data() if m["src"] == "rest"], "REST data on a live link"
        print(f"\n[app-stall] quiet market: {now['pings']} PINGs answered in {quiet_for:.1f} s")
    finally:
        agent.stop()
