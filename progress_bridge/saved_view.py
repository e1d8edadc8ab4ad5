"""A run view as the bridge's store keeps it: the contract's versioned JSON
(:class:`SavedView`, one :class:`SavedStep` per step), written with every change so that a
restarted bridge goes on from where it stopped (docs/stream.md). The gate a run waits at
and its pause deadline are models of their own, which the live view
(``progress_bridge/runs.py``) holds as they are saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from planrun.contract.checkpoint import StepCheckpoint
from planrun.contract.events import RunProcess
from planrun.contract.status import RunStatus
from planrun.contract.version import Versioned

if TYPE_CHECKING:
    from planrun.report import StepRecord


class Gate(BaseModel):
    """The gate a run waits at: its step, the prompt, and when it times out (epoch s)."""

    step_id: str
    prompt: str | None = None
    deadline: float | None = None


class PauseDeadline(BaseModel):
    """When a pause times out (epoch s) and what then happens."""

    deadline: float
    action: Literal["cancel", "resume"] = "cancel"


class SavedStep(StepCheckpoint):
    """One step of a saved view: the plan's step and its checkpoint."""

    id: str
    tool: str
    name: str | None = None
    needs: list[str] = []
    critical: bool = True
    estimate_s: float = 0.0
    note: str | None = None


class SavedView(Versioned):
    """A run view as the bridge's store keeps it."""

    run_id: str
    plan: str
    status: RunStatus
    reason: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    prefect_url: str | None = None
    rolled_back: list[str] = []
    max_parallel: int = 16
    recoveries: int = 0
    retries: int = 0
    gate: Gate | None = None
    pause_deadline: PauseDeadline | None = None
    waiting_since: float | None = None
    process: RunProcess | None = None
    step_n: dict[str, int] = {}
    summaries: dict[str, str | None] = {}
    waiting: dict[str, str] = {}
    told: dict[str, tuple[int, int]] = {}
    steps: list[SavedStep] = []


class StepsSaved:
    """Each step's saved JSON, made again only for a step that changed.

    A view is saved with every event; made whole, the steps of a 200-step run were over
    half of handling an event under 1,000 clients (BENCHMARKS.md, "fan-out"), and a run's
    saving grew with the square of its steps. A step's JSON is kept with the step it was
    made from and reused while a view holds that very step: the views of one run share
    this, and a step once saved is never changed in place (a view copies a step before it
    changes it for the first time since it was copied or saved: ``RunView._changing``).
    """

    def __init__(self) -> None:
        self._made: dict[str, tuple[StepRecord, str]] = {}

    def __len__(self) -> int:
        return len(self._made)

    def clear(self) -> None:
        """Keep nothing (a run that ended: the bridge keeps every run's view, and an
        ended run's steps rarely change again)."""
        self._made.clear()

    def json(self, step: StepRecord) -> str:
        made = self._made.get(step.id)
        if made is not None and made[0] is step:
            return made[1]
        text = SavedStep(id=step.id, tool=step.tool, name=step.name, needs=step.needs,
                         critical=step.critical, estimate_s=step.estimate_s, note=step.note,
                         **dict(step.to_checkpoint())).model_dump_json(fallback=str)
        self._made[step.id] = (step, text)
        return text
