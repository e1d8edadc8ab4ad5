"""``planrun up --in-process`` end to end (issue 12, item 3): one runner executes many runs
at once in its own process, on one event loop (flows/loop_runner.py). What people ask of
a run (pause, resume, cancel, a gate's answer) works as with a process per run, and a
runner killed with its runs in it costs none of them: the bridge, on the same machine,
sees the process gone, the runs are scheduled again, and the runner started again
restores their finished steps from their checkpoints."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest

from planrun.contract.control import PROCESS_LABEL
from tests.helpers import ended, wait_for
from tests.stack import Stack
from tests.test_control import (
    a_run_taken_for_dead_while_alive_goes_on_once,
    a_submitted_run_starts_without_waiting_for_the_poll,
    commands_of,
    held,
    hold,
    lines,
    release,
    step_started,
    submit,
    wait_status,
)

#: Longer than any wait here: a killed runner's runs are recovered because its process
#: has exited, not because they fell silent (docs/production.md, "Crash recovery").
DEAD_AFTER_S = 600
#: Runs held at once in the one runner, each in a shell.run step: as many as that tool's
#: default concurrency limit lets run at once (planrun/policy_limits.py), up to 8.
AT_ONCE = min(8, 2 * (os.cpu_count() or 1))
#: The runner's poll for scheduled runs: longer than any wait here, so every run in this
#: module (submitted, resumed, scheduled again after a crash) is taken because the server
#: said it was scheduled (flows/loop_runner.py).
POLL_S = 600


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("in-process"), args=("--in-process",),
                    env={"PLANRUN_DEAD_AFTER_S": str(DEAD_AFTER_S),
                         "PREFECT_RUNNER_POLL_FREQUENCY": str(POLL_S)})
    try:
        yield running
    finally:
        running.stop()


def labels_of(run_id: str) -> dict[str, Any]:
    """The labels of the run's flow run."""
    from prefect.client.orchestration import get_client

    async def read() -> Any:
        async with get_client() as client:
            return (await client.read_flow_run(UUID(run_id))).labels or {}

    return dict(asyncio.run(read()))


def process_of(run_id: str) -> int:
    """The pid the run's flow run names as its process (``PROCESS_LABEL``)."""
    return int(json.loads(labels_of(run_id)[PROCESS_LABEL])["pid"])


def test_up_says_its_runner_runs_them_in_its_own_process(stack: Stack) -> None:
    assert "runner      serving planrun/plan-runner, its runs in the runner's own process" \
        in stack.output()


def test_a_submitted_run_starts_without_waiting_for_the_runners_poll(stack: Stack,
                                                                    tmp_path: Path) -> None:
    a_submitted_run_starts_without_waiting_for_the_poll(stack, tmp_path, POLL_S)


def test_many_runs_run_at_once_in_the_runners_process_and_complete(
        stack: Stack, tmp_path: Path) -> None:
    names = [f"many{i}" for i in range(AT_ONCE)]
    runs = {name: submit(stack, tmp_path, held(name, 2, holding=[1])) for name in names}
    # Each s1 writes its name, then waits (read from the files: polling every report at
    # once would run into the bridge's rate limit).
    wait_for(lambda: all(lines(stack, name) == ["s1"] for name in names), 120,
             "every run's first step to run")
    the_runner = stack.runner()
    # No process per run: every run's command is the runner's own descendant, and the
    # runner has no run processes (no fork server, no forks).
    assert stack.runners() == {the_runner: []}
    wait_for(lambda: all(commands_of(the_runner, name) for name in names), 60,
             "every run's command to run under the runner")
    # Each run names the runner's process on its flow run, for the bridge's crash rule
    # (written beside its first step, not before it).
    wait_for(lambda: all(PROCESS_LABEL in labels_of(run_id) for run_id in runs.values()), 60,
             "every run to name its process")
    assert {process_of(run_id) for run_id in runs.values()} == {the_runner.pid}
    for name in names:
        release(stack, name)
    for run_id in runs.values():
        wait_status(stack, run_id, "completed")
    assert all(lines(stack, name) == ["s1", "s2"] for name in names)
    assert stack.runner().pid == the_runner.pid


def test_a_pause_resume_gate_and_cancel_of_runs_sharing_a_process(
        stack: Stack, tmp_path: Path) -> None:
    paused = submit(stack, tmp_path, held("share-pause", 3))
    gated = submit(stack, tmp_path, """version: 1
name: share-gate
steps:
  - id: gated
    tool: shell.run
    approval: {prompt: "Go?"}
    with: {argv: [sh, -c, "echo gated >> share-gate.txt"]}
""")
    cancelled = submit(stack, tmp_path, """version: 1
name: share-cancel
steps:
  - {id: write, tool: file.write, with: {path: share-cancel.out, content: written}}
  - id: long
    tool: shell.run
    needs: [write]
    with: {argv: [sh, -c, "until [ -e share-cancel.go ]; do sleep 0.05; done"]}
""")
    wait_for(lambda: step_started(stack, paused, "s1"), 60, "the paused run's s1 to start")
    command = wait_for(lambda: commands_of(stack.runner(), "share-cancel"), 60,
                       "the long command to start")

    assert stack.cli("pause", paused).returncode == 0  # s1 finishes, nothing new starts
    release(stack, "share-pause")
    assert wait_status(stack, paused, "paused")["steps"]["s2"]["status"] == "pending"

    assert stack.cli("cancel", cancelled).returncode == 0
    final = wait_status(stack, cancelled, "cancelled")
    assert final["steps"]["long"]["status"] == "cancelled"
    wait_for(lambda: all(map(ended, command)), 10, "the cancelled run's command to end")
    workspace = Path(stack.env["PLANRUN_WORKSPACE"])
    assert not (workspace / "share-cancel.out").exists()  # rolled back

    wait_status(stack, gated, "awaiting_approval")
    assert stack.cli("approve", gated, "gated").returncode == 0
    wait_status(stack, gated, "completed")
    assert (workspace / "share-gate.txt").read_text() == "gated\n"

    hold(stack, "share-pause")
    release(stack, "share-pause")
    assert stack.cli("resume", paused).returncode == 0
    final = wait_status(stack, paused, "completed")
    assert lines(stack, "share-pause") == ["s1", "s2", "s3"]  # each step just once
    assert all(step["attempts"] == 1 for step in final["steps"].values())


def test_a_runner_killed_with_runs_in_it_costs_none_of_them(stack: Stack,
                                                            tmp_path: Path) -> None:
    names = ["crash-a", "crash-b"]
    runs = {name: submit(stack, tmp_path, held(name, 3, holding=[2])) for name in names}
    # Each one's s2 command has started (under load the program starts after its step).
    wait_for(lambda: all(lines(stack, name) == ["s1", "s2"] for name in names), 120,
             "both runs' s2 to run")
    killed = stack.runner()
    commands = [c for name in names for c in commands_of(killed, name)]
    assert commands, "the runs' commands run under the runner"
    killed.send_signal(signal.SIGKILL)
    psutil.wait_procs([killed], timeout=10)
    wait_for(lambda: all(map(ended, commands)), 10, "the killed runs' commands to end")

    # planrun up starts the runner again; the bridge marks both runs crashed at once and
    # they are scheduled again: each one's s2, in flight at the kill, runs again.
    wait_for(lambda: all(lines(stack, name) == ["s1", "s2", "s2"] for name in names), 120,
             "both runs to be recovered and their s2 to run again")
    assert stack.runner().pid != killed.pid
    for name in names:
        release(stack, name)
    for name, run_id in runs.items():
        final = wait_status(stack, run_id, "completed", timeout=120)
        assert lines(stack, name) == ["s1", "s2", "s2", "s3"]  # s1 kept: it had completed
        assert [final["steps"][s]["status"] for s in ("s1", "s2", "s3")] == ["completed"] * 3


def test_a_run_taken_for_dead_while_alive_goes_on_in_one_engine_only(
        stack: Stack, tmp_path: Path) -> None:
    # The new engine runs in the same runner process as the first: the first one stops
    # because its flow run says so, not because its process is gone.
    a_run_taken_for_dead_while_alive_goes_on_once(stack, tmp_path, "fenced-in-process")


def test_the_runner_refuses_an_argument_it_does_not_know() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "planrun.flows.serve", "--in-proces"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "usage: python -m planrun.flows.serve [--in-process] (not --in-proces)" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
