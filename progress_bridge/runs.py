"""The bridge's view of one run, built from planrun's and Prefect's events.

``RunView.apply`` takes one event (its name and payload) and returns the messages it makes
(SPEC §6), each with the run's progress and a fresh estimate. Events are applied at most
once (the upstream checks their ids) and an event older than what a step already shows
(``payload.n`` counts a run's events) is dropped, so an event that arrives late, after a
reconnect, cannot take a step back. The view is saved as JSON with every change, so a
restarted bridge goes on from where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from planrun.errors import StepError, step_error
from planrun.report import (
    FINISHED_STEP,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
    epoch,
)
from progress_bridge import messages as m
from progress_bridge.estimate import StepDurations, estimate

STEP_TYPES = {
    StepStatus.RUNNING: m.MessageType.STEP_RUNNING,
    StepStatus.RETRYING: m.MessageType.STEP_RETRYING,
    StepStatus.COMPLETED: m.MessageType.STEP_COMPLETED,
    StepStatus.FAILED: m.MessageType.STEP_FAILED,
    StepStatus.SKIPPED: m.MessageType.STEP_SKIPPED,
    # SPEC §6 has no step.cancelled: a cancelled step ended without success, and its
    # ``status`` says "cancelled".
    StepStatus.CANCELLED: m.MessageType.STEP_FAILED,
    StepStatus.AWAITING_APPROVAL: m.MessageType.STEP_AWAITING_APPROVAL,
}
ENDED = frozenset({RunStatus.COMPLETED, RunStatus.COMPLETED_WITH_ERRORS, RunStatus.FAILED,
                   RunStatus.CANCELLED})
#: The shortest time between two computed estimates of one run.
ESTIMATE_EVERY_S = 0.25
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
    _estimate: tuple[float, m.Estimate] | None = field(default=None, repr=False)
    #: A message went out with an estimate reused from before its change.
    estimate_stale: bool = False
    #: How many times the bridge has scheduled this run again after a crash.
    recoveries: int = 0
    #: The gate the run waits at: step_id, prompt and deadline (epoch s, or None).
    gate: dict[str, Any] | None = None
    #: When a pause times out (epoch s) and what then happens (cancel or resume).
    pause_deadline: dict[str, Any] | None = None

    @property
    def ended(self) -> bool:
        return self.record.status in ENDED

    @property
    def pending(self) -> bool:
        """Submitted, or known from Prefect, but not announced by its engine yet."""
        return self.record.status == RunStatus.PENDING

    @property
    def running(self) -> bool:
        return any(s.status in (StepStatus.RUNNING, StepStatus.RETRYING)
                   for s in self.record.steps.values())

    @classmethod
    def started(cls, run_id: str, payload: Mapping[str, Any]) -> tuple[RunView, list[m.Draft]]:
        """The view of a run from its ``planrun.run.started`` event, and its first message."""
        steps = {}
        for s in payload.get("steps", []):
            steps[s["id"]] = StepRecord(id=s["id"], tool=s["tool"], name=s.get("name"),
                                        needs=list(s.get("needs", [])),
                                        critical=bool(s.get("critical", True)),
                                        estimate_s=float(s.get("estimate_s") or 0.0))
        record = RunRecord(run_id=run_id, plan=str(payload.get("plan", "")), steps=steps,
                           status=RunStatus.RUNNING,
                           started_at=epoch(payload.get("started_at")) or time.time(),
                           flow_run_url=payload.get("prefect_url"))
        view = cls(record, max_parallel=int(payload.get("max_parallel") or 16))
        plan = tuple(m.PlanStep(id=s.id, tool=s.tool, name=s.name, needs=tuple(s.needs),
                                critical=s.critical, estimate_s=s.estimate_s)
                     for s in steps.values())
        return view, [view._draft(m.MessageType.RUN_STARTED, status=str(record.status),
                                  summary=record.plan, plan=plan)]

    @classmethod
    def unstarted(cls, run_id: str, plan: str = "") -> RunView:
        """A run Prefect knows of whose engine never announced it (it failed first)."""
        return cls(RunRecord(run_id=run_id, plan=plan, steps={}, status=RunStatus.PENDING))

    def step_event(self, payload: Mapping[str, Any]) -> list[m.Draft]:
        """Apply a ``planrun.step.<status>`` event; no message when it is stale."""
        step = self.record.steps.get(str(payload.get("step_id")))
        n = int(payload.get("n", 0))
        if step is None or n <= self.step_n.get(step.id, 0):
            return []
        self.step_n[step.id] = n
        step.status = StepStatus(payload["status"])
        step.attempts = int(payload.get("attempt") or step.attempts)
        step.started_at = epoch(payload.get("started_at")) or step.started_at
        step.ended_at = epoch(payload.get("ended_at"))
        step.error = _error(payload.get("error"))
        step.reason = payload.get("reason")
        step.fallback_used = bool(payload.get("fallback_used"))
        step.retry_delay_s = payload.get("retry_delay_s")
        if "input" in payload and payload["input"] is not None:
            step.input = payload["input"]
        if "output" in payload:
            step.output = payload["output"]
        self.summaries[step.id] = payload.get("summary")
        impact = payload.get("impact")
        return [self._step_draft(step, impact=m.Impact(
            skipped=tuple(impact.get("skipped", ())), run_fails=bool(impact.get("run_fails")))
            if impact else None)]

    def run_ended(self, payload: Mapping[str, Any]) -> list[m.Draft]:
        """Apply a ``planrun.run.<status>`` event."""
        if self.ended:
            return []
        record = self.record
        record.status = RunStatus(payload["status"])
        record.reason = payload.get("reason")
        record.ended_at = epoch(payload.get("ended_at")) or time.time()
        record.rolled_back = list(payload.get("rolled_back") or [])
        return [self._draft(m.MessageType(f"run.{record.status}"), status=str(record.status),
                            summary=record.reason)]

    def paused(self, payload: Mapping[str, Any]) -> list[m.Draft]:
        """Apply ``planrun.run.paused``: what ran has finished; the rest waits."""
        if self.ended:
            return []
        self.record.status = RunStatus.PAUSED
        self.record.reason = payload.get("reason")
        timeout = payload.get("timeout_s")
        self.pause_deadline = ({"deadline": time.time() + float(timeout),
                                "action": payload.get("on_timeout") or "cancel"}
                               if timeout else None)
        return [self._draft(m.MessageType.RUN_PAUSED, status=str(RunStatus.PAUSED),
                            summary=self.record.reason)]

    def awaiting_approval(self, payload: Mapping[str, Any]) -> list[m.Draft]:
        """Apply ``planrun.run.awaiting_approval``: the run waits at a step's gate."""
        if self.ended:
            return []
        timeout = payload.get("timeout_s")
        self.gate = {"step_id": payload.get("step_id"), "prompt": payload.get("prompt"),
                     "deadline": time.time() + float(timeout) if timeout else None}
        self.record.status = RunStatus.AWAITING_APPROVAL
        self.record.reason = f"awaiting approval of {payload.get('step_id')}"
        return [self._draft(m.MessageType.RUN_AWAITING_APPROVAL,
                            status=str(RunStatus.AWAITING_APPROVAL),
                            step_id=payload.get("step_id"), summary=payload.get("prompt"))]

    def resumed(self, payload: Mapping[str, Any]) -> list[m.Draft]:
        """Apply ``planrun.run.resumed``: the run goes on in a new process."""
        if self.ended:
            return []
        self.record.status, self.record.reason, self.gate = RunStatus.RUNNING, None, None
        self.pause_deadline = None
        restored = payload.get("restored") or []
        return [self._draft(m.MessageType.RUN_RESUMED, status=str(RunStatus.RUNNING),
                            summary=f"{len(restored)} finished step(s) kept")]

    def flow_run_ended(self, state_type: str, message: str | None) -> list[m.Draft]:
        """End a run whose flow run ended without planrun's own end event (its process
        crashed or was killed, or Prefect cancelled it): what still runs is cancelled,
        what waits is skipped."""
        status = FLOW_RUN_ENDS.get(state_type)
        if self.ended or status is None:
            return []
        now = time.time()
        why = f"the run's flow run ended {state_type.lower()}" + (f": {message}" if message
                                                                   else "")
        drafts = []
        for step in self.record.steps.values():
            if step.status in FINISHED_STEP:
                continue
            step.status = (StepStatus.CANCELLED if step.started_at is not None
                           else StepStatus.SKIPPED)
            step.ended_at, step.reason = now, why
            self.summaries[step.id] = why
            drafts.append(self._step_draft(step))
        if status == RunStatus.COMPLETED and drafts:
            status = RunStatus.FAILED
        self.record.status, self.record.reason, self.record.ended_at = status, why, now
        drafts.append(self._draft(m.MessageType(f"run.{status}"), status=str(status),
                                  summary=why))
        return drafts

    def tick(self) -> list[m.Draft]:
        """A ``progress`` message with a fresh estimate (sent while a step runs)."""
        return [self._draft(m.MessageType.PROGRESS, status=str(self.record.status))]

    def report(self, now: float | None = None) -> dict[str, Any]:
        """The run report (docs/run-report.md) as of ``now``, with ``progress`` and
        ``estimate``."""
        report = self.record.to_report(now)
        for sid, summary in self.summaries.items():
            report["steps"][sid]["summary"] = summary
        found = self.estimate()
        report["estimate"] = asdict(found) if found is not None else None
        if self.gate is not None and self.record.status == RunStatus.AWAITING_APPROVAL:
            report["awaiting_approval"] = self.gate  # step_id, prompt, deadline
        return report

    def estimate(self) -> m.Estimate | None:
        """The estimate now. It is computed at most every ``ESTIMATE_EVERY_S`` while the run
        goes (≈ 4 ms for 200 steps, on the loop that also sends); in between, the last one
        is reused with the time since taken off."""
        if not self.record.steps:
            return None
        now = time.time()
        last = self._estimate
        if last is not None and not self.ended and now - last[0] < ESTIMATE_EVERY_S:
            self.estimate_stale = True
            gone = now - last[0]
            e = last[1]
            return m.Estimate(remaining_s=round(max(0.0, e.remaining_s - gone), 3),
                              low_s=round(max(0.0, e.low_s - gone), 3),
                              high_s=round(max(0.0, e.high_s - gone), 3),
                              finish_at=e.finish_at, early_by_s=e.early_by_s)
        fresh = m.Estimate(**estimate(self.record, self.max_parallel, self.durations,
                                      now).to_message())
        self._estimate, self.estimate_stale = (now, fresh), False
        return fresh

    def _step_draft(self, step: StepRecord, impact: m.Impact | None = None) -> m.Draft:
        error = step.error
        return self._draft(
            STEP_TYPES[step.status], step_id=step.id, status=str(step.status),
            attempt=step.attempts or None,
            duration_s=step.duration_s if step.status.finished else None,
            summary=self.summaries.get(step.id),
            error=m.ErrorInfo(str(error.category), error.message, error.hint)
            if error is not None and step.status in (StepStatus.FAILED, StepStatus.RETRYING)
            else None,
            impact=impact)

    def _draft(self, kind: m.MessageType, **fields: Any) -> m.Draft:
        progress = self.record.progress()
        return m.Draft(type=kind, progress=m.Progress(progress["done"], progress["total"],
                                                      progress["percent"]),
                       estimate=self.estimate(), **fields)

    # Saving and loading --------------------------------------------------------------

    def to_json(self) -> str:
        r = self.record
        return json.dumps({
            "run_id": r.run_id, "plan": r.plan, "status": str(r.status), "reason": r.reason,
            "started_at": r.started_at, "ended_at": r.ended_at, "prefect_url": r.flow_run_url,
            "rolled_back": r.rolled_back, "max_parallel": self.max_parallel,
            "recoveries": self.recoveries, "gate": self.gate,
            "pause_deadline": self.pause_deadline,
            "step_n": self.step_n, "summaries": self.summaries,
            "steps": [{"id": s.id, "tool": s.tool, "name": s.name, "needs": s.needs,
                       "critical": s.critical, "estimate_s": s.estimate_s,
                       "status": str(s.status), "attempts": s.attempts,
                       "started_at": s.started_at, "ended_at": s.ended_at, "input": s.input,
                       "output": s.output,
                       "error": s.error.to_report() if s.error else None, "reason": s.reason,
                       "fallback_used": s.fallback_used} for s in r.steps.values()],
        }, default=str)

    @classmethod
    def from_json(cls, text: str) -> RunView:
        data = json.loads(text)
        steps = {}
        for s in data["steps"]:
            steps[s["id"]] = StepRecord(
                id=s["id"], tool=s["tool"], name=s["name"], needs=s["needs"],
                critical=s["critical"], estimate_s=s["estimate_s"],
                status=StepStatus(s["status"]), attempts=s["attempts"],
                started_at=s["started_at"], ended_at=s["ended_at"], input=s["input"],
                output=s["output"], error=_error(s["error"]), reason=s["reason"],
                fallback_used=s["fallback_used"])
        record = RunRecord(run_id=data["run_id"], plan=data["plan"], steps=steps,
                           status=RunStatus(data["status"]), started_at=data["started_at"],
                           ended_at=data["ended_at"], reason=data["reason"],
                           flow_run_url=data["prefect_url"], rolled_back=data["rolled_back"])
        return cls(record, max_parallel=data["max_parallel"], step_n=data["step_n"],
                   summaries=data["summaries"], recoveries=data.get("recoveries", 0),
                   gate=data.get("gate"), pause_deadline=data.get("pause_deadline"))



def _error(data: Any) -> StepError | None:
    if not isinstance(data, Mapping):
        return None
    try:
        return step_error(data.get("category", "logic"), str(data.get("message", "")),
                          hint=data.get("hint"), details=data.get("details"))
    except (ValueError, TypeError):
        return step_error("logic", str(data.get("message", "")), hint=data.get("hint"))
