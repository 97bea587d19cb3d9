"""Resilience of the public side: drops, stalls, refused upgrades, REST failures, bans.

Real processes, real sockets: the simulator injects the fault (``/_sim`` control API),
the broker must notice, tell its clients, keep data flowing from REST while the stream
is gone and restore every stream, and client agents (``tests/integration/agent.py``)
record what they receive. Each test prints what it measured (``pytest -s`` shows it):
time to detection, to the first reconnect attempt, to restored streams.

Times: the broker stamps its status events with its wall clock (``StatusEvent.timestamp``)
and the agents stamp what they receive (``rx``); the test, the broker and the simulator
run on one machine, so ``time.time()`` is one clock for all of them.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from tests.integration.conftest import BrokerProc, Sim
from tests.integration.test_sharing import Agent
from tests.support import scaled, wait_until

T = TypeVar("T")

PUBLIC = "/websocket/v1"

STREAMS_A = ["ticker:KRW-BTC", "trade:KRW-BTC", "orderbook:KRW-BTC:5"]
STREAMS_B = ["trade:KRW-BTC", "trade:KRW-ETH", "ticker:KRW-ETH"]
UNION = {
    ("ticker", "KRW-BTC"),
    ("ticker", "KRW-ETH"),
    ("trade", "KRW-BTC"),
    ("trade", "KRW-ETH"),
    ("orderbook", "KRW-BTC.5"),
}
"""What the simulator's one public connection must carry for agents A and B."""
TOPICS_A = {"ticker/KRW-BTC/", "trade/KRW-BTC/", "orderbook/KRW-BTC/5/0/"}
TOPICS_B = {"trade/KRW-BTC/", "trade/KRW-ETH/", "ticker/KRW-ETH/"}

DETECT_STALL = 10.0
"""Keepalive: a ping every 5 s with a 5 s timeout, so a stall is noticed within 10 s."""
FIRST_RETRY = 1.0
"""The first reconnect attempt comes within 1 s of the detection."""
GRACE = 3.0
"""The public REST fallback starts after the link has been down this long."""
BACKOFF_CAP = 30.0
"""Longest wait between two refused attempts: the reconnect backoff's ceiling doubles
from 0.2 s up to 30 s, with full jitter. After 8-12 s of refusals the next attempt
usually comes within a few seconds of the refusal's end, but ~7 % (8 s) to ~19 % (12 s)
of runs wait more than 13 s (Monte Carlo of that schedule), so only the cap is a bound
that does not flake."""


# ---------------------------------------------------------------------------- helpers


def soft_wait(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T | None:
    """Like :func:`wait_until` but returns None on timeout, so a test can measure on."""
    try:
        return wait_until(predicate, timeout=max(timeout, 0.0), interval=interval)
    except AssertionError:
        return None


class Checks:
    """Collects failed expectations so one run reports every figure and every miss."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failures: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)

    def verify(self) -> None:
        assert not self.failures, f"{self.name}:\n  - " + "\n  - ".join(self.failures)


def live_public(sim: Sim) -> dict[str, Any] | None:
    """The one open public connection, or None while there is not exactly one."""
    conns = [c for c in sim.connections(PUBLIC) if not c.get("closed")]
    return conns[0] if len(conns) == 1 else None


def carried(conn: dict[str, Any] | None) -> set[tuple[str, str]]:
    """(type, code) pairs of a connection's current subscription."""
    pairs: set[tuple[str, str]] = set()
    for item in (conn or {}).get("subscription") or []:
        if isinstance(item, dict) and "type" in item:
            for code in item.get("codes", []):
                pairs.add((item["type"], code))
    return pairs


def union_restored(sim: Sim, opened_after: float = 0.0) -> bool:
    """True when exactly one public connection is open, opened after ``opened_after``
    (so not the one the fault hit), and carries the union."""
    conn = live_public(sim)
    return conn is not None and conn["opened_at"] >= opened_after and carried(conn) == UNION


def upgrade_attempts(stats: dict[str, Any]) -> int:
    """Every WebSocket upgrade the simulator saw: accepted or refused."""
    upgrades = stats["upgrades"]
    return int(upgrades["accepted"]) + int(upgrades["refused"])


def ws_connect_ban(state_dir: str) -> float | None:
    """End (epoch seconds) of the connect ban the broker persisted, if any."""
    path = Path(state_dir) / "bans.json"
    try:
        bans = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    until = bans.get("ws-connect")
    return float(until) if isinstance(until, int | float) else None


def all_records(agents: list[Agent]) -> list[dict[str, Any]]:
    return [record for agent in agents for record in agent.messages()]


def status_at(agents: list[Agent], state: str, after: float) -> float | None:
    """Broker time (s) of the earliest ``state`` event stamped at or after ``after``."""
    stamps = [
        m["ts"] / 1000
        for m in all_records(agents)
        if m.get("status") == state and m["ts"] / 1000 >= after - 0.001
    ]
    return min(stamps) if stamps else None


def statuses_seen(agent: Agent, after: float) -> set[str]:
    """States of the status events an agent received for events stamped after ``after``."""
    return {
        m["status"] for m in agent.messages() if "status" in m and m["ts"] / 1000 >= after - 0.001
    }


def data_after(agent: Agent, after: float, source: str | None = None) -> list[dict[str, Any]]:
    """Data records received after ``after`` (optionally from one source)."""
    return [m for m in agent.data() if m["rx"] >= after and (source is None or m["src"] == source)]


def topics_flowing(agent: Agent, after: float, source: str, topics: set[str]) -> bool:
    """Every topic of ``topics`` delivered a ``source`` record after ``after``."""
    return topics <= {m["t"] for m in data_after(agent, after, source)}


def duplicate_trades(agent: Agent) -> tuple[int, list[str]]:
    """Trades (by sequential_id) delivered twice on a topic: (trades seen, problems)."""
    total = 0
    problems: list[str] = []
    for topic, records in agent.by_topic().items():
        if not topic.startswith("trade/"):
            continue
        ids = [r["sid"] for r in records]
        total += len(ids)
        if None in ids:
            problems.append(f"{agent.child.name}: a trade without sequential_id on {topic}")
        dupes = sorted({i for i in ids if i is not None and ids.count(i) > 1})
        if dupes:
            problems.append(f"{agent.child.name}: trades delivered twice on {topic}: {dupes[:10]}")
    return total, problems


def back_on_websocket(agent: Agent, after: float) -> list[str]:
    """Per topic after ``after``: websocket data is back and no REST record follows it."""
    problems: list[str] = []
    for topic, records in agent.by_topic().items():
        later = [r for r in records if r["rx"] >= after]
        first_ws = next((i for i, r in enumerate(later) if r["src"] == "websocket"), None)
        if first_ws is None:
            problems.append(f"{agent.child.name}: no websocket data again on {topic}")
        elif any(r["src"] == "rest" for r in later[first_ws:]):
            problems.append(f"{agent.child.name}: REST data after the stream returned on {topic}")
    return problems


def check_clients(
    checks: Checks, agents: list[Agent], since: float, states: set[str], ws_from: float | None
) -> None:
    """Every agent heard ``states``, got no trade twice and (if given) is back on the stream."""
    for agent in agents:
        seen = statuses_seen(agent, since)
        checks.check(
            states <= seen, f"{agent.child.name} missed status events {sorted(states - seen)}"
        )
        total, problems = duplicate_trades(agent)
        print(f"[resilience] {checks.name}: {agent.child.name} got {total} trades")
        for problem in problems:
            checks.check(False, problem)
        if ws_from is not None:
            for problem in back_on_websocket(agent, ws_from):
                checks.check(False, problem)


def rounded(value: float | None) -> str:
    """A figure for printing."""
    return "n/a" if value is None else f"{value:+.3f}"


def within(value: float | None, bound: float) -> bool:
    """``value`` was measured and is at most ``bound``."""
    return value is not None and value <= bound


@dataclass
class Sample:
    """One reading of GET /_sim/stats: sent at ``sent``, answered at ``got``."""

    sent: float
    got: float
    attempts: int
    accepted: int
    refused: dict[str, int]


class StatsSampler:
    """Reads /_sim/stats every ``period`` seconds in a thread, keeping every sample.

    A sample's counters were taken somewhere between ``sent`` and ``got``, so the
    attempts counted between samples i and j happened within ``[i.sent, j.got]``.
    """

    def __init__(self, sim: Sim, period: float = 0.05) -> None:
        self._sim = sim
        self._url = f"{sim.urls['control']}/stats"
        self._period = period
        self._stop = threading.Event()
        self.samples: list[Sample] = []
        self._thread = threading.Thread(target=self._run, name="stats-sampler", daemon=True)

    def __enter__(self) -> StatsSampler:
        self._thread.start()
        wait_until(lambda: self.samples, timeout=5, what="a first stats sample")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.time()
            try:
                with urllib.request.urlopen(self._url, timeout=5) as response:
                    stats = json.loads(response.read())
            except OSError:
                continue
            got = time.time()
            upgrades = stats["upgrades"]
            self.samples.append(
                Sample(
                    sent,
                    got,
                    upgrade_attempts(stats),
                    int(upgrades["accepted"]),
                    dict(upgrades["refused_by_status"]),
                )
            )
            self._stop.wait(self._period)

    def latest(self) -> Sample:
        return self.samples[-1]

    def max_in_one_second(self) -> tuple[int, float, float]:
        """Most upgrade attempts within any one second, from the simulator's exact log:
        (count, first attempt's time, last attempt's time)."""
        log = self._sim.control("stats")["upgrades"]["log"]
        times = sorted(entry["t"] for entry in log)
        best = (0, 0.0, 0.0)
        start = 0
        for end, t in enumerate(times):
            while t - times[start] >= 1.0:
                start += 1
            if end - start + 1 > best[0]:
                best = (end - start + 1, times[start], t)
        return best

    def first_change(self, after: float, attr: str = "attempts") -> Sample | None:
        """The first sample sent after ``after`` whose counter exceeds the one before it."""
        previous: Sample | None = None
        for sample in list(self.samples):
            changed = previous is not None and getattr(sample, attr) > getattr(previous, attr)
            if changed and sample.sent >= after:
                return sample
            previous = sample
        return None


@dataclass
class Figures:
    """What one outage cost, in seconds; printed for the record."""

    name: str
    fault_at: float
    values: dict[str, float | None] = field(default_factory=dict)

    def mark(
        self, key: str, at: float | None, since: float | Literal["fault"] | None = "fault"
    ) -> float | None:
        """Record ``at - since`` (default: since the fault) under ``key``; None if either
        time is unknown."""
        base = self.fault_at if since == "fault" else since
        value = None if at is None or base is None else at - float(base)
        self.values[key] = value
        return value

    def show(self) -> None:
        parts = [f"{k}={'n/a' if v is None else f'{v:.3f}s'}" for k, v in self.values.items()]
        print(f"\n[resilience] {self.name}: " + ", ".join(parts))


@pytest.fixture
def pair(sim: Sim, broker: BrokerProc) -> Iterator[list[Agent]]:
    """Agents A and B streaming (their union upstream, data on every topic)."""
    started: list[Agent] = []
    try:
        started.append(Agent("A", broker.env, STREAMS_A))
        started.append(Agent("B", broker.env, STREAMS_B))
        wait_until(lambda: union_restored(sim), timeout=15, what="the union upstream")
        for agent, topics in zip(started, (TOPICS_A, TOPICS_B), strict=True):
            wait_until(
                lambda: topics_flowing(agent, 0.0, "websocket", topics),  # noqa: B023
                timeout=15,
                what=f"agent {agent.child.name} streaming on {sorted(topics)}",
            )
        yield started
    finally:
        for agent in started:
            agent.stop()


def ws_back(agents: list[Agent], after: float, timeout: float) -> float | None:
    """Wait until every topic of every agent streams from the WebSocket after ``after``."""
    ok = soft_wait(
        lambda: all(
            topics_flowing(agent, after, "websocket", topics)
            for agent, topics in zip(agents, (TOPICS_A, TOPICS_B), strict=True)
        ),
        timeout,
    )
    return time.time() if ok else None


def rest_flowing(agents: list[Agent], after: float, timeout: float) -> float | None:
    """Wait until every topic of every agent got REST data after ``after``; when, or None."""
    ok = soft_wait(
        lambda: all(
            topics_flowing(agent, after, "rest", topics)
            for agent, topics in zip(agents, (TOPICS_A, TOPICS_B), strict=True)
        ),
        timeout,
    )
    return time.time() if ok else None


def first_rest(agents: list[Agent], after: float) -> float | None:
    """Receive time of the first REST record after ``after``, over all agents."""
    times = [m["rx"] for agent in agents for m in data_after(agent, after, "rest")]
    return min(times) if times else None


def union_time(sim: Sim, timeout: float, opened_after: float) -> float | None:
    """Poll until the union is upstream on one new connection; when it was seen, or None."""
    ok = soft_wait(lambda: union_restored(sim, opened_after), timeout)
    return time.time() if ok else None


def more_trades(agents: list[Agent], after: float, count: int = 3) -> None:
    """Let a few more trades arrive on every trade topic (for the duplicate check)."""
    for agent in agents:
        trade_topics = {t for t in agent.by_topic() if t.startswith("trade/")}
        wait_until(
            lambda: all(
                sum(1 for m in data_after(agent, after) if m["t"] == t) >= count  # noqa: B023
                for t in trade_topics  # noqa: B023
            ),
            timeout=15,
            what=f"{count} more trades on every trade topic of {agent.child.name}",
        )


def new_connection_opened(sim: Sim, after: float) -> float | None:
    """When the simulator accepted the first public connection opened after ``after``."""
    conns = sim.control("connections?closed=1")["connections"]
    opened = [c["opened_at"] for c in conns if c["path"] == PUBLIC and c["opened_at"] >= after]
    return min(opened) if opened else None


# ---------------------------------------------------------------------------- faults


def test_abrupt_drop_is_detected_and_every_stream_restored(
    sim: Sim, broker: BrokerProc, pair: list[Agent]
) -> None:
    checks = Checks("drop")
    figures = Figures("drop", time.time())
    assert sim.control("drop", {"path": PUBLIC})["dropped"] == 1

    down = soft_wait(lambda: status_at(pair, "down", figures.fault_at), 15)
    restored_at = union_time(sim, 15, opened_after=figures.fault_at)
    back_at = ws_back(pair, restored_at or time.time(), 15)
    reconnecting = status_at(pair, "reconnecting", down or figures.fault_at)
    opened = new_connection_opened(sim, figures.fault_at)
    figures.mark("detection", down)
    figures.mark("reconnect_attempt_after_detection", reconnecting, since=down)
    figures.mark("sim_saw_new_connection_after_detection", opened, since=down)
    figures.mark("restored_event", status_at(pair, "restored", figures.fault_at))
    figures.mark("union_upstream", restored_at)
    figures.mark("websocket_data_on_every_topic", back_at)
    figures.show()
    more_trades(pair, back_at or time.time())

    v = figures.values
    checks.check(within(v["detection"], scaled(DETECT_STALL)), "drop not detected in time")
    checks.check(
        within(v["reconnect_attempt_after_detection"], scaled(FIRST_RETRY)),
        "no reconnect attempt within 1 s of the detection",
    )
    checks.check(
        within(v["sim_saw_new_connection_after_detection"], scaled(FIRST_RETRY) + 0.5),
        "the simulator saw no new connection within 1 s of the detection",
    )
    checks.check(restored_at is not None, "the union never came back upstream")
    checks.check(back_at is not None, "websocket data never came back on every topic")
    check_clients(checks, pair, figures.fault_at, {"down", "gap", "reconnecting", "restored"}, None)
    checks.verify()


def test_a_30s_stall_is_detected_served_from_rest_and_restored(
    sim: Sim, broker: BrokerProc, pair: list[Agent]
) -> None:
    checks = Checks("stall 30 s")
    stall = 30.0
    # The simulator says when the stall ends: its onset, to the millisecond.
    stall_end = float(sim.control("stall", {"seconds": stall})["stalled_until"])
    figures = Figures("stall 30 s", stall_end - stall)

    down = soft_wait(lambda: status_at(pair, "down", figures.fault_at), DETECT_STALL + 5)
    since = down or figures.fault_at + DETECT_STALL
    reconnecting = soft_wait(lambda: status_at(pair, "reconnecting", since), 5)
    # While the stream is stalled, data keeps coming from REST after the grace.
    rest_all = rest_flowing(pair, since, min(GRACE + 7, stall_end - time.time()))
    rest_first = first_rest(pair, since)
    source_rest = status_at(pair, "source_rest", since)
    figures.mark("detection", down)
    figures.mark("reconnect_attempt_after_detection", reconnecting, since=down)
    figures.mark("sim_saw_new_connection_after_detection", new_connection_opened(sim, since), down)
    figures.mark("first_rest_data_after_detection", rest_first, since=down)
    figures.mark("rest_data_on_every_topic_after_detection", rest_all, since=down)
    figures.mark("source_rest_event_after_detection", source_rest, since=down)

    restored_at = union_time(sim, stall_end - time.time() + 20, opened_after=since)
    back_at = ws_back(pair, max(restored_at or 0.0, stall_end), 20)
    early_restored = [
        m["ts"] / 1000 - figures.fault_at
        for m in all_records(pair)
        # ``ts`` is the broker's wall clock truncated to the ms: 1 ms of tolerance.
        if m.get("status") == "restored" and figures.fault_at <= m["ts"] / 1000 < stall_end - 0.001
    ]
    rest_records = sum(len(data_after(a, figures.fault_at, "rest")) for a in pair)
    figures.mark("union_upstream_after_stall_end", restored_at, since=stall_end)
    figures.mark("websocket_data_after_stall_end", back_at, since=stall_end)
    figures.mark("source_websocket_event", status_at(pair, "source_websocket", since))
    figures.show()
    print(
        f"[resilience] stall 30 s: {rest_records} REST records during the stall; 'restored' "
        f"announced while still stalled at {[round(t, 2) for t in sorted(set(early_restored))]} s"
    )
    more_trades(pair, back_at or time.time())

    v = figures.values
    checks.check(
        within(v["detection"], scaled(DETECT_STALL)),
        f"stall detected after {rounded(v['detection'])} s (bound {DETECT_STALL:g} s)",
    )
    checks.check(
        within(v["reconnect_attempt_after_detection"], scaled(FIRST_RETRY)),
        "no reconnect attempt within 1 s of the detection",
    )
    checks.check(
        rest_first is None or down is None or rest_first - down >= GRACE - 0.1,
        "REST data before the grace ended",
    )
    checks.check(
        within(v["first_rest_data_after_detection"], scaled(GRACE + 2)),
        "no REST data within the grace + 2 s of the detection",
    )
    checks.check(
        within(v["rest_data_on_every_topic_after_detection"], scaled(GRACE + 5)),
        "no REST data on every topic within the grace + 5 s of the detection, during the stall",
    )
    checks.check(source_rest is not None, "no source_rest event during the stall")
    checks.check(not early_restored, "'restored' announced while the stream was still stalled")
    checks.check(
        within(v["union_upstream_after_stall_end"], scaled(DETECT_STALL + 2 + 3)),
        "the union was not upstream again within 15 s of the stall's end",
    )
    checks.check(back_at is not None, "websocket data never came back on every topic")
    check_clients(
        checks,
        pair,
        figures.fault_at,
        {"down", "reconnecting", "source_rest", "source_websocket"},
        stall_end,
    )
    checks.verify()


def test_refused_upgrades_keep_rest_data_flowing_then_the_stream_returns(
    sim: Sim, broker: BrokerProc, pair: list[Agent]
) -> None:
    checks = Checks("refused upgrades (429) for 8 s")
    figures = Figures(checks.name, time.time())
    refuse = 8.0
    refuse_end = figures.fault_at + refuse
    with StatsSampler(sim) as sampler:
        sim.control("refuse_upgrades", {"seconds": refuse, "status": 429})
        sim.control("drop", {"path": PUBLIC})
        down = soft_wait(lambda: status_at(pair, "down", figures.fault_at), 10)
        since = down or figures.fault_at
        rest_all = rest_flowing(pair, since, GRACE + 7)
        rest_first = first_rest(pair, since)
        restored_at = union_time(
            sim, refuse_end - time.time() + BACKOFF_CAP + 5, opened_after=figures.fault_at
        )
        back_at = ws_back(pair, restored_at or time.time(), 15)
        reconnecting = status_at(pair, "reconnecting", since)
        attempt = sampler.first_change(since)
        most, lo, hi = sampler.max_in_one_second()
        refused = sampler.latest().refused.get("429", 0)

    figures.mark("detection", down)
    figures.mark("reconnect_attempt_after_detection", reconnecting, since=down)
    figures.mark(
        "sim_saw_attempt_after_detection(upper bound)",
        None if attempt is None else attempt.got,
        since=down,
    )
    figures.mark("first_rest_data_after_detection", rest_first, since=down)
    figures.mark("rest_data_on_every_topic_after_detection", rest_all, since=down)
    figures.mark("union_upstream_after_refusal_end", restored_at, since=refuse_end)
    figures.mark("websocket_data_after_refusal_end", back_at, since=refuse_end)
    figures.show()
    print(f"[resilience] {checks.name}: {refused} upgrades refused, at most {most} in 1 s")
    more_trades(pair, back_at or time.time())

    v = figures.values
    checks.check(within(v["detection"], scaled(DETECT_STALL)), "drop not detected in time")
    checks.check(
        within(v["reconnect_attempt_after_detection"], scaled(FIRST_RETRY)),
        "no reconnect attempt within 1 s of the detection",
    )
    checks.check(
        within(v["sim_saw_attempt_after_detection(upper bound)"], scaled(FIRST_RETRY) + 0.5),
        "the simulator saw no upgrade attempt within 1 s of the detection",
    )
    checks.check(refused >= 2, f"only {refused} refused attempts: the fault did not bite")
    checks.check(most <= 5, f"{most} upgrade attempts within 1 s ({lo:.2f}..{hi:.2f})")
    checks.check(
        rest_first is None or down is None or rest_first - down >= GRACE - 0.1,
        "REST data before the grace ended",
    )
    checks.check(
        within(v["first_rest_data_after_detection"], scaled(GRACE + 2)),
        "no REST data within the grace + 2 s of the detection",
    )
    checks.check(
        within(v["rest_data_on_every_topic_after_detection"], scaled(GRACE + 5)),
        "no REST data on every topic within the grace + 5 s of the detection",
    )
    checks.check(
        within(v["union_upstream_after_refusal_end"], scaled(BACKOFF_CAP + 2)),
        "the union was not upstream again within the backoff's reach of the refusal's end",
    )
    checks.check(back_at is not None, "websocket data never came back on every topic")
    check_clients(
        checks,
        pair,
        figures.fault_at,
        {"down", "reconnecting", "source_rest", "restored", "source_websocket"},
        restored_at or refuse_end,
    )
    checks.verify()


def test_rest_failures_during_an_outage_only_delay_the_rest_fallback(
    sim: Sim, broker: BrokerProc, pair: list[Agent]
) -> None:
    checks = Checks("REST failing (500) 6 s within 12 s of refused upgrades")
    figures = Figures(checks.name, time.time())
    refuse, fail = 12.0, 6.0
    rest_back = figures.fault_at + fail
    refuse_end = figures.fault_at + refuse
    sim.control("refuse_upgrades", {"seconds": refuse, "status": 429})
    sim.control("rest_fail", {"seconds": fail, "status": 500})
    sim.control("drop", {"path": PUBLIC})

    down = soft_wait(lambda: status_at(pair, "down", figures.fault_at), 10)
    since = down or figures.fault_at
    source_rest = soft_wait(lambda: status_at(pair, "source_rest", since), GRACE + 5)
    rest_all = rest_flowing(pair, rest_back, rest_back - time.time() + 7)
    groups = sim.control("stats")["rest"]["groups"]
    early = [
        m for a in pair for m in data_after(a, figures.fault_at, "rest") if m["rx"] < rest_back
    ]
    rest_first = first_rest(pair, rest_back)
    restored_at = union_time(
        sim, refuse_end - time.time() + BACKOFF_CAP + 5, opened_after=figures.fault_at
    )
    back_at = ws_back(pair, restored_at or time.time(), 15)

    figures.mark("detection", down)
    figures.mark("source_rest_event_after_detection", source_rest, since=down)
    figures.mark("first_rest_data_after_rest_recovery", rest_first, since=rest_back)
    figures.mark("rest_data_on_every_topic_after_rest_recovery", rest_all, since=rest_back)
    figures.mark("union_upstream_after_refusal_end", restored_at, since=refuse_end)
    figures.mark("websocket_data_after_refusal_end", back_at, since=refuse_end)
    figures.show()
    print(f"[resilience] {checks.name}: REST calls per group {groups}")
    more_trades(pair, back_at or time.time())

    v = figures.values
    failed = sum(g.get("failed", 0) for g in groups.values())
    checks.check(failed > 0, "the broker made no REST call while REST failed: nothing proven")
    checks.check(not early, f"{len(early)} records published from REST while REST failed")
    checks.check(
        within(v["source_rest_event_after_detection"], scaled(GRACE + 1)),
        "no source_rest event within the grace",
    )
    checks.check(
        within(v["first_rest_data_after_rest_recovery"], scaled(2.0)),
        "REST data did not resume within 2 s of REST's recovery",
    )
    checks.check(
        within(v["rest_data_on_every_topic_after_rest_recovery"], scaled(5.0)),
        "REST data did not resume on every topic within 5 s of REST's recovery",
    )
    checks.check(
        within(v["union_upstream_after_refusal_end"], scaled(BACKOFF_CAP + 2)),
        "the union was not upstream again within the backoff's reach of the refusal's end",
    )
    checks.check(back_at is not None, "websocket data never came back on every topic")
    check_clients(
        checks,
        pair,
        figures.fault_at,
        {"down", "reconnecting", "source_rest", "source_websocket"},
        restored_at or refuse_end,
    )
    checks.verify()


def test_rest_failures_alone_do_not_disturb_the_streams(
    sim: Sim, broker: BrokerProc, pair: list[Agent]
) -> None:
    started = time.time()
    sim.control("rest_fail", {"seconds": 3.0, "status": 500})
    wait_until(lambda: time.time() > started + 3.0, timeout=10, what="the REST failure's end")
    for agent in pair:
        wait_until(
            lambda: len(data_after(agent, started + 3.0)) >= 3,  # noqa: B023
            timeout=15,
            what=f"{agent.child.name} to keep streaming once REST failed",
        )
    assert union_restored(sim)
    assert len(sim.connections(PUBLIC)) == 1
    for agent in pair:
        assert not statuses_seen(agent, started), "status events while only REST failed"
        assert not data_after(agent, started, "rest")
        assert duplicate_trades(agent)[1] == []
        during = [m for m in data_after(agent, started) if m["rx"] < started + 3.0]
        assert during, f"{agent.child.name} got nothing while REST failed"


# ---------------------------------------------------------------------------- limits, bans


def teapots(sim: Sim) -> int:
    """Upgrades the simulator refused with 418 so far."""
    return int(sim.control("stats")["upgrades"]["refused_by_status"].get("418", 0))


def teapots_above(sim: Sim, count: int) -> bool:
    """More than ``count`` upgrades were refused with 418."""
    return teapots(sim) > count


def provoke_418(sim: Sim, state_dir: str, block: float, tries: int = 10) -> tuple[float, int]:
    """Refuse upgrades with 418 until the broker hit one and holds a ban of at least 1 s.

    Each round refuses for ``block`` seconds, so the ban the broker learns stays short.
    Returns the ban's end (as the broker persisted it) and the simulator's 418 count then.
    """
    for _ in range(tries):
        before = teapots(sim)
        sim.control("refuse_upgrades", {"seconds": block, "status": 418})
        hit = soft_wait(functools.partial(teapots_above, sim, before), block - 0.5)
        if not hit and not teapots_above(sim, before):
            continue
        wait_until(lambda: ws_connect_ban(state_dir), timeout=5, what="the ban in bans.json")
        until = ws_connect_ban(state_dir)
        assert until is not None
        if until - time.time() >= 1.0:
            return until, teapots(sim)
        # The attempt came at the very end of a round: its ban is too short to observe.
    raise AssertionError(f"the broker hit no usable 418 in {tries} rounds of {block} s")


@pytest.mark.timeout(180)  # a few backoff rounds to meet a 418, then the ban
def test_a_429_then_418_storm_never_exceeds_the_connect_limits(
    sim: Sim, broker: BrokerProc, pair: list[Agent]
) -> None:
    checks = Checks("429/418 storm")
    state_dir = broker.env["UPBIT_BROKER_STATE_DIR"]
    with StatsSampler(sim) as sampler:
        storm_at = time.time()
        sim.control("refuse_upgrades", {"seconds": 60, "status": 429})
        sim.control("drop", {"path": PUBLIC})
        wait_until(
            lambda: sampler.latest().refused.get("429", 0) >= 4,
            timeout=20,
            what="a few refused (429) attempts",
        )
        until, count = provoke_418(sim, state_dir, block=4.0)
        teapot = wait_until(
            lambda: next((s for s in sampler.samples if s.refused.get("418", 0) >= count), None),
            timeout=5,
            what="the 418 in the samples",
        )
        assert teapot is not None
        wait_until(lambda: time.time() > until + 0.2, timeout=until - time.time() + 5)
        during = [s for s in sampler.samples if s.sent >= teapot.sent and s.got < until - 0.02]
        restored_at = union_time(sim, BACKOFF_CAP + 5, opened_after=storm_at)
        first_accept = sampler.first_change(storm_at, "accepted")
        final = sampler.latest()
        most, lo, hi = sampler.max_in_one_second()

    early = max(s.attempts for s in during) - teapot.attempts if during else 0
    accept_delay = None if first_accept is None else first_accept.got - until
    print(
        f"\n[resilience] storm: upgrades refused {final.refused}, accepted "
        f"{final.accepted - teapot.accepted} after the ban; at most {most} attempts within "
        f"1 s; 418 ban of {until - teapot.got:.2f} s ({len(during)} samples inside it, "
        f"{early} attempts); first accepted upgrade {rounded(accept_delay)} s after the ban's "
        f"end; union upstream {rounded(restored_at and restored_at - until)} s after it"
    )
    checks.check(most <= 5, f"{most} upgrade attempts within 1 s ({lo:.2f}..{hi:.2f})")
    checks.check(
        final.refused.get("418", 0) == count, f"knocked again into the 418 block: {final.refused}"
    )
    checks.check(early == 0, f"{early} upgrade attempts during the 418 ban")
    checks.check(accept_delay is not None and accept_delay >= -0.05, "connected before the ban end")
    checks.check(restored_at is not None, "the union never came back upstream")
    check_clients(checks, pair, storm_at, {"down", "reconnecting", "source_rest", "restored"}, None)
    checks.verify()


def test_a_broker_restarted_during_a_418_block_waits_it_out(
    sim: Sim, broker: BrokerProc, pair: list[Agent]
) -> None:
    checks = Checks("restart in a 418 block")
    state_dir = broker.env["UPBIT_BROKER_STATE_DIR"]
    started = time.time()
    sim.control("drop", {"path": PUBLIC})
    until, _ = provoke_418(sim, state_dir, block=8.0)
    with StatsSampler(sim) as sampler:
        before = sampler.latest()
        broker.restart()
        restarted = time.time()
        assert restarted < until - 1.0, "the restart took the whole block: nothing to prove"
        waiting = soft_wait(
            lambda: "waiting out an Upbit block" in broker.child.output(),
            until - time.time() - 0.2,
        )
        wait_until(lambda: time.time() > until + 0.2, timeout=until - time.time() + 5)
        during = [s for s in sampler.samples if s.got < until - 0.02]
        restored_at = union_time(sim, 15, opened_after=restarted)
        first_accept = sampler.first_change(before.sent, "accepted")
        after = sampler.latest()
        most, lo, hi = sampler.max_in_one_second()

    early = max(s.attempts for s in during) - before.attempts
    accept_delay = None if first_accept is None else first_accept.got - until
    restore_delay = None if restored_at is None else restored_at - until
    print(
        f"\n[resilience] restart in a 418 block: ban ends {until - started:.2f} s after the "
        f"drop; new broker up {until - restarted:.2f} s before the end; {early} upgrade "
        f"attempts before it; first accepted upgrade {rounded(accept_delay)} s after the end; "
        f"union upstream {rounded(restore_delay)} s after it; refused {after.refused}; at "
        f"most {most} in 1 s"
    )
    checks.check(bool(waiting), "the new broker never said it waits out the block")
    checks.check(early == 0, f"the new broker made {early} upgrade attempts during the block")
    checks.check(accept_delay is not None and accept_delay >= -0.05, "connected before the end")
    checks.check(within(restore_delay, scaled(10)), "the union was not upstream soon after")
    checks.check(most <= 5, f"{most} upgrade attempts within 1 s ({lo:.2f}..{hi:.2f})")
    checks.check(
        ws_back(pair, restored_at or time.time(), 20) is not None,
        "the agents did not stream from the new broker",
    )
    checks.verify()
