"""Firehose mode: subscribed streams as fast as the socket drains, still well-formed."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.simulator.conftest import SimFactory, control, flatten, open_ws, send

T = {"ticket": "fh"}


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_firehose_floods_valid_messages_with_unique_trade_ids(
    make_sim: SimFactory, compression: str | None
) -> None:
    sim = await make_sim(rate=1.0, compress=True)
    async with open_ws(sim.urls["ws"], compression=compression, max_queue=1024) as ws:
        await send(
            ws,
            T,
            {"type": "trade", "codes": ["KRW-BTC", "KRW-ETH"], "is_only_realtime": True},
            {"type": "orderbook", "codes": ["KRW-XRP.15"], "is_only_realtime": True},
            {"format": "SIMPLE"},
        )
        await control(sim, "rate", {"firehose": True})
        seqs: list[int] = []
        books = 0
        for _ in range(3000):
            raw = await ws.recv()
            assert isinstance(raw, bytes)
            for msg in flatten(json.loads(raw)):
                if msg["ty"] == "trade":
                    seqs.append(msg["sid"])
                    assert msg["cd"] in ("KRW-BTC", "KRW-ETH")
                else:
                    assert msg["ty"] == "orderbook"
                    assert len(msg["obu"]) == 15
                    books += 1
        assert len(seqs) > 1500
        assert books > 500
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        off = await control(sim, "rate", {"firehose": False})
        assert off["firehose"] is False
        while True:  # read the backlog so the close handshake is not stuck behind it
            try:
                await asyncio.wait_for(ws.recv(), 0.2)
            except TimeoutError:
                break
        stats = await control(sim, "stats")
        assert stats["ws"]["firehose_messages"] >= 3000
        conns = await control(sim, "connections")
        assert conns["connections"][0]["compressed"] is (compression == "deflate")


async def test_a_capped_firehose_holds_its_rate(make_sim: SimFactory) -> None:
    """The throughput bench steps the firehose down to find the highest lossless rate."""
    sim = await make_sim(rate=1.0)
    async with open_ws(sim.urls["ws"], max_queue=4096) as ws:
        await send(ws, T, {"type": "ticker", "codes": ["KRW-BTC"], "is_only_realtime": True})
        reply = await control(sim, "rate", {"firehose": True, "firehose_rate": 2000})
        assert reply["firehose_rate"] == 2000.0
        await ws.recv()
        start = time.monotonic()
        received = 0
        while received < 3000:  # ~1.5 s at the cap; an uncapped firehose takes ~20 ms
            await ws.recv()
            received += 1
        elapsed = time.monotonic() - start
        assert received / elapsed < 2000 * 1.25
        uncapped = await control(sim, "rate", {"firehose_rate": 0})
        assert uncapped == {"per_second": 1.0, "firehose": True, "firehose_rate": 0.0}
        await control(sim, "rate", {"firehose": False})
        while True:  # read the backlog so the close handshake is not stuck behind it
            try:
                await asyncio.wait_for(ws.recv(), 0.2)
            except TimeoutError:
                break
