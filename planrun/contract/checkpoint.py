"""What one process of a run keeps for the next (docs/run-report.md, "Checkpoints"):
a finished step's record, the run's start count, a gate's latest asking."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from planrun.contract.records import ErrorInfo, Resources
from planrun.contract.status import StepStatus
from planrun.contract.version import Versioned


class StepCheckpoint(Versioned):
    """A finished step as a later process of the run restores it.

    ``error_caused_skip``: the skip counts as an error of the run. ``task_run_id``: the
    Prefect task run that ran the step, named as an input by the steps that need it.
    """

    status: StepStatus
    attempts: int = 0
    started_at: str | None = None
    ended_at: str | None = None
    input: Any = None
    output: Any = None
    error: ErrorInfo | None = None
    reason: str | None = None
    fallback_used: bool = False
    error_caused_skip: bool = False
    task_run_id: UUID | None = None
    resources: Resources | None = None
    #: The retry of the run that kept it (0: before any retry). A retry restores the
    #: completed steps of every earlier try, and the others only from its own.
    retry: int = 0


class RunCheckpoint(Versioned):
    """How many times the run's flow body has started (1 on the first), whether the run
    had ended when it last stopped, how many retries it has had, and the retry request
    (``planrun.retry`` label) it took last: a start after an end is a retry only under a
    request not taken yet."""

    segment: int
    ended: bool = False
    retry: int = 0
    request: str | None = None


class GateCheckpoint(Versioned):
    """The nonce of a step's gate as last asked (docs/approvals.md)."""

    nonce: str
