"""broker.keys: the ``keys`` command makes private files, allows clients, prints no secret."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq.auth

from broker.config import CurveLayout
from broker.keys import main


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run(capsys: pytest.CaptureFixture[str], root: Path, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv), {"UPBIT_BROKER_CURVE_DIR": str(root)})
    out, err = capsys.readouterr()
    return status, out, err


def test_init_makes_a_private_server_certificate_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = CurveLayout(tmp_path / "curve")
    status, out, _ = run(capsys, layout.root, "init")
    public, secret = zmq.auth.load_certificate(layout.server_secret)
    assert status == 0
    assert out.strip() == public.decode()
    assert secret is not None
    assert secret.decode() not in out
    assert mode(layout.root) == mode(layout.allowed) == 0o700
    assert mode(layout.server_secret) == mode(layout.server_public) == 0o600
    assert run(capsys, layout.root, "init")[1] == out  # the same key again, not a new one


def test_client_allows_a_new_key_and_prints_the_two_variables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = CurveLayout(tmp_path / "curve")
    server = run(capsys, layout.root, "init")[1].strip()
    status, out, err = run(capsys, layout.root, "client", "trader")
    cert = layout.clients / "trader.key_secret"
    public, secret = zmq.auth.load_certificate(cert)
    assert status == 0
    assert out.splitlines() == [
        f"UPBIT_BROKER_SERVER_KEY={server}",
        f"UPBIT_BROKER_CLIENT_CERT={cert}",
    ]
    assert secret is not None
    assert secret.decode() not in out + err
    assert zmq.auth.load_certificate(layout.allowed / "trader.key")[0] == public
    assert mode(cert) == mode(layout.allowed / "trader.key") == 0o600
    assert mode(layout.clients) == 0o700
    listed = run(capsys, layout.root, "list")[1].splitlines()
    assert listed == [f"server {server}", f"client trader {public.decode()}"]


def test_client_refuses_a_bad_name_a_duplicate_and_a_missing_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "curve"
    status, _, err = run(capsys, root, "client", "a")
    assert status == 1
    assert "keys init" in err
    run(capsys, root, "init")
    assert run(capsys, root, "client", "../evil")[0] == 1
    assert run(capsys, root, "client", "a")[0] == 0
    status, _, err = run(capsys, root, "client", "a")
    assert status == 1
    assert "already allowed" in err


def test_revoke_takes_a_client_off_the_allow_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = CurveLayout(tmp_path / "curve")
    run(capsys, layout.root, "init")
    run(capsys, layout.root, "client", "a")
    assert run(capsys, layout.root, "revoke", "a")[0] == 0
    assert not (layout.allowed / "a.key").exists()
    assert not (layout.clients / "a.key_secret").exists()
    assert run(capsys, layout.root, "revoke", "a")[0] == 1
