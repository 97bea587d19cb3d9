"""Client library of upbit-broker: subscribe to Upbit data through the local broker.

Asyncio::

    from clients import BrokerClient

    async with BrokerClient() as client:          # finds the broker by itself
        sub = await client.subscribe_ticker(["KRW-BTC", "KRW-ETH"])
        async for ticker in sub:                  # snapshot first, then updates
            print(ticker.code, ticker.trade_price, sub.last_envelope.seq)

Blocking programs use :class:`SyncBrokerClient` (same method names). Callbacks receive
the payload struct (:class:`schemas.upbit.Ticker`, ...); the envelope around it is
``sub.last_envelope``; ``on_status=`` receives :class:`schemas.bus.StatusEvent` (gaps,
upstream down/restored, broker lost/restored). This package never imports auth code
and never sees API keys: only the broker holds them.
"""

from clients.client import BrokerClient
from clients.errors import (
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    ClientClosed,
    ClientError,
    UntrustedBroker,
)
from clients.streams import StatusCallback
from clients.subscription import DEFAULT_MAXSIZE, Subscription
from clients.sync import SyncBrokerClient, SyncSubscription

__all__ = [
    "DEFAULT_MAXSIZE",
    "BrokerClient",
    "BrokerError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "ClientClosed",
    "ClientError",
    "StatusCallback",
    "Subscription",
    "SyncBrokerClient",
    "SyncSubscription",
    "UntrustedBroker",
]
