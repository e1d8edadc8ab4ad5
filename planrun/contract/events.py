"""planrun's own Prefect events: their names and payloads (docs/stream.md, "Upstream").

The engine emits one ``planrun.*`` event per change of a run (``flows.events`` writes each
payload with ``model_dump``); the bridge reads each with :func:`read_payload`. Every event's
resource is ``planrun.run.<run id>``; ``n`` counts the run's events, from
``k * SEGMENT + 1`` in the k-th process of the run, so a reader can tell an old event it
sees late from a new one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from planrun.contract.control import PROCESS_LABEL
from planrun.contract.records import ErrorInfo, Progress, Resources
from planrun.contract.status import RunStatus, StepStatus
from planrun.contract.version import Versioned

RUN_PREFIX = "planrun.run."
STEP_PREFIX = "planrun.step."
RUN_STARTED = "planrun.run.started"
RUN_PAUSED = "planrun.run.paused"
RUN_RESUMED = "planrun.run.resumed"
RUN_AWAITING_APPROVAL = "planrun.run.awaiting_approval"
HEARTBEAT = "planrun.run.heartbeat"
STEP_WAITING = "planrun.step.waiting"
#: The resource of every event of a run is this prefix and the run id.
RESOURCE_PREFIX = RUN_PREFIX
#: The k-th process of a run numbers its events from k * SEGMENT + 1.
SEGMENT = 1_000_000


class PlanStep(BaseModel):
    """One step of the plan as ``run.started`` announces it, pending steps included."""

    model_config = ConfigDict(frozen=True)

    id: str
    tool: str
    name: str | None = None
    needs: tuple[str, ...] = ()
    critical: bool = True
    estimate_s: float | None = None


class Impact(BaseModel):
    """What a failure means: the steps that will now be skipped, and whether the run fails."""

    model_config = ConfigDict(frozen=True)

    skipped: tuple[str, ...] = ()
    run_fails: bool = False


class Payload(Versioned):
    """What every planrun event carries: the run and the event's number in it."""

    run_id: str
    n: int


class RunProcess(BaseModel):
    """The process running the run now: its pid and start time mean something only at
    ``place`` (host and PID namespace: ``planrun.processes``); ``state_id`` is the Prefect
    Running state it started under. A bridge at the same place marks the run crashed as
    soon as that process has exited while that state is the run's (docs/production.md)."""

    model_config = ConfigDict(frozen=True)

    place: str
    pid: int
    started: float
    state_id: str | None = None

    @classmethod
    def of_labels(cls, labels: Mapping[str, Any] | None) -> RunProcess | None:
        """The process a flow run's labels name (``PROCESS_LABEL``); None for none, or one
        that does not parse (anyone who reaches Prefect's API can write a label)."""
        label = (labels or {}).get(PROCESS_LABEL)
        if not isinstance(label, str):
            return None
        try:
            return cls.model_validate_json(label)
        except ValueError:
            return None


class RunStarted(Payload):
    """``planrun.run.started``: the plan's steps, their needs and first estimates;
    ``process``: the process that runs it."""

    plan: str
    max_parallel: int = 16
    started_at: str | None = None
    prefect_url: str | None = None
    steps: list[PlanStep] = []
    process: RunProcess | None = None


class RunResumed(Payload):
    """``planrun.run.resumed``: the run goes on in a new process (``process``);
    ``restored`` are the steps that had finished and will not run again. ``retry``: the
    run had ended and is retried (its number, from 1); its other steps run again
    (docs/retry.md)."""

    restored: list[str] = []
    progress: Progress | None = None
    retry: int | None = None
    process: RunProcess | None = None


class RunPaused(Payload):
    """``planrun.run.paused``: the rest waits for a resume, or for ``timeout_s``
    (``limits.pause_timeout``), after which the run is ``on_timeout``."""

    reason: str | None = None
    progress: Progress | None = None
    timeout_s: float | None = None
    on_timeout: Literal["cancel", "resume"] = "cancel"


class RunAwaitingApproval(Payload):
    """``planrun.run.awaiting_approval``: suspended at ``step_id``'s gate until a person
    answers, or ``timeout_s`` passes."""

    step_id: str
    prompt: str | None = None
    timeout_s: float | None = None
    progress: Progress | None = None


class Heartbeat(Payload):
    """``planrun.run.heartbeat``: a sign of life of the run's process."""

    process: RunProcess | None = None


class StepChanged(Payload):
    """``planrun.step.<status>``: a step began an attempt, will try again, or finished.
    ``output`` is sent for a finished step only; ``impact`` for a failed one."""

    step_id: str
    status: StepStatus
    attempt: int = 0
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    summary: str | None = None
    error: ErrorInfo | None = None
    reason: str | None = None
    fallback_used: bool = False
    retry_delay_s: float | None = None
    input: Any = None
    output: Any = None
    impact: Impact | None = None
    resources: Resources | None = None


class StepWaiting(Payload):
    """``planrun.step.waiting``: a pending step cannot start yet; ``why`` says what it waits
    for (a concurrency ``slot``, a ``rate`` limit, machine ``load``), ``note`` says it to a
    person ("waiting for a shell.run slot, 3 ahead")."""

    step_id: str
    why: Literal["slot", "rate", "load"]
    note: str


class RunEnded(Payload):
    """``planrun.run.<status>``: the run ended in one of the end statuses."""

    status: RunStatus
    reason: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    rolled_back: list[str] = []
    progress: Progress | None = None


def step_event(status: StepStatus) -> str:
    return f"{STEP_PREFIX}{status}"


def run_ended_event(status: RunStatus) -> str:
    return f"{RUN_PREFIX}{status}"


_BY_NAME: dict[str, type[Payload]] = {
    RUN_STARTED: RunStarted, RUN_PAUSED: RunPaused, RUN_RESUMED: RunResumed,
    RUN_AWAITING_APPROVAL: RunAwaitingApproval, HEARTBEAT: Heartbeat, STEP_WAITING: StepWaiting,
    **{step_event(s): StepChanged for s in StepStatus if s != StepStatus.PENDING},
    **{run_ended_event(s): RunEnded for s in RunStatus if s.ended},
}


def payload_model(event: str) -> type[Payload] | None:
    """The payload model of the planrun event named ``event``; None for another event."""
    return _BY_NAME.get(event)


def read_payload(event: str, payload: Any) -> Payload | None:
    """The payload of event ``event`` as its model; None when it is not a planrun event.
    Raises :class:`~planrun.errors.ContractError` when the payload does not validate."""
    model = payload_model(event)
    return None if model is None else model.read(payload)
