"""Latency at a realistic rate: simulator -> broker -> client callback, vs a bare reader.

The simulator runs in rate mode (default 2,000 messages/s: ``--codes`` KRW markets x
ticker+trade+orderbook) with permessage-deflate as Upbit offers it. Two readers run AT
THE SAME TIME on the same events:

- the broker path: a ``clients.BrokerClient`` process; its sync callback takes
  ``time.time_ns()`` first thing and records
  * broker-added latency = callback time - ``envelope.recv_ns`` (the broker's receive
    time, same host clock, ns resolution): broker decode + route + encode + ZeroMQ +
    client receive/decode/dispatch;
  * end-to-end = callback time - the message's ``timestamp`` (simulator, ms);
- a bare ``websockets`` client reading the simulator directly: end-to-end = receive time
  - ``timestamp``;
- a bare pyzmq hop: a PUB process sending time-stamped messages of envelope-like sizes at
  the same rate to a SUB process (one-way latency): the floor under "broker-added" on
  this machine, since every ZeroMQ hop wakes an I/O thread in each process. It runs in
  a window of its own right after the readers' (simulator and broker still running,
  the readers stopped): two more busy processes beside the measured path would slow
  the very thing measured on 2 vCPUs. ``--hop-alongside`` runs it in the same window,
  as earlier runs did.

The simulator's ``timestamp`` is the event's scheduled time truncated to the ms, so
end-to-end figures carry 0-2 ms of simulator-side offset common to both paths.

The headline figure pairs the two readers message by message: for every message both
saw (matched by type, code and timestamp), the broker path's callback time minus the
bare reader's arrival time, one host clock. That is what reading through the broker
adds over reading Upbit directly, WebSocket parsing included, at ns resolution.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.common import (
    CpuWindow,
    Row,
    Worker,
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

TARGET_P99_US = 1000.0
MSGS_PER_EVENT = 2.0  # ticker 0.5 + trade 0.5 + orderbook 1 per market event


def pair_arrivals(broker: dict[str, list[Any]], bare: dict[str, list[Any]]) -> list[int]:
    """Per message seen by both readers: broker-path callback time - bare arrival time.

    Messages are matched by (type, code, timestamp); a key seen twice by either reader
    (two events in one millisecond) is left out rather than guessed.
    """

    def once(samples: dict[str, list[Any]]) -> dict[str, int]:
        seen: dict[str, int] = {}
        twice: set[str] = set()
        for key, at in zip(samples["keys"], samples["at"], strict=True):
            if key in seen:
                twice.add(key)
            seen[key] = at
        return {k: v for k, v in seen.items() if k not in twice}

    via_broker, direct = once(broker), once(bare)
    return [at - direct[key] for key, at in via_broker.items() if key in direct]


def main() -> None:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "latency")
    p.add_argument("--rate", type=float, default=2000.0, help="messages/s offered")
    p.add_argument("--codes", type=int, default=20)
    p.add_argument("--seconds", type=float, default=0.0, help="measurement window")
    p.add_argument("--no-compress", action="store_true", help="simulator without deflate")
    p.add_argument(
        "--hop-alongside",
        action="store_true",
        help="measure the bare ZeroMQ hop in the readers' window (default: its own, after)",
    )
    args = p.parse_args()
    quick = args.quick
    seconds = args.seconds or (5.0 if quick else 60.0)
    install_signal_handlers()
    out = header(args.out or "latency", quick)
    per_second = args.rate / (args.codes * MSGS_PER_EVENT)
    out["params"] = {
        "hop_window": "same as the readers'" if args.hop_alongside else "its own, after",
        "rate": args.rate,
        "codes": args.codes,
        "per_second_per_market": per_second,
        "window_s": seconds,
        "compression": not args.no_compress,
    }
    print(f"latency ({out['mode']}): ~{args.rate:,.0f} msgs/s over {args.codes} codes, {seconds} s")
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lat-", dir="/tmp"))
    sim_args = ["--rate", str(per_second)] + (["--no-compress"] if args.no_compress else [])
    sim = start_sim(*sim_args)
    broker = None
    workers: list[Worker] = []
    try:
        broker = start_broker(sim)
        codes = ",".join(sim.krw_codes(args.codes))
        types = ["--types", "ticker,trade,orderbook", "--codes", codes]
        limit = ["--max-seconds", str(seconds + 120), "--min-messages", "50"]
        client = Worker(
            "client",
            [*types, *limit, "--latency", "--samples-out", str(tmp / "client.bin")],
            env=broker.env,
            name="client",
        )
        ws_args = [*types, *limit, "--url", sim.urls["ws"], "--latency"]
        ws_args += ["--samples-out", str(tmp / "ws.bin")]
        if not args.no_compress:
            ws_args.append("--compress")
        bare = Worker("ws", ws_args, name="websockets")
        endpoint = f"ipc://{tmp}/hop"
        payloads = tmp / "payloads.bin"
        payloads.write_bytes(
            msgspec.msgpack.encode(
                [
                    [b"ticker/KRW-BTC/", bytes(600)],
                    [b"trade/KRW-BTC/", bytes(260)],
                    [b"orderbook/KRW-BTC/30/0/", bytes(1300)],
                ]
            )
        )
        workers = [client, bare]

        def start_hop() -> tuple[Worker, Worker]:
            """The bare PUB -> SUB pair (processes start when constructed)."""
            pub = Worker(
                "zmq-pub",
                [
                    *("--endpoint", endpoint, "--payloads", str(payloads)),
                    *("--rate", str(args.rate), "--max-seconds", str(2 * seconds + 120)),
                ],
                name="zmq-pub",
            )
            workers.append(pub)
            sub = Worker(
                "zmq-sub",
                [
                    *("--endpoint", endpoint, "--latency", "--samples-out", str(tmp / "hop.bin")),
                    *("--min-messages", "50", "--max-seconds", str(2 * seconds + 120)),
                ],
                name="zmq-sub",
            )
            workers.append(sub)
            return pub, sub

        if args.hop_alongside:
            hop_pub, hop_sub = start_hop()
        with stage("start readers"):
            for w in workers:
                w.ready(60)
            time.sleep(2.0)
        cpu = CpuWindow(
            {
                "simulator": sim.child.ps(),
                "broker": broker.child.ps(),
                "client": client.ps(),
                "websockets": bare.ps(),
            }
        )
        with stage(f"measure {seconds:g} s"):
            cpu.begin()
            for w in (client, bare, *([hop_sub] if args.hop_alongside else [])):
                w.start_window()
            time.sleep(seconds)
            cpu.end()
            res_client = client.stop_window(60)
            res_ws = bare.stop_window(60)
        if not args.hop_alongside:
            with stage(f"bare zmq hop, its own window, {seconds:g} s"):
                hop_pub, hop_sub = start_hop()
                for w in (hop_sub, hop_pub):
                    w.ready(60)
                time.sleep(2.0)
                hop_sub.start_window()
                time.sleep(seconds)
        hop_pub.signal(15)
        res_hop = hop_sub.stop_window(60)
    finally:
        for w in workers:
            w.stop()
        if broker is not None:
            broker.stop()
        sim.stop()

    client_samples = msgspec.msgpack.decode((tmp / "client.bin").read_bytes())
    ws_samples = msgspec.msgpack.decode((tmp / "ws.bin").read_bytes())
    broker_added_ns, client_e2e_ns = client_samples["added"], client_samples["e2e"]
    ws_e2e_ns = ws_samples["e2e"]
    paired_ns = pair_arrivals(client_samples, ws_samples)
    paired = percentiles([x / 1000 for x in paired_ns])
    hop = percentiles([x / 1000 for x in msgspec.msgpack.decode((tmp / "hop.bin").read_bytes())])
    upstream_ns = [e - b for e, b in zip(client_e2e_ns, broker_added_ns, strict=True)]
    added = percentiles([x / 1000 for x in broker_added_ns])
    e2e_b = percentiles([x / 1e6 for x in client_e2e_ns])
    e2e_w = percentiles([x / 1e6 for x in ws_e2e_ns])
    upstream = percentiles([x / 1e6 for x in upstream_ns])
    rows: list[Row] = []
    for q in ("p50", "p99", "p99.9"):
        rows.append(
            Row(
                f"added {q}: broker callback - bare websockets arrival, same message",
                paired.get(q, 0.0),
                "us",
                "bare zmq hop",
                hop.get(q),
                "< 1000 us" if q == "p99" else "",
                paired.get(q, 0.0) < TARGET_P99_US if q == "p99" else None,
                note=f"{len(paired_ns):,} messages seen by both" if q == "p50" else "",
            )
        )
    for q in ("p50", "p99", "p99.9"):
        rows.append(
            Row(
                f"broker-added {q} (recv_ns -> callback)",
                added.get(q, 0.0),
                "us",
                "bare zmq hop",
                hop.get(q),
                note="broker after its WebSocket read, ZeroMQ, client" if q == "p50" else "",
            )
        )
    for q in ("p50", "p99", "p99.9"):
        rows.append(
            Row(
                f"end-to-end {q}: sim -> broker -> callback",
                e2e_b.get(q, 0.0),
                "ms",
                "bare websockets",
                e2e_w.get(q),
            )
        )
    for q in ("p50", "p99"):
        rows.append(
            Row(
                f"upstream leg {q}: sim -> broker recv",
                upstream.get(q, 0.0),
                "ms",
                "bare websockets",
                e2e_w.get(q),
                note="" if q == "p99" else "the broker's own WebSocket reader vs the bare one",
            )
        )
    rows.append(
        Row(
            "delivered rate, broker path",
            res_client["rate"],
            "msgs/s",
            "bare websockets",
            res_ws["rate"],
            note=f"gaps {res_client['gaps']}, dropped {res_client['dropped']}",
        )
    )
    rows.append(
        Row(
            "broker CPU at this rate",
            cpu.spent["broker"] / cpu.wall * 100,
            "% of a core",
            "bare websockets reader",
            cpu.spent["websockets"] / cpu.wall * 100,
        )
    )
    print_table(
        f"latency ({out['mode']} run, ~{args.rate:,.0f} msgs/s, both readers in one window)", rows
    )
    out["rows"] = rows
    out["added_vs_websockets_us"] = paired
    out["paired_messages"] = len(paired_ns)
    out["broker_added_us"] = added
    out["e2e_broker_ms"] = e2e_b
    out["e2e_websockets_ms"] = e2e_w
    out["upstream_leg_ms"] = upstream
    out["zmq_hop_us"] = hop
    out["zmq_hop"] = res_hop
    out["client"] = res_client
    out["websockets"] = res_ws
    out["cpu_s"] = cpu.spent
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    shutil.rmtree(tmp, ignore_errors=True)
    out["caveats"] += [
        "The simulator's timestamp is the event's scheduled time in ms (not its send time): "
        "end-to-end figures include 0-2 ms of simulator scheduling and truncation common to "
        "both paths. A microsecond send timestamp in the simulator would remove it.",
        "Both readers run in the same window on the same events; the broker-added figure "
        "uses one host clock (time.time_ns) in two processes.",
        "The bare ZeroMQ hop runs in its own window right after the readers' (simulator and "
        "broker still busy), unless --hop-alongside: next to the readers it adds two busy "
        "processes on 2 vCPUs and lengthens the tail of what it is compared with.",
    ]
    path = write_results(args.out or "latency", out)
    print(f"\nwrote {path} ({out['elapsed_s']} s)")


if __name__ == "__main__":
    main()
