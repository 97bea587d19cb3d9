"""Attacks on the bus that tests/hostile.py does not make, each one proven on a live broker.

Every test here reproduces a weakness found by an outside review. Those still open are
marked ``xfail(strict=True)``: the suite stays green, and the mark must go (the test
flips to a pass) once the weakness is fixed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest
import zmq

from schemas.bus import HEARTBEAT_TOPIC
from tests.integration.conftest import BrokerProc
from tests.support import wait_until

PREFIXES = 20_000
"""Distinct SUB prefixes one peer registers (about 2.4 MB of subscription messages)."""
PREFIX_BYTES = 120
SUB_GROWTH_BOUND = 48 * 2**20
"""What one data-plane peer may cost the broker's memory, whatever it subscribes to."""


@pytest.fixture
def sub_ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.mark.xfail(
    strict=True,
    reason="the PUB socket keeps every prefix a SUB sends, unbounded and unchecked "
    "(~45 bytes of broker memory per byte subscribed): one data-plane peer can OOM it",
)
def test_one_sub_peer_cannot_grow_the_brokers_memory_without_bound(
    broker: BrokerProc, sub_ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    # SUB subscriptions are held by the PUB side: a peer that subscribes to many long,
    # distinct prefixes fills the broker's subscription trie, never its own memory.
    proc = psutil.Process(broker.child.pid)
    before = proc.memory_info().rss
    sub = sub_ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SNDHWM, 0)
    sub.connect(broker.env["UPBIT_BROKER_DATA"])
    for i in range(PREFIXES):
        sub.setsockopt(zmq.SUBSCRIBE, b"%08d" % i + os.urandom(PREFIX_BYTES - 8))
    # Subscriptions reach the PUB in order on one pipe: once a heartbeat arrives on the
    # last one, the broker has processed all of them.
    sub.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC.encode())
    wait_until(lambda: sub.poll(100), 20, what="a broker heartbeat after the prefixes")
    assert broker.child.alive()
    growth = proc.memory_info().rss - before
    assert growth < SUB_GROWTH_BOUND, f"the broker grew by {growth / 2**20:.0f} MB"
