"""Health and metrics, computed on request from the counters the broker keeps.

Health follows the original design: ``healthy`` when every configured upstream link is
up, ``degraded`` when one is reconnecting or served by REST, ``critical`` when the
public link has been down for longer than ``CRITICAL_AFTER`` seconds.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Literal

from schemas.bus import ConnectionHealth, Health, Metrics

if TYPE_CHECKING:
    from broker.app import Broker
    from broker.upstream import UpstreamLink

__all__ = ["RateMeter", "compute_health", "compute_metrics", "rss_mb"]

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


def _link_health(link: UpstreamLink, on_rest: bool) -> ConnectionHealth:
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


def compute_health(broker: Broker) -> Health:
    """The broker's health right now."""
    now = time.time()
    public = broker.links["public"]
    private = broker.links.get("private")
    links = [public] if private is None else [public, private]
    states = [link.stats.state for link in links]
    status: Literal["healthy", "degraded", "critical"] = "healthy"
    if any(s in ("down", "connecting") for s in states):
        status = "degraded"
    if public.stats.state in ("down", "connecting") and now - public.stats.since > CRITICAL_AFTER:
        status = "critical"
    last = max((link.stats.last_frame_at or 0.0 for link in links), default=0.0) or None
    quality: Literal["excellent", "good", "poor"] = "excellent"
    reconnects = sum(link.stats.reconnects for link in links)
    if status != "healthy":
        quality = "poor"
    elif reconnects or broker.router.decode_errors:
        quality = "good"
    return Health(
        status=status,
        uptime_seconds=now - broker.started,
        last_message_timestamp=last,
        connection_quality=quality,
        active_subscriptions=len(broker.state.all_streams()),
        public=_link_health(public, broker.public_fallback.active),
        private=(
            _link_health(private, bool(broker.private_fallback and broker.private_fallback.active))
            if private is not None
            else None
        ),
        epoch=broker.epoch,
    )


def compute_metrics(broker: Broker) -> Metrics:
    """The broker's metrics right now, with one row per client."""
    now = time.monotonic()
    rows = [
        info.metrics(now, len(broker.state.streams_of(info.client_id)))
        for info in broker.clients.all()
    ]
    lags = [row.lag_ms for row in rows if row.lag_ms > 0]
    messages = broker.router.messages
    errors = broker.router.decode_errors + sum(
        link.stats.upstream_errors for link in broker.links.values()
    )
    return Metrics(
        active_connections=sum(1 for link in broker.links.values() if link.is_up),
        total_subscriptions=sum(row.streams for row in rows),
        messages_per_second=broker.rate.per_second,
        average_latency_ms=sum(lags) / len(lags) if lags else 0.0,
        error_rate_percent=100.0 * errors / max(messages + errors, 1),
        memory_usage_mb=rss_mb(),
        messages_total=messages,
        clients=rows,
        handlers=broker.handlers.metrics(),
        published_messages=broker.publisher.published,
        published_frames=broker.publisher.frames,
    )
