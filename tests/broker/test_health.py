"""Health as people and probes read it: the reasons it is not healthy, the HTTP status."""

from __future__ import annotations

from typing import Literal

from broker.health import CRITICAL_AFTER, health_reasons, http_status
from schemas.bus import ConnectionHealth, Health, Source

NOW = 1_800_000_000.0


def link(
    state: str, *, since: float = NOW - 5, source: Source = "websocket", reconnects: int = 0
) -> ConnectionHealth:
    return ConnectionHealth(
        state=state,
        source=source,
        since=since,
        reconnects=reconnects,
        last_message_timestamp=NOW - 1,
    )


def health(
    status: Literal["healthy", "degraded", "critical"],
    public: ConnectionHealth,
    private: ConnectionHealth | None = None,
) -> Health:
    return Health(
        status=status,
        uptime_seconds=100.0,
        last_message_timestamp=NOW - 1,
        connection_quality="excellent" if status == "healthy" else "poor",
        active_subscriptions=3,
        public=public,
        private=private,
        epoch="e",
    )


def test_a_healthy_broker_has_no_reasons_and_answers_200() -> None:
    h = health("healthy", link("up"), link("idle"))
    assert health_reasons(h, NOW) == []
    assert http_status(h) == 200


def test_a_down_link_served_by_rest_is_degraded_and_still_200() -> None:
    h = health("degraded", link("down", since=NOW - 12, source="rest", reconnects=1))
    assert health_reasons(h, NOW) == [
        "public link down for 12 s; data served by REST polling meanwhile"
    ]
    assert http_status(h) == 200


def test_a_link_retrying_after_a_loss_reads_as_down() -> None:
    h = health("degraded", link("up"), link("connecting", since=NOW - 3, reconnects=2))
    assert health_reasons(h, NOW) == [
        "private link down (reconnecting) for 3 s; no data until it reconnects"
    ]


def test_the_first_connection_reads_as_connecting() -> None:
    h = health("degraded", link("connecting", since=NOW - 1))
    assert health_reasons(h, NOW) == ["public link connecting for 1 s; no data until it reconnects"]


def test_rejected_keys_are_named_as_the_reason() -> None:
    h = health("degraded", link("up"), link("auth_failed"))
    assert health_reasons(h, NOW) == [
        "private link: Upbit rejected the API keys (no retries until fixed)"
    ]


def test_critical_says_so_and_answers_503() -> None:
    down_for = CRITICAL_AFTER + 10
    h = health("critical", link("down", since=NOW - down_for, reconnects=1))
    reasons = health_reasons(h, NOW)
    assert reasons[0].startswith(f"public link down for {down_for:.0f} s")
    assert reasons[-1] == f"public link down for more than {CRITICAL_AFTER:.0f} s"
    assert http_status(h) == 503
