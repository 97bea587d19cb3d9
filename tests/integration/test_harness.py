"""The process harness itself: children are reaped, output is shown, the probe fails fast."""

from __future__ import annotations

import signal

import pytest

from tests.harness import Child, Sim, start_broker, wait_ready


def test_a_stopped_child_is_terminated_and_reaped() -> None:
    child = Child("sleeper", ["-c", "import time; print('up', flush=True); time.sleep(60)"])
    assert child.read_line() == "up"
    child.signal(signal.SIGSTOP)
    assert child.stop(timeout=5) == -signal.SIGTERM
    assert not child.alive()


def test_read_line_times_out_and_then_sees_the_end_of_output() -> None:
    child = Child("quiet", ["-c", "import sys; sys.stdin.readline(); print('bye')"], stdin=True)
    with pytest.raises(TimeoutError):
        child.read_line(timeout=0.3)
    child.send_line("go")
    assert child.read_line() == "bye"
    assert child.read_line() == ""  # stdout closed: the child exited
    assert child.stop() == 0


def test_output_holds_stdout_and_stderr() -> None:
    child = Child("talker", ["-c", "import sys; print('err-1', file=sys.stderr); print('out-1')"])
    assert child.read_line() == "out-1"
    child.stop()
    output = child.output()
    assert "out-1" in output
    assert "err-1" in output


def test_the_readiness_probe_fails_at_once_with_the_output_of_a_broker_that_died(
    sim: Sim,
) -> None:
    env = {**sim.env(), "UPBIT_BROKER_CONTROL": "ipc:///nonexistent-dir/control"}
    dead = Child("not-a-broker", ["-c", "import sys; sys.exit('configuration rejected')"], env=env)
    try:
        with pytest.raises(RuntimeError, match="configuration rejected"):
            wait_ready(env, dead, timeout=30)
    finally:
        dead.stop()


def test_start_broker_waits_for_hello_against_the_simulators_urls(sim: Sim) -> None:
    from tests.integration.conftest import broker_env

    broker = start_broker(broker_env(sim))
    try:
        welcome = wait_ready(broker.env, broker.child, timeout=5)
        assert welcome is not None
        assert welcome.epoch
        assert broker.env["UPBIT_WS_URL"] == sim.urls["ws"]
    finally:
        broker.stop()
    assert not broker.child.alive()
