"""The control plane without sockets: request frames in, replies out.

:meth:`ControlServer.handle` is fed ROUTER frames (identity, encoded message) and a
fake clock; the broker behind it is a small fake built on the real pure cores (the
client table and the topic lifecycle), so what a request changes can be checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from broker.control import WELCOME_ECHOES, ControlServer, Reply
from broker.health import compute_metrics
from broker.liveness import ClientTable
from broker.quotas import ClientQuotas, Quotas
from broker.topics import TopicLifecycle
from schemas.bus import (
    PROTOCOL_VERSION,
    Bye,
    ClientMessage,
    ConnectionHealth,
    Envelope,
    ErrorReply,
    GetSnapshot,
    Health,
    HealthReply,
    HealthRequest,
    Heartbeat,
    Hello,
    Metrics,
    MetricsReply,
    MetricsRequest,
    StatusEvent,
    StreamSpec,
    Subscribe,
    SubscribeOk,
    Unsubscribe,
    UnsubscribeOk,
    Welcome,
    encode,
)

ALICE = b"\x00alice"
BOB = b"\x00bob"
MARKETS = frozenset({"KRW-BTC", "KRW-ETH"})
BTC = StreamSpec("ticker", "KRW-BTC")
ETH = StreamSpec("ticker", "KRW-ETH")
HEALTH = Health(
    status="healthy",
    uptime_seconds=12.0,
    last_message_timestamp=None,
    connection_quality="excellent",
    active_subscriptions=0,
    public=ConnectionHealth("up", "websocket", 0.0, 0, None),
    private=None,
    epoch="e1",
)


def cached_ticker(topic: str) -> Envelope:
    """A last value as the publisher caches it (the payload's kind does not matter here)."""
    event = StatusEvent(connection="public", state="up", detail="", timestamp=1)
    return Envelope(topic, 7, "e1", 0, "websocket", event)


class FakeBroker:
    """Subscriptions, markets, snapshots and status over the real pure cores."""

    def __init__(self, clients: ClientTable) -> None:
        self.clients = clients
        self.topics = TopicLifecycle()
        self.markets: frozenset[str] | None = MARKETS
        self.cache: dict[str, Envelope] = {}
        self.journaled: list[Envelope] = []
        """The private messages published, oldest first (the publisher's journal)."""
        self.cut: list[str] = []
        """Topics whose oldest messages the journal dropped."""
        self.dropped: list[str] = []
        self.refusal: str | None = None

    def subscribe(self, client_id: str, specs: Sequence[StreamSpec]) -> None:
        self.topics.subscribe(client_id, specs)

    def unsubscribe(self, client_id: str, specs: Sequence[StreamSpec]) -> None:
        self.topics.unsubscribe(client_id, specs)

    def drop_client(self, client_id: str) -> None:
        self.dropped.append(client_id)
        self.clients.remove(client_id)
        self.topics.drop_client(client_id)

    async def wait_markets(self, timeout: float) -> bool:
        return self.markets is not None

    def last_values(self, topics: Iterable[str]) -> list[Envelope]:
        return [self.cache[t] for t in topics if t in self.cache]

    def journal(self, topics: Iterable[str]) -> list[Envelope]:
        wanted = tuple(topics)
        return [env for env in self.journaled if env.topic.startswith(wanted)]

    def journal_cut(self, topics: Iterable[str]) -> list[str]:
        wanted = tuple(topics)
        return [topic for topic in self.cut if topic.startswith(wanted)]

    async def fetch(self, specs: Sequence[StreamSpec]) -> tuple[list[Envelope], list[str]]:
        return self.last_values(s.topic for s in specs), []

    def is_available(self, private: bool) -> bool:
        return not private

    def private_refusal(self) -> str | None:
        return self.refusal

    def held(self, client_id: str) -> frozenset[StreamSpec]:
        return self.topics.state.streams_of(client_id)

    def health(self) -> Health:
        return HEALTH

    def metrics(self) -> Metrics:
        return compute_metrics(
            [],
            self.clients.all(),
            lambda client_id: len(self.topics.state.streams_of(client_id)),
            messages=0,
            decode_errors=0,
            per_second=0.0,
            handlers=[],
            published=0,
            frames=0,
            now=100.0,
        )


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker(ClientTable())


@pytest.fixture
def control(broker: FakeBroker) -> ControlServer:
    return quota_control(broker, Quotas())


def ask(control: ControlServer, identity: bytes, message: ClientMessage, now: float = 1.0) -> Reply:
    """The one reply to ``message``."""
    (reply,) = control.handle([identity, encode(message)], now)
    return reply


def joined(control: ControlServer, identity: bytes = ALICE, now: float = 1.0) -> str:
    assert isinstance(ask(control, identity, Hello(client_id="x", name="n"), now)[1], Welcome)
    return control.client_key(identity)


def error_code(reply: Reply) -> str:
    assert isinstance(reply[1], ErrorReply), reply
    return reply[1].code


def test_hello_is_welcomed_with_the_broker_parameters(
    control: ControlServer, broker: FakeBroker
) -> None:
    identity, welcome = ask(control, ALICE, Hello(client_id="x", name="algo", pid=42))
    assert identity == ALICE
    assert welcome == Welcome(
        epoch="e1",
        protocol=PROTOCOL_VERSION,
        heartbeat_interval=0.5,
        liveness=3,
        public_available=True,
        private_available=False,
    )
    info = broker.clients.get(control.client_key(ALICE))
    assert info is not None
    assert (info.name, info.pid) == ("algo", 42)


def test_hello_in_another_protocol_version_is_refused(control: ControlServer) -> None:
    reply = ask(control, ALICE, Hello(client_id="x", protocol=PROTOCOL_VERSION + 1))
    assert error_code(reply) == "protocol_version"
    assert error_code(ask(control, ALICE, HealthRequest(req=1))) == "unknown_client"


def test_a_second_hello_starts_the_client_afresh(
    control: ControlServer, broker: FakeBroker
) -> None:
    client = joined(control)
    ask(control, ALICE, Subscribe(req=1, streams=[BTC]))
    joined(control)
    assert broker.dropped == [client]
    assert broker.topics.state.streams_of(client) == frozenset()


def test_subscribe_holds_the_streams_and_answers_with_topics_and_cached_values(
    control: ControlServer, broker: FakeBroker
) -> None:
    client = joined(control)
    broker.cache["ticker/KRW-BTC/"] = cached_ticker("ticker/KRW-BTC/")
    reply = ask(control, ALICE, Subscribe(req=5, streams=[StreamSpec("ticker", "krw-btc"), ETH]))
    assert reply == (
        ALICE,
        SubscribeOk(5, ["ticker/KRW-BTC/", "ticker/KRW-ETH/"], [broker.cache["ticker/KRW-BTC/"]]),
    )
    assert broker.topics.state.streams_of(client) == {BTC, ETH}


def test_subscribe_without_snapshot_answers_without_cached_values(
    control: ControlServer, broker: FakeBroker
) -> None:
    joined(control)
    broker.cache["ticker/KRW-BTC/"] = cached_ticker("ticker/KRW-BTC/")
    reply = ask(control, ALICE, Subscribe(req=5, streams=[BTC], snapshot=False))
    assert reply == (ALICE, SubscribeOk(5, ["ticker/KRW-BTC/"], []))


def test_one_bad_stream_refuses_the_whole_subscribe(
    control: ControlServer, broker: FakeBroker
) -> None:
    client = joined(control)
    reply = ask(control, ALICE, Subscribe(req=6, streams=[BTC, StreamSpec("ticker", "KRW-NOPE")]))
    assert error_code(reply) == "unknown_code"
    assert isinstance(reply[1], ErrorReply)
    assert reply[1].req == 6
    assert "KRW-NOPE" in reply[1].message
    assert broker.topics.state.streams_of(client) == frozenset()
    assert control.errors == 1


def test_private_streams_are_refused_without_keys(control: ControlServer) -> None:
    joined(control)
    assert error_code(ask(control, ALICE, Subscribe(req=1, streams=[StreamSpec("myAsset")]))) == (
        "private_unavailable"
    )


def test_unsubscribe_releases_only_that_clients_streams(
    control: ControlServer, broker: FakeBroker
) -> None:
    alice = joined(control, ALICE)
    bob = joined(control, BOB)
    ask(control, ALICE, Subscribe(req=1, streams=[BTC, ETH]))
    ask(control, BOB, Subscribe(req=1, streams=[BTC]))
    assert ask(control, ALICE, Unsubscribe(req=2, streams=[BTC])) == (ALICE, UnsubscribeOk(2))
    assert broker.topics.state.streams_of(alice) == {ETH}
    assert broker.topics.state.streams_of(bob) == {BTC}
    assert broker.topics.wanted() == {BTC, ETH}


def test_a_message_that_cannot_be_read_gets_bad_message(control: ControlServer) -> None:
    (reply,) = control.handle([ALICE, b"\xc1 not msgpack"], 1.0)
    assert error_code(reply) == "bad_message"
    assert isinstance(reply[1], ErrorReply)
    assert reply[1].req is None


def test_a_request_of_several_frames_gets_bad_message(control: ControlServer) -> None:
    (reply,) = control.handle([ALICE, encode(HealthRequest(req=1)), b"extra"], 1.0)
    assert error_code(reply) == "bad_message"


def test_an_unknown_operation_gets_bad_message(control: ControlServer) -> None:
    frame = msgspec.msgpack.encode({"op": "launch", "req": 3})
    (reply,) = control.handle([ALICE, frame], 1.0)
    assert error_code(reply) == "bad_message"


def test_requests_of_an_unknown_client_are_refused(control: ControlServer) -> None:
    reply = ask(control, ALICE, Subscribe(req=9, streams=[BTC]))
    assert error_code(reply) == "unknown_client"
    assert isinstance(reply[1], ErrorReply)
    assert reply[1].req == 9
    assert error_code(ask(control, ALICE, Heartbeat())) == "unknown_client"


def test_a_heartbeat_refreshes_the_client_and_records_its_counters(
    control: ControlServer, broker: FakeBroker
) -> None:
    client = joined(control, now=1.0)
    assert control.handle([ALICE, encode(Heartbeat(received=10, gaps=2, lag_ms=3.5))], 8.0) == []
    info = broker.clients.get(client)
    assert info is not None
    assert (info.last_seen, info.received, info.gaps, info.lag_ms) == (8.0, 10, 2, 3.5)


def test_bye_forgets_the_client_and_its_streams_without_a_reply(
    control: ControlServer, broker: FakeBroker
) -> None:
    client = joined(control)
    ask(control, ALICE, Subscribe(req=1, streams=[BTC]))
    assert control.handle([ALICE, encode(Bye())], 2.0) == []
    assert broker.dropped == [client]
    assert broker.topics.wanted() == frozenset()
    assert broker.topics.lingering == {BTC}


def test_bye_of_an_unknown_client_is_ignored(control: ControlServer, broker: FakeBroker) -> None:
    assert control.handle([ALICE, encode(Bye())], 1.0) == []
    assert broker.dropped == []


def test_health_is_answered_with_the_request_id(control: ControlServer) -> None:
    joined(control)
    assert ask(control, ALICE, HealthRequest(req=4)) == (ALICE, HealthReply(4, HEALTH))


def test_metrics_list_each_client_with_its_streams(control: ControlServer) -> None:
    joined(control, ALICE)
    joined(control, BOB)
    ask(control, ALICE, Subscribe(req=1, streams=[BTC, ETH]))
    identity, reply = ask(control, BOB, MetricsRequest(req=8))
    assert identity == BOB
    assert isinstance(reply, MetricsReply)
    assert reply.req == 8
    rows = {row.client_id: row.streams for row in reply.metrics.clients}
    assert rows == {control.client_key(ALICE): 2, control.client_key(BOB): 0}
    # A routing id never leaves the broker: with one, a peer could claim another's.
    assert ALICE.hex() not in rows
    assert BOB.hex() not in rows
    assert reply.metrics.total_subscriptions == 2


def test_a_failing_request_gets_an_internal_error_and_the_server_keeps_answering(
    broker: FakeBroker,
) -> None:
    class Broken(FakeBroker):
        def health(self) -> Health:
            raise RuntimeError("boom")

    control = control_over(Broken(broker.clients))
    joined(control)
    reply = ask(control, ALICE, HealthRequest(req=3))
    assert error_code(reply) == "internal"
    assert isinstance(reply[1], ErrorReply)
    assert reply[1].req == 3
    assert "boom" not in reply[1].message
    assert isinstance(ask(control, ALICE, MetricsRequest(req=4))[1], MetricsReply)


# ---------------------------------------------------------------- hostile clients


def control_over(broker: FakeBroker, **options: Any) -> ControlServer:
    """A control server over ``broker`` (epoch e1, heartbeat 0.5 s, liveness 3, no keys);
    ``options`` go to :class:`ControlServer` as well."""
    settings: dict[str, Any] = {
        "epoch": "e1",
        "heartbeat_interval": 0.5,
        "liveness": 3,
        "private_enabled": False,
    }
    settings.update(options)
    return ControlServer(
        clients=broker.clients,
        subscriptions=broker,
        markets=broker,
        snapshots=broker,
        status=broker,
        **settings,
    )


def quota_control(
    broker: FakeBroker, quotas: Quotas, *, private_enabled: bool = False
) -> ControlServer:
    """A control server over ``broker`` with ``quotas``."""
    return control_over(broker, private_enabled=private_enabled, quotas=ClientQuotas(quotas))


def test_a_request_with_a_bad_field_is_answered_with_its_req_and_the_field(
    control: ControlServer,
) -> None:
    joined(control)
    raw = msgspec.msgpack.encode(
        {"op": "subscribe", "req": 17, "streams": [{"type": "orderbook", "depth": "15"}]}
    )
    ((identity, reply),) = control.handle([ALICE, raw], 1.0)
    assert identity == ALICE
    assert isinstance(reply, ErrorReply)
    assert (reply.req, reply.code) == (17, "bad_message")
    assert "depth" in reply.message


def test_a_recursion_bomb_gets_bad_message_and_the_server_keeps_answering(
    control: ControlServer,
) -> None:
    joined(control)
    for depth in (10_000, 200_000):
        ((_, reply),) = control.handle([ALICE, b"\x91" * depth + b"\xc0"], 1.0)
        assert isinstance(reply, ErrorReply)
        assert reply.code == "bad_message"
    assert ask(control, ALICE, HealthRequest(req=4)) == (ALICE, HealthReply(4, HEALTH))


def test_a_flooding_client_is_told_once_a_second_and_others_are_still_served(
    broker: FakeBroker,
) -> None:
    control = quota_control(broker, Quotas(burst=10, rate=5.0))
    joined(control, ALICE)
    joined(control, BOB)
    replies = [control.handle([ALICE, encode(HealthRequest(req=i))], 2.0) for i in range(100)]
    refused = [r for batch in replies for _, r in batch if isinstance(r, ErrorReply)]
    answered = [r for batch in replies for _, r in batch if isinstance(r, HealthReply)]
    # A full burst is answered, one refusal says why, the rest is dropped unanswered.
    assert len(answered) == 10
    assert [(r.code, r.req) for r in refused] == [("rate_limited", 10)]
    assert control.quotas.refused == 90
    # Bob's budget is his own.
    assert ask(control, BOB, HealthRequest(req=1), 2.0) == (BOB, HealthReply(1, HEALTH))
    # A second later Alice has tokens again, and is told again if she floods on.
    assert ask(control, ALICE, HealthRequest(req=200), 3.0) == (ALICE, HealthReply(200, HEALTH))


def test_a_hello_with_an_oversized_name_is_refused_and_nothing_is_kept(
    control: ControlServer, broker: FakeBroker
) -> None:
    (_, reply) = ask(control, ALICE, Hello(client_id="x", name="eyJ" * 40_000))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "invalid_field"
    assert "name" in reply.message
    assert len(broker.clients) == 0


def test_hellos_beyond_the_client_limit_are_refused(broker: FakeBroker) -> None:
    control = quota_control(broker, Quotas(max_clients=2))
    joined(control, ALICE)
    joined(control, BOB)
    (_, reply) = ask(control, b"\x01carol", Hello(client_id="c"))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "quota_exceeded"
    # A known client may say hello again.
    assert isinstance(ask(control, ALICE, Hello(client_id="x"))[1], Welcome)


def test_a_client_cannot_hold_more_streams_than_its_quota(broker: FakeBroker) -> None:
    control = quota_control(broker, Quotas(max_streams=1))
    client = joined(control, ALICE)
    assert isinstance(ask(control, ALICE, Subscribe(req=1, streams=[BTC]))[1], SubscribeOk)
    # Asking again for a stream it holds costs nothing.
    assert isinstance(ask(control, ALICE, Subscribe(req=2, streams=[BTC]))[1], SubscribeOk)
    (_, reply) = ask(control, ALICE, Subscribe(req=3, streams=[ETH]))
    assert isinstance(reply, ErrorReply)
    assert (reply.req, reply.code) == (3, "quota_exceeded")
    assert broker.topics.state.streams_of(client) == {BTC}


async def test_a_second_snapshot_request_in_flight_is_refused_as_busy(
    control: ControlServer,
) -> None:
    joined(control)
    assert control.handle([ALICE, encode(GetSnapshot(req=1, streams=[BTC]))], 1.0) == []
    (_, reply) = ask(control, ALICE, GetSnapshot(req=2, streams=[BTC]))
    assert isinstance(reply, ErrorReply)
    assert (reply.req, reply.code) == (2, "busy")


def test_private_streams_are_refused_with_the_reason_while_the_keys_are_rejected(
    broker: FakeBroker,
) -> None:
    control = quota_control(broker, Quotas(), private_enabled=True)
    joined(control)
    broker.refusal = "Upbit rejected the broker's API keys (INVALID_AUTH)"
    (_, reply) = ask(control, ALICE, Subscribe(req=1, streams=[StreamSpec("myOrder")]))
    assert isinstance(reply, ErrorReply)
    assert (reply.req, reply.code) == (1, "private_unavailable")
    assert "INVALID_AUTH" in reply.message
    # Public streams are not affected, and private ones come back with the keys.
    assert isinstance(ask(control, ALICE, Subscribe(req=2, streams=[BTC]))[1], SubscribeOk)
    broker.refusal = None
    (_, ok) = ask(control, ALICE, Subscribe(req=3, streams=[StreamSpec("myOrder")]))
    assert isinstance(ok, SubscribeOk)


async def test_a_batch_of_welcomes_is_followed_by_a_few_heartbeats_not_one_per_hello(
    broker: FakeBroker,
) -> None:
    # The client waits for data on its SUB before it subscribes; the heartbeat right
    # after its Welcome may beat its SUB's connection, so a few follow (one series at a
    # time, however many clients say hello), then none until the next Welcome.
    calls: list[float] = []
    control = control_over(broker, on_welcome=lambda: calls.append(time.monotonic()))
    ctx = zmq.asyncio.Context()
    router, dealers = ctx.socket(zmq.ROUTER), [ctx.socket(zmq.DEALER) for _ in range(2)]
    router.bind("inproc://control-welcome")
    for dealer in dealers:
        dealer.connect("inproc://control-welcome")
    serving = asyncio.ensure_future(control.serve(router))
    try:
        start = time.monotonic()
        await dealers[0].send(encode(Hello(client_id="a")))
        await asyncio.wait_for(dealers[0].recv(), 5)
        await dealers[1].send(encode(Hello(client_id="b")))
        await asyncio.wait_for(dealers[1].recv(), 5)
        deadline = time.monotonic() + 5
        while len(calls) < 2 + len(WELCOME_ECHOES) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(calls) == 2 + len(WELCOME_ECHOES)  # one per batch, plus one series
        assert calls[-1] - start >= WELCOME_ECHOES[-1]
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        for sock in (router, *dealers):
            sock.close(linger=0)
        ctx.term()


def test_a_replay_brings_private_streams_journal_and_public_streams_last_values(
    broker: FakeBroker,
) -> None:
    # A client back after a restart: every private message this broker published so
    # far (its first REST sync may have published several), the last value elsewhere.
    control = quota_control(broker, Quotas(), private_enabled=True)
    joined(control)
    broker.cache["ticker/KRW-BTC/"] = cached_ticker("ticker/KRW-BTC/")
    broker.journaled = [
        Envelope("myOrder/KRW-BTC/", seq, "e1", seq, "rest", cached_ticker("x").data)
        for seq in (1, 2, 3)
    ]
    broker.cache["myOrder/KRW-BTC/"] = broker.journaled[-1]
    broker.cut = ["myAsset/", "myOrder/KRW-ETH/"]
    streams = [StreamSpec("ticker", "KRW-BTC"), StreamSpec("myOrder")]
    _, replayed = ask(control, ALICE, Subscribe(req=5, streams=streams, replay=True))
    assert isinstance(replayed, SubscribeOk)
    assert replayed.snapshot == [broker.cache["ticker/KRW-BTC/"], *broker.journaled]
    assert replayed.cut == ["myOrder/KRW-ETH/"]  # only the streams asked for
    _, plain = ask(control, ALICE, Subscribe(req=6, streams=streams))
    assert isinstance(plain, SubscribeOk)
    assert plain.snapshot == [broker.cache["ticker/KRW-BTC/"]]  # (no prefix cache here)
    assert plain.cut == []
