"""A broker restart loses no private event: what happened while it was down arrives after.

The broker runs with the simulator's keys; a client in this process follows myOrder and
myAsset. The broker is killed (SIGKILL: no goodbye, nothing flushed), an order is placed
and filled meanwhile, and a new broker starts on the same endpoints and state directory.
The client subscribes again by itself on the new epoch; the new broker must report the
order's fills and end, and the balance change, from REST (Upbit replays nothing).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from tests.harness import Child
from tests.integration.conftest import BrokerProc, Sim, wait_ready
from tests.integration.test_private_fallback import (
    Seen,
    following,
    place_filled_bid,
)
from tests.support import async_wait_until


@pytest.fixture
async def follower(private_broker: BrokerProc, sim: Sim) -> AsyncIterator[Seen]:
    """A client following myOrder and myAsset, the private link up and synced."""
    async with following(sim, Seen(), "restart-watcher", statuses=False) as seen:
        yield seen


async def test_an_order_filled_while_the_broker_was_down_reaches_the_client_after_restart(
    sim: Sim, private_broker: BrokerProc, follower: Seen
) -> None:
    saved = Path(private_broker.env["UPBIT_BROKER_STATE_DIR"]) / "private.json"
    # The broker keeps what it published on disk; only then is a crash survivable.
    await async_wait_until(saved.exists, timeout=10, what="the broker's saved private state")

    private_broker.child.kill()
    print(private_broker.child.output())
    order = place_filled_bid(sim)
    fills = [t["uuid"] for t in order["trades"]]
    balances = {a["currency"]: Decimal(a["balance"]) for a in sim.control("account", {})}
    restarted_at = time.time()
    private_broker.child = Child(
        private_broker.child.name, private_broker.args, env=private_broker.env
    )
    wait_ready(private_broker.env, private_broker.child)

    await async_wait_until(
        lambda: ("done", None, "rest") in follower.events_of(order["uuid"]),
        timeout=30,
        what="the order's done event from the new broker",
    )
    asset = await async_wait_until(
        lambda: follower.asset_after(restarted_at), timeout=10, what="the myAsset change"
    )
    assert asset is not None
    events = follower.events_of(order["uuid"])
    print(f"\n[private] order filled while the broker was down: {events}")
    assert events == [
        ("wait", None, "rest"),
        *[("trade", fill, "rest") for fill in fills],
        ("done", None, "rest"),
    ]
    assert asset[2] == "rest"
    reported = {a.currency: a.balance for a in asset[1].assets}
    assert {"KRW", "BTC"} <= reported.keys()
    assert reported.items() <= balances.items()
