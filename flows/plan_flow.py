"""The compiler: a validated plan becomes one Prefect flow run, each step one task run.

This is the only module that builds Prefect flows. ``plan_flow`` is the flow; the
scheduler drives the DAG inside it and ``flows.step`` runs each step as a Prefect task.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any
from uuid import UUID

from prefect import flow
from prefect.context import FlowRunContext
from prefect.exceptions import Pause
from prefect.states import Cancelled, Completed, Failed, State
from prefect.utilities.annotations import quote

from adapters.registry import Registry, default_registry
from adapters.workspace import Workspace, default_workspace_root
from flows import prefect_compat
from flows.artifacts import RunArtifacts
from flows.checkpoints import Checkpoints
from flows.control import TIMED_OUT, RunControl
from flows.events import RunEvents
from flows.policy import RetryPolicy
from flows.prefect_compat import call_after, new_task_run_id, task_with
from flows.scheduler import Scheduler
from flows.step import StepJob, not_run_step
from plan_schemas.model import Plan, Step
from planrun.durations import parse_duration
from planrun.errors import PlanInvalid, PolicyInvalid, UsageError
from planrun.inputs import resolve_inputs
from planrun.loader import Source
from planrun.policy import Ceilings, current_trust, load_policy
from planrun.policy_check import tightest
from planrun.report import (
    RunObserver,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
    StepsView,
)
from planrun.secrets import RunSecrets, forget, input_blocks
from planrun.secrets import load as load_secrets
from planrun.validate import validate_data

prefect_compat.install()

#: Runs in this process, by run id, so a signal handler can cancel them.
ACTIVE: dict[str, Scheduler] = {}
#: SIGTERM cancels this process's runs cleanly (commands killed, files rolled back, a
#: Cancelled state): from a person's Ctrl-C or kill under ``planrun run``, and from a Prefect
#: runner or worker, which passes a cancel (the API's, the Prefect UI's) on as SIGTERM.
CANCEL_ON_SIGTERM = True
#: Reports of the runs this process finished, by run id, for the caller to take.
REPORTS: dict[str, dict[str, Any]] = {}
#: Told about every change of every run in this process.
OBSERVERS: list[RunObserver] = []


def new_record(plan: Plan, run_id: str, registry: Registry) -> RunRecord:
    """A run record with every step pending and its first estimate."""
    steps = {}
    for step in plan.steps:
        adapter = registry.get(step.tool)
        estimate = parse_duration(step.estimate) if step.estimate is not None else None
        if estimate is None:
            try:
                estimate = adapter.estimate(adapter.validate(step.with_))
            except Exception:  # noqa: BLE001 - templated parameters: use the tool's default
                estimate = adapter.default_estimate_s
        critical = step.critical if step.critical is not None else plan.defaults.critical
        steps[step.id] = StepRecord(
            id=step.id, tool=step.tool, name=step.name, needs=list(step.needs),
            critical=True if critical is None else critical, estimate_s=estimate,
        )
    return RunRecord(run_id=run_id, plan=plan.name, steps=steps)


def _notify(run: RunRecord, step: StepRecord | None) -> None:
    for observer in list(OBSERVERS):
        observer.changed(run, step)


def cancel_all(reason: str = "cancelled by a person") -> None:
    """Cancel every run of this process (Ctrl-C, SIGTERM)."""
    for scheduler in list(ACTIVE.values()):
        scheduler.stop(reason, cancelled=True)


@flow(name="planrun", persist_result=False, validate_parameters=False, log_prints=False)
async def plan_flow(plan: dict[str, Any], inputs: dict[str, Any]) -> State[Any]:
    """Run one plan: schedule its steps as task runs and end in a state that matches the
    run's status (Completed, Failed, Cancelled). The report stays in this process, in
    ``REPORTS``: sending it with the final state costs up to 0.3 s on a 300-step run."""
    context = FlowRunContext.get()
    run_id = str(context.flow_run.id) if context and context.flow_run else "local"
    blocks = input_blocks(inputs)  # the run's secret inputs, stored until it ends
    state = await _run_flow(plan, inputs, run_id)  # a Pause passes: the run goes on later
    await forget(blocks)
    return state


async def _run_flow(plan: dict[str, Any], inputs: dict[str, Any], run_id: str) -> State[Any]:
    try:  # a deployment run's parameters come from anyone who can reach Prefect's API
        checked = validate_data(Source("<plan>", data=plan)).plan
        inputs, secrets = await load_secrets(checked, inputs)  # docs/secrets.md
        inputs = resolve_inputs(checked, inputs, from_text=False)
    except PlanInvalid as exc:
        return Failed(message="the plan is not valid:\n" + "\n".join(map(str, exc.problems)))
    except (UsageError, PolicyInvalid) as exc:
        return Failed(message=str(exc))
    report = await execute_plan(checked, inputs, run_id, secrets=secrets)
    REPORTS[run_id] = report
    status, message = report["status"], report.get("reason") or report["status"]
    if status == RunStatus.FAILED:
        return Failed(message=message)
    if status == RunStatus.CANCELLED:
        return Cancelled(message=message)
    if status == RunStatus.COMPLETED_WITH_ERRORS:  # the state's name is the UI's badge
        return Completed(name="Completed with errors", message=message)
    return Completed(message=message)


async def execute_plan(plan: Plan, inputs: dict[str, Any], run_id: str,
                       registry: Registry | None = None,
                       workspace: Workspace | None = None,
                       secrets: RunSecrets | None = None) -> dict[str, Any]:
    """Run ``plan`` inside the current flow run and return its report; ``secrets`` are
    what its templates read as ``secrets``, masked everywhere the run shows anything.

    When this flow run starts again (a resumed pause, a recovered crash), the steps that
    had finished are restored from their checkpoints. A pause that takes effect raises
    Prefect's ``Pause``: the flow run is then suspended and this process should end.
    """
    from planrun.server import data_dir

    registry = registry or default_registry()
    ceilings = load_policy().level(current_trust()).ceilings  # a plan can only tighten
    run = new_record(plan, run_id, registry)
    secrets = secrets or RunSecrets()
    run.redactor = secrets.redactor
    run.flow_run_url = _ui_url(run_id)
    durable = _is_this_flow_run(run_id)  # checkpoints, control and events need one
    checkpoints = Checkpoints(run_id, run.redactor) if durable else None
    segment = await checkpoints.begin() if checkpoints else 1
    restored = await checkpoints.load(run.steps) if checkpoints and segment > 1 else []
    workspace = workspace or Workspace(default_workspace_root(),
                                       backup_dir=data_dir() / "runs" / run_id / "backup")

    steps_view = StepsView(run.steps)

    def context() -> dict[str, Any]:
        return {"inputs": inputs, "run": {"id": run_id, "plan": plan.name},
                "steps": steps_view, "secrets": secrets.view()}

    artifacts = RunArtifacts(run)
    events = RunEvents(plan, run, segment) if durable else None

    def notify(step: StepRecord | None) -> None:
        _notify(run, step)
        artifacts.changed()
        if events is not None and step is not None:
            events.changed(step)

    jobs = {step.id: _job(plan, step, run, registry, workspace, context, notify, ceilings)
            for step in plan.steps}

    async def execute(step: Step) -> None:
        job = jobs[step.id]
        job.record.task_run_id = new_task_run_id()
        try:
            output = await call_after(job.prefect_task(), _upstream(run, step),
                                      job.record.task_run_id, quote(job))
            if isinstance(output, State) and output.is_cancelled():
                raise asyncio.CancelledError  # the step's task run ended Cancelled
            job.record.output = output
            job.record.status, job.record.error = StepStatus.COMPLETED, None
        except Exception:  # noqa: BLE001 - the StepError is already on the record
            job.record.status = StepStatus.FAILED
        job.record.ended_at = time.time()
        if checkpoints is not None:
            await checkpoints.save(job.record)
        notify(job.record)

    async def skip(step: Step) -> None:
        record = run.steps[step.id]
        record.task_run_id = new_task_run_id()
        await call_after(task_with(not_run_step, name=step.id, task_run_name=step.id,
                                   tags=["planrun", f"tool:{step.tool}"]),
                         _upstream(run, step), record.task_run_id,
                         step.id, record.reason or "", record.status == StepStatus.FAILED)
        if checkpoints is not None and not scheduler.stop_reason:
            await checkpoints.save(record)  # a skip for a run that stops is not kept

    gates = {step.id: step.approval for step in plan.steps if step.approval is not None}

    async def decide(step: Step) -> tuple[str, bool] | None:
        assert control is not None
        answer = await control.decision(step.id)
        if answer is None:
            record = run.steps[step.id]
            record.status = StepStatus.AWAITING_APPROVAL
            notify(record)
            scheduler.pause(f"awaiting approval of {step.id}", gate=step.id)
            await asyncio.Event().wait()  # the run suspends at the gate: this is cancelled
        assert answer is not None
        approved, comment = answer
        run.steps[step.id].status = StepStatus.PENDING
        if approved:
            return None
        if comment == TIMED_OUT:
            return TIMED_OUT, True
        return "rejected" + (f": {comment}" if comment else ""), True

    asks = durable and gates and _deployed()
    parallel = tightest(plan.limits.max_parallel, ceilings.max_parallel)
    scheduler = Scheduler(run, plan.steps, max_parallel=int(parallel or 1),
                          execute=execute, skip=skip, notify=notify, context=context,
                          decide=decide if asks else None)
    ACTIVE[run_id] = scheduler
    sigterm = _take_sigterm()
    run.status, run.started_at = RunStatus.RUNNING, _started_at()
    control = RunControl(run_id, scheduler, beat=events.heartbeat if events else None) \
        if durable else None
    if control is not None:
        scheduler.news = control.news
    if control is not None and segment > 1 and await control.cancel_requested():
        scheduler.stop("cancelled while paused", cancelled=True)
    artifacts.start()
    if events is not None:
        events.resumed(restored) if segment > 1 else events.started()
    notify(None)
    deadline = parse_duration(plan.limits.deadline) if plan.limits.deadline is not None else None
    watching = asyncio.ensure_future(control.watch()) if control is not None else None

    async def finish() -> None:
        run.status = run.final_status(cancelled=scheduler.cancelled,
                                      deadline_passed=scheduler.deadline_passed)
        run.reason = scheduler.stop_reason
        if run.status in (RunStatus.FAILED, RunStatus.CANCELLED):
            run.rolled_back = workspace.rollback()
            left = workspace.left_note()  # another run's later change is not undone
            run.reason = f"{run.reason}; {left}" if run.reason and left else run.reason or left
        else:
            workspace.commit()
        run.ended_at = time.time()
        notify(None)
        if events is not None:
            events.ended()
        await artifacts.finish()

    try:
        await scheduler.run_all(deadline)
    except asyncio.CancelledError:
        scheduler.stop("cancelled", cancelled=True)
        raise
    finally:
        ACTIVE.pop(run_id, None)
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        if sigterm:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        if not scheduler.suspended:
            await finish()
    if scheduler.suspended and control is not None and events is not None:
        # What ran has finished and is checkpointed; the files stay as they are.
        reason = scheduler.pause_reason or "paused"
        gate = scheduler.gate
        if gate is not None:
            approval = gates[gate]
            run.steps[gate].status = StepStatus.AWAITING_APPROVAL
            run.status, run.reason = RunStatus.AWAITING_APPROVAL, reason
            notify(None)
            timeout = approval.timeout or plan.limits.pause_timeout
            events.awaiting_approval(gate, approval.prompt,
                                     parse_duration(timeout) if timeout is not None else None)
            await artifacts.finish()
            await control.ask(gate, approval.prompt)  # raises Pause
        run.status, run.reason = RunStatus.PAUSED, reason
        notify(None)
        limit = plan.limits.pause_timeout
        events.paused(reason, parse_duration(limit) if limit is not None else None,
                      plan.limits.on_pause_timeout)
        await artifacts.finish()
        raise Pause(state=await control.suspend(f"pause-{segment}", reason))
    return run.to_report()


def _upstream(run: RunRecord, step: Step) -> list[UUID]:
    """The task runs of the steps ``step`` needs: its inputs in Prefect's run graph. A
    step restored from a checkpoint older than its task run id has none to name."""
    found = (run.steps[need].task_run_id for need in step.needs)
    return [task_run_id for task_run_id in found if task_run_id is not None]


def _deployed() -> bool:
    """Whether this flow run belongs to a deployment: only then can it be suspended at a
    gate and started again by a runner once answered."""
    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)


def _is_this_flow_run(run_id: str) -> bool:
    context = FlowRunContext.get()
    return bool(context and context.flow_run and str(context.flow_run.id) == run_id)


def _started_at() -> float:
    """When the run first started: the flow run's start, which a resume keeps."""
    context = FlowRunContext.get()
    start = context.flow_run.start_time if context and context.flow_run else None
    return start.timestamp() if start is not None else time.time()


def _take_sigterm() -> bool:
    """Route SIGTERM to ``cancel_all`` for this run (Prefect's flow engine has just put its
    own handler in place, which would abort the run without a report)."""
    if not CANCEL_ON_SIGTERM or threading.current_thread() is not threading.main_thread():
        return False
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, cancel_all)
    return True


def _ui_url(run_id: str) -> str | None:
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    return f"{ui}/runs/flow-run/{run_id}" if ui and run_id != "local" else None


def _job(plan: Plan, step: Step, run: RunRecord, registry: Registry, workspace: Workspace,
         context: Any, notify: Any, ceilings: Ceilings) -> StepJob:
    timeout = step.timeout if step.timeout is not None else plan.defaults.timeout
    memory = tightest(plan.limits.memory_mb, ceilings.memory_mb)
    return StepJob(
        step=step, record=run.steps[step.id], adapter=registry.get(step.tool),
        policy=RetryPolicy.from_plan(plan.defaults.retry, step.retry),
        timeout_s=tightest(parse_duration(timeout) if timeout is not None else None,
                           ceilings.step_timeout_s),
        run_id=run.run_id, workspace=workspace,
        memory_mb=int(memory) if memory is not None else None,
        context=context, notify=notify,
        fallback_adapter=registry.get(step.fallback.tool) if step.fallback else None,
        redactor=run.redactor,
    )
