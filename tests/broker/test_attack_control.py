"""What one client says about itself must not falsify what the broker tells everyone.

Heartbeat counters are the client's own word; the broker republishes them in every
metrics reply and averages their lags. One client's absurd values (found by an outside
review) must stay its own row's business, never the broker's aggregate.
"""

from __future__ import annotations

import math

import pytest

from broker.control import MAX_LAG_MS, ControlServer
from broker.liveness import ClientTable
from broker.quotas import Quotas
from schemas.bus import Heartbeat, MetricsReply, MetricsRequest, encode
from tests.broker.test_control import ALICE, BOB, FakeBroker, ask, joined, quota_control


@pytest.fixture
def control() -> ControlServer:
    return quota_control(FakeBroker(ClientTable()), Quotas())


@pytest.mark.parametrize("lag", [math.inf, 1e308, math.nan, -1e308])
def test_one_clients_absurd_lag_does_not_become_the_brokers_average_latency(
    control: ControlServer, lag: float
) -> None:
    joined(control, ALICE)
    joined(control, BOB)
    control.handle([BOB, encode(Heartbeat(received=10, lag_ms=5.0))], 1.0)
    control.handle([ALICE, encode(Heartbeat(received=10, lag_ms=lag))], 1.0)
    reply = ask(control, BOB, MetricsRequest(req=1))[1]
    assert isinstance(reply, MetricsReply)
    average = reply.metrics.average_latency_ms
    assert math.isfinite(average), average
    assert 0.0 <= average <= MAX_LAG_MS, average


def test_negative_counters_are_not_republished(control: ControlServer) -> None:
    joined(control, ALICE)
    control.handle([ALICE, encode(Heartbeat(received=-(2**63), gaps=-5, dropped=-1))], 1.0)
    reply = ask(control, ALICE, MetricsRequest(req=1))[1]
    assert isinstance(reply, MetricsReply)
    (row,) = reply.metrics.clients
    assert (row.received, row.gaps, row.dropped) == (0, 0, 0)
