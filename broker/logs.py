"""structlog, configured once, with secrets masked by a processor (never by remembering).

:func:`configure_logging` installs a processor chain whose :class:`SecretMasker` runs
last before rendering, so every event — whatever code produced it, whatever nested
value or exception text carries it — has API keys and JWTs replaced by ``***``. It
masks four things: values registered with :func:`register_secret` (the configured
keys), anything shaped like a JWT, the password of a URL (``scheme://user:***@host``),
and the values of keys whose names say secret (``secret``, ``token``,
``authorization``, ``password``, ``jwt``).

Masking runs on text a remote party chooses (a client's name, an upstream error body),
so its cost is linear in the text: no pattern here can backtrack over a long run of
input once per starting position.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

__all__ = [
    "LogThrottle",
    "SecretMasker",
    "configure_logging",
    "get_logger",
    "mask",
    "register_secret",
]

MASK: Final = "***"
_TOKEN_RUN_RE: Final = re.compile(r"[A-Za-z0-9_.-]+")
"""A maximal run of JWT characters (base64url and dots): each character is read once."""
_JWT_HEAD: Final = "eyJ"
"""Every JWT starts so: base64url of ``{"``."""
_JWT_MIN_FIRST: Final = len(_JWT_HEAD) + 5
"""Shortest first segment counted as a JWT header (``eyJ`` and 5 more characters)."""
_BEARER_RE: Final = re.compile(r"(?i)(bearer\s++)\S++")
_URL_USERINFO_RE: Final = re.compile(r"://([^\s/?#@]*)@")
"""The userinfo of a URL (RFC 3986: it holds no ``/ ? # @``); scanning stops at the
first of those or a space, so each character is read at most once after a ``://``."""
_SECRET_NAMES: Final = ("secret", "token", "authorization", "password", "jwt", "access_key")

_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this exact string everywhere it appears in any later log event."""
    if value and len(value) >= 4:
        _registered.add(value)


def mask(text: str) -> str:
    """``text`` with registered secrets, bearer tokens, URL passwords and JWTs replaced.

    Linear in ``len(text)`` whatever the text (see the module docstring).
    """
    for secret in _registered:
        if secret in text:
            text = text.replace(secret, MASK)
    if "://" in text:
        text = _URL_USERINFO_RE.sub(_mask_userinfo, text)
    text = _BEARER_RE.sub(r"\1" + MASK, text)
    if _JWT_HEAD in text:
        text = _TOKEN_RUN_RE.sub(_mask_jwts_in_run, text)
    return text


def _mask_userinfo(match: re.Match[str]) -> str:
    """``://user:password@`` → ``://user:***@``; a userinfo without ``:`` is all secret."""
    user, colon, _ = match.group(1).partition(":")
    return f"://{user}:{MASK}@" if colon else f"://{MASK}@"


def _mask_jwts_in_run(match: re.Match[str]) -> str:
    """Mask the JWTs of one run of ``[A-Za-z0-9_.-]`` characters, in one pass over it.

    Same result as searching ``eyJ[A-Za-z0-9_-]{5,}\\.[A-Za-z0-9_-]*\\.[A-Za-z0-9_-]*``,
    which takes time quadratic in a long run without dots (``eyJeyJeyJ...``): a JWT
    starts at the first ``eyJ`` of a dot-separated segment whose rest is long enough,
    and takes that segment's rest and the next two segments whole.
    """
    run = match.group()
    if "." not in run or _JWT_HEAD not in run:
        return run
    segments = run.split(".")
    out: list[str] = []
    index = 0
    while index < len(segments):
        segment = segments[index]
        start = segment.find(_JWT_HEAD) if index + 2 < len(segments) else -1
        if start >= 0 and len(segment) - start >= _JWT_MIN_FIRST:
            out.append(segment[:start] + MASK)
            index += 3
        else:
            out.append(segment)
            index += 1
    return ".".join(out)


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


class LogThrottle:
    """At most ``burst`` log lines per ``window`` seconds for events a peer can repeat
    at will (an upstream sending 1,200 error frames a second filled the log with 18,078
    lines in 15 s). Pure: the caller passes ``now``; what was held back is counted and
    reported with the next line let through."""

    def __init__(self, burst: int = 10, window: float = 60.0) -> None:
        self._burst = burst
        self._window = window
        self._start = float("-inf")
        self._count = 0
        self._held = 0

    def allow(self, now: float) -> int | None:
        """None: hold this line back. Else log it, saying how many were held before it."""
        if now - self._start >= self._window:
            self._start, self._count = now, 0
        if self._count >= self._burst:
            self._held += 1
            return None
        self._count += 1
        held, self._held = self._held, 0
        return held
