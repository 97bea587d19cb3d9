"""Health and metrics, computed on request from the counters the broker keeps.

Health follows the original design: ``healthy`` when every configured upstream link is
up, ``degraded`` when one is reconnecting or served by REST, ``critical`` when the
public link has been down for longer than ``CRITICAL_AFTER`` seconds. Both functions
read only what they are handed (links as :class:`broker.ports.LinkView`, counters as
numbers), never the broker. :func:`health_reasons` and :func:`http_status` turn a health
into what people and probes read: why it is not healthy, and the HTTP status of
``/health`` (critical is 503; degraded stays 200, since data still flows).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from broker.liveness import ClientInfo
from broker.ports import LinkView
from schemas.bus import ConnectionHealth, HandlerMetrics, Health, Metrics

__all__ = [
    "CRITICAL_AFTER",
    "RateMeter",
    "compute_health",
    "compute_metrics",
    "health_reasons",
    "http_status",
    "rss_mb",
]

CRITICAL_AFTER = 30.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


class RateMeter:
    """Messages per second over the last completed interval of at least one second."""

    def __init__(self, now: float) -> None:
        self.per_second = 0.0
        self._count = 0
        self._time = now

    def update(self, count: int, now: float) -> None:
        """Feed the running total; the rate changes once a second."""
        elapsed = now - self._time
        if elapsed >= 1.0:
            self.per_second = (count - self._count) / elapsed
            self._count, self._time = count, now


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return 0.0


def _link_health(link: LinkView, on_rest: bool) -> ConnectionHealth:
    stats = link.stats
    return ConnectionHealth(
        state=stats.state,
        source="rest" if on_rest else "websocket",
        since=stats.since,
        reconnects=stats.reconnects,
        last_message_timestamp=stats.last_frame_at,
        carried_streams=len(link.carried),
        requests_left=link.requests_left(time.monotonic()) if link.is_up else None,
    )


def compute_health(
    public: LinkView,
    private: LinkView | None,
    *,
    public_on_rest: bool,
    private_on_rest: bool,
    active_subscriptions: int,
    decode_errors: int,
    started: float,
    epoch: str,
    now: float,
) -> Health:
    """The broker's health at wall-clock time ``now``, from its links and counters."""
    links = [public] if private is None else [public, private]
    states = [link.stats.state for link in links]
    status: Literal["healthy", "degraded", "critical"] = "healthy"
    if any(s in ("down", "connecting", "auth_failed") for s in states):
        status = "degraded"
    if public.stats.state in ("down", "connecting") and now - public.stats.since > CRITICAL_AFTER:
        status = "critical"
    last = max((link.stats.last_frame_at or 0.0 for link in links), default=0.0) or None
    quality: Literal["excellent", "good", "poor"] = "excellent"
    reconnects = sum(link.stats.reconnects for link in links)
    if status != "healthy":
        quality = "poor"
    elif reconnects or decode_errors:
        quality = "good"
    return Health(
        status=status,
        uptime_seconds=now - started,
        last_message_timestamp=last,
        connection_quality=quality,
        active_subscriptions=active_subscriptions,
        public=_link_health(public, public_on_rest),
        private=_link_health(private, private_on_rest) if private is not None else None,
        epoch=epoch,
    )


def compute_metrics(
    links: Sequence[LinkView],
    clients: Iterable[ClientInfo],
    streams_of: Callable[[str], int],
    *,
    messages: int,
    decode_errors: int,
    per_second: float,
    handlers: list[HandlerMetrics],
    published: int,
    frames: int,
    now: float,
) -> Metrics:
    """The broker's metrics at monotonic time ``now``, with one row per client.

    ``streams_of`` counts the streams a client holds; ``messages`` and
    ``decode_errors`` are the router's totals, ``published``/``frames`` the publisher's.
    """
    rows = [info.metrics(now, streams_of(info.client_id)) for info in clients]
    lags = [row.lag_ms for row in rows if row.lag_ms > 0]
    errors = decode_errors + sum(link.stats.upstream_errors for link in links)
    return Metrics(
        active_connections=sum(1 for link in links if link.is_up),
        total_subscriptions=sum(row.streams for row in rows),
        messages_per_second=per_second,
        average_latency_ms=sum(lags) / len(lags) if lags else 0.0,
        error_rate_percent=100.0 * errors / max(messages + errors, 1),
        memory_usage_mb=rss_mb(),
        messages_total=messages,
        clients=rows,
        handlers=handlers,
        published_messages=published,
        published_frames=frames,
    )


def health_reasons(health: Health, now: float) -> list[str]:
    """Why ``health`` is not healthy, one sentence per link at fault (wall-clock ``now``).

    Empty when every link carries data (or has nothing to carry).
    """
    reasons: list[str] = []
    links = [("public", health.public)]
    if health.private is not None:
        links.append(("private", health.private))
    for name, link in links:
        if link.state == "auth_failed":
            reasons.append(f"{name} link: Upbit rejected the API keys (no retries until fixed)")
        elif link.state in ("down", "connecting"):
            age = max(0.0, now - link.since)
            served = (
                "data served by REST polling meanwhile"
                if link.source == "rest"
                else "no data until it reconnects"
            )
            # ``connecting`` after a lost connection: down, and trying again.
            state = link.state
            if state == "connecting" and link.reconnects:
                state = "down (reconnecting)"
            reasons.append(f"{name} link {state} for {age:.0f} s; {served}")
    if health.status == "critical":
        reasons.append(f"public link down for more than {CRITICAL_AFTER:.0f} s")
    return reasons


def http_status(health: Health) -> int:
    """The HTTP status of ``/health``: 503 when critical, else 200.

    Degraded stays 200 (the status is in the body): the broker still serves data, from
    REST or the other link, and a probe that restarted it then would make things worse.
    """
    return 503 if health.status == "critical" else 200
