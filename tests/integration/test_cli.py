"""The command line: bad configuration stops the broker with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import ROOT, scaled, short_tmpdir


def run_broker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    rundir = short_tmpdir("ubcli-")
    full = {
        **os.environ,
        "XDG_RUNTIME_DIR": str(rundir),
        "UPBIT_BROKER_CONTROL": f"ipc://{rundir}/c",
        "UPBIT_BROKER_DATA": f"ipc://{rundir}/d",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )


def test_a_bad_value_stops_the_broker_naming_the_variable() -> None:
    result = run_broker(UPBIT_WS_URL="http://example.invalid/ws")
    assert result.returncode == 2
    assert "UPBIT_WS_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_key_without_the_other_is_refused_without_echoing_it() -> None:
    secret = "do-not-print-me-0123456789"
    result = run_broker(UPBIT_ACCESS_KEY=secret, UPBIT_SECRET_KEY="")
    assert result.returncode == 2
    assert "UPBIT_SECRET_KEY" in result.stderr
    assert secret not in result.stderr + result.stdout


def test_health_without_a_running_broker_says_so_in_one_line() -> None:
    result = run_broker("health")
    assert result.returncode == 1
    assert "no broker answered" in result.stderr
    assert "Traceback" not in result.stderr
