"""Throughput: simulator firehose -> broker -> one client, with zero loss, vs baselines.

Every path reads the SAME subscription (``--codes`` KRW markets x the workload's types,
DEFAULT format, realtime only) from the simulator's firehose (each connection gets its
subscribed streams as fast as it drains them; no compression, no limits):

- ``broker``      simulator -> broker process -> ZeroMQ -> one ``clients.BrokerClient``
                  process (sync callback counting and checking per-topic sequences)
- ``websockets``  a bare ``websockets`` client in one process, counting frames (the
                  library the broker uses upstream; no decoding)
- ``aiohttp``     the same with aiohttp's WebSocket client (informational: a candidate
                  replacement for the broker's upstream reader)
- ``pyupbit``     pyupbit's ``WebSocketManager`` (its reader process + a consumer
                  process), its hardcoded ``wss://api.upbit.com`` URL redirected to the
                  simulator (see :func:`bench.common.load_pyupbit_websocket_api`). It
                  takes one type per connection, so ``mix`` uses three managers
- ``zmq``         bare pyzmq PUB -> SUB between two processes, sending the messages
                  (topic + NUL + envelope) the broker published for the same workload (XPUB with
                  XPUB_NODROP so it blocks instead of dropping: the lossless ceiling)

Zero loss is checked with per-topic sequence numbers (independently of the library's
own tracker), the subscriptions' drop counters and status events. If the firehose
loses messages, the firehose is capped (the simulator's ``firehose_rate``) at steps
below the rate reached, to find the highest lossless rate, and both are reported.
Paths alternate within each round, so every figure has a same-run baseline; figures
are medians over rounds.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    Broker,
    CpuWindow,
    Row,
    Sim,
    Worker,
    base_parser,
    broker_health,
    header,
    install_signal_handlers,
    median,
    print_table,
    stage,
    start_broker,
    start_sim,
    write_results,
)

WORKLOADS: dict[str, list[str]] = {
    "mix": ["ticker", "trade", "orderbook"],
    "ticker": ["ticker"],
    "trade": ["trade"],
    "orderbook": ["orderbook"],
}
TARGET_RATE = 60_000
TARGET_VS_PYUPBIT = 1.2
TARGET_VS_WEBSOCKETS = 0.5


class Bench:
    """One simulator and broker for the whole run; paths measured one at a time."""

    def __init__(
        self, sim: Sim, broker: Broker, codes: list[str], args: Any, variant: Broker | None = None
    ) -> None:
        self.sim = sim
        self.broker = broker
        self.variant = variant
        self.codes = codes
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-tp-", dir="/tmp"))
        self.dumps: dict[str, Path] = {}

    def wait_quiet(self) -> None:
        """No WebSocket open on the simulator: the previous path (and its load) is gone."""
        self.sim.quiesce()

    def _sim_sent(self) -> int:
        return sum(int(c["messages_sent"]) for c in self.sim.connections(path=None))

    def run(self, kind: str, workload: str, *, window: float, profile: str = "") -> dict[str, Any]:
        """Measure one path on one workload; returns the worker's result plus CPU."""
        types = WORKLOADS[workload]
        codes = ",".join(self.codes)
        common = ["--codes", codes, "--types", ",".join(types), "--max-seconds", "120"]
        procs: dict[str, Any] = {"simulator": self.sim.child.ps()}
        if kind in ("broker", "variant"):
            broker = self.broker if kind == "broker" else self.variant
            assert broker is not None
            args = [*common, "--min-messages", "1000"]
            if workload not in self.dumps and kind == "broker":
                self.dumps[workload] = self.tmp / f"{workload}.dump"
                args += ["--dump", str(self.dumps[workload])]
            worker = Worker("client", args, env=broker.env, name=f"client-{workload}")
            procs["broker"] = broker.child.ps()
        elif kind in ("websockets", "aiohttp"):
            args = [*common, "--url", self.sim.urls["ws"], "--lib", kind, "--min-messages", "1000"]
            worker = Worker("ws", args, name=f"{kind}-{workload}")
        elif kind == "pyupbit":
            args = [*common, "--url", self.sim.urls["ws"], "--min-messages", "1000"]
            worker = Worker("pyupbit", args, name=f"pyupbit-{workload}")
        else:
            raise ValueError(kind)
        try:
            info = worker.ready(60)
            procs["worker"] = worker.ps()
            for pid in info.get("children", []):
                import psutil  # type: ignore[import-untyped,unused-ignore]

                procs[f"child-{pid}"] = psutil.Process(pid)
            time.sleep(self.args.warmup)
            cpu = CpuWindow(procs)
            sent0 = self._sim_sent() if kind in ("broker", "variant") else 0
            spy = _start_profile(self.broker.child.pid, window, profile) if profile else None
            cpu.begin()
            worker.start_window()
            time.sleep(window)
            cpu.end()
            sent1 = self._sim_sent() if kind in ("broker", "variant") else 0
            result = worker.stop_window()
            if spy is not None:
                spy.wait(timeout=window + 30)
        finally:
            worker.stop()
        result["cpu"] = {k: v for k, v in cpu.spent.items()}
        result["cpu_wall"] = cpu.wall
        if kind in ("broker", "variant"):
            result["sim_rate"] = (sent1 - sent0) / cpu.wall
            result["broker_cpu_us_per_msg"] = (
                cpu.spent["broker"] / result["received"] * 1e6 if result["received"] else None
            )
        worker_cpu = sum(v for k, v in cpu.spent.items() if k == "worker" or k.startswith("child"))
        result["reader_cpu_us_per_msg"] = (
            worker_cpu / result["received"] * 1e6 if result["received"] else None
        )
        local_cpu = sum(v for k, v in cpu.spent.items() if k != "simulator")
        result["path_cpu_us_per_msg"] = (
            local_cpu / result["received"] * 1e6 if result["received"] else None
        )
        self.wait_quiet()
        return result

    def run_capped(self, workload: str, target: float, window: float) -> dict[str, Any]:
        """Broker path with the firehose held to ``target`` messages/s."""
        self.sim.set_rate(firehose=True, firehose_rate=target)
        try:
            result = self.run("broker", workload, window=window)
        finally:
            self.sim.set_rate(firehose=True, firehose_rate=0)
        result["target"] = target
        return result

    def run_zmq(self, workload: str, window: float) -> dict[str, Any] | None:
        dump = self.dumps.get(workload)
        if dump is None or not dump.exists():
            return None
        endpoint = f"ipc://{self.tmp}/zmq-{workload}"
        pub = Worker("zmq-pub", ["--endpoint", endpoint, "--payloads", str(dump)], name="zmq-pub")
        sub = Worker("zmq-sub", ["--endpoint", endpoint, "--min-messages", "1000"], name="zmq-sub")
        try:
            pub.ready(30)
            sub.ready(30)
            time.sleep(self.args.warmup)
            cpu = CpuWindow({"pub": pub.ps(), "sub": sub.ps()})
            cpu.begin()
            sub.start_window()
            time.sleep(window)
            cpu.end()
            sub.signal(12)  # SIGUSR2: end the window; keep draining
            pub.signal(15)
            sent = pub.wait_tagged("RESULT", 30)["sent"]
            result = sub.wait_tagged("RESULT", 30)
        finally:
            pub.stop()
            sub.stop()
        result["sent_total"] = sent
        result["lost"] = sent - result["total"]
        result["cpu"] = cpu.spent
        return result

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _start_profile(pid: int, seconds: float, out: str) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy")
    if spy is None:
        print("     (py-spy not installed: no profile)")
        return None
    return subprocess.Popen(
        [
            *(spy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "250"),
            *("-f", "raw", "-o", out, "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize_profile(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive shares of the hottest frames in a py-spy ``raw`` profile."""
    total = 0
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_text)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        return {}
    return {
        "samples": total,
        "self": [(f, round(n / total * 100, 1)) for f, n in own.most_common(top)],
        "inclusive": [
            (f, round(n / total * 100, 1))
            for f, n in incl.most_common(top + 12)
            if "runpy" not in f and "<module>" not in f
        ][:top],
    }


def lossy(result: dict[str, Any]) -> bool:
    """True when the client saw any gap, drop or gap/down status event."""
    events = [e for e in result.get("status_events", []) if e.split(":")[0] in ("gap", "down")]
    return bool(
        result.get("gaps")
        or result.get("missed")
        or result.get("lib_gaps")
        or result.get("dropped")
        or events
    )


def main() -> None:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "throughput")
    p.add_argument("--codes", type=int, default=10, help="KRW markets per workload")
    p.add_argument("--workloads", default="", help="comma list of mix,ticker,trade,orderbook")
    p.add_argument("--rounds", type=int, default=0, help="rounds of the mix workload")
    p.add_argument("--window", type=float, default=0.0, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds before each window")
    p.add_argument("--no-pyupbit", action="store_true")
    p.add_argument("--profile", action="store_true", help="py-spy the broker (first mix run)")
    p.add_argument(
        "--search",
        action="store_true",
        help="step the capped firehose down even when the full firehose lost nothing",
    )
    p.add_argument(
        "--variant",
        default="",
        help="also measure a variant broker on the mix workload (commit:REV or asyncio)",
    )
    args = p.parse_args()
    quick = args.quick
    args.window = args.window or (1.5 if quick else 3.0)
    args.warmup = args.warmup or (0.5 if quick else 1.0)
    rounds = args.rounds or (1 if quick else 3)
    workloads = (args.workloads or ("mix,ticker" if quick else "mix,ticker,trade,orderbook")).split(
        ","
    )
    install_signal_handlers()
    out = header(args.out or "throughput", quick)
    out["params"] = {
        "codes": args.codes,
        "workloads": workloads,
        "mix_rounds": rounds,
        "window_s": args.window,
        "warmup_s": args.warmup,
        "simulator": "--firehose --no-compress --no-limits",
        "format": "DEFAULT (the broker's upstream format), realtime only",
    }
    print(f"throughput ({out['mode']}): {args.codes} codes, workloads {workloads}")
    t_start = time.monotonic()
    sim = start_sim("--firehose", "--no-compress", "--no-limits")
    broker: Broker | None = None
    variant: Broker | None = None
    bench: Bench | None = None
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        broker = start_broker(sim)
        if args.variant:
            try:
                variant = start_broker(sim, variant=args.variant)
            except (RuntimeError, TimeoutError) as exc:
                print(f"     variant {args.variant!r} not measured: {str(exc)[-300:]}")
                args.variant = ""
        codes = sim.krw_codes(args.codes)
        bench = Bench(sim, broker, codes, args, variant)
        profile_path = RESULTS / "throughput-broker-profile.txt"
        RESULTS.mkdir(parents=True, exist_ok=True)
        profiled = False
        for workload in workloads:
            n_rounds = rounds if workload == "mix" else 1
            kinds = ["broker", "websockets", "pyupbit"]
            if workload == "mix":
                kinds.insert(2, "aiohttp")
                if args.variant:
                    kinds.insert(1, "variant")
            if args.no_pyupbit:
                kinds.remove("pyupbit")
            for r in range(n_rounds):
                for kind in kinds:
                    prof = ""
                    if args.profile and kind == "broker" and workload == "mix" and not profiled:
                        prof, profiled = str(profile_path), True
                    with stage(f"{workload} round {r + 1}: {kind}"):
                        res = bench.run(kind, workload, window=args.window, profile=prof)
                    runs.setdefault(workload, {}).setdefault(kind, []).append(res)
                    print(f"     {res['rate']:,.0f} msgs/s" + ("  LOSS" if lossy(res) else ""))
            with stage(f"{workload}: bare zmq"):
                z = bench.run_zmq(workload, args.window)
            if z is not None:
                runs[workload]["zmq"] = [z]
                print(f"     {z['rate']:,.0f} msgs/s, lost {z['lost']}")
        # Loss at the firehose: cap it lower, step by step, to the highest lossless rate.
        search: dict[str, list[dict[str, Any]]] = {}
        for workload in workloads:
            firehose = runs[workload]["broker"]
            if not args.search and not any(lossy(x) for x in firehose):
                continue
            top = max(x["rate"] for x in firehose)
            for frac in (0.9, 0.75, 0.6, 0.45, 0.3):
                with stage(f"{workload}: firehose capped at {frac:.0%} of {top:,.0f}"):
                    res = bench.run_capped(workload, top * frac, args.window)
                search.setdefault(workload, []).append(res)
                print(f"     {res['rate']:,.0f} msgs/s" + ("  LOSS" if lossy(res) else ""))
                if not lossy(res):
                    break
        health = broker_health(broker.env)
        out["broker_reconnects"] = health["public"]["reconnects"]
    finally:
        if bench is not None:
            bench.close()
        for b in (broker, variant):
            if b is not None:
                b.stop()
        sim.stop()

    rows: list[Row] = []
    summary: dict[str, Any] = {}
    for workload in workloads:
        w = runs[workload]
        med = {k: median(x["rate"] for x in v) for k, v in w.items()}
        firehose_lossy = any(lossy(x) for x in w["broker"])
        lossless = med["broker"]
        note = ""
        if firehose_lossy:
            ok_runs = [x for x in search.get(workload, []) if not lossy(x)]
            lossless = max((x["rate"] for x in ok_runs), default=0.0)
            note = f"firehose lost messages at {med['broker']:,.0f}/s; highest lossless step shown"
            if any(x["sim_rate"] < 0.9 * x["target"] for x in search.get(workload, [])):
                note += " (the simulator could not offer every step)"
        elif search.get(workload):
            steps = ", ".join(
                f"{x['rate']:,.0f}/s{' LOSS' if lossy(x) else ''} (asked {x['target']:,.0f}, "
                f"sim sent {x['sim_rate']:,.0f}/s"
                + (": simulator-limited)" if x["sim_rate"] < 0.9 * x["target"] else ")")
                for x in search[workload]
            )
            note = f"capped firehose steps: {steps}"
        cpu_per_msg = median(x["broker_cpu_us_per_msg"] or 0 for x in w["broker"])
        summary[workload] = {
            "median_rate": med,
            "broker_lossless_rate": lossless,
            "firehose_lossy": firehose_lossy,
            "broker_cpu_us_per_msg": cpu_per_msg,
            "client_cpu_us_per_msg": median(x["reader_cpu_us_per_msg"] or 0 for x in w["broker"]),
            "sim_rate_broker_path": median(x["sim_rate"] for x in w["broker"]),
        }
        label = f"{workload}: broker path, zero loss"
        rows.append(
            Row(
                label,
                lossless,
                "msgs/s",
                "websockets",
                med.get("websockets"),
                f">= {TARGET_VS_WEBSOCKETS:.0%} of websockets",
                lossless >= TARGET_VS_WEBSOCKETS * med["websockets"]
                if "websockets" in med
                else None,
                note,
            )
        )
        if "pyupbit" in med:
            rows.append(
                Row(
                    label,
                    lossless,
                    "msgs/s",
                    "pyupbit" + (" (3 conns)" if len(WORKLOADS[workload]) > 1 else ""),
                    med["pyupbit"],
                    f">= {TARGET_VS_PYUPBIT}x pyupbit",
                    lossless >= TARGET_VS_PYUPBIT * med["pyupbit"],
                )
            )
        if "aiohttp" in med:
            rows.append(Row(label, lossless, "msgs/s", "aiohttp reader", med["aiohttp"]))
        if "variant" in med:
            rows.append(
                Row(
                    f"{workload}: broker variant '{args.variant}'",
                    med["variant"],
                    "msgs/s",
                    "unmodified broker",
                    med["broker"],
                    note="loss!" if any(lossy(x) for x in w["variant"]) else "zero loss",
                )
            )
            rows.append(
                Row(
                    f"{workload}: variant broker CPU per message",
                    median(x["broker_cpu_us_per_msg"] or 0 for x in w["variant"]),
                    "us",
                    "unmodified broker",
                    cpu_per_msg,
                )
            )
        if "zmq" in med:
            rows.append(Row(label, lossless, "msgs/s", "bare zmq PUB/SUB", med["zmq"]))
        if workload == "mix":
            rows.append(
                Row(
                    "mix: broker path, zero loss",
                    lossless,
                    "msgs/s",
                    "target",
                    TARGET_RATE,
                    f">= {TARGET_RATE:,}",
                    lossless >= TARGET_RATE,
                )
            )
        path_cpu = {
            k: median(x["path_cpu_us_per_msg"] or 0 for x in v) for k, v in w.items() if k != "zmq"
        }
        for other in ("websockets", "pyupbit"):
            if other in path_cpu:
                rows.append(
                    Row(
                        f"{workload}: local CPU per msg (all processes)",
                        path_cpu["broker"],
                        "us",
                        other,
                        path_cpu[other],
                        note="broker path = broker + client" if other == "websockets" else "",
                    )
                )
        summary[workload]["path_cpu_us_per_msg"] = path_cpu
        rows.append(
            Row(
                f"{workload}: broker CPU per message",
                cpu_per_msg,
                "us",
                "websockets reader CPU/msg",
                median(x["reader_cpu_us_per_msg"] or 0 for x in w.get("websockets", [])) or None,
            )
        )
    title = f"throughput ({out['mode']} run, {args.codes} codes, medians)"
    print_table(title, rows)
    out["rows"] = rows
    out["summary"] = summary
    out["runs"] = runs
    out["rate_search"] = search
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    if args.profile:
        summary_prof = summarize_profile(RESULTS / "throughput-broker-profile.txt")
        out["broker_profile"] = summary_prof
        if summary_prof:
            print("\nbroker profile (py-spy, mix firehose), top self time:")
            for frame, share in summary_prof["self"][:12]:
                print(f"  {share:5.1f}%  {frame}")
    out["caveats"] += [
        "Simulator runs with --no-compress: real Upbit offers permessage-deflate, which "
        "adds inflate cost to every path alike.",
        "Bare websockets/aiohttp readers count frames without decoding; the broker decodes "
        "(msgspec), re-encodes (msgpack) and publishes, and its client decodes again.",
        "pyupbit takes one type per connection: for 'mix' it runs three reader processes "
        "(one per type), each with its own firehose.",
        "All readers (broker, websockets, aiohttp, client) run on uvloop when installed; "
        "pyupbit runs its own asyncio.run as shipped.",
    ]
    path = write_results(args.out or "throughput", out)
    print(f"\nwrote {path} ({out['elapsed_s']} s)")


if __name__ == "__main__":
    main()
