"""Simulator test fixtures: in-process simulators on port 0, WebSocket helpers and
:class:`SimulatorProcess`, a sync-friendly ``python -m simulator`` child for any test."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlencode

import aiohttp
import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect

from simulator.app import RunningSimulator, start_simulator
from simulator.config import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY
from tests.support import ROOT, scaled

SimFactory = Callable[..., Awaitable[RunningSimulator]]
Message = dict[str, Any]


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    """Start in-process simulators (port 0) with config overrides; all closed at teardown.

    Markets tick at 20 events/s by default here so tests get data quickly.
    """
    started: list[RunningSimulator] = []

    async def factory(**overrides: Any) -> RunningSimulator:
        overrides.setdefault("rate", 20.0)
        running = await start_simulator(**overrides)
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.close()


@pytest.fixture
async def sim(make_sim: SimFactory) -> RunningSimulator:
    """A simulator with default settings (rate 20/s)."""
    return await make_sim()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def open_ws(url: str, **kwargs: Any) -> Any:
    """``websockets.connect`` without client keepalive pings (tests drive pings)."""
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("open_timeout", scaled(5))
    kwargs.setdefault("close_timeout", scaled(2))
    return connect(url, **kwargs)


async def send(ws: ClientConnection, *objects: Mapping[str, Any]) -> None:
    """Send one request: a JSON array of the given objects."""
    await ws.send(json.dumps(list(objects)))


async def recv_frame(ws: ClientConnection, timeout: float = 5.0) -> Any:
    """The next frame as JSON; asserts it was a BINARY frame (as Upbit sends)."""
    raw = await asyncio.wait_for(ws.recv(), scaled(timeout))
    assert isinstance(raw, bytes), f"expected a binary frame, got text {raw!r}"
    return json.loads(raw)


def flatten(frame: Any) -> list[Message]:
    """The messages in a frame (list formats carry several)."""
    if isinstance(frame, list):
        assert frame, "list frames carry at least one message"
        return frame
    return [frame]


async def collect_until(
    ws: ClientConnection,
    predicate: Callable[[Message], bool],
    timeout: float = 5.0,
    what: str = "",
) -> list[Message]:
    """Every message received up to and including the first matching ``predicate``."""
    deadline = time.monotonic() + scaled(timeout)
    seen: list[Message] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {what or predicate}; saw {seen[-5:]}")
        try:
            frame = await recv_frame(ws, remaining)
        except TimeoutError:
            continue
        for msg in flatten(frame):
            seen.append(msg)
            if predicate(msg):
                return seen


async def recv_until(
    ws: ClientConnection,
    predicate: Callable[[Message], bool],
    timeout: float = 5.0,
    what: str = "",
) -> Message:
    """The first message matching ``predicate`` (others are skipped)."""
    return (await collect_until(ws, predicate, timeout, what))[-1]


async def expect_silence(ws: ClientConnection, seconds: float) -> None:
    """Assert nothing arrives for ``seconds`` (a deadline, not a sleep)."""
    try:
        frame = await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return
    raise AssertionError(f"expected silence, got {frame!r}")


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll an async ``check`` until it is true; fail after ``timeout`` (scaled)."""
    deadline = time.monotonic() + scaled(timeout)
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {scaled(timeout):.1f} s: {what or check}")
        await asyncio.sleep(0.02)


async def get_json(
    http: aiohttp.ClientSession, url: str, **params: Any
) -> tuple[int, Any, Mapping[str, str]]:
    async with http.get(url, params=params or None) as resp:
        text = await resp.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        return resp.status, body, resp.headers


async def control(sim: RunningSimulator, path: str, body: Mapping[str, Any] | None = None) -> Any:
    """GET (no body) or POST a /_sim endpoint; returns the decoded JSON."""
    url = f"{sim.urls['control']}/{path.lstrip('/')}"
    async with aiohttp.ClientSession() as session:
        if body is None:
            async with session.get(url) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()
        async with session.post(url, json=dict(body)) as resp:
            assert resp.status in (200, 201), await resp.text()
            return await resp.json()


def rest_auth(
    params: Mapping[str, Any] | None,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
) -> str:
    """Authorization header for an exchange REST call, as Upbit's Python sample signs it
    (the simulator's demo keys unless given)."""
    payload: dict[str, Any] = {"access_key": access_key, "nonce": str(uuid.uuid4())}
    if params:
        query = unquote(urlencode(dict(params), doseq=True)).encode()
        payload["query_hash"] = hashlib.sha512(query).hexdigest()
        payload["query_hash_alg"] = "SHA512"
    return "Bearer " + jwt.encode(payload, secret_key, algorithm="HS512")


def make_jwt(access_key: str, secret_key: str, *, nonce: str | None = None) -> str:
    """An Upbit WebSocket JWT (access_key + nonce, HS512)."""
    payload = {"access_key": access_key, "nonce": nonce or str(uuid.uuid4())}
    return jwt.encode(payload, secret_key, algorithm="HS512")


class SimulatorProcess:
    """``python -m simulator --port 0 ARGS`` as a child process, usable from sync code.

    The first stdout line (JSON URLs) is read with a deadline into :attr:`urls`;
    :meth:`close` terminates, kills if needed and always reaps; stderr is kept in a file
    and shown by :meth:`output` (and printed on close, so pytest shows it on failure).
    """

    def __init__(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 15.0
    ) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulator", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=full_env,
            cwd=ROOT,
        )
        self._closed = False
        try:
            self.urls: dict[str, Any] = json.loads(self._first_line(scaled(timeout)))
        except BaseException:
            self.close()
            raise

    def _first_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no first line within {timeout} s:\n{self.output()}")
                if sel.select(remaining):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        raise AssertionError(f"simulator exited early:\n{self.output()}")
                    buf += chunk
        return buf.split(b"\n", 1)[0].decode()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything the child wrote to stderr so far."""
        if self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-20000:]

    def close(self, timeout: float = 5.0) -> int:
        """Terminate (then kill) and reap; prints stderr. Returns the exit code."""
        if self._closed:
            return self.proc.returncode
        self._closed = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=scaled(timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        print(f"--- simulator (pid {self.proc.pid}) stderr ---\n{self.output()}")
        self._stderr.close()
        return self.proc.returncode

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@pytest.fixture
def sim_process() -> Iterator[Callable[..., SimulatorProcess]]:
    """Start SimulatorProcess children; every one is reaped at teardown."""
    children: list[SimulatorProcess] = []

    def start(*args: str, env: Mapping[str, str] | None = None) -> SimulatorProcess:
        child = SimulatorProcess(*args, env=env)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()
