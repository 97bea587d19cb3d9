"""Account and orders through the broker, with real processes: the simulator, the broker
(with the simulator's keys and trading on), clients in this process and in others.

Reads and a limit order's life (place, look up, list, cancel) work against the
simulator; Upbit's refusal reaches the caller with its name and message; a bad field is
named without a REST call; orders from several processes at 20 a second together are
paced to the order group's limit, each placed exactly once and none refused 429; a
placement whose answer the simulator drops is found by its identifier, one order on
the exchange; trading switched off refuses placements but serves reads; the order's
``myOrder`` events reach a subscriber as for any order.
"""

from __future__ import annotations

import json
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from broker.config import Secret
from broker.upbit_auth import UpbitSigner, query_string
from clients import BrokerClient, BrokerError, SyncBrokerClient
from tests.harness import SIM_KEYS, Child
from tests.integration.conftest import BrokerProc, Sim, broker_env, run_broker_proc
from tests.integration.test_private_fallback import Seen, following
from tests.support import async_wait_until

TRADING = {"UPBIT_BROKER_TRADING": "1"}
PROCESSES = 4
PER_PROCESS = 15
RATE_PER_PROCESS = 5.0
"""Four processes at 5 orders a second: 20 a second together, past Upbit's 12."""


@pytest.fixture
def trading_broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    """A broker with the simulator's keys and trading on."""
    yield from run_broker_proc(broker_env(sim, keys=True, extra=TRADING), monkeypatch)


def resting_bid_price(sim: Sim, code: str = "KRW-BTC") -> Decimal:
    """A bid price far below the market (on the 1,000 KRW tick): the order rests."""
    price = Decimal(str(sim.rest(f"/v1/ticker?markets={code}")[0]["trade_price"]))
    return (price / 2000).quantize(Decimal(1)) * 1000


def signed_get(sim: Sim, path: str, params: dict[str, Any]) -> Any:
    """GET an exchange path of the simulator signed with its keys (the test's own eyes)."""
    signer = UpbitSigner(Secret(SIM_KEYS["UPBIT_ACCESS_KEY"]), Secret(SIM_KEYS["UPBIT_SECRET_KEY"]))
    query = query_string(params)
    request = urllib.request.Request(f"{sim.urls['rest']}{path}?{query}")
    request.add_header("Authorization", signer.authorization(query))
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def order_stats(sim: Sim) -> dict[str, int]:
    """The simulator's counters of the ``order`` group (requests, ok, 429, ...)."""
    groups = sim.control("stats")["rest"]["groups"]
    return {k: int(v) for k, v in groups.get("order", {}).items()}


def throttled(sim: Sim) -> int:
    """REST answers 429 or 418 the simulator gave, every group."""
    groups = sim.control("stats")["rest"]["groups"]
    return sum(int(v.get("429", 0)) + int(v.get("418", 0)) for v in groups.values())


async def test_a_limit_order_is_placed_looked_up_listed_and_cancelled(
    trading_broker: BrokerProc, sim: Sim
) -> None:
    async with BrokerClient(name="trader") as client:
        accounts = await client.accounts()
        krw = next(a for a in accounts if a.currency == "KRW")
        price = resting_bid_price(sim)
        order = await client.place_order(
            "KRW-BTC", "bid", "limit", price=price, volume="0.001", identifier="t-life-1"
        )
        assert (order.state, order.identifier, order.price) == ("wait", "t-life-1", price)
        found = await client.get_order(identifier="t-life-1")
        assert found.uuid == order.uuid
        assert found.trades == []
        assert [o.uuid for o in await client.open_orders("KRW-BTC")] == [order.uuid]
        locked = next(a for a in await client.accounts() if a.currency == "KRW").locked
        assert locked > krw.locked
        cancelled = await client.cancel_order(order.uuid)
        assert cancelled.uuid == order.uuid
        await async_wait_until(
            lambda: signed_get(sim, "/v1/order", {"uuid": order.uuid})["state"] == "cancel",
            timeout=10,
            what="the order cancelled at the simulator",
        )
        closed = await client.closed_orders("KRW-BTC", states=["cancel"])
        assert order.uuid in {o.uuid for o in closed}
        assert await client.open_orders("KRW-BTC") == []


async def test_a_batch_cancel_answers_which_orders_went_and_which_failed(
    trading_broker: BrokerProc, sim: Sim
) -> None:
    async with BrokerClient(name="batch") as client:
        price = resting_bid_price(sim)
        ids = [f"t-batch-{i}" for i in range(3)]
        for key in ids:
            await client.place_order("KRW-BTC", "bid", price=price, volume="0.001", identifier=key)
        cancelled, failed = await client.cancel_orders(identifiers=[*ids, "t-batch-none"])
        assert sorted(c.identifier or "" for c in cancelled) == ids
        assert [f.uuid for f in failed] == ["t-batch-none"]
        assert await client.open_orders() == []


async def test_upbits_refusal_reaches_the_caller_with_its_name_and_message(
    trading_broker: BrokerProc, sim: Sim
) -> None:
    async with BrokerClient(name="refused") as client:
        with pytest.raises(BrokerError) as poor:
            await client.place_order("KRW-BTC", "bid", price=resting_bid_price(sim), volume=1000)
        assert poor.value.code == "upstream_error"
        assert poor.value.upbit_name == "insufficient_funds_bid"
        assert poor.value.upbit_message
        with pytest.raises(BrokerError) as missing:
            await client.get_order(identifier="t-never-placed")
        assert (missing.value.code, missing.value.upbit_name) == (
            "upstream_error",
            "order_not_found",
        )


async def test_a_bad_field_is_named_and_costs_no_order_call(
    trading_broker: BrokerProc, sim: Sim
) -> None:
    async with BrokerClient(name="bad") as client:
        await client.markets()
        before = order_stats(sim).get("requests", 0)
        with pytest.raises(BrokerError) as bad:
            await client.place_order("KRW-BTC", "bid", price="abc", volume="0.001")
        assert bad.value.code == "invalid_field"
        assert "price" in bad.value.message
        with pytest.raises(BrokerError) as best:
            await client.place_order("KRW-BTC", "bid", "best", price=10_000)
        assert "time_in_force" in best.value.message
        assert order_stats(sim).get("requests", 0) == before


async def test_the_order_chance_of_a_market_comes_through(
    trading_broker: BrokerProc, sim: Sim
) -> None:
    async with BrokerClient(name="chance") as client:
        chance = await client.order_chance("KRW-BTC")
        assert chance.market.id == "KRW-BTC"


async def test_trading_off_refuses_placements_clearly_but_serves_reads(
    private_broker: BrokerProc, sim: Sim
) -> None:
    async with BrokerClient(name="off") as client:
        assert any(a.currency == "KRW" for a in await client.accounts())
        with pytest.raises(BrokerError) as off:
            await client.place_order("KRW-BTC", "bid", price=1000, volume="0.001")
        assert off.value.code == "trading_disabled"
        assert "UPBIT_BROKER_TRADING" in off.value.message
        with pytest.raises(BrokerError) as cancel:
            await client.cancel_order(identifier="x")
        assert cancel.value.code == "trading_disabled"
    assert order_stats(sim).get("requests", 0) == 0
    assert "trading=off" in private_broker.child.output()


async def test_without_keys_account_calls_are_private_unavailable(
    broker: BrokerProc, sim: Sim
) -> None:
    async with BrokerClient(name="nokeys") as client:
        with pytest.raises(BrokerError) as nokeys:
            await client.accounts()
        assert nokeys.value.code == "private_unavailable"


def test_the_blocking_client_trades_too(trading_broker: BrokerProc, sim: Sim) -> None:
    with SyncBrokerClient(name="sync-trader") as client:
        order = client.place_order("KRW-BTC", "bid", price=resting_bid_price(sim), volume="0.001")
        assert (order.identifier or "").startswith("c-")
        assert client.cancel_order(identifier=order.identifier).uuid == order.uuid


async def test_an_order_placed_through_the_broker_brings_its_myorder_events(
    trading_broker: BrokerProc, sim: Sim
) -> None:
    async with following(sim, Seen(), "order-events", statuses=False) as seen:
        async with BrokerClient(name="placer") as client:
            order = await client.place_order(
                "KRW-BTC", "bid", price=resting_bid_price(sim), volume="0.001"
            )
            await client.cancel_order(order.uuid)

        def states() -> set[str]:
            return {e.state for _, e, _ in seen.orders if e.uuid == order.uuid}

        await async_wait_until(
            lambda: {"wait", "cancel"} <= states(), timeout=15, what="wait and cancel events"
        )


_PLACER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from clients import BrokerClient, BrokerError

    async def main(name, count, rate, price):
        placed, refused = [], {}
        async with BrokerClient(name=name) as client:
            async def one(i):
                key = f"{name}-{i}"
                try:
                    order = await client.place_order(
                        "KRW-BTC", "bid", price=price, volume="0.0001", identifier=key)
                    placed.append(order.identifier)
                except BrokerError as exc:
                    refused[exc.code] = refused.get(exc.code, 0) + 1
            start = time.monotonic()
            tasks = []
            for i in range(count):
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
            took = time.monotonic() - start
        print(json.dumps({"placed": placed, "refused": refused, "took": took}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]))
    """
)


@pytest.mark.timeout(180)
def test_orders_from_several_processes_at_20_a_second_are_paced_none_lost_or_doubled(
    trading_broker: BrokerProc, sim: Sim
) -> None:
    price = str(resting_bid_price(sim))
    before = throttled(sim)
    started = time.monotonic()
    children = [
        Child(
            f"placer{i}",
            ["-c", _PLACER, f"p{i}", str(PER_PROCESS), str(RATE_PER_PROCESS), price],
            env=trading_broker.env,
        )
        for i in range(PROCESSES)
    ]
    try:
        results = [json.loads(child.read_line(timeout=120)) for child in children]
    finally:
        for child in children:
            child.stop()
    took = time.monotonic() - started
    total = PROCESSES * PER_PROCESS
    wanted = {f"p{i}-{n}" for i in range(PROCESSES) for n in range(PER_PROCESS)}
    assert all(r["refused"] == {} for r in results), results
    assert sorted(k for r in results for k in r["placed"]) == sorted(wanted)
    # The exchange's side: each identifier exactly once, one POST each, no 429.
    listed = signed_get(sim, "/v1/orders/open", {"market": "KRW-BTC", "limit": 100})
    identifiers = [o["identifier"] for o in listed]
    assert sorted(identifiers) == sorted(wanted), "an order lost or doubled at the exchange"
    stats = order_stats(sim)
    assert (stats["requests"], stats["ok"]) == (total, total), stats
    assert throttled(sim) - before == 0, "the simulator answered 429/418"
    # 60 orders at the broker's ~9 a second take over 5 s, offered in 3.
    print(f"{total} orders from {PROCESSES} processes: {took:.1f} s, {total / took:.1f}/s")
    assert max(r["took"] for r in results) >= (total - 12) / 12


async def test_a_placement_whose_answer_is_dropped_is_found_by_its_identifier_once(
    trading_broker: BrokerProc, sim: Sim
) -> None:
    try:
        sim.control("rest_drop", {"path": "/v1/orders", "method": "POST", "count": 1})
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            pytest.skip("this simulator has no POST /_sim/rest_drop fault yet")
        raise
    async with BrokerClient(name="dropped") as client:
        order = await client.place_order(
            "KRW-BTC", "bid", price=resting_bid_price(sim), volume="0.001", identifier="t-drop-1"
        )
        assert (order.identifier, order.state) == ("t-drop-1", "wait")
        assert order_stats(sim)["requests"] == 1, "the placement was sent again"
        listed = signed_get(sim, "/v1/orders/open", {"market": "KRW-BTC"})
        assert [o["identifier"] for o in listed] == ["t-drop-1"]
        # The next placement goes through as usual.
        again = await client.place_order(
            "KRW-BTC", "bid", price=resting_bid_price(sim), volume="0.001"
        )
        assert again.state == "wait"


async def test_a_reused_identifier_whose_answer_is_dropped_is_not_taken_for_the_old_order(
    trading_broker: BrokerProc, sim: Sim
) -> None:
    """A caller reuses an identifier: Upbit refuses the placement (duplicated), the reply
    is lost, and the lookup finds the identifier's first order. That order is not this
    placement's: the caller learns it was not placed, and the exchange holds one order."""
    price = resting_bid_price(sim)
    async with BrokerClient(name="reuser") as client:
        first = await client.place_order(
            "KRW-BTC", "bid", price=price, volume="0.001", identifier="t-reuse-1"
        )
        try:
            sim.control("rest_drop", {"path": "/v1/orders", "method": "POST", "count": 1})
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                pytest.skip("this simulator has no POST /_sim/rest_drop fault yet")
            raise
        with pytest.raises(BrokerError) as refused:
            await client.place_order(
                "KRW-BTC", "bid", price=price - 1000, volume="0.001", identifier="t-reuse-1"
            )
        assert refused.value.code == "order_not_placed"
        assert first.uuid in str(refused.value)
    assert order_stats(sim)["requests"] == 2, "the placement was sent again"
    listed = signed_get(sim, "/v1/orders/open", {"market": "KRW-BTC"})
    assert [(o["uuid"], o["identifier"]) for o in listed] == [(first.uuid, "t-reuse-1")]
