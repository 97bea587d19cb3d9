"""The narrow interfaces the broker's components are handed instead of the whole broker.

:mod:`broker.app` composes the process; the control plane, the REST fallbacks, health
and snapshots each receive only the :class:`typing.Protocol` they need, so none of them
knows the broker (no import of :mod:`broker.app`, not even for typing) and each can be
tested with a small fake. Every protocol here describes what a component *uses*; the
concrete objects (links, router, publisher, the broker itself) satisfy them as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast, get_args

from broker.subscriptions import UpstreamStream
from schemas.bus import (
    AccountQuery,
    CancelOrder,
    ConnectionName,
    Envelope,
    ErrorReply,
    Health,
    Metrics,
    OrderReply,
    PlaceOrder,
    Quote,
    QuoteReply,
    Source,
    StatusState,
    StreamSpec,
)
from schemas.upbit import UpbitData

__all__ = [
    "Announcer",
    "BrokerStatus",
    "LastValues",
    "LinkStatsView",
    "LinkView",
    "LinkWatcher",
    "MarketList",
    "MonitorCounters",
    "Monitored",
    "QuoteService",
    "Route",
    "SnapshotSource",
    "StatusState",
    "StreamsView",
    "Subscriptions",
    "TradingService",
    "status_state",
]


_STATUS_STATES: frozenset[str] = frozenset(get_args(StatusState))

LINK_OK_STATES: frozenset[StatusState] = frozenset({"up", "restored", "idle"})
"""Link states in which the link carries (or has nothing to carry): no fallback needed."""


def status_state(value: str) -> StatusState:
    """``value`` as a status state; ValueError for anything else (a programming error)."""
    if value not in _STATUS_STATES:
        raise ValueError(f"not a status state: {value!r}")
    return cast(StatusState, value)


Route = Callable[[UpbitData, int, Source], None]
"""``(payload, recv_ns, source)``: publish one payload as if it had just arrived."""


class Announcer(Protocol):
    """Publishes status events about a link (to its status topic and its data topics)."""

    def announce(
        self, link: ConnectionName, state: StatusState, detail: str, *, status: bool = True
    ) -> None:
        """Tell every client of ``link`` that it is in ``state``."""
        ...


class StreamsView(Protocol):
    """Read access to what clients hold."""

    def all_streams(self) -> frozenset[StreamSpec]:
        """Every stream at least one client holds."""
        ...

    def streams_of(self, client_id: str) -> frozenset[StreamSpec]:
        """The streams one client holds."""
        ...


class LinkWatcher(Protocol):
    """Reacts to a link's state changes and to changes of what clients hold."""

    def link_changed(self, state: StatusState, now: float) -> None:
        """The watched link reported ``state`` at monotonic time ``now``."""
        ...

    def streams_changed(self) -> None:
        """The set of streams clients hold changed."""
        ...


class LinkStatsView(Protocol):
    """The counters of one upstream link that health and metrics read."""

    @property
    def state(self) -> str:
        """The link's own state (idle, connecting, up, down)."""
        ...

    @property
    def since(self) -> float:
        """Wall-clock time of the last state change."""
        ...

    @property
    def reconnects(self) -> int:
        """Connections lost while streams were wanted."""
        ...

    @property
    def last_frame_at(self) -> float | None:
        """Wall-clock time of the last frame received."""
        ...

    @property
    def upstream_errors(self) -> int:
        """Errors Upbit answered requests with."""
        ...


class LinkView(Protocol):
    """Read access to one upstream link."""

    @property
    def stats(self) -> LinkStatsView:
        """Its counters."""
        ...

    @property
    def carried(self) -> Collection[UpstreamStream]:
        """What Upbit sends on it now."""
        ...

    @property
    def is_up(self) -> bool:
        """True while connected."""
        ...

    def requests_left(self, now: float) -> int:
        """Subscription requests its budget still allows this minute."""
        ...


class LastValues(Protocol):
    """The publisher's last-value cache."""

    def last_values(self, topics: Iterable[str]) -> list[Envelope]:
        """The cached last envelope of each of ``topics`` that has one."""
        ...

    def journal(self, topics: Iterable[str]) -> list[Envelope]:
        """Every private message kept on (or under) ``topics``, oldest first."""
        ...

    def journal_cut(self, topics: Iterable[str]) -> list[str]:
        """Topics on (or under) ``topics`` whose replay misses their oldest messages."""
        ...


class SnapshotSource(LastValues, Protocol):
    """Current values on demand: the last-value cache, and REST for what it lacks."""

    async def fetch(self, specs: Sequence[StreamSpec]) -> tuple[list[Envelope], list[str]]:
        """Envelopes for ``specs`` and the topics that have no value at all."""
        ...


class MarketList(Protocol):
    """The market codes Upbit lists, once they are known."""

    @property
    def markets(self) -> frozenset[str] | None:
        """Every listed market code; None until the list has been loaded once."""
        ...

    async def wait_markets(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the list; True once it is known."""
        ...


class QuoteService(Protocol):
    """Runs a client's quotation REST call (market list, candles, ...) under the host's
    limits (:class:`broker.gateway.Gateway`)."""

    async def answer(self, message: Quote) -> QuoteReply | ErrorReply:
        """The reply to ``message``: the items, or why the request was refused."""
        ...


class TradingService(Protocol):
    """Runs a client's account read, placement or cancel with the broker's keys
    (:class:`broker.trading.Trading`)."""

    def refusal(self, message: AccountQuery | PlaceOrder | CancelOrder) -> ErrorReply | None:
        """Why ``message`` is refused at once (no keys, trading off), else None."""
        ...

    async def answer(
        self, message: AccountQuery | PlaceOrder | CancelOrder, owner: str = ""
    ) -> OrderReply | ErrorReply:
        """The reply to ``message`` (for client ``owner``): Upbit's answer, or why the
        request failed."""
        ...


class Subscriptions(Protocol):
    """Changes what clients hold (validated specs only) and forgets clients."""

    def subscribe(self, client_id: str, specs: Sequence[StreamSpec]) -> None:
        """``client_id`` holds ``specs`` from now on; their topics are published."""
        ...

    def unsubscribe(self, client_id: str, specs: Sequence[StreamSpec]) -> None:
        """``client_id`` releases ``specs``."""
        ...

    def drop_client(self, client_id: str) -> None:
        """Forget a client and release every stream it held."""
        ...

    def held(self, client_id: str) -> frozenset[StreamSpec]:
        """The streams ``client_id`` holds now (for its quota)."""
        ...


class BrokerStatus(Protocol):
    """What the broker can tell about itself."""

    def is_available(self, private: bool) -> bool:
        """Whether the public (private) side can deliver data right now."""
        ...

    def private_refusal(self) -> str | None:
        """Why private streams cannot be served for now (rejected keys), else None."""
        ...

    def health(self) -> Health:
        """The broker's health right now."""
        ...

    def metrics(self) -> Metrics:
        """The broker's metrics right now."""
        ...


@dataclass(frozen=True, slots=True)
class MonitorCounters:
    """Running totals the monitoring endpoint reads beside health and metrics.

    Every key is from a small fixed set (stream types, REST groups, link names), never a
    market code, so each becomes a bounded Prometheus label.
    """

    messages_by_type: Mapping[str, int]
    """Messages routed per stream type (WebSocket and REST)."""
    rest_calls: Mapping[str, int]
    """REST requests sent per rate-limit group."""
    rest_waits: Mapping[str, int]
    """REST requests that queued for a slot, per group."""
    rest_wait_seconds: Mapping[str, float]
    """Seconds REST requests queued, per group."""
    rest_throttled: Mapping[tuple[str, int], int]
    """``(group, status)`` -> 429 and 418 answers."""
    upstream_errors: Mapping[str, int]
    """Errors Upbit answered requests with, per link."""
    decode_errors: int
    duplicates: int
    """Trades dropped as already published (the same trade over WebSocket and REST)."""
    send_errors: int
    """Envelopes the data socket refused."""
    private_duplicates: int = 0
    """Private WebSocket events dropped as already published by REST reconciliation."""
    private_recovered: int = 0
    """Private events a periodic REST audit found the live WebSocket had not delivered."""


class Monitored(Protocol):
    """What the monitoring endpoint reads: health, metrics and the raw counters."""

    def health(self) -> Health:
        """The broker's health right now."""
        ...

    def metrics(self) -> Metrics:
        """The broker's metrics right now."""
        ...

    def counters(self) -> MonitorCounters:
        """The running totals behind the metrics."""
        ...
