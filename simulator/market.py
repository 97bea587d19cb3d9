"""Simulated Upbit market data: pure logic driven by ``now`` and a seeded ``random.Random``.

:class:`Exchange` holds about 300 markets (KRW, BTC and USDT quotes). A market costs
nothing until something uses it: the first use *materializes* it (a book and a short
trade history) and while it is *active* (watched by a WebSocket subscription, touched by
REST recently, or pinned for resting orders) :meth:`Exchange.advance` makes it tick.

Each market is a random walk expressed through a 30-level book: takers consume the best
level (trades happen only at the best bid or ask), makers re-quote inside the spread or
cancel the best level. Prices are integers of 1e-8 ("atoms") on Upbit's tick grid,
sizes integers of 1e-8, so every total and sum is exact; floats appear only in the
messages. Tickers and candles (9 WebSocket units plus days) are derived from the trades.

Message builders return Upbit's DEFAULT-format dicts (without ``stream_type``); the
WebSocket layer adds the stream type and the SIMPLE key mapping.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import deque
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation

__all__ = [
    "CANDLE_UNITS",
    "DAY",
    "PRICE_SCALE",
    "SIZE_SCALE",
    "Candle",
    "Exchange",
    "MarketEvent",
    "MarketInfo",
    "MarketState",
    "Trade",
    "default_markets",
    "fmt_date",
    "fmt_datetime",
    "level_to_atoms",
    "tick_size",
]

PRICE_SCALE = 100_000_000  # price atoms per unit of the quote currency
SIZE_SCALE = 100_000_000  # size atoms per unit of the base currency
VALUE_SCALE = PRICE_SCALE * SIZE_SCALE
DEPTH = 30
DAY = 86_400
KST_OFFSET_MS = 9 * 3_600_000

# WebSocket candle types -> period in seconds (docs/PROTOCOL.md section 3.4).
CANDLE_UNITS: dict[str, int] = {
    "1s": 1,
    "1m": 60,
    "3m": 180,
    "5m": 300,
    "10m": 600,
    "15m": 900,
    "30m": 1800,
    "60m": 3600,
    "240m": 14400,
}
_PERIODS: tuple[int, ...] = (*CANDLE_UNITS.values(), DAY)
CANDLE_HISTORY = 200  # REST count maximum

# KRW tick sizes by price band (lower bound in KRW, tick in KRW), from Upbit's KRW market
# table in force since 2025-07-31 for prices >= 100 KRW; the bands below 100 KRW follow
# the 2024 table (the newer one was not available when this was written).
_KRW_BANDS: tuple[tuple[str, str], ...] = (
    ("1000000", "1000"),
    ("500000", "500"),
    ("100000", "100"),
    ("50000", "50"),
    ("10000", "10"),
    ("5000", "5"),
    ("1000", "1"),
    ("100", "1"),
    ("10", "0.01"),
    ("1", "0.001"),
    ("0.1", "0.0001"),
    ("0.01", "0.00001"),
    ("0.001", "0.000001"),
    ("0.0001", "0.0000001"),
    ("0", "0.00000001"),
)
# USDT market (since 2024-08-19); BTC market is a flat 1 satoshi.
_USDT_BANDS: tuple[tuple[str, str], ...] = (
    ("10", "0.01"),
    ("1", "0.001"),
    ("0.1", "0.0001"),
    ("0.01", "0.00001"),
    ("0.001", "0.000001"),
    ("0.0001", "0.0000001"),
    ("0", "0.00000001"),
)


def _atoms(value: str) -> int:
    return int(Decimal(value) * PRICE_SCALE)


_BANDS: dict[str, tuple[tuple[int, int], ...]] = {
    "KRW": tuple((_atoms(lo), _atoms(t)) for lo, t in _KRW_BANDS),
    "USDT": tuple((_atoms(lo), _atoms(t)) for lo, t in _USDT_BANDS),
    "BTC": ((0, 1),),
}
# Typical order value per book level, in the quote currency.
_LEVEL_NOTIONAL = {"KRW": 3_000_000.0, "BTC": 0.03, "USDT": 2_000.0}


def tick_size(quote: str, price: int) -> int:
    """Tick (in atoms) of the band containing ``price`` (atoms) on a ``quote`` market."""
    for lower, tick in _BANDS.get(quote, _BANDS["BTC"]):
        if price >= lower:
            return tick
    return 1


def level_to_atoms(level: object) -> int | None:
    """An orderbook ``level`` (number or numeric string) in atoms; None when not numeric."""
    if isinstance(level, bool):
        return None
    try:
        value = Decimal(str(level)) * PRICE_SCALE
    except (InvalidOperation, ValueError):
        return None
    if not value.is_finite() or value != value.to_integral_value() or value < 0:
        return None
    return int(value)


def _num(atoms: int) -> float:
    return atoms / PRICE_SCALE


def _size(atoms: int) -> float:
    return atoms / SIZE_SCALE


def fmt_date(ts_ms: int, sep: str = "-", offset_ms: int = 0) -> str:
    """``yyyy-MM-dd`` (or ``yyyyMMdd`` with sep="") of a ms timestamp, UTC + offset."""
    t = time.gmtime((ts_ms + offset_ms) // 1000)
    return f"{t.tm_year:04d}{sep}{t.tm_mon:02d}{sep}{t.tm_mday:02d}"


def fmt_time(ts_ms: int, sep: str = ":", offset_ms: int = 0) -> str:
    """``HH:mm:ss`` (or ``HHmmss`` with sep="") of a ms timestamp, UTC + offset."""
    t = time.gmtime((ts_ms + offset_ms) // 1000)
    return f"{t.tm_hour:02d}{sep}{t.tm_min:02d}{sep}{t.tm_sec:02d}"


def fmt_datetime(ts_ms: int, offset_ms: int = 0) -> str:
    """``yyyy-MM-ddTHH:mm:ss`` without zone, as in candle_date_time_utc/kst."""
    return f"{fmt_date(ts_ms, '-', offset_ms)}T{fmt_time(ts_ms, ':', offset_ms)}"


# ---------------------------------------------------------------------------------------
# Market list


@dataclasses.dataclass(frozen=True, slots=True)
class MarketInfo:
    """A listed pair as /v1/market/all reports it, plus the simulation's anchor price."""

    code: str
    korean_name: str
    english_name: str
    price: Decimal  # anchor price in the quote currency
    warning: bool = False
    cautions: tuple[str, ...] = ()

    @property
    def quote(self) -> str:
        return self.code.split("-", 1)[0]

    @property
    def base(self) -> str:
        return self.code.split("-", 1)[1]


_NAMED: tuple[tuple[str, str, str, str], ...] = (
    ("BTC", "비트코인", "Bitcoin", "140000000"),
    ("ETH", "이더리움", "Ethereum", "5000000"),
    ("ETHW", "이더리움피오더블유", "EthereumPoW", "2500"),
    ("XRP", "리플", "XRP", "3100"),
    ("SOL", "솔라나", "Solana", "250000"),
    ("DOGE", "도지코인", "Dogecoin", "300"),
    ("ADA", "에이다", "Cardano", "900"),
    ("EOS", "이오스", "EOS", "1000"),
    ("BCH", "비트코인캐시", "Bitcoin Cash", "650000"),
    ("TRX", "트론", "TRON", "330"),
    ("LINK", "체인링크", "Chainlink", "25000"),
    ("DOT", "폴카닷", "Polkadot", "6000"),
    ("AVAX", "아발란체", "Avalanche", "35000"),
    ("USDT", "테더", "Tether", "1400"),
    ("SHIB", "시바이누", "Shiba Inu", "0.02"),
    ("BTT", "비트토렌트", "BitTorrent", "0.0012"),
    ("1INCH", "1인치네트워크", "1inch Network", "400"),
    ("SAND", "샌드박스", "The Sandbox", "400"),
    ("ATOM", "코스모스", "Cosmos", "6500"),
    ("ETC", "이더리움클래식", "Ethereum Classic", "25000"),
)
_KOREAN_LETTERS = {
    "A": "에이", "B": "비", "C": "씨", "D": "디", "E": "이", "F": "에프", "G": "지",
    "H": "에이치", "I": "아이", "J": "제이", "K": "케이", "L": "엘", "M": "엠", "N": "엔",
    "O": "오", "P": "피", "Q": "큐", "R": "알", "S": "에스", "T": "티", "U": "유",
    "V": "브이", "W": "더블유", "X": "엑스", "Y": "와이", "Z": "지", "0": "공", "1": "일",
    "2": "이", "3": "삼", "4": "사", "5": "오", "6": "육", "7": "칠", "8": "팔", "9": "구",
}  # fmt: skip
_KRW_COUNT, _BTC_COUNT, _USDT_COUNT = 170, 90, 40


def _generated_bases(count: int, taken: set[str]) -> list[str]:
    rng = random.Random(20240101)  # fixed: the market list does not depend on --seed
    consonants, vowels = "BCDFGHJKLMNPRSTVXZ", "AEIOU"
    out: list[str] = []
    while len(out) < count:
        length = rng.choice((3, 3, 4, 4, 5))
        base = "".join(rng.choice(consonants if i % 2 == 0 else vowels) for i in range(length))
        if rng.random() < 0.08:
            base += str(rng.randint(2, 9))
        if base not in taken:
            taken.add(base)
            out.append(base)
    return out


def _snap_decimal(quote: str, price: Decimal) -> Decimal:
    atoms = max(1, int(price * PRICE_SCALE))
    tick = tick_size(quote, atoms)
    atoms = max(tick, atoms - atoms % tick)
    return Decimal(atoms) / PRICE_SCALE


def default_markets() -> list[MarketInfo]:
    """The fixed list of 300 markets: real names for the well-known ones, then generated."""
    rng = random.Random(7)
    named = {base: (ko, en, Decimal(p)) for base, ko, en, p in _NAMED}
    generated = _generated_bases(_KRW_COUNT - len(named), set(named))
    krw_price: dict[str, Decimal] = {base: p for base, (_ko, _en, p) in named.items()}
    names: dict[str, tuple[str, str]] = {b: (ko, en) for b, (ko, en, _p) in named.items()}
    for base in generated:
        krw_price[base] = Decimal(str(round(10 ** rng.uniform(-3.0, 6.3), 8)))
        ko = "".join(_KOREAN_LETTERS[c] for c in base)
        names[base] = (ko, base.capitalize() + " Token")
    krw_bases = [b for b in krw_price if b != "USDT"] + ["USDT"]
    btc_price = krw_price["BTC"]
    usdt_price = krw_price["USDT"]
    cross_bases = [b for b in krw_bases if b not in ("BTC", "USDT")]

    def info(quote: str, base: str, price: Decimal) -> MarketInfo:
        warn = rng.random() < 0.03
        cautions = tuple(
            c
            for c in (
                "PRICE_FLUCTUATIONS",
                "TRADING_VOLUME_SOARING",
                "DEPOSIT_AMOUNT_SOARING",
                "GLOBAL_PRICE_DIFFERENCES",
                "CONCENTRATION_OF_SMALL_ACCOUNTS",
            )
            if rng.random() < 0.02
        )
        ko, en = names[base]
        return MarketInfo(f"{quote}-{base}", ko, en, _snap_decimal(quote, price), warn, cautions)

    markets = [info("KRW", b, krw_price[b]) for b in krw_bases]
    for base in cross_bases[:_BTC_COUNT]:
        price = max(krw_price[base] / btc_price, Decimal("0.000001"))
        markets.append(info("BTC", base, price))
    markets.append(info("USDT", "BTC", btc_price / usdt_price))
    for base in cross_bases[: _USDT_COUNT - 1]:
        markets.append(info("USDT", base, max(krw_price[base] / usdt_price, Decimal("0.001"))))
    return markets


# ---------------------------------------------------------------------------------------
# State


@dataclasses.dataclass(slots=True)
class Trade:
    """One executed trade; prices and volumes in atoms."""

    ts: int
    price: int
    volume: int
    ask_bid: str  # "ASK": the taker sold into the bid; "BID": the taker bought the ask
    seq: int
    prev_close: int


@dataclasses.dataclass(slots=True)
class Candle:
    """OHLCV of one period; ``value`` is sum(price*volume) in atoms*atoms."""

    start: int  # ms, UTC-aligned period start
    open: int
    high: int
    low: int
    close: int
    volume: int
    value: int
    last_ts: int
    prev_close: int = 0  # day candles: the close before this period

    def copy(self) -> Candle:
        return dataclasses.replace(self)


@dataclasses.dataclass(slots=True)
class MarketEvent:
    """What changed in one market: a message type ("trade", "ticker", "orderbook",
    "candle.1m"...) and its DEFAULT fields (orderbook events carry the raw book instead)."""

    type: str
    code: str
    ts: int
    fields: dict[str, object] | None = None
    asks: tuple[tuple[int, int], ...] = ()
    bids: tuple[tuple[int, int], ...] = ()
    cache: dict[object, bytes] = dataclasses.field(default_factory=dict)


class MarketState:
    """One market's book, trades, day statistics and candles."""

    def __init__(
        self,
        info: MarketInfo,
        *,
        seed: int,
        now: float,
        exchange: Exchange,
        backfill_trades: int,
    ) -> None:
        self.info = info
        self.code = info.code
        self.quote = info.quote
        self.exchange = exchange
        self.rng = random.Random(f"{seed}:{info.code}")
        rng = self.rng
        self.anchor = max(1, int(info.price * PRICE_SCALE))
        self.level_notional = _LEVEL_NOTIONAL.get(self.quote, 1.0)
        self.next_event_at = math.inf
        self.dirty: set[int] = set()
        self.candles: dict[int, deque[Candle]] = {
            p: deque(maxlen=CANDLE_HISTORY + 1) for p in _PERIODS
        }
        self.trades: deque[Trade] = deque(maxlen=1000)

        now_ms = int(now * 1000)
        bid = self.snap(self.anchor)
        self.bids: list[list[int]] = []
        self.asks: list[list[int]] = []
        price = bid
        for _ in range(DEPTH):
            self.bids.append([price, self.new_size(price)])
            price = price - self.tick_below(price)
            if price <= 0:
                break
        price = bid + self.tick_at(bid)
        for _ in range(DEPTH):
            self.asks.append([price, self.new_size(price)])
            price = price + self.tick_at(price)

        # Day statistics: "today" starts with the first simulated trade of the UTC day.
        self.prev_close = self.snap(int(self.anchor * rng.uniform(0.95, 1.05)))
        self.day_start = 0
        self.opening = self.high = self.low = self.prev_close
        self.acc_volume = self.acc_value = self.acc_ask = self.acc_bid = 0
        self.base_24h_volume = int(self.level_notional * 200 / _num(self.anchor) * SIZE_SCALE)
        self.base_24h_value = self.base_24h_volume * self.anchor
        self.total_volume = self.total_value = 0
        self.high_52w = self.snap(int(self.anchor * rng.uniform(1.2, 2.5)))
        self.low_52w = self.snap(int(self.anchor * rng.uniform(0.3, 0.8)))
        self.high_52w_date = fmt_date(now_ms - rng.randint(5, 360) * DAY * 1000)
        self.low_52w_date = fmt_date(now_ms - rng.randint(5, 360) * DAY * 1000)
        self.last_trade: Trade | None = None
        self.book_ts = now_ms

        # A short history so snapshots, REST trades and candles have something to show.
        if backfill_trades > 0:
            start = now - 300.0
            times = sorted(rng.uniform(start, now - 0.001) for _ in range(2 * backfill_trades))
            for t in times:
                self.evolve(int(t * 1000), 0.5)
        self.dirty.clear()
        self.book_ts = now_ms

    # -- grid ---------------------------------------------------------------------------

    def tick_at(self, price: int) -> int:
        return tick_size(self.quote, price)

    def tick_below(self, price: int) -> int:
        """Tick of the next lower price (the band below when ``price`` is a band edge)."""
        return tick_size(self.quote, price - 1)

    def snap(self, price: int) -> int:
        price = max(price, 1)
        tick = self.tick_at(price)
        return max(tick, price - price % tick)

    def new_size(self, price: int) -> int:
        notional = self.level_notional * self.rng.lognormvariate(0.0, 0.8)
        return max(1, int(notional / _num(price) * SIZE_SCALE))

    @property
    def best_bid(self) -> int:
        return self.bids[0][0]

    @property
    def best_ask(self) -> int:
        return self.asks[0][0]

    def supported_levels(self) -> list[int]:
        """Orderbook grouping units (atoms) this market accepts: 0 and powers of ten from
        10x to 1000x... of the tick; BTC and USDT markets only support 0."""
        if self.quote != "KRW":
            return [0]
        tick = self.tick_at(self.best_bid)
        out = [0]
        unit = 1
        while unit <= tick * 1000:
            if unit > tick:
                out.append(unit)
            unit *= 10
        return out

    # -- dynamics -----------------------------------------------------------------------

    def _up_probability(self) -> float:
        mid = (self.best_bid + self.best_ask) / 2
        drift = math.log(mid / self.anchor)
        return min(0.8, max(0.2, 0.5 - 3.0 * drift))

    def evolve(self, ts: int, trade_ratio: float) -> Trade | None:
        """One market event at ``ts`` (ms): a trade (returned) or a maker quote change."""
        if self.rng.random() < trade_ratio:
            return self.trade(ts)
        self.quote_change()
        self.book_ts = ts
        return None

    def step(self, t: float, trade_ratio: float) -> list[MarketEvent]:
        """Advance one market event at time ``t`` (seconds) and return its messages."""
        ts = int(t * 1000)
        trade = self.evolve(ts, trade_ratio)
        if trade is not None:
            return [self.trade_event(trade), self.ticker_event(ts), self.book_event(ts)]
        return [self.book_event(ts)]

    def _refill(self, side: list[list[int]], is_ask: bool) -> None:
        last = side[-1][0]
        price = last + self.tick_at(last) if is_ask else last - self.tick_below(last)
        if price > 0:
            side.append([price, self.new_size(price)])

    def trade(self, ts: int) -> Trade:
        """A taker order consuming part or all of the best level on one side."""
        rng = self.rng
        buy = rng.random() < self._up_probability()
        side = self.asks if buy else self.bids
        level = side[0]
        if rng.random() < 0.3:
            volume = level[1]
        else:
            volume = max(1, min(level[1], int(level[1] * rng.uniform(0.02, 0.9))))
        price = level[0]
        level[1] -= volume
        if level[1] <= 0:
            side.pop(0)
            self._refill(side, buy)
            if not side:  # pragma: no cover - guarded by _refill on a 30-level book
                side.append([price, self.new_size(price)])
        trade = Trade(
            ts=ts,
            price=price,
            volume=volume,
            ask_bid="BID" if buy else "ASK",
            seq=self.exchange.next_seq(ts),
            prev_close=self.prev_close,
        )
        self._record(trade)
        self.book_ts = ts
        return trade

    def quote_change(self) -> None:
        """A maker event: resize a level, improve the best price or cancel the best level."""
        rng = self.rng
        u = rng.random()
        up = rng.random() < self._up_probability()
        spread_ticks = (self.best_ask - self.best_bid) // self.tick_at(self.best_bid)
        if u < 0.45:
            side = self.asks if rng.random() < 0.5 else self.bids
            level = side[rng.randrange(min(10, len(side)))]
            level[1] = max(1, int(level[1] * rng.uniform(0.5, 1.6)))
        elif spread_ticks > 1 and (u < 0.8 or spread_ticks >= 3):
            if up:
                price = self.best_bid + self.tick_at(self.best_bid)
                self.bids.insert(0, [price, self.new_size(price)])
                del self.bids[DEPTH:]
            else:
                price = self.best_ask - self.tick_below(self.best_ask)
                self.asks.insert(0, [price, self.new_size(price)])
                del self.asks[DEPTH:]
        else:
            side, is_ask = (self.asks, True) if up else (self.bids, False)
            if len(side) > 1:
                side.pop(0)
                self._refill(side, is_ask)

    def _record(self, trade: Trade) -> None:
        ts, price, volume = trade.ts, trade.price, trade.volume
        if ts // 86_400_000 != self.day_start // 86_400_000 or self.last_trade is None:
            if self.last_trade is not None:
                self.prev_close = self.last_trade.price
                trade.prev_close = self.prev_close
            self.day_start = ts - ts % 86_400_000
            self.opening = self.high = self.low = price
            self.acc_volume = self.acc_value = self.acc_ask = self.acc_bid = 0
        self.high = max(self.high, price)
        self.low = min(self.low, price)
        value = price * volume
        self.acc_volume += volume
        self.acc_value += value
        self.total_volume += volume
        self.total_value += value
        if trade.ask_bid == "ASK":
            self.acc_ask += volume
        else:
            self.acc_bid += volume
        if price > self.high_52w:
            self.high_52w, self.high_52w_date = price, fmt_date(ts)
        if price < self.low_52w:
            self.low_52w, self.low_52w_date = price, fmt_date(ts)
        self.last_trade = trade
        self.trades.append(trade)
        for period in _PERIODS:
            self._candle(period, trade, value)
            self.dirty.add(period)

    def _candle(self, period: int, trade: Trade, value: int) -> None:
        history = self.candles[period]
        start = trade.ts - trade.ts % (period * 1000)
        current = history[-1] if history else None
        if current is not None and current.start == start:
            current.high = max(current.high, trade.price)
            current.low = min(current.low, trade.price)
            current.close = trade.price
            current.volume += trade.volume
            current.value += value
            current.last_ts = trade.ts
            return
        prev_close = current.close if current is not None else trade.prev_close
        history.append(
            Candle(
                start,
                trade.price,
                trade.price,
                trade.price,
                trade.price,
                trade.volume,
                value,
                trade.ts,
                prev_close,
            )
        )

    # -- messages (DEFAULT format, without stream_type) ----------------------------------

    def ticker_fields(self, ts: int) -> dict[str, object]:
        last = self.last_trade
        price = last.price if last else self.prev_close
        trade_ts = last.ts if last else ts
        diff = price - self.prev_close
        change = "RISE" if diff > 0 else "FALL" if diff < 0 else "EVEN"
        rate = round(abs(diff) / self.prev_close, 10) if self.prev_close else 0.0
        return {
            "type": "ticker",
            "code": self.code,
            "opening_price": _num(self.opening),
            "high_price": _num(self.high),
            "low_price": _num(self.low),
            "trade_price": _num(price),
            "prev_closing_price": _num(self.prev_close),
            "acc_trade_price": self.acc_value / VALUE_SCALE,
            "change": change,
            "change_price": _num(abs(diff)),
            "signed_change_price": _num(diff),
            "change_rate": rate,
            "signed_change_rate": rate if diff >= 0 else -rate,
            "ask_bid": last.ask_bid if last else "BID",
            "trade_volume": _size(last.volume) if last else 0.0,
            "acc_trade_volume": _size(self.acc_volume),
            "trade_date": fmt_date(trade_ts, ""),
            "trade_time": fmt_time(trade_ts, ""),
            "trade_timestamp": trade_ts,
            "acc_ask_volume": _size(self.acc_ask),
            "acc_bid_volume": _size(self.acc_bid),
            "highest_52_week_price": _num(self.high_52w),
            "highest_52_week_date": self.high_52w_date,
            "lowest_52_week_price": _num(self.low_52w),
            "lowest_52_week_date": self.low_52w_date,
            "market_state": "ACTIVE",
            "is_trading_suspended": False,
            "delisting_date": None,
            "market_warning": "CAUTION" if self.info.warning else "NONE",
            "timestamp": ts,
            "acc_trade_price_24h": (self.base_24h_value + self.total_value) / VALUE_SCALE,
            "acc_trade_volume_24h": _size(self.base_24h_volume + self.total_volume),
        }

    def trade_fields(self, trade: Trade, ts: int) -> dict[str, object]:
        diff = trade.price - trade.prev_close
        return {
            "type": "trade",
            "code": self.code,
            "timestamp": ts,
            "trade_date": fmt_date(trade.ts),
            "trade_time": fmt_time(trade.ts),
            "trade_timestamp": trade.ts,
            "trade_price": _num(trade.price),
            "trade_volume": _size(trade.volume),
            "ask_bid": trade.ask_bid,
            "prev_closing_price": _num(trade.prev_close),
            "change": "RISE" if diff > 0 else "FALL" if diff < 0 else "EVEN",
            "change_price": _num(abs(diff)),
            "sequential_id": trade.seq,
            "best_ask_price": _num(self.asks[0][0]),
            "best_ask_size": _size(self.asks[0][1]),
            "best_bid_price": _num(self.bids[0][0]),
            "best_bid_size": _size(self.bids[0][1]),
        }

    def candle_fields(self, unit: str, candle: Candle, ts: int) -> dict[str, object]:
        return {
            "type": f"candle.{unit}",
            "code": self.code,
            "candle_date_time_utc": fmt_datetime(candle.start),
            "candle_date_time_kst": fmt_datetime(candle.start, KST_OFFSET_MS),
            "opening_price": _num(candle.open),
            "high_price": _num(candle.high),
            "low_price": _num(candle.low),
            "trade_price": _num(candle.close),
            "candle_acc_trade_volume": _size(candle.volume),
            "candle_acc_trade_price": candle.value / VALUE_SCALE,
            "timestamp": ts,
        }

    def book_snapshot(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        return (
            tuple((p, s) for p, s in self.asks),
            tuple((p, s) for p, s in self.bids),
        )

    def book_floats(self) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """The current book as (price, size) floats, best first (for the account)."""
        return (
            [(_num(p), _size(s)) for p, s in self.asks],
            [(_num(p), _size(s)) for p, s in self.bids],
        )

    def latest_candle(self, period: int) -> Candle | None:
        history = self.candles[period]
        return history[-1] if history else None

    # -- events ---------------------------------------------------------------------------

    def trade_event(self, trade: Trade) -> MarketEvent:
        return MarketEvent("trade", self.code, trade.ts, self.trade_fields(trade, trade.ts))

    def ticker_event(self, ts: int) -> MarketEvent:
        return MarketEvent("ticker", self.code, ts, self.ticker_fields(ts))

    def book_event(self, ts: int) -> MarketEvent:
        asks, bids = self.book_snapshot()
        return MarketEvent("orderbook", self.code, ts, None, asks, bids)

    def candle_events(self, ts: int) -> list[MarketEvent]:
        out: list[MarketEvent] = []
        for unit, period in CANDLE_UNITS.items():
            if period in self.dirty:
                candle = self.candles[period][-1]
                out.append(
                    MarketEvent(
                        f"candle.{unit}", self.code, ts, self.candle_fields(unit, candle, ts)
                    )
                )
        self.dirty.clear()
        return out


def orderbook_fields(
    code: str,
    quote: str,
    asks: Sequence[tuple[int, int]],
    bids: Sequence[tuple[int, int]],
    ts: int,
    *,
    count: int = DEPTH,
    level: int = 0,
    level_value: float | int = 0,
) -> dict[str, object]:
    """An orderbook message: top ``count`` units, grouped by ``level`` atoms on KRW markets.

    Totals are the sums of the units actually sent (docs/PROTOCOL.md section 11.1). Grouping
    rounds asks up and bids down to the level, so grouped prices stay on the right side.
    """
    if quote == "KRW" and level > 0:
        asks = _group(asks, level, up=True)
        bids = _group(bids, level, up=False)
    else:
        level_value = 0
    n = min(count, len(asks), len(bids))
    units = [
        {
            "ask_price": _num(asks[i][0]),
            "bid_price": _num(bids[i][0]),
            "ask_size": _size(asks[i][1]),
            "bid_size": _size(bids[i][1]),
        }
        for i in range(n)
    ]
    return {
        "type": "orderbook",
        "code": code,
        "timestamp": ts,
        "total_ask_size": _size(sum(a[1] for a in asks[:n])),
        "total_bid_size": _size(sum(b[1] for b in bids[:n])),
        "orderbook_units": units,
        "level": level_value,
    }


def _group(levels: Sequence[tuple[int, int]], unit: int, *, up: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for price, size in levels:
        bucket = -(-price // unit) * unit if up else (price // unit) * unit
        if out and out[-1][0] == bucket:
            out[-1] = (bucket, out[-1][1] + size)
        else:
            out.append((bucket, size))
    return out


# ---------------------------------------------------------------------------------------
# Exchange


class Exchange:
    """All markets; schedules events for the active ones (pure: every call takes ``now``)."""

    def __init__(
        self,
        *,
        seed: int = 1,
        rate: float = 2.0,
        trade_ratio: float = 0.5,
        backfill_trades: int = 60,
        rest_activation_seconds: float = 60.0,
        markets: Iterable[MarketInfo] | None = None,
    ) -> None:
        self.seed = seed
        self.rate = rate
        self.trade_ratio = trade_ratio
        self.backfill_trades = backfill_trades
        self.rest_activation_seconds = rest_activation_seconds
        self.infos: dict[str, MarketInfo] = {
            m.code: m for m in (markets if markets is not None else default_markets())
        }
        self._states: dict[str, MarketState] = {}
        self._watchers: dict[str, int] = {}
        self._leases: dict[str, float] = {}
        self._pinned: set[str] = set()
        self._active: dict[str, MarketState] = {}
        self._last_seq = 0
        self._last_flush = 0

    # -- lookup ---------------------------------------------------------------------------

    def known(self, code: str) -> bool:
        return code in self.infos

    def state(self, code: str, now: float) -> MarketState:
        """The market's state, materialized on first use. KeyError for unknown codes."""
        st = self._states.get(code)
        if st is None:
            st = MarketState(
                self.infos[code],
                seed=self.seed,
                now=now,
                exchange=self,
                backfill_trades=self.backfill_trades,
            )
            self._states[code] = st
        return st

    def materialized(self) -> list[str]:
        return list(self._states)

    def active_codes(self) -> list[str]:
        return list(self._active)

    def next_seq(self, ts_ms: int) -> int:
        """A unique, increasing sequential_id shaped like Upbit's (ts_ms * 10000 + n)."""
        self._last_seq = max(self._last_seq + 1, ts_ms * 10_000)
        return self._last_seq

    def reserve_seq(self, n: int, ts_ms: int) -> int:
        """Reserve ``n`` consecutive sequential_ids; returns the first (firehose)."""
        first = max(self._last_seq + 1, ts_ms * 10_000)
        self._last_seq = first + n - 1
        return first

    # -- activity -------------------------------------------------------------------------

    def watch(self, code: str, now: float) -> None:
        """A realtime subscriber appeared for ``code``."""
        self._watchers[code] = self._watchers.get(code, 0) + 1
        self._update(code, now)

    def unwatch(self, code: str, now: float) -> None:
        n = self._watchers.get(code, 0) - 1
        if n > 0:
            self._watchers[code] = n
        else:
            self._watchers.pop(code, None)
        self._update(code, now)

    def touch(self, code: str, now: float) -> MarketState:
        """REST used ``code``: keep it active for rest_activation_seconds."""
        st = self.state(code, now)
        if self.rest_activation_seconds > 0:
            self._leases[code] = now + self.rest_activation_seconds
            self._update(code, now)
        return st

    def pin(self, code: str, now: float) -> MarketState:
        """Keep ``code`` active until reset (markets with orders must keep moving)."""
        st = self.state(code, now)
        self._pinned.add(code)
        self._update(code, now)
        return st

    def _wanted(self, code: str, now: float) -> bool:
        return (
            code in self._pinned
            or self._watchers.get(code, 0) > 0
            or self._leases.get(code, -math.inf) > now
        )

    def _update(self, code: str, now: float) -> None:
        if self._wanted(code, now):
            if code not in self._active:
                st = self.state(code, now)
                st.next_event_at = self._next_after(st, now)
                self._active[code] = st
        else:
            st_or_none = self._active.pop(code, None)
            if st_or_none is not None:
                st_or_none.next_event_at = math.inf
            self._leases.pop(code, None)

    def _next_after(self, st: MarketState, t: float) -> float:
        if self.rate <= 0:
            return math.inf
        return t + st.rng.expovariate(self.rate)

    def set_rate(self, rate: float, now: float) -> None:
        self.rate = max(0.0, rate)
        for st in self._active.values():
            st.next_event_at = self._next_after(st, now)

    # -- time -----------------------------------------------------------------------------

    def next_due(self) -> float:
        """When the next event is due (seconds); candle flushes happen every second."""
        due = min((st.next_event_at for st in self._active.values()), default=math.inf)
        return min(due, self._last_flush + 1.0) if self._active else due

    def advance(self, now: float, max_per_market: int = 50) -> list[MarketEvent]:
        """Every event due up to ``now``, per market in time order, then candle pushes."""
        events: list[MarketEvent] = []
        expired = [c for c, until in self._leases.items() if until <= now]
        for code in expired:
            self._update(code, now)
        for st in self._active.values():
            n = 0
            while st.next_event_at <= now:
                events.extend(st.step(st.next_event_at, self.trade_ratio))
                n += 1
                if n >= max_per_market:  # far behind (suspended process): skip ahead
                    st.next_event_at = self._next_after(st, now)
                    break
                st.next_event_at = self._next_after(st, st.next_event_at)
        second = int(now)
        if second > self._last_flush:
            self._last_flush = second
            ts = int(now * 1000)
            for st in self._active.values():
                if st.dirty:
                    events.extend(st.candle_events(ts))
        return events

    def reset(self, now: float) -> None:
        """Forget REST leases and pins; markets with live subscribers keep ticking."""
        self._leases.clear()
        self._pinned.clear()
        for code in list(self._active):
            self._update(code, now)
