"""Upbit unreachable at start: a subscribe is told so, promptly, and nothing is kept.

Before, the subscribe waited 10 s for Upbit's market list while the client gave up
after 5 s with "no reply from the broker" (though the broker was running), and the
stream stayed registered for a client that had been told it failed.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from clients import BrokerClient, BrokerError
from tests.integration.conftest import BrokerProc, Sim, broker_env, run_broker_proc


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cut_off_broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    port = closed_port()
    env = broker_env(
        sim,
        extra={
            "UPBIT_REST_URL": f"http://127.0.0.1:{port}",
            "UPBIT_WS_URL": f"ws://127.0.0.1:{port}/websocket/v1",
        },
    )
    yield from run_broker_proc(env, monkeypatch)


async def test_a_subscribe_without_upbit_is_refused_upstream_unavailable_and_kept_nowhere(
    cut_off_broker: BrokerProc,
) -> None:
    async with BrokerClient(name="cut-off", request_timeout=5.0) as client:
        started = time.monotonic()
        with pytest.raises(BrokerError) as info:
            await client.subscribe_ticker(["KRW-BTC"], lambda ticker: None)
        took = time.monotonic() - started
        assert info.value.code == "upstream_unavailable"
        assert "market list" in str(info.value)
        assert took < 5.0, f"told after {took:.1f} s, past the client's timeout"
        metrics = await client.metrics()
        assert metrics.total_subscriptions == 0
        assert all(row.streams == 0 for row in metrics.clients)
    assert cut_off_broker.child.alive()
