"""Upbit-style JWT verification for the simulator's exchange (private) endpoints.

Upbit signs every private request with a JWT (HS256 or HS512) whose key is the secret key
string used as raw bytes. The payload carries ``access_key``, a fresh UUID ``nonce`` and,
when the request has parameters, ``query_hash`` = hex SHA-512 of the unencoded query string
(docs/PROTOCOL.md section 7). This module checks all of that and raises :class:`AuthError` with
Upbit's error names. Messages never contain the token or the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

__all__ = [
    "AuthError",
    "JwtVerifier",
    "body_query_string",
    "request_query_string",
    "unverified_access_key",
]

# alg header value -> hashlib constructor. Upbit documents HS512 (recommended) and HS256.
_ALGORITHMS: dict[str, Callable[..., Any]] = {
    "HS256": hashlib.sha256,
    "HS512": hashlib.sha512,
}
# query_hash_alg value -> hashlib constructor. Upbit documents SHA512 only (the default).
_QUERY_HASH_ALGORITHMS: dict[str, Callable[..., Any]] = {"SHA512": hashlib.sha512}


class AuthError(Exception):
    """An authentication failure with Upbit's error ``name`` and the HTTP ``status`` to use."""

    def __init__(self, name: str, message: str, status: int = 401) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message
        self.status = status

    def to_body(self) -> dict[str, dict[str, str]]:
        """The exchange error envelope ``{"error": {"name", "message"}}``."""
        return {"error": {"name": self.name, "message": self.message}}


def _b64url_decode(segment: str) -> bytes:
    """Decode one unpadded base64url JWT segment (strict alphabet)."""
    if not segment or any(c in segment for c in "=+/ \t\r\n"):
        raise ValueError("bad segment")
    padded = segment + "=" * (-len(segment) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def _render_value(value: object, python: bool) -> str:
    """How one JSON body value appears in the query_hash input string."""
    if isinstance(value, str):
        return value
    if python:  # what Python's urlencode makes of it: True, False, None
        return str(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    return str(value)


def body_query_string(pairs: Iterable[tuple[str, object]], *, python: bool = False) -> str:
    """The query_hash input for a POST body: ``k1=v1&k2=v2`` in body order, not encoded.

    ``pairs`` are the body's top-level key/value pairs in order. Lists repeat the key
    (``unquote(urlencode(params, doseq=True))`` of Upbit's Python sample). Numbers should
    be passed as their literal JSON text (parse the body with ``parse_float=str,
    parse_int=str``) so the string matches what the client hashed. ``true``/``false``/
    ``null`` are rendered as in JSON, or as Python's ``True``/``False``/``None`` with
    ``python=True`` (Upbit's own sample is Python; clients differ, so a server may try both).
    """
    parts: list[str] = []
    for key, value in pairs:
        if isinstance(value, list | tuple):
            parts.extend(f"{key}={_render_value(item, python)}" for item in value)
        else:
            parts.append(f"{key}={_render_value(value, python)}")
    return "&".join(parts)


def request_query_string(raw_query_string: str) -> str:
    """The query_hash input for GET/DELETE: the raw query string, percent-decoded.

    Order is kept and ``+`` is left alone (Upbit's sample hashes ``unquote(urlencode(..))``,
    and ``unquote`` does not turn ``+`` into a space).
    """
    return unquote(raw_query_string)


class JwtVerifier:
    """Verifies Upbit exchange JWTs for one access/secret key pair.

    Nonce reuse is tracked in a bounded, time-pruned set: a nonce is remembered for
    ``nonce_ttl`` seconds and at most ``max_nonces`` are kept (oldest dropped first), so
    memory stays bounded however many requests arrive.
    """

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        *,
        nonce_ttl: float = 600.0,
        max_nonces: int = 100_000,
        require_uuid_nonce: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_nonces < 1 or nonce_ttl <= 0:
            raise ValueError("max_nonces and nonce_ttl must be positive")
        self._access_key = access_key
        self._secret = secret_key.encode("utf-8")
        self._nonce_ttl = nonce_ttl
        self._max_nonces = max_nonces
        self._require_uuid_nonce = require_uuid_nonce
        self._clock = clock
        self._nonces: OrderedDict[str, float] = OrderedDict()

    @property
    def access_key(self) -> str:
        """The access key tokens must carry."""
        return self._access_key

    @property
    def nonces_held(self) -> int:
        """How many used nonces are remembered now (for memory-bound tests)."""
        return len(self._nonces)

    def verify(
        self,
        authorization: str | None,
        query_string: str | None,
        *,
        check_nonce: bool = True,
        now: float | None = None,
    ) -> dict[str, object]:
        """Check an ``Authorization`` header value; return the JWT claims or raise AuthError.

        ``query_string`` is the unencoded string the client had to hash (see
        :func:`request_query_string` / :func:`body_query_string`); ``None`` or ``""`` means the
        request has no parameters. ``now`` (monotonic seconds) defaults to the clock.
        """
        token = self._bearer_token(authorization)
        header, claims, signing_input, signature = self._split(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in _ALGORITHMS:
            raise AuthError("jwt_verification", "Unsupported JWT algorithm.")
        access_key = claims.get("access_key")
        if not isinstance(access_key, str) or not access_key:
            raise AuthError("jwt_verification", "Failed to verify the JWT: access_key is missing.")
        if not hmac.compare_digest(access_key.encode("utf-8"), self._access_key.encode("utf-8")):
            raise AuthError("invalid_access_key", "Invalid access key.")
        expected = hmac.new(self._secret, signing_input, _ALGORITHMS[alg]).digest()
        if not hmac.compare_digest(expected, signature):
            raise AuthError("jwt_verification", "Failed to verify the JWT signature.")
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise AuthError("jwt_verification", "Failed to verify the JWT: nonce is missing.")
        if self._require_uuid_nonce and not _is_uuid(nonce):
            raise AuthError("jwt_verification", "Failed to verify the JWT: nonce is not a UUID.")
        self._check_query(claims, query_string or "")
        if check_nonce:
            self._use_nonce(nonce, self._clock() if now is None else now)
        return claims

    # -- internals ---------------------------------------------------------------------

    @staticmethod
    def _bearer_token(authorization: str | None) -> str:
        if authorization is None or not authorization.strip():
            raise AuthError("no_authorization_token", "Authorization token does not exist.")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("jwt_verification", "Authorization header is not a Bearer token.")
        return token.strip()

    @staticmethod
    def _split(token: str) -> tuple[dict[str, object], dict[str, object], bytes, bytes]:
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthError("jwt_verification", "Malformed JWT.")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise AuthError("jwt_verification", "Malformed JWT.") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise AuthError("jwt_verification", "Malformed JWT.")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        return header, claims, signing_input, signature

    @staticmethod
    def _check_query(claims: dict[str, object], query_string: str) -> None:
        query_hash = claims.get("query_hash")
        if query_hash is None:
            legacy = claims.get("query")  # pre-hash scheme: the whole query in the payload
            if isinstance(legacy, str) and legacy == query_string:
                return
            if query_string:
                raise AuthError("invalid_query_payload", "Failed to verify the query of Jwt.")
            return
        alg_name = claims.get("query_hash_alg", "SHA512")
        if not isinstance(alg_name, str) or alg_name.upper() not in _QUERY_HASH_ALGORITHMS:
            raise AuthError("invalid_query_payload", "Unsupported query_hash_alg.")
        if not isinstance(query_hash, str):
            raise AuthError("invalid_query_payload", "Failed to verify the query of Jwt.")
        digest = _QUERY_HASH_ALGORITHMS[alg_name.upper()](query_string.encode("utf-8"))
        if not hmac.compare_digest(digest.hexdigest().encode(), query_hash.encode("utf-8")):
            raise AuthError("invalid_query_payload", "Failed to verify the query of Jwt.")

    def _use_nonce(self, nonce: str, now: float) -> None:
        self._prune(now)
        if nonce in self._nonces:
            raise AuthError("nonce_used", "This nonce has already been used.")
        self._nonces[nonce] = now
        while len(self._nonces) > self._max_nonces:
            self._nonces.popitem(last=False)

    def _prune(self, now: float) -> None:
        cutoff = now - self._nonce_ttl
        while self._nonces:
            oldest_nonce, seen = next(iter(self._nonces.items()))
            if seen > cutoff:
                break
            del self._nonces[oldest_nonce]


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def unverified_access_key(authorization: str | None) -> str | None:
    """The access_key claim of a Bearer JWT without verifying it (rate-limit key only)."""
    if not authorization:
        return None
    token = authorization.strip().partition(" ")[2].strip()
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    key = claims.get("access_key") if isinstance(claims, dict) else None
    return key if isinstance(key, str) else None
