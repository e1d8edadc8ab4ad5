"""What a run leaves in the Prefect UI besides its task runs: a progress artifact kept up to
date while it runs, and a table of its steps when it ends.

Updates go out from a background task at most every ``interval`` seconds, never on a
step's own path; a failing artifact call is logged and never fails the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from planrun.contract.records import Resources
from planrun.durations import format_duration
from planrun.report import RunRecord
from planrun.sizes import format_bytes

log = logging.getLogger("planrun.artifacts")


def artifact_key(plan: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "planrun-" + "".join(c if c.isalnum() else "-" for c in plan.lower())


def step_rows(run: RunRecord) -> list[dict[str, Any]]:
    """The table artifact: one row per step, in plan order."""
    rows = []
    for step in run.steps.values():
        error = step.error
        duration = step.duration_s
        rows.append({
            "step": step.id, "tool": step.tool, "status": str(step.status),
            "attempts": step.attempts,
            "duration": format_duration(duration) if duration is not None else "",
            **_resource_columns(step.resources),
            "error": f"{error.category}: {error.message}" if error else "",
            "hint": error.hint if error else "",
            "note": step.reason or ("completed by its fallback" if step.fallback_used else ""),
        })
    masked: list[dict[str, Any]] = run.redactor.mask(rows)  # docs/secrets.md
    return masked


def _resource_columns(used: Resources | None) -> dict[str, str]:
    """What the step used (docs/resources.md); empty where nothing was measured."""
    if used is None:
        return {"memory": "", "cpu": "", "written": ""}
    return {"memory": format_bytes(used.peak_memory_bytes), "cpu": f"{used.cpu_s:.2f} s",
            "written": format_bytes(used.written_bytes)}


class RunArtifacts:
    """Keeps one run's progress artifact current and writes its steps table at the end."""

    def __init__(self, run: RunRecord, interval: float = 0.5) -> None:
        self.run = run
        self.interval = interval
        self.dirty = asyncio.Event()
        self.closing = asyncio.Event()
        self.artifact_id: UUID | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._keep_up())

    def changed(self) -> None:
        self.dirty.set()

    async def finish(self) -> None:
        """Stop the updates, set the final progress and write the steps table."""
        if self.task is not None:  # let an update in flight finish: it may create the artifact
            self.closing.set()
            self.dirty.set()
            await self.task
        with _logged("final progress"):
            await self._update()
        with _logged("steps table"):
            await acreate_table_artifact(
                step_rows(self.run), key=artifact_key(self.run.plan),
                description=self.run.redactor.text(
                    f"{self.run.plan}: {self.run.status}"
                    + (f" ({self.run.reason})" if self.run.reason else "")))

    async def _keep_up(self) -> None:
        while not self.closing.is_set():
            await self.dirty.wait()
            self.dirty.clear()
            if self.closing.is_set():
                return
            with _logged("progress"):
                await self._update()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), self.interval)

    async def _update(self) -> None:
        percent = self.run.progress().percent
        if self.artifact_id is None:
            created = await acreate_progress_artifact(
                percent, description=f"steps of {self.run.plan} finished")
            self.artifact_id = created
        else:
            await aupdate_progress_artifact(self.artifact_id, percent)


@contextlib.contextmanager
def _logged(what: str) -> Any:
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - artifacts are a view; the run goes on
        log.warning("could not write the %s artifact: %s", what, exc)
