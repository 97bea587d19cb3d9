"""broker.config: real-exchange defaults, overrides, errors naming the variable, secrets."""

from __future__ import annotations

import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from broker.config import (
    DEFAULT_REST_URL,
    DEFAULT_WS_PRIVATE_URL,
    DEFAULT_WS_URL,
    IPC_PATH_MAX,
    ConfigError,
    Secret,
    Settings,
    bus_endpoints,
    runtime_dir,
)

ACCESS = "xqHGaA3pXmFtYS7bGDokz0xRJEz8Ewq7nLa2QnP1"
SECRET = "Zk1VT3dj9sIYxQ0GhB5mCw8Pl2RaNuEeJ4oKvD6t"


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    """The runtime directory in tmp_path (liveness set explicitly; its default has a test)."""
    return {
        "XDG_RUNTIME_DIR": str(tmp_path),
        "UPBIT_BROKER_LIVENESS": "3",
        "UPBIT_BROKER_CURVE_DIR": str(tmp_path / "curve"),
    }


def settings(base: Mapping[str, str], **overrides: str) -> Settings:
    return Settings.from_env({**base, **overrides})


def config_error(base: Mapping[str, str], **overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**base, **overrides})
    assert isinstance(info.value, ValueError)
    return str(info.value)


# ---------------------------------------------------------------------------- defaults


def test_defaults_point_at_the_real_exchange(base: dict[str, str], tmp_path: Path) -> None:
    s = settings(base)
    assert s.ws_url == "wss://api.upbit.com/websocket/v1" == DEFAULT_WS_URL
    assert s.ws_private_url == "wss://api.upbit.com/websocket/v1/private" == DEFAULT_WS_PRIVATE_URL
    assert s.rest_url == "https://api.upbit.com" == DEFAULT_REST_URL
    assert s.access_key is None
    assert s.secret_key is None
    assert not s.has_keys
    run = tmp_path / "upbit-broker"
    assert s.control_endpoint == f"ipc://{run}/control.sock"
    assert s.data_endpoint == f"ipc://{run}/data.sock"
    assert s.heartbeat_interval == 1.0
    assert s.liveness == 3
    assert isinstance(s.liveness, int)
    assert s.state_dir == run
    assert s.log_format == "console"
    assert s.log_level == "info"
    assert s.coalesce_window == pytest.approx(0.05)


@pytest.mark.parametrize("liveness", [None, ""])
def test_from_env_works_without_liveness(tmp_path: Path, liveness: str | None) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    if liveness is not None:
        env["UPBIT_BROKER_LIVENESS"] = liveness
    s = Settings.from_env(env)
    assert s.liveness == 3
    assert s.ws_url == DEFAULT_WS_URL


def test_the_dataclass_defaults_match_from_env() -> None:
    s = Settings()
    assert (s.ws_url, s.ws_private_url, s.rest_url) == (
        DEFAULT_WS_URL,
        DEFAULT_WS_PRIVATE_URL,
        DEFAULT_REST_URL,
    )
    assert not s.has_keys


def test_empty_values_mean_defaults(base: dict[str, str]) -> None:
    s = settings(
        base,
        UPBIT_WS_URL="",
        UPBIT_REST_URL="",
        UPBIT_ACCESS_KEY="",
        UPBIT_SECRET_KEY="",
        UPBIT_BROKER_HEARTBEAT="",
        UPBIT_BROKER_LOG_FORMAT="",
        UPBIT_BROKER_CONTROL="",
    )
    assert s == settings(base)


# --------------------------------------------------------------------------- overrides


def test_url_overrides(base: dict[str, str]) -> None:
    s = settings(
        base,
        UPBIT_WS_URL="ws://127.0.0.1:8765/websocket/v1",
        UPBIT_WS_PRIVATE_URL="ws://localhost:8765/websocket/v1/private/",
        UPBIT_REST_URL="http://127.0.0.1:8765/",
    )
    assert s.ws_url == "ws://127.0.0.1:8765/websocket/v1"
    assert s.ws_private_url == "ws://localhost:8765/websocket/v1/private"  # trailing / dropped
    assert s.rest_url == "http://127.0.0.1:8765"


def test_key_overrides_are_wrapped_in_secret(base: dict[str, str]) -> None:
    s = settings(base, UPBIT_ACCESS_KEY=ACCESS, UPBIT_SECRET_KEY=SECRET)
    assert s.has_keys
    assert isinstance(s.access_key, Secret)
    assert isinstance(s.secret_key, Secret)
    assert s.access_key.reveal() == ACCESS
    assert s.secret_key.reveal() == SECRET


def test_endpoint_overrides(base: dict[str, str]) -> None:
    s = settings(
        base,
        UPBIT_BROKER_CONTROL="tcp://127.0.0.1:5555",
        UPBIT_BROKER_DATA="inproc://data",
        UPBIT_BROKER_TCP_PUBLIC_ONLY="1",
    )
    assert s.control_endpoint == "tcp://127.0.0.1:5555"
    assert s.data_endpoint == "inproc://data"
    assert bus_endpoints({**base, "UPBIT_BROKER_DATA": "ipc:///tmp/d.sock"})[1] == (
        "ipc:///tmp/d.sock"
    )


def test_number_overrides(base: dict[str, str]) -> None:
    s = settings(
        base,
        UPBIT_BROKER_HEARTBEAT="0.25",
        UPBIT_BROKER_LIVENESS="5",
        UPBIT_BROKER_COALESCE_MS="0",
    )
    assert s.heartbeat_interval == 0.25
    assert s.liveness == 5
    assert isinstance(s.liveness, int)
    assert s.coalesce_window == 0.0
    assert settings(base, UPBIT_BROKER_LIVENESS="4.0").liveness == 4
    assert settings(base, UPBIT_BROKER_COALESCE_MS="120").coalesce_window == pytest.approx(0.12)


def test_choice_and_dir_overrides(base: dict[str, str], tmp_path: Path) -> None:
    s = settings(
        base,
        UPBIT_BROKER_LOG_FORMAT="JSON",
        UPBIT_BROKER_LOG_LEVEL="Debug",
        UPBIT_BROKER_STATE_DIR=str(tmp_path / "state"),
    )
    assert s.log_format == "json"
    assert s.log_level == "debug"
    assert s.state_dir == tmp_path / "state"
    for level in ("debug", "info", "warning", "error"):
        assert settings(base, UPBIT_BROKER_LOG_LEVEL=level).log_level == level


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UPBIT_WS_URL", "https://api.upbit.com/websocket/v1"),
        ("UPBIT_WS_URL", "api.upbit.com/websocket/v1"),
        ("UPBIT_WS_URL", "wss://"),
        ("UPBIT_WS_PRIVATE_URL", "http://api.upbit.com/websocket/v1/private"),
        ("UPBIT_REST_URL", "wss://api.upbit.com"),
        ("UPBIT_REST_URL", "ftp://api.upbit.com"),
    ],
)
def test_bad_url_scheme_names_the_variable(base: dict[str, str], name: str, value: str) -> None:
    message = config_error(base, **{name: value})
    assert message.startswith(f"{name}=")
    assert repr(value) in message


@pytest.mark.parametrize("value", ["fast", "1s", "nan", "inf", "-1", "0", "0.001"])
def test_bad_heartbeat_names_the_variable(base: dict[str, str], value: str) -> None:
    message = config_error(base, UPBIT_BROKER_HEARTBEAT=value)
    assert "UPBIT_BROKER_HEARTBEAT" in message
    assert repr(value) in message


def test_non_numeric_heartbeat_says_so(base: dict[str, str]) -> None:
    assert config_error(base, UPBIT_BROKER_HEARTBEAT="abc") == (
        "UPBIT_BROKER_HEARTBEAT='abc' is not a number"
    )


@pytest.mark.parametrize("value", ["0", "2.5", "-3", "three", "inf"])
def test_bad_liveness_names_the_variable(base: dict[str, str], value: str) -> None:
    message = config_error(base, UPBIT_BROKER_LIVENESS=value)
    assert "UPBIT_BROKER_LIVENESS" in message


def test_fractional_liveness_must_be_whole(base: dict[str, str]) -> None:
    assert "whole number" in config_error(base, UPBIT_BROKER_LIVENESS="2.5")


def test_bad_coalesce_names_the_variable(base: dict[str, str]) -> None:
    assert "UPBIT_BROKER_COALESCE_MS" in config_error(base, UPBIT_BROKER_COALESCE_MS="-5")


def test_private_audit_default_override_off_and_bounds(base: dict[str, str]) -> None:
    assert settings(base).private_audit == 30.0
    assert settings(base, UPBIT_BROKER_PRIVATE_AUDIT="5").private_audit == 5.0
    assert settings(base, UPBIT_BROKER_PRIVATE_AUDIT="0").private_audit == 0.0
    for bad in ("0.5", "-1", "often"):
        assert "UPBIT_BROKER_PRIVATE_AUDIT" in config_error(base, UPBIT_BROKER_PRIVATE_AUDIT=bad)


def test_widen_types_default_and_overrides(base: dict[str, str]) -> None:
    assert Settings.from_env(base).widen_types == {"ticker", "trade"}
    assert Settings.from_env({**base, "UPBIT_BROKER_WIDEN": "none"}).widen_types == frozenset()
    chosen = Settings.from_env({**base, "UPBIT_BROKER_WIDEN": " candle.1m, ticker "})
    assert chosen.widen_types == {"candle.1m", "ticker"}


def test_a_private_unknown_or_orderbook_widen_type_names_the_variable(base: dict[str, str]) -> None:
    message = config_error(base, UPBIT_BROKER_WIDEN="ticker,myOrder,tickr,orderbook")
    assert "UPBIT_BROKER_WIDEN" in message
    assert "myOrder, orderbook, tickr cannot be widened" in message


@pytest.mark.parametrize(
    ("present", "missing"),
    [("UPBIT_ACCESS_KEY", "UPBIT_SECRET_KEY"), ("UPBIT_SECRET_KEY", "UPBIT_ACCESS_KEY")],
)
def test_only_one_key_names_the_missing_one(
    base: dict[str, str], present: str, missing: str
) -> None:
    value = ACCESS if present == "UPBIT_ACCESS_KEY" else SECRET
    message = config_error(base, **{present: value})
    assert message.startswith(f"{missing} is not set")
    assert value not in message


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("UPBIT_ACCESS_KEY", f" {ACCESS}"),
        ("UPBIT_ACCESS_KEY", f"{ACCESS}\n"),
        ("UPBIT_SECRET_KEY", f"{SECRET[:20]} {SECRET[20:]}"),
        ("UPBIT_SECRET_KEY", f"{SECRET}\t"),
        ("UPBIT_SECRET_KEY", f"{SECRET[:10]}\x00{SECRET[10:]}"),
    ],
)
def test_key_with_whitespace_names_the_variable_without_echoing_it(
    base: dict[str, str], name: str, bad: str
) -> None:
    env = {"UPBIT_ACCESS_KEY": ACCESS, "UPBIT_SECRET_KEY": SECRET, name: bad}
    message = config_error(base, **env)
    assert message == f"{name} contains whitespace or control characters"
    for text in (ACCESS, SECRET, bad, bad.strip(), SECRET[:20], SECRET[20:]):
        assert text not in message


@pytest.mark.parametrize("name", ["UPBIT_BROKER_CONTROL", "UPBIT_BROKER_DATA"])
@pytest.mark.parametrize(
    "value", ["/run/user/1000/control.sock", "ipc://", "udp://127.0.0.1:1", "tcp//host:1"]
)
def test_bad_endpoint_names_the_variable(base: dict[str, str], name: str, value: str) -> None:
    message = config_error(base, **{name: value})
    assert message.startswith(f"{name}={value!r} is not a ZeroMQ endpoint")
    with pytest.raises(ConfigError, match=name):
        bus_endpoints({**base, name: value})


@pytest.mark.parametrize("name", ["UPBIT_BROKER_CONTROL", "UPBIT_BROKER_DATA"])
def test_ipc_path_over_107_characters_names_the_variable(base: dict[str, str], name: str) -> None:
    too_long = "/tmp/" + "p" * (IPC_PATH_MAX - 5 + 1)
    assert len(too_long) == 108
    message = config_error(base, **{name: f"ipc://{too_long}"})
    assert message.startswith(name)
    assert "108 bytes" in message
    longest = "/tmp/" + "p" * (IPC_PATH_MAX - 5)
    assert len(longest) == IPC_PATH_MAX == 107
    assert settings(base, **{name: f"ipc://{longest}"})  # exactly at the limit is fine


def test_ipc_path_limit_counts_bytes(base: dict[str, str]) -> None:
    path = "/tmp/" + "\u00e9" * 60  # 65 characters, 125 bytes in UTF-8
    assert len(path) <= IPC_PATH_MAX < len(path.encode())
    with pytest.raises(ConfigError, match="UPBIT_BROKER_CONTROL"):
        bus_endpoints({**base, "UPBIT_BROKER_CONTROL": f"ipc://{path}"})


def test_default_ipc_path_from_a_long_runtime_dir_is_checked(tmp_path: Path) -> None:
    long_dir = tmp_path / ("r" * 110)
    with pytest.raises(ConfigError, match=r"XDG_RUNTIME_DIR|UPBIT_BROKER_CONTROL"):
        bus_endpoints({"XDG_RUNTIME_DIR": str(long_dir)})


def test_control_equal_to_data_names_both(base: dict[str, str]) -> None:
    message = config_error(
        base, UPBIT_BROKER_CONTROL="tcp://127.0.0.1:5555", UPBIT_BROKER_DATA="tcp://127.0.0.1:5555"
    )
    assert "UPBIT_BROKER_CONTROL" in message
    assert "UPBIT_BROKER_DATA" in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UPBIT_BROKER_LOG_FORMAT", "xml"),
        ("UPBIT_BROKER_LOG_FORMAT", "pretty"),
        ("UPBIT_BROKER_LOG_LEVEL", "verbose"),
        ("UPBIT_BROKER_LOG_LEVEL", "critical"),
    ],
)
def test_bad_choice_names_the_variable(base: dict[str, str], name: str, value: str) -> None:
    message = config_error(base, **{name: value})
    assert message.startswith(f"{name}={value!r}")


# ----------------------------------------------------------------------------- secrets


def test_secret_hides_itself() -> None:
    secret = Secret(SECRET)
    assert SECRET not in repr(secret)
    assert SECRET not in str(secret)
    assert SECRET not in f"{secret}"
    assert SECRET not in f"{secret!r}"
    assert "*" in repr(secret)
    assert secret.reveal() == SECRET
    assert secret == Secret(SECRET)
    assert secret != Secret(ACCESS)
    assert secret != SECRET  # never equal to the bare string
    assert len({secret, Secret(SECRET)}) == 1
    assert not hasattr(secret, "__dict__")


def test_keys_never_appear_in_settings_repr(base: dict[str, str]) -> None:
    s = settings(base, UPBIT_ACCESS_KEY=ACCESS, UPBIT_SECRET_KEY=SECRET)
    for text in (repr(s), str(s), repr(s.access_key), str(s.secret_key)):
        assert ACCESS not in text
        assert SECRET not in text


@pytest.mark.parametrize(
    "overrides",
    [
        {"UPBIT_WS_URL": "ftp://x"},
        {"UPBIT_BROKER_HEARTBEAT": "abc"},
        {"UPBIT_BROKER_LIVENESS": "2.5"},
        {"UPBIT_BROKER_LOG_FORMAT": "xml"},
        {"UPBIT_BROKER_CONTROL": "nowhere"},
        {"UPBIT_ACCESS_KEY": f"{ACCESS} "},
        {"UPBIT_SECRET_KEY": f"\t{SECRET}"},
        {"UPBIT_SECRET_KEY": ""},
        {"UPBIT_ACCESS_KEY": ""},
    ],
)
def test_no_config_error_ever_contains_a_key(
    base: dict[str, str], overrides: dict[str, str]
) -> None:
    env = {**base, "UPBIT_ACCESS_KEY": ACCESS, "UPBIT_SECRET_KEY": SECRET, **overrides}
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    text = f"{info.value} {info.value!r} {info.value.args}"
    assert ACCESS not in text
    assert SECRET not in text


# ------------------------------------------------------------------------- runtime dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_runtime_dir_is_created_0700(tmp_path: Path) -> None:
    path = runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path)})
    assert path == tmp_path / "upbit-broker"
    assert path.is_dir()
    assert mode(path) == 0o700


def test_runtime_dir_open_to_others_is_fixed(tmp_path: Path) -> None:
    path = tmp_path / "upbit-broker"
    path.mkdir()
    path.chmod(0o755)
    assert runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path)}) == path
    assert mode(path) == 0o700


def test_runtime_dir_without_create_touches_nothing(tmp_path: Path) -> None:
    path = runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path)}, create=False)
    assert path == tmp_path / "upbit-broker"
    assert not path.exists()


def test_runtime_dir_falls_back_to_the_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = runtime_dir({})
    assert path == tmp_path / f"upbit-broker-{os.getuid()}"
    assert mode(path) == 0o700


def test_bus_endpoints_default_to_ipc_in_the_runtime_dir(tmp_path: Path) -> None:
    control, data = bus_endpoints({"XDG_RUNTIME_DIR": str(tmp_path)})
    run = tmp_path / "upbit-broker"
    assert control == f"ipc://{run / 'control.sock'}"
    assert data == f"ipc://{run / 'data.sock'}"
    assert mode(run) == 0o700


def test_bus_endpoints_with_an_empty_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    control, data = bus_endpoints({})
    assert control.startswith(f"ipc://{tmp_path}/upbit-broker-")
    assert control.endswith("/control.sock")
    assert data.endswith("/data.sock")
    assert control != data


def test_bus_endpoints_are_the_schemas_defaults(tmp_path: Path) -> None:
    from schemas.bus import default_endpoints

    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert bus_endpoints(env) == default_endpoints(env)


def test_bus_endpoints_both_set_create_no_runtime_dir(tmp_path: Path) -> None:
    env = {
        "XDG_RUNTIME_DIR": str(tmp_path),
        "UPBIT_BROKER_CONTROL": "inproc://c",
        "UPBIT_BROKER_DATA": "inproc://d",
    }
    assert bus_endpoints(env) == ("inproc://c", "inproc://d")
    assert not (tmp_path / "upbit-broker").exists()


def test_bus_endpoints_refuse_a_runtime_dir_of_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    (tmp_path / "upbit-broker").mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(ConfigError, match="another user"):
        bus_endpoints({"XDG_RUNTIME_DIR": str(tmp_path)})


@pytest.mark.parametrize("name", ["UPBIT_REST_URL", "UPBIT_WS_URL", "UPBIT_WS_PRIVATE_URL"])
def test_a_url_with_credentials_is_refused_without_echoing_them(name: str) -> None:
    scheme = "https" if name == "UPBIT_REST_URL" else "wss"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: f"{scheme}://user:hunter2@api.example/"})
    assert name in str(info.value)
    assert "hunter2" not in str(info.value)


def test_a_bad_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"UPBIT_REST_URL": "ftp://user:hunter2@api.example/"})
    assert "hunter2" not in str(info.value)


# ------------------------------------------------------------------ trust boundary

OTHER_UID = 54321
"""Tests run as root, so chown to this uid plays another user."""


def unix_socket(path: Path) -> Path:
    """A real (unlistened) unix socket file at ``path``."""
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


def ipc_env(base: Mapping[str, str], where: Path) -> dict[str, str]:
    return {
        **base,
        "UPBIT_BROKER_CONTROL": f"ipc://{where}/control",
        "UPBIT_BROKER_DATA": f"ipc://{where}/data",
    }


def test_a_symlinked_runtime_dir_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    (tmp_path / "upbit-broker").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path)})
    assert mode(target) == 0o755  # never chmod-ed through the link


def test_a_runtime_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    import os

    run = tmp_path / "upbit-broker"
    run.mkdir(mode=0o700)
    os.chown(run, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError, match=f"another user.*{OTHER_UID}"):
        Settings.from_env({"XDG_RUNTIME_DIR": str(tmp_path)})


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("symlinked dir", "symbolic link"),
        ("other owner", "another user"),
        ("world-writable", "writable by other users"),
        ("symlinked socket", "socket is a symbolic link"),
        ("foreign socket", "impostor"),
        ("not a socket", "not a socket"),
    ],
)
def test_an_ipc_endpoint_another_user_could_control_fails_at_start(
    base: dict[str, str], tmp_path: Path, setup: str, reason: str
) -> None:
    import os

    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    where = real
    if setup == "symlinked dir":
        where = tmp_path / "link"
        where.symlink_to(real)
    elif setup == "other owner":
        os.chown(real, OTHER_UID, OTHER_UID)
    elif setup == "world-writable":
        real.chmod(0o777)
    elif setup == "symlinked socket":
        (real / "control").symlink_to(unix_socket(tmp_path / "s"))
    elif setup == "foreign socket":
        os.chown(unix_socket(real / "control"), OTHER_UID, OTHER_UID)
    else:
        (real / "control").write_text("")
    message = config_error(ipc_env(base, where))
    assert "UPBIT_BROKER_CONTROL" in message
    assert reason in message


def test_a_sticky_world_writable_dir_and_our_own_socket_are_fine(
    base: dict[str, str], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: others cannot replace our files
    unix_socket(shared / "control")
    s = settings(ipc_env(base, shared))
    assert s.control_endpoint == f"ipc://{shared}/control"


def test_an_abstract_ipc_socket_is_refused(base: dict[str, str]) -> None:
    message = config_error(
        base, UPBIT_BROKER_CONTROL="ipc://@upbit", UPBIT_BROKER_DATA="inproc://d"
    )
    assert "abstract" in message


def test_tcp_without_keys_fails_at_start_saying_what_to_run(
    base: dict[str, str], tmp_path: Path
) -> None:
    message = config_error(
        base, UPBIT_BROKER_CONTROL="tcp://127.0.0.1:5555", UPBIT_BROKER_DATA="inproc://d"
    )
    assert "UPBIT_BROKER_CONTROL" in message
    assert "upbit-broker keys init" in message
    assert "UPBIT_BROKER_TCP_PUBLIC_ONLY=1" in message
    assert str(tmp_path / "curve") in message


def test_public_only_tcp_drops_the_api_keys(base: dict[str, str]) -> None:
    s = settings(
        base,
        UPBIT_BROKER_DATA="tcp://0.0.0.0:5556",
        UPBIT_BROKER_TCP_PUBLIC_ONLY="yes",
        UPBIT_ACCESS_KEY=ACCESS,
        UPBIT_SECRET_KEY=SECRET,
    )
    assert s.public_only
    assert not s.curve
    assert not s.has_keys


def test_the_public_only_switch_must_be_a_flag(base: dict[str, str]) -> None:
    message = config_error(
        base, UPBIT_BROKER_DATA="tcp://127.0.0.1:1", UPBIT_BROKER_TCP_PUBLIC_ONLY="maybe"
    )
    assert "UPBIT_BROKER_TCP_PUBLIC_ONLY" in message


def test_the_public_only_switch_means_nothing_without_tcp(base: dict[str, str]) -> None:
    s = settings(
        base, UPBIT_BROKER_TCP_PUBLIC_ONLY="1", UPBIT_ACCESS_KEY=ACCESS, UPBIT_SECRET_KEY=SECRET
    )
    assert not s.public_only
    assert s.has_keys


def test_tcp_with_a_server_certificate_is_curve(base: dict[str, str], tmp_path: Path) -> None:
    from broker.config import CurveLayout
    from broker.keys import init_server

    init_server(CurveLayout(tmp_path / "curve"))
    s = settings(
        base,
        UPBIT_BROKER_CONTROL="tcp://127.0.0.1:5555",
        UPBIT_ACCESS_KEY=ACCESS,
        UPBIT_SECRET_KEY=SECRET,
    )
    assert s.curve
    assert not s.public_only
    assert s.has_keys  # an allow-listed bus may carry private data
    assert s.curve_layout.server_secret == tmp_path / "curve" / "server.key_secret"


def test_a_server_secret_readable_by_others_is_refused(
    base: dict[str, str], tmp_path: Path
) -> None:
    from broker.config import CurveLayout
    from broker.keys import init_server

    layout = CurveLayout(tmp_path / "curve")
    init_server(layout)
    layout.server_secret.chmod(0o644)
    message = config_error(base, UPBIT_BROKER_CONTROL="tcp://127.0.0.1:5555")
    assert "chmod 600" in message


def test_the_curve_dir_defaults_to_the_user_config_dir(tmp_path: Path) -> None:
    from broker.config import curve_dir

    assert curve_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "upbit-broker" / "curve"
    assert curve_dir({"HOME": str(tmp_path)}) == tmp_path / ".config" / "upbit-broker" / "curve"
    assert curve_dir({"UPBIT_BROKER_CURVE_DIR": "/k", "HOME": "/h"}) == Path("/k")


def test_trading_is_off_unless_switched_on(base: dict[str, str]) -> None:
    assert not settings(base).trading
    assert settings(base, UPBIT_BROKER_TRADING="1").trading
    assert settings(base, UPBIT_BROKER_TRADING="yes").trading
    assert not settings(base, UPBIT_BROKER_TRADING="0").trading


def test_the_trading_switch_must_be_a_flag(base: dict[str, str]) -> None:
    assert "UPBIT_BROKER_TRADING" in config_error(base, UPBIT_BROKER_TRADING="sometimes")
