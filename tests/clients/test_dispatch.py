"""Client-side dispatch without sockets: routing, the Clone pattern, isolation, bounds."""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

import pytest

from clients.dispatch import BoundedQueue, Dispatcher, Subscription, is_async_callable
from clients.errors import ClientClosed
from schemas.bus import (
    BrokerHeartbeat,
    Envelope,
    StatusEvent,
    StreamSpec,
    encode,
    pack_published,
)
from schemas.upbit import MyOrder, Ticker

EPOCH = "e1"


def ticker(code: str = "KRW-BTC", price: float = 1.0) -> Ticker:
    return Ticker(
        code=code,
        opening_price=price,
        high_price=price,
        low_price=price,
        trade_price=price,
        prev_closing_price=price,
        change="EVEN",
        change_price=0.0,
        signed_change_price=0.0,
        change_rate=0.0,
        signed_change_rate=0.0,
        trade_volume=1.0,
        acc_trade_volume=1.0,
        acc_trade_volume_24h=1.0,
        acc_trade_price=1.0,
        acc_trade_price_24h=1.0,
        trade_date="20250101",
        trade_time="000000",
        trade_timestamp=0,
        timestamp=0,
    )


def my_order(code: str) -> MyOrder:
    return MyOrder(
        code=code, uuid="u", ask_bid="BID", order_type="limit", state="wait", timestamp=0
    )


def env(topic: str, seq: int, data: Any = None, epoch: str = EPOCH) -> Envelope:
    if data is None:
        data = ticker(topic.split("/")[1], float(seq))
    return Envelope(topic, seq, epoch, 1_000_000 * seq, "websocket", data)


def feed(d: Dispatcher, *envelopes: Envelope) -> None:
    for e in envelopes:
        d.dispatch(pack_published(e.topic.encode(), encode(e)))


def live(d: Dispatcher, sub: Subscription[Any], snapshot: list[Envelope] | None = None) -> None:
    d.add(sub)
    d.activate(sub, snapshot or [])


def collecting(streams: list[StreamSpec], **kw: Any) -> tuple[Subscription[Any], list[Any]]:
    got: list[Any] = []
    return Subscription(streams, got.append, **kw), got


@pytest.fixture
def d() -> Dispatcher:
    dispatcher = Dispatcher()
    dispatcher.resume(EPOCH)
    return dispatcher


T_BTC = "ticker/KRW-BTC/"


def test_a_message_reaches_only_the_subscription_of_its_topic(d: Dispatcher) -> None:
    btc, got_btc = collecting([StreamSpec("ticker", "KRW-BTC")])
    eth, got_eth = collecting([StreamSpec("ticker", "KRW-ETH")])
    live(d, btc)
    live(d, eth)
    feed(d, env(T_BTC, 1), env("ticker/KRW-ETH/", 1), env(T_BTC, 2))
    assert [t.trade_price for t in got_btc] == [1.0, 2.0]
    assert [t.code for t in got_eth] == ["KRW-ETH"]
    assert btc.received == 2


def test_a_topic_is_not_a_prefix_of_a_longer_code(d: Dispatcher) -> None:
    eth, got = collecting([StreamSpec("ticker", "KRW-ETH")])
    live(d, eth)
    feed(d, env("ticker/KRW-ETHW/", 1))
    assert got == []
    assert d.unrouted == 1


def test_my_order_without_code_receives_every_market_once(d: Dispatcher) -> None:
    every, got_every = collecting([StreamSpec("myOrder")])
    one, got_one = collecting([StreamSpec("myOrder", "KRW-BTC")])
    live(d, every)
    live(d, one)
    feed(
        d,
        env("myOrder/KRW-BTC/", 1, my_order("KRW-BTC")),
        env("myOrder/KRW-ETH/", 1, my_order("KRW-ETH")),
    )
    assert [o.code for o in got_every] == ["KRW-BTC", "KRW-ETH"]
    assert [o.code for o in got_one] == ["KRW-BTC"]


def test_add_and_remove_report_prefixes_only_on_first_and_last_use(d: Dispatcher) -> None:
    a, got_a = collecting([StreamSpec("ticker", "KRW-BTC")])
    b, got_b = collecting([StreamSpec("ticker", "KRW-BTC"), StreamSpec("trade", "KRW-BTC")])
    assert d.add(a) == [T_BTC]
    assert d.add(b) == ["trade/KRW-BTC/"]
    d.activate(a, [])
    d.activate(b, [])
    feed(d, env(T_BTC, 1))
    assert d.remove(a) == []
    feed(d, env(T_BTC, 2))
    assert len(got_a) == 1
    assert len(got_b) == 2
    assert sorted(d.remove(b)) == [T_BTC, "trade/KRW-BTC/"]
    assert d.prefixes == []


def test_unsubscribed_topics_forget_their_sequence(d: Dispatcher) -> None:
    a, _ = collecting([StreamSpec("ticker", "KRW-BTC")])
    live(d, a)
    feed(d, env(T_BTC, 5))
    d.remove(a)
    assert d.tracker.last_seq(T_BTC) is None


def test_a_raising_callback_does_not_stop_the_others(d: Dispatcher) -> None:
    def boom(_: object) -> None:
        raise RuntimeError("user bug")

    bad: Subscription[Any] = Subscription([StreamSpec("ticker", "KRW-BTC")], boom)
    good, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    live(d, bad)
    live(d, good)
    feed(d, env(T_BTC, 1), env(T_BTC, 2), env(T_BTC, 3))
    assert len(got) == 3
    assert bad.errors == 3
    assert bad.received == 3


def test_last_envelope_is_the_delivered_messages_envelope(d: Dispatcher) -> None:
    seen: list[int] = []
    sub: Subscription[Any] = Subscription(
        [StreamSpec("ticker", "KRW-BTC")],
        lambda _: seen.append(sub.last_envelope.seq if sub.last_envelope else -1),
    )
    live(d, sub)
    feed(d, env(T_BTC, 1), env(T_BTC, 2))
    assert seen == [1, 2]


def test_the_queue_drops_the_oldest_and_counts(d: Dispatcher) -> None:
    sub: Subscription[Any] = Subscription([StreamSpec("ticker", "KRW-BTC")], maxsize=3)
    live(d, sub)
    feed(d, *(env(T_BTC, i) for i in range(1, 8)))
    assert sub.dropped == 4
    assert sub.received == 7
    queue = sub._queue
    assert queue is not None
    assert [queue.get_nowait().seq for _ in range(3)] == [5, 6, 7]  # type: ignore[union-attr]


async def test_async_iteration_yields_snapshot_then_updates_and_ends_on_close(
    d: Dispatcher,
) -> None:
    sub: Subscription[Any] = Subscription([StreamSpec("ticker", "KRW-BTC")])
    d.add(sub)
    feed(d, env(T_BTC, 4), env(T_BTC, 5))  # arrive while the subscribe is in flight
    d.activate(sub, [env(T_BTC, 4)])
    feed(d, env(T_BTC, 6))
    sub._close()
    seqs = []
    async for _ in sub:
        assert sub.last_envelope is not None
        seqs.append(sub.last_envelope.seq)
    assert seqs == [4, 5, 6]


async def test_a_slow_async_callback_does_not_block_a_sync_one(d: Dispatcher) -> None:
    release = asyncio.Event()
    slow_got: list[Any] = []

    async def slow(payload: Any) -> None:
        await release.wait()
        slow_got.append(payload)

    slow_sub: Subscription[Any] = Subscription([StreamSpec("ticker", "KRW-BTC")], slow)
    fast, fast_got = collecting([StreamSpec("ticker", "KRW-BTC")])
    assert slow_sub.needs_worker
    live(d, slow_sub)
    live(d, fast)
    worker = asyncio.create_task(slow_sub._work())
    feed(d, *(env(T_BTC, i) for i in range(1, 4)))
    assert len(fast_got) == 3
    assert slow_got == []
    release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert [p.trade_price for p in slow_got] == [1.0, 2.0, 3.0]
    worker.cancel()


async def test_a_raising_async_callback_keeps_its_worker_alive(d: Dispatcher) -> None:
    calls: list[int] = []

    async def flaky(payload: Any) -> None:
        calls.append(int(payload.trade_price))
        if len(calls) == 1:
            raise ValueError("first one fails")

    sub: Subscription[Any] = Subscription([StreamSpec("ticker", "KRW-BTC")], flaky)
    live(d, sub)
    worker = asyncio.create_task(sub._work())
    feed(d, env(T_BTC, 1), env(T_BTC, 2))
    for _ in range(10):
        await asyncio.sleep(0)
    assert calls == [1, 2]
    assert sub.errors == 1
    sub._close()
    await asyncio.sleep(0)
    worker.cancel()


def test_clone_pattern_delivers_snapshot_then_only_newer_buffered_updates(
    d: Dispatcher,
) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    d.add(sub)
    feed(d, env(T_BTC, 5), env(T_BTC, 6), env(T_BTC, 7))
    d.activate(sub, [env(T_BTC, 6)])
    feed(d, env(T_BTC, 8))
    assert [t.trade_price for t in got] == [6.0, 7.0, 8.0]


def test_updates_the_snapshot_already_covered_are_dropped_after_activation(
    d: Dispatcher,
) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    d.add(sub)
    d.activate(sub, [env(T_BTC, 9)])  # the reply overtook the updates on the SUB socket
    feed(d, env(T_BTC, 8), env(T_BTC, 9), env(T_BTC, 10))
    assert [t.trade_price for t in got] == [9.0, 10.0]
    assert d.gaps == 0


def test_a_late_joiner_does_not_steal_updates_from_an_earlier_subscriber(
    d: Dispatcher,
) -> None:
    first, got_first = collecting([StreamSpec("ticker", "KRW-BTC")])
    live(d, first)
    feed(d, env(T_BTC, 1))
    second, got_second = collecting([StreamSpec("ticker", "KRW-BTC")])
    d.add(second)
    d.activate(second, [env(T_BTC, 3)])  # newer than what the SUB socket delivered yet
    feed(d, env(T_BTC, 2), env(T_BTC, 3), env(T_BTC, 4))
    assert [t.trade_price for t in got_first] == [1.0, 2.0, 3.0, 4.0]
    assert [t.trade_price for t in got_second] == [3.0, 4.0]
    assert d.gaps == 0


def test_a_sequence_jump_is_counted_delivered_and_noticed(d: Dispatcher) -> None:
    notices: list[StatusEvent] = []
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")], on_status=notices.append)
    live(d, sub)
    feed(d, env(T_BTC, 1), env(T_BTC, 5))
    assert [t.trade_price for t in got] == [1.0, 5.0]
    assert (sub.gaps, d.gaps, d.missed) == (1, 1, 3)
    assert [(n.state, n.topics) for n in notices] == [("gap", [T_BTC])]


def test_a_repeated_sequence_is_dropped(d: Dispatcher) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    live(d, sub)
    feed(d, env(T_BTC, 1), env(T_BTC, 2), env(T_BTC, 2))
    assert len(got) == 2


def test_a_rest_snapshot_sets_no_baseline(d: Dispatcher) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    d.add(sub)
    d.activate(sub, [env(T_BTC, 0)])
    feed(d, env(T_BTC, 41), env(T_BTC, 42))
    assert [t.trade_price for t in got] == [0.0, 41.0, 42.0]
    assert d.gaps == 0


def test_broker_status_events_on_a_data_topic_go_to_on_status_only(d: Dispatcher) -> None:
    notices: list[StatusEvent] = []
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")], on_status=notices.append)
    live(d, sub)
    gap = StatusEvent(connection="public", state="gap", detail="link down")
    feed(d, env(T_BTC, 1), env(T_BTC, 2, gap), env(T_BTC, 3))
    assert [t.trade_price for t in got] == [1.0, 3.0]
    assert [n.state for n in notices] == ["gap"]
    assert d.gaps == 0  # the status event used seq 2: no gap


def test_connection_events_reach_that_connections_subscriptions_in_order(
    d: Dispatcher,
) -> None:
    seen: list[str] = []
    public: Subscription[Any] = Subscription(
        [StreamSpec("ticker", "KRW-BTC")],
        lambda t: seen.append(f"ticker {t.trade_price:g}"),
        on_status=lambda e: seen.append(e.state),
    )
    private_states: list[StatusEvent] = []
    private, got_private = collecting([StreamSpec("myAsset")], on_status=private_states.append)
    live(d, public)
    live(d, private)
    down = StatusEvent(connection="public", state="down")
    feed(
        d,
        env(T_BTC, 1),
        env("_status/public/", 1, down),
        env("_heartbeat/", 1, BrokerHeartbeat(timestamp=1)),
        env(T_BTC, 2),
    )
    assert seen == ["ticker 1", "down", "ticker 2"]
    assert got_private == private_states == []
    assert [e.data for e in d.status_events] == [down]


def test_an_envelope_from_another_epoch_is_reported_not_delivered(d: Dispatcher) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    live(d, sub)
    feed(d, env(T_BTC, 1, epoch="e2"))
    assert got == []
    assert d.foreign_epoch == "e2"
    feed(d, env("_heartbeat/", 1, BrokerHeartbeat(timestamp=1), epoch="e3"))
    assert d.foreign_epoch == "e3"


def test_after_a_restart_old_epoch_leftovers_are_ignored(d: Dispatcher) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    live(d, sub)
    feed(d, env(T_BTC, 7))
    d.suspend()
    feed(d, env(T_BTC, 8), env(T_BTC, 1, epoch="e2"))  # before the Welcome: dropped
    d.resume("e2")
    feed(d, env(T_BTC, 2, epoch="e2"))  # buffered while the re-subscribe is in flight
    d.activate(sub, [env(T_BTC, 2, epoch="e2")])
    feed(d, env(T_BTC, 9))  # straggler from the dead broker
    feed(d, env(T_BTC, 3, epoch="e2"))
    assert [e.trade_price for e in got] == [7.0, 2.0, 3.0]
    assert d.foreign_epoch is None
    assert d.gaps == 0


def test_undecodable_frames_are_counted_and_skipped(d: Dispatcher) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    live(d, sub)
    d.dispatch(pack_published(T_BTC.encode(), b"\xc1garbage"))
    d.dispatch(T_BTC.encode() + encode(env(T_BTC, 1)))  # no topic end (protocol 1)
    feed(d, env(T_BTC, 1))
    assert d.decode_errors == 2
    assert len(got) == 1


def test_a_batch_is_delivered_in_order_with_every_envelope_checked(d: Dispatcher) -> None:
    seen: list[str] = []
    sub: Subscription[Any] = Subscription(
        [StreamSpec("ticker", "KRW-BTC")],
        lambda t: seen.append(f"ticker {t.trade_price:g}"),
        on_status=lambda e: seen.append(e.state),
    )
    live(d, sub)
    stale = StatusEvent(connection="public", state="stale")
    batch = [env(T_BTC, 1), env(T_BTC, 2), env(T_BTC, 2), env(T_BTC, 3, stale), env(T_BTC, 6)]
    assert d.dispatch(pack_published(T_BTC.encode(), *(encode(e) for e in batch)))
    # The repeated seq 2 is dropped; the jump from 3 to 6 is a gap of 2 noticed before 6.
    assert seen == ["ticker 1", "ticker 2", "stale", "gap", "ticker 6"]
    assert (d.received, d.gaps, d.missed, sub.received) == (5, 1, 2, 3)


def test_a_bare_envelope_of_protocol_2_is_counted_not_delivered(d: Dispatcher) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    live(d, sub)
    assert not d.dispatch(T_BTC.encode() + b"\x00" + encode(env(T_BTC, 1)))
    assert not d.dispatch(pack_published(T_BTC.encode()))  # an empty batch
    assert (d.decode_errors, got) == (2, [])


def test_the_pending_buffer_is_bounded(d: Dispatcher) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")], maxsize=2)
    d.add(sub)
    feed(d, *(env(T_BTC, i) for i in range(1, 6)))
    d.activate(sub, [])
    assert [t.trade_price for t in got] == [4.0, 5.0]
    assert sub.dropped == 3


def test_retopic_follows_the_brokers_spelling(d: Dispatcher) -> None:
    sub, got = collecting([StreamSpec("ticker", "krw-btc")])
    d.add(sub)
    added, removed = d.retopic(sub, [T_BTC])
    assert (added, removed) == ([T_BTC], ["ticker/krw-btc/"])
    d.activate(sub, [])
    feed(d, env(T_BTC, 1))
    assert len(got) == 1


def test_a_subscription_with_a_callback_is_not_iterable() -> None:
    sub: Subscription[Any] = Subscription([StreamSpec("ticker", "KRW-BTC")], print)
    with pytest.raises(TypeError):
        aiter(sub)


def test_async_callables_are_recognised() -> None:
    async def handler(x: object, y: object = None) -> None:
        return None

    class Handler:
        async def __call__(self, x: object) -> None:
            return None

    assert is_async_callable(handler)
    assert is_async_callable(functools.partial(handler, y=1))
    assert is_async_callable(Handler())
    assert not is_async_callable(print)
    assert not is_async_callable(lambda x: x)


def test_blocking_get_times_out_and_wakes_on_put_from_another_thread() -> None:
    queue = BoundedQueue(4)
    with pytest.raises(TimeoutError):
        queue.get_blocking(0.01)
    item = env(T_BTC, 1)
    timer = threading.Timer(0.05, queue.put, (item,))
    timer.start()
    assert queue.get_blocking(5.0) is item
    timer.join()
    threading.Timer(0.05, queue.close).start()
    with pytest.raises(ClientClosed):
        queue.get_blocking(5.0)


async def test_async_get_wakes_on_put_and_raises_once_closed_and_empty() -> None:
    queue = BoundedQueue(4)
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put(env(T_BTC, 1))
    assert (await getter).seq == 1
    queue.put(env(T_BTC, 2))
    queue.close()
    assert (await queue.get()).seq == 2
    with pytest.raises(ClientClosed):
        await queue.get()


def test_a_recovery_against_the_same_broker_does_not_deliver_the_last_value_again(
    d: Dispatcher,
) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    live(d, sub)
    feed(d, env(T_BTC, 5), env(T_BTC, 6))
    d.suspend()  # expired by the broker: hello and subscribe again, same epoch
    d.resume(EPOCH)
    d.activate(sub, [env(T_BTC, 6)])  # the snapshot is the message it already has
    feed(d, env(T_BTC, 7))
    assert [t.trade_price for t in got] == [5.0, 6.0, 7.0]


def test_after_a_broker_restart_the_snapshot_is_delivered_even_at_the_same_seq(
    d: Dispatcher,
) -> None:
    sub, got = collecting([StreamSpec("ticker", "KRW-BTC")])
    live(d, sub)
    feed(d, env(T_BTC, 1), env(T_BTC, 2))
    d.suspend()
    d.resume("e2")  # a new broker numbers from 1 again
    d.activate(sub, [env(T_BTC, 2, epoch="e2")])
    assert [t.trade_price for t in got] == [1.0, 2.0, 2.0]


def test_a_replay_delivers_every_value_in_order_and_baselines_at_the_last(
    d: Dispatcher,
) -> None:
    # After a broker restart the client asks for the private messages published
    # before it was back: several of one topic, then live updates continue from them.
    topic = "myOrder/KRW-BTC/"
    sub, got = collecting([StreamSpec("myOrder")])
    d.add(sub)
    d.activate(sub, [env(topic, seq, my_order("KRW-BTC")) for seq in (1, 2, 3)])
    feed(d, env(topic, 4, my_order("KRW-BTC")))
    assert len(got) == 4
    assert d.tracker.gaps == 0
