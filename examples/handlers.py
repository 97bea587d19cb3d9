"""Data handler example: publish only the large trades of KRW markets.

Load it into the broker without writing code elsewhere::

    UPBIT_BROKER_HANDLERS=examples.handlers:LargeTrades upbit-broker

(run from the repository root, or install the module anywhere on ``PYTHONPATH``). Every
client of a ``trade/KRW-...`` topic then receives only trades worth at least
``LARGE_TRADE_KRW`` (default 1,000,000 KRW); sequence numbers stay contiguous because
dropped trades never get one. Other quote currencies pass through unchanged.

A handler is any object with ``types`` (the Upbit data types it wants) and
``handle(message)`` returning the message to publish (or a changed copy of the same
class, made with ``msgspec.structs.replace``) or None to drop it; see
:mod:`broker.handlers`.
"""

from __future__ import annotations

import os

from schemas.upbit import Trade


class LargeTrades:
    """Drops KRW-market trades below a notional value."""

    types = frozenset({"trade"})
    name = "large-trades"

    def __init__(self, min_krw: float | None = None) -> None:
        raw = os.environ.get("LARGE_TRADE_KRW", "1000000") if min_krw is None else min_krw
        self.min_krw = float(raw)
        if not self.min_krw >= 0:
            raise ValueError(f"LARGE_TRADE_KRW must be a number >= 0, got {raw!r}")

    def handle(self, message: Trade) -> Trade | None:
        """The trade if it is large enough (or not priced in KRW), else None."""
        if not message.code.startswith("KRW-"):
            return message
        return message if message.trade_price * message.trade_volume >= self.min_krw else None
