"""``POST /v1/runs`` (submit a plan), ``GET /v1/runs/{id}`` (its report, progress and
estimate), and ``POST /v1/runs/{id}/pause|resume|cancel``.

Control requests become states of the run's Prefect flow run (see ``flows.control``), so
they work the same from here, from the CLI and from the Prefect UI; a request the run's
state does not allow answers 409 with the reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from planrun.errors import PlanInvalid, PolicyInvalid, UsageError
from planrun.inputs import resolve_inputs
from planrun.loader import Source
from planrun.policy import Trust, trusted_as
from planrun.validate import ValidPlan, validate_data, validate_text
from progress_bridge.runs import RunView
from progress_bridge.state import state_of

router = APIRouter(prefix="/v1/runs")  # behind progress_bridge.auth.Guard, as every route


class Submission(BaseModel):
    """A plan to run: YAML text or the plan as an object, and its inputs."""

    plan: str | dict[str, Any] = Field(description="the plan: YAML text or a JSON object")
    inputs: dict[str, Any] = Field(default_factory=dict,
                                   description="values of the plan's inputs, by name")


class Submitted(BaseModel):
    run_id: str
    status_url: str
    events_url: str
    view_url: str


class Invalid(BaseModel):
    detail: str
    errors: list[dict[str, Any]]


@router.post("", status_code=201, response_model=Submitted,
             responses={422: {"model": Invalid, "description": "the plan or inputs are not "
                              "valid; every error is listed"},
                        413: {"description": "the plan is too large"},
                        503: {"description": "this bridge cannot start runs"}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": Submission.model_json_schema()}}}})
async def submit(request: Request) -> Any:
    """Validate a plan as ``planrun validate`` does and start it as a Prefect deployment
    run; ``run_id`` is the flow run's id."""
    state = state_of(request)
    # The body's type and size were checked while it was read (progress_bridge.intake);
    # parsing and validating a plan of megabytes takes seconds: a worker thread does it,
    # so the loop goes on serving every other client meanwhile.
    checked = await anyio.to_thread.run_sync(_check, await request.body())
    if isinstance(checked, JSONResponse):
        return checked
    valid, inputs = checked
    if state.submit is None:
        raise HTTPException(503, "this bridge cannot start runs: start it with `planrun up`")
    run_id = await state.submit(valid.source.data, inputs)
    if run_id not in state.views:  # known from now on: pending until its engine starts it
        view = RunView.unstarted(run_id, valid.plan.name)
        state.store.commit(run_id, [], view.to_json())
        state.views[run_id] = view
    base = f"/v1/runs/{run_id}"
    return JSONResponse(status_code=201, content=Submitted(
        run_id=run_id, status_url=base, events_url=f"{base}/events",
        view_url=f"{base}/view").model_dump())


@router.get("/{run_id}", responses={404: {"description": "no such run"}})
async def report(run_id: str, request: Request) -> dict[str, Any]:
    """The run report (docs/run-report.md) with ``progress`` and ``estimate``, and ``last_seq``: the
    seq of the run's last message, to follow it from there."""
    state = state_of(request)
    view = state.views.get(run_id)
    if view is None:
        stored = state.store.run_state(run_id)
        if stored is None:
            raise HTTPException(404, f"no run {run_id} is known to this bridge: it may not "
                                "have started yet, or it ran before the bridge's records")
        view = RunView.from_json(stored)
    result = view.report()
    result["last_seq"] = state.store.last_seq(run_id)
    return result


class Accepted(BaseModel):
    run_id: str
    status: str = Field(description="what happens now: pausing, resuming, cancelling")


CONFLICTS: dict[int | str, dict[str, Any]] = {
    409: {"description": "the run's state does not allow this; the reason is in `detail`"},
    404: {"description": "no such planrun run"}}


@router.post("/{run_id}/pause", status_code=202, response_model=Accepted, responses=CONFLICTS)
async def pause(run_id: str) -> Accepted:
    """Pause at the next step boundary: steps already running finish, nothing new starts,
    then the run is suspended and holds no process until it is resumed."""
    from prefect.states import Paused

    async with _flow_run(run_id) as (client, flow_run):
        kind = flow_run.state.type.value
        if kind == "PAUSED":
            raise HTTPException(409, f"run {run_id} is already paused")
        if kind != "RUNNING":
            raise HTTPException(409, f"run {run_id} is {_state(flow_run)}: only a running "
                                "run can be paused")
        await client.set_flow_run_state(flow_run.id, Paused(message="paused by a person"),
                                        force=True)
    return Accepted(run_id=run_id, status="pausing")


@router.post("/{run_id}/resume", status_code=202, response_model=Accepted, responses=CONFLICTS)
async def resume(run_id: str) -> Accepted:
    """Resume a paused run: it goes on from where it stopped, in a new process; finished
    steps are not run again. A pause that has not taken effect yet is taken back. A run
    whose process crashed is started again the same way."""
    from prefect.flow_runs import aresume_flow_run
    from prefect.states import Scheduled

    async with _flow_run(run_id) as (client, flow_run):
        state = flow_run.state
        if state.type.value == "CRASHED":
            await client.set_flow_run_state(
                flow_run.id, Scheduled(message="resumed by a person after a crash"), force=True)
            return Accepted(run_id=run_id, status="resuming")
        if state.type.value != "PAUSED":
            raise HTTPException(409, f"run {run_id} is {_state(flow_run)}: only a paused or "
                                "crashed run can be resumed")
        if state.state_details.run_input_keyset:
            raise HTTPException(409, f"run {run_id} is waiting for an approval: approve or "
                                "reject the step")
        await aresume_flow_run(flow_run.id)
    return Accepted(run_id=run_id, status="resuming")


@router.post("/{run_id}/cancel", status_code=202, response_model=Accepted, responses=CONFLICTS)
async def cancel(run_id: str) -> Accepted:
    """Cancel the run: running commands are killed, nothing new starts, the files it
    changed are rolled back. A paused run is resumed to do so, and ends cancelled."""
    from prefect.flow_runs import aresume_flow_run
    from prefect.states import Cancelled, Cancelling

    from flows.control import CONTROL_LABEL

    async with _flow_run(run_id) as (client, flow_run):
        kind = flow_run.state.type.value
        if flow_run.state.is_final():
            raise HTTPException(409, f"run {run_id} has already ended ({_state(flow_run)})")
        if kind == "PAUSED":
            await client.update_flow_run_labels(flow_run.id, {CONTROL_LABEL: "cancel"})
            await aresume_flow_run(flow_run.id)
        elif kind in ("SCHEDULED", "PENDING"):  # no process yet: nothing to undo
            await client.set_flow_run_state(
                flow_run.id, Cancelled(message="cancelled by a person before it started"),
                force=True)
        else:
            await client.set_flow_run_state(
                flow_run.id, Cancelling(message="cancelled by a person"), force=True)
    return Accepted(run_id=run_id, status="cancelling")


class Decision(BaseModel):
    comment: str = Field(default="", max_length=2000, description="why, for the report")


@router.post("/{run_id}/steps/{step_id}/approve", status_code=202, response_model=Accepted,
             responses=CONFLICTS)
async def approve(run_id: str, step_id: str, decision: Decision | None = None) -> Accepted:
    """Answer the step's approval gate: the step runs."""
    await answer_gate(run_id, step_id, approved=True,
                      comment=decision.comment if decision else "")
    return Accepted(run_id=run_id, status="resuming")


@router.post("/{run_id}/steps/{step_id}/reject", status_code=202, response_model=Accepted,
             responses=CONFLICTS)
async def reject(run_id: str, step_id: str, decision: Decision | None = None) -> Accepted:
    """Answer the step's approval gate: the step is skipped (reason ``rejected``)."""
    await answer_gate(run_id, step_id, approved=False,
                      comment=decision.comment if decision else "")
    return Accepted(run_id=run_id, status="resuming")


async def answer_gate(run_id: str, step_id: str, *, approved: bool, comment: str) -> None:
    """Resume a run suspended at ``step_id``'s gate with the answer; 409 unless it waits
    there. The answer goes under the key of the suspension as it is now (Prefect's resume
    writes it there), so it answers this asking and no earlier one."""
    from prefect.flow_runs import aresume_flow_run

    from flows.control import is_asking_of

    async with _flow_run(run_id) as (_client, flow_run):
        state = flow_run.state
        waiting = (state.type.value == "PAUSED" and state.state_details.run_input_keyset
                   and is_asking_of(state.state_details.pause_key, step_id))
        if not waiting:
            raise HTTPException(409, f"run {run_id} is not waiting for an approval of "
                                f"{step_id} (it is {_state(flow_run)})")
        await aresume_flow_run(flow_run.id, run_input={"approved": approved,
                                                        "comment": comment})


def _check(body: bytes) -> tuple[ValidPlan, dict[str, Any]] | JSONResponse:
    """The valid plan and its inputs, or the 422 answer listing every problem."""
    try:
        submission = Submission.model_validate_json(body)
    except ValidationError as exc:
        return _invalid("the request body is not a submission: "
                        '{"plan": <YAML text or object>, "inputs": {...}}', [
            {"path": ".".join(map(str, e["loc"])) or "body", "message": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)])
    try:
        with trusted_as(Trust.SUBMITTED):  # a plan that came through here is untrusted
            if isinstance(submission.plan, str):
                valid = validate_text(submission.plan, "<plan>")
            else:
                valid = validate_data(Source("<plan>", data=submission.plan))
        return valid, resolve_inputs(valid.plan, submission.inputs, from_text=False)
    except PolicyInvalid as exc:  # nothing runs under a policy that cannot be read
        return JSONResponse(status_code=503, content={"detail": str(exc)})
    except PlanInvalid as exc:
        return _invalid("the plan is not valid", [
            {"line": p.line, "column": p.column, "path": p.path, "message": p.message,
             "text": str(p)} for p in exc.problems])
    except UsageError as exc:
        return _invalid("the inputs are not valid", [{"path": "inputs", "message": str(exc)}])


@contextlib.asynccontextmanager
async def _flow_run(run_id: str) -> AsyncIterator[tuple[Any, Any]]:
    """A Prefect client and the run's flow run; 404 when it is not a planrun run."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        flow_run_id = UUID(run_id)
    except ValueError:
        raise HTTPException(404, f"no run {run_id}: run ids are UUIDs") from None
    async with get_client() as client:
        try:
            flow_run = await client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            raise HTTPException(404, f"no run {run_id}") from None
        if "planrun" not in (flow_run.tags or []):
            raise HTTPException(404, f"flow run {run_id} is not a planrun run")
        yield client, flow_run


def _state(flow_run: Any) -> str:
    return str(flow_run.state.name or flow_run.state.type.value).lower()


def _invalid(detail: str, errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})
