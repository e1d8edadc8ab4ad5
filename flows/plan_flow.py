"""The Prefect flow of a plan run: validate, compile, run a session, end in a matching state.

This is the only module that builds Prefect flows. ``plan_flow`` is the deployment's flow;
``RunHost.flow`` makes one whose runs report to the process that calls it (``planrun
run``). Either validates the plan, compiles it (``flows.graph``), and runs it as a
``flows.session.RunSession`` with the real parts: Prefect task runs for steps, Prefect
events, checkpoints in Prefect's result storage, the flow run's state as the control
source, and the workspace with its backups under the data directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from prefect import Flow, flow
from prefect.context import FlowRunContext
from prefect.states import Cancelled, Completed, Failed, State

from planrun.adapters.registry import Registry, default_registry
from planrun.adapters.workspace import Workspace, default_workspace_root
from planrun.contract.control import PROCESS_LABEL
from planrun.contract.events import RunProcess
from planrun.contract.status import RunStatus
from planrun.errors import PlanInvalid, PolicyInvalid, UsageError
from planrun.flows import prefect_compat
from planrun.flows.artifacts import RunArtifacts
from planrun.flows.checkpoints import Checkpoints
from planrun.flows.control import FlowRunStates, RunControl
from planrun.flows.events import RunEvents
from planrun.flows.fakes import MemoryParts
from planrun.flows.graph import RunGraph, compile_plan
from planrun.flows.limits import default_limiter
from planrun.flows.parts import GateAsker, RunParts
from planrun.flows.session import RunSession, Sessions
from planrun.flows.step import TaskRuns
from planrun.home import backup_dir
from planrun.inputs import resolve_inputs
from planrun.loader import Source
from planrun.plan_schemas.model import Plan
from planrun.policy import current_trust, load_policy
from planrun.prefect_calls import soon_again
from planrun.prefect_ui import flow_run_url
from planrun.processes import started, this_place
from planrun.report import RunObserver
from planrun.secrets import RunSecrets, forget, input_blocks
from planrun.secrets import load as load_secrets
from planrun.validate import validate_data

prefect_compat.install()

FLOW_OPTIONS: dict[str, Any] = {"name": prefect_compat.FLOW_NAME, "persist_result": False,
                                "validate_parameters": False, "log_prints": False}


class RunHost:
    """What a process running plans keeps of them: its sessions (a SIGTERM cancels them
    cleanly: commands killed, files rolled back, a Cancelled state; a Prefect runner passes
    a cancel on as SIGTERM), observers told of every change, and the reports of finished
    runs for the caller to take (``reports``, by run id)."""

    def __init__(self, observers: Iterable[RunObserver] = (),
                 cancel_on_sigterm: bool = True, asker: GateAsker | None = None,
                 states: FlowRunStates | None = None) -> None:
        self.sessions = Sessions()
        self.observers = list(observers)
        self.reports: dict[str, dict[str, Any]] = {}
        self.cancel_on_sigterm = cancel_on_sigterm
        #: Asks a person at a gate in this process (``planrun run`` on a terminal): a run
        #: that no runner would start again then waits at its gates here, and any answer
        #: counts, this one's or one given elsewhere, whichever comes first. Without it
        #: such a run has no one to ask: its gated steps are skipped.
        self.asker = asker
        #: Where the runs read their flow runs' states (``flows.worker``: all together).
        self.states = states

    def flow(self) -> Flow[[dict[str, Any], dict[str, Any]], Coroutine[Any, Any, State[Any]]]:
        """A ``planrun`` flow whose runs report here (to be called in this process)."""
        async def planrun(plan: dict[str, Any], inputs: dict[str, Any]) -> State[Any]:
            return await run_flow(self, plan, inputs)

        return flow(**FLOW_OPTIONS)(planrun)


@flow(**FLOW_OPTIONS)
async def plan_flow(plan: dict[str, Any], inputs: dict[str, Any]) -> State[Any]:
    """Run one plan (the deployment's entrypoint: a runner gives each run a process): its
    steps as task runs, ending in a state that matches the run's status."""
    return await run_flow(RunHost(), plan, inputs)


async def run_flow(host: RunHost, plan: dict[str, Any], inputs: dict[str, Any]) -> State[Any]:
    """The body of a ``planrun`` flow: the report stays in ``host.reports`` (sending it
    with the final state costs up to 0.3 s on a 300-step run)."""
    context = FlowRunContext.get()
    run_id = str(context.flow_run.id) if context and context.flow_run else "local"
    blocks = input_blocks(inputs)  # the run's secret inputs, stored until it ends
    state = await _checked_run(host, plan, inputs, run_id)  # a Pause passes: later
    await forget(blocks)
    return state


async def _checked_run(host: RunHost, plan: dict[str, Any], inputs: dict[str, Any],
                       run_id: str) -> State[Any]:
    try:  # a deployment run's parameters come from anyone who can reach Prefect's API
        checked = validate_data(Source("<plan>", data=plan)).plan
        inputs, secrets = await load_secrets(checked, inputs)  # docs/secrets.md
        inputs = resolve_inputs(checked, inputs, from_text=False)
    except PlanInvalid as exc:
        return Failed(message="the plan is not valid:\n" + "\n".join(map(str, exc.problems)))
    except (UsageError, PolicyInvalid) as exc:
        return Failed(message=str(exc))
    report = await execute_plan(checked, inputs, run_id, secrets=secrets, host=host)
    host.reports[run_id] = report
    return final_state(report)


def final_state(report: dict[str, Any]) -> State[Any]:
    """The flow run's final state for a run's report."""
    status, message = report["status"], report.get("reason") or report["status"]
    if status == RunStatus.FAILED:
        return Failed(message=message)
    if status == RunStatus.CANCELLED:
        return Cancelled(message=message)
    if status == RunStatus.COMPLETED_WITH_ERRORS:  # the state's name is the UI's badge
        return Completed(name="Completed with errors", message=message)
    return Completed(message=message)


async def execute_plan(plan: Plan, inputs: dict[str, Any], run_id: str,
                       registry: Registry | None = None, workspace: Workspace | None = None,
                       secrets: RunSecrets | None = None,
                       host: RunHost | None = None) -> dict[str, Any]:
    """Compile ``plan`` under the current trust level's ceilings and run it inside the
    flow run ``run_id`` with the real parts; its report. ``secrets`` are what its
    templates read as ``secrets``. Outside that flow run (a test's own flow), checkpoints,
    control and events are in memory. A pause that takes effect raises Prefect's
    ``Pause`` (``RunSession.run_to_end``)."""
    ceilings = load_policy().level(current_trust()).ceilings  # a plan can only tighten
    graph = compile_plan(plan, registry or default_registry(), ceilings)
    secrets = secrets or RunSecrets()
    host = host or RunHost()
    durable = _is_this_flow_run(run_id)  # checkpoints, control and events need one
    asker = None if _deployed() else host.asker  # a deployment's run suspends at gates
    parts = real_parts(graph, run_id, secrets, workspace, asker, host.states) \
        if durable else _memory_parts(run_id, workspace)
    # A runner may start a deployment's run again elsewhere (crash recovery): it names
    # its process on the flow run, and stops once another process is named there. The
    # first step does not wait for that write: on the SQLite server it met the lock of
    # the run's own start often, and its client retries a 503 after 2 s (BENCHMARKS.md).
    control = parts.control  # a RunControl when durable
    naming = asyncio.ensure_future(_say_which_process(run_id, control)) \
        if _deployed() and isinstance(control, RunControl) else None
    session = RunSession(graph, run_id, parts, inputs=inputs, secrets=secrets,
                         observers=host.observers,
                         can_ask=durable and (_deployed() or asker is not None),
                         started_at=_started_at(),
                         flow_run_url=None if run_id == "local" else flow_run_url(run_id))
    try:
        with host.sessions.running(session), _sigterm_cancels(host):
            return await session.run_to_end()
    finally:
        if naming is not None:
            naming.cancel()  # a run that ended first needs no name


async def _say_which_process(run_id: str, control: RunControl) -> None:
    """Name this process on the flow run (``PROCESS_LABEL``): a bridge on this machine
    knows it even when the run's events reach Prefect late, and does not take the run for
    dead while it runs; and once named, ``control`` stops the run here when another
    process is named since (its ``owner``). A label that cannot be written only costs
    this."""
    from prefect.client.orchestration import get_client

    process = _this_process()
    try:
        async with get_client() as client:
            # A read-then-write on the server: on SQLite it meets the lock of the run's
            # own start often (planrun/prefect_calls.py).
            await soon_again(lambda: client.update_flow_run_labels(
                UUID(run_id), {PROCESS_LABEL: process.model_dump_json()}))
    except Exception as exc:  # noqa: BLE001 - the events say it too, later
        logging.getLogger("planrun.flow").warning(
            "cannot name this process on run %s: %s", run_id, exc)
        return
    control.owner = process


def real_parts(graph: RunGraph, run_id: str, secrets: RunSecrets,
               workspace: Workspace | None = None, asker: GateAsker | None = None,
               states: FlowRunStates | None = None) -> RunParts:
    """The parts of a run inside its own Prefect flow run; with ``asker``, its gates wait
    in this process and ``asker`` asks at them; with ``states``, its state is read there."""
    return RunParts(
        checkpoints=Checkpoints(run_id, secrets.redactor),
        control=RunControl(run_id, asker=asker, waits_here=asker is not None, states=states),
        workspace=workspace or _workspace(run_id), steps=TaskRuns(),
        events=lambda run, segment: RunEvents(graph.plan, run, segment, _this_process()),
        artifacts=RunArtifacts, limits=default_limiter())


def _memory_parts(run_id: str, workspace: Workspace | None) -> RunParts:
    memory = MemoryParts().parts()
    return RunParts(checkpoints=memory.checkpoints, control=memory.control,
                    workspace=workspace or _workspace(run_id), steps=TaskRuns(),
                    events=memory.events, artifacts=RunArtifacts, limits=default_limiter())


def _workspace(run_id: str) -> Workspace:
    """The run's workspace: under the root the policy gives this trust level."""
    policy = load_policy().level(current_trust())
    return Workspace(default_workspace_root(policy), backup_dir=backup_dir(run_id))


@contextmanager
def _sigterm_cancels(host: RunHost) -> Iterator[None]:
    """Route SIGTERM to the host's sessions while a run goes (Prefect's flow engine has
    just put its own handler in place, which would abort the run without a report)."""
    if not host.cancel_on_sigterm or threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, host.sessions.cancel_all)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _deployed() -> bool:
    """Whether this flow run belongs to a deployment: only then can it be suspended at a
    gate and started again by a runner once answered."""
    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)


def _is_this_flow_run(run_id: str) -> bool:
    context = FlowRunContext.get()
    return bool(context and context.flow_run and str(context.flow_run.id) == run_id)


def _this_process() -> RunProcess:
    """This process, and the Prefect Running state its flow run started under here."""
    context = FlowRunContext.get()
    state = context.flow_run.state if context and context.flow_run else None
    return RunProcess(place=this_place(), pid=os.getpid(), started=started(),
                      state_id=str(state.id) if state is not None else None)


def _started_at() -> float:
    """When the run first started: the flow run's start, which a resume keeps."""
    context = FlowRunContext.get()
    start = context.flow_run.start_time if context and context.flow_run else None
    return start.timestamp() if start is not None else time.time()
