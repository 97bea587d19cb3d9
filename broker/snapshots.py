"""Current values on demand: from the last-value cache, else fetched over REST.

``get_snapshot`` must not disturb the realtime streams other clients rely on, so a
value that is not cached is fetched with one REST call per kind (rate limited like any
other) instead of changing the upstream subscription. Fetched values carry ``seq=0``
(outside any topic's sequence) and ``source="rest"``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import cast

from broker.ports import LastValues
from broker.rest import RestClient
from schemas.bus import DEFAULT_ORDERBOOK_DEPTH, Envelope, Payload, StreamSpec, topic_for
from schemas.rest import (
    rest_accounts_to_my_asset,
    rest_candle_to_candle,
    rest_order_to_my_order,
    rest_orderbook_to_orderbook,
    rest_ticker_to_ticker,
    rest_trade_to_trade,
)

__all__ = ["MAX_SINGLE_CALLS", "SnapshotTooBig", "Snapshots"]

MAX_SINGLE_CALLS = 20
"""REST calls one snapshot request may cost for kinds fetched one stream at a time."""


class SnapshotTooBig(Exception):
    """A snapshot request would cost more REST calls than one request may."""


class Snapshots:
    """Answers ``get_snapshot`` from the publisher's cache, else one REST call per kind."""

    def __init__(self, cache: LastValues, rest: RestClient, epoch: str) -> None:
        self._cache = cache
        self._rest = rest
        self._epoch = epoch

    def last_values(self, topics: Iterable[str]) -> list[Envelope]:
        """The cached last envelope of each of ``topics`` that has one."""
        return self._cache.last_values(topics)

    def journal(self, topics: Iterable[str]) -> list[Envelope]:
        """Every private message kept on (or under) ``topics``, oldest first."""
        return self._cache.journal(topics)

    def journal_cut(self, topics: Iterable[str]) -> list[str]:
        """Topics on (or under) ``topics`` whose replay misses their oldest messages."""
        return self._cache.journal_cut(topics)

    async def fetch(self, specs: Sequence[StreamSpec]) -> tuple[list[Envelope], list[str]]:
        """Envelopes for ``specs`` and the topics that have no value at all.

        Uncached tickers come in one REST call (per 100 codes) and orderbooks in one
        call per (depth, level), whatever their number; every other kind costs a call
        per stream, at most :data:`MAX_SINGLE_CALLS` per request (SnapshotTooBig past
        it), so one request can never queue hundreds of calls on the host's budget.
        """
        items: list[Envelope] = []
        missing: list[str] = []
        uncached: list[StreamSpec] = []
        for spec in specs:
            cached = self.last_values([spec.topic])
            if cached:
                items.extend(cached)
            else:
                uncached.append(spec)
        singles = [s for s in uncached if s.type not in ("ticker", "orderbook")]
        if len(singles) > MAX_SINGLE_CALLS:
            raise SnapshotTooBig(
                f"{len(singles)} uncached trade, candle or private streams would take as "
                f"many REST calls; a snapshot request may take at most {MAX_SINGLE_CALLS}"
            )
        fetched: dict[str, Payload] = {}
        rest = self._rest
        now_ms = int(time.time() * 1000)
        tickers = [s for s in uncached if s.type == "ticker" and s.code]
        if tickers:
            for t in await rest.tickers([s.code for s in tickers if s.code]):
                topic = topic_for("ticker", t.market)
                fetched[topic] = rest_ticker_to_ticker(t, stream_type="SNAPSHOT", now_ms=now_ms)
        books: dict[tuple[int, float], list[StreamSpec]] = {}
        for spec in uncached:
            if spec.type == "orderbook" and spec.code:
                key = (spec.depth or DEFAULT_ORDERBOOK_DEPTH, spec.level or 0.0)
                books.setdefault(key, []).append(spec)
        for (depth, level), group in books.items():
            codes = [s.code for s in group if s.code]
            for b in await rest.orderbooks(codes, level=level, count=depth):
                topic = topic_for("orderbook", b.market, depth, level)
                fetched[topic] = rest_orderbook_to_orderbook(
                    b, stream_type="SNAPSHOT", now_ms=now_ms
                )
        now_ns = time.time_ns()
        for spec in uncached:
            if spec.type in ("ticker", "orderbook"):
                payload = fetched.get(spec.topic)
                found = [(spec.topic, payload)] if payload is not None else []
            else:
                found = await _fetch(rest, spec)
            if not found:
                missing.append(spec.topic)
            for topic, value in found:
                items.append(Envelope(topic, 0, self._epoch, now_ns, "rest", value))
        return items, missing


async def _fetch(rest: RestClient, spec: StreamSpec) -> list[tuple[str, Payload]]:
    now_ms = int(time.time() * 1000)
    code = spec.code
    if spec.type == "ticker" and code:
        return [
            (spec.topic, rest_ticker_to_ticker(t, stream_type="SNAPSHOT", now_ms=now_ms))
            for t in await rest.tickers([code])
        ]
    if spec.type == "orderbook" and code:
        books = await rest.orderbooks(
            [code], level=spec.level, count=spec.depth or DEFAULT_ORDERBOOK_DEPTH
        )
        return [
            (spec.topic, rest_orderbook_to_orderbook(b, stream_type="SNAPSHOT", now_ms=now_ms))
            for b in books
        ]
    if spec.type == "trade" and code:
        return [
            (spec.topic, rest_trade_to_trade(t, stream_type="SNAPSHOT", now_ms=now_ms))
            for t in (await rest.trades(code, 1))[:1]
        ]
    if spec.type.startswith("candle.") and code:
        unit = spec.type.removeprefix("candle.")
        return [
            (
                spec.topic,
                cast(
                    Payload,
                    rest_candle_to_candle(c, spec.type, stream_type="SNAPSHOT", now_ms=now_ms),
                ),
            )
            for c in (await rest.candles(code, unit, 1))[:1]
        ]
    if spec.type == "myAsset":
        return [(spec.topic, rest_accounts_to_my_asset(await rest.accounts(), now_ms=now_ms))]
    if spec.type == "myOrder":
        orders = await rest.open_orders()
        return [
            (topic_for("myOrder", o.market), rest_order_to_my_order(o, now_ms=now_ms))
            for o in orders
            if code is None or o.market == code
        ]
    return []
