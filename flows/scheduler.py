"""Scheduling one plan run's DAG in asyncio.

Every step waits for exactly its own ``needs`` (no polling, no level-by-level waves) and
starts the moment the last of them finishes, within ``max_parallel``. A critical failure,
the run deadline or a person's cancel stops the run: nothing new starts, running steps
are cancelled, the rest are skipped. The scheduler knows nothing of Prefect: it calls
``execute`` to run a step and ``skip`` to record one that will not run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from planrun import templates
from planrun.contract.status import StepStatus
from planrun.errors import ConfigurationError
from planrun.flows.run_slots import RunSlots
from planrun.graph import remaining_paths
from planrun.plan_schemas.model import Step
from planrun.report import RunRecord, StepRecord

Execute = Callable[[Step], Awaitable[None]]
#: Asks for the step's approval: None to run it, else why it is skipped (and that it counts
#: as an error). It may never return: the run then suspends at the gate.
Decide = Callable[[Step], Awaitable[tuple[str, bool] | None]]
Skip = Callable[[Step], Awaitable[None]]
Notify = Callable[[StepRecord | None], None]
#: Takes in what people asked of the run (a pause, a cancel) up to this moment.
News = Callable[[], Awaitable[None]]
#: Which load threshold the machine is over, in words; None when it is not.
Pressure = Callable[[], str | None]


def longest_path_first(steps: list[Step], run: RunRecord) -> list[Step]:
    """``steps`` ordered by the estimated time from their start to the end of the run,
    longest first: when many steps are ready at once, the critical path starts first."""
    remaining = remaining_paths({s.id: s.needs for s in steps},
                                {s.id: run.steps[s.id].estimate_s for s in steps})
    order = {s.id: i for i, s in enumerate(steps)}
    return sorted(steps, key=lambda s: (-remaining.get(s.id, 0.0), order[s.id]))


class Scheduler:
    """Runs the steps of ``run`` in dependency order; see the module docstring."""

    def __init__(self, run: RunRecord, steps: list[Step], *, max_parallel: int,
                 execute: Execute, skip: Skip, notify: Notify,
                 context: Callable[[], dict[str, Any]], decide: Decide | None = None,
                 news: News | None = None, pressure: Pressure | None = None) -> None:
        self.run = run
        self.steps = {s.id: s for s in longest_path_first(steps, run)}
        self.execute = execute
        self.skip_step = skip
        self.notify = notify
        self.context = context
        self.decide = decide or _no_one_to_ask
        self.news = news
        self.pressure = pressure
        self.approved: set[str] = set()
        #: The step whose approval gate paused the run, if one did.
        self.gate: str | None = None
        #: The run's ``max_parallel`` slots; a step waiting for a limit lends its own.
        self.slots = RunSlots(max_parallel)
        self.done = {sid: asyncio.Event() for sid in self.steps}
        self.running: dict[str, asyncio.Task[None]] = {}
        self.skipping: set[str] = set()
        self.stop_reason: str | None = None
        self.cancelled = False
        #: Another process runs the run now (``supersede``): what is left is its to do.
        self.superseded = False
        self.deadline_passed = False
        # Pausing: nothing new starts while _go is clear; once what runs has finished,
        # ``drained`` is set and run_all returns with ``suspended`` true.
        self._go = asyncio.Event()
        self._go.set()
        self.drained = asyncio.Event()
        self.suspended = False
        self.pause_reason: str | None = None

    async def run_all(self, deadline_s: float | None = None) -> None:
        """Run every step; returns when each one is finished, or when the run was paused
        and what ran has finished (``suspended`` is then true and the rest waits)."""
        loop = asyncio.get_running_loop()
        timer = None
        if deadline_s is not None:
            timer = loop.call_later(deadline_s, self._deadline, deadline_s)
        everything: asyncio.Future[Any] = asyncio.gather(
            *(self._drive(step) for step in self.steps.values()))
        drained: asyncio.Future[Any] = asyncio.ensure_future(self.drained.wait())
        try:
            await asyncio.wait({everything, drained}, return_when=asyncio.FIRST_COMPLETED)
            if everything.done():
                everything.result()
            else:  # paused: every driver still waiting is blocked at the gate, or on needs
                self.suspended = True
                everything.cancel()
                await asyncio.gather(everything, return_exceptions=True)
        finally:
            drained.cancel()
            if not everything.done():
                everything.cancel()
            if timer:
                timer.cancel()

    def pause(self, reason: str, gate: str | None = None) -> None:
        """Start nothing new; once what runs has finished, ``run_all`` returns suspended.
        ``gate``: the step whose approval is asked for (the first one asked, if several)."""
        if self.stop_reason is not None:
            return
        if gate is not None and self.gate is None:
            self.gate = gate
        self.pause_reason = self.pause_reason or reason
        self._go.clear()
        self._check_drained()

    def unpause(self) -> None:
        """Take back a pause that has not taken effect yet."""
        if not self.drained.is_set():
            self.pause_reason = None
            self._go.set()

    def go_on(self) -> None:
        """After a pause that ended in this process (a gate answered while the run waited
        here), ``run_all`` goes on from where it stopped: the steps not finished wait for
        their needs again, and the gate is asked for its answer anew."""
        self.suspended = False
        self.pause_reason = None
        self.gate = None
        self.drained.clear()
        for step_id, done in self.done.items():
            if not self.run.steps[step_id].status.finished:
                done.clear()
        self._go.set()

    def _check_drained(self) -> None:
        if not self._go.is_set() and not self.running and not self.skipping:
            self.drained.set()

    def stop(self, reason: str, *, cancelled: bool = False) -> None:
        """Start nothing new and cancel what runs; the first reason given is kept."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.cancelled = cancelled
        self._go.set()  # a stop overrides a pause: the steps waiting at the gate are skipped
        for task in list(self.running.values()):
            task.cancel()

    def supersede(self, reason: str) -> None:
        """Another process runs the run now: cancel what runs here (commands killed) and
        record nothing more, neither the steps left (that process runs them) nor a skip."""
        self.superseded = True
        self.stop(reason, cancelled=True)

    def _deadline(self, seconds: float) -> None:
        if self.stop_reason is None:
            self.deadline_passed = True
            self.stop(f"the run deadline of {seconds:g}s passed")

    async def _drive(self, step: Step) -> None:
        record = self.run.steps[step.id]
        try:
            if record.status.finished:
                return  # restored from its checkpoint: it ran before a pause or a crash
            for need in step.needs:
                await self.done[need].wait()
            reason = await self._run_when_allowed(step)
            if self.superseded:
                return
            if reason is not None:
                record.reason, record.error_caused_skip = reason
                record.status = StepStatus.FAILED if record.error else StepStatus.SKIPPED
                self.skipping.add(step.id)  # a pause waits for the skip to be recorded
                try:
                    await self.skip_step(step)
                finally:
                    self.skipping.discard(step.id)
                    self._check_drained()
                self.notify(record)
            if record.status == StepStatus.FAILED and record.critical:
                self.stop(f"critical step {step.id} failed")
        finally:
            self.done[step.id].set()

    async def _run_when_allowed(self, step: Step) -> tuple[str, bool] | None:
        """Run ``step`` once the run is not paused and a slot is free; or why not."""
        while True:
            await self._go.wait()  # nothing starts, or is skipped, while the run pauses
            if self.news is not None:
                await self.news()  # a pause asked for by now holds this step back
                if not self._go.is_set():
                    continue
            reason = self._why_not(step)
            if reason is not None:
                return reason
            if step.approval is not None and step.id not in self.approved:
                reason = await self.decide(step)  # returns only once there is an answer
                if reason is not None:
                    return reason
                self.approved.add(step.id)
                continue  # the run may have been paused or stopped meanwhile
            async with self.slots.hold(step.id):
                if not self._go.is_set():
                    continue  # paused while waiting for a slot
                reason = self._why_not(step) or self._degraded(step)
                if reason is None:
                    await self._execute(step)
                return reason

    async def _execute(self, step: Step) -> None:
        # The step runs in its own driving task (no task more per step); stop() cancels it.
        driver = asyncio.current_task()
        assert driver is not None
        self.running[step.id] = driver
        try:
            await self.execute(step)
        except asyncio.CancelledError:
            record = self.run.steps[step.id]
            if not record.status.finished:
                record.status = StepStatus.CANCELLED
                record.ended_at = time.time()
                record.reason = self.stop_reason or "cancelled"
                self.notify(record)
            if self.stop_reason is None:  # cancelled from outside, not by us: pass it on
                raise
            driver.uncancel()  # our own cancel, handled: the driver goes on to finish
        finally:
            self.running.pop(step.id, None)
            self._check_drained()

    def _why_not(self, step: Step) -> tuple[str, bool] | None:
        """Why ``step`` will not run (reason, counts as an error), or None to run it.

        A condition that cannot be evaluated also sets the record's error: the step then
        counts as failed, not skipped.
        """
        if self.stop_reason is not None:
            return f"not started: {self.stop_reason}", False
        if step.when is None:
            for need in step.needs:
                upstream = self.run.steps[need]
                if upstream.status != StepStatus.COMPLETED:
                    verb = {StepStatus.FAILED: "failed", StepStatus.CANCELLED: "was cancelled"
                            }.get(upstream.status, "was skipped")
                    caused = upstream.status != StepStatus.SKIPPED or upstream.error_caused_skip
                    return f"upstream {need} {verb}", caused
            return None
        try:
            if self._condition(step):
                return None
        except templates.TemplateError as exc:
            record = self.run.steps[step.id]
            record.error = ConfigurationError(f"cannot evaluate 'when': {exc}",
                                              hint="fix the step's 'when:' condition",
                                              step_id=step.id, tool=step.tool)
            return "its condition could not be evaluated", True
        return f"condition is false: {step.when}", False

    def _degraded(self, step: Step) -> tuple[str, bool] | None:
        """Why a ``degrade: skip`` step is skipped as it would start: the machine is
        under pressure (docs/limits.md); None otherwise."""
        if step.degrade != "skip" or self.pressure is None:
            return None
        why = self.pressure()
        return (f"skipped under load: {why}", False) if why is not None else None

    def _condition(self, step: Step) -> bool:
        if isinstance(step.when, bool):
            return step.when
        assert step.when is not None
        value = templates.render(templates.condition(step.when), self.context())
        return templates.truthy(value)


async def _no_one_to_ask(step: Step) -> tuple[str, bool]:
    """A run that cannot wait at a gate (not a deployment run: ``planrun run`` without a
    terminal, or outside Prefect) has no one to ask: the step never runs unasked."""
    return ("rejected: no one can be asked in this run; run it on a terminal, or submit "
            "the plan to a stack (`planrun up`, `planrun submit`), to be asked"), True
