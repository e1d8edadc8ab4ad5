"""Submitted plans started as runs of the ``planrun/plan-runner`` deployment.

What Prefect's ``run_deployment`` does for a run started from outside any flow, with
what it repeats per call kept instead: it opens an API client per call and reads the
deployment by its name each time, 57–71 ms a submit on an idle local server against
23 ms for the create alone (BENCHMARKS.md, "Submit to first step"). Here one client
serves every submit while the bridge runs, and the deployment's id is read once, and
again only if the server no longer knows it (the deployment registered anew).

Runs are created one at a time. On the local SQLite server, ten creates at once took
6.8 s, each waiting on the others' database lock and retrying its 503s; one after another
they took 0.3 s. On PostgreSQL both ways take the same (0.35–0.5 s for ten, 1.5–1.8 s for
fifty): the server is the limit either way (BENCHMARKS.md, "Submit to first step").
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, Any
from uuid import UUID

import httpx

from planrun.contract.control import DEPLOYMENT_PATH
from planrun.prefect_calls import soon_again
from planrun.secrets import forget, stored_inputs

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient


class PlanDeployment:
    """``await deployment(plan, inputs)``: start ``plan`` as a run of the deployment; its
    flow run id. Use it as ``async with`` around the bridge's serving: the API client
    lives that long."""

    def __init__(self, path: str = DEPLOYMENT_PATH) -> None:
        self.path = path
        self._client: PrefectClient | None = None
        self._id: UUID | None = None
        self._one_at_a_time = asyncio.Lock()

    async def __aenter__(self) -> PlanDeployment:
        from prefect.client.orchestration import get_client

        client = get_client()
        await client.__aenter__()
        self._client = client
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(kind, exc, tb)

    async def __call__(self, plan: dict[str, Any], inputs: dict[str, Any]) -> str:
        """Secret inputs go to the run as references to Secret blocks, never as
        parameters (docs/secrets.md)."""
        if self._client is None:
            raise RuntimeError("PlanDeployment is used outside its `async with`")
        params, blocks = await stored_inputs(plan.get("inputs") or {}, inputs)
        try:
            async with self._one_at_a_time:
                return str(await self._create(self._client, plan, params))
        except BaseException:
            await forget(blocks)  # no run will ever read them
            raise

    async def _create(self, client: PrefectClient, plan: dict[str, Any],
                      params: dict[str, Any]) -> UUID:
        if self._id is None:
            self._id = await self._read_id(client)
        try:
            return await self._create_run(client, self._id, plan, params)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 404:
                raise
        self._id = await self._read_id(client)  # registered anew since it was read
        return await self._create_run(client, self._id, plan, params)

    async def _read_id(self, client: PrefectClient) -> UUID:
        """The deployment's id; a server that does not know it (no runner has registered
        it yet) is an answer the bridge passes on as 503, not an error of its own."""
        from prefect.exceptions import ObjectNotFound

        try:
            return (await client.read_deployment_by_name(self.path)).id
        except ObjectNotFound as exc:
            if isinstance(exc.http_exc, httpx.HTTPStatusError):
                raise exc.http_exc from exc
            raise

    @staticmethod
    async def _create_run(client: PrefectClient, deployment_id: UUID, plan: dict[str, Any],
                          params: dict[str, Any]) -> UUID:
        from prefect.states import Scheduled

        name = str(plan.get("name", "plan"))
        # On SQLite a create meets the lock of a run's writes often (prefect_calls).
        flow_run = await soon_again(lambda: client.create_flow_run_from_deployment(
            deployment_id, parameters={"plan": plan, "inputs": params}, state=Scheduled(),
            name=name, tags=["planrun", f"plan:{name}"]))
        return flow_run.id
