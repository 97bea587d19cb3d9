"""Configuration: every knob in one place, safe defaults, environment overrides.

The same variables configure the broker, the simulator's account keys and the client
library (which only reads the two bus endpoints, never the keys)::

    UPBIT_WS_URL            wss://api.upbit.com/websocket/v1
    UPBIT_WS_PRIVATE_URL    wss://api.upbit.com/websocket/v1/private
    UPBIT_REST_URL          https://api.upbit.com
    UPBIT_ACCESS_KEY        (absent: public streams only)
    UPBIT_SECRET_KEY        (absent: public streams only)
    UPBIT_BROKER_CONTROL    ipc://<runtime dir>/control.sock   ROUTER, clients send requests
    UPBIT_BROKER_DATA       ipc://<runtime dir>/data.sock      PUB, clients receive data
    UPBIT_BROKER_CURVE_DIR  $XDG_CONFIG_HOME/upbit-broker/curve  CURVE keys for tcp endpoints
    UPBIT_BROKER_TCP_PUBLIC_ONLY 0   1: tcp without CURVE, public data only (no private)
    UPBIT_BROKER_HEARTBEAT  1.0      seconds between client heartbeats
    UPBIT_BROKER_LIVENESS   3        missed heartbeats before a client is expired
    UPBIT_BROKER_STATE_DIR  <runtime dir>   where the broker remembers an Upbit ban
    UPBIT_BROKER_COALESCE_MS 50      window that merges subscription changes
    UPBIT_BROKER_SEND_HWM   10000    frames queued per client before it loses some (a frame
                                     holds 1-16 messages of one topic, at most 8 KB)
    UPBIT_BROKER_WIDEN      ticker,trade   stream types requested for every market of a
                                     quote while requests are scarce (``none``: off)
    UPBIT_BROKER_LOG_FORMAT console | json
    UPBIT_BROKER_LOG_LEVEL  debug | info | warning | error
    UPBIT_BROKER_HTTP       (unset: off)  HOST:PORT of /metrics and /health, e.g.
                                     127.0.0.1:9464 (a bare PORT means loopback)
    UPBIT_BROKER_TRADING    0        1: clients may place and cancel orders with the
                                     broker's keys (reads of the account need keys only)

The runtime directory is ``$XDG_RUNTIME_DIR/upbit-broker`` or
``/tmp/upbit-broker-<uid>`` (:func:`schemas.bus.runtime_dir_path`, which the clients
share), created here with mode 0700 so only this user reaches the sockets. Every ipc
endpoint passes :func:`schemas.trust.ipc_problem`; a tcp endpoint needs the CURVE
server certificate in the curve directory (:class:`CurveLayout`, made by
``upbit-broker keys init``) or the explicit public-only switch. A bad value fails at
start with :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from schemas.bus import (
    CONTROL_ENV,
    DATA_ENV,
    IPC_PATH_MAX,
    EndpointError,
    default_endpoints,
    runtime_dir_path,
)
from schemas.trust import ipc_problem, is_tcp

__all__ = [
    "CURVE_DIR_ENV",
    "IPC_PATH_MAX",
    "PUBLIC_ONLY_ENV",
    "TRADING_ENV",
    "ConfigError",
    "CurveLayout",
    "Secret",
    "Settings",
    "bus_endpoints",
    "check_ipc",
    "curve_dir",
    "runtime_dir",
]

DEFAULT_WS_URL: Final = "wss://api.upbit.com/websocket/v1"
DEFAULT_WS_PRIVATE_URL: Final = "wss://api.upbit.com/websocket/v1/private"
DEFAULT_REST_URL: Final = "https://api.upbit.com"
DEFAULT_WIDEN: Final = frozenset({"ticker", "trade"})
"""Cheap streams (a few messages a second per market) worth carrying ahead of demand;
candles may be added; orderbooks cannot (every market's books cost far more)."""
CURVE_DIR_ENV: Final = "UPBIT_BROKER_CURVE_DIR"
PUBLIC_ONLY_ENV: Final = "UPBIT_BROKER_TCP_PUBLIC_ONLY"
TRADING_ENV: Final = "UPBIT_BROKER_TRADING"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable."""


class Secret:
    """A string that never shows itself in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: call only where it is used (signing a JWT)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def runtime_dir(env: Mapping[str, str] | None = None, *, create: bool = True) -> Path:
    """The per-user directory holding the ipc sockets, created 0700.

    Where it is comes from :func:`schemas.bus.runtime_dir_path` (the clients compute the
    same path, creating nothing); the broker creates it and refuses a symbolic link or a
    directory owned by someone else (who could listen on our endpoints, or point our
    clients at an impostor), looking with ``lstat`` and fixing the mode through an
    ``O_NOFOLLOW`` descriptor, so a link planted at the path is never followed.
    """
    env = os.environ if env is None else env
    path = runtime_dir_path(env)
    if create:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            raise ConfigError(f"runtime directory {path} is a symbolic link; remove it")
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"runtime directory {path} is not a directory")
        if info.st_uid != os.getuid():
            raise ConfigError(
                f"runtime directory {path} belongs to another user (uid {info.st_uid})"
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
    return path


def check_ipc(name: str, endpoint: str) -> None:
    """Raise ConfigError naming ``name`` if an ipc endpoint's directory or socket file
    could let another user in (:func:`schemas.trust.ipc_problem`)."""
    problem = ipc_problem(endpoint)
    if problem is not None:
        raise ConfigError(f"{name}={endpoint!r} is not safe: {problem}")


def bus_endpoints(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(control, data)`` endpoints the broker binds (:func:`schemas.bus.default_endpoints`).

    When either is the default ipc socket, the runtime directory is created and checked
    first, so the broker never binds in a directory someone else controls; every ipc
    endpoint then passes :func:`check_ipc`.
    """
    env = os.environ if env is None else env
    try:
        endpoints = default_endpoints(env)
    except EndpointError as exc:
        raise ConfigError(str(exc)) from None
    if not env.get(CONTROL_ENV) or not env.get(DATA_ENV):
        runtime_dir(env)
    for name, endpoint in zip((CONTROL_ENV, DATA_ENV), endpoints, strict=True):
        check_ipc(name, endpoint)
    return endpoints


def _masked_url(value: str) -> str:
    """``value`` with anything before an ``@`` in its authority hidden."""
    scheme, sep, rest = value.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return value


def curve_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the CURVE keys live: ``UPBIT_BROKER_CURVE_DIR``, else
    ``$XDG_CONFIG_HOME/upbit-broker/curve``, else ``~/.config/upbit-broker/curve``."""
    env = os.environ if env is None else env
    explicit = env.get(CURVE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(config) / "upbit-broker" / "curve"


@dataclass(frozen=True)
class CurveLayout:
    """The files of a curve directory (``zmq.auth`` certificates)::

    server.key  server.key_secret   the broker's certificate
    allowed/NAME.key                public keys of the clients let in (the allow-list)
    clients/NAME.key_secret         key pairs made by ``upbit-broker keys client NAME``
    """

    root: Path

    @property
    def server_public(self) -> Path:
        """The broker's public certificate (safe to hand to clients)."""
        return self.root / "server.key"

    @property
    def server_secret(self) -> Path:
        """The broker's secret certificate (0600, never leaves this machine)."""
        return self.root / "server.key_secret"

    @property
    def allowed(self) -> Path:
        """The allow-list: one public certificate per client."""
        return self.root / "allowed"

    @property
    def clients(self) -> Path:
        """Client key pairs made here, to hand to each client."""
        return self.root / "clients"


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r} must be 1 or 0")


def _tcp_security(env: Mapping[str, str], endpoints: tuple[str, str]) -> tuple[Path, bool, bool]:
    """``(curve dir, curve, public_only)``: how tcp endpoints are guarded, if any."""
    root = curve_dir(env)
    tcp = [(n, e) for n, e in zip((CONTROL_ENV, DATA_ENV), endpoints, strict=True) if is_tcp(e)]
    if not tcp:
        return root, False, False
    if _flag(env, PUBLIC_ONLY_ENV):
        return root, False, True
    layout = CurveLayout(root)
    name, endpoint = tcp[0]
    if not layout.server_secret.is_file():
        raise ConfigError(
            f"{name}={endpoint!r} is tcp, which anyone on the network may reach, and there "
            f"is no CURVE server certificate in {root} ({CURVE_DIR_ENV}): run "
            "`upbit-broker keys init` and `upbit-broker keys client NAME` for each client; "
            f"or set {PUBLIC_ONLY_ENV}=1 to serve public data only, to anyone"
        )
    info = layout.server_secret.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"{layout.server_secret} must be a file of this user readable by it alone (chmod 600)"
        )
    if not layout.allowed.is_dir():
        raise ConfigError(
            f"no client allow-list {layout.allowed}: run `upbit-broker keys client NAME`"
        )
    return root, True, False


def _url(env: Mapping[str, str], name: str, default: str, schemes: set[str]) -> str:
    value = env.get(name) or default
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        wanted = " or ".join(sorted(f"{s}://" for s in schemes))
        raise ConfigError(f"{name}={_masked_url(value)!r} is not a {wanted} URL")
    if parts.username is not None or parts.password is not None:
        # The broker signs its own requests; credentials in the URL would be sent (and
        # logged) beside them. Never echo them back.
        raise ConfigError(f"{name} must not carry credentials (user:password@host)")
    return value.rstrip("/")


def _audit_interval(env: Mapping[str, str]) -> float:
    """``UPBIT_BROKER_PRIVATE_AUDIT``: 0 (off) or at least 1 s (Upbit's budget is shared)."""
    value = _number(env, "UPBIT_BROKER_PRIVATE_AUDIT", 30.0, minimum=0)
    if 0 < value < 1:
        raise ConfigError(
            f"UPBIT_BROKER_PRIVATE_AUDIT={value!r} must be 0 (off) or at least 1 second"
        )
    return value


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}={raw!r} must be a finite number >= {minimum}")
    return value


def _handler_entries(env: Mapping[str, str]) -> tuple[str, ...]:
    from broker.handlers import HandlerError, parse_entries

    try:
        return parse_entries(env.get("UPBIT_BROKER_HANDLERS", ""))
    except HandlerError as exc:
        raise ConfigError(f"UPBIT_BROKER_HANDLERS: {exc}") from None


def _widen_types(env: Mapping[str, str]) -> frozenset[str]:
    from schemas.bus import PUBLIC_STREAM_TYPES

    raw = env.get("UPBIT_BROKER_WIDEN")
    if raw is None or not raw.strip():
        return DEFAULT_WIDEN
    if raw.strip().lower() == "none":
        return frozenset()
    types = frozenset(t.strip() for t in raw.split(",") if t.strip())
    # Not orderbooks: every market's books cost far more, and the router keeps no book
    # nobody subscribed to, so a widened book would bring bandwidth but no snapshot.
    allowed = PUBLIC_STREAM_TYPES - {"orderbook"}
    unknown = sorted(types - allowed)
    if unknown:
        known = ", ".join(sorted(allowed))
        raise ConfigError(
            f"UPBIT_BROKER_WIDEN={raw!r}: {', '.join(unknown)} cannot be widened "
            f"(choose from: {known}; or none)"
        )
    return types


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name) or default).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def _keys(env: Mapping[str, str]) -> tuple[Secret | None, Secret | None]:
    access = env.get("UPBIT_ACCESS_KEY") or None
    secret = env.get("UPBIT_SECRET_KEY") or None
    if (access is None) != (secret is None):
        missing = "UPBIT_SECRET_KEY" if secret is None else "UPBIT_ACCESS_KEY"
        raise ConfigError(
            f"{missing} is not set: private streams need both UPBIT_ACCESS_KEY and "
            "UPBIT_SECRET_KEY (set both, or neither for public data only)"
        )
    if access is None or secret is None:
        return None, None
    for name, value in (("UPBIT_ACCESS_KEY", access), ("UPBIT_SECRET_KEY", secret)):
        if value != value.strip() or any(ord(c) < 0x21 for c in value):
            # Do not echo the value: it is a secret.
            raise ConfigError(f"{name} contains whitespace or control characters")
    return Secret(access), Secret(secret)


def _http_endpoint(env: Mapping[str, str]) -> tuple[str, int] | None:
    """``UPBIT_BROKER_HTTP`` as ``(host, port)``; None (off) when unset or empty.

    A bare port binds loopback; IPv6 hosts go in brackets (``[::1]:9464``).
    """
    raw = (env.get("UPBIT_BROKER_HTTP") or "").strip()
    if not raw:
        return None
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        host, port_text = "", raw
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"UPBIT_BROKER_HTTP={raw!r}: put an IPv6 host in brackets ([::1]:9464)")
    if not port_text.isdigit() or int(port_text) > 65535 or any(c.isspace() for c in host):
        raise ConfigError(f"UPBIT_BROKER_HTTP={raw!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    return host or "127.0.0.1", int(port_text)


LogFormat = Literal["console", "json"]


@dataclass(frozen=True)
class Settings:
    """Everything the broker needs to run; build with :meth:`from_env`."""

    ws_url: str = DEFAULT_WS_URL
    ws_private_url: str = DEFAULT_WS_PRIVATE_URL
    rest_url: str = DEFAULT_REST_URL
    access_key: Secret | None = field(default=None, repr=False)
    secret_key: Secret | None = field(default=None, repr=False)
    control_endpoint: str = ""
    data_endpoint: str = ""
    heartbeat_interval: float = 1.0
    liveness: int = 3
    state_dir: Path = Path()
    log_format: LogFormat = "console"
    log_level: str = "info"
    coalesce_window: float = 0.05
    """Seconds during which subscription changes are merged into one Upbit request."""
    send_hwm: int = 10_000
    """Frames queued per client on the data socket before that client loses messages.

    A frame carries 1 to 16 messages of one topic and at most 8 KB of them (protocol
    3), so this is 10,000 messages at low rates, where a frame holds one, and at most
    ~80 MB per stalled client under load (30,000 orderbooks of 30 levels)."""
    handlers: tuple[str, ...] = ()
    """``module:name`` entries of the data handlers to load (broker.handlers)."""
    widen_types: frozenset[str] = DEFAULT_WIDEN
    """Stream types a scarce request carries for every market of the new code's quote
    (:func:`broker.subscriptions.widen_request`); empty turns widening off."""
    curve_dir: Path = Path()
    """Where the CURVE keys live (:class:`CurveLayout`)."""
    curve: bool = False
    """A tcp endpoint is served with CURVE: only allow-listed clients get past the
    handshake (the sockets on ipc and inproc endpoints stay as they are)."""
    public_only: bool = False
    """A tcp endpoint is served without CURVE (``UPBIT_BROKER_TCP_PUBLIC_ONLY``): anyone
    who reaches it may read it, so the API keys are dropped and no private stream runs."""

    @property
    def curve_layout(self) -> CurveLayout:
        """The files of :attr:`curve_dir`."""
        return CurveLayout(self.curve_dir)

    http_endpoint: tuple[str, int] | None = None
    """``(host, port)`` serving /metrics and /health (:mod:`broker.http`); None: off."""
    private_audit: float = 30.0
    """Seconds between REST audits of orders and balances while the private WebSocket
    is up (a stream can lose events without looking down); 0 turns them off."""

    trading: bool = False
    """Clients may place and cancel orders with the broker's keys
    (``UPBIT_BROKER_TRADING``); off, only reads of the account are served."""

    @property
    def has_keys(self) -> bool:
        """True when private streams can run."""
        return self.access_key is not None and self.secret_key is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise ConfigError naming the bad one."""
        env = os.environ if env is None else env
        control, data = bus_endpoints(env)
        if control == data:
            raise ConfigError("UPBIT_BROKER_CONTROL and UPBIT_BROKER_DATA must differ")
        access, secret = _keys(env)
        curve_root, curve, public_only = _tcp_security(env, (control, data))
        if public_only:  # an unauthenticated bus must never carry the account's data
            access, secret = None, None
        state = env.get("UPBIT_BROKER_STATE_DIR")
        liveness = _number(env, "UPBIT_BROKER_LIVENESS", 3.0, minimum=1)
        if not liveness.is_integer():
            raise ConfigError(f"UPBIT_BROKER_LIVENESS={liveness!r} must be a whole number")
        return cls(
            ws_url=_url(env, "UPBIT_WS_URL", DEFAULT_WS_URL, {"ws", "wss"}),
            ws_private_url=_url(env, "UPBIT_WS_PRIVATE_URL", DEFAULT_WS_PRIVATE_URL, {"ws", "wss"}),
            rest_url=_url(env, "UPBIT_REST_URL", DEFAULT_REST_URL, {"http", "https"}),
            access_key=access,
            secret_key=secret,
            control_endpoint=control,
            data_endpoint=data,
            heartbeat_interval=_number(env, "UPBIT_BROKER_HEARTBEAT", 1.0, minimum=0.01),
            liveness=int(liveness),
            state_dir=Path(state) if state else runtime_dir(env),
            log_format=_choice(env, "UPBIT_BROKER_LOG_FORMAT", "console", ("console", "json")),  # type: ignore[arg-type]
            log_level=_choice(
                env, "UPBIT_BROKER_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ),
            coalesce_window=_number(env, "UPBIT_BROKER_COALESCE_MS", 50, minimum=0) / 1000,
            send_hwm=int(_number(env, "UPBIT_BROKER_SEND_HWM", 10_000, minimum=100)),
            handlers=_handler_entries(env),
            widen_types=_widen_types(env),
            curve_dir=curve_root,
            curve=curve,
            public_only=public_only,
            http_endpoint=_http_endpoint(env),
            private_audit=_audit_interval(env),
            trading=_flag(env, TRADING_ENV),
        )
