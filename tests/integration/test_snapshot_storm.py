"""Snapshot storms cost the host no 429 and no 418: REST is shared and paced.

``get_snapshot`` of a stream nobody holds costs a REST call. Before the limits, 260
snapshot requests from one client earned the host 8 x 429 and 2 x 418 blocks. Now one
client has one snapshot request in flight at a time (the rest are refused ``busy``),
the broker fetches at most a bounded number of uncached streams per request, and every
call goes through the shared per-group limiter: many clients asking at once get their
answers, slower, and Upbit (the simulator) sees no request over its limits.
"""

from __future__ import annotations

import asyncio

import pytest

from clients import BrokerClient, BrokerError
from tests.integration.conftest import BrokerProc, Sim

CLIENTS = 12
ROUNDS = 3


def throttled(sim: Sim) -> int:
    """REST answers 429 or 418 the simulator gave, every group."""
    groups = sim.control("stats")["rest"]["groups"]
    return sum(int(v.get("429", 0)) + int(v.get("418", 0)) for v in groups.values())


@pytest.mark.timeout(180)
async def test_many_clients_asking_snapshots_at_once_earn_no_429(
    broker: BrokerProc, sim: Sim
) -> None:
    codes = [m for m in sim.rest("/v1/market/all") if m["market"].startswith("KRW-")]
    names = [m["market"] for m in codes][:40]
    before = throttled(sim)

    async def one(i: int) -> tuple[int, int]:
        answered = refused = 0
        async with BrokerClient(name=f"storm-{i}") as client:
            for r in range(ROUNDS):
                chunk = names[(i * 7 + r * 13) % 30 :][:10]
                try:
                    reply = await client.get_snapshot("ticker", chunk)
                    answered += len(reply)
                except BrokerError as exc:
                    codes = ("busy", "upstream_error")
                    assert exc.code in codes, exc  # noqa: PT017
                    refused += 1
        return answered, refused

    results = await asyncio.gather(*(one(i) for i in range(CLIENTS)))
    answered = sum(a for a, _ in results)
    after = throttled(sim)
    print(f"snapshot storm: {answered} values answered, refusals {[r for _, r in results]}")
    assert after - before == 0, f"the simulator answered {after - before} x 429/418"
    assert answered >= CLIENTS * ROUNDS * 5
