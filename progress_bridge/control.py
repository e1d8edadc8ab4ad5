"""``POST /v1/runs`` (submit a plan), ``GET /v1/runs/{id}`` (its report, progress and
estimate), and ``POST /v1/runs/{id}/pause|resume|cancel|retry``.

Control requests go to the bridge's control service (``progress_bridge.service``), which
makes them states of the run's Prefect flow run, so they work the same from here, from the
CLI and from the Prefect UI; its ``NotFound`` answers 404 and its ``Conflict`` (a request
the run's state does not allow) 409 with the reason (docs/http-api.md). A submission
while the queue is full or memory short answers 503 with ``Retry-After``
(``progress_bridge.admission``), before the plan is read: a busy bridge spends nothing on it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import httpx
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from planrun.contract.status import RunStatus, StepStatus
from planrun.errors import Conflict, NotFound, PlanInvalid, PolicyInvalid, UsageError
from planrun.inputs import resolve_inputs
from planrun.loader import Source
from planrun.policy import Trust, trusted_as
from planrun.prefect_ui import flow_run_url
from planrun.progress_bridge.admission import Refusal
from planrun.progress_bridge.runs import RunView
from planrun.progress_bridge.state import BridgeState, state_of
from planrun.validate import ValidPlan, validate_data, validate_text

log = logging.getLogger(__name__)
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


#: How long a client waits before it submits again after Prefect refused a run.
PREFECT_RETRY_AFTER_S = 5


def prefect_unavailable(exc: httpx.HTTPStatusError | httpx.TransportError) -> Refusal:
    """The refusal for a run Prefect's server could not create."""
    if isinstance(exc, httpx.HTTPStatusError):
        answer = exc.response
        why = f"answered {answer.status_code} {answer.reason_phrase}"
    else:
        why = f"could not be reached ({type(exc).__name__})"
    return Refusal("prefect_unavailable", f"the Prefect server {why}, so the run was not "
                   f"started; try again in {PREFECT_RETRY_AFTER_S} s", PREFECT_RETRY_AFTER_S)


class Busy(BaseModel):
    detail: str = Field(description="what is full and when to try again, for a person")
    reason: str = Field(description="`queue_full`, `memory` or `prefect_unavailable`")
    retry_after_s: int = Field(description="the same as the Retry-After header")


@router.post("", status_code=201, response_model=Submitted,
             responses={422: {"model": Invalid, "description": "the plan or inputs are not "
                              "valid; every error is listed"},
                        413: {"description": "the plan is too large"},
                        503: {"model": Busy, "description": "the queue is full, the "
                              "machine short of memory or the Prefect server unable to "
                              "create the run (Retry-After says when to try again), or "
                              "this bridge cannot start runs"}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": Submission.model_json_schema()}}}})
async def submit(request: Request) -> Any:
    """Validate a plan as ``planrun validate`` does and start it as a Prefect deployment
    run; ``run_id`` is the flow run's id."""
    state = state_of(request)
    # Submissions under way count as queued: a burst cannot slip past the limit together.
    refusal = state.admission.refusal(state.queued() + state.admission.submitting)
    if refusal is not None:
        state.metrics.refused.labels(reason=refusal.reason).inc()
        return JSONResponse(status_code=503, content=refusal.body(),
                            headers={"Retry-After": str(refusal.retry_after_s)})
    state.admission.submitting += 1
    try:
        return await _submit(state, request)
    finally:
        state.admission.submitting -= 1


async def _submit(state: BridgeState, request: Request) -> Any:
    """Validate and start one admitted submission."""
    # The body's type and size were checked while it was read (progress_bridge.intake);
    # parsing and validating a plan of megabytes takes seconds: a worker thread does it,
    # so the loop goes on serving every other client meanwhile.
    checked = await anyio.to_thread.run_sync(_check, await request.body())
    if isinstance(checked, JSONResponse):
        return checked
    valid, inputs = checked
    if state.submit is None:
        raise HTTPException(503, "this bridge cannot start runs: start it with `planrun up`")
    try:
        run_id = await state.submit(valid.source.data, inputs)
    except (httpx.HTTPStatusError, httpx.TransportError) as exc:
        # Prefect's own client has retried already; nothing was started (a refused create).
        refusal = prefect_unavailable(exc)
        log.warning("a submission was refused: %s", refusal.detail)
        state.metrics.refused.labels(reason=refusal.reason).inc()
        return JSONResponse(status_code=503, content=refusal.body(),
                            headers={"Retry-After": str(refusal.retry_after_s)})
    if run_id not in state.views:  # known from now on: pending until its engine starts it
        view = RunView.unstarted(run_id, valid.plan.name, flow_run_url(run_id))
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
    await state.known(run_id)  # a run that ended before the bridge started: read it first
    view = state.views.get(run_id)
    if view is None:
        stored = state.store.run_state(run_id)
        if stored is None:
            raise HTTPException(404, f"no run {run_id} is known to this bridge: it may not "
                                "have started yet, or Prefect keeps no events of it")
        view = RunView.from_json(stored)
    result = view.report(time.time())
    result["last_seq"] = state.store.last_seq(run_id)
    return result


class Accepted(BaseModel):
    run_id: str
    status: str = Field(description="what happens now: pausing, resuming, cancelling")


CONFLICTS: dict[int | str, dict[str, Any]] = {
    409: {"description": "the run's state does not allow this; the reason is in `detail`"},
    404: {"description": "no such planrun run"}}


@router.post("/{run_id}/pause", status_code=202, response_model=Accepted, responses=CONFLICTS)
async def pause(run_id: str, request: Request) -> Accepted:
    """Pause at the next step boundary: steps already running finish, nothing new starts,
    then the run is suspended and holds no process until it is resumed."""
    state = state_of(request)
    async with _answered():
        await state.control.pause(run_id, ended=_ended(state, run_id))
    return Accepted(run_id=run_id, status="pausing")


@router.post("/{run_id}/resume", status_code=202, response_model=Accepted, responses=CONFLICTS)
async def resume(run_id: str, request: Request) -> Accepted:
    """Resume a paused run: it goes on from where it stopped, in a new process; finished
    steps are not run again. A run whose process crashed is started again the same way."""
    async with _answered():
        await state_of(request).control.resume(run_id)
    return Accepted(run_id=run_id, status="resuming")


@router.post("/{run_id}/cancel", status_code=202, response_model=Accepted, responses=CONFLICTS)
async def cancel(run_id: str, request: Request) -> Accepted:
    """Cancel the run: running commands are killed, nothing new starts, the files it
    changed are rolled back. A paused run is resumed to do so, and ends cancelled."""
    state = state_of(request)
    async with _answered():
        await state.control.cancel(run_id, ended=_ended(state, run_id))
    return Accepted(run_id=run_id, status="cancelling")


class Retrying(Accepted):
    retry: list[str] = Field(description="the steps that will run again, as the bridge "
                             "last saw the run (its failed, skipped and cancelled steps)")
    after: int = Field(description="the seq of the run's last message before the retry: "
                       "follow the retry with `?after=` this")


@router.post("/{run_id}/retry", status_code=202, response_model=Retrying, responses=CONFLICTS)
async def retry(run_id: str, request: Request) -> Retrying:
    """Run an ended run again from where it went wrong: its failed, skipped and cancelled
    steps run again; its completed steps keep their outputs and do not (docs/retry.md)."""
    state = state_of(request)
    await state.known(run_id)  # its stream goes on after its last message (``after``)
    async with _answered():  # the stream says it ended: its flow run ends in a moment
        await state.control.retry(run_id, announced=_ended(state, run_id))
    view = state.views.get(run_id)
    again = [sid for sid, step in view.record.steps.items()
             if step.status != StepStatus.COMPLETED] if view is not None else []
    return Retrying(run_id=run_id, status="retrying", retry=again,
                    after=state.store.last_seq(run_id))


def _ended(state: BridgeState, run_id: str) -> bool:
    """Whether the run's stream says it has ended (its flow run ends a moment later)."""
    view = state.views.get(run_id)
    return view is not None and view.ended


class Decision(BaseModel):
    comment: str = Field(default="", max_length=2000, description="why, for the report")


@router.post("/{run_id}/steps/{step_id}/approve", status_code=202, response_model=Accepted,
             responses=CONFLICTS)
async def approve(run_id: str, step_id: str, request: Request,
                  decision: Decision | None = None) -> Accepted:
    """Answer the step's approval gate: the step runs."""
    async with _answered():
        await _answer(request, run_id, step_id, approved=True, decision=decision)
    return Accepted(run_id=run_id, status="resuming")


@router.post("/{run_id}/steps/{step_id}/reject", status_code=202, response_model=Accepted,
             responses=CONFLICTS)
async def reject(run_id: str, step_id: str, request: Request,
                 decision: Decision | None = None) -> Accepted:
    """Answer the step's approval gate: the step is skipped (reason ``rejected``)."""
    async with _answered():
        await _answer(request, run_id, step_id, approved=False, decision=decision)
    return Accepted(run_id=run_id, status="resuming")


async def _answer(request: Request, run_id: str, step_id: str, *, approved: bool,
                  decision: Decision | None) -> None:
    """Answer the gate; an answer to a gate the run's stream has announced is taken even
    before the run is suspended at it."""
    state = state_of(request)
    view = state.views.get(run_id)
    announced = (view is not None and view.record.status == RunStatus.AWAITING_APPROVAL
                 and view.gate is not None and view.gate.step_id == step_id)
    await state.control.answer(run_id, step_id, approved=approved, announced=announced,
                               comment=decision.comment if decision else "")


@contextlib.asynccontextmanager
async def _answered() -> AsyncIterator[None]:
    """The control service's domain errors as HTTP answers: 404 and 409 with the reason."""
    try:
        yield
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except Conflict as exc:
        raise HTTPException(409, exc.reason) from exc


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


def _invalid(detail: str, errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})
