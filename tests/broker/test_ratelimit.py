"""Rate limiters: sliding windows, REST groups, 429 backoff, 418 bans that survive restarts."""

from __future__ import annotations

import itertools
import json
import math
import random
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.ratelimit import (
    DEFAULT_BLOCK_SECONDS,
    MAX_BAN_SECONDS,
    WS_MESSAGE_WINDOWS,
    Backoff,
    BanStore,
    Priority,
    PriorityGate,
    RestJob,
    RestLimiter,
    TokenBucket,
    WindowLimiter,
    ban_seconds,
    jitter_guard,
    parse_block_seconds,
    parse_remaining_req,
    steady_time,
    with_margin,
)


def max_in_window(stamps: list[float], seconds: float) -> int:
    """Most events in any half-open span (t - seconds, t] ending at an event."""
    best = 0
    start = 0
    for end, t in enumerate(stamps):
        while stamps[start] <= t - seconds:
            start += 1
        best = max(best, end - start + 1)
    return best


# ------------------------------------------------------------------------- WindowLimiter


def test_ws_messages_never_exceed_5_per_second_or_100_per_minute_over_a_simulated_minute() -> None:
    limiter = WindowLimiter.ws_messages()
    sent = [now for ms in range(0, 120_000, 7) if limiter.try_acquire(now := ms / 1000)]
    assert max_in_window(sent, 1.0) <= 4 < 5
    assert max_in_window(sent, 60.0) <= 90 < 100
    # ...while still using the budget it allows.
    assert len([t for t in sent if t < 60.0]) == 90
    assert len(sent) == 180


def test_delay_says_exactly_when_the_next_event_fits() -> None:
    limiter = WindowLimiter([(2, 1.0)])
    assert limiter.try_acquire(10.0)
    assert limiter.try_acquire(10.25)
    assert not limiter.try_acquire(10.5)
    assert limiter.delay(10.5) == pytest.approx(0.5)
    assert limiter.try_acquire(11.0)
    assert limiter.delay(11.0) == pytest.approx(0.25)


def test_the_tightest_window_decides_the_delay() -> None:
    limiter = WindowLimiter([(3, 1.0), (4, 60.0)])
    for t in (0.0, 0.1, 0.2, 5.0):
        assert limiter.try_acquire(t)
    assert limiter.delay(5.1) == pytest.approx(54.9)


def test_a_refused_attempt_takes_no_slot() -> None:
    limiter = WindowLimiter([(1, 1.0)])
    assert limiter.try_acquire(0.0)
    for ms in range(1, 1000, 50):
        assert not limiter.try_acquire(ms / 1000)
    assert limiter.try_acquire(1.0)


def test_a_reserve_keeps_slots_free_for_others() -> None:
    limiter = WindowLimiter([(3, 1.0)])
    assert limiter.try_acquire(0.0, reserve=1)
    assert limiter.try_acquire(0.0, reserve=1)
    assert not limiter.try_acquire(0.0, reserve=1)
    assert limiter.try_acquire(0.0)


def test_record_counts_events_that_happened_anyway() -> None:
    limiter = WindowLimiter([(2, 1.0)])
    limiter.record(0.0)
    limiter.record(0.1)
    assert limiter.delay(0.2) == pytest.approx(0.8)


def test_a_block_stops_every_event_until_it_ends_and_never_shrinks() -> None:
    limiter = WindowLimiter.ws_connects()
    limiter.block_until(30.0)
    limiter.block_until(20.0)
    assert limiter.blocked_until(10.0) == 30.0
    assert limiter.delay(10.0) == pytest.approx(20.0)
    assert not limiter.try_acquire(29.9)
    assert limiter.try_acquire(30.0)
    assert limiter.blocked_until(30.0) == 0.0


def test_reset_forgets_events_and_blocks() -> None:
    limiter = WindowLimiter([(1, 60.0)])
    limiter.try_acquire(0.0)
    limiter.block_until(100.0)
    limiter.reset()
    assert limiter.try_acquire(1.0)


@pytest.mark.parametrize("windows", [[], [(0, 1.0)], [(1, 0.0)]])
def test_nonsense_windows_are_refused(windows: list[tuple[int, float]]) -> None:
    with pytest.raises(ValueError, match="window"):
        WindowLimiter(windows)


def test_margin_scales_the_count_or_stretches_the_period() -> None:
    assert with_margin((10, 1.0), 0.8) == (8, 1.0)
    assert with_margin((12, 1.0), 0.8) == (9, 1.0)
    assert with_margin((30, 1.0), 0.8) == (24, 1.0)
    count, seconds = with_margin((1, 2.0), 0.8)
    assert count == 1
    assert seconds == pytest.approx(2.5)
    with pytest.raises(ValueError, match="margin"):
        with_margin((10, 1.0), 0.0)


# ------------------------------------------------------------------------------- Backoff


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(first=1.0, cap=10.0, rng=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.attempts == 6


def test_the_first_retry_comes_within_a_second_by_default() -> None:
    backoff = Backoff(rng=lambda: 0.999)
    assert backoff.next_delay() < 1.0


def test_backoff_jitter_spans_zero_to_the_ceiling() -> None:
    draws = iter([0.0, 0.5])
    backoff = Backoff(first=2.0, cap=60.0, rng=lambda: next(draws))
    assert backoff.next_delay() == 0.0
    assert backoff.next_delay() == 2.0  # half of the second ceiling, 4


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(first=1.0, cap=30.0, rng=lambda: 1.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_backoff_survives_very_many_attempts() -> None:
    backoff = Backoff(first=1.0, cap=30.0, rng=lambda: 1.0)
    for _ in range(2000):
        backoff.next_delay()
    assert backoff.next_delay() == 30.0


# --------------------------------------------------------------------------- Remaining-Req


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("group=default; min=1800; sec=29", ("default", 29)),
        ("group=market; sec=9", ("market", 9)),
        ("group=order-test;min=1800;sec=0", ("order-test", 0)),
        ("  group = ticker ;  min = 573 ;  sec = 9  ", ("ticker", 9)),
        ("sec=3; group=candle", ("candle", 3)),
        ("Group=Origin; Sec=1", ("origin", 1)),
    ],
)
def test_remaining_req_variants_are_read(value: str, expected: tuple[str, int]) -> None:
    assert parse_remaining_req(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        "group=default; min=1800",
        "sec=5",
        "group=; sec=1",
        "group=default; sec=-1",
        "group=default; sec=x",
        "group=default; sec=\uff11",  # a non-ASCII digit
        "group=a b; sec=1",
    ],
)
def test_unreadable_remaining_req_gives_none(value: str | None) -> None:
    assert parse_remaining_req(value) is None


# ------------------------------------------------------------------------- 418 block time


@pytest.mark.parametrize(
    ("body", "seconds"),
    [
        ("You are blocked for 30 seconds", 30.0),
        ("block time: 30s", 30.0),
        ("Too many requests. Blocked 2 minutes.", 120.0),
        ("1분 30초 동안 요청이 차단됩니다.", 90.0),
        ("Retry-After: 45", 45.0),
        ("blocked for 0.5 hours", 1800.0),
        ("wait 500 ms", 0.5),
        ('{"error":{"name":418,"message":"Blocked. Retry after 30 seconds."}}', 30.0),
        ('{"error":{"name":"I\'m a teapot","message":"teapot","block_seconds":600}}', 600.0),
        ('{"error":{"message":"blocked 10s"},"retry_after":20}', 20.0),
        ("<html><body>418 I'm a teapot: blocked for 5 min</body></html>", 300.0),
    ],
)
def test_block_times_are_read_from_many_body_shapes(body: str, seconds: float) -> None:
    assert parse_block_seconds(body) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "body", ["", "Too many API requests.", "418 I'm a teapot", '{"error":{"name":418}}', "[1, 2]"]
)
def test_bodies_without_a_block_time_give_none(body: str) -> None:
    assert parse_block_seconds(body) is None


HUGE_DIGITS = "9" * 400
"""A number float() reads as inf."""


@pytest.mark.parametrize(
    "body",
    [
        "blocked for 2 hours",
        f"You are blocked for {HUGE_DIGITS} seconds",
        f"block time: {HUGE_DIGITS}",
        '{"error":{"name":"teapot","block_seconds":1e400}}',
        '{"error":{"name":"teapot","block_seconds":Infinity}}',
        '{"retry_after":1e12}',
    ],
)
def test_a_stated_block_beyond_the_cap_reads_as_the_cap(body: str) -> None:
    assert parse_block_seconds(body) == MAX_BAN_SECONDS == 3600.0


@pytest.mark.parametrize(
    "body", ['{"block":NaN}', '{"block_seconds":-30}', '{"wait":-1e400}', "[" * 100_000]
)
def test_non_finite_negative_or_unreadable_json_durations_are_no_block_time(body: str) -> None:
    seconds = parse_block_seconds(body)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)
    assert 1.0 <= ban_seconds(seconds) <= MAX_BAN_SECONDS


def test_a_deeply_nested_418_body_is_read_as_text() -> None:
    body = '{"m":' * 100_000 + '"blocked for 30 seconds"' + "}" * 100_000
    assert parse_block_seconds(body) == 30.0


def _parse_cost(body: str, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        parse_block_seconds(body)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize(
    "shape",
    [
        lambda n: "1" * n,
        lambda n: "1." * (n // 2),
        lambda n: "1 " * (n // 2),
        lambda n: "block " * (n // 6),
        lambda n: "9" * n + " seconds",
    ],
    ids=["digits", "dotted", "spaced", "keywords", "digits-then-unit"],
)
def test_reading_a_418_body_is_linear(shape: Callable[[int], str]) -> None:
    """A 20 KB run of digits took a minute to read: 10x the body now costs ~10x."""
    baseline = _parse_cost(shape(2_000), 5)
    ratio = math.inf
    for _ in range(3):
        ratio = min(ratio, _parse_cost(shape(20_000), 1) / baseline)
        if ratio < 25 or ratio > 100:
            break
    assert ratio < 25, f"10x the body cost {ratio:.0f}x"


@pytest.mark.parametrize(
    ("stated", "seconds"),
    [
        (None, DEFAULT_BLOCK_SECONDS),
        (math.nan, DEFAULT_BLOCK_SECONDS),
        (math.inf, MAX_BAN_SECONDS),
        (1e300, MAX_BAN_SECONDS),
        (-5.0, 1.0),
        (0.0, 1.0),
        (90.0, 90.0),
    ],
)
def test_ban_seconds_bounds_any_stated_block(stated: float | None, seconds: float) -> None:
    assert ban_seconds(stated) == seconds


# --------------------------------------------------------------------------- RestLimiter


def test_rest_groups_use_upbit_limits_with_margin() -> None:
    limiter = RestLimiter()
    assert limiter.window("ticker") == (8, 1.0)
    assert limiter.window("default") == (24, 1.0)
    assert limiter.window("order") == (9, 1.0)
    assert limiter.window("order-test") == (6, 1.0)
    count, seconds = limiter.window("order-cancel-all")
    assert count == 1
    assert seconds == pytest.approx(2.5)
    assert limiter.window("something-new") == (8, 1.0)
    assert limiter.windows("ticker") == ((8, 1.0), (10, 1.25))
    assert len(limiter.windows("order-cancel-all")) == 1  # already stretched


def test_the_jitter_guard_keeps_bursts_apart_by_the_margin_in_time() -> None:
    # Eight at t=0.9 and eight more at t=1.9 would pass the (8, 1.0) window alone: if
    # the first burst reaches Upbit 0.1 s late, all sixteen land inside one of its
    # seconds. With the guard, the ninth to the tenth may follow at once but the
    # eleventh waits until 1.25 s after the first burst.
    limiter = RestLimiter()
    assert all(limiter.try_acquire("ticker", 0.9) for _ in range(8))
    assert all(limiter.try_acquire("ticker", 1.9) for _ in range(2))
    assert not limiter.try_acquire("ticker", 1.9)
    assert limiter.delay("ticker", 1.9) == pytest.approx(0.25)
    # The sustained rate is the margin's: 8 per second over a long run.
    sent, now = 0, 10.0
    while now < 20.0:
        if limiter.try_acquire("ticker", now):
            sent += 1
        now += 0.01
    assert 78 <= sent <= 82


def test_arrivals_jittered_by_less_than_the_guard_never_exceed_upbit_count() -> None:
    # Send as fast as the limiter allows; delay each request by up to 0.24 s at random
    # on the way; count arrivals in every 1 s window as Upbit would.
    rng = random.Random(7)
    limiter = RestLimiter()
    arrivals: list[float] = []
    now = 0.0
    while now < 30.0:
        while limiter.try_acquire("ticker", now):
            arrivals.append(now + rng.uniform(0.0, 0.24))
        now += 0.005
    arrivals.sort()
    left = 0
    for right, stamp in enumerate(arrivals):
        while arrivals[left] <= stamp - 1.0:
            left += 1
        assert right - left + 1 <= 10, stamp
    assert with_margin((10, 1.0), 0.8) == (8, 1.0)
    assert jitter_guard((10, 1.0), 0.8) == (10, 1.25)
    assert jitter_guard((1, 2.0), 0.8) is None


def test_each_group_has_its_own_budget() -> None:
    limiter = RestLimiter()
    assert all(limiter.try_acquire("ticker", 0.0) for _ in range(8))
    assert not limiter.try_acquire("ticker", 0.5)
    assert limiter.delay("ticker", 0.5) == pytest.approx(0.5)
    assert limiter.try_acquire("candle", 0.5)


def test_on_request_counts_a_request_sent_after_waiting() -> None:
    limiter = RestLimiter()
    for _ in range(8):
        assert limiter.delay("trade", 0.0) == 0.0
        limiter.on_request("trade", 0.0)
    assert limiter.delay("trade", 0.0) == pytest.approx(1.0)


def test_remaining_zero_holds_only_that_group_for_a_second() -> None:
    limiter = RestLimiter()
    assert limiter.on_remaining_req("group=ticker; min=600; sec=0", 5.0) == ("ticker", 0)
    assert limiter.delay("ticker", 5.0) == pytest.approx(1.0)
    assert not limiter.try_acquire("ticker", 5.5)
    assert limiter.try_acquire("ticker", 6.0)
    assert limiter.delay("candle", 5.0) == 0.0


def test_remaining_with_budget_left_changes_nothing() -> None:
    limiter = RestLimiter()
    limiter.on_remaining("default", 12, 0.0)
    assert limiter.on_remaining_req("garbage", 0.0) is None
    assert limiter.delay("default", 0.0) == 0.0


def test_429_backoff_grows_then_stops_at_the_cap() -> None:
    limiter = RestLimiter(backoff_first=1.0, backoff_cap=8.0, rng=lambda: 1.0)
    waits = [limiter.on_429("ticker", 0.0) for _ in range(6)]
    assert waits == [2.0, 3.0, 5.0, 9.0, 9.0, 9.0]  # 1 s to the next second + backoff
    assert limiter.delay("ticker", 0.0) == pytest.approx(9.0)


def test_429_always_waits_at_least_a_second() -> None:
    limiter = RestLimiter(rng=lambda: 0.0)
    assert limiter.on_429("order", 100.0) == 1.0
    assert not limiter.try_acquire("order", 100.9)
    assert limiter.try_acquire("order", 101.0)


def test_success_resets_the_429_backoff() -> None:
    limiter = RestLimiter(backoff_first=1.0, backoff_cap=30.0, rng=lambda: 1.0)
    for _ in range(4):
        limiter.on_429("default", 0.0)
    limiter.on_success("default", 20.0)
    assert limiter.on_429("default", 20.0) == 2.0


def test_418_stops_the_group_and_its_ip_peers_until_the_block_ends() -> None:
    limiter = RestLimiter()
    until = limiter.on_418("ticker", 100.0, 30.0)
    assert until == 130.0
    for group in ("ticker", "candle", "orderbook", "market", "trade"):
        assert limiter.blocked_until(group, 100.0) == 130.0
        assert limiter.delay(group, 100.0) == pytest.approx(30.0)
        assert not limiter.try_acquire(group, 129.9)
    assert limiter.delay("default", 100.0) == 0.0
    assert limiter.try_acquire("ticker", 130.0)


def test_418_on_an_exchange_group_stops_the_pocket_not_the_ip() -> None:
    limiter = RestLimiter()
    limiter.on_418("order", 0.0, 10.0)
    assert limiter.delay("default", 0.0) == pytest.approx(10.0)
    assert limiter.delay("ticker", 0.0) == 0.0


def test_418_without_a_readable_block_time_waits_the_conservative_default() -> None:
    limiter = RestLimiter()
    assert limiter.on_418("ticker", 0.0, None) == DEFAULT_BLOCK_SECONDS == 60.0
    assert limiter.on_418("origin", 0.0, 0.0) == 1.0  # never less than a second


def test_a_418_ban_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "bans.json"
    before = RestLimiter(bans=BanStore.load(path))
    before.on_418("ticker", 1_000.0, 300.0)

    after_restart = RestLimiter(bans=BanStore.load(path))
    assert after_restart.blocked_until("ticker", 1_100.0) == 1_300.0
    assert after_restart.delay("candle", 1_100.0) == pytest.approx(200.0)
    assert after_restart.delay("ticker", 1_300.0) == 0.0


@pytest.mark.parametrize("stated", [math.inf, 1e12, math.nan])
def test_an_endless_418_is_stored_as_the_cap_and_ends_then(tmp_path: Path, stated: float) -> None:
    path = tmp_path / "bans.json"
    limiter = RestLimiter(bans=BanStore.load(path, now=1_000.0))
    until = limiter.on_418("ticker", 1_000.0, stated)
    expected = 1_000.0 + (DEFAULT_BLOCK_SECONDS if math.isnan(stated) else MAX_BAN_SECONDS)
    assert until == expected
    assert json.loads(path.read_text()) == {"rest:ticker": expected}
    after_restart = RestLimiter(bans=BanStore.load(path, now=1_050.0))
    assert after_restart.blocked_until("candle", 1_050.0) == expected
    assert after_restart.try_acquire("ticker", expected)  # tried once the cap is over


def test_a_huge_ban_in_the_file_is_loaded_as_at_most_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "bans.json"
    path.write_text(json.dumps({"rest:ticker": 1e300, "ws-connect": 1_100.0, "old": 10.0}))
    store = BanStore.load(path, now=1_000.0)
    assert store.entries() == {
        "rest:ticker": 1_000.0 + MAX_BAN_SECONDS,
        "ws-connect": 1_100.0,
        "old": 10.0,
    }
    assert store.remaining("rest:ticker", 1_000.0) == MAX_BAN_SECONDS


def test_a_ban_store_refuses_a_time_that_is_not_finite(tmp_path: Path) -> None:
    store = BanStore.load(tmp_path / "bans.json", now=0.0)
    for until in (math.inf, math.nan):
        with pytest.raises(ValueError, match="not a finite time"):
            store.block("ws-connect", until)
    assert store.entries() == {}
    assert not (tmp_path / "bans.json").exists()
    assert BanStore({"a": math.inf, "b": 5.0}).entries() == {"b": 5.0}


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        ("not json", {}),
        ("[1, 2]", {}),
        ("[" * 100_000, {}),
        ('{"ws-connect": "soon", "x": true, "rest:ticker": 1100}', {"rest:ticker": 1_100.0}),
    ],
    ids=["not-json", "not-an-object", "nested", "bad-entries"],
)
def test_a_corrupt_ban_file_is_ignored_with_a_warning(
    tmp_path: Path, content: str, kept: dict[str, float]
) -> None:
    path = tmp_path / "bans.json"
    path.write_text(content)
    with capture_logs() as events:
        store = BanStore.load(path, now=1_000.0)
    assert store.entries() == kept
    warnings = [e for e in events if e["log_level"] == "warning"]
    assert warnings, events
    assert all(e["path"] == str(path) for e in warnings)


def test_a_missing_ban_file_loads_quietly(tmp_path: Path) -> None:
    with capture_logs() as events:
        store = BanStore.load(tmp_path / "bans.json")
    assert store.entries() == {}
    assert events == []


def test_clear_all_forgets_every_ban(tmp_path: Path) -> None:
    path = tmp_path / "bans.json"
    store = BanStore.load(path, now=0.0)
    store.block("ws-connect", 50.0)
    store.block("rest:ticker", 60.0)
    assert store.clear_all() == {"ws-connect": 50.0, "rest:ticker": 60.0}
    store.save(path)
    assert BanStore.load(path, now=0.0).entries() == {}


# ------------------------------------------------------------------------------ BanStore


def test_ban_store_file_is_private_json_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "bans.json"
    store = BanStore.load(path)
    assert store.block("ws-connect", 2_000.0)
    assert json.loads(path.read_text()) == {"ws-connect": 2_000.0}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["bans.json"]  # no temp file left


def test_a_ban_is_honoured_after_loading_it_again(tmp_path: Path) -> None:
    path = tmp_path / "bans.json"
    BanStore.load(path).block("ws-connect", 2_000.0)
    reloaded = BanStore.load(path)
    assert reloaded.blocked_until("ws-connect", 1_500.0) == 2_000.0
    assert reloaded.remaining("ws-connect", 1_500.0) == 500.0
    assert reloaded.blocked_until("ws-connect", 2_000.0) == 0.0
    assert reloaded.remaining("rest:ticker", 1_500.0) == 0.0


def test_a_shorter_ban_never_shortens_a_longer_one(tmp_path: Path) -> None:
    store = BanStore.load(tmp_path / "bans.json")
    assert store.block("rest:order", 500.0)
    assert not store.block("rest:order", 400.0)
    assert store.blocked_until("rest:order", 0.0) == 500.0


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"ws-connect": "soon", "x": true}'])
def test_a_corrupt_store_loads_as_empty(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bans.json"
    path.write_text(content)
    assert BanStore.load(path).entries() == {}


def test_a_store_that_cannot_be_written_keeps_the_ban_in_memory(tmp_path: Path) -> None:
    store = BanStore.load(tmp_path / "missing-dir" / "bans.json")
    assert store.block("ws-connect", 100.0)
    assert isinstance(store.save_error, OSError)
    assert store.blocked_until("ws-connect", 50.0) == 100.0


def test_a_memory_store_writes_nothing_until_saved(tmp_path: Path) -> None:
    store = BanStore()
    store.block("ws-connect", 100.0)
    assert list(tmp_path.iterdir()) == []
    store.save(tmp_path / "bans.json")
    assert BanStore.load(tmp_path / "bans.json").entries() == {"ws-connect": 100.0}


def test_prune_active_and_clear() -> None:
    store = BanStore({"ws-connect": 10.0, "rest:ticker": 50.0})
    assert store.active(20.0) == {"rest:ticker": 50.0}
    assert store.prune(20.0)
    assert not store.prune(20.0)
    store.clear("rest:ticker")
    assert store.entries() == {}


# --------------------------------------------------------------------------- PriorityGate


def drain(gate: PriorityGate[str], times: Iterator[float]) -> list[str]:
    return [job.payload for now in times for job in gate.release(now)]


def test_orders_leave_before_account_queries_and_polling_in_a_shared_group() -> None:
    limiter = RestLimiter(limits={"default": (3, 1.0)}, margin=1.0)
    gate: PriorityGate[str] = PriorityGate(limiter, reserve=0)
    gate.submit(RestJob("default", Priority.QUOTATION, "poll"))
    gate.submit(RestJob("default", Priority.ACCOUNT, "accounts"))
    gate.submit(RestJob("default", Priority.ORDER, "cancel"))
    gate.submit(RestJob("default", Priority.ORDER, "status"))
    assert [job.payload for job in gate.release(0.0)] == ["cancel", "status", "accounts"]
    assert len(gate) == 1
    assert gate.next_delay(0.0) == pytest.approx(1.0)
    assert [job.payload for job in gate.release(1.0)] == ["poll"]
    assert gate.next_delay(1.0) is None


def test_lower_priorities_leave_a_slot_for_orders() -> None:
    limiter = RestLimiter(limits={"default": (3, 1.0)}, margin=1.0)
    gate: PriorityGate[str] = PriorityGate(limiter, reserve=1)
    for i in range(4):
        gate.submit(RestJob("default", Priority.QUOTATION, f"poll{i}"))
    assert [job.payload for job in gate.release(0.0)] == ["poll0", "poll1"]
    gate.submit(RestJob("default", Priority.ORDER, "order"))
    assert [job.payload for job in gate.release(0.1)] == ["order"]
    assert gate.release(0.2) == []


def one_a_second(gate_reserve: int = 0) -> PriorityGate[str]:
    return PriorityGate(RestLimiter(limits={"order": (1, 1.0)}, margin=1.0), reserve=gate_reserve)


def test_a_client_that_queues_many_calls_delays_anothers_by_one_of_its_own() -> None:
    gate = one_a_second()
    for i in range(10):
        gate.submit(RestJob("order", Priority.ORDER, f"flood{i}", owner="hog"))
    assert drain(gate, iter([0.0])) == ["flood0"]
    gate.submit(RestJob("order", Priority.ORDER, "mine", owner="polite"))
    assert drain(gate, iter([1.0, 2.0, 3.0])) == ["mine", "flood1", "flood2"]


def test_a_client_that_keeps_calling_cannot_shut_another_out() -> None:
    gate = one_a_second()
    for i in range(3):
        gate.submit(RestJob("order", Priority.ORDER, f"a{i}", owner="a"))
    released = []
    for second in range(6):  # "b" submits a fresh call before every release
        gate.submit(RestJob("order", Priority.ORDER, f"b{second}", owner="b"))
        released += drain(gate, iter([float(second)]))
    assert released == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_turns_never_outrank_priority() -> None:
    gate = one_a_second()
    for i in range(3):
        gate.submit(RestJob("order", Priority.ORDER, f"order{i}", owner="hog"))
    gate.submit(RestJob("order", Priority.ACCOUNT, "read", owner="other"))
    assert drain(gate, iter([0.0, 1.0, 2.0, 3.0])) == ["order0", "order1", "order2", "read"]


def test_groups_release_independently_and_most_urgent_first() -> None:
    limiter = RestLimiter(limits={"ticker": (1, 1.0), "order": (1, 1.0)}, margin=1.0)
    gate: PriorityGate[str] = PriorityGate(limiter)
    gate.submit(RestJob("ticker", Priority.QUOTATION, "tick1"))
    gate.submit(RestJob("ticker", Priority.QUOTATION, "tick2"))
    gate.submit(RestJob("order", Priority.ORDER, "buy"))
    assert [job.payload for job in gate.release(0.0)] == ["buy", "tick1"]
    assert drain(gate, iter([0.5, 1.0])) == ["tick2"]
    assert len(gate) == 0


def test_a_banned_group_releases_nothing_until_the_ban_ends() -> None:
    limiter = RestLimiter()
    gate: PriorityGate[int] = PriorityGate(limiter)
    limiter.on_418("ticker", 0.0, 30.0)
    gate.submit(RestJob("ticker", Priority.QUOTATION, 1))
    assert gate.release(10.0) == []
    assert gate.next_delay(10.0) == pytest.approx(20.0)
    assert [job.payload for job in gate.release(30.0)] == [1]


def test_backoff_refuses_a_first_delay_above_the_cap() -> None:
    with pytest.raises(ValueError, match="first"):
        Backoff(first=10.0, cap=1.0)


# ------------------------------------------------------------------------ token bucket


def test_token_bucket_allows_a_burst_then_paces_at_its_rate() -> None:
    bucket = TokenBucket(3, 2.0)
    assert [bucket.try_acquire(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.delay(0.0) == pytest.approx(0.5)
    assert not bucket.try_acquire(0.4)
    assert bucket.try_acquire(0.5)
    assert bucket.try_acquire(10.0)  # refilled, but never beyond the burst
    assert [bucket.try_acquire(10.0) for _ in range(3)] == [True, True, False]
    bucket.reset()
    assert [bucket.try_acquire(10.0) for _ in range(4)] == [True, True, True, False]


def test_pacing_bucket_in_front_of_upbit_windows_never_empties_a_minute() -> None:
    """Greedy demand for 5 minutes: within 90/min and no gap longer than the pace."""
    windows = WindowLimiter(WS_MESSAGE_WINDOWS)
    bucket = TokenBucket.pacing(WS_MESSAGE_WINDOWS[1], 10)
    sent: list[float] = []
    now = 0.0
    while now < 300.0:
        if windows.delay(now) == 0.0 and bucket.delay(now) == 0.0:
            assert windows.try_acquire(now)
            assert bucket.try_acquire(now)
            sent.append(now)
        now = round(now + 0.01, 2)
    assert max_in_window(sent, 59.999) <= 90
    assert max_in_window(sent, 0.999) <= 4  # (float steps land on the window edge)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert max(gaps) <= 1.0  # paced: never the 40 s silence of a spent minute
    assert len(sent) >= 10 + 80 * 5 - 5


@pytest.mark.parametrize(("burst", "rate"), [(0, 1.0), (1, 0.0), (2, -1.0)])
def test_token_bucket_rejects_nonsense(burst: int, rate: float) -> None:
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(burst, rate)
    with pytest.raises(ValueError, match="nothing to pace"):
        TokenBucket.pacing((10, 60.0), 10)


def test_a_withdrawn_job_takes_no_slot_and_no_turn() -> None:
    # A caller that gave up waiting (its slot wait timed out) must not spend a slot of
    # the group later, nor stay counted as waiting.
    gate = one_a_second()
    gate.submit(RestJob("order", Priority.ORDER, "first", owner="a"))
    assert drain(gate, iter([0.0])) == ["first"]
    gave_up = RestJob("order", Priority.ORDER, "gave-up", owner="a")
    gate.submit(gave_up)
    gate.submit(RestJob("order", Priority.ORDER, "waiting", owner="b"))
    gate.withdraw(gave_up)
    assert len(gate) == 1
    assert drain(gate, iter([1.0])) == ["waiting"]
    gate.withdraw(gave_up)  # twice, or after its release: nothing happens
    assert len(gate) == 0
    assert gate.next_delay(1.0) is None


def test_a_client_with_reads_queued_waits_no_longer_for_its_cancel() -> None:
    # Turns are per priority: a client's queued account reads must not put its cancel
    # behind every other client's queued cancels.
    gate = one_a_second()
    for i in range(5):
        gate.submit(RestJob("order", Priority.ACCOUNT, f"read{i}", owner="a"))
        gate.submit(RestJob("order", Priority.ORDER, f"b{i}", owner="b"))
    gate.submit(RestJob("order", Priority.ORDER, "a-cancel", owner="a"))
    assert drain(gate, iter([0.0, 1.0])) == ["b0", "a-cancel"]


def test_steady_time_reads_as_epoch_seconds_and_never_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert abs(steady_time() - time.time()) < 5.0
    before = steady_time()
    real = time.time()
    monkeypatch.setattr(time, "time", lambda: real - 3600.0)
    after = steady_time()
    assert 0.0 <= after - before < 1.0


def test_a_ban_saved_after_the_wall_clock_stepped_means_the_same_to_the_next_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker's windows run on steady_time(); when the wall clock was stepped (or
    # the machine suspended) since it started, the file must still say the real end,
    # or the next broker (and `upbit-broker ban`) would connect into the ban, or wait
    # an hour for a two-minute one.
    path = tmp_path / "bans.json"
    store = BanStore.load(path)
    real = time.time()
    monkeypatch.setattr(time, "time", lambda: real + 600.0)  # stepped 10 min ahead
    store.block("ws-connect", steady_time() + 120.0)
    saved = json.loads(path.read_text(encoding="utf-8"))["ws-connect"]
    assert saved == pytest.approx(time.time() + 120.0, abs=1.0)
    assert BanStore.load(path).remaining("ws-connect", steady_time()) == pytest.approx(
        120.0, abs=1.0
    )
