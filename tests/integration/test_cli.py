"""The command line: bad configuration stops the broker with a clear message; bans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from broker.ratelimit import MAX_BAN_SECONDS
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


def test_ban_shows_and_clears_the_remembered_bans(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    bans = state / "bans.json"
    now = time.time()
    bans.write_text(json.dumps({"ws-connect": now + 600, "rest:ticker": 1e300, "old": 10.0}))

    shown = run_broker("ban", UPBIT_BROKER_STATE_DIR=str(state))
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["file"] == str(bans)
    assert sorted(report["bans"]) == ["rest:ticker", "ws-connect"]  # the expired one is not
    assert 0 < report["bans"]["ws-connect"]["seconds_left"] <= 600
    assert 0 < report["bans"]["rest:ticker"]["seconds_left"] <= MAX_BAN_SECONDS  # capped
    assert json.loads(bans.read_text())["rest:ticker"] == 1e300  # showing changes nothing

    cleared = run_broker("ban", "--clear", UPBIT_BROKER_STATE_DIR=str(state))
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(cleared.stdout)["cleared"] == ["old", "rest:ticker", "ws-connect"]
    assert json.loads(cleared.stdout)["bans"] == {}
    assert json.loads(bans.read_text()) == {}

    again = run_broker("ban", UPBIT_BROKER_STATE_DIR=str(state))
    assert json.loads(again.stdout)["bans"] == {}


def test_ban_warns_about_a_corrupt_file_and_shows_no_ban(tmp_path: Path) -> None:
    (tmp_path / "bans.json").write_text("{not json")
    result = run_broker("ban", UPBIT_BROKER_STATE_DIR=str(tmp_path))
    assert result.returncode == 0
    assert json.loads(result.stdout)["bans"] == {}
    assert "ban file unreadable" in result.stderr
    assert "Traceback" not in result.stderr


def test_clear_goes_with_ban_only() -> None:
    result = run_broker("health", "--clear")
    assert result.returncode == 2
    assert "--clear" in result.stderr
