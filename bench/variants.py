"""Broker variants for A/B runs: the broker with a proposed change patched in at start.

``python -m bench.variants publish-batch`` runs ``broker.cli.main()`` after replacing
``broker.publisher.Publisher._send``, so a benchmark can measure a recommended change in
the same run as the unmodified broker, before anyone edits ``broker/``. Once a change is
applied for real, its variant here is obsolete.

- ``publish-batch``: send ``[topic, envelope]`` with two ``Socket.send`` calls and
  precomputed int flags (``send_multipart`` ORs ``zmq.SNDMORE`` into the flags per part:
  Python-level ``enum.Flag`` arithmetic costing microseconds), cache each topic's bytes,
  and flush everything published during one event-loop iteration together
  (``loop.call_soon``), so ZeroMQ's I/O thread wakes once per burst, not per message.
- ``publish-int``: only the int flags and cached topic bytes.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import zmq

VARIANTS = ("publish-int", "publish-batch")
_MORE_NB = int(zmq.SNDMORE | zmq.NOBLOCK)
_NB = int(zmq.NOBLOCK)
_TOPICS: dict[str, bytes] = {}


def _send_now(self: Any, topic: str, data: bytes) -> None:
    raw = _TOPICS.get(topic)
    if raw is None:
        raw = _TOPICS[topic] = topic.encode()
    sock = self._socket
    try:
        sock.send(raw, _MORE_NB)
        sock.send(data, _NB)
    except zmq.ZMQError:
        self.send_errors += 1
        return
    self.published += 1


def _send_batched(self: Any, topic: str, data: bytes) -> None:
    queue: list[tuple[str, bytes]] | None = getattr(self, "_bench_queue", None)
    if queue is None:
        queue = []
        self._bench_queue = queue
    queue.append((topic, data))
    if len(queue) == 1:
        try:
            asyncio.get_running_loop().call_soon(_flush, self)
        except RuntimeError:  # no loop (tests, shutdown): send at once
            _flush(self)


def _flush(self: Any) -> None:
    queue: list[tuple[str, bytes]] = self._bench_queue
    self._bench_queue = []
    for topic, data in queue:
        _send_now(self, topic, data)


def apply(variant: str) -> None:
    """Patch the broker in this process."""
    from broker.publisher import Publisher

    if not hasattr(Publisher, "_send"):
        raise SystemExit("broker.publisher.Publisher._send is gone: this variant is obsolete")
    if variant.startswith("publish-") and hasattr(Publisher, "flush"):
        # The broker batches its sends itself now (Publisher.flush): nothing to compare.
        raise SystemExit(f"{variant}: the broker already has this change (Publisher.flush)")
    if variant == "publish-int":
        Publisher._send = _send_now  # type: ignore[method-assign]
    elif variant == "publish-batch":
        Publisher._send = _send_batched  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: python -m bench.variants {{{','.join(VARIANTS)}}} [broker args]")
    apply(sys.argv[1])
    from broker.cli import main as broker_main

    return broker_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
