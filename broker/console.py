"""The operator's views of a running broker: ``status``, ``tail`` and ``clients``.

Each view is a pure function of what the broker answered (and ``now``) that returns
text for people (local time, aligned columns) or JSON-ready values for scripts
(ISO-8601 timestamps); :func:`run` is the thin shell that asks the broker through the
client library and prints. :mod:`broker.cli` parses the command line and calls it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from broker.health import health_reasons
from schemas.bus import ConnectionHealth, Envelope, Health, Metrics, StatusEvent
from schemas.upbit import Candle, MyAsset, MyOrder, Orderbook, Ticker, Trade

__all__ = [
    "TAIL_TYPES",
    "clients_json",
    "parser",
    "render_clients",
    "render_status",
    "run",
    "status_json",
    "tail_header",
    "tail_json",
    "tail_row",
]

TAIL_TYPES = ("ticker", "trade", "orderbook", "candle", "myOrder", "myAsset")
"""What ``tail`` takes as TYPE (``candle.5m`` picks a candle unit too)."""

_DESCRIPTIONS = {
    "status": "One screen on the running broker: its health and why it is not healthy, "
    "each upstream link (state, source, last message, reconnects), the streams "
    "and clients it serves, and its rates.",
    "tail": "Print live messages of one stream type for some markets, one aligned line each "
    "(local time, code, the main fields), with status events (gaps, outages) between "
    "them. Ctrl-C stops it (exit code 0).",
    "clients": "The clients connected to the running broker: id (the opaque one the broker "
    "gives), name, streams held, what they report receiving, gaps, drops and lag.",
}
_EPILOGS = {
    "tail": "examples:\n  upbit-broker tail ticker KRW-BTC KRW-ETH\n"
    "  upbit-broker tail orderbook KRW-BTC --depth 5\n"
    "  upbit-broker tail candle.1s KRW-BTC --json | jq .data.trade_price",
}


def parser(command: str, shared: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The argument parser of ``upbit-broker COMMAND`` (its own ``--help``)."""
    p = argparse.ArgumentParser(
        prog=f"upbit-broker {command}",
        description=_DESCRIPTIONS[command],
        epilog=_EPILOGS.get(command),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[shared],
    )
    if command == "tail":
        p.add_argument(
            "type",
            metavar="TYPE",
            help=f"stream type: {', '.join(TAIL_TYPES)} (candle.1s ... candle.240m for a unit)",
        )
        p.add_argument(
            "codes",
            metavar="CODE",
            nargs="*",
            help="market codes such as KRW-BTC (none for myOrder: every market; myAsset "
            "takes none)",
        )
        p.add_argument("--depth", type=int, help="orderbook: levels (1, 5, 15 or 30)")
        p.add_argument("--level", type=float, help="orderbook: price grouping level")
        p.add_argument(
            "--count", type=int, metavar="N", help="stop after N messages (default: never)"
        )
    return p


# ---------------------------------------------------------------------------- formatting


def _local(ts: float | None, now: float) -> str:
    """A wall-clock time in local time: the time of day, with the date if not today."""
    if ts is None:
        return "-"
    moment = datetime.fromtimestamp(ts)
    if moment.date() == datetime.fromtimestamp(now).date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _iso(ts: float | None) -> str | None:
    """A wall-clock time as ISO-8601 (UTC, milliseconds); None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")


def _span(seconds: float) -> str:
    """A duration for people: ``0.4 s``, ``12 s``, ``5 min 3 s``, ``2 h 5 min``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned columns: numbers (``right``) flush right, text flush left."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _link_row(name: str, link: ConnectionHealth, now: float) -> list[str]:
    last = link.last_message_timestamp
    # Connecting again after losing the connection is still down for whoever reads this.
    state = "down, retrying" if link.state == "connecting" and link.reconnects else link.state
    return [
        name,
        state,
        link.source,
        _local(link.since, now) if link.since else "-",
        "never" if last is None else f"{_span(now - last)} ago",
        str(link.reconnects),
        str(link.carried_streams),
        "-" if link.requests_left is None else str(link.requests_left),
    ]


def render_status(health: Health, metrics: Metrics, now: float) -> str:
    """The ``status`` screen at wall-clock ``now``."""
    lines = [
        f"broker    {health.status.upper()}  (up {_span(health.uptime_seconds)}, "
        f"epoch {health.epoch}, at {_local(now, now)})"
    ]
    reasons = health_reasons(health, now)
    lines += [f"  why: {reason}" for reason in reasons]
    links = [_link_row("public", health.public, now)]
    if health.private is not None:
        links.append(_link_row("private", health.private, now))
    else:
        links.append(["private", "off", "(no API keys)", "", "", "", "", ""])
    lines.append("")
    lines += _table(
        ("LINK", "STATE", "SOURCE", "SINCE", "LAST MESSAGE", "RECONNECTS", "CARRIED", "REQ LEFT"),
        links,
        right={5, 6, 7},
    )
    gaps = sum(c.gaps for c in metrics.clients)
    dropped = sum(c.dropped for c in metrics.clients)
    lines += [
        "",
        f"streams   {health.active_subscriptions} held, {metrics.total_subscriptions} "
        f"subscriptions by {len(metrics.clients)} clients",
        f"clients   {len(metrics.clients)} (gaps {gaps}, dropped {dropped}; "
        "'upbit-broker clients' lists them)",
        f"rates     {metrics.messages_per_second:.1f} msg/s, {metrics.messages_total} messages, "
        f"mean client lag {metrics.average_latency_ms:.1f} ms, "
        f"errors {metrics.error_rate_percent:.2f} %",
        f"published {metrics.published_messages} envelopes in {metrics.published_frames} frames",
        f"memory    {metrics.memory_usage_mb:.1f} MiB, connection quality "
        f"{health.connection_quality}",
    ]
    return "\n".join(lines)


def _health_json(health: Health) -> dict[str, Any]:
    value: dict[str, Any] = msgspec.to_builtins(health)
    value["last_message_timestamp"] = _iso(health.last_message_timestamp)
    for name in ("public", "private"):
        link = value.get(name)
        if link is not None:
            link["since"] = _iso(link["since"]) if link["since"] else None
            link["last_message_timestamp"] = _iso(link["last_message_timestamp"])
    return value


def status_json(health: Health, metrics: Metrics, now: float) -> dict[str, Any]:
    """The ``status --json`` document: status, reasons, health and metrics."""
    return {
        "time": _iso(now),
        "status": health.status,
        "reasons": health_reasons(health, now),
        "health": _health_json(health),
        "metrics": {k: v for k, v in msgspec.to_builtins(metrics).items() if k != "clients"},
        "clients": clients_json(metrics, now),
    }


def render_clients(metrics: Metrics, now: float) -> str:
    """The ``clients`` table: one line per client, last seen in local time."""
    if not metrics.clients:
        return "no clients connected"
    rows = [
        [
            c.client_id,
            c.name or "-",
            str(c.streams),
            str(c.received),
            str(c.gaps),
            str(c.dropped),
            f"{c.lag_ms:.1f}",
            _local(now - c.last_seen_seconds, now),
        ]
        for c in metrics.clients
    ]
    headers = ("CLIENT", "NAME", "STREAMS", "RECEIVED", "GAPS", "DROPPED", "LAG MS", "LAST SEEN")
    return "\n".join(_table(headers, rows, right={2, 3, 4, 5, 6}))


def clients_json(metrics: Metrics, now: float) -> list[dict[str, Any]]:
    """One object per client, ``last_seen`` in ISO-8601."""
    rows: list[dict[str, Any]] = []
    for client in metrics.clients:
        row: dict[str, Any] = msgspec.to_builtins(client)
        row["last_seen"] = _iso(now - client.last_seen_seconds)
        rows.append(row)
    return rows


_TAIL_COLUMNS: dict[type, tuple[str, ...]] = {
    Ticker: ("PRICE", "CHANGE %", "VOLUME 24H"),
    Trade: ("SIDE", "PRICE", "VOLUME"),
    Orderbook: ("BID", "BID SIZE", "ASK", "ASK SIZE"),
    Candle: ("OPEN", "HIGH", "LOW", "CLOSE"),
    MyOrder: ("SIDE", "STATE", "PRICE", "VOLUME"),
    MyAsset: ("ASSETS",),
}
_W = 16  # width of a value column


def _num(value: object) -> str:
    """A price or size in full (no exponent): ``139,996,000``, ``0.0016032``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return f"{value:,.0f}"
        return f"{value:,.10f}".rstrip("0")
    return str(value)


def _columns(data: object) -> list[str]:
    if isinstance(data, Ticker):
        return [_num(data.trade_price), f"{data.signed_change_rate * 100:+.2f}",
                _num(data.acc_trade_volume_24h)]  # fmt: skip
    if isinstance(data, Trade):
        return [data.ask_bid, _num(data.trade_price), _num(data.trade_volume)]
    if isinstance(data, Orderbook):
        top = data.orderbook_units[0] if data.orderbook_units else None
        if top is None:
            return ["-"] * 4
        return [_num(top.bid_price), _num(top.bid_size), _num(top.ask_price), _num(top.ask_size)]
    if isinstance(data, Candle):
        return [_num(data.opening_price), _num(data.high_price), _num(data.low_price),
                _num(data.trade_price)]  # fmt: skip
    if isinstance(data, MyOrder):
        return [data.ask_bid, data.state, _num(data.price), _num(data.volume)]
    if isinstance(data, MyAsset):
        return [" ".join(f"{a.currency}={a.balance}" for a in data.assets)]
    return [msgspec.json.encode(data).decode()]


def _kind(kind: str) -> type:
    base = kind.split(".", 1)[0]
    return {"ticker": Ticker, "trade": Trade, "orderbook": Orderbook, "candle": Candle,
            "myOrder": MyOrder, "myAsset": MyAsset}[base]  # fmt: skip


def tail_header(kind: str) -> str:
    """The header line of ``tail`` for stream type ``kind``."""
    cells = [f"{'TIME':<12}", f"{'CODE':<12}", f"{'SRC':<4}"]
    cells += [h.rjust(_W) for h in _TAIL_COLUMNS[_kind(kind)]]
    return " ".join(cells).rstrip()


def _clock(recv_ns: int) -> str:
    return datetime.fromtimestamp(recv_ns / 1e9).strftime("%H:%M:%S.%f")[:-3]


def tail_row(env: Envelope) -> str:
    """One ``tail`` line: local receive time, code, source and the type's main fields."""
    data = env.data
    if isinstance(data, StatusEvent):
        detail = f" ({data.detail})" if data.detail else ""
        when = _clock(data.timestamp * 1_000_000 if data.timestamp else env.recv_ns)
        return f"{when:<12} {'-- status':<12} {data.connection}: {data.state}{detail}"
    code = getattr(data, "code", "") or env.topic
    src = "rest" if env.source == "rest" else "ws"
    cells = [f"{_clock(env.recv_ns):<12}", f"{code:<12}", f"{src:<4}"]
    values = _columns(data)
    if isinstance(data, MyAsset):
        cells += values
    else:
        cells += [v.rjust(_W) for v in values]
    return " ".join(cells).rstrip()


def tail_json(env: Envelope) -> dict[str, Any]:
    """One ``tail --json`` line: the envelope with its receive time in ISO-8601."""
    return {
        "time": _iso(env.recv_ns / 1e9),
        "topic": env.topic,
        "seq": env.seq,
        "source": env.source,
        "data": msgspec.to_builtins(env.data),
    }


# ---------------------------------------------------------------------------- shells


def _print(text: str) -> None:
    print(text, flush=True)


def _emit(value: object) -> None:
    _print(msgspec.json.encode(value).decode())


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"upbit-broker {command}: {message}", file=sys.stderr)
    return code


def run(command: str, args: argparse.Namespace, *, as_json: bool, timeout: float) -> int:
    """Run ``status``, ``clients`` or ``tail``; the process exit code."""
    from clients import ClientError, SyncBrokerClient

    if command == "tail":
        return _tail_main(args, as_json=as_json, timeout=timeout)
    try:
        with SyncBrokerClient(name=f"upbit-broker {command}", request_timeout=timeout) as client:
            health = client.health() if command == "status" else None
            metrics = client.metrics()
    except ClientError as exc:
        return _fail(command, str(exc))
    now = time.time()
    if health is not None and as_json:
        _emit(status_json(health, metrics, now))
    elif health is not None:
        _print(render_status(health, metrics, now))
    elif as_json:
        _emit(clients_json(metrics, now))
    else:
        _print(render_clients(metrics, now))
    return 0


def _tail_main(args: argparse.Namespace, *, as_json: bool, timeout: float) -> int:
    kind: str = args.type
    if kind.split(".", 1)[0] not in TAIL_TYPES:
        return _fail("tail", f"unknown type {kind!r} (choose from: {', '.join(TAIL_TYPES)})", 2)
    if not args.codes and kind not in ("myOrder", "myAsset"):
        return _fail("tail", f"{kind} needs at least one market code (e.g. KRW-BTC)", 2)
    try:
        return asyncio.run(_tail(args, kind, as_json=as_json, timeout=timeout))
    except BrokenPipeError:  # the reader went away (| head): nothing more to show
        with contextlib.suppress(OSError):
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - no flush error at exit
        return 0


async def _tail(args: argparse.Namespace, kind: str, *, as_json: bool, timeout: float) -> int:
    from clients import BrokerClient, ClientError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = 0
    limit: int | None = args.count
    last_status: StatusEvent | None = None

    def show(envelope: Envelope) -> None:
        nonlocal shown, last_status
        if isinstance(envelope.data, StatusEvent):
            # One event reaches every topic of the link: show it once.
            event = msgspec.structs.replace(envelope.data, topics=[])
            if event == last_status:
                return
            last_status = event
        if as_json:
            _emit(tail_json(envelope))
        else:
            _print(tail_row(envelope))
        if not isinstance(envelope.data, StatusEvent):
            shown += 1
            if limit is not None and shown >= limit:
                stop.set()

    # Async callbacks: the client delivers them one at a time, in order, from a worker
    # task, with ``last_envelope`` set to the message at hand, so each one can wait for
    # the subscription object (the snapshot comes before subscribe returns) and read it.
    subscription: Any = None
    ready = asyncio.Event()

    async def on_message(_: object) -> None:
        await ready.wait()
        show(subscription.last_envelope)

    client = BrokerClient(name="upbit-broker tail", request_timeout=timeout)
    try:
        await client.connect()
        if not as_json:
            _print(tail_header(kind))
        subscription = await _subscriber(client, kind, args)(on_message, on_message)
        ready.set()
        await stop.wait()
    except ClientError as exc:
        return _fail("tail", str(exc))
    finally:
        await client.close()
    return 0


Handler = Callable[[object], Awaitable[None]]


def _subscriber(
    client: Any, kind: str, args: argparse.Namespace
) -> Callable[[Handler, Handler], Awaitable[Any]]:
    """``subscribe(on_data, on_status)`` for the stream type ``kind``."""
    codes: list[str] = args.codes
    base, _, unit = kind.partition(".")

    async def subscribe(on_data: Handler, on_status: Handler) -> Any:
        if base == "ticker":
            return await client.subscribe_ticker(codes, on_data, on_status=on_status)
        if base == "trade":
            return await client.subscribe_trade(codes, on_data, on_status=on_status)
        if base == "orderbook":
            return await client.subscribe_orderbook(
                codes, on_data, depth=args.depth, level=args.level, on_status=on_status
            )
        if base == "candle":
            return await client.subscribe_candle(
                codes, on_data, unit=unit or "1m", on_status=on_status
            )
        if base == "myOrder":
            return await client.subscribe_my_order(codes or None, on_data, on_status=on_status)
        return await client.subscribe_my_asset(on_data, on_status=on_status)

    return subscribe
