"""planrun events as the engine writes them (the contract's payloads), for a bridge fed by
a fake event source: each event below makes exactly one message."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from planrun.contract.events import (
    PlanStep,
    RunEnded,
    RunProcess,
    RunStarted,
    StepChanged,
    run_ended_event,
    step_event,
)
from planrun.contract.status import RunStatus, StepStatus
from planrun.processes import this_place
from planrun.progress_bridge.apply import RunEvent

#: Steps of the runs these events are about: step events cycle through them.
STEPS = 20
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def started(run_id: str, steps: int = STEPS) -> RunEvent:
    """``planrun.run.started`` of a plan of ``steps`` steps s0..s<steps-1> in a chain."""
    plan = [PlanStep(id=f"s{i}", tool="core.echo", needs=(f"s{i - 1}",) if i else (),
                     estimate_s=1.0) for i in range(steps)]
    return RunEvent(f"{run_id}-1", "planrun.run.started", run_id, T0,
                    RunStarted(run_id=run_id, n=1, plan="p", started_at="2026-01-01T00:00:00Z",
                               steps=plan))


def step_done(run_id: str, n: int, summary_bytes: int = 0) -> RunEvent:
    """The run's ``n``-th event: step ``s<n % STEPS>`` completed (one message each, as
    ``n`` grows). No ``started_at``: an end with one, of an attempt the bridge has not seen
    begin, also makes the ``step.running`` the engine leaves out for a quick attempt."""
    summary = os.urandom(summary_bytes // 2).hex() if summary_bytes else f"event {n}"
    payload = StepChanged(run_id=run_id, n=n, step_id=f"s{n % STEPS}",
                          status=StepStatus.COMPLETED, attempt=1, summary=summary,
                          ended_at="2026-01-01T00:00:01Z", duration_s=1.0)
    return RunEvent(f"{run_id}-{n}", step_event(StepStatus.COMPLETED), run_id, T0 + n,
                    payload)


def nth(run_id: str, n: int, summary_bytes: int = 0) -> RunEvent:
    """Event ``n`` of a run: its start first, then steps completing."""
    return started(run_id) if n == 1 else step_done(run_id, n, summary_bytes)


def ended(run_id: str, n: int, status: RunStatus = RunStatus.COMPLETED) -> RunEvent:
    return RunEvent(f"{run_id}-{n}", run_ended_event(status), run_id, T0 + n,
                    RunEnded(run_id=run_id, n=n, status=status,
                             ended_at="2026-01-01T00:10:00Z"))


def exited_process(state_id: str | None = "s1") -> RunProcess:
    """A run's process of this machine that has exited: a real one, started and killed."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        began = psutil.Process(child.pid).create_time()
    finally:
        child.kill()
        child.wait(10)
    return RunProcess(place=this_place(), pid=child.pid, started=began, state_id=state_id)


def this_process(state_id: str | None = None) -> RunProcess:
    """This test's own process, as a run's process that still runs."""
    this = psutil.Process()
    return RunProcess(place=this_place(), pid=this.pid, started=this.create_time(),
                      state_id=state_id)
