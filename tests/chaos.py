"""A seeded randomized fault test: schedule, runner and invariant checks, shared by the
suite (``tests/integration/test_chaos.py``) and the soak (``python -m bench.chaos``).

One seed (``UPBIT_CHAOS_SEED``) fixes the fault sequence, the fault lengths and the order
flow. While faults hit the simulator, the broker and the clients, orders are placed,
filled and cancelled and client agents come and go; a raw SUB tap records every envelope
the broker publishes. At the end pure checks compare what each client got with what the
broker published and what the exchange did. Also ``python -m tests.chaos agent ...``:
the client agent process (public streams and myOrder, status events with their envelope).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import zmq

from tests.harness import (
    KEEP_LOGS,
    SIM_KEYS,
    Child,
    Sim,
    broker_env,
    scaled,
    short_tmpdir,
    start_broker,
    start_sim,
    wait_ready,
)

SEED_ENV = "UPBIT_CHAOS_SEED"
PRIVATE = "/websocket/v1/private"
FAULT_KINDS = (
    "drop",
    "stall_link",
    "stall_app",
    "refuse_429",
    "refuse_418",
    "rest_500",
    "rest_429",
    "broker_kill",
    "client_stop",
    "wrong_keys",
)
RESUME_BOUND = 15.0
"""Every held public stream flows again within this many seconds of a fault's end."""
RSS_BOUND = 400 * 1024 * 1024
"""Broker resident memory never above this (generous: it runs ~60-100 MB)."""
PUBLIC_STREAMS = ("ticker:KRW-BTC", "trade:KRW-BTC", "ticker:KRW-ETH", "orderbook:KRW-ETH")
BROKER_ENV = {
    "UPBIT_BROKER_HEARTBEAT": "0.5",
    "UPBIT_BROKER_LIVENESS": "3",
    # An audit every 5 s (default 30 s): what a live stream lost arrives within the
    # time the checks wait for it.
    "UPBIT_BROKER_PRIVATE_AUDIT": "5",
}
WRONG_SECRET = "wrong-secret-key-0000000000000000000000"
INVARIANTS = (
    "orders delivered exactly once (or under a gap)",
    "public streams flow within 15 s of each fault's end",
    "no request over Upbit's limits, none inside a block",
    "no sequence gap without a gap event",
    "broker RSS bounded",
)

# ---------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Fault:
    """One fault of the schedule: its kind and how long it lasts (seconds)."""

    kind: str
    seconds: float
    quiet: float
    """Seconds of calm after the streams flowed again, before the next fault."""


def make_schedule(seed: int, duration: float, kinds: Sequence[str] = FAULT_KINDS) -> list[Fault]:
    """The faults of one run: a pure function of ``seed``; about ``duration`` s of them.

    Each fault is budgeted its length, its calm and ~2 s of recovery; every kind comes
    once before any repeats (a shuffled deck per round), so short runs still mix them.
    """
    rng = random.Random(seed)
    faults: list[Fault] = []
    spent = 0.0
    deck: list[str] = []
    while spent < duration:
        if not deck:
            deck = list(kinds)
            rng.shuffle(deck)
        kind = deck.pop()
        seconds = 0.0 if kind == "drop" else round(rng.uniform(1.0, 5.0), 1)
        quiet = round(rng.uniform(0.5, 3.0), 1)
        faults.append(Fault(kind, seconds, quiet))
        spent += seconds + quiet + 2.0
    return faults


# ---------------------------------------------------------------------------- records


Record = dict[str, Any]
"""One line of an agent's log: data (``t``, ``e``, ``s``, ``rx``; myOrder adds ``u``,
``st``, ``tu``) or a status event (``status``, ``topics``, its envelope's ``t/e/s``)."""


CLIENT_TOPIC = "_client/"


def redelivered_after_recovery(records: Sequence[Record], first: int, again: int) -> bool:
    """True if ``records[again]`` repeats ``records[first]`` (same topic, epoch, seq)
    and the client recovered (a ``reconnecting`` of its own) in between."""
    a, b = records[first], records[again]
    if (a.get("t"), a.get("e"), a.get("s")) != (b.get("t"), b.get("e"), b.get("s")):
        return False
    return any(
        r.get("t") == CLIENT_TOPIC and r.get("status") == "reconnecting"
        for r in records[first + 1 : again]
    )


def private_synced(sim: Sim) -> bool:
    """The broker's private WebSocket is subscribed to myOrder and its first REST sync
    is done: from now on an order is the broker's news (before, part of its baseline)."""
    conns = [c for c in sim.connections(PRIVATE) if not c.get("closed")]
    types = {
        i.get("type")
        for c in conns
        for i in c.get("subscription") or []
        if isinstance(i, dict) and "type" in i
    }
    groups = sim.stats()["rest"]["groups"]
    return "myOrder" in types and int(groups.get("default", {}).get("ok", 0)) >= 1


def is_gap_on(record: Record, topic: str) -> bool:
    """True for a ``gap`` status carried on ``topic`` or naming it (or a subscription
    prefix of it: ``myOrder/`` covers ``myOrder/KRW-BTC/``)."""
    return record.get("status") == "gap" and (
        record.get("t") == topic or any(topic.startswith(t) for t in record.get("topics", ()))
    )


@dataclass
class Tapped:
    """One envelope seen on the raw tap: topic, epoch, seq, whether it is a status."""

    topic: str
    epoch: str
    seq: int
    status: bool


def silent_losses(records: Sequence[Record], tapped: Iterable[Tapped]) -> list[str]:
    """Data envelopes the broker published (seen on the tap) that this agent missed with
    no ``gap`` status on that topic between the messages around the hole; and repeats.

    Only seqs strictly between two the agent received in the same epoch count, so what
    came before its subscription or after its end is not a loss. Every repeat is a
    problem (a client that recovered against the same broker once got its last message
    again: fixed in clients/dispatch.py).
    """
    published: dict[tuple[str, str], set[int]] = defaultdict(set)
    for env in tapped:
        if not env.status and env.seq > 0:
            published[(env.topic, env.epoch)].add(env.seq)
    got: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)  # (seq, index)
    problems: list[str] = []
    for index, record in enumerate(records):
        if "status" in record or not record.get("s"):
            continue
        key = (record["t"], record["e"])
        got[key].append((record["s"], index))
    for (topic, epoch), seen in got.items():
        where: dict[int, list[int]] = defaultdict(list)
        for seq, index in seen:
            where[seq].append(index)
        for seq, at in sorted(where.items()):
            problems += [f"{topic} epoch {epoch}: seq {seq} delivered twice"] * (len(at) - 1)
        ordered = sorted(set(seen))
        for (low, low_at), (high, high_at) in itertools.pairwise(ordered):
            hole = [s for s in range(low + 1, high) if s in published[(topic, epoch)]]
            if not hole:
                continue
            first, last = min(low_at, high_at), max(low_at, high_at)
            if any(is_gap_on(records[i], topic) for i in range(first, last + 1)):
                continue
            problems.append(
                f"{topic} epoch {epoch}: {len(hole)} published message(s) (seq {hole[0]}.."
                f"{hole[-1]}) missing between seq {low} and {high} with no gap event"
            )
    return problems


@dataclass
class PlacedOrder:
    """An order the test placed: when, its fills, and (after the run) its final state."""

    uuid: str
    placed: float
    trades: list[str]
    final: str = "wait"
    ended: float = 0.0
    """When it reached its final state (placing time for one filled at once)."""


def order_deliveries(
    orders: Sequence[PlacedOrder],
    records: Sequence[Record],
    joined: float,
    published: Sequence[tuple[float, str, str, str | None]] = (),
) -> tuple[int, list[str]]:
    """Check each order's final state and fills reached this agent exactly once, or not
    at all under a ``gap`` on the myOrder topic reported after the event and before the
    next myOrder message. The event's time is when the broker published it (``published``:
    the tap's ``(rx, uuid, state, trade_uuid)``), or, never published, when it happened
    at the exchange. Orders placed before ``joined`` are skipped. (checked, problems)
    """
    events: dict[str, list[tuple[str, str | None, int]]] = defaultdict(list)
    order_topic_at: list[tuple[float, int]] = []
    gaps: list[tuple[float, int]] = []
    for index, record in enumerate(records):
        if "status" in record:
            if record["status"] == "gap" and any(
                t.startswith("myOrder") for t in [record.get("t", ""), *record.get("topics", ())]
            ):
                gaps.append((record["rx"], index))
        elif str(record.get("t", "")).startswith("myOrder"):
            events[record["u"]].append((record["st"], record.get("tu"), index))
            order_topic_at.append((record["rx"], index))

    def covered_at(at: float) -> bool:
        after = [i for rx, i in order_topic_at if rx > at + 1.0]
        limit = after[0] if after else len(records)
        return any(rx >= at - 2.0 and i <= limit for rx, i in gaps)

    def published_at(uuid: str, state: str, trade: str | None) -> list[float]:
        return [
            rx
            for rx, u, st, tu in published
            if u == uuid and (tu == trade if trade else st == state)
        ]

    def covered(at: float, uuid: str, state: str, trade: str | None) -> bool:
        return any(covered_at(t) for t in published_at(uuid, state, trade) or [at])

    checked, problems = 0, []
    for order in orders:
        if order.placed < joined:
            continue
        seen = events.get(order.uuid, [])
        wanted: list[tuple[str, list[tuple[str, str | None, int]], float, str | None]] = [
            (f"fill {tu}", [e for e in seen if e[1] == tu], order.placed, tu) for tu in order.trades
        ]
        finals = [e for e in seen if e[0] == order.final and (order.final != "wait" or not e[1])]
        wanted.append((f"state {order.final}", finals, order.ended or order.placed, None))
        for what, got, at, trade in wanted:
            checked += 1
            if len(got) == 1 or (not got and covered(at, order.uuid, order.final, trade)):
                continue
            problems.append(
                f"order {order.uuid[:8]} {what} (at {at:.3f}): delivered {len(got)} times"
            )
    return checked, problems


def limit_violations(
    stats: Mapping[str, Any], refusals: Sequence[tuple[float, float, int]], slack: float = 0.3
) -> list[str]:
    """Requests of the broker's own that Upbit refused, and connects inside a 418 block.

    ``refusals``: the injected upgrade refusals (start, end, status). Injected REST
    failures count as ``failed`` at the simulator, so any REST 429/418 is the broker's.
    """
    problems = []
    for group, counts in stats["rest"]["groups"].items():
        for code in ("429", "418"):
            if counts.get(code):
                problems.append(f"REST group {group}: {counts[code]} answer(s) {code}")
    if stats["ws"]["rate_limited"]:
        problems.append(f"{stats['ws']['rate_limited']} rate-limited WebSocket request(s)")
    log = stats["upgrades"]["log"]
    for entry in log:
        status, at = entry["status"], entry["t"]
        if status in (101, 401):
            continue
        if not any(start - slack <= at <= end + slack for start, end, _ in refusals):
            problems.append(f"upgrade refused {status} at {at:.3f} outside any injected fault")
    for start, end, status in refusals:
        if status != 418:
            continue
        blocks = [e["t"] for e in log if e["status"] == 418 and start <= e["t"] <= end + slack]
        if not blocks:
            continue
        first = min(blocks)
        inside = [e for e in log if first + 0.5 < e["t"] < end - slack]
        if inside:
            problems.append(
                f"{len(inside)} upgrade attempt(s) inside a stated 418 block "
                f"({first:.3f}..{end:.3f})"
            )
    return problems


# ---------------------------------------------------------------------------- processes


class AgentLog:
    """A client agent process (``python -m tests.chaos agent``) and its record, read
    incrementally; SIGSTOP/SIGCONT-able."""

    def __init__(self, name: str, env: dict[str, str], streams: Sequence[str]) -> None:
        self.name = name
        self.streams = list(streams)
        self.path = short_tmpdir(f"chaos-{name}-") / "records.jsonl"
        self.path.touch()
        self.records: list[Record] = []
        self._offset = 0
        self.child = Child(
            f"chaos-{name}",
            ["-m", "tests.chaos", "agent", "--name", name, "--out", str(self.path), *streams],
            env=env,
            stdin=True,
        )
        line = self.child.read_line(timeout=60)
        if line != "ready":
            self.child.stop()
            raise RuntimeError(f"agent {name} not ready: {line!r}\n{self.child.output(3000)}")
        self.joined = time.time()
        self.left: float | None = None

    def poll(self) -> list[Record]:
        """Read what the agent wrote since the last call; all its records so far."""
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].splitlines():
            self.records.append(json.loads(line))
        return self.records

    def public_topics(self) -> set[str]:
        """The public data topics it has received anything on."""
        return {r["t"] for r in self.records if "status" not in r and "u" not in r and "s" in r}

    def flowed_since(self, at: float, topics: set[str]) -> bool:
        """Data on every topic of ``topics`` received after ``at``."""
        self.poll()
        fresh = {r["t"] for r in reversed(self.records) if "status" not in r and r["rx"] > at}
        return topics <= fresh

    def stop(self) -> None:
        """Close the agent (``quit``; SIGTERM if it does not go) and read the rest."""
        self.child.signal(signal.SIGCONT)
        with contextlib.suppress(Exception):
            self.child.send_line("quit")
        with contextlib.suppress(Exception):
            self.child.proc.wait(scaled(5))
        self.child.stop()
        self.left = time.time()
        self.poll()


class Tap:
    """A raw SUB on the broker's data endpoint, in a thread: every envelope published."""

    def __init__(self, endpoint: str) -> None:
        from schemas.bus import StatusEvent, decode_batch, split_published
        from schemas.upbit import MyOrder

        self.envelopes: list[Tapped] = []
        self.orders: list[tuple[float, str, str, str | None]] = []
        self._stop = threading.Event()
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)

        def run() -> None:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                with contextlib.suppress(zmq.Again):
                    while True:
                        message = sock.recv(zmq.NOBLOCK)
                        for env in decode_batch(split_published(message)[1]):
                            data = env.data
                            status = isinstance(data, StatusEvent)
                            self.envelopes.append(Tapped(env.topic, env.epoch, env.seq, status))
                            if isinstance(data, MyOrder):
                                self.orders.append(
                                    (time.time(), data.uuid, data.state, data.trade_uuid)
                                )
            sock.close(linger=0)

        self._thread = threading.Thread(target=run, daemon=True, name="chaos-tap")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------- runner


@dataclass
class Report:
    """What a run did and found."""

    seed: int
    faults: Counter[str] = field(default_factory=Counter)
    sequence: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    """Each fault with its wall-clock start and end, printed when an invariant fails."""
    orders: int = 0
    fills: int = 0
    deliveries_checked: int = 0
    streams_checked: int = 0
    rss_max: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in INVARIANTS})
    tapped: int = 0
    """Envelopes the raw tap saw: what each client's record is compared with."""
    skipped: int = 0
    """Order actions skipped because an injected REST failure answered them."""

    def failed(self) -> list[str]:
        """Invariants that did not hold."""
        return [k for k, v in self.problems.items() if v]

    def table(self) -> str:
        """The summary printed at the end of every run."""
        lines = [f"chaos run, {SEED_ENV}={self.seed}", "faults injected:"]
        lines += [f"  {kind:<12} {self.faults[kind]:>4}" for kind in FAULT_KINDS]
        lines.append(f"  sequence: {' '.join(self.sequence)}")
        lines.append(
            f"orders {self.orders}, fills {self.fills}, deliveries checked "
            f"{self.deliveries_checked}, stream resumptions checked {self.streams_checked}, "
            f"published envelopes tapped {self.tapped}, "
            f"broker RSS max {self.rss_max / 2**20:.0f} MiB; order actions skipped under "
            f"injected REST failures {self.skipped}"
        )
        lines.append("invariants:")
        for name, problems in self.problems.items():
            verdict = "held" if not problems else f"FAILED ({len(problems)})"
            lines.append(f"  {name:<55} {verdict}")
            lines += [f"      {p}" for p in problems[:10]]
        if self.failed():
            lines.append("fault timeline (wall clock):")
            lines += [f"  {t}" for t in self.timeline]
            lines.append(f"reproduce with {SEED_ENV}={self.seed}")
        return "\n".join(lines)


class Orders:
    """Places, fills and cancels orders at the simulator from a thread, seeded."""

    def __init__(self, sim: Sim, seed: int) -> None:
        from broker.config import Secret
        from broker.upbit_auth import UpbitSigner, query_string

        self.sim = sim
        self.rng = random.Random(seed ^ 0x5EED)
        self.placed: list[PlacedOrder] = []
        self.resting: list[PlacedOrder] = []
        self._stop = threading.Event()
        self._signer = UpbitSigner(
            Secret(SIM_KEYS["UPBIT_ACCESS_KEY"]), Secret(SIM_KEYS["UPBIT_SECRET_KEY"])
        )
        self._query = query_string
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-orders")
        self.errors: list[str] = []
        self.skipped = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=scaled(30))

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(0.8, 2.0)):
            roll = self.rng.random()
            try:
                if roll < 0.45:
                    self.place(filled=True)
                elif roll < 0.8 or not self.resting:
                    self.place(filled=False)
                else:
                    self.cancel(self.resting[self.rng.randrange(len(self.resting))])
            except urllib.error.HTTPError:
                self.skipped += 1  # an injected REST failure answered (orderbook, cancel)
            except (OSError, ValueError, KeyError, IndexError) as exc:
                self.errors.append(f"order flow: {exc!r}")

    def place(self, *, filled: bool) -> PlacedOrder:
        """A bid that takes the best asks (filled at once) or rests far below the market."""
        market = "KRW-BTC"
        units = self.sim.rest(f"/v1/orderbook?markets={market}")[0]["orderbook_units"]
        if filled:
            sizes = [Decimal(str(u["ask_size"])) for u in units[:2]]
            volume = (sizes[0] + sizes[1] / 2).quantize(Decimal("0.00000001"))
            price = Decimal(str(units[4]["ask_price"])).quantize(Decimal(1))
        else:
            volume = Decimal("0.001")
            price = (Decimal(str(units[0]["bid_price"])) / 2).quantize(Decimal("1000"))
        now = time.time()
        body = {"market": market, "side": "bid", "ord_type": "limit"}
        answer = self.sim.control("orders", {**body, "price": str(price), "volume": str(volume)})
        order = PlacedOrder(answer["uuid"], now, [t["uuid"] for t in answer.get("trades", [])])
        order.final, order.ended = answer["state"], now
        self.placed.append(order)
        if order.final == "wait":
            self.resting.append(order)
        return order

    def _finished_meanwhile(self, order: PlacedOrder) -> bool:
        """Whether the exchange finished ``order`` by itself; if so, take its final state
        and every fill from there."""
        try:
            found = self._signed("GET", "/v1/order", {"uuid": order.uuid})
        except urllib.error.HTTPError:
            return False
        if found.get("state") in (None, "wait", "watch"):
            return False
        order.final, order.ended = found["state"], time.time()
        order.trades = [t["uuid"] for t in found.get("trades") or ()]
        return True

    def _signed(self, method: str, path: str, params: Mapping[str, Any]) -> Any:
        query = self._query(params)
        request = urllib.request.Request(f"{self.sim.urls['rest']}{path}?{query}", method=method)
        request.add_header("Authorization", self._signer.authorization(query))
        with urllib.request.urlopen(request, timeout=scaled(10)) as response:
            return json.loads(response.read())

    def cancel(self, order: PlacedOrder) -> bool:
        """Cancel a resting order; False if the exchange refused (an injected failure)."""
        try:
            self._signed("DELETE", "/v1/order", {"uuid": order.uuid})
        except urllib.error.HTTPError:
            return False
        order.final, order.ended = "cancel", time.time()
        self.resting.remove(order)
        return True

    def settle(self, timeout: float) -> None:
        """Cancel what still rests, then read every order's final state from the exchange.

        A bid placed to fill at once may fill only partly (the book moved) and rest at a
        price the simulated market then trades through: the exchange finishes it later,
        with fills the placement's answer did not have. Those are read back here, so the
        delivery check expects them too.
        """
        deadline = time.monotonic() + scaled(timeout)
        while self.resting and time.monotonic() < deadline:
            order = self.resting[0]
            if self.cancel(order):
                continue
            if self._finished_meanwhile(order):
                self.resting.remove(order)
                continue
            time.sleep(0.5)
        for i in range(0, len(self.placed), 100):
            batch = self.placed[i : i + 100]
            listed = self._signed("GET", "/v1/orders/uuids", {"uuids[]": [o.uuid for o in batch]})
            states = {o["uuid"]: o["state"] for o in listed}
            for order in batch:
                if order.final == "wait" and states.get(order.uuid) == "done":
                    self._finished_meanwhile(order)
                if states.get(order.uuid) not in (None, order.final):
                    self.errors.append(
                        f"order {order.uuid[:8]}: the exchange says {states[order.uuid]}, "
                        f"the test thought {order.final}"
                    )
                    order.final = states[order.uuid]


class Run:
    """One chaos run: simulator, broker, agents, tap and order flow; ``run()`` reports."""

    def __init__(self, seed: int, duration: float, log: Callable[[str], None] = print) -> None:
        self.seed = seed
        self.duration = duration
        self.log = log
        self.rng = random.Random(seed ^ 0xC1A05)
        self.report = Report(seed)
        self.refusals: list[tuple[float, float, int]] = []
        self.agents: list[AgentLog] = []
        self.gone: list[AgentLog] = []
        self.churn_at = 0.0

    # -- helpers

    def _sample_rss(self) -> None:
        with contextlib.suppress(Exception):
            self.report.rss_max = max(self.report.rss_max, self.broker.child.rss())

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if predicate():
                return True
            self._sample_rss()
            time.sleep(0.1)
        return predicate()

    def _agent(self, name: str, streams: Sequence[str]) -> AgentLog:
        agent = AgentLog(name, self.broker.env, streams)
        self.agents.append(agent)
        return agent

    def _held(self) -> list[tuple[AgentLog, set[str]]]:
        held = []
        for agent in self.agents:
            agent.poll()
            topics = agent.public_topics()
            if topics:
                held.append((agent, topics))
        return held

    def _resumed(self, end: float, kind: str) -> None:
        """Every held public stream flows within RESUME_BOUND s of ``end``."""
        held = self._held()
        self._wait(lambda: all(a.flowed_since(end, t) for a, t in held), RESUME_BOUND)
        for agent, topics in held:
            self.report.streams_checked += len(topics)
            late = sorted(topics - {r["t"] for r in agent.records if r.get("rx", 0) > end})
            if late:
                self.report.problems[INVARIANTS[1]].append(
                    f"after {kind} (ended {end:.3f}): {agent.name} got nothing on {late} "
                    f"within {scaled(RESUME_BOUND):g} s"
                )

    def _churn(self) -> None:
        """Now and then one public agent leaves and another subscribes."""
        if time.monotonic() < self.churn_at:
            return
        self.churn_at = time.monotonic() + self.rng.uniform(5, 15)
        public = [a for a in self.agents if a.name.startswith("pub")]
        if len(public) > 1:
            leaving = public[self.rng.randrange(len(public))]
            leaving.stop()
            self.agents.remove(leaving)
            self.gone.append(leaving)
        streams = self.rng.sample(PUBLIC_STREAMS, self.rng.randint(1, 3))
        self._agent(f"pub{len(self.agents) + len(self.gone)}", streams)

    # -- faults

    def _inject(self, fault: Fault) -> float:
        """Apply ``fault``; returns when it ended (wall time)."""
        sim, seconds = self.sim, fault.seconds
        kind = fault.kind
        start = time.time()
        if kind == "drop":
            sim.control("drop", {})
            return time.time()
        if kind in ("stall_link", "stall_app"):
            sim.control("stall", {"seconds": seconds, "kind": kind.removeprefix("stall_")})
        elif kind.startswith("refuse_"):
            status = int(kind.removeprefix("refuse_"))
            sim.control("refuse_upgrades", {"seconds": seconds, "status": status})
            self.refusals.append((start, start + seconds, status))
            sim.control("drop", {})
        elif kind.startswith("rest_"):
            status = int(kind.removeprefix("rest_"))
            sim.control("rest_fail", {"seconds": seconds, "status": status})
            sim.control("drop", {"path": PRIVATE})
        elif kind == "broker_kill":
            self._restart()
            return time.time()
        elif kind == "client_stop":
            victim = self.agents[self.rng.randrange(len(self.agents))]
            victim.child.signal(signal.SIGSTOP)
            self._wait(lambda: False, seconds)
            victim.child.signal(signal.SIGCONT)
            return time.time()
        elif kind == "wrong_keys":
            self.broker.env["UPBIT_SECRET_KEY"] = WRONG_SECRET
            try:
                self._restart()
                told = self._wait(lambda: self._private_told("auth_failed", start), 20)
                if not told:
                    self.log(
                        f"[chaos] wrong keys: no auth_failed status within 20 s (seed {self.seed})"
                    )
            finally:
                self.broker.env["UPBIT_SECRET_KEY"] = SIM_KEYS["UPBIT_SECRET_KEY"]
            self._restart()
            return time.time()
        self._wait(lambda: time.time() >= start + seconds, seconds + 1)
        return start + seconds

    def _private_told(self, state: str, after: float) -> bool:
        agent = self.private[0]
        agent.poll()
        return any(r.get("status") == state and r["rx"] >= after for r in agent.records)

    def _restart(self) -> None:
        self.broker.child.kill()
        self.broker.child = Child(self.broker.child.name, self.broker.args, env=self.broker.env)
        wait_ready(self.broker.env, self.broker.child)

    # -- the run

    def run(self) -> Report:
        schedule = make_schedule(self.seed, self.duration)
        self.log(f"[chaos] {SEED_ENV}={self.seed}: {len(schedule)} faults planned")
        self.sim = start_sim(["--rate", "5"], log_level="warning")
        self.sim.control("account", {"balances": {"KRW": "1000000000000"}})
        env = broker_env(self.sim, keys=True, log_level="warning", extra=BROKER_ENV)
        self.broker = start_broker(env)
        tap = self.tap = Tap(env["UPBIT_BROKER_DATA"])
        orders = Orders(self.sim, self.seed)
        try:
            self.private = [self._agent("priv0", ["myOrder"]), self._agent("priv1", ["myOrder"])]
            for i in range(2):
                self._agent(f"pub{i}", self.rng.sample(PUBLIC_STREAMS, 2))
            self._wait(lambda: private_synced(self.sim), 20)
            orders.start()
            started = time.monotonic()
            for fault in schedule:
                if time.monotonic() - started > scaled(self.duration) * 1.5:
                    break
                self._churn()
                self.report.faults[fault.kind] += 1
                self.report.sequence.append(f"{fault.kind}:{fault.seconds:g}")
                began = time.time()
                end = self._inject(fault)
                self.report.timeline.append(f"{fault.kind:<12} {began:.3f} .. {end:.3f}")
                self._resumed(end, fault.kind)
                self._wait(lambda: False, fault.quiet)
            orders.stop()
            orders.settle(30)
            self._deliveries(orders)
        finally:
            orders.stop()
            for agent in self.agents:
                agent.stop()
            self.gone += self.agents
            tap.stop()
            stats = self.sim.stats()
            self.broker.stop()
            self.sim.stop()
        self.report.problems[INVARIANTS[2]] += limit_violations(stats, self.refusals)
        self.report.tapped = len(tap.envelopes)
        for agent in self.gone:
            problems = silent_losses(agent.records, tap.envelopes)
            self.report.problems[INVARIANTS[3]] += [f"{agent.name}: {p}" for p in problems]
            if "1" not in (os.environ.get(KEEP_LOGS), os.environ.get("BENCH_KEEP_LOGS")):
                shutil.rmtree(agent.path.parent, ignore_errors=True)
        if self.report.rss_max > RSS_BOUND:
            self.report.problems[INVARIANTS[4]].append(
                f"broker RSS reached {self.report.rss_max / 2**20:.0f} MiB"
            )
        self.report.orders = len(orders.placed)
        self.report.fills = sum(len(o.trades) for o in orders.placed)
        self.report.problems[INVARIANTS[0]] += orders.errors
        self.report.skipped = orders.skipped
        return self.report

    def _deliveries(self, orders: Orders) -> None:
        """Wait (bounded) for every final state at each private agent, then check."""

        def complete() -> bool:
            missing = False
            for agent in self.private:
                agent.poll()
                problems = order_deliveries(orders.placed, agent.records, agent.joined)[1]
                missing = missing or any("delivered 0 times" in p for p in problems)
            return not missing

        self._wait(complete, 45)
        for agent in self.private:
            agent.poll()
            checked, problems = order_deliveries(
                orders.placed, agent.records, agent.joined, self.tap.orders
            )
            self.report.deliveries_checked += checked
            self.report.problems[INVARIANTS[0]] += [f"{agent.name}: {p}" for p in problems]


def seed_from_env() -> int:
    """``UPBIT_CHAOS_SEED`` if set, else a fresh random seed (printed by the report)."""
    value = os.environ.get(SEED_ENV)
    return int(value) if value else random.SystemRandom().randrange(1, 2**31)


# ---------------------------------------------------------------------------- agent


async def _agent(name: str, out: IO[str], streams: Sequence[str]) -> None:
    from clients import BrokerClient, Subscription
    from schemas.bus import StatusEvent

    def writer(
        slot: list[Subscription[Any]],
    ) -> tuple[Callable[[Any], None], Callable[[StatusEvent], None]]:
        def stamp(record: Record) -> None:
            env = slot[0].last_envelope if slot else None
            if env is not None:
                record.update(t=record.get("t", env.topic), e=env.epoch, s=env.seq, src=env.source)
            record["rx"] = time.time()
            out.write(json.dumps(record) + "\n")
            out.flush()

        def on_data(payload: Any) -> None:
            record: Record = {}
            if payload.type == "myOrder":
                record.update(u=payload.uuid, st=payload.state, tu=payload.trade_uuid)
            env = slot[0].last_envelope if slot else None
            record["t"] = env.topic if env is not None else payload.type
            stamp(record)

        def on_status(event: StatusEvent) -> None:
            env = slot[0].last_envelope if slot else None
            record: Record = {"status": event.state, "topics": list(event.topics)}
            if env is not None:
                record["t"] = env.topic
            stamp(record)

        return on_data, on_status

    loop = asyncio.get_running_loop()
    async with BrokerClient(name=name) as client:
        for stream in streams:
            slot: list[Subscription[Any]] = []
            on_data, on_status = writer(slot)
            kind, _, rest = stream.partition(":")
            code, _, depth = rest.partition(":")
            if kind == "myOrder":
                sub: Subscription[Any] = await client.subscribe_my_order(
                    None, on_data, on_status=on_status
                )
            elif kind == "ticker":
                sub = await client.subscribe_ticker([code], on_data, on_status=on_status)
            elif kind == "trade":
                sub = await client.subscribe_trade([code], on_data, on_status=on_status)
            else:
                sub = await client.subscribe_orderbook(
                    [code], on_data, depth=int(depth) if depth else None, on_status=on_status
                )
            slot.append(sub)
        print("ready", flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "quit":
                break


def main(argv: Sequence[str] | None = None) -> None:
    """``agent --name N --out FILE STREAM...``: run a client agent (see module docstring)."""
    from broker.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m tests.chaos")
    sub = parser.add_subparsers(dest="role", required=True)
    agent = sub.add_parser("agent")
    agent.add_argument("--name", required=True)
    agent.add_argument("--out", required=True)
    agent.add_argument("streams", nargs="+")
    args = parser.parse_args(argv)
    configure_logging("console", "warning")  # stdout is the command channel
    with Path(args.out).open("a", encoding="utf-8") as out:
        asyncio.run(_agent(args.name, out, args.streams))


if __name__ == "__main__":
    main()
