"""Attacks on the bus that tests/hostile.py does not make, each one proven on a live broker.

Every test here reproduces a weakness found by an outside review. Those still open are
marked ``xfail(strict=True)``: the suite stays green, and the mark must go (the test
flips to a pass) once the weakness is fixed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest
import zmq

from schemas.bus import (
    HEARTBEAT_TOPIC,
    ErrorReply,
    StatusEvent,
    StreamSpec,
    Subscribe,
    decode_batch,
    split_published,
    status_topic,
)
from tests.harness import control_request
from tests.integration.conftest import BrokerProc, Sim, broker_env, run_broker_proc
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


WRONG_KEYS = {
    "UPBIT_ACCESS_KEY": "wrong-access-key-0000000000",
    "UPBIT_SECRET_KEY": "wrong-secret-key-0000000000000000000000",
}


@pytest.fixture
def rejected_keys_broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    """A broker whose API keys the simulator rejects, once it has found out."""
    env = broker_env(sim, keys=True, extra=WRONG_KEYS)
    for broker in run_broker_proc(env, monkeypatch):

        def rejected(broker: BrokerProc = broker) -> bool:
            # Private links and polls start on demand: ask for private data until they ran.
            control_request(env, lambda req: Subscribe(req, [StreamSpec("myAsset")]))
            return "rejected the API keys" in broker.child.output()

        wait_until(rejected, 20, interval=0.2, what="the broker to learn its keys are rejected")
        yield broker


def _told_private_is_off(reply: object, sub: zmq.Socket[bytes], seconds: float) -> bool:
    """True when the subscribe was refused, or a status event said the keys are rejected."""
    if isinstance(reply, ErrorReply):
        return reply.code == "private_unavailable"
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not sub.poll(int(left * 1000)):
            return False
        _, envelopes = split_published(sub.recv())
        for envelope in decode_batch(envelopes):
            if isinstance(envelope.data, StatusEvent) and envelope.data.state == "auth_failed":
                return True
    return False


def test_a_private_subscribe_after_the_keys_were_rejected_is_not_a_silent_success(
    rejected_keys_broker: BrokerProc, sub_ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    env = rejected_keys_broker.env
    sub = sub_ctx.socket(zmq.SUB)
    sub.connect(env["UPBIT_BROKER_DATA"])
    for prefix in ("myOrder/", status_topic("private")):
        sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    reply = control_request(env, lambda req: Subscribe(req, [StreamSpec("myOrder")]))
    assert _told_private_is_off(reply, sub, 3.0), f"{reply!r}, then no auth_failed status"
