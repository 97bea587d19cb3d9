"""Wire types shared by the broker, the clients and the tests.

- :mod:`schemas.upbit`: Upbit WebSocket messages (DEFAULT and SIMPLE keys, list frames).
- :mod:`schemas.rest`: Upbit REST bodies, and conversions to the WebSocket structs.
- :mod:`schemas.bus`: the broker's bus protocol (topics, envelope, control messages).
- :mod:`schemas.errors`: :class:`DecodeError`, the one error type for malformed input.
"""

from schemas.errors import DecodeError

__all__ = ["DecodeError"]
