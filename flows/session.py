"""One run of a compiled plan in this process: its state in one object.

A ``RunSession`` owns the run's record, its step jobs and its scheduler; everything with
an effect outside it (events, checkpoints, what people ask, the workspace, how a step is
executed) comes in as ``flows.parts.RunParts``. ``Sessions`` is the registry of the
sessions a process runs, owned by whoever must reach them all (a SIGTERM handler).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from prefect.exceptions import Abort, Pause

from planrun.adapters.usage import RunWrites
from planrun.contract.status import RunStatus, StepStatus
from planrun.errors import CheckpointUnreadable, PlanrunError
from planrun.flows.control import TIMED_OUT
from planrun.flows.graph import RunGraph, StepNode
from planrun.flows.health import unhealthy_tools
from planrun.flows.limits import Waiting
from planrun.flows.parts import EventSink, RunParts
from planrun.flows.scheduler import Scheduler
from planrun.flows.step import StepJob
from planrun.plan_schemas.model import Step
from planrun.report import RunObserver, StepRecord, StepsView
from planrun.secrets import RunSecrets

if TYPE_CHECKING:
    from planrun.adapters.workspace import Workspace

log = logging.getLogger("planrun.session")


class RunSession:
    """Runs ``graph`` once as the run ``run_id`` with ``parts``.

    ``can_ask``: a gate may make the run wait until a person answers (a deployment's run,
    suspended; or, when the control source ``waits_here``, in this process); otherwise a
    gate's step is rejected. ``started_at``: when the run first started (a
    resumed run keeps it). ``observers`` are told of every change.
    """

    def __init__(self, graph: RunGraph, run_id: str, parts: RunParts, *,
                 inputs: dict[str, Any] | None = None, secrets: RunSecrets | None = None,
                 observers: Iterable[RunObserver] = (), can_ask: bool = False,
                 started_at: float | None = None, flow_run_url: str | None = None) -> None:
        self.graph = graph
        self.parts = parts
        self.inputs = inputs or {}
        self.secrets = secrets or RunSecrets()
        self.observers = list(observers)
        self.started_at = started_at
        self.run = graph.new_record(run_id)
        self.run.redactor = self.secrets.redactor
        self.run.flow_run_url = flow_run_url
        #: The report, once the run has ended.
        self.report: dict[str, Any] | None = None
        #: Why the run stopped before it began: a checkpoint it could not read, or a retry
        #: whose files cannot be put back.
        self.unreadable: PlanrunError | None = None
        self.segment = 1
        self.events: EventSink | None = None
        self.artifacts = parts.artifacts(self.run)
        self._steps_view = StepsView(self.run.steps)
        #: What the run's tools wrote, against its workspace quota (docs/resources.md).
        self.writes = RunWrites()
        self._waits: dict[str, str] = {}  # step id -> what it waits for, as last announced
        self._gate_wait: asyncio.Future[None] | None = None  # a gate waited at here
        self.jobs = {node.id: self._job(node) for node in graph.steps.values()}
        gates = any(node.approval is not None for node in graph.steps.values())
        self.scheduler = Scheduler(
            self.run, graph.checked_steps(), max_parallel=graph.limits.max_parallel,
            execute=self._execute, skip=self._skip, notify=self._notify,
            context=self._context, decide=self._decide if can_ask and gates else None,
            pressure=parts.limits.pressure)
        for job in self.jobs.values():
            job.slots = self.scheduler.slots

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def cancel(self, reason: str = "cancelled by a person") -> None:
        """End the run cancelled: running steps are cancelled, files rolled back; a gate
        it waits at in this process stops waiting."""
        self.scheduler.stop(reason, cancelled=True)
        if self._gate_wait is not None:
            self._gate_wait.cancel()

    async def run_to_end(self) -> dict[str, Any]:
        """Run the plan and return its report (kept as ``report`` too).

        When the run starts again (a resumed pause, an answered gate, a recovered crash),
        the steps that had finished are restored from their checkpoints and not run again;
        a checkpoint that cannot be read stops the run instead. When a run that had ended
        starts again, it is a retry: only its completed steps are restored, and the files
        its end rolled back are put back as it left them (docs/retry.md). A pause or a gate
        that takes effect raises Prefect's ``Pause``: the run is suspended, and this process
        should end; a gate the control source ``waits_here`` for is answered in this
        process, and the run goes on here.
        """
        restored = await self._begin()
        await self._check_tools()
        await self._start(restored)
        while await self._run_until_paused():
            await self._suspend()  # returns only when a gate was answered in this process
            self.scheduler.go_on()
        self.report = self.run.to_report()
        return self.report

    async def _run_until_paused(self) -> bool:
        """Run the scheduler until every step has finished (the run is then finished too)
        or a pause took effect; whether it paused."""
        watching = asyncio.ensure_future(self.parts.control.watch())
        try:
            await self.scheduler.run_all(self.graph.limits.deadline_s)
        except asyncio.CancelledError:
            self.scheduler.stop("cancelled", cancelled=True)
            raise
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await self._settle()
            if not self.scheduler.suspended:
                await self._finish()
        return self.scheduler.suspended

    async def _settle(self) -> None:
        """Wait for Prefect's engine to end the task runs of the steps whose output was
        handed on before (flows/step.py, ``TaskRuns``): the run ends or pauses after them."""
        tails = [job.tail for job in self.jobs.values() if job.tail is not None]
        for job in self.jobs.values():
            job.tail = None
        for failed in await asyncio.gather(*tails, return_exceptions=True):
            if isinstance(failed, BaseException):
                log.warning("Prefect's engine failed to end a step's task run: %r", failed)

    async def _begin(self) -> list[str]:
        """Count this start and restore what finished before; the steps restored."""
        checkpoints = self.parts.checkpoints
        try:
            self.segment = await checkpoints.begin(self.parts.control.retry_request)
            restored = await checkpoints.load(self.run.steps) if self.segment > 1 else []
        except CheckpointUnreadable as exc:
            self.unreadable = exc
            self.scheduler.stop(str(exc))  # nothing starts: each step is skipped
            restored = []
        if checkpoints.retrying and self.unreadable is None:
            try:
                self.parts.workspace.redo()
            except PlanrunError as exc:  # the run's files are in another workspace
                self.unreadable = exc
                self.scheduler.stop(f"cannot retry: {exc}")
            # A gate whose step runs again is asked again: an earlier "no" does not count.
            await self.parts.control.forget_askings(
                sid for sid, node in self.graph.steps.items()
                if node.approval is not None and sid not in restored)
        self.events = self.parts.events(self.run, self.segment)
        kept = (self.run.steps[step_id].resources for step_id in restored)
        self.writes.written = sum(used.written_bytes for used in kept if used is not None)
        return restored

    async def _check_tools(self) -> None:
        """Ask the health of the tools this run uses (flows/health.py): the steps of an
        unhealthy one fail at their first attempt, before any call, with the reason."""
        nodes = self.graph.steps.values()
        adapters = [n.adapter for n in nodes] + [n.fallback.adapter for n in nodes if n.fallback]
        sick = await unhealthy_tools(adapters)
        for job in self.jobs.values():
            job.unhealthy = sick.get(job.step.tool)

    async def _start(self, restored: list[str]) -> None:
        assert self.events is not None
        control = self.parts.control
        control.attach(self.scheduler, self.events.heartbeat)
        self.scheduler.news = control.news
        self.run.status = RunStatus.RUNNING
        self.run.started_at = self.started_at or time.time()
        if self.segment > 1 and self.unreadable is None and await control.cancel_requested():
            self.scheduler.stop("cancelled while paused", cancelled=True)
        self.artifacts.start()
        if self.segment > 1:
            self.events.resumed(restored, self.parts.checkpoints.retry if
                                self.parts.checkpoints.retrying else None)
        else:
            self.events.started()
        self._notify(None)

    async def _finish(self) -> None:
        run, scheduler = self.run, self.scheduler
        if scheduler.superseded:  # the run's end, files and secrets are that process's
            raise Abort(f"{scheduler.stop_reason}: this process stops and leaves the run "
                        "to it")
        run.status = RunStatus.FAILED if self.unreadable is not None else run.final_status(
            cancelled=scheduler.cancelled, deadline_passed=scheduler.deadline_passed)
        run.reason = scheduler.stop_reason
        workspace = self.parts.workspace
        if run.status in (RunStatus.FAILED, RunStatus.CANCELLED):
            run.rolled_back = workspace.rollback()
            left = workspace.left_note()  # another run's later change is not undone
            run.reason = f"{run.reason}; {left}" if run.reason and left else run.reason or left
        else:
            workspace.commit()
        run.ended_at = time.time()
        await self.secrets.forget_stored()  # before anyone hears that the run has ended
        await self.parts.checkpoints.end()
        self._notify(None)
        if self.events is not None:
            self.events.ended()
        await self.artifacts.finish()

    async def _suspend(self) -> None:
        """Suspend at the gate asked for, or for a person's pause; raises ``Pause``. What
        ran has finished and is checkpointed; the files stay as they are."""
        assert self.events is not None
        run, control = self.run, self.parts.control
        reason = self.scheduler.pause_reason or "paused"
        gate = self.scheduler.gate
        self.report = run.to_report()
        if gate is not None:
            approval = self.graph.steps[gate].approval
            assert approval is not None
            run.steps[gate].status = StepStatus.AWAITING_APPROVAL
            run.status, run.reason = RunStatus.AWAITING_APPROVAL, reason
            self._notify(None)
            self.events.awaiting_approval(gate, approval.prompt, approval.timeout_s)
            if control.waits_here:
                await self._wait_here(gate, approval.prompt, approval.timeout_s)
                return
            await self.artifacts.finish()
            await control.ask(gate, approval.prompt)  # raises Pause
        run.status, run.reason = RunStatus.PAUSED, reason
        self._notify(None)
        limits = self.graph.limits
        self.events.paused(reason, limits.pause_timeout_s, limits.on_pause_timeout)
        await self.artifacts.finish()
        raise Pause(state=await control.suspend(f"pause-{self.segment}", reason))

    async def _wait_here(self, gate: str, prompt: str, timeout_s: float | None) -> None:
        """Wait in this process for the gate's answer (``planrun run`` on a terminal); the
        run then goes on as it would in a new process: the answer is read at the gate."""
        assert self.events is not None
        control = self.parts.control
        self._gate_wait = asyncio.ensure_future(control.ask(gate, prompt, timeout_s))
        try:
            await self._gate_wait
        except asyncio.CancelledError:
            if not self.scheduler.cancelled:
                raise  # not our own cancel (``cancel``): pass it on
        finally:
            self._gate_wait = None
        if not self.scheduler.cancelled and await control.cancel_requested():
            self.scheduler.stop("cancelled while paused", cancelled=True)
        self.run.status, self.run.reason = RunStatus.RUNNING, None
        self._notify(None)
        self.events.resumed([])

    async def _execute(self, step: Step) -> None:
        job = self.jobs[step.id]
        record = job.record
        try:
            record.output = await self.parts.steps.run(job, self._upstream(step))
            record.status, record.error = StepStatus.COMPLETED, None
        except Exception:  # noqa: BLE001 - the StepError is already on the record
            record.status = StepStatus.FAILED
        finally:
            record.note = None  # it waits no longer (also when cancelled while it waited)
        record.ended_at = job.ended_at or time.time()  # its last attempt's end
        checkpoints = self.parts.checkpoints  # the checkpoint is kept before it is announced
        if not checkpoints.saved_at_once(record):
            await _uncancelled(checkpoints.save(record))
        self._notify(record)

    async def _skip(self, step: Step) -> None:
        record = self.run.steps[step.id]
        await self.parts.steps.skip(step, record, self._upstream(step))
        if not self.scheduler.stop_reason:  # a skip for a run that stops is not kept
            await self.parts.checkpoints.save(record)

    async def _decide(self, step: Step) -> tuple[str, bool] | None:
        """None to run the gated ``step``, else why it is skipped; without an answer yet,
        the run pauses at the gate and this never returns (it is cancelled)."""
        answer = await self.parts.control.decision(step.id)
        if answer is None:
            record = self.run.steps[step.id]
            record.status = StepStatus.AWAITING_APPROVAL
            self._notify(record)
            self.scheduler.pause(f"awaiting approval of {step.id}", gate=step.id)
            await asyncio.Event().wait()
        assert answer is not None
        approved, comment = answer
        self.run.steps[step.id].status = StepStatus.PENDING
        if approved:
            return None
        if comment == TIMED_OUT:
            return TIMED_OUT, True
        return "rejected" + (f": {comment}" if comment else ""), True

    def _upstream(self, step: Step) -> list[UUID]:
        """The task runs of the steps ``step`` needs: its inputs in Prefect's run graph. A
        step restored from a checkpoint older than its task run id has none to name."""
        found = (self.run.steps[need].task_run_id for need in step.needs)
        return [task_run_id for task_run_id in found if task_run_id is not None]

    def _waiting(self, record: StepRecord, waiting: Waiting) -> None:
        """The step waits for a limit (flows/limits.py): it is pending with the note; when
        what it waits for changes, whoever follows the run hears it (once, not on every
        check: the note's count of steps ahead is kept fresh on the record)."""
        if self.scheduler.superseded:
            return
        same = record.status == StepStatus.PENDING and record.note is not None and \
            self._waits.get(record.id) == waiting.reason
        record.status, record.note = StepStatus.PENDING, waiting.note
        if same:
            return
        self._waits[record.id] = waiting.reason
        self._notify(record)
        if self.events is not None:
            self.events.waiting(record, waiting.why)

    def _notify(self, step: StepRecord | None) -> None:
        if self.scheduler.superseded:  # another process tells of the run now
            return
        for observer in list(self.observers):
            observer.changed(self.run, step)
        self.artifacts.changed()
        if self.events is not None and step is not None:
            self.events.changed(step)

    def _context(self) -> dict[str, Any]:
        """What the run's templates read."""
        return {"inputs": self.inputs, "run": {"id": self.run_id, "plan": self.graph.name},
                "steps": self._steps_view, "secrets": self.secrets.view()}

    def _job(self, node: StepNode) -> StepJob:
        # Tools that touch files get the real Workspace; the in-memory one of flows.fakes
        # goes with tools that do not (adapters/fake.py).
        return StepJob(step=node.step, record=self.run.steps[node.id], adapter=node.adapter,
                       policy=node.retry, timeout_s=node.timeout_s, run_id=self.run_id,
                       workspace=cast("Workspace", self.parts.workspace),
                       memory_mb=node.memory_mb, context=self._context,
                       notify=self._notify, fallback=node.fallback,
                       redactor=self.run.redactor, writes=self.writes, limits=self.parts.limits,
                       run_limits=self.graph.limits.tools, on_wait=self._waiting)


async def _uncancelled(write: Coroutine[Any, Any, None]) -> None:
    """Finish ``write`` even when this task is cancelled meanwhile (a critical failure
    elsewhere stops the run): a checkpoint cut short by a cancel would leave a completed
    step with no checkpoint, or an empty one, and it would run again. The cancel goes on
    once the write is done."""
    writing = asyncio.ensure_future(write)
    try:
        await asyncio.shield(writing)
    except asyncio.CancelledError:
        await writing
        raise


class Sessions:
    """The run sessions of one process, by run id: what a signal handler cancels."""

    def __init__(self) -> None:
        self._running: dict[str, RunSession] = {}

    @contextmanager
    def running(self, session: RunSession) -> Iterator[RunSession]:
        """Keep ``session`` here while it runs."""
        self._running[session.run_id] = session
        try:
            yield session
        finally:
            self._running.pop(session.run_id, None)

    def __len__(self) -> int:
        return len(self._running)

    def cancel_all(self, reason: str = "cancelled by a person") -> None:
        """Cancel every run of this process (Ctrl-C, SIGTERM)."""
        for session in list(self._running.values()):
            session.cancel(reason)
