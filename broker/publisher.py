"""The data plane: per-topic sequence numbers, the last-value cache and the PUB socket.

Every message is encoded once (msgpack :class:`schemas.bus.Envelope`) and queued; at
the end of the event-loop turn each topic's queue goes out as one frame,
``topic + TOPIC_END + [envelope, ...]`` (:func:`schemas.bus.pack_published`, at most
:data:`schemas.bus.MAX_BATCH` envelopes and :data:`schemas.bus.MAX_BATCH_BYTES` each).
Under load one socket read brings hundreds of Upbit messages, about a dozen per topic,
so batching per topic divides ZeroMQ's per-message work (``send``, pipes, I/O threads,
``recv`` in every client) by up to that much; at low rates a batch holds one message.
Nothing waits for a batch to fill: the turn's messages were all received already.

Order: each topic's messages keep their order. Across topics, a turn's messages go out
grouped by topic, in the order of each topic's first message, which is harmless for
independent market streams. Where order across topics matters, it is kept exactly:
status events and heartbeats (:meth:`Publisher.publish_status`) and private streams
(:meth:`Publisher.publish_in_order`: an order's fill before the balance it changed)
first send everything queued before them.

Frames are sent with ``NOBLOCK``: a PUB socket past its high-water mark drops for that
subscriber instead of blocking the broker, so a slow client loses messages (and sees
the gap in its sequence numbers) while everybody else keeps streaming.

Only *active* topics (someone subscribed) are published and cached, so memory is
bounded by what clients ask for, not by what Upbit sends. Sequence counters survive a
topic's deactivation so a re-subscriber never sees a number repeat within one epoch.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Iterable

import msgspec
import zmq

from schemas.bus import (
    MAX_BATCH,
    MAX_BATCH_BYTES,
    BrokerHeartbeat,
    Envelope,
    Payload,
    Source,
    StatusEvent,
    pack_published,
)

__all__ = ["JOURNAL", "Publisher"]

JOURNAL = 1024
"""Private messages (myOrder, myAsset) the publisher keeps, oldest dropped first, for
clients that come back after a restart (:meth:`Publisher.journal`); a client told that
a topic lost its oldest (:meth:`Publisher.journal_cut`) reports a gap."""

_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq's enum arithmetic costs microseconds


class Publisher:
    """Publishes payloads on topics with sequence numbers and keeps their last value."""

    def __init__(self, socket: zmq.Socket[bytes], epoch: str) -> None:
        self.epoch = epoch
        self.published = 0
        self.send_errors = 0
        self._socket = socket
        self._encode = msgspec.msgpack.Encoder().encode
        self._seq: dict[str, int] = {}
        self._cache: dict[str, Envelope] = {}
        self._active: set[str] = set()
        self.frames = 0
        """Frames sent; ``published / frames`` is the mean batch size."""
        self._pending: dict[bytes, list[bytes]] = {}
        """Topic bytes -> envelopes queued this turn, topics in first-message order."""
        self._topic_bytes: dict[str, bytes] = {}
        """topic -> the topic as bytes, encoded once per topic."""
        self._journal: deque[Envelope] = deque(maxlen=JOURNAL)
        """The private messages published, in order (:meth:`journal`)."""
        self._last_journaled: OrderedDict[str, Envelope] = OrderedDict()
        """Each journaled topic's newest message, in the order they were published (a
        topic per market at most): what a topic the journal dropped whole replays as."""
        self._cut: set[str] = set()
        """Topics of which the journal dropped at least one message."""

    # -------------------------------------------------------------- activity

    def activate(self, topic: str) -> None:
        """Start publishing ``topic`` (a client subscribed to it)."""
        self._active.add(topic)

    def deactivate(self, topic: str) -> None:
        """Stop publishing ``topic`` and forget its last value."""
        self._active.discard(topic)
        self._cache.pop(topic, None)
        if topic.endswith("/") and topic.count("/") == 1:
            # A prefix topic ("myOrder/") also caches its per-market children.
            for child in [t for t in self._cache if t.startswith(topic) and t not in self._active]:
                del self._cache[child]

    def is_active(self, topic: str) -> bool:
        """True when someone subscribed to ``topic``."""
        return topic in self._active

    @property
    def active_set(self) -> set[str]:
        """The live set of active topics (read it, never change it: use activate)."""
        return self._active

    @property
    def active_topics(self) -> frozenset[str]:
        """Topics currently published."""
        return frozenset(self._active)

    # -------------------------------------------------------------- publishing

    def publish(
        self, topic: str, payload: Payload, recv_ns: int, source: Source = "websocket"
    ) -> None:
        """Send one data message on ``topic`` and cache it as the topic's last value."""
        seq = self._seq.get(topic, 0) + 1
        self._seq[topic] = seq
        envelope = Envelope(topic, seq, self.epoch, recv_ns, source, payload)
        self._cache[topic] = envelope
        # Queued per topic, then sent at the end of this event-loop turn (flush).
        key = self._topic_bytes.get(topic) or self._key(topic)
        pending = self._pending
        queued = pending.get(key)
        if queued is not None:
            queued.append(self._encode(envelope))
            return
        pending[key] = [self._encode(envelope)]
        if len(pending) == 1:
            self._schedule_flush()

    def publish_in_order(
        self, topic: str, payload: Payload, recv_ns: int, source: Source = "websocket"
    ) -> None:
        """:meth:`publish`, after sending everything queued: kept in order across topics.

        For the private streams, whose every message matters: each is also kept in the
        journal (:meth:`journal`), and sent at once rather than at the end of the loop
        turn. The broker saves the private state as published just before (so a broker
        killed after sending it does not send it again after a restart); the shorter
        the time from that save to the send, the smaller the chance that a kill falls
        in between and the message is never sent by anyone."""
        self.flush()
        self.publish(topic, payload, recv_ns, source)
        self.flush()
        envelope = self._cache[topic]
        journal = self._journal
        if len(journal) == journal.maxlen:
            self._cut.add(journal[0].topic)
        journal.append(envelope)
        self._last_journaled[topic] = envelope
        self._last_journaled.move_to_end(topic)

    def publish_status(self, topic: str, event: StatusEvent) -> None:
        """Send a status event (not cached) on a status or data topic."""
        self._publish_uncached(topic, event)

    def heartbeat(self, topic: str) -> None:
        """Tell clients the broker is alive although nothing else is flowing."""
        self._publish_uncached(topic, BrokerHeartbeat(timestamp=int(time.time() * 1000)))

    def _publish_uncached(self, topic: str, event: StatusEvent | BrokerHeartbeat) -> None:
        seq = self._seq.get(topic, 0) + 1
        self._seq[topic] = seq
        envelope = Envelope(topic, seq, self.epoch, time.time_ns(), "websocket", event)
        self.flush()  # after everything queued before it, on any topic
        self._pending[self._key(topic)] = [self._encode(envelope)]
        self._schedule_flush()

    def _key(self, topic: str) -> bytes:
        key = self._topic_bytes.get(topic)
        if key is None:
            key = self._topic_bytes[topic] = topic.encode()
        return key

    def _schedule_flush(self) -> None:
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop running (shutdown, unit tests): send now
            self.flush()

    def flush(self) -> None:
        """Send everything queued: a frame per topic, split at the batch limits.

        A frame past a client's high-water mark is dropped for that client.
        """
        pending = self._pending
        if not pending:
            return
        self._pending = {}
        send = self._socket.send
        for topic, queued in pending.items():
            for chunk in (queued,) if len(queued) == 1 else _chunks(queued):
                try:
                    send(pack_published(topic, *chunk), _NOBLOCK)
                except zmq.ZMQError:
                    self.send_errors += len(chunk)
                    continue
                self.frames += 1
                self.published += len(chunk)

    # -------------------------------------------------------------- cache

    def last_values(self, topics: Iterable[str]) -> list[Envelope]:
        """Cached last values of ``topics``; a prefix topic (``myOrder/``) matches children."""
        found: list[Envelope] = []
        for topic in topics:
            if topic in self._cache:
                found.append(self._cache[topic])
            elif topic.count("/") == 1:
                found.extend(env for t, env in self._cache.items() if t.startswith(topic))
        return found

    def journal(self, topics: Iterable[str]) -> list[Envelope]:
        """Every private message still kept whose topic is one of ``topics`` or under
        one of them (a prefix topic such as ``myOrder/``), oldest first.

        A topic whose every message the bounded journal dropped comes first with its
        newest message (those topics in the order they were published): the replaying
        client then sees how the topic ended, where silence would have let it believe
        the topic never had any. :meth:`journal_cut` names the topics to report as gaps.
        """
        wanted = tuple(topics)
        kept = [env for env in self._journal if env.topic.startswith(wanted)]
        present = {env.topic for env in kept}
        evicted = [
            env
            for topic, env in self._last_journaled.items()
            if topic.startswith(wanted) and topic not in present
        ]
        return evicted + kept

    def journal_cut(self, topics: Iterable[str]) -> list[str]:
        """The topics on or under ``topics`` whose oldest messages the journal dropped:
        a replay of them is incomplete (sequence numbers cannot tell, since status
        events on a topic take numbers too and are not journaled)."""
        wanted = tuple(topics)
        return sorted(topic for topic in self._cut if topic.startswith(wanted))

    def cached(self, topic: str) -> Envelope | None:
        """The last value of one topic, if any."""
        return self._cache.get(topic)

    @property
    def cache_size(self) -> int:
        """Number of topics holding a last value."""
        return len(self._cache)


def _chunks(queued: list[bytes]) -> list[list[bytes]]:
    """``queued`` cut into runs of at most MAX_BATCH envelopes and MAX_BATCH_BYTES.

    A run closes before the envelope that would take it past either limit, so only an
    envelope larger than MAX_BATCH_BYTES on its own makes a bigger frame.
    """
    runs: list[list[bytes]] = []
    start = size = 0
    for index, body in enumerate(queued):
        if index > start and (index - start == MAX_BATCH or size + len(body) > MAX_BATCH_BYTES):
            runs.append(queued[start:index])
            start, size = index, 0
        size += len(body)
    runs.append(queued[start:])
    return runs
