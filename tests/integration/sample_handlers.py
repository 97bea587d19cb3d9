"""Data handlers the integration tests load into a broker process by name."""

from __future__ import annotations

from schemas.upbit import Ticker, Trade


class BidTrades:
    """Publishes only the trades a buyer started (``ask_bid == "BID"``)."""

    types = ("trade",)
    name = "bid-trades"

    def handle(self, message: Trade) -> Trade | None:
        return message if message.ask_bid == "BID" else None


class BrokenTickers:
    """Raises on every ticker: a handler bug the broker must contain."""

    types = ("ticker",)

    def handle(self, message: Ticker) -> Ticker:
        raise ValueError(f"cannot handle {message.code}")
