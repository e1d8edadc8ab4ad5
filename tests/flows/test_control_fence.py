"""RunControl's fence: a deployment's run stops in this process once its flow run says
another process runs it (docs/production.md, "Crash recovery"): a run taken for dead and
started again must not go on twice."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from prefect.states import Completed, Crashed, Paused, Pending, Running, Scheduled, State

from planrun.contract.control import PROCESS_LABEL
from planrun.contract.events import RunProcess
from planrun.flows.control import RunControl

ME = RunProcess(place="host/ns", pid=100, started=1.0, state_id="state-of-this-process")


class Recorder:
    """A scheduler that records what the control told it."""

    def __init__(self) -> None:
        self.pause_reason: str | None = None
        self.gate = None
        self.log: list[str] = []

    def supersede(self, reason: str) -> None:
        self.log.append(f"supersede: {reason}")

    def stop(self, reason: str, *, cancelled: bool = False) -> None:
        self.log.append(f"stop: {reason}")

    def pause(self, reason: str, gate: str | None = None) -> None:
        self.log.append(f"pause: {reason}")


def control(owner: RunProcess | None = ME) -> tuple[RunControl, Recorder]:
    scheduler = Recorder()
    return RunControl(str(uuid.uuid4()), scheduler=scheduler,  # type: ignore[arg-type]
                      owner=owner), scheduler


def named(process: RunProcess) -> dict[str, Any]:
    return {PROCESS_LABEL: process.model_dump_json()}


@pytest.mark.parametrize("state", [Crashed(message="no sign of life"), Scheduled(),
                                   Pending(), Completed()], ids=lambda s: s.type.value)
def test_a_state_a_running_run_is_never_in_supersedes_it(state: State[Any]) -> None:
    ctl, scheduler = control()
    ctl._react(state, named(ME))
    assert scheduler.log == [f"supersede: its flow run is {state.type.value.lower()}: "
                             "it was taken for dead"]


def test_another_process_named_on_a_running_run_supersedes_it() -> None:
    ctl, scheduler = control()
    other = RunProcess(place="host/ns", pid=200, started=2.0, state_id="a-newer-running")
    ctl._react(Running(), named(other))
    assert scheduler.log == ["supersede: it was started again (process 200 runs it now)"]


def test_an_earlier_engines_label_read_in_this_engines_running_state_is_stale() -> None:
    # This engine writes its label after its first step has started: a read between its
    # Running state and that write still names the engine that ran the run before.
    mine = Running()
    ctl, scheduler = control(owner=ME.model_copy(update={"state_id": str(mine.id)}))
    earlier = RunProcess(place="host/ns", pid=50, started=0.5, state_id="an-older-running")
    ctl._react(mine, named(earlier))
    assert scheduler.log == []


def test_the_same_process_a_bare_state_or_a_label_that_does_not_parse_changes_nothing(
        ) -> None:
    ctl, scheduler = control()
    ctl._react(Running(), named(ME))
    ctl._react(Running())  # a read without labels (FlowRunStates between full reads)
    ctl._react(Running(), {PROCESS_LABEL: "not json"})  # anyone can write a label
    assert scheduler.log == []


def test_a_run_without_an_owner_is_never_superseded() -> None:
    # A run of `planrun run` runs in that command's process only: no runner starts it
    # again, so a bridge's mistake (Crashed) does not stop it.
    ctl, scheduler = control(owner=None)
    ctl._react(Crashed(message="no sign of life"))
    other = RunProcess(place="h", pid=2, started=2.0, state_id="x")
    ctl._react(Running(), named(other))
    assert scheduler.log == []


def test_a_pause_still_pauses_a_run_that_is_its_own() -> None:
    ctl, scheduler = control()
    ctl._label_as = lambda labels: _nothing()  # type: ignore[assignment,method-assign]
    ctl._react(Paused(pause_key="approval-a-01", message="waiting"), named(ME))
    assert scheduler.log == ["pause: waiting"]


async def _nothing() -> None:
    return None
