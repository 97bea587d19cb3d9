"""clients.sockets: the client's own routing ids, the bound on what a peer can send, and
the trust checks before every connect (ipc ownership, CURVE on tcp)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from clients.errors import BrokerError, UntrustedBroker
from clients.sockets import (
    ROUTING_ID_BYTES,
    CurveKeys,
    curve_keys,
    new_routing_id,
    open_dealer,
    open_sub,
)
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


# ------------------------------------------------------------------ trust boundary

OTHER_UID = 54321
"""Tests run as root, so chown to this uid plays another user."""


def unix_socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


def untrusted_place(tmp_path: Path, setup: str) -> Path:
    """A socket path someone else could control, made the way ``setup`` says."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    if setup == "symlinked dir":
        (tmp_path / "link").symlink_to(real)
        return tmp_path / "link" / "sock"
    if setup == "other owner":
        os.chown(real, OTHER_UID, OTHER_UID)
    elif setup == "world-writable":
        real.chmod(0o777)
    elif setup == "symlinked socket":
        (real / "sock").symlink_to(unix_socket(tmp_path / "elsewhere"))
    elif setup == "foreign socket":
        os.chown(unix_socket(real / "sock"), OTHER_UID, OTHER_UID)
    return real / "sock"


UNTRUSTED = [
    ("symlinked dir", "symbolic link"),
    ("other owner", "another user"),
    ("world-writable", "writable by other users"),
    ("symlinked socket", "socket is a symbolic link"),
    ("foreign socket", "impostor"),
]


@pytest.mark.parametrize(("setup", "reason"), UNTRUSTED)
def test_both_sockets_refuse_a_path_another_user_could_control(
    ctx: zmq.Context[Any], tmp_path: Path, setup: str, reason: str
) -> None:
    where = f"ipc://{untrusted_place(tmp_path, setup)}"
    openers: list[Callable[[], zmq.Socket[bytes]]] = [
        lambda: open_dealer(ctx, where),
        lambda: open_sub(ctx, where, [], hwm=10),
    ]
    for opener in openers:
        with pytest.raises(UntrustedBroker) as info:
            opener()
        assert isinstance(info.value, BrokerError)
        assert info.value.code == "untrusted_broker"
        assert reason in info.value.reason
        assert info.value.path in str(info.value)
        assert str(tmp_path) in info.value.path


def test_an_abstract_socket_is_refused(ctx: zmq.Context[Any]) -> None:
    with pytest.raises(UntrustedBroker, match="abstract"):
        open_dealer(ctx, "ipc://@upbit-broker")


async def test_the_client_refuses_to_connect_to_an_untrusted_path(tmp_path: Path) -> None:
    from clients import BrokerClient

    sock = untrusted_place(tmp_path, "foreign socket")
    client = BrokerClient(f"ipc://{sock}", f"ipc://{tmp_path}/real/data", request_timeout=0.5)
    with pytest.raises(UntrustedBroker, match="impostor"):
        await client.connect()
    await client.close()


def keypair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """``(public, secret)`` certificate files of a new key pair."""
    import zmq.auth

    public, secret = zmq.auth.create_certificates(tmp_path, name)
    return Path(public), Path(secret)


def test_no_curve_variables_means_no_curve() -> None:
    assert curve_keys({}) is None


@pytest.mark.parametrize("missing", ["UPBIT_BROKER_SERVER_KEY", "UPBIT_BROKER_CLIENT_CERT"])
def test_one_curve_variable_alone_is_refused(tmp_path: Path, missing: str) -> None:
    server_public, _ = keypair(tmp_path, "server")
    _, client_secret = keypair(tmp_path, "client")
    env = {
        "UPBIT_BROKER_SERVER_KEY": str(server_public),
        "UPBIT_BROKER_CLIENT_CERT": str(client_secret),
    }
    del env[missing]
    with pytest.raises(UntrustedBroker, match=missing):
        curve_keys(env)


def test_the_server_key_may_be_z85_or_a_certificate_file(tmp_path: Path) -> None:
    import zmq.auth

    server_public, _ = keypair(tmp_path, "server")
    client_public, client_secret = keypair(tmp_path, "client")
    z85_key = zmq.auth.load_certificate(server_public)[0]
    by_file = curve_keys(
        {
            "UPBIT_BROKER_SERVER_KEY": str(server_public),
            "UPBIT_BROKER_CLIENT_CERT": str(client_secret),
        }
    )
    by_text = curve_keys(
        {
            "UPBIT_BROKER_SERVER_KEY": z85_key.decode(),
            "UPBIT_BROKER_CLIENT_CERT": str(client_secret),
        }
    )
    assert by_file == by_text
    assert isinstance(by_file, CurveKeys)
    assert by_file.server == z85_key
    assert by_file.public == zmq.auth.load_certificate(client_public)[0]
    assert by_file.secret.decode() not in repr(by_file)


def test_a_public_certificate_cannot_stand_for_the_clients_secret(tmp_path: Path) -> None:
    server_public, _ = keypair(tmp_path, "server")
    client_public, _ = keypair(tmp_path, "client")
    env = {
        "UPBIT_BROKER_SERVER_KEY": str(server_public),
        "UPBIT_BROKER_CLIENT_CERT": str(client_public),
    }
    with pytest.raises(UntrustedBroker, match="no secret key"):
        curve_keys(env)


def test_a_tcp_dealer_is_a_curve_client_only_an_allowed_key_gets_through(
    ctx: zmq.Context[Any], tmp_path: Path
) -> None:
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    server_public, server_secret = keypair(tmp_path, "server")
    _, good_secret = keypair(allowed, "good")
    _, bad_secret = keypair(tmp_path, "bad")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(allowed))
    router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    router.curve_publickey, router.curve_secretkey = zmq.auth.load_certificate(server_secret)
    router.curve_server = True
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        where = f"tcp://127.0.0.1:{port}"

        def dealer(cert: Path) -> zmq.Socket[bytes]:
            env = {
                "UPBIT_BROKER_SERVER_KEY": str(server_public),
                "UPBIT_BROKER_CLIENT_CERT": str(cert),
            }
            sock = open_dealer(ctx, where, env=env)
            sock.send(b"hello")
            return sock

        bad = dealer(bad_secret)
        plain = open_dealer(ctx, where, env={})
        plain.send(b"hello")
        good = dealer(good_secret)
        assert router.poll(5000)
        identity, body = router.recv_multipart()
        assert identity == good.getsockopt(zmq.ROUTING_ID)
        assert body == b"hello"
        assert not router.poll(300)  # neither the unknown key nor the plain dealer came in
        assert bad.getsockopt(zmq.MECHANISM) == good.getsockopt(zmq.MECHANISM) == zmq.CURVE
        assert plain.getsockopt(zmq.MECHANISM) == zmq.NULL
    finally:
        auth.stop()
