"""Per-client quotas: budgets, refusals once a second, limits on hello and streams."""

from __future__ import annotations

import pytest

from broker.quotas import ClientQuotas, QuotaError, Quotas


def test_a_client_within_its_budget_is_admitted() -> None:
    quotas = ClientQuotas(Quotas(burst=3, rate=1.0))
    assert [quotas.admit("a", 0.0) for _ in range(3)] == [True, True, True]
    assert quotas.refused == 0


def test_past_its_budget_a_client_is_told_once_a_second_then_dropped_silently() -> None:
    quotas = ClientQuotas(Quotas(burst=1, rate=1.0))
    assert quotas.admit("a", 0.0) is True
    assert quotas.admit("a", 0.0) is False
    assert quotas.admit("a", 0.5) is None
    assert quotas.admit("a", 0.9) is None
    assert quotas.admit("a", 1.0) is True  # a token came back
    assert quotas.admit("a", 1.0) is False  # told again: a second has passed
    assert quotas.refused == 4


def test_budgets_are_per_client() -> None:
    quotas = ClientQuotas(Quotas(burst=1, rate=0.001))
    assert quotas.admit("a", 0.0) is True
    assert quotas.admit("a", 0.0) is False
    assert quotas.admit("b", 0.0) is True


def test_a_forgotten_client_starts_with_a_full_budget() -> None:
    quotas = ClientQuotas(Quotas(burst=1, rate=0.001))
    quotas.admit("a", 0.0)
    quotas.forget("a")
    assert quotas.clients() == []
    assert quotas.admit("a", 0.0) is True


@pytest.mark.parametrize(
    ("name", "client_id", "known", "is_new", "code"),
    [
        ("n" * 129, "x", 0, True, "invalid_field"),
        ("n", "x" * 65, 0, True, "invalid_field"),
        ("n", "x", 1000, True, "quota_exceeded"),
    ],
)
def test_a_hello_past_a_limit_is_refused_with_the_reason(
    name: str, client_id: str, known: int, is_new: bool, code: str
) -> None:
    with pytest.raises(QuotaError) as info:
        ClientQuotas().check_hello(name, client_id, known=known, is_new=is_new)
    assert info.value.code == code


def test_a_known_client_may_say_hello_again_at_the_client_limit() -> None:
    ClientQuotas().check_hello("n", "x", known=1000, is_new=False)


def test_streams_past_the_limit_are_refused() -> None:
    quotas = ClientQuotas(Quotas(max_streams=10))
    quotas.check_streams(8, 2)
    with pytest.raises(QuotaError, match="at most 10 streams"):
        quotas.check_streams(8, 3)


def test_one_snapshot_in_flight_per_client() -> None:
    quotas = ClientQuotas()
    quotas.start_snapshot("a")
    with pytest.raises(QuotaError) as info:
        quotas.start_snapshot("a")
    assert info.value.code == "busy"
    quotas.start_snapshot("b")
    quotas.end_snapshot("a")
    quotas.start_snapshot("a")
    quotas.end_snapshot("nobody")  # harmless
