"""Order monitor: prints your orders and balances as they change.

The original design's "OrderMonitor". It needs the broker to have API keys; without
them it says so (``is_private_available()``) and watches the broker's status instead.
Amounts keep their full decimal precision (``Decimal``) and are printed without
trailing zeros, one readable line per event.
"""

from __future__ import annotations

import argparse
import asyncio
from decimal import Decimal

from clients import BrokerClient
from schemas.upbit import MyAsset, MyOrder


def amount(value: Decimal | None) -> str:
    """``1,234.5`` for Decimal("1234.50000"), ``0`` for ``0E-13``, ``-`` for None."""
    if value is None:
        return "-"
    return f"{value.normalize():,f}" if value else "0"


def on_order(order: MyOrder) -> None:
    """One line per order event (on ``trade``, price and volume are the fill's)."""
    print(
        f"order {order.code:<9} {order.ask_bid:<3} {order.order_type:<6} {order.state:<6} "
        f"price={amount(order.price)} volume={amount(order.volume)} "
        f"executed={amount(order.executed_volume)} remaining={amount(order.remaining_volume)}",
        flush=True,
    )


def on_asset(asset: MyAsset) -> None:
    """One line per changed currency."""
    for item in asset.assets:
        print(
            f"asset {item.currency:<9} balance={amount(item.balance)} locked={amount(item.locked)}",
            flush=True,
        )


async def main(seconds: float | None) -> None:
    async with BrokerClient(name="order-monitor") as client:
        if not client.is_private_available():
            print(
                "private streams need UPBIT_ACCESS_KEY and UPBIT_SECRET_KEY in the broker's "
                "environment; watching broker health instead",
                flush=True,
            )
            deadline = asyncio.get_running_loop().time() + (seconds or float("inf"))
            while asyncio.get_running_loop().time() < deadline:
                health = await client.health()
                print(f"broker {health.status} uptime={health.uptime_seconds:.0f}s", flush=True)
                await asyncio.sleep(min(10.0, seconds or 10.0))
            return
        await client.subscribe_my_order(None, on_order)
        await client.subscribe_my_asset(on_asset)
        await asyncio.sleep(seconds if seconds is not None else float("inf"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    asyncio.run(main(parser.parse_args().seconds))
