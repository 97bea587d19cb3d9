"""Dedupe: every trade published once across WS -> REST -> WS, unchanged polls dropped."""

from __future__ import annotations

import time

import pytest

from broker.dedupe import (
    TradeDeduper,
    orderbook_fingerprint,
    ticker_fingerprint,
)
from schemas.rest import RestTrade, rest_trade_to_trade
from schemas.upbit import Orderbook, OrderbookUnit, Ticker, Trade

BASE = 17_510_687_993_360_000


def trade(sid: int, code: str = "KRW-BTC", *, stream_type: str = "REALTIME") -> Trade:
    return Trade(
        code=code,
        trade_price=147_058_000.0,
        trade_volume=0.001,
        ask_bid="BID",
        prev_closing_price=146_852_000.0,
        change="RISE",
        change_price=206_000.0,
        trade_date="2025-06-27",
        trade_time="23:59:59",
        trade_timestamp=1_751_068_799_336,
        timestamp=1_751_068_799_400,
        sequential_id=sid,
        stream_type=stream_type,
    )


def rest_tick(sid: int, code: str = "KRW-BTC") -> RestTrade:
    return RestTrade(
        market=code,
        trade_date_utc="2025-06-27",
        trade_time_utc="23:59:59",
        timestamp=1_751_068_799_336,
        trade_price=147_058_000.0,
        trade_volume=0.001,
        prev_closing_price=146_852_000.0,
        change_price=206_000.0,
        ask_bid="BID",
        sequential_id=sid,
    )


def ticker(*, ts: int = 1, price: float = 100.0, volume: float = 5.0, now: int = 10) -> Ticker:
    return Ticker(
        code="KRW-BTC",
        opening_price=90.0,
        high_price=110.0,
        low_price=80.0,
        trade_price=price,
        prev_closing_price=95.0,
        change="RISE",
        change_price=5.0,
        signed_change_price=5.0,
        change_rate=0.05,
        signed_change_rate=0.05,
        trade_volume=0.1,
        acc_trade_volume=volume,
        acc_trade_volume_24h=volume,
        acc_trade_price=volume * price,
        acc_trade_price_24h=volume * price,
        trade_date="20250627",
        trade_time="235959",
        trade_timestamp=ts,
        timestamp=now,
    )


def book(*, ts: int = 1, ask_size: float = 1.0) -> Orderbook:
    return Orderbook(
        code="KRW-BTC",
        total_ask_size=ask_size,
        total_bid_size=2.0,
        orderbook_units=[
            OrderbookUnit(ask_price=101.0, bid_price=100.0, ask_size=ask_size, bid_size=2.0)
        ],
        timestamp=ts,
        level=0.0,
    )


# ------------------------------------------------------------------------- TradeDeduper


def test_each_trade_is_published_once_across_a_ws_rest_ws_switch() -> None:
    dedupe = TradeDeduper()
    published: list[int] = []

    def publish(trades: list[Trade]) -> None:
        published.extend(t.sequential_id for t in dedupe.fresh(trades))

    # WebSocket delivers five trades, then drops.
    publish([trade(BASE + i) for i in range(5)])
    # REST ticks come newest first and overlap the last three WS trades; ids are not in
    # arrival order (sequential_id is unique, not ordered), which must not matter.
    ticks = [BASE + 9, BASE + 7, BASE + 8, BASE + 6, BASE + 5, BASE + 4, BASE + 3, BASE + 2]
    publish(list(reversed([rest_trade_to_trade(rest_tick(sid)) for sid in ticks])))
    # A second poll repeats most of the first one.
    publish([rest_trade_to_trade(rest_tick(sid)) for sid in (BASE + 8, BASE + 9, BASE + 10)])
    # The WebSocket is back: its snapshot repeats the latest trade, then realtime resumes.
    publish([trade(BASE + 10, stream_type="SNAPSHOT"), trade(BASE + 11), trade(BASE + 12)])

    assert sorted(published) == [BASE + i for i in range(13)]
    assert len(published) == len(set(published))


def test_seen_reports_duplicates_and_records_new_ids() -> None:
    dedupe = TradeDeduper()
    assert dedupe.seen("KRW-BTC", 7) is False
    assert dedupe.seen("KRW-BTC", 7) is True
    assert dedupe.seen("KRW-BTC", 6) is False  # a smaller id is still new: no monotonicity


def test_the_same_id_on_another_market_is_a_different_trade() -> None:
    dedupe = TradeDeduper()
    assert not dedupe.seen("KRW-BTC", 1)
    assert not dedupe.seen("KRW-ETH", 1)


def test_ids_per_market_stay_bounded_under_100k_trades() -> None:
    dedupe = TradeDeduper(max_ids_per_code=2_000)
    for i in range(100_000):
        assert not dedupe.seen("KRW-BTC", BASE + i)
    assert dedupe.remembered("KRW-BTC") == 2_000
    assert dedupe.seen("KRW-BTC", BASE + 99_999)  # recent: still a duplicate
    assert not dedupe.seen("KRW-BTC", BASE)  # long gone: forgotten, not a leak


def test_markets_stay_bounded_and_the_least_recently_used_goes_first() -> None:
    dedupe = TradeDeduper(max_codes=3)
    for code in ("A", "B", "C"):
        dedupe.seen(code, 1)
    dedupe.seen("A", 2)  # A is now the most recently used
    dedupe.seen("D", 1)  # evicts B
    assert dedupe.code_count == 3
    assert dedupe.remembered("B") == 0
    assert dedupe.seen("A", 1)


def test_forget_drops_a_released_market() -> None:
    dedupe = TradeDeduper()
    dedupe.seen("KRW-BTC", 1)
    dedupe.forget("KRW-BTC")
    dedupe.forget("KRW-NONE")
    assert dedupe.code_count == 0
    assert not dedupe.seen("KRW-BTC", 1)


def test_seen_is_fast_enough_for_the_realtime_path() -> None:
    dedupe = TradeDeduper()
    start = time.perf_counter()
    for i in range(100_000):
        dedupe.seen("KRW-BTC", BASE + i)
    assert time.perf_counter() - start < 1.0  # ~0.3 µs each here; generous for slow CI


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_ids_per_code"):
        TradeDeduper(max_ids_per_code=0)


# ------------------------------------------------------------------------- fingerprints


def test_a_ticker_polled_twice_unchanged_has_the_same_fingerprint() -> None:
    # Same last trade, only the response time differs: not news.
    assert ticker_fingerprint(ticker(now=10)) == ticker_fingerprint(ticker(now=20))


def test_a_ticker_with_a_new_trade_price_or_volume_has_a_new_fingerprint() -> None:
    seen = {ticker_fingerprint(ticker())}
    for changed in (ticker(ts=2), ticker(ts=2, price=101.0), ticker(ts=2, price=101.0, volume=6.0)):
        assert ticker_fingerprint(changed) not in seen
        seen.add(ticker_fingerprint(changed))


def test_an_orderbook_fingerprint_changes_only_with_time_or_units() -> None:
    assert orderbook_fingerprint(book()) == orderbook_fingerprint(book())
    assert orderbook_fingerprint(book(ask_size=1.5)) != orderbook_fingerprint(book())
    assert orderbook_fingerprint(book(ts=2, ask_size=1.5)) != orderbook_fingerprint(
        book(ask_size=1.5)
    )
