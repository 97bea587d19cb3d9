"""Who wants which stream, and the one subscription that serves them all upstream.

Upbit allows one subscription per connection and every new request replaces the last,
so the broker keeps every client's wants here and derives from them the single set of
upstream streams to request. The path a client's subscribe takes:

1. :func:`normalize_spec` validates a :class:`~schemas.bus.StreamSpec` and puts it in
   canonical form (uppercase code, explicit orderbook depth and level), so two clients
   asking for the same stream hold *equal* specs.
2. :class:`SubscriptionState` counts references across clients; ``add``/``remove``
   report streams that appeared or disappeared.
3. :func:`upstream_plan` merges all streams into an :class:`UpstreamPlan` (one
   orderbook per code and level at the deepest depth wanted); when it differs from the
   last plan, :mod:`broker.upbit_request` turns it into Upbit's request.
4. On the way back, :func:`fan_out_orderbook_depths` and :func:`fan_out_orderbook`
   publish one upstream book at every depth clients asked for.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable
from typing import Final

import msgspec

from schemas.bus import (
    ALL_STREAM_TYPES,
    DEFAULT_ORDERBOOK_DEPTH,
    ORDERBOOK_DEPTHS,
    PRIVATE_STREAM_TYPES,
    ErrorCode,
    StreamSpec,
)
from schemas.upbit import Orderbook

__all__ = [
    "DEFAULT_DEPTH",
    "PRIVATE_UNAVAILABLE_MESSAGE",
    "SpecError",
    "SubscriptionState",
    "UpstreamPlan",
    "UpstreamStream",
    "carries",
    "fan_out_orderbook_depths",
    "normalize_code",
    "normalize_spec",
    "orderbook_key",
    "request_target",
    "spec_sort_key",
    "truncate_orderbook",
    "upstream_plan",
    "widen_request",
]

DEFAULT_DEPTH: Final = DEFAULT_ORDERBOOK_DEPTH
"""Orderbook depth Upbit sends without a ``.N`` suffix."""
PRIVATE_UNAVAILABLE_MESSAGE: Final = "private streams need UPBIT_ACCESS_KEY and UPBIT_SECRET_KEY"
_CODE_RE: Final = re.compile(r"[A-Z0-9]+-[A-Z0-9]+")
_SUFFIX_RE: Final = re.compile(r"[A-Za-z0-9]+-[A-Za-z0-9]+\.(\d+)")

OrderbookKey = tuple[str, float]
"""``(code, level)``: what one upstream orderbook stream is keyed by."""


class SpecError(ValueError):
    """A stream spec the broker refuses; ``code`` is the bus error code to reply with.

    The message names the offending value, e.g. "invalid market code 'KRW_BTC'".
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


# ---------------------------------------------------------------------------- validation


def normalize_code(code: str, markets: Collection[str] | None = None) -> str:
    """``code`` in Upbit's form (``QUOTE-BASE``, uppercase); lowercase input is accepted.

    Raises :class:`SpecError` ``invalid_code`` for a malformed code and ``unknown_code``
    for one not in ``markets`` (skipped when ``markets`` is None: the list is unknown).
    """
    upper = code.upper() if code.isascii() else code
    if not _CODE_RE.fullmatch(upper):
        suffix = _SUFFIX_RE.fullmatch(code)
        hint = f": use depth={suffix.group(1)} instead of a '.N' suffix" if suffix else ""
        raise SpecError(
            "invalid_code",
            f"invalid market code {code!r}, expected QUOTE-BASE like 'KRW-BTC'{hint}",
        )
    if markets is not None and upper not in markets:
        raise SpecError("unknown_code", f"unknown market code {upper!r}: Upbit does not list it")
    return upper


def _normalize_depth(depth: int | None) -> int:
    if depth is None:
        return DEFAULT_DEPTH
    if isinstance(depth, bool) or depth not in ORDERBOOK_DEPTHS:
        raise SpecError(
            "invalid_option",
            f"orderbook depth {depth!r} not supported, use one of {list(ORDERBOOK_DEPTHS)}",
        )
    return depth


ORDERBOOK_LEVELS: frozenset[float] = frozenset({0.0, *(10.0**k for k in range(-7, 9))})
"""Grouping levels Upbit documents: 0 (none) and the powers of ten from 0.0000001 to
100000000 (docs/PROTOCOL.md section 2.4). Which of them a market serves depends on its
tick size; an unserved one yields no data, so only these can reach a shared request,
and one client's absurd level can never make Upbit refuse everyone's."""


def _normalize_level(level: float | None, code: str) -> float:
    if level is None:
        return 0.0
    if isinstance(level, bool) or not math.isfinite(level) or level < 0:
        raise SpecError("invalid_option", f"orderbook level {level!r} must be a finite number >= 0")
    canonical = next((lv for lv in ORDERBOOK_LEVELS if math.isclose(lv, level)), None)
    if canonical is None:
        raise SpecError(
            "invalid_option",
            f"orderbook level {level!r} is not one Upbit groups by: 0 or a power of ten "
            "from 0.0000001 to 100000000",
        )
    level = canonical
    if level and not code.startswith("KRW-"):
        raise SpecError(
            "invalid_option",
            f"orderbook level {level!r} on {code!r}: grouping levels exist on KRW markets only",
        )
    return float(level)


def normalize_spec(
    spec: StreamSpec, *, markets: Collection[str] | None, private_available: bool
) -> StreamSpec:
    """Validate ``spec`` and return its canonical form, or raise :class:`SpecError`.

    Canonical: code uppercased; orderbook depth explicit (None becomes 30) and level
    explicit (None becomes 0.0), so equal streams compare equal; other types carry no
    depth or level. ``markets`` is Upbit's market list (None: not known yet, only the
    syntax is checked). Private types need ``private_available`` (API keys configured).
    """
    type_ = spec.type
    if type_ not in ALL_STREAM_TYPES:
        known = ", ".join(sorted(ALL_STREAM_TYPES))
        raise SpecError("unknown_type", f"unknown stream type {type_!r}; known: {known}")
    if type_ in PRIVATE_STREAM_TYPES and not private_available:
        raise SpecError("private_unavailable", PRIVATE_UNAVAILABLE_MESSAGE)
    if type_ != "orderbook" and (spec.depth is not None or spec.level is not None):
        raise SpecError("invalid_option", f"depth and level apply to orderbook only, not {type_}")
    if type_ == "myAsset":
        if spec.code is not None:
            raise SpecError("invalid_option", f"myAsset takes no market code, got {spec.code!r}")
        return StreamSpec("myAsset")
    if spec.code is None:
        if type_ == "myOrder":
            return StreamSpec("myOrder")
        raise SpecError("invalid_code", f"{type_} needs a market code like 'KRW-BTC'")
    code = normalize_code(spec.code, markets)
    if type_ == "orderbook":
        return StreamSpec(
            type_, code, _normalize_depth(spec.depth), _normalize_level(spec.level, code)
        )
    return StreamSpec(type_, code)


def spec_sort_key(spec: StreamSpec) -> tuple[str, str, float, int]:
    """A total order on specs (None sorts first) for deterministic output."""
    return (spec.type, spec.code or "", spec.level or 0.0, spec.depth or 0)


# ---------------------------------------------------------------------------- refcounts


class SubscriptionState:
    """Every client's streams and a reference count per stream across clients.

    Pass specs through :func:`normalize_spec` first: equality decides sharing.
    Subscribing a stream a client already holds is a no-op (a client holds a stream
    once, however often it asks), and removing one it does not hold is ignored, so a
    retried request is harmless. A client with no streams left is forgotten.
    """

    def __init__(self) -> None:
        self._by_client: dict[str, set[StreamSpec]] = {}
        self._refs: dict[StreamSpec, int] = {}

    def add(self, client_id: str, specs: Iterable[StreamSpec]) -> list[StreamSpec]:
        """Give ``client_id`` these streams; returns those nobody held before (0 -> 1)."""
        held = self._by_client.setdefault(client_id, set())
        appeared: list[StreamSpec] = []
        for spec in specs:
            if spec in held:
                continue
            held.add(spec)
            count = self._refs.get(spec, 0)
            self._refs[spec] = count + 1
            if count == 0:
                appeared.append(spec)
        if not held:
            del self._by_client[client_id]
        return appeared

    def remove(self, client_id: str, specs: Iterable[StreamSpec]) -> list[StreamSpec]:
        """Release these streams of ``client_id``; returns those nobody holds now (1 -> 0)."""
        held = self._by_client.get(client_id)
        if held is None:
            return []
        gone: list[StreamSpec] = []
        for spec in specs:
            if spec not in held:
                continue
            held.discard(spec)
            if self._release(spec):
                gone.append(spec)
        if not held:
            del self._by_client[client_id]
        return gone

    def drop_client(self, client_id: str) -> list[StreamSpec]:
        """Release everything ``client_id`` held (bye, expiry); returns streams now unheld."""
        held = self._by_client.pop(client_id, set())
        gone = [spec for spec in held if self._release(spec)]
        gone.sort(key=spec_sort_key)
        return gone

    def _release(self, spec: StreamSpec) -> bool:
        count = self._refs[spec] - 1
        if count:
            self._refs[spec] = count
            return False
        del self._refs[spec]
        return True

    def streams_of(self, client_id: str) -> frozenset[StreamSpec]:
        """The streams ``client_id`` holds (empty when unknown)."""
        return frozenset(self._by_client.get(client_id, ()))

    def all_streams(self) -> frozenset[StreamSpec]:
        """Every stream at least one client holds."""
        return frozenset(self._refs)

    def clients(self) -> list[str]:
        """Clients holding at least one stream."""
        return list(self._by_client)

    def refcount(self, spec: StreamSpec) -> int:
        """How many clients hold ``spec``."""
        return self._refs.get(spec, 0)

    @property
    def stream_count(self) -> int:
        """Distinct streams held."""
        return len(self._refs)

    @property
    def subscription_count(self) -> int:
        """(client, stream) pairs: the sum of all reference counts."""
        return sum(self._refs.values())

    @property
    def client_count(self) -> int:
        """Clients holding at least one stream."""
        return len(self._by_client)


# -------------------------------------------------------------------------- upstream plan


class UpstreamStream(msgspec.Struct, frozen=True):
    """One stream as requested from Upbit.

    ``code`` is None for ``myAsset`` and for ``myOrder`` on all markets. ``depth`` and
    ``level`` are set for ``orderbook`` only (depth is the deepest any client wants).
    """

    type: str
    code: str | None = None
    depth: int | None = None
    level: float | None = None

    @property
    def is_private(self) -> bool:
        """True for streams served by the private (JWT) connection."""
        return self.type in PRIVATE_STREAM_TYPES

    def sort_key(self) -> tuple[str, str, float, int]:
        """A total order (None sorts first) for deterministic requests."""
        return (self.type, self.code or "", self.level or 0.0, self.depth or 0)


class UpstreamPlan(msgspec.Struct, frozen=True):
    """What must be requested upstream, split by connection, sorted.

    A comparable value: "did the request change?" is ``plan != last_plan``.
    """

    public: tuple[UpstreamStream, ...] = ()
    private: tuple[UpstreamStream, ...] = ()

    @property
    def streams(self) -> tuple[UpstreamStream, ...]:
        """All upstream streams, public first."""
        return self.public + self.private

    @property
    def is_empty(self) -> bool:
        """True when nothing needs requesting."""
        return not self.public and not self.private

    def new_since(self, previous: UpstreamPlan | None) -> frozenset[UpstreamStream]:
        """Streams in this plan but not in ``previous``: those that need a snapshot."""
        if previous is None:
            return frozenset(self.streams)
        return frozenset(self.streams) - frozenset(previous.streams)


def upstream_plan(streams: Iterable[StreamSpec]) -> UpstreamPlan:
    """Merge every client stream (normalized) into the upstream streams that serve them.

    Orderbook: one stream per (code, level) at the deepest depth wanted, since a deeper
    book truncates to every shallower one. myOrder: all markets (no code) if any client
    wants all, else the union of codes. Other types: the union of codes per type.
    """
    orderbooks: dict[OrderbookKey, int] = {}
    order_codes: set[str] = set()
    order_all = False
    upstream: set[UpstreamStream] = set()
    for spec in streams:
        if spec.type == "orderbook":
            assert spec.code is not None
            key = (spec.code, float(spec.level or 0.0))
            depth = spec.depth or DEFAULT_DEPTH
            orderbooks[key] = max(orderbooks.get(key, 0), depth)
        elif spec.type == "myOrder":
            if spec.code is None:
                order_all = True
            else:
                order_codes.add(spec.code)
        elif spec.type == "myAsset":
            upstream.add(UpstreamStream("myAsset"))
        else:
            upstream.add(UpstreamStream(spec.type, spec.code))
    upstream.update(UpstreamStream("orderbook", c, d, lv) for (c, lv), d in orderbooks.items())
    if order_all:
        upstream.add(UpstreamStream("myOrder"))
    else:
        upstream.update(UpstreamStream("myOrder", code) for code in order_codes)
    ordered = sorted(upstream, key=UpstreamStream.sort_key)
    return UpstreamPlan(
        public=tuple(s for s in ordered if not s.is_private),
        private=tuple(s for s in ordered if s.is_private),
    )


# ----------------------------------------------------------------------- orderbook fan-out


def fan_out_orderbook_depths(streams: Iterable[StreamSpec]) -> dict[OrderbookKey, tuple[int, ...]]:
    """For each upstream orderbook ``(code, level)``, the depths to publish, deepest first.

    The first depth is the one requested upstream; the data path builds one table per
    plan change and looks each arriving book up with :func:`orderbook_key`.
    """
    depths: dict[OrderbookKey, set[int]] = {}
    for spec in streams:
        if spec.type == "orderbook" and spec.code is not None:
            key = (spec.code, float(spec.level or 0.0))
            depths.setdefault(key, set()).add(spec.depth or DEFAULT_DEPTH)
    return {key: tuple(sorted(ds, reverse=True)) for key, ds in depths.items()}


def orderbook_key(ob: Orderbook) -> OrderbookKey:
    """The ``(code, level)`` an arriving book belongs to (a ``.N`` echo is ignored)."""
    return (ob.code.partition(".")[0], float(ob.level or 0.0))


def truncate_orderbook(ob: Orderbook, depth: int) -> Orderbook:
    """``ob`` cut to its best ``depth`` levels, totals recomputed over the levels kept.

    A book already that shallow comes back unchanged (its totals are Upbit's own).
    """
    units = ob.orderbook_units
    if len(units) <= depth:
        return ob
    kept = units[:depth]
    return msgspec.structs.replace(
        ob,
        orderbook_units=kept,
        total_ask_size=math.fsum(u.ask_size for u in kept),
        total_bid_size=math.fsum(u.bid_size for u in kept),
    )


def widen_request(
    target: frozenset[UpstreamStream],
    sent: frozenset[UpstreamStream] | None,
    *,
    markets: Collection[str],
    types: Collection[str],
    limit: int,
) -> frozenset[UpstreamStream]:
    """``target`` plus the siblings of its new streams: the same stream, every market.

    Upbit charges per request (100 a minute per connection), not per code, so while
    requests are scarce a request that adds ``ticker`` of ``KRW-XRP`` may as well carry
    ``ticker`` of every ``KRW-`` market: the next code a client wants is then already
    flowing and costs no request at all (nobody's topic sees the extra data; the router
    drops it, keeping only the latest value for a future subscriber). Only streams of
    ``types`` widen, never orderbooks (depth and level make them per-client and every
    market's books cost far more), never onto a (type, code) already in ``target``, and
    at most ``limit`` streams are added, so the request stays bounded.
    """
    quotes = sorted(
        {
            (stream.type, stream.code.split("-", 1)[0] + "-")
            for stream in target - (sent or frozenset())
            if stream.type in types
            and stream.type != "orderbook"
            and stream.code is not None
            and "-" in stream.code
        }
    )
    if not quotes or limit <= 0:
        return target
    taken = {(s.type, s.code) for s in target}
    added: list[UpstreamStream] = []
    for type_, quote in quotes:
        for market in sorted(markets):
            if market.startswith(quote) and (type_, market) not in taken:
                taken.add((type_, market))
                added.append(UpstreamStream(type_, market))
                if len(added) >= limit:
                    return target.union(added)
    return target.union(added)


def carries(carried: frozenset[UpstreamStream], spec: StreamSpec) -> bool:
    """Whether an upstream request that carries ``carried`` delivers ``spec``'s data."""
    for stream in carried:
        if stream.type != spec.type:
            continue
        if spec.type == "orderbook":
            if (
                stream.code == spec.code
                and (stream.level or 0.0) == (spec.level or 0.0)
                and (stream.depth or DEFAULT_DEPTH) >= (spec.depth or DEFAULT_DEPTH)
            ):
                return True
        elif stream.code == spec.code or (spec.type == "myOrder" and stream.code is None):
            return True
    return False


def request_target(
    wanted: frozenset[UpstreamStream],
    sent: frozenset[UpstreamStream] | None,
    *,
    headroom: int,
    min_headroom: int = 45,
    max_lingering: int = 300,
) -> frozenset[UpstreamStream]:
    """What one connection's next request should ask for.

    Upbit has no unsubscribe, so dropping a stream costs a full request from a budget of
    100 a minute. With at least ``min_headroom`` requests left this minute that is
    affordable and the answer is ``wanted``. Below it, streams already ``sent`` but no
    longer wanted stay in the request (their data is simply not published) so the
    budget goes to additions, and a stream re-subscribed meanwhile costs nothing; at
    most ``max_lingering`` are kept, and never next to a wanted stream of the same
    (type, code, level), since Upbit's handling of one code twice is unknown.
    """
    if not sent or headroom >= min_headroom:
        return wanted
    keys = {(s.type, s.code, s.level) for s in wanted}
    extras = sorted(
        (s for s in sent - wanted if (s.type, s.code, s.level) not in keys),
        key=lambda s: (s.type, s.code or "", s.depth or 0, s.level or 0.0),
    )
    return wanted.union(extras[:max_lingering])
