"""Pluggable data handlers loaded by name into a real broker process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from clients import BrokerClient
from schemas.upbit import Ticker, Trade
from tests.integration.conftest import BrokerProc, Sim, broker_env, run_broker_proc
from tests.integration.test_cli import run_broker
from tests.support import async_wait_until, scaled

pytestmark = pytest.mark.timeout(120)

ENTRIES = ",".join(
    f"tests.integration.sample_handlers:{name}" for name in ("BidTrades", "BrokenTickers")
)


@pytest.fixture
def handled_broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    env = broker_env(sim, extra={"UPBIT_BROKER_HANDLERS": ENTRIES})
    yield from run_broker_proc(env, monkeypatch)


async def test_handlers_filter_and_a_failing_one_harms_no_other_stream(
    handled_broker: BrokerProc,
) -> None:
    trades: list[Trade] = []
    tickers: list[Ticker] = []
    async with BrokerClient(name="handlers", request_timeout=scaled(10)) as client:
        trade_sub = await client.subscribe_trade("KRW-BTC", trades.append)
        await client.subscribe_ticker("KRW-BTC", tickers.append)

        await async_wait_until(lambda: len(trades) >= 4, 30, what="4 BID trades")
        deadline = time.monotonic() + scaled(30)
        while True:  # metrics are polled: the counters lag the data by a request
            rows = {row.name: row for row in (await client.metrics()).handlers}
            if rows["bid-trades"].dropped >= 2 and rows["BrokenTickers"].errors >= 2:
                break
            assert time.monotonic() < deadline, f"handler metrics stuck at {rows}"
            await asyncio.sleep(0.1)
        assert all(t.ask_bid == "BID" for t in trades)
        assert tickers == []  # every ticker hit the broken handler
        rows = {row.name: row for row in (await client.metrics()).handlers}
        assert "ValueError: cannot handle KRW-BTC" in rows["BrokenTickers"].last_error
        assert rows["bid-trades"].types == ["trade"]
        assert trade_sub.gaps == 0  # dropped trades never took a sequence number
    assert handled_broker.child.alive()


def test_an_unloadable_handler_stops_the_broker_naming_the_variable() -> None:
    result = run_broker(UPBIT_BROKER_HANDLERS="tests.integration.sample_handlers:Missing")
    assert result.returncode == 2
    assert "UPBIT_BROKER_HANDLERS" in result.stderr
    assert "has no 'Missing'" in result.stderr
    assert "Traceback" not in result.stderr
