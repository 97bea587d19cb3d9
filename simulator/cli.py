"""``upbit-sim`` / ``python -m simulator``: run the Upbit simulator on two ports.

REST and the control API listen on ``--port``, both WebSockets on ``--ws-port``
(default ``--port`` + 1; a free port when ``--port`` is 0). The FIRST line on stdout is
JSON with the base URLs (flushed at once), e.g.
``{"rest": "http://127.0.0.1:PORT", "ws": "ws://127.0.0.1:WS_PORT/websocket/v1",
"ws_private": "ws://127.0.0.1:WS_PORT/websocket/v1/private",
"control": "http://127.0.0.1:PORT/_sim", "pid": 1234}``; logs go to stderr.
Keys come from --access-key/--secret-key, else UPBIT_ACCESS_KEY/UPBIT_SECRET_KEY, else the
demo pair ``sim-access-key`` / ``sim-secret-key``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Sequence

import structlog

from simulator.config import DEFAULT_REST_LIMITS, SimConfig

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(
        prog="upbit-sim",
        description="A faithful Upbit simulator: REST and the control API under /_sim on "
        "--port, the public and private WebSocket on --ws-port. The first stdout line is "
        "JSON with the URLs.",
    )
    p.add_argument("--host", default=d.host, help="bind address (default %(default)s)")
    p.add_argument(
        "--port",
        type=int,
        default=8765,
        help="REST and control API port; 0 picks a free one (default %(default)s)",
    )
    p.add_argument(
        "--ws-port",
        type=int,
        default=None,
        help="WebSocket port (/websocket/v1, /websocket/v1/private); 0 picks a free one "
        "(default: --port + 1, or a free one when --port is 0)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="market random seed")
    p.add_argument(
        "--rate", type=float, default=d.rate, help="market events per second per active market"
    )
    p.add_argument(
        "--trade-ratio", type=float, default=d.trade_ratio, help="share of events that are trades"
    )
    p.add_argument(
        "--backfill-trades",
        type=int,
        default=d.backfill_trades,
        help="history per market at first use",
    )
    p.add_argument(
        "--firehose", action="store_true", help="send subscribed streams as fast as sockets drain"
    )
    p.add_argument(
        "--firehose-batch", type=int, default=d.firehose_batch, help="frames per firehose write"
    )
    p.add_argument("--no-compress", action="store_true", help="never negotiate permessage-deflate")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=d.idle_timeout,
        help="close idle sockets after N s (0: never)",
    )
    p.add_argument(
        "--unknown-codes",
        choices=["ignore", "error"],
        default=d.unknown_codes,
        help="WS unknown/lowercase codes: no data, or INVALID_PARAM",
    )
    p.add_argument(
        "--private-auth-failure",
        choices=["in_band", "http_401"],
        default=d.private_auth_failure,
        help="bad JWT on /private: INVALID_AUTH after upgrade, or HTTP 401",
    )
    p.add_argument(
        "--no-ws-nonce-check", action="store_true", help="allow nonce reuse on private WS upgrades"
    )
    p.add_argument("--access-key", default=None, help="access key (env UPBIT_ACCESS_KEY)")
    p.add_argument("--secret-key", default=None, help="secret key (env UPBIT_SECRET_KEY)")
    p.add_argument(
        "--send-queue-max",
        type=int,
        default=d.send_queue_max,
        help="messages queued per connection",
    )
    p.add_argument(
        "--slow-client",
        choices=["disconnect", "drop_oldest"],
        default=d.slow_client,
        help="when a connection's queue is full",
    )
    p.add_argument("--no-limits", action="store_true", help="disable every rate limit")
    p.add_argument(
        "--upgrade-limit",
        type=int,
        default=d.upgrade_limit,
        help="WS upgrades per second per IP / access key",
    )
    p.add_argument("--ws-messages-per-second", type=int, default=d.ws_message_limits[0][0])
    p.add_argument("--ws-messages-per-minute", type=int, default=d.ws_message_limits[1][0])
    p.add_argument(
        "--rest-limit",
        action="append",
        default=[],
        metavar="GROUP=N[/SECONDS]",
        help=f"REST group limit, repeatable; groups: {', '.join(DEFAULT_REST_LIMITS)}",
    )
    p.add_argument(
        "--teapot-after",
        type=int,
        default=d.teapot_after,
        help="429s within --teapot-window before a 418 block",
    )
    p.add_argument(
        "--teapot-window",
        type=float,
        default=d.teapot_window,
        help="seconds within which --teapot-after 429s lead to a 418",
    )
    p.add_argument(
        "--block-base", type=float, default=d.block_base, help="first 418 block, seconds"
    )
    p.add_argument(
        "--block-max", type=float, default=d.block_max, help="longest 418 block, seconds"
    )
    p.add_argument(
        "--demo-orders",
        action="store_true",
        help="place, fill and cancel small demo orders on the account now and then "
        "(the offline demo's myOrder/myAsset)",
    )
    p.add_argument(
        "--demo-interval",
        type=float,
        default=d.demo_interval,
        help="seconds between two demo actions (default %(default)s)",
    )
    p.add_argument(
        "--demo-market", default=d.demo_market, help="market of the demo orders (%(default)s)"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="json",
        choices=["json", "console"],
        help="stderr log lines: JSON (default) or one readable line per event, as the "
        "broker's console format",
    )
    p.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use the default asyncio loop even if uvloop is installed",
    )
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The SimConfig for parsed CLI arguments (keys fall back to the environment)."""
    rest_limits = dict(DEFAULT_REST_LIMITS)
    for spec in args.rest_limit:
        group, _, value = spec.partition("=")
        count, _, seconds = value.partition("/")
        try:
            rest_limits[group.strip()] = (int(count), float(seconds or 1.0))
        except ValueError:
            raise SystemExit(f"bad --rest-limit {spec!r}; expected GROUP=N[/SECONDS]") from None
    cfg = SimConfig(
        host=args.host,
        port=args.port,
        ws_port=args.ws_port,
        seed=args.seed,
        rate=args.rate,
        trade_ratio=args.trade_ratio,
        backfill_trades=args.backfill_trades,
        firehose=args.firehose,
        firehose_batch=args.firehose_batch,
        compress=not args.no_compress,
        idle_timeout=args.idle_timeout,
        unknown_codes=args.unknown_codes,
        private_auth_failure=args.private_auth_failure,
        ws_check_nonce=not args.no_ws_nonce_check,
        send_queue_max=args.send_queue_max,
        slow_client=args.slow_client,
        limits_enabled=not args.no_limits,
        upgrade_limit=args.upgrade_limit,
        ws_message_limits=((args.ws_messages_per_second, 1.0), (args.ws_messages_per_minute, 60.0)),
        rest_limits=rest_limits,
        teapot_after=args.teapot_after,
        teapot_window=args.teapot_window,
        block_base=args.block_base,
        block_max=args.block_max,
        demo_orders=args.demo_orders,
        demo_interval=args.demo_interval,
        demo_market=args.demo_market.upper(),
    )
    if args.access_key:
        cfg = dataclasses.replace(cfg, access_key=args.access_key)
    if args.secret_key:
        cfg = dataclasses.replace(cfg, secret_key=args.secret_key)
    return cfg.with_env_keys()


def _configure_logging(level: str, fmt: str = "json") -> None:
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


async def _serve(cfg: SimConfig) -> None:
    from simulator.app import start_simulator

    running = await start_simulator(cfg)
    sys.stdout.write(json.dumps(running.urls) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``upbit-sim``."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level, args.log_format)
    cfg = config_from_args(args)
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):  # the signal handler normally wins
        asyncio.run(_serve(cfg))
    return 0
