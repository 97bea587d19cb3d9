"""The monitoring endpoint on a fake broker: what /metrics exposes (parsed by
prometheus_client), /health's status codes, loopback rules and the UPBIT_BROKER_HTTP
setting."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.config import ConfigError, Settings
from broker.http import BrokerCollector, MonitorServer, is_loopback
from broker.ports import MonitorCounters
from schemas.bus import ClientMetrics, ConnectionHealth, HandlerMetrics, Health, Metrics


def _link(state: str) -> ConnectionHealth:
    return ConnectionHealth(
        state=state,
        source="rest" if state == "down" else "websocket",
        since=1.0,
        reconnects=2,
        last_message_timestamp=None if state == "down" else 1e12,
        carried_streams=4,
        requests_left=80 if state == "up" else None,
    )


@dataclass
class FakeBroker:
    """A :class:`broker.ports.Monitored` with fixed answers."""

    status: Literal["healthy", "degraded", "critical"] = "healthy"
    clients: list[ClientMetrics] = field(default_factory=list)

    def health(self) -> Health:
        return Health(
            status=self.status,
            uptime_seconds=60.0,
            last_message_timestamp=None,
            connection_quality="excellent",
            active_subscriptions=4,
            public=_link("up" if self.status == "healthy" else "down"),
            private=_link("up"),
            epoch="e",
        )

    def metrics(self) -> Metrics:
        return Metrics(
            active_connections=2,
            total_subscriptions=5,
            messages_per_second=12.5,
            average_latency_ms=3.0,
            error_rate_percent=1.0,
            memory_usage_mb=50.0,
            messages_total=1000,
            clients=self.clients,
            handlers=[HandlerMetrics("spread", ["orderbook"], 10, 2, 1)],
            published_messages=900,
            published_frames=300,
        )

    def counters(self) -> MonitorCounters:
        return MonitorCounters(
            messages_by_type={"ticker": 600, "orderbook": 400},
            rest_calls={"ticker": 7, "market": 1},
            rest_waits={"ticker": 2},
            rest_wait_seconds={"ticker": 0.5},
            rest_throttled={("ticker", 429): 3, ("ticker", 418): 1},
            upstream_errors={"public": 1, "private": 0},
            decode_errors=4,
            duplicates=5,
            send_errors=0,
        )


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(source: FakeBroker) -> Samples:
    registry = CollectorRegistry()
    registry.register(BrokerCollector(source))
    found: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def one(samples: Samples, metric: str, **labels: str) -> float:
    rows = [v for got, v in samples[metric] if got == labels]
    assert len(rows) == 1, (metric, labels, samples[metric])
    return rows[0]


def test_the_original_six_are_exposed_in_base_units() -> None:
    s = scrape(FakeBroker())
    assert one(s, "upbit_broker_active_connections") == 2
    assert one(s, "upbit_broker_subscriptions") == 5
    assert one(s, "upbit_broker_messages_per_second") == 12.5
    assert one(s, "upbit_broker_average_latency_seconds") == 0.003
    assert one(s, "upbit_broker_error_ratio") == 0.01
    assert one(s, "upbit_broker_memory_bytes") == 50 * 2**20


def test_counters_end_in_total_and_carry_bounded_labels() -> None:
    s = scrape(FakeBroker())
    assert one(s, "upbit_broker_messages_received_total", type="orderbook") == 400
    assert one(s, "upbit_broker_rest_requests_total", group="ticker") == 7
    assert one(s, "upbit_broker_rest_waits_total", group="ticker") == 2
    assert one(s, "upbit_broker_rest_wait_seconds_total", group="ticker") == 0.5
    assert one(s, "upbit_broker_rest_throttled_total", group="ticker", code="429") == 3
    assert one(s, "upbit_broker_rest_throttled_total", group="ticker", code="418") == 1
    assert one(s, "upbit_broker_link_reconnects_total", link="private") == 2
    assert one(s, "upbit_broker_upstream_errors_total", link="public") == 1
    assert one(s, "upbit_broker_handler_messages_total", handler="spread", outcome="error") == 1
    assert one(s, "upbit_broker_decode_errors_total") == 4


def test_link_state_health_and_fallback_are_one_hot_gauges() -> None:
    s = scrape(FakeBroker(status="degraded"))
    rows = s["upbit_broker_link_state"]
    states = {labels["state"]: v for labels, v in rows if labels["link"] == "public"}
    assert states == {"idle": 0, "connecting": 0, "up": 0, "down": 1, "auth_failed": 0}
    assert one(s, "upbit_broker_health_status", status="degraded") == 1
    assert one(s, "upbit_broker_health_status", status="healthy") == 0
    assert one(s, "upbit_broker_fallback_active", link="public") == 1
    assert one(s, "upbit_broker_fallback_active", link="private") == 0
    assert one(s, "upbit_broker_link_requests_left", link="private") == 80
    # A link that never received anything has no age (rather than a made-up one).
    ages = {labels["link"] for labels, _ in s["upbit_broker_link_last_message_age_seconds"]}
    assert ages == {"private"}


def test_clients_are_labelled_by_their_opaque_id_only() -> None:
    client = ClientMetrics("0123456789abcdef", "trader", 3, 500, 2, 40.0, 0.5, dropped=7)
    s = scrape(FakeBroker(clients=[client]))
    assert one(s, "upbit_broker_clients") == 1
    assert one(s, "upbit_broker_client_lag_seconds", client=client.client_id) == 0.04
    assert one(s, "upbit_broker_client_gaps_total", client=client.client_id) == 2
    assert one(s, "upbit_broker_client_dropped_total", client=client.client_id) == 7
    assert one(s, "upbit_broker_client_streams", client=client.client_id) == 3
    assert one(s, "upbit_broker_client_info", client=client.client_id, name="trader") == 1


@pytest.mark.parametrize(
    ("status", "code"), [("healthy", 200), ("degraded", 200), ("critical", 503)]
)
async def test_health_answers_the_status_with_its_reasons(status: str, code: int) -> None:
    broker = FakeBroker(status=status)  # type: ignore[arg-type]
    server = MonitorServer(broker, "127.0.0.1", 0)
    await server.start()
    try:
        assert server.address is not None
        base = f"http://127.0.0.1:{server.address[1]}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/health") as response:
                assert response.status == code
                body = await response.json()
            async with session.get(f"{base}/metrics") as response:
                assert response.status == 200
                text = await response.text()
    finally:
        await server.close()
    assert body["status"] == status
    assert body["health"]["status"] == status
    assert bool(body["reasons"]) == (status != "healthy")
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"upbit_broker_active_connections", "process_resident_memory_bytes"} <= names


async def test_a_taken_port_fails_to_start_with_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MonitorServer(FakeBroker(), "127.0.0.1", taken.getsockname()[1])
        with pytest.raises(OSError, match="address already in use"):
            await server.start()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("192.168.1.10", False), ("example.org", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# ---------------------------------------------------------------- UPBIT_BROKER_HTTP


def settings(value: str | None) -> Settings:
    env = {"UPBIT_BROKER_CONTROL": "tcp://127.0.0.1:1", "UPBIT_BROKER_DATA": "tcp://127.0.0.1:2"}
    env["UPBIT_BROKER_TCP_PUBLIC_ONLY"] = "1"  # tcp without CURVE keys must say so
    env["UPBIT_BROKER_STATE_DIR"] = "/nonexistent-state"
    if value is not None:
        env["UPBIT_BROKER_HTTP"] = value
    return Settings.from_env(env)


@pytest.mark.parametrize(
    ("value", "endpoint"),
    [
        (None, None),
        ("", None),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("9464", ("127.0.0.1", 9464)),
        (":9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_the_http_setting_is_off_by_default_and_loopback_for_a_bare_port(
    value: str | None, endpoint: tuple[str, int] | None
) -> None:
    assert settings(value).http_endpoint == endpoint


@pytest.mark.parametrize("value", ["127.0.0.1", "host:port", "127.0.0.1:70000", "::1:9464"])
def test_a_bad_http_setting_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="UPBIT_BROKER_HTTP"):
        settings(value)
