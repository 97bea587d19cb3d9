"""The one process harness of the integration tests and the benchmarks.

It runs the real simulator and the real broker as child processes and reaps them
whatever happens: every :class:`Child` gets its own session and ``PR_SET_PDEATHSIG``
(it dies with the process that started it), stderr and stdout go to a log directory
shown by :meth:`Child.output` when something fails, stdout lines also go to a queue
(JSON URL line, ``READY``/``RESULT`` tags, agent commands), and an ``atexit`` hook (also
on SIGTERM with :func:`install_signal_handlers`) stops whatever is still running.

Deadlines, not sleeps: :func:`wait_until` and :func:`scaled`; ``TIME_SCALE`` (env
``UPBIT_TEST_TIME_SCALE``, default 1) stretches every deadline on a slow machine.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import psutil  # type: ignore[import-untyped,unused-ignore]
import zmq

from schemas.bus import Bye, ErrorReply, Hello, Welcome, decode_broker_message, encode

T = TypeVar("T")

TIME_SCALE = float(os.environ.get("UPBIT_TEST_TIME_SCALE", "1"))
ROOT = Path(__file__).resolve().parents[1]
KEEP_LOGS = "HARNESS_KEEP_LOGS"
"""Set to 1 to keep every child's log directory under /tmp (``BENCH_KEEP_LOGS`` too)."""

SIM_KEYS = {
    "UPBIT_ACCESS_KEY": "test-access-key-0123456789",
    "UPBIT_SECRET_KEY": "test-secret-key-abcdefghijklmnopqrstuvwxyz",
}
"""The API keys the simulator accepts (a broker given them opens the private link)."""

# ---------------------------------------------------------------------------- deadlines


def scaled(seconds: float) -> float:
    """A deadline in seconds, scaled for slow machines."""
    return seconds * TIME_SCALE


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {scaled(timeout):.1f} s waiting for {what or predicate}"
            )
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """Async variant of :func:`wait_until`; the predicate may be a coroutine function."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {scaled(timeout):.1f} s waiting for {what or predicate}"
            )
        await asyncio.sleep(interval)


def short_tmpdir(prefix: str = "ub-") -> Path:
    """A short directory for ipc sockets (ipc paths are limited to 107 characters)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# ---------------------------------------------------------------------------- children

_LIVE: list[Child] = []
_LOGDIRS: list[Path] = []
_PR_SET_PDEATHSIG = 1
_LIBC: Any = None
with contextlib.suppress(OSError):  # loaded here: no dlopen between fork and exec
    _LIBC = ctypes.CDLL(None, use_errno=True)
_MAX_QUEUED_LINES = 100_000


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A ``python ...`` child process: own session, output logged, always reaped.

    stderr goes to ``logdir/stderr``; stdout lines go to ``logdir/stdout`` and to a queue
    read by :meth:`read_line`, :meth:`first_json` and :meth:`wait_tagged`. Started from
    the main thread, the child gets SIGTERM when it dies (``PR_SET_PDEATHSIG`` fires when
    the starting *thread* ends, so children started from other threads, e.g. via
    ``asyncio.to_thread``, go without it and rely on the atexit hook). ``read_first_line``
    (without ``stdin``) parses the first stdout line as JSON into :attr:`first_line`.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        read_first_line: bool = False,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.logdir = short_tmpdir(f"ub-{name[:16]}-")
        _LOGDIRS.append(self.logdir)
        self._stderr: IO[bytes] = open(self.logdir / "stderr", "wb")  # noqa: SIM115
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        on_main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=full_env,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=_die_with_parent if on_main else None,  # noqa: PLW1509 - one prctl
        )
        _LIVE.append(self)
        self._lines: queue.Queue[str] = queue.Queue(_MAX_QUEUED_LINES)
        self._eof = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"out-{name}")
        self._reader.start()
        self._ps: Any = None
        self.first_line: dict[str, Any] | None = None
        if read_first_line and not stdin:
            try:
                self.first_line = self.first_json(timeout=60.0)
            except BaseException:
                self.stop()
                raise

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        with open(self.logdir / "stdout", "wb") as log:
            for raw in stdout:
                log.write(raw)
                log.flush()
                with contextlib.suppress(queue.Full):  # nobody reads: the log keeps it
                    self._lines.put_nowait(raw.decode("utf-8", "replace").rstrip("\n"))
        stdout.close()
        self._eof.set()

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send a signal to the child (if it still runs)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def _next_line(self, deadline: float) -> str | None:
        """The next stdout line, None at end of output; TimeoutError after ``deadline``."""
        while True:
            try:
                return self._lines.get(timeout=0.05)
            except queue.Empty:
                if self._eof.is_set() and self._lines.empty():
                    return None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name}: no stdout line\n{self.output(3000)}"
                    ) from None

    def read_line(self, timeout: float = 30.0) -> str:
        """The next stdout line, stripped; "" once the child closed its stdout."""
        line = self._next_line(time.monotonic() + scaled(timeout))
        return "" if line is None else line.strip()

    def first_json(self, timeout: float = 60.0) -> dict[str, Any]:
        """The next stdout line as JSON (the simulator's first line: its URLs)."""
        line = self._next_line(time.monotonic() + scaled(timeout))
        if line is None:
            raise RuntimeError(f"{self.name} exited before printing a line\n{self.output()}")
        value: dict[str, Any] = json.loads(line)
        return value

    def wait_tagged(self, tag: str, timeout: float) -> dict[str, Any]:
        """The JSON after the next stdout line starting with ``tag`` (other lines skipped)."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            try:
                line = self._next_line(deadline)
            except TimeoutError:
                msg = f"{self.name}: no {tag} line within {timeout:g} s\n{self.output(3000)}"
                raise TimeoutError(msg) from None
            if line is None:
                raise RuntimeError(f"{self.name} exited before {tag}\n{self.output(3000)}")
            if line.startswith(tag + " "):
                value: dict[str, Any] = json.loads(line[len(tag) + 1 :])
                return value

    def send_line(self, line: str) -> None:
        """Write one command line to the child's stdin (started with ``stdin=True``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 5.0) -> int:
        """SIGCONT + SIGTERM, SIGKILL after ``timeout``; always reaps. The exit code."""
        if self.alive():
            self.signal(signal.SIGCONT)  # a stopped child cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=scaled(timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        with contextlib.suppress(Exception):
            self._stderr.close()
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)

    def ps(self) -> Any:
        """The psutil.Process of this child (cached)."""
        if self._ps is None:
            self._ps = psutil.Process(self.proc.pid)
        return self._ps

    def rss(self) -> int:
        """Resident set size in bytes."""
        return int(self.ps().memory_info().rss)

    def output(self, chars: int = 20_000) -> str:
        """The last ``chars`` of what the child wrote to stdout and stderr."""
        parts = []
        for stream in ("stdout", "stderr"):
            path = self.logdir / stream
            text = path.read_text(errors="replace") if path.exists() else ""
            if text:
                parts.append(f"--- {self.name} {stream} ---\n{text[-chars:]}")
        return "\n".join(parts) or f"--- {self.name}: no output ---"


def reap_all() -> None:
    """Stop every child still running (last started first); drop their log directories.

    Runs at exit. Set ``HARNESS_KEEP_LOGS=1`` (or ``BENCH_KEEP_LOGS=1``) to keep the logs.
    """
    for child in reversed(list(_LIVE)):
        with contextlib.suppress(Exception):
            child.stop(timeout=3.0)
    if "1" not in (os.environ.get(KEEP_LOGS), os.environ.get("BENCH_KEEP_LOGS")):
        for path in _LOGDIRS:
            shutil.rmtree(path, ignore_errors=True)


atexit.register(reap_all)


def _on_term(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Make SIGTERM unwind (so the atexit hook reaps the children) like Ctrl-C does."""
    signal.signal(signal.SIGTERM, _on_term)


def stop_all(children: Sequence[Child], timeout: float = 5.0) -> None:
    """SIGTERM all at once, then reap each (faster than one by one)."""
    for child in children:
        child.signal(signal.SIGCONT)
        child.signal(signal.SIGTERM)
    for child in children:
        child.stop(timeout=timeout)


# ---------------------------------------------------------------------------- simulator


@dataclass
class Sim:
    """A running simulator (``python -m simulator``) and its control API."""

    child: Child
    urls: dict[str, Any]
    """The simulator's first stdout line: ``rest``, ``ws``, ``ws_private``, ``control``."""

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST (with a body) or GET a control endpoint; returns decoded JSON."""
        url = f"{self.urls['control']}/{path.lstrip('/')}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=scaled(30)) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def rest(self, path: str) -> Any:
        """GET a REST path of the simulator (quotation, no auth); decoded JSON."""
        with urllib.request.urlopen(f"{self.urls['rest']}{path}", timeout=scaled(30)) as r:
            return json.loads(r.read())

    def connections(
        self, path: str | None = "/websocket/v1", *, closed: bool = False
    ) -> list[dict[str, Any]]:
        """WebSocket connections on ``path`` (every path if None), closed ones too if asked."""
        raw = self.control("connections?closed=1" if closed else "connections")
        items: list[dict[str, Any]] = raw["connections"] if isinstance(raw, dict) else raw
        return [c for c in items if path is None or c.get("path") == path]

    def stats(self) -> dict[str, Any]:
        """The simulator's counters (``connections_open`` among them)."""
        value: dict[str, Any] = self.control("stats")
        return value

    def set_rate(
        self,
        per_second: float | None = None,
        firehose: bool | None = None,
        firehose_rate: float | None = None,
    ) -> Any:
        """Market events per second per market, or the firehose (and its cap)."""
        body: dict[str, Any] = {}
        if per_second is not None:
            body["per_second"] = per_second
        if firehose is not None:
            body["firehose"] = firehose
        if firehose_rate is not None:
            body["firehose_rate"] = firehose_rate
        return self.control("rate", body)

    def codes(self, prefix: str, n: int, skip: int = 0) -> list[str]:
        """``n`` market codes starting with ``prefix``, in the simulator's market order."""
        codes = [m["market"] for m in self.rest("/v1/market/all")]
        codes = [c for c in codes if c.startswith(prefix)]
        if len(codes) < skip + n:
            raise ValueError(f"the simulator lists {len(codes)} {prefix} markets, need {skip + n}")
        return codes[skip : skip + n]

    def krw_codes(self, n: int, skip: int = 0) -> list[str]:
        """``n`` KRW market codes (the simulator lists the well-known ones first)."""
        return self.codes("KRW-", n, skip)

    def quiesce(self, timeout: float = 20.0, grace: float = 1.0) -> None:
        """Return once no WebSocket is open; abort what is still open after ``grace`` s.

        The broker keeps an idle upstream connection for 30 s after its last stream goes,
        and the simulator keeps sending it the old streams (a firehose at full speed):
        left alone it would load the machine during the next measurement.
        """
        t0 = time.monotonic()
        quiet_since: float | None = None
        while time.monotonic() - t0 < timeout:
            now = time.monotonic()
            if self.stats()["connections_open"] == 0:
                quiet_since = quiet_since or now
                if now - quiet_since >= 0.3:
                    return
            else:
                quiet_since = None
                if now - t0 >= grace:
                    self.control("drop", {})
            time.sleep(0.1)

    def env(self) -> dict[str, str]:
        """Environment that points a broker at this simulator (URLs as it printed them)."""
        return {
            "UPBIT_WS_URL": self.urls["ws"],
            "UPBIT_WS_PRIVATE_URL": self.urls["ws_private"],
            "UPBIT_REST_URL": self.urls["rest"],
        }

    def stop(self) -> None:
        """Stop and reap the simulator."""
        self.child.stop()


def start_sim(
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    name: str = "simulator",
    log_level: str | None = None,
) -> Sim:
    """``python -m simulator --port 0 ARGS``, with :data:`SIM_KEYS`; reads its URL line."""
    argv = ["-m", "simulator", "--port", "0", *args]
    if log_level:
        argv += ["--log-level", log_level]
    child = Child(name, argv, env={**SIM_KEYS, **(env or {})}, read_first_line=True)
    assert child.first_line is not None
    return Sim(child, child.first_line)


# ---------------------------------------------------------------------------- broker


def broker_env(
    sim: Sim,
    *,
    keys: bool = False,
    log_level: str = "info",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for a broker (and its clients) on private ipc endpoints in /tmp.

    Public only unless ``keys`` (the simulator's API keys: the private link too).
    """
    rundir = short_tmpdir("ubk-")
    env = {
        **sim.env(),
        "UPBIT_BROKER_CONTROL": f"ipc://{rundir}/control",
        "UPBIT_BROKER_DATA": f"ipc://{rundir}/data",
        "UPBIT_BROKER_STATE_DIR": str(rundir),
        "UPBIT_BROKER_LOG_LEVEL": log_level,
        "UPBIT_ACCESS_KEY": "",
        "UPBIT_SECRET_KEY": "",
    }
    if keys:
        env.update(SIM_KEYS)
    env.update(extra or {})
    return env


@dataclass
class Broker:
    """A running broker process and the environment its clients use to find it."""

    child: Child
    env: dict[str, str]
    args: tuple[str, ...] = ("-m", "broker")

    def restart(self) -> None:
        """Kill and start again on the same endpoints (a new epoch); shows the old log."""
        self.child.kill()
        print(self.child.output())
        self.child = Child(self.child.name, self.args, env=self.env)
        wait_ready(self.env, self.child)

    def stop(self) -> None:
        """Stop and reap the broker; remove its run directory."""
        self.child.stop()
        shutil.rmtree(self.env["UPBIT_BROKER_STATE_DIR"], ignore_errors=True)


def start_broker(
    env: dict[str, str], *, args: Sequence[str] = ("-m", "broker"), name: str = "broker"
) -> Broker:
    """Start a broker with ``env`` and wait until it answers hello."""
    broker = Broker(Child(name, args, env=env), env, tuple(args))
    try:
        wait_ready(env, broker.child)
    except BaseException:
        broker.stop()
        raise
    return broker


class ProtocolMismatch(RuntimeError):
    """The broker speaks another bus protocol (a benchmark variant of another commit)."""


def control_request(
    env: Mapping[str, str], make: Callable[[int], Any] | None = None, timeout: float = 5.0
) -> Any:
    """Hello on a fresh DEALER, then one request ``make(1)``, then Bye; the reply.

    Without ``make``, the broker's Welcome. TimeoutError if the broker does not answer,
    :class:`ProtocolMismatch` if it refuses our protocol version.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 100)
    try:
        sock.connect(env["UPBIT_BROKER_CONTROL"])
        sock.send(encode(Hello(client_id=uuid.uuid4().hex, name="harness-probe")))
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError("no welcome")
        reply = decode_broker_message(sock.recv())
        if isinstance(reply, ErrorReply) and reply.code == "protocol_version":
            raise ProtocolMismatch(reply.message)
        if not isinstance(reply, Welcome):
            raise RuntimeError(f"unexpected reply to hello: {reply!r}")
        if make is not None:
            sock.send(encode(make(1)))
            if not sock.poll(int(timeout * 1000)):
                raise TimeoutError("no reply")
            reply = decode_broker_message(sock.recv())
        sock.send(encode(Bye()))
        return reply
    finally:
        sock.close()


def wait_ready(
    env: Mapping[str, str], child: Child | None = None, timeout: float = 30.0
) -> Welcome | None:
    """The readiness probe: wait until the broker at ``env`` answers hello.

    Fails at once, with its output, if ``child`` (the broker) exits. None when the broker
    answered but speaks another protocol version (it is up all the same).
    """
    deadline = time.monotonic() + scaled(timeout)
    while True:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited\n{child.output(3000)}")
        try:
            welcome: Welcome = control_request(env, timeout=scaled(0.5))
            return welcome
        except ProtocolMismatch:
            return None
        except (TimeoutError, zmq.ZMQError):
            if time.monotonic() > deadline:
                tail = child.output(3000) if child is not None else ""
                raise TimeoutError(f"broker did not answer hello\n{tail}") from None
