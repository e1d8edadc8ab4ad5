"""Run and step records as the engine keeps them while a run goes, and how each becomes
the contract's data (``planrun.contract``): the run report (docs/run-report.md) and a
step's checkpoint. The statuses and their predicates are the contract's."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from planrun.contract.checkpoint import StepCheckpoint
from planrun.contract.records import ErrorInfo, Progress, Resources, RunReport, StepReport
from planrun.contract.status import RunStatus, StepStatus
from planrun.contract.times import epoch, iso
from planrun.errors import StepError, step_error
from planrun.redact import Redactor

__all__ = ["RunObserver", "RunRecord", "StepRecord", "StepsView"]


@dataclass
class StepRecord:
    """What is known about one step of one run; ``to_report`` is its report entry.

    ``error_caused_skip`` is true for a skip that counts as an error of the run (an
    upstream failure or a rejected approval), false for a skip by a step's own ``when``.
    """

    id: str
    tool: str
    name: str | None = None
    needs: list[str] = field(default_factory=list)
    critical: bool = True
    estimate_s: float = 0.0
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    input: Any = None
    output: Any = None
    error: StepError | None = None
    reason: str | None = None
    fallback_used: bool = False
    error_caused_skip: bool = False
    retry_delay_s: float | None = None
    #: The Prefect task run that ran (or recorded the skip of) this step: what the task runs
    #: of the steps that need it name as their inputs (docs/prefect-ui.md).
    task_run_id: UUID | None = None
    #: Why the step, still pending, waits (a slot, a rate limit, load); cleared as it starts.
    note: str | None = None
    #: What the finished step used (docs/resources.md).
    resources: Resources | None = None

    @property
    def duration_s(self) -> float | None:
        return _duration(self.started_at, self.ended_at, time.time())

    def template_view(self) -> dict[str, Any]:
        """What templates see as ``steps.<id>``."""
        return {"status": str(self.status), "output": self.output, "attempts": self.attempts,
                "error": self.error.to_report() if self.error else None,
                "reason": self.reason, "fallback_used": self.fallback_used}

    def error_info(self) -> ErrorInfo | None:
        """The step's error as the contract writes it."""
        return ErrorInfo.model_validate(self.error.to_report()) if self.error else None

    def to_report(self, now: float | None = None) -> StepReport:
        """The step's part of the run report; an unfinished step's duration runs to ``now``."""
        return StepReport(
            status=self.status, tool=self.tool, attempts=self.attempts,
            started_at=iso(self.started_at), ended_at=iso(self.ended_at),
            duration_s=_duration(self.started_at, self.ended_at, now or time.time()),
            input=self.input, output=self.output, fallback_used=self.fallback_used,
            error=self.error_info(), reason=self.reason, note=self.note,
            resources=self.resources)

    def to_checkpoint(self) -> StepCheckpoint:
        """What a later process of the run restores (``restore``)."""
        return StepCheckpoint(
            status=self.status, attempts=self.attempts, started_at=iso(self.started_at),
            ended_at=iso(self.ended_at), input=self.input, output=self.output,
            error=self.error_info(), reason=self.reason, fallback_used=self.fallback_used,
            error_caused_skip=self.error_caused_skip, task_run_id=self.task_run_id,
            resources=self.resources)

    def restore(self, kept: StepCheckpoint) -> None:
        """Put a checkpoint back on this record."""
        self.status, self.attempts = kept.status, kept.attempts
        self.started_at, self.ended_at = epoch(kept.started_at), epoch(kept.ended_at)
        self.input, self.output = kept.input, kept.output
        self.error = (step_error(kept.error.category, kept.error.message, hint=kept.error.hint,
                                 details=kept.error.details, step_id=self.id, tool=self.tool)
                      if kept.error else None)
        self.reason, self.fallback_used = kept.reason, kept.fallback_used
        self.error_caused_skip, self.task_run_id = kept.error_caused_skip, kept.task_run_id
        self.resources = kept.resources


@dataclass
class RunRecord:
    """One plan run: its steps in plan order and its overall status."""

    run_id: str
    plan: str
    steps: dict[str, StepRecord]
    status: RunStatus = RunStatus.PENDING
    started_at: float | None = None
    ended_at: float | None = None
    reason: str | None = None
    flow_run_url: str | None = None
    rolled_back: list[str] = field(default_factory=list)
    #: The run's secret values (docs/secrets.md): masked in everything made from the record.
    redactor: Redactor = field(default_factory=Redactor, repr=False, compare=False)

    @property
    def duration_s(self) -> float | None:
        return _duration(self.started_at, self.ended_at, time.time())

    def progress(self) -> Progress:
        return Progress.of(sum(1 for s in self.steps.values() if s.status.finished),
                           len(self.steps))

    def final_status(self, *, cancelled: bool = False, deadline_passed: bool = False) -> RunStatus:
        """The end status from the steps' outcomes (docs/plan-format.md)."""
        steps = self.steps.values()
        if cancelled:
            return RunStatus.CANCELLED
        if deadline_passed or any(s.critical and s.status == StepStatus.FAILED for s in steps):
            return RunStatus.FAILED
        if any(s.status in (StepStatus.FAILED, StepStatus.CANCELLED) or s.error_caused_skip
               for s in steps):
            return RunStatus.COMPLETED_WITH_ERRORS
        return RunStatus.COMPLETED

    def to_report(self, now: float | None = None) -> dict[str, Any]:
        """The run report as of ``now`` (default: this instant), one instant for every
        duration in it, so that a report of a running run is consistent with itself; the
        run's secret values are masked in it."""
        now = now or time.time()
        report = RunReport(
            run_id=self.run_id, plan=self.plan, status=self.status, reason=self.reason,
            started_at=iso(self.started_at), ended_at=iso(self.ended_at),
            duration_s=_duration(self.started_at, self.ended_at, now),
            progress=self.progress(), prefect_url=self.flow_run_url,
            rolled_back=self.rolled_back,
            steps={sid: s.to_report(now) for sid, s in self.steps.items()})
        masked: dict[str, Any] = self.redactor.mask(report.model_dump())
        return masked


class StepsView(Mapping[str, dict[str, Any]]):
    """``steps`` as templates see it: each step's view is built only when a template reads it."""

    def __init__(self, steps: dict[str, StepRecord]) -> None:
        self._steps = steps

    def __getitem__(self, step_id: str) -> dict[str, Any]:
        return self._steps[step_id].template_view()

    def __iter__(self) -> Iterator[str]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)


class RunObserver(Protocol):
    """Told about every change of a run: the terminal display, tests, later the bridge."""

    def changed(self, run: RunRecord, step: StepRecord | None) -> None: ...


def _duration(started_at: float | None, ended_at: float | None, now: float) -> float | None:
    """Seconds from start to end, or to ``now`` while unfinished; None before the start."""
    if started_at is None:
        return None
    return round((ended_at or now) - started_at, 3)
