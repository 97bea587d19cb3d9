"""Market data logic (simulator/market.py) without sockets: the invariants every
consumer relies on, checked over many simulated steps."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from decimal import Decimal

from simulator.market import (
    CANDLE_UNITS,
    DAY,
    PRICE_SCALE,
    SIZE_SCALE,
    VALUE_SCALE,
    Exchange,
    MarketEvent,
    Trade,
    default_markets,
    fmt_datetime,
    orderbook_fields,
    tick_size,
)

T0 = 1_790_000_000.0  # a fixed "now" so runs are reproducible
WATCHED = ["KRW-BTC", "KRW-XRP", "KRW-SHIB", "KRW-ETHW", "BTC-ETH", "USDT-BTC", "BTC-DOGE"]


def dec(x: object) -> Decimal:
    return Decimal(str(x))


def run(exchange: Exchange, seconds: float, step: float = 0.05) -> list[MarketEvent]:
    events: list[MarketEvent] = []
    t = T0
    while t < T0 + seconds:
        t += step
        events.extend(exchange.advance(t))
    return events


def test_market_list_has_300_wellformed_markets_with_names() -> None:
    markets = default_markets()
    codes = [m.code for m in markets]
    assert len(codes) == len(set(codes)) == 300
    assert all(re.fullmatch(r"[A-Z0-9]+-[A-Z0-9]+", c) for c in codes)
    assert {m.quote for m in markets} == {"KRW", "BTC", "USDT"}
    for code in ("KRW-BTC", "KRW-ETH", "KRW-ETHW", "KRW-XRP", "BTC-ETH", "USDT-BTC"):
        assert code in codes
    assert all(m.korean_name and m.english_name for m in markets)
    by_code = {m.code: m for m in markets}
    assert by_code["KRW-BTC"].korean_name == "비트코인"


def test_tick_sizes_follow_upbit_price_bands() -> None:
    def tick(quote: str, price: str) -> Decimal:
        return Decimal(tick_size(quote, int(Decimal(price) * PRICE_SCALE))) / PRICE_SCALE

    assert tick("KRW", "140000000") == 1000
    assert tick("KRW", "700000") == 500
    assert tick("KRW", "250000") == 100
    assert tick("KRW", "60000") == 50
    assert tick("KRW", "25000") == 10
    assert tick("KRW", "6000") == 5
    assert tick("KRW", "3000") == 1
    assert tick("KRW", "500") == 1
    assert tick("BTC", "0.035") == Decimal("0.00000001")
    assert tick("USDT", "95000") == Decimal("0.01")
    assert tick("USDT", "2.2") == Decimal("0.001")


def test_markets_cost_nothing_until_used() -> None:
    exchange = Exchange(seed=3)
    assert exchange.advance(T0) == []
    assert exchange.materialized() == []
    exchange.watch("KRW-BTC", T0)
    assert exchange.materialized() == ["KRW-BTC"]
    assert exchange.active_codes() == ["KRW-BTC"]
    exchange.unwatch("KRW-BTC", T0)
    assert exchange.active_codes() == []


def test_same_seed_same_market() -> None:
    def first_trades(seed: int) -> list[object]:
        ex = Exchange(seed=seed, rate=10)
        ex.watch("KRW-BTC", T0)
        return [e.fields for e in run(ex, 5) if e.type == "trade"]

    assert first_trades(5) == first_trades(5)
    assert first_trades(5) != first_trades(6)


def test_book_trade_ticker_and_sequence_invariants_hold_over_many_steps() -> None:
    exchange = Exchange(seed=11, rate=25.0, trade_ratio=0.5)
    books: dict[str, tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]] = {}
    for code in WATCHED:
        exchange.watch(code, T0)
        books[code] = exchange.state(code, T0).book_snapshot()
    last_seq = 0
    last_ticker: dict[str, dict[str, object]] = {}
    last_trade_price: dict[str, float] = {}
    pending_volume: dict[str, Decimal] = defaultdict(Decimal)
    counts: dict[str, int] = defaultdict(int)

    for event in run(exchange, 120.0):
        code = event.code
        counts[event.type] += 1
        state = exchange.state(code, T0)
        if event.type == "orderbook":
            asks, bids = event.asks, event.bids
            assert len(asks) == len(bids) == 30
            assert bids[0][0] < asks[0][0], "bid < ask"
            assert all(a[0] < b[0] for a, b in itertools.pairwise(asks)), "asks ascend"
            assert all(a[0] > b[0] for a, b in itertools.pairwise(bids)), "bids descend"
            for price, size in (*asks, *bids):
                assert size > 0
                assert price % state.tick_at(price) == 0, f"{code} {price} off the tick grid"
            books[code] = (asks, bids)
        elif event.type == "trade":
            f = event.fields
            assert f is not None
            seq = f["sequential_id"]
            assert isinstance(seq, int)
            assert seq > last_seq, "sequential_id unique and increasing"
            last_seq = seq
            asks, bids = books[code]
            price = int(dec(f["trade_price"]) * PRICE_SCALE)
            if f["ask_bid"] == "BID":
                assert price == asks[0][0], "a buy trades at the best ask"
            else:
                assert price == bids[0][0], "a sell trades at the best bid"
            assert dec(f["trade_volume"]) > 0
            assert f["best_ask_price"] is not None
            assert f["best_bid_price"] is not None
            assert f["trade_date"] == fmt_datetime(f["trade_timestamp"])[:10]  # type: ignore[arg-type]
            last_trade_price[code] = float(f["trade_price"])  # type: ignore[arg-type]
            pending_volume[code] += dec(f["trade_volume"])
        elif event.type == "ticker":
            f = event.fields
            assert f is not None
            assert f["trade_price"] == last_trade_price[code], "ticker shows the last trade"
            prev = last_ticker.get(code)
            if prev is not None:
                grew = dec(f["acc_trade_volume"]) - dec(prev["acc_trade_volume"])
                # doubles carry ~16 significant digits, as on Upbit
                tolerance = dec(f["acc_trade_volume"]) * Decimal("1e-15")
                assert abs(grew - pending_volume[code]) <= tolerance, "acc volume grows by trades"
            pending_volume[code] = Decimal(0)
            diff = dec(f["trade_price"]) - dec(f["prev_closing_price"])
            assert dec(f["signed_change_price"]) == diff
            assert dec(f["change_price"]) == abs(diff)
            assert f["change"] == ("RISE" if diff > 0 else "FALL" if diff < 0 else "EVEN")
            rate = abs(diff) / dec(f["prev_closing_price"])
            assert abs(dec(f["change_rate"]) - rate) < Decimal("1e-9")
            assert dec(f["low_price"]) <= dec(f["trade_price"]) <= dec(f["high_price"])
            assert f["trade_date"] == fmt_datetime(f["trade_timestamp"])[:10].replace("-", "")  # type: ignore[arg-type]
            last_ticker[code] = f
    assert counts["trade"] > 500
    assert counts["orderbook"] > 1000
    assert counts["candle.1m"] > 0


def _aggregate(trades: list[Trade], period: int) -> dict[int, tuple[int, int, int, int, int, int]]:
    out: dict[int, list[int]] = {}
    for t in trades:
        start = t.ts - t.ts % (period * 1000)
        c = out.get(start)
        if c is None:
            out[start] = [t.price, t.price, t.price, t.price, t.volume, t.price * t.volume]
        else:
            c[1] = max(c[1], t.price)
            c[2] = min(c[2], t.price)
            c[3] = t.price
            c[4] += t.volume
            c[5] += t.price * t.volume
    return {k: (v[0], v[1], v[2], v[3], v[4], v[5]) for k, v in out.items()}


def test_candles_aggregate_the_trades_for_every_unit() -> None:
    exchange = Exchange(seed=2, rate=8.0, backfill_trades=40)
    exchange.watch("KRW-XRP", T0)
    events = run(exchange, 200.0)
    state = exchange.state("KRW-XRP", T0)
    trades = list(state.trades)
    assert len(trades) < state.trades.maxlen  # type: ignore[operator]
    for unit, period in [*CANDLE_UNITS.items(), ("day", DAY)]:
        expected = _aggregate(trades, period)
        candles = list(state.candles[period])
        for c in candles:
            assert c.start % (period * 1000) == 0
            assert (c.open, c.high, c.low, c.close, c.volume, c.value) == expected[c.start], unit
        assert [c.start for c in candles] == sorted(expected)[-len(candles) :]
    # The pushed candle messages carry the same numbers and the right UTC/KST times.
    pushed = [e for e in events if e.type == "candle.5m"]
    assert pushed
    f = pushed[-1].fields
    assert f is not None
    last = state.candles[300][-1]
    assert f["candle_date_time_utc"] == fmt_datetime(last.start)
    assert f["candle_date_time_kst"] == fmt_datetime(last.start + 9 * 3_600_000)
    assert dec(f["candle_acc_trade_volume"]) == Decimal(last.volume) / SIZE_SCALE
    value = Decimal(last.value) / VALUE_SCALE
    assert abs(dec(f["candle_acc_trade_price"]) - value) <= value * Decimal("1e-15")
    assert dec(f["trade_price"]) == Decimal(last.close) / PRICE_SCALE


def test_orderbook_truncation_totals_and_grouping() -> None:
    exchange = Exchange(seed=4)
    st = exchange.state("KRW-BTC", T0)
    asks, bids = st.book_snapshot()
    five = orderbook_fields("KRW-BTC", "KRW", asks, bids, 1, count=5)
    units = five["orderbook_units"]
    assert isinstance(units, list)
    assert len(units) == 5
    assert dec(five["total_ask_size"]) == sum(dec(u["ask_size"]) for u in units)
    assert dec(five["total_bid_size"]) == sum(dec(u["bid_size"]) for u in units)

    level = 10_000 * PRICE_SCALE
    grouped = orderbook_fields(
        "KRW-BTC", "KRW", asks, bids, 1, count=30, level=level, level_value=10000
    )
    gunits = grouped["orderbook_units"]
    assert isinstance(gunits, list)
    assert 0 < len(gunits) <= 30
    assert grouped["level"] == 10000
    assert all(u["ask_price"] % 10000 == 0 and u["bid_price"] % 10000 == 0 for u in gunits)
    assert gunits[0]["bid_price"] < gunits[0]["ask_price"]
    raw_total = sum(s for _, s in asks[: len(asks)])
    assert sum(dec(u["ask_size"]) for u in gunits) <= Decimal(raw_total) / SIZE_SCALE

    btc = exchange.state("BTC-ETH", T0)
    a2, b2 = btc.book_snapshot()
    ignored = orderbook_fields("BTC-ETH", "BTC", a2, b2, 1, level=level, level_value=10000)
    assert ignored["level"] == 0
    assert exchange.state("KRW-BTC", T0).supported_levels()[:2] == [0, 10_000 * PRICE_SCALE]
    assert btc.supported_levels() == [0]


def test_rest_activation_lease_expires() -> None:
    exchange = Exchange(seed=1, rest_activation_seconds=5.0)
    exchange.touch("KRW-ETH", T0)
    assert exchange.active_codes() == ["KRW-ETH"]
    exchange.advance(T0 + 6)
    assert exchange.active_codes() == []
    exchange.pin("KRW-ETH", T0 + 7)
    exchange.advance(T0 + 100)
    assert exchange.active_codes() == ["KRW-ETH"]
