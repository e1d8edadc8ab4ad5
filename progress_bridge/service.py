"""Run control: pause, resume, cancel, retry, and answers at approval gates.

Each control becomes a state of the run's Prefect flow run, so it works the same from the
bridge's routes, from the CLI and from the Prefect UI. A control the run's state does not
allow raises :class:`~planrun.errors.Conflict` with the reason, and an unknown run
:class:`~planrun.errors.NotFound`: the HTTP routes answer those with 409 and 404, the
bridge's timers (a pause that timed out, a gate no one answered) log them
(docs/http-api.md, docs/approvals.md).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from planrun.contract.control import CONTROL_LABEL, RETRY_LABEL, answer_form, is_asking_of
from planrun.errors import Conflict, NotFound
from planrun.progress_bridge.flow_runs import FlowRun, FlowRuns

#: How long an answer to an announced gate waits for the run to be suspended at it (the
#: run announces the gate, then suspends: about a second later, more on a loaded machine).
SUSPEND_WAIT_S = 30.0
#: How long a pause waits for the run's engine to say it took the pause in (it reads the
#: flow run's state every 0.5 s). A run without a living engine is answered after it.
HEARD_WAIT_S = 15.0


class ControlService:
    """Controls the runs behind ``flow_runs``."""

    def __init__(self, flow_runs: FlowRuns, suspend_wait_s: float = SUSPEND_WAIT_S,
                 heard_wait_s: float = HEARD_WAIT_S) -> None:
        self.flow_runs = flow_runs
        self.suspend_wait_s = suspend_wait_s
        self.heard_wait_s = heard_wait_s

    async def pause(self, run_id: str, ended: bool = False) -> None:
        """Pause at the next step boundary: steps already running finish, nothing new
        starts, then the run is suspended and holds no process until it is resumed.
        Returns once the run's engine has taken the pause in (it says so on the flow run):
        no step starts after that. A run whose engine does not say so within
        ``heard_wait_s`` (none is alive) is answered all the same. ``ended``: the run's
        stream says it has ended (its flow run ends a moment later)."""
        found = await self.flow_runs.read(run_id)
        if ended and not found.final:
            raise Conflict(f"run {run_id} has ended: only a running run can be paused")
        if found.kind == "PAUSED":
            raise Conflict(f"run {run_id} is already paused")
        if found.kind != "RUNNING":
            raise Conflict(f"run {run_id} is {found.state}: only a running run can be paused")
        paused = await self.flow_runs.set_state(run_id, "PAUSED", "paused by a person")
        if paused is not None:
            await self._once(run_id, lambda run: run.pause_heard == paused
                             or run.state_id != paused, self.heard_wait_s)

    async def resume(self, run_id: str) -> None:
        """Resume a paused run in a new process; finished steps are not run again. A run
        whose process crashed is started again the same way."""
        found = await self.flow_runs.read(run_id)
        if found.kind == "CRASHED":
            await self.flow_runs.set_state(run_id, "SCHEDULED",
                                           "resumed by a person after a crash")
            return
        if found.kind != "PAUSED":
            raise Conflict(f"run {run_id} is {found.state}: only a paused or crashed run "
                           "can be resumed")
        if found.waits_for_input:
            raise Conflict(f"run {run_id} is waiting for an approval: approve or reject "
                           "the step")
        await self.flow_runs.resume(run_id)

    async def cancel(self, run_id: str, ended: bool = False) -> None:
        """Cancel the run: running commands are killed, nothing new starts, the files it
        changed are rolled back. A paused run is resumed to do so, and ends cancelled.
        ``ended``: the run's stream says it has ended."""
        found = await self.flow_runs.read(run_id)
        if ended and not found.final:
            raise Conflict(f"run {run_id} has already ended")
        if found.final:
            raise Conflict(f"run {run_id} has already ended ({found.state})")
        if found.kind == "PAUSED":
            await self.flow_runs.label(run_id, {CONTROL_LABEL: "cancel"})
            # A run at a gate is resumed only with its form filled in: "no" (it ends
            # cancelled all the same).
            await self.flow_runs.resume(run_id, answer_form(False, "cancelled")
                                        if found.waits_for_input else None)
        elif found.kind in ("SCHEDULED", "PENDING"):  # no process yet: nothing to undo
            await self.flow_runs.set_state(run_id, "CANCELLED",
                                           "cancelled by a person before it started")
        else:
            await self.flow_runs.set_state(run_id, "CANCELLING", "cancelled by a person")

    async def retry(self, run_id: str, announced: bool = False) -> None:
        """Run an ended run again from where it went wrong: its flow run is scheduled
        again, and the runner starts it in a new process, which keeps the completed steps
        and runs the failed, skipped and cancelled ones (docs/retry.md). ``announced``: the
        run's stream says it has ended. Its flow run ends a moment later (the run's process
        rolls back and reports first); a retry asked in between waits for that end (up to
        ``suspend_wait_s``) instead of being refused."""
        found = await self.flow_runs.read(run_id)
        if announced and not found.final:
            found = await self._once(run_id, lambda run: run.final)
        check_retry(found)
        if not found.deployed:
            raise Conflict(f"run {run_id} ran in the process of `planrun run`: retry it "
                           f"from a terminal with `planrun retry {run_id}`")
        await self.flow_runs.label(run_id, {RETRY_LABEL: retry_request()})
        await self.flow_runs.set_state(run_id, "SCHEDULED", "retried by a person")

    async def answer(self, run_id: str, step_id: str, *, approved: bool, comment: str,
                     announced: bool = False) -> None:
        """Resume a run suspended at ``step_id``'s gate with the answer. It goes under the
        key of the suspension as it is now, so it answers this asking and no earlier one.
        ``announced``: the run's stream says it waits at this gate. The run suspends just
        after it says so; an answer that comes in between waits for the suspension (up to
        ``suspend_wait_s``) instead of being refused (docs/approvals.md)."""
        found = await self.flow_runs.read(run_id)
        if announced and found.kind == "RUNNING":
            found = await self._once(run_id, lambda run: run.kind != "RUNNING")  # suspended
        if not _asks(found, step_id):
            raise Conflict(f"run {run_id} is not waiting for an approval of {step_id} "
                           f"(it is {found.state})")
        await self.flow_runs.resume(run_id, answer_form(approved, comment))

    async def _once(self, run_id: str, done: Callable[[FlowRun], bool],
                    wait_s: float | None = None) -> FlowRun:
        """The flow run once ``done`` says so of it, or as it is when the wait
        (``wait_s``, by default ``suspend_wait_s``) is over."""
        deadline = time.monotonic() + (self.suspend_wait_s if wait_s is None else wait_s)
        while True:
            found = await self.flow_runs.read(run_id)
            if done(found) or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(0.1)

    async def declare_crashed(self, run_id: str, message: str,
                              state_id: str | None = None) -> bool:
        """Mark a run Crashed that is Running or Pending without a sign of life (a
        Scheduled run waits for a runner: left alone); with ``state_id``, only while that
        is its state (a process that has exited is taken for the run's only while the
        Running state it started under is the run's); whether it was marked."""
        found = await self.flow_runs.read(run_id)
        if found.kind not in ("RUNNING", "PENDING"):
            return False
        if state_id is not None and found.state_id != state_id:
            return False
        await self.flow_runs.set_state(run_id, "CRASHED", message)
        return True

    async def flow_run(self, run_id: str) -> FlowRun | None:
        """The run's flow run, or None when there is none."""
        try:
            return await self.flow_runs.read(run_id)
        except NotFound:
            return None

    async def recoverable(self, run_id: str) -> bool | None:
        """After a crash: whether a runner can start the run again (it belongs to a
        deployment; a run of ``planrun run`` ran in that command's process); None when it
        is no longer crashed (recovered already: a second report of one crash, or a person
        resumed it)."""
        try:
            found = await self.flow_runs.read(run_id)
        except NotFound:
            return False
        return found.deployed if found.kind == "CRASHED" else None

    async def recover(self, run_id: str, message: str) -> None:
        """Schedule a crashed run again: a runner starts it in a new process, which keeps
        the finished steps (their checkpoints) and runs again only those in flight."""
        await self.flow_runs.set_state(run_id, "SCHEDULED", message)


def retry_request() -> str:
    """A new retry request: the run takes each one once (docs/retry.md)."""
    return uuid.uuid4().hex


def check_retry(found: FlowRun) -> None:
    """Raise :class:`Conflict` with the reason when ``found`` cannot be retried: it has
    not ended, it completed, or its secret inputs are gone (docs/retry.md)."""
    run_id = found.id
    if not found.final:
        raise Conflict(f"run {run_id} is {found.state}: only a run that has ended "
                       "can be retried")
    if found.kind == "COMPLETED" and found.state == "completed":
        raise Conflict(f"run {run_id} completed: it has no failed, skipped or "
                       "cancelled step to run again")
    if found.secret_inputs:
        raise Conflict(f"run {run_id} had secret inputs, which were forgotten when it "
                       "ended: run the plan again")


def _asks(found: FlowRun, step_id: str) -> bool:
    """Whether ``found`` is suspended at ``step_id``'s gate, waiting for its answer."""
    return found.kind == "PAUSED" and found.waits_for_input and is_asking_of(found.pause_key,
                                                                               step_id)
