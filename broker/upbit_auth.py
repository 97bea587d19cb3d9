"""Upbit JWT signing: the only code that touches API keys.

A fresh token per connection and per REST request (Upbit rejects a reused nonce):
HS512, claims ``access_key`` and a UUID ``nonce``, plus ``query_hash`` (hex SHA-512 of
the *unencoded* query string, in the order sent) and ``query_hash_alg`` when the
request carries parameters. Tokens and keys are never logged; callers get a header
value and must not log it either (the log processor masks it anyway).
"""

from __future__ import annotations

import hashlib
import uuid
import warnings
from collections.abc import Mapping, Sequence
from urllib.parse import unquote, urlencode

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from broker.config import Secret
from broker.logs import register_secret

__all__ = ["UpbitSigner", "query_string"]

QueryValue = str | int | float | Sequence[str]


def query_string(params: Mapping[str, QueryValue]) -> str:
    """The unencoded query string Upbit hashes: ``k=v&arr[]=a&arr[]=b`` in given order."""
    return unquote(urlencode(params, doseq=True))


class UpbitSigner:
    """Signs Upbit JWTs with the configured keys."""

    def __init__(self, access_key: Secret, secret_key: Secret) -> None:
        self._access = access_key
        self._secret = secret_key
        register_secret(access_key.reveal())
        register_secret(secret_key.reveal())

    def token(self, query: str | None = None) -> str:
        """A new JWT; ``query`` is the unencoded query string when there are params."""
        payload: dict[str, str] = {"access_key": self._access.reveal(), "nonce": str(uuid.uuid4())}
        if query:
            payload["query_hash"] = hashlib.sha512(query.encode()).hexdigest()
            payload["query_hash_alg"] = "SHA512"
        with warnings.catch_warnings():
            # Upbit secrets are 40 characters; PyJWT warns that HS512 wants 64 bytes.
            # The key length is Upbit's choice, not ours: the warning only adds noise.
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            return jwt.encode(payload, self._secret.reveal(), algorithm="HS512")

    def authorization(self, query: str | None = None) -> str:
        """The ``Authorization`` header value for one request or connection."""
        return f"Bearer {self.token(query)}"

    def __repr__(self) -> str:
        return "UpbitSigner(keys=********)"
