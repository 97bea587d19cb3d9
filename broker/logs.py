"""structlog, configured once, with secrets masked by a processor (never by remembering).

:func:`configure_logging` installs a processor chain whose :class:`SecretMasker` runs
last before rendering, so every event — whatever code produced it, whatever nested
value or exception text carries it — has API keys and JWTs replaced by ``***``. It
masks three things: values registered with :func:`register_secret` (the configured
keys), anything shaped like a JWT, and the values of keys whose names say secret
(``secret``, ``token``, ``authorization``, ``password``, ``jwt``).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

__all__ = ["SecretMasker", "configure_logging", "get_logger", "mask", "register_secret"]

MASK: Final = "***"
_JWT_RE: Final = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_BEARER_RE: Final = re.compile(r"(?i)(bearer\s+)\S+")
_SECRET_NAMES: Final = ("secret", "token", "authorization", "password", "jwt", "access_key")

_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this exact string everywhere it appears in any later log event."""
    if value and len(value) >= 4:
        _registered.add(value)


def mask(text: str) -> str:
    """``text`` with registered secrets, bearer tokens and JWT-shaped strings replaced."""
    for secret in _registered:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _BEARER_RE.sub(r"\1" + MASK, text)
    return _JWT_RE.sub(MASK, text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {_scrub(k): (MASK if _is_secret_name(k) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, tuple):
        # A plain tuple out: a namedtuple cannot be rebuilt from one iterable.
        return tuple(_scrub(v) for v in value)
    if isinstance(value, list | set | frozenset):
        return [_scrub(v) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return mask(repr(value)) if not isinstance(value, BaseException) else mask(str(value))


def _is_secret_name(name: object) -> bool:
    return isinstance(name, str) and any(s in name.lower() for s in _SECRET_NAMES)


class SecretMasker:
    """structlog processor: replaces secrets in every key and nested value of an event."""

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event_dict.items()):
            event_dict[key] = MASK if _is_secret_name(key) else _scrub(value)
        return event_dict


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Configure structlog, and stdlib logging underneath, for this process.

    Records from other libraries (websockets logs every upgrade header at debug level,
    Authorization included) go through the same masking chain as structlog's own.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                SecretMasker(),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    structlog.configure(
        processors=[*shared, SecretMasker(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str, **context: Any) -> Any:
    """A bound structlog logger for one component."""
    return structlog.get_logger(name).bind(component=name, **context)
