"""Broker variants for A/B runs: another commit's broker, measured in the same run.

``--variant commit:REV`` (throughput) starts a second broker whose ``broker``,
``schemas`` and ``clients`` packages come from ``git archive REV``, next to the working
tree's broker, against the same simulator. Its client worker imports that commit's
client library too (``BENCH_TREE``), so commits with different bus protocols compare.
That is how a change is shown against its baseline in one run, the only comparison
this 2-vCPU host allows (absolute rates swing by +-30 % between runs).

``--variant asyncio`` runs the working tree's broker on the standard asyncio event loop
instead of uvloop (uvloop made unimportable), to show what uvloop is worth.

Earlier variants patched a proposed change into the broker at start (``publish-int``,
``publish-batch``); both are in the broker now (:meth:`broker.publisher.Publisher.flush`),
so they are gone.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

__all__ = ["TREE_ENV", "broker_argv", "checkout"]

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("broker", "schemas", "clients")
TREE_ENV = "BENCH_TREE"
"""Environment variable: a checkout whose packages a worker imports first."""


def checkout(rev: str) -> Path:
    """Extract the packages of ``rev`` into a fresh directory."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        archive = subprocess.run(
            ["git", "archive", "--format=tar", sha, *PACKAGES],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"variant commit:{rev}: {exc.stderr!s:.300}") from None
    target = Path(tempfile.mkdtemp(prefix=f"bench-tree-{sha[:10]}-", dir="/tmp"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def broker_argv(variant: str) -> tuple[list[str], dict[str, str]]:
    """Python arguments and extra environment that run the broker of ``variant``."""
    if variant == "asyncio":
        code = (
            "import sys; sys.modules['uvloop'] = None; "  # import uvloop -> ImportError
            "from broker.cli import main; sys.exit(main())"
        )
        return ["-c", code], {}
    kind, _, rev = variant.partition(":")
    if kind != "commit" or not rev:
        raise SystemExit(f"unknown variant {variant!r}; use commit:REV or asyncio")
    tree = str(checkout(rev))
    code = (
        f"import sys; sys.path.insert(0, {tree!r}); from broker.cli import main; sys.exit(main())"
    )
    return ["-c", code], {TREE_ENV: tree}
