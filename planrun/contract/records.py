"""The run report and its parts, as ``planrun run`` prints it and the bridge serves it
(docs/run-report.md): the error of a step, the progress of a run, a step's entry, the run.

``Progress.of`` is the one place the percentage is computed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from planrun.contract.status import RunStatus, StepStatus


def absent(value: Any) -> bool:
    """Whether an optional key is left out of the JSON: it is only written when known."""
    return value is None


class ErrorInfo(BaseModel):
    """Why a step's attempt failed: the error category, the message, a hint for a person,
    and the tool's ``details`` when it gave some (never in stream messages)."""

    model_config = ConfigDict(frozen=True)

    category: str
    message: str
    hint: str | None = None
    details: dict[str, Any] | None = Field(default=None, exclude_if=absent)


class Progress(BaseModel):
    """``done`` counts steps finished in any state, so a finished run is at 100 %."""

    model_config = ConfigDict(frozen=True)

    done: int
    total: int
    percent: float

    @classmethod
    def of(cls, done: int, total: int) -> Progress:
        """``done`` of ``total`` steps; ``percent`` to one decimal (100 for no steps)."""
        return cls(done=done, total=total,
                   percent=round(100.0 * done / total, 1) if total else 100.0)


class Resources(BaseModel):
    """What one step used (docs/resources.md): the peak memory of its process tree (its own
    process for an in-process tool), CPU seconds (user + system) and bytes it wrote."""

    model_config = ConfigDict(frozen=True)

    peak_memory_bytes: int = 0
    cpu_s: float = 0.0
    written_bytes: int = 0


class StepReport(BaseModel):
    """One step's entry in the run report. ``note``: why a pending step waits (a slot, a
    rate limit, load); ``resources``: what a finished step used."""

    status: StepStatus
    tool: str
    attempts: int = 0
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    input: Any = None
    output: Any = None
    fallback_used: bool = False
    error: ErrorInfo | None = None
    reason: str | None = None
    note: str | None = Field(default=None, exclude_if=absent)
    resources: Resources | None = Field(default=None, exclude_if=absent)


class RunReport(BaseModel):
    """The run report: the run's status and times, its progress, and every step in plan
    order; a running run's durations all run to one instant."""

    run_id: str
    plan: str
    status: RunStatus
    reason: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    progress: Progress
    prefect_url: str | None = None
    rolled_back: list[str] = []
    steps: dict[str, StepReport] = {}
