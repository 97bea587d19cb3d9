"""broker.upbit_auth and broker.exchange: Upbit JWTs, query hashes, headers, requests."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from broker import logs
from broker.config import Secret, Settings
from broker.exchange import Exchange, UpbitExchange
from broker.subscriptions import UpstreamStream
from broker.upbit_auth import UpbitSigner, query_string
from schemas.upbit import Ticker

ACCESS = "xqHGaA3pXmFtYS7bGDokz0xRJEz8Ewq7nLa2QnP1"
SECRET = "Zk1VT3dj9sIYxQ0GhB5mCw8Pl2RaNuEeJ4oKvD6tZk1VT3dj9sIYxQ0GhB5mCw8P"
"""64 bytes: PyJWT warns about shorter HS512 keys (Upbit's real ones are 40 characters)."""


@pytest.fixture(autouse=True)
def isolated_registry() -> Iterator[None]:
    """UpbitSigner registers its keys with the log masker: keep that out of other tests."""
    saved = set(logs._registered)
    yield
    logs._registered.clear()
    logs._registered.update(saved)


@pytest.fixture
def signer() -> UpbitSigner:
    return UpbitSigner(Secret(ACCESS), Secret(SECRET))


def claims(token: str, key: str = SECRET) -> dict[str, Any]:
    return jwt.decode(token, key, algorithms=["HS512"])


def sha512(text: str) -> str:
    return hashlib.sha512(text.encode()).hexdigest()


# ------------------------------------------------------------------------------ signer


def test_token_is_hs512_signed_with_the_secret(signer: UpbitSigner) -> None:
    token = signer.token()
    assert jwt.get_unverified_header(token) == {"alg": "HS512", "typ": "JWT"}
    assert claims(token)["access_key"] == ACCESS
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "x" * 64, algorithms=["HS512"])
    with pytest.raises(jwt.InvalidAlgorithmError):
        jwt.decode(token, SECRET, algorithms=["HS256"])


def test_token_without_query_has_only_access_key_and_nonce(signer: UpbitSigner) -> None:
    for query in (None, ""):
        payload = claims(signer.token(query))
        assert set(payload) == {"access_key", "nonce"}
        assert payload["access_key"] == ACCESS


def test_nonce_is_a_fresh_uuid_every_call(signer: UpbitSigner) -> None:
    nonces = [claims(signer.token())["nonce"] for _ in range(50)]
    assert len(set(nonces)) == 50
    for nonce in nonces:
        assert str(uuid.UUID(nonce)) == nonce
    tokens = {signer.token("a=1") for _ in range(10)}
    assert len(tokens) == 10  # same query, still a new token each time


def test_query_hash_is_sha512_of_the_unencoded_query(signer: UpbitSigner) -> None:
    query = "market=KRW-BTC&states[]=wait&states[]=watch&limit=100"
    payload = claims(signer.token(query))
    assert set(payload) == {"access_key", "nonce", "query_hash", "query_hash_alg"}
    assert payload["query_hash"] == sha512(query)
    assert payload["query_hash"] == hashlib.sha512(query.encode("utf-8")).hexdigest()
    assert len(payload["query_hash"]) == 128
    assert payload["query_hash_alg"] == "SHA512"
    encoded = "market=KRW-BTC&states%5B%5D=wait&states%5B%5D=watch&limit=100"
    assert payload["query_hash"] != sha512(encoded)


def test_query_hash_follows_parameter_order(signer: UpbitSigner) -> None:
    a = claims(signer.token("a=1&b=2"))["query_hash"]
    b = claims(signer.token("b=2&a=1"))["query_hash"]
    assert a != b


def test_authorization_is_a_bearer_token(signer: UpbitSigner) -> None:
    header = signer.authorization("uuid=abc")
    scheme, token = header.split(" ")
    assert scheme == "Bearer"
    payload = claims(token)
    assert payload["query_hash"] == sha512("uuid=abc")
    assert set(claims(signer.authorization().removeprefix("Bearer "))) == {"access_key", "nonce"}


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_real_length_upbit_keys_sign() -> None:
    secret = SECRET[:40]
    token = UpbitSigner(Secret(ACCESS), Secret(secret)).token("a=1")
    assert claims(token, secret)["access_key"] == ACCESS


def test_repr_hides_the_keys(signer: UpbitSigner) -> None:
    for text in (repr(signer), str(signer), f"{signer}", f"{signer!r}"):
        assert ACCESS not in text
        assert SECRET not in text
    assert "*" in repr(signer)


def test_signer_registers_its_keys_with_the_log_masker() -> None:
    logs._registered.clear()
    UpbitSigner(Secret(ACCESS), Secret(SECRET))
    assert logs.mask(f"a={ACCESS} s={SECRET}") == f"a={logs.MASK} s={logs.MASK}"


# ------------------------------------------------------------------------ query string


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ""),
        ({"market": "KRW-BTC"}, "market=KRW-BTC"),
        (
            {
                "market": "KRW-BTC",
                "side": "bid",
                "volume": "0.01",
                "price": "100",
                "ord_type": "limit",
            },
            "market=KRW-BTC&side=bid&volume=0.01&price=100&ord_type=limit",
        ),
        (
            {
                "ord_type": "limit",
                "price": "100",
                "volume": "0.01",
                "side": "bid",
                "market": "KRW-BTC",
            },
            "ord_type=limit&price=100&volume=0.01&side=bid&market=KRW-BTC",
        ),
        ({"states[]": ["wait", "watch"]}, "states[]=wait&states[]=watch"),
        ({"states[]": ("done", "cancel")}, "states[]=done&states[]=cancel"),
        (
            {"market": "KRW-BTC", "states[]": ["wait", "watch"], "limit": 100, "page": 1},
            "market=KRW-BTC&states[]=wait&states[]=watch&limit=100&page=1",
        ),
        (
            {"uuids[]": ["9ca023a5-851b", "45c8a7fc-0a9c"]},
            "uuids[]=9ca023a5-851b&uuids[]=45c8a7fc-0a9c",
        ),
        ({"price": 0.5, "count": 3}, "price=0.5&count=3"),
        ({"to": "2024-01-01T00:00:00+09:00"}, "to=2024-01-01T00:00:00+09:00"),
    ],
)
def test_query_string_keeps_order_and_array_keys_unencoded(
    params: dict[str, Any], expected: str
) -> None:
    assert query_string(params) == expected


def test_query_string_and_token_agree(signer: UpbitSigner) -> None:
    query = query_string({"market": "KRW-ETH", "states[]": ["wait", "watch"]})
    assert query == "market=KRW-ETH&states[]=wait&states[]=watch"
    assert claims(signer.token(query))["query_hash"] == sha512(query)


# ---------------------------------------------------------------------------- exchange

PUBLIC_URL = "ws://127.0.0.1:8765/websocket/v1"
PRIVATE_URL = "ws://127.0.0.1:8765/websocket/v1/private"


def keyed_settings() -> Settings:
    return Settings(
        ws_url=PUBLIC_URL,
        ws_private_url=PRIVATE_URL,
        rest_url="http://127.0.0.1:8765",
        access_key=Secret(ACCESS),
        secret_key=Secret(SECRET),
    )


def test_exchange_urls() -> None:
    exchange = UpbitExchange(keyed_settings())
    assert exchange.name == "upbit"
    assert exchange.ws_url(False) == PUBLIC_URL
    assert exchange.ws_url(True) == PRIVATE_URL
    assert exchange.rest_url == "http://127.0.0.1:8765"
    real = UpbitExchange(Settings())
    assert real.ws_url(False) == "wss://api.upbit.com/websocket/v1"
    assert real.ws_url(True) == "wss://api.upbit.com/websocket/v1/private"
    assert real.rest_url == "https://api.upbit.com"


def test_exchange_satisfies_the_protocol() -> None:
    exchange: Exchange = UpbitExchange(Settings())
    assert exchange.name == "upbit"


def test_exchange_without_keys_is_public_only() -> None:
    exchange = UpbitExchange(Settings())
    assert not exchange.has_private()
    assert exchange.connect_headers(False) == {}
    with pytest.raises(RuntimeError, match="without API keys"):
        exchange.connect_headers(True)
    with pytest.raises(RuntimeError, match="without API keys"):
        exchange.rest_headers("a=1")


def test_exchange_with_only_one_key_is_public_only() -> None:
    exchange = UpbitExchange(Settings(access_key=Secret(ACCESS)))
    assert not exchange.has_private()


def test_exchange_connect_headers() -> None:
    exchange = UpbitExchange(keyed_settings())
    assert exchange.has_private()
    assert exchange.connect_headers(False) == {}
    first = exchange.connect_headers(True)
    assert set(first) == {"Authorization"}
    scheme, token = first["Authorization"].split(" ")
    assert scheme == "Bearer"
    payload = claims(token)
    assert set(payload) == {"access_key", "nonce"}
    assert payload["access_key"] == ACCESS
    second = exchange.connect_headers(True)
    assert second != first  # fresh nonce per connection


def test_exchange_rest_headers_hash_the_query() -> None:
    exchange = UpbitExchange(keyed_settings())
    query = "market=KRW-BTC&states[]=wait&states[]=watch"
    token = exchange.rest_headers(query)["Authorization"].removeprefix("Bearer ")
    assert claims(token)["query_hash"] == sha512(query)
    bare = exchange.rest_headers(None)["Authorization"].removeprefix("Bearer ")
    assert "query_hash" not in claims(bare)


def test_exchange_repr_hides_the_keys() -> None:
    exchange = UpbitExchange(keyed_settings())
    text = f"{exchange!r} {exchange.__dict__!r}"
    assert ACCESS not in text
    assert SECRET not in text


def test_subscription_message_is_a_json_array_starting_with_a_ticket() -> None:
    exchange = UpbitExchange(Settings())
    streams = [UpstreamStream("ticker", "KRW-BTC"), UpstreamStream("trade", "KRW-ETH")]
    text = exchange.subscription_message(streams, new=streams)
    message = json.loads(text)
    assert isinstance(message, list)
    assert set(message[0]) == {"ticket"}
    ticket = message[0]["ticket"]
    assert isinstance(ticket, str)
    assert ticket
    assert message[1:] == [
        {"type": "ticker", "codes": ["KRW-BTC"]},
        {"type": "trade", "codes": ["KRW-ETH"]},
        {"format": "DEFAULT"},
    ]
    again = json.loads(exchange.subscription_message(streams, new=[]))
    assert again[0]["ticket"] != ticket  # a fresh ticket per request
    assert all(obj.get("is_only_realtime") for obj in again[1:-1])


def test_subscription_message_private_and_format() -> None:
    exchange = UpbitExchange(keyed_settings(), fmt="SIMPLE")
    streams = [UpstreamStream("myOrder"), UpstreamStream("myAsset")]
    message = json.loads(exchange.subscription_message(streams, new=streams))
    assert "ticket" in message[0]
    assert message[1:] == [{"type": "myAsset"}, {"type": "myOrder"}, {"format": "SIMPLE"}]


def test_exchange_decodes_frames() -> None:
    frame = json.dumps(
        {
            "type": "ticker",
            "code": "KRW-BTC",
            "opening_price": 1,
            "high_price": 2,
            "low_price": 1,
            "trade_price": 2,
            "prev_closing_price": 1,
            "change": "RISE",
            "change_price": 1,
            "signed_change_price": 1,
            "change_rate": 1,
            "signed_change_rate": 1,
            "trade_volume": 1,
            "acc_trade_volume": 1,
            "acc_trade_volume_24h": 1,
            "acc_trade_price": 1,
            "acc_trade_price_24h": 1,
            "trade_date": "20240101",
            "trade_time": "000000",
            "trade_timestamp": 1,
            "timestamp": 2,
        }
    )
    (message,) = UpbitExchange(Settings()).decode(frame.encode())
    assert isinstance(message, Ticker)
    assert message.code == "KRW-BTC"
