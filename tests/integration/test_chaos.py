"""The randomized fault test (seeded, ~75 s), unit tests of its pure checks, and one
strict xfail test per bug the chaos runs found (each reproduced deterministically).

``UPBIT_CHAOS_SEED=N`` replays a run; a failure prints the seed and the fault sequence.
The long soak is ``python -m bench.chaos --minutes 30`` (same module: ``tests/chaos.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator

import pytest

from broker.config import Settings
from broker.private_store import PRIVATE_STATE_FILE, PrivateStore, owner_tag
from tests.chaos import (
    BROKER_ENV,
    FAULT_KINDS,
    INVARIANTS,
    PRIVATE,
    SEED_ENV,
    WRONG_SECRET,
    AgentLog,
    Orders,
    PlacedOrder,
    Record,
    Run,
    Tapped,
    limit_violations,
    make_schedule,
    order_deliveries,
    private_synced,
    silent_losses,
)
from tests.harness import (
    SIM_KEYS,
    Broker,
    Child,
    Sim,
    broker_env,
    start_broker,
    start_sim,
    wait_ready,
    wait_until,
)

SUITE_SECONDS = 75.0
SUITE_SEED = 3
"""The suite replays one schedule (all ten fault kinds) so that it does not flake on a
new seed; ``UPBIT_CHAOS_SEED`` picks another, ``bench.chaos`` draws a fresh one."""


def test_a_seed_fixes_the_schedule_and_every_kind_comes_in_a_short_run() -> None:
    assert make_schedule(7, 200) == make_schedule(7, 200)
    assert make_schedule(7, 200) != make_schedule(8, 200)
    assert {f.kind for f in make_schedule(7, 200)} == set(FAULT_KINDS)


def test_a_hole_in_the_sequence_is_a_loss_unless_a_gap_was_told() -> None:
    tapped = [Tapped("ticker/A/", "e1", s, False) for s in range(1, 6)]
    data = [{"t": "ticker/A/", "e": "e1", "s": s, "rx": float(s)} for s in (1, 2, 5)]
    assert silent_losses(data, tapped)
    gap = {"status": "gap", "t": "ticker/A/", "topics": ["ticker/A/"], "rx": 4.0}
    assert silent_losses([*data[:2], gap, data[2]], tapped) == []
    prefix = {"status": "gap", "t": "_client/", "topics": ["ticker/"], "rx": 4.0}
    assert silent_losses([*data[:2], prefix, data[2]], tapped) == []
    # A seq the broker used for a status event is no loss.
    status_tap = [
        *tapped[:2],
        Tapped("ticker/A/", "e1", 3, True),
        Tapped("ticker/A/", "e1", 4, True),
    ]
    assert silent_losses(data, status_tap) == []
    assert silent_losses([*data, data[0]], tapped)  # delivered twice


def test_an_order_event_must_arrive_once_or_under_a_gap() -> None:
    order = PlacedOrder("u1", placed=10.0, trades=["f1"], final="done", ended=10.0)
    once: list[Record] = [
        {"t": "myOrder/", "u": "u1", "st": "trade", "tu": "f1", "rx": 11.0},
        {"t": "myOrder/", "u": "u1", "st": "done", "tu": None, "rx": 11.1},
    ]
    assert order_deliveries([order], once, joined=0.0) == (2, [])
    assert order_deliveries([order], once + once[1:], joined=0.0)[1]  # done twice
    assert order_deliveries([order], [], joined=0.0)[1]  # lost, nothing told
    gap = {"status": "gap", "t": "myOrder/", "topics": ["myOrder/"], "rx": 12.0}
    assert order_deliveries([order], [gap], joined=0.0)[1] == []
    assert order_deliveries([order], [], joined=20.0) == (0, [])


def test_an_order_event_published_late_is_judged_at_its_publication() -> None:
    # Published by a restarted broker at 30 s, after the client's gap at 29 s: covered,
    # although the client got other myOrder messages between the fill (10 s) and then.
    order = PlacedOrder("u1", placed=10.0, trades=[], final="done", ended=10.0)
    other = {"t": "myOrder/", "u": "u2", "st": "wait", "tu": None, "e": "a", "s": 1, "rx": 15.0}
    gap = {"status": "gap", "t": "_client/", "topics": ["myOrder/"], "rx": 29.0}
    late = {"t": "myOrder/", "u": "u3", "st": "wait", "tu": None, "e": "b", "s": 9, "rx": 31.0}
    records: list[Record] = [other, gap, late]
    assert order_deliveries([order], records, 0.0)[1]  # judged at 10 s: not covered
    published = [(30.0, "u1", "done", None)]
    assert order_deliveries([order], records, 0.0, published=published)[1] == []


def test_repeats_and_silent_losses_are_failures_whatever_the_fault() -> None:
    order = PlacedOrder("u1", placed=10.0, trades=[], final="done", ended=10.0)
    done = {"t": "myOrder/", "u": "u1", "st": "done", "tu": None, "e": "a", "s": 4, "rx": 11.0}
    recovery = {"status": "reconnecting", "t": "_client/", "topics": ["myOrder/"], "rx": 12.0}
    # Repeats are failures, after a recovery or a restart alike (both were fixed).
    assert order_deliveries([order], [done, recovery, done], 0.0)[1]
    replay = {**done, "e": "b", "s": 1}
    assert order_deliveries([order], [done, replay], 0.0)[1]
    assert order_deliveries([order], [done, done], 0.0)[1]
    # A loss with no gap is a failure, in a stall or not (the stall loss was fixed).
    assert order_deliveries([order], [], 0.0)[1]
    assert order_deliveries([order], [done], 0.0)[1] == []


def test_refusals_outside_injected_faults_and_connects_inside_a_block_are_caught() -> None:
    def stats(log: list[tuple[float, int]], rest_429: int = 0) -> dict[str, object]:
        return {
            "rest": {"groups": {"default": {"429": rest_429, "failed": 3}}},
            "ws": {"rate_limited": 0},
            "upgrades": {"log": [{"t": t, "path": "/", "status": s} for t, s in log]},
        }

    injected = [(10.0, 14.0, 418)]
    assert limit_violations(stats([(10.5, 418), (14.5, 101)]), injected) == []
    assert limit_violations(stats([(10.5, 418), (12.0, 418)]), injected)
    assert limit_violations(stats([(20.0, 429)]), injected)
    assert limit_violations(stats([], rest_429=1), injected)


@pytest.mark.timeout(600)
def test_no_event_is_lost_or_misreported_under_random_faults() -> None:
    seed = int(os.environ.get(SEED_ENV) or SUITE_SEED)
    report = Run(seed, SUITE_SECONDS).run()
    print(report.table())
    assert not report.failed(), f"invariants failed: {report.failed()}\n{report.table()}"
    assert report.deliveries_checked > 0
    assert report.streams_checked > 0
    assert len(INVARIANTS) == len(report.problems)


@contextlib.contextmanager
def private_follower(**env: str) -> Iterator[tuple[Sim, Broker, AgentLog]]:
    """A simulator, a broker with its keys and one myOrder agent, the private link up;
    ``env`` adds to (or overrides) the broker's chaos settings."""
    sim = start_sim(["--rate", "5"], log_level="warning")
    extra = {**BROKER_ENV, **env}
    broker = start_broker(broker_env(sim, keys=True, log_level="info", extra=extra))
    agent = AgentLog("follower", broker.env, ["myOrder"])
    try:
        wait_until(lambda: private_synced(sim), 20, what="myOrder subscribed and synced")
        yield sim, broker, agent
    finally:
        # Shown when a test fails: what the client recorded and what the (last) broker said.
        print("--- follower records (last 40) ---")
        for record in agent.poll()[-40:]:
            print(json.dumps(record)[:300])
        print(agent.child.output(3000))
        agent.stop()
        shutil.rmtree(agent.path.parent, ignore_errors=True)
        broker.stop()
        print(broker.child.output(20000))
        sim.stop()


def test_a_client_expired_by_the_broker_does_not_get_its_last_order_event_twice() -> None:
    # Found by the chaos run (UPBIT_CHAOS_SEED=1): a client that recovers against the
    # same broker epoch is handed, in the re-subscribe snapshot, the myOrder event it
    # already had (same topic, epoch and seq): one "done" delivered twice.
    with private_follower() as (sim, _, agent):
        order = Orders(sim, seed=0).place(filled=True)
        wait_until(lambda: events(agent, order.uuid, "done"), 15, what="the order's done event")
        agent.child.signal(signal.SIGSTOP)  # silent for 4 s: the broker expires it (1.5 s)
        time.sleep(4.0)  # the fault itself: a stopped client, not a wait for a condition
        stopped = time.time()
        agent.child.signal(signal.SIGCONT)
        wait_until(lambda: agent_saw(agent, "restored", stopped), 20, what="the client back")
        assert len(events(agent, order.uuid, "done")) == 1, events(agent, order.uuid, "done")


def test_an_order_event_published_just_before_a_broker_sigkill_is_not_published_again() -> None:
    # Found by the chaos run (UPBIT_CHAOS_SEED=3, broker_kill 0.4 s after a fill): the
    # restarted broker reported wait, both fills and done of an order a second time.
    with private_follower() as (sim, broker, agent):
        orders = Orders(sim, seed=0)
        first = orders.place(filled=True)
        wait_until(lambda: events(agent, first.uuid, "done"), 15, what="the first order")
        second = orders.place(filled=True)  # within the 1 s save interval of the first
        wait_until(lambda: events(agent, second.uuid, "done"), 15, what="the second order")
        killed = time.time()
        broker.child.kill()
        broker.child = Child(broker.child.name, broker.args, env=broker.env)
        wait_ready(broker.env, broker.child)
        wait_until(lambda: agent_saw(agent, "restored", killed), 20, what="the client back")
        # Whatever the new broker reports from REST comes in its first seconds.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: len(events(agent, second.uuid, "done")) > 1, 5, what="a replay")
        assert len(events(agent, second.uuid, "done")) == 1, events(agent, second.uuid, "done")


@pytest.mark.parametrize(("kind", "seconds"), [("app", 4.0), ("link", 2.0)])
def test_an_order_filled_during_a_short_private_stall_reaches_the_client(
    kind: str, seconds: float
) -> None:
    # Found by the chaos runs (UPBIT_CHAOS_SEED=3, stall_app 3.9 s; seed 5, stall_link
    # 2.1 s): the orders filled in a stall shorter than its detection were never
    # published and no gap was told (the simulator drops what a stall holds; the link
    # never looked down). The broker's REST audit (every 5 s here) finds them.
    with private_follower() as (sim, _, agent):
        orders = Orders(sim, seed=0)
        sim.control("stall", {"seconds": seconds, "kind": kind, "path": PRIVATE})
        lost = orders.place(filled=True)
        faults = f"{kind}_stall" if kind == "app" else "stall"
        wait_until(lambda: not sim.control("")["faults"][faults], 10, what="the stall over")
        after = orders.place(filled=True)
        wait_until(lambda: events(agent, after.uuid, "done"), 15, what="an order after it")
        wait_until(lambda: events(agent, lost.uuid, "done"), 20, what="the order lost in the stall")
        # Exactly the story the stream would have told, once, from REST, with no gap.
        checked, problems = order_deliveries([lost], agent.records, 0.0)
        assert problems == []
        assert checked == len(lost.trades) + 1
        story = [r for r in agent.records if r.get("u") == lost.uuid]
        assert [r["st"] for r in story] == ["wait", *["trade"] * len(lost.trades), "done"]
        assert {r["src"] for r in story} == {"rest"}, story
        assert not gap_told(agent)


def test_what_a_restarted_brokers_first_sync_publishes_reaches_the_resubscribed_client() -> None:
    # Found by the soak (seed 1847964149): an order lost in a short stall, the REST
    # fallback failing (429), then the broker restarted, with wrong keys first. The new
    # broker's first REST sync found the order and published it at once, while the
    # client's fresh SUB was not yet connected (the slow joiner): a new topic, no
    # baseline, so no gap either. The client now waits for its data path first.
    with private_follower() as (sim, broker, agent):
        orders = Orders(sim, seed=0)
        sim.control("stall", {"seconds": 1.0, "kind": "app", "path": PRIVATE})
        lost = orders.place(filled=True)
        wait_until(lambda: not sim.control("")["faults"]["app_stall"], 10, what="the stall over")
        sim.control("rest_fail", {"seconds": 3.0, "status": 429})
        sim.control("drop", {"path": PRIVATE})
        wait_until(lambda: not sim.control("")["faults"]["rest_fail"], 10, what="the 429s over")
        broker.env["UPBIT_SECRET_KEY"] = WRONG_SECRET
        try:
            restart_broker(broker)
        finally:
            broker.env["UPBIT_SECRET_KEY"] = SIM_KEYS["UPBIT_SECRET_KEY"]
        restart_broker(broker)
        wait_until(lambda: events(agent, lost.uuid, "done"), 20, what="the order lost in the stall")
        assert len(events(agent, lost.uuid, "done")) == 1


def saved_known_ms(env: dict[str, str]) -> int | None:
    """The time up to which the broker's saved private state claims to know the account."""
    settings = Settings.from_env(env)
    access = "" if settings.access_key is None else settings.access_key.reveal()
    store = PrivateStore(
        settings.state_dir / PRIVATE_STATE_FILE, owner_tag(settings.rest_url, access)
    )
    saved = store.load()
    return None if saved is None else saved.known_ms


def test_the_saved_state_never_claims_what_an_unnoticed_stall_lost() -> None:
    # Found reading the CI failure of the test above: while its link looked up, the
    # broker saved "known up to now", although a stall nothing had detected could just
    # have cost the stream an order. Any later private event saved that time, and a
    # broker restarted more than a minute later (the closed-order margin) asked Upbit
    # only for what closed after it: the order was never told. Known is what the last
    # REST sync saw. (A long audit interval: no audit runs meanwhile.)
    with private_follower(UPBIT_BROKER_PRIVATE_AUDIT="120") as (sim, broker, agent):
        orders = Orders(sim, seed=0)
        sim.control("stall", {"seconds": 3.0, "kind": "app", "path": PRIVATE})
        lost = orders.place(filled=True)
        wait_until(lambda: not sim.control("")["faults"]["app_stall"], 10, what="the stall over")
        later = orders.place(filled=True)  # streamed: the broker saves after the loss
        wait_until(lambda: events(agent, later.uuid, "done"), 15, what="the later order")
        assert not events(agent, lost.uuid, "done"), "the stall did not lose the order"
        known = wait_until(lambda: saved_known_ms(broker.env), 10, what="a saved state")
        assert known is not None
        assert known < lost.placed * 1000, "the saved state claims the lost order is known"
        restart_broker(broker)
        wait_until(lambda: events(agent, lost.uuid, "done"), 20, what="the order lost in the stall")
        assert len(events(agent, lost.uuid, "done")) == 1
        assert len(events(agent, later.uuid, "done")) == 1  # and the later one not again


def test_a_client_back_after_the_restarted_brokers_first_sync_still_gets_what_it_published() -> (
    None
):
    # Found by the soak (seed 1847964149, priv1): the restarted broker's first REST
    # sync ran when the first private client came back and published the order lost
    # in a stall; the second client came back after it and never saw it (no gap, a
    # topic born before it returned). A client back at a new broker now asks for the
    # private messages published so far (the broker's journal).
    with private_follower() as (sim, broker, first):
        late = AgentLog("late", broker.env, ["myOrder"])
        try:
            orders = Orders(sim, seed=0)
            probe = orders.place(filled=True)
            wait_until(lambda: events(late, probe.uuid, "done"), 20, what="the late follower up")
            sim.control("stall", {"seconds": 2.0, "kind": "app", "path": PRIVATE})
            # Two orders, so the topic's last value alone cannot carry the first.
            lost = [orders.place(filled=True), orders.place(filled=True)]
            wait_until(lambda: not sim.control("")["faults"]["app_stall"], 10, what="stall over")
            late.child.signal(signal.SIGSTOP)  # away while the broker restarts and syncs
            try:
                restart_broker(broker)
                wait_until(lambda: all_done(first, lost), 20, what="the first follower")
            finally:
                late.child.signal(signal.SIGCONT)
            wait_until(lambda: all_done(late, lost), 20, what="the late follower")
            for agent in (first, late):
                checked, problems = order_deliveries(lost, agent.records, 0.0)
                assert problems == []
                assert checked == sum(len(o.trades) + 1 for o in lost)
        finally:
            late.stop()
            shutil.rmtree(late.path.parent, ignore_errors=True)


def all_done(agent: AgentLog, orders: list[PlacedOrder]) -> bool:
    """The agent has the ``done`` of every one of ``orders``."""
    return all(events(agent, order.uuid, "done") for order in orders)


def restart_broker(broker: Broker) -> None:
    """SIGKILL the broker and start it again with its (possibly changed) environment."""
    broker.child.kill()
    print(broker.child.output(20000))  # shown if the test fails: the killed one's story
    broker.child = Child(broker.child.name, broker.args, env=broker.env)
    wait_ready(broker.env, broker.child)


def gap_told(agent: AgentLog) -> bool:
    """The agent heard a ``gap`` on its myOrder subscription."""
    agent.poll()
    return any(r.get("status") == "gap" for r in agent.records)


def agent_saw(agent: AgentLog, state: str, after: float = 0.0) -> bool:
    """The agent recorded a ``state`` status at or after ``after``."""
    agent.poll()
    return any(r.get("status") == state and r["rx"] >= after for r in agent.records)


def events(agent: AgentLog, uuid: str, state: str) -> list[Record]:
    """The agent's myOrder records of ``uuid`` in ``state``."""
    agent.poll()
    return [r for r in agent.records if r.get("u") == uuid and r.get("st") == state]
