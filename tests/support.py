"""Test helpers: deadlines instead of sleeps, and child processes that are always reaped.

``TIME_SCALE`` (env ``UPBIT_TEST_TIME_SCALE``, default 1) multiplies every deadline so
the suite can be slowed down as a whole on a loaded machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

TIME_SCALE = float(os.environ.get("UPBIT_TEST_TIME_SCALE", "1"))
ROOT = Path(__file__).resolve().parents[1]


def scaled(seconds: float) -> float:
    """A deadline in seconds, scaled for slow machines."""
    return seconds * TIME_SCALE


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {scaled(timeout):.1f} s waiting for {what or predicate}"
            )
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """Async variant of :func:`wait_until`; the predicate may be a coroutine function."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {scaled(timeout):.1f} s waiting for {what or predicate}"
            )
        await asyncio.sleep(interval)


def short_tmpdir(prefix: str = "ub-") -> Path:
    """A short directory for ipc sockets (ipc paths are limited to 107 characters)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Child:
    """A child process whose output goes to files, shown when the test fails."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: Mapping[str, str] | None = None,
        *,
        read_first_line: bool = False,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.logdir = short_tmpdir(f"{name}-")
        self._stderr: IO[bytes] = open(self.logdir / "stderr", "wb")  # noqa: SIM115
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if read_first_line else open(self.logdir / "stdout", "wb"),  # noqa: SIM115
            stderr=self._stderr,
            env=full_env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.first_line: dict[str, Any] | None = None
        if read_first_line and not stdin:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                raise AssertionError(
                    f"{name} exited before printing its first line:\n{self.output()}"
                )
            self.first_line = json.loads(line)

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send a signal to the child."""
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; always reaps. Returns the exit code."""
        if self.alive():
            with _suppress():
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=scaled(timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stdin):
            if stream is not None:
                with _suppress():
                    stream.close()
        self._stderr.close()
        return self.proc.returncode

    def send_line(self, line: str) -> None:
        """Write one command line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read_line(self) -> str:
        """One line of the child's stdout (when started with ``read_first_line``)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode().strip()

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def output(self) -> str:
        """What the child wrote to stderr (and stdout when captured to a file)."""
        parts = []
        for stream in ("stdout", "stderr"):
            path = self.logdir / stream
            if path.exists():
                parts.append(
                    f"--- {self.name} {stream} ---\n{path.read_text(errors='replace')[-20000:]}"
                )
        return "\n".join(parts)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True
