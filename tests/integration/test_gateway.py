"""Quotation through the broker, with real processes: the simulator, the broker, clients.

Each kind is answered against the simulator, a candle request past the history's end
stops there, five client processes hammering quotation calls at once all get answers while the
simulator counts no 429, and a bad code gets a clear error without a REST call.
"""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime

import pytest

from clients import BrokerClient, BrokerError, SyncBrokerClient
from tests.harness import Child
from tests.integration.conftest import BrokerProc, Sim

PROCESSES = 5
ROUNDS = 20


def throttled(sim: Sim) -> int:
    """REST answers 429 or 418 the simulator gave, every group."""
    groups = sim.control("stats")["rest"]["groups"]
    return sum(int(v.get("429", 0)) + int(v.get("418", 0)) for v in groups.values())


def rest_calls(sim: Sim, group: str) -> int:
    """REST requests the simulator answered in ``group`` (any status)."""
    return int(sim.control("stats")["rest"]["groups"].get(group, {}).get("requests", 0))


async def test_each_quotation_call_is_answered_against_the_simulator(
    broker: BrokerProc, sim: Sim
) -> None:
    async with BrokerClient(name="quotes") as client:
        markets = await client.markets()
        codes = {m.market for m in markets}
        assert codes == {m["market"] for m in sim.rest("/v1/market/all")}
        assert all(m.korean_name and m.english_name for m in markets)
        assert all(m.market_event is not None for m in markets)  # warnings come along
        krw = sorted(c for c in codes if c.startswith("KRW-"))[:3]

        tickers = await client.tickers(krw)
        assert sorted(t.market for t in tickers) == krw
        books = await client.orderbooks(krw[:2], depth=5)
        assert sorted(b.market for b in books) == krw[:2]
        assert all(len(b.orderbook_units) <= 5 for b in books)
        trades = await client.trades(krw[0], count=7)
        assert 0 < len(trades) <= 7
        assert all(t.market == krw[0] for t in trades)
        for unit in ("1s", "1m", "240m", "days", "weeks", "months"):
            candles = await client.candles(krw[0], unit, count=3)
            assert candles, unit
            assert all(c.market == krw[0] for c in candles)
        later = datetime.now(UTC)
        before = await client.candles(krw[0], "1m", count=2, to=later)
        assert all(c.candle_date_time_utc < f"{later:%Y-%m-%dT%H:%M:%S}" for c in before)


async def test_candles_asked_past_the_history_stop_at_its_end_newest_first(
    broker: BrokerProc, sim: Sim
) -> None:
    # The simulator keeps a few minutes of 1 s candles (fewer than one page of 200): the
    # broker asks for a page of 200, gets less, and stops there instead of asking on.
    # Paging across several calls is covered against a fake in tests/broker/test_gateway.py.
    async with BrokerClient(name="paging") as client:
        code = sorted(m.market for m in await client.markets() if m.market.startswith("KRW-"))[0]
        calls = rest_calls(sim, "candle")
        candles = await client.candles(code, "1s", count=450)
        times = [c.candle_date_time_utc for c in candles]
        assert 0 < len(times) < 200
        assert times == sorted(times, reverse=True)
        assert len(set(times)) == len(times)
        assert rest_calls(sim, "candle") - calls == 1


async def test_a_bad_code_gets_a_clear_error_and_costs_no_rest_call(
    broker: BrokerProc, sim: Sim
) -> None:
    async with BrokerClient(name="bad") as client:
        await client.markets()
        calls = rest_calls(sim, "ticker") + rest_calls(sim, "candle")
        with pytest.raises(BrokerError) as unknown:
            await client.tickers(["KRW-NOSUCHCOIN"])
        assert unknown.value.code == "unknown_code"
        assert "KRW-NOSUCHCOIN" in str(unknown.value)
        with pytest.raises(BrokerError) as too_many:
            await client.candles("KRW-BTC", "1m", count=10_001)
        assert too_many.value.code == "invalid_option"
        assert "10000" in str(too_many.value)
        assert rest_calls(sim, "ticker") + rest_calls(sim, "candle") == calls


def test_the_blocking_client_has_the_same_methods(broker: BrokerProc, sim: Sim) -> None:
    with SyncBrokerClient(name="sync-quotes") as client:
        code = next(m.market for m in client.markets() if m.market.startswith("KRW-"))
        assert [t.market for t in client.tickers(code)] == [code]
        assert client.candles(code, "1m", count=2)


_HAMMER = textwrap.dedent(
    """
    import asyncio, json, sys
    from clients import BrokerClient, BrokerError

    async def main(name, rounds):
        answered, refused = 0, {}
        async with BrokerClient(name=name) as client:
            codes = sorted(m.market for m in await client.markets()
                           if m.market.startswith("KRW-"))[:10]
            for i in range(rounds):
                code = codes[i % len(codes)]
                calls = [lambda: client.tickers(codes),
                         lambda: client.orderbooks(code, depth=5),
                         lambda: client.trades(code, count=5),
                         lambda: client.candles(code, "1m", count=5)]
                try:
                    await calls[i % 4]()
                    answered += 1
                except BrokerError as exc:
                    refused[exc.code] = refused.get(exc.code, 0) + 1
        print(json.dumps({"answered": answered, "refused": refused}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


@pytest.mark.timeout(180)
def test_five_processes_hammering_quotes_all_get_answers_and_no_429(
    broker: BrokerProc, sim: Sim
) -> None:
    before = throttled(sim)
    children = [
        Child(f"hammer{i}", ["-c", _HAMMER, f"hammer{i}", str(ROUNDS)], env=broker.env)
        for i in range(PROCESSES)
    ]
    try:
        results = [json.loads(child.read_line(timeout=120)) for child in children]
    finally:
        for child in children:
            child.stop()
    print(f"quote hammer: {results}")
    assert all(r == {"answered": ROUNDS, "refused": {}} for r in results), results
    assert throttled(sim) - before == 0, "the simulator answered 429/418"
