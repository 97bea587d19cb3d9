"""Client liveness: heartbeat expiry at interval x liveness, identity and counters."""

from __future__ import annotations

from broker.liveness import ClientTable
from schemas.bus import ClientMetrics

INTERVAL = 1.0
LIVENESS = 3


def test_a_client_expires_only_after_interval_times_liveness_of_silence() -> None:
    table = ClientTable()
    table.add("a", 100.0, name="bot", pid=42)
    assert table.expired(103.0, INTERVAL, LIVENESS) == []  # exactly 3 s: still alive
    assert table.expired(103.001, INTERVAL, LIVENESS) == ["a"]


def test_any_message_keeps_a_client_alive() -> None:
    table = ClientTable()
    table.add("a", 0.0)
    assert table.touch("a", 2.5)
    assert table.expired(5.0, INTERVAL, LIVENESS) == []
    assert table.expired(5.6, INTERVAL, LIVENESS) == ["a"]


def test_expired_lists_the_longest_silent_first_and_removes_nothing() -> None:
    table = ClientTable()
    table.add("late", 5.0)
    table.add("early", 1.0)
    table.add("fresh", 9.0)
    assert table.expired(10.0, INTERVAL, LIVENESS) == ["early", "late"]
    assert len(table) == 3
    assert table.remove("early") is not None
    assert table.expired(10.0, INTERVAL, LIVENESS) == ["late"]


def test_messages_from_unknown_clients_are_reported_as_unknown() -> None:
    table = ClientTable()
    assert not table.known("ghost")
    assert not table.touch("ghost", 1.0)
    assert not table.report("ghost", 1, 0, 0.0)
    assert not table.heartbeat("ghost", 1.0)
    assert "ghost" not in table
    assert table.remove("ghost") is None


def test_heartbeats_refresh_and_carry_the_clients_counters() -> None:
    table = ClientTable()
    table.add("a", 0.0, name="strategy", pid=7)
    assert table.heartbeat("a", 2.0, received=1_000, gaps=2, lag_ms=1.5)
    info = table.get("a")
    assert info is not None
    assert (info.received, info.gaps, info.lag_ms, info.heartbeats) == (1_000, 2, 1.5, 1)
    assert info.last_seen == 2.0


def test_report_stores_counters_without_refreshing_last_seen() -> None:
    table = ClientTable()
    table.add("a", 0.0)
    assert table.report("a", 10, 1, 0.25)
    info = table.get("a")
    assert info is not None
    assert (info.received, info.last_seen) == (10, 0.0)


def test_a_repeated_hello_updates_identity_but_keeps_history() -> None:
    table = ClientTable()
    assert table.add("a", 0.0, name="old", pid=1)
    table.report("a", 5, 0, 0.0)
    assert not table.add("a", 4.0, name="new", pid=2)
    info = table.get("a")
    assert info is not None
    assert (info.name, info.pid, info.first_seen, info.last_seen, info.received) == (
        "new",
        2,
        0.0,
        4.0,
        5,
    )


def test_a_late_timestamp_never_moves_last_seen_back() -> None:
    table = ClientTable()
    table.add("a", 10.0)
    table.touch("a", 9.0)
    info = table.get("a")
    assert info is not None
    assert info.last_seen == 10.0


def test_each_client_yields_a_metrics_row() -> None:
    table = ClientTable()
    table.add("b", 0.0, name="second")
    table.add("a", 1.0, name="first")
    table.heartbeat("a", 2.0, received=9, gaps=1, lag_ms=3.0)
    assert [info.client_id for info in table.all()] == ["b", "a"]
    assert [info.client_id for info in table] == ["b", "a"]
    assert table.client_ids() == ["b", "a"]
    info = table.get("a")
    assert info is not None
    assert info.metrics(5.0, streams=4) == ClientMetrics(
        client_id="a",
        name="first",
        streams=4,
        received=9,
        gaps=1,
        lag_ms=3.0,
        last_seen_seconds=3.0,
    )
