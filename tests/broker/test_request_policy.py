"""The request policy on a fake clock: inputs in, requests, waits and events out."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest

from broker.config import Settings
from broker.exchange import THROTTLE_RETRY, UpbitExchange, classify_upbit_error
from broker.ratelimit import DEFAULT_BLOCK_SECONDS
from broker.request_policy import (
    ERROR_WINDOW,
    MAX_LINGERING,
    REMOVAL_RETRY,
    Carried,
    Close,
    ErrorVerdict,
    Event,
    ListSubscriptions,
    Mismatch,
    Refused,
    Request,
    RequestPolicy,
    Subscribe,
    Wait,
)
from broker.subscriptions import UpstreamStream
from schemas.upbit import SubscriptionEntry, SubscriptionList

MARKETS = [f"KRW-C{i:02d}" for i in range(40)]
BTC = UpstreamStream("ticker", "KRW-BTC")
ETH = UpstreamStream("ticker", "KRW-ETH")
XRP = UpstreamStream("ticker", "KRW-XRP")


def ticker(code: str) -> UpstreamStream:
    return UpstreamStream("ticker", code)


def tickers(codes: Iterable[str]) -> frozenset[UpstreamStream]:
    return frozenset(ticker(code) for code in codes)


def listing(streams: Iterable[UpstreamStream]) -> SubscriptionList:
    codes = sorted(str(s.code) for s in streams)
    return SubscriptionList(
        method="LIST_SUBSCRIPTIONS", result=[SubscriptionEntry(type="ticker", codes=codes)]
    )


class Shell:
    """Does with the policy's answers what the link does, on a fake clock."""

    def __init__(self, policy: RequestPolicy, now: float = 1000.0) -> None:
        self.policy = policy
        self.now = now
        self.sent: list[tuple[float, Request]] = []
        self.events: list[Event] = []
        self.closed_at: float | None = None

    def connect(self) -> None:
        self.policy.on_connected(self.now)

    def want(self, streams: Iterable[UpstreamStream]) -> None:
        self.policy.set_target(frozenset(streams), self.now)

    def run(self, seconds: float) -> None:
        """Carry out every action due within ``seconds``, then stop the clock there."""
        end = self.now + seconds
        for _ in range(100_000):
            action = self.policy.next_request(self.now)
            if action is None:
                break
            if isinstance(action, Wait):
                assert action.seconds > 0, action
                if self.now + action.seconds > end:
                    break
                self.now += action.seconds
            elif isinstance(action, Close):
                self.closed_at = self.now
                self.events.extend(self.policy.on_disconnected())
                break
            else:
                self.sent.append((self.now, action))
                self.events.extend(self.policy.on_sent(action, self.now))
        else:
            raise AssertionError("the policy never waited")
        self.now = end

    def error(self, name: str, message: str = "") -> list[Event]:
        events = list(self.policy.on_error(name, message, self.now))
        self.events.extend(events)
        return events

    def answer(self, streams: Iterable[UpstreamStream]) -> list[Event]:
        events = list(self.policy.on_listing(listing(streams), self.now))
        self.events.extend(events)
        return events

    @property
    def requests(self) -> list[Subscribe]:
        return [r for _, r in self.sent if isinstance(r, Subscribe)]

    @property
    def last(self) -> Subscribe:
        return self.requests[-1]

    def times(self) -> list[float]:
        return [t for t, r in self.sent if isinstance(r, Subscribe)]


def policy(**kwargs: object) -> RequestPolicy:
    return RequestPolicy(UpbitExchange(Settings()), **kwargs)  # type: ignore[arg-type]


def connected(**kwargs: object) -> Shell:
    shell = Shell(policy(**kwargs))
    shell.connect()
    return shell


def widening(**kwargs: object) -> Shell:
    shell = connected(widen_types={"ticker"}, **kwargs)
    shell.policy.set_markets(MARKETS)
    return shell


def ten_requests(shell: Shell) -> frozenset[UpstreamStream]:
    """One request per new code, ten of them, one a second; returns what is wanted."""
    for i in range(10):
        shell.want(tickers(MARKETS[: i + 1]))
        shell.run(1.0)
    return tickers(MARKETS[:10])


# ---------------------------------------------------------------------------- requests


def test_nothing_is_asked_of_a_disconnected_policy() -> None:
    p = policy()
    p.set_target(frozenset({BTC}), 0.0)
    assert p.next_request(10.0) is None


def test_a_new_connection_requests_every_stream_with_snapshots() -> None:
    shell = connected()
    shell.want({BTC, ETH})
    shell.run(1.0)
    assert shell.requests == [Subscribe(frozenset({BTC, ETH}), frozenset({BTC, ETH}))]
    assert shell.events == [Carried(frozenset({BTC, ETH}))]
    assert shell.policy.carried == {BTC, ETH}


def test_changes_within_the_coalescing_window_make_one_request_when_it_ends() -> None:
    shell = connected(coalesce=0.05)
    shell.want({BTC})
    shell.run(0.03)
    shell.want({BTC, ETH})
    shell.run(0.019)
    assert shell.requests == [], "sent before the coalescing window ended"
    shell.run(1.0)
    assert [r.streams for r in shell.requests] == [{BTC, ETH}]
    assert shell.times() == [pytest.approx(1000.05)]


def test_a_change_asks_snapshots_for_new_streams_only() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(1.0)
    shell.want({BTC, ETH})
    shell.run(1.0)
    assert shell.last == Subscribe(frozenset({BTC, ETH}), frozenset({ETH}))


def test_a_change_undone_within_the_window_sends_nothing() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(1.0)
    shell.want({BTC, ETH})
    shell.want({BTC})
    shell.run(10.0)
    assert len(shell.requests) == 1


def churn(shell: Shell, seconds: float) -> None:
    """Demand far above the budget: a new code every 0.1 s (five wanted at a time)."""
    for i in range(round(seconds * 10)):
        shell.want(tickers(f"KRW-X{j:04d}" for j in range(i, i + 5)))
        shell.run(0.1)


def test_requests_stay_within_four_a_second_and_ninety_a_minute() -> None:
    shell = connected()
    churn(shell, 150.0)
    times = shell.times()
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u < t + 1.0) <= 4
        assert sum(1 for u in times[i:] if u < t + 60.0) <= 90
    assert len(times) > 180, "the budget was not used"


def test_after_a_burst_the_minutes_budget_is_spread_evenly_never_spent_up_front() -> None:
    shell = connected()
    churn(shell, 150.0)
    times = shell.times()
    # Ten at once (as fast as 4/s allows), then one every 0.75 s (80 over a minute),
    # minute after minute: never 90 in 20 s and then 40 s of silence.
    assert sum(1 for t in times if t < 1000 + 3.0) == 12
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap == pytest.approx(0.75, abs=0.06) for gap in gaps[14:])


def test_requests_left_counts_down_the_minutes_budget_and_recovers() -> None:
    shell = connected()
    assert shell.policy.requests_left(shell.now) == 90
    for i in range(3):
        shell.want(tickers(MARKETS[: i + 1]))
        shell.run(1.0)
    assert shell.policy.requests_left(shell.now) == 87
    assert shell.policy.requests_left(shell.now + 61.0) == 90


def test_a_new_connection_has_a_fresh_budget() -> None:
    shell = connected()
    for i in range(5):
        shell.want(tickers(MARKETS[: i + 1]))
        shell.run(1.0)
    shell.policy.on_disconnected()
    shell.connect()
    assert shell.policy.requests_left(shell.now) == 90


# ---------------------------------------------------------------------------- scarcity


def test_while_requests_are_scarce_released_streams_stay_until_the_budget_recovers() -> None:
    shell = connected()
    wanted = ten_requests(shell)  # ten in a minute: requests are scarce
    assert shell.policy.requests_left(shell.now) == 80
    shell.want(wanted - {ticker(MARKETS[0])})
    shell.run(REMOVAL_RETRY * 5)
    assert len(shell.requests) == 10, "a removal alone spent a scarce request"
    assert shell.policy.carried == wanted
    shell.run(60.0)  # the minute passes: removals are affordable again
    assert shell.last.streams == wanted - {ticker(MARKETS[0])}
    assert shell.last.new == frozenset()


def test_a_scarce_request_adding_a_stream_keeps_released_ones_in_it() -> None:
    shell = connected()
    wanted = ten_requests(shell)
    shell.want((wanted - {ticker(MARKETS[0])}) | {BTC})
    shell.run(1.0)
    assert shell.last.streams == wanted | {BTC}
    assert shell.last.new == {BTC}


def test_the_tenth_request_in_a_minute_widens_to_every_market_of_the_quote() -> None:
    shell = widening()
    wanted = ten_requests(shell)
    sizes = [len(r.streams) for r in shell.requests]
    assert sizes == [1, 2, 3, 4, 5, 6, 7, 8, 9, len(MARKETS)]
    assert shell.last.widened == tickers(MARKETS) - wanted
    # Widened streams get snapshots too, for whoever subscribes next.
    assert shell.last.new == tickers(MARKETS) - tickers(MARKETS[:9])
    assert shell.policy.carried == tickers(MARKETS)


def test_a_code_already_carried_by_a_widened_request_costs_no_request() -> None:
    shell = widening()
    wanted = ten_requests(shell)
    shell.want(wanted | {ticker(MARKETS[20])})
    shell.run(REMOVAL_RETRY * 3)
    assert len(shell.requests) == 10


def test_a_widened_request_narrows_once_the_budget_recovers() -> None:
    shell = widening()
    wanted = ten_requests(shell)
    shell.run(61.0)
    assert len(shell.requests) == 11
    assert shell.last.streams == wanted
    assert shell.policy.carried == wanted


def test_nothing_widens_before_the_market_list_is_known() -> None:
    shell = connected(widen_types={"ticker"})
    wanted = ten_requests(shell)
    assert shell.last.streams == wanted


def test_nothing_widens_without_types_to_widen() -> None:
    shell = connected(widen_types=())
    shell.policy.set_markets(MARKETS)
    wanted = ten_requests(shell)
    assert shell.last.streams == wanted
    assert not shell.policy.widening


def test_widening_adds_at_most_max_lingering_streams() -> None:
    shell = connected(widen_types={"ticker"})
    shell.policy.set_markets([f"KRW-M{i:04d}" for i in range(MAX_LINGERING + 100)])
    wanted = ten_requests(shell)
    assert len(shell.last.widened) == MAX_LINGERING
    assert len(shell.last.streams - wanted) == MAX_LINGERING


# ---------------------------------------------------------------------------- errors


def test_a_refused_request_leaves_the_previous_one_carried_and_is_not_sent_again() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(1.0)
    shell.want({BTC, ETH})
    shell.run(1.0)
    events = shell.error("INVALID_PARAM", "bad code")
    assert events == [Refused(frozenset({ETH}), "INVALID_PARAM"), Carried(frozenset({BTC}))]
    assert shell.policy.carried == {BTC}
    shell.run(130.0)
    assert len(shell.requests) == 2, "the refused request went again"
    # Something else wanted: a new request.
    shell.want({BTC, XRP})
    shell.run(1.0)
    assert shell.last.streams == {BTC, XRP}
    assert shell.last.new == {XRP}


def test_a_refused_first_request_leaves_nothing_carried() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(1.0)
    assert shell.error("NO_CODES") == [Refused(frozenset({BTC}), "NO_CODES"), Carried(frozenset())]


def test_an_error_long_after_the_last_request_is_not_its_answer() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(ERROR_WINDOW + 1)
    assert shell.error("INVALID_PARAM") == []
    assert shell.policy.carried == {BTC}


def test_an_error_before_any_request_changes_nothing() -> None:
    shell = connected()
    assert shell.error("INVALID_AUTH") == []


def test_too_many_requests_sends_the_same_request_again_a_moment_later() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(1.0)
    shell.want({BTC, ETH})
    shell.run(0.1)
    assert shell.error("Too Many Requests") == [Carried(frozenset({BTC}))]
    shell.run(THROTTLE_RETRY * 0.9)
    assert len(shell.requests) == 2, "sent again before the throttle passed"
    shell.run(THROTTLE_RETRY)
    assert len(shell.requests) == 3
    assert shell.last == Subscribe(frozenset({BTC, ETH}), frozenset({ETH}))


def test_a_teapot_stops_requests_for_the_block_its_message_states() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(1.0)
    shell.want({BTC, ETH})
    shell.run(0.1)
    shell.error("I'm a teapot", "Too many requests; blocked for 30 seconds.")
    shell.run(29.0)
    assert len(shell.requests) == 2
    shell.run(2.0)
    assert shell.last.streams == {BTC, ETH}


def test_a_refused_widened_request_goes_again_plainly_and_widening_stays_off() -> None:
    shell = widening()
    wanted = ten_requests(shell)
    shell.run(0.1)
    events = shell.error("INVALID_PARAM", "too many codes")
    assert events == [
        Refused(tickers(MARKETS) - tickers(MARKETS[:9]), "INVALID_PARAM", plain_from_now=True),
        Carried(tickers(MARKETS[:9])),
    ]
    shell.run(1.0)
    assert shell.last.streams == wanted
    assert shell.last.new == {ticker(MARKETS[9])}
    assert shell.policy.carried == wanted
    assert not shell.policy.widening
    # Plain from then on, on this connection, although requests are still scarce.
    shell.want(wanted | {ticker(MARKETS[10])})
    shell.run(1.0)
    assert shell.last.streams == wanted | {ticker(MARKETS[10])}
    assert shell.last.widened == frozenset()


def test_widening_is_back_on_a_new_connection() -> None:
    shell = widening()
    ten_requests(shell)
    shell.run(0.1)
    shell.error("INVALID_PARAM")
    shell.policy.on_disconnected()
    shell.connect()
    assert shell.policy.widening


def test_a_throttled_widened_request_goes_again_still_widened() -> None:
    shell = widening()
    ten_requests(shell)
    shell.run(0.1)
    assert shell.error("Too Many Requests") == [Carried(tickers(MARKETS[:9]))]
    assert shell.policy.widening
    shell.run(THROTTLE_RETRY + 0.5)
    assert shell.last.streams == tickers(MARKETS)


@pytest.mark.parametrize(
    ("name", "message", "verdict"),
    [
        ("INVALID_PARAM", "", ErrorVerdict("refused")),
        ("NO_CODES", "", ErrorVerdict("refused")),
        ("WRONG_FORMAT", "", ErrorVerdict("refused")),
        ("INVALID_AUTH", "", ErrorVerdict("refused")),
        ("SOMETHING_NEW", "", ErrorVerdict("refused")),
        ("Too Many Requests", "", ErrorVerdict("throttled", THROTTLE_RETRY)),
        ("TOO_MANY_REQUEST", "", ErrorVerdict("throttled", THROTTLE_RETRY)),
        ("I'm a teapot", "blocked for 30 seconds.", ErrorVerdict("throttled", 30.0)),
        ("I'm a teapot", "", ErrorVerdict("throttled", DEFAULT_BLOCK_SECONDS)),
    ],
)
def test_upbit_error_names_say_whether_a_request_was_refused_or_throttled(
    name: str, message: str, verdict: ErrorVerdict
) -> None:
    assert classify_upbit_error(name, message) == verdict
    assert UpbitExchange(Settings()).classify_error(name, message) == verdict


# ---------------------------------------------------------------------------- listings


def test_the_connection_is_asked_what_it_carries_every_interval() -> None:
    shell = connected(verify_interval=60.0)
    shell.want({BTC})
    shell.run(150.0)
    lists = [t - 1000 for t, r in shell.sent if isinstance(r, ListSubscriptions)]
    assert lists == [pytest.approx(60.0), pytest.approx(120.0)]


def test_a_request_that_added_streams_is_checked_soon_and_again_until_answered() -> None:
    # Upbit answers only refusals: a request its application never processed (a short
    # stall that never brought the connection down) shows only in a listing.
    shell = connected(verify_interval=60.0, confirm_after=5.0)
    shell.want({BTC})
    shell.run(16.0)  # no listing answers (the application is still stalled)
    lists = [t - 1000 for t, r in shell.sent if isinstance(r, ListSubscriptions)]
    assert lists == [pytest.approx(5.05, abs=0.1), pytest.approx(10.05, abs=0.1),
                     pytest.approx(15.05, abs=0.1)]  # fmt: skip
    assert shell.answer({ETH}) == [Mismatch(frozenset({BTC}), frozenset({ETH}))]
    shell.run(1.0)
    assert shell.last == Subscribe(frozenset({BTC}), frozenset({BTC}))


def test_once_a_listing_confirms_the_request_checks_go_back_to_the_interval() -> None:
    shell = connected(verify_interval=60.0, confirm_after=5.0)
    shell.want({BTC})
    shell.run(6.0)
    assert shell.answer({BTC}) == []
    shell.run(40.0)
    lists = [t - 1000 for t, r in shell.sent if isinstance(r, ListSubscriptions)]
    assert lists == [pytest.approx(5.05, abs=0.1)]


def test_a_stale_listing_does_not_end_the_check_of_a_newer_request() -> None:
    shell = connected(verify_interval=60.0, confirm_after=5.0)
    shell.want({BTC})
    shell.run(5.5)  # the check of the first request is asked ...
    shell.want({BTC, ETH})
    shell.run(0.5)  # ... and a newer request goes out before its answer
    assert shell.answer({BTC}) == []  # stale: says nothing of the newer request
    shell.run(5.5)
    lists = [t - 1000 for t, r in shell.sent if isinstance(r, ListSubscriptions)]
    assert len(lists) == 2
    assert lists[1] == pytest.approx(10.05, abs=0.2)  # the newer request is checked too


def test_a_listing_that_matches_the_request_changes_nothing() -> None:
    shell = connected()
    shell.want({BTC, ETH})
    shell.run(61.0)
    assert shell.answer({BTC, ETH}) == []
    shell.run(10.0)
    assert len(shell.requests) == 1


def test_a_listing_that_differs_sends_the_full_request_again_with_snapshots() -> None:
    shell = connected()
    shell.want({BTC, ETH})
    shell.run(61.0)
    assert shell.answer({BTC, XRP}) == [Mismatch(frozenset({ETH}), frozenset({XRP}))]
    shell.run(1.0)
    assert len(shell.requests) == 2
    assert shell.last == Subscribe(frozenset({BTC, ETH}), frozenset({BTC, ETH}))


def test_a_listing_asked_before_a_newer_request_is_not_compared() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(60.0)  # the listing is asked
    assert isinstance(shell.sent[-1][1], ListSubscriptions)
    shell.want({BTC, ETH})
    shell.run(1.0)  # a new request goes before the answer comes
    assert shell.answer({BTC}) == []
    assert len(shell.requests) == 2


def test_a_listing_during_a_pending_change_is_not_compared() -> None:
    shell = connected(coalesce=0.5)
    shell.want({BTC})
    shell.run(60.1)
    shell.want({BTC, ETH})
    assert shell.answer({XRP}) == []


def test_a_listing_nobody_asked_for_is_not_compared() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(1.0)
    assert shell.answer({XRP}) == []


# ---------------------------------------------------------------------------- lifecycle


def test_a_connection_left_with_nothing_to_carry_closes_after_the_idle_time() -> None:
    shell = connected(idle_close=30.0)
    shell.want({BTC})
    shell.run(1.0)
    shell.want(())
    shell.run(29.0)
    assert shell.closed_at is None
    shell.run(2.0)
    assert shell.closed_at == pytest.approx(1031.0)
    assert isinstance(shell.policy.next_request(shell.now), type(None))
    assert len(shell.requests) == 1


def test_streams_wanted_again_before_the_idle_time_keep_the_connection() -> None:
    shell = connected(idle_close=30.0)
    shell.want({BTC})
    shell.run(1.0)
    shell.want(())
    shell.run(20.0)
    shell.want({BTC})
    shell.run(60.0)
    assert shell.closed_at is None
    assert len(shell.requests) == 1, "the same streams were requested again"


def test_a_lost_connection_carries_nothing_and_the_next_requests_everything_again() -> None:
    shell = connected()
    shell.want({BTC, ETH})
    shell.run(1.0)
    assert shell.policy.on_disconnected() == (Carried(frozenset()),)
    assert shell.policy.carried == frozenset()
    assert shell.policy.next_request(shell.now) is None
    shell.connect()
    shell.run(1.0)
    assert shell.last == Subscribe(frozenset({BTC, ETH}), frozenset({BTC, ETH}))
    assert len(shell.requests) == 2


# ---------------------------------------------------------------------------- one bad stream


def serve_refusing(shell: Shell, bad: UpstreamStream, seconds: float) -> None:
    """Run ``seconds`` like Upbit would if it refused every request carrying ``bad``."""
    answered = len(shell.requests)
    for _ in range(int(seconds / 0.25)):
        shell.run(0.25)
        if len(shell.requests) > answered:
            answered = len(shell.requests)
            if bad in shell.last.streams:
                shell.error("INVALID_PARAM", "bad stream")


def test_one_refused_stream_among_many_new_is_found_and_the_others_flow() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(1.0)
    others = tickers(MARKETS[:16])
    bad = ticker("KRW-BAD")
    shell.want({BTC, bad, *others})
    serve_refusing(shell, bad, 30.0)
    assert shell.policy.carried == {BTC, *others}
    refused = [e for e in shell.events if isinstance(e, Refused)]
    assert refused == [Refused(frozenset({bad}), "INVALID_PARAM")]
    # A binary search: a handful of requests, not one per stream.
    assert len(shell.requests) <= 2 + 2 * 5, len(shell.requests)
    # It is not asked for again while it is wanted ...
    sent = len(shell.requests)
    shell.run(130.0)
    assert len(shell.requests) == sent
    # ... and may be tried again once its owners let it go and somebody asks anew.
    shell.want({BTC, *others})
    shell.run(5.0)
    shell.want({BTC, bad, *others})
    shell.run(1.0)
    assert bad in shell.last.streams


def test_streams_asked_for_during_the_search_are_not_blamed() -> None:
    shell = connected()
    shell.want({BTC})
    shell.run(1.0)
    bad = ticker("KRW-BAD")
    shell.want({BTC, ETH, XRP, bad})
    serve_refusing(shell, bad, 0.5)
    shell.want({BTC, ETH, XRP, bad, ticker("KRW-SOL")})
    serve_refusing(shell, bad, 30.0)
    assert shell.policy.carried == {BTC, ETH, XRP, ticker("KRW-SOL")}
    assert [e.streams for e in shell.events if isinstance(e, Refused)] == [frozenset({bad})]
