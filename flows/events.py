"""planrun's own Prefect events: what Prefect's state events do not say about a run.

Prefect emits a state event per task run, but not a step's summary, its error category and
hint, its attempt number, why it was skipped, or what a failure will skip. The engine
emits one ``planrun.*`` event per change of a run instead, with all of that in the payload,
through Prefect's ``emit_event``, so the progress bridge (and anything else subscribed to
Prefect's events: automations, the Prefect UI's event feed) sees the run as planrun does:

- ``planrun.run.started``: the plan's steps, their needs and first estimates;
- ``planrun.step.<status>``: a step began an attempt (``running``), will try again
  (``retrying``), or finished (``completed``, ``failed``, ``skipped``, ``cancelled``).
  ``running`` goes out :data:`RUNNING_AFTER_S` after the attempt began, and not at all if
  the attempt has ended by then: its end event carries ``started_at`` and the attempt,
  and the bridge shows ``step.running`` before it (docs/stream.md). Each event costs the
  Prefect server ≈ 2.6 ms of CPU, a tenth of a step's (BENCHMARKS.md);
- ``planrun.step.waiting``: a pending step waits for a limit, for a new reason
  (docs/limits.md); its next status event is sent whatever it is;
- ``planrun.run.paused`` / ``planrun.run.resumed``: the run was suspended, and goes on in
  a new process (after a pause or a crash, or when a run that ended is retried);
- ``planrun.run.<status>``: the run ended (``completed``, ``completed_with_errors``,
  ``failed``, ``cancelled``).

Every event's resource is ``planrun.run.<run id>``; Prefect adds the flow run as a related
resource. Names and payloads are the contract's (``planrun.contract.events``): each payload
is written here with ``model_dump`` and read by the bridge with ``model_validate``;
``payload.n`` counts the run's events (from ``k * SEGMENT + 1`` in the k-th process of the
run), so a reader can tell an old event it sees late (after a reconnect) from a new one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from planrun.contract.events import (
    HEARTBEAT,
    RESOURCE_PREFIX,
    RUN_AWAITING_APPROVAL,
    RUN_PAUSED,
    RUN_RESUMED,
    RUN_STARTED,
    SEGMENT,
    STEP_WAITING,
    Heartbeat,
    Impact,
    Payload,
    PlanStep,
    RunAwaitingApproval,
    RunEnded,
    RunPaused,
    RunProcess,
    RunResumed,
    RunStarted,
    StepChanged,
    StepWaiting,
    run_ended_event,
    step_event,
)
from planrun.contract.status import StepStatus
from planrun.contract.times import iso
from planrun.plan_schemas.model import Plan
from planrun.report import RunRecord, StepRecord
from planrun.summary import summarize

#: Input and output larger than this (as JSON) are replaced by a note in the event: Prefect
#: refuses events over 1.5 MB, and a live view needs a summary, not the payload.
MAX_VALUE_BYTES = 32_000

#: How long a step's ``running`` event waits: an attempt that ends sooner sends its end
#: alone. Short beside what a person notices, long beside a step that returns at once.
RUNNING_AFTER_S = 0.025


def resource(run_id: str, plan: str) -> dict[str, str]:
    """The resource every event of a run is about."""
    return {"prefect.resource.id": f"{RESOURCE_PREFIX}{run_id}",
            "prefect.resource.name": plan, "planrun.plan": plan}


class RunEvents:
    """Emits the events of one run; its ``changed`` is called on every change."""

    def __init__(self, plan: Plan, run: RunRecord, segment: int = 1,
                 process: RunProcess | None = None) -> None:
        self.plan = plan
        self.run = run
        self.process = process  # told with run.started, run.resumed and every heartbeat
        self.resource = resource(run.run_id, plan.name)
        # n goes on across the processes of one run (a resume, a recovery): segment k
        # numbers its events from k * SEGMENT + 1.
        self.count = segment * SEGMENT
        self.last: dict[str, tuple[StepStatus, int]] = {}
        self.conditional = {s.id for s in plan.steps if s.when is not None}
        self.prompts = {s.id: s.approval.prompt for s in plan.steps if s.approval is not None}
        self._running: dict[str, asyncio.TimerHandle] = {}  # running events not sent yet

    def started(self) -> None:
        run = self.run
        self._emit(RUN_STARTED, RunStarted(
            **self._head(), plan=run.plan, max_parallel=self.plan.limits.max_parallel,
            started_at=iso(run.started_at), prefect_url=run.flow_run_url,
            steps=[PlanStep(id=s.id, name=s.name, tool=s.tool, needs=tuple(s.needs),
                            critical=s.critical, estimate_s=s.estimate_s)
                   for s in run.steps.values()], process=self.process))

    def resumed(self, restored: list[str], retry: int | None = None) -> None:
        """The run goes on in a new process (after a pause or a crash, or, with ``retry``
        its number, after it had ended); ``restored`` are the steps that had finished and
        will not run again."""
        self._emit(RUN_RESUMED, RunResumed(**self._head(), restored=restored, retry=retry,
                                           progress=self.run.progress(), process=self.process))

    def paused(self, reason: str, timeout_s: float | None = None,
               on_timeout: Literal["cancel", "resume"] = "cancel") -> None:
        """The run is suspended: what ran has finished; the rest waits for a resume, or
        for ``timeout_s`` (``limits.pause_timeout``), after which it is ``on_timeout``."""
        self._emit(RUN_PAUSED, RunPaused(**self._head(), reason=reason,
                                         progress=self.run.progress(), timeout_s=timeout_s,
                                         on_timeout=on_timeout))

    def awaiting_approval(self, step_id: str, prompt: str, timeout_s: float | None) -> None:
        """The run is suspended at ``step_id``'s gate until a person answers."""
        self._emit(RUN_AWAITING_APPROVAL, RunAwaitingApproval(
            **self._head(), step_id=step_id, prompt=prompt, timeout_s=timeout_s,
            progress=self.run.progress()))

    def heartbeat(self) -> None:
        """A sign of life: the bridge takes a run whose process has stopped sending them
        for long to have crashed with its host, and recovers it."""
        self._emit(HEARTBEAT, Heartbeat(**self._head(), process=self.process))

    def changed(self, step: StepRecord) -> None:
        """Emit the step's event if its status or attempt changed since the last one."""
        key = (step.status, step.attempts)
        if step.status == StepStatus.PENDING or self.last.get(step.id) == key:
            return
        self.last[step.id] = key
        held = self._running.pop(step.id, None)
        if held is not None:
            held.cancel()  # the attempt ended before its running event went out
        if step.status == StepStatus.RUNNING:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop here: nothing to wait with
                pass
            else:
                self._running[step.id] = loop.call_later(RUNNING_AFTER_S, self._send_running,
                                                         step)
                return
        self._send(step)

    def _send_running(self, step: StepRecord) -> None:
        del self._running[step.id]
        if step.status == StepStatus.RUNNING:  # else its change is on its way to changed()
            self._send(step)

    def _send(self, step: StepRecord) -> None:
        summary = _summary(step)
        if step.status == StepStatus.AWAITING_APPROVAL and step.id in self.prompts:
            summary = self.prompts[step.id]
        self._emit(step_event(step.status), StepChanged(
            **self._head(), step_id=step.id, status=step.status, attempt=step.attempts,
            started_at=iso(step.started_at), ended_at=iso(step.ended_at),
            duration_s=step.duration_s, summary=summary, error=step.error_info(),
            reason=step.reason, fallback_used=step.fallback_used,
            retry_delay_s=step.retry_delay_s, input=_bounded(step.input, "input"),
            output=_bounded(step.output, "output") if step.status.finished else None,
            impact=self.impact(step) if step.status == StepStatus.FAILED else None,
            resources=step.resources if step.status.finished else None))

    def waiting(self, step: StepRecord, why: Literal["slot", "rate", "load"]) -> None:
        """The pending ``step`` waits for a limit, for a new reason (its ``note``)."""
        self.last.pop(step.id, None)  # it went back to pending: its next status is news
        self._emit(STEP_WAITING, StepWaiting(**self._head(), step_id=step.id, why=why,
                                             note=step.note or ""))

    def ended(self) -> None:
        run = self.run
        self._emit(run_ended_event(run.status), RunEnded(
            **self._head(), status=run.status, reason=run.reason,
            started_at=iso(run.started_at), ended_at=iso(run.ended_at),
            duration_s=run.duration_s, rolled_back=run.rolled_back, progress=run.progress()))

    def impact(self, failed: StepRecord) -> Impact:
        """What ``failed`` failing means: the steps that will now be skipped (everything
        not started when it is critical; else what needs it, unless a ``when`` decides),
        and whether the run fails."""
        steps = self.run.steps
        if failed.critical:
            skipped = [s.id for s in steps.values() if s.status == StepStatus.PENDING]
        else:
            lost, grew = {failed.id}, True
            while grew:  # plans need not list a step after its needs
                grew = False
                for step in steps.values():
                    if (step.id not in lost and step.id not in self.conditional
                            and step.status == StepStatus.PENDING
                            and any(n in lost for n in step.needs)):
                        lost.add(step.id)
                        grew = True
            skipped = [sid for sid in steps if sid in lost and sid != failed.id]
        return Impact(skipped=tuple(skipped), run_fails=failed.critical)

    def _head(self) -> dict[str, Any]:
        """What every payload starts with: the run, and the event's number in it."""
        self.count += 1
        return {"run_id": self.run.run_id, "n": self.count}

    def _emit(self, event: str, payload: Payload) -> None:
        from prefect.events import emit_event

        data = payload.model_dump(mode="json")
        # Every event goes out here, its payload masked (docs/secrets.md).
        emit_event(event, resource=self.resource, payload=self.run.redactor.mask(data))


def _summary(step: StepRecord) -> str | None:
    if step.status == StepStatus.COMPLETED:
        text = summarize(step.output)
        return f"{text} (by its fallback)" if step.fallback_used else text
    if step.status in (StepStatus.FAILED, StepStatus.RETRYING) and step.error is not None:
        return step.error.message
    return step.reason


def _bounded(value: Any, what: str) -> Any:
    try:
        size = len(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return f"<{what} that is not JSON>"
    if size <= MAX_VALUE_BYTES:
        return value
    return f"<{what} of {size} bytes: too large for the event stream; see the run report>"
