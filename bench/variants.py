"""Broker variants for A/B runs: another commit's broker, measured in the same run.

``--variant commit:REV`` (throughput) starts a second broker whose ``broker`` and
``schemas`` packages come from ``git archive REV``, next to the working tree's broker,
against the same simulator and with the same client library. That is how a change is
shown against its baseline in one run, the only comparison this 2-vCPU host allows
(absolute rates swing by +-30 % between runs).

The bus protocol must be the same in both commits: the client is the working tree's.

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

__all__ = ["broker_argv", "checkout"]

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("broker", "schemas")


def checkout(rev: str) -> Path:
    """Extract ``broker/`` and ``schemas/`` of ``rev`` into a fresh directory."""
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


def broker_argv(variant: str) -> list[str]:
    """Python arguments that run the broker of ``variant`` (``commit:REV``)."""
    kind, _, rev = variant.partition(":")
    if kind != "commit" or not rev:
        raise SystemExit(f"unknown variant {variant!r}; use commit:REV (a git revision)")
    tree = checkout(rev)
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); "
        "from broker.cli import main; sys.exit(main())"
    )
    return ["-c", code]
