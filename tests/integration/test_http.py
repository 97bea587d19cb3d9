"""The monitoring endpoint of a real broker: /metrics parses as Prometheus text and
/health follows an upstream outage and its recovery, with the matching HTTP status."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients import SyncBrokerClient
from tests.integration.conftest import BrokerProc, Sim, broker_env, run_broker_proc
from tests.support import ROOT, scaled, wait_until

PUBLIC = "/websocket/v1"
_URL = re.compile(r"monitoring endpoint listening.*?(http://127\.0\.0\.1:\d+)")


def monitor_url(broker: BrokerProc) -> str:
    """The URL the broker says it serves monitoring on (it bound port 0)."""

    def found() -> str:
        text = (broker.child.logdir / "stderr").read_text(errors="replace")
        match = _URL.search(text)
        return match.group(1) if match else ""

    return wait_until(found, 10, what="the monitoring endpoint's log line")


def get(url: str) -> tuple[int, str, str]:
    """``(status, content type, body)`` of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=scaled(10)) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def health(base: str) -> tuple[int, dict[str, Any]]:
    status, kind, body = get(f"{base}/health")
    assert kind.startswith("application/json")
    value: dict[str, Any] = json.loads(body)
    return status, value


Samples = dict[str, list[tuple[dict[str, str], float]]]
RECEIVED = "upbit_broker_messages_received_total"


def samples(base: str) -> Samples:
    """Every sample of a scrape, by sample name, parsed by prometheus_client."""
    status, kind, body = get(f"{base}/metrics")
    assert status == 200
    assert kind.startswith("text/plain")
    found: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(scrape: Samples, name: str, **labels: str) -> float:
    rows = [v for got, v in scrape.get(name, []) if all(got.get(k) == w for k, w in labels.items())]
    assert len(rows) == 1, f"{name}{labels}: {scrape.get(name)}"
    return rows[0]


@pytest.fixture
def monitored(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    """A public broker serving /metrics and /health on a loopback port of its choosing."""
    env = broker_env(sim, extra={"UPBIT_BROKER_HTTP": "127.0.0.1:0"})
    yield from run_broker_proc(env, monkeypatch)


def test_metrics_scrape_parses_and_counts_what_flows(monitored: BrokerProc) -> None:
    base = monitor_url(monitored)
    with SyncBrokerClient(name="metrics-test") as client:
        sub = client.subscribe_ticker(["KRW-BTC", "KRW-ETH"])
        wait_until(lambda: sub.received >= 3, 15, what="tickers")

        def counted() -> Samples:
            s = samples(base)
            tickers = [v for labels, v in s.get(RECEIVED, []) if labels == {"type": "ticker"}]
            return s if tickers and tickers[0] >= 3 and s.get("upbit_broker_clients") else {}

        scrape = wait_until(counted, 15, what="ticker messages counted in /metrics")
        metrics = client.metrics()
    # The original design's six, under Prometheus names.
    assert value(scrape, "upbit_broker_active_connections") == 1
    assert value(scrape, "upbit_broker_subscriptions") >= 2
    assert value(scrape, "upbit_broker_messages_per_second") >= 0
    assert value(scrape, "upbit_broker_average_latency_seconds") >= 0
    assert 0 <= value(scrape, "upbit_broker_error_ratio") <= 1
    assert value(scrape, "upbit_broker_memory_bytes") > 10 * 2**20
    # Links, REST, health.
    assert value(scrape, "upbit_broker_link_state", link="public", state="up") == 1
    assert value(scrape, "upbit_broker_link_last_message_age_seconds", link="public") < 10
    assert value(scrape, "upbit_broker_fallback_active", link="public") == 0
    assert value(scrape, "upbit_broker_link_reconnects_total", link="public") == 0
    assert value(scrape, "upbit_broker_rest_requests_total", group="market") >= 1
    assert value(scrape, "upbit_broker_health_status", status="healthy") == 1
    # Per client: the opaque id the broker gives, the same as in its metrics reply.
    ids = {row.client_id for row in metrics.clients}
    assert {labels["client"] for labels, _ in scrape["upbit_broker_client_streams"]} <= ids
    # Bounded labels: no market code anywhere.
    for rows in scrape.values():
        for labels, _ in rows:
            assert not any("KRW-" in v for v in labels.values()), labels


def test_health_follows_an_outage_and_the_recovery(monitored: BrokerProc, sim: Sim) -> None:
    base = monitor_url(monitored)
    with SyncBrokerClient(name="health-test") as client:
        sub = client.subscribe_ticker("KRW-BTC")
        wait_until(lambda: sub.received >= 1, 15, what="a ticker")
        status, body = health(base)
        assert (status, body["status"], body["reasons"]) == (200, "healthy", [])
        assert body["health"]["public"]["state"] == "up"

        sim.control("refuse_upgrades", {"seconds": 8, "status": 429})
        sim.control("drop", {"path": PUBLIC})
        status, body = wait_until(
            lambda: (h := health(base))[1]["status"] != "healthy" and h, 10, what="degraded"
        )
        # Degraded, not critical: data still flows (from REST); probes keep the broker.
        assert status == 200
        assert body["status"] == "degraded"
        assert any(r.startswith("public link") for r in body["reasons"]), body["reasons"]
        scrape = samples(base)
        assert value(scrape, "upbit_broker_health_status", status="degraded") == 1
        assert value(scrape, "upbit_broker_link_state", link="public", state="up") == 0

        status, body = wait_until(
            lambda: (h := health(base))[1]["status"] == "healthy" and h, 45, what="recovery"
        )
        assert (status, body["reasons"]) == (200, [])
        scrape = samples(base)
        assert value(scrape, "upbit_broker_link_reconnects_total", link="public") >= 1


def test_an_address_in_use_stops_the_broker_with_a_configuration_error(sim: Sim) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = broker_env(sim, extra={"UPBIT_BROKER_HTTP": f"127.0.0.1:{port}"})
        result = subprocess.run(
            [sys.executable, "-m", "broker"],
            env={**os.environ, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=scaled(60),
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert "UPBIT_BROKER_HTTP" in result.stderr
    assert "Traceback" not in result.stderr
