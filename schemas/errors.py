"""The one error type for malformed wire input anywhere in :mod:`schemas`.

Hierarchy::

    ValueError
     └── DecodeError            (schemas.errors; raised by every decode_* function)
           .path: str | None    JSONPath-like location of the bad field, e.g. "$.codes[2]"

msgspec's own ``msgspec.DecodeError`` / ``msgspec.ValidationError``, and what else it
lets through on hostile input — ``UnicodeError`` for a ``str`` holding surrogates, and
``RecursionError`` for a document nested deeper than the interpreter's recursion limit
(``[[[[...`` ten thousand deep) — never escape a ``schemas`` decoder: decoders catch
:data:`DECODE_FAILURES` and wrap it with :func:`wrap_msgspec_error`, chained as
``__cause__``. Catch ``DecodeError`` (or ``ValueError``) and nothing else.
"""

from __future__ import annotations

import re
import sys
from typing import Final

import msgspec

__all__ = ["DECODE_FAILURES", "DecodeError", "wrap_msgspec_error"]

DECODE_FAILURES: Final = (msgspec.DecodeError, UnicodeError, RecursionError)
"""Every exception msgspec raises on hostile input (``msgspec.ValidationError`` is a
``msgspec.DecodeError``): what a decoder catches and hands to :func:`wrap_msgspec_error`.
RecursionError is raised, not a crash, since msgspec counts its nesting against the
interpreter's recursion limit."""

_AT: Final = re.compile(r" - at `(\$[^`]*)`$")
_MISSING: Final = re.compile(r"^Object missing required field `([^`]*)`")


class DecodeError(ValueError):
    """Malformed input: bad JSON/msgpack, wrong field type, missing field, unknown type.

    ``path`` locates the offending value (``"$"`` is the document root, ``"$[1]"`` the
    second item of a list frame, ``"$.trade_price"`` a field); None when the input is
    not parseable up to a field (truncated or syntactically broken JSON, invalid UTF-8);
    the message then gives msgspec's byte offset instead.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __repr__(self) -> str:
        return f"DecodeError({self.message!r}, path={self.path!r})"


def _rebase(path: str, at: str) -> str:
    """Re-root a msgspec path (always starting with ``$``) under ``at``."""
    return at + path[1:]


def wrap_msgspec_error(
    exc: msgspec.DecodeError | msgspec.ValidationError | UnicodeError | RecursionError,
    what: str,
    *,
    at: str = "$",
) -> DecodeError:
    """Turn a msgspec (or UTF-8) failure into a :class:`DecodeError` about ``what``.

    ``at`` is where the decoded document sits inside a larger one (e.g. ``"$[2]"`` for
    the third object of a list frame); paths in the message are re-rooted there. A
    missing required field gets the path of that field (``$.code``), not of its parent.
    The caller should ``raise wrap_msgspec_error(exc, ...) from exc``.
    """
    if isinstance(exc, UnicodeError):
        return DecodeError(f"invalid {what}: not valid UTF-8 ({exc})", path=None)
    if isinstance(exc, RecursionError):
        return DecodeError(
            f"invalid {what}: nested too deeply (arrays/objects deeper than "
            f"{sys.getrecursionlimit()} levels are refused)",
            path=None,
        )
    text = str(exc)
    path: str | None = None
    match = _AT.search(text)
    if match is not None:
        path = _rebase(match.group(1), at)
        text = text[: match.start()]
    elif isinstance(exc, msgspec.ValidationError):
        path = at  # msgspec omits "- at `$`" for errors on the root object
    missing = _MISSING.match(text)
    if missing is not None:
        path = f"{path or at}.{missing.group(1)}"
    if path is None:
        # Syntax errors (truncated, bad byte): msgspec gives a byte offset, not a path.
        return DecodeError(f"invalid {what}: {text}", path=None)
    return DecodeError(f"invalid {what}: {text} (at {path})", path=path)
