"""Running a validated plan from this process against the Prefect server."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from planrun.errors import PlanrunError
from planrun.policy import Trust, trusted_as
from planrun.report import RunObserver
from planrun.secrets import held_inputs
from planrun.server import ensure_server, healthy

if TYPE_CHECKING:
    from planrun.flows.parts import GateAsker
    from planrun.flows.plan_flow import RunHost


def prepare_prefect(quiet_console: bool = True) -> str:
    """Point Prefect at the server (starting the local one if needed) before importing it.

    Prefect's console log is quieted: the run's logs still reach the Prefect UI, and the
    terminal shows planrun's own display instead of tracebacks of failed attempts.
    """
    given = bool(os.environ.get("PREFECT_API_URL"))
    url = ensure_server()  # the local server it starts or reuses has just answered
    if given and not healthy(url):
        raise PlanrunError(f"cannot reach the Prefect API at {url}: start that server, "
                           "or unset PREFECT_API_URL to use planrun's local one")
    if quiet_console:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    return url


async def run_plan(plan: dict[str, Any], inputs: dict[str, Any],
                   observer: RunObserver | None = None,
                   asker: GateAsker | None = None) -> dict[str, Any]:
    """Run ``plan`` (validated plan data) as one Prefect flow run; return its report.

    The run is ``local``: its author runs it from this process, so the local level of
    the policy applies to it (docs/policy.md); runs of the deployment are ``submitted``.
    Secret inputs stay in this process's memory: the flow run's parameters hold only
    references to them (docs/secrets.md).
    SIGINT and SIGTERM cancel the run (running commands are killed, files rolled back)
    instead of tearing the process down. With ``asker`` the run waits at its gates and
    asks there (``planrun.asking``); without, its gated steps are skipped.
    """
    from prefect import tags

    from planrun.flows.plan_flow import RunHost

    host = RunHost(observers=[observer] if observer is not None else [], asker=asker)
    with _signals_cancel(host), tags("planrun", f"plan:{plan['name']}"), \
            trusted_as(Trust.LOCAL), held_inputs(plan.get("inputs") or {}, inputs) as params:
        state = await host.flow().with_options(flow_run_name=plan["name"])(
            plan, params, return_state=True)
    return _report(host, str(state.state_details.flow_run_id), state)


@contextmanager
def _signals_cancel(host: RunHost) -> Iterator[None]:
    """SIGINT and SIGTERM cancel the host's runs while this block runs."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, host.sessions.cancel_all)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _report(host: RunHost, run_id: str, state: Any) -> dict[str, Any]:
    """The report the run left with ``host``; an error when it ended without one."""
    report = host.reports.pop(run_id, None)
    if report is None:
        raise PlanrunError(f"the flow run ended {state.type.value} without a report: "
                           f"{state.message}")
    return report


async def retry_plan(run_id: str, observer: RunObserver | None = None,
                     asker: GateAsker | None = None) -> dict[str, Any]:
    """Retry an ended run of ``planrun run`` in this process, as the same flow run: its
    completed steps keep their outputs, the others run again (docs/retry.md); its report.
    ``Conflict`` when it cannot be retried; a run of the deployment is the runner's.
    ``asker``: as for ``run_plan``."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow_async
    from prefect.states import Scheduled

    from planrun.contract.control import RETRY_LABEL
    from planrun.errors import Conflict
    from planrun.flows.plan_flow import RunHost
    from planrun.progress_bridge.flow_runs import PrefectFlowRuns
    from planrun.progress_bridge.service import check_retry, retry_request

    found = await PrefectFlowRuns().read(run_id)
    check_retry(found)
    if found.deployed:
        raise Conflict(f"run {run_id} is a run of the stack: its runner retries it")
    host = RunHost(observers=[observer] if observer is not None else [], asker=asker)
    with _signals_cancel(host):
        async with get_client() as client:
            await client.update_flow_run_labels(UUID(run_id), {RETRY_LABEL: retry_request()})
            await client.set_flow_run_state(UUID(run_id), Scheduled(message="retried by a person"),
                                            force=True)
            flow_run = await client.read_flow_run(UUID(run_id))
        with trusted_as(Trust.LOCAL):
            state = await run_flow_async(host.flow(), flow_run=flow_run,
                                         parameters=flow_run.parameters, return_type="state")
    return _report(host, run_id, state)
