"""The typed subscribe methods, and how their arguments become stream specs.

:class:`StreamMethods` gives :class:`clients.client.BrokerClient` one method per Upbit
stream type; each validates its arguments (codes trimmed and upper-cased, duplicates
merged, candle units checked) and hands the specs to the client's ``_subscribe``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

from clients.subscription import DEFAULT_MAXSIZE, Subscription
from schemas.bus import StatusEvent, StreamSpec
from schemas.upbit import CANDLE_TYPES, Candle, MyAsset, MyOrder, Orderbook, Ticker, Trade

__all__ = ["StatusCallback", "StreamMethods", "candle_type", "stream_specs"]

StatusCallback = Callable[[StatusEvent], object]
"""``on_status`` callbacks: sync or async, receive one :class:`StatusEvent`."""


class StreamMethods(ABC):
    """``subscribe_ticker`` ... ``subscribe_my_asset`` on top of one ``_subscribe``."""

    @abstractmethod
    async def _subscribe(
        self,
        streams: list[StreamSpec],
        callback: Callable[[Any], object] | None,
        on_status: StatusCallback | None,
        maxsize: int,
    ) -> Subscription[Any]:
        """Subscribe to ``streams`` as one :class:`Subscription`."""

    async def subscribe_ticker(
        self,
        codes: str | Iterable[str],
        callback: Callable[[Ticker], object] | None = None,
        *,
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> Subscription[Ticker]:
        """Tickers of ``codes`` (``"KRW-BTC"`` or a list); snapshot first, then updates."""
        return await self._subscribe(stream_specs("ticker", codes), callback, on_status, maxsize)

    async def subscribe_trade(
        self,
        codes: str | Iterable[str],
        callback: Callable[[Trade], object] | None = None,
        *,
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> Subscription[Trade]:
        """Trades of ``codes``."""
        return await self._subscribe(stream_specs("trade", codes), callback, on_status, maxsize)

    async def subscribe_orderbook(
        self,
        codes: str | Iterable[str],
        callback: Callable[[Orderbook], object] | None = None,
        *,
        depth: int | None = None,
        level: float | None = None,
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> Subscription[Orderbook]:
        """Orderbooks of ``codes``: top ``depth`` levels (1, 5, 15, 30), grouped by ``level``."""
        streams = stream_specs("orderbook", codes, depth=depth, level=level)
        return await self._subscribe(streams, callback, on_status, maxsize)

    async def subscribe_candle(
        self,
        codes: str | Iterable[str],
        callback: Callable[[Candle], object] | None = None,
        *,
        unit: str = "1m",
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> Subscription[Candle]:
        """Candles of ``codes``; ``unit`` is one of 1s 1m 3m 5m 10m 15m 30m 60m 240m."""
        streams = stream_specs(candle_type(unit), codes)
        return await self._subscribe(streams, callback, on_status, maxsize)

    async def subscribe_my_order(
        self,
        codes: str | Iterable[str] | None = None,
        callback: Callable[[MyOrder], object] | None = None,
        *,
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> Subscription[MyOrder]:
        """Your order updates (needs keys at the broker); ``codes=None`` means every market."""
        streams = stream_specs("myOrder", codes, optional=True)
        return await self._subscribe(streams, callback, on_status, maxsize)

    async def subscribe_my_asset(
        self,
        callback: Callable[[MyAsset], object] | None = None,
        *,
        on_status: StatusCallback | None = None,
        maxsize: int = DEFAULT_MAXSIZE,
    ) -> Subscription[MyAsset]:
        """Your balance changes (needs keys at the broker)."""
        streams = [StreamSpec("myAsset")]
        return await self._subscribe(streams, callback, on_status, maxsize)


def candle_type(unit: str) -> str:
    name = f"candle.{unit}"
    if name not in CANDLE_TYPES:
        units = ", ".join(t.removeprefix("candle.") for t in CANDLE_TYPES)
        raise ValueError(f"candle unit {unit!r} is not one of {units}")
    return name


def stream_specs(
    type_: str,
    codes: str | Iterable[str] | None,
    *,
    depth: int | None = None,
    level: float | None = None,
    optional: bool = False,
) -> list[StreamSpec]:
    """Stream specs for ``codes``; codes are trimmed and upper-cased, duplicates merged."""
    if codes is None:
        if optional:
            return [StreamSpec(type_)]
        raise ValueError(f"{type_} needs one or more market codes, e.g. 'KRW-BTC'")
    items = [codes] if isinstance(codes, str) else list(codes)
    specs: list[StreamSpec] = []
    for code in dict.fromkeys(items):
        if not isinstance(code, str) or not code.strip():
            raise ValueError(f"market codes must be non-empty strings, got {code!r}")
        specs.append(StreamSpec(type_, code.strip().upper(), depth, level))
    if not specs:
        raise ValueError("no market codes given")
    return list({s.topic: s for s in specs}.values())
