"""Bad requests get a clear error to their sender only; everybody else keeps streaming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
import zmq
import zmq.asyncio

from clients import BrokerClient, BrokerError
from schemas.bus import (
    ErrorReply,
    Hello,
    StreamSpec,
    Subscribe,
    SubscribeOk,
    decode_broker_message,
    encode,
)
from schemas.upbit import Ticker
from tests.integration.conftest import BrokerProc, Sim
from tests.support import async_wait_until, scaled


@pytest.fixture
async def streaming(broker: BrokerProc) -> AsyncIterator[tuple[BrokerClient, list[int]]]:
    """A bystander client streaming KRW-BTC tickers; yields it and the seqs it saw."""
    client = BrokerClient(name="bystander")
    seqs: list[int] = []
    await client.connect()
    holder: dict[str, object] = {}

    def on_ticker(ticker: Ticker) -> None:
        sub = holder["sub"]
        env = sub.last_envelope  # type: ignore[attr-defined]
        seqs.append(env.seq)

    holder["sub"] = await client.subscribe_ticker(["KRW-BTC"], on_ticker)
    await async_wait_until(lambda: len(seqs) >= 3, timeout=15, what="bystander data")
    yield client, seqs
    await client.close()


def assert_contiguous(seqs: list[int]) -> None:
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


async def raw_request(endpoint: str, *frames: bytes, hello: bool = True) -> object:
    """Send raw frames on a fresh DEALER (after a hello) and return the decoded reply."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        if hello:
            await sock.send(encode(Hello(client_id="raw", name="raw")))
            await asyncio.wait_for(sock.recv(), scaled(5))
        await sock.send_multipart(list(frames))
        reply = await asyncio.wait_for(sock.recv(), scaled(5))
        return decode_broker_message(reply)
    finally:
        sock.close()


async def test_unknown_code_is_refused_naming_it_and_others_keep_streaming(
    broker: BrokerProc, streaming: tuple[BrokerClient, list[int]]
) -> None:
    _, seqs = streaming
    async with BrokerClient(name="offender") as offender:
        with pytest.raises(BrokerError) as info:
            await offender.subscribe_ticker(["KRW-BTC", "KRW-NOPE"])
        assert info.value.code == "unknown_code"
        assert "KRW-NOPE" in str(info.value)
        with pytest.raises(BrokerError) as info:
            await offender.subscribe_trade(["KRW_BTC"])
        assert info.value.code == "invalid_code"
        assert "KRW_BTC" in str(info.value)
        with pytest.raises(BrokerError) as info:
            await offender.subscribe_orderbook(["KRW-BTC"], depth=7)
        assert info.value.code == "invalid_option"
    count = len(seqs)
    await async_wait_until(lambda: len(seqs) >= count + 3, timeout=10, what="more bystander data")
    assert_contiguous(seqs)


async def test_lowercase_codes_are_normalized(broker: BrokerProc) -> None:
    async with BrokerClient(name="lower") as client:
        sub = await client.subscribe_ticker(["krw-eth"])
        assert sub.topics == ("ticker/KRW-ETH/",)
        first = await asyncio.wait_for(anext(sub), scaled(10))
        assert first.code == "KRW-ETH"


async def test_unknown_type_and_garbage_get_errors_and_the_broker_survives(
    broker: BrokerProc, streaming: tuple[BrokerClient, list[int]]
) -> None:
    endpoint = broker.env["UPBIT_BROKER_CONTROL"]
    _, seqs = streaming
    reply = await raw_request(endpoint, encode(Subscribe(1, [StreamSpec("kline", "KRW-BTC")])))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "unknown_type"
    assert reply.req == 1
    assert "kline" in reply.message

    reply = await raw_request(endpoint, b"\xff\x00garbage")
    assert isinstance(reply, ErrorReply)
    assert reply.code == "bad_message"
    assert reply.req is None

    reply = await raw_request(endpoint, msgspec.msgpack.encode({"op": "subscribe", "req": "x"}))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "bad_message"

    reply = await raw_request(endpoint, b"two", b"frames")
    assert isinstance(reply, ErrorReply)
    assert reply.code == "bad_message"

    reply = await raw_request(
        endpoint, encode(Subscribe(2, [StreamSpec("ticker", "KRW-ETH")])), hello=False
    )
    assert isinstance(reply, ErrorReply)
    assert reply.code == "unknown_client"

    # After all that, a well-formed request from a raw client still works...
    reply = await raw_request(endpoint, encode(Subscribe(3, [StreamSpec("ticker", "KRW-ETH")])))
    assert isinstance(reply, SubscribeOk)
    assert reply.topics == ["ticker/KRW-ETH/"]
    # ...and the bystander never noticed.
    count = len(seqs)
    await async_wait_until(lambda: len(seqs) >= count + 3, timeout=10, what="more bystander data")
    assert_contiguous(seqs)


async def test_private_streams_without_keys_are_refused_clearly(broker: BrokerProc) -> None:
    async with BrokerClient(name="private-wanter") as client:
        assert client.is_public_available()
        assert not client.is_private_available()
        with pytest.raises(BrokerError) as info:
            await client.subscribe_my_order()
        assert info.value.code == "private_unavailable"
        assert "UPBIT_ACCESS_KEY" in str(info.value)
        with pytest.raises(BrokerError):
            await client.subscribe_my_asset()


async def test_a_late_joiner_gets_the_last_value_in_the_subscribe_reply(
    broker: BrokerProc, sim: Sim
) -> None:
    async with BrokerClient(name="early") as early:
        sub = await early.subscribe_orderbook(["KRW-BTC"], depth=5)
        await async_wait_until(lambda: sub.received >= 3, timeout=15, what="early data")
        async with BrokerClient(name="late") as late:
            late_sub = await late.subscribe_orderbook(["KRW-BTC"], depth=5)
            # Delivered from the reply itself, before any new update arrives.
            assert late_sub.received >= 1
            book = await asyncio.wait_for(anext(late_sub), scaled(0.5))
            env = late_sub.last_envelope
            assert env is not None
            assert env.seq > 1, "the late joiner should start from the cached last value"
            assert len(book.orderbook_units) == 5
            snapshot = await late.get_snapshot("orderbook", ["KRW-BTC"], depth=5)
            assert snapshot
            assert snapshot[0].seq >= env.seq
