"""A run view as the bridge's store keeps it: the contract's versioned JSON
(:class:`SavedView`, one :class:`SavedStep` per step), written with every change so that a
restarted bridge goes on from where it stopped (docs/stream.md). The gate a run waits at
and its pause deadline are models of their own, which the live view
(``progress_bridge/runs.py``) holds as they are saved.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from planrun.contract.checkpoint import StepCheckpoint
from planrun.contract.events import RunProcess
from planrun.contract.status import RunStatus
from planrun.contract.version import Versioned


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
