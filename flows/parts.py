"""What a run session is given: small interfaces for its effects, and the parts bundled.

Each interface has its real implementation (named on it) and an in-memory one in
``flows.fakes``, as ``adapters/fake.py`` is for tools: a session with in-memory parts runs
a plan in milliseconds without a Prefect server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from uuid import UUID

from planrun.flows.limits import StepLimits, Why
from planrun.flows.scheduler import Scheduler
from planrun.flows.step import StepJob
from planrun.plan_schemas.model import Step
from planrun.report import RunRecord, StepRecord


class EventSink(Protocol):
    """What a run tells whoever follows it, change by change (``flows.events.RunEvents``:
    Prefect events the bridge reads)."""

    def started(self) -> None: ...

    def resumed(self, restored: list[str], retry: int | None = None) -> None: ...

    def changed(self, step: StepRecord) -> None: ...

    def waiting(self, step: StepRecord, why: Why) -> None:
        """The pending ``step`` cannot start yet, for a new reason (its ``note``)."""
        ...

    def heartbeat(self) -> None: ...

    def paused(self, reason: str, timeout_s: float | None = None,
               on_timeout: Literal["cancel", "resume"] = "cancel") -> None: ...

    def awaiting_approval(self, step_id: str, prompt: str, timeout_s: float | None) -> None: ...

    def ended(self) -> None: ...


class ArtifactSink(Protocol):
    """The run's progress and steps table in the Prefect UI (``flows.artifacts.RunArtifacts``)."""

    def start(self) -> None: ...

    def changed(self) -> None: ...

    async def finish(self) -> None: ...


class CheckpointStore(Protocol):
    """Finished steps kept for a later process of the same run
    (``flows.checkpoints.Checkpoints``)."""

    #: This start of the run is the first of a retry: the run had ended.
    retrying: bool

    @property
    def retry(self) -> int:
        """How many times the run has been retried (0: never)."""
        ...

    async def begin(self, retry_request: Callable[[], Awaitable[str | None]]) -> int:
        """Count this start of the run (1 on the first); after the run's end, a start under
        a new ``retry_request()`` is a retry."""
        ...

    async def end(self) -> None:
        """Keep that the run has ended (a later start is a retry)."""
        ...

    async def save(self, record: StepRecord) -> None: ...

    def saved_at_once(self, record: StepRecord) -> bool:
        """``save`` done without a wait, if the storage allows; False: await ``save``."""
        ...

    async def load(self, records: dict[str, StepRecord]) -> list[str]:
        """Restore the steps that have a checkpoint; ``CheckpointUnreadable`` if one exists
        but cannot be read."""
        ...


class ControlSource(Protocol):
    """What people ask of the run: pause, cancel, a gate's answer (``flows.control.RunControl``:
    the flow run's state and inputs in Prefect)."""

    def attach(self, scheduler: Scheduler, beat: Callable[[], None] | None = None) -> None: ...

    async def news(self) -> None:
        """Tell the scheduler what was asked up to now."""
        ...

    async def watch(self) -> None:
        """Tell the scheduler what is asked while the run goes, until cancelled."""
        ...

    async def cancel_requested(self) -> bool:
        """Whether the run was cancelled while it was suspended."""
        ...

    async def retry_request(self) -> str | None:
        """The request to retry the run, if one was made (docs/retry.md)."""
        ...

    async def forget_askings(self, step_ids: Iterable[str]) -> None:
        """Forget the last askings of these steps' gates: they are asked anew (a retry)."""
        ...

    async def decision(self, step_id: str) -> tuple[bool, str] | None:
        """The answer to the latest asking of the step's gate, or None."""
        ...

    #: Whether a gate waits in this process (``ask`` returns once it is answered) rather
    #: than suspending the run (``ask`` raises Prefect's ``Pause``).
    waits_here: bool

    async def ask(self, step_id: str, prompt: str, timeout_s: float | None = None) -> None:
        """Ask at the step's gate: suspend the run (raises Prefect's ``Pause``), or, when
        ``waits_here``, wait until it is answered (no answer in ``timeout_s``: no)."""
        ...

    async def suspend(self, key: str, message: str) -> Any:
        """Suspend the paused run; the state to raise ``Pause`` with."""
        ...


class GateAsker(Protocol):
    """Asks a person at a gate while the run waits for the answer in this process
    (``planrun.asking.TerminalAsker``: on the terminal of ``planrun run``)."""

    async def ask(self, run_id: str, step_id: str, prompt: str) -> None:
        """Ask until the person answers, and give the answer (Prefect's resume of the
        run); cancelled when the gate was answered elsewhere first."""
        ...

    def settled(self, step_id: str, answer: tuple[bool, str] | None) -> None:
        """The gate was answered (here or elsewhere): approved or not, and the comment;
        None when no answer counted (the gate is asked again)."""
        ...


class RunWorkspace(Protocol):
    """The files the run changes, kept or put back at its end (``adapters.workspace.Workspace``)."""

    def commit(self) -> None: ...

    def rollback(self) -> list[str]: ...

    def redo(self) -> list[str]:
        """Undo the last rollback where nothing changed the paths since (a retry)."""
        ...

    def left_note(self) -> str | None: ...


class StepRunner(Protocol):
    """How a step is executed and a skip recorded (``flows.step.TaskRuns``: Prefect task
    runs). ``upstream`` are the task run ids of the steps it needs."""

    async def run(self, job: StepJob, upstream: list[UUID]) -> Any:
        """The step's output; raises when it failed, ``CancelledError`` when cancelled."""
        ...

    async def skip(self, step: Step, record: StepRecord, upstream: list[UUID]) -> None: ...


@dataclass(frozen=True)
class RunParts:
    """Everything with an effect outside the session. The event sink and artifacts are
    made once the run's record (and, for events, its start count) are known."""

    checkpoints: CheckpointStore
    control: ControlSource
    workspace: RunWorkspace
    steps: StepRunner
    events: Callable[[RunRecord, int], EventSink]
    artifacts: Callable[[RunRecord], ArtifactSink]
    #: The limits shared by every run of the machine (``flows.limits.StepLimits``).
    limits: StepLimits
