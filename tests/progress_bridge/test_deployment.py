"""What the bridge's submit does at Prefect (progress_bridge/deployment.py), against the
session's real Prefect server: a run of the deployment with the plan as its parameter,
still after the deployment was registered anew, and Prefect's own answer when no runner
has registered it. The deployment here has a name of its own, so that no runner of a
stack on the same server takes its runs: they stay Scheduled, to be read."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from uuid import UUID

import httpx
import pytest

from planrun.flows.plan_flow import plan_flow
from planrun.progress_bridge.deployment import PlanDeployment

PLAN = {"version": 1, "name": "deployed", "steps": [{"id": "s1", "tool": "core.echo",
                                                     "with": {"value": 1}}]}


async def register(name: str) -> UUID:
    deployment = await plan_flow.ato_deployment(name=name, tags=["planrun"])
    deployment.work_pool_name = None
    deployment.work_queue_name = None
    deployment_id: UUID = await deployment.aapply()
    return deployment_id


async def read_run(run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(UUID(run_id))


async def delete_deployment(deployment_id: UUID) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        await client.delete_deployment(deployment_id)


def test_a_submit_schedules_a_run_of_the_deployment_with_the_plan() -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[UUID, Any, Any]:
        deployment_id = await register(name)
        async with PlanDeployment(f"planrun/{name}") as deployment:
            first = await read_run(await deployment(PLAN, {}))
            second = await read_run(await deployment(PLAN, {}))
        await delete_deployment(deployment_id)
        return deployment_id, first, second

    deployment_id, first, second = asyncio.run(scenario())
    for flow_run in (first, second):
        assert flow_run.deployment_id == deployment_id
        assert flow_run.state.is_scheduled()
        assert flow_run.parameters == {"plan": PLAN, "inputs": {}}
        assert flow_run.name == "deployed"
        assert set(flow_run.tags) == {"planrun", "plan:deployed"}
    assert first.id != second.id


def test_a_deployment_registered_anew_still_gets_the_submitted_runs() -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[UUID, UUID, Any, Any]:
        old = await register(name)
        async with PlanDeployment(f"planrun/{name}") as deployment:
            before = await read_run(await deployment(PLAN, {}))
            await delete_deployment(old)
            new = await register(name)
            after = await read_run(await deployment(PLAN, {}))
        await delete_deployment(new)
        return old, new, before, after

    old, new, before, after = asyncio.run(scenario())
    assert old != new
    assert before.deployment_id == old
    assert after.deployment_id == new


def test_no_deployment_is_prefects_404_for_the_bridge_to_answer_503() -> None:
    async def scenario() -> None:
        async with PlanDeployment(f"planrun/never-{uuid.uuid4().hex[:8]}") as deployment:
            await deployment(PLAN, {})

    with pytest.raises(httpx.HTTPStatusError) as raised:
        asyncio.run(scenario())
    assert raised.value.response.status_code == 404


def test_a_deployment_outside_its_context_says_so() -> None:
    with pytest.raises(RuntimeError, match="outside its `async with`"):
        asyncio.run(PlanDeployment()(PLAN, {}))


class Counted(PlanDeployment):
    """Counts the creates under way at once."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.now = 0
        self.most = 0

    async def _create(self, client: Any, plan: dict[str, Any], params: dict[str, Any]) -> UUID:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.01)  # room for another submit to begin
            return await super()._create(client, plan, params)
        finally:
            self.now -= 1


def test_submits_at_once_are_created_one_after_another() -> None:
    """Ten creates at once on the SQLite server took 6.8 s (its lock), one after another
    0.3 s (BENCHMARKS.md)."""
    name = f"test-{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[Counted, list[Any], UUID]:
        deployment_id = await register(name)
        async with Counted(f"planrun/{name}") as deployment:
            run_ids = await asyncio.gather(*(deployment(PLAN, {}) for _ in range(10)))
            runs = [await read_run(run_id) for run_id in run_ids]
        await delete_deployment(deployment_id)
        return deployment, runs, deployment_id

    deployment, runs, deployment_id = asyncio.run(scenario())
    assert deployment.most == 1
    assert len({run.id for run in runs}) == 10
    assert all(run.deployment_id == deployment_id for run in runs)
