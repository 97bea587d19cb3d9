"""Reconcile the account's open orders and balances with REST after a private outage.

While the private WebSocket is down (or before it delivers, PROTOCOL.md §3.6), the
broker polls REST: ``GET /v1/orders/open`` (states ``wait`` and ``watch``, every page),
``GET /v1/order`` for each of :meth:`PrivateState.missing_uuids`, and
``GET /v1/accounts``. :class:`PrivateState` compares those snapshots with what was
already published and returns the ``myOrder`` / ``myAsset`` events that were missed,
shaped like WebSocket messages (:func:`schemas.rest.rest_order_to_my_order`).

Limitation: REST shows order *states*, not fills. An order that filled three times
during the outage comes back as one event carrying its latest ``executed_volume`` /
``remaining_volume`` / ``state``, never as the three ``state == "trade"`` events (with
``trade_uuid``, ``trade_fee``, ``is_maker``) the WebSocket would have sent. Consumers
that need each fill must query ``GET /v1/order``'s ``trades[]`` themselves.

Pure and bounded: only open orders are kept, closed ones are dropped once reported
(their uuids are remembered, up to ``max_finished``, so a stale listing cannot revive
them), and balances hold non-zero currencies only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from schemas.rest import RestAccount, RestOrder, rest_order_to_my_order
from schemas.upbit import AssetBalance, MyAsset, MyOrder

__all__ = ["DEFAULT_MAX_FINISHED", "FINAL_STATES", "PrivateState"]

FINAL_STATES: Final = frozenset({"done", "cancel"})
"""Order states after which nothing changes. ``prevented`` (SMP) is not among them: an
SMP ``reduce`` leaves the order open, and if it did end the order, REST's open list
drops it and its final version is fetched and reported (at worst one extra event)."""
DEFAULT_MAX_FINISHED: Final = 4_096
"""Uuids of reported closed orders remembered to ignore stale open listings of them."""
_OPEN_RANK: Final = {"watch": 0, "wait": 1}
"""Progress of the open states REST shows; a WS ``trade`` or ``prevented`` is ``wait``."""
_ZERO: Final = Decimal(0)

Balance = tuple[Decimal, Decimal]
"""``(balance, locked)`` of one currency."""


@dataclass(frozen=True, slots=True)
class _Order:
    """What is compared of an order: where it stands, not its fees or prices."""

    code: str
    state: str
    executed_volume: Decimal | None
    remaining_volume: Decimal | None

    @classmethod
    def of(
        cls, code: str, state: str, executed: Decimal | None, remaining: Decimal | None
    ) -> _Order:
        """Normalize: every non-final state other than ``watch`` counts as ``wait``."""
        if state not in FINAL_STATES and state != "watch":
            state = "wait"
        return cls(code, state, executed, remaining)


def _order_of_event(ev: MyOrder) -> _Order:
    return _Order.of(ev.code, ev.state, ev.executed_volume, ev.remaining_volume)


def _order_of_rest(o: RestOrder) -> _Order:
    return _Order.of(o.market, o.state, o.executed_volume, o.remaining_volume)


def _compare(new: Decimal | None, old: Decimal | None) -> int:
    """-1/0/1 like ``cmp(new, old)``; 0 when either is unknown (None)."""
    if new is None or old is None:
        return 0
    return (new > old) - (new < old)


def _progress(new: _Order, old: _Order) -> int:
    """1: ``new`` is further along than ``old``; 0: same; -1: ``new`` is stale.

    An order only moves forward (``watch`` -> ``wait``, executed up, remaining down), so
    a snapshot showing any step back was taken before what is already known.
    """
    steps = (
        _OPEN_RANK[new.state] - _OPEN_RANK[old.state],
        _compare(new.executed_volume, old.executed_volume),
        -_compare(new.remaining_volume, old.remaining_volume),
    )
    if any(step < 0 for step in steps):
        return -1
    return 1 if any(step > 0 for step in steps) else 0


def _fill_unknowns(new: _Order, old: _Order) -> _Order:
    """``new`` with the volumes it lacks (None) taken from ``old``."""
    return _Order(
        new.code,
        new.state,
        old.executed_volume if new.executed_volume is None else new.executed_volume,
        old.remaining_volume if new.remaining_volume is None else new.remaining_volume,
    )


class PrivateState:
    """The account's open orders and balances as published, and REST diffs against them.

    Feed every published ``myOrder`` / ``myAsset`` (WebSocket or reconciled) to
    :meth:`apply_order` / :meth:`apply_asset`; call :meth:`baseline` on the first sync
    (nothing to report yet), then :meth:`diff_orders` / :meth:`diff_accounts` after each
    REST poll. Diffs update the state themselves; applying their events again is a no-op.
    """

    def __init__(self, *, max_finished: int = DEFAULT_MAX_FINISHED) -> None:
        if max_finished < 1:
            raise ValueError(f"max_finished must be >= 1, got {max_finished!r}")
        self._orders: dict[str, _Order] = {}
        self._balances: dict[str, Balance] = {}
        self._finished: set[str] = set()
        self._finished_order: deque[str] = deque()
        self._max_finished = max_finished

    # ------------------------------------------------------------------------ orders

    @property
    def open_uuids(self) -> list[str]:
        """Uuids of the orders known open, oldest known first."""
        return list(self._orders)

    def apply_order(self, ev: MyOrder) -> None:
        """Learn from a published ``myOrder`` event (a ``trade`` fill counts as ``wait``)."""
        self._merge(ev.uuid, _order_of_event(ev))

    def forget_order(self, uuid: str) -> None:
        """Drop an order REST no longer knows (``GET /v1/order`` answered 404)."""
        self._orders.pop(uuid, None)

    def missing_uuids(self, open_orders: Sequence[RestOrder]) -> list[str]:
        """Known open orders absent from ``open_orders``: fetch each with ``GET /v1/order``."""
        listed = {o.uuid for o in open_orders}
        return [uuid for uuid in self._orders if uuid not in listed]

    def diff_orders(
        self,
        open_orders: Sequence[RestOrder],
        closed: Mapping[str, RestOrder],
        now_ms: int,
        *,
        stream_type: str = "REALTIME",
    ) -> list[MyOrder]:
        """The ``myOrder`` events that bring consumers from the known state to REST's.

        ``open_orders``: every open order now. ``closed``: uuid -> ``GET /v1/order`` of
        (at least) :meth:`missing_uuids`; a known order missing from both stays known
        (asked again next time). Events: orders new to us, orders that progressed
        (state, ``executed_volume``, ``remaining_volume``), and final versions
        (``done`` / ``cancel``) of orders that left the open list. ``closed`` may also
        hold orders from ``GET /v1/orders/closed`` since the outage began: those never
        seen (born and finished during the outage) are reported too, already reported
        ones are not. A listing older than what is known (e.g. a WebSocket event
        applied after the fetch) produces nothing. Events are sorted by order time.
        """
        listed: dict[str, RestOrder] = {}
        for o in open_orders:
            listed.setdefault(o.uuid, o)
        candidates = list(listed.values())
        candidates += [o for uuid, o in closed.items() if uuid not in listed]
        # Convert first: a malformed order raises before any state changes.
        events = {
            o.uuid: rest_order_to_my_order(o, now_ms, stream_type=stream_type) for o in candidates
        }
        reported = [events[o.uuid] for o in candidates if self._merge(o.uuid, _order_of_rest(o))]
        reported.sort(key=lambda ev: (ev.order_timestamp or 0, ev.uuid))
        return reported

    def _merge(self, uuid: str, new: _Order) -> bool:
        """Take ``new`` into the state; True if consumers have not seen it yet."""
        if uuid in self._finished:
            return False
        old = self._orders.get(uuid)
        if new.state in FINAL_STATES:
            self._orders.pop(uuid, None)
            self._remember_finished(uuid)
            return True
        if old is None:
            self._orders[uuid] = new
            return True
        step = _progress(new, old)
        if step >= 0:
            self._orders[uuid] = _fill_unknowns(new, old)
        return step > 0

    def _remember_finished(self, uuid: str) -> None:
        self._finished.add(uuid)
        self._finished_order.append(uuid)
        if len(self._finished_order) > self._max_finished:
            self._finished.discard(self._finished_order.popleft())

    # ---------------------------------------------------------------------- balances

    @property
    def balances(self) -> dict[str, Balance]:
        """``currency -> (balance, locked)`` of every currency known to be non-zero."""
        return dict(self._balances)

    def apply_asset(self, ev: MyAsset) -> None:
        """Learn from a published ``myAsset`` event (it lists the changed currencies)."""
        for asset in ev.assets:
            self._set_balance(asset.currency, (asset.balance, asset.locked))

    def _set_balance(self, currency: str, value: Balance) -> None:
        if value == (_ZERO, _ZERO):
            self._balances.pop(currency, None)
        else:
            self._balances[currency] = value

    def diff_accounts(
        self, accounts: Sequence[RestAccount], now_ms: int, *, stream_type: str = "REALTIME"
    ) -> MyAsset | None:
        """A ``myAsset`` with only the currencies that changed (exact Decimal compare).

        A currency REST no longer lists is reported as balance 0, locked 0. None when
        nothing changed. ``asset_uuid`` is None (REST has no such id).
        """
        current = _balances_of(accounts)
        changed = [
            AssetBalance(currency=currency, balance=value[0], locked=value[1])
            for currency, value in current.items()
            if self._balances.get(currency) != value
        ]
        changed += [
            AssetBalance(currency=currency, balance=_ZERO, locked=_ZERO)
            for currency in sorted(self._balances.keys() - current.keys())
        ]
        self._balances = current
        if not changed:
            return None
        return MyAsset(
            asset_uuid=None,
            assets=changed,
            asset_timestamp=now_ms,
            timestamp=now_ms,
            stream_type=stream_type,
        )

    # ------------------------------------------------------------------------- sync

    def baseline(self, open_orders: Sequence[RestOrder], accounts: Sequence[RestAccount]) -> None:
        """Take REST's snapshot as the state, reporting nothing (the first sync)."""
        self._orders = {
            o.uuid: _order_of_rest(o) for o in open_orders if o.state not in FINAL_STATES
        }
        self._balances = _balances_of(accounts)


def _balances_of(accounts: Iterable[RestAccount]) -> dict[str, Balance]:
    """Non-zero ``(balance, locked)`` per currency, in REST's order."""
    return {
        a.currency: (a.balance, a.locked)
        for a in accounts
        if (a.balance, a.locked) != (_ZERO, _ZERO)
    }
