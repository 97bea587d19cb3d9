"""The trust boundary of the bus: who may reach the broker's sockets, checked the same way
by the broker (before and after it binds) and by its clients (before every connect).

The broker is shared by every program of a machine, and libzmq 4.3.5 aborts a ROUTER
process when a peer claims the routing id it is about to generate, so only those who
could already stop the broker may reach its sockets:

* ``ipc://PATH``: the socket's directory must be a real directory (not a symlink) owned
  by this user or root, and not writable by group or others unless sticky (``/tmp``);
  an existing socket file must be a real socket (not a symlink) owned by this user.
  An abstract socket (``ipc://@name``) has no owner at all, so it is refused.
* ``tcp://``: only with ZeroMQ CURVE (the broker's keys, an allow-list of clients); the
  variables below name the client's side of it.
* ``inproc://``: inside one process, nothing to check.

:func:`ipc_problem` only looks (``os.lstat``, never following a link) and returns what
is wrong, so each side raises its own error.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final, NamedTuple

__all__ = [
    "CLIENT_CERT_ENV",
    "SERVER_KEY_ENV",
    "Untrusted",
    "ipc_dir_problem",
    "ipc_path",
    "ipc_problem",
    "ipc_socket_problem",
    "is_tcp",
]

SERVER_KEY_ENV: Final = "UPBIT_BROKER_SERVER_KEY"
"""The broker's CURVE public key for a client: z85 text, or the path of its public cert."""
CLIENT_CERT_ENV: Final = "UPBIT_BROKER_CLIENT_CERT"
"""Path of the client's secret CURVE certificate (``zmq.auth`` format)."""


class Untrusted(NamedTuple):
    """Why an ipc path may lead to someone other than the broker."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def is_tcp(endpoint: str) -> bool:
    """True for a ``tcp://`` endpoint (reachable from other users and machines)."""
    return endpoint.startswith("tcp://")


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an ``ipc://`` endpoint (absolute), None for other schemes."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "ipc":
        return None
    return rest if rest.startswith("@") else os.path.abspath(rest)


def ipc_dir_problem(path: str, uid: int) -> Untrusted | None:
    """What is wrong with ``path`` as the directory of the bus sockets, if anything.

    A missing directory is no problem yet (nothing listens there); the check runs again
    before each bind and connect.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return Untrusted(path, "the directory is a symbolic link (it may lead anywhere)")
    if not stat.S_ISDIR(info.st_mode):
        return Untrusted(path, "is not a directory")
    if info.st_uid not in (uid, 0):
        return Untrusted(path, f"the directory belongs to another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        return Untrusted(
            path,
            "the directory is writable by other users and not sticky "
            "(they could replace the socket)",
        )
    return None


def ipc_socket_problem(path: str, uid: int) -> Untrusted | None:
    """What is wrong with an existing socket file at ``path`` (a missing one is fine)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return Untrusted(path, "the socket is a symbolic link (it may lead to an impostor)")
    if not stat.S_ISSOCK(info.st_mode):
        return Untrusted(path, "is not a socket")
    if info.st_uid != uid:
        return Untrusted(
            path,
            f"the socket belongs to another user (uid {info.st_uid}): an impostor may be listening",
        )
    return None


def ipc_problem(endpoint: str, uid: int | None = None) -> Untrusted | None:
    """What is wrong with an ``ipc://`` endpoint's directory or socket; None if nothing is
    (or if the endpoint is not ipc). ``uid`` defaults to this process's user."""
    path = ipc_path(endpoint)
    if path is None:
        return None
    if path.startswith("@"):
        return Untrusted(path, "an abstract socket has no owner: any local user can bind it")
    uid = os.getuid() if uid is None else uid
    return ipc_dir_problem(str(Path(path).parent), uid) or ipc_socket_problem(path, uid)
