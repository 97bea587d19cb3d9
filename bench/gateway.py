"""REST through the broker: the latency it adds to a quotation call and to an order, and
the rate it holds without a 429.

Processes: simulator (Upbit's REST limits on), broker (the simulator's keys, trading
on), and this process.

- latency: one ticker call at a time, paced well under the ticker group's 10/s so no
  call waits for budget: first direct (aiohttp to the simulator, the same-run
  baseline), then through the broker (``BrokerClient.tickers``). p50/p99 of each and the
  difference, which is what the broker adds (ZeroMQ round trip, validation, encoding);
- order latency: one limit bid at a time (far below the market, so it rests), 5 a
  second, well under the order group's limit: first signed and sent directly (aiohttp,
  a fresh JWT each, the same-run baseline), then through the broker
  (``BrokerClient.place_order``); each is cancelled after it is timed, off the clock;
- rate: ``--clients`` clients in this process call tickers, orderbooks, trades and
  candles back to back for ``--seconds``; answered requests per second, refusals, and
  the 429/418 answers the simulator counted over the run (the target is none).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp

from bench.common import (
    Row,
    Sim,
    base_parser,
    header,
    install_signal_handlers,
    percentiles,
    print_table,
    stage,
    start_broker,
    start_sim,
    write_results,
)
from broker.config import Secret
from broker.upbit_auth import UpbitSigner, query_string
from clients import BrokerClient, BrokerError
from tests.harness import SIM_KEYS

PACE = 0.2
"""Seconds between latency probes: 5 calls/s, half the ticker group's budget."""


def throttled(sim: Sim) -> int:
    """REST answers 429 or 418 the simulator gave, every group."""
    groups = sim.control("stats")["rest"]["groups"]
    return sum(int(v.get("429", 0)) + int(v.get("418", 0)) for v in groups.values())


async def _timed(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    """Milliseconds of ``n`` calls, one at a time, :data:`PACE` apart."""
    times: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        times.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(PACE)
    return times


async def _latency(sim: Sim, code: str, n: int) -> tuple[list[float], list[float]]:
    url = f"{sim.urls['rest']}/v1/ticker?markets={code}"
    async with aiohttp.ClientSession() as session:

        async def direct() -> None:
            async with session.get(url) as response:
                await response.read()
                assert response.status == 200, response.status

        await direct()  # connection set up outside the measurement
        direct_ms = await _timed(direct, n)
    async with BrokerClient(name="bench-gateway") as client:
        await client.tickers(code)

        async def through() -> None:
            await client.tickers(code)

        broker_ms = await _timed(through, n)
    return direct_ms, broker_ms


async def _order_latency(sim: Sim, code: str, n: int) -> tuple[list[float], list[float]]:
    """Milliseconds of ``n`` direct signed placements, then ``n`` through the broker."""
    signer = UpbitSigner(Secret(SIM_KEYS["UPBIT_ACCESS_KEY"]), Secret(SIM_KEYS["UPBIT_SECRET_KEY"]))
    rest = sim.urls["rest"]
    price = Decimal(str(sim.rest(f"/v1/ticker?markets={code}")[0]["trade_price"]))
    bid = str((price / 2000).quantize(Decimal(1)) * 1000)
    made = iter(range(1_000_000))
    placed: list[str] = []
    async with aiohttp.ClientSession() as session:

        async def signed(method: str, path: str, params: dict[str, Any], body: bool) -> Any:
            query = query_string(params)
            headers = {"Authorization": signer.authorization(query)}
            if body:
                headers["Content-Type"] = "application/json"
                call = session.request(
                    method, rest + path, data=json.dumps(params), headers=headers
                )
            else:
                call = session.request(method, f"{rest}{path}?{query}", headers=headers)
            async with call as response:
                answer = await response.json()
                assert response.status < 300, answer
                return answer

        async def direct() -> None:
            params = {"market": code, "side": "bid", "ord_type": "limit", "price": bid,
                      "volume": "0.0001", "identifier": f"bench-d-{next(made)}"}  # fmt: skip
            placed.append((await signed("POST", "/v1/orders", params, True))["uuid"])

        await signed("GET", "/v1/accounts", {}, False)  # connection set up off the clock
        direct_ms = await _timed(direct, n)
        for uuid in placed:  # paced under the default group's 30/s (the broker paces itself)
            await signed("DELETE", "/v1/order", {"uuid": uuid}, False)
            await asyncio.sleep(0.05)
    placed.clear()
    async with BrokerClient(name="bench-orders") as client:
        await client.accounts()

        async def through() -> None:
            order = await client.place_order(code, "bid", price=bid, volume="0.0001")
            placed.append(order.uuid)

        broker_ms = await _timed(through, n)
        for uuid in placed:
            await client.cancel_order(uuid)
    return direct_ms, broker_ms


async def _rate(codes: list[str], clients: int, seconds: float) -> tuple[int, dict[str, int]]:
    answered = 0
    refused: dict[str, int] = {}
    end = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal answered
        async with BrokerClient(name=f"bench-gateway-{i}") as client:
            calls: list[Callable[[str], Awaitable[Any]]] = [
                lambda c: client.tickers(codes),
                lambda c: client.orderbooks(c, depth=5),
                lambda c: client.trades(c, count=10),
                lambda c: client.candles(c, "1m", count=10),
            ]
            k = i
            while time.monotonic() < end:
                try:
                    await calls[k % len(calls)](codes[k % len(codes)])
                    answered += 1
                except BrokerError as exc:
                    refused[exc.code] = refused.get(exc.code, 0) + 1
                k += 1

    await asyncio.gather(*(worker(i) for i in range(clients)))
    return answered, refused


def main() -> None:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "gateway")
    p.add_argument("--calls", type=int, default=0, help="latency probes per path")
    p.add_argument("--seconds", type=float, default=0.0, help="rate phase length")
    p.add_argument("--clients", type=int, default=5, help="clients in the rate phase")
    args = p.parse_args()
    quick = args.quick
    calls = args.calls or (25 if quick else 200)
    seconds = args.seconds or (6.0 if quick else 30.0)
    install_signal_handlers()
    out = header(args.out or "gateway", quick)
    out["params"] = {"latency_calls": calls, "pace_s": PACE, "clients": args.clients}
    out["params"]["rate_seconds"] = seconds
    out["params"]["order_calls"] = min(calls, 100)
    print(f"gateway ({out['mode']}): {calls} latency probes per path, rate {seconds:g} s")
    sim = start_sim("--rate", "2")
    broker = None
    try:
        broker = start_broker(sim, {**SIM_KEYS, "UPBIT_BROKER_TRADING": "1"})
        os.environ.update(broker.env)  # the clients below find the broker by environment
        codes = sim.krw_codes(10)
        before = throttled(sim)
        with stage(f"latency, {calls} ticker calls direct then through the broker"):
            direct_ms, broker_ms = asyncio.run(_latency(sim, codes[0], calls))
        orders = min(calls, 100)
        with stage(f"order latency, {orders} placements direct then through the broker"):
            direct_order_ms, broker_order_ms = asyncio.run(_order_latency(sim, codes[0], orders))
        with stage(f"rate, {args.clients} clients for {seconds:g} s"):
            answered, refused = asyncio.run(_rate(codes, args.clients, seconds))
        over = throttled(sim) - before
    finally:
        if broker is not None:
            broker.stop()
        sim.stop()
    direct, through = percentiles(direct_ms), percentiles(broker_ms)
    direct_order, through_order = percentiles(direct_order_ms), percentiles(broker_order_ms)
    rows = [
        Row("REST call p50 through the broker", through["p50"], "ms", "direct", direct["p50"]),
        Row("REST call p99 through the broker", through["p99"], "ms", "direct", direct["p99"]),
        Row("added by the broker, p50", through["p50"] - direct["p50"], "ms"),
        Row("added by the broker, p99", through["p99"] - direct["p99"], "ms"),
        Row(
            "order p50 through the broker",
            through_order["p50"],
            "ms",
            "direct",
            direct_order["p50"],
        ),
        Row(
            "order p99 through the broker",
            through_order["p99"],
            "ms",
            "direct",
            direct_order["p99"],
        ),
        Row("added to an order, p50", through_order["p50"] - direct_order["p50"], "ms"),
        Row("added to an order, p99", through_order["p99"] - direct_order["p99"], "ms"),
        Row("requests answered per second", answered / seconds, "req/s"),
        Row("429/418 from the simulator", over, "answers", target="0", ok=over == 0),
    ]
    out["rows"] = rows
    out["refused"] = refused
    print_table("REST through the broker", rows)
    if refused:
        print(f"refused: {refused}")
    print(f"results: {write_results(args.out or 'gateway', out)}")


if __name__ == "__main__":
    main()
