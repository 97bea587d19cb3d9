"""Every ```python block of README.md and docs/CLIENT.md runs, as written, as a program.

Each block is written to a file and run with a fresh interpreter against a real
simulator (with ``--demo-orders``, so private examples see orders) and a real broker
with the simulator's keys and trading on (``UPBIT_BROKER_TRADING=1``: the trading
examples place and cancel for real); a block preceded by
``<!-- docs-test: public broker -->`` runs against a broker without keys instead. A block
passes when it exits 0 within the deadline, printed something, and did not report the
trading switch off. Blocks that are not programs (a class shown out of its module) are
listed in :data:`FRAGMENTS` by their first line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import Broker, Sim, broker_env, scaled, start_broker, start_sim
from tests.integration.conftest import TEST_BROKER_ENV
from tests.support import ROOT

DOCS = ("README.md", "docs/CLIENT.md")
PUBLIC_MARK = "<!-- docs-test: public broker -->"
FRAGMENTS = frozenset({"class LargeTrades:  # examples/handlers.py"})
"""First lines of blocks that show code out of its program (not run here)."""
TRADING_OFF = ("trading_disabled", "without UPBIT_BROKER_TRADING=1")
"""What a trading example prints when its broker refuses to trade."""
_BLOCK_RE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    """One fenced python block: where it is, its code, which broker it needs."""

    doc: str
    line: int
    code: str
    public_only: bool

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
    """The runnable python blocks of ``doc`` (relative to the project root)."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    found = []
    for match in _BLOCK_RE.finditer(text):
        code = match.group(1)
        if code.splitlines()[0] in FRAGMENTS:
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(doc, line, code, before.strip() == PUBLIC_MARK))
    return found


ALL_BLOCKS = [block for doc in DOCS for block in blocks(doc)]


@pytest.fixture(scope="module")
def docs_sim() -> Iterator[Sim]:
    sim = start_sim(["--rate", "10", "--demo-orders", "--demo-interval", "0.5"])
    yield sim
    sim.stop()
    print(sim.child.output())


def _broker(sim: Sim, *, keys: bool) -> Iterator[Broker]:
    trading = {"UPBIT_BROKER_TRADING": "1"} if keys else {}
    broker = start_broker(broker_env(sim, keys=keys, extra={**TEST_BROKER_ENV, **trading}))
    yield broker
    broker.stop()
    print(broker.child.output())


@pytest.fixture(scope="module")
def private_docs_broker(docs_sim: Sim) -> Iterator[Broker]:
    yield from _broker(docs_sim, keys=True)


@pytest.fixture(scope="module")
def public_docs_broker(docs_sim: Sim) -> Iterator[Broker]:
    yield from _broker(docs_sim, keys=False)


def test_both_documents_have_runnable_examples() -> None:
    counts = {doc: len(blocks(doc)) for doc in DOCS}
    assert counts["README.md"] >= 1
    assert counts["docs/CLIENT.md"] >= 8, counts
    assert any(b.public_only for b in ALL_BLOCKS)


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.id for b in ALL_BLOCKS])
def test_the_example_runs_as_a_program(
    block: Block, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fixture = "public_docs_broker" if block.public_only else "private_docs_broker"
    broker: Broker = request.getfixturevalue(fixture)
    program = tmp_path / "example.py"
    program.write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(program)],
        env={**broker.env, "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(60),
        check=False,
    )
    shown = f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}"
    print(shown)  # pytest shows it when the test fails
    assert done.returncode == 0, shown
    assert done.stdout.strip(), shown
    assert "Traceback" not in done.stderr, shown
    assert not any(off in done.stdout for off in TRADING_OFF), shown
