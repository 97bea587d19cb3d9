"""CURVE keys of a tcp bus: the ``upbit-broker keys`` command, and the broker's CURVE server.

On tcp anyone on the network may reach the broker's sockets, so they are CURVE servers:
the handshake proves the broker's key to each client, and a ZAP handler
(:class:`zmq.auth.thread.ThreadAuthenticator`) lets in only the public keys in the
allow-list (:class:`broker.config.CurveLayout`). Key files are 0600 and directories
0700; secret keys are never printed, only the path of the file holding one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from broker.config import CurveLayout, curve_dir
from schemas.trust import CLIENT_CERT_ENV, SERVER_KEY_ENV

__all__ = ["KeysError", "add_client", "init_server", "list_keys", "main", "revoke", "serve_curve"]

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class KeysError(Exception):
    """A keys command cannot do what was asked; the message says why and what to run."""


@contextmanager
def _private_files() -> Iterator[None]:
    """Files and directories made inside are readable by this user alone from the start."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _make_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise KeysError(f"{path} is not a directory of its own (a symbolic link?)")
    path.chmod(0o700)


def init_server(layout: CurveLayout) -> bytes:
    """Create the broker's certificate (if absent) and the allow-list; its public key."""
    with _private_files():
        _make_dir(layout.root)
        _make_dir(layout.allowed)
        if not layout.server_secret.exists():
            zmq.auth.create_certificates(layout.root, "server")
        for path in (layout.server_public, layout.server_secret):
            path.chmod(0o600)
    public, _ = zmq.auth.load_certificate(layout.server_public)
    return public


def server_public_key(layout: CurveLayout) -> bytes:
    """The broker's public key (z85), or KeysError saying to run ``keys init``."""
    if not layout.server_public.is_file():
        raise KeysError(f"no server certificate in {layout.root}: run `upbit-broker keys init`")
    public, _ = zmq.auth.load_certificate(layout.server_public)
    return public


def add_client(layout: CurveLayout, name: str) -> Path:
    """Make a key pair for client ``name`` and allow its public key; the secret cert's path."""
    if not _NAME.fullmatch(name):
        raise KeysError(f"client name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    server_public_key(layout)
    allowed = layout.allowed / f"{name}.key"
    if allowed.exists():
        raise KeysError(f"client {name!r} is already allowed: `upbit-broker keys revoke {name}`")
    with _private_files():
        _make_dir(layout.allowed)
        _make_dir(layout.clients)
        public_file, secret_file = zmq.auth.create_certificates(layout.clients, name)
        shutil.copyfile(public_file, allowed)
        for path in (Path(public_file), Path(secret_file), allowed):
            path.chmod(0o600)
    return Path(secret_file)


def revoke(layout: CurveLayout, name: str) -> None:
    """Take client ``name`` off the allow-list (its key pair is deleted too)."""
    allowed = layout.allowed / f"{name}.key"
    if not _NAME.fullmatch(name) or not allowed.is_file():
        raise KeysError(f"no allowed client {name!r} in {layout.allowed}")
    allowed.unlink()
    for suffix in (".key", ".key_secret"):
        (layout.clients / f"{name}{suffix}").unlink(missing_ok=True)


def list_keys(layout: CurveLayout) -> list[str]:
    """One line per key: the server's, then each allowed client's name and public key."""
    lines = [f"server {server_public_key(layout).decode()}"]
    if layout.allowed.is_dir():
        for path in sorted(layout.allowed.glob("*.key")):
            public, _ = zmq.auth.load_certificate(path)
            lines.append(f"client {path.stem} {public.decode()}")
    return lines


def serve_curve(
    ctx: zmq.Context[Any], layout: CurveLayout, sockets: Iterable[zmq.Socket[Any]]
) -> ThreadAuthenticator:
    """Make ``sockets`` CURVE servers letting in only the allow-list; call before binding.

    The allow-list is read now: restart the broker after adding or revoking a client.
    Stop the returned authenticator when the sockets are closed.
    """
    public, secret = zmq.auth.load_certificate(layout.server_secret)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(layout.allowed))
    for sock in sockets:
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    return auth


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upbit-broker keys",
        description="CURVE keys for a broker on tcp (in UPBIT_BROKER_CURVE_DIR).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("init", help="create the server certificate if absent; print its public key")
    client = sub.add_parser(
        "client", help="create a client key pair, allow it, print the client's variables"
    )
    client.add_argument("name")
    revoke_cmd = sub.add_parser("revoke", help="take a client off the allow-list")
    revoke_cmd.add_argument("name")
    sub.add_parser("list", help="print the server's and each allowed client's public key")
    return parser


def main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """``upbit-broker keys ...``; returns the exit status."""
    args = _parser().parse_args(argv)
    layout = CurveLayout(curve_dir(env))
    try:
        if args.action == "init":
            print(init_server(layout).decode())
        elif args.action == "client":
            secret_file = add_client(layout, args.name)
            print(f"{SERVER_KEY_ENV}={server_public_key(layout).decode()}")
            print(f"{CLIENT_CERT_ENV}={secret_file}")
            print(
                f"upbit-broker keys: copy {secret_file} to the client (it is secret) and "
                "restart the broker to let it in",
                file=sys.stderr,
            )
        elif args.action == "revoke":
            revoke(layout, args.name)
            print("upbit-broker keys: restart the broker to shut it out", file=sys.stderr)
        else:
            print("\n".join(list_keys(layout)))
    except (KeysError, OSError, ValueError) as exc:
        print(f"upbit-broker keys: {exc}", file=sys.stderr)
        return 1
    return 0
