"""Agility: subscribe-to-first-message for NEW codes while 100 symbols churn.

Processes: simulator (rate mode, Upbit's limits ON), broker, and

- ``churn``: a ``clients.BrokerClient`` process toggling ticker subscriptions of 100 KRW
  codes continuously (one subscribe or unsubscribe every ``--churn-interval`` s);
- the probe (this process): every ``--probe-interval`` s a ``BrokerClient`` subscribes
  the ticker of a code nobody holds (the 70 other KRW codes, then BTC and USDT markets;
  none is reused during the churn phase) and times ``subscribe_ticker()`` -> first
  callback, then unsubscribes. A probe without a message after 10 s counts as 10 s;
- ``bare-probe`` (same-run baseline): a bare ``websockets`` connection to the simulator
  sending a new request for one new code (BTC markets) every second and timing request
  -> first message of that code: what one direct connection costs.

Phases: probes with no churn (the broker idle), then with churn. Upbit counts 100
messages per minute per connection, so after ~20 s of churn the broker's request budget
is spent and requests go out at ~1.5/s: the churn phase is reported overall, for its
first 20 s and after. Finally the simulator's request log of every broker connection is
checked: no more than 5 requests in any second and 100 in any minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from typing import Any

from bench.common import (
    Child,
    Row,
    Sim,
    _emit,
    _run_async,
    base_parser,
    header,
    install_signal_handlers,
    percentiles,
    print_table,
    stage,
    start_broker,
    start_sim,
    write_results,
)

TARGET_P99_MS = 300.0
PROBE_TIMEOUT = 10.0
"""Seconds a probe waits for its first message; a timeout counts as this long."""


# ---------------------------------------------------------------------------- roles


async def _churn(args: argparse.Namespace) -> None:
    """Toggle ticker subscriptions of ``--codes`` until SIGTERM."""
    from clients import BrokerClient

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.call_later(args.max_seconds, stop.set)
    codes = args.codes.split(",")
    rng = random.Random(7)
    ops = errors = 0
    held: dict[str, Any] = {}
    async with BrokerClient(name="bench-churn", request_timeout=10) as client:
        _emit("READY", {"pid": os.getpid()})
        while not stop.is_set():
            code = rng.choice(codes)
            try:
                if code in held:
                    await held.pop(code).unsubscribe()
                else:
                    held[code] = await client.subscribe_ticker(code, lambda t: None)
                ops += 1
            except Exception:
                errors += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
        _emit("RESULT", {"ops": ops, "errors": errors, "held": len(held)})


async def _bare_probe(args: argparse.Namespace) -> None:
    """One direct connection; a new single-code request every ``--interval`` s."""
    from websockets.asyncio.client import connect

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.call_later(args.max_seconds, stop.set)
    codes = args.codes.split(",")
    samples: list[float] = []
    timeouts = 0
    async with connect(args.url, max_size=2**24, close_timeout=1) as ws:
        _emit("READY", {"pid": os.getpid()})
        i = 0
        while not stop.is_set():
            code = codes[i % len(codes)]
            i += 1
            needle = f'"code":"{code}"'.encode()
            request = [
                {"ticket": f"bench-{uuid.uuid4().hex[:8]}"},
                {"type": "ticker", "codes": [code]},
            ]
            t0 = time.perf_counter()
            await ws.send(json.dumps(request))
            deadline = t0 + 10
            got = False
            while time.perf_counter() < deadline:
                try:
                    frame = await asyncio.wait_for(ws.recv(), deadline - time.perf_counter())
                except TimeoutError:
                    break
                data = frame if isinstance(frame, bytes) else frame.encode()
                if needle in data.replace(b" ", b""):
                    samples.append((time.perf_counter() - t0) * 1000)
                    got = True
                    break
            if not got:
                timeouts += 1
            rest = args.interval - (time.perf_counter() - t0)
            if rest > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), rest)
        _emit("RESULT", {"samples_ms": samples, "timeouts": timeouts})


# ---------------------------------------------------------------------------- probes


class Prober:
    """Times subscribe -> first message for never-held codes, several in flight."""

    def __init__(self, client: Any, codes: list[str]) -> None:
        self.client = client
        self.codes = codes
        self.next = 0
        self.samples: list[tuple[float, float]] = []  # (start offset s, latency ms)
        self.walls: list[tuple[str, float, float]] = []  # (code, wall t0, wall t1)
        self.timeouts = 0
        self.errors: list[str] = []
        self.t_origin = time.perf_counter()

    async def probe(self, code: str) -> None:
        loop = asyncio.get_running_loop()
        first: asyncio.Future[float] = loop.create_future()

        def on_ticker(ticker: Any) -> None:
            if not first.done():
                first.set_result(time.perf_counter())

        t0 = time.perf_counter()
        wall0 = time.time()
        try:
            sub = await self.client.subscribe_ticker(code, on_ticker)
        except Exception as exc:
            self.errors.append(repr(exc)[:200])
            return
        try:
            t1 = await asyncio.wait_for(first, PROBE_TIMEOUT)
            self.samples.append((t0 - self.t_origin, (t1 - t0) * 1000))
            self.walls.append((code, wall0, wall0 + (t1 - t0)))
        except TimeoutError:
            self.timeouts += 1
            # Censored at the timeout: counted in the percentiles as PROBE_TIMEOUT.
            self.samples.append((t0 - self.t_origin, PROBE_TIMEOUT * 1000))
        finally:
            await sub.unsubscribe()

    async def run(self, seconds: float, interval: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            code = self.codes[self.next % len(self.codes)]
            self.next += 1
            task = asyncio.ensure_future(self.probe(code))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(interval)
        if tasks:
            await asyncio.wait(tasks, timeout=15)


def _role(role: str, args: list[str], env: dict[str, str]) -> Child:
    """``python -m bench.agility <role> ...`` as a child process."""
    return Child(role, ["-m", "bench.agility", role, *args], env=env)


def _max_in_window(times: list[float], width: float) -> int:
    """Largest number of ``times`` inside any window of ``width`` seconds."""
    best = 0
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


def broker_requests(sim: Sim) -> list[dict[str, Any]]:
    """The broker's connections on the public path (the bare-probe's one left out)."""
    conns = []
    for conn in sim.connections(closed=True, path="/websocket/v1"):
        reqs = conn.get("requests") or []
        if not any("bench-" in str(r.get("data", "")) for r in reqs):
            conns.append(conn)
    return conns


def breakdown(walls: list[tuple[str, float, float]], conns: list[dict[str, Any]]) -> dict[str, Any]:
    """Split each probe into: waiting for the broker's request, and request -> first message."""
    reqs = sorted(
        (float(r["ts"]), str(r.get("data", "")))
        for c in conns
        for r in c.get("requests") or []
        if r.get("accepted")
    )
    wait: list[float] = []
    deliver: list[float] = []
    for code, t0, t1 in walls:
        needle = f'"{code}"'
        hit = next((ts for ts, data in reqs if ts >= t0 and needle in data), None)
        if hit is None or hit > t1:
            continue
        wait.append((hit - t0) * 1000)
        deliver.append((t1 - hit) * 1000)
    return {
        "matched": len(wait),
        "until_request_ms": percentiles(wait, (50, 90, 99)),
        "request_to_first_message_ms": percentiles(deliver, (50, 90, 99)),
    }


def request_timeline(conns: list[dict[str, Any]], since: float) -> list[int]:
    """Broker requests per second (all connections) from wall time ``since``."""
    times = [
        float(r["ts"]) - since for c in conns for r in c.get("requests") or [] if r["ts"] >= since
    ]
    if not times:
        return []
    counts = [0] * (int(max(times)) + 1)
    for t in times:
        counts[int(t)] += 1
    return counts


def _streams_in(request: dict[str, Any]) -> int:
    """Streams (type x code) one logged request asked for; 0 for anything else."""
    try:
        items = json.loads(str(request.get("data", "")))
    except ValueError:
        return 0
    if not isinstance(items, list):
        return 0
    return sum(len(i.get("codes") or ()) for i in items if isinstance(i, dict) and "type" in i)


def request_audit(sim: Sim) -> dict[str, Any]:
    """Per broker connection: most requests in any 1 s / 60 s, and rate-limit errors."""
    out: list[dict[str, Any]] = []
    for conn in broker_requests(sim):
        reqs = conn.get("requests") or []
        times = sorted(float(r["ts"]) for r in reqs)
        out.append(
            {
                "id": conn["id"],
                "requests": len(times),
                "max_per_second": _max_in_window(times, 1.0) if times else 0,
                "max_per_minute": _max_in_window(times, 60.0) if times else 0,
                "errors": sorted({str(r.get("error")) for r in reqs if r.get("error")}),
                "largest_request_streams": max((_streams_in(r) for r in reqs), default=0),
            }
        )
    return {"connections": out, "sim_stats_ws": sim.stats()["ws"]}


# ---------------------------------------------------------------------------- main


def _summ(samples: list[float]) -> dict[str, float]:
    return percentiles(samples, (50, 90, 99))


async def _probe_phase(
    env: dict[str, str], codes: list[str], seconds: float, interval: float
) -> Prober:
    os.environ.update(env)  # the client finds the broker through the environment
    from clients import BrokerClient

    async with BrokerClient(name="bench-probe", request_timeout=10) as client:
        prober = Prober(client, codes)
        await prober.run(seconds, interval)
    return prober


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("churn", "bare-probe"):
        role = sys.argv[1]
        rp = argparse.ArgumentParser()
        rp.add_argument("--codes", required=True)
        rp.add_argument("--interval", type=float, default=0.05)
        rp.add_argument("--url", default="")
        rp.add_argument("--max-seconds", type=float, default=600)
        rargs = rp.parse_args(sys.argv[2:])
        _run_async(lambda: _churn(rargs) if role == "churn" else _bare_probe(rargs))
        return
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "agility")
    p.add_argument("--seconds", type=float, default=0.0, help="churn phase length")
    p.add_argument("--idle-seconds", type=float, default=0.0, help="no-churn phase length")
    p.add_argument("--churn-interval", type=float, default=0.05)
    p.add_argument("--probe-interval", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=2.0, help="events/s per active market")
    p.add_argument(
        "--widen",
        default=None,
        help="the broker's UPBIT_BROKER_WIDEN (default: its own, ticker,trade; none: off)",
    )
    args = p.parse_args()
    quick = args.quick
    seconds = args.seconds or (12.0 if quick else 80.0)
    idle = args.idle_seconds or (4.0 if quick else 15.0)
    install_signal_handlers()
    out = header(args.out or "agility", quick)
    out["params"] = {
        "churn_codes": 100,
        "churn_interval_s": args.churn_interval,
        "probe_interval_s": args.probe_interval,
        "churn_phase_s": seconds,
        "idle_phase_s": idle,
        "simulator": f"--rate {args.rate:g} (limits on)",
        "broker_widen": args.widen or "default (ticker,trade)",
    }
    print(f"agility ({out['mode']}): idle {idle:g} s, churn {seconds:g} s")
    t_start = time.monotonic()
    sim = start_sim("--rate", str(args.rate))
    broker = None
    workers: list[Child] = []
    try:
        krw = sim.krw_codes(170)
        churn_codes = krw[:100]
        # Probe codes are never reused during the churn phase: a code probed earlier may
        # still flow upstream while the broker waits for a request slot, and would not
        # be "new". 70 KRW + every BTC and USDT market; the idle phase reuses the tail.
        pool = krw[100:] + sim.codes("BTC-", 90) + sim.codes("USDT-", 40)
        n_churn = min(len(pool) - 40, int(seconds / args.probe_interval) + 1)
        churn_pool, idle_pool = pool[:n_churn], pool[-40:]
        broker = start_broker(sim, {"UPBIT_BROKER_WIDEN": args.widen} if args.widen else None)
        bare_proc = _role(
            "bare-probe",
            [
                "--codes",
                ",".join(sim.codes("BTC-", 80)),
                "--interval",
                "1.0",
                "--url",
                sim.urls["ws"],
                "--max-seconds",
                str(idle + seconds + 120),
            ],
            {},
        )
        workers.append(bare_proc)
        bare_proc.wait_tagged("READY", 60)
        with stage(f"probes, broker idle ({idle:g} s)"):
            idle_probe = _run_async(
                lambda: _probe_phase(broker.env, idle_pool, idle, args.probe_interval)
            )
        churn = _role(
            "churn",
            [
                "--codes",
                ",".join(churn_codes),
                "--interval",
                str(args.churn_interval),
                "--max-seconds",
                str(seconds + 120),
            ],
            broker.env,
        )
        workers.append(churn)
        churn.wait_tagged("READY", 60)
        time.sleep(1.0)
        churn_wall0 = time.time()
        with stage(f"probes while 100 codes churn ({seconds:g} s)"):
            churn_probe = _run_async(
                lambda: _probe_phase(broker.env, churn_pool, seconds, args.probe_interval)
            )
        churn.signal(signal.SIGTERM)
        churn_res = churn.wait_tagged("RESULT", 30)
        bare_proc.signal(signal.SIGTERM)
        bare_res = bare_proc.wait_tagged("RESULT", 30)
        time.sleep(0.5)
        audit = request_audit(sim)
        conns = broker_requests(sim)
        split = breakdown(churn_probe.walls, conns)
        timeline = request_timeline(conns, churn_wall0)
        opened = {"idle": 0, "churn": 0}
        for conn in conns:
            opened["idle" if conn["opened_at"] < churn_wall0 else "churn"] += 1
    finally:
        for w in workers:
            w.stop()
        if broker is not None:
            broker.stop()
        sim.stop()

    idle_ms = [ms for _, ms in idle_probe.samples]
    churn_ms = [ms for _, ms in churn_probe.samples]
    early = [ms for t, ms in churn_probe.samples if t < 20.0]
    late = [ms for t, ms in churn_probe.samples if t >= 20.0]
    bare_ms = list(bare_res["samples_ms"])
    s_idle, s_churn, s_early, s_late, s_bare = map(_summ, (idle_ms, churn_ms, early, late, bare_ms))
    rows: list[Row] = []
    for q in ("p50", "p99"):
        rows.append(
            Row(
                f"churn: subscribe -> first msg {q}",
                s_churn.get(q, 0.0),
                "ms",
                "bare websockets",
                s_bare.get(q),
                "< 300 ms" if q == "p99" else "",
                s_churn.get(q, 0.0) < TARGET_P99_MS if q == "p99" else None,
                note=f"{len(churn_ms)} probes, {churn_probe.timeouts} timed out "
                f"(counted as {PROBE_TIMEOUT:g} s)"
                if q == "p99"
                else "",
            )
        )
    for label, summ, n in (
        ("churn, first 20 s", s_early, len(early)),
        ("churn, after 20 s", s_late, len(late)),
    ):
        if summ:
            rows.append(
                Row(
                    f"{label}: p99",
                    summ["p99"],
                    "ms",
                    "broker idle p99",
                    s_idle.get("p99"),
                    note=f"{n} probes",
                )
            )
    rows.append(
        Row("broker idle: p50", s_idle.get("p50", 0.0), "ms", "bare websockets", s_bare.get("p50"))
    )
    rows.append(
        Row(
            "broker upstream connections opened",
            opened["idle"] + opened["churn"],
            "conns",
            "bare websockets",
            1,
            note=f"idle phase {opened['idle']}, churn phase {opened['churn']}: the link closes "
            "when its last stream goes and reconnects for the next one",
        )
    )
    worst_s = max((c["max_per_second"] for c in audit["connections"]), default=0)
    worst_m = max((c["max_per_minute"] for c in audit["connections"]), default=0)
    errors = sorted({e for c in audit["connections"] for e in c["errors"]})
    rows.append(
        Row(
            "broker requests in any 1 s (max)",
            worst_s,
            "req",
            "Upbit limit",
            5,
            "<= 5",
            worst_s <= 5,
        )
    )
    rows.append(
        Row(
            "broker requests in any 60 s (max)",
            worst_m,
            "req",
            "Upbit limit",
            100,
            "<= 100",
            worst_m <= 100,
            note=f"errors from the simulator: {errors or 'none'}",
        )
    )
    widest = max((c["largest_request_streams"] for c in audit["connections"]), default=0)
    rows.append(
        Row(
            "broker's largest request (streams)",
            widest,
            "streams",
            "codes churned + probed",
            len(churn_codes) + len(idle_probe.samples) + len(churn_probe.samples),
            note="widened while requests were scarce (UPBIT_BROKER_WIDEN): streams nobody "
            "asked for flow to the broker, which drops them"
            if widest > len(churn_codes) + 1
            else "",
        )
    )
    print_table(f"agility ({out['mode']} run)", rows)
    out["rows"] = rows
    out["probes"] = {
        "idle": {"summary": s_idle, "samples": idle_probe.samples, "timeouts": idle_probe.timeouts},
        "churn": {
            "summary": s_churn,
            "first_20s": s_early,
            "after_20s": s_late,
            "samples": churn_probe.samples,
            "timeouts": churn_probe.timeouts,
            "errors": churn_probe.errors[:20],
        },
        "bare_websockets": {"summary": s_bare, "timeouts": bare_res["timeouts"]},
    }
    out["churn"] = churn_res
    out["churn_probe_breakdown"] = split
    out["request_timeline_per_s"] = timeline
    out["connections_opened"] = opened
    if timeline:
        print("broker requests per second during churn:", " ".join(map(str, timeline)))
    print(
        f"\nchurn probes, where the time goes ({split['matched']} of {len(churn_ms)} needed a "
        "request; the others were carried already): until the broker's request reaches the "
        f"simulator p50/p99 {split['until_request_ms'].get('p50', 0):.0f}/"
        f"{split['until_request_ms'].get('p99', 0):.0f} ms; request -> first message p50/p99 "
        f"{split['request_to_first_message_ms'].get('p50', 0):.0f}/"
        f"{split['request_to_first_message_ms'].get('p99', 0):.0f} ms"
    )
    out["request_audit"] = audit
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out["caveats"] += [
        "The broker keeps its own request budget at 4/s and 90/min (margin under Upbit's 5/s "
        "and 100/min); under sustained churn the per-minute budget, not the coalescing, "
        "sets the wait for a new code.",
        "While requests are scarce (5+ this minute) the broker widens a request adding a "
        "ticker or trade code to every market of its quote (UPBIT_BROKER_WIDEN) and keeps "
        "what nobody claimed as the next subscriber's snapshot: a churned or probed code "
        "then usually costs no request at all. --widen none measures the broker without.",
        "The bare-websockets baseline sends one request per second on its own connection "
        "(no churn on it): it is the floor of a direct subscription, not a churn test.",
    ]
    path = write_results(args.out or "agility", out)
    print(f"\nwrote {path} ({out['elapsed_s']} s)")


if __name__ == "__main__":
    main()
