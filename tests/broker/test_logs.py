"""broker.logs: no API key, secret or JWT ever reaches stderr, in either format."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jwt
import pytest
import structlog

from broker import logs
from broker.logs import (
    MASK,
    LogThrottle,
    SecretMasker,
    configure_logging,
    get_logger,
    mask,
    register_secret,
)

ACCESS = "xqHGaA3pXmFtYS7bGDokz0xRJEz8Ewq7nLa2QnP1"
SECRET = "Zk1VT3dj9sIYxQ0GhB5mCw8Pl2RaNuEeJ4oKvD6t"
JWT_KEY = "k" * 64
JWT = jwt.encode({"access_key": ACCESS, "nonce": "n-1"}, JWT_KEY, algorithm="HS512")
OPAQUE = "opaque-bearer-value-7f3a9c"
"""Not registered, not JWT-shaped: only the ``Bearer`` rule can mask it."""
NAMED = "only-masked-by-its-key-name-42"
"""Not registered, not JWT-shaped: only a secret-sounding key name can mask it."""
FORBIDDEN = (ACCESS, SECRET, JWT, OPAQUE, NAMED, JWT_KEY)

FORMATS = ["json", "console"]


@pytest.fixture(autouse=True)
def isolated() -> Iterator[None]:
    """Fresh registry and structlog defaults; undo anything basicConfig adds to the root."""
    saved_registry = set(logs._registered)
    logs._registered.clear()
    root = logging.getLogger()
    saved_level = root.level
    saved_handlers = list(root.handlers)
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in root.handlers[:]:
        if handler not in saved_handlers:
            root.removeHandler(handler)
    root.setLevel(saved_level)
    logs._registered.clear()
    logs._registered.update(saved_registry)


@pytest.fixture
def configure(capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    """Configure logging now (capsys already owns sys.stderr) and return a logger."""

    def _configure(fmt: str, level: str = "info") -> Any:
        register_secret(ACCESS)
        register_secret(SECRET)
        configure_logging(fmt, level)
        return get_logger("test")

    return _configure


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.splitlines()


def assert_clean(text: str) -> None:
    for secret in FORBIDDEN:
        assert secret not in text, f"{secret[:12]}... leaked in {text!r}"
    assert "eyJ" not in text
    assert MASK in text


# ---------------------------------------------------------------- through the pipeline


class Leaky:
    """An object whose repr carries a secret (as careless reprs do)."""

    def __repr__(self) -> str:
        return f"Leaky(key={SECRET})"


def emit_everything(log: Any) -> int:
    """Log secrets in every place an event can carry them; return the number of events."""
    log.info(f"connecting with access key {ACCESS}")
    log.info("signed", header=f"Bearer {JWT}")
    log.info("keys loaded", access=ACCESS, secret=SECRET)
    log.info("config", cfg={"upbit": [1, {"k": SECRET}, (ACCESS, 2.5)], "ok": None})
    log.info(
        "by name", authorization=NAMED, secret_key=NAMED, token=NAMED, password=NAMED, jwt=NAMED
    )
    log.info("nested by name", headers={"Authorization": NAMED, "X-Trace": "t-1"})
    log.info("jwt shaped", note=f"upgrade headers were {JWT}; retrying")
    log.info(f"sent Authorization: Bearer {OPAQUE} to upbit")
    log.info("positional %s and %s", ACCESS, SECRET)
    log.info("objects", obj=Leaky(), raw=SECRET.encode(), err=ValueError(f"bad {JWT}"))
    log.bind(session_secret=NAMED, who=ACCESS).info("bound")
    structlog.contextvars.bind_contextvars(ctx_key=SECRET)
    log.info("from contextvars")
    structlog.contextvars.clear_contextvars()
    try:
        raise RuntimeError(f"auth failed for {ACCESS}/{SECRET} with {JWT} (Bearer {OPAQUE})")
    except RuntimeError:
        log.exception("upgrade failed")
    return 13


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_secret_reaches_stderr(
    fmt: str, configure: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    count = emit_everything(configure(fmt))
    lines = stderr_lines(capsys)
    text = "\n".join(lines)
    assert_clean(text)
    # Not vacuous: every event was written, with its non-secret parts intact.
    for event in ("signed", "keys loaded", "config", "by name", "jwt shaped", "bound"):
        assert event in text
    assert "connecting with access key ***" in text
    assert "upgrade failed" in text
    assert "Traceback" in text
    assert "RuntimeError: auth failed for ***/***" in text
    assert "X-Trace" in text
    if fmt == "json":
        events = [json.loads(line) for line in lines if line.startswith("{")]
        assert len(events) == count


def test_json_events_mask_values_but_keep_structure(
    configure: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    log = configure("json")
    log.info("config", cfg={"upbit": [1, {"k": SECRET}, (ACCESS, 2.5)], "ok": None}, n=3)
    log.info("by name", authorization=NAMED, secret_key=NAMED, token=NAMED, depth=30)
    log.info("signed", header=f"Bearer {JWT}")
    first, second, third = (json.loads(line) for line in stderr_lines(capsys))
    assert first["event"] == "config"
    assert first["cfg"] == {"upbit": [1, {"k": MASK}, [MASK, 2.5]], "ok": None}
    assert first["n"] == 3
    assert first["level"] == "info"
    assert first["component"] == "test"
    assert "timestamp" in first
    assert second["authorization"] == second["secret_key"] == second["token"] == MASK
    assert second["depth"] == 30
    assert third["header"] == f"Bearer {MASK}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_exception_text_is_masked(
    fmt: str, configure: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    log = configure(fmt)
    try:
        raise PermissionError(f"401 for access_key={ACCESS} token {JWT}")
    except PermissionError:
        log.exception("refused", status=401)
    text = "\n".join(stderr_lines(capsys))
    assert_clean(text)
    assert "PermissionError" in text
    assert "401" in text


@pytest.mark.parametrize("fmt", FORMATS)
def test_signer_keys_are_masked_once_registered(
    fmt: str, configure: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from broker.config import Secret
    from broker.upbit_auth import UpbitSigner

    logs._registered.clear()
    configure_logging(fmt)
    log = get_logger("test")
    signer = UpbitSigner(Secret(ACCESS), Secret(JWT_KEY))  # registers both keys
    log.info("signer ready", signer=signer, key=ACCESS, header=signer.authorization("a=1"))
    log.info(f"secret is {JWT_KEY}")
    text = "\n".join(stderr_lines(capsys))
    assert_clean(text)


def test_debug_events_are_filtered_at_info(
    configure: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    log = configure("json", "info")
    log.debug("quiet", value=1)
    log.info("loud", value=2)
    events = [json.loads(line) for line in stderr_lines(capsys)]
    assert [e["event"] for e in events] == ["loud"]


def test_stdlib_records_are_masked_too(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    pytest_handlers = root.handlers[:]
    root.handlers.clear()  # as in a real process: basicConfig only acts on a bare root
    try:
        register_secret(ACCESS)
        configure_logging("json", "debug")
        logging.getLogger("websockets.client").debug("> %s: %s", "Authorization", f"Bearer {JWT}")
        logging.getLogger("aiohttp.client").warning("retrying with key %s", ACCESS)
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        root.handlers.extend(pytest_handlers)
    text = capsys.readouterr().err
    assert "Authorization" in text  # the records were written...
    assert JWT not in text  # ...but masked
    assert ACCESS not in text


# ------------------------------------------------------------------- processor directly


def test_secret_masker_on_an_event_dict() -> None:
    register_secret(ACCESS)
    register_secret(SECRET)
    event: dict[str, Any] = {
        "event": f"key {ACCESS} and Bearer {OPAQUE}",
        "Authorization": f"Bearer {JWT}",
        "X-Secret-Key": NAMED,
        "access_key": NAMED,
        "nested": {"list": [SECRET, {"jwt": NAMED}, (1, JWT)], "depth": 30},
        "count": 7,
        "ratio": 0.5,
        "flag": True,
        "none": None,
        "obj": Leaky(),
        "exc": KeyError(SECRET),
    }
    out = SecretMasker()(None, "info", event)
    assert out is event  # processors may mutate in place
    assert out == {
        "event": f"key {MASK} and Bearer {MASK}",
        "Authorization": MASK,
        "X-Secret-Key": MASK,
        "access_key": MASK,
        "nested": {"list": [MASK, {"jwt": MASK}, (1, MASK)], "depth": 30},
        "count": 7,
        "ratio": 0.5,
        "flag": True,
        "none": None,
        "obj": f"Leaky(key={MASK})",
        "exc": f"'{MASK}'",
    }


def test_secret_masker_leaves_harmless_events_alone() -> None:
    event: dict[str, Any] = {"event": "link state", "state": "up", "codes": ["KRW-BTC"], "n": 1}
    assert SecretMasker()(None, "info", dict(event)) == event


class Peer(NamedTuple):
    host: str
    port: int


def test_secret_masker_handles_namedtuples() -> None:
    register_secret(SECRET)
    out = SecretMasker()(None, "info", {"event": "x", "peer": Peer(SECRET, 443)})
    assert out["peer"] == (MASK, 443)


def test_mask_function() -> None:
    register_secret(SECRET)
    assert mask(f"a{SECRET}b") == f"a{MASK}b"
    assert mask(f"bearer {OPAQUE}") == f"bearer {MASK}"
    assert mask(f"BEARER  {OPAQUE} tail") == f"BEARER  {MASK} tail"
    assert mask(f"token={JWT}&x=1") == f"token={MASK}&x=1"
    assert mask("nothing to see") == "nothing to see"


def test_register_secret_ignores_empty_and_tiny_values() -> None:
    register_secret(None)
    register_secret("")
    register_secret("abc")
    assert logs._registered == set()
    assert mask("abc abc") == "abc abc"
    register_secret("abcd")
    assert mask("xabcdx") == f"x{MASK}x"


# --------------------------------------------------------------- URL credentials, cost


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("https://user:hunter2pw@api.example.com/v1", f"https://user:{MASK}@api.example.com/v1"),
        ("UPBIT_REST_URL=http://u:p@127.0.0.1:80", f"UPBIT_REST_URL=http://u:{MASK}@127.0.0.1:80"),
        ("wss://tokenonly@host/ws", f"wss://{MASK}@host/ws"),
        ("a http://x:1@h and ws://y:2@k", f"a http://x:{MASK}@h and ws://y:{MASK}@k"),
        ("https://api.upbit.com/v1/ticker?x=1", "https://api.upbit.com/v1/ticker?x=1"),
        ("tcp://127.0.0.1:5555 from ops@example.com", "tcp://127.0.0.1:5555 from ops@example.com"),
    ],
)
def test_url_credentials_are_masked(text: str, masked: str) -> None:
    assert mask(text) == masked


@pytest.mark.parametrize("fmt", FORMATS)
def test_url_password_does_not_reach_stderr(
    fmt: str, configure: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    log = configure(fmt)
    log.info("starting", rest="https://svc:pa55w0rd-xyz@proxy.local:8443", upstream="wss://h/ws")
    text = "\n".join(stderr_lines(capsys))
    assert "pa55w0rd-xyz" not in text
    assert f"svc:{MASK}@proxy.local:8443" in text


@pytest.mark.parametrize(
    "text",
    [
        f"{JWT} {JWT}",
        f"x{JWT}",
        f"a.b.{JWT}.c.d",
        "eyJabcde.f.g.eyJhijkl.m",
        "eyJabcd.x.y eyJ.a.b eyJabcdefg..",
        "eyJabcdefgh.i",
        "A.eyJ12345678.eyJ12345678.eyJ12345678.x.y",
    ],
)
def test_jwt_masking_matches_the_jwt_pattern(text: str) -> None:
    """The linear scan masks exactly what the (slow) reference pattern matches."""
    import re

    reference = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
    assert mask(text) == reference.sub(MASK, text)


PATHOLOGICAL: dict[str, Callable[[int], str]] = {
    "eyJ run": lambda n: "eyJ" * (n // 3),
    "eyJ run with dots": lambda n: ("eyJ" * 30 + ".") * (n // 91),
    "one long header": lambda n: "eyJ" + "A" * n + ".",
    "bearer spaces": lambda n: "Bearer" + " " * n,
    "bearer repeated": lambda n: "bearer " * (n // 7),
    "url schemes": lambda n: "a://" * (n // 4),
    "url colons": lambda n: "x://" + ":" * n,
    "url userinfo runs": lambda n: ("h://u:" + "p" * 40 + " ") * (n // 47),
}


def _cost(text: str, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        mask(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("shape", sorted(PATHOLOGICAL))
def test_masking_cost_is_linear_on_pathological_input(shape: str) -> None:
    """A 120 KB client name of ``eyJ`` froze the broker for seconds: masking is linear.

    Compared with a baseline in the same run (a 20 KB input of the same shape), 10x the
    input costs 10x, far from the 100x of a quadratic scan; no absolute time bound.
    """
    register_secret(SECRET)
    make = PATHOLOGICAL[shape]
    small, large = make(20_000), make(200_000)
    assert len(large) >= 190_000
    baseline = _cost(small, 7)
    # A loaded machine may stall any one run: keep the best of several. Only a run that
    # is plainly quadratic (seconds, where linear takes milliseconds) ends the tries.
    large_cost = math.inf
    for _ in range(7):
        large_cost = min(large_cost, _cost(large, 1))
        if large_cost / baseline < 25 or large_cost > 2.0:
            break
    ratio = large_cost / baseline
    assert ratio < 25, f"{shape}: 10x the input cost {ratio:.0f}x"


def test_a_pathological_client_name_is_masked_through_the_processor() -> None:
    name = "eyJ" * 70_000  # 210 KB, the shape that froze the broker
    out = SecretMasker()(None, "info", {"event": "client hello", "name": name, "n": 1})
    assert out["name"] == name  # no JWT in it: kept as is
    assert out["n"] == 1


def test_a_throttled_log_lets_a_burst_through_then_counts_what_it_holds_back() -> None:
    throttle = LogThrottle(burst=3, window=60.0)
    assert [throttle.allow(0.0) for _ in range(3)] == [0, 0, 0]
    assert [throttle.allow(1.0) for _ in range(1000)] == [None] * 1000
    # A new window: the first line says how many were held back.
    assert throttle.allow(60.0) == 1000
    assert throttle.allow(60.5) == 0
