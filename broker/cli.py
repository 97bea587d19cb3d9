"""``upbit-broker``: run the broker, ask a running one for its health or metrics, or show
(and clear) the Upbit bans it remembers; ``status``, ``tail`` and ``clients`` are the
operator's views of a running broker (:mod:`broker.console`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import msgspec

from broker.config import ConfigError, Settings
from broker.instance import AlreadyRunning
from broker.logs import configure_logging, get_logger

__all__ = ["main"]

DEFAULT_TIMEOUT = 5.0
"""Seconds to wait for a running broker's answer (``--timeout``)."""


def _version() -> str:
    try:
        return version("upbit-broker")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _shared() -> argparse.ArgumentParser:
    """Options every command that talks to a running broker takes."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument(
        "--json",
        action="store_true",
        help="print JSON for scripts (timestamps in ISO-8601) instead of a readable screen; "
        "health, metrics and ban always print JSON",
    )
    shared.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the broker to answer (default {DEFAULT_TIMEOUT:g})",
    )
    return shared


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upbit-broker",
        description="Share one Upbit connection with every process on this machine. "
        "Configuration comes from UPBIT_* environment variables (see README). "
        "CURVE keys for tcp endpoints: upbit-broker keys --help.",
        epilog="'upbit-broker COMMAND --help' explains status, tail and clients in full.",
        parents=[_shared()],
        add_help=False,
    )
    parser.add_argument(
        "-h",
        "--help",
        action="store_true",
        help="show this help (after status, tail or clients: that command's help)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=("run", "health", "metrics", "ban", "status", "tail", "clients"),
        help="run the broker (default), print a running broker's health/metrics as JSON, "
        "print the Upbit bans remembered in UPBIT_BROKER_STATE_DIR as JSON; "
        "status: one screen on a running broker; tail TYPE CODE...: live messages; "
        "clients: the connected clients",
    )
    parser.add_argument(
        "--clear",
        action="store_true",
        help="with 'ban': forget every remembered ban (stop the broker first: a running "
        "one keeps its bans in memory and writes them back on its next ban)",
    )
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default=None,
        help="overrides UPBIT_BROKER_LOG_FORMAT",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=None,
        help="overrides UPBIT_BROKER_LOG_LEVEL",
    )
    return parser


def _run(settings: Settings) -> int:
    from broker.app import Broker, BrokerFailed
    from broker.wsclient import use_fast_zlib

    use_fast_zlib()

    try:
        broker = Broker(settings)
    except ConfigError as exc:  # a data handler that cannot be loaded
        print(f"upbit-broker: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            import uvloop
        except ImportError:  # optional: plain asyncio works, just slower
            asyncio.run(broker.run())
        else:
            uvloop.run(broker.run())
    except ConfigError as exc:  # UPBIT_BROKER_HTTP's address cannot be bound
        print(f"upbit-broker: configuration error: {exc}", file=sys.stderr)
        return 2
    except AlreadyRunning as exc:
        get_logger("cli").error(str(exc))
        print(f"upbit-broker: {exc}", file=sys.stderr)
        return 3
    except BrokerFailed as exc:  # logged with its traceback by Broker.run
        print(f"upbit-broker: {exc}", file=sys.stderr)
        return 1
    return 0


def _query(command: str, timeout: float = DEFAULT_TIMEOUT) -> int:
    from clients import ClientError, SyncBrokerClient

    try:
        with SyncBrokerClient(name=f"upbit-broker {command}", request_timeout=timeout) as client:
            value = client.health() if command == "health" else client.metrics()
    except ClientError as exc:
        print(f"upbit-broker {command}: {exc}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(value).decode())
    return 0


def _ban(settings: Settings, *, clear: bool) -> int:
    """Print the bans in force (``--clear``: forget them all first) as JSON."""
    from broker.ratelimit import BAN_FILE, BanStore

    path = settings.state_dir / BAN_FILE
    now = time.time()
    store = BanStore.load(path, now=now)
    report: dict[str, object] = {"file": str(path)}
    if clear:
        cleared = store.clear_all()
        if cleared or path.exists():
            try:
                store.save(path)
            except OSError as exc:
                print(f"upbit-broker ban: cannot write {path}: {exc}", file=sys.stderr)
                return 1
        report["cleared"] = sorted(cleared)
    report["bans"] = {
        kind: {"until": until, "seconds_left": round(until - now, 1)}
        for kind, until in sorted(store.active(now).items())
    }
    print(msgspec.json.encode(report).decode())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``upbit-broker`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["keys"]:  # before Settings: a tcp endpoint needs the keys made first
        from broker.keys import main as keys_main

        return keys_main(argv[1:])
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    tool = None
    if args.command in ("status", "tail", "clients"):
        from broker import console

        tool = console.parser(args.command, _shared()).parse_args(
            [*extra, *(["--help"] if args.help else [])]
        )
    elif args.help:
        parser.print_help()
        return 0
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.timeout <= 0:
        parser.error("--timeout must be a positive number of seconds")
    if args.clear and args.command != "ban":
        parser.error("--clear goes with the ban command only")
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"upbit-broker: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_format or settings.log_format, args.log_level or settings.log_level)
    if args.command == "run":
        return _run(settings)
    if args.command == "ban":
        return _ban(settings, clear=args.clear)
    if tool is not None:
        from broker import console

        return console.run(args.command, tool, as_json=args.json, timeout=args.timeout)
    return _query(args.command, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
