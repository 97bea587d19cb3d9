"""Pluggable data handlers: registration checks, chaining, failures that stay contained."""

from __future__ import annotations

import json
import types
from typing import Any

import msgspec
import pytest

from broker.config import ConfigError, Settings
from broker.exchange import UpbitExchange
from broker.handlers import HandlerError, HandlerSet, load_handlers, parse_entries
from broker.publisher import Publisher
from broker.routing import DataRouter
from examples.handlers import LargeTrades
from schemas.bus import StreamSpec
from schemas.upbit import MyOrder, Ticker, Trade
from tests.broker.test_routing import RecordingSocket, my_order, trade


class Doubler:
    """Doubles trade volumes (a transform)."""

    types = ("trade",)

    def handle(self, message: Trade) -> Trade:
        return msgspec.structs.replace(message, trade_volume=message.trade_volume * 2)


class OddOnly:
    """Drops trades with an even sequential id (a filter)."""

    types = frozenset({"trade"})
    name = "odd-only"

    def handle(self, message: Trade) -> Trade | None:
        return message if message.sequential_id % 2 else None


class Exploding:
    types = ("trade",)

    def handle(self, message: Trade) -> Trade:
        if message.sequential_id == 2:
            raise RuntimeError("boom")
        return message


class WrongClass:
    types = ("trade",)

    def handle(self, message: Trade) -> Any:
        return {"not": "a trade"}


def routed(*handlers: Any) -> tuple[DataRouter, RecordingSocket, HandlerSet]:
    socket = RecordingSocket()
    publisher = Publisher(socket, "e")  # type: ignore[arg-type]
    hset = HandlerSet(handlers)
    router = DataRouter(publisher, UpbitExchange(Settings()), handlers=hset)
    spec = StreamSpec("trade", "KRW-BTC")
    publisher.activate(spec.topic)
    router.set_streams([spec])
    return router, socket, hset


def send(router: DataRouter, *sids: int, volume: float = 1.0) -> None:
    for sid in sids:
        router.on_frame(json.dumps({**trade("KRW-BTC", sid), "trade_volume": volume}).encode(), 1)


def test_handlers_chain_in_order_and_drops_leave_no_sequence_gap() -> None:
    router, socket, hset = routed(OddOnly(), Doubler())
    send(router, 1, 2, 3, 4, 5)
    got = [(e.seq, e.data.sequential_id, e.data.trade_volume) for _, e in socket.sent]  # type: ignore[union-attr]
    assert got == [(1, 1, 2.0), (2, 3, 2.0), (3, 5, 2.0)]
    rows = {m.name: m for m in hset.metrics()}
    assert (rows["odd-only"].handled, rows["odd-only"].dropped) == (3, 2)
    assert rows["Doubler"].handled == 3  # it never saw the dropped ones
    assert rows["Doubler"].types == ["trade"]


def test_rest_data_goes_through_the_same_handlers() -> None:
    router, socket, _ = routed(OddOnly())
    router.route(msgspec.convert(trade("KRW-BTC", 2), Trade), 1, "rest")
    router.route(msgspec.convert(trade("KRW-BTC", 3), Trade), 1, "rest")
    assert [(e.data.sequential_id, e.source) for _, e in socket.sent] == [(3, "rest")]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("handler", "error"),
    [(Exploding(), "RuntimeError: boom"), (WrongClass(), "returned dict for Trade")],
)
def test_a_failing_handler_loses_that_message_only(handler: Any, error: str) -> None:
    router, socket, hset = routed(handler)
    send(router, 1, 2, 3)
    expected = [1, 3] if isinstance(handler, Exploding) else []
    assert [e.data.sequential_id for _, e in socket.sent] == expected  # type: ignore[union-attr]
    (row,) = hset.metrics()
    assert row.errors == (1 if isinstance(handler, Exploding) else 3)
    assert error in row.last_error


def test_types_without_handlers_are_routed_directly() -> None:
    router, _, hset = routed(OddOnly())
    assert set(hset.chains) == {Trade}
    assert router._routes[Ticker].__name__ == "_route_ticker"  # no wrapper, no cost


def fake(types_: Any) -> Any:
    """A duck-typed handler whose ``types`` is ``types_``."""
    return types.SimpleNamespace(types=types_, handle=lambda m: m)


@pytest.mark.parametrize(
    ("handler", "match"),
    [
        (object(), "not a data handler"),
        (
            types.SimpleNamespace(types=("trades",), handle=lambda m: m),
            "unknown data type 'trades'",
        ),
        (types.SimpleNamespace(types="trade", handle=lambda m: m), "non-empty collection"),
        (types.SimpleNamespace(types=(), handle=lambda m: m), "non-empty collection"),
    ],
)
def test_bad_handlers_are_refused_at_registration(handler: Any, match: str) -> None:
    with pytest.raises(HandlerError, match=match):
        HandlerSet([handler])


def test_entries_are_imported_and_called() -> None:
    (handler,) = load_handlers(parse_entries(" examples.handlers:LargeTrades , "))
    assert isinstance(handler, LargeTrades)
    assert load_handlers(parse_entries("")) == []


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("examples.handlers", "is not package.module:name"),
        ("examples.handlers:Large Trades", "is not package.module:name"),
        ("no_such_module_xyz:Thing", "cannot import 'no_such_module_xyz'"),
        ("examples.handlers:Nope", "has no 'Nope'"),
        ("examples.handlers:__doc__", "is not a class or function"),
    ],
)
def test_bad_entries_name_the_problem(raw: str, match: str) -> None:
    with pytest.raises(HandlerError, match=match):
        load_handlers(parse_entries(raw))


def test_configuration_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="UPBIT_BROKER_HANDLERS: 'x' is not"):
        Settings.from_env({"UPBIT_BROKER_HANDLERS": "x"})
    settings = Settings.from_env({"UPBIT_BROKER_HANDLERS": "examples.handlers:LargeTrades"})
    assert settings.handlers == ("examples.handlers:LargeTrades",)


def test_a_factory_that_fails_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LARGE_TRADE_KRW", "-5")
    with pytest.raises(HandlerError, match="making the handler failed: LARGE_TRADE_KRW"):
        load_handlers(["examples.handlers:LargeTrades"])


def test_large_trades_example_filters_krw_markets_only() -> None:
    handler = LargeTrades(min_krw=1_000_000)
    small = msgspec.convert({**trade("KRW-BTC", 1), "trade_price": 100.0}, Trade)
    big = msgspec.convert({**trade("KRW-BTC", 2), "trade_price": 2_000_000.0}, Trade)
    btc_market = msgspec.convert({**trade("BTC-ETH", 3), "trade_price": 0.01}, Trade)
    assert handler.handle(small) is None
    assert handler.handle(big) is big
    assert handler.handle(btc_market) is btc_market


class DropAllOrders:
    types = ("myOrder",)

    def handle(self, message: MyOrder) -> None:
        return None


def test_reconciliation_sees_private_messages_a_handler_drops() -> None:
    seen: list[Any] = []

    def observe(message: Any, source: str) -> bool:
        seen.append(message)
        return True

    socket = RecordingSocket()
    publisher = Publisher(socket, "e")  # type: ignore[arg-type]
    hset = HandlerSet([DropAllOrders()])
    router = DataRouter(publisher, UpbitExchange(Settings()), on_private=observe, handlers=hset)
    publisher.activate("myOrder/")
    order = my_order("KRW-BTC")
    router.route(order, 1, "websocket")
    assert seen == [order]  # the account state follows Upbit ...
    assert socket.sent == []  # ... while the bus follows the handler
    assert hset.metrics()[0].dropped == 1


def test_a_module_failing_at_import_is_a_handler_error(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_handler_mod.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(HandlerError, match="importing 'broken_handler_mod' failed: RuntimeError"):
        load_handlers(["broken_handler_mod:Thing"])
