"""The bridge's timers: background jobs run later, and the rules that act on time through
the control service: a pause that timed out (``limits.pause_timeout``), a gate no one
answered in time, and a run whose process stopped sending heartbeats or, on this machine,
has exited.

A control the run's state no longer allows (a :class:`~planrun.errors.Conflict`) is
logged: the run moved on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from planrun.contract.control import TIMED_OUT
from planrun.contract.events import RunProcess
from planrun.contract.status import RunStatus
from planrun.errors import Conflict, NotFound
from planrun.processes import alive, this_place
from planrun.progress_bridge.runs import RunView
from planrun.progress_bridge.service import ControlService

log = logging.getLogger("planrun.bridge")

#: How often the bridge looks whether a running run's process, if it runs on this machine,
#: still does.
PROCESS_LOOK_S = 1.0


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
                 dead_after_s: float,
                 recall: Callable[[str], Awaitable[int]] | None = None,
                 quiet_s: float | None = None) -> None:
        self.views = views
        self.control = control
        self.later = later
        self.dead_after_s = dead_after_s
        #: Silent this long, a run has its events read once (its last ones may be lost).
        self.quiet_s = quiet_s
        self._read_quiet: dict[str, float] = {}  # the silence (its start) read for each run
        #: Reads a run's events from Prefect's API, delivering those not seen yet.
        self.recall = recall
        self.alive: dict[str, float] = {}  # the last sign of life of each run (epoch s)
        self._asking: set[str] = set()  # silent runs whose events are being read
        self.here = this_place()
        self.processes: dict[str, _Process] = {}  # the process each run last said runs it
        self.exited: dict[str, set[RunProcess]] = {}  # found gone: a late word is old news

    def watch(self, run_id: str, view: RunView) -> None:
        """Time the view's pause and gate, if it has them."""
        if view.ended:
            for known in (self.alive, self.processes, self.exited, self._read_quiet):
                known.pop(run_id, None)
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

    def seen_alive(self, run_id: str, at: float, process: RunProcess | None = None) -> None:
        """A sign of life of the run at ``at``, from ``process`` when the event names it."""
        self.alive[run_id] = max(self.alive.get(run_id, 0.0), at)
        if process is None or process in self.exited.get(run_id, ()):
            return
        known = self.processes.get(run_id)
        if known is not None and known.process == process:
            known.at = max(known.at, at)
        elif known is None or at >= known.at:  # a newer process (a late word of an older one: not)
            self.processes[run_id] = _Process(process, at)

    def restored(self, run_id: str, view: RunView) -> None:
        """A view saved before the bridge restarted: the process it named is looked at on
        the next tick, as if it had just been heard from (it has not: no sign of life)."""
        self.watch(run_id, view)
        if view.process is not None and view.record.status.holds_process:
            self.processes.setdefault(run_id, _Process(view.process, 0.0))

    def check_alive(self, run_id: str, view: RunView, now: float) -> None:
        """A running run sends a heartbeat every few seconds; one silent for
        ``dead_after_s`` lost its process with its host (or everything was killed at once,
        Prefect's server included): it is marked Crashed, and so recovered. So is a run a
        runner took (Pending) but did not start in that time. A running run whose process
        ran here and has exited is marked Crashed at once."""
        if run_id in self._asking:
            return
        if not view.record.status.holds_process:
            self.processes.pop(run_id, None)  # suspended: its next process says so
            return  # a paused run, or one waiting at a gate, holds no process
        last = self.alive.setdefault(run_id, now)  # first seen now: give it time
        exited = self._exited(run_id, view, now)
        if exited is not None:
            self.later.soon(0, lambda: self._declare_crashed(
                run_id, f"its process {exited.pid} has exited", exited.state_id))
            return
        if now - last < self.dead_after_s:
            self._check_quiet(run_id, last, now)
            return
        self._asking.add(run_id)
        self.later.soon(0, lambda: self._silent(run_id, last, now))

    def _check_quiet(self, run_id: str, last: float, now: float) -> None:
        """A run silent for ``quiet_s`` (not yet for ``dead_after_s``) has its events read
        once per silence: the stream may have lost its last events, and with them its end
        (a bridge that took over a moment after they occurred, a subscriber that fell
        behind), and no later event of the run would show the gap."""
        if (self.quiet_s is None or self.recall is None or now - last < self.quiet_s
                or self._read_quiet.get(run_id) == last):
            return
        self._read_quiet[run_id] = last
        recall = self.recall
        self.later.soon(0, lambda: self._read_events(recall, run_id))

    @staticmethod
    async def _read_events(recall: Callable[[str], Awaitable[int]], run_id: str) -> None:
        try:
            if await recall(run_id):
                log.info("run %s: silent on the stream; its events read back", run_id)
        except Exception as exc:  # noqa: BLE001 - the silence rule reads them again later
            log.warning("run %s: its events could not be read: %s", run_id, exc)

    async def _silent(self, run_id: str, last: float, now: float) -> None:
        """The run has been silent from ``last`` to ``now``, as far as the stream says;
        before it is taken for dead, its events are read from Prefect's API. A loaded server drops
        events for a subscriber that falls behind (the bridge reads them back later), and
        under 200 runs at once on 2 cores that took live runs for dead ones (BENCHMARKS.md,
        "Many runs at once")."""
        try:
            if self.recall is not None:
                try:
                    await self.recall(run_id)
                except Exception as exc:  # noqa: BLE001 - Prefect's API may blink: crashed
                    log.warning("run %s: its events could not be read: %s", run_id, exc)
                if self.alive.get(run_id, 0.0) > last:
                    log.info("run %s: silent on the stream, but its events show it alive",
                             run_id)
                    return
            # Its events may not be in Prefect yet: a loaded server ingests them late (a
            # run that had started 23 s before was taken for dead). A change of its state
            # is a sign of life too, and so is its process, named on its flow run, when it
            # runs here and has not exited.
            found = await self.control.flow_run(run_id)
            changed = found.since if found is not None else None
            if changed is not None and changed > last:
                self.alive[run_id] = changed
                log.info("run %s: silent, but its state changed %.0f s ago", run_id,
                         now - changed)
                return
            process = found.process if found is not None else None
            if process is not None and process.place == self.here and \
                    alive(process.pid, process.started):
                self.seen_alive(run_id, time.time(), process)
                log.info("run %s: silent, but its process %d runs", run_id, process.pid)
                return
            self.alive[run_id] = now  # once per silence
            # Only in the state looked at: one that came meanwhile is a sign of life.
            await self._declare_crashed(run_id, f"no sign of life for {now - last:.0f}s",
                                        found.state_id if found is not None else None)
        finally:
            self._asking.discard(run_id)

    def _exited(self, run_id: str, view: RunView, now: float) -> RunProcess | None:
        """The running run's process, if it ran here and has exited (looked at once a
        ``PROCESS_LOOK_S``); then forgotten, so that it is acted on once."""
        known = self.processes.get(run_id)
        if (known is None or view.record.status != RunStatus.RUNNING
                or known.process.place != self.here or now - known.looked < PROCESS_LOOK_S):
            return None
        known.looked = now
        if alive(known.process.pid, known.process.started):
            return None
        del self.processes[run_id]
        self.exited.setdefault(run_id, set()).add(known.process)
        return known.process

    async def _declare_crashed(self, run_id: str, message: str,
                               state_id: str | None = None) -> None:
        if await self.control.declare_crashed(run_id, message, state_id):
            log.warning("run %s: %s: marked crashed", run_id, message)

    async def _control(self, run_id: str, what: str, action: Awaitable[None]) -> None:
        try:
            await action
        except (Conflict, NotFound) as exc:
            log.info("run %s: no %s after its deadline: %s", run_id, what, exc)


@dataclass
class _Process:
    """The process a run last said runs it, said at ``at``; when it was last looked at."""

    process: RunProcess
    at: float
    looked: float = 0.0


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a background job of the bridge failed: %s", task.exception())
