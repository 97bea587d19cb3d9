"""The data plane as a plain SUB sees it (bus protocol 3), from a real broker under load.

What a consumer in another language relies on: every frame is ``topic + NUL`` and a
msgpack array of envelopes of that topic; under load one frame carries several (that is
the point of batching), never more than ``MAX_BATCH``; sequences run on without a hole
from one frame to the next.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict

import msgspec
import pytest
import zmq

from clients import BrokerClient
from schemas.bus import MAX_BATCH, MAX_BATCH_BYTES, TOPIC_END, decode_batch, encode, split_published
from tests.integration.conftest import BrokerProc, Sim
from tests.support import async_wait_until, scaled

pytestmark = pytest.mark.timeout(120)

CODES = ["KRW-BTC", "KRW-ETH"]
FIREHOSE_RATE = 20_000.0
"""Messages/s the simulator's firehose is held to: load enough for batches, light
enough for a loaded 2-core machine (the raw reader below decodes every frame)."""
WANTED_FRAMES = 2_000


async def test_a_plain_sub_reads_batches_of_one_topic_with_no_sequence_hole(
    sim: Sim, broker: BrokerProc
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)  # this test must not drop: it checks for holes
    for kind in ("ticker", "trade"):
        sub.setsockopt(zmq.SUBSCRIBE, f"{kind}/".encode())
    sub.connect(broker.env["UPBIT_BROKER_DATA"])
    sizes: list[int] = []
    seqs: dict[str, list[int]] = defaultdict(list)
    try:
        async with BrokerClient(name="wire-test", request_timeout=scaled(10)) as client:
            # The library client makes the broker publish these topics.
            got: list[object] = []
            await client.subscribe_ticker(CODES, got.append)
            await client.subscribe_trade(CODES, got.append)
            await async_wait_until(lambda: len(got) >= 4, 20, what="first messages")
            sim.control("rate", {"firehose": True, "firehose_rate": FIREHOSE_RATE})
            deadline = time.monotonic() + scaled(30)
            while len(sizes) < WANTED_FRAMES and time.monotonic() < deadline:
                if not sub.poll(100):
                    continue
                frame = sub.recv()
                topic, body = split_published(frame)
                assert frame[len(topic)] == TOPIC_END[0]
                batch = decode_batch(body)
                assert {env.topic.encode() for env in batch} == {topic}
                if len(batch) > 1:  # the byte limit holds unless one envelope passes it
                    assert sum(len(encode(env)) for env in batch) <= MAX_BATCH_BYTES
                sizes.append(len(batch))
                seqs[topic.decode()].extend(env.seq for env in batch)
            sim.control("rate", {"firehose": False})
    finally:
        sub.close()
        ctx.term()

    print(
        f"\n[wire] {len(sizes)} frames, {sum(sizes)} envelopes, "
        f"mean batch {sum(sizes) / max(len(sizes), 1):.1f}, largest {max(sizes, default=0)}"
    )
    assert len(sizes) >= WANTED_FRAMES, f"only {len(sizes)} frames in 30 s"
    assert max(sizes) > 1, "under load no frame carried more than one message"
    assert max(sizes) <= MAX_BATCH
    assert set(seqs) == {f"{kind}/{code}/" for kind in ("ticker", "trade") for code in CODES}
    for name, numbers in seqs.items():
        holes = [b for a, b in itertools.pairwise(numbers) if b != a + 1]
        assert not holes, f"{name}: sequence jumps at {holes[:5]}"


def test_a_protocol_2_frame_is_not_a_batch() -> None:
    # A broker of protocol 2 sent the bare envelope after the topic end: a client of
    # protocol 3 reports it as undecodable rather than misreading it (the handshake
    # refuses mismatched versions before it comes to that).
    bare = msgspec.msgpack.encode(["ticker/KRW-BTC/", 1, "e", 1, "websocket", {"type": "x"}])
    with pytest.raises(Exception, match="published batch"):
        decode_batch(bare)
