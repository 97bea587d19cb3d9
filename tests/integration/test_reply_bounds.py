"""A client cannot make the broker hold what it will not read, nor swallow huge messages.

Before the bounds, a 5 MB hello followed by 100 metrics requests (each reply carrying
the 5 MB name) from a client that never read grew the broker by 502 MB. Now a message
over 256 KB costs its sender the connection before the broker reads it, names are
bounded, and unread replies are capped per client; a bystander is served throughout.
"""

from __future__ import annotations

import psutil  # type: ignore[import-untyped,unused-ignore]
import zmq

from schemas.bus import (
    HealthReply,
    HealthRequest,
    Hello,
    MetricsRequest,
    decode_broker_message,
    encode,
)
from tests.integration.conftest import BrokerProc
from tests.support import scaled, wait_until

MB = 2**20


def test_a_huge_hello_and_unread_replies_cost_the_broker_almost_nothing(broker: BrokerProc) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    endpoint = broker.env["UPBIT_BROKER_CONTROL"]
    proc = psutil.Process(broker.child.pid)
    try:
        before = proc.memory_info().rss
        hog = ctx.socket(zmq.DEALER)
        hog.setsockopt(zmq.LINGER, 2000)
        hog.setsockopt(zmq.ROUTING_ID, b"\x01hog-0123456789")
        hog.connect(endpoint)
        hog.send(encode(Hello(client_id="hog", name="x" * (5 * MB))))
        # A second identity that says hello properly, then never reads its replies.
        reader_less = ctx.socket(zmq.DEALER)
        reader_less.setsockopt(zmq.LINGER, 2000)
        reader_less.setsockopt(zmq.ROUTING_ID, b"\x01quiet-012345678")
        reader_less.connect(endpoint)
        reader_less.send(encode(Hello(client_id="quiet", name="n" * 128)))
        for req in range(1000):
            reader_less.send(encode(MetricsRequest(req=req)))
        bystander = ctx.socket(zmq.DEALER)
        bystander.setsockopt(zmq.LINGER, 0)
        bystander.setsockopt(zmq.ROUTING_ID, b"\x01bystander-01234")
        bystander.connect(endpoint)
        bystander.send(encode(Hello(client_id="b", name="bystander")))
        assert bystander.poll(int(scaled(5) * 1000)), "the bystander got no welcome"
        bystander.recv()

        def answered() -> bool:
            bystander.send(encode(HealthRequest(req=7)))
            if not bystander.poll(int(scaled(1) * 1000)):
                return False
            return isinstance(decode_broker_message(bystander.recv()), HealthReply)

        wait_until(answered, scaled(10), what="the bystander's health reply")
        growth = (proc.memory_info().rss - before) / MB
        print(f"broker RSS growth after a 5 MB hello and 1,000 unread replies: {growth:.1f} MB")
        assert growth < 40, f"the broker grew {growth:.0f} MB"
        assert broker.child.alive()
    finally:
        ctx.destroy(linger=0)
