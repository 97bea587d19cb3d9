"""The data path: one upstream frame in, decoded once, published on its topics.

A frame is decoded by the exchange into payload structs; each goes to the topic of its
type and market when someone subscribed to it. An upstream orderbook serves every
depth clients asked for at its (code, level): it is truncated per depth with the
totals recomputed over the units kept. Status frames (keepalive answers) are dropped;
error frames go to the link that sent the request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from broker.exchange import Exchange
from broker.logs import get_logger
from broker.publisher import Publisher
from broker.subscriptions import truncate_orderbook
from schemas.bus import Payload, StreamSpec, format_level, topic_for
from schemas.errors import DecodeError
from schemas.upbit import DATA_TYPES, MyAsset, MyOrder, Orderbook, Status, UpbitMessage

__all__ = ["DataRouter"]

_TYPE_OF: dict[type, str] = {cls: name for name, cls in DATA_TYPES.items()}


class DataRouter:
    """Routes decoded upstream messages to the publisher."""

    def __init__(self, publisher: Publisher, exchange: Exchange) -> None:
        self._publisher = publisher
        self._exchange = exchange
        self._depths: dict[tuple[str, str], tuple[int, ...]] = {}
        self.messages = 0
        self.decode_errors = 0
        self.last_decode_error = ""
        self.latency_ns_total = 0
        self._log = get_logger("router")

    def set_streams(self, streams: Iterable[StreamSpec]) -> None:
        """Learn which orderbook depths each (code, level) must be published at."""
        depths: dict[tuple[str, str], set[int]] = {}
        for spec in streams:
            if spec.type == "orderbook" and spec.code is not None:
                key = (spec.code, format_level(spec.level))
                depths.setdefault(key, set()).add(spec.depth or 30)
        self._depths = {k: tuple(sorted(v, reverse=True)) for k, v in depths.items()}

    def on_frame(self, frame: bytes | str, recv_ns: int) -> list[UpbitMessage] | None:
        """Decode one frame and publish what it carries.

        Returns the messages that are not data (errors, subscription listings) for the
        link that received them, or None (the common case).
        """
        try:
            messages = self._exchange.decode(frame)
        except DecodeError as exc:
            self.decode_errors += 1
            self.last_decode_error = str(exc)[:300]
            if self.decode_errors <= 10 or self.decode_errors % 1000 == 0:
                self._log.warning(
                    "undecodable upstream frame",
                    error=self.last_decode_error,
                    count=self.decode_errors,
                )
            return None
        publisher = self._publisher
        extra: list[UpbitMessage] | None = None
        for message in messages:
            kind = _TYPE_OF.get(type(message))
            if kind is None:
                if not isinstance(message, Status):  # keepalive answers need nothing
                    extra = [*(extra or ()), message]
                continue
            self.messages += 1
            if isinstance(message, Orderbook):
                self._publish_orderbook(message, recv_ns)
                continue
            if isinstance(message, MyAsset):
                topic = "myAsset/"
            elif isinstance(message, MyOrder):
                topic = topic_for("myOrder", message.code)
                if not (publisher.is_active(topic) or publisher.is_active("myOrder/")):
                    continue
                publisher.publish(topic, cast(Payload, message), recv_ns)
                continue
            else:
                topic = f"{kind}/{message.code}/"  # type: ignore[union-attr]
            if publisher.is_active(topic):
                publisher.publish(topic, cast(Payload, message), recv_ns)
        return extra

    def _publish_orderbook(self, book: Orderbook, recv_ns: int) -> None:
        level = format_level(book.level)
        depths = self._depths.get((book.code, level))
        if not depths:
            return
        for depth in depths:
            topic = f"orderbook/{book.code}/{depth}/{level}/"
            if not self._publisher.is_active(topic):
                continue
            payload = (
                book if depth >= len(book.orderbook_units) else truncate_orderbook(book, depth)
            )
            self._publisher.publish(topic, payload, recv_ns)
