"""Market analyzer: spread and book imbalance across several markets, once a second.

The original design's "MarketDataAnalyzer": many markets, orderbooks at depth 5 and
trades, all through the one shared upstream connection. Uses the blocking client to
show that non-async programs work too.
"""

from __future__ import annotations

import argparse
import threading
import time

from clients import SyncBrokerClient
from schemas.upbit import Orderbook, Trade

DEFAULT_CODES = ["KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-ETHW", "BTC-ETH", "USDT-BTC"]


class Analyzer:
    """Keeps the latest book and a trade count per market (callbacks run in one thread)."""

    def __init__(self) -> None:
        self.books: dict[str, Orderbook] = {}
        self.trades: dict[str, int] = {}
        self.lock = threading.Lock()

    def on_book(self, book: Orderbook) -> None:
        with self.lock:
            self.books[book.code] = book

    def on_trade(self, trade: Trade) -> None:
        with self.lock:
            self.trades[trade.code] = self.trades.get(trade.code, 0) + 1

    def report(self) -> str:
        lines = []
        with self.lock:
            for code, book in sorted(self.books.items()):
                best = book.orderbook_units[0]
                mid = (best.ask_price + best.bid_price) / 2
                spread_bp = (best.ask_price - best.bid_price) / mid * 10_000 if mid else 0.0
                total = book.total_ask_size + book.total_bid_size
                imbalance = (book.total_bid_size - book.total_ask_size) / total if total else 0.0
                lines.append(
                    f"{code:<10} spread={spread_bp:7.2f}bp imbalance={imbalance:+.2f} "
                    f"trades={self.trades.get(code, 0)}"
                )
        return "\n".join(lines)


def main(codes: list[str], seconds: float | None) -> None:
    analyzer = Analyzer()
    with SyncBrokerClient(name="market-analyzer") as client:
        client.subscribe_orderbook(codes, analyzer.on_book, depth=5)
        client.subscribe_trade(codes, analyzer.on_trade)
        deadline = time.monotonic() + (seconds if seconds is not None else float("inf"))
        while time.monotonic() < deadline:
            time.sleep(1.0)
            print(analyzer.report() + "\n", flush=True)  # a blank line between reports


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("codes", nargs="*", default=DEFAULT_CODES)
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    args = parser.parse_args()
    main([c.upper() for c in args.codes], args.seconds)
