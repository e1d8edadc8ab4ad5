"""Running a validated plan from this process against the Prefect server."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING, Any

from planrun.errors import PlanrunError
from planrun.policy import Trust, trusted_as
from planrun.report import RunObserver
from planrun.secrets import held_inputs
from planrun.server import ensure_server, healthy

if TYPE_CHECKING:
    from planrun.flows.parts import GateAsker


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
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, host.sessions.cancel_all)
    try:
        with tags("planrun", f"plan:{plan['name']}"), trusted_as(Trust.LOCAL), \
                held_inputs(plan.get("inputs") or {}, inputs) as params:
            state = await host.flow().with_options(flow_run_name=plan["name"])(
                plan, params, return_state=True)
        report = host.reports.pop(str(state.state_details.flow_run_id), None)
        if report is None:
            raise PlanrunError(f"the flow run ended {state.type.value} without a report: "
                               f"{state.message}")
        return report
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
