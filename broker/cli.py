"""``upbit-broker``: run the broker, ask a running one for its health or metrics, or show
(and clear) the Upbit bans it remembers."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

import msgspec

from broker.config import ConfigError, Settings
from broker.instance import AlreadyRunning
from broker.logs import configure_logging, get_logger

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upbit-broker",
        description="Share one Upbit connection with every process on this machine. "
        "Configuration comes from UPBIT_* environment variables (see README). "
        "CURVE keys for tcp endpoints: upbit-broker keys --help.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=("run", "health", "metrics", "ban"),
        help="run the broker (default), print a running broker's health/metrics as JSON, "
        "or print the Upbit bans remembered in UPBIT_BROKER_STATE_DIR as JSON",
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
    except AlreadyRunning as exc:
        get_logger("cli").error(str(exc))
        print(f"upbit-broker: {exc}", file=sys.stderr)
        return 3
    except BrokerFailed as exc:  # logged with its traceback by Broker.run
        print(f"upbit-broker: {exc}", file=sys.stderr)
        return 1
    return 0


def _query(command: str) -> int:
    from clients import ClientError, SyncBrokerClient

    try:
        with SyncBrokerClient(name=f"upbit-broker {command}") as client:
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
    args = parser.parse_args(argv)
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
    return _query(args.command)


if __name__ == "__main__":
    sys.exit(main())
