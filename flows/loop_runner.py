"""A runner that executes many runs of the ``planrun/plan-runner`` deployment at once, in
its own process, on one event loop (``planrun up --in-process``; docs/production.md).

Prefect's runner gives each run a process: ≈ 100 MB and, forked, ≈ 0.3 s of CPU before
its first step (BENCHMARKS.md). Here a run is a task on this runner's loop: a run that
waits (for a step's command, a web page, a timer) costs what its session holds. What
that gives up is isolation: a tool adapter that blocks the loop slows every run here, and
a crash of this process takes them all. Plans that need a process of their own go to a
runner without ``--in-process``.

The runner does what Prefect's does, through the same API calls:

- **Taking runs.** It registers the deployment as ``serve()`` does and asks for its
  scheduled runs as soon as the server says one was scheduled (an event of a run of the
  deployment entering a Scheduled state: a submit, a resume, a run scheduled again after
  a crash; a resume's event can come before the run is listed, or while its suspended
  task here is still ending, so a run announced and not taken is looked for again, every
  0.25 s for up to 10 s), and every
  ``PREFECT_RUNNER_POLL_FREQUENCY`` seconds in case an event was lost.
  Prefect's runner only polls: a submitted run waited up to a poll for its start. It
  claims a run by proposing Pending (another runner that claimed it first makes the
  server refuse) and runs it with Prefect's flow engine, in this process.
  ``PREFECT_RUNNER_PROCESS_LIMIT`` caps the runs at once, as for Prefect's runner; a run
  over it stays Scheduled until one here ends.
- **What people ask.** Every run watches its flow run's state (``flows.control``); here
  they read it together, one request for all of them every half second
  (``FlowRunStates``). A cancel, a pause and a gate work as in a process of their own: a
  suspended run ends its task, and its resume is a scheduled run that this runner, or
  another, takes again.
- **Crashes.** Every run names this process in its events (its pid), so when the process
  dies the bridge marks its running runs Crashed and schedules them again, as for a run
  process that dies (docs/production.md, "Crash recovery"); the runner that takes one
  restores its finished steps from their checkpoints. A SIGTERM or Ctrl-C stops it taking
  runs, and it exits without ending the runs it holds: they go on elsewhere by that same
  rule (ending them here, Cancelled or Crashed, would end them for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from functools import partial
from typing import Any
from uuid import UUID

from planrun.flows.control import FlowRunStates
from planrun.flows.plan_flow import RunHost, plan_flow
from planrun.flows.scheduled import follow_scheduled

log = logging.getLogger("planrun.loop_runner")

#: At least this long between two reads of the scheduled runs: a burst of submits is read
#: in a few requests, not one per event.
TAKE_GAP_S = 0.1
#: A run the server said was scheduled but did not list yet (its event can come before
#: the state is readable: a resume's did) is looked for again this often, this long.
LOOK_AGAIN_S = 0.25
LOOK_FOR_S = 10.0


class LoopRunner:
    """Takes the deployment's scheduled runs and runs them as tasks on this loop."""

    def __init__(self, deployment: str, limit: int | None = None, poll_s: float = 1.0,
                 description: str = "") -> None:
        self.deployment = deployment
        self.limit = limit
        self.poll_s = poll_s
        self.description = description
        self.host = RunHost(cancel_on_sigterm=False, states=FlowRunStates())
        self.flow = self.host.flow()
        #: The runs of this process, by flow run id.
        self.runs: dict[UUID, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        #: Set when there may be a run to take now (and when stopping).
        self._wake = asyncio.Event()
        #: Runs the server said were scheduled and were not taken yet: since when.
        self._announced: dict[UUID, float] = {}

    async def serve(self) -> None:
        """Register the deployment and run what is scheduled for it until a signal."""
        from prefect.context import AsyncClientContext

        deployment_id = await self._register()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        # One API client for the runner and every run it starts (their tasks inherit the
        # context, and Prefect's flow engine takes its client from there): a new client
        # per run was a fifth of the runner's CPU at 50 runs at once (BENCHMARKS.md).
        async with AsyncClientContext() as shared:
            client = shared.client
            watch = asyncio.create_task(follow_scheduled(deployment_id, self._announce,
                                                         self._wake.set))
            while not self._stop.is_set():
                self._wake.clear()  # what is scheduled from here on is read next time
                try:
                    await self._take(client, deployment_id)
                except Exception as exc:  # noqa: BLE001 - the API may blink: ask again
                    log.warning("cannot read the scheduled runs: %s", exc)
                await asyncio.sleep(TAKE_GAP_S)
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                except TimeoutError:
                    pass
            watch.cancel()
        if self.runs:
            log.warning("stopping with %d runs in flight: they go on after this process, "
                        "from their checkpoints (crash recovery)", len(self.runs))

    def stop(self) -> None:
        """Take no more runs: :meth:`serve` returns."""
        self._stop.set()
        self._wake.set()

    def _announce(self, resource: str) -> None:
        """A run (``prefect.flow-run.<id>``) was scheduled: read the scheduled runs now."""
        with contextlib.suppress(ValueError):
            run_id = UUID(resource.removeprefix("prefect.flow-run."))
            self._announced.setdefault(run_id, asyncio.get_running_loop().time())
        self._wake.set()

    def _look_again(self, taken: set[UUID]) -> None:
        """Wake again soon while a run announced lately cannot be taken yet."""
        now = asyncio.get_running_loop().time()
        self._announced = {run_id: since for run_id, since in self._announced.items()
                           if run_id not in taken and now - since < LOOK_FOR_S}
        if self._announced:
            asyncio.get_running_loop().call_later(LOOK_AGAIN_S, self._wake.set)

    async def _register(self) -> UUID:
        """The deployment, registered as ``serve()`` registers it (no work pool: runners
        that ask for its runs by its id execute them)."""
        # plan_flow's: the same entrypoint as Prefect's runner registers (self.flow's is
        # made inside RunHost.flow and could not be loaded from its file)
        deployment = await plan_flow.ato_deployment(name=self.deployment, tags=["planrun"],
                                                    description=self.description)
        deployment.work_pool_name = None
        deployment.work_queue_name = None
        deployment_id: UUID = await deployment.aapply()
        return deployment_id

    async def _take(self, client: Any, deployment_id: UUID) -> None:
        """Start each scheduled run there is room for, earliest first."""
        if self.limit is not None and len(self.runs) >= self.limit:
            return
        scheduled = await client.get_scheduled_flow_runs_for_deployments(
            deployment_ids=[deployment_id], scheduled_before=datetime.now(UTC))
        scheduled.sort(key=lambda run: run.next_scheduled_start_time or run.expected_start_time)
        # A run still held here (a resume right after its suspension) is not taken yet.
        self._look_again({run.id for run in scheduled if run.id not in self.runs})
        for flow_run in scheduled:
            if self.limit is not None and len(self.runs) >= self.limit:
                log.info("%d runs at once: the others wait for room", self.limit)
                return
            if flow_run.id not in self.runs:
                task = asyncio.create_task(self._run(flow_run.id))
                self.runs[flow_run.id] = task
                task.add_done_callback(partial(self._ended, flow_run.id))

    def _ended(self, run_id: UUID, _: asyncio.Task[None]) -> None:
        self.runs.pop(run_id, None)
        if self.limit is not None:
            self._wake.set()  # room for a run that waits for it

    async def _run(self, flow_run_id: UUID) -> None:
        """Claim the run (Pending) and run it here; nothing when another runner has."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import Abort, Pause
        from prefect.flow_engine import run_flow_async
        from prefect.states import Pending
        from prefect.utilities.engine import propose_state

        try:
            async with get_client() as client:
                try:
                    claimed = await propose_state(client, Pending(), flow_run_id=flow_run_id)
                except Abort:
                    return  # another runner took it first
                if not claimed.is_pending():
                    return
                flow_run = await client.read_flow_run(flow_run_id)
            await run_flow_async(self.flow, flow_run=flow_run, parameters=flow_run.parameters,
                                 return_type="state")
        except Pause:
            pass  # suspended (a pause, a gate): its resume is a scheduled run again
        except Abort as exc:
            log.warning("run %s: %s", flow_run_id, exc)  # it runs elsewhere now
        except Exception:
            log.exception("run %s ended with an error of the runner's own", flow_run_id)
        finally:
            self.host.reports.pop(str(flow_run_id), None)  # nobody here reads them


def serve(deployment: str, limit: int | None, description: str) -> None:
    """Run a ``LoopRunner`` until a signal, then exit at once: what runs in flight is left
    to crash recovery, not wound down here (see the module's docstring)."""
    poll_s = float(os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY", "") or 1.0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runner = LoopRunner(deployment, limit, poll_s, description)
    asyncio.run(_serve_then_leave(runner))


async def _serve_then_leave(runner: LoopRunner) -> None:
    await runner.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the runs' tasks are not cancelled: their states stay as they are
