"""Pluggable data handlers: transform or drop Upbit payloads before they are published.

A handler names the Upbit data types it handles (``types``: ``"ticker"``, ``"trade"``,
``"orderbook"``, ``"candle.1m"`` ... ``"myOrder"``, ``"myAsset"``) and has a ``handle``
method that returns the payload to publish: the same one, a changed copy of the same
class (``msgspec.structs.replace``), or None to drop it. Handlers of one type run in
the order they were registered, each on the previous one's result, for data from the
WebSocket and from the REST fallback alike, before sequence numbers are assigned (a
dropped message leaves no gap).

Register them in code with ``Broker(settings, handlers=[...])`` or, without code, with
``UPBIT_BROKER_HANDLERS=package.module:name[,...]``: each ``name`` is imported at start
and called without arguments (a class or a factory function) to make the handler.

A handler that raises, or returns another class than it was given, loses that one
message: it is dropped, counted in the handler's ``errors`` (broker metrics) and
logged; the broker and every other stream keep running. Payload structs are frozen,
so a handler cannot change a message another handler or the cache already holds.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from broker.logs import get_logger
from schemas.bus import HandlerMetrics
from schemas.upbit import DATA_TYPES

__all__ = [
    "DataHandler",
    "HandlerChain",
    "HandlerError",
    "HandlerSet",
    "handler_name",
    "load_handlers",
    "parse_entries",
]

_ENTRY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


class HandlerError(ValueError):
    """A handler cannot be loaded or registered (bad entry, unknown data type)."""


@runtime_checkable
class DataHandler(Protocol):
    """Transforms (or drops) the payloads of the Upbit data types it names."""

    @property
    def types(self) -> Collection[str]:
        """Upbit data type names this handler receives (keys of ``schemas.upbit.DATA_TYPES``).

        A plain class attribute does: ``types = frozenset({"trade"})``.
        """
        ...

    def handle(self, message: Any) -> Any | None:
        """The payload to publish instead of ``message`` (same class), or None to drop it."""
        ...


@dataclass
class _Counters:
    handled: int = 0
    dropped: int = 0
    errors: int = 0
    last_error: str = ""


def handler_name(handler: DataHandler) -> str:
    """How a handler is named in logs and metrics: its ``name``, else its class."""
    name = getattr(handler, "name", None)
    return name if isinstance(name, str) and name else type(handler).__qualname__


class HandlerChain:
    """The handlers of one payload class, applied in order; counts what each did."""

    def __init__(self, handlers: Sequence[DataHandler], counters: Mapping[int, _Counters]) -> None:
        self._steps = [(h, h.handle, counters[id(h)]) for h in handlers]
        self._log = get_logger("handlers")

    def __call__(self, message: Any) -> Any | None:
        """``message`` after every handler, or None once one dropped or failed on it."""
        cls = type(message)
        for handler, handle, counters in self._steps:
            try:
                result = handle(message)
            except Exception as exc:  # a handler bug must not take the broker down
                self._failed(handler, counters, f"{type(exc).__name__}: {exc}")
                return None
            if result is None:
                counters.dropped += 1
                return None
            if type(result) is not cls:
                self._failed(
                    handler,
                    counters,
                    f"returned {type(result).__name__} for {cls.__name__} (must be the same class)",
                )
                return None
            counters.handled += 1
            message = result
        return message

    def _failed(self, handler: DataHandler, counters: _Counters, error: str) -> None:
        counters.errors += 1
        counters.last_error = error[:300]
        if counters.errors <= 10 or counters.errors % 1000 == 0:
            self._log.error(
                "data handler failed; message dropped",
                handler=handler_name(handler),
                error=counters.last_error,
                count=counters.errors,
            )


class HandlerSet:
    """Every registered handler, grouped per payload class, with their counters."""

    def __init__(self, handlers: Iterable[DataHandler]) -> None:
        self.handlers = list(handlers)
        self._counters = {id(h): _Counters() for h in self.handlers}
        self.chains = _chains(self.handlers, self._counters)

    def metrics(self) -> list[HandlerMetrics]:
        """One row per handler, in registration order."""
        return [
            HandlerMetrics(
                name=handler_name(h),
                types=sorted(h.types),
                handled=c.handled,
                dropped=c.dropped,
                errors=c.errors,
                last_error=c.last_error,
            )
            for h in self.handlers
            for c in (self._counters[id(h)],)
        ]


def _chains(
    handlers: Sequence[DataHandler], counters: Mapping[int, _Counters]
) -> dict[type, HandlerChain]:
    """Check every handler and group them per payload class (registration order kept)."""
    per_class: dict[type, list[DataHandler]] = {}
    for handler in handlers:
        if not isinstance(handler, DataHandler):
            raise HandlerError(
                f"{handler!r} is not a data handler: it needs `types` and `handle(message)`"
            )
        types = handler.types
        if isinstance(types, str) or not types:
            raise HandlerError(
                f"{handler_name(handler)}.types must be a non-empty collection of type names, "
                f"got {types!r}"
            )
        for name in types:
            cls = DATA_TYPES.get(name)
            if cls is None:
                raise HandlerError(
                    f"{handler_name(handler)} handles unknown data type {name!r}; "
                    f"known: {', '.join(sorted(DATA_TYPES))}"
                )
            per_class.setdefault(cls, []).append(handler)
    return {cls: HandlerChain(hs, counters) for cls, hs in per_class.items()}


def parse_entries(raw: str) -> tuple[str, ...]:
    """``module:name`` entries of a comma-separated list; raises HandlerError."""
    entries = tuple(part.strip() for part in raw.split(",") if part.strip())
    for entry in entries:
        if not _ENTRY.fullmatch(entry):
            raise HandlerError(f"{entry!r} is not package.module:name")
    return entries


def load_handlers(
    entries: Iterable[str], *, importer: Callable[[str], Any] = importlib.import_module
) -> list[DataHandler]:
    """Import each ``module:name`` and call it to make a handler; raises HandlerError."""
    handlers: list[DataHandler] = []
    for entry in entries:
        module_name, _, attr = entry.partition(":")
        try:
            target: Any = importer(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except ImportError as exc:
            raise HandlerError(f"{entry}: cannot import {module_name!r} ({exc})") from None
        except AttributeError:
            raise HandlerError(f"{entry}: {module_name!r} has no {attr!r}") from None
        except Exception as exc:  # the module itself failed while being imported
            raise HandlerError(
                f"{entry}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from None
        if not callable(target):
            raise HandlerError(f"{entry}: {attr!r} is not a class or function")
        try:
            handler = target()
        except Exception as exc:
            raise HandlerError(f"{entry}: making the handler failed: {exc}") from None
        handlers.append(handler)
    return handlers
