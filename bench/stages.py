"""Stages: in-process cost of each step of the broker's data path, on real frames.

Grabs ``--frames`` frames of the simulator's firehose (ticker+trade+orderbook of 10
codes, DEFAULT format) with a bare websockets client, then runs the broker's own code
on them in this process, one stage more at a time:

0. inflating the frames as Upbit sends them (permessage-deflate, context takeover) with
   the standard zlib, then with zlib-ng (the ``fast`` extra; aiohttp uses it when the
   broker finds it installed), on the same bytes;
1. ``schemas.upbit.decode_frame`` alone;
2. ``Envelope`` + msgpack encode alone (what the publisher encodes);
3. ``DataRouter.on_frame`` with a Publisher on a socket that drops everything
   (decode + route + encode, no ZeroMQ);
4. the same with a real PUB socket and one SUB draining it in another process, a frame
   per message (outside an event loop the publisher sends at once);
5. the same in an event loop, ``--per-turn`` frames per turn: the publisher sends each
   topic's messages of a turn as one frame, as in the broker.

The frames' WebSocket parsing is measured by the throughput benchmark's bare readers
(CPU per message), not here. Baseline of each row: the stage before it.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq

from bench.common import (
    Child,
    Row,
    base_parser,
    header,
    install_signal_handlers,
    print_table,
    start_sim,
    upbit_request,
    write_results,
)

_MORE_NB = int(zmq.SNDMORE | zmq.NOBLOCK)
_NB = int(zmq.NOBLOCK)


async def grab(url: str, codes: list[str], n: int) -> list[bytes]:
    """``n`` frames of the firehose for ticker+trade+orderbook of ``codes``."""
    from websockets.asyncio.client import connect

    frames: list[bytes] = []
    async with connect(url, compression=None, max_size=2**24, close_timeout=1) as ws:
        await ws.send(upbit_request(["ticker", "trade", "orderbook"], codes))
        async for frame in ws:
            frames.append(frame if isinstance(frame, bytes) else frame.encode())
            if len(frames) >= n:
                break
    return frames


class _NullSocket:
    def send_multipart(self, parts: Any, flags: int = 0) -> None:
        return None

    def send(self, data: Any, flags: int = 0) -> None:
        return None


def _router(socket: Any, codes: list[str]) -> Any:
    from broker.publisher import Publisher
    from broker.routing import DataRouter
    from broker.subscriptions import normalize_spec
    from schemas.bus import StreamSpec
    from schemas.upbit import decode_frame

    class _Exchange:
        def decode(self, frame: bytes | str) -> Any:
            return decode_frame(frame)

    publisher = Publisher(socket, "0123456789abcdef")
    router = DataRouter(publisher, _Exchange())  # type: ignore[arg-type]
    specs = [StreamSpec(t, c) for c in codes for t in ("ticker", "trade")]
    specs += [
        normalize_spec(StreamSpec("orderbook", c), markets=None, private_available=False)
        for c in codes
    ]
    for spec in specs:
        publisher.activate(spec.topic)
    router.set_streams(specs)
    return router


_DEFLATE_TAIL = b"\x00\x00\xff\xff"
"""RFC 7692: each message's deflate data ends with this empty block, not sent."""


def _deflated(frames: list[bytes]) -> list[bytes]:
    """``frames`` as a permessage-deflate sender with context takeover emits them."""
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    out = []
    for frame in frames:
        data = compressor.compress(frame) + compressor.flush(zlib.Z_SYNC_FLUSH)
        out.append(data.removesuffix(_DEFLATE_TAIL))
    return out


def _inflater(lib: Any, deflated: list[bytes], frames: list[bytes]) -> Callable[[], None]:
    """Inflate every message in order with ``lib`` (zlib's API); checks the first pass."""
    checked = False

    def go() -> None:
        nonlocal checked
        inflate = lib.decompressobj(wbits=-zlib.MAX_WBITS).decompress
        if not checked:
            got = [inflate(data + _DEFLATE_TAIL) for data in deflated]
            if got != frames:
                raise AssertionError(f"{lib.__name__} inflated other bytes")
            checked = True
            return
        for data in deflated:
            inflate(data + _DEFLATE_TAIL)

    return go


def _time(fn: Callable[[], None], n: int, repeat: int) -> tuple[float, float]:
    """Best-of-``repeat`` wall and CPU microseconds per item."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, (time.perf_counter() - w0) / n * 1e6)
        best_cpu = min(best_cpu, (time.process_time() - c0) / n * 1e6)
    return best_wall, best_cpu


def main() -> None:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "stages")
    p.add_argument("--frames", type=int, default=0)
    p.add_argument("--repeat", type=int, default=0)
    p.add_argument(
        "--per-turn",
        type=int,
        default=100,
        help="frames per event-loop turn in the batched row (the throughput firehose "
        "brings ~360 per socket read)",
    )
    args = p.parse_args()
    n = args.frames or (10_000 if args.quick else 30_000)
    repeat = args.repeat or (2 if args.quick else 5)
    install_signal_handlers()
    out = header(args.out or "stages", args.quick)
    out["params"] = {"frames": n, "repeat": repeat, "workload": "ticker+trade+orderbook x 10"}
    t_start = time.monotonic()
    sim = start_sim("--firehose", "--no-compress", "--no-limits")
    try:
        codes = sim.krw_codes(10)
        frames = asyncio.run(grab(sim.urls["ws"], codes, n))
    finally:
        sim.stop()
    from schemas.bus import Envelope
    from schemas.upbit import decode_frame

    print(f"stages: {len(frames)} frames, {sum(map(len, frames)) // len(frames)} bytes average")
    results: dict[str, tuple[float, float]] = {}
    deflated = _deflated(frames)
    inflate_zlib = _inflater(zlib, deflated, frames)
    inflate_zlib()  # the first pass checks the bytes
    results["inflate, zlib"] = _time(inflate_zlib, n, repeat)
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        print("zlib-ng is not installed (pip install -e '.[fast]'): its row is left out")
    else:
        inflate_ng = _inflater(zlib_ng, deflated, frames)
        inflate_ng()
        results["inflate, zlib-ng"] = _time(inflate_ng, n, repeat)

    def decode_all() -> None:
        for f in frames:
            decode_frame(f)

    results["decode_frame"] = _time(decode_all, n, repeat)
    payloads: list[Any] = [decode_frame(f)[0] for f in frames]
    encode = msgspec.msgpack.Encoder().encode

    def encode_all() -> None:
        for m in payloads:
            encode(Envelope("ticker/KRW-BTC/", 1, "0123456789abcdef", 1, "websocket", m))

    results["envelope + msgpack encode"] = _time(encode_all, n, repeat)

    def run_router(router: Any, after: Callable[[], None] | None = None) -> Callable[[], None]:
        def go() -> None:
            now = time.time_ns()
            on_frame = router.on_frame
            for f in frames:
                on_frame(f, now)
            if after is not None:
                after()

        return go

    def run_router_in_turns(router: Any, per_turn: int) -> Callable[[], None]:
        """``per_turn`` frames per event-loop turn, as one socket read brings them."""

        async def turns() -> None:
            now = time.time_ns()
            on_frame = router.on_frame
            for start in range(0, len(frames), per_turn):
                for f in frames[start : start + per_turn]:
                    on_frame(f, now)
                await asyncio.sleep(0)  # the turn ends: the publisher's flush runs
            await asyncio.sleep(0)

        return lambda: asyncio.run(turns())

    results["on_frame, no ZeroMQ"] = _time(run_router(_router(_NullSocket(), codes)), n, repeat)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 1_000_000)
    endpoint = f"ipc:///tmp/bench-stages-{time.time_ns()}"
    pub.bind(endpoint)
    sub = Child("zmq-sub", ["-m", "bench.common", "zmq-sub", "--endpoint", endpoint])
    try:
        deadline = time.monotonic() + 30
        while True:  # the SUB prints READY once its first message arrived
            pub.send_multipart([b"warmup/", b"x"])
            try:
                sub.wait_tagged("READY", 0.1)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        # Outside an event loop the publisher sends each message at once, a frame each.
        results["on_frame + ZeroMQ PUB, a frame per message"] = _time(
            run_router(_router(pub, codes)), n, repeat
        )
        # In the broker a loop turn's messages go out as a frame per topic.
        results[f"same, {args.per_turn} frames per loop turn (batched per topic)"] = _time(
            run_router_in_turns(_router(pub, codes), args.per_turn), n, repeat
        )
    finally:
        sub.stop()
        pub.close(linger=0)
        ctx.term()
        Path(endpoint.removeprefix("ipc://")).unlink(missing_ok=True)
    rows: list[Row] = []
    previous: float | None = None
    for name, (wall, cpu) in results.items():
        if name.startswith("inflate"):
            base = results["inflate, zlib"][0] if name == "inflate, zlib-ng" else None
            rows.append(
                Row(
                    name,
                    wall,
                    "us/msg",
                    "standard zlib" if base is not None else "",
                    base,
                    note=f"CPU {cpu:.2f} us/msg; {sum(map(len, deflated)) // len(deflated)} "
                    "bytes deflated on average",
                )
            )
            continue
        base = None if name == "decode_frame" or name.startswith("envelope") else previous
        rows.append(
            Row(
                name,
                wall,
                "us/msg",
                "previous stage" if base is not None else "",
                base,
                note=f"CPU {cpu:.2f} us/msg (all threads: ZeroMQ's I/O thread included)",
            )
        )
        if not name.startswith("envelope"):
            previous = wall
    print_table(f"stages ({out['mode']} run, best of {repeat}, wall us per message)", rows)
    out["rows"] = rows
    out["stages_us"] = {k: {"wall": w, "cpu": c} for k, (w, c) in results.items()}
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out["caveats"] += [
        "In-process and single-threaded except ZeroMQ's I/O thread; the SUB drains in "
        "another process. WebSocket parsing is not included (see throughput's readers).",
    ]
    path = write_results(args.out or "stages", out)
    print(f"\nwrote {path} ({out['elapsed_s']} s)")


if __name__ == "__main__":
    main()
