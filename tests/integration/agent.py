"""A client process for multi-process tests: subscribes as told, records what it gets.

Usage::

    python -m tests.integration.agent --name A --out FILE ticker:KRW-BTC orderbook:KRW-BTC:5

Each stream argument is ``type:CODE[:depth]``. Every delivered message becomes one JSON
line in FILE (topic, seq, epoch, source, stream_type, payload type, a trade's
``sequential_id`` as ``sid`` and the local receive time ``rx``); every status event one
line with its state, connection, broker timestamp ``ts`` (ms) and ``rx``. Lines read from
stdin are commands: ``unsubscribe N`` (N-th subscription) answers ``unsubscribed N``
on stdout; ``quit`` closes the client. ``ready`` is printed once every subscribe call
has returned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import IO, Any

from broker.logs import configure_logging
from clients import BrokerClient, Subscription
from schemas.bus import StatusEvent


async def _pump(sub: Subscription[Any], out: IO[str]) -> None:
    async for payload in sub:
        env = sub.last_envelope
        assert env is not None
        out.write(
            json.dumps(
                {
                    "t": env.topic,
                    "s": env.seq,
                    "e": env.epoch,
                    "src": env.source,
                    "st": getattr(payload, "stream_type", None),
                    "ty": payload.type,
                    "sid": getattr(payload, "sequential_id", None),
                    "rx": time.time(),
                }
            )
            + "\n"
        )
        out.flush()


async def _subscribe(client: BrokerClient, stream: str, out: IO[str]) -> Subscription[Any]:
    def on_status(event: StatusEvent) -> None:
        record = {
            "status": event.state,
            "connection": event.connection,
            "ts": event.timestamp,
            "rx": time.time(),
        }
        out.write(json.dumps(record) + "\n")
        out.flush()

    kind, _, rest = stream.partition(":")
    code, _, depth = rest.partition(":")
    if kind == "ticker":
        return await client.subscribe_ticker([code], on_status=on_status)
    if kind == "trade":
        return await client.subscribe_trade([code], on_status=on_status)
    if kind == "orderbook":
        return await client.subscribe_orderbook(
            [code], depth=int(depth) if depth else None, on_status=on_status
        )
    if kind.startswith("candle."):
        return await client.subscribe_candle(
            [code], unit=kind.removeprefix("candle."), on_status=on_status
        )
    raise SystemExit(f"unknown stream {stream!r}")


async def main(name: str, out_path: str, streams: list[str]) -> None:
    loop = asyncio.get_running_loop()
    with open(out_path, "a", encoding="utf-8") as out:  # noqa: ASYNC230 - a local log file
        async with BrokerClient(name=name) as client:
            subs = [await _subscribe(client, s, out) for s in streams]
            pumps = [asyncio.create_task(_pump(sub, out)) for sub in subs]
            print("ready", flush=True)
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                command = line.split()
                if not command or command[0] == "quit":
                    break
                if command[0] == "unsubscribe":
                    await subs[int(command[1])].unsubscribe()
                    print(f"unsubscribed {command[1]}", flush=True)
            for pump in pumps:
                pump.cancel()


if __name__ == "__main__":
    # stdout is the command channel: logs go to stderr.
    configure_logging("console", "info")
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("streams", nargs="+")
    args = parser.parse_args()
    asyncio.run(main(args.name, args.out, args.streams))
