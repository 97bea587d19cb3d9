"""Save the private state last published, so a restarted broker reports what it missed.

One JSON file in the state directory (next to ``bans.json``), written atomically (temp
file + rename, mode 0600): the open orders with their state and executed volume, the
non-zero balances, the most recent finished order uuids and published ``trade_uuid`` s,
and the time up to which all of it is known (:class:`SavedPrivate`). A broker that
starts with it reports, once a private client subscribes, what changed since that time
(:class:`broker.fallback.PrivateFallback`) instead of taking a silent baseline.

No secret is written: the file names its account by a short hash of the REST URL and
the access key (:func:`owner_tag`), so the state of another account or exchange is
never taken for this one's. A missing file means a plain baseline; a corrupt, foreign,
oversized or future-versioned one is ignored with a warning. :func:`encode` /
:func:`decode` are pure; :class:`PrivateStore` only reads and writes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

from broker.logs import get_logger
from broker.reconcile import KnownOrder, PrivateSnapshot

__all__ = [
    "FORMAT",
    "MAX_FILE_BYTES",
    "MAX_ORDERS",
    "MAX_RECENT",
    "PRIVATE_STATE_FILE",
    "PrivateStore",
    "SavedPrivate",
    "StoreError",
    "decode",
    "encode",
    "owner_tag",
]

PRIVATE_STATE_FILE: Final = "private.json"
"""File name in ``Settings.state_dir``."""
FORMAT: Final = "upbit-broker/private-state/1"
"""What the file says it is; any other value is a foreign file."""
MAX_ORDERS: Final = 5_000
"""Open orders saved at most (the newest known are dropped past it: at worst they are
reported once more after a restart)."""
MAX_RECENT: Final = 2_000
"""Finished order uuids, and trade uuids, saved at most (the most recent)."""
MAX_BALANCES: Final = 2_000
"""Currencies saved at most."""
MAX_FILE_BYTES: Final = 4 * 1024 * 1024
"""A larger file is not ours (the bounds above keep ours well below)."""


class StoreError(ValueError):
    """The saved state cannot be used (corrupt, foreign, or another account's)."""


@dataclass(frozen=True, slots=True)
class SavedPrivate:
    """A saved private state: what was published, known up to ``known_ms`` (epoch ms)."""

    snapshot: PrivateSnapshot
    known_ms: int


def owner_tag(rest_url: str, access_key: str) -> str:
    """A short, one-way name of the account: the file never holds the key itself."""
    digest = hashlib.sha256(f"{rest_url}\n{access_key}".encode()).hexdigest()
    return digest[:16]


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def encode(saved: SavedPrivate, owner: str) -> dict[str, Any]:
    """The JSON object of ``saved`` (bounded by :data:`MAX_ORDERS` / :data:`MAX_RECENT`)."""
    snap = saved.snapshot
    orders = list(snap.orders.items())[:MAX_ORDERS]
    return {
        "format": FORMAT,
        "owner": owner,
        "known_ms": saved.known_ms,
        "orders": [
            [uuid, o.code, o.state, _dec(o.executed_volume), _dec(o.remaining_volume)]
            for uuid, o in orders
        ],
        "balances": [
            [currency, str(balance), str(locked)]
            for currency, (balance, locked) in list(snap.balances.items())[:MAX_BALANCES]
        ],
        "finished": list(snap.finished)[-MAX_RECENT:],
        "trades": list(snap.trades)[-MAX_RECENT:],
    }


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 100:
        raise StoreError(f"{what}: not a short string")
    return value


def _decimal(value: object, what: str) -> Decimal:
    try:
        number = Decimal(_text(value, what))
    except InvalidOperation:
        raise StoreError(f"{what}: not a decimal") from None
    if not number.is_finite():
        raise StoreError(f"{what}: not finite")
    return number


def _optional_decimal(value: object, what: str) -> Decimal | None:
    return None if value is None else _decimal(value, what)


def _rows(raw: Mapping[str, Any], key: str, width: int, limit: int) -> list[list[object]]:
    rows = raw.get(key)
    if not isinstance(rows, list) or len(rows) > limit:
        raise StoreError(f"{key}: not a list of at most {limit}")
    if width and not all(isinstance(row, list) and len(row) == width for row in rows):
        raise StoreError(f"{key}: rows of {width} expected")
    return rows


def decode(raw: object, owner: str) -> SavedPrivate:
    """A :class:`SavedPrivate` from the file's JSON; StoreError says why it is unusable."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise StoreError("not a saved private state of this broker version")
    if raw.get("owner") != owner:
        raise StoreError("saved for another account or exchange")
    known_ms = raw.get("known_ms")
    if isinstance(known_ms, bool) or not isinstance(known_ms, int) or known_ms <= 0:
        raise StoreError("known_ms: not a positive integer")
    orders: dict[str, KnownOrder] = {}
    for row in _rows(raw, "orders", 5, MAX_ORDERS):
        uuid, code, state, executed, remaining = row
        orders[_text(uuid, "orders uuid")] = KnownOrder.of(
            _text(code, "orders code"),
            _text(state, "orders state"),
            _optional_decimal(executed, "orders executed"),
            _optional_decimal(remaining, "orders remaining"),
        )
    balances = {
        _text(currency, "balances currency"): (
            _decimal(balance, "balances balance"),
            _decimal(locked, "balances locked"),
        )
        for currency, balance, locked in _rows(raw, "balances", 3, MAX_BALANCES)
    }
    finished = [_text(u, "finished") for u in _rows(raw, "finished", 0, MAX_RECENT)]
    trades = [_text(u, "trades") for u in _rows(raw, "trades", 0, MAX_RECENT)]
    snapshot = PrivateSnapshot(orders=orders, balances=balances, finished=finished, trades=trades)
    return SavedPrivate(snapshot=snapshot, known_ms=known_ms)


class PrivateStore:
    """The file at ``path`` holding the private state of the account named ``owner``."""

    def __init__(self, path: str | os.PathLike[str], owner: str) -> None:
        self.path = Path(path)
        self._owner = owner
        self._log = get_logger("private_store", path=str(self.path))

    def load(self) -> SavedPrivate | None:
        """The saved state; None when there is none or it cannot be used (warned)."""
        try:
            with self.path.open("rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._log.warning("private state unreadable: ignored", error=type(exc).__name__)
            return None
        try:
            if len(data) > MAX_FILE_BYTES:
                raise StoreError(f"larger than {MAX_FILE_BYTES} bytes")
            raw: object = json.loads(data)
            return decode(raw, self._owner)
        except (ValueError, RecursionError) as exc:  # StoreError is a ValueError
            self._log.warning("private state unusable: ignored", error=str(exc)[:200])
            return None

    def save(self, saved: SavedPrivate) -> None:
        """Write atomically (temp file + rename in the same directory), mode 0600."""
        body = json.dumps(encode(saved, self._owner), separators=(",", ":"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        """Forget the saved state (nobody follows the account any more)."""
        self.path.unlink(missing_ok=True)
