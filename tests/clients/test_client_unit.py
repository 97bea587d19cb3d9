"""BrokerClient and SyncBrokerClient against a scripted in-process fake broker.

The fake speaks the bus protocol on ipc sockets from its own thread, so these tests
exercise the client's real sockets, heartbeats and recovery without the real broker.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

import clients.client as client_module
from clients import (
    BrokerClient,
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    ClientClosed,
    SyncBrokerClient,
)
from schemas.bus import (
    MAX_MESSAGE_BYTES,
    BrokerHeartbeat,
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
    Payload,
    SnapshotReply,
    StatusEvent,
    StreamSpec,
    Subscribe,
    SubscribeOk,
    Unsubscribe,
    UnsubscribeOk,
    Welcome,
    decode_client_message,
    encode,
    pack_published,
)
from schemas.upbit import Orderbook
from tests.clients.test_dispatch import ticker
from tests.support import ROOT, async_wait_until, short_tmpdir, wait_until

T_BTC = "ticker/KRW-BTC/"
SUBSCRIBED_WITHIN = 1.0
"""Seconds the fake waits for a client's SUB prefix before publishing anyway."""


def orderbook(size: float) -> Orderbook:
    return Orderbook(
        code="KRW-BTC", total_ask_size=size, total_bid_size=size, orderbook_units=[], timestamp=0
    )


class FakeBroker:
    """A scripted broker: answers the control protocol, publishes what tests ask."""

    def __init__(self, rundir: Path) -> None:
        self.control = f"ipc://{rundir}/control"
        self.data = f"ipc://{rundir}/data"
        self.epoch = "epoch-1"
        self.interval = 0.1
        self.silent = False
        self.data_quiet = False
        """Answer requests but publish no heartbeat (a data path not yet live)."""
        self.private = False
        self.bad_codes: set[str] = set()
        self.snapshots: dict[str, list[Envelope]] = {}
        self.cut: list[str] = []
        """Topics a replay says it misses the oldest messages of (SubscribeOk.cut)."""
        self.messages: list[ClientMessage] = []
        self.known: set[bytes] = set()
        self.hello_ids: list[bytes] = []
        """The routing id of every hello, in order."""
        self._seq: dict[str, int] = {}
        self.prefixes: set[bytes] = set()
        self.prefix_log: list[bytes] = []
        """Every subscribe message, in the order the fake's socket applied them."""
        """SUB prefixes the clients have sent (XPUB): a topic no client's SUB has asked
        for yet would be dropped by ZeroMQ, so :meth:`publish` waits for one."""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    # -------------------------------------------------------------- test API

    def of(self, kind: type[Any]) -> list[Any]:
        return [m for m in list(self.messages) if isinstance(m, kind)]

    def publish(self, topic: str, data: Payload, seq: int | None = None) -> Envelope:
        # A real broker publishes a topic after the Subscribe that asked for it, long
        # after the SUB prefix went out; this fake answers at once, so the prefix (sent
        # on another connection) may not have reached its socket yet.
        # (Never on the fake's own thread: its loop is what hears the prefixes.)
        deadline = time.monotonic() + SUBSCRIBED_WITHIN
        key = topic.encode()
        mine = threading.current_thread() is self._thread
        while not mine and not any(key.startswith(p) for p in list(self.prefixes)):
            if time.monotonic() > deadline:
                break  # (tests also publish what nobody asked for)
            time.sleep(0.005)
        if seq is None:
            seq = self._seq.get(topic, 0) + 1
        self._seq[topic] = seq
        envelope = Envelope(topic, seq, self.epoch, time.time_ns(), "websocket", data)
        self._loop.call_soon_threadsafe(self._send, topic, encode(envelope))
        return envelope

    def restart(self) -> None:
        """A new epoch; every client is forgotten (like a broker restart)."""
        self.epoch = f"epoch-{int(self.epoch.split('-')[1]) + 1}"
        self.known.clear()
        self._seq.clear()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -------------------------------------------------------------- internals

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._ctx = zmq.asyncio.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        for sock, endpoint in ((self._router, self.control), (self._pub, self.data)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint)
        tasks = [
            self._loop.create_task(self._serve()),
            self._loop.create_task(self._beat()),
            self._loop.create_task(self._watch_prefixes()),
        ]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._router.close()
            self._pub.close()
            self._ctx.term()
            self._loop.close()

    async def _watch_prefixes(self) -> None:
        while True:
            message = await self._pub.recv()
            if message[:1] == b"\x01":
                self.prefixes.add(message[1:])
                self.prefix_log.append(message[1:])

    def _send(self, topic: str, body: bytes) -> None:
        self._pub.send(pack_published(topic.encode(), body))

    def send_raw(self, frames: list[bytes]) -> None:
        self._loop.call_soon_threadsafe(self._pub.send_multipart, frames)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.silent and not self.data_quiet:
                self.publish("_heartbeat/", BrokerHeartbeat(timestamp=1))

    async def _serve(self) -> None:
        while True:
            identity, frame = await self._router.recv_multipart()
            message = decode_client_message(frame)
            self.messages.append(message)
            if self.silent:
                continue
            reply = self._answer(identity, message)
            if reply is not None:
                await self._router.send_multipart([identity, encode(reply)])

    def _answer(self, identity: bytes, m: ClientMessage) -> Any:
        if isinstance(m, Hello):
            self.known.add(identity)
            self.hello_ids.append(identity)
            return Welcome(self.epoch, 1, self.interval, 3, True, self.private)
        if isinstance(m, Bye):
            self.known.discard(identity)
            return None
        req = getattr(m, "req", None)
        if identity not in self.known:
            return ErrorReply(req, "unknown_client", "send hello first")
        if isinstance(m, Subscribe):
            for spec in m.streams:
                if spec.code in self.bad_codes:
                    return ErrorReply(m.req, "unknown_code", f"no market {spec.code}")
            topics = [s.topic for s in m.streams]
            snap = [e for t in topics for e in self.snapshots.get(t, [])]
            return SubscribeOk(m.req, topics, snap, self.cut if m.replay else [])
        if isinstance(m, GetSnapshot):
            items = [e for s in m.streams for e in self.snapshots.get(s.topic, [])]
            return SnapshotReply(m.req, items, [])
        if isinstance(m, Unsubscribe):
            return UnsubscribeOk(m.req)
        if isinstance(m, HealthRequest):
            conn = ConnectionHealth("up", "websocket", 0.0, 0, None)
            health = Health("healthy", 1.0, None, "excellent", 0, conn, None, self.epoch)
            return HealthReply(m.req, health)
        if isinstance(m, MetricsRequest):
            return MetricsReply(m.req, Metrics(1, 0, 0.0, 0.0, 0.0, 1.0, 0, []))
        return None  # Heartbeat


@pytest.fixture
def fake() -> Iterator[FakeBroker]:
    broker = FakeBroker(short_tmpdir("fk-"))
    yield broker
    broker.stop()


@pytest.fixture
async def client(fake: FakeBroker) -> AsyncIterator[BrokerClient]:
    c = BrokerClient(fake.control, fake.data, name="unit", request_timeout=2.0)
    yield c
    await c.close()


def test_importing_clients_does_not_import_auth_code() -> None:
    code = (
        "import sys, clients, clients.sync; "
        "bad = [m for m in sys.modules if m == 'jwt' or m.startswith(('jwt.', 'broker.upbit', "
        "'broker.app', 'broker.exchange', 'broker.rest'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_arguments_means_the_configured_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPBIT_BROKER_CONTROL", "ipc:///tmp/x-control")
    monkeypatch.setenv("UPBIT_BROKER_DATA", "ipc:///tmp/x-data")
    c = BrokerClient()
    assert (c.control_endpoint, c.data_endpoint) == ("ipc:///tmp/x-control", "ipc:///tmp/x-data")


async def test_connect_without_a_broker_raises_unavailable_and_holds_nothing() -> None:
    rundir = short_tmpdir("nb-")
    c = BrokerClient(f"ipc://{rundir}/c", f"ipc://{rundir}/d", request_timeout=0.2)
    with pytest.raises(BrokerUnavailable):
        await c.connect()
    assert c._io is None
    assert not c.is_public_available()
    await c.close()


async def test_context_manager_hellos_and_says_bye(fake: FakeBroker) -> None:
    async with BrokerClient(fake.control, fake.data, name="cm") as c:
        assert c.connected
        assert c.is_public_available()
        assert not c.is_private_available()
        hello = fake.of(Hello)[0]
        assert (hello.name, hello.pid, hello.client_id) == ("cm", os.getpid(), c.client_id)
    await async_wait_until(lambda: fake.of(Bye), 5, what="bye")
    with pytest.raises(ClientClosed):
        await c.health()


async def test_subscribe_delivers_snapshot_then_updates(
    fake: FakeBroker, client: BrokerClient
) -> None:
    fake.snapshots[T_BTC] = [Envelope(T_BTC, 3, fake.epoch, 0, "websocket", ticker(price=3.0))]
    got: list[float] = []
    sub = await client.subscribe_ticker("krw-btc", lambda t: got.append(t.trade_price))
    assert sub.topics == (T_BTC,)
    assert fake.of(Subscribe)[0].streams == [StreamSpec("ticker", "KRW-BTC")]
    assert got == [3.0]
    fake.publish(T_BTC, ticker(price=4.0), seq=4)
    await async_wait_until(lambda: got == [3.0, 4.0], 5, what="update")


async def test_nothing_is_asked_before_the_data_socket_has_heard_the_broker(
    fake: FakeBroker, client: BrokerClient
) -> None:
    # The slow joiner: what the broker publishes before the SUB is connected is lost,
    # and a topic born after the request (a restarted broker's first private sync)
    # has no snapshot or sequence to reveal the loss. So Subscribe waits for data.
    fake.data_quiet = True
    fake.interval = 0.5  # the client counts the broker gone after 1.5 s of silence
    await client.connect()
    task = asyncio.create_task(client.subscribe_ticker(["KRW-BTC"]))
    beats = len(fake.of(Heartbeat))
    await async_wait_until(lambda: len(fake.of(Heartbeat)) > beats, 5, what="a client beat")
    assert fake.of(Subscribe) == [], "asked before the data path was live"
    assert not task.done()
    fake.data_quiet = False
    sub = await asyncio.wait_for(task, 5)
    assert len(fake.of(Subscribe)) == 1
    await sub.unsubscribe()


async def test_a_subscribe_waiting_for_the_data_path_ends_at_once_when_the_client_closes(
    fake: FakeBroker, client: BrokerClient
) -> None:
    # Like any request pending at close: ClientClosed now, not a timeout later that
    # blames the broker's data socket.
    fake.data_quiet = True
    await client.connect()
    task = asyncio.create_task(client.subscribe_ticker(["KRW-BTC"]))
    await async_wait_until(lambda: client.subscriptions, 5, what="the subscribe waiting")
    started = time.monotonic()
    await client.close()
    with pytest.raises(ClientClosed):
        await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 1.0, "the waiter slept out its timeout"
    assert fake.of(Subscribe) == []


async def test_a_subscribe_waiting_for_a_data_path_found_dead_is_retried_after_recovery(
    fake: FakeBroker,
) -> None:
    # The broker goes quiet while a first subscribe waits for its data path: the client
    # counts it gone and recovers; the subscribe is not failed with a data-socket error
    # but carried over to the recovered connection, like any request.
    fake.data_quiet = True
    fake.interval = 0.2  # gone after 0.6 s of silence; the subscribe may wait 4 s
    client = BrokerClient(fake.control, fake.data, name="unit", request_timeout=4.0)
    try:
        await client.connect()
        task = asyncio.create_task(client.subscribe_ticker(["KRW-BTC"]))
        hellos = len(fake.of(Hello))
        await async_wait_until(lambda: len(fake.of(Hello)) > hellos, 5, what="a recovery")
        fake.data_quiet = False
        sub = await asyncio.wait_for(task, 10)
        assert len(fake.of(Subscribe)) == 1
        await sub.unsubscribe()
    finally:
        await client.close()


async def test_async_iterator_subscription(fake: FakeBroker, client: BrokerClient) -> None:
    sub = await client.subscribe_trade(["KRW-BTC"])
    fake.publish("trade/KRW-BTC/", ticker(price=1.0))
    fake.publish("trade/KRW-BTC/", ticker(price=2.0))
    prices = []
    async with asyncio.timeout(5):
        async for item in sub:
            prices.append(item.trade_price)
            if len(prices) == 2:
                break
    assert prices == [1.0, 2.0]
    await sub.unsubscribe()
    assert fake.of(Unsubscribe)[0].streams == [StreamSpec("trade", "KRW-BTC")]


async def test_a_second_subscription_of_a_held_stream_asks_only_for_a_snapshot(
    fake: FakeBroker, client: BrokerClient
) -> None:
    fake.snapshots[T_BTC] = [Envelope(T_BTC, 1, fake.epoch, 0, "websocket", ticker())]
    first = await client.subscribe_ticker("KRW-BTC", lambda _: None)
    second_got: list[Any] = []
    second = await client.subscribe_ticker("KRW-BTC", second_got.append)
    assert len(fake.of(Subscribe)) == 1
    assert len(fake.of(GetSnapshot)) == 1
    assert len(second_got) == 1
    await first.unsubscribe()
    assert fake.of(Unsubscribe) == []  # still held by the second subscription
    await second.unsubscribe()
    await async_wait_until(lambda: fake.of(Unsubscribe), 5, what="unsubscribe")


async def test_broker_errors_carry_the_brokers_code(fake: FakeBroker, client: BrokerClient) -> None:
    fake.bad_codes.add("KRW-NOPE")
    with pytest.raises(BrokerError) as info:
        await client.subscribe_ticker(["KRW-NOPE"])
    assert info.value.code == "unknown_code"
    assert client.subscriptions == []


async def test_no_reply_raises_broker_timeout(fake: FakeBroker) -> None:
    c = BrokerClient(fake.control, fake.data, request_timeout=0.3)
    await c.connect()
    original = fake._answer

    def no_metrics(identity: bytes, m: ClientMessage) -> Any:
        # Alive (heartbeats flow) but this request is never answered.
        return None if isinstance(m, MetricsRequest) else original(identity, m)

    fake._answer = no_metrics  # type: ignore[method-assign]
    with pytest.raises(BrokerTimeout):
        await c.metrics()
    await c.close()


async def test_health_metrics_and_snapshot(fake: FakeBroker, client: BrokerClient) -> None:
    fake.snapshots["candle.5m/KRW-BTC/"] = [
        Envelope("candle.5m/KRW-BTC/", 0, fake.epoch, 0, "rest", ticker())
    ]
    assert (await client.health()).epoch == fake.epoch
    assert (await client.metrics()).active_connections == 1
    items = await client.get_snapshot("candle", ["KRW-BTC"], unit="5m")
    assert [e.topic for e in items] == ["candle.5m/KRW-BTC/"]


async def test_arguments_are_checked_before_anything_is_sent(client: BrokerClient) -> None:
    with pytest.raises(ValueError, match="unit"):
        await client.subscribe_candle("KRW-BTC", unit="7m")
    with pytest.raises(ValueError, match="codes"):
        await client.subscribe_ticker([])
    with pytest.raises(ValueError, match="market codes"):
        await client.subscribe_ticker(["KRW-BTC", ""])


async def test_malformed_messages_are_counted_and_skipped(
    fake: FakeBroker, client: BrokerClient
) -> None:
    got: list[float] = []
    await client.subscribe_ticker("KRW-BTC", lambda t: got.append(t.trade_price))
    fake.send_raw([b"ticker/KRW-BTC/\x00not msgpack", b"extra frame"])
    fake.send_raw([b"ticker/KRW-BTC/ without a topic end"])
    for price in (1.0, 2.0, 3.0):
        fake.publish(T_BTC, ticker(price=price))
    await async_wait_until(lambda: got[-1:] == [3.0], 5, what="stream realigned")
    assert client._dispatcher.decode_errors >= 1


async def test_a_wake_up_is_bounded_in_messages_and_the_rest_follows(
    fake: FakeBroker, client: BrokerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Frames of 16 messages: a wake-up stops after BATCH messages, not BATCH frames
    # (fairness to the loop's other tasks), and what is left still arrives, in order.
    monkeypatch.setattr(client_module, "BATCH", 20)
    got: list[float] = []
    per_wake: list[int] = []
    drain = BrokerClient._drain_data

    def counted(self: BrokerClient) -> None:
        before = len(got)
        drain(self)
        per_wake.append(len(got) - before)

    # On the class, before the client opens: every wake-up (reader or rescheduled) counts.
    monkeypatch.setattr(BrokerClient, "_drain_data", counted)
    await client.subscribe_ticker("KRW-BTC", lambda t: got.append(t.trade_price))
    frames = []
    for first in (1, 17, 33):
        bodies = [
            encode(Envelope(T_BTC, seq, fake.epoch, 1, "websocket", ticker(price=float(seq))))
            for seq in range(first, first + 16)
        ]
        frames.append(pack_published(T_BTC.encode(), *bodies))
    for frame in frames:
        fake.send_raw([frame])
    await async_wait_until(lambda: len(got) == 48, 5, what="all 48 messages")
    assert got == [float(seq) for seq in range(1, 49)]
    assert max(per_wake) <= 20 + 15, per_wake  # stops within the frame that crosses 20
    assert client.gaps == 0


async def test_heartbeats_carry_the_clients_counters(
    fake: FakeBroker, client: BrokerClient
) -> None:
    await client.subscribe_ticker("KRW-BTC", lambda _: None)
    fake.publish(T_BTC, ticker())
    await async_wait_until(lambda: any(h.received for h in fake.of(Heartbeat)), 5)


async def test_a_new_epoch_resubscribes_and_resnapshots_by_itself(
    fake: FakeBroker, client: BrokerClient
) -> None:
    got: list[float] = []
    states: list[str] = []
    await client.subscribe_ticker(
        "KRW-BTC", lambda t: got.append(t.trade_price), on_status=lambda e: states.append(e.state)
    )
    fake.publish(T_BTC, ticker(price=1.0))
    await async_wait_until(lambda: got == [1.0], 5)
    fake.restart()
    fake.snapshots[T_BTC] = [Envelope(T_BTC, 7, fake.epoch, 0, "websocket", ticker(price=7.0))]
    fake.publish("_heartbeat/", BrokerHeartbeat(timestamp=2))  # tells the client: new epoch
    await async_wait_until(lambda: len(fake.of(Subscribe)) == 2, 5, what="resubscribe")
    await async_wait_until(lambda: got == [1.0, 7.0], 5, what="new snapshot")
    fake.publish(T_BTC, ticker(price=8.0), seq=8)
    await async_wait_until(lambda: got == [1.0, 7.0, 8.0], 5)
    assert states == ["down", "gap", "reconnecting", "restored"]
    assert client.epoch == fake.epoch
    assert len(fake.of(Hello)) == 2
    # Back at another broker: it asks for that broker's private messages so far.
    assert [s.replay for s in fake.of(Subscribe)] == [False, True]


JOURNAL_GAP = "no longer keeps its first private messages"


@pytest.mark.parametrize("cut", [[], ["myOrder/KRW-BTC/"]])
async def test_a_replay_the_broker_says_is_cut_is_reported_as_a_gap(
    fake: FakeBroker, client: BrokerClient, cut: list[str]
) -> None:
    # Sequence numbers cannot tell (status events take numbers and are not replayed):
    # the broker's word decides, for the subscriptions whose topics it names.
    fake.private = True
    orders: list[StatusEvent] = []
    replayed: list[object] = []
    tickers: list[StatusEvent] = []
    await client.subscribe_my_order(None, replayed.append, on_status=orders.append)
    await client.subscribe_ticker("KRW-BTC", lambda _: None, on_status=tickers.append)
    fake.restart()
    fake.cut = cut
    fake.snapshots["myOrder/"] = [
        Envelope("myOrder/KRW-ETH/", 2, fake.epoch, 0, "rest", ticker(price=1.0))
    ]
    fake.publish("_heartbeat/", BrokerHeartbeat(timestamp=2))
    # The replay is delivered in the same step as any gap notice about it.
    await async_wait_until(lambda: replayed, 5, what="the replay")
    told = [e for e in orders if JOURNAL_GAP in e.detail]
    assert len(told) == (1 if cut else 0), orders
    assert all(e.state == "gap" for e in told)
    assert not any(JOURNAL_GAP in e.detail for e in tickers)


async def test_a_fresh_data_socket_asks_for_the_heartbeat_after_every_other_topic(
    fake: FakeBroker, client: BrokerClient
) -> None:
    # A broker applies one SUB's prefixes in the order sent: the client takes its data
    # path as live at the first heartbeat, which must then mean that every prefix of
    # its subscriptions is in place too (else a private event its resubscribe brings
    # out could be published before its topic's prefix arrived).
    await client.subscribe_ticker("KRW-BTC", lambda _: None)
    fake.restart()
    fake.publish("_heartbeat/", BrokerHeartbeat(timestamp=2))
    await async_wait_until(lambda: len(fake.of(Subscribe)) == 2, 5, what="resubscribe")
    log = fake.prefix_log
    last_heartbeat = len(log) - 1 - log[::-1].index(b"_heartbeat/")
    last_ticker = len(log) - 1 - log[::-1].index(T_BTC.encode())
    assert last_ticker < last_heartbeat, log


async def test_each_dealer_has_its_own_random_routing_id(
    fake: FakeBroker, client: BrokerClient
) -> None:
    await client.connect()
    fake.restart()
    fake.publish("_heartbeat/", BrokerHeartbeat(timestamp=2))  # new epoch: a fresh DEALER
    await async_wait_until(lambda: len(fake.hello_ids) == 2, 5, what="hello on a new DEALER")
    for routing_id in fake.hello_ids:
        assert len(routing_id) == 16
        assert routing_id[0] != 0  # libzmq's own ids start with a zero byte
    assert fake.hello_ids[0] != fake.hello_ids[1]


async def test_a_data_frame_over_the_bound_costs_a_resync_not_the_data_for_good(
    fake: FakeBroker, client: BrokerClient
) -> None:
    got: list[float] = []
    states: list[str] = []
    await client.subscribe_ticker(
        "KRW-BTC", lambda t: got.append(t.trade_price), on_status=lambda e: states.append(e.state)
    )
    fake.publish(T_BTC, ticker(price=1.0))
    await async_wait_until(lambda: got == [1.0], 5)
    # libzmq drops (and never reconnects) a PUB that sends over MAXMSGSIZE.
    fake.send_raw([pack_published(T_BTC.encode(), b"\x00" * (MAX_MESSAGE_BYTES + 1))])
    await async_wait_until(lambda: "restored" in states, 10, what="recovery with a fresh SUB")
    await async_wait_until(
        lambda: fake.publish(T_BTC, ticker(price=2.0)) and 2.0 in got, 5, what="data again"
    )
    assert states[:4] == ["down", "gap", "reconnecting", "restored"]
    assert all(price in (1.0, 2.0) for price in got)


async def test_an_expired_client_hellos_again(fake: FakeBroker, client: BrokerClient) -> None:
    await client.subscribe_ticker("KRW-BTC", lambda _: None)
    fake.known.clear()  # the broker expired us; our next heartbeat learns it
    await async_wait_until(lambda: len(fake.of(Subscribe)) == 2, 5, what="resubscribe")
    assert client.connected


async def test_a_silent_broker_is_detected_and_recovered(
    fake: FakeBroker, client: BrokerClient
) -> None:
    states: list[str] = []
    await client.subscribe_ticker(
        "KRW-BTC", lambda _: None, on_status=lambda e: states.append(e.state)
    )
    fake.silent = True
    await async_wait_until(lambda: not client.connected, 5, what="broker declared lost")
    assert not client.is_public_available()
    fake.silent = False
    await async_wait_until(
        lambda: client.connected and states == ["down", "gap", "reconnecting", "restored"], 5
    )
    assert client.is_public_available()


async def test_a_dropped_client_is_collected_and_says_bye(fake: FakeBroker) -> None:
    c = BrokerClient(fake.control, fake.data)
    sub = await c.subscribe_ticker("KRW-BTC")
    ref = weakref.ref(c)
    del c
    gc.collect()
    assert ref() is None  # neither tasks nor readers nor the subscription keep it alive
    await async_wait_until(lambda: fake.of(Bye), 5, what="bye from the finalizer")
    assert sub.closed
    assert [t async for t in sub] == []  # the iterator ends instead of waiting forever
    await sub.unsubscribe()  # harmless once the client is gone


def test_sync_client_end_to_end(fake: FakeBroker) -> None:
    fake.snapshots[T_BTC] = [Envelope(T_BTC, 1, fake.epoch, 0, "websocket", ticker(price=1.0))]
    threads: list[str] = []
    with SyncBrokerClient(fake.control, fake.data, name="sync") as c:
        assert c.health().epoch == fake.epoch
        it = c.subscribe_ticker("KRW-BTC")
        cb = c.subscribe_trade("KRW-BTC", lambda _: threads.append(threading.current_thread().name))
        fake.publish(T_BTC, ticker(price=2.0), seq=2)
        fake.publish("trade/KRW-BTC/", ticker())
        assert it.get(timeout=5).trade_price == 1.0
        assert it.get(timeout=5).trade_price == 2.0
        with pytest.raises(TimeoutError):
            it.get(timeout=0.05)
        wait_until(lambda: threads, 5)
        assert threads == ["upbit-broker-client"]
        with pytest.raises(TypeError):
            cb.get(0.01)
        it.unsubscribe()
        assert list(it.iter(timeout=1)) == []
    wait_until(lambda: fake.of(Bye), 5)


def test_sync_blocking_calls_from_a_callback_are_refused(fake: FakeBroker) -> None:
    errors: list[BaseException] = []
    with SyncBrokerClient(fake.control, fake.data) as c:

        def callback(_: object) -> None:
            try:
                c.health()
            except RuntimeError as exc:
                errors.append(exc)

        c.subscribe_ticker("KRW-BTC", callback)
        fake.publish(T_BTC, ticker())
        wait_until(lambda: errors, 5)


def test_a_dropped_sync_client_stops_its_thread(fake: FakeBroker) -> None:
    c = SyncBrokerClient(fake.control, fake.data)
    c.connect()
    thread = c._runner.thread
    del c
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()
    wait_until(lambda: fake.of(Bye), 5)


async def test_status_events_update_availability(fake: FakeBroker, client: BrokerClient) -> None:
    await client.connect()
    fake.publish("_status/public/", StatusEvent(connection="public", state="down"))
    await async_wait_until(lambda: not client.is_public_available(), 5)
    fake.publish("_status/public/", StatusEvent(connection="public", state="up"))
    await async_wait_until(client.is_public_available, 5)


async def test_a_request_during_a_restart_waits_and_is_retried(
    fake: FakeBroker, client: BrokerClient
) -> None:
    await client.connect()
    fake.restart()  # our next request is refused as unknown_client
    health = await client.health()
    assert health.epoch == fake.epoch
    assert client.epoch == fake.epoch


async def test_a_protocol_mismatch_is_a_broker_error(fake: FakeBroker) -> None:
    original = fake._answer

    def refuse_hello(identity: bytes, m: ClientMessage) -> Any:
        if isinstance(m, Hello):
            return ErrorReply(None, "protocol_version", "broker speaks protocol 2")
        return original(identity, m)

    fake._answer = refuse_hello  # type: ignore[method-assign]
    c = BrokerClient(fake.control, fake.data, request_timeout=2.0)
    with pytest.raises(BrokerError) as info:
        await c.connect()
    assert info.value.code == "protocol_version"
    await c.close()


async def test_an_unsolicited_welcome_from_a_new_epoch_triggers_recovery(
    fake: FakeBroker, client: BrokerClient
) -> None:
    await client.subscribe_ticker("KRW-BTC", lambda _: None)
    fake.restart()
    await asyncio.to_thread(_send_welcome, fake)
    await async_wait_until(lambda: client.epoch == fake.epoch, 5, what="new epoch adopted")


def _send_welcome(fake: FakeBroker) -> None:
    # The broker never does this, but a client must cope: answer its next message twice.
    original = fake._answer

    def twice(identity: bytes, m: ClientMessage) -> Any:
        reply = original(identity, m)
        if isinstance(m, Heartbeat):
            return Welcome(fake.epoch, 1, fake.interval, 3, True, False)
        return reply

    fake._answer = twice  # type: ignore[method-assign]


async def test_a_stream_the_restarted_broker_refuses_is_reported_the_others_resume(
    fake: FakeBroker, client: BrokerClient
) -> None:
    eth_states: list[StatusEvent] = []
    btc: list[float] = []
    await client.subscribe_ticker("KRW-BTC", lambda t: btc.append(t.trade_price))
    await client.subscribe_ticker("KRW-ETH", lambda _: None, on_status=eth_states.append)
    fake.bad_codes.add("KRW-ETH")
    fake.restart()
    fake.publish("_heartbeat/", BrokerHeartbeat(timestamp=3))
    await async_wait_until(lambda: any(e.state == "error" for e in eth_states), 5)
    fake.publish(T_BTC, ticker(price=5.0))
    await async_wait_until(lambda: btc == [5.0], 5, what="KRW-BTC resumed")
    assert "unknown_code" in next(e.detail for e in eth_states if e.state == "error")


async def test_async_status_callback_and_snapshot_variants(
    fake: FakeBroker, client: BrokerClient
) -> None:
    states: list[str] = []

    async def on_status(event: StatusEvent) -> None:
        states.append(event.state)

    got: list[float] = []
    sub = await client.subscribe_orderbook(
        "KRW-BTC", lambda b: got.append(b.total_ask_size), depth=5, on_status=on_status
    )
    assert sub.needs_worker
    assert sub.topics == ("orderbook/KRW-BTC/5/0/",)
    fake.publish("_status/public/", StatusEvent(connection="public", state="reconnecting"))
    fake.publish("orderbook/KRW-BTC/5/0/", orderbook(9.0))
    await async_wait_until(lambda: states == ["reconnecting"] and got == [9.0], 5)
    assert await client.get_snapshot("candle.5m", "KRW-BTC") == []
    assert await client.get_snapshot("myOrder") == []
    assert await client.get_snapshot("myAsset") == []
    assert [s.streams for s in fake.of(GetSnapshot)] == [
        [StreamSpec("candle.5m", "KRW-BTC")],
        [StreamSpec("myOrder")],
        [StreamSpec("myAsset")],
    ]


def test_sync_client_wrappers(fake: FakeBroker) -> None:
    fake.private = True
    statuses: list[str] = []
    with SyncBrokerClient(fake.control, fake.data) as c:
        assert c.connected
        assert c.is_public_available()
        assert c.is_private_available()
        assert c.metrics().active_connections == 1
        assert c.get_snapshot("ticker", "KRW-BTC") == []
        book = c.subscribe_orderbook(
            "KRW-BTC", None, depth=15, on_status=lambda e: statuses.append(e.state)
        )
        candle = c.subscribe_candle("KRW-BTC", lambda _: None, unit="3m")
        orders = c.subscribe_my_order(None, lambda _: None)
        assets = c.subscribe_my_asset(lambda _: None)
        assert [s.topics for s in (candle, orders, assets)] == [
            ("candle.3m/KRW-BTC/",),
            ("myOrder/",),
            ("myAsset/",),
        ]
        fake.publish("_status/public/", StatusEvent(connection="public", state="down"))
        fake.publish("orderbook/KRW-BTC/15/0/", orderbook(1.0))
        assert book.get(timeout=5).total_ask_size == 1.0
        assert statuses == ["down"]
        assert book.last_envelope is not None
        assert (book.received, book.dropped, book.gaps, book.errors) == (1, 0, 0, 0)
        assert book.streams[0].depth == 15
        assert "orderbook/KRW-BTC/15/0/" in repr(book)
        assert c.client.connected
    c.close()  # idempotent
    with pytest.raises(ClientClosed):
        c.health()
    assert book.closed
    book.unsubscribe()  # harmless after close
