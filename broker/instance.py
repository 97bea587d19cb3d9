"""One broker per endpoint: a second one refuses instead of stealing the sockets.

Two processes binding the same ``ipc://`` path silently steal it from each other, so
before binding the broker takes an exclusive ``flock`` on a lock file next to the
control socket (or in the runtime directory for tcp endpoints). The kernel drops the
lock when the process dies, so a crashed broker never blocks the next start.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from broker.config import runtime_dir

__all__ = ["AlreadyRunning", "InstanceLock"]


class AlreadyRunning(RuntimeError):
    """Another broker holds these endpoints."""


def lock_path(control_endpoint: str) -> Path:
    """Where the lock for a control endpoint lives."""
    scheme, _, rest = control_endpoint.partition("://")
    if scheme == "ipc":
        return Path(rest + ".lock")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", rest)
    return runtime_dir() / f"{scheme}-{safe}.lock"


class InstanceLock:
    """An exclusive, crash-safe lock on the broker's control endpoint."""

    def __init__(self, control_endpoint: str) -> None:
        self.endpoint = control_endpoint
        self.path = lock_path(control_endpoint)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning naming the other broker's pid."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another upbit-broker (pid {other}) is already serving {self.endpoint}; "
                "stop it, or point UPBIT_BROKER_CONTROL and UPBIT_BROKER_DATA elsewhere"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the kernel does it too if the process dies)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
