"""The bridge's view of one run, built from planrun's and Prefect's events.

A :class:`RunView` holds a run record, its plan's settings, the last event number of each
step, a gate or pause deadline, and the estimate's inputs. ``progress_bridge.apply`` changes
a copy of it per event; its ``on_*`` methods change the view they are called on and return
the messages (drafts) the change makes, each with the run's progress and an estimate as of
the ``now`` they are given: nothing here reads a clock. The view is saved as the contract's
versioned JSON (:class:`SavedView`, ``progress_bridge/saved_view.py``) with every change,
so a restarted bridge goes on from where it stopped (docs/stream.md).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from planrun.contract.breakers import BreakerChange, BreakerState
from planrun.contract.estimate import Estimate
from planrun.contract.events import (
    Impact,
    RunAwaitingApproval,
    RunEnded,
    RunPaused,
    RunProcess,
    RunResumed,
    RunStarted,
    StepChanged,
    StepWaiting,
)
from planrun.contract.records import ErrorInfo
from planrun.contract.status import RunStatus, StepStatus
from planrun.contract.stream import Draft, MessageType
from planrun.contract.times import epoch, iso
from planrun.errors import step_error
from planrun.progress_bridge.estimate import StepDurations, estimate
from planrun.progress_bridge.saved_view import Gate, PauseDeadline, SavedView, StepsSaved
from planrun.report import RunRecord, StepRecord

STEP_TYPES = {
    StepStatus.RUNNING: MessageType.STEP_RUNNING,
    StepStatus.RETRYING: MessageType.STEP_RETRYING,
    StepStatus.COMPLETED: MessageType.STEP_COMPLETED,
    StepStatus.FAILED: MessageType.STEP_FAILED,
    StepStatus.SKIPPED: MessageType.STEP_SKIPPED,
    # The stream has no step.cancelled: a cancelled step ended without success, and its
    # ``status`` says "cancelled" (docs/stream.md).
    StepStatus.CANCELLED: MessageType.STEP_FAILED,
    StepStatus.AWAITING_APPROVAL: MessageType.STEP_AWAITING_APPROVAL,
}
#: The message of each state a breaker changes to.
BREAKER_TYPES: dict[BreakerState, MessageType] = {
    "open": MessageType.TOOL_CIRCUIT_OPENED, "half_open": MessageType.TOOL_CIRCUIT_HALF_OPEN,
    "closed": MessageType.TOOL_CIRCUIT_CLOSED}
#: How a saved view without steps ends: ``to_json`` puts the steps' JSON there.
EMPTY_STEPS = '"steps":[]}'
#: The shortest time between two computed estimates of one run ...
ESTIMATE_EVERY_S = 0.25
#: ... and, per step of its plan, for a large plan: an estimate's cost grows with the
#: steps (≈ 4 ms for 200, ≈ 30 ms for 1,000), and a run of 1,000 steps estimated every
#: 0.25 s took a quarter of a core; so at most ≈ 3 % of one.
ESTIMATE_EVERY_S_PER_STEP = 0.001
#: How Prefect's terminal flow-run states end a run whose engine could not say so itself.
FLOW_RUN_ENDS = {"CRASHED": RunStatus.FAILED, "FAILED": RunStatus.FAILED,
                 "CANCELLED": RunStatus.CANCELLED, "COMPLETED": RunStatus.COMPLETED}


@dataclass
class RunView:
    """One run as the bridge knows it: a run record, its plan and the last event numbers."""

    record: RunRecord
    max_parallel: int = 16
    step_n: dict[str, int] = field(default_factory=dict)
    summaries: dict[str, str | None] = field(default_factory=dict)
    durations: Mapping[str, StepDurations] = field(default_factory=dict)
    _estimate: tuple[float, Estimate] | None = field(default=None, repr=False)
    #: A message went out with an estimate reused from before its change.
    estimate_stale: bool = False
    #: How many times the bridge has scheduled this run again after a crash.
    recoveries: int = 0
    #: The run's retries the bridge has seen begin (``run.resumed`` with ``retry``).
    retries: int = 0
    gate: Gate | None = None
    pause_deadline: PauseDeadline | None = None
    #: What each waiting step waits for (``slot``, ``rate``, ``load``: /metrics counts them).
    waiting: dict[str, str] = field(default_factory=dict)
    #: The latest change of each breaker the run was told of (its ``order``).
    told: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: When the run began to wait for a person (paused, or at a gate; epoch s).
    waiting_since: float | None = None
    #: The process that said it runs the run (``run.started``, ``run.resumed``): kept, so
    #: that a restarted bridge can tell at once that it has exited (progress_bridge/timers.py).
    process: RunProcess | None = None
    #: Each step's saved JSON, shared by the run's views (``to_json``).
    saved_steps: StepsSaved = field(default_factory=StepsSaved, repr=False, compare=False)
    #: The steps this view may change in place: those it copied since it was last copied
    #: or saved (``_changing``). Every other step may be another view's too, or saved.
    _fresh: set[str] = field(default_factory=set, repr=False, compare=False)

    @property
    def ended(self) -> bool:
        return self.record.status.ended

    @property
    def pending(self) -> bool:
        """Submitted, or known from Prefect, but not announced by its engine yet."""
        return self.record.status == RunStatus.PENDING

    @property
    def running(self) -> bool:
        return any(s.status in (StepStatus.RUNNING, StepStatus.RETRYING)
                   for s in self.record.steps.values())

    def copy(self) -> RunView:
        """A copy to change: its record is its own, and each step once it changes it
        (``_changing``: a run's event changes one step or two of hundreds); ``durations``
        is shared."""
        self._fresh.clear()  # its steps are the copy's too now
        record = replace(self.record, steps=dict(self.record.steps),
                         rolled_back=list(self.record.rolled_back))
        return replace(self, record=record, step_n=dict(self.step_n),
                       summaries=dict(self.summaries), waiting=dict(self.waiting),
                       told=dict(self.told), _fresh=set())

    def _changing(self, step: StepRecord) -> StepRecord:
        """``step`` of this view, to change: a copy of it the first time since the view
        was copied or saved (the step may be the view's it was copied from, or saved as
        it is)."""
        if step.id not in self._fresh:
            step = self.record.steps[step.id] = copy.copy(step)
            self._fresh.add(step.id)
        return step

    @classmethod
    def started(cls, run_id: str, p: RunStarted, now: float) -> tuple[RunView, list[Draft]]:
        """The view of a run from its ``planrun.run.started`` event, and its first message."""
        steps = {s.id: StepRecord(id=s.id, tool=s.tool, name=s.name, needs=list(s.needs),
                                  critical=s.critical, estimate_s=s.estimate_s or 0.0)
                 for s in p.steps}
        record = RunRecord(run_id=run_id, plan=p.plan, steps=steps, status=RunStatus.RUNNING,
                           started_at=epoch(p.started_at) or now, flow_run_url=p.prefect_url)
        view = cls(record, max_parallel=p.max_parallel, process=p.process)
        return view, [view._draft(MessageType.RUN_STARTED, now, status=str(record.status),
                                  summary=record.plan, plan=tuple(p.steps))]

    @classmethod
    def unstarted(cls, run_id: str, plan: str = "", flow_run_url: str | None = None) -> RunView:
        """A run Prefect knows of whose engine has not announced it (yet: it was just
        submitted; or never: it failed first)."""
        return cls(RunRecord(run_id=run_id, plan=plan, steps={}, status=RunStatus.PENDING,
                             flow_run_url=flow_run_url))

    def on_step(self, p: StepChanged, now: float) -> list[Draft]:
        """Apply a ``planrun.step.<status>`` event; no message when it is stale."""
        step = self.record.steps.get(p.step_id)
        if step is None or p.n <= self.step_n.get(step.id, 0):
            return []
        step = self._changing(step)
        self.step_n[step.id] = p.n
        self._stop_waiting(step)
        drafts = []
        if self._ran_unseen(step, p):  # the engine sends no running event for a quick attempt
            step.status, step.attempts = StepStatus.RUNNING, p.attempt or step.attempts
            step.started_at = epoch(p.started_at) or step.started_at
            self.summaries[step.id] = None
            drafts.append(self._step_draft(step, now))
        step.status = p.status
        step.attempts = p.attempt or step.attempts
        step.started_at = epoch(p.started_at) or step.started_at
        step.ended_at = epoch(p.ended_at)
        step.error = _error(p.error)
        step.reason, step.fallback_used = p.reason, p.fallback_used
        step.retry_delay_s = p.retry_delay_s
        if p.input is not None:
            step.input = p.input
        if p.status.finished:
            step.output = p.output
            step.resources = p.resources if p.resources is not None else step.resources
        self.summaries[step.id] = p.summary
        return [*drafts, self._step_draft(step, now, impact=p.impact)]

    @staticmethod
    def _ran_unseen(step: StepRecord, p: StepChanged) -> bool:
        """Whether ``p`` ends an attempt this view has not seen begin (a step cancelled
        while it waits to retry has: no running for it): the engine sends a step's running
        event only once the attempt has gone on for a moment (flows/events.py), and the
        stream shows ``step.running`` before the attempt's end all the same."""
        ended_attempt = p.status in (StepStatus.COMPLETED, StepStatus.FAILED,
                                     StepStatus.RETRYING, StepStatus.CANCELLED)
        return (ended_attempt and bool(p.attempt) and p.started_at is not None
                and p.attempt != step.attempts)

    def on_waiting(self, p: StepWaiting, now: float) -> list[Draft]:
        """Apply ``planrun.step.waiting``: a step not started yet (or between attempts)
        waits for a slot, a rate limit or load; its ``note`` says so until it starts. The
        same note again makes no message."""
        step = self.record.steps.get(p.step_id)
        if (step is None or self.ended or p.n <= self.step_n.get(step.id, 0)
                or step.status not in (StepStatus.PENDING, StepStatus.RETRYING)):
            return []
        self.step_n[step.id] = p.n
        if step.note == p.note and self.waiting.get(step.id) == p.why:
            return []
        step = self._changing(step)
        step.note, self.waiting[step.id] = p.note, p.why
        return [self._draft(MessageType.STEP_WAITING, now, step_id=step.id,
                            status=str(step.status), attempt=step.attempts or None,
                            note=p.note)]

    def on_breaker(self, change: BreakerChange, now: float) -> list[Draft]:
        """A breaker of a tool this run's plan uses changed (``tool.circuit_*``); a change
        the run was told of already, or one older than it, makes no message."""
        if self.ended or not any(s.tool == change.tool for s in self.record.steps.values()):
            return []
        if tuple(self.told.get(change.key, (-1, -1))) >= change.order:
            return []
        self.told[change.key] = change.order
        return [self._draft(BREAKER_TYPES[change.state], now, status=change.state,
                            tool=change.key, note=change.note(now))]

    def on_ended(self, p: RunEnded, now: float) -> list[Draft]:
        """Apply a ``planrun.run.<status>`` event."""
        if self.ended:
            return []
        for step in list(self.record.steps.values()):
            self._stop_waiting(step)
        record = self.record
        record.status, record.reason = p.status, p.reason
        record.ended_at = epoch(p.ended_at) or now
        record.rolled_back = list(p.rolled_back)
        self.waiting_since = None
        return [self._draft(MessageType(f"run.{record.status}"), now,
                            status=str(record.status), summary=record.reason)]

    def on_paused(self, p: RunPaused, now: float) -> list[Draft]:
        """Apply ``planrun.run.paused``: what ran has finished; the rest waits."""
        if self.ended:
            return []
        self.record.status, self.record.reason = RunStatus.PAUSED, p.reason
        self.pause_deadline = (PauseDeadline(deadline=now + p.timeout_s, action=p.on_timeout)
                               if p.timeout_s else None)
        self.waiting_since = now
        return [self._draft(MessageType.RUN_PAUSED, now, status=str(RunStatus.PAUSED),
                            summary=p.reason)]

    def on_awaiting_approval(self, p: RunAwaitingApproval, now: float) -> list[Draft]:
        """Apply ``planrun.run.awaiting_approval``: the run waits at a step's gate."""
        if self.ended:
            return []
        self.gate = Gate(step_id=p.step_id, prompt=p.prompt,
                         deadline=now + p.timeout_s if p.timeout_s else None)
        self.record.status = RunStatus.AWAITING_APPROVAL
        self.record.reason = f"awaiting approval of {p.step_id}"
        self.waiting_since = now
        return [self._draft(MessageType.RUN_AWAITING_APPROVAL, now,
                            status=str(RunStatus.AWAITING_APPROVAL), step_id=p.step_id,
                            summary=p.prompt)]

    def on_resumed(self, p: RunResumed, now: float) -> list[Draft]:
        """Apply ``planrun.run.resumed``: the run goes on in a new process. With ``retry``
        (one not seen before), a run that had ended goes on: its steps not restored are
        pending again (docs/retry.md)."""
        retried = p.retry is not None and p.retry > self.retries
        if self.ended and not retried:
            return []
        summary = f"{len(p.restored)} finished step(s) kept"
        if retried:
            assert p.retry is not None
            again = self._retry(p.retry, set(p.restored))
            summary = f"retry {p.retry}: {again} step(s) run again, {summary}"
        self.record.status, self.record.reason, self.gate = RunStatus.RUNNING, None, None
        self.pause_deadline = self.waiting_since = None
        self.process = p.process
        return [self._draft(MessageType.RUN_RESUMED, now, status=str(RunStatus.RUNNING),
                            summary=summary)]

    def _retry(self, number: int, restored: set[str]) -> int:
        """Begin retry ``number``: every step not ``restored`` is pending again; how many."""
        record = self.record
        record.ended_at, record.rolled_back = None, []
        self.retries, self.recoveries, self._estimate = number, 0, None
        again = [s for s in record.steps.values() if s.id not in restored]
        for step in again:
            record.steps[step.id] = StepRecord(id=step.id, tool=step.tool, name=step.name,
                                               needs=step.needs, critical=step.critical,
                                               estimate_s=step.estimate_s)
            self.summaries.pop(step.id, None)
            self.waiting.pop(step.id, None)
        return len(again)

    def on_flow_run_ended(self, state_type: str, message: str | None,
                          now: float) -> list[Draft]:
        """End a run whose flow run ended without planrun's own end event (its process
        crashed or was killed, or Prefect cancelled it): what still runs is cancelled,
        what waits is skipped."""
        status = FLOW_RUN_ENDS.get(state_type)
        if self.ended or status is None:
            return []
        why = f"the run's flow run ended {state_type.lower()}" + (f": {message}" if message
                                                                   else "")
        drafts = []
        for step in list(self.record.steps.values()):
            if step.status.finished:
                continue
            step = self._changing(step)
            self._stop_waiting(step)
            step.status = (StepStatus.CANCELLED if step.started_at is not None
                           else StepStatus.SKIPPED)
            step.ended_at, step.reason = now, why
            self.summaries[step.id] = why
            drafts.append(self._step_draft(step, now))
        if status == RunStatus.COMPLETED and drafts:
            status = RunStatus.FAILED
        self.record.status, self.record.reason, self.record.ended_at = status, why, now
        self.waiting_since = None
        drafts.append(self._draft(MessageType(f"run.{status}"), now, status=str(status),
                                  summary=why))
        return drafts

    def tick(self, now: float) -> list[Draft]:
        """A ``progress`` message with a fresh estimate (sent while a step runs)."""
        return [self._draft(MessageType.PROGRESS, now, status=str(self.record.status))]

    def report(self, now: float) -> dict[str, Any]:
        """The run report (docs/run-report.md) as of ``now``, with ``progress`` and
        ``estimate``, and the gate the run waits at."""
        report = self.record.to_report(now)
        for sid, summary in self.summaries.items():
            report["steps"][sid]["summary"] = summary
        found = self.estimate(now)
        report["estimate"] = found.model_dump() if found is not None else None
        if self.gate is not None and self.record.status == RunStatus.AWAITING_APPROVAL:
            report["awaiting_approval"] = self.gate.model_dump()
        return report

    @property
    def estimate_every_s(self) -> float:
        """The shortest time between two computed estimates of this run."""
        return max(ESTIMATE_EVERY_S, len(self.record.steps) * ESTIMATE_EVERY_S_PER_STEP)

    def estimate_due(self, now: float) -> bool:
        """Whether an estimate at ``now`` would be computed afresh (for the ticker)."""
        last = self._estimate
        return last is None or not 0 <= now - last[0] < self.estimate_every_s

    def estimate(self, now: float) -> Estimate | None:
        """The estimate at ``now``. It is computed at most every ``estimate_every_s`` while
        the run goes (≈ 4 ms for 200 steps, on the loop that also sends); in between, the
        last one is reused with the time since taken off. A wait for a person that begins
        or ends makes a fresh one."""
        if not self.record.steps:
            return None
        since = self.waiting_since if self.record.status.waiting else None
        last = self._estimate
        if (last is not None and not self.ended and not self.estimate_due(now)
                and last[1].waiting_since == iso(since)):
            self.estimate_stale = True
            return last[1].later(now - last[0])
        fresh = estimate(self.record, self.max_parallel, self.durations, now, since)
        self._estimate, self.estimate_stale = (now, fresh), False
        return fresh

    def _stop_waiting(self, step: StepRecord) -> None:
        if step.note is not None:
            self._changing(step).note = None
        self.waiting.pop(step.id, None)

    def _step_draft(self, step: StepRecord, now: float, impact: Impact | None = None) -> Draft:
        error = step.error
        shown = error is not None and step.status in (StepStatus.FAILED, StepStatus.RETRYING)
        return self._draft(
            STEP_TYPES[step.status], now, step_id=step.id, status=str(step.status),
            attempt=step.attempts or None,
            duration_s=step.duration_s if step.status.finished else None,
            summary=self.summaries.get(step.id),
            error=ErrorInfo(category=str(error.category), message=error.message,
                            hint=error.hint) if shown and error is not None else None,
            impact=impact, resources=step.resources if step.status.finished else None)

    def _draft(self, kind: MessageType, now: float, **fields: Any) -> Draft:
        return Draft(type=kind, progress=self.record.progress(), estimate=self.estimate(now),
                     ts=iso(now) or "", **fields)

    # Saving and loading --------------------------------------------------------------

    def to_json(self) -> str:
        """The view as :class:`SavedView` JSON: the run's part made now, each step's as it
        was last made unless the step changed (:class:`StepsSaved`; nothing is kept once
        the run has ended)."""
        r = self.record
        head = SavedView(
            run_id=r.run_id, plan=r.plan, status=r.status, reason=r.reason,
            started_at=r.started_at, ended_at=r.ended_at, prefect_url=r.flow_run_url,
            rolled_back=r.rolled_back, max_parallel=self.max_parallel,
            recoveries=self.recoveries, retries=self.retries, gate=self.gate,
            pause_deadline=self.pause_deadline, waiting_since=self.waiting_since,
            process=self.process, step_n=self.step_n, summaries=self.summaries,
            waiting=self.waiting, told=self.told,
        ).model_dump_json(fallback=str)
        assert head.endswith(EMPTY_STEPS), "SavedView's last field is its steps"
        steps = ",".join(self.saved_steps.json(s) for s in r.steps.values())
        self._fresh.clear()  # saved as they are: a later change copies them first
        if self.ended:
            self.saved_steps.clear()
        return f"{head[:-len(EMPTY_STEPS)]}\"steps\":[{steps}]}}"

    @classmethod
    def from_json(cls, text: str) -> RunView:
        """A saved view; :class:`~planrun.errors.ContractError` when ``text`` is not one."""
        saved = SavedView.read_json(text)
        steps = {}
        for s in saved.steps:
            steps[s.id] = step = StepRecord(id=s.id, tool=s.tool, name=s.name,
                                            needs=list(s.needs), critical=s.critical,
                                            estimate_s=s.estimate_s)
            step.restore(s)
            step.note = s.note
        record = RunRecord(run_id=saved.run_id, plan=saved.plan, steps=steps,
                           status=saved.status, started_at=saved.started_at,
                           ended_at=saved.ended_at, reason=saved.reason,
                           flow_run_url=saved.prefect_url, rolled_back=saved.rolled_back)
        return cls(record, max_parallel=saved.max_parallel, step_n=saved.step_n,
                   summaries=saved.summaries, recoveries=saved.recoveries,
                   retries=saved.retries, gate=saved.gate,
                   pause_deadline=saved.pause_deadline, waiting=saved.waiting,
                   told=saved.told, waiting_since=saved.waiting_since, process=saved.process)


def _error(info: ErrorInfo | None) -> Any:
    if info is None:
        return None
    try:
        return step_error(info.category, info.message, hint=info.hint, details=info.details)
    except ValueError:  # a category this planrun does not know
        return step_error("logic", info.message, hint=info.hint)

