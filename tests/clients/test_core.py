"""clients.core: the control plane message-in / decision-out, on a fake clock, no sockets."""

from __future__ import annotations

import pytest

from clients.core import (
    BROKER_STOPPING,
    CLIENT_TOPIC,
    IDLE_TICK,
    LOST_AFTER,
    ClientCore,
    HelloRefused,
    Refused,
    Replied,
    Resync,
    Stray,
    StreamBook,
    Tick,
    Welcomed,
    client_notice,
    link_transition,
)
from clients.errors import BrokerError
from schemas.bus import (
    ConnectionHealth,
    ErrorReply,
    GetSnapshot,
    Health,
    HealthReply,
    HealthRequest,
    Hello,
    SnapshotReply,
    StatusEvent,
    StatusState,
    StreamSpec,
    Subscribe,
    SubscribeOk,
    UnsubscribeOk,
    Welcome,
)

INTERVAL = 1.0
LIVENESS = 3


def welcome(epoch: str = "e1", *, public: bool = True, private: bool = False) -> Welcome:
    return Welcome(epoch, 3, INTERVAL, LIVENESS, public, private)


def up_core(now: float = 0.0, epoch: str = "e1") -> ClientCore:
    """A core that said hello and was welcomed at ``now``."""
    core = ClientCore("cid", "unit", 42)
    core.hello()
    event = core.receive(welcome(epoch), now)
    assert isinstance(event, Welcomed)
    core.welcomed(event.welcome, now)
    return core


def health_reply(req: int, epoch: str) -> HealthReply:
    conn = ConnectionHealth("up", "websocket", 0.0, 0, None)
    return HealthReply(req, Health("healthy", 1.0, None, "excellent", 0, conn, None, epoch))


BTC = StreamSpec("ticker", "KRW-BTC")
ETH = StreamSpec("ticker", "KRW-ETH")


# ------------------------------------------------------------------------- hello, welcome


def test_hello_says_who_the_client_is() -> None:
    hello = ClientCore("cid", "unit", 42).hello()
    assert hello == Hello(client_id="cid", name="unit", pid=42)


def test_the_welcome_to_a_pending_hello_connects_the_core() -> None:
    core = ClientCore("cid", "unit", 1)
    assert not core.up
    assert core.epoch is None
    core.hello()
    event = core.receive(welcome("e7"), 1.0)
    assert event == Welcomed(welcome("e7"))
    assert not core.hello_pending
    core.welcomed(welcome("e7"), 1.0)
    assert core.up
    assert core.epoch == "e7"


def test_an_error_while_the_hello_waits_refuses_the_hello() -> None:
    core = ClientCore("cid", "unit", 1)
    core.hello()
    event = core.receive(ErrorReply(None, "protocol_version", "speak 3"), 0.0)
    assert isinstance(event, HelloRefused)
    assert event.error.code == "protocol_version"
    assert not core.hello_pending


def test_a_welcome_nobody_waits_for_from_the_same_epoch_means_nothing() -> None:
    assert up_core(epoch="e1").receive(welcome("e1"), 5.0) is None


def test_a_welcome_from_another_epoch_asks_for_a_resync() -> None:
    event = up_core(epoch="e1").receive(welcome("e2"), 5.0)
    assert event == Resync("broker restarted (epoch e2)")


def test_a_welcome_before_any_hello_means_nothing() -> None:
    assert ClientCore("cid", "unit", 1).receive(welcome(), 0.0) is None


# ----------------------------------------------------------------------------- requests


def test_requests_get_distinct_ids_and_replies_match_them() -> None:
    core = up_core()
    req1, msg1 = core.request(lambda r: GetSnapshot(r, [BTC]), SnapshotReply)
    req2, msg2 = core.request(lambda r: Subscribe(r, [ETH]), SubscribeOk)
    assert req1 != req2
    assert (msg1.req, msg2.req) == (req1, req2)
    assert sorted(core.pending) == sorted([req1, req2])
    reply2 = SubscribeOk(req2, [ETH.topic], [])
    assert core.receive(reply2, 1.0) == Replied(req2, reply2)
    reply1 = SnapshotReply(req1, [])
    assert core.receive(reply1, 1.0) == Replied(req1, reply1)
    assert core.pending == []


def test_a_reply_is_matched_once_and_a_late_one_is_ignored() -> None:
    core = up_core()
    req, _ = core.request(HealthRequest, HealthReply)
    assert isinstance(core.receive(health_reply(req, "e1"), 1.0), Replied)
    assert core.receive(health_reply(req, "e1"), 1.1) is None  # duplicate
    late, _ = core.request(HealthRequest, HealthReply)
    core.abandon(late)  # timed out in the shell
    assert core.receive(health_reply(late, "e1"), 9.0) is None


def test_a_reply_of_the_wrong_type_fails_the_request_as_bad_message() -> None:
    core = up_core()
    req, _ = core.request(lambda r: Subscribe(r, [BTC]), SubscribeOk)
    event = core.receive(UnsubscribeOk(req), 1.0)
    assert isinstance(event, Refused)
    assert event.req == req
    assert event.error.code == "bad_message"
    assert "UnsubscribeOk" in event.error.message


def test_an_error_reply_fails_its_request_with_the_brokers_code() -> None:
    core = up_core()
    req, _ = core.request(lambda r: Subscribe(r, [BTC]), SubscribeOk)
    event = core.receive(ErrorReply(req, "unknown_code", "no market KRW-BTC"), 1.0)
    assert isinstance(event, Refused)
    assert isinstance(event.error, BrokerError)
    assert (event.error.code, event.error.message) == ("unknown_code", "no market KRW-BTC")


def test_upbits_refusal_reaches_the_error_with_its_name_and_message() -> None:
    core = up_core()
    req, _ = core.request(lambda r: Subscribe(r, [BTC]), SubscribeOk)
    refusal = ErrorReply(
        req,
        "upstream_error",
        "Upbit refused: HTTP 400: insufficient_funds_bid: short",
        upbit_name="insufficient_funds_bid",
        upbit_message="short",
    )
    event = core.receive(refusal, 1.0)
    assert isinstance(event, Refused)
    assert (event.error.upbit_name, event.error.upbit_message) == (
        "insufficient_funds_bid",
        "short",
    )


def test_unknown_client_for_no_pending_request_asks_for_a_resync() -> None:
    event = up_core().receive(ErrorReply(None, "unknown_client", "hello first"), 1.0)
    assert event == Resync("the broker does not know this client")


def test_unknown_client_for_a_pending_request_fails_that_request() -> None:
    core = up_core()
    req, _ = core.request(HealthRequest, HealthReply)
    event = core.receive(ErrorReply(req, "unknown_client", "hello first"), 1.0)
    assert isinstance(event, Refused)
    assert event.error.code == "unknown_client"


def test_another_error_nobody_waits_for_is_a_stray() -> None:
    event = up_core().receive(ErrorReply(None, "bad_message", "unreadable"), 1.0)
    assert event == Stray("bad_message", "unreadable")


def test_reset_fails_everything_in_flight_and_their_replies_are_ignored() -> None:
    core = up_core()
    req1, _ = core.request(HealthRequest, HealthReply)
    req2, _ = core.request(HealthRequest, HealthReply)
    assert sorted(core.reset()) == [req1, req2]
    assert core.pending == []
    assert core.receive(health_reply(req1, "e1"), 1.0) is None


def test_close_returns_what_never_gets_answered_and_disconnects() -> None:
    core = up_core()
    req, _ = core.request(HealthRequest, HealthReply)
    assert core.close() == [req]
    assert core.closed
    assert not core.up
    assert core.welcome is None


# ----------------------------------------------------------------------------- epoch


def test_check_epoch_asks_for_a_resync_only_for_another_epoch() -> None:
    core = up_core(epoch="e1")
    assert core.check_epoch("e1") is None
    assert core.check_epoch("e2") == Resync("broker restarted (epoch e2)")


# ----------------------------------------------------------------------------- recovery


def test_a_resync_starts_once_and_marks_the_client_down() -> None:
    core = up_core()
    assert core.begin_resync()
    assert core.recovering
    assert not core.up
    assert not core.available("public")
    assert not core.begin_resync()  # one recovery at a time


def test_no_resync_before_a_broker_welcomed_us_or_after_close() -> None:
    assert not ClientCore("cid", "unit", 1).begin_resync()
    core = up_core()
    core.close()
    assert not core.begin_resync()


def test_a_failed_attempt_stays_down_and_a_finished_recovery_allows_the_next() -> None:
    core = up_core()
    assert core.begin_resync()
    core.hello()
    event = core.receive(welcome("e2"), 2.0)
    assert isinstance(event, Welcomed)
    core.welcomed(event.welcome, 2.0)
    core.resync_failed()  # the re-subscribe then failed
    assert not core.up
    assert core.recovering
    core.welcomed(event.welcome, 3.0)
    core.resync_done()
    assert core.up
    assert core.epoch == "e2"
    assert core.begin_resync()


def test_recovery_steps_never_wait_longer_than_the_brokers_liveness() -> None:
    assert ClientCore("cid", "unit", 1).recovery_timeout(5.0) == 5.0
    core = up_core()
    assert core.liveness_timeout == INTERVAL * LIVENESS
    assert core.recovery_timeout(5.0) == INTERVAL * LIVENESS
    assert core.recovery_timeout(0.5) == 0.5


# ----------------------------------------------------------------------------- liveness


def test_before_a_welcome_ticks_are_idle() -> None:
    assert ClientCore("cid", "unit", 1).tick(100.0) == Tick(IDLE_TICK)


def test_while_up_liveness_is_checked_four_times_an_interval() -> None:
    assert up_core(now=0.0).tick(0.5) == Tick(INTERVAL / 4)


def test_a_broker_silent_for_lost_after_intervals_is_lost() -> None:
    # The broker publishes _heartbeat/ every interval: two may be late or missing
    # (a busy broker on a loaded machine) before it counts as gone.
    assert LOST_AFTER == 3.0
    core = up_core(now=0.0)
    core.heard_data(10.0)
    assert not core.tick(10.0 + LOST_AFTER * INTERVAL).lost  # a late heartbeat is fine
    assert core.tick(10.0 + LOST_AFTER * INTERVAL + 0.01).lost


def test_a_frozen_broker_is_noticed_within_its_silence_wherever_it_falls() -> None:
    # Heartbeats at 0, 1, 2, ...; the broker freezes at ``killed``; ticks every quarter.
    # (A killed broker is noticed sooner: the shell's socket monitor sees it go.)
    for killed in (2.0, 2.01, 2.5, 2.99):
        core = up_core(now=0.0)
        now = 0.0
        while not core.tick(now).lost:
            if now <= killed:
                core.heard_data(float(int(now)))  # the last heartbeat before now
            now += INTERVAL / 4
        assert now - killed <= (LOST_AFTER + 0.25) * INTERVAL, (killed, now)
        assert now - killed > (LOST_AFTER - 1) * INTERVAL, (killed, now)


def test_anything_on_the_data_socket_restarts_the_silence() -> None:
    core = up_core(now=0.0)
    core.heard_data(10.0)
    assert not core.tick(11.0).lost
    core.receive(UnsubscribeOk(99), 12.0)  # control traffic does not count
    assert core.tick(10.0 + LOST_AFTER * INTERVAL + 0.1).lost


def test_nothing_is_lost_while_recovering() -> None:
    core = up_core(now=0.0)
    core.begin_resync()
    assert core.tick(100.0) == Tick(INTERVAL / 4)


def test_heartbeats_are_due_once_an_interval_while_up() -> None:
    core = up_core(now=0.0)
    assert core.beat_due(0.0) == 0.0  # the first one at once
    assert core.beat_due(0.25) == pytest.approx(0.75)
    assert core.beat_due(1.0) == 0.0
    assert core.beat_due(1.5) == pytest.approx(0.5)


def test_no_heartbeat_before_a_welcome_while_recovering_or_after_close() -> None:
    assert ClientCore("cid", "unit", 1).beat_due(5.0) is None
    core = up_core(now=0.0)
    core.begin_resync()
    assert core.beat_due(5.0) is None
    core.resync_done()
    core.close()
    assert core.beat_due(6.0) is None


def test_heartbeat_carries_the_counters_with_lag_rounded() -> None:
    beat = ClientCore.heartbeat(received=10, gaps=2, lag_ms=1.23456, dropped=3)
    assert (beat.received, beat.gaps, beat.lag_ms, beat.dropped) == (10, 2, 1.235, 3)


# ------------------------------------------------------------------------- availability


def status(state: StatusState, connection: str = "public") -> StatusEvent:
    return StatusEvent(connection="public" if connection == "public" else "private", state=state)


def test_availability_starts_from_the_welcome() -> None:
    core = ClientCore("cid", "unit", 1)
    core.welcomed(welcome(public=True, private=False), 0.0)
    assert core.available("public")
    assert not core.available("private")


@pytest.mark.parametrize("state", ["down", "connecting", "reconnecting"])
def test_a_down_state_makes_that_side_unavailable(state: StatusState) -> None:
    core = up_core()
    core.on_status(status(state))
    assert not core.available("public")


@pytest.mark.parametrize("state", ["up", "idle", "restored", "source_rest", "source_websocket"])
def test_an_up_state_makes_that_side_available(state: StatusState) -> None:
    core = ClientCore("cid", "unit", 1)
    core.welcomed(welcome(public=False, private=False), 0.0)
    core.on_status(status(state, "private"))
    assert core.available("private")
    assert not core.available("public")


def test_gap_or_error_events_leave_availability_alone() -> None:
    core = up_core()
    core.on_status(status("gap"))
    core.on_status(status("error"))
    assert core.available("public")


def test_status_events_while_down_change_nothing() -> None:
    core = up_core()
    core.begin_resync()
    core.on_status(status("up"))
    assert not core.available("public")


# ----------------------------------------------------------------------------- streams


def test_a_new_stream_is_subscribed_and_a_held_one_only_snapshotted() -> None:
    book = StreamBook()
    assert book.split([BTC]) == ([BTC], [])
    assert book.adopt([BTC], [BTC.topic]) == [BTC.topic]
    book.hold([BTC])
    assert book.split([BTC, ETH]) == ([ETH], [BTC])


def test_the_brokers_confirmed_topic_is_remembered_for_later_subscribers() -> None:
    book = StreamBook()
    book.adopt([BTC], ["ticker/KRW-BTC/"])
    book.hold([BTC])
    assert book.topic(BTC) == "ticker/KRW-BTC/"


def test_a_stream_is_released_only_when_its_last_holder_leaves() -> None:
    book = StreamBook()
    book.adopt([BTC, ETH], [BTC.topic, ETH.topic])
    book.hold([BTC, ETH])
    book.hold([BTC])
    assert book.refs(BTC) == 2
    assert book.release([BTC, ETH]) == [ETH]
    assert book.refs(BTC) == 1
    assert book.release([BTC]) == [BTC]
    assert book.refs(BTC) == 0
    assert book.held == []
    assert book.split([BTC]) == ([BTC], [])


def test_a_recovery_resubscribes_each_held_stream_once() -> None:
    book = StreamBook()
    book.adopt([BTC, ETH], [BTC.topic, ETH.topic])
    book.hold([BTC, ETH])
    book.hold([BTC])
    assert book.held == [BTC, ETH]


def test_the_core_starts_with_an_empty_book() -> None:
    assert up_core().streams.held == []


# ----------------------------------------------------------------------------- notices


def test_a_client_notice_is_a_status_envelope_on_the_client_topic() -> None:
    env = client_notice(
        "down", "lost", "private", ("myAsset/",), epoch="e1", now_ns=1_700_000_000_123_456_789
    )
    assert (env.topic, env.seq, env.epoch, env.source) == (CLIENT_TOPIC, 0, "e1", "websocket")
    assert env.data == StatusEvent(
        connection="private",
        state="down",
        detail="lost",
        topics=["myAsset/"],
        timestamp=1_700_000_000_123,
    )


# ------------------------------------------------------------------------- status events


def test_the_brokers_goodbye_asks_for_a_resync_at_once() -> None:
    core = up_core()
    event = StatusEvent(connection="public", state="down", detail=BROKER_STOPPING)
    assert core.on_status(event) == Resync("the broker is stopping")


def test_an_upstream_down_is_no_goodbye() -> None:
    core = up_core()
    assert core.on_status(StatusEvent(connection="public", state="down", detail="lost")) is None
    assert not core.available("public")


def test_a_connection_state_is_told_only_when_it_changes() -> None:
    assert link_transition(None, "connecting") == "connecting"
    assert link_transition("connecting", "up") == "up"
    assert link_transition("up", "up") is None  # a copy
    assert link_transition("down", "down") is None  # the client's notice after a goodbye


def test_after_reconnecting_connecting_is_no_news_and_up_is_restored() -> None:
    # The client said "reconnecting" when it lost the broker; the restarted broker's link
    # then connects for the first time.
    assert link_transition("reconnecting", "connecting") is None
    assert link_transition("reconnecting", "up") == "restored"
    assert link_transition("restored", "up") is None
    assert link_transition("reconnecting", "restored") == "restored"


def test_topic_states_always_pass() -> None:
    assert link_transition("down", "gap") == "gap"
    assert link_transition("up", "source_rest") == "source_rest"
