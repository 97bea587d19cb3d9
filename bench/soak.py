"""Soak: broker + simulator + a few clients for an hour, with a fault every few minutes.

Not a CI test. The simulator runs like Upbit (rate mode, limits on, compression on);
three ``clients.BrokerClient`` processes stay subscribed the whole time:

- ``mix``: ticker+trade+orderbook of 10 KRW codes;
- ``ticker``: tickers of the same 10 codes (compared with pyupbit below);
- ``book15``: 15-level orderbooks of 5 codes;

and, as the same-run baseline, a pyupbit ``WebSocketManager`` on the same 10 tickers,
connected straight to the simulator. Every ``--fault-every`` seconds the next fault of
the cycle hits the simulator: ``drop`` (every WebSocket aborted), ``stall`` (nothing
sent, pings unanswered, for 20 s), ``refuse`` (drop, then upgrades refused with 429 for
15 s). A pyupbit reader that dies is recorded and replaced, so later faults still have
a baseline.

Reported: faults injected, reconnects the broker survived, sequence gaps on the bus
(must be 0: upstream losses are announced as ``gap`` status events instead), the
silence each fault caused on the broker path vs pyupbit, and the broker's RSS growth
after a warm-up (10 % of the run, at most 5 minutes).
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    Broker,
    Row,
    Sim,
    Worker,
    base_parser,
    broker_health,
    header,
    install_signal_handlers,
    median,
    print_table,
    start_broker,
    start_sim,
    write_results,
)

FAULTS = ("drop", "stall", "refuse")
OUTAGE_MS = 500.0
MB = 2**20


def inject(sim: Sim, fault: str) -> None:
    """Apply one fault to the simulator."""
    if fault == "drop":
        sim.control("drop", {})
    elif fault == "stall":
        sim.control("stall", {"seconds": 20})
    elif fault == "refuse":
        sim.control("refuse_upgrades", {"seconds": 15, "status": 429})
        sim.control("drop", {})
    else:
        raise ValueError(fault)


class PyupbitBaseline:
    """A pyupbit ticker reader; replaced (and the death recorded) when its reader dies."""

    def __init__(self, sim: Sim, codes: str, max_seconds: float) -> None:
        self.sim = sim
        self.codes = codes
        self.max_seconds = max_seconds
        self.results: list[dict[str, Any]] = []
        self.deaths: list[dict[str, Any]] = []
        self.worker: Worker | None = None
        self.children: list[int] = []
        self.start()

    def start(self) -> None:
        args = ["--url", self.sim.urls["ws"], "--types", "ticker", "--codes", self.codes]
        args += ["--outage-ms", str(OUTAGE_MS), "--max-seconds", str(self.max_seconds)]
        self.worker = Worker("pyupbit", args, name="pyupbit")
        info = self.worker.ready(120)
        self.children = list(info["children"])
        self.worker.start_window()

    def reader_alive(self) -> bool:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        for pid in self.children:
            try:
                proc = psutil.Process(pid)
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                return False
        return True

    def check(self, after_fault: str, at: float) -> None:
        if self.reader_alive() or self.worker is None:
            return
        self.deaths.append({"after_fault": after_fault, "at": at})
        self.results.append(self.worker.stop_window(30))
        self.start()

    def finish(self) -> None:
        if self.worker is not None:
            self.results.append(self.worker.stop_window(30))
            self.worker = None


def _outage_after(outages: list[list[float]], t: float, horizon: float) -> float:
    """Length of the longest silence that started within [t - 2, t + horizon]."""
    spans = [d for start, d in outages if t - 2.0 <= start <= t + horizon]
    return max(spans, default=0.0)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "soak")
    p.add_argument("--minutes", type=float, default=0.0, help="soak length (default 60)")
    p.add_argument("--fault-every", type=float, default=0.0, help="seconds between faults")
    p.add_argument("--codes", type=int, default=10)
    p.add_argument("--rate", type=float, default=20.0, help="events/s per market")
    p.add_argument("--no-pyupbit", action="store_true", help="skip the pyupbit baseline")
    args = p.parse_args()
    quick = args.quick
    seconds = (args.minutes or (2.0 if quick else 60.0)) * 60
    every = args.fault_every or (30.0 if quick else 240.0)
    install_signal_handlers()
    out = header(args.out or "soak", quick)
    out["params"] = {
        "seconds": seconds,
        "fault_every_s": every,
        "faults": list(FAULTS),
        "codes": args.codes,
        "simulator": f"--rate {args.rate:g} (limits and compression on)",
    }
    print(f"soak ({out['mode']}): {seconds / 60:g} min, a fault every {every:g} s")
    t_start = time.monotonic()
    sim = start_sim("--rate", str(args.rate))
    broker: Broker | None = None
    clients: dict[str, Worker] = {}
    baseline: PyupbitBaseline | None = None
    faults: list[dict[str, Any]] = []
    rss: list[tuple[float, int]] = []
    health_log: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    try:
        broker = start_broker(sim)
        codes = sim.krw_codes(args.codes)
        all_codes = ",".join(codes)
        limit = ["--max-seconds", str(seconds + 600), "--outage-ms", str(OUTAGE_MS)]
        specs = {
            "mix": ["--types", "ticker,trade,orderbook", "--codes", all_codes],
            "ticker": ["--types", "ticker", "--codes", all_codes],
            "book15": ["--types", "orderbook", "--depth", "15", "--codes", ",".join(codes[:5])],
        }
        for name, spec in specs.items():
            clients[name] = Worker("client", [*spec, *limit, "--name", name], broker.env, name)
        for w in clients.values():
            w.ready(120)
        if not args.no_pyupbit:
            baseline = PyupbitBaseline(sim, all_codes, seconds + 600)
        for w in clients.values():
            w.start_window()
        t0 = time.time()
        next_fault = t0 + every
        next_rss = t0
        last_fault = ""
        i = 0
        while time.time() - t0 < seconds:
            now = time.time()
            if now >= next_rss:
                rss.append((round(now - t0, 1), broker.child.rss()))
                next_rss = now + (10.0 if seconds > 300 else 2.0)
            if now >= next_fault and now - t0 < seconds - min(every, 60.0):
                fault = FAULTS[i % len(FAULTS)]
                i += 1
                before = broker_health(broker.env)["public"]["reconnects"]
                inject(sim, fault)
                faults.append({"fault": fault, "at": now, "reconnects_before": before})
                print(f"  {now - t0:7.1f} s  fault: {fault}", flush=True)
                last_fault = fault
                next_fault = now + every
            if faults and now - faults[-1]["at"] > 45 and "checked" not in faults[-1]:
                faults[-1]["checked"] = True
                if baseline is not None:
                    baseline.check(last_fault, faults[-1]["at"])
                h = broker_health(broker.env)
                health_log.append({"t": round(now - t0, 1), "public": h["public"]})
            if not broker.child.alive():
                raise RuntimeError(f"broker died\n{broker.child.output(3000)}")
            time.sleep(0.5)
        final_health = broker_health(broker.env)
        for name, w in clients.items():
            results[name] = w.stop_window(60)
        if baseline is not None:
            baseline.finish()
    finally:
        for w in clients.values():
            w.stop()
        if baseline is not None and baseline.worker is not None:
            baseline.worker.stop()
        if broker is not None:
            broker.stop()
        sim.stop()

    ticker_out = results["ticker"]["outages"]
    pyupbit_out = [o for r in baseline.results for o in r.get("outages", [])] if baseline else []
    per_fault: dict[str, dict[str, list[float]]] = {
        f: {"broker": [], "pyupbit": []} for f in FAULTS
    }
    horizon = min(every - 5.0, 60.0)
    deaths = baseline.deaths if baseline else []
    died_at = {d["at"] for d in deaths}
    for f in faults:
        per_fault[f["fault"]]["broker"].append(_outage_after(ticker_out, f["at"], horizon))
        if baseline is None or f["at"] in died_at:
            continue  # no baseline, or pyupbit never came back (counted as a death)
        per_fault[f["fault"]]["pyupbit"].append(_outage_after(pyupbit_out, f["at"], horizon))
    warm_s = min(300.0, seconds * 0.1)
    warm = next((v for t, v in rss if t >= warm_s), rss[0][1] if rss else 0)
    growth = (rss[-1][1] - warm) / MB if rss else 0.0
    gaps = sum(r["gaps"] + r["lib_gaps"] for r in results.values())
    missed = sum(r["missed"] + r["dropped"] for r in results.values())
    gap_events = sum(r["status_counts"].get("gap", 0) for r in results.values())
    restored = sum(r["status_counts"].get("restored", 0) for r in results.values())
    reconnects = final_health["public"]["reconnects"]
    rows: list[Row] = [
        Row(
            "faults injected / broker reconnects",
            len(faults),
            "faults",
            "broker reconnects",
            reconnects,
            note=f"pyupbit readers that died: {len(deaths)} ({[d['after_fault'] for d in deaths]})",
        ),
        Row(
            "bus sequence gaps (all clients)",
            gaps,
            "gaps",
            target="0",
            ok=gaps == 0 and missed == 0,
            note=f"upstream gap events announced {gap_events}, 'restored' events {restored}",
        ),
    ]
    for fault in FAULTS:
        b = per_fault[fault]["broker"]
        y = per_fault[fault]["pyupbit"]
        if not b:
            continue
        dead = sum(1 for d in deaths if d["after_fault"] == fault)
        note = f"max broker {max(b):.1f} s" + (f", pyupbit {max(y):.1f} s" if y else "")
        if dead:
            note += f"; pyupbit's reader died (never reconnected) after {dead} of {len(b)}"
        rows.append(
            Row(
                f"silence after '{fault}' (median of {len(b)})",
                median(b),
                "s",
                "pyupbit",
                median(y) if y else None,
                note=note,
            )
        )
    rows.append(
        Row(
            f"broker RSS growth after {warm_s:.0f} s",
            growth,
            "MB",
            "RSS after warm-up",
            warm / MB,
            "< 5 MB",
            growth < 5.0,
        )
    )
    for name, r in results.items():
        rows.append(
            Row(
                f"client '{name}' delivered",
                r["rate"],
                "msgs/s",
                note=f"status {r['status_counts']}",
            )
        )
    print_table(f"soak ({out['mode']} run, {seconds / 60:g} min)", rows)
    out["rows"] = rows
    out["faults"] = faults
    out["per_fault_silence_s"] = per_fault
    out["pyupbit_deaths"] = deaths
    out["clients"] = results
    out["pyupbit"] = baseline.results if baseline else []
    out["rss"] = rss
    out["health_log"] = health_log
    out["final_health"] = final_health
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out["caveats"] += [
        "Silence = the longest gap (> 0.5 s) between two ticker messages (10 codes, ~100 "
        "msgs/s) that began around the fault (0 = none); a stall silences both paths for its "
        "20 s by design. During refused upgrades the broker serves tickers from REST polling.",
        "A stalled simulator also stalls the broker's new connection, so its recovery after "
        "a stall is bounded by the stall, not by detection (ping timeout 5 s).",
    ]
    path = write_results(args.out or "soak", out)
    print(f"\nwrote {path} ({out['elapsed_s']} s)")


if __name__ == "__main__":
    main()
