"""Fixtures that run the real simulator and the real broker as separate processes.

The processes come from :mod:`tests.harness` (shared with the benchmarks). Each child's
output is printed at teardown, so pytest shows it for failing tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import harness
from tests.harness import Broker, Sim, start_broker, start_sim, wait_ready

BrokerProc = Broker
"""Old name of :class:`tests.harness.Broker`, kept for existing imports."""

TEST_BROKER_ENV = {"UPBIT_BROKER_HEARTBEAT": "0.5", "UPBIT_BROKER_LIVENESS": "3"}
"""Fast heartbeats: a client that stops answering expires within ~1.5 s."""

__all__ = ["BrokerProc", "Sim", "broker_env", "run_broker_proc", "start_sim", "wait_ready"]


@pytest.fixture(scope="module")
def sim_module() -> Iterator[Sim]:
    sim = start_sim(["--rate", "20"])
    yield sim
    sim.stop()
    print(sim.child.output())


@pytest.fixture
def sim(sim_module: Sim) -> Sim:
    """The module's simulator, reset before each test."""
    sim_module.control("reset", {})
    return sim_module


def broker_env(
    sim: Sim, *, keys: bool = False, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The harness's broker environment with the tests' fast heartbeats."""
    return harness.broker_env(sim, keys=keys, extra={**TEST_BROKER_ENV, **(extra or {})})


def run_broker_proc(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Broker]:
    """Start a broker with ``env`` (exported for in-process clients); stop it, show its log."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    broker = start_broker(env)
    try:
        yield broker
    finally:
        broker.stop()
        print(broker.child.output())


@pytest.fixture
def broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[Broker]:
    """A public-only broker against the simulator; clients in this process find it by env."""
    yield from run_broker_proc(broker_env(sim), monkeypatch)


@pytest.fixture
def private_broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[Broker]:
    """A broker with the simulator's API keys (public and private links)."""
    yield from run_broker_proc(broker_env(sim, keys=True), monkeypatch)
