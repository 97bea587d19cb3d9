"""Private streams survive an outage: orders placed meanwhile still reach the client.

The broker runs with the simulator's keys (fixture ``private_broker``); a client in
this process subscribes to myOrder (every market) and myAsset. The private WebSocket is
dropped and its upgrades refused, so it stays down; an order is placed at the simulator
meanwhile (``POST /_sim/orders``, no JWT needed). Upbit never replays what a socket
missed, so the broker must find the order over REST: by polling after the grace while
the link is down, or by reconciling once it is back. Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest

from clients import BrokerClient, Subscription
from schemas.bus import StatusEvent
from schemas.upbit import MyAsset, MyOrder
from tests.integration.conftest import BrokerProc, Sim
from tests.support import async_wait_until, scaled

PRIVATE = "/websocket/v1/private"
GRACE = 3.0
"""The private REST fallback starts after the link has been down this long."""


@dataclass
class Seen:
    """What the client received: (receive time, payload, source) and status events."""

    orders: list[tuple[float, MyOrder, str]] = field(default_factory=list)
    assets: list[tuple[float, MyAsset, str]] = field(default_factory=list)
    statuses: list[tuple[float, StatusEvent]] = field(default_factory=list)

    def order(self, uuid: str) -> tuple[float, MyOrder, str] | None:
        return next((o for o in self.orders if o[1].uuid == uuid), None)

    def events_of(self, uuid: str) -> list[tuple[str, str | None, str]]:
        """``(state, trade_uuid, source)`` of every myOrder event of ``uuid`` received."""
        return [(o.state, o.trade_uuid, src) for _, o, src in self.orders if o.uuid == uuid]

    def asset_after(self, at: float) -> tuple[float, MyAsset, str] | None:
        return next((a for a in self.assets if a[0] >= at), None)

    def status(self, state: str, after: float) -> float | None:
        """Broker time (s) of the first private ``state`` event stamped after ``after``."""
        stamps = [
            e.timestamp / 1000
            for _, e in self.statuses
            if e.state == state and e.connection == "private" and e.timestamp / 1000 >= after
        ]
        return min(stamps) if stamps else None

    def states(self, after: float) -> set[str]:
        return {e.state for _, e in self.statuses if e.timestamp / 1000 >= after}


async def _pump(sub: Subscription[Any], into: list[tuple[float, Any, str]]) -> None:
    async for payload in sub:
        env = sub.last_envelope
        assert env is not None
        into.append((time.time(), payload, env.source))


@contextlib.asynccontextmanager
async def following(sim: Sim, seen: Seen, name: str, *, statuses: bool) -> AsyncIterator[Seen]:
    """A client following myOrder and myAsset into ``seen``, once the private link is up
    and the broker's first private REST sync is done."""

    def on_status(event: StatusEvent) -> None:
        seen.statuses.append((time.time(), event))

    hook = on_status if statuses else None
    async with BrokerClient(name=name) as client:
        orders = await client.subscribe_my_order(on_status=hook)
        assets = await client.subscribe_my_asset(on_status=hook)
        pumps = [
            asyncio.create_task(_pump(orders, seen.orders)),
            asyncio.create_task(_pump(assets, seen.assets)),
        ]
        try:
            await async_wait_until(
                lambda: private_types(sim) == {"myOrder", "myAsset"},
                timeout=15,
                what="the private connection subscribed to myOrder and myAsset",
            )
            # The fallback learns the account first (open orders, then balances), so
            # that what changes during an outage is a difference it can publish.
            await async_wait_until(
                lambda: rest_ok(sim, "default") >= 2,
                timeout=15,
                what="the broker's first private REST sync",
            )
            yield seen
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


@pytest.fixture
async def watcher(private_broker: BrokerProc, sim: Sim) -> AsyncIterator[Seen]:
    """A client subscribed to myOrder and myAsset, the private link up and synced."""
    async with following(sim, Seen(), "order-watcher", statuses=True) as seen:
        yield seen


def private_types(sim: Sim) -> set[str]:
    """Types the one open private connection is subscribed to (empty if not exactly one)."""
    conns = [c for c in sim.connections(PRIVATE) if not c.get("closed")]
    if len(conns) != 1:
        return set()
    return {
        i["type"] for i in conns[0]["subscription"] or [] if isinstance(i, dict) and "type" in i
    }


def rest_ok(sim: Sim, group: str) -> int:
    """Successful REST calls of ``group`` the simulator answered."""
    groups = sim.control("stats")["rest"]["groups"]
    return int(groups.get(group, {}).get("ok", 0))


def place_resting_bid(sim: Sim) -> dict[str, Any]:
    """A limit bid on KRW-BTC far below the market: it rests (``wait``) and locks KRW."""
    price = Decimal(str(sim.rest("/v1/ticker?markets=KRW-BTC")[0]["trade_price"]))
    bid = (price / 2000).quantize(Decimal(1)) * 1000  # on the 1,000 KRW tick
    order: dict[str, Any] = sim.control(
        "orders",
        {
            "market": "KRW-BTC",
            "side": "bid",
            "ord_type": "limit",
            "price": str(bid),
            "volume": "0.001",
        },
    )
    assert order["state"] == "wait", order
    return order


def place_filled_bid(sim: Sim) -> dict[str, Any]:
    """A limit bid on KRW-BTC that takes the best ask and half the next: two fills, done.

    The answer carries the order's ``trades`` (the control endpoint shows them)."""
    units = sim.rest("/v1/orderbook?markets=KRW-BTC")[0]["orderbook_units"]
    sizes = [Decimal(str(u["ask_size"])) for u in units[:2]]
    volume = (sizes[0] + sizes[1] / 2).quantize(Decimal("0.00000001"))
    price = Decimal(str(units[4]["ask_price"])).quantize(Decimal(1))
    order: dict[str, Any] = sim.control(
        "orders",
        {
            "market": "KRW-BTC",
            "side": "bid",
            "ord_type": "limit",
            "price": str(price),
            "volume": str(volume),
        },
    )
    assert order["state"] == "done", order
    assert len(order["trades"]) >= 2, order
    return order


def krw_locked(asset: MyAsset) -> Decimal | None:
    return next((a.locked for a in asset.assets if a.currency == "KRW"), None)


async def outage(sim: Sim, seen: Seen, refuse: float) -> tuple[float, float]:
    """Drop the private link with upgrades refused for ``refuse`` s; (fault, down) times."""
    fault_at = time.time()
    sim.control("refuse_upgrades", {"seconds": refuse, "status": 429})
    assert sim.control("drop", {"path": PRIVATE})["dropped"] == 1
    down = await async_wait_until(
        lambda: seen.status("down", fault_at), timeout=10, what="the private link down"
    )
    assert down is not None
    return fault_at, down


async def test_an_order_placed_during_a_long_private_outage_arrives_over_rest(
    sim: Sim, watcher: Seen
) -> None:
    refuse = 10.0
    fault_at, down = await outage(sim, watcher, refuse)
    order = place_resting_bid(sim)
    placed = time.time()

    got = await async_wait_until(
        lambda: watcher.order(order["uuid"]), timeout=GRACE + 10, what="the order's event"
    )
    asset = await async_wait_until(
        lambda: watcher.asset_after(placed), timeout=10, what="a myAsset change"
    )
    assert got is not None
    assert asset is not None
    outage_left = fault_at + refuse - got[0]
    restored = await async_wait_until(
        lambda: watcher.status("source_websocket", fault_at),
        timeout=refuse + 35,  # the reconnect backoff may reach its 30 s cap
        what="the private stream back (source_websocket)",
    )
    assert restored is not None
    print(
        f"\n[private] long outage: down {down - fault_at:.3f} s after the drop; order "
        f"placed {placed - down:.3f} s after down, seen {got[0] - placed:.3f} s later "
        f"(source {got[2]}, state {got[1].state}) with {outage_left:.1f} s of refusal left; "
        f"myAsset {asset[0] - placed:.3f} s after the order (source {asset[2]}, KRW locked "
        f"{krw_locked(asset[1])}); stream back {restored - fault_at:.3f} s after the drop; "
        f"status events {sorted(watcher.states(fault_at))}"
    )
    assert got[1].state == "wait"
    assert got[2] == "rest"
    assert got[0] < fault_at + refuse, "the order came only after the outage"
    assert got[0] - down <= scaled(GRACE + 3)
    assert krw_locked(asset[1]) == Decimal(order["locked"])
    assert {"down", "reconnecting", "source_rest", "source_websocket"} <= watcher.states(fault_at)


async def test_an_order_placed_during_a_short_private_outage_is_reconciled_after_it(
    sim: Sim, watcher: Seen
) -> None:
    refuse = 1.0
    fault_at, down = await outage(sim, watcher, refuse)
    order = place_resting_bid(sim)
    placed = time.time()

    got = await async_wait_until(
        lambda: watcher.order(order["uuid"]), timeout=20, what="the order's event"
    )
    asset = await async_wait_until(
        lambda: watcher.asset_after(placed), timeout=10, what="a myAsset change"
    )
    assert got is not None
    assert asset is not None
    # The stream comes back on its own schedule: retries use full-jitter backoff, so
    # after four refused upgrades the next may come 3.2 s later, after REST delivered.
    back = await async_wait_until(
        lambda: watcher.status("restored", down), timeout=15, what="the stream restored"
    )
    assert back is not None
    print(
        f"\n[private] short outage: down {down - fault_at:.3f} s after the drop; restored "
        f"{back - fault_at:.3f} s after it; order seen "
        f"{got[0] - placed:.3f} s after placing (source {got[2]}); myAsset "
        f"{asset[0] - placed:.3f} s after it (KRW locked {krw_locked(asset[1])}); status "
        f"events {sorted(watcher.states(fault_at))}"
    )
    assert got[1].state == "wait"
    assert krw_locked(asset[1]) == Decimal(order["locked"])
    assert {"down", "reconnecting", "restored"} <= watcher.states(fault_at)
    await async_wait_until(
        lambda: private_types(sim) == {"myOrder", "myAsset"},
        timeout=15,
        what="the private stream subscribed again",
    )


async def test_an_order_placed_and_filled_during_an_outage_arrives_as_each_state_once(
    sim: Sim, watcher: Seen
) -> None:
    refuse = 8.0
    fault_at, _ = await outage(sim, watcher, refuse)
    order = place_filled_bid(sim)
    placed = time.time()
    fills = [t["uuid"] for t in order["trades"]]
    expected = [
        ("wait", None, "rest"),
        *[("trade", fill, "rest") for fill in fills],
        ("done", None, "rest"),
    ]

    await async_wait_until(
        lambda: ("done", None, "rest") in watcher.events_of(order["uuid"]),
        timeout=GRACE + 10,
        what="the order's done event over REST",
    )
    asset = await async_wait_until(
        lambda: watcher.asset_after(placed), timeout=10, what="a myAsset change"
    )
    # More polls during the outage, then the reconciliation after it: nothing repeats.
    restored = await async_wait_until(
        lambda: watcher.status("source_websocket", fault_at),
        timeout=refuse + 35,
        what="the private stream back (source_websocket)",
    )
    assert restored is not None
    assert asset is not None
    events = watcher.events_of(order["uuid"])
    print(f"\n[private] order born and filled in an outage: {events}")
    assert events == expected
    trades = [o for _, o, _ in watcher.orders if o.uuid == order["uuid"] and o.state == "trade"]
    assert [t.volume for t in trades] == [Decimal(t["volume"]) for t in order["trades"]]
    assert trades[-1].executed_volume == Decimal(order["executed_volume"])
    balances = {a["currency"]: Decimal(a["balance"]) for a in sim.control("account", {})}
    assert asset[2] == "rest"
    assert {a.currency: a.balance for a in asset[1].assets}.items() <= balances.items()
