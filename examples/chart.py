"""A terminal price chart: 1-minute candles and the live ticker of one market.

Run with the broker up: ``python examples/chart.py KRW-BTC``. It shows the original
design's "Chart" subsystem as a client: one subscription, a late join that starts from
the broker's last values, and nothing to clean up by hand.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque

from clients import BrokerClient
from schemas.upbit import Candle, Ticker

WIDTH = 40


def bar(price: float, low: float, high: float) -> str:
    """One row of the chart: a marker placed between the window's low and high."""
    span = (high - low) or 1.0
    position = round((price - low) / span * (WIDTH - 1))
    return "·" * position + "█" + "·" * (WIDTH - 1 - position)


async def main(code: str, seconds: float | None) -> None:
    closes: deque[float] = deque(maxlen=20)
    last: dict[str, Candle] = {}

    def on_candle(candle: Candle) -> None:
        previous = last.get(candle.candle_date_time_utc)
        last[candle.candle_date_time_utc] = candle
        if previous is None and len(last) > 1:
            closes.append(candle.opening_price)

    def on_ticker(ticker: Ticker) -> None:
        window = [*closes, ticker.trade_price]
        low, high = min(window), max(window)
        print(
            f"{ticker.code} {ticker.trade_price:>14,.2f} {ticker.change:<4} |"
            f"{bar(ticker.trade_price, low, high)}|",
            flush=True,
        )

    async with BrokerClient(name="chart") as client:
        await client.subscribe_candle([code], on_candle, unit="1m")
        await client.subscribe_ticker([code], on_ticker)
        await asyncio.sleep(seconds if seconds is not None else float("inf"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("code", nargs="?", default="KRW-BTC")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    args = parser.parse_args()
    asyncio.run(main(args.code.upper(), args.seconds))
