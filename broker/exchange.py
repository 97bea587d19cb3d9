"""The exchange interface, and Upbit behind it.

Everything that is particular to one exchange lives behind :class:`Exchange`:
endpoints, connection headers (auth), request building, keepalive, frame parsing,
what its error frames mean, market listing and REST polling. The bus, the subscription
state and the clients only see :class:`schemas.bus.StreamSpec`, topics and the payload
structs, so a second exchange is a second implementation of this protocol that maps its
messages onto the same payload model (which is Upbit's, as this broker's first exchange).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from typing import Final, Protocol

from broker.config import Settings
from broker.ratelimit import DEFAULT_BLOCK_SECONDS, parse_block_seconds
from broker.request_policy import ErrorVerdict
from broker.subscriptions import UpstreamStream
from broker.upbit_auth import UpbitSigner
from broker.upbit_request import (
    build_list_subscriptions,
    build_request,
    parse_list_subscriptions,
    subscription_mismatch,
)
from schemas.upbit import SubscriptionList, UpbitMessage, decode_frame

__all__ = ["Exchange", "UpbitExchange", "classify_upbit_error"]

THROTTLE_RETRY = 1.0
"""Seconds before a request Upbit answered "Too Many Requests" goes again: its
per-second window has passed by then, and the per-minute one is paced anyway."""


class Exchange(Protocol):
    """What the broker needs from an exchange."""

    name: str
    rest_url: str

    def ws_url(self, private: bool) -> str:
        """The WebSocket URL of the public or private stream."""
        ...

    def has_private(self) -> bool:
        """True when credentials for private streams are configured."""
        ...

    def connect_headers(self, private: bool) -> dict[str, str]:
        """HTTP headers for the WebSocket upgrade (fresh auth for each connection)."""
        ...

    def rest_headers(self, query: str | None) -> dict[str, str]:
        """Headers for one authenticated REST request over ``query`` (unencoded)."""
        ...

    def subscription_message(
        self, streams: Sequence[UpstreamStream], new: Collection[UpstreamStream]
    ) -> str:
        """The one message that makes the connection carry exactly ``streams``.

        Snapshots are asked only for ``new`` streams; the others stay realtime-only.
        """
        ...

    def decode(self, frame: bytes | str) -> list[UpbitMessage]:
        """Decode one frame into messages; raises schemas.errors.DecodeError."""
        ...

    def list_subscriptions_message(self) -> str:
        """A request asking the exchange which streams this connection carries."""
        ...

    def compare_listing(
        self, intended: Collection[UpstreamStream], listing: SubscriptionList
    ) -> tuple[frozenset[UpstreamStream], frozenset[UpstreamStream]]:
        """``(missing, unexpected)`` streams of a listing against what was requested."""
        ...

    def classify_error(self, name: str, message: str) -> ErrorVerdict:
        """What an error frame means for the last request: refused, or throttled."""
        ...

    def is_auth_error(self, name: str) -> bool:
        """Whether an error named ``name`` (WebSocket frame or REST body) rejects the keys."""
        ...


UPBIT_AUTH_ERRORS: Final = frozenset(
    {
        "invalid_auth",
        "invalid_access_key",
        "jwt_verification",
        "expired_access_key",
        "no_authorization_ip",
        "no_authorization_token",
        "out_of_scope",
    }
)
"""Upbit error names that reject the API keys themselves (docs/PROTOCOL.md sections 5.1
and 8): retrying them soon cannot help. ``nonce_used`` is not among them: a fresh token
cures it."""


def classify_upbit_error(name: str, message: str) -> ErrorVerdict:
    """Upbit's WebSocket error names: "Too Many Requests" (or the TOO_MANY_REQUEST some
    describe) and "I'm a teapot" (blocked, for the time its message states) throttle;
    every other name (INVALID_PARAM, NO_CODES, WRONG_FORMAT, INVALID_AUTH, unknown ones)
    refuses the request, which sent again would be refused again."""
    key = name.strip().lower().replace("_", " ")
    if "teapot" in key:
        return ErrorVerdict("throttled", parse_block_seconds(message) or DEFAULT_BLOCK_SECONDS)
    if key.startswith("too many"):
        return ErrorVerdict("throttled", THROTTLE_RETRY)
    return ErrorVerdict("refused")


class UpbitExchange:
    """Upbit (api.upbit.com by default; the simulator by configuration)."""

    name = "upbit"

    def __init__(self, settings: Settings, *, fmt: str = "DEFAULT") -> None:
        self._settings = settings
        self.rest_url = settings.rest_url
        self._fmt = fmt
        self._signer = (
            UpbitSigner(settings.access_key, settings.secret_key)
            if settings.access_key is not None and settings.secret_key is not None
            else None
        )

    def ws_url(self, private: bool) -> str:
        """Upbit's quotation or exchange WebSocket URL."""
        return self._settings.ws_private_url if private else self._settings.ws_url

    def has_private(self) -> bool:
        """True when both keys are configured."""
        return self._signer is not None

    def connect_headers(self, private: bool) -> dict[str, str]:
        """A fresh JWT (access_key + nonce) on the private upgrade; nothing on public."""
        if not private:
            return {}
        if self._signer is None:
            raise RuntimeError("private stream requested without API keys")
        return {"Authorization": self._signer.authorization()}

    def rest_headers(self, query: str | None) -> dict[str, str]:
        """Authorization for one exchange REST call."""
        if self._signer is None:
            raise RuntimeError("authenticated REST call without API keys")
        return {"Authorization": self._signer.authorization(query)}

    def subscription_message(
        self, streams: Sequence[UpstreamStream], new: Collection[UpstreamStream]
    ) -> str:
        """Upbit's JSON array request, with a fresh ticket."""
        return build_request(streams, new=new, ticket=uuid.uuid4().hex, fmt=self._fmt)

    def decode(self, frame: bytes | str) -> list[UpbitMessage]:
        """Upbit frames: one object, or a JSON array for the *_LIST formats."""
        return decode_frame(frame)

    def list_subscriptions_message(self) -> str:
        """Upbit's LIST_SUBSCRIPTIONS request."""
        return build_list_subscriptions(uuid.uuid4().hex)

    def compare_listing(
        self, intended: Collection[UpstreamStream], listing: SubscriptionList
    ) -> tuple[frozenset[UpstreamStream], frozenset[UpstreamStream]]:
        """Compare Upbit's LIST_SUBSCRIPTIONS answer with the last request."""
        return subscription_mismatch(intended, parse_list_subscriptions(listing))

    def classify_error(self, name: str, message: str) -> ErrorVerdict:
        """Upbit's error names (see :func:`classify_upbit_error`)."""
        return classify_upbit_error(name, message)

    def is_auth_error(self, name: str) -> bool:
        """Upbit's names of rejected keys (:data:`UPBIT_AUTH_ERRORS`)."""
        return name.strip().lower() in UPBIT_AUTH_ERRORS
