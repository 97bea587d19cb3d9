"""Fan-out: 1, 10 and 50 client processes on every stream, vs pyupbit's one connection each.

The simulator runs in rate mode (default 1,000 messages/s over ``--codes`` KRW markets x
ticker+trade+orderbook). For each N:

- broker path: one broker (one upstream connection) and N ``clients.BrokerClient``
  processes, each subscribed to every stream. Reported: each client's delivered rate
  and loss, the broker's CPU per published message and per delivered message, and the
  CPU of the whole local side (broker + clients) per delivered message;
- pyupbit: N consumer processes, each with one ``WebSocketManager`` per type (pyupbit
  takes one type per connection), so 3N simulator connections and 3N reader processes.
  Reported: delivered rates and the local CPU (readers + consumers) per delivered
  message; the simulator's CPU is listed apart (it stands for Upbit's side).

Both paths run in the same invocation, one after the other at the same offered rate.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    Broker,
    CpuWindow,
    Row,
    Sim,
    Worker,
    base_parser,
    header,
    install_signal_handlers,
    median,
    print_table,
    stage,
    start_broker,
    start_sim,
    stop_all,
    write_results,
)

MSGS_PER_EVENT = 2.0


def _wait_connections(sim: Sim, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while sim.stats()["connections_open"] != count and time.monotonic() < deadline:
        time.sleep(0.1)


def _sim_sent(sim: Sim) -> int:
    return sum(int(c["messages_sent"]) for c in sim.connections(path=None))


def run_broker(
    sim: Sim, broker: Broker, n: int, codes: str, warmup: float, seconds: float
) -> dict[str, Any]:
    """N client processes on one broker; CPU over the common window."""
    args = ["--types", "ticker,trade,orderbook", "--codes", codes, "--min-messages", "20"]
    args += ["--max-seconds", str(seconds + 300)]
    workers = [Worker("client", args, env=broker.env, name=f"client{i}") for i in range(n)]
    try:
        for w in workers:
            w.ready(180)
        time.sleep(warmup)
        procs: dict[str, Any] = {"broker": broker.child.ps(), "simulator": sim.child.ps()}
        procs.update({f"client{i}": w.ps() for i, w in enumerate(workers)})
        cpu = CpuWindow(procs)
        sent0 = _sim_sent(sim)
        cpu.begin()
        for w in workers:
            w.start_window()
        time.sleep(seconds)
        cpu.end()
        sent1 = _sim_sent(sim)
        results = [w.stop_window(60) for w in workers]
    finally:
        stop_all(workers)
    published = sent1 - sent0
    delivered = sum(r["received"] for r in results)
    clients_cpu = sum(v for k, v in cpu.spent.items() if k.startswith("client"))
    return {
        "n": n,
        "rates": [r["rate"] for r in results],
        "published": published,
        "published_rate": published / cpu.wall,
        "delivered": delivered,
        "loss": sum(r["missed"] + r["dropped"] for r in results),
        "gaps": sum(r["gaps"] for r in results),
        "broker_cpu_s": cpu.spent["broker"],
        "clients_cpu_s": clients_cpu,
        "simulator_cpu_s": cpu.spent["simulator"],
        "window_s": cpu.wall,
        "broker_us_per_published": cpu.spent["broker"] / published * 1e6 if published else None,
        "broker_us_per_delivered": cpu.spent["broker"] / delivered * 1e6 if delivered else None,
        "local_us_per_delivered": (cpu.spent["broker"] + clients_cpu) / delivered * 1e6
        if delivered
        else None,
        "upstream_connections": 1,
    }


def run_pyupbit(sim: Sim, n: int, codes: str, warmup: float, seconds: float) -> dict[str, Any]:
    """N pyupbit consumer processes, three WebSocketManagers (connections) each."""
    import psutil  # type: ignore[import-untyped,unused-ignore]

    args = ["--url", sim.urls["ws"], "--types", "ticker,trade,orderbook", "--codes", codes]
    args += ["--min-messages", "20", "--max-seconds", str(seconds + 300)]
    workers = [Worker("pyupbit", args, name=f"pyupbit{i}") for i in range(n)]
    try:
        infos = [w.ready(180) for w in workers]
        _wait_connections(sim, 3 * n)
        time.sleep(warmup)
        procs: dict[str, Any] = {"simulator": sim.child.ps()}
        for i, (w, info) in enumerate(zip(workers, infos, strict=True)):
            procs[f"consumer{i}"] = w.ps()
            for pid in info["children"]:
                procs[f"reader{pid}"] = psutil.Process(pid)
        cpu = CpuWindow(procs)
        cpu.begin()
        for w in workers:
            w.start_window()
        time.sleep(seconds)
        cpu.end()
        results = [w.stop_window(60) for w in workers]
    finally:
        stop_all(workers)
    delivered = sum(r["received"] for r in results)
    local = sum(v for k, v in cpu.spent.items() if k != "simulator")
    return {
        "n": n,
        "rates": [r["rate"] for r in results],
        "delivered": delivered,
        "local_cpu_s": local,
        "simulator_cpu_s": cpu.spent["simulator"],
        "window_s": cpu.wall,
        "local_us_per_delivered": local / delivered * 1e6 if delivered else None,
        "simulator_us_per_delivered": cpu.spent["simulator"] / delivered * 1e6
        if delivered
        else None,
        "upstream_connections": 3 * n,
    }


def main() -> None:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "fanout")
    p.add_argument("--clients", default="", help="comma list of client counts")
    p.add_argument("--rate", type=float, default=1000.0, help="messages/s offered")
    p.add_argument("--codes", type=int, default=10)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--no-pyupbit", action="store_true")
    args = p.parse_args()
    quick = args.quick
    counts = [int(x) for x in (args.clients or ("1,5" if quick else "1,10,50")).split(",")]
    seconds = args.seconds or (3.0 if quick else 10.0)
    warmup = 1.0 if quick else 2.0
    install_signal_handlers()
    out = header(args.out or "fanout", quick)
    per_second = args.rate / (args.codes * MSGS_PER_EVENT)
    out["params"] = {
        "clients": counts,
        "rate": args.rate,
        "codes": args.codes,
        "per_second_per_market": per_second,
        "window_s": seconds,
        "simulator": f"--rate {per_second:g} --no-compress --no-limits",
    }
    print(f"fanout ({out['mode']}): N={counts}, ~{args.rate:,.0f} msgs/s, {seconds} s windows")
    t_start = time.monotonic()
    sim = start_sim("--rate", str(per_second), "--no-compress", "--no-limits")
    broker: Broker | None = None
    results: dict[int, dict[str, Any]] = {}
    try:
        codes = ",".join(sim.krw_codes(args.codes))
        broker = start_broker(sim)
        for n in counts:
            with stage(f"N={n}: broker path"):
                b = run_broker(sim, broker, n, codes, warmup, seconds)
            print(f"     per-client median {median(b['rates']):,.0f} msgs/s, loss {b['loss']}")
            sim.quiesce()  # the broker's idle upstream connection would linger for 30 s
            y: dict[str, Any] | None = None
            if not args.no_pyupbit:
                with stage(f"N={n}: pyupbit ({3 * n} connections)"):
                    y = run_pyupbit(sim, n, codes, warmup, seconds)
                print(f"     per-process median {median(y['rates']):,.0f} msgs/s")
                sim.quiesce()
            results[n] = {"broker": b, "pyupbit": y}
    finally:
        if broker is not None:
            broker.stop()
        sim.stop()

    rows: list[Row] = []
    base_cpu = results[counts[0]]["broker"]["broker_us_per_published"]
    for n in counts:
        b = results[n]["broker"]
        y = results[n]["pyupbit"]
        rows.append(
            Row(
                f"N={n}: per-client delivered (median)",
                median(b["rates"]),
                "msgs/s",
                "pyupbit per process" if y else "",
                median(y["rates"]) if y else None,
                note=f"min {min(b['rates']):,.0f}; loss {b['loss']} msgs, {b['gaps']} gaps",
            )
        )
        rows.append(
            Row(
                f"N={n}: broker CPU per published msg",
                b["broker_us_per_published"] or 0.0,
                "us",
                f"N={counts[0]} same run",
                base_cpu,
            )
        )
        rows.append(
            Row(
                f"N={n}: broker CPU per delivered msg",
                b["broker_us_per_delivered"] or 0.0,
                "us",
            )
        )
        rows.append(
            Row(
                f"N={n}: local CPU per delivered msg",
                b["local_us_per_delivered"] or 0.0,
                "us",
                "pyupbit (readers+consumers)" if y else "",
                y["local_us_per_delivered"] if y else None,
                note=f"upstream connections: broker 1, pyupbit {3 * n}",
            )
        )
    print_table(f"fanout ({out['mode']} run, ~{args.rate:,.0f} msgs/s offered)", rows)
    out["rows"] = rows
    out["results"] = {str(k): v for k, v in results.items()}
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out["caveats"] += [
        "N client processes share 2 vCPUs with the broker and the simulator: at N=50 the "
        "CPU per message includes scheduling overhead, and per-client rates fall when the "
        "machine saturates (loss shows as gaps).",
        "Simulator without compression and without limits: pyupbit's 3N connections would "
        "exceed Upbit's 5 connects/s, and with real Upbit each would also pay inflate.",
        "Local CPU excludes the simulator (Upbit's side); its CPU is in the JSON.",
    ]
    path = write_results(args.out or "fanout", out)
    print(f"\nwrote {path} ({out['elapsed_s']} s)")


if __name__ == "__main__":
    main()
