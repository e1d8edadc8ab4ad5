"""``planrun up``'s process-per-run runner (flows/serve.py) takes a run as soon as the
server says it was scheduled: a submit, and a resume after a pause. Its poll here is
longer than any wait, so every run in this module starts because of the server's event."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.stack import Stack
from tests.test_control import (
    a_submitted_run_starts_without_waiting_for_the_poll,
    held,
    hold,
    lines,
    release,
    step_started,
    submit,
    wait_status,
)

#: The runner's poll for scheduled runs: longer than any wait here.
POLL_S = 600


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("process-runner"),
                    env={"PREFECT_RUNNER_POLL_FREQUENCY": str(POLL_S)})
    try:
        yield running
    finally:
        running.stop()


def test_a_submitted_run_starts_without_waiting_for_the_runners_poll(stack: Stack,
                                                                    tmp_path: Path) -> None:
    a_submitted_run_starts_without_waiting_for_the_poll(stack, tmp_path, POLL_S)


def test_a_resumed_run_goes_on_without_waiting_for_the_runners_poll(stack: Stack,
                                                                   tmp_path: Path) -> None:
    run_id = submit(stack, tmp_path, held("resumed", 2, holding=[1]))
    wait_for(lambda: step_started(stack, run_id, "s1"), POLL_S / 4, "s1 to start")
    assert stack.cli("pause", run_id).returncode == 0
    release(stack, "resumed")
    wait_status(stack, run_id, "paused", timeout=POLL_S / 4)
    hold(stack, "resumed")
    assert stack.cli("resume", run_id).returncode == 0
    wait_status(stack, run_id, "completed", timeout=POLL_S / 4)
    assert lines(stack, "resumed") == ["s1", "s2"]
