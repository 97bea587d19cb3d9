"""The trust boundary with real processes: a tcp bus lets in only allow-listed CURVE keys,
refuses to start without keys, and serves public data only when told to go without."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.config import CurveLayout
from broker.keys import add_client, init_server
from clients import BrokerClient, BrokerError, BrokerUnavailable
from tests.integration.conftest import Sim, broker_env
from tests.support import ROOT, Child, async_wait_until, scaled, short_tmpdir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_env(sim: Sim, curve: Path, **extra: str) -> dict[str, str]:
    """A broker (with the simulator's API keys) on two loopback tcp ports."""
    return broker_env(
        sim,
        keys=True,
        extra={
            "UPBIT_BROKER_CONTROL": f"tcp://127.0.0.1:{free_port()}",
            "UPBIT_BROKER_DATA": f"tcp://127.0.0.1:{free_port()}",
            "UPBIT_BROKER_CURVE_DIR": str(curve),
            **extra,
        },
    )


def use_keys(monkeypatch: pytest.MonkeyPatch, server: Path | None, cert: Path | None) -> None:
    """What the next client's sockets read: the broker's key and our certificate."""
    for name, value in (("UPBIT_BROKER_SERVER_KEY", server), ("UPBIT_BROKER_CLIENT_CERT", cert)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))


async def ready_client(env: dict[str, str], child: Child) -> BrokerClient:
    """A connected client, retried until the broker answers (it is starting)."""

    async def attempt() -> BrokerClient | None:
        assert child.proc.poll() is None, child.output()
        client = BrokerClient(
            env["UPBIT_BROKER_CONTROL"], env["UPBIT_BROKER_DATA"], request_timeout=scaled(1)
        )
        try:
            await client.connect()
        except BrokerUnavailable:
            await client.close()
            return None
        return client

    client: BrokerClient | None = await async_wait_until(
        attempt, scaled(20), what="the broker to welcome us"
    )
    assert client is not None
    return client


async def refused(env: dict[str, str]) -> bool:
    """True when no welcome comes back within a second (the handshake never completes)."""
    client = BrokerClient(
        env["UPBIT_BROKER_CONTROL"], env["UPBIT_BROKER_DATA"], request_timeout=scaled(1)
    )
    try:
        await client.connect()
    except BrokerUnavailable:
        return True
    finally:
        await client.close()
    return False


async def tickers_flow(client: BrokerClient) -> None:
    got: list[object] = []
    await client.subscribe_ticker("KRW-BTC", got.append)
    await async_wait_until(lambda: len(got) >= 2, scaled(20), what="tickers over tcp")


@pytest.fixture
def broker_child() -> Iterator[list[Child]]:
    """Brokers started by a test, stopped and shown at its end."""
    children: list[Child] = []
    yield children
    for child in children:
        child.stop()
        print(child.output())


@pytest.fixture
def curve(tmp_path: Path) -> CurveLayout:
    layout = CurveLayout(tmp_path / "curve")
    init_server(layout)
    return layout


async def test_a_curve_broker_serves_only_allowed_keys(
    sim: Sim,
    curve: CurveLayout,
    tmp_path: Path,
    broker_child: list[Child],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allowed = add_client(curve, "trader")
    stranger = CurveLayout(tmp_path / "stranger")
    init_server(stranger)  # a key pair the broker never heard of
    env = tcp_env(sim, curve.root)
    child = Child("broker", ["-m", "broker"], env=env)
    broker_child.append(child)

    use_keys(monkeypatch, curve.server_public, allowed)
    client = await ready_client(env, child)
    try:
        await tickers_flow(client)
        use_keys(monkeypatch, curve.server_public, stranger.server_secret)
        assert await refused(env)
        use_keys(monkeypatch, None, None)
        assert await refused(env)
        assert child.proc.poll() is None
        use_keys(monkeypatch, curve.server_public, allowed)
        health = await client.health()  # the allowed client is still served
        assert health.epoch == client.epoch
    finally:
        await client.close()


async def test_a_client_with_the_wrong_server_key_gets_no_reply(
    sim: Sim, curve: CurveLayout, broker_child: list[Child], monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed = add_client(curve, "trader")
    env = tcp_env(sim, curve.root)
    child = Child("broker", ["-m", "broker"], env=env)
    broker_child.append(child)
    use_keys(monkeypatch, curve.server_public, allowed)
    await (await ready_client(env, child)).close()
    impostor = CurveLayout(curve.root.parent / "impostor")
    init_server(impostor)
    use_keys(monkeypatch, impostor.server_public, allowed)  # not the broker's key
    assert await refused(env)


def test_a_tcp_endpoint_without_keys_refuses_to_start(tmp_path: Path) -> None:
    rundir = short_tmpdir("ubtrust-")
    env = {
        "XDG_RUNTIME_DIR": str(rundir),
        "UPBIT_BROKER_CONTROL": f"tcp://127.0.0.1:{free_port()}",
        "UPBIT_BROKER_DATA": f"ipc://{rundir}/d",
        "UPBIT_BROKER_CURVE_DIR": str(tmp_path / "nothing"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "broker"],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    assert result.returncode == 2
    assert "upbit-broker keys init" in result.stderr
    assert "UPBIT_BROKER_TCP_PUBLIC_ONLY=1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
async def public_only(
    sim: Sim, tmp_path: Path, broker_child: list[Child], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[BrokerClient, Child]]:
    env = tcp_env(sim, tmp_path / "no-curve", UPBIT_BROKER_TCP_PUBLIC_ONLY="1")
    child = Child("broker", ["-m", "broker"], env=env)
    broker_child.append(child)
    use_keys(monkeypatch, None, None)
    client = await ready_client(env, child)
    yield client, child
    await client.close()


async def test_public_only_tcp_serves_public_data_and_refuses_private(
    public_only: tuple[BrokerClient, Child],
) -> None:
    client, child = public_only
    await tickers_flow(client)
    with pytest.raises(BrokerError) as info:
        await client.subscribe_my_asset()
    assert info.value.code == "private_unavailable"
    assert (await client.health()).private is None  # no private link despite the API keys
    await async_wait_until(
        lambda: "public data only" in child.output(), scaled(10), what="the start-up warning"
    )
