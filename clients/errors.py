"""Exceptions raised by the client library, one hierarchy, each saying whose fault it was.

Hierarchy::

    Exception
     └── ClientError                 base of everything raised by :mod:`clients`
          ├── BrokerError            the broker refused a request: ``code`` + ``message``
          │    └── UntrustedBroker   we refused the endpoint: it may not lead to the broker
          ├── BrokerTimeout          no reply within ``request_timeout`` (also TimeoutError)
          ├── BrokerUnavailable      no broker answered hello (also ConnectionError)
          └── ClientClosed           the client was closed; make a new one

``BrokerError.code`` is one of :data:`schemas.bus.ErrorCode` (``unknown_code``,
``private_unavailable``, ...): branch on it, not on the message text. When Upbit itself
refused an account or order call, ``BrokerError.upbit_name`` and ``upbit_message`` say
exactly how (``insufficient_funds_bid``, ...).
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "ClientClosed",
    "ClientError",
    "UntrustedBroker",
]


class ClientError(Exception):
    """Base class of every exception the client library raises."""


class BrokerError(ClientError):
    """The broker answered a request with an error (the request was at fault)."""

    def __init__(
        self, code: str, message: str, *, upbit_name: str = "", upbit_message: str = ""
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        """Machine-readable reason, one of :data:`schemas.bus.ErrorCode`."""
        self.message = message
        """Human-readable explanation from the broker."""
        self.upbit_name = upbit_name
        """Upbit's error name when Upbit refused the request (``insufficient_funds_bid``,
        ``order_not_found``...), else empty: branch on it for account and order calls."""
        self.upbit_message = upbit_message
        """Upbit's error message with it, else empty."""

    def __repr__(self) -> str:
        return f"BrokerError({self.code!r}, {self.message!r})"


class UntrustedBroker(BrokerError):
    """The client refused to connect: whatever listens there may not be the broker.

    An ipc socket or its directory that another user could control (a symbolic link,
    another owner, a directory open to others), or CURVE settings that cannot prove
    the broker's key (:mod:`schemas.trust`). Nothing was sent.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__("untrusted_broker", f"refusing {path}: {reason}")
        self.path = path
        """The endpoint, file or variable at fault."""
        self.reason = reason
        """Why it cannot be trusted."""

    def __repr__(self) -> str:
        return f"UntrustedBroker({self.path!r}, {self.reason!r})"


class BrokerTimeout(ClientError, TimeoutError):
    """The broker did not answer a request within ``request_timeout`` seconds."""


class BrokerUnavailable(ClientError, ConnectionError):
    """No broker welcomed this client (none running at the endpoint, or it is down)."""


class ClientClosed(ClientError):
    """The client (or the subscription) was closed; no more requests are possible."""
