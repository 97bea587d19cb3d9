"""The command line: bad configuration stops the broker with a clear message; bans; the
operator's views of a running broker (status, tail, clients), --json, --version, --help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import pytest

from broker.ratelimit import MAX_BAN_SECONDS
from clients import SyncBrokerClient
from tests.integration.conftest import BrokerProc, Sim
from tests.support import ROOT, Child, scaled, short_tmpdir, wait_until


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


# ---------------------------------------------------------------- status, tail, clients


def cli(broker: BrokerProc, *args: str) -> subprocess.CompletedProcess[str]:
    """``upbit-broker ARGS`` against the running test broker."""
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        env={**os.environ, **broker.env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )


def test_version_prints_the_package_version() -> None:
    result = run_broker("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"upbit-broker {version('upbit-broker')}"


@pytest.mark.parametrize("command", ["status", "tail", "clients"])
def test_each_operator_command_has_its_own_help(command: str) -> None:
    result = run_broker(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: upbit-broker {command}")
    assert "--json" in result.stdout
    assert "--timeout" in result.stdout


def test_the_main_help_names_every_command() -> None:
    result = run_broker("--help")
    assert result.returncode == 0
    for command in ("run", "health", "metrics", "ban", "status", "tail", "clients"):
        assert command in result.stdout


def test_status_without_a_broker_fails_within_the_timeout() -> None:
    started = time.monotonic()
    result = run_broker("status", "--timeout", "0.5")
    assert result.returncode == 1
    assert "no broker answered" in result.stderr
    assert time.monotonic() - started < scaled(15)


def test_status_shows_links_streams_and_clients(broker: BrokerProc) -> None:
    with SyncBrokerClient(name="status-test") as client:
        sub = client.subscribe_ticker(["KRW-BTC", "KRW-ETH"])
        wait_until(lambda: sub.received >= 2, 15, what="tickers")
        result = cli(broker, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("broker    HEALTHY")
    public = next(line for line in lines if line.startswith("public "))
    assert public.split()[1:3] == ["up", "websocket"]
    assert next(line for line in lines if line.startswith("private ")).split()[1] == "off"
    assert any(line.startswith("streams   2 held") for line in lines), result.stdout


def test_status_shows_a_dropped_link_as_down_and_says_why(broker: BrokerProc, sim: Sim) -> None:
    with SyncBrokerClient(name="status-down-test") as client:
        sub = client.subscribe_ticker("KRW-BTC")
        wait_until(lambda: sub.received >= 1, 15, what="a ticker")
        sim.control("refuse_upgrades", {"seconds": 30, "status": 429})
        sim.control("drop", {"path": "/websocket/v1"})
        wait_until(lambda: client.health().public.state != "up", 10, what="the link to drop")
        result = cli(broker, "status")
        as_json = cli(broker, "status", "--json")
        sim.control("reset", {})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("broker    DEGRADED")
    public = next(line for line in lines if line.startswith("public "))
    assert public.split()[1].startswith("down"), public
    assert any(line.startswith("  why: public link down") for line in lines), result.stdout
    report = json.loads(as_json.stdout)
    assert report["status"] == "degraded"
    assert report["reasons"]
    assert report["reasons"][0].startswith("public link")


def test_status_json_parses_with_iso_timestamps(broker: BrokerProc) -> None:
    with SyncBrokerClient(name="status-json-test") as client:
        sub = client.subscribe_ticker("KRW-BTC")
        wait_until(lambda: sub.received >= 1, 15, what="a ticker")
        result = cli(broker, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "healthy"
    assert report["reasons"] == []
    assert report["health"]["public"]["state"] == "up"
    for stamp in (report["time"], report["health"]["public"]["since"]):
        assert datetime.fromisoformat(stamp).tzinfo is not None
    assert "status-json-test" in {row["name"] for row in report["clients"]}


def test_clients_lists_each_client_in_a_table_and_as_json(broker: BrokerProc) -> None:
    with SyncBrokerClient(name="listed-client") as client:
        client.subscribe_trade(["KRW-BTC", "KRW-ETH", "KRW-XRP"])
        table = cli(broker, "clients")
        as_json = cli(broker, "clients", "--json")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["CLIENT", "NAME", "STREAMS"]
    mine = next(row for row in rows if "listed-client" in row)
    assert mine.split()[2] == "3"
    assert header.index("STREAMS") + len("STREAMS") == mine.index(" 3 ") + 2  # aligned right
    listed = json.loads(as_json.stdout)
    row = next(r for r in listed if r["name"] == "listed-client")
    assert row["streams"] == 3
    assert datetime.fromisoformat(row["last_seen"]).tzinfo is not None


def test_tail_prints_live_messages_and_exits_0_on_ctrl_c(broker: BrokerProc) -> None:
    tail = Child("tail", ["-m", "broker", "tail", "ticker", "KRW-BTC", "KRW-ETH"], broker.env)
    try:
        header = tail.read_line(30)
        assert header.split() == ["TIME", "CODE", "SRC", "PRICE", "CHANGE", "%", "VOLUME", "24H"]
        seen: set[str] = set()
        while len(seen) < 2:
            line = tail.read_line(30)
            assert line, f"tail ended early\n{tail.output()}"
            if "--" not in line:
                seen.add(line.split()[1])
                assert len(line) >= len(header) - 2, line  # aligned under the header
        assert seen == {"KRW-BTC", "KRW-ETH"}
        tail.signal(signal.SIGINT)
        assert tail.proc.wait(timeout=scaled(15)) == 0, tail.output()
        assert "Traceback" not in tail.output()
    finally:
        tail.stop()


def test_tail_json_stops_after_count_with_parseable_lines(broker: BrokerProc) -> None:
    result = cli(broker, "tail", "trade", "KRW-BTC", "--json", "--count", "3")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    data = [line for line in lines if line["data"]["type"] == "trade"]
    assert len(data) == 3
    assert {line["topic"] for line in data} == {"trade/KRW-BTC/"}
    assert all(datetime.fromisoformat(line["time"]).tzinfo is not None for line in data)


def test_tail_refuses_an_unknown_type_without_a_traceback(broker: BrokerProc) -> None:
    result = cli(broker, "tail", "quotes", "KRW-BTC")
    assert result.returncode == 2
    assert "unknown type 'quotes'" in result.stderr
    assert "Traceback" not in result.stderr
