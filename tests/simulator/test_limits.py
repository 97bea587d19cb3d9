"""Rate limits and their 429 -> 418 escalation (simulator/limits.py), without sockets."""

from __future__ import annotations

import pytest

from simulator.config import DEFAULT_REST_LIMITS
from simulator.limits import (
    Escalation,
    KeyedThrottles,
    RestLimiter,
    SlidingWindow,
    Throttle,
    rest_group,
)

ESC = Escalation(teapot_after=3, block_base=2.0, block_growth=2.0, block_max=10.0, block_reset=60.0)


def test_sliding_window_allows_n_per_window_and_frees_slots_as_time_passes() -> None:
    w = SlidingWindow(5, 1.0)
    for i in range(5):
        assert w.allows(100.0 + i * 0.01)
        w.record(100.0 + i * 0.01)
    assert not w.allows(100.5)
    assert w.remaining(100.5) == 0
    assert w.allows(101.001)  # the first request left the window
    assert w.remaining(101.025) == 3


def test_over_limit_is_429_then_418_with_a_growing_block() -> None:
    t = Throttle([(5, 1.0)], ESC)
    statuses = [t.check(10.0 + i * 0.001).status for i in range(5)]
    assert statuses == [200] * 5
    assert [t.check(10.01).status for _ in range(3)] == [429, 429, 429]
    first = t.check(10.02)
    assert (first.status, first.block_seconds) == (418, 2.0)
    second = t.check(10.5)  # still blocked: retrying grows the block
    assert (second.status, second.block_seconds) == (418, 4.0)
    third = t.check(11.0)
    assert (third.status, third.block_seconds) == (418, 8.0)
    assert t.check(12.0).block_seconds == 10.0  # capped at block_max
    assert t.check(22.1).status == 200  # waited out the block


def test_occasional_429s_never_escalate() -> None:
    t = Throttle([(1, 1.0)], ESC)
    now = 0.0
    for _ in range(10):  # one violation every 5 s: at most 2 in any 10 s window
        assert t.check(now).status == 200
        assert t.check(now + 0.1).status == 429
        now += 5.0
    assert t.check(now).status == 200


def test_violating_every_second_escalates_even_between_accepted_requests() -> None:
    t = Throttle([(1, 1.0)], ESC)
    statuses = []
    now = 0.0
    for _ in range(4):
        statuses += [t.check(now).status, t.check(now + 0.5).status]
        now += 1.01
    assert statuses == [200, 429, 200, 429, 200, 429, 200, 418]


def test_per_connection_limits_are_5_per_second_and_100_per_minute() -> None:
    t = Throttle([(5, 1.0), (100, 60.0)], ESC)
    now = 0.0
    accepted = 0
    while accepted < 100:
        assert t.check(now).status == 200
        accepted += 1
        now += 0.25  # 4 per second: under the per-second limit
    assert now < 60.0
    assert t.check(now).status == 429  # the 101st within a minute
    assert t.check(60.01).status == 200  # the oldest ones expired


def test_keyed_throttles_separate_keys_and_prune_idle_ones() -> None:
    k = KeyedThrottles([(1, 1.0)], ESC, enabled=True)
    assert k.check("ip:a", 0.0).allowed
    assert k.check("ip:b", 0.0).allowed
    assert not k.check("ip:a", 0.1).allowed
    assert len(k) == 2
    k.prune(1000.0)
    assert len(k) == 0
    off = KeyedThrottles([(1, 1.0)], ESC, enabled=False)
    assert all(off.check("x", 0.0).allowed for _ in range(100))


@pytest.mark.parametrize(
    ("method", "path", "group"),
    [
        ("GET", "/v1/market/all", "market"),
        ("GET", "/v1/candles/minutes/1", "candle"),
        ("GET", "/v1/candles/days", "candle"),
        ("GET", "/v1/trades/ticks", "trade"),
        ("GET", "/v1/ticker", "ticker"),
        ("GET", "/v1/ticker/all", "ticker"),
        ("GET", "/v1/orderbook", "orderbook"),
        ("GET", "/v1/orderbook/instruments", "orderbook"),
        ("GET", "/v1/accounts", "default"),
        ("GET", "/v1/orders/open", "default"),
        ("GET", "/v1/order", "default"),
        ("DELETE", "/v1/order", "default"),
        ("POST", "/v1/orders", "order"),
        ("POST", "/v1/orders/cancel_and_new", "order"),
        ("POST", "/v1/orders/test", "order-test"),
        ("DELETE", "/v1/orders/open", "order-cancel-all"),
    ],
)
def test_rest_paths_map_to_upbit_groups(method: str, path: str, group: str) -> None:
    assert rest_group(method, path) == group


def test_rest_limiter_counts_per_group_and_key_and_formats_the_header() -> None:
    limiter = RestLimiter(DEFAULT_REST_LIMITS, ESC)
    decisions = [limiter.check("ticker", "ip:1", 5.0 + i * 0.001) for i in range(10)]
    assert [d.remaining for d in decisions] == list(range(9, -1, -1))
    assert limiter.check("ticker", "ip:1", 5.02).status == 429
    assert limiter.check("ticker", "ip:2", 5.02).allowed  # another IP has its own budget
    assert limiter.check("candle", "ip:1", 5.02).allowed  # another group too
    assert limiter.check("order-cancel-all", "key:k", 0.0).allowed
    assert limiter.check("order-cancel-all", "key:k", 1.5).status == 429  # 1 per 2 s
    assert RestLimiter.header("ticker", decisions[0]) == "group=ticker; min=1800; sec=9"


def test_the_order_group_takes_12_a_second_since_2026_08_21() -> None:
    limiter = RestLimiter(DEFAULT_REST_LIMITS, ESC)
    decisions = [limiter.check("order", "key:k", 7.0 + i * 0.01) for i in range(12)]
    assert all(d.allowed for d in decisions)
    assert RestLimiter.header("order", decisions[0]) == "group=order; min=1800; sec=11"
    assert RestLimiter.header("order", decisions[-1]) == "group=order; min=1800; sec=0"
    assert limiter.check("order", "key:k", 7.5).status == 429  # the 13th within a second
    assert limiter.check("default", "key:k", 7.5).allowed  # queries have their own budget
    assert limiter.check("order", "key:k", 8.001).allowed  # the first one left the window
