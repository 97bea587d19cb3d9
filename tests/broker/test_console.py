"""The operator's views as text and JSON, from fixed health and metrics (no broker)."""

from __future__ import annotations

from datetime import datetime

from broker.console import (
    clients_json,
    render_clients,
    render_status,
    status_json,
    tail_header,
    tail_json,
    tail_row,
)
from schemas.bus import ClientMetrics, ConnectionHealth, Envelope, Health, Metrics, StatusEvent
from schemas.upbit import Trade

NOW = 1_800_000_000.0


def _health(public_state: str = "up") -> Health:
    public = ConnectionHealth(
        state=public_state,
        source="rest" if public_state != "up" else "websocket",
        since=NOW - 20,
        reconnects=1,
        last_message_timestamp=NOW - 0.5,
        carried_streams=3,
        requests_left=85,
    )
    return Health(
        status="healthy" if public_state == "up" else "degraded",
        uptime_seconds=3700,
        last_message_timestamp=NOW - 0.5,
        connection_quality="good",
        active_subscriptions=3,
        public=public,
        private=None,
        epoch="abc",
    )


def _metrics(*clients: ClientMetrics) -> Metrics:
    return Metrics(
        active_connections=1,
        total_subscriptions=4,
        messages_per_second=20.0,
        average_latency_ms=1.5,
        error_rate_percent=0.0,
        memory_usage_mb=40.0,
        messages_total=5000,
        clients=list(clients),
    )


CLIENT = ClientMetrics("0123456789abcdef", "trader", 12, 4000, 1, 2.5, 0.25, dropped=3)


def test_status_names_the_state_of_each_link_and_why_it_is_degraded() -> None:
    text = render_status(_health("down"), _metrics(CLIENT), NOW)
    lines = text.splitlines()
    assert lines[0].startswith("broker    DEGRADED  (up 1 h 1 min")
    assert lines[1] == "  why: public link down for 20 s; data served by REST polling meanwhile"
    public = next(line for line in lines if line.startswith("public "))
    assert public.split()[1:3] == ["down", "rest"]
    assert "0.5 s ago" in public
    assert next(line for line in lines if line.startswith("private ")).split()[1] == "off"


def test_a_link_retrying_after_a_loss_shows_as_down() -> None:
    text = render_status(_health("connecting"), _metrics(), NOW)
    public = next(line for line in text.splitlines() if line.startswith("public "))
    assert public.split()[1:3] == ["down,", "retrying"]


def test_status_json_keeps_iso_timestamps() -> None:
    report = status_json(_health("down"), _metrics(CLIENT), NOW)
    assert report["status"] == "degraded"
    assert report["reasons"] == ["public link down for 20 s; data served by REST polling meanwhile"]
    assert datetime.fromisoformat(report["time"]).timestamp() == NOW
    assert datetime.fromisoformat(report["health"]["public"]["since"]).timestamp() == NOW - 20
    assert report["clients"][0]["client_id"] == CLIENT.client_id
    assert "clients" not in report["metrics"]


def test_clients_table_aligns_numbers_right() -> None:
    other = ClientMetrics("fedcba9876543210", "a-much-longer-name", 3, 7, 0, 0.0, 1.0)
    header, first, second = render_clients(_metrics(CLIENT, other), NOW).splitlines()
    end = header.index("STREAMS") + len("STREAMS")
    assert first[:end].endswith(" 12")
    assert second[:end].endswith("  3")
    assert first.split()[1] == "trader"


def test_no_clients_says_so() -> None:
    assert render_clients(_metrics(), NOW) == "no clients connected"


def test_clients_json_has_an_iso_last_seen() -> None:
    (row,) = clients_json(_metrics(CLIENT), NOW)
    assert datetime.fromisoformat(row["last_seen"]).timestamp() == NOW - 0.25
    assert row["dropped"] == 3


TRADE = Trade(
    code="KRW-BTC",
    trade_price=139_996_000.0,
    trade_volume=0.0016032,
    ask_bid="ASK",
    prev_closing_price=1.0,
    change="RISE",
    change_price=1.0,
    trade_date="2027-01-15",
    trade_time="08:00:00",
    trade_timestamp=1,
    timestamp=1,
    sequential_id=1,
)


def test_tail_rows_line_up_under_the_header_and_show_prices_in_full() -> None:
    header = tail_header("trade")
    env = Envelope("trade/KRW-BTC/", 7, "e", int(NOW * 1e9), "websocket", TRADE)
    row = tail_row(env)
    assert row.split()[1:] == ["KRW-BTC", "ws", "ASK", "139,996,000", "0.0016032"]
    assert len(row) == len(header)
    assert header.index("VOLUME") + len("VOLUME") == row.index("0.0016032") + len("0.0016032")


def test_tail_shows_status_events_between_the_data() -> None:
    event = StatusEvent(connection="public", state="down", detail="connection lost", timestamp=1)
    row = tail_row(Envelope("trade/KRW-BTC/", 8, "e", int(NOW * 1e9), "websocket", event))
    assert row.endswith("-- status    public: down (connection lost)")


def test_tail_json_carries_the_envelope_with_an_iso_time() -> None:
    env = Envelope("trade/KRW-BTC/", 7, "e", int(NOW * 1e9), "rest", TRADE)
    line = tail_json(env)
    assert (line["topic"], line["seq"], line["source"]) == ("trade/KRW-BTC/", 7, "rest")
    assert line["data"]["trade_price"] == 139_996_000.0
    assert datetime.fromisoformat(line["time"]).timestamp() == NOW
