"""Credentials: which 401s judge the keys, and one try a minute for rejected ones."""

from __future__ import annotations

import pytest

from broker.credentials import RETRY, Credentials, rejects_keys


@pytest.mark.parametrize(
    "name",
    [
        "jwt_verification",
        "expired_access_key",
        "no_authorization_ip",
        "invalid_access_key",
        "invalid_query_payload",
        "",
    ],
)
def test_a_401_about_the_keys_rejects_them(name: str) -> None:
    assert rejects_keys(401, name)


def test_a_spent_nonce_judges_one_request_not_the_keys() -> None:
    assert not rejects_keys(401, "nonce_used")


@pytest.mark.parametrize("status", [0, 400, 403, 429, 500])
def test_other_statuses_never_reject_the_keys(status: int) -> None:
    assert not rejects_keys(status, "jwt_verification")


def test_rejected_keys_get_one_try_a_minute_until_one_succeeds() -> None:
    keys = Credentials()
    assert keys.take_try(0.0)
    assert keys.on_rejected("jwt_verification", 0.0)  # told once
    assert keys.rejected
    assert not keys.on_rejected("jwt_verification", 1.0)  # not told again
    assert not keys.take_try(RETRY - 1)
    assert keys.take_try(RETRY + 1)
    assert not keys.take_try(RETRY + 2)  # that try is spent
    assert keys.on_accepted()
    assert not keys.rejected
    assert keys.take_try(RETRY + 3)
