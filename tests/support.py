"""Old import path of the test helpers, kept so existing imports keep working.

Everything lives in :mod:`tests.harness` (one harness for the tests and the benchmarks);
new code imports it from there.
"""

from tests.harness import (
    ROOT,
    TIME_SCALE,
    Child,
    async_wait_until,
    scaled,
    short_tmpdir,
    wait_until,
)

__all__ = [
    "ROOT",
    "TIME_SCALE",
    "Child",
    "async_wait_until",
    "scaled",
    "short_tmpdir",
    "wait_until",
]
