"""Broker memory: 1,000 client connect/subscribe/die cycles, then a long high-rate run.

Part 1, client cycles (broker heartbeat 0.5 s x liveness 3: dead clients expire in
1.5 s). Batches alternate between two ways of dying, neither of which says Bye:

- ``sigkill``: host processes each run several ``clients.BrokerClient`` instances
  (each its own broker client), subscribe, and are killed with SIGKILL;
- ``vanish``: raw protocol clients in this process (a DEALER that says hello and
  subscribes, and a SUB), whose sockets are then closed with linger 0 and no Bye.

Each client subscribes ticker+trade of 3 random codes and the orderbook of 1 (from 50
KRW codes), so topics, caches, de-duplication state and upstream requests come and go.
After each batch the broker must expire every client (checked through its metrics)
before the broker's RSS is sampled. Growth is measured after a warm-up of 20 % of the
cycles.

Part 2, a high-rate run: the simulator's firehose (ticker+trade+orderbook of 10 codes)
into the broker and one client for ``--minutes`` (10 by default), RSS sampled every
5 s; growth after the first minute (or the first 20 %).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
import uuid
from typing import Any

import zmq

from bench.common import (
    Broker,
    Child,
    Row,
    Worker,
    _emit,
    _run_async,
    base_parser,
    broker_metrics,
    header,
    install_signal_handlers,
    print_table,
    stage,
    start_broker,
    start_sim,
    write_results,
)

TARGET_GROWTH_MB = 5.0
MB = 2**20


def _streams(rng: random.Random, codes: list[str]) -> list[Any]:
    from schemas.bus import StreamSpec

    picked = rng.sample(codes, 3)
    specs = [StreamSpec(t, c) for c in picked for t in ("ticker", "trade")]
    specs.append(StreamSpec("orderbook", rng.choice(codes)))
    return specs


# ---------------------------------------------------------------------------- host role


async def _host(args: argparse.Namespace) -> None:
    """K library clients in one process; subscribe, then wait to be killed."""
    from clients import BrokerClient

    rng = random.Random(args.seed)
    codes = args.codes.split(",")
    clients = []
    for i in range(args.clients):
        client = BrokerClient(name=f"bench-host-{i}", request_timeout=10)
        await client.connect()
        streams = _streams(rng, codes)
        tickers = [s.code for s in streams if s.type == "ticker"]
        await client.subscribe_ticker(tickers, lambda x: None)
        await client.subscribe_trade(tickers, lambda x: None)
        await client.subscribe_orderbook(streams[-1].code, lambda x: None)
        clients.append(client)
    _emit("READY", {"pid": os.getpid(), "clients": len(clients)})
    await asyncio.sleep(args.max_seconds)


# ---------------------------------------------------------------------------- vanish


class RawClient:
    """Hello + subscribe over the bus protocol, then vanish (no Bye, linger 0)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], env: dict[str, str]) -> None:
        self.ctrl = ctx.socket(zmq.DEALER)
        self.ctrl.setsockopt(zmq.LINGER, 0)
        self.ctrl.connect(env["UPBIT_BROKER_CONTROL"])
        self.data = ctx.socket(zmq.SUB)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.connect(env["UPBIT_BROKER_DATA"])

    def _call(self, message: Any, timeout_ms: int = 10_000) -> Any:
        from schemas.bus import decode_broker_message, encode

        self.ctrl.send(encode(message))
        if not self.ctrl.poll(timeout_ms):
            raise TimeoutError(f"no reply to {type(message).__name__}")
        return decode_broker_message(self.ctrl.recv())

    def join(self, streams: list[Any]) -> None:
        from schemas.bus import Hello, Subscribe, SubscribeOk

        self._call(Hello(client_id=uuid.uuid4().hex, name="bench-vanish", pid=os.getpid()))
        for spec in streams:
            self.data.setsockopt(zmq.SUBSCRIBE, spec.topic.encode())
        reply = self._call(Subscribe(1, streams))
        if not isinstance(reply, SubscribeOk):
            raise RuntimeError(f"subscribe refused: {reply!r}")

    def vanish(self) -> None:
        self.ctrl.close(linger=0)
        self.data.close(linger=0)


# ---------------------------------------------------------------------------- part 1


def _bench_clients(env: dict[str, str]) -> int:
    """Clients the broker still knows, apart from the metrics probe itself."""
    return sum(1 for c in broker_metrics(env)["clients"] if c["name"] != "bench-probe")


def _wait_expired(env: dict[str, str], timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while _bench_clients(env) and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
    return time.monotonic() - t0


def client_cycles(broker: Broker, codes: list[str], cycles: int, batch: int) -> dict[str, Any]:
    """Alternate SIGKILL and vanish batches; the broker's RSS after each expiry."""
    rng = random.Random(11)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    samples: list[dict[str, Any]] = [{"cycles": 0, "rss": broker.child.rss()}]
    done = 0
    per_host = 10
    mode_counts = {"sigkill": 0, "vanish": 0}
    expiry: list[float] = []
    try:
        n_batch = 0
        while done < cycles:
            size = min(batch, cycles - done)
            mode = "sigkill" if n_batch % 2 == 0 else "vanish"
            n_batch += 1
            if mode == "sigkill":
                hosts = []
                left = size
                while left > 0:
                    k = min(per_host, left)
                    left -= k
                    seed = str(rng.randrange(1 << 30))
                    host_args = ["host", "--clients", str(k), "--codes", ",".join(codes)]
                    hosts.append(
                        Child(
                            "host", ["-m", "bench.memory", *host_args, "--seed", seed], broker.env
                        )
                    )
                for h in hosts:
                    h.wait_tagged("READY", 120)
                for h in hosts:
                    h.kill()
            else:
                raws = []
                for _ in range(size):
                    raw = RawClient(ctx, broker.env)
                    raw.join(_streams(rng, codes))
                    raws.append(raw)
                for raw in raws:
                    raw.vanish()
            mode_counts[mode] += size
            done += size
            expiry.append(_wait_expired(broker.env))
            samples.append({"cycles": done, "rss": broker.child.rss(), "mode": mode})
            print(f"     {done:5d} cycles ({mode}): broker RSS {samples[-1]['rss'] / MB:.1f} MB")
    finally:
        ctx.term()
    warm_at = max(1, int(cycles * 0.2))
    warm = next(s for s in samples if s["cycles"] >= warm_at)
    final = samples[-1]
    metrics = broker_metrics(broker.env)
    return {
        "samples": samples,
        "modes": mode_counts,
        "warm_rss": warm["rss"],
        "warm_cycles": warm["cycles"],
        "final_rss": final["rss"],
        "peak_rss": max(s["rss"] for s in samples),
        "growth_mb": (final["rss"] - warm["rss"]) / MB,
        "clients_left": _bench_clients(broker.env),
        "subscriptions_left": metrics["total_subscriptions"],
        "expiry_wait_s": {"max": max(expiry), "mean": sum(expiry) / len(expiry)},
    }


# ---------------------------------------------------------------------------- part 2


def high_rate(broker: Broker, codes: list[str], seconds: float) -> dict[str, Any]:
    """Firehose into the broker and one client; RSS every 5 s."""
    args = ["--types", "ticker,trade,orderbook", "--codes", ",".join(codes)]
    args += ["--min-messages", "1000", "--max-seconds", str(seconds + 120)]
    client = Worker("client", args, env=broker.env, name="client")
    samples: list[tuple[float, int]] = []
    try:
        client.ready(60)
        client.start_window()
        t0 = time.monotonic()
        step = 5.0 if seconds >= 60 else 1.0
        while True:
            elapsed = time.monotonic() - t0
            samples.append((round(elapsed, 1), broker.child.rss()))
            if elapsed >= seconds:
                break
            time.sleep(min(step, seconds - elapsed + 0.01))
        result = client.stop_window(60)
    finally:
        client.stop()
    warm_s = min(60.0, seconds * 0.2)
    warm = next(rss for t, rss in samples if t >= warm_s)
    return {
        "samples": samples,
        "warm_s": warm_s,
        "warm_rss": warm,
        "final_rss": samples[-1][1],
        "peak_rss": max(rss for _, rss in samples),
        "growth_mb": (samples[-1][1] - warm) / MB,
        "messages": result["received"],
        "rate": result["rate"],
        "gaps": result["gaps"],
    }


# ---------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "host":
        hp = argparse.ArgumentParser()
        hp.add_argument("--clients", type=int, default=10)
        hp.add_argument("--codes", required=True)
        hp.add_argument("--seed", type=int, default=0)
        hp.add_argument("--max-seconds", type=float, default=120)
        hargs = hp.parse_args(sys.argv[2:])
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _run_async(lambda: _host(hargs))
        return
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "memory")
    p.add_argument("--cycles", type=int, default=0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--minutes", type=float, default=0.0, help="high-rate run length")
    p.add_argument("--skip-cycles", action="store_true")
    p.add_argument("--skip-rate", action="store_true")
    args = p.parse_args()
    quick = args.quick
    cycles = args.cycles or (100 if quick else 1000)
    batch = min(args.batch, 25) if quick else args.batch
    seconds = (args.minutes * 60) or (20.0 if quick else 600.0)
    install_signal_handlers()
    out = header(args.out or "memory", quick)
    out["params"] = {
        "cycles": cycles,
        "batch": batch,
        "high_rate_s": seconds,
        "heartbeat_s": 0.5,
        "liveness": 3,
    }
    print(f"memory ({out['mode']}): {cycles} client cycles, {seconds:g} s at high rate")
    t_start = time.monotonic()
    rows: list[Row] = []
    env = {"UPBIT_BROKER_HEARTBEAT": "0.5", "UPBIT_BROKER_LIVENESS": "3"}
    if not args.skip_cycles:
        sim = start_sim("--rate", "1")
        broker = None
        try:
            broker = start_broker(sim, env)
            codes = sim.krw_codes(50)
            with stage(f"{cycles} connect/subscribe/die cycles"):
                cyc = client_cycles(broker, codes, cycles, batch)
        finally:
            if broker is not None:
                broker.stop()
            sim.stop()
        out["cycles"] = cyc
        rows.append(
            Row(
                f"client cycles: RSS growth after {cyc['warm_cycles']}",
                cyc["growth_mb"],
                "MB",
                "RSS after warm-up",
                cyc["warm_rss"] / MB,
                "< 5 MB",
                cyc["growth_mb"] < TARGET_GROWTH_MB,
                note=f"final {cyc['final_rss'] / MB:.1f} MB, peak {cyc['peak_rss'] / MB:.1f} MB; "
                f"modes {cyc['modes']}",
            )
        )
        rows.append(
            Row(
                "clients left after expiry",
                cyc["clients_left"],
                "clients",
                target="0",
                ok=cyc["clients_left"] == 0 and cyc["subscriptions_left"] == 0,
                note=f"subscriptions left {cyc['subscriptions_left']}; "
                f"slowest expiry {cyc['expiry_wait_s']['max']:.1f} s",
            )
        )
    if not args.skip_rate:
        sim = start_sim("--firehose", "--no-compress", "--no-limits")
        broker = None
        try:
            broker = start_broker(sim)
            codes = sim.krw_codes(10)
            with stage(f"high-rate run, {seconds:g} s"):
                hr = high_rate(broker, codes, seconds)
        finally:
            if broker is not None:
                broker.stop()
            sim.stop()
        out["high_rate"] = hr
        rows.append(
            Row(
                f"high rate: RSS growth after {hr['warm_s']:.0f} s",
                hr["growth_mb"],
                "MB",
                "RSS after warm-up",
                hr["warm_rss"] / MB,
                "< 5 MB",
                hr["growth_mb"] < TARGET_GROWTH_MB,
                note=f"{hr['messages']:,} msgs at {hr['rate']:,.0f}/s, gaps {hr['gaps']}; "
                f"peak {hr['peak_rss'] / MB:.1f} MB",
            )
        )
    print_table(f"memory ({out['mode']} run)", rows)
    out["rows"] = rows
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out["caveats"] += [
        "RSS includes memory Python's allocator keeps for reuse; growth, not the level, is "
        "the figure. The broker's heartbeat is 0.5 s here (expiry 1.5 s) to keep cycles fast.",
    ]
    path = write_results(args.out or "memory", out)
    print(f"\nwrote {path} ({out['elapsed_s']} s)")


if __name__ == "__main__":
    main()
