"""What the benchmarks share beyond the process harness: workers, measurement, reports.

Processes (children reaped whatever happens, the simulator, the broker and its readiness
probe) come from :mod:`tests.harness`, the harness the integration tests use too; this
module re-exports what the scripts need and adds the bench's defaults (quiet logs, JSON
broker logs, ``--variant`` brokers).

Workers (``python -m bench.common <role>``) are the measured processes: ``client`` (the
``clients`` library), ``ws`` (a bare websockets or aiohttp reader of the simulator),
``pyupbit`` (pyupbit's ``WebSocketManager`` pointed at the simulator), ``zmq-pub`` /
``zmq-sub`` (bare pyzmq), ``tap`` (a raw SUB on the broker). Each prints ``READY {json}``
once streaming, starts its measurement window on SIGUSR1 and ends it on SIGUSR2 (or
SIGTERM) by printing ``RESULT {json}`` and exiting, so the parent reads other processes'
CPU over the same window. Every worker also exits by itself after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped,unused-ignore]
import zmq

from tests import harness
from tests.harness import (
    Broker,
    Child,
    Sim,
    control_request,
    install_signal_handlers,
    stop_all,
)

__all__ = ["Broker", "Child", "Sim", "install_signal_handlers", "stop_all"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_CODES = 10
"""Markets per workload unless a script says otherwise."""


def cpu_seconds(process: Any) -> float:
    """User + system CPU seconds of a psutil.Process (all threads)."""
    times = process.cpu_times()
    return float(times.user + times.system)


def start_sim(*args: str, name: str = "simulator") -> Sim:
    """The harness's simulator, quiet (warnings only): its log is not measured."""
    return harness.start_sim(args, name=name, log_level="warning")


def start_broker(sim: Sim, extra: dict[str, str] | None = None, *, variant: str = "") -> Broker:
    """``python -m broker`` against ``sim`` (or a :mod:`bench.variants` variant of it).

    Warnings only, as JSON; the harness's readiness probe waits for its hello.
    """
    from bench.variants import broker_argv

    env = harness.broker_env(
        sim, log_level="warning", extra={"UPBIT_BROKER_LOG_FORMAT": "json", **(extra or {})}
    )
    args: list[str] = ["-m", "broker"]
    if variant:  # its clients (given this env) import the variant's packages too
        args, tree_env = broker_argv(variant)
        env.update(tree_env)
    return harness.start_broker(env, args=args, name=f"broker-{variant}" if variant else "broker")


def broker_health(env: dict[str, str]) -> dict[str, Any]:
    """The broker's health as a plain dict."""
    from schemas.bus import HealthRequest

    reply = control_request(env, HealthRequest)
    return dict(msgspec.to_builtins(reply.health))


def broker_metrics(env: dict[str, str]) -> dict[str, Any]:
    """The broker's metrics as a plain dict."""
    from schemas.bus import MetricsRequest

    reply = control_request(env, MetricsRequest)
    return dict(msgspec.to_builtins(reply.metrics))


# ---------------------------------------------------------------------------- workers


class Worker(Child):
    """A measured worker process (``python -m bench.common <role> ...``)."""

    def __init__(
        self, role: str, args: Sequence[str], env: dict[str, str] | None = None, name: str = ""
    ) -> None:
        super().__init__(name or role, ["-m", "bench.common", role, *args], env=env)
        self.ready_info: dict[str, Any] = {}

    def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        self.ready_info = self.wait_tagged("READY", timeout)
        return self.ready_info

    def start_window(self) -> None:
        self.signal(signal.SIGUSR1)

    def stop_window(self, timeout: float = 30.0) -> dict[str, Any]:
        """End the window; returns the worker's RESULT and reaps it."""
        self.signal(signal.SIGUSR2)
        try:
            return self.wait_tagged("RESULT", timeout)
        finally:
            self.stop()


def _run_async(main: Callable[[], Any], uvloop_ok: bool = True) -> Any:
    if uvloop_ok:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main())
    return asyncio.run(main())


class _Window:
    """SIGUSR1 starts, SIGUSR2/SIGTERM ends the measurement window (asyncio workers)."""

    def __init__(self, max_seconds: float) -> None:
        self.active = False
        self.t0 = 0.0
        self.t1 = 0.0
        self.wall0 = 0.0
        self.done = asyncio.Event()
        self.on_start: list[Callable[[], None]] = []
        self.on_stop: list[Callable[[], None]] = []
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self.start)
        loop.add_signal_handler(signal.SIGUSR2, self.stop)
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.call_later(max_seconds, self.stop)

    def start(self) -> None:
        if self.active or self.done.is_set():
            return
        for fn in self.on_start:
            fn()
        self.active = True
        self.t0 = time.perf_counter()
        self.wall0 = time.time()

    def stop(self) -> None:
        if self.done.is_set():
            return
        self.t1 = time.perf_counter()
        if not self.active:
            self.t0 = self.t1
        self.active = False
        for fn in self.on_stop:
            fn()
        self.done.set()

    @property
    def seconds(self) -> float:
        return max(self.t1 - self.t0, 1e-9)


def _write(path: str, value: object) -> None:
    """Write ``value`` as msgpack (small files at the end of a worker's run)."""
    Path(path).write_bytes(msgspec.msgpack.encode(value))


def _emit(tag: str, value: dict[str, Any]) -> None:
    sys.stdout.write(f"{tag} {json.dumps(value)}\n")
    sys.stdout.flush()


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles (``p50``, ``p99``, ``p99.9``) of ``values``; {} when empty."""
    if not values:
        return {}
    ordered = sorted(values)
    out: dict[str, float] = {}
    for q in qs:
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        out[f"p{q:g}"] = float(ordered[min(rank, len(ordered)) - 1])
    out["max"] = float(ordered[-1])
    out["n"] = float(len(ordered))
    return out


# -- client worker -------------------------------------------------------------------


class _SeqCheck:
    """Independent per-topic sequence check (does not trust the library's tracker)."""

    __slots__ = ("dups", "gaps", "last", "missed")

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.gaps = 0
        self.missed = 0
        self.dups = 0

    def check(self, topic: str, seq: int) -> None:
        last = self.last.get(topic)
        self.last[topic] = seq
        if last is None or seq == last + 1:
            return
        if seq > last + 1:
            self.gaps += 1
            self.missed += seq - last - 1
        else:
            self.dups += 1


class _Outages:
    """Silences longer than ``threshold_ns`` between two messages: (start wall s, seconds)."""

    __slots__ = ("items", "last", "threshold")

    def __init__(self, threshold_ns: int) -> None:
        self.threshold = threshold_ns
        self.last = 0
        self.items: list[tuple[float, float]] = []

    def note(self, now_ns: int) -> None:
        last = self.last
        self.last = now_ns
        if last and now_ns - last > self.threshold:
            self.items.append((round(last / 1e9, 3), round((now_ns - last) / 1e9, 3)))


async def _client_worker(args: argparse.Namespace) -> None:
    from clients import BrokerClient
    from clients.errors import BrokerUnavailable
    from schemas.bus import encode

    window = _Window(args.max_seconds)
    client: BrokerClient | None = None
    deadline = time.monotonic() + 30
    while client is None:
        candidate = BrokerClient(name=args.name or "bench-client", request_timeout=1.0)
        try:
            await candidate.connect()
            client = candidate
        except BrokerUnavailable:
            await candidate.close()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    client.request_timeout = 10.0
    seq = _SeqCheck()
    counts = {"window": 0, "total": 0}
    lat_broker: array.array[int] = array.array("q")
    lat_e2e: array.array[int] = array.array("q")
    keys: list[str] = []
    arrivals: array.array[int] = array.array("q")
    max_samples = args.max_samples
    latency = args.latency
    dump: dict[str, bytes] = {}
    status: list[str] = []
    holders: list[Any] = []

    def make_callback(holder: list[Any]) -> Callable[[Any], None]:
        def on_message(payload: Any) -> None:
            now_ns = time.time_ns()
            counts["total"] += 1
            if outage_ns:
                outages.note(now_ns)
            sub = holder[0] if holder else None
            if sub is None:
                return
            env = sub.last_envelope
            seq.check(env.topic, env.seq)
            if window.active:
                counts["window"] += 1
                if latency and len(lat_broker) < max_samples:
                    lat_broker.append(now_ns - env.recv_ns)
                    lat_e2e.append(now_ns - payload.timestamp * 1_000_000)
                    keys.append(f"{payload.type}|{payload.code}|{payload.timestamp}")
                    arrivals.append(now_ns)
            if args.dump and len(dump) < 2000 and env.topic not in dump:
                dump[env.topic] = encode(env)

        return on_message

    status_counts: dict[str, int] = {}

    def make_on_status(holder: list[Any]) -> Callable[[Any], None]:
        def on_status(event: Any) -> None:
            status.append(f"{event.state}:{event.detail}"[:200])
            status_counts[event.state] = status_counts.get(event.state, 0) + 1
            sub = holder[0] if holder else None
            env = sub.last_envelope if sub is not None else None
            # Status events the broker sends on a data topic take a sequence number too
            # (its "gap" events among them). The library's own gap notice does not: it
            # carries the seq of the message after the gap, which is checked next.
            library_gap = event.state == "gap" and str(event.detail).endswith(
                f"lost before seq {env.seq if env is not None else ''}"
            )
            if env is not None and env.seq and not env.topic.startswith("_") and not library_gap:
                seq.check(env.topic, env.seq)

        return on_status

    outage_ns = int(args.outage_ms * 1_000_000)
    outages = _Outages(outage_ns)
    codes = args.codes.split(",")
    for type_ in args.types.split(","):
        holder: list[Any] = []
        cb = make_callback(holder)
        on_status = make_on_status(holder)
        if type_ == "ticker":
            sub: Any = await client.subscribe_ticker(codes, cb, on_status=on_status)
        elif type_ == "trade":
            sub = await client.subscribe_trade(codes, cb, on_status=on_status)
        elif type_ == "orderbook":
            sub = await client.subscribe_orderbook(
                codes, cb, depth=args.depth or None, on_status=on_status
            )
        else:
            raise SystemExit(f"unknown type {type_}")
        holder.append(sub)
        holders.append(sub)
    t_sub = time.monotonic()
    while counts["total"] < args.min_messages and time.monotonic() - t_sub < 30:
        await asyncio.sleep(0.01)
    _emit("READY", {"pid": os.getpid(), "received": counts["total"]})
    base = {"gaps": 0, "missed": 0, "lib_gaps": 0, "lib_missed": 0, "dropped": 0}

    def snap() -> dict[str, int]:
        assert client is not None
        return {
            "gaps": seq.gaps,
            "missed": seq.missed,
            "lib_gaps": client.gaps,
            "lib_missed": client._dispatcher.missed,
            "dropped": sum(s.dropped for s in holders),
        }

    def on_start() -> None:
        base.update(snap())
        status.clear()
        status_counts.clear()
        outages.items.clear()

    window.on_start.append(on_start)
    await window.done.wait()
    end = snap()
    result: dict[str, Any] = {
        "received": counts["window"],
        "seconds": window.seconds,
        "rate": counts["window"] / window.seconds,
        "total": counts["total"],
        "status_events": status[:50],
        "status_counts": status_counts,
        "outages": outages.items[:500],
        "duplicates": seq.dups,
        "topics": len(seq.last),
        "wall0": window.wall0,
    }
    for key, value in end.items():
        result[key] = value - base[key]
    if latency:
        result["broker_added_us"] = {k: v / 1000 for k, v in percentiles(lat_broker).items()}
        result["e2e_ms"] = {k: v / 1e6 for k, v in percentiles(lat_e2e).items()}
        if args.samples_out:
            _write(
                args.samples_out,
                {
                    "added": list(lat_broker),
                    "e2e": list(lat_e2e),
                    "keys": keys,
                    "at": list(arrivals),
                },
            )
    if args.dump:
        _write(args.dump, [[t.encode(), b] for t, b in dump.items()])
    _emit("RESULT", result)
    await client.close()


# -- bare websockets / aiohttp worker --------------------------------------------------


class _Stamp(msgspec.Struct):
    timestamp: int
    type: str = ""
    code: str = ""

    @property
    def key(self) -> str:
        """Which message this is, the same in every reader (pairs their arrival times)."""
        return f"{self.type}|{self.code}|{self.timestamp}"


_stamp_one = msgspec.json.Decoder(_Stamp)
_stamp_list = msgspec.json.Decoder(list[_Stamp])


def upbit_request(
    types_: Sequence[str], codes: Sequence[str], fmt: str = "DEFAULT", depth: int = 0
) -> str:
    """An Upbit subscription (realtime only) for ``types_`` x ``codes`` in ``fmt``."""
    message: list[dict[str, Any]] = [{"ticket": uuid.uuid4().hex[:12]}]
    for type_ in types_:
        wire = [f"{c}.{depth}" for c in codes] if type_ == "orderbook" and depth else list(codes)
        message.append({"type": type_, "codes": wire, "is_only_realtime": True})
    message.append({"format": fmt})
    return json.dumps(message)


async def _ws_worker(args: argparse.Namespace) -> None:
    window = _Window(args.max_seconds)
    codes = args.codes.split(",")
    request = upbit_request(args.types.split(","), codes, args.format, args.depth)
    listed = args.format.endswith("_LIST")
    marker = b'"st"' if args.format.startswith("SIMPLE") else b'"stream_type"'
    counts = {"window": 0, "total": 0, "frames": 0}
    lat: array.array[int] = array.array("q")
    keys: list[str] = []
    arrivals: array.array[int] = array.array("q")
    latency = args.latency
    max_samples = args.max_samples

    def on_frame(frame: bytes) -> None:
        now_ns = time.time_ns()
        n = frame.count(marker) if listed else 1
        counts["total"] += n
        if window.active:
            counts["window"] += n
            counts["frames"] += 1
            if latency and len(lat) < max_samples:
                items = _stamp_list.decode(frame) if listed else [_stamp_one.decode(frame)]
                for item in items:
                    lat.append(now_ns - item.timestamp * 1_000_000)
                    keys.append(item.key)
                    arrivals.append(now_ns)

    async def wait_ready() -> None:
        t = time.monotonic()
        while counts["total"] < args.min_messages and time.monotonic() - t < 30:
            await asyncio.sleep(0.01)
        _emit("READY", {"pid": os.getpid(), "received": counts["total"]})

    def finish() -> None:
        """Report as soon as the window ends (closing the socket may take a while)."""
        if not window.done.is_set():
            window.stop()
        if reported:
            return
        reported.append(True)
        result: dict[str, Any] = {
            "received": counts["window"],
            "frames": counts["frames"],
            "seconds": window.seconds,
            "rate": counts["window"] / window.seconds,
            "total": counts["total"],
            "wall0": window.wall0,
        }
        if latency:
            result["e2e_ms"] = {k: v / 1e6 for k, v in percentiles(lat).items()}
            if args.samples_out:
                _write(args.samples_out, {"e2e": list(lat), "keys": keys, "at": list(arrivals)})
        _emit("RESULT", result)

    reported: list[bool] = []
    ready = asyncio.ensure_future(wait_ready())
    reader = _read_aiohttp if args.lib == "aiohttp" else _read_websockets
    await reader(args, request, on_frame, window.done, finish)
    ready.cancel()
    finish()


async def _read_aiohttp(
    args: argparse.Namespace,
    request: str,
    on_frame: Callable[[bytes], None],
    done: asyncio.Event,
    finish: Callable[[], None],
) -> None:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            args.url,
            compress=15 if args.compress else 0,
            max_msg_size=2**24,
            autoping=True,
            heartbeat=None,
        ) as ws,
    ):
        await ws.send_str(request)

        async def read() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    on_frame(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    on_frame(msg.data.encode())

        await _until(read(), done)
        finish()  # report before the close handshake


async def _read_websockets(
    args: argparse.Namespace,
    request: str,
    on_frame: Callable[[bytes], None],
    done: asyncio.Event,
    finish: Callable[[], None],
) -> None:
    from websockets.asyncio.client import connect

    async with connect(
        args.url,
        compression="deflate" if args.compress else None,
        max_size=2**24,
        max_queue=64,
        ping_interval=None,
        close_timeout=1,
    ) as ws:
        await ws.send(request)

        async def read() -> None:
            async for frame in ws:
                on_frame(frame if isinstance(frame, bytes) else frame.encode())

        await _until(read(), done)
        finish()  # report before the close handshake


async def _until(coro: Any, done: asyncio.Event) -> None:
    """Run ``coro`` until it ends or ``done`` is set (then cancel it)."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(done.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    waiter.cancel()


# -- pyupbit worker ------------------------------------------------------------------

PYUPBIT_URI = "wss://api.upbit.com/websocket/v1"


def load_pyupbit_websocket_api(sim_ws_url: str) -> Any:
    """pyupbit's ``websocket_api`` module, with its hardcoded Upbit URL sent to ``sim_ws_url``.

    The module is loaded from pyupbit's installed file by path (not ``import pyupbit``,
    whose ``__init__`` pulls in pandas and requests: ~100 MB per process, irrelevant to
    the WebSocket path). Its URI is a local string inside the coroutine, so we give the
    module its own ``websockets`` namespace whose ``connect`` swaps the URL; the real
    ``websockets`` package is untouched and the manager code runs unmodified.
    """
    spec = importlib.util.find_spec("pyupbit")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pyupbit is not installed: pip install pyupbit")
    path = Path(next(iter(spec.submodule_search_locations))) / "websocket_api.py"
    mod_spec = importlib.util.spec_from_file_location("bench_pyupbit_websocket_api", path)
    assert mod_spec is not None
    assert mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    import websockets

    real_connect = websockets.connect

    def connect(uri: str, *a: Any, **kw: Any) -> Any:
        return real_connect(sim_ws_url if uri == PYUPBIT_URI else uri, *a, **kw)

    shim = types.SimpleNamespace(
        connect=connect, ConnectionClosed=websockets.ConnectionClosed, __name__="websockets"
    )
    setattr(module, "websockets", shim)  # noqa: B010 - a module attribute
    return module


def _pyupbit_worker(args: argparse.Namespace) -> None:
    module = load_pyupbit_websocket_api(args.url)
    codes = args.codes.split(",")
    managers = [module.WebSocketManager(t, codes, qsize=args.qsize) for t in args.types.split(",")]
    # One counter slot per consumer thread (single writer each, read under the GIL).
    totals = [0] * len(managers)
    closed = [0] * len(managers)
    done = threading.Event()
    outage_ns = int(args.outage_ms * 1_000_000)
    outages = _Outages(outage_ns)

    def consume(i: int, wm: Any) -> None:
        while not done.is_set():
            item = wm.get()
            if isinstance(item, str):
                closed[i] += 1
                continue
            if outage_ns:
                outages.note(time.time_ns())
            totals[i] += 1

    for wm in managers:  # fork the readers before any thread exists here
        wm.alive = True
        wm.start()
    threads = [
        threading.Thread(target=consume, args=(i, wm), daemon=True) for i, wm in enumerate(managers)
    ]
    for t in threads:
        t.start()
    marks = {"t0": 0.0, "base": 0, "stop": 0}

    def on_start(signum: int, frame: Any) -> None:
        marks["base"] = sum(totals)
        marks["t0"] = time.perf_counter()
        outages.items.clear()

    def on_stop(signum: int, frame: Any) -> None:
        marks["stop"] = 1

    signal.signal(signal.SIGUSR1, on_start)
    signal.signal(signal.SIGUSR2, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    deadline = time.monotonic() + args.max_seconds
    ready_sent = False
    while not marks["stop"] and time.monotonic() < deadline:
        time.sleep(0.02)
        if not ready_sent and sum(totals) >= args.min_messages:
            _emit("READY", {"pid": os.getpid(), "children": [m.pid for m in managers]})
            ready_sent = True
    t1 = time.perf_counter()
    received = sum(totals) - int(marks["base"]) if marks["t0"] else 0
    seconds = max(t1 - marks["t0"], 1e-9) if marks["t0"] else 1e-9
    children = [m.pid for m in managers]
    child_cpu = 0.0
    for pid in children:
        with contextlib.suppress(Exception):
            child_cpu += cpu_seconds(psutil.Process(pid))
    done.set()
    _emit(
        "RESULT",
        {
            "received": received,
            "seconds": seconds,
            "rate": received / seconds,
            "closed_events": sum(closed),
            "outages": outages.items[:500],
            "children": children,
            "children_cpu_total": child_cpu,
        },
    )
    for wm in managers:
        with contextlib.suppress(Exception):
            wm.terminate()
            wm.join(2)
    os._exit(0)


# -- bare pyzmq workers --------------------------------------------------------------


def _zmq_pub_worker(args: argparse.Namespace) -> None:
    """XPUB with XPUB_NODROP: blocks at the HWM instead of dropping (lossless ceiling).

    Sends the ``[topic, envelope]`` pairs of ``--payloads`` one per frame,
    ``topic + TOPIC_END + [envelope]``: the per-message floor of ZeroMQ, without the
    broker's batching per topic.
    """
    from schemas.bus import pack_published

    pairs: list[list[bytes]] = msgspec.msgpack.decode(Path(args.payloads).read_bytes())
    messages = [pack_published(topic, body) for topic, body in pairs]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    sock.bind(args.endpoint)
    stop = {"flag": False}

    def on_stop(signum: int, frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGUSR2, on_stop)
    if not sock.poll(30_000):
        raise SystemExit("no subscriber")
    sock.recv()  # the subscription
    _emit("READY", {"pid": os.getpid(), "pairs": len(pairs)})
    if args.rate:
        _zmq_pub_paced(sock, pairs, args.rate, stop, args.max_seconds)
        sock.close(linger=1000)
        ctx.term()
        return
    sent = 0
    send = sock.send
    deadline = time.monotonic() + args.max_seconds
    n = len(messages)
    while not stop["flag"]:
        for i in range(1024):
            send(messages[(sent + i) % n])
        sent += 1024
        if time.monotonic() > deadline:
            break
    _emit("RESULT", {"sent": sent})
    sock.close(linger=10_000)  # deliver what is queued: the SUB counts it
    ctx.term()


def _zmq_pub_paced(
    sock: zmq.Socket[bytes],
    pairs: list[list[bytes]],
    rate: float,
    stop: dict[str, bool],
    max_seconds: float,
) -> None:
    """Send ``rate`` messages/s, each starting with its send time (ns, 8 bytes) after the topic."""
    from schemas.bus import TOPIC_END

    noblock = int(zmq.NOBLOCK)
    interval = 1.0 / rate
    start = time.perf_counter()
    deadline = time.monotonic() + max_seconds
    sent = 0
    n = len(pairs)
    while not stop["flag"] and time.monotonic() < deadline:
        due = start + sent * interval
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        topic, body = pairs[sent % n]
        stamp = time.time_ns().to_bytes(8, "little")
        sock.send(topic + TOPIC_END + stamp + body[8:], noblock)
        sent += 1
    _emit("RESULT", {"sent": sent})


def _zmq_sub_worker(args: argparse.Namespace) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(args.endpoint)
    state = {"active": False, "stop": False, "t0": 0.0, "base": 0}
    total = 0

    def on_start(signum: int, frame: Any) -> None:
        state["base"] = total
        state["t0"] = time.perf_counter()
        state["active"] = True

    def on_stop(signum: int, frame: Any) -> None:
        state["stop"] = True

    signal.signal(signal.SIGUSR1, on_start)
    signal.signal(signal.SIGUSR2, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    recv = sock.recv
    ready = False
    deadline = time.monotonic() + args.max_seconds
    window = 0
    t1 = 0.0
    latency = args.latency
    lat: array.array[int] = array.array("q")
    while time.monotonic() < deadline:
        if not sock.poll(100):
            if state["stop"]:
                break
            continue
        for _ in range(1024):
            try:
                message = recv(zmq.NOBLOCK)  # topic + TOPIC_END + stamp/envelopes
            except zmq.Again:
                break
            total += 1
            if latency and state["active"] and not t1:
                stamp = message[message.index(0) + 1 :][:8]
                lat.append(time.time_ns() - int.from_bytes(stamp, "little"))
        if not ready and total >= args.min_messages:
            _emit("READY", {"pid": os.getpid()})
            ready = True
        if state["stop"] and not t1:
            t1 = time.perf_counter()
            window = total - int(state["base"])
            # keep draining until the publisher stopped and the queue is empty
    if not t1:
        t1 = time.perf_counter()
        window = total - int(state["base"])
    seconds = max(t1 - float(state["t0"]), 1e-9) if state["t0"] else 1e-9
    result: dict[str, Any] = {
        "received": window,
        "seconds": seconds,
        "rate": window / seconds,
        "total": total,
    }
    if latency:
        result["latency_us"] = {k: v / 1000 for k, v in percentiles(lat).items()}
        if args.samples_out:
            _write(args.samples_out, list(lat))
    _emit("RESULT", result)
    sock.close(linger=0)
    ctx.term()


def _tap_worker(args: argparse.Namespace) -> None:
    """A raw SUB on the broker's data endpoint: broker + ZeroMQ latency without the library."""
    from schemas.bus import decode_batch, split_published

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    for prefix in args.prefixes.split(","):
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    sock.connect(args.endpoint)
    state = {"active": False, "stop": False}
    lat: array.array[int] = array.array("q")

    def on_start(signum: int, frame: Any) -> None:
        state["active"] = True

    def on_stop(signum: int, frame: Any) -> None:
        state["stop"] = True

    signal.signal(signal.SIGUSR1, on_start)
    signal.signal(signal.SIGUSR2, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    deadline = time.monotonic() + args.max_seconds
    total = 0
    ready = False
    while not state["stop"] and time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        while True:
            try:
                message = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            now_ns = time.time_ns()
            total += 1
            if state["active"] and len(lat) < args.max_samples:
                for env in decode_batch(split_published(message)[1]):
                    lat.append(now_ns - env.recv_ns)
        if not ready and total >= args.min_messages:
            _emit("READY", {"pid": os.getpid()})
            ready = True
    result: dict[str, Any] = {
        "received": len(lat),
        "broker_added_us": {k: v / 1000 for k, v in percentiles(lat).items()},
    }
    if args.samples_out:
        _write(args.samples_out, list(lat))
    _emit("RESULT", result)
    sock.close(linger=0)
    ctx.term()


# ---------------------------------------------------------------------------- reports


@dataclass
class Row:
    """One reported figure next to its same-run baseline."""

    metric: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    target: str = ""
    ok: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0):
            return None
        assert self.baseline_value is not None
        return self.value / self.baseline_value


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2e}"


def print_table(title: str, rows: Sequence[Row]) -> None:
    """A small fixed-width table: metric, value, baseline, ratio, target, pass."""
    header = ("metric", "value", "unit", "baseline (same run)", "ratio", "target", "ok")
    body = [
        (
            r.metric,
            _fmt(r.value),
            r.unit,
            f"{r.baseline} {_fmt(r.baseline_value)}".strip() if r.baseline else "-",
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target or "-",
            "-" if r.ok is None else ("PASS" if r.ok else "FAIL"),
        )
        for r in rows
    ]
    widths = [max([len(h), *(len(b[i]) for b in body)]) for i, h in enumerate(header)]
    print(f"\n== {title} ==")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))
    notes = [r for r in rows if r.note]
    for r in notes:
        print(f"  * {r.metric}: {r.note}")


def _git(*args: str) -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip()
    return ""


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _burn(seconds: float, out: Any) -> None:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    out.put(n / seconds)


def calibrate_cpu(seconds: float = 0.5) -> dict[str, float]:
    """Busy-loop speed alone and two at once: how much of 2 vCPUs the host gives now."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q: Any = ctx.Queue()
    p = ctx.Process(target=_burn, args=(seconds, q))
    p.start()
    single = float(q.get())
    p.join()
    ps = [ctx.Process(target=_burn, args=(seconds, q)) for _ in range(2)]
    for proc in ps:
        proc.start()
    pair = [float(q.get()) for _ in ps]
    for proc in ps:
        proc.join()
    return {
        "loop_per_s_single": round(single),
        "loop_per_s_pair_each": round(sum(pair) / 2),
        "effective_cores_of_2": round(sum(pair) / single, 2) if single else 0.0,
    }


def machine_info() -> dict[str, Any]:
    """Hardware, versions and the git commit, for the results file."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    dirty = bool(_git("status", "--porcelain", "--", "broker", "clients", "schemas", "simulator"))
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "source_dirty": dirty,
        "versions": {
            n: _version(n)
            for n in ("websockets", "pyzmq", "msgspec", "uvloop", "aiohttp", "pyupbit")
        },
        "cpu_calibration": calibrate_cpu(),
    }


COMMON_CAVEATS = [
    "2 vCPUs shared by >= 3 busy processes (simulator, broker, clients, baselines): figures "
    "are CPU-contended; compare each figure with its same-run baseline, not across machines.",
    "The host gives two busy processes only ~1.2-1.6 cores in total (see "
    "machine.cpu_calibration), and that share varies from run to run.",
]


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (rows as dicts with their ratios)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    rows = payload.get("rows")
    if isinstance(rows, list):
        payload["rows"] = [
            {**asdict(r), "ratio": r.ratio} if isinstance(r, Row) else r for r in rows
        ]
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def base_parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the flags every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="short smoke run (seconds)")
    p.add_argument("--out", default=None, help="results file name (default: the script name)")
    return p


def header(name: str, quick: bool) -> dict[str, Any]:
    """Common fields of every results file."""
    return {
        "bench": name,
        "mode": "quick" if quick else "full",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "caveats": list(COMMON_CAVEATS),
    }


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """Print a progress line with the stage's duration."""
    t = time.monotonic()
    print(f"  .. {label}", flush=True)
    yield
    print(f"     done in {time.monotonic() - t:.1f} s", flush=True)


def median(values: Iterable[float]) -> float:
    items = sorted(values)
    if not items:
        return 0.0
    mid = len(items) // 2
    return items[mid] if len(items) % 2 else (items[mid - 1] + items[mid]) / 2


@dataclass
class CpuWindow:
    """CPU seconds of some processes between :meth:`begin` and :meth:`end`."""

    procs: dict[str, Any] = field(default_factory=dict)
    start: dict[str, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    def begin(self) -> None:
        self.start = {k: _safe_cpu(p) for k, p in self.procs.items()}
        self.wall = time.perf_counter()

    def end(self) -> None:
        self.wall = time.perf_counter() - self.wall
        self.spent = {k: _safe_cpu(p) - self.start.get(k, 0.0) for k, p in self.procs.items()}


def _safe_cpu(p: Any) -> float:
    try:
        return cpu_seconds(p)
    except Exception:
        return 0.0


# ---------------------------------------------------------------------------- main


def _worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.common")
    sub = p.add_subparsers(dest="role", required=True)
    c = sub.add_parser("client", help="a clients.BrokerClient subscriber")
    c.add_argument("--types", default="ticker,trade,orderbook")
    c.add_argument("--codes", required=True)
    c.add_argument("--depth", type=int, default=0)
    c.add_argument("--latency", action="store_true")
    c.add_argument("--samples-out", default="")
    c.add_argument("--dump", default="", help="write sample [topic, envelope] pairs here")
    c.add_argument("--name", default="")
    w = sub.add_parser("ws", help="a bare websockets/aiohttp reader of the simulator")
    w.add_argument("--url", required=True)
    w.add_argument("--types", default="ticker,trade,orderbook")
    w.add_argument("--codes", required=True)
    w.add_argument("--depth", type=int, default=0)
    w.add_argument("--format", default="DEFAULT")
    w.add_argument("--lib", choices=("websockets", "aiohttp"), default="websockets")
    w.add_argument("--compress", action="store_true", help="offer permessage-deflate")
    w.add_argument("--latency", action="store_true")
    w.add_argument("--samples-out", default="")
    u = sub.add_parser("pyupbit", help="pyupbit WebSocketManager(s) pointed at the simulator")
    u.add_argument("--url", required=True)
    u.add_argument("--types", default="ticker")
    u.add_argument("--codes", required=True)
    u.add_argument("--qsize", type=int, default=1000)
    zp = sub.add_parser("zmq-pub", help="bare pyzmq publisher of recorded payloads")
    zp.add_argument("--endpoint", required=True)
    zp.add_argument("--payloads", required=True)
    zp.add_argument("--rate", type=float, default=0.0, help="paced, time-stamped sends")
    zs = sub.add_parser("zmq-sub", help="bare pyzmq subscriber (counts)")
    zs.add_argument("--endpoint", required=True)
    zs.add_argument("--latency", action="store_true", help="bodies start with send ns")
    zs.add_argument("--samples-out", default="")
    tp = sub.add_parser("tap", help="raw SUB on the broker's data endpoint (latency)")
    tp.add_argument("--endpoint", required=True)
    tp.add_argument("--prefixes", default="ticker/,trade/,orderbook/")
    tp.add_argument("--samples-out", default="")
    for s in (c, u):
        s.add_argument("--outage-ms", type=float, default=0.0, help="record silences this long")
    for s in (c, w, u, zp, zs, tp):
        s.add_argument("--max-seconds", type=float, default=600.0)
        s.add_argument("--min-messages", type=int, default=1)
        s.add_argument("--max-samples", type=int, default=2_000_000)
        s.add_argument("--no-uvloop", action="store_true")
    return p


def worker_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the worker roles."""
    from bench.variants import TREE_ENV

    tree = os.environ.get(TREE_ENV)
    if tree:  # a client of a --variant broker: that commit's client library and schemas
        sys.path.insert(0, tree)
    args = _worker_parser().parse_args(argv)
    if args.role == "client":
        _run_async(lambda: _client_worker(args), not args.no_uvloop)
    elif args.role == "ws":
        _run_async(lambda: _ws_worker(args), not args.no_uvloop)
    elif args.role == "pyupbit":
        _pyupbit_worker(args)
    elif args.role == "zmq-pub":
        _zmq_pub_worker(args)
    elif args.role == "zmq-sub":
        _zmq_sub_worker(args)
    elif args.role == "tap":
        _tap_worker(args)


if __name__ == "__main__":
    worker_main()
