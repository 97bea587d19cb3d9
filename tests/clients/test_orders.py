"""The client's order helpers without a broker: amounts as exact text, fresh identifiers."""

from __future__ import annotations

from decimal import Decimal

import pytest

from clients.client import amount_text, new_identifier


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("0.00010000"), "0.00010000"),
        (Decimal("1E+8"), "100000000"),
        (Decimal("1E-8"), "0.00000001"),
        (100_000_000, "100000000"),
        (0.1, "0.1"),
        (1e-8, "0.00000001"),
        ("0.0100", "0.0100"),
        (None, None),
    ],
)
def test_an_amount_goes_as_exact_text_without_an_exponent(
    value: Decimal | int | float | str | None, text: str | None
) -> None:
    assert amount_text(value) == text


def test_a_bool_is_no_amount() -> None:
    with pytest.raises(TypeError):
        amount_text(True)


def test_identifiers_are_fresh_and_fit_upbit() -> None:
    made = {new_identifier() for _ in range(1000)}
    assert len(made) == 1000
    assert all(len(i) <= 40 and i.isascii() and " " not in i for i in made)
