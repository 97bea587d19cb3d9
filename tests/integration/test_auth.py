"""Rejected API keys are a permanent error, reported as one and never retried into a block.

The broker runs with the simulator's access key but a wrong secret, so every JWT it
signs fails verification: the private WebSocket answers its first request with
INVALID_AUTH, and private REST calls get 401. A client subscribing to myOrder must learn
``auth_failed`` with Upbit's reason within 2 s, see private data as unavailable, and see
no down / reconnecting / restored blips; meanwhile the broker must not keep signing with
the rejected keys (one try a minute, shared by the link and the REST fallback).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from clients import BrokerClient
from schemas.bus import StatusEvent
from tests.integration.conftest import BrokerProc, Sim, broker_env, run_broker_proc
from tests.support import async_wait_until, scaled

PRIVATE = "/websocket/v1/private"
WRONG_SECRET = "not-the-secret-of-this-key"
OBSERVE = 8.0
"""Seconds the broker is watched for retries after reporting auth_failed; before this
was fixed it made about 35 REST calls with the rejected token in 10 s."""


@pytest.fixture
def wrong_key_broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    env = broker_env(sim, keys=True, extra={"UPBIT_SECRET_KEY": WRONG_SECRET})
    yield from run_broker_proc(env, monkeypatch)


def signed_calls(sim: Sim) -> int:
    """REST calls the simulator saw outside quotation (the ones a JWT signs), plus upgrade
    attempts on the private WebSocket."""
    stats = sim.control("stats")
    groups = stats["rest"]["groups"]
    rest = sum(int(v.get("requests", 0)) for k, v in groups.items() if k != "market")
    upgrades = sum(1 for entry in stats["upgrades"]["log"] if entry["path"] == PRIVATE)
    return rest + upgrades


async def test_wrong_keys_are_auth_failed_within_2s_and_not_retried(
    wrong_key_broker: BrokerProc, sim: Sim
) -> None:
    statuses: list[StatusEvent] = []
    async with BrokerClient(name="auth-check") as client:
        started = time.monotonic()
        await client.subscribe_my_order(callback=lambda order: None, on_status=statuses.append)
        failed = await async_wait_until(
            lambda: next((e for e in statuses if e.state == "auth_failed"), None),
            timeout=scaled(2.0),
            what="auth_failed",
        )
        took = time.monotonic() - started
        assert failed is not None
        assert failed.connection == "private"
        assert "rejected the API keys" in failed.detail
        assert not client.is_private_available()
        assert client.is_public_available()

        before = signed_calls(sim)
        seen = len(statuses)
        # An observation window, not a wait for a condition: nothing may happen in it.
        await asyncio.sleep(OBSERVE)
        after = signed_calls(sim)
        assert not client.is_private_available()
        blips = [e.state for e in statuses[seen:]]
        print(f"auth_failed after {took:.2f} s; signed calls in {OBSERVE:g} s: {after - before}")
        assert after - before == 0, f"{after - before} calls with rejected keys"
        assert not {"down", "reconnecting", "restored", "up"} & set(blips), blips
    assert wrong_key_broker.child.alive()
    assert WRONG_SECRET not in wrong_key_broker.child.output()
