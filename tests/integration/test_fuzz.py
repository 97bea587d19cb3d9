"""Hostile peers on the bus cost a well-behaved client nothing: a seeded fuzz run.

While a client process streams tickers and trades of two markets, a seeded schedule of
attacks (tests/hostile.py: garbage and multipart frames, wrong types, recursion bombs,
8 MB messages, floods, hundreds of identities, absurd stream options, snapshot storms,
requests without hello) hits the broker's control socket. The broker must stay up, the
good client must see every sequence number of its topics with no long silence, and the
broker's memory must stay bounded. ``UPBIT_FUZZ_SEED`` replays a failing schedule; the
long run is ``python -m bench.fuzz``.
"""

from __future__ import annotations

import itertools
import os
import random
import time

import psutil  # type: ignore[import-untyped,unused-ignore]

from tests.hostile import Fuzzer
from tests.integration.conftest import BrokerProc
from tests.integration.test_sharing import Agent
from tests.support import scaled, wait_until

ROUNDS = 150
SILENCE_BOUND = 3.0
"""Longest gap in seconds between two messages the good client may see (the simulator
sends several messages a second on each of its topics)."""
RSS_GROWTH_BOUND = 150 * 2**20


def test_hostile_peers_cannot_hurt_a_well_behaved_client(broker: BrokerProc) -> None:
    seed = int(os.environ.get("UPBIT_FUZZ_SEED") or random.randrange(2**32))
    print(f"fuzz seed {seed} (replay: UPBIT_FUZZ_SEED={seed})")
    good = Agent(
        "good", broker.env, ["ticker:KRW-BTC", "trade:KRW-BTC", "ticker:KRW-ETH", "trade:KRW-ETH"]
    )
    try:
        wait_until(lambda: len(good.data()) >= 20, scaled(15), what="the good client's data")
        broker_proc = psutil.Process(broker.child.pid)
        rss_before = broker_proc.memory_info().rss
        fuzzer = Fuzzer(broker.env["UPBIT_BROKER_CONTROL"], seed)

        def check_alive() -> None:
            assert broker.child.alive(), f"seed {seed}: the broker died\n{fuzzer.table()}"

        started = time.time()
        fuzzer.run(ROUNDS, between=check_alive)
        # The attack is over: the good client must still be served, and afterwards too.
        mark = len(good.data())
        wait_until(lambda: len(good.data()) >= mark + 20, scaled(15), what="data after the fuzz")
        ended = time.time()
        rss_after = broker_proc.memory_info().rss
        print(fuzzer.table())

        records = [r for r in good.data() if r["rx"] >= started - 1.0]
        arrivals = sorted(r["rx"] for r in records)
        silence = max(b - a for a, b in zip([started, *arrivals], [*arrivals, ended], strict=True))
        gaps: dict[str, int] = {}
        for topic, recs in good.by_topic().items():
            seqs = [r["s"] for r in recs]
            missing = sum(b - a - 1 for a, b in itertools.pairwise(seqs) if b > a + 1)
            if missing or len(set(seqs)) != len(seqs):
                gaps[topic] = missing
        status = [m for m in good.messages() if "state" in m]
        print(
            f"good client: {len(records)} messages during {ended - started:.1f} s, "
            f"longest silence {silence:.2f} s, gaps {gaps}, status events {len(status)}; "
            f"broker RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MB"
        )
        assert broker.child.alive(), f"seed {seed}: the broker died"
        assert not gaps, f"seed {seed}: the good client lost messages: {gaps}"
        assert silence < scaled(SILENCE_BOUND), f"seed {seed}: data stopped for {silence:.1f} s"
        assert rss_after - rss_before < RSS_GROWTH_BOUND, (
            f"seed {seed}: broker RSS grew {(rss_after - rss_before) / 2**20:.0f} MB"
        )
    finally:
        good.stop()
