"""The real ``upbit-broker`` command with one task made to crash, for exit-code tests.

Usage::

    python -m tests.integration.crashing_broker

Fetching the market list raises RuntimeError: a bug no retry loop expects, so the
broker's ``markets`` task dies of it. Everything else is the real broker, started
through :func:`broker.cli.main` as the console script does.
"""

from __future__ import annotations

import sys

from broker.cli import main
from broker.rest import RestClient
from schemas.rest import RestMarket

CRASH = "simulated bug in a broker task"


async def _crash(self: RestClient) -> list[RestMarket]:
    raise RuntimeError(CRASH)


if __name__ == "__main__":
    RestClient.markets = _crash  # type: ignore[method-assign]
    sys.exit(main(["run"]))
