"""Slow consumers: clients that read nothing cost the broker bounded memory, others nothing.

The simulator offers ~3,200 messages/s (8 KRW markets x 200 events/s, ticker + trade +
orderbook). Two phases on the same simulator, each with a fresh broker and the same
three library clients (``python -m bench.common client``): ``reader`` (every stream),
``tickers`` (the tickers) and ``frozen`` (every stream):

- baseline: everyone reads for the whole window;
- frozen: at the start of the window ``frozen`` is SIGSTOPped (the broker expires it, but
  its data socket stays connected) and a raw SUB that subscribes to everything and never
  calls recv joins. The broker must drop for both instead of queueing without end.

Reported for the frozen phase against the baseline phase: the broker's RSS growth over
the window (peak minus the warm-up median) and over its last third (bounded memory has
levelled off by then), the reader's delivered rate against the rate the simulator
offered over the same window, and the sequence gaps of the clients that do read.
"""

from __future__ import annotations

import signal
import statistics
import time
from typing import Any

from bench.common import (
    Broker,
    Child,
    Row,
    Sim,
    Worker,
    base_parser,
    header,
    install_signal_handlers,
    print_table,
    stage,
    start_broker,
    start_sim,
    stop_all,
    write_results,
)

MB = 2**20
RSS_GROWTH_BOUND_MB = 50.0
"""Growth allowed while two clients read nothing: ~3 MB/s of published data queued
(~0.9 KB a message with ZeroMQ's overhead) would reach it in ~8 s per never-reading
client; a broker that bounds what it queues per subscriber stays well below."""
PLATEAU_BOUND_MB = 8.0
"""Growth allowed over the last third of the window: bounded memory has levelled off."""
MIN_DELIVERED = 0.9
"""The reader must get at least this share of what the simulator offered."""
BROKER_ENV = {"UPBIT_BROKER_HEARTBEAT": "0.5", "UPBIT_BROKER_LIVENESS": "3"}
"""A stopped client expires after ~1.5 s, as in the integration tests."""

NEVER_READS = """
import sys, zmq
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()  # never recv: hold the socket open until told to go
"""


def _sim_sent(sim: Sim) -> int:
    return sum(int(c["messages_sent"]) for c in sim.connections(path=None))


def _lost(result: dict[str, Any]) -> int:
    """Gaps, missed and dropped messages a client saw in its window, and gap events."""
    return (
        int(result["gaps"])
        + int(result["missed"])
        + int(result["lib_gaps"])
        + int(result["dropped"])
        + int(result["status_counts"].get("gap", 0))
    )


def run_phase(
    sim: Sim, codes: list[str], warm_s: float, window_s: float, *, freeze: bool
) -> dict[str, Any]:
    """One broker, three clients; the broker's RSS every second over warm-up and window."""
    broker: Broker = start_broker(sim, BROKER_ENV)
    children: list[Child] = []
    try:
        limit = ["--max-seconds", str(warm_s + window_s + 300), "--min-messages", "20"]
        every = ["--types", "ticker,trade,orderbook", "--codes", ",".join(codes), *limit]
        tickers_args = ["--types", "ticker", "--codes", ",".join(codes), *limit]
        reader = Worker("client", [*every, "--name", "reader"], broker.env, "reader")
        tickers = Worker("client", [*tickers_args, "--name", "tickers"], broker.env, "tickers")
        frozen = Worker("client", [*every, "--name", "frozen"], broker.env, "frozen")
        children += [reader, tickers, frozen]
        for worker in (reader, tickers, frozen):
            worker.ready(60)
        warm: list[int] = []
        t = time.monotonic()
        while time.monotonic() - t < warm_s:
            warm.append(broker.child.rss())
            time.sleep(1.0)
        baseline_rss = int(statistics.median(warm[-3:]))
        if freeze:
            frozen.signal(signal.SIGSTOP)
            never = Child("never-reads", ["-c", NEVER_READS, broker.env["UPBIT_BROKER_DATA"]])
            children.append(never)
            if never.read_line() != "ready":
                raise RuntimeError(f"the never-reading SUB did not start\n{never.output()}")
        sent0 = _sim_sent(sim)
        t0 = time.monotonic()
        reader.start_window()
        tickers.start_window()
        samples: list[tuple[float, int]] = []
        while (elapsed := time.monotonic() - t0) < window_s:
            samples.append((round(elapsed, 1), broker.child.rss()))
            if not broker.child.alive():
                raise RuntimeError(f"the broker died\n{broker.child.output(3000)}")
            time.sleep(1.0)
        offered = (_sim_sent(sim) - sent0) / (time.monotonic() - t0)
        if freeze and frozen.ps().status() != "stopped":
            raise RuntimeError("the frozen client was not stopped through the window")
        results = {"reader": reader.stop_window(30), "tickers": tickers.stop_window(30)}
    finally:
        stop_all(children)
        broker.stop()
    sim.quiesce()  # the broker's idle upstream connection would linger for 30 s
    peak = max(value for _, value in samples)
    before_tail = max(value for t, value in samples if t <= window_s * 2 / 3)
    return {
        "rss_warm_mb": [round(v / MB, 2) for v in warm],
        "rss_baseline_mb": baseline_rss / MB,
        "rss_samples_mb": [(t, round(v / MB, 2)) for t, v in samples],
        "growth_mb": (peak - baseline_rss) / MB,
        "tail_growth_mb": (peak - before_tail) / MB,
        "offered_rate": offered,
        "clients": results,
        "lost": sum(_lost(r) for r in results.values()),
    }


def main() -> None:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "slow_consumer")
    p.add_argument("--codes", type=int, default=8, help="KRW markets")
    p.add_argument("--per-market", type=float, default=200.0, help="events/s per market")
    p.add_argument("--seconds", type=float, default=0.0, help="window (default 60, quick 12)")
    args = p.parse_args()
    quick = args.quick
    window_s = args.seconds or (12.0 if quick else 60.0)
    warm_s = 4.0 if quick else 8.0
    install_signal_handlers()
    out = header(args.out or "slow_consumer", quick)
    out["params"] = {
        "codes": args.codes,
        "per_market": args.per_market,
        "window_s": window_s,
        "warm_up_s": warm_s,
        "broker_env": BROKER_ENV,
    }
    print(
        f"slow_consumer ({out['mode']}): {args.codes} markets x {args.per_market:g} events/s, "
        f"{window_s:g} s windows"
    )
    t_start = time.monotonic()
    sim = start_sim("--rate", "20")
    phases: dict[str, dict[str, Any]] = {}
    try:
        codes = sim.krw_codes(args.codes)
        sim.set_rate(per_second=args.per_market)
        for name, freeze in (("baseline", False), ("frozen", True)):
            with stage(f"{name}: {'two clients read nothing' if freeze else 'everyone reads'}"):
                phases[name] = run_phase(sim, codes, warm_s, window_s, freeze=freeze)
            ph = phases[name]
            print(
                f"     RSS +{ph['growth_mb']:.1f} MB, reader "
                f"{ph['clients']['reader']['rate']:,.0f} of {ph['offered_rate']:,.0f} msgs/s"
            )
    finally:
        sim.stop()

    base, frozen = phases["baseline"], phases["frozen"]
    reader_f = frozen["clients"]["reader"]["rate"]
    reader_b = base["clients"]["reader"]["rate"]
    rows = [
        Row(
            "broker RSS growth, two clients frozen",
            frozen["growth_mb"],
            "MB",
            "everyone reading",
            base["growth_mb"],
            f"< {RSS_GROWTH_BOUND_MB:g} MB",
            frozen["growth_mb"] < RSS_GROWTH_BOUND_MB,
            note=f"RSS after warm-up {frozen['rss_baseline_mb']:.1f} MB",
        ),
        Row(
            "broker RSS growth over the last third",
            frozen["tail_growth_mb"],
            "MB",
            "everyone reading",
            base["tail_growth_mb"],
            f"< {PLATEAU_BOUND_MB:g} MB",
            frozen["tail_growth_mb"] < PLATEAU_BOUND_MB,
        ),
        Row(
            "reader delivered, two clients frozen",
            reader_f,
            "msgs/s",
            "offered by the simulator",
            frozen["offered_rate"],
            f">= {MIN_DELIVERED:.0%} of offered",
            reader_f >= MIN_DELIVERED * frozen["offered_rate"],
        ),
        Row(
            "reader delivered, everyone reading",
            reader_b,
            "msgs/s",
            "offered by the simulator",
            base["offered_rate"],
        ),
        Row(
            "messages lost by the readers, two clients frozen",
            frozen["lost"],
            "msgs",
            "everyone reading",
            base["lost"],
            "0",
            frozen["lost"] == 0,
            note="gaps + missed + dropped + gap events of 'reader' and 'tickers'",
        ),
    ]
    print_table(f"slow_consumer ({out['mode']} run, {window_s:g} s windows)", rows)
    out["rows"] = rows
    out["phases"] = phases
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out["caveats"] += [
        "RSS is sampled once a second; growth = the window's peak minus the median of the "
        "last three warm-up samples. Each phase has a fresh broker on the same simulator.",
        "The frozen client is expired by the broker after ~1.5 s (heartbeat 0.5 s x 3), but "
        "its SUB stays connected: the broker's PUB queues for it up to its high-water mark.",
    ]
    path = write_results(args.out or "slow_consumer", out)
    print(f"\nwrote {path} ({out['elapsed_s']} s)")


if __name__ == "__main__":
    main()
