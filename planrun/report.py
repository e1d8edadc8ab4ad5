"""Run and step records, their statuses, and the run report of SPEC §4."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol
from uuid import UUID

from planrun.errors import StepError
from planrun.redact import Redactor


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    AWAITING_APPROVAL = "awaiting_approval"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STEP


FINISHED_STEP = frozenset({StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.SKIPPED,
                           StepStatus.CANCELLED})


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    AWAITING_APPROVAL = "awaiting_approval"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def exit_code(self) -> int:
        """The exit code of ``planrun run`` for a run that ended in this status."""
        return EXIT_CODES.get(self, 1)


EXIT_CODES = {RunStatus.COMPLETED: 0, RunStatus.COMPLETED_WITH_ERRORS: 3,
              RunStatus.FAILED: 1, RunStatus.CANCELLED: 4}


def iso(ts: float | None) -> str | None:
    """ISO 8601 in UTC with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch(stamp: Any) -> float | None:
    """Epoch seconds of an ISO 8601 time as ``iso`` writes it; None for none or garbage."""
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


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

    @property
    def duration_s(self) -> float | None:
        return _duration(self.started_at, self.ended_at, time.time())

    def template_view(self) -> dict[str, Any]:
        """What templates see as ``steps.<id>``."""
        return {"status": str(self.status), "output": self.output, "attempts": self.attempts,
                "error": self.error.to_report() if self.error else None,
                "reason": self.reason, "fallback_used": self.fallback_used}

    def to_report(self, now: float | None = None) -> dict[str, Any]:
        """The step's part of the run report; an unfinished step's duration runs to ``now``."""
        return {
            "status": str(self.status), "tool": self.tool, "attempts": self.attempts,
            "started_at": iso(self.started_at), "ended_at": iso(self.ended_at),
            "duration_s": _duration(self.started_at, self.ended_at, now or time.time()),
            "input": self.input, "output": self.output,
            "fallback_used": self.fallback_used,
            "error": self.error.to_report() if self.error else None, "reason": self.reason,
        }


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

    def progress(self) -> dict[str, Any]:
        done = sum(1 for s in self.steps.values() if s.status.finished)
        total = len(self.steps)
        return {"done": done, "total": total,
                "percent": round(100.0 * done / total, 1) if total else 100.0}

    def final_status(self, *, cancelled: bool = False, deadline_passed: bool = False) -> RunStatus:
        """The end status of SPEC §3 from the steps' outcomes."""
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
        return self.redactor.mask({
            "run_id": self.run_id, "plan": self.plan, "status": str(self.status),
            "reason": self.reason, "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "duration_s": _duration(self.started_at, self.ended_at, now),
            "progress": self.progress(), "prefect_url": self.flow_run_url,
            "rolled_back": self.rolled_back,
            "steps": {sid: s.to_report(now) for sid, s in self.steps.items()},
        })


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
