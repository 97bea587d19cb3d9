"""Hostile bus peers for fuzzing a live broker: seeded, bounded, counted by kind.

Each attack is a function of a :class:`random.Random` and a control endpoint that opens
raw DEALER sockets, sends what a buggy or malicious program might send, reads nothing
back (or only a little) and closes. :class:`Fuzzer` runs a mixed, seeded schedule of
them for a fixed number of rounds. Shared by ``tests/integration/test_fuzz.py`` (short)
and ``bench/fuzz.py`` (long run).

Not attacked here: routing ids that begin with a zero byte. libzmq reserves them for the
ids it generates itself, and a peer that claims the next one makes libzmq abort the
process (see README, Security). Only a same-user process reaches an ipc endpoint, and it
could kill the broker with a signal anyway; over tcp, CURVE keeps unknown peers out.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from schemas.bus import PROTOCOL_VERSION

Attack = Callable[[random.Random, "Peers"], int]
"""Sends one attack; returns how many messages it sent."""

_pack = msgspec.msgpack.Encoder().encode
CODES = ("KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "KRW-DOGE", "BTC-ETH", "USDT-BTC")


class Peers:
    """Opens DEALER sockets to one control endpoint and closes them all at the end."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.open: list[zmq.Socket[bytes]] = []

    def socket(self, rng: random.Random, *, identity: bool = True) -> zmq.Socket[bytes]:
        """A connected DEALER; with ``identity``, a random id whose first byte is not 0."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.SNDTIMEO, 2000)
        if identity:
            sock.setsockopt(zmq.ROUTING_ID, bytes([rng.randint(1, 255)]) + rng.randbytes(15))
        sock.connect(self.endpoint)
        self.open.append(sock)
        return sock

    def close(self) -> None:
        """Close every socket, giving queued messages up to 2 s to leave."""
        for sock in self.open:
            sock.close(linger=2000)
        self.open.clear()
        self.ctx.term()


def hello(name: str = "fuzz", client_id: str | None = None) -> bytes:
    return _pack(
        {
            "op": "hello",
            "client_id": client_id or os.urandom(8).hex(),
            "name": name,
            "protocol": PROTOCOL_VERSION,
        }
    )


def _stream(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(("ticker", "trade", "orderbook"))
    spec: dict[str, Any] = {"type": kind, "code": rng.choice(CODES)}
    if kind == "orderbook" and rng.random() < 0.5:
        spec["depth"] = rng.choice((1, 5, 15, 30))
    return spec


def garbage(rng: random.Random, peers: Peers) -> int:
    """Random bytes, one frame of 0 to 4 KB."""
    peers.socket(rng).send(rng.randbytes(rng.randint(0, 4096)))
    return 1


def multipart(rng: random.Random, peers: Peers) -> int:
    """Two to five frames where the broker expects one."""
    parts = [
        hello() if i == 0 else rng.randbytes(rng.randint(0, 64)) for i in range(rng.randint(2, 5))
    ]
    peers.socket(rng).send_multipart(parts)
    return 1


def wrong_types(rng: random.Random, peers: Peers) -> int:
    """Well-formed msgpack, valid ops, fields of the wrong type or missing."""
    sock = peers.socket(rng)
    sock.send(hello())
    bad: list[dict[str, Any]] = [
        {"op": "subscribe", "req": "one", "streams": []},
        {"op": "subscribe", "req": 1, "streams": 5},
        {"op": "subscribe", "req": 1, "streams": [{"type": 7}]},
        {
            "op": "subscribe",
            "req": 1,
            "streams": [{"type": "orderbook", "code": "KRW-BTC", "depth": "15"}],
        },
        {"op": "unsubscribe", "req": -1, "streams": [None]},
        {"op": "get_snapshot", "req": 2**64 - 1, "streams": []},
        {"op": "hello"},
        {"op": "nope", "req": 1},
        {"op": None},
        {"op": "heartbeat", "received": "lots"},
    ]
    chosen = rng.sample(bad, k=rng.randint(1, len(bad)))
    for message in chosen:
        sock.send(_pack(message))
    return 1 + len(chosen)


def deep(rng: random.Random, peers: Peers) -> int:
    """msgpack arrays nested 1,000 to 200,000 deep (a recursion bomb for decoders)."""
    depth = rng.choice((1_000, 10_000, 200_000))
    peers.socket(rng).send(b"\x91" * depth + b"\xc0")
    return 1


def huge(rng: random.Random, peers: Peers) -> int:
    """A 1 to 8 MB hello name, or a subscribe with 100,000 streams."""
    sock = peers.socket(rng)
    if rng.random() < 0.5:
        sock.send(hello(name="x" * rng.randint(1, 8) * 2**20))
    else:
        sock.send(hello())
        streams = [{"type": "ticker", "code": f"KRW-{i}"} for i in range(100_000)]
        sock.send(_pack({"op": "subscribe", "req": 1, "streams": streams}))
    return 1


def jwt_name(rng: random.Random, peers: Peers) -> int:
    """A name of 120 KB of ``eyJ``: input that makes a careless JWT mask regex quadratic."""
    peers.socket(rng).send(hello(name="eyJ" * 40_000))
    return 1


def flood(rng: random.Random, peers: Peers) -> int:
    """One client: 2,000 subscribe/unsubscribe requests back to back, replies never read."""
    sock = peers.socket(rng)
    sock.send(hello())
    sent = 1
    for req in range(1_000):
        streams = [_stream(rng)]
        sock.send(_pack({"op": "subscribe", "req": 2 * req, "streams": streams}))
        sock.send(_pack({"op": "unsubscribe", "req": 2 * req + 1, "streams": streams}))
        sent += 2
    return sent


def identities(rng: random.Random, peers: Peers) -> int:
    """100 clients: hello, subscribe, vanish without bye (left to heartbeat expiry)."""
    for _ in range(100):
        sock = peers.socket(rng)
        sock.send(hello())
        sock.send(_pack({"op": "subscribe", "req": 1, "streams": [_stream(rng)]}))
    return 200


def anonymous(rng: random.Random, peers: Peers) -> int:
    """Peers without a routing id of their own (libzmq generates one)."""
    for _ in range(10):
        peers.socket(rng, identity=False).send(hello())
    return 10


def absurd_options(rng: random.Random, peers: Peers) -> int:
    """Stream options Upbit would refuse, which must never reach the shared request."""
    sock = peers.socket(rng)
    sock.send(hello())
    specs: list[dict[str, Any]] = [
        {"type": "orderbook", "code": "KRW-BTC", "level": 1e300},
        {"type": "orderbook", "code": "KRW-BTC", "level": -5.0},
        {"type": "orderbook", "code": "KRW-BTC", "level": float("nan")},
        {"type": "orderbook", "code": "KRW-BTC", "depth": 7},
        {"type": "orderbook", "code": "KRW-BTC", "depth": -1},
        {"type": "ticker", "code": "KRW-BTC\x00x"},
        {"type": "ticker", "code": "../../etc"},
        {"type": "ticker", "code": "K" * 10_000},
        {"type": "candle.7s", "code": "KRW-BTC"},
        {"type": "myOrder", "code": "KRW-BTC"},
        {"type": "ticker"},
    ]
    for req, spec in enumerate(specs):
        sock.send(_pack({"op": "subscribe", "req": req, "streams": [spec]}))
    levels = [{"type": "orderbook", "code": "KRW-BTC", "level": float(i)} for i in range(1, 30_001)]
    sock.send(_pack({"op": "subscribe", "req": 99, "streams": levels[: rng.randint(1, 30_000)]}))
    return len(specs) + 2


def snapshots(rng: random.Random, peers: Peers) -> int:
    """Snapshot requests for many streams, many times, replies never read."""
    sock = peers.socket(rng)
    sock.send(hello())
    for req in range(50):
        streams = [{"type": "ticker", "code": c} for c in CODES] + [
            {"type": "trade", "code": rng.choice(CODES)}
        ]
        sock.send(_pack({"op": "get_snapshot", "req": req, "streams": streams}))
    return 51


def no_hello(rng: random.Random, peers: Peers) -> int:
    """Requests from a client that never said hello."""
    sock = peers.socket(rng)
    for req in range(20):
        sock.send(_pack({"op": "subscribe", "req": req, "streams": [_stream(rng)]}))
    return 20


ATTACKS: dict[str, Attack] = {
    "garbage": garbage,
    "multipart": multipart,
    "wrong_types": wrong_types,
    "deep": deep,
    "huge": huge,
    "jwt_name": jwt_name,
    "flood": flood,
    "identities": identities,
    "anonymous": anonymous,
    "absurd_options": absurd_options,
    "snapshots": snapshots,
    "no_hello": no_hello,
}


@dataclass
class Fuzzer:
    """Runs a seeded schedule of attacks against one control endpoint."""

    endpoint: str
    seed: int
    attacks: int = field(default=0)
    messages: Counter[str] = field(default_factory=Counter)
    rounds: Counter[str] = field(default_factory=Counter)

    def run(self, rounds: int, *, between: Callable[[], None] | None = None) -> None:
        """``rounds`` attacks drawn with the seed; ``between`` runs after each one."""
        rng = random.Random(self.seed)
        kinds = sorted(ATTACKS)
        for _ in range(rounds):
            kind = rng.choice(kinds)
            peers = Peers(self.endpoint)
            try:
                self.messages[kind] += ATTACKS[kind](rng, peers)
                self.rounds[kind] += 1
            finally:
                peers.close()
            if between is not None:
                between()

    def table(self) -> str:
        lines = [f"{'attack':16} {'rounds':>7} {'messages':>9}"]
        for kind in sorted(self.rounds):
            lines.append(f"{kind:16} {self.rounds[kind]:7} {self.messages[kind]:9}")
        return "\n".join(lines)
