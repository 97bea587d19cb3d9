"""A client that reads nothing costs the broker bounded memory and nobody else a message.

Under a high message rate (the simulator's rate control), two clients stop reading for
60 s: an agent that subscribed and was then SIGSTOPped (the broker expires it, but its
data socket stays connected), and a raw SUB socket that subscribes to everything and
never calls recv. The broker's PUB socket must drop for them instead of queueing without
end, so its RSS, sampled every second, levels off under a fixed bound, and the clients
that do read see every sequence number of every topic. Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from tests.integration.conftest import BrokerProc, Sim
from tests.integration.test_sharing import Agent
from tests.support import TIME_SCALE, Child, scaled, wait_until

MARKETS = 8
PER_MARKET = 200.0
"""Market events per second per market: a trade event makes a trade, a ticker and an
orderbook message, a quote event one orderbook, so ~2 messages per event (trade ratio
0.5): 8 markets x 200 events x 2 = ~3,200 messages/s through the broker."""
MIN_RATE = 2000.0
"""What the reading client must actually receive per second for the test to count
(divided by ``UPBIT_TEST_TIME_SCALE`` on machines declared slow)."""
FROZEN_FOR = 60.0
WARM_UP = 8.0
RSS_GROWTH_BOUND = 50 * 2**20
"""Broker RSS growth allowed while two clients read nothing for 60 s.

The whole stream is ~3,200 messages/s costing ~0.9 KB each once queued (envelope plus
ZeroMQ's per-message overhead), ~3 MB/s: 50 MB holds ~8 s of everything the broker
publishes for each of the two clients that will never read it, which is plenty of room
for a reader that is merely slow (a GC pause, a busy second) and still small next to
the machine's other programs. A broker that bounds what it queues per subscriber to a
few seconds stays well below; one that never drops grows ~3 MB/s per stopped reader.
"""
PLATEAU_BOUND = 8 * 2**20
"""Growth allowed over the last 20 s of the 60: bounded memory has levelled off by then."""

NEVER_READS = """
import sys, zmq
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()  # never recv: hold the socket open until told to go
"""


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def streams(codes: list[str]) -> list[str]:
    return [f"{kind}:{code}" for code in codes for kind in ("ticker", "trade", "orderbook")]


def records(path: Path) -> list[dict[str, object]]:
    """Every complete JSON line the agent wrote (read once: the file is large)."""
    out: list[dict[str, object]] = []
    with path.open() as handle:
        for line in handle:
            if line.endswith("}\n"):
                out.append(json.loads(line))
    return out


def line_count(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


@pytest.fixture
def started() -> Iterator[list[Agent | Child]]:
    """Processes the test starts; all stopped (and their output shown) at teardown."""
    procs: list[Agent | Child] = []
    yield procs
    for proc in procs:
        if isinstance(proc, Agent):
            proc.stop()
        else:
            proc.stop()
            print(proc.output())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_client_that_reads_nothing_for_60s_costs_bounded_memory_and_no_gaps(
    sim: Sim, broker: BrokerProc, started: list[Agent | Child]
) -> None:
    krw = sorted(m["market"] for m in sim.rest("/v1/market/all") if m["market"].startswith("KRW-"))
    codes = krw[:MARKETS]
    reader = Agent("reader", broker.env, streams(codes))
    started.append(reader)
    tickers = Agent("tickers", broker.env, [f"ticker:{c}" for c in codes])
    started.append(tickers)
    frozen = Agent("frozen", broker.env, streams(codes))
    started.append(frozen)
    sim.control("rate", {"per_second": PER_MARKET})

    # Warm-up: everyone reads, the rate is up, the broker's memory settles.
    pid = broker.child.pid
    warm_wall = time.time()
    warm_from = time.monotonic()
    warm: list[int] = []
    while time.monotonic() - warm_from < scaled(WARM_UP):
        warm.append(rss(pid))
        time.sleep(1.0)
    baseline = int(statistics.median(warm[-3:]))
    assert broker.child.alive()

    # Two clients stop reading.
    frozen.child.signal(signal.SIGSTOP)
    never = Child(
        "never-reads",
        ["-c", NEVER_READS, broker.env["UPBIT_BROKER_DATA"]],
        read_first_line=True,
        stdin=True,
    )
    started.append(never)
    assert never.read_line() == "ready", never.output()
    lines_before = line_count(reader.out)
    stopped_at = time.monotonic()
    samples: list[tuple[float, int]] = []
    while (elapsed := time.monotonic() - stopped_at) < FROZEN_FOR:
        samples.append((elapsed, rss(pid)))
        assert broker.child.alive(), "the broker died"
        time.sleep(1.0)
    lines_after = line_count(reader.out)
    assert psutil.Process(frozen.child.pid).status() == psutil.STATUS_STOPPED
    assert never.alive()

    rate = (lines_after - lines_before) / FROZEN_FOR
    peak = max(value for _, value in samples)
    growth = peak - baseline
    at_40 = max(value for t, value in samples if t <= 40.0)
    tail_growth = peak - at_40
    mb = 2**20
    print(
        f"\n[slow-consumer] {MARKETS} markets x {PER_MARKET:g} events/s: the reader got "
        f"{rate:,.0f} msgs/s while two clients read nothing for {FROZEN_FOR:g} s; broker RSS "
        f"baseline {baseline / mb:.1f} MB (warm-up {[round(v / mb, 1) for v in warm]}), peak "
        f"{peak / mb:.1f} MB, growth {growth / mb:.1f} MB (bound {RSS_GROWTH_BOUND / mb:g}), "
        f"growth over the last 20 s {tail_growth / mb:.1f} MB"
    )
    print(
        "[slow-consumer] RSS by second (MB): "
        + " ".join(f"{value / mb:.0f}" for _, value in samples)
    )

    # The clients that read saw every message: per topic, seqs rise by exactly one.
    wait_until(lambda: line_count(reader.out) > lines_after, timeout=10, what="reader alive")
    gaps: dict[str, list[str]] = defaultdict(list)
    counts: dict[str, int] = {}
    for agent in (reader, tickers):
        name = agent.child.name
        by_topic: dict[str, list[int]] = defaultdict(list)
        statuses = set()
        for record in records(agent.out):
            if "t" in record:
                by_topic[str(record["t"])].append(int(str(record["s"])))
            elif int(str(record["ts"])) / 1000 >= warm_wall:
                statuses.add(str(record.get("status")))
        counts[name] = sum(len(s) for s in by_topic.values())
        for topic, seqs in by_topic.items():
            expected = list(range(seqs[0], seqs[0] + len(seqs)))
            if seqs != expected:
                missing = len(set(expected) ^ set(seqs))
                gaps[name].append(f"{topic} ({missing} off)")
        if statuses:
            gaps[name].append(f"status events {sorted(statuses)}")
    print(f"[slow-consumer] messages received: {counts}")

    assert rate >= MIN_RATE / TIME_SCALE, f"only {rate:.0f} msgs/s reached the reader"
    assert not gaps, f"readers saw gaps while others stalled: {dict(gaps)}"
    assert growth < RSS_GROWTH_BOUND, f"broker RSS grew {growth / mb:.1f} MB"
    assert tail_growth < PLATEAU_BOUND, f"broker RSS still rising: {tail_growth / mb:.1f} MB"
