"""JwtVerifier against tokens signed exactly as Upbit's docs show (PyJWT + sha512 hexdigest)."""

from __future__ import annotations

import hashlib
import json
import uuid
from urllib.parse import quote, unquote, urlencode

import jwt
import pytest

from simulator.auth import AuthError, JwtVerifier, body_query_string, request_query_string

# Upbit secrets are 40 characters: PyJWT warns that is short for HS512; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

ACCESS = "sim-access-key-0123456789abcdefghijklmnop"
SECRET = "sim-secret-key-ZYXWVUTSRQPONMLKJIHGFEDCBA"


def upbit_token(
    params: dict[str, object] | None = None,
    *,
    access: str = ACCESS,
    secret: str = SECRET,
    alg: str = "HS512",
    nonce: str | None = None,
    extra: dict[str, object] | None = None,
) -> str:
    """An Authorization header value built the way Upbit's Python samples build it."""
    payload: dict[str, object] = {"access_key": access, "nonce": nonce or str(uuid.uuid4())}
    if params:
        query_string = unquote(urlencode(params, doseq=True)).encode("utf-8")
        payload["query_hash"] = hashlib.sha512(query_string).hexdigest()
        payload["query_hash_alg"] = "SHA512"
    payload.update(extra or {})
    return "Bearer " + jwt.encode(payload, secret, algorithm=alg)


def server_query(params: dict[str, object]) -> str:
    """What the server hashes for a GET sent with ``params`` percent-encoded on the wire."""
    wire = urlencode(params, doseq=True, quote_via=quote).replace("%5B%5D=", "[]=")
    return request_query_string(wire)


@pytest.fixture
def verifier() -> JwtVerifier:
    return JwtVerifier(ACCESS, SECRET)


def expect(name: str, verifier: JwtVerifier, header: str | None, query: str | None) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(header, query)
    assert info.value.name == name
    assert info.value.status == 401
    for text in (str(info.value), info.value.message):
        assert SECRET not in text
        if header and header.split():
            assert header.split()[-1] not in text
    return info.value


@pytest.mark.parametrize("alg", ["HS256", "HS512"])
def test_accepts_hs256_and_hs512(verifier: JwtVerifier, alg: str) -> None:
    claims = verifier.verify(upbit_token(alg=alg), None)
    assert claims["access_key"] == ACCESS


@pytest.mark.parametrize("alg", ["HS384", "none"])
def test_rejects_other_algorithms(verifier: JwtVerifier, alg: str) -> None:
    payload = {"access_key": ACCESS, "nonce": str(uuid.uuid4())}
    key = "" if alg == "none" else SECRET  # PyJWT's "none" ignores the key
    token = jwt.encode(payload, key, algorithm=alg)
    expect("jwt_verification", verifier, f"Bearer {token}", None)


def test_alg_none_with_stolen_signature_is_rejected(verifier: JwtVerifier) -> None:
    good = upbit_token().split()[1]
    _header, payload, signature = good.split(".")
    forged_header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    expect("jwt_verification", verifier, f"Bearer {forged_header}.{payload}.{signature}", None)
    expect("jwt_verification", verifier, f"Bearer {forged_header}.{payload}.", None)


def test_secret_is_raw_bytes_not_base64() -> None:
    # A base64-looking secret must be used as-is, never decoded.
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXh5"
    v = JwtVerifier(ACCESS, secret)
    assert v.verify(upbit_token(secret=secret), None)["access_key"] == ACCESS


def test_wrong_secret(verifier: JwtVerifier) -> None:
    expect("jwt_verification", verifier, upbit_token(secret="x" * 40), None)


def test_wrong_access_key(verifier: JwtVerifier) -> None:
    expect("invalid_access_key", verifier, upbit_token(access="someone-else"), None)


def test_missing_and_malformed_headers(verifier: JwtVerifier) -> None:
    expect("no_authorization_token", verifier, None, None)
    expect("no_authorization_token", verifier, "   ", None)
    expect("jwt_verification", verifier, "Basic dXNlcjpwYXNz", None)
    expect("jwt_verification", verifier, "Bearer not-a-jwt", None)
    expect("jwt_verification", verifier, "Bearer a.b.c", None)
    expect("jwt_verification", verifier, "Bearer " + "e30." * 2 + "@@", None)


def test_missing_nonce(verifier: JwtVerifier) -> None:
    token = jwt.encode({"access_key": ACCESS}, SECRET, algorithm="HS256")
    expect("jwt_verification", verifier, f"Bearer {token}", None)


def test_nonce_must_be_uuid_unless_relaxed(verifier: JwtVerifier) -> None:
    expect("jwt_verification", verifier, upbit_token(nonce="1710000000000"), None)
    relaxed = JwtVerifier(ACCESS, SECRET, require_uuid_nonce=False)
    assert relaxed.verify(upbit_token(nonce="1710000000000"), None)


def test_nonce_reuse(verifier: JwtVerifier) -> None:
    header = upbit_token()
    verifier.verify(header, None)
    expect("nonce_used", verifier, header, None)
    # A caller may skip the nonce check (e.g. a WS upgrade retried with the same token).
    assert verifier.verify(header, None, check_nonce=False)


def test_nonce_set_is_bounded_and_time_pruned() -> None:
    v = JwtVerifier(ACCESS, SECRET, nonce_ttl=10.0, max_nonces=50)
    header = upbit_token()
    v.verify(header, None, now=100.0)
    with pytest.raises(AuthError):
        v.verify(header, None, now=105.0)
    for i in range(200):
        v.verify(upbit_token(), None, now=106.0 + i * 0.001)
        assert v.nonces_held <= 50
    v.verify(upbit_token(), None, now=1000.0)
    assert v.nonces_held == 1  # everything older than the ttl was dropped
    assert v.verify(header, None, now=1000.0)  # forgotten after the ttl


def test_query_hash_right_wrong_missing(verifier: JwtVerifier) -> None:
    params: dict[str, object] = {"market": "KRW-BTC", "limit": 10}
    query = server_query(params)
    assert query == "market=KRW-BTC&limit=10"
    assert verifier.verify(upbit_token(params), query)["query_hash_alg"] == "SHA512"
    # Hash of other params.
    expect("invalid_query_payload", verifier, upbit_token({"market": "KRW-ETH"}), query)
    # Params sent but no hash in the token.
    expect("invalid_query_payload", verifier, upbit_token(), query)
    # Order matters: the hash is over the string as sent, not re-sorted.
    swapped = server_query({"limit": 10, "market": "KRW-BTC"})
    expect("invalid_query_payload", verifier, upbit_token(params), swapped)


def test_query_hash_alg_default_and_unknown(verifier: JwtVerifier) -> None:
    query = "market=KRW-BTC"
    digest = hashlib.sha512(query.encode()).hexdigest()
    no_alg = upbit_token(extra={"query_hash": digest})
    assert verifier.verify(no_alg, query)
    bad_alg = upbit_token(extra={"query_hash": digest, "query_hash_alg": "MD5"})
    expect("invalid_query_payload", verifier, bad_alg, query)


def test_array_params(verifier: JwtVerifier) -> None:
    params: dict[str, object] = {
        "market": "KRW-BTC",
        "states[]": ["wait", "watch"],
        "limit": 10,
    }
    query = server_query(params)
    assert query == "market=KRW-BTC&states[]=wait&states[]=watch&limit=10"
    assert verifier.verify(upbit_token(params), query)
    # Also when the client percent-encodes the brackets on the wire.
    encoded = request_query_string("market=KRW-BTC&states%5B%5D=wait&states%5B%5D=watch&limit=10")
    assert verifier.verify(upbit_token(params), encoded)


def test_reserved_characters_are_hashed_unencoded(verifier: JwtVerifier) -> None:
    params: dict[str, object] = {"start_time": "2025-06-24T13:56:53+09:00", "limit": 5}
    wire = urlencode(params, quote_via=quote)
    assert "%2B09%3A00" in wire
    assert verifier.verify(upbit_token(params), request_query_string(wire))


def test_post_body_hash(verifier: JwtVerifier) -> None:
    body: dict[str, object] = {
        "market": "KRW-BTC",
        "side": "bid",
        "volume": "0.01",
        "price": 100000000,
        "ord_type": "limit",
    }
    header = upbit_token(body)
    raw = json.dumps(body)
    parsed = json.loads(raw, parse_float=str, parse_int=str)
    query = body_query_string(parsed.items())
    assert query == "market=KRW-BTC&side=bid&volume=0.01&price=100000000&ord_type=limit"
    assert verifier.verify(header, query)
    # A body whose values changed after signing fails.
    tampered = body_query_string({**parsed, "price": "1"}.items())
    expect("invalid_query_payload", verifier, upbit_token(body), tampered)


def test_post_body_list_values_repeat_the_key() -> None:
    assert body_query_string([("uuids[]", ["a", "b"]), ("x", True)]) == (
        "uuids[]=a&uuids[]=b&x=true"
    )
    # Python's urlencode (Upbit's sample) spells literals the Python way.
    pairs: list[tuple[str, object]] = [("x", True), ("y", None)]
    assert body_query_string(pairs, python=True) == unquote(urlencode({"x": True, "y": None}))


def test_legacy_full_query_claim(verifier: JwtVerifier) -> None:
    header = upbit_token(extra={"query": "market=KRW-BTC"})
    assert verifier.verify(header, "market=KRW-BTC")


def test_error_to_body_shape() -> None:
    err = AuthError("nonce_used", "This nonce has already been used.")
    assert err.to_body() == {
        "error": {"name": "nonce_used", "message": "This nonce has already been used."}
    }


def test_constructor_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="positive"):
        JwtVerifier(ACCESS, SECRET, max_nonces=0)
