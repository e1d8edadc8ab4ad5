"""Parts of ``planrun up`` (planrun/stack.py) that need no stack: how it names the bridge,
what it says when a child dies while starting or never gets ready, and how it stops a
child that ignores SIGTERM. (tests/test_stack.py runs the whole stack.)"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from planrun import stack
from planrun.errors import PlanrunError
from tests.helpers import wait_for

CLOSED = "http://127.0.0.1:9"


def nothing_answers() -> dict[str, str]:
    """What ``planrun up`` waits for, at an address where nothing listens."""
    return {"bridge": f"{CLOSED}/healthz", "runner": f"{CLOSED}/api/deployments"}


@pytest.mark.parametrize(("host", "named"), [
    ("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"), ("::", "[::1]"), ("::1", "[::1]"),
    ("fd00::5", "[fd00::5]"), ("127.0.0.1", "127.0.0.1"), ("my-host", "my-host"),
])
def test_the_printed_bridge_address_is_one_a_client_here_can_reach(host: str,
                                                                   named: str) -> None:
    assert stack._reachable(host) == named


def _child(tmp_path: Path, name: str, code: str) -> stack.Child:
    return stack._spawn(name, [sys.executable, "-c", code], dict(os.environ), tmp_path)


def test_a_child_that_dies_while_starting_is_named_with_its_status_and_log(
        tmp_path: Path) -> None:
    child = _child(tmp_path, "bridge", "print('address already in use'); raise SystemExit(3)")
    child.process.wait(10)
    with pytest.raises(PlanrunError) as caught:
        stack._wait_ready([child], nothing_answers(), [])
    assert str(caught.value) == ("the bridge exited with status 3 while starting:\n"
                                 "address already in use")


def test_children_that_never_get_ready_are_named_with_where_their_logs_are(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "START_TIMEOUT_S", 0.0)
    child = _child(tmp_path, "runner", "import time; time.sleep(30)")
    try:
        with pytest.raises(PlanrunError, match=f"the bridge and the runner did not start "
                                               f"within 0s; see the logs in {tmp_path}"):
            stack._wait_ready([child], nothing_answers(), [])
    finally:
        stack._stop(child)
    assert child.process.returncode == -signal.SIGTERM


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "STOP_GRACE_S", 0.2)
    child = _child(tmp_path, "runner", "import signal, time\n"
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                   "print('ignoring', flush=True)\ntime.sleep(30)")
    wait_for(lambda: "ignoring" in child.tail(), what="the child to ignore SIGTERM")
    stack._stop(child)
    assert child.process.returncode == -signal.SIGKILL
    stack._stop(child)  # stopping a stopped child is nothing


def test_the_tail_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    child = _child(tmp_path, "bridge", "pass")
    child.process.wait(10)
    child.log.unlink()
    assert child.tail() == ""
