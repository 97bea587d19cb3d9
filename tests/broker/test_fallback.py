"""PrivateFallback's shell: bad REST answers and the stream racing a read lose nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, cast

import pytest

from broker.credentials import Credentials
from broker.fallback import VERIFIED_LAG_MAX, PrivateFallback
from broker.ports import StatusState
from broker.reconcile import CLOSED_MARGIN_MS
from broker.rest import RestClient, RestError
from schemas.bus import Source, StreamSpec
from schemas.rest import RestAccount, RestOrder
from schemas.upbit import AssetBalance, MyAsset, MyOrder

D = Decimal
DEADLINE = 5.0


def order(uuid: str, executed: str = "0") -> RestOrder:
    return RestOrder(
        uuid=uuid,
        side="bid",
        ord_type="limit",
        price=D("140000000"),
        state="wait",
        market="KRW-BTC",
        created_at="2025-07-04T15:00:00+09:00",
        volume=D("1.0"),
        remaining_volume=D("1.0") - D(executed),
        executed_volume=D(executed),
        trades_count=0,
    )


def account(currency: str, balance: str) -> RestAccount:
    return RestAccount(currency=currency, balance=D(balance), locked=D(0))


class FakeRest:
    """The calls the private fallback makes, answered from attributes."""

    def __init__(self) -> None:
        self.open: list[RestOrder] = [order("A")]
        self.accounts_answer: list[RestAccount] = [account("KRW", "1000000")]
        self.during_accounts: Callable[[], None] | None = None
        self.error: RestError | None = None
        """Raised by every call while set."""
        self.calls = 0
        self.closed_windows: list[tuple[int, int]] = []
        """``(start_ms, end_ms)`` of every closed-orders query."""

    async def open_orders(self) -> list[RestOrder]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return list(self.open)

    async def closed_orders(self, start_ms: int, end_ms: int) -> list[RestOrder]:
        self.closed_windows.append((start_ms, end_ms))
        return []

    async def accounts(self) -> list[RestAccount]:
        if self.during_accounts is not None:
            self.during_accounts()  # the stream delivers while the answer travels
            self.during_accounts = None
        return list(self.accounts_answer)

    async def order(self, uuid: str) -> RestOrder:
        return next(o for o in self.open if o.uuid == uuid)


class Announcements:
    def __init__(self) -> None:
        self.states: list[StatusState] = []

    def announce(self, link: str, state: StatusState, detail: str, *, status: bool = True) -> None:
        self.states.append(state)


class Streams:
    def all_streams(self) -> frozenset[StreamSpec]:
        return frozenset({StreamSpec("myOrder"), StreamSpec("myAsset")})

    def streams_of(self, client_id: str) -> frozenset[StreamSpec]:
        return self.all_streams()


class Bus:
    """The router's part: every private event goes through ``observe`` first."""

    def __init__(self) -> None:
        self.published: list[tuple[Any, Source]] = []
        self.fallback: PrivateFallback | None = None

    def route(self, event: Any, recv_ns: int, source: Source) -> None:
        assert self.fallback is not None
        if self.fallback.observe(event, source):
            self.published.append((event, source))

    def assets(self, source: Source) -> list[dict[str, Decimal]]:
        return [
            {a.currency: a.balance for a in ev.assets}
            for ev, src in self.published
            if isinstance(ev, MyAsset) and src == source
        ]


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def running(
    rest: FakeRest, bus: Bus, **options: Any
) -> tuple[PrivateFallback, asyncio.Task[None]]:
    fallback = PrivateFallback(
        Announcements(), Streams(), cast(RestClient, rest), bus.route, **options
    )
    bus.fallback = fallback
    task = asyncio.create_task(fallback.run())
    await until(lambda: fallback.state.open_uuids == ["A"], "the baseline")
    return fallback, task


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _ws_asset(currency: str, balance: str) -> MyAsset:
    return MyAsset(
        asset_uuid="ws",
        assets=[AssetBalance(currency=currency, balance=D(balance), locked=D(0))],
        asset_timestamp=1,
        timestamp=1,
    )


async def test_a_rest_answer_that_is_not_a_number_does_not_end_the_fallback() -> None:
    # "sNaN" decodes to Decimal('sNaN'); comparing it raises InvalidOperation, which
    # ended the task, and a failed task stops the whole broker.
    rest, bus = FakeRest(), Bus()
    fallback, task = await running(rest, bus, grace=0.0, interval=0.02, audit_interval=0)
    try:
        rest.accounts_answer = [account("KRW", "sNaN")]
        fallback.link_changed("down", time.monotonic())
        await until(lambda: fallback.failures >= 1 or task.done(), "a failed poll")
        assert not task.done()
        rest.accounts_answer = [account("KRW", "1000000")]
        rest.open = [order("A", executed="0.5")]
        await until(lambda: len(bus.published) == 1, "the fill, once REST answers sense")
        assert not task.done()
    finally:
        await stopped(task)


async def test_a_reconnect_read_raced_by_the_stream_still_reports_the_other_balances() -> None:
    # Audits off: the reconnect's REST read is the only reconciliation. The stream
    # reporting BTC while it ran must not cost the KRW change made during the outage.
    rest, bus = FakeRest(), Bus()
    fallback, task = await running(rest, bus, grace=60.0, audit_interval=0)
    try:
        fallback.link_changed("down", time.monotonic())
        await until(lambda: fallback.reconcile_pending, "the step to see the outage")
        rest.accounts_answer = [account("KRW", "900000"), account("BTC", "0.5")]
        rest.during_accounts = lambda: bus.route(_ws_asset("BTC", "0.5"), 0, "websocket")
        calls = rest.calls
        fallback.link_changed("up", time.monotonic())
        await until(lambda: fallback.reconciliations == 1, "the reconnect sync")
        assert rest.calls == calls + 1
        assert bus.assets("websocket") == [{"BTC": D("0.5")}]
        assert bus.assets("rest") == [{"KRW": D("900000")}]
    finally:
        await stopped(task)


async def test_an_audit_reports_what_the_stream_lost_once() -> None:
    rest, bus = FakeRest(), Bus()
    fallback, task = await running(rest, bus, audit_interval=1.0)
    try:
        rest.open = [order("A", executed="0.5")]
        await until(lambda: fallback.audits >= 1 and bool(bus.published), "an audit")
        assert [(ev.state, src) for ev, src in bus.published] == [("wait", "rest")]
        assert fallback.recovered == 1
        # The stream's late copy of the same progress is dropped.
        late = MyOrder(
            code="KRW-BTC",
            uuid="A",
            ask_bid="BID",
            order_type="limit",
            state="wait",
            executed_volume=D("0.5"),
            remaining_volume=D("0.5"),
            timestamp=1,
        )
        assert not fallback.observe(late)
    finally:
        await stopped(task)


async def test_a_stream_balance_that_contradicts_rest_brings_the_next_audit_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A reconnect published KRW 900,000 from REST; the stream then says 950,000: news,
    # or a value it held back from before the read. Only REST can tell, soon (regular
    # audits are an hour apart here).
    monkeypatch.setattr("broker.fallback.RACED_AUDIT_DELAY", 0.2)
    rest, bus = FakeRest(), Bus()
    fallback, task = await running(rest, bus, grace=60.0, audit_interval=3600.0)
    try:
        fallback.link_changed("down", time.monotonic())
        await until(lambda: fallback.reconcile_pending, "the step to see the outage")
        rest.accounts_answer = [account("KRW", "900000")]
        fallback.link_changed("up", time.monotonic())
        await until(lambda: bus.assets("rest") == [{"KRW": D("900000")}], "the reconnect sync")
        assert fallback.audits == 0
        assert fallback.observe(_ws_asset("KRW", "950000"))  # published: it may be news
        await until(lambda: fallback.audits == 1, "an audit brought forward")
        # REST still says 900,000: the stream's value was the older one, corrected.
        assert bus.assets("rest")[-1] == {"KRW": D("900000")}
        assert fallback.observe(_ws_asset("KRW", "900000")) is False  # a late copy
    finally:
        await stopped(task)


async def test_a_spent_nonce_is_a_failed_sync_not_rejected_keys() -> None:
    # A 401 nonce_used judges one replayed request; taking it for rejected keys would
    # report auth_failed to every private client and stop the keys for a minute.
    rest, bus = FakeRest(), Bus()
    announced = Announcements()
    fallback = PrivateFallback(
        announced,
        Streams(),
        cast(RestClient, rest),
        bus.route,
        grace=0.0,
        interval=0.02,
        audit_interval=0,
    )
    bus.fallback = fallback
    task = asyncio.create_task(fallback.run())
    try:
        await until(lambda: fallback.state.open_uuids == ["A"], "the baseline")
        rest.error = RestError(401, "nonce_used: spent", name="nonce_used")
        fallback.link_changed("down", time.monotonic())
        await until(lambda: fallback.failures >= 2, "failed polls")
        assert "auth_failed" not in announced.states
        rest.error = RestError(401, "jwt_verification: bad", name="jwt_verification")
        await until(lambda: "auth_failed" in announced.states, "the keys refused")
    finally:
        await stopped(task)


async def test_audits_go_on_after_rejected_keys_and_resume_when_they_work_again() -> None:
    # The audit that met a 401 must not stop the schedule for good: the keys are
    # tried again (once a minute in production, 0.2 s here) and audits carry on.
    rest, bus = FakeRest(), Bus()
    announced = Announcements()
    fallback = PrivateFallback(
        announced, Streams(), cast(RestClient, rest), bus.route, audit_interval=1.0,
        credentials=Credentials(retry=0.2),
    )  # fmt: skip
    bus.fallback = fallback
    task = asyncio.create_task(fallback.run())
    try:
        await until(lambda: fallback.state.open_uuids == ["A"], "the baseline")
        rest.error = RestError(401, "jwt_verification: bad", name="jwt_verification")
        await until(lambda: "auth_failed" in announced.states, "the keys refused")
        rest.error = None
        await until(lambda: fallback.audits >= 1, "an audit with the keys working again")
    finally:
        await stopped(task)


async def test_one_cancel_ends_the_fallback_even_in_the_turn_it_is_woken() -> None:
    # A stopping broker cancels each task once and waits for it. On Python 3.11,
    # asyncio.wait_for swallowed a cancel that came in the turn the awaited event was
    # set (here a link change), and the broker never stopped.
    rest, bus = FakeRest(), Bus()
    fallback, task = await running(rest, bus, audit_interval=3600.0)
    await asyncio.sleep(0.05)  # idle, waiting to be woken
    fallback.link_changed("down", time.monotonic())
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2.0)
    if not done:
        await stopped(task)  # (a second cancel gets through)
    assert done, "one cancel did not end the task"


@pytest.mark.parametrize("since_sync", [10.0, 7200.0])
async def test_an_outage_looks_back_to_the_last_sync_but_never_far(
    since_sync: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stream may have lost events in a stall nothing noticed before the link
    # dropped: closed orders are asked from the last REST sync that succeeded (minus
    # the query margin), not from the drop. But not from hours back when audits kept
    # failing: the remembered orders and fills cover only so much (VERIFIED_LAG_MAX).
    rest, bus = FakeRest(), Bus()
    fallback, task = await running(rest, bus, grace=60.0, audit_interval=3600.0)
    try:
        synced_ms = time.time() * 1000
        later = time.time() + since_sync
        monkeypatch.setattr(time, "time", lambda: later)
        fallback.link_changed("down", time.monotonic())
        await until(lambda: fallback.reconcile_pending, "the step to see the outage")
        fallback.link_changed("up", time.monotonic())
        await until(lambda: fallback.reconciliations == 1, "the reconnect sync")
        ((start_ms, end_ms),) = rest.closed_windows
        lag = min(since_sync, VERIFIED_LAG_MAX)
        expected = max(synced_ms, later * 1000 - VERIFIED_LAG_MAX * 1000) - CLOSED_MARGIN_MS
        assert start_ms == pytest.approx(expected, abs=1000), (since_sync, lag)
        assert end_ms == pytest.approx(later * 1000, abs=1000)
    finally:
        await stopped(task)
