"""clients.sockets: the client's own routing ids and the bound on what a peer can send."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from clients.sockets import ROUTING_ID_BYTES, new_routing_id, open_dealer, open_sub
from schemas.bus import MAX_MESSAGE_BYTES
from tests.support import short_tmpdir, wait_until

BOUND = 1024


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def endpoint(name: str) -> str:
    return f"ipc://{short_tmpdir('zs-')}/{name}"


def recv_or_none(sock: zmq.Socket[bytes]) -> bytes | None:
    try:
        return sock.recv(zmq.NOBLOCK)
    except zmq.Again:
        return None


def test_a_routing_id_is_16_random_bytes_never_starting_with_zero() -> None:
    ids = [new_routing_id() for _ in range(2000)]
    assert all(len(i) == ROUTING_ID_BYTES == 16 for i in ids)
    assert all(i[0] != 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert len({i[0] for i in ids}) > 200  # the first byte is random too, only never 0


def test_the_router_sees_the_dealers_own_routing_id(ctx: zmq.Context[Any]) -> None:
    where = endpoint("ctl")
    router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    router.bind(where)
    first = open_dealer(ctx, where)
    second = open_dealer(ctx, where)
    first.send(b"hi")
    second.send(b"hi")
    seen = {router.recv_multipart()[0] for _ in range(2)}
    assert seen == {first.getsockopt(zmq.ROUTING_ID), second.getsockopt(zmq.ROUTING_ID)}
    assert all(len(i) == 16 and i[0] != 0 for i in seen)


def test_both_sockets_default_to_the_bus_message_bound(ctx: zmq.Context[Any]) -> None:
    dealer = open_dealer(ctx, endpoint("ctl"))
    sub = open_sub(ctx, endpoint("data"), [], hwm=10)
    assert dealer.getsockopt(zmq.MAXMSGSIZE) == MAX_MESSAGE_BYTES == 16 * 1024 * 1024
    assert sub.getsockopt(zmq.MAXMSGSIZE) == MAX_MESSAGE_BYTES


def dropped_or_delivered(sock: zmq.Socket[bytes], size: int, send: Callable[[], object]) -> str:
    """``send`` a big message, then wait until ``sock`` gets it or drops its peer.

    libzmq drops a peer that sends over MAXMSGSIZE (a protocol error) and does not
    reconnect to it.
    """
    monitor = sock.get_monitor_socket()  # before sending: the drop comes at once
    send()
    result = ""

    def settled() -> bool:
        nonlocal result
        while (frame := recv_or_none(sock)) is not None:
            if len(frame) > size:
                result = "delivered"
        while monitor.poll(0):
            if recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                result = result or "dropped"
        return bool(result)

    wait_until(settled, 10, what="the big message delivered or the peer dropped")
    sock.disable_monitor()
    monitor.close(linger=0)
    return result


def pub_sends_big(ctx: zmq.Context[Any], bound: int) -> str:
    """Publish one message of twice :data:`BOUND` bytes to a SUB bounded at ``bound``."""
    where = endpoint("data")
    pub: zmq.Socket[bytes] = ctx.socket(zmq.PUB)
    pub.bind(where)
    sub = open_sub(ctx, where, ["t/"], hwm=100, max_message=bound)
    wait_until(lambda: pub.send(b"t/small") or recv_or_none(sub), 5, what="subscribed")
    return dropped_or_delivered(sub, BOUND, lambda: pub.send(b"t/" + b"x" * (BOUND * 2)))


def test_a_sub_drops_a_publisher_sending_over_its_bound(ctx: zmq.Context[Any]) -> None:
    assert pub_sends_big(ctx, BOUND) == "dropped"


def test_a_sub_takes_the_same_message_under_a_larger_bound(ctx: zmq.Context[Any]) -> None:
    assert pub_sends_big(ctx, BOUND * 4) == "delivered"


def router_sends_big(ctx: zmq.Context[Any], bound: int) -> str:
    """Send one message of twice :data:`BOUND` bytes to a DEALER bounded at ``bound``."""
    where = endpoint("ctl")
    router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    router.bind(where)
    dealer = open_dealer(ctx, where, max_message=bound)
    dealer.send(b"hello")
    identity = router.recv_multipart()[0]
    return dropped_or_delivered(
        dealer, BOUND, lambda: router.send_multipart([identity, b"x" * (BOUND * 2)])
    )


def test_a_dealer_drops_a_router_sending_over_its_bound(ctx: zmq.Context[Any]) -> None:
    assert router_sends_big(ctx, BOUND) == "dropped"


def test_a_dealer_takes_the_same_message_under_a_larger_bound(ctx: zmq.Context[Any]) -> None:
    assert router_sends_big(ctx, BOUND * 4) == "delivered"
