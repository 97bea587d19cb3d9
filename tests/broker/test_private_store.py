"""The saved private state: a faithful round trip, and nothing unsafe or foreign taken."""

from __future__ import annotations

import json
import stat
from decimal import Decimal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.private_store import (
    MAX_RECENT,
    PrivateStore,
    SavedPrivate,
    StoreError,
    decode,
    encode,
    owner_tag,
)
from broker.reconcile import PrivateState
from schemas.rest import RestAccount, RestOrder
from schemas.upbit import MyOrder

D = Decimal
KEY = "sim-access-key-0123456789"
OWNER = owner_tag("http://127.0.0.1:1234", KEY)
KNOWN = 1_751_600_000_000


def order(uuid: str, state: str = "wait", executed: str = "0") -> RestOrder:
    return RestOrder(
        uuid=uuid,
        side="bid",
        ord_type="limit",
        price=D("140000000"),
        state=state,
        market="KRW-BTC",
        created_at="2025-07-04T15:00:00+09:00",
        volume=D("1.0"),
        remaining_volume=D("1.0") - D(executed),
        executed_volume=D(executed),
    )


def published() -> PrivateState:
    """A state that saw a partial fill of A, the end of B, and two balances."""
    state = PrivateState()
    state.baseline(
        [order("A"), order("W", state="watch")],
        [RestAccount(currency="KRW", balance=D("1000000.5"), locked=D("140000"))],
    )
    state.apply_order(
        MyOrder(
            code="KRW-BTC",
            uuid="A",
            ask_bid="BID",
            order_type="limit",
            state="trade",
            trade_uuid="t1",
            executed_volume=D("0.25"),
            remaining_volume=D("0.75"),
            timestamp=KNOWN,
        )
    )
    state.diff_orders([order("A", executed="0.25")], {"B": order("B", "done", "1.0")}, KNOWN)
    return state


def test_a_saved_state_comes_back_as_it_was(tmp_path: Path) -> None:
    state = published()
    store = PrivateStore(tmp_path / "private.json", OWNER)
    store.save(SavedPrivate(snapshot=state.snapshot(), known_ms=KNOWN))

    loaded = PrivateStore(tmp_path / "private.json", OWNER).load()
    assert loaded is not None
    assert loaded.known_ms == KNOWN
    assert loaded.snapshot == state.snapshot()
    restored = PrivateState()
    restored.restore(loaded.snapshot)
    assert restored.open_uuids == ["A", "W"]
    assert restored.balances == {"KRW": (D("1000000.5"), D("140000"))}
    # What was published stays published: B's end and A's fill are not reported again.
    assert restored.diff_orders([order("A", executed="0.25"), order("W", "watch")], {}, 0) == []
    assert restored.diff_orders([], {"B": order("B", "done", "1.0")}, 0) == []


def test_the_file_is_private_holds_no_key_and_leaves_no_temp_file(tmp_path: Path) -> None:
    store = PrivateStore(tmp_path / "private.json", OWNER)
    store.save(SavedPrivate(snapshot=published().snapshot(), known_ms=KNOWN))
    store.save(SavedPrivate(snapshot=PrivateState().snapshot(), known_ms=KNOWN + 1))
    assert [p.name for p in tmp_path.iterdir()] == ["private.json"]
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    assert KEY not in (tmp_path / "private.json").read_text()
    loaded = store.load()
    assert loaded is not None
    assert loaded.known_ms == KNOWN + 1


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"format": "someone-else", "owner": "x"}',
        b"\xff\xfe",
        b"[" * 100_000,
    ],
    ids=["not-json", "not-an-object", "foreign-format", "not-utf8", "nested-too-deep"],
)
def test_a_corrupt_or_foreign_file_is_ignored_with_a_warning(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "private.json"
    path.write_bytes(content)
    with capture_logs() as logs:
        assert PrivateStore(path, OWNER).load() is None
    assert [entry["log_level"] for entry in logs] == ["warning"]
    assert "ignored" in logs[0]["event"]


def test_another_accounts_state_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "private.json"
    PrivateStore(path, OWNER).save(SavedPrivate(snapshot=published().snapshot(), known_ms=KNOWN))
    other = owner_tag("http://127.0.0.1:1234", "another-key")
    assert PrivateStore(path, other).load() is None
    assert PrivateStore(path, owner_tag("https://api.upbit.com", KEY)).load() is None


def test_a_missing_file_is_no_saved_state(tmp_path: Path) -> None:
    store = PrivateStore(tmp_path / "private.json", OWNER)
    assert store.load() is None
    store.clear()  # nothing to forget: no error


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("known_ms", -1),
        ("known_ms", True),
        ("orders", [["A", "KRW-BTC", "wait", "NaN", None]]),
        ("orders", [["A", "KRW-BTC", "wait"]]),
        ("balances", [["KRW", "lots", "0"]]),
        ("trades", ["t"] * (MAX_RECENT + 1)),
        ("finished", [7]),
    ],
)
def test_a_bad_field_makes_the_whole_state_unusable(field: str, value: object) -> None:
    raw = encode(SavedPrivate(snapshot=published().snapshot(), known_ms=KNOWN), OWNER)
    assert decode(json.loads(json.dumps(raw)), OWNER).known_ms == KNOWN
    raw[field] = value
    with pytest.raises(StoreError):
        decode(raw, OWNER)


def test_what_is_saved_is_bounded() -> None:
    state = PrivateState()
    for i in range(3 * MAX_RECENT):
        state.apply_order(
            MyOrder(
                code="KRW-BTC",
                uuid=f"o{i}",
                ask_bid="BID",
                order_type="limit",
                state="trade",
                trade_uuid=f"t{i}",
                timestamp=KNOWN,
            )
        )
        state.apply_order(
            MyOrder(
                code="KRW-BTC",
                uuid=f"o{i}",
                ask_bid="BID",
                order_type="limit",
                state="done",
                timestamp=KNOWN,
            )
        )
    raw = encode(SavedPrivate(snapshot=state.snapshot(), known_ms=KNOWN), OWNER)
    assert len(raw["trades"]) == MAX_RECENT
    assert len(raw["finished"]) == MAX_RECENT
    assert raw["trades"][-1] == f"t{3 * MAX_RECENT - 1}"
    assert len(json.dumps(raw)) < 200_000
