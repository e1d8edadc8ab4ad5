"""``POST /v1/runs`` (submit a plan) and ``GET /v1/runs/{id}`` (its report, progress and
estimate). Pause, resume, cancel, retry and approvals come with durable control."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from planrun.errors import PlanInvalid, UsageError
from planrun.inputs import resolve_inputs
from planrun.loader import MAX_PLAN_BYTES, Source
from planrun.validate import validate_data, validate_text
from progress_bridge.auth import require_token
from progress_bridge.runs import RunView
from progress_bridge.state import state_of

router = APIRouter(prefix="/v1/runs", dependencies=[Depends(require_token)])


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
    if int(request.headers.get("content-length") or 0) > MAX_PLAN_BYTES:
        raise HTTPException(413, f"plans are limited to {MAX_PLAN_BYTES} bytes")
    body = await request.body()
    if len(body) > MAX_PLAN_BYTES:
        raise HTTPException(413, f"plans are limited to {MAX_PLAN_BYTES} bytes")
    try:
        submission = Submission.model_validate_json(body)
    except ValidationError as exc:
        return _invalid("the request body is not a submission: "
                        '{"plan": <YAML text or object>, "inputs": {...}}', [
            {"path": ".".join(map(str, e["loc"])) or "body", "message": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)])
    try:
        if isinstance(submission.plan, str):
            valid = validate_text(submission.plan, "<plan>")
        else:
            valid = validate_data(Source("<plan>", data=submission.plan))
        inputs = resolve_inputs(valid.plan, submission.inputs, from_text=False)
    except PlanInvalid as exc:
        return _invalid("the plan is not valid", [
            {"line": p.line, "column": p.column, "path": p.path, "message": p.message,
             "text": str(p)} for p in exc.problems])
    except UsageError as exc:
        return _invalid("the inputs are not valid", [{"path": "inputs", "message": str(exc)}])
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
    """The run report (SPEC §4) with ``progress`` and ``estimate``, and ``last_seq``: the
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


def _invalid(detail: str, errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})
