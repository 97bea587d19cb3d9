"""The chaos soak: the seeded randomized fault test of ``tests/chaos.py`` for longer.

``python -m bench.chaos --minutes 30 [--seed N]`` (or ``UPBIT_CHAOS_SEED``); prints the
faults injected by kind, orders and fills checked and the invariants; exit code 1 if
any invariant failed (the table says which, and the seed that reproduces it).
"""

from __future__ import annotations

import argparse
import sys

from tests.chaos import Run, seed_from_env
from tests.harness import install_signal_handlers


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 if every invariant held."""
    parser = argparse.ArgumentParser(prog="python -m bench.chaos")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run")
    parser.add_argument("--seed", type=int, default=None, help="default: UPBIT_CHAOS_SEED")
    args = parser.parse_args(argv)
    install_signal_handlers()
    seed = args.seed if args.seed is not None else seed_from_env()
    report = Run(seed, args.minutes * 60).run()
    print(report.table())
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
