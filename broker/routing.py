"""The data path: one upstream frame in, decoded once, published on its topics.

A frame is decoded by the exchange into payload structs; each goes to the topic of its
type and market when someone subscribed to it. An upstream orderbook serves every
depth clients asked for at its (code, level): it is truncated per depth with the
totals recomputed over the units kept. Status frames (keepalive answers) are dropped;
errors and subscription listings are handed back to the link that received them.

The same :meth:`DataRouter.route` publishes what the REST fallback fetches, so both
sources share the trade de-duplication (a trade is published once whichever source
brings it first) and the private-state observer that reconciliation relies on. That
observer also filters: a private WebSocket event REST reconciliation already published
(the stream raced an audit or a reconnect) is dropped, so each state and fill reaches
subscribers once.

Upbit may carry a ticker, trade or candle stream nobody subscribed to (released, or
requested ahead of demand while requests are scarce: see
:func:`broker.subscriptions.widen_request`). Its latest payload is kept "unclaimed",
and the client that subscribes to it first gets it at once as its snapshot, as Upbit
would have sent one for a new request (:meth:`DataRouter.claim`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Final

from broker.dedupe import TradeDeduper, orderbook_fingerprint, ticker_fingerprint
from broker.exchange import Exchange
from broker.handlers import HandlerChain, HandlerSet
from broker.logs import get_logger
from broker.publisher import Publisher
from broker.subscriptions import (
    OrderbookKey,
    UpstreamStream,
    fan_out_orderbook_depths,
    orderbook_key,
    truncate_orderbook,
)
from schemas.bus import Source, StreamSpec, format_level, topic_for
from schemas.errors import DecodeError
from schemas.upbit import (
    DATA_TYPES,
    MyAsset,
    MyOrder,
    Orderbook,
    Status,
    Ticker,
    Trade,
    UpbitData,
    UpbitMessage,
)

__all__ = ["TOPIC_CACHE_LIMIT", "DataRouter"]

TOPIC_CACHE_LIMIT: Final = 2048
"""Topic strings cached per stream type. Upbit lists ~700 markets, so every real code
fits; codes are whatever upstream frames say, though, so past this the oldest entry
goes (rebuilding it later costs one f-string) and the cache cannot grow without bound."""


class DataRouter:
    """Routes decoded messages (from the WebSocket or REST) to the publisher."""

    def __init__(
        self,
        publisher: Publisher,
        exchange: Exchange,
        *,
        on_private: Callable[[MyOrder | MyAsset, Source], bool] | None = None,
        handlers: HandlerSet | None = None,
    ) -> None:
        self._publisher = publisher
        self._exchange = exchange
        self._depths: dict[OrderbookKey, tuple[int, ...]] = {}
        self._deepening: dict[OrderbookKey, int] = {}
        """(code, level) whose upstream depth just grew -> the old depth still in flight."""
        self.trades = TradeDeduper()
        self.received: Counter[str] = Counter()
        """Messages routed per stream type (WebSocket and REST), read by /metrics."""
        self.duplicates = 0
        self.private_duplicates = 0
        """Private WebSocket events dropped: REST reconciliation had published them."""
        self.decode_errors = 0
        self.last_decode_error = ""
        self._log = get_logger("router")
        self._unclaimed: dict[str, tuple[Any, int, Source]] = {}
        """topic -> latest (payload, recv_ns, source) of a carried stream nobody wants."""
        self._carried: frozenset[str] = frozenset()
        """Topics of the public link's last request: only these keep a payload."""
        # Hot-path shortcuts: bound methods and the publisher's live set of topics.
        self._decode = exchange.decode
        self._publish = publisher.publish
        self._active = publisher.active_set
        self._ticker_topics: dict[str, str] = {}
        self._trade_topics: dict[str, str] = {}
        self._topics: dict[str, dict[str, str]] = {
            "ticker": self._ticker_topics,
            "trade": self._trade_topics,
            "myOrder": {},
        }
        self._routes: dict[type, Callable[[Any, int, Source], None]] = {
            Ticker: self._route_ticker,
            Trade: self._route_trade,
            Orderbook: self._route_orderbook,
            MyOrder: self._route_my_order,
            MyAsset: self._route_my_asset,
        }
        for kind, cls in DATA_TYPES.items():  # candles: plain ``kind/code/`` topics
            if cls not in self._routes:
                self._topics[kind] = {}
                self._routes[cls] = partial(self._route_per_code, kind)
        # Layers around a type's route, innermost first: pluggable handlers (types
        # without any cost nothing), then the private-state observer, so reconciliation
        # sees myOrder/myAsset as Upbit sent them whatever a handler drops or rewrites.
        for cls, chain in (handlers.chains if handlers is not None else {}).items():
            self._routes[cls] = partial(self._transformed, chain, self._routes[cls])
        if on_private is not None:
            for cls in (MyOrder, MyAsset):
                self._routes[cls] = partial(self._observed, on_private, self._routes[cls])

    def set_streams(self, streams: Iterable[StreamSpec]) -> None:
        """Learn which orderbook depths each (code, level) must be published at.

        When the deepest depth of a (code, level) grows, books of the old depth are
        still in flight until Upbit answers the new request with a SNAPSHOT: until then
        they only feed the depths they can fill, never a deeper topic.
        """
        new = fan_out_orderbook_depths(streams)
        for key, old in self._depths.items():
            if key in new and new[key][0] > old[0]:
                self._deepening[key] = min(old[0], self._deepening.get(key, old[0]))
        self._deepening = {k: v for k, v in self._deepening.items() if k in new}
        self._depths = new

    def on_frame(self, frame: bytes | str, recv_ns: int) -> list[UpbitMessage] | None:
        """Decode one WebSocket frame and publish what it carries.

        Returns the messages that are not data (errors, subscription listings) for the
        link that received them, or None (the common case).

        This is the broker's hot path (every upstream frame): one decode, then a
        dispatch on the exact payload class to a handler with its topic strings cached.
        """
        try:
            messages = self._decode(frame)
        except DecodeError as exc:
            self._on_decode_error(exc)
            return None
        extra: list[UpbitMessage] | None = None
        routes = self._routes
        for message in messages:
            route = routes.get(type(message))
            if route is not None:
                route(message, recv_ns, "websocket")
            elif not isinstance(message, Status):  # keepalive answers need nothing
                extra = [*(extra or ()), message]
        return extra

    @property
    def messages(self) -> int:
        """Messages routed since start, every type."""
        return sum(self.received.values())

    def _on_decode_error(self, exc: DecodeError) -> None:
        self.decode_errors += 1
        self.last_decode_error = str(exc)[:300]
        if self.decode_errors <= 10 or self.decode_errors % 1000 == 0:
            self._log.warning(
                "undecodable upstream frame",
                error=self.last_decode_error,
                count=self.decode_errors,
            )

    def route(self, message: UpbitData, recv_ns: int, source: Source) -> None:
        """Publish one payload on its topic(s), if anyone subscribed."""
        self._routes[type(message)](message, recv_ns, source)

    def _topic(self, kind: str, code: str) -> str:
        """``kind/code/``, built once per (kind, code) while it stays cached.

        Bounded by :data:`TOPIC_CACHE_LIMIT` per kind, oldest first out. Not an LRU
        (a hit would have to reorder on the hot path) and not tied to subscriptions
        (myOrder codes and stray upstream codes are no stream anyone asked for).
        """
        topics = self._topics[kind]
        topic = topics.get(code)
        if topic is None:
            if len(topics) >= TOPIC_CACHE_LIMIT:
                del topics[next(iter(topics))]
            topic = topics[code] = topic_for(kind, code)
        return topic

    @property
    def cached_topics(self) -> int:
        """Topic strings cached for (type, code) pairs, at most :data:`TOPIC_CACHE_LIMIT`
        per type."""
        return sum(len(topics) for topics in self._topics.values())

    def _route_ticker(self, ticker: Ticker, recv_ns: int, source: Source) -> None:
        self.received["ticker"] += 1
        topic = self._ticker_topics.get(ticker.code) or self._topic("ticker", ticker.code)
        if topic not in self._active:
            if topic in self._carried:
                self._unclaimed[topic] = (ticker, recv_ns, source)
            return
        if source == "rest" and self._unchanged_ticker(topic, ticker):
            return
        self._publish(topic, ticker, recv_ns, source)

    def _route_trade(self, trade: Trade, recv_ns: int, source: Source) -> None:
        self.received["trade"] += 1
        topic = self._trade_topics.get(trade.code) or self._topic("trade", trade.code)
        if topic not in self._active:
            if topic in self._carried:
                self._unclaimed[topic] = (trade, recv_ns, source)
            return
        if self.trades.seen(trade.code, trade.sequential_id):
            self.duplicates += 1
            return
        self._publish(topic, trade, recv_ns, source)

    @staticmethod
    def _transformed(
        chain: HandlerChain,
        route: Callable[[Any, int, Source], None],
        message: Any,
        recv_ns: int,
        source: Source,
    ) -> None:
        result = chain(message)
        if result is not None:
            route(result, recv_ns, source)

    def _observed(
        self,
        observe: Callable[[MyOrder | MyAsset, Source], bool],
        route: Callable[[Any, int, Source], None],
        message: MyOrder | MyAsset,
        recv_ns: int,
        source: Source,
    ) -> None:
        try:
            news = observe(message, source)
        except ArithmeticError as exc:  # an amount such as "sNaN": no number to compare
            self._on_decode_error(DecodeError(f"unusable {type(message).__name__}: {exc!r}"))
            return
        if news:
            route(message, recv_ns, source)
        else:
            self.private_duplicates += 1

    def _route_per_code(self, kind: str, message: Any, recv_ns: int, source: Source) -> None:
        self.received[kind] += 1
        topic = self._topic(kind, message.code)
        if topic in self._active:
            self._publish(topic, message, recv_ns, source)
        elif topic in self._carried:
            self._unclaimed[topic] = (message, recv_ns, source)

    def _route_my_order(self, order: MyOrder, recv_ns: int, source: Source) -> None:
        self.received["myOrder"] += 1
        # Published on its market's topic; "myOrder/" subscribers match it by prefix.
        topic = self._topic("myOrder", order.code)
        if "myOrder/" in self._active or topic in self._active:
            # In order with the other private streams: a fill before its balance change.
            self._publisher.publish_in_order(topic, order, recv_ns, source)

    def _route_my_asset(self, asset: MyAsset, recv_ns: int, source: Source) -> None:
        self.received["myAsset"] += 1
        if "myAsset/" in self._active:
            self._publisher.publish_in_order("myAsset/", asset, recv_ns, source)

    def _unchanged_ticker(self, topic: str, ticker: Ticker) -> bool:
        cached = self._publisher.cached(topic)
        return (
            cached is not None
            and isinstance(cached.data, Ticker)
            and ticker_fingerprint(cached.data) == ticker_fingerprint(ticker)
        )

    def _route_orderbook(self, book: Orderbook, recv_ns: int, source: Source) -> None:
        self.received["orderbook"] += 1
        key = orderbook_key(book)
        depths = self._depths.get(key)
        if not depths:
            return
        limit = self._deepening.get(key)
        if limit is not None:
            if (
                book.stream_type == "SNAPSHOT"
                or len(book.orderbook_units) > limit
                or source == "rest"
            ):
                del self._deepening[key]
            else:
                depths = tuple(d for d in depths if d <= limit)
        level = format_level(key[1])
        for depth in depths:
            topic = f"orderbook/{key[0]}/{depth}/{level}/"
            if topic not in self._active:
                continue
            payload = (
                book if depth >= len(book.orderbook_units) else truncate_orderbook(book, depth)
            )
            if source == "rest":
                cached = self._publisher.cached(topic)
                if (
                    cached is not None
                    and isinstance(cached.data, Orderbook)
                    and orderbook_fingerprint(cached.data) == orderbook_fingerprint(payload)
                ):
                    continue
            self._publish(topic, payload, recv_ns, source)

    def claim(self, topic: str) -> None:
        """``topic`` was just activated: publish the payload kept for it, if any.

        Call it before answering the subscribe, so the publisher's last value (the
        reply's snapshot) already holds it.
        """
        item = self._unclaimed.pop(topic, None)
        if item is None:
            return
        payload, recv_ns, source = item
        if isinstance(payload, Trade) and self.trades.seen(payload.code, payload.sequential_id):
            return
        self._publish(topic, payload, recv_ns, source)

    def set_carried(self, carried: Iterable[UpstreamStream]) -> None:
        """The public link's request changed: keep payloads of exactly these streams.

        A payload of a stream no longer requested is forgotten, and so is any that
        arrives for it later (Upbit may have sent it before the new request took
        effect): handed out much later as a snapshot, it would be stale.
        """
        self._carried = frozenset(
            topic_for(s.type, s.code) for s in carried if s.code is not None and not s.is_private
        )
        for topic in [t for t in self._unclaimed if t not in self._carried]:
            del self._unclaimed[topic]

    @property
    def unclaimed(self) -> int:
        """Number of payloads kept for streams nobody subscribed to."""
        return len(self._unclaimed)

    def forget(self, spec: StreamSpec) -> None:
        """A stream was released: drop what was remembered for de-duplication."""
        if spec.type == "trade" and spec.code is not None:
            self.trades.forget(spec.code)
