"""Fixtures that run the real simulator and the real broker as separate processes.

Each child's output is printed at teardown, so pytest shows it for failing tests.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import zmq

from schemas.bus import Hello, Welcome, decode_broker_message, encode
from tests.support import Child, scaled, short_tmpdir, wait_until

SIM_KEYS = {
    "UPBIT_ACCESS_KEY": "test-access-key-0123456789",
    "UPBIT_SECRET_KEY": "test-secret-key-abcdefghijklmnopqrstuvwxyz",
}


@dataclass
class Sim:
    """A running simulator and helpers to drive its control API."""

    child: Child
    urls: dict[str, Any]

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST (with a body) or GET a control endpoint; returns decoded JSON."""
        url = f"{self.urls['control']}/{path.lstrip('/')}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=scaled(10)) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def rest(self, path: str) -> Any:
        """GET a REST path of the simulator (quotation, no auth); decoded JSON."""
        url = f"{self.urls['rest']}{path}"
        with urllib.request.urlopen(url, timeout=scaled(10)) as response:
            return json.loads(response.read())

    def connections(self, path: str = "/websocket/v1") -> list[dict[str, Any]]:
        """Open WebSocket connections on ``path``, with their subscriptions."""
        conns = self.control("connections")
        items = conns["connections"] if isinstance(conns, dict) else conns
        return [c for c in items if c.get("path") == path]

    def env(self) -> dict[str, str]:
        """Environment that points a broker at this simulator."""
        return {
            "UPBIT_WS_URL": self.urls["ws"],
            "UPBIT_WS_PRIVATE_URL": self.urls["ws_private"],
            "UPBIT_REST_URL": self.urls["rest"],
        }


def start_sim(extra: list[str] | None = None, env: dict[str, str] | None = None) -> Sim:
    """Start ``python -m simulator --port 0`` and read its URLs."""
    child = Child(
        "simulator",
        ["-m", "simulator", "--port", "0", *(extra or [])],
        env={**SIM_KEYS, **(env or {})},
        read_first_line=True,
    )
    assert child.first_line is not None
    return Sim(child, child.first_line)


@pytest.fixture(scope="module")
def sim_module() -> Iterator[Sim]:
    sim = start_sim(["--rate", "20"])
    yield sim
    sim.child.stop()
    print(sim.child.output())


@pytest.fixture
def sim(sim_module: Sim) -> Sim:
    """The module's simulator, reset before each test."""
    sim_module.control("reset", {})
    return sim_module


@dataclass
class BrokerProc:
    """A running broker process and the environment clients use to find it."""

    child: Child
    env: dict[str, str]

    def restart(self) -> None:
        """Kill and start again on the same endpoints (a new epoch)."""
        self.child.kill()
        print(self.child.output())
        self.child = Child("broker", ["-m", "broker"], env=self.env)
        wait_ready(self.env)


def wait_ready(env: dict[str, str], timeout: float = 15.0) -> Welcome:
    """Wait until the broker at ``env``'s control endpoint answers hello."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()

    def attempt() -> Welcome | None:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(env["UPBIT_BROKER_CONTROL"])
            sock.send(encode(Hello(client_id="probe", name="readiness-probe")))
            if sock.poll(int(scaled(0.5) * 1000)):
                reply = decode_broker_message(sock.recv())
                return reply if isinstance(reply, Welcome) else None
            return None
        finally:
            sock.close()

    welcome = wait_until(attempt, timeout, what="broker to answer hello")
    assert welcome is not None
    return welcome


def broker_env(
    sim: Sim, *, keys: bool = False, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Environment for a broker (and its clients) on private ipc endpoints."""
    rundir = short_tmpdir("ubk-")
    env = {
        **sim.env(),
        "UPBIT_BROKER_CONTROL": f"ipc://{rundir}/control",
        "UPBIT_BROKER_DATA": f"ipc://{rundir}/data",
        "UPBIT_BROKER_STATE_DIR": str(rundir),
        "UPBIT_BROKER_HEARTBEAT": "0.5",
        "UPBIT_BROKER_LIVENESS": "3",
        "UPBIT_BROKER_LOG_LEVEL": "info",
        "UPBIT_ACCESS_KEY": "",
        "UPBIT_SECRET_KEY": "",
    }
    if keys:
        env.update(SIM_KEYS)
    env.update(extra or {})
    return env


def run_broker_proc(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    """Start a broker with ``env`` (exported for in-process clients); stop it, show its log."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    proc = BrokerProc(Child("broker", ["-m", "broker"], env=env), env)
    try:
        wait_ready(env)
        yield proc
    finally:
        proc.child.stop()
        print(proc.child.output())


@pytest.fixture
def broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    """A public-only broker against the simulator; clients in this process find it by env."""
    yield from run_broker_proc(broker_env(sim), monkeypatch)


@pytest.fixture
def private_broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    """A broker with the simulator's API keys (public and private links)."""
    yield from run_broker_proc(broker_env(sim, keys=True), monkeypatch)
