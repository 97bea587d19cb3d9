"""Poll planner: batched quotation calls that never exceed a group's budget per cycle."""

from __future__ import annotations

from collections import Counter

import pytest

from broker.pollplan import PollCall, PollPlanner
from broker.ratelimit import ORDER_RESERVE, Priority, PriorityGate, RestJob, RestLimiter


def codes(n: int, quote: str = "KRW") -> list[str]:
    return [f"{quote}-C{i:03d}" for i in range(n)]


def by_group(calls: list[PollCall]) -> Counter[str]:
    return Counter(call.group for call in calls)


def run(planner: PollPlanner, cycles: int, start: float = 0.0) -> list[list[PollCall]]:
    """``cycles`` cycles, each started exactly when the planner says it is due."""
    out = []
    now = start
    for _ in range(cycles):
        now += planner.delay(now)
        out.append(planner.next_cycle(now))
    return out


def test_nothing_to_poll_plans_no_calls() -> None:
    planner = PollPlanner()
    assert planner.next_cycle(0.0) == []
    assert planner.delay(0.0) == 0.0
    assert planner.cycle_seconds == 1.0
    assert all(planner.planned(g) == 0 for g in ("ticker", "orderbook", "trade"))


def test_tickers_are_batched_100_codes_per_call_in_code_order() -> None:
    planner = PollPlanner()
    planner.update(tickers=reversed(codes(250)))
    calls = planner.next_cycle(0.0)
    assert [len(c.codes) for c in calls] == [100, 100, 50]
    assert calls[0] == PollCall(
        "ticker", "/v1/ticker", {"markets": ",".join(codes(100))}, tuple(codes(100))
    )
    assert [code for c in calls for code in c.codes] == codes(250)


def test_orderbooks_are_batched_15_codes_per_call_per_level_and_depth() -> None:
    planner = PollPlanner()
    planner.update(
        orderbooks=[(c, 0.0, 30) for c in codes(20)]
        + [("KRW-BTC", 10000.0, 15), ("KRW-ETH", 10000.0, 15)]
        + [("KRW-XRP", 0.1, 5)]
    )
    calls = planner.next_cycle(0.0)
    assert [(c.params.get("level"), c.params["count"], len(c.codes)) for c in calls] == [
        (None, 30, 15),  # level 0 is Upbit's default: not sent
        (None, 30, 5),
        ("0.1", 5, 1),
        ("10000", 15, 2),
    ]
    assert calls[3] == PollCall(
        "orderbook",
        "/v1/orderbook",
        {"markets": "KRW-BTC,KRW-ETH", "count": 15, "level": "10000"},
        ("KRW-BTC", "KRW-ETH"),
    )


def test_one_orderbook_call_serves_every_depth_of_a_code_and_level() -> None:
    planner = PollPlanner()
    planner.update(orderbooks=[("KRW-BTC", 0.0, 5), ("KRW-BTC", 0.0, 30), ("KRW-BTC", 0.0, 15)])
    assert [(c.codes, c.params["count"]) for c in planner.next_cycle(0.0)] == [(("KRW-BTC",), 30)]


def test_trades_are_one_call_per_code() -> None:
    planner = PollPlanner()
    planner.update(trades=["KRW-ETH", "KRW-BTC"])
    assert planner.next_cycle(0.0) == [
        PollCall("trade", "/v1/trades/ticks", {"market": "KRW-BTC", "count": 30}, ("KRW-BTC",)),
        PollCall("trade", "/v1/trades/ticks", {"market": "KRW-ETH", "count": 30}, ("KRW-ETH",)),
    ]


def test_no_group_ever_gets_more_than_8_calls_per_cycle() -> None:
    planner = PollPlanner()
    planner.update(
        tickers=codes(1_000),
        orderbooks=[(c, 0.0, 30) for c in codes(300)],
        trades=codes(100),
    )
    assert planner.cycle_seconds == 1.0
    for calls in run(planner, 50):
        assert max(by_group(calls).values()) <= 8
        assert by_group(calls) == {"ticker": 8, "orderbook": 8, "trade": 8}


def test_cycles_are_spaced_by_cycle_seconds() -> None:
    planner = PollPlanner()
    planner.update(trades=["KRW-BTC"])
    assert planner.next_cycle(5.0)
    assert planner.delay(5.5) == pytest.approx(0.5)
    assert planner.next_cycle(5.5) == []  # early: not due, no budget spent
    assert planner.next_cycle(6.0)


def test_trade_codes_take_turns_fairly_over_cycles() -> None:
    planner = PollPlanner()
    planner.update(trades=codes(20))
    assert planner.rounds("trade") == 3
    assert planner.refresh_seconds("trade") == 3.0
    polled: Counter[str] = Counter()
    for calls in run(planner, 30):
        assert len(calls) == 8
        assert len({c.codes for c in calls}) == 8  # no code twice in a cycle
        polled.update(c.codes[0] for c in calls)
    assert set(polled) == set(codes(20))
    assert max(polled.values()) - min(polled.values()) <= 1  # 240 calls over 20 codes


def test_every_code_is_polled_within_its_rotation() -> None:
    planner = PollPlanner()
    planner.update(trades=codes(20))
    first_three = [c.codes[0] for calls in run(planner, 3) for c in calls]
    assert sorted(set(first_three)) == codes(20)


def test_rotated_trade_calls_ask_for_more_trades_to_cover_the_longer_wait() -> None:
    planner = PollPlanner()
    planner.update(trades=codes(20))  # each code polled every 3 cycles
    assert {c.params["count"] for c in planner.next_cycle(0.0)} == {90}
    planner.update(trades=codes(1_000))
    assert {c.params["count"] for c in planner.next_cycle(10.0)} == {500}  # Upbit's maximum


def test_a_stream_that_just_fell_back_is_polled_next_and_others_keep_their_turn() -> None:
    planner = PollPlanner()
    planner.update(trades=codes(10))
    first = [c.codes[0] for c in planner.next_cycle(0.0)]
    assert first == codes(8)
    planner.update(trades=[*codes(10), "KRW-NEW"])
    second = [c.codes[0] for c in planner.next_cycle(1.0)]
    assert second == ["KRW-NEW", *codes(10)[8:], *codes(8)[:5]]


def test_released_streams_are_no_longer_polled() -> None:
    planner = PollPlanner()
    planner.update(tickers=["KRW-BTC"], trades=["KRW-BTC", "KRW-ETH"])
    planner.update(trades=["KRW-ETH"])
    assert [(c.group, c.codes) for c in planner.next_cycle(0.0)] == [("trade", ("KRW-ETH",))]
    planner.update()
    assert planner.next_cycle(1.0) == []


def test_reserve_leaves_calls_for_snapshot_requests() -> None:
    planner = PollPlanner(reserve=2)
    planner.update(trades=codes(20))
    assert planner.budget("trade") == 6
    assert len(planner.next_cycle(0.0)) == 6


def test_min_cycle_slows_polling_down() -> None:
    planner = PollPlanner(min_cycle=2.0)
    planner.update(tickers=["KRW-BTC"])
    assert planner.cycle_seconds == 2.0
    planner.next_cycle(0.0)
    assert planner.delay(0.0) == 2.0


def test_planning_is_deterministic() -> None:
    def plan() -> list[list[PollCall]]:
        planner = PollPlanner()
        planner.update(
            tickers=codes(5), orderbooks=[(c, 0.0, 15) for c in codes(40)], trades=codes(12)
        )
        return run(planner, 5)

    assert plan() == plan()


def test_impossible_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="reserve"):
        PollPlanner(reserve=8)
    with pytest.raises(ValueError, match="min_cycle"):
        PollPlanner(min_cycle=0)
    with pytest.raises(ValueError, match="trade_count"):
        PollPlanner(trade_count=501)


def test_a_cycle_planned_with_the_order_reserve_goes_through_the_gate_at_once() -> None:
    # The fallback polls below order priority, so the gate leaves it ORDER_RESERVE
    # fewer slots per window than the margin; a plan that counted them would always
    # leave a call waiting, and the planner would believe its data fresher than it is.
    planner = PollPlanner(reserve=ORDER_RESERVE)
    planner.update(trades=[f"KRW-C{i:03d}" for i in range(40)])
    gate: PriorityGate[int] = PriorityGate(RestLimiter())
    calls = planner.next_cycle(100.0)
    assert len(calls) > 1
    for index, call in enumerate(calls):
        gate.submit(RestJob(call.group, Priority.QUOTATION, index))
    assert len(gate.release(100.0)) == len(calls)
