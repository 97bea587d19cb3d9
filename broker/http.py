"""The opt-in monitoring endpoint: ``/metrics`` for Prometheus and ``/health`` for probes.

Off unless ``UPBIT_BROKER_HTTP`` names an address (loopback by default: a non-loopback
host is served, but warned about, since the metrics name clients and streams).
Nothing is counted for it on the hot path: :class:`BrokerCollector` reads the broker's
own counters through the narrow :class:`broker.ports.Monitored` when Prometheus scrapes,
and ``prometheus_client`` writes the exposition format.

``/health`` answers JSON: ``status``, ``reasons`` (why it is not healthy) and the full
health; HTTP 200 when healthy or degraded (data still flows), 503 when critical
(:func:`broker.health.http_status`).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from broker.health import health_reasons, http_status
from broker.logs import get_logger
from broker.ports import Monitored

__all__ = ["PREFIX", "BrokerCollector", "MonitorServer", "is_loopback"]

PREFIX = "upbit_broker"
_LINK_STATES = ("idle", "connecting", "up", "down", "auth_failed")
_HEALTH_STATES = ("healthy", "degraded", "critical")


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
    # prometheus_client adds the ``_total`` suffix to the sample of a counter family.
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


class BrokerCollector(Collector):
    """Builds every broker metric from health, metrics and counters at scrape time.

    Labels come from small fixed sets only: link names, link and health states, stream
    types, REST groups, handler names, and the opaque client ids the control server
    hands out (bounded by its client quota); never a market code or a routing id.
    """

    def __init__(self, source: Monitored) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        """One scrape's metric families."""
        health = self._source.health()
        metrics = self._source.metrics()
        counters = self._source.counters()
        now = time.time()

        # The original design's six.
        g = _gauge("active_connections", "Upstream WebSocket links connected now.")
        g.add_metric([], metrics.active_connections)
        yield g
        g = _gauge("subscriptions", "Streams held by clients, counted once per client.")
        g.add_metric([], metrics.total_subscriptions)
        yield g
        g = _gauge("messages_per_second", "Messages routed per second (last full second).")
        g.add_metric([], metrics.messages_per_second)
        yield g
        g = _gauge("average_latency_seconds", "Mean of the lags clients report.")
        g.add_metric([], metrics.average_latency_ms / 1000)
        yield g
        g = _gauge("error_ratio", "Errors (undecodable frames, Upbit errors) per message.")
        g.add_metric([], metrics.error_rate_percent / 100)
        yield g
        g = _gauge("memory_bytes", "Resident memory of the broker process.")
        g.add_metric([], metrics.memory_usage_mb * 2**20)
        yield g

        # Health.
        g = _gauge("health_status", "1 for the broker's current health status.", ("status",))
        for status in _HEALTH_STATES:
            g.add_metric([status], 1.0 if health.status == status else 0.0)
        yield g
        g = _gauge("uptime_seconds", "Seconds since the broker started.")
        g.add_metric([], health.uptime_seconds)
        yield g
        g = _gauge("active_streams", "Distinct streams at least one client holds.")
        g.add_metric([], health.active_subscriptions)
        yield g

        # Links.
        links = [("public", health.public)]
        if health.private is not None:
            links.append(("private", health.private))
        state = _gauge("link_state", "1 for each link's current state.", ("link", "state"))
        age = _gauge(
            "link_last_message_age_seconds", "Seconds since a link's last frame.", ("link",)
        )
        reconnects = _counter("link_reconnects", "Connections lost while wanted.", ("link",))
        carried = _gauge("link_carried_streams", "Streams Upbit sends on a link.", ("link",))
        left = _gauge("link_requests_left", "Subscription requests allowed this minute.", ("link",))
        fallback = _gauge(
            "fallback_active", "1 while a link's data comes from REST polling.", ("link",)
        )
        errors = _counter("upstream_errors", "Errors Upbit answered requests with.", ("link",))
        for name, link in links:
            for s in _LINK_STATES:
                state.add_metric([name, s], 1.0 if link.state == s else 0.0)
            if link.last_message_timestamp is not None:
                age.add_metric([name], max(0.0, now - link.last_message_timestamp))
            reconnects.add_metric([name], link.reconnects)
            carried.add_metric([name], link.carried_streams)
            if link.requests_left is not None:
                left.add_metric([name], link.requests_left)
            fallback.add_metric([name], 1.0 if link.source == "rest" else 0.0)
            errors.add_metric([name], counters.upstream_errors.get(name, 0))
        yield from (state, age, reconnects, carried, left, fallback, errors)

        # Messages.
        c = _counter("messages_received", "Messages routed, per stream type.", ("type",))
        for kind, count in sorted(counters.messages_by_type.items()):
            c.add_metric([kind], count)
        yield c
        c = _counter("messages_published", "Envelopes sent on the data socket.")
        c.add_metric([], metrics.published_messages)
        yield c
        c = _counter("frames_published", "ZeroMQ frames those envelopes went out in.")
        c.add_metric([], metrics.published_frames)
        yield c
        c = _counter("publish_errors", "Envelopes the data socket refused.")
        c.add_metric([], counters.send_errors)
        yield c
        c = _counter("decode_errors", "Upstream frames that could not be decoded.")
        c.add_metric([], counters.decode_errors)
        yield c
        c = _counter("duplicate_trades", "Trades dropped as already published.")
        c.add_metric([], counters.duplicates)
        yield c
        c = _counter(
            "private_duplicates", "Private stream events dropped as already published by REST."
        )
        c.add_metric([], counters.private_duplicates)
        yield c
        c = _counter(
            "private_recovered",
            "Private events a REST audit found the live WebSocket had not delivered.",
        )
        c.add_metric([], counters.private_recovered)
        yield c

        # REST.
        c = _counter("rest_requests", "REST requests sent, per rate-limit group.", ("group",))
        for group, count in sorted(counters.rest_calls.items()):
            c.add_metric([group], count)
        yield c
        c = _counter("rest_waits", "REST requests that queued for a slot.", ("group",))
        for group, count in sorted(counters.rest_waits.items()):
            c.add_metric([group], count)
        yield c
        c = _counter("rest_wait_seconds", "Seconds REST requests queued.", ("group",))
        for group, seconds in sorted(counters.rest_wait_seconds.items()):
            c.add_metric([group], seconds)
        yield c
        c = _counter(
            "rest_throttled", "429 and 418 answers from Upbit, per group.", ("group", "code")
        )
        for (group, code), count in sorted(counters.rest_throttled.items()):
            c.add_metric([group, str(code)], count)
        yield c

        # Clients, by the opaque id the control server gives them.
        g = _gauge("clients", "Clients connected to the broker.")
        g.add_metric([], len(metrics.clients))
        yield g
        info = InfoMetricFamily(f"{PREFIX}_client", "The name a client gave.", labels=["client"])
        streams = _gauge("client_streams", "Streams a client holds.", ("client",))
        lag = _gauge("client_lag_seconds", "Lag a client reports.", ("client",))
        seen = _gauge(
            "client_last_seen_seconds", "Seconds since a client's last message.", ("client",)
        )
        received = _counter("client_received", "Messages a client reports.", ("client",))
        gaps = _counter("client_gaps", "Sequence gaps a client reports.", ("client",))
        dropped = _counter("client_dropped", "Messages a client's full queues lost.", ("client",))
        for row in metrics.clients:
            info.add_metric([row.client_id], {"name": row.name})
            streams.add_metric([row.client_id], row.streams)
            lag.add_metric([row.client_id], row.lag_ms / 1000)
            seen.add_metric([row.client_id], row.last_seen_seconds)
            received.add_metric([row.client_id], row.received)
            gaps.add_metric([row.client_id], row.gaps)
            dropped.add_metric([row.client_id], row.dropped)
        yield from (info, streams, lag, seen, received, gaps, dropped)

        # Data handlers (named in the configuration).
        handled = _counter(
            "handler_messages", "Messages a data handler saw, by outcome.", ("handler", "outcome")
        )
        for h in metrics.handlers:
            handled.add_metric([h.name, "handled"], h.handled)
            handled.add_metric([h.name, "dropped"], h.dropped)
            handled.add_metric([h.name, "error"], h.errors)
        yield handled


class MonitorServer:
    """An aiohttp server for ``/metrics`` and ``/health``, started and stopped by the broker."""

    def __init__(self, source: Monitored, host: str, port: int) -> None:
        self._source = source
        self._host = host
        self._port = port
        self._log = get_logger("http")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(source))
        ProcessCollector(registry=self.registry)  # process_* (CPU, memory, open files)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        self._site: web.TCPSite | None = None
        self.address: tuple[str, int] | None = None
        """``(host, port)`` actually bound (the port is chosen when 0 was asked)."""

    async def start(self) -> None:
        """Bind and serve; OSError when the address cannot be bound."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self._site = site
        bound = self._runner.addresses
        port = int(bound[0][1]) if bound else self._port
        self.address = (self._host, port)
        host = f"[{self._host}]" if ":" in self._host else self._host
        url = f"http://{host}:{port}"
        if is_loopback(self._host):
            self._log.info("monitoring endpoint listening", url=url)
        else:
            self._log.warning(
                "monitoring endpoint listening beyond this machine: anyone who reaches it "
                "sees client names and stream counts",
                url=url,
            )

    async def close(self) -> None:
        """Stop serving."""
        await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        del request
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        del request
        health = self._source.health()
        body = {
            "status": health.status,
            "reasons": health_reasons(health, time.time()),
            "health": msgspec.to_builtins(health),
        }
        return web.Response(
            body=msgspec.json.encode(body),
            status=http_status(health),
            content_type="application/json",
        )
