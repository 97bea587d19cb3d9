"""Every public method of the client library against the real broker and simulator.

The ``broker`` fixture exports the broker's endpoints in the environment, so
``BrokerClient()`` here finds it with no arguments, exactly like a user's process.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest

from clients import BrokerClient, BrokerError, SyncBrokerClient
from schemas.bus import Envelope, StatusEvent
from schemas.upbit import Candle, MyAsset, MyOrder, Orderbook, Ticker, Trade
from tests.integration.conftest import BrokerProc, Sim
from tests.support import async_wait_until, scaled, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def client(broker: BrokerProc) -> AsyncIterator[BrokerClient]:
    """A connected client, found through the environment only."""
    async with BrokerClient(name="api-test", request_timeout=scaled(10)) as c:
        yield c


def contiguous(seqs: list[int]) -> bool:
    return seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_ticker_sync_callback_gets_snapshot_then_contiguous_updates(
    client: BrokerClient,
) -> None:
    seen: list[tuple[str, int]] = []
    holder: dict[str, Any] = {}

    def on_ticker(ticker: Ticker) -> None:
        env = holder["sub"].last_envelope
        seen.append((ticker.code, env.seq))

    holder["sub"] = await client.subscribe_ticker(["krw-btc"], on_ticker)
    assert holder["sub"].topics == ("ticker/KRW-BTC/",)
    await async_wait_until(lambda: len(seen) >= 5, 20, what="5 tickers")
    assert {code for code, _ in seen} == {"KRW-BTC"}
    assert contiguous([seq for _, seq in seen])
    assert client.gaps == 0


async def test_trade_async_callback(client: BrokerClient) -> None:
    trades: list[Trade] = []

    async def on_trade(trade: Trade) -> None:
        await asyncio.sleep(0)
        trades.append(trade)

    sub = await client.subscribe_trade("KRW-BTC", on_trade)
    await async_wait_until(lambda: len(trades) >= 3, 20, what="3 trades")
    assert all(isinstance(t, Trade) and t.code == "KRW-BTC" for t in trades)
    assert sub.received >= 3
    assert sub.errors == 0


async def test_orderbook_with_depth_delivers_that_many_levels(client: BrokerClient) -> None:
    books: list[Orderbook] = []
    sub = await client.subscribe_orderbook("KRW-BTC", books.append, depth=5)
    assert sub.topics == ("orderbook/KRW-BTC/5/0/",)
    await async_wait_until(lambda: len(books) >= 3, 20, what="3 books")
    assert {len(b.orderbook_units) for b in books} == {5}


async def test_candle_callback(client: BrokerClient) -> None:
    candles: list[Candle] = []
    await client.subscribe_candle("KRW-BTC", candles.append, unit="1s")
    await async_wait_until(lambda: len(candles) >= 2, 20, what="2 candles")
    assert all(c.type == "candle.1s" and c.code == "KRW-BTC" for c in candles)


async def test_async_iterator_ends_after_unsubscribe(client: BrokerClient) -> None:
    sub = await client.subscribe_ticker(["KRW-ETH", "KRW-XRP"])
    codes: set[str] = set()
    async with asyncio.timeout(scaled(20)):
        async for ticker in sub:
            codes.add(ticker.code)
            if codes == {"KRW-ETH", "KRW-XRP"}:
                break
    await sub.unsubscribe()
    async with asyncio.timeout(scaled(5)):
        rest = [t async for t in sub]  # what was queued, then the end
    assert all(isinstance(t, Ticker) for t in rest)
    assert client.subscriptions == []


async def test_unsubscribe_releases_the_stream_at_the_broker(client: BrokerClient) -> None:
    sub = await client.subscribe_trade("KRW-ETH", lambda _: None)
    health = await client.health()
    assert health.active_subscriptions >= 1

    async def my_streams() -> int:
        rows = [r for r in (await client.metrics()).clients if r.name == "api-test"]
        return rows[0].streams if rows else 0

    assert await my_streams() == 1
    await sub.unsubscribe()
    assert await my_streams() == 0


async def test_get_snapshot_without_subscribing(client: BrokerClient) -> None:
    items = await client.get_snapshot("ticker", ["KRW-BTC", "KRW-ETH"])
    assert sorted(e.topic for e in items) == ["ticker/KRW-BTC/", "ticker/KRW-ETH/"]
    assert all(isinstance(e, Envelope) and isinstance(e.data, Ticker) for e in items)
    books = await client.get_snapshot("orderbook", "KRW-BTC", depth=15)
    assert [len(e.data.orderbook_units) for e in books] == [15]  # type: ignore[union-attr]
    candles = await client.get_snapshot("candle", "KRW-BTC", unit="1m")
    assert all(e.topic == "candle.1m/KRW-BTC/" for e in candles)


async def test_health_metrics_and_availability(client: BrokerClient) -> None:
    health = await client.health()
    assert health.epoch == client.epoch
    assert health.status in ("healthy", "degraded", "critical")
    metrics = await client.metrics()
    assert any(row.name == "api-test" for row in metrics.clients)
    got: list[Ticker] = []
    await client.subscribe_ticker("KRW-BTC", got.append)
    await async_wait_until(client.is_public_available, 10, what="public available")
    await async_wait_until(lambda: len(got) >= 3, 20, what="3 tickers")
    metrics = await client.metrics()
    # Every ticker this client got was published; frames carry one or more each.
    assert metrics.published_messages >= len(got) - 1  # the first may be the snapshot
    assert 1 <= metrics.published_frames <= metrics.published_messages
    assert not client.is_private_available()  # this broker has no keys


async def test_broker_errors_carry_the_brokers_code(client: BrokerClient) -> None:
    with pytest.raises(BrokerError) as unknown:
        await client.subscribe_ticker(["KRW-NOPE"])
    assert unknown.value.code == "unknown_code"
    with pytest.raises(BrokerError) as private:
        await client.subscribe_my_asset()
    assert private.value.code == "private_unavailable"
    with pytest.raises(BrokerError) as option:
        await client.get_snapshot("orderbook", "KRW-BTC", level=-1)
    assert option.value.code == "invalid_option"
    assert client.subscriptions == []
    assert (await client.health()).epoch == client.epoch  # still usable


async def test_a_raising_callback_does_not_stop_another(client: BrokerClient) -> None:
    good: list[Ticker] = []

    def bad(_: Ticker) -> None:
        raise RuntimeError("user bug")

    failing = await client.subscribe_ticker("KRW-BTC", bad)
    await client.subscribe_ticker("KRW-BTC", good.append)
    await async_wait_until(lambda: len(good) >= 5, 20, what="5 tickers despite the bug")
    assert failing.errors >= 4


async def test_a_broker_restart_is_recovered_without_user_code(
    broker: BrokerProc, client: BrokerClient
) -> None:
    epochs: list[str] = []
    states: list[str] = []
    holder: dict[str, Any] = {}

    def on_ticker(_: Ticker) -> None:
        epochs.append(holder["sub"].last_envelope.epoch)

    def on_status(event: StatusEvent) -> None:
        states.append(event.state)

    holder["sub"] = await client.subscribe_ticker("KRW-BTC", on_ticker, on_status=on_status)
    await async_wait_until(lambda: len(epochs) >= 2, 20, what="first tickers")
    first = client.epoch
    await asyncio.to_thread(broker.restart)
    await async_wait_until(
        lambda: epochs[-1] != first, 30, what="tickers from the restarted broker"
    )
    assert client.epoch == epochs[-1]
    assert "down" in states  # told by the client when the broker went away
    assert "restored" in states  # and when it was back, resubscribed


def test_sync_client_end_to_end(broker: BrokerProc) -> None:
    threads: set[str] = set()
    with SyncBrokerClient(name="sync-test") as client:
        assert client.health().epoch
        assert client.get_snapshot("trade", "KRW-BTC")
        books = client.subscribe_orderbook("KRW-BTC", depth=1)
        first = books.get(timeout=scaled(20))
        assert isinstance(first, Orderbook)
        assert len(first.orderbook_units) == 1
        client.subscribe_ticker("KRW-BTC", lambda _: threads.add(threading.current_thread().name))
        wait_until(lambda: threads, 20, what="a callback")
        assert threads == {"upbit-broker-client"}
        assert client.is_public_available()
        assert any(r.name == "sync-test" for r in client.metrics().clients)
        books.unsubscribe()
        assert books.closed
        assert all(isinstance(b, Orderbook) for b in books)  # queued leftovers, then the end


async def test_dropping_a_client_releases_its_streams_at_the_broker(
    client: BrokerClient,
) -> None:
    dropped = BrokerClient(name="dropped")
    await dropped.subscribe_ticker(["KRW-BTC", "KRW-ETH"], lambda _: None)
    metrics = await client.metrics()
    assert [r.streams for r in metrics.clients if r.name == "dropped"] == [2]

    seen: list[object] = []

    async def released() -> bool:
        metrics = await client.metrics()
        health = await client.health()
        seen[:] = [metrics.clients, health.active_subscriptions]
        gone = all(row.name != "dropped" for row in metrics.clients)
        return gone and health.active_subscriptions == 0

    ref = weakref.ref(dropped)
    del dropped  # no close(): the finalizer must say Bye
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())
    try:
        async with asyncio.timeout(scaled(10)):  # the broker drops it on Bye
            while not await released():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"streams not released: {seen}")


async def test_private_streams_with_keys(private_broker: BrokerProc, sim: Sim) -> None:
    async with BrokerClient(name="private-test") as client:
        await async_wait_until(client.is_private_available, 20, what="private link up")
        orders: list[MyOrder] = []
        assets: list[MyAsset] = []
        await client.subscribe_my_order(None, orders.append)
        await client.subscribe_my_asset(assets.append)
        snapshot = await client.get_snapshot("myAsset")
        assert [type(e.data) for e in snapshot] == [MyAsset]

        def upstream_has_private_streams() -> bool:
            conns = sim.connections("/websocket/v1/private")
            types = {t.get("type") for c in conns for t in c.get("subscription") or []}
            return {"myOrder", "myAsset"} <= types

        # subscribe returns before Upbit carries the stream (no ack upstream): wait for it
        await async_wait_until(upstream_has_private_streams, 20, what="upstream request")
        body = {"market": "KRW-BTC", "side": "ask", "ord_type": "market", "volume": "0.01"}
        await asyncio.to_thread(sim.control, "orders", body)
        await async_wait_until(lambda: orders and assets, 20, what="myOrder and myAsset")
        assert all(o.code == "KRW-BTC" for o in orders)
        assert client.is_private_available()
