"""Streams over a real socket: candles built from the trades the client saw, idle
close, and the slow-client bound."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from simulator.market import fmt_datetime
from tests.simulator.conftest import (
    Message,
    SimFactory,
    collect_until,
    control,
    eventually,
    open_ws,
    recv_frame,
    send,
)
from tests.support import scaled

T = {"ticket": "test"}


def dec(x: Any) -> Decimal:
    return Decimal(str(x))


async def test_candle_messages_aggregate_the_trades(make_sim: SimFactory) -> None:
    sim = await make_sim(rate=40.0, trade_ratio=0.9)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(
            ws,
            T,
            {"type": "trade", "codes": ["KRW-ETH"], "is_only_realtime": True},
            {"type": "candle.1s", "codes": ["KRW-ETH"], "is_only_realtime": True},
            {"type": "candle.1m", "codes": ["KRW-ETH"], "is_only_realtime": True},
        )
        trades: list[Message] = []
        checked_seconds = checked_minutes = 0
        while checked_seconds < 2 or checked_minutes < 2:
            for m in await collect_until(ws, lambda m: m["type"] == "candle.1s", timeout=5):
                if m["type"] == "trade":
                    trades.append(m)
                elif m["type"] == "candle.1m":
                    # The minute candle includes every trade sent before it in its minute.
                    start = m["candle_date_time_utc"]
                    mine = [
                        t for t in trades if fmt_datetime(t["trade_timestamp"])[:16] == start[:16]
                    ]
                    assert m["trade_price"] == mine[-1]["trade_price"]
                    assert m["high_price"] >= max(t["trade_price"] for t in mine)
                    assert start.endswith(":00")
                    checked_minutes += 1
                elif m["type"] == "candle.1s":
                    start = m["candle_date_time_utc"]
                    second = [t for t in trades if fmt_datetime(t["trade_timestamp"]) == start]
                    if trades[0]["trade_timestamp"] // 1000 * 1000 >= _ms(start):
                        continue  # this second began before we subscribed
                    _check(m, second)
                    checked_seconds += 1


def _check(candle: Message, trades: list[Message]) -> None:
    assert candle["opening_price"] == trades[0]["trade_price"]
    assert candle["trade_price"] == trades[-1]["trade_price"]
    assert candle["high_price"] == max(t["trade_price"] for t in trades)
    assert candle["low_price"] == min(t["trade_price"] for t in trades)
    assert dec(candle["candle_acc_trade_volume"]) == sum(dec(t["trade_volume"]) for t in trades)
    value = sum(dec(t["trade_volume"]) * dec(t["trade_price"]) for t in trades)
    assert abs(dec(candle["candle_acc_trade_price"]) - value) <= value * Decimal("1e-12")
    hh = int(candle["candle_date_time_utc"][11:13])
    assert candle["candle_date_time_kst"][11:13] == f"{(hh + 9) % 24:02d}"


def _ms(utc: str) -> int:
    return int(datetime.fromisoformat(utc).replace(tzinfo=UTC).timestamp() * 1000)


async def test_idle_connections_are_closed(make_sim: SimFactory) -> None:
    sim = await make_sim(idle_timeout=0.3)
    async with open_ws(sim.urls["ws"]) as ws:
        await asyncio.wait_for(ws.wait_closed(), scaled(5))
        assert ws.close_code == 1000
        assert ws.close_reason == "idle timeout"


async def test_streaming_connections_are_not_idle(make_sim: SimFactory) -> None:
    sim = await make_sim(idle_timeout=0.3, rate=40.0)
    async with open_ws(sim.urls["ws"]) as ws:
        await send(ws, T, {"type": "orderbook", "codes": ["KRW-BTC", "KRW-ETH"]})
        first = await recv_frame(ws)
        while True:
            msg = await recv_frame(ws, timeout=2)
            if msg["timestamp"] - first["timestamp"] > 900:  # three idle timeouts later
                break


async def test_a_client_that_never_reads_is_disconnected(make_sim: SimFactory) -> None:
    sim = await make_sim(rate=200.0, send_queue_max=50, compress=False)
    reader, writer = await asyncio.open_connection(sim.host, sim.ws_port)
    # A raw upgrade, then never read again: the socket buffers fill, then the queue.
    writer.write(
        b"GET /websocket/v1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    request = b'[{"ticket":"t"},{"type":"orderbook","codes":["KRW-BTC","KRW-ETH","KRW-XRP"]}]'
    mask = b"\x00\x00\x00\x00"
    writer.write(bytes([0x81, 0x80 | len(request)]) + mask + request)
    await writer.drain()
    try:

        async def disconnected() -> bool:
            stats = await control(sim, "stats")
            return bool(stats["ws"]["slow_disconnects"] == 1)

        await eventually(disconnected, timeout=20, what="slow-client disconnect")
        assert await reader.read(1 << 20)  # data had been sent before the cut
    finally:
        writer.close()
