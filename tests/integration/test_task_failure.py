"""How the broker process ends: a crashed task is a failure, a requested stop is not.

No simulator is needed: the broker has no streams to carry, so it never connects
upstream, and a market list that cannot be fetched is only retried.
"""

from __future__ import annotations

from tests.integration.conftest import wait_ready
from tests.integration.crashing_broker import CRASH
from tests.support import Child, short_tmpdir, wait_until


def broker_env() -> dict[str, str]:
    rundir = short_tmpdir("ubx-")
    closed = "127.0.0.1:9"  # the discard port: nothing listens, connects fail at once
    return {
        "XDG_RUNTIME_DIR": str(rundir),
        "UPBIT_BROKER_CONTROL": f"ipc://{rundir}/control",
        "UPBIT_BROKER_DATA": f"ipc://{rundir}/data",
        "UPBIT_BROKER_STATE_DIR": str(rundir),
        "UPBIT_REST_URL": f"http://{closed}",
        "UPBIT_WS_URL": f"ws://{closed}/websocket/v1",
        "UPBIT_WS_PRIVATE_URL": f"ws://{closed}/websocket/v1/private",
        "UPBIT_ACCESS_KEY": "",
        "UPBIT_SECRET_KEY": "",
    }


def test_a_crashed_broker_task_ends_the_process_with_exit_code_1_and_a_traceback() -> None:
    child = Child("broker", ["-m", "tests.integration.crashing_broker"], env=broker_env())
    try:
        wait_until(lambda: not child.alive(), 30, what="the broker to exit after a task crashed")
    finally:
        code = child.stop()
        output = child.output()
        print(output)
    assert code == 1, output
    assert "task failed" in output
    assert "Traceback" in output
    assert CRASH in output


def test_a_broker_stopped_by_sigterm_exits_0() -> None:
    env = broker_env()
    child = Child("broker", ["-m", "broker"], env=env)
    try:
        wait_ready(env)
    finally:
        code = child.stop()
        print(child.output())
    assert code == 0
