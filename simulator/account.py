"""The simulator's trading account: balances, orders, fills and private events.

Pure logic (no sockets, clock injected). Amounts are :class:`~decimal.Decimal` throughout.
Orders lock funds when placed; an order that crosses the current book fills immediately as
taker, walking the levels; a resting limit order fills later as maker (at its own price)
when :meth:`Account.on_book` reports a book that crosses it. Every order change emits a
DEFAULT-format ``myOrder`` dict and every balance change one ``myAsset`` dict to listeners
(docs/PROTOCOL.md sections 3.5, 3.6). Books are not depleted by our fills: the market simulator
owns them, so a level we took can fill us again on a later book update.

Refusals use Upbit's error names (docs/PROTOCOL.md section 5.2); a limit price off its
band's tick (simulator.market's table) is ``invalid_price_bid``/``invalid_price_ask``, the
name field reports give (the notes do not list it).

Self-match prevention (Upbit's SMP guide; the taker's ``smp_type`` decides): our own
resting orders are not in the market's book, so a new order meets them by price next to
the book's levels (the market's level first at one price). ``cancel_maker`` cancels our
resting order, ``cancel_taker`` cancels the new order, ``reduce`` takes the overlap off
both (``prevented_volume``/``prevented_locked``; a ``prevented`` myOrder event, or
``cancel`` when nothing is left), ``none`` lets the two trade. Since 2026-11-09 an order
without ``smp_type`` gets ``cancel_maker`` (``none`` with ``post_only``), and the order
shows the type applied. Simulator choices (UNCONFIRMED): FOK counts prevented volume
towards the whole; ``cancel_taker`` ends the new order at the first own order it meets,
keeping fills it made before.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_DOWN, Decimal, localcontext
from typing import Any

import msgspec
import structlog

from simulator.market import PRICE_SCALE, tick_size

__all__ = [
    "CLOSED_STATES",
    "DEFAULT_BALANCES",
    "OPEN_STATES",
    "Account",
    "Balance",
    "Fill",
    "Order",
    "OrderError",
    "decimal_str",
    "encode_event",
]

_log = structlog.get_logger(__name__)

KST = timezone(timedelta(hours=9))
ZERO = Decimal(0)
VOLUME_QUANTUM = Decimal("0.00000001")  # Upbit volumes carry at most 8 decimals
_PREC = 60  # decimal precision for account arithmetic (exact for realistic sizes)

DEFAULT_BALANCES: dict[str, Decimal] = {
    "KRW": Decimal("100000000"),
    "BTC": Decimal("1"),
    "ETH": Decimal("10"),
}
# Trading fee by quote currency (Upbit KRW market 0.05%; BTC/USDT markets 0.25%).
FEE_RATES: dict[str, Decimal] = {
    "KRW": Decimal("0.0005"),
    "BTC": Decimal("0.0025"),
    "USDT": Decimal("0.0025"),
}
DEFAULT_FEE_RATE = Decimal("0.0025")
# Minimum order total by quote currency.
MIN_TOTALS: dict[str, Decimal] = {
    "KRW": Decimal("5000"),
    "BTC": Decimal("0.00005"),
    "USDT": Decimal("0.5"),
}
# Largest order total by quote currency, as GET /v1/orders/chance advertises it (Upbit's
# examples: KRW 1,000,000,000; BTC 5). Advertised only: the simulator does not enforce it.
MAX_TOTALS: dict[str, Decimal] = {
    "KRW": Decimal("1000000000"),
    "BTC": Decimal("5"),
}
# Order kinds per side as GET /v1/orders/chance lists them (Upbit's example answer);
# ``order_types`` is Upbit's older field, kept as it still answers it.
CHANCE_ORDER_TYPES = ("limit",)
CHANCE_BID_TYPES = ("best_fok", "best_ioc", "limit", "limit_fok", "limit_ioc", "price")
CHANCE_ASK_TYPES = ("best_fok", "best_ioc", "limit", "limit_fok", "limit_ioc", "market")

SIDES = ("bid", "ask")
ORD_TYPES = ("limit", "price", "market", "best")
TIME_IN_FORCE = ("ioc", "fok", "post_only")
SMP_TYPES = ("reduce", "cancel_maker", "cancel_taker", "none")
# Since 2026-11-09 an order without smp_type gets cancel_maker, except post_only (none).
DEFAULT_SMP_TYPE = "cancel_maker"
OPEN_STATES = ("wait", "watch")
CLOSED_STATES = ("done", "cancel")

Level = tuple[float, float]
Event = dict[str, object]
Listener = Callable[[Event], None]


class OrderError(Exception):
    """An order request Upbit would refuse: exchange error ``name``, ``message``, HTTP status."""

    def __init__(self, name: str, message: str, status: int = 400) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message
        self.status = status


@dataclass
class Balance:
    """One currency's holdings: ``balance`` is available, ``locked`` is held by orders."""

    balance: Decimal = ZERO
    locked: Decimal = ZERO
    avg_buy_price: Decimal = ZERO
    avg_buy_price_modified: bool = False


@dataclass(frozen=True)
class Fill:
    """One execution of an order."""

    uuid: str
    price: Decimal
    volume: Decimal
    funds: Decimal
    fee: Decimal
    is_maker: bool
    side: str
    at: float  # epoch seconds

    @property
    def trend(self) -> str:
        """``up`` when the aggressor bought, ``down`` when it sold (Upbit's trades[].trend)."""
        taker_bought = (self.side == "bid") != self.is_maker
        return "up" if taker_bought else "down"


@dataclass
class Order:
    """An order and its execution state."""

    uuid: str
    market: str
    side: str
    ord_type: str
    price: Decimal | None
    volume: Decimal | None
    identifier: str | None
    time_in_force: str | None
    smp_type: str | None
    created: float  # epoch seconds
    fee_rate: Decimal
    state: str = "wait"
    executed_volume: Decimal = ZERO
    executed_funds: Decimal = ZERO
    paid_fee: Decimal = ZERO
    reserved_fee: Decimal = ZERO
    remaining_fee: Decimal = ZERO
    locked: Decimal = ZERO
    prevented_volume: Decimal = ZERO
    prevented_locked: Decimal = ZERO
    prevented_funds: Decimal = ZERO  # quote amount an amount-sized order lost to SMP
    trades: list[Fill] = field(default_factory=list)
    closed: float | None = None
    # REST view at acceptance, for the POST /v1/orders reply (which the handler then clears).
    placed: dict[str, object] | None = None

    @property
    def quote(self) -> str:
        """Quote currency (``KRW`` of ``KRW-BTC``)."""
        return self.market.split("-", 1)[0]

    @property
    def base(self) -> str:
        """Base currency (``BTC`` of ``KRW-BTC``)."""
        return self.market.split("-", 1)[1]

    @property
    def remaining_volume(self) -> Decimal | None:
        """Volume left to fill; None for orders given by amount (``price``, best bid)."""
        if self.volume is None:
            return None
        return self.volume - self.executed_volume - self.prevented_volume

    @property
    def remaining_funds(self) -> Decimal:
        """Quote amount left to spend for orders given by amount."""
        return (self.price or ZERO) - self.executed_funds - self.prevented_funds

    @property
    def is_open(self) -> bool:
        """Still waiting for fills."""
        return self.state in OPEN_STATES

    @property
    def avg_price(self) -> Decimal:
        """Average fill price (0 before any fill)."""
        if self.executed_volume == 0:
            return ZERO
        with localcontext(prec=_PREC):
            return self.executed_funds / self.executed_volume

    @property
    def by_amount(self) -> bool:
        """True for orders sized by quote amount (market buy ``price``, best bid)."""
        return self.side == "bid" and self.ord_type in ("price", "best")

    def to_rest(self, *, with_trades: bool = False) -> dict[str, object]:
        """The REST order object (decimals as strings, docs/PROTOCOL.md section 8.2)."""
        remaining = self.remaining_volume
        out: dict[str, object] = {
            "uuid": self.uuid,
            "side": self.side,
            "ord_type": self.ord_type,
            "price": None if self.price is None else decimal_str(self.price),
            "state": self.state,
            "market": self.market,
            "created_at": _iso_kst(self.created),
            "volume": None if self.volume is None else decimal_str(self.volume),
            "remaining_volume": None if remaining is None else decimal_str(remaining),
            "executed_volume": decimal_str(self.executed_volume),
            "reserved_fee": decimal_str(self.reserved_fee),
            "remaining_fee": decimal_str(self.remaining_fee),
            "paid_fee": decimal_str(self.paid_fee),
            "locked": decimal_str(self.locked),
            "executed_funds": decimal_str(self.executed_funds),
            "prevented_volume": decimal_str(self.prevented_volume),
            "prevented_locked": decimal_str(self.prevented_locked),
            "trades_count": len(self.trades),
            "time_in_force": self.time_in_force,
            "identifier": self.identifier,
            "smp_type": self.smp_type,
        }
        if with_trades:
            out["trades"] = [
                {
                    "market": self.market,
                    "uuid": t.uuid,
                    "price": decimal_str(t.price),
                    "volume": decimal_str(t.volume),
                    "funds": decimal_str(t.funds),
                    "trend": t.trend,
                    "created_at": _iso_kst(t.at, micro=True),
                    "side": t.side,
                }
                for t in self.trades
            ]
        return out


def decimal_str(value: Decimal) -> str:
    """A decimal as Upbit prints it in REST bodies: plain notation, no trailing zeros."""
    if value == 0:
        return "0"
    text = format(value.normalize(), "f")
    return text


def _balance_str(value: Decimal) -> str:
    """Balance formatting of GET /v1/accounts: always with a fraction (``"2.0"``)."""
    text = decimal_str(value)
    return text if "." in text else text + ".0"


def _iso_kst(at: float, *, micro: bool = False) -> str:
    stamp = datetime.fromtimestamp(at, tz=KST)
    return stamp.isoformat(timespec="microseconds" if micro else "seconds")


def _ms(at: float) -> int:
    return int(at * 1000)


def _dec(value: float) -> Decimal:
    """A book float as the decimal it was printed from (shortest repr)."""
    return Decimal(repr(value))


def _on_tick(quote: str, price: Decimal) -> bool:
    """True when a limit price is a whole number of ticks of its price band."""
    atoms = price * PRICE_SCALE
    if atoms != atoms.to_integral_value():
        return False
    return int(atoms) % tick_size(quote, int(atoms)) == 0


def _floor_volume(value: Decimal) -> Decimal:
    return value.quantize(VOLUME_QUANTUM, rounding=ROUND_DOWN)


def _plain(value: object) -> object:
    if isinstance(value, Decimal):
        return msgspec.Raw(decimal_str(value).encode())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_ENCODER = msgspec.json.Encoder()


def encode_event(event: Mapping[str, object]) -> bytes:
    """JSON bytes for a private event, decimals written as plain JSON numbers (exact)."""
    return _ENCODER.encode(_plain(dict(event)))


class Account:
    """One simulated Upbit account (a pocket): balances, orders and the event stream."""

    def __init__(
        self,
        *,
        balances: dict[str, Decimal] | None = None,
        clock: Callable[[], float] = time.time,
        max_closed_orders: int = 10_000,
        closed_window: float = 7 * 86400.0,
    ) -> None:
        self._clock = clock
        self._initial = dict(DEFAULT_BALANCES if balances is None else balances)
        self._max_closed = max_closed_orders
        self._closed_window = closed_window
        self._listeners: list[Listener] = []
        self._books: dict[str, tuple[Sequence[Level], Sequence[Level]]] = {}
        self._balances: dict[str, Balance] = {}
        self._orders: dict[str, Order] = {}
        self._open_by_market: dict[str, dict[str, Order]] = {}
        self._closed: deque[str] = deque()
        self._identifiers: dict[str, str] = {}
        self._burned: OrderedDict[str, None] = OrderedDict()  # identifiers of refused orders
        self.reset()

    # -- listeners -----------------------------------------------------------------------

    def add_listener(self, fn: Listener) -> Callable[[], None]:
        """Receive every myOrder/myAsset event; returns a function that removes ``fn``."""
        self._listeners.append(fn)

        def remove() -> None:
            if fn in self._listeners:
                self._listeners.remove(fn)

        return remove

    def _emit(self, event: Event) -> None:
        for fn in list(self._listeners):
            try:
                fn(event)
            except Exception:
                _log.exception("account_listener_failed", event_type=event.get("type"))

    # -- state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the initial balances with no orders, history or used identifiers."""
        self._balances = {cur: Balance(balance=amount) for cur, amount in self._initial.items()}
        self._orders.clear()
        self._open_by_market.clear()
        self._closed.clear()
        self._identifiers.clear()
        self._burned.clear()

    def balances(self) -> dict[str, Balance]:
        """A copy of every currency's holdings."""
        return {
            cur: Balance(b.balance, b.locked, b.avg_buy_price, b.avg_buy_price_modified)
            for cur, b in self._balances.items()
        }

    def set_balances(self, balances: Mapping[str, Decimal]) -> None:
        """Set the available balance of the given currencies (locked funds stay locked)."""
        changed: list[str] = []
        for cur, amount in balances.items():
            if amount < 0:
                raise OrderError("invalid_parameter", f"negative balance for {cur}")
            bal = self._balance(cur)
            if bal.balance != amount:
                bal.balance = amount
                changed.append(cur)
        if changed:
            self._emit_assets(changed, self._clock())

    def accounts(self) -> list[dict[str, object]]:
        """GET /v1/accounts body: currencies with holdings, numbers as strings."""
        out: list[dict[str, object]] = []
        for cur, bal in self._balances.items():
            if bal.balance == 0 and bal.locked == 0 and cur != "KRW":
                continue
            out.append(self.account_row(cur))
        return out

    def account_row(self, currency: str) -> dict[str, object]:
        """One currency's GET /v1/accounts row, zeros when nothing is held."""
        bal = self._balances.get(currency) or Balance()
        return {
            "currency": currency,
            "balance": _balance_str(bal.balance),
            "locked": _balance_str(bal.locked),
            "avg_buy_price": decimal_str(bal.avg_buy_price),
            "avg_buy_price_modified": bal.avg_buy_price_modified,
            "unit_currency": "KRW",
        }

    def order_chance(self, market: str) -> dict[str, object]:
        """GET /v1/orders/chance body of ``market`` (``QUOTE-BASE``, known to exist): the
        fees and order constraints of its quote currency and the two account rows."""
        quote, base = market.split("-", 1)
        fee = decimal_str(FEE_RATES.get(quote, DEFAULT_FEE_RATE))
        min_total = decimal_str(MIN_TOTALS.get(quote, ZERO))
        info: dict[str, object] = {
            "id": market,
            "name": f"{base}/{quote}",
            "order_types": list(CHANCE_ORDER_TYPES),
            "order_sides": list(SIDES[::-1]),
            "bid_types": list(CHANCE_BID_TYPES),
            "ask_types": list(CHANCE_ASK_TYPES),
            "bid": {"currency": quote, "min_total": min_total},
            "ask": {"currency": base, "min_total": min_total},
        }
        if quote in MAX_TOTALS:
            info["max_total"] = decimal_str(MAX_TOTALS[quote])
        info["state"] = "active"
        return {
            "bid_fee": fee,
            "ask_fee": fee,
            "maker_bid_fee": fee,
            "maker_ask_fee": fee,
            "market": info,
            "bid_account": self.account_row(quote),
            "ask_account": self.account_row(base),
        }

    def markets_with_open_orders(self) -> set[str]:
        """Markets that have at least one open order (the market sim may call on_book less
        often for the others)."""
        return {m for m, orders in self._open_by_market.items() if orders}

    # -- queries ---------------------------------------------------------------------------

    def get_order(self, *, uuid: str | None = None, identifier: str | None = None) -> Order | None:
        """An order by uuid (preferred) or identifier, open or in the kept history."""
        if uuid is not None:
            return self._orders.get(uuid)
        if identifier is not None:
            order_uuid = self._identifiers.get(identifier)
            return None if order_uuid is None else self._orders.get(order_uuid)
        return None

    def open_orders(
        self, *, market: str | None = None, states: Iterable[str] = ("wait",)
    ) -> list[Order]:
        """Open orders in creation order."""
        wanted = set(states)
        if market is not None:
            pool: Iterable[Order] = self._open_by_market.get(market, {}).values()
        else:
            pool = (o for orders in self._open_by_market.values() for o in orders.values())
        return sorted((o for o in pool if o.state in wanted), key=lambda o: o.created)

    def closed_orders(
        self,
        *,
        market: str | None = None,
        states: Iterable[str] = CLOSED_STATES,
        start: float | None = None,
        end: float | None = None,
    ) -> list[Order]:
        """Closed orders created in [start, end] (epoch seconds), in creation order."""
        wanted = set(states)
        out = []
        for order_uuid in self._closed:
            order = self._orders[order_uuid]
            if order.state not in wanted or (market is not None and order.market != market):
                continue
            if start is not None and order.created < start:
                continue
            if end is not None and order.created > end:
                continue
            out.append(order)
        return sorted(out, key=lambda o: o.created)

    # -- books -----------------------------------------------------------------------------

    def on_book(self, code: str, asks: Sequence[Level], bids: Sequence[Level]) -> None:
        """A new book for ``code`` (asks ascending, bids descending): fill crossed orders."""
        self._books[code] = (asks, bids)
        open_orders = self._open_by_market.get(code)
        if not open_orders:
            return
        with localcontext(prec=_PREC):
            self._match_resting(code, asks, bids)

    def _match_resting(self, code: str, asks: Sequence[Level], bids: Sequence[Level]) -> None:
        orders = [o for o in self._open_by_market[code].values() if o.ord_type == "limit"]
        if not orders:
            return
        now = self._clock()
        buys = sorted(
            (o for o in orders if o.side == "bid"), key=lambda o: (-(o.price or 0), o.created)
        )
        sells = sorted(
            (o for o in orders if o.side == "ask"), key=lambda o: (o.price or 0, o.created)
        )
        # Liquidity that crosses our resting orders, consumed in price-time priority.
        ask_levels = [[_dec(p), _dec(s)] for p, s in asks[: self._depth_for(buys, asks, "bid")]]
        bid_levels = [[_dec(p), _dec(s)] for p, s in bids[: self._depth_for(sells, bids, "ask")]]
        for order, levels in [(o, ask_levels) for o in buys] + [(o, bid_levels) for o in sells]:
            limit = order.price or ZERO
            need = order.remaining_volume or ZERO
            take = ZERO
            for level in levels:
                price, size = level
                crosses = price <= limit if order.side == "bid" else price >= limit
                if not crosses or take >= need:
                    break
                used = min(size, need - take)
                level[1] = size - used
                take += used
            if take > 0:
                self._fill(order, limit, take, is_maker=True, now=now)
                if order.remaining_volume == 0:
                    self._close(order, "done", now)

    @staticmethod
    def _depth_for(orders: list[Order], levels: Sequence[Level], side: str) -> int:
        """How many levels can cross the most aggressive of ``orders``."""
        if not orders:
            return 0
        limit = float(orders[0].price or 0)
        depth = 0
        for price, _size in levels:
            if (side == "bid" and price > limit) or (side == "ask" and price < limit):
                break
            depth += 1
        return depth

    # -- placing -------------------------------------------------------------------------

    def place_order(
        self,
        *,
        market: str,
        side: str,
        ord_type: str,
        price: Decimal | None = None,
        volume: Decimal | None = None,
        identifier: str | None = None,
        time_in_force: str | None = None,
        smp_type: str | None = None,
        asks: Sequence[Level] | None = None,
        bids: Sequence[Level] | None = None,
    ) -> Order:
        """Validate, lock funds and match an order against the book; raise OrderError.

        ``asks``/``bids`` default to the last book given to :meth:`on_book` (empty if none).
        The identifier is used up even when the order is refused (as on Upbit).
        """
        if identifier is not None:
            if identifier in self._identifiers or identifier in self._burned:
                raise OrderError("duplicated_identifier", "identifier is duplicated.")
            self._burn(identifier)
        if asks is None or bids is None:
            last_asks, last_bids = self._books.get(market, ((), ()))
            asks = last_asks if asks is None else asks
            bids = last_bids if bids is None else bids
        with localcontext(prec=_PREC):
            order = self._new_order(
                market=market,
                side=side,
                ord_type=ord_type,
                price=price,
                volume=volume,
                identifier=identifier,
                time_in_force=time_in_force,
                smp_type=smp_type,
                bids=bids,
            )
            now = order.created
            self._lock(order)
            self._orders[order.uuid] = order
            self._open_by_market.setdefault(market, {})[order.uuid] = order
            if identifier is not None:
                self._burned.pop(identifier, None)
                self._identifiers[identifier] = order.uuid
            order.placed = order.to_rest()
            self._emit(self._order_event(order, "wait", now))
            self._emit_assets([order.quote if order.side == "bid" else order.base], now)
            self._execute(order, asks, bids, now)
        return order

    def _new_order(
        self,
        *,
        market: str,
        side: str,
        ord_type: str,
        price: Decimal | None,
        volume: Decimal | None,
        identifier: str | None,
        time_in_force: str | None,
        smp_type: str | None,
        bids: Sequence[Level],
    ) -> Order:
        create_error = "create_bid_error" if side == "bid" else "create_ask_error"
        if side not in SIDES:
            raise OrderError(
                "validation_error", "side is missing, side does not have a valid value"
            )
        if ord_type not in ORD_TYPES:
            raise OrderError(
                "validation_error", "ord_type is missing, ord_type does not have a valid value"
            )
        if "-" not in market:
            raise OrderError("validation_error", "market does not have a valid value")
        if time_in_force is not None and time_in_force not in TIME_IN_FORCE:
            raise OrderError("validation_error", "time_in_force does not have a valid value")
        if smp_type is not None and smp_type not in SMP_TYPES:
            raise OrderError("validation_error", "smp_type does not have a valid value")
        if time_in_force == "post_only" and (ord_type != "limit" or smp_type not in (None, "none")):
            raise OrderError(
                "invalid_post_only", "post_only is only for limit orders without smp_type."
            )
        if smp_type is None:
            smp_type = "none" if time_in_force == "post_only" else DEFAULT_SMP_TYPE
        if ord_type == "limit":
            if price is None or volume is None:
                missing = "price" if price is None else "volume"
                raise OrderError("validation_error", f"{missing} is missing")
        elif ord_type == "price":
            if side != "bid":
                raise OrderError(create_error, "ord_type price is for bid (market buy) orders.")
            if price is None:
                raise OrderError("validation_error", "price is missing")
            if volume is not None:
                raise OrderError(create_error, "volume must be null for a market buy order.")
            if time_in_force is not None:
                raise OrderError(create_error, "time_in_force is not supported for market orders.")
        elif ord_type == "market":
            if side != "ask":
                raise OrderError(create_error, "ord_type market is for ask (market sell) orders.")
            if volume is None:
                raise OrderError("validation_error", "volume is missing")
            if price is not None:
                raise OrderError(create_error, "price must be null for a market sell order.")
            if time_in_force is not None:
                raise OrderError(create_error, "time_in_force is not supported for market orders.")
        else:  # best
            if time_in_force not in ("ioc", "fok"):
                raise OrderError("validation_error", "time_in_force is required (ioc or fok)")
            if side == "bid" and (price is None or volume is not None):
                raise OrderError(create_error, "a best bid order takes price and no volume.")
            if side == "ask" and (volume is None or price is not None):
                raise OrderError(create_error, "a best ask order takes volume and no price.")
        for name, value in (("price", price), ("volume", volume)):
            if value is not None and (not value.is_finite() or value <= 0):
                raise OrderError("invalid_parameter", f"{name} must be positive")
        if volume is not None and volume != _floor_volume(volume):
            raise OrderError("invalid_parameter", "volume has more than 8 decimals")
        quote = market.split("-", 1)[0]
        if ord_type == "limit" and price is not None and not _on_tick(quote, price):
            raise OrderError(
                f"invalid_price_{side}",
                "주문가격 단위를 잘못 입력하셨습니다. 확인 후 시도해주세요.",
            )
        fee_rate = FEE_RATES.get(quote, DEFAULT_FEE_RATE)
        min_total = MIN_TOTALS.get(quote, ZERO)
        if price is not None and volume is not None:
            total: Decimal | None = price * volume
        elif price is not None:
            total = price
        elif volume is not None and bids:
            total = volume * _dec(bids[0][0])
        else:
            total = None
        if total is not None and total < min_total:
            name = "under_min_total_bid" if side == "bid" else "under_min_total_ask"
            raise OrderError(name, f"The minimum order total is {decimal_str(min_total)} {quote}.")
        return Order(
            uuid=str(uuid.uuid4()),
            market=market,
            side=side,
            ord_type=ord_type,
            price=price,
            volume=volume,
            identifier=identifier,
            time_in_force=time_in_force,
            smp_type=smp_type,
            created=self._clock(),
            fee_rate=fee_rate,
        )

    def _lock(self, order: Order) -> None:
        if order.side == "bid":
            funds = order.price or ZERO
            if order.volume is not None:
                funds = funds * order.volume
            fee = funds * order.fee_rate
            need = funds + fee
            bal = self._balance(order.quote)
            if bal.balance < need:
                raise OrderError(
                    "insufficient_funds_bid", f"Insufficient {order.quote} for this order."
                )
            order.reserved_fee = order.remaining_fee = fee
        else:
            need = order.volume or ZERO
            bal = self._balance(order.base)
            if bal.balance < need:
                raise OrderError(
                    "insufficient_funds_ask", f"Insufficient {order.base} for this order."
                )
        bal.balance -= need
        bal.locked += need
        order.locked = need

    # -- execution -------------------------------------------------------------------------

    def _execute(
        self, order: Order, asks: Sequence[Level], bids: Sequence[Level], now: float
    ) -> None:
        levels = asks if order.side == "bid" else bids
        steps, satisfied = self._taker_plan(order, levels, self._own_crossing(order))
        tif = order.time_in_force
        immediate = order.ord_type in ("price", "market", "best") or tif in ("ioc", "fok")
        if (tif == "post_only" and steps) or (tif == "fok" and not satisfied):
            self._close(order, "cancel", now)
            return
        for price, volume, maker in steps:
            if maker is None:
                self._fill(order, price, volume, is_maker=False, now=now)
            elif not self._self_match(order, maker, price, volume, now):
                return  # the taker was cancelled (cancel_taker, or reduced to nothing)
        if self._is_complete(order):
            self._close(order, "done", now)
        elif immediate:
            self._close(order, "cancel", now)

    def _own_crossing(self, order: Order) -> list[Order]:
        """Our own resting opposite orders ``order`` could trade with, best first."""
        makers = []
        for other in self._open_by_market.get(order.market, {}).values():
            if other.side == order.side or other.state != "wait" or other.price is None:
                continue
            if order.ord_type == "limit":
                limit = order.price or ZERO
                if (order.side == "bid" and other.price > limit) or (
                    order.side == "ask" and other.price < limit
                ):
                    continue
            makers.append(other)
        sign = 1 if order.side == "bid" else -1
        return sorted(makers, key=lambda o: (sign * (o.price or ZERO), o.created))

    def _taker_plan(
        self, order: Order, levels: Sequence[Level], makers: Sequence[Order] = ()
    ) -> tuple[list[tuple[Decimal, Decimal, Order | None]], bool]:
        """The steps this order would take now, best price first: ``(price, volume, None)``
        fills from ``levels`` and ``(price, volume, maker)`` meetings with our own
        ``makers`` (volume 0 when SMP cancels one side), and whether they satisfy it (for
        amount-sized orders: what is left cannot buy one volume quantum). At one price the
        market's level comes before our own orders."""
        plan: list[tuple[Decimal, Decimal, Order | None]] = []
        sign = 1 if order.side == "bid" else -1
        sources: list[tuple[Decimal, Decimal, Order | None]] = [
            (_dec(p), _dec(s), None) for p, s in levels
        ]
        sources += [(m.price or ZERO, m.remaining_volume or ZERO, m) for m in makers]
        sources.sort(key=lambda src: (sign * src[0], src[2] is not None))
        if not sources:
            return plan, False
        best_price = sources[0][0]
        remaining_volume = order.remaining_volume
        remaining_funds = order.remaining_funds
        for price, size, maker in sources:
            if order.ord_type == "limit":
                limit = order.price or ZERO
                if (order.side == "bid" and price > limit) or (
                    order.side == "ask" and price < limit
                ):
                    return plan, False
            elif order.ord_type == "best" and price != best_price:
                return plan, False
            if maker is not None and order.smp_type in ("cancel_maker", "cancel_taker"):
                plan.append((price, ZERO, maker))
                if order.smp_type == "cancel_taker":
                    return plan, False
                continue
            if order.by_amount:
                affordable = _floor_volume(remaining_funds / price)
                if affordable <= 0:
                    return plan, True
                volume = min(size, affordable)
                remaining_funds -= price * volume
            else:
                assert remaining_volume is not None
                volume = min(size, remaining_volume)
                remaining_volume -= volume
            if volume > 0:
                plan.append((price, volume, maker))
            if not order.by_amount and remaining_volume == 0:
                return plan, True
        return plan, False

    def _self_match(
        self, taker: Order, maker: Order, price: Decimal, volume: Decimal, now: float
    ) -> bool:
        """Apply the taker's smp_type to a meeting with our own ``maker``; False when the
        taker is closed by it (docs/PROTOCOL.md section 8.2, SMP)."""
        smp = taker.smp_type
        if smp == "none":  # a self-trade: both sides fill
            self._fill(taker, price, volume, is_maker=False, now=now)
            self._fill(maker, maker.price or price, volume, is_maker=True, now=now)
            if self._is_complete(maker):
                self._close(maker, "done", now)
            return True
        if smp == "cancel_maker":
            self._prevent(maker, maker.remaining_volume or ZERO, price, now)
            return True
        if smp == "cancel_taker":
            whole = taker.remaining_volume
            if whole is None:  # amount-sized: the funds left, as volume at this price
                whole = taker.remaining_funds / price
            self._prevent(taker, whole, price, now)
            if taker.is_open:
                self._close(taker, "cancel", now)
            return False
        self._prevent(maker, volume, price, now)  # reduce
        self._prevent(taker, volume, price, now)
        return taker.is_open

    def _prevent(self, order: Order, volume: Decimal, price: Decimal, now: float) -> None:
        """Take ``volume`` (at ``price`` for amount-sized orders) off an order for SMP,
        releasing its funds; the order is cancelled when nothing is left of it."""
        if order.by_amount:
            funds = min(price * volume, order.remaining_funds)
            release = funds * (1 + order.fee_rate)
            fee_release = funds * order.fee_rate
            order.prevented_funds += funds
            order.prevented_volume += _floor_volume(volume)
        elif order.side == "bid":
            reserved = (order.price or ZERO) * volume
            release = reserved * (1 + order.fee_rate)
            fee_release = reserved * order.fee_rate
            order.prevented_volume += volume
        else:
            release, fee_release = volume, ZERO
            order.prevented_volume += volume
        release = min(release, order.locked)
        cur = order.quote if order.side == "bid" else order.base
        bal = self._balance(cur)
        bal.locked -= release
        bal.balance += release
        order.locked -= release
        order.remaining_fee -= fee_release
        order.prevented_locked += release
        if self._is_complete(order):
            self._close(order, "cancel", now)
        else:
            self._emit(self._order_event(order, "prevented", now))
            self._emit_assets([cur], now)

    def _is_complete(self, order: Order) -> bool:
        if order.by_amount:
            return order.remaining_funds == 0
        return order.remaining_volume == 0

    def _fill(
        self, order: Order, price: Decimal, volume: Decimal, *, is_maker: bool, now: float
    ) -> None:
        funds = price * volume
        fee = funds * order.fee_rate
        quote, base = self._balance(order.quote), self._balance(order.base)
        if order.side == "bid":
            if order.by_amount:
                release = funds * (1 + order.fee_rate)
                fee_release = fee
            else:
                reserved = (order.price or ZERO) * volume
                release = reserved * (1 + order.fee_rate)
                fee_release = reserved * order.fee_rate
            quote.locked -= release
            quote.balance += release - funds - fee
            order.locked -= release
            order.remaining_fee -= fee_release
            if order.quote == "KRW":
                held = base.balance + base.locked
                base.avg_buy_price = (
                    (held * base.avg_buy_price + funds) / (held + volume)
                ).quantize(VOLUME_QUANTUM)
            base.balance += volume
        else:
            base.locked -= volume
            order.locked -= volume
            quote.balance += funds - fee
            if base.balance + base.locked == 0:
                base.avg_buy_price = ZERO
        order.executed_volume += volume
        order.executed_funds += funds
        order.paid_fee += fee
        fill = Fill(
            uuid=str(uuid.uuid4()),
            price=price,
            volume=volume,
            funds=funds,
            fee=fee,
            is_maker=is_maker,
            side=order.side,
            at=now,
        )
        order.trades.append(fill)
        self._emit(self._order_event(order, "trade", now, fill))
        self._emit_assets([order.quote, order.base], now)

    def _close(self, order: Order, state: str, now: float) -> None:
        """Finish an order: release what it still locks, emit the final event, keep history."""
        if order.locked > 0:
            cur = order.quote if order.side == "bid" else order.base
            bal = self._balance(cur)
            bal.locked -= order.locked
            bal.balance += order.locked
            released = True
        else:
            released = False
        if state == "done":
            order.locked = ZERO
            order.remaining_fee = ZERO
        order.state = state
        order.closed = now
        self._open_by_market.get(order.market, {}).pop(order.uuid, None)
        self._closed.append(order.uuid)
        self._emit(self._order_event(order, state, now))
        if released:
            self._emit_assets([order.quote if order.side == "bid" else order.base], now)
        self._trim_history(now)

    def _trim_history(self, now: float) -> None:
        while self._closed and (
            len(self._closed) > self._max_closed
            or (self._orders[self._closed[0]].closed or now) < now - self._closed_window
        ):
            old = self._orders.pop(self._closed.popleft())
            if old.identifier is not None:
                self._identifiers.pop(old.identifier, None)

    def _burn(self, identifier: str) -> None:
        """Remember an identifier whose order may be refused (bounded like the history)."""
        self._burned[identifier] = None
        while len(self._burned) > self._max_closed:
            self._burned.popitem(last=False)

    # -- cancel --------------------------------------------------------------------------

    def cancel(self, *, uuid: str | None = None, identifier: str | None = None) -> Order:
        """Cancel an open order, releasing its locked funds; raise OrderError if not open."""
        order = self.get_order(uuid=uuid, identifier=identifier)
        if order is None:
            raise OrderError("order_not_found", "주문을 찾지 못했습니다.", 404)
        if not order.is_open:
            raise OrderError("order_not_found", "주문을 찾지 못했습니다.", 404)
        with localcontext(prec=_PREC):
            self._close(order, "cancel", self._clock())
        return order

    # -- events ----------------------------------------------------------------------------

    def _balance(self, currency: str) -> Balance:
        bal = self._balances.get(currency)
        if bal is None:
            bal = self._balances[currency] = Balance()
        return bal

    def _emit_assets(self, currencies: Iterable[str], now: float) -> None:
        seen: list[str] = []
        for cur in currencies:
            if cur not in seen:
                seen.append(cur)
        assets: list[dict[str, object]] = [
            {
                "currency": cur,
                "balance": self._balances[cur].balance,
                "locked": self._balances[cur].locked,
            }
            for cur in seen
        ]
        self._emit(
            {
                "type": "myAsset",
                "asset_uuid": str(uuid.uuid4()),
                "assets": assets,
                "asset_timestamp": _ms(now),
                "timestamp": _ms(now),
                "stream_type": "REALTIME",
            }
        )

    @staticmethod
    def _order_event(order: Order, state: str, now: float, fill: Fill | None = None) -> Event:
        last_fill = order.trades[-1] if order.trades else None
        event: dict[str, Any] = {
            "type": "myOrder",
            "code": order.market,
            "uuid": order.uuid,
            "ask_bid": order.side.upper(),
            "order_type": order.ord_type,
            "state": state,
            "trade_uuid": fill.uuid if fill else None,
            "price": fill.price if fill else order.price,
            "avg_price": order.avg_price,
            "volume": fill.volume if fill else order.volume,
            "remaining_volume": order.remaining_volume,
            "executed_volume": order.executed_volume,
            "trades_count": len(order.trades),
            "reserved_fee": order.reserved_fee,
            "remaining_fee": order.remaining_fee,
            "paid_fee": order.paid_fee,
            "locked": order.locked,
            "executed_funds": order.executed_funds,
            "time_in_force": order.time_in_force,
            "trade_fee": fill.fee if fill else None,
            "is_maker": fill.is_maker if fill else None,
            "identifier": order.identifier,
            "smp_type": order.smp_type,
            "prevented_volume": order.prevented_volume,
            "prevented_locked": order.prevented_locked,
            "trade_timestamp": _ms(last_fill.at) if last_fill else None,
            "order_timestamp": _ms(order.created),
            "timestamp": _ms(now),
            "stream_type": "REALTIME",
        }
        return event
