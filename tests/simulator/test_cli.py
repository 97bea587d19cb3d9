"""The ``python -m simulator`` process: first stdout line, serving, clean shutdown."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

from tests.simulator.conftest import SimulatorProcess


def test_first_line_is_json_urls_and_the_process_is_reaped(
    sim_process: Callable[..., SimulatorProcess],
) -> None:
    child = sim_process("--rate", "5", env={"UPBIT_ACCESS_KEY": "cli-key"})
    urls = child.urls
    assert set(urls) >= {"rest", "ws", "ws_private", "control", "pid"}
    assert urls["pid"] == child.pid
    assert urls["rest"].startswith("http://127.0.0.1:")
    port = urls["rest"].rsplit(":", 1)[1]
    assert urls["ws"].startswith("ws://127.0.0.1:")
    ws_port = urls["ws"].removeprefix("ws://127.0.0.1:").removesuffix("/websocket/v1")
    assert ws_port.isdigit()
    assert ws_port != port  # --port 0: a free port for each server
    assert urls["ws_private"] == f"ws://127.0.0.1:{ws_port}/websocket/v1/private"
    assert urls["control"] == f"http://127.0.0.1:{port}/_sim"
    with urllib.request.urlopen(urls["rest"] + "/v1/market/all", timeout=10) as resp:
        assert len(json.loads(resp.read())) == 300
    with urllib.request.urlopen(urls["control"], timeout=10) as resp:
        info = json.loads(resp.read())
    assert info["config"]["rate"] == 5.0
    assert info["config"]["access_key"] == "cli-key"
    assert "secret_key" not in info["config"]
    assert child.close() == 0  # SIGTERM: a clean shutdown
    assert not child.alive()
    assert "simulator_started" in child.output() or child.output() == ""
