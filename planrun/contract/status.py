"""The statuses of a step and of a run, and what each says (docs/run-report.md).

Each predicate is defined here once: ``StepStatus.finished``, ``RunStatus.ended``,
``RunStatus.exit_code``. Every layer asks these instead of keeping its own set.
"""

from __future__ import annotations

from enum import StrEnum


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
        """The step will not change again in this run (completed, failed, skipped,
        cancelled)."""
        return self in FINISHED_STEP

    @property
    def active(self) -> bool:
        """The step holds a slot now: it runs, waits to retry, or waits at its gate."""
        return self in ACTIVE_STEP

    @property
    def kept(self) -> bool:
        """A later process of the run restores the step instead of running it again; a
        cancelled step ran only partly and must run again."""
        return self in KEPT_STEP


FINISHED_STEP = frozenset({StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.SKIPPED,
                           StepStatus.CANCELLED})
ACTIVE_STEP = frozenset({StepStatus.RUNNING, StepStatus.RETRYING,
                         StepStatus.AWAITING_APPROVAL})
KEPT_STEP = frozenset({StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.SKIPPED})


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
    def ended(self) -> bool:
        """The run is over: one of the four end statuses."""
        return self in ENDED_RUN

    @property
    def waiting(self) -> bool:
        """The run waits for a person: paused, or at an approval gate."""
        return self in (RunStatus.PAUSED, RunStatus.AWAITING_APPROVAL)

    @property
    def holds_process(self) -> bool:
        """A process runs the run now (a paused run, or one waiting at a gate, holds none)."""
        return self in (RunStatus.PENDING, RunStatus.RUNNING)

    @property
    def exit_code(self) -> int:
        """The exit code of ``planrun run`` for a run that ended in this status."""
        return EXIT_CODES.get(self, 1)


ENDED_RUN = frozenset({RunStatus.COMPLETED, RunStatus.COMPLETED_WITH_ERRORS, RunStatus.FAILED,
                       RunStatus.CANCELLED})
EXIT_CODES = {RunStatus.COMPLETED: 0, RunStatus.COMPLETED_WITH_ERRORS: 3,
              RunStatus.FAILED: 1, RunStatus.CANCELLED: 4}
