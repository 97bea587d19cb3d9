"""Every knob of the Upbit simulator in one dataclass, with defaults that mimic Upbit.

Defaults follow PROTOCOL.md (limits, 120 s idle timeout, 30-level books) and its
section 11.1 suggestions for the points Upbit does not document. Tests and benchmarks
override fields (``dataclasses.replace``) instead of patching code.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from decimal import Decimal
from typing import Literal

__all__ = [
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_REST_LIMITS",
    "DEFAULT_SECRET_KEY",
    "SimConfig",
]

# Demo keys used when neither the CLI nor UPBIT_ACCESS_KEY / UPBIT_SECRET_KEY give any.
DEFAULT_ACCESS_KEY = "sim-access-key"
DEFAULT_SECRET_KEY = "sim-secret-key"  # noqa: S105 - a documented demo key, not a secret

# REST rate-limit groups (PROTOCOL.md section 6.1): name -> (requests, window seconds).
# Quotation groups are counted per IP, exchange groups per access key ("pocket").
DEFAULT_REST_LIMITS: Mapping[str, tuple[int, float]] = {
    "market": (10, 1.0),
    "candle": (10, 1.0),
    "trade": (10, 1.0),
    "ticker": (10, 1.0),
    "orderbook": (10, 1.0),
    "default": (30, 1.0),
    "order": (12, 1.0),
    "order-test": (8, 1.0),
    "order-cancel-all": (1, 2.0),
}

UnknownCodes = Literal["ignore", "error"]
AuthFailure = Literal["in_band", "http_401"]
SlowClient = Literal["disconnect", "drop_oldest"]


@dataclasses.dataclass
class SimConfig:
    """Simulator settings; see ``upbit-sim --help`` for the matching CLI flags."""

    host: str = "127.0.0.1"
    port: int = 0  # REST and the control API
    ws_port: int | None = None  # both WebSockets; None: port + 1, or a free one if port is 0
    seed: int = 1

    # Market data: events per second per active market (a trade event emits trade, ticker
    # and orderbook messages; a quote event an orderbook only) and the share of trades.
    rate: float = 2.0
    trade_ratio: float = 0.5
    # Trades generated into a market's history when it is first used.
    backfill_trades: int = 60
    # Seconds a market stays active after a REST quotation request touched it.
    rest_activation_seconds: float = 60.0
    # Firehose: every subscribed stream is sent as fast as the socket drains.
    firehose: bool = False
    firehose_batch: int = 512

    # WebSocket
    compress: bool = True  # negotiate permessage-deflate when the client offers it
    idle_timeout: float = 120.0
    unknown_codes: UnknownCodes = "ignore"
    private_auth_failure: AuthFailure = "in_band"
    ws_check_nonce: bool = True
    send_queue_max: int = 20_000
    slow_client: SlowClient = "disconnect"
    list_batch_max: int = 100
    max_request_log: int = 1000
    max_closed_connections: int = 200

    # Keys for the private endpoints.
    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str = DEFAULT_SECRET_KEY
    balances: dict[str, Decimal] | None = None
    # Demo orders (offline demo): place, fill and cancel small orders on this account
    # every demo_interval seconds on demo_market (simulator.demo).
    demo_orders: bool = False
    demo_interval: float = 2.0
    demo_market: str = "KRW-BTC"

    # Rate limits. ``limits_enabled=False`` switches every limit off (benchmarks).
    limits_enabled: bool = True
    upgrade_limit: int = 5
    upgrade_window: float = 1.0
    ws_message_limits: tuple[tuple[int, float], ...] = ((5, 1.0), (100, 60.0))
    rest_limits: dict[str, tuple[int, float]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_REST_LIMITS)
    )
    # Escalation: once teapot_after 429s fall within teapot_window seconds, the next
    # violation is a 418 block of block_base seconds; every further attempt during a block
    # multiplies it by block_growth (capped at block_max). block_reset seconds without a
    # violation forget the block history.
    teapot_after: int = 3
    teapot_window: float = 10.0
    block_base: float = 5.0
    block_growth: float = 2.0
    block_max: float = 600.0
    block_reset: float = 600.0

    def ws_port_for(self, port: int) -> int:
        """The WebSocket port to bind once REST got ``port`` (0: let the OS pick)."""
        if self.ws_port is not None:
            return self.ws_port
        return 0 if self.port == 0 else port + 1

    def with_env_keys(self) -> SimConfig:
        """Fill the keys from UPBIT_ACCESS_KEY / UPBIT_SECRET_KEY when still the demo ones."""
        access = self.access_key
        secret = self.secret_key
        if access == DEFAULT_ACCESS_KEY:
            access = os.environ.get("UPBIT_ACCESS_KEY") or access
        if secret == DEFAULT_SECRET_KEY:
            secret = os.environ.get("UPBIT_SECRET_KEY") or secret
        return dataclasses.replace(self, access_key=access, secret_key=secret)
