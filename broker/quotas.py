"""Per-client quotas on the control plane: what one client may cost everyone else.

The broker is shared by every program on the machine, so a buggy or hostile client
must pay for its own excess and nobody else: it gets a clear error (once a second at
most, so refusals cannot become a flood of their own) while the others keep their
streams. Pure: every decision takes ``now``; the control server applies them.

Limits (documented in the README, Security):

- ``max_clients``: clients known at once; a hello beyond it is refused.
- ``max_streams``: streams one client holds; a subscribe beyond it is refused.
- ``burst`` / ``rate``: requests per client (a token bucket); heartbeats count too, at
  one a second they never come close.
- ``max_name`` / ``max_client_id``: text a client puts in its hello, which ends up in
  logs and in every metrics reply.
- ``max_snapshots``: REST snapshot requests in flight per client (each one may cost
  several REST calls against the limits every process on the host shares).

Sizes of whole messages are bounded before any of this, by ZeroMQ (``MAXMSGSIZE`` on the
ROUTER socket: :data:`MAX_REQUEST_BYTES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.ratelimit import TokenBucket
from schemas.bus import ErrorCode

__all__ = ["MAX_REQUEST_BYTES", "REPLY_QUEUE", "ClientQuotas", "QuotaError", "Quotas"]

MAX_REQUEST_BYTES = 256 * 1024
"""Largest message a client may send. A subscribe of the most streams one request may
carry (1,000) is about 50 KB; ZeroMQ disconnects a peer that sends more than this, so a
multi-megabyte message never reaches the decoder (or the broker's memory)."""

REPLY_QUEUE = 100
"""Replies queued per client that does not read them (the ROUTER's SNDHWM); past it,
replies to that client are dropped and counted, and its requests cost nothing more."""


@dataclass(frozen=True)
class Quotas:
    """The limits; the defaults leave a well-behaved program far inside every one."""

    max_clients: int = 1000
    max_streams: int = 2000
    burst: int = 200
    rate: float = 50.0
    max_name: int = 128
    max_client_id: int = 64
    max_snapshots: int = 1


class QuotaError(Exception):
    """A client exceeded a quota; ``code`` is the bus error code to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Account:
    bucket: TokenBucket
    refused_at: float = float("-inf")
    snapshots: int = 0


@dataclass
class ClientQuotas:
    """Request budgets per client and the checks of every limit in :class:`Quotas`."""

    quotas: Quotas = field(default_factory=Quotas)
    refused: int = 0
    """Requests refused or dropped for a quota, since start (for metrics)."""
    _accounts: dict[str, _Account] = field(default_factory=dict)

    def _account(self, client: str) -> _Account:
        account = self._accounts.get(client)
        if account is None:
            account = _Account(TokenBucket(self.quotas.burst, self.quotas.rate))
            self._accounts[client] = account
        return account

    def admit(self, client: str, now: float) -> bool | None:
        """Charge one request to ``client``.

        True: go ahead. False: over budget, answer with a ``rate_limited`` error. None:
        over budget and already told within the last second: drop it without a word.
        """
        account = self._account(client)
        if account.bucket.try_acquire(now):
            return True
        self.refused += 1
        if now - account.refused_at >= 1.0:
            account.refused_at = now
            return False
        return None

    def check_hello(self, name: str, client_id: str, *, known: int, is_new: bool) -> None:
        """Raise :class:`QuotaError` when a hello carries too much or one client too many."""
        if len(name) > self.quotas.max_name:
            raise QuotaError(
                "invalid_field", f"name is {len(name)} characters; at most {self.quotas.max_name}"
            )
        if len(client_id) > self.quotas.max_client_id:
            raise QuotaError(
                "invalid_field",
                f"client_id is {len(client_id)} characters; at most {self.quotas.max_client_id}",
            )
        if is_new and known >= self.quotas.max_clients:
            raise QuotaError(
                "quota_exceeded",
                f"the broker serves at most {self.quotas.max_clients} clients at once",
            )

    def check_streams(self, held: int, adding: int) -> None:
        """Raise :class:`QuotaError` when a client would hold more than ``max_streams``."""
        if held + adding > self.quotas.max_streams:
            raise QuotaError(
                "quota_exceeded",
                f"a client may hold at most {self.quotas.max_streams} streams; "
                f"it holds {held} and asked for {adding} more",
            )

    def start_snapshot(self, client: str) -> None:
        """Count a snapshot request in flight, or raise ``busy`` past ``max_snapshots``."""
        account = self._account(client)
        if account.snapshots >= self.quotas.max_snapshots:
            raise QuotaError(
                "busy",
                f"{account.snapshots} snapshot request(s) of this client still in flight; "
                "wait for the answer before asking again",
            )
        account.snapshots += 1

    def end_snapshot(self, client: str) -> None:
        """A snapshot request of ``client`` was answered."""
        account = self._accounts.get(client)
        if account is not None and account.snapshots > 0:
            account.snapshots -= 1

    def forget(self, client: str) -> None:
        """Drop the budget of a client that left (a snapshot still in flight keeps none)."""
        self._accounts.pop(client, None)

    def clients(self) -> list[str]:
        """Clients that have a budget (for pruning those that are gone)."""
        return list(self._accounts)

    def __len__(self) -> int:
        return len(self._accounts)
