"""Fuzzing the bus for minutes: hostile peers cost a well-behaved client nothing.

The long run of ``tests/integration/test_fuzz.py``. Two phases on one simulator, each
with a fresh broker and the same good client process (tickers and trades of two
markets, ``tests/integration/agent.py``): ``baseline``, the client alone; ``fuzz``, the
same window while a seeded schedule of attacks (``tests/hostile.py``: garbage and
multipart frames, wrong types, recursion bombs, 1-8 MB messages, floods, hundreds of
identities, absurd stream options, snapshot storms, requests without hello) runs
without pause. Reported for the fuzz phase against the baseline: the good client's
message rate, its longest data silence and its sequence gaps, and the broker's RSS
growth; plus the attacks sent by kind. A failing run prints the seed that replays it
(``--seed``).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Any

from bench.common import (
    Row,
    Sim,
    base_parser,
    header,
    install_signal_handlers,
    print_table,
    stage,
    start_broker,
    start_sim,
    write_results,
)
from tests.hostile import Fuzzer
from tests.integration.test_sharing import Agent

MB = 2**20
STREAMS = ["ticker:KRW-BTC", "trade:KRW-BTC", "ticker:KRW-ETH", "trade:KRW-ETH"]
SILENCE_BOUND_S = 3.0
RSS_GROWTH_BOUND_MB = 150.0


def _gaps(agent: Agent) -> int:
    missing = 0
    for records in agent.by_topic().values():
        seqs = [r["s"] for r in records]
        missing += sum(b - a - 1 for a, b in itertools.pairwise(seqs) if b > a + 1)
        missing += len(seqs) - len(set(seqs))
    return missing


def run_phase(sim: Sim, window_s: float, seed: int | None) -> dict[str, Any]:
    """A fresh broker and a good client for ``window_s``; fuzzed when ``seed`` is set."""
    broker = start_broker(sim)
    good = Agent("good", broker.env, STREAMS)
    fuzzer = Fuzzer(broker.env["UPBIT_BROKER_CONTROL"], seed or 0)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while len(good.data()) < 20:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the good client got no data\n{good.child.output()}")
            time.sleep(0.05)
        rss0 = broker.child.rss()
        peak = rss0
        start = time.time()
        thread = None
        if seed is not None:

            def attack() -> None:
                while not stop.is_set():
                    fuzzer.run(1)
                    fuzzer.seed = random.Random(fuzzer.seed).randrange(2**32)

            thread = threading.Thread(target=attack, name="fuzzer", daemon=True)
            thread.start()
        end_at = time.monotonic() + window_s
        while time.monotonic() < end_at:
            if not broker.child.alive():
                raise RuntimeError(f"seed {seed}: the broker died\n{broker.child.output()}")
            peak = max(peak, broker.child.rss())
            time.sleep(1.0)
        stop.set()
        if thread is not None:
            thread.join(timeout=30)
        end = time.time()
        records = [r for r in good.data() if start <= r["rx"] <= end]
        arrivals = sorted(r["rx"] for r in records)
        silence = max(b - a for a, b in itertools.pairwise([start, *arrivals, end]))
        return {
            "messages": len(records),
            "rate": len(records) / (end - start),
            "longest_silence_s": silence,
            "gaps": _gaps(good),
            "rss_start_mb": rss0 / MB,
            "rss_growth_mb": (peak - rss0) / MB,
            "alive": broker.child.alive(),
            "attacks": dict(fuzzer.rounds),
            "attack_messages": dict(fuzzer.messages),
        }
    finally:
        stop.set()
        good.stop()
        broker.stop()


def main() -> None:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "fuzz")
    p.add_argument("--seconds", type=float, default=0.0, help="window (default 300, quick 20)")
    p.add_argument("--seed", type=int, default=None, help="replay a schedule")
    args = p.parse_args()
    window_s = args.seconds or (20.0 if args.quick else 300.0)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    install_signal_handlers()
    out = header(args.out or "fuzz", args.quick)
    out["params"] = {"window_s": window_s, "seed": seed, "streams": STREAMS}
    print(f"fuzz ({out['mode']}): {window_s:g} s windows, seed {seed}")
    sim = start_sim("--rate", "20")
    phases: dict[str, dict[str, Any]] = {}
    try:
        for name, phase_seed in (("baseline", None), ("fuzz", seed)):
            with stage(f"{name}: {'attacks without pause' if phase_seed else 'no attack'}"):
                phases[name] = run_phase(sim, window_s, phase_seed)
    finally:
        sim.stop()
    base, fuzz = phases["baseline"], phases["fuzz"]
    rows = [
        Row(
            "good client's rate",
            fuzz["rate"],
            "msgs/s",
            "no attack",
            base["rate"],
            ">= 0.9x",
            fuzz["rate"] >= 0.9 * base["rate"],
        ),
        Row(
            "good client's longest silence",
            fuzz["longest_silence_s"],
            "s",
            "no attack",
            base["longest_silence_s"],
            f"< {SILENCE_BOUND_S:g} s",
            fuzz["longest_silence_s"] < SILENCE_BOUND_S,
        ),
        Row(
            "good client's sequence gaps",
            fuzz["gaps"],
            "",
            "no attack",
            base["gaps"],
            "0",
            fuzz["gaps"] == 0,
        ),
        Row(
            "broker RSS growth",
            fuzz["rss_growth_mb"],
            "MB",
            "no attack",
            base["rss_growth_mb"],
            f"< {RSS_GROWTH_BOUND_MB:g} MB",
            fuzz["rss_growth_mb"] < RSS_GROWTH_BOUND_MB,
            note=f"RSS at start {fuzz['rss_start_mb']:.0f} MB",
        ),
    ]
    print_table(f"fuzz, seed {seed}", rows)
    print("\nattacks sent by kind:")
    for kind in sorted(fuzz["attacks"]):
        print(
            f"  {kind:16} {fuzz['attacks'][kind]:6} rounds {fuzz['attack_messages'][kind]:9} msgs"
        )
    out["phases"] = phases
    out["rows"] = [r.__dict__ for r in rows]
    print(f"\nresults: {write_results(out['bench'], out)}")
    if not all(r.ok for r in rows):
        raise SystemExit(f"FAILED; replay with --seed {seed}")


if __name__ == "__main__":
    main()
