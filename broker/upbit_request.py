"""Upbit's request message, built for its overwrite semantics (docs/PROTOCOL.md §2).

Every request replaces the connection's whole subscription, so each one lists every
upstream stream. Each request would also re-send a snapshot of every stream, so streams
that already flow are marked ``"is_only_realtime": true`` and only new ones get a
snapshot; a type whose codes are partly new is split into two objects (Upbit accepts
several objects of one type). Output is deterministic (objects and codes sorted) so a
test or a log can compare it as a string.

Decisions: orderbook codes carry ``.N`` only below the default depth 30 (``KRW-BTC.5``);
``level`` is sent only when non-zero; flags are snake_case, which docs/PROTOCOL.md §2.2 says
clients should prefer; ``myOrder`` on all markets and ``myAsset`` carry no ``codes``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Final

import msgspec

from broker.subscriptions import DEFAULT_DEPTH, UpstreamStream
from schemas.bus import PUBLIC_STREAM_TYPES
from schemas.upbit import SubscriptionEntry, SubscriptionList

__all__ = [
    "FORMATS",
    "build_list_subscriptions",
    "build_request",
    "parse_list_subscriptions",
    "subscription_mismatch",
    "wire_code",
]

FORMATS: Final = frozenset({"DEFAULT", "SIMPLE", "JSON_LIST", "SIMPLE_LIST"})
_encode = msgspec.json.Encoder().encode


def wire_code(stream: UpstreamStream) -> str:
    """The code as Upbit expects it in ``codes``: ``KRW-BTC``, or ``KRW-BTC.5`` for depth 5."""
    if stream.code is None:
        raise ValueError(f"{stream.type} stream has no code")
    if stream.type == "orderbook" and stream.depth is not None and stream.depth < DEFAULT_DEPTH:
        return f"{stream.code}.{stream.depth}"
    return stream.code


def _wire_level(level: float) -> int | float:
    return int(level) if level.is_integer() else level


def build_request(
    plan_streams: Sequence[UpstreamStream],
    *,
    new: Collection[UpstreamStream],
    ticket: str,
    fmt: str = "DEFAULT",
) -> str:
    """The JSON text of one request subscribing all of ``plan_streams`` on one connection.

    Streams in ``new`` get a snapshot; the others are ``is_only_realtime`` (public types
    only: private types have no snapshot). Raises ValueError for an empty plan (Upbit has
    no unsubscribe: close the connection instead), a plan mixing public and private
    streams (they live on different connections), an empty ticket or an unknown format.
    """
    if not plan_streams:
        raise ValueError("nothing to subscribe: Upbit has no unsubscribe, close the connection")
    if len({s.is_private for s in plan_streams}) > 1:
        raise ValueError("a request serves one connection: do not mix public and private streams")
    if not ticket:
        raise ValueError("ticket must be a non-empty string")
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {sorted(FORMATS)}")

    # (type, level, realtime_only) -> codes; None codes = an object without "codes".
    groups: dict[tuple[str, float, bool], set[str] | None] = {}
    for stream in plan_streams:
        realtime_only = stream.type in PUBLIC_STREAM_TYPES and stream not in new
        key = (stream.type, float(stream.level or 0.0), realtime_only)
        if stream.code is None:
            groups[key] = None  # myAsset, or myOrder on every market (covers any code)
        elif key not in groups:
            groups[key] = {wire_code(stream)}
        else:
            codes = groups[key]
            if codes is not None:
                codes.add(wire_code(stream))

    message: list[dict[str, object]] = [{"ticket": ticket}]
    for (type_, level, realtime_only), codes in sorted(groups.items()):
        obj: dict[str, object] = {"type": type_}
        if codes is not None:
            obj["codes"] = sorted(codes)
        if level:
            obj["level"] = _wire_level(level)
        if realtime_only:
            obj["is_only_realtime"] = True
        message.append(obj)
    message.append({"format": fmt})
    return _encode(message).decode()


def build_list_subscriptions(ticket: str) -> str:
    """The LIST_SUBSCRIPTIONS request (it costs one WebSocket message token)."""
    if not ticket:
        raise ValueError("ticket must be a non-empty string")
    return _encode([{"ticket": ticket}, {"method": "LIST_SUBSCRIPTIONS"}]).decode()


def parse_list_subscriptions(
    result: SubscriptionList | Iterable[SubscriptionEntry],
) -> set[UpstreamStream]:
    """Upbit's LIST_SUBSCRIPTIONS answer as upstream streams, to compare with the plan.

    Orderbook codes give their depth from a ``.N`` suffix; without one the depth is None
    ("not stated": whether Upbit echoes the suffix is unconfirmed), which
    :func:`subscription_mismatch` treats as matching any depth.
    """
    entries = result.result if isinstance(result, SubscriptionList) else result
    streams: set[UpstreamStream] = set()
    for entry in entries:
        if entry.type == "myAsset":
            streams.add(UpstreamStream("myAsset"))
        elif not entry.codes:
            # myOrder without codes covers every market; a public type without codes
            # subscribes nothing, but is kept visible for the comparison.
            streams.add(UpstreamStream(entry.type))
        elif entry.type == "orderbook":
            level = float(entry.level or 0.0)
            for raw in entry.codes:
                code, _, suffix = raw.partition(".")
                depth = int(suffix) if suffix.isdigit() else None
                streams.add(UpstreamStream("orderbook", code, depth, level))
        else:
            streams.update(UpstreamStream(entry.type, code) for code in entry.codes)
    return streams


def _loose(stream: UpstreamStream) -> UpstreamStream:
    return msgspec.structs.replace(stream, depth=None)


def subscription_mismatch(
    intended: Iterable[UpstreamStream], listed: Iterable[UpstreamStream]
) -> tuple[frozenset[UpstreamStream], frozenset[UpstreamStream]]:
    """``(missing, unexpected)``: streams intended but not listed, and listed but not intended.

    A listed orderbook without a stated depth matches the intended one of any depth.
    Both empty means Upbit serves exactly what the broker asked for.
    """
    want = frozenset(intended)
    have = frozenset(listed)
    want_loose = frozenset(_loose(s) for s in want if s.type == "orderbook")
    missing = frozenset(
        s for s in want if s not in have and not (s.type == "orderbook" and _loose(s) in have)
    )
    unexpected = frozenset(
        s
        for s in have
        if s not in want and not (s.type == "orderbook" and s.depth is None and s in want_loose)
    )
    return missing, unexpected
