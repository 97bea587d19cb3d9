"""The example programs run as real processes against the simulator and a real broker.

``examples/trader.py`` with the simulator's keys at the broker and trading on: it warms
up on candles, places a limit bid through the broker, prints the fill that ``myOrder``
brought, and stops by itself (``--until-fills``) with exit code 0. The order it names is
checked at the simulator, with the test's own signed call.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest

from tests.harness import Child, scaled
from tests.integration.conftest import BrokerProc, Sim, broker_env, run_broker_proc
from tests.integration.test_trading import TRADING, signed_get

RUN_SECONDS = 60.0
"""The trader's own bound (``--seconds``): it stops then even without a fill."""


@pytest.fixture
def trading_broker(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProc]:
    """A broker with the simulator's keys and trading on."""
    yield from run_broker_proc(broker_env(sim, keys=True, extra=TRADING), monkeypatch)


def run_to_exit(child: Child, timeout: float) -> tuple[list[str], int]:
    """Every stdout line of ``child`` until it exits, and its exit code; the child is
    stopped (and reaped) if it outlives ``timeout``, which fails the test."""
    deadline = time.monotonic() + scaled(timeout)
    lines: list[str] = []
    try:
        while time.monotonic() < deadline:
            line = child.read_line(timeout=max(deadline - time.monotonic(), 0.1))
            if line:
                lines.append(line)
                continue
            if not child.alive():  # "" is the end of its output (or an empty line)
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=0.05)
        else:
            pytest.fail(f"{child.name} still runs after {timeout:g} s\n{child.output(5000)}")
        child.proc.wait(timeout=scaled(5))
    except TimeoutError:
        pytest.fail(f"{child.name} went quiet for {timeout:g} s\n{child.output(5000)}")
    finally:
        code = child.stop()
        print(child.output())  # pytest shows it when the test fails
    return lines, code


def test_the_example_trader_warms_up_places_a_bid_and_prints_its_fill(
    trading_broker: BrokerProc, sim: Sim
) -> None:
    # A two-close average bids on every down-tick; a negative offset bids above the
    # price (a marketable limit), so the bid fills at once against the simulator's book.
    args = ["KRW-BTC", "--window", "2", "--offset", "-0.002", "--krw", "10000",
            "--until-fills", "1", "--seconds", str(scaled(RUN_SECONDS))]  # fmt: skip
    child = Child("trader", ["examples/trader.py", *args], env=trading_broker.env)
    lines, code = run_to_exit(child, RUN_SECONDS + 30)
    shown = "\n".join(lines)
    assert code == 0, shown
    warmed = [line for line in lines if line.startswith("warmed up on ")]
    assert warmed, shown
    assert int(warmed[0].split()[3]) > 0, shown  # "warmed up on N candles of KRW-BTC"
    placed = [line.split()[1] for line in lines if line.startswith("placed ")]
    assert placed, shown
    fills = [line.split() for line in lines if line.startswith("fill ")]
    assert fills, shown
    _, identifier, side, volume, _, price = fills[0]
    assert identifier in placed, shown  # the fill is of an order it placed
    assert side == "BID"  # myOrder spells sides in capitals
    assert Decimal(volume) > 0
    assert Decimal(price) > 0
    assert lines[-1] == f"stopped after {len(fills)} fills", shown
    order = signed_get(sim, "/v1/order", {"identifier": identifier})
    assert Decimal(order["executed_volume"]) >= Decimal(volume)
    assert order["trades"], order
