"""Topic lifecycle: which topics are published, and what each upstream link must carry.

A pure core, no sockets: :class:`TopicLifecycle` owns the reference-counted
:class:`broker.subscriptions.SubscriptionState` and answers every change (a client
subscribes, unsubscribes or leaves; a link's upstream request changes) with a
:class:`TopicPlan` the broker carries out on its publisher, router and links.

A topic lives through three states::

    active ──last client releases it──▶ lingering ──its link stops carrying it──▶ retired
      ▲                                     │
      └────────── subscribed again ─────────┘

A released topic lingers (still published, its last value still cached) for as long as
Upbit still sends it: while requests are scarce a released stream stays in the request,
and a client subscribing again meanwhile gets its data and a snapshot at no cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from broker.subscriptions import SubscriptionState, UpstreamStream, carries, upstream_plan
from schemas.bus import ConnectionName, StreamSpec

__all__ = ["TopicLifecycle", "TopicPlan"]


@dataclass(frozen=True)
class TopicPlan:
    """What to do after one change, in this order.

    1. ``activate``: start publishing these topics (and claim a payload kept for them);
    2. ``retire``: stop publishing these streams' topics and forget their trade history;
    3. ``routed``: when not None, every stream whose data is routed now (wanted or
       lingering), for the orderbook depth fan-out;
    4. ``requests``: when not empty, what each link must carry from now on.
    """

    activate: tuple[str, ...] = ()
    retire: tuple[StreamSpec, ...] = ()
    routed: frozenset[StreamSpec] | None = None
    requests: Mapping[ConnectionName, frozenset[UpstreamStream]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True when nothing has to change."""
        return not (self.activate or self.retire or self.requests) and self.routed is None


class TopicLifecycle:
    """Active, lingering and retired topics, from reference counts and carried streams."""

    def __init__(self, state: SubscriptionState | None = None) -> None:
        self.state = state if state is not None else SubscriptionState()
        """The reference counts (read it freely; change it only through this class)."""
        self._lingering: set[StreamSpec] = set()

    @property
    def lingering(self) -> frozenset[StreamSpec]:
        """Released streams whose topics stay published while Upbit still sends them."""
        return frozenset(self._lingering)

    def wanted(self) -> frozenset[StreamSpec]:
        """Every stream at least one client holds."""
        return self.state.all_streams()

    # ------------------------------------------------------------------ client changes

    def subscribe(self, client: str, specs: Iterable[StreamSpec]) -> TopicPlan:
        """``client`` holds ``specs`` (normalized) from now on."""
        return self.apply(self.state.add(client, specs), ())

    def unsubscribe(self, client: str, specs: Iterable[StreamSpec]) -> TopicPlan:
        """``client`` releases ``specs``; streams nobody holds any more start lingering."""
        return self.apply((), self.state.remove(client, specs))

    def drop_client(self, client: str) -> TopicPlan:
        """``client`` is gone: release everything it held."""
        return self.apply((), self.state.drop_client(client))

    def apply(self, added: Iterable[StreamSpec], removed: Iterable[StreamSpec]) -> TopicPlan:
        """Streams whose reference count crossed zero (up: ``added``, down: ``removed``).

        A stream added again while it lingers is simply active again (its topic never
        stopped); a removed one lingers until :meth:`carried` shows its link dropped it.
        """
        activate: list[str] = []
        changed = False
        for spec in added:
            if spec in self._lingering:
                self._lingering.discard(spec)
            else:
                activate.append(spec.topic)
            changed = True
        for spec in removed:
            self._lingering.add(spec)
            changed = True
        if not changed:
            return TopicPlan()
        wanted = self.state.all_streams()
        plan = upstream_plan(wanted)
        return TopicPlan(
            activate=tuple(activate),
            routed=wanted | self._lingering,
            requests={"public": frozenset(plan.public), "private": frozenset(plan.private)},
        )

    # ------------------------------------------------------------------ upstream changes

    def carried(self, link: ConnectionName, streams: frozenset[UpstreamStream]) -> TopicPlan:
        """``link``'s upstream request now carries ``streams``: retire what it dropped."""
        private = link == "private"
        retired = tuple(
            sorted(
                (
                    spec
                    for spec in self._lingering
                    if spec.is_private == private and not carries(streams, spec)
                ),
                key=lambda spec: spec.topic,
            )
        )
        if not retired:
            return TopicPlan()
        self._lingering.difference_update(retired)
        return TopicPlan(retire=retired, routed=self.state.all_streams() | self._lingering)
