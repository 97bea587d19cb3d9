"""Whether Upbit accepts the broker's API keys, and when rejected ones may be tried again.

A rejected key is a permanent error, not a blip: retrying it at the speed of a
reconnect (or of REST polling, four times a second) only earns the host a block. So the
first rejection (a 401 from REST, an auth error on the private WebSocket) is reported
once, as ``auth_failed`` with Upbit's reason, private data counts as unavailable, and
every user of the keys, the private link and the private REST fallback alike, shares
one try per :data:`RETRY` seconds until a call with them succeeds again. Pure: callers
pass ``now``.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["NOT_ABOUT_THE_KEYS", "RETRY", "Credentials", "rejects_keys"]

RETRY: Final = 60.0
"""Seconds between two tries of keys Upbit rejected."""
NOT_ABOUT_THE_KEYS: Final = frozenset({"nonce_used"})
"""Upbit's 401 error names that judge one request, not the keys: a token whose nonce was
already spent (a replayed request). Every other 401 (``jwt_verification``,
``expired_access_key``, ``no_authorization_ip``, ``invalid_access_key``, an unnamed one,
and ``invalid_query_payload``, which would repeat on every call the broker signs the
same way) counts as keys that cannot be used."""


def rejects_keys(status: int, name: str) -> bool:
    """Whether an HTTP ``status`` with Upbit's error ``name`` means the keys are refused."""
    return status == 401 and name not in NOT_ABOUT_THE_KEYS


class Credentials:
    """The state of the broker's API keys as Upbit last judged them."""

    def __init__(self, retry: float = RETRY) -> None:
        self._retry = retry
        self._reason: str | None = None
        self._next_try = -math.inf

    @property
    def rejected(self) -> bool:
        """True from a rejection until a call with the keys succeeds."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """Upbit's reason for the last rejection (None while the keys are good)."""
        return self._reason

    def on_rejected(self, reason: str, now: float) -> bool:
        """Upbit rejected the keys; True on the first rejection (report it, once)."""
        first = self._reason is None
        self._reason = reason
        self._next_try = now + self._retry
        return first

    def on_accepted(self) -> bool:
        """A call with the keys succeeded; True when they had been rejected."""
        was = self._reason is not None
        self._reason = None
        self._next_try = -math.inf
        return was

    def wait(self, now: float) -> float:
        """Seconds until the keys may be tried (0.0: now, or they were never rejected)."""
        return 0.0 if self._reason is None else max(0.0, self._next_try - now)

    def take_try(self, now: float) -> bool:
        """Whether a call with the keys may go now; a rejected key's try is used up."""
        if self._reason is None:
            return True
        if now < self._next_try:
            return False
        self._next_try = now + self._retry
        return True
