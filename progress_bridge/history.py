"""Past step durations, read from Prefect's own history of task runs, for the estimates.

A step's task run is named by the step id and tagged ``plan:<plan>`` and ``tool:<tool>``;
its duration is the wall time from its first start to its end (retries and their delays
included, as a person waits for them). Only runs that really completed count: a skipped
step's task run is Completed too, but its state is named ``Skipped``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from planrun.errors import PlanrunError
from planrun.progress_bridge.estimate import durations_from

log = logging.getLogger("planrun.bridge")

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

    from planrun.progress_bridge.runs import RunView
    from planrun.progress_bridge.timers import Later

#: Past durations read per step (and per tool, for a step with none), newest first.
PER_STEP = 20
#: Requests to Prefect's API at once.
CONCURRENCY = 8
#: How long one reading of a plan's history serves its runs: each run adds to it.
KEEP_S = 60.0


class HistoryReader:
    """Reads the step history of each plan once (for ``KEEP_S``) and hands the durations
    to every view of that plan."""

    def __init__(self, views: dict[str, RunView], later: Later, *, enabled: bool) -> None:
        self.views = views
        self.later = later
        self.enabled = enabled
        self._plans: set[str] = set()

    def fetch(self, view: RunView) -> None:
        """Read the history of ``view``'s plan, unless it was read lately."""
        plan = view.record.plan
        if not self.enabled or plan in self._plans:
            return
        self._plans.add(plan)
        self.later.soon(0, lambda: self._read(view))

    async def _read(self, view: RunView) -> None:
        from prefect.client.orchestration import get_client

        plan = view.record.plan
        if view.ended:  # a run seen only in hindsight needs no estimate
            self._plans.discard(plan)
            return
        tools = {sid: s.tool for sid, s in view.record.steps.items()}
        try:
            async with get_client() as client:
                durations = durations_from(await step_history(client, plan, tools))
        except Exception as exc:  # noqa: BLE001 - estimates fall back to first estimates
            log.warning("no step history for plan %s: %s", plan, exc)
            durations = {}
        for other in list(self.views.values()):
            if other.record.plan == plan:
                other.durations = durations
        self.later.soon(KEEP_S, self._forget(plan))

    def _forget(self, plan: str) -> Any:
        async def forget() -> None:
            self._plans.discard(plan)
        return forget


async def step_history(client: PrefectClient, plan: str, tools: Mapping[str, str],
                       limit: int = PER_STEP, by_tool: bool = True) -> dict[str, list[float]]:
    """Durations in seconds of past completed task runs of each step of ``plan``, newest
    first: ``tools`` maps step id -> tool. With ``by_tool``, a step without history of its
    own gets the durations of the same tool in any plan. No history, no entry.

    Raises PlanrunError when Prefect's API cannot be read.
    """
    try:
        return await _step_history(client, plan, tools, limit, by_tool)
    except (httpx.HTTPError, OSError) as exc:
        raise PlanrunError(f"cannot read the step history of plan {plan} from Prefect: "
                           f"{exc}") from exc


async def _step_history(client: PrefectClient, plan: str, tools: Mapping[str, str],
                        limit: int, by_tool: bool) -> dict[str, list[float]]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def read(name: str | None, tags: list[str]) -> list[float]:
        async with gate:
            return await _durations(client, name, tags, limit)

    steps = await asyncio.gather(*(read(sid, ["planrun", f"plan:{plan}", f"tool:{tool}"])
                                   for sid, tool in tools.items()))
    history = {sid: found for sid, found in zip(tools, steps, strict=True) if found}
    missing = {tools[sid] for sid in tools if sid not in history} if by_tool else set()
    of_tool = dict(zip(missing, await asyncio.gather(
        *(read(None, ["planrun", f"tool:{tool}"]) for tool in missing)), strict=True))
    for sid, tool in tools.items():
        if sid not in history and of_tool.get(tool):
            history[sid] = of_tool[tool]
    return history


async def _durations(client: PrefectClient, name: str | None, tags: list[str],
                     limit: int) -> list[float]:
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterState,
        TaskRunFilterStateName,
        TaskRunFilterStateType,
        TaskRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import TaskRunSort

    runs = await client.read_task_runs(
        task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(any_=[name]) if name is not None else None,
            tags=TaskRunFilterTags(all_=tags),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.COMPLETED]),
                                     name=TaskRunFilterStateName(any_=["Completed"])),
        ),
        sort=TaskRunSort.END_TIME_DESC, limit=limit,
    )
    return [d for d in (_duration(run) for run in runs) if d is not None]


def _duration(task_run: Any) -> float | None:
    """Wall seconds of a task run, or Prefect's run time when a timestamp is missing."""
    if task_run.start_time is not None and task_run.end_time is not None:
        return float((task_run.end_time - task_run.start_time).total_seconds())
    if task_run.total_run_time:
        return float(task_run.total_run_time.total_seconds())
    return None
