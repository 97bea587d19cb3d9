"""Which clients are alive: last-seen times, heartbeat expiry and per-client counters.

Clients heartbeat every ``interval`` seconds; one silent for longer than
``interval * liveness`` is presumed dead and the broker releases its streams (the
ZeroMQ Guide's Paranoid Pirate rule). ZeroMQ cannot tell the broker which ROUTER peer
died, so this table is the only source of truth. Pure: ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from schemas.bus import ClientMetrics

__all__ = ["ClientInfo", "ClientTable"]


@dataclass(slots=True)
class ClientInfo:
    """One known client: identity from hello, times, and counters from its heartbeats."""

    client_id: str
    name: str
    pid: int
    first_seen: float
    last_seen: float
    received: int = 0
    """Messages the client says it received (its own counter)."""
    gaps: int = 0
    """Sequence gaps the client says it saw."""
    lag_ms: float = 0.0
    """The client's reported lag behind the broker's receive time."""
    dropped: int = 0
    """Messages the client says its own full queues discarded."""
    heartbeats: int = 0

    def metrics(self, now: float, streams: int) -> ClientMetrics:
        """This client's row in the broker's metrics reply."""
        return ClientMetrics(
            client_id=self.client_id,
            name=self.name,
            streams=streams,
            received=self.received,
            gaps=self.gaps,
            lag_ms=self.lag_ms,
            last_seen_seconds=max(0.0, now - self.last_seen),
            dropped=self.dropped,
        )


class ClientTable:
    """Known clients by id. Any message from a client counts as a sign of life.

    :meth:`add` registers (on hello); :meth:`touch` and :meth:`heartbeat` refresh and
    return False for an unknown id, so the caller can answer ``unknown_client``.
    """

    def __init__(self) -> None:
        self._clients: dict[str, ClientInfo] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    def __iter__(self) -> Iterator[ClientInfo]:
        return iter(self.all())

    def add(self, client_id: str, now: float, *, name: str = "", pid: int = 0) -> bool:
        """Register a client (hello); True when new. A repeated hello refreshes identity
        and last-seen but keeps counters and first-seen."""
        info = self._clients.get(client_id)
        if info is None:
            self._clients[client_id] = ClientInfo(client_id, name, pid, now, now)
            return True
        info.name = name
        info.pid = pid
        info.last_seen = max(info.last_seen, now)
        return False

    def touch(self, client_id: str, now: float) -> bool:
        """Mark ``client_id`` alive at ``now``; False when it is not registered."""
        info = self._clients.get(client_id)
        if info is None:
            return False
        info.last_seen = max(info.last_seen, now)
        return True

    def known(self, client_id: str) -> bool:
        """True when ``client_id`` is registered (else reply ``unknown_client``)."""
        return client_id in self._clients

    def report(
        self, client_id: str, received: int, gaps: int, lag_ms: float, dropped: int = 0
    ) -> bool:
        """Store the counters a heartbeat carries; False when ``client_id`` is unknown.

        Does not refresh last-seen: call :meth:`touch` for every message (or use
        :meth:`heartbeat`, which does both).
        """
        info = self._clients.get(client_id)
        if info is None:
            return False
        info.received = received
        info.gaps = gaps
        info.lag_ms = lag_ms
        info.dropped = dropped
        info.heartbeats += 1
        return True

    def heartbeat(
        self, client_id: str, now: float, *, received: int = 0, gaps: int = 0, lag_ms: float = 0.0
    ) -> bool:
        """:meth:`touch` plus :meth:`report`; False when ``client_id`` is unknown."""
        return self.touch(client_id, now) and self.report(client_id, received, gaps, lag_ms)

    def get(self, client_id: str) -> ClientInfo | None:
        """The client's record, or None."""
        return self._clients.get(client_id)

    def remove(self, client_id: str) -> ClientInfo | None:
        """Forget a client (bye or expiry); returns its last record, None if unknown."""
        return self._clients.pop(client_id, None)

    def expired(self, now: float, interval: float, liveness: int) -> list[str]:
        """Ids silent for longer than ``interval * liveness`` seconds, oldest first.

        Only a query: the caller releases their streams, then calls :meth:`remove`.
        Exactly ``interval * liveness`` of silence is still alive.
        """
        deadline = now - interval * liveness
        stale = [info for info in self._clients.values() if info.last_seen < deadline]
        stale.sort(key=lambda info: (info.last_seen, info.client_id))
        return [info.client_id for info in stale]

    def all(self) -> list[ClientInfo]:
        """Every registered client's record, in registration order."""
        return list(self._clients.values())

    def client_ids(self) -> list[str]:
        """Every registered id, in registration order."""
        return list(self._clients)
