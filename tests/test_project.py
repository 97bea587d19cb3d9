"""The repository's own commands: what the README tells a new user to run must run."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support import ROOT


def _git_modes() -> dict[str, str]:
    """``path -> mode`` of the commands under version control (git's view, not the disk's:
    a fresh clone gets what git records)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(
        ["git", "ls-files", "-s", "scripts", ".ci"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    modes = {}
    for line in listing.splitlines():
        meta, path = line.split("\t", 1)
        modes[path] = meta.split()[0]
    return modes


def test_every_command_the_readme_names_is_executable_in_a_fresh_clone() -> None:
    modes = _git_modes()
    assert {"scripts/setup", "scripts/test", "scripts/demo", "scripts/check-latest"} <= set(
        modes
    ), sorted(modes)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path, mode in modes.items():
        if f"./{path}" in readme or path == ".ci/run":
            assert mode == "100755", f"{path} is not executable in git (mode {mode})"
