"""The bridge's timers: background jobs run later, and the rules that act on time through
the control service: a pause that timed out (``limits.pause_timeout``), a gate no one
answered in time, and a run whose process stopped sending heartbeats.

A control the run's state no longer allows (a :class:`~planrun.errors.Conflict`) is
logged: the run moved on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from planrun.contract.control import TIMED_OUT
from planrun.errors import Conflict, NotFound
from planrun.progress_bridge.runs import RunView
from planrun.progress_bridge.service import ControlService

log = logging.getLogger("planrun.bridge")


class Later:
    """Background jobs; :meth:`close` cancels and waits for every one left."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def soon(self, delay: float, job: Callable[[], Awaitable[Any]]) -> asyncio.Task[Any]:
        """Run ``job`` after ``delay`` seconds; a failure is logged."""
        async def later() -> None:
            await asyncio.sleep(delay)
            await job()

        task = asyncio.get_running_loop().create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Deadlines:
    """Acts when a run's pause or gate times out, or its process falls silent."""

    def __init__(self, views: dict[str, RunView], control: ControlService, later: Later,
                 dead_after_s: float) -> None:
        self.views = views
        self.control = control
        self.later = later
        self.dead_after_s = dead_after_s
        self.alive: dict[str, float] = {}  # the last sign of life of each run (epoch s)

    def watch(self, run_id: str, view: RunView) -> None:
        """Time the view's pause and gate, if it has them."""
        if view.ended:
            return
        if view.pause_deadline is not None:
            wait = max(0.0, view.pause_deadline.deadline - time.time())
            self.later.soon(wait, lambda: self.pause_timed_out(run_id))
        if view.gate is not None and view.gate.deadline is not None:
            step_id, wait = view.gate.step_id, max(0.0, view.gate.deadline - time.time())
            self.later.soon(wait, lambda: self.gate_timed_out(run_id, step_id))

    async def pause_timed_out(self, run_id: str) -> None:
        """``limits.pause_timeout`` passed: the run is cancelled, or resumed
        (``on_pause_timeout``)."""
        view = self.views.get(run_id)
        deadline = view.pause_deadline if view is not None else None
        if view is None or deadline is None or view.record.status != "paused":
            return
        if time.time() < deadline.deadline:
            return  # paused again since, with a later deadline
        log.info("run %s: the pause timed out; %s", run_id, deadline.action)
        act = self.control.resume if deadline.action == "resume" else self.control.cancel
        await self._control(run_id, deadline.action, act(run_id))

    async def gate_timed_out(self, run_id: str, step_id: str) -> None:
        """No answer in time: the gate is answered "no", and the step is skipped."""
        view = self.views.get(run_id)
        if view is None or view.ended or view.gate is None or view.gate.step_id != step_id:
            return
        log.info("run %s: no answer at the gate of %s in time", run_id, step_id)
        await self._control(run_id, "rejection", self.control.answer(
            run_id, step_id, approved=False, comment=TIMED_OUT))

    def seen_alive(self, run_id: str, at: float) -> None:
        self.alive[run_id] = max(self.alive.get(run_id, 0.0), at)

    def check_alive(self, run_id: str, view: RunView, now: float) -> None:
        """A running run sends a heartbeat every few seconds; one silent for
        ``dead_after_s`` lost its process with its host (or everything was killed at once,
        Prefect's server included): it is marked Crashed, and so recovered. So is a run a
        runner took (Pending) but did not start in that time."""
        if not view.record.status.holds_process:
            return  # a paused run, or one waiting at a gate, holds no process
        last = self.alive.setdefault(run_id, now)  # first seen now: give it time
        if now - last < self.dead_after_s:
            return
        self.alive[run_id] = now  # once per silence
        silent = now - last
        self.later.soon(0, lambda: self._declare_crashed(run_id, silent))

    async def _declare_crashed(self, run_id: str, silent_s: float) -> None:
        message = f"no sign of life for {silent_s:.0f}s"
        if await self.control.declare_crashed(run_id, message):
            log.warning("run %s has not been heard of for %.0fs: marked crashed", run_id,
                        silent_s)

    async def _control(self, run_id: str, what: str, action: Awaitable[None]) -> None:
        try:
            await action
        except (Conflict, NotFound) as exc:
            log.info("run %s: no %s after its deadline: %s", run_id, what, exc)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a background job of the bridge failed: %s", task.exception())
