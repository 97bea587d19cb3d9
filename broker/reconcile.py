"""Reconcile the account's orders and balances with REST after a private outage.

While the private WebSocket is down (or before it delivers, docs/PROTOCOL.md §3.6), and on
the first sync of a broker that saved its state before it stopped, the broker polls
REST: ``GET /v1/orders/open`` (states ``wait`` and ``watch``, every page),
``GET /v1/orders/closed`` since the outage began, ``GET /v1/order`` for each of
:meth:`PrivateState.to_fetch` (known orders no longer open, and orders with fills not
yet reported: that answer carries ``trades[]``), and ``GET /v1/accounts``.
:class:`PrivateState` compares those snapshots with what was already published and
returns the ``myOrder`` / ``myAsset`` events that were missed, shaped like WebSocket
messages (:mod:`schemas.rest` conversions).

An order a subscriber missed comes back as the sequence the WebSocket would have sent:
``wait`` (an order new to us), one ``trade`` per fill not yet published (by
``trade_uuid``), then ``done`` / ``cancel`` if it ended. Each state at most once: a
finished uuid is remembered (up to ``max_finished``) and so is every published
``trade_uuid`` (up to ``max_trades``), whether the WebSocket or REST published it.
Without ``trades[]`` (an order REST could not detail) a fill shows as one event with
the order's latest ``executed_volume`` / ``remaining_volume`` / ``state``.

Pure and bounded: only open orders are kept, closed ones are dropped once reported, and
balances hold non-zero currencies only. :meth:`PrivateState.snapshot` and
:meth:`PrivateState.restore` carry the state across a restart
(:mod:`broker.private_store`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from schemas.rest import (
    RestAccount,
    RestOrder,
    rest_order_birth,
    rest_order_fills,
    rest_order_to_my_order,
)
from schemas.upbit import AssetBalance, MyAsset, MyOrder

__all__ = [
    "CLOSED_MARGIN_MS",
    "CLOSED_WINDOW_MS",
    "DEFAULT_MAX_FINISHED",
    "DEFAULT_MAX_TRADES",
    "FINAL_STATES",
    "KnownOrder",
    "PrivateSnapshot",
    "PrivateState",
    "closed_window",
]

FINAL_STATES: Final = frozenset({"done", "cancel"})
"""Order states after which nothing changes. ``prevented`` (SMP) is not among them: an
SMP ``reduce`` leaves the order open, and if it did end the order, REST's open list
drops it and its final version is fetched and reported (at worst one extra event)."""
DEFAULT_MAX_FINISHED: Final = 4_096
"""Uuids of reported closed orders remembered to ignore stale open listings of them."""
DEFAULT_MAX_TRADES: Final = 16_384
"""``trade_uuid`` s of published fills remembered so none is published twice."""
CLOSED_WINDOW_MS: Final = 7 * 86_400_000
"""Widest ``start_time``..``end_time`` window ``GET /v1/orders/closed`` takes (7 days)."""
CLOSED_MARGIN_MS: Final = 60_000
"""Closed orders are asked from this long before the known time: clocks differ, and an
order already reported is never reported again."""
_OPEN_RANK: Final = {"watch": 0, "wait": 1}
"""Progress of the open states REST shows; a WS ``trade`` or ``prevented`` is ``wait``."""
_ZERO: Final = Decimal(0)

Balance = tuple[Decimal, Decimal]
"""``(balance, locked)`` of one currency."""


@dataclass(frozen=True, slots=True)
class KnownOrder:
    """What is compared of an order: where it stands, not its fees or prices."""

    code: str
    state: str
    executed_volume: Decimal | None
    remaining_volume: Decimal | None

    @classmethod
    def of(
        cls, code: str, state: str, executed: Decimal | None, remaining: Decimal | None
    ) -> KnownOrder:
        """Normalize: every non-final state other than ``watch`` counts as ``wait``."""
        if state not in FINAL_STATES and state != "watch":
            state = "wait"
        return cls(code, state, executed, remaining)


@dataclass(frozen=True, slots=True)
class PrivateSnapshot:
    """What a :class:`PrivateState` knows, to outlive the process: open orders, non-zero
    balances, and the most recent finished order uuids and trade uuids (oldest first)."""

    orders: Mapping[str, KnownOrder]
    balances: Mapping[str, Balance]
    finished: Sequence[str]
    trades: Sequence[str]


def _order_of_event(ev: MyOrder) -> KnownOrder:
    return KnownOrder.of(ev.code, ev.state, ev.executed_volume, ev.remaining_volume)


def _order_of_rest(o: RestOrder) -> KnownOrder:
    return KnownOrder.of(o.market, o.state, o.executed_volume, o.remaining_volume)


def _compare(new: Decimal | None, old: Decimal | None) -> int:
    """-1/0/1 like ``cmp(new, old)``; 0 when either is unknown (None, or not a number:
    upstream's ``"NaN"`` decodes, and ordering it would raise)."""
    if new is None or old is None or not new.is_finite() or not old.is_finite():
        return 0
    return (new > old) - (new < old)


def _progress(new: KnownOrder, old: KnownOrder) -> int:
    """1: ``new`` is further along than ``old``; 0: same; -1: ``new`` is stale.

    An order only moves forward (``watch`` -> ``wait`` -> final, executed up, remaining
    down), so a snapshot showing any step back was taken before what is already known.
    """
    if new.state in FINAL_STATES:
        return 1
    steps = (
        _OPEN_RANK[new.state] - _OPEN_RANK[old.state],
        _compare(new.executed_volume, old.executed_volume),
        -_compare(new.remaining_volume, old.remaining_volume),
    )
    if any(step < 0 for step in steps):
        return -1
    return 1 if any(step > 0 for step in steps) else 0


def _fill_unknowns(new: KnownOrder, old: KnownOrder) -> KnownOrder:
    """``new`` with the volumes it lacks (None) taken from ``old``."""
    return KnownOrder(
        new.code,
        new.state,
        old.executed_volume if new.executed_volume is None else new.executed_volume,
        old.remaining_volume if new.remaining_volume is None else new.remaining_volume,
    )


class _Recent:
    """A bounded set remembering the most recent keys (oldest forgotten first)."""

    def __init__(self, limit: int) -> None:
        self._keys: set[str] = set()
        self._order: deque[str] = deque()
        self._limit = limit

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        if key in self._keys:
            return
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > self._limit:
            self._keys.discard(self._order.popleft())

    def newest(self) -> list[str]:
        return list(self._order)


class PrivateState:
    """The account's open orders and balances as published, and REST diffs against them.

    Feed every published ``myOrder`` / ``myAsset`` (WebSocket or reconciled) to
    :meth:`apply_order` / :meth:`apply_asset`; call :meth:`baseline` on the first sync
    (nothing to report yet) or :meth:`restore` a saved state, then :meth:`diff_orders` /
    :meth:`diff_accounts` after each REST poll. Diffs update the state themselves;
    applying their events again is a no-op.
    """

    def __init__(
        self, *, max_finished: int = DEFAULT_MAX_FINISHED, max_trades: int = DEFAULT_MAX_TRADES
    ) -> None:
        if max_finished < 1:
            raise ValueError(f"max_finished must be >= 1, got {max_finished!r}")
        if max_trades < 1:
            raise ValueError(f"max_trades must be >= 1, got {max_trades!r}")
        self._orders: dict[str, KnownOrder] = {}
        self._balances: dict[str, Balance] = {}
        self._finished = _Recent(max_finished)
        self._trades = _Recent(max_trades)
        self._rest_orders: set[str] = set()
        """Open orders whose known state REST published (the stream has not moved them
        on since): only their stream events can be late copies."""
        self._rest_balances: dict[str, Balance] = {}
        """Currency -> the value REST published last (zero too), while it is the known one."""

    # ------------------------------------------------------------------------ orders

    @property
    def open_uuids(self) -> list[str]:
        """Uuids of the orders known open, oldest known first."""
        return list(self._orders)

    def apply_order(self, ev: MyOrder) -> None:
        """Learn from a published ``myOrder`` event (a ``trade`` fill counts as ``wait``)."""
        if ev.trade_uuid is not None:
            self._trades.add(ev.trade_uuid)
        new = _order_of_event(ev)
        if self._merge(ev.uuid, new) and ev.state not in FINAL_STATES:
            self._rest_orders.discard(ev.uuid)  # the stream moved it on: its own again

    def is_news(self, ev: MyOrder | MyAsset) -> bool:
        """Whether consumers have not seen ``ev`` yet (call before applying it).

        Only a late copy of what was published is not news (an audit or a reconnect
        raced the stream): a fill whose ``trade_uuid`` was published, any event of an
        order reported finished, and, while REST's is the last word on an order or a
        currency, an event showing no progress over it or the balances it published.
        What only the baseline learned was never published: the stream's news. So is
        an SMP ``prevented`` (REST never sends one; it may change no volume).
        """
        if isinstance(ev, MyAsset):
            return any(
                self._rest_balances.get(a.currency) != (a.balance, a.locked) for a in ev.assets
            )
        if ev.trade_uuid is not None:
            return ev.trade_uuid not in self._trades
        if ev.uuid in self._finished:
            return False
        if ev.state == "prevented" or ev.uuid not in self._rest_orders:
            return True
        new = _order_of_event(ev)
        old = self._orders.get(ev.uuid)
        return old is None or new.state in FINAL_STATES or _progress(new, old) > 0

    def overrides_rest(self, ev: MyAsset) -> bool:
        """Whether ``ev`` changes a balance whose last published value came from REST.

        Either the stream moved on (news), or it delivers late what it held back
        before REST was read (an older value): no timestamp tells which, so the caller
        asks REST again soon rather than leave a stale balance standing for long.
        """
        return any(
            a.currency in self._rest_balances
            and self._rest_balances[a.currency] != (a.balance, a.locked)
            for a in ev.assets
        )

    def forget_order(self, uuid: str) -> None:
        """Drop an order REST no longer knows (``GET /v1/order`` answered 404)."""
        self._orders.pop(uuid, None)
        self._rest_orders.discard(uuid)

    def missing_uuids(self, open_orders: Sequence[RestOrder]) -> list[str]:
        """Known open orders absent from ``open_orders``: fetch each with ``GET /v1/order``."""
        listed = {o.uuid for o in open_orders}
        return [uuid for uuid in self._orders if uuid not in listed]

    def to_fetch(
        self, open_orders: Sequence[RestOrder], closed_orders: Sequence[RestOrder] = ()
    ) -> list[str]:
        """Uuids to ask ``GET /v1/order`` for, given the open and closed listings.

        Known open orders neither listing shows (their final version), and orders whose
        ``executed_volume`` grew past what was published (their ``trades[]``). An order
        born and cancelled without a fill needs no call: its listing says it all.
        """
        listed: dict[str, RestOrder] = {o.uuid: o for o in open_orders}
        listed.update((o.uuid, o) for o in closed_orders)  # closed: fetched later, newer
        wanted = [uuid for uuid in self._orders if uuid not in listed]
        for uuid, o in listed.items():
            if uuid in self._finished or uuid in wanted:
                continue
            old = self._orders.get(uuid)
            known = _ZERO if old is None or old.executed_volume is None else old.executed_volume
            if o.executed_volume is None or not o.executed_volume.is_finite():
                if old is None and (o.trades_count or 0) > 0:
                    wanted.append(uuid)
            elif _compare(o.executed_volume, known) > 0:
                wanted.append(uuid)
        return wanted

    def diff_orders(
        self,
        open_orders: Sequence[RestOrder],
        closed: Mapping[str, RestOrder],
        now_ms: int,
        *,
        stream_type: str = "REALTIME",
    ) -> list[MyOrder]:
        """The ``myOrder`` events that bring consumers from the known state to REST's.

        ``open_orders``: every open order now. ``closed``: uuid -> a later view of an
        order: ``GET /v1/order`` answers (with ``trades[]``) and the
        ``GET /v1/orders/closed`` listing; it wins over the open listing. A known order
        missing from both stays known (asked again next time). Per order: ``wait`` if it
        is new to us, one ``trade`` per unpublished fill, then ``done`` / ``cancel`` if
        it ended (an open order that progressed without known fills: one event with its
        new volumes). A listing older than what is known (e.g. a WebSocket event applied
        after the fetch) produces nothing. Events are sorted by the time they happened,
        each order's in its own order.
        """
        versions: dict[str, RestOrder] = {}
        for o in open_orders:
            versions.setdefault(o.uuid, o)
        versions.update(closed)
        # Convert first: a malformed order raises before any state changes.
        planned = [
            (o, self._events_of(o, now_ms, stream_type))
            for o in versions.values()
            if o.uuid not in self._finished
        ]
        keyed: list[tuple[tuple[int, int, str, int], MyOrder]] = []
        for o, events in planned:
            self._merge(o.uuid, _order_of_rest(o))
            if events and o.uuid in self._orders:
                self._rest_orders.add(o.uuid)  # the stream's copies of these are late
            at = 0
            for i, ev in enumerate(events):
                if ev.trade_uuid is not None:
                    self._trades.add(ev.trade_uuid)
                at = max(
                    at,
                    ev.trade_timestamp
                    if ev.state == "trade" and ev.trade_timestamp
                    else ev.order_timestamp or 0,
                )
                keyed.append(((at, ev.order_timestamp or 0, ev.uuid, i), ev))
        keyed.sort(key=lambda item: item[0])
        return [ev for _, ev in keyed]

    def _events_of(self, o: RestOrder, now_ms: int, stream_type: str) -> list[MyOrder]:
        """What consumers have not seen of ``o`` (no state change here)."""
        new = _order_of_rest(o)
        old = self._orders.get(o.uuid)
        step = 1 if old is None else _progress(new, old)
        if step < 0:
            return []
        events: list[MyOrder] = []
        executed = o.executed_volume or _ZERO
        if old is None:
            unfilled_open = new.state not in FINAL_STATES and executed == 0
            if unfilled_open:
                return [rest_order_to_my_order(o, now_ms, stream_type=stream_type)]
            events.append(rest_order_birth(o, now_ms, stream_type=stream_type))
        fills: list[MyOrder] = []
        if o.trades is not None:
            published: set[str] = set()
            for fill in rest_order_fills(o, now_ms, stream_type=stream_type):
                if fill.trade_uuid in self._trades or fill.trade_uuid in published:
                    continue
                published.add(fill.trade_uuid or "")
                fills.append(fill)
        events += fills
        if new.state in FINAL_STATES:
            events.append(rest_order_to_my_order(o, now_ms, stream_type=stream_type))
        elif not fills and step > 0 and (old is not None or executed > 0):
            # Progress without known fills (no trades[] at hand): the order as it stands.
            events.append(rest_order_to_my_order(o, now_ms, stream_type=stream_type))
        return events

    def _merge(self, uuid: str, new: KnownOrder) -> bool:
        """Take ``new`` into the state; True if consumers have not seen it yet."""
        if uuid in self._finished:
            return False
        old = self._orders.get(uuid)
        if new.state in FINAL_STATES:
            self._orders.pop(uuid, None)
            self._rest_orders.discard(uuid)
            self._finished.add(uuid)
            return True
        if old is None:
            self._orders[uuid] = new
            return True
        step = _progress(new, old)
        if step >= 0:
            self._orders[uuid] = _fill_unknowns(new, old)
        return step > 0

    # ---------------------------------------------------------------------- balances

    @property
    def balances(self) -> dict[str, Balance]:
        """``currency -> (balance, locked)`` of every currency known to be non-zero."""
        return dict(self._balances)

    def apply_asset(self, ev: MyAsset) -> None:
        """Learn from a published ``myAsset`` event (it lists the changed currencies)."""
        for asset in ev.assets:
            value = (asset.balance, asset.locked)
            if self._rest_balances.get(asset.currency, value) != value:
                del self._rest_balances[asset.currency]  # the stream's value now
            self._set_balance(asset.currency, value)

    def _set_balance(self, currency: str, value: Balance) -> None:
        if value == (_ZERO, _ZERO):
            self._balances.pop(currency, None)
        else:
            self._balances[currency] = value

    def diff_accounts(
        self,
        accounts: Sequence[RestAccount],
        now_ms: int,
        *,
        stream_type: str = "REALTIME",
        keep: Collection[str] = (),
    ) -> MyAsset | None:
        """A ``myAsset`` with only the currencies that changed (exact Decimal compare).

        A currency REST no longer lists is reported as balance 0, locked 0. None when
        nothing changed. ``asset_uuid`` is None (REST has no such id). ``keep``:
        currencies whose known value stays whatever REST says (the stream reported
        them while REST was read: REST's answer may be the older one).
        """
        current = {c: v for c, v in _balances_of(accounts).items() if c not in keep}
        current.update((c, v) for c, v in self._balances.items() if c in keep)
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
        for asset in changed:
            self._rest_balances[asset.currency] = (asset.balance, asset.locked)
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
        self._rest_orders.clear()  # nothing of it was published: the stream's is news
        self._rest_balances.clear()

    def snapshot(self) -> PrivateSnapshot:
        """What is known now, to save: :meth:`restore` takes it back."""
        return PrivateSnapshot(
            orders=dict(self._orders),
            balances=dict(self._balances),
            finished=self._finished.newest(),
            trades=self._trades.newest(),
        )

    def restore(self, snapshot: PrivateSnapshot) -> None:
        """Take a saved state as what was published (a restarted broker's first sync
        then reports what changed since it was saved)."""
        self._orders = {
            uuid: order
            for uuid, order in snapshot.orders.items()
            if order.state not in FINAL_STATES
        }
        self._balances = {
            currency: value
            for currency, value in snapshot.balances.items()
            if value != (_ZERO, _ZERO)
        }
        for uuid in snapshot.finished:
            self._finished.add(uuid)
        for trade_uuid in snapshot.trades:
            self._trades.add(trade_uuid)


def closed_window(known_ms: int | None, now_ms: int) -> tuple[int, int, bool]:
    """``(start_time, end_time, complete)`` of the closed orders to ask for, everything
    being known up to ``known_ms`` (None: now). Upbit lists 7 days at most: an older
    ``known_ms`` is clamped and ``complete`` is False (older ends cannot be reported)."""
    known = now_ms if known_ms is None else known_ms
    start = known - CLOSED_MARGIN_MS
    oldest = now_ms - CLOSED_WINDOW_MS + CLOSED_MARGIN_MS
    if start < oldest:
        return oldest, now_ms, False
    return start, now_ms, True


def _balances_of(accounts: Iterable[RestAccount]) -> dict[str, Balance]:
    """Non-zero ``(balance, locked)`` per currency, in REST's order."""
    return {
        a.currency: (a.balance, a.locked)
        for a in accounts
        if (a.balance, a.locked) != (_ZERO, _ZERO)
    }
