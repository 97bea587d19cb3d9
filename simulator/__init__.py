"""A faithful Upbit simulator: REST quotation and exchange endpoints, the public and
private WebSocket, Upbit's rate limits, and a control API for fault injection (REST and
control on aiohttp, the WebSockets on ``websockets`` on a port of their own). Run
``upbit-sim`` (or ``python -m simulator``), or :func:`start_simulator` in-process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from simulator.config import SimConfig

if TYPE_CHECKING:
    from simulator.app import RunningSimulator, Simulator

__all__ = ["RunningSimulator", "SimConfig", "Simulator", "start_simulator"]


async def start_simulator(config: SimConfig | None = None, **overrides: Any) -> RunningSimulator:
    """Start a simulator in the running event loop; see :mod:`simulator.app`."""
    from simulator.app import start_simulator as _start

    return await _start(config, **overrides)


def __getattr__(name: str) -> Any:
    if name in ("RunningSimulator", "Simulator"):
        from simulator import app

        return getattr(app, name)
    raise AttributeError(name)
