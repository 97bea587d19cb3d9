"""Clients learn of a broker outage promptly, once, and in order (real processes).

A client agent (``tests/integration/agent.py``) records every status event its
subscriptions receive, stamped with its local receive time ``rx``; the test kills or
stops the broker and reads the record. Each agent subscription holds one topic, so each
status line is one event on one topic. The broker runs with a 0.5 s heartbeat
(``tests/integration/conftest.py``): a SIGKILL must be detected within two intervals
(the client's socket monitor sees the connection close, so in practice at once), a
SIGTERM at once (the broker says goodbye), a frozen broker after
:data:`clients.core.LOST_AFTER` silent intervals and not before: a broker busy for a
moment is not reported ``down``.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import Any

from clients import BrokerClient
from clients.core import LOST_AFTER
from schemas.bus import StatusEvent
from tests.integration.conftest import BrokerProc, Sim, wait_ready
from tests.integration.test_sharing import Agent
from tests.support import Child, async_wait_until, scaled, wait_until

HEARTBEAT = 0.5
"""``UPBIT_BROKER_HEARTBEAT`` of the test broker."""
STREAMS = ["ticker:KRW-BTC", "trade:KRW-BTC"]
TOPICS = {"ticker/KRW-BTC/", "trade/KRW-BTC/"}
LATENCY = 0.25
"""Allowance for two processes on a loaded machine to notice and write a line."""


def statuses(agent: Agent, after: float = 0.0) -> list[dict[str, Any]]:
    """Status lines the agent received at or after ``after`` (its local clock)."""
    return [m for m in agent.messages() if "status" in m and m["rx"] >= after]


def first_rx(agent: Agent, state: str, after: float) -> float | None:
    """When the agent first received ``state`` after ``after``."""
    return next((m["rx"] for m in statuses(agent, after) if m["status"] == state), None)


def flowing_after(agent: Agent, after: float, what: str) -> None:
    """Wait for data on every topic received after ``after``."""
    wait_until(
        lambda: {m["t"] for m in agent.data() if m["rx"] > after} >= TOPICS,
        10,
        what=f"data on every topic after {what}",
    )


def settled(agent: Agent, after: float) -> None:
    """Wait for data on every topic after the last status line: the broker publishes a
    status event on a topic in order with its data, so no copy of it can come later."""
    flowing_after(agent, max(m["rx"] for m in statuses(agent, after)), "the status events")


def arrival(agent: Agent, state: str, after: float, timeout: float) -> float:
    """Wait for the agent to receive ``state`` after ``after``; when it did."""
    rx = wait_until(lambda: first_rx(agent, state, after), timeout, what=state)
    assert rx is not None
    return rx


def start_agent(broker: BrokerProc, name: str) -> Agent:
    agent = Agent(name, broker.env, STREAMS)
    # Every subscription has reported its link's state at least once: the test
    # starts from a quiet record.
    wait_until(lambda: first_rx(agent, "up", 0.0), 10, what="the link to be up")
    return agent


def restart_broker(broker: BrokerProc) -> None:
    broker.child = Child("broker", ["-m", "broker"], env=broker.env)
    wait_ready(broker.env)


def test_a_killed_broker_is_reported_down_within_two_heartbeats(
    sim: Sim, broker: BrokerProc
) -> None:
    agent = start_agent(broker, "kill")
    try:
        killed = time.time()
        broker.child.kill()
        down = arrival(agent, "down", killed, 10)
        print(f"[outage] SIGKILL: down after {down - killed:.3f} s")
        assert down - killed <= scaled(2 * HEARTBEAT + LATENCY), (
            f"down {down - killed:.2f} s after the SIGKILL (bound {2 * HEARTBEAT:g} s)"
        )
        # The outage is a gap on every topic held, and is told once per topic.
        wait_until(
            lambda: sum(m["status"] == "gap" for m in statuses(agent, killed)) >= 2, 5, what="gap"
        )
        seen = Counter(m["status"] for m in statuses(agent, killed))
        assert seen["down"] == len(STREAMS), f"one down per topic expected: {seen}"
        assert seen["gap"] == len(STREAMS), f"one gap per topic expected: {seen}"
    finally:
        agent.stop()


def test_a_broker_frozen_for_one_heartbeat_is_not_reported_down(
    sim: Sim, broker: BrokerProc
) -> None:
    agent = start_agent(broker, "pause")
    try:
        frozen = time.time()
        broker.child.signal(signal.SIGSTOP)
        try:
            # The stimulus, not a wait: the broker is frozen for one heartbeat interval,
            # a third of the silence that would mean it is gone.
            time.sleep(HEARTBEAT)
        finally:
            broker.child.signal(signal.SIGCONT)
        resumed = time.time()
        flowing_after(agent, resumed, "the broker resumed")
        seen = {m["status"] for m in statuses(agent, frozen)}
        assert not seen & {"down", "reconnecting", "gap"}, (
            f"a broker frozen for {resumed - frozen:.2f} s was reported: {seen}"
        )
    finally:
        broker.child.signal(signal.SIGCONT)
        agent.stop()


def test_a_frozen_broker_is_reported_down_after_its_silence_and_recovered(
    sim: Sim, broker: BrokerProc
) -> None:
    agent = start_agent(broker, "freeze")
    try:
        frozen = time.time()
        broker.child.signal(signal.SIGSTOP)
        try:
            down = arrival(agent, "down", frozen, scaled(10))
        finally:
            broker.child.signal(signal.SIGCONT)
        silence = LOST_AFTER * HEARTBEAT
        print(f"[outage] SIGSTOP: down after {down - frozen:.3f} s (silence bound {silence:g} s)")
        # The last heartbeat went out at most one interval before the freeze.
        assert down - frozen >= silence - HEARTBEAT, f"down {down - frozen:.2f} s: too eager"
        assert down - frozen <= scaled(silence + HEARTBEAT / 4 + LATENCY), (
            f"down {down - frozen:.2f} s after the freeze (bound {silence:g} s)"
        )
        # Once it runs again the same subscriptions are restored, with data.
        flowing_after(agent, arrival(agent, "restored", down, scaled(15)), "the recovery")
    finally:
        broker.child.signal(signal.SIGCONT)
        agent.stop()


def test_a_stopped_broker_says_goodbye_and_clients_report_down_at_once(
    sim: Sim, broker: BrokerProc
) -> None:
    agent = start_agent(broker, "term")
    try:
        stopped = time.time()
        broker.child.signal(signal.SIGTERM)
        down = arrival(agent, "down", stopped, 10)
        print(f"[outage] SIGTERM: down after {down - stopped:.3f} s")
        assert down - stopped <= scaled(HEARTBEAT), (
            f"down {down - stopped:.2f} s after the SIGTERM: no goodbye heard"
        )
        broker.child.proc.wait(scaled(10))
        seen = Counter(m["status"] for m in statuses(agent, stopped))
        assert seen["down"] == len(STREAMS), f"one down per topic expected: {seen}"
    finally:
        agent.stop()


def test_each_status_transition_reaches_each_topic_once(sim: Sim, broker: BrokerProc) -> None:
    agent = start_agent(broker, "once")
    try:
        # The first connect of the link: connecting/up, never reconnecting/restored, and
        # at most once per topic (a subscription made once the link is up hears nothing).
        first = [m["status"] for m in statuses(agent)]
        assert "reconnecting" not in first, first
        assert "restored" not in first, first
        per_state = Counter(first)
        assert 1 <= per_state["up"] <= len(STREAMS), f"up more than once per topic: {first}"
        assert per_state["connecting"] <= len(STREAMS), f"connecting repeated: {first}"
        # An upstream drop: every transition once per topic.
        dropped = time.time()
        sim.control("drop", {})
        wait_until(
            lambda: sum(m["status"] == "restored" for m in statuses(agent, dropped)) >= 2,
            15,
            what="restored on every topic",
        )
        settled(agent, dropped)
        seen = Counter(m["status"] for m in statuses(agent, dropped))
        for state in ("down", "reconnecting", "restored"):
            assert seen[state] == len(STREAMS), f"{state} not once per topic: {seen}"
    finally:
        agent.stop()


def test_after_a_broker_restart_reconnecting_comes_before_restored(
    sim: Sim, broker: BrokerProc
) -> None:
    agent = start_agent(broker, "restart")
    try:
        killed = time.time()
        broker.child.kill()
        arrival(agent, "down", killed, 10)
        restart_broker(broker)
        wait_until(
            lambda: sum(m["status"] == "restored" for m in statuses(agent, killed)) >= 2,
            15,
            what="restored on every topic",
        )
        settled(agent, killed)
        states = [m["status"] for m in statuses(agent, killed)]
        print(f"[outage] restart: {states}")
        seen = Counter(states)
        for state in ("down", "reconnecting", "restored"):
            assert seen[state] == len(STREAMS), f"{state} not once per topic: {states}"
        reconnecting = [i for i, s in enumerate(states) if s == "reconnecting"]
        restored = [i for i, s in enumerate(states) if s == "restored"]
        assert max(reconnecting) < min(restored), f"restored before reconnecting: {states}"
    finally:
        agent.stop()


async def test_a_callback_blocking_for_longer_than_the_expiry_keeps_its_client(
    sim: Sim, broker: BrokerProc
) -> None:
    # The broker expires a client silent for 1.5 s (0.5 s x 3); the callback blocks the
    # client's event loop for 5 s. Heartbeats go out from their own thread meanwhile.
    events: list[StatusEvent] = []
    blocked: list[float] = []

    def slow(_: object) -> None:
        if not blocked:
            blocked.append(time.monotonic())
            time.sleep(5.0)  # the user's slow code under test
            blocked.append(time.monotonic())

    async with BrokerClient(name="slow") as client:
        epoch = client.epoch
        await client.subscribe_ticker("KRW-BTC", slow, on_status=events.append)
        await async_wait_until(lambda: len(blocked) == 2, 15, what="the slow callback")
        metrics = await client.metrics()
        assert [c.name for c in metrics.clients] == ["slow"], "the broker forgot the client"
        assert client.connected
        assert client.epoch == epoch
    # Expired, it would have said hello again (and lost its streams meanwhile).
    joined = [line for line in broker.child.output().splitlines() if "client joined" in line]
    assert sum("name=slow" in line for line in joined) == 1, joined
    assert [e.state for e in events if e.state in ("down", "reconnecting")] == []
