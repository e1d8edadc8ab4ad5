"""One step as one Prefect task run: render its parameters, call its tool, decide retries.

Retries are Prefect retries, so every attempt is visible in the Prefect UI. Prefect's own
retry settings cannot express planrun's policies (the limit depends on the error's
category, the delay on ``Retry-After``, and ``retry_jitter_factor`` does nothing for
tasks), so the decision is made here and handed to Prefect through
``retry_condition_fn``, which also sets the delay of the coming ``AwaitingRetry`` state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from uuid import UUID

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging.loggers import PrefectLogAdapter, get_logger
from prefect.states import Cancelled, Completed, Failed, State
from prefect.utilities.annotations import quote

from planrun import templates
from planrun.adapters.base import Adapter, StepContext
from planrun.adapters.usage import RunWrites, StepUsage, combined
from planrun.adapters.workspace import Workspace
from planrun.contract.status import StepStatus
from planrun.errors import ConfigurationError, StepError
from planrun.flows.breakers import Breakers, default_breakers
from planrun.flows.graph import FallbackCall
from planrun.flows.health import tool_unhealthy
from planrun.flows.limits import Ask, LimitSettings, StepLimits, Waiting, default_limiter
from planrun.flows.policy import RetryPolicy
from planrun.flows.prefect_compat import (
    TaskRunShown,
    asks_for_slots,
    call_after,
    new_task_run_id,
    task_with,
)
from planrun.flows.resources import Metering, default_metering
from planrun.flows.run_slots import RunSlots
from planrun.plan_schemas.model import Step
from planrun.policy import one_policy
from planrun.redact import Redactor, redact
from planrun.report import StepRecord
from planrun.sizes import describe


@dataclass
class StepJob:
    """Everything one step needs to run, shared by its attempts."""

    step: Step
    record: StepRecord
    adapter: Adapter
    policy: RetryPolicy
    timeout_s: float | None
    run_id: str
    workspace: Workspace
    memory_mb: int | None
    context: Callable[[], dict[str, Any]]
    notify: Callable[[StepRecord], None]
    #: Tried once the attempts are exhausted (its timeout already in seconds).
    fallback: FallbackCall | None = None
    #: The run's secret values: masked in the step's input, output and errors at the source.
    redactor: Redactor = field(default_factory=Redactor)
    #: The tools' circuit breakers (flows/breakers.py): this process's, shared by its runs.
    breakers: Breakers = field(default_factory=default_breakers)
    #: Why the tool failed its health check before the run started; None: healthy.
    unhealthy: str | None = None
    #: Measures what each tool call used (flows/resources.py): this process's.
    metering: Metering = field(default_factory=default_metering)
    #: What the run has written so far, against its workspace quota (docs/resources.md).
    writes: RunWrites = field(default_factory=RunWrites)
    #: The limits shared by every run of the machine (flows/limits.py): each call of a
    #: tool waits for its leave, and gives it back as soon as it returns.
    limits: StepLimits = field(default_factory=default_limiter)
    #: The run's own limits by tool (the plan's ``limits.tools``).
    run_limits: Mapping[str, LimitSettings] = field(default_factory=dict)
    #: The run's ``max_parallel`` slots: the step lends its own while it waits for a limit.
    slots: RunSlots | None = None
    #: Told each time the pending step waits for a limit (its record, why).
    on_wait: Callable[[StepRecord, Waiting], None] | None = None
    last_error: StepError | None = None
    next_delay: float | None = field(default=None, repr=False)
    #: The first attempt, started as the step was started, before its task run
    #: (``TaskRuns.run``); the task run's body awaits it.
    early: asyncio.Future[Any] | None = field(default=None, repr=False)
    #: Prefect's engine ending the step's task run after the output was handed on.
    tail: asyncio.Future[Any] | None = field(default=None, repr=False)
    #: The step's task run, once Prefect's engine has started it.
    task_run: TaskRun | None = field(default=None, repr=False)
    _shown: TaskRunShown | None = field(default=None, repr=False)  # the current call's
    #: Its engine's turns on the run's event loop (``TaskRuns``), if it takes them.
    turn: Turn | None = field(default=None, repr=False)
    _began: float = field(default=0.0, repr=False)  # when the current attempt began
    #: When the last attempt ended (its fallback included), before Prefect's bookkeeping.
    ended_at: float | None = field(default=None, repr=False)

    def prefect_task(self) -> Task[..., Any]:
        """The Prefect task of this step: named by its id, tagged, with its retries."""
        job = self

        def retry_condition(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
            # A plain function, as Prefect requires; the decision was made by attempt().
            if job.next_delay is None:
                return False
            task.retry_delay_seconds = job.next_delay  # type: ignore[assignment]
            return True

        return task_with(
            run_step,
            name=self.step.id,
            task_run_name=self.step.id,
            tags=["planrun", f"tool:{self.step.tool}"],
            retries=self.policy.most_attempts - 1,
            retry_delay_seconds=0,
            retry_condition_fn=retry_condition,
        )

    async def first_attempt(self) -> Any:
        """Attempt 1 under the operator's policy, as ``run_step`` runs the others."""
        with one_policy():
            return await self.attempt(1)

    def attach(self, task_run: TaskRun) -> None:
        """Prefect's engine has started the step's task run (``run_step``)."""
        self.task_run = task_run
        if self._shown is not None:
            self._shown.attach(task_run)
        if self.turn is not None:
            self.turn.give()

    async def attempt(self, number: int) -> Any:
        """Run attempt ``number`` (1-based); raise a StepError on failure.

        The step is ``running`` from the moment its tool is called: while the shared
        limits keep the call waiting it stays ``pending`` (``_call``). When the attempt
        ends is kept (``ended_at``): the step's end, if it is the last."""
        try:
            return await self._attempt(number)
        finally:
            self.ended_at = time.time()

    async def _attempt(self, number: int) -> Any:
        record = self.record
        self.next_delay = None
        if self.last_error is not None and self.last_error.category == "permission":
            await self.adapter.refresh_credentials()
        record.attempts = number
        record.retry_delay_s = None
        self._began = time.time()
        log = self._logger()
        try:
            params, left = await self._render(self.step.with_, self.timeout_s, ("with",))
            record.input = self.redactor.mask(redact(params))
            if number > 1:  # a first attempt that succeeds logs nothing, like any task
                log.info("%s: attempt %d with %s", self.step.tool, number, record.input)
            if self.unhealthy is not None:  # found before the run started (flows/health.py)
                raise tool_unhealthy(self.step.tool, self.unhealthy)
            output = await self.breakers.call(  # no call while the tool's breaker is open
                self.step.tool, params, self.run_id, left,
                partial(self._call, self.step.tool, self.adapter, params, left, number, log))
        except StepError as error:
            self._begin()  # failed before its call (a template, a breaker): it began all the same
            error.step_id, error.tool = self.step.id, self.step.tool
            self.redactor.scrub_error(error)  # before Prefect's task-run state gets it
            self.last_error = error
            record.error = error
            log.warning("attempt %d failed (%s): %s. %s", number, error.category, error.message,
                        error.hint)
            if self.policy.should_retry(error, number):
                self.next_delay = self.policy.delay(error, number)
                record.status = StepStatus.RETRYING
                record.retry_delay_s = self.next_delay
                self.notify(record)
                raise
            if self.fallback is not None:
                return await self._fallback(self.fallback, error, log)
            raise
        return self.redactor.mask(output)

    async def _call(self, tool: str, adapter: Adapter, params: Any, left: float | None,
                    number: int, log: logging.Logger | logging.LoggerAdapter[Any]) -> Any:
        """``adapter``'s call once the shared limits let it start. While they do not, the
        step is pending with a note and lends its run slot; it takes a slot back (before
        steps not started yet) once its wait is over. The limits are given back as soon
        as the call returns: a retry's delay holds nothing."""
        lent, shown, reason = False, TaskRunShown(self.task_run), ""
        self._shown = shown

        def waiting(why: Waiting) -> None:
            nonlocal lent, reason
            if not lent and self.slots is not None:
                self.slots.lend(self.step.id)
                lent = True
            if self.on_wait is not None:
                self.on_wait(self.record, why)
            if why.reason != reason:  # the Prefect UI: a new reason, not a new count
                reason = why.reason
                shown.waiting(why.note)

        ask = Ask.of(tool, params, self.run_id, self.step.id, self.run_limits)
        async with self.limits.hold(ask, waiting):
            if lent and self.slots is not None:
                await self.slots.take_back(self.step.id)
            shown.running()
            self._begin()
            return await self._metered(adapter, params, number, log, left)

    def _begin(self) -> None:
        """The step is running (its note, if it waited, is gone). It started when its
        first attempt began, or, if that attempt waited for a limit, when the wait ended."""
        record = self.record
        if record.status == StepStatus.RUNNING:
            return
        if record.started_at is None:
            record.started_at = time.time() if record.note is not None else self._began
        record.status, record.note = StepStatus.RUNNING, None
        self.notify(record)

    async def _fallback(self, fallback: FallbackCall, error: StepError,
                        log: logging.Logger | logging.LoggerAdapter[Any]) -> Any:
        try:
            params, left = await self._render(dict(fallback.with_), fallback.timeout_s,
                                              ("fallback", "with"))
            log.info("attempts exhausted; trying the fallback %s", fallback.tool)
            output = await self.breakers.call(
                fallback.tool, params, self.run_id, left,
                partial(self._call, fallback.tool, fallback.adapter, params, left,
                        self.record.attempts, log))
        except StepError as fallback_error:
            self.redactor.scrub_error(fallback_error)
            log.warning("the fallback failed too: %s", fallback_error.message)
            error.message = f"{error.message}; fallback {fallback.tool} also failed: " \
                            f"{fallback_error.message}"
            error.args = (error.message,)
            raise error from fallback_error
        log.info("completed by the fallback %s", fallback.tool)
        self.record.fallback_used = True
        self.record.error = None
        return self.redactor.mask(output)

    async def _render(self, params: dict[str, Any], timeout: float | None,
                      where: tuple[str, ...]) -> tuple[Any, float | None]:
        """``params`` rendered off the event loop, inside the step's ``timeout`` (so a slow
        template counts against it, and a cancel or the run deadline stops it), and the
        seconds of the timeout left for the tool."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        path = ("steps", self.step.id, *where)
        try:
            async with asyncio.timeout(timeout):
                rendered = await templates.render_async(params, self.context(), path,
                                                        seconds=timeout)
        except TimeoutError:
            raise ConfigurationError(
                f"rendering the templates of {'.'.join(path)} took longer than the step's "
                f"timeout of {timeout:g}s", hint="make the template do less work",
                step_id=self.step.id, tool=self.step.tool) from None
        except templates.TemplateError as exc:
            raise ConfigurationError(str(exc), hint="fix the template in the step's 'with:'",
                                     step_id=self.step.id, tool=self.step.tool) from None
        left = None if timeout is None else max(timeout - (loop.time() - started), 0.001)
        return rendered, left

    def _context(self, number: int, log: Any) -> StepContext:
        return StepContext(run_id=self.run_id, step_id=self.step.id, workspace=self.workspace,
                           attempt=number, previous_error=self.last_error,
                           memory_mb=self.memory_mb, logger=log, usage=StepUsage(self.writes),
                           redactor=self.redactor, task_run_id=self.record.task_run_id)

    async def _metered(self, adapter: Adapter, params: Any, number: int, log: Any,
                       timeout: float | None) -> Any:
        """``adapter.run`` measured (flows/resources.py): what it used is added to the
        step's ``resources``; an in-process tool over its memory limit is stopped."""
        ctx = self._context(number, log)
        meter = self.metering.meter(in_process=adapter.in_process, memory_mb=self.memory_mb)
        try:
            with meter:
                return await adapter.run(params, ctx, timeout)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if meter.stopped_at is None or task is None:
                raise
            task.uncancel()  # stopped by the watchdog, not by a person or the run
            raise meter.stopped_error(adapter.name) from None
        finally:
            self.record.resources = combined(self.record.resources, meter.resources(ctx.usage))

    def used(self) -> str | None:
        """What the step used, in words ("used 42.0 MiB peak, ..."); None if unmeasured."""
        return describe(self.record.resources) if self.record.resources is not None else None

    def _logger(self) -> logging.Logger | logging.LoggerAdapter[Any]:
        """The step's task run logger: its lines reach the Prefect UI on the task run, also
        those of a first attempt that began before Prefect's engine started the task run."""
        flow = FlowRunContext.get()
        run = flow.flow_run if flow is not None else None
        if TaskRunContext.get() is not None or run is None or self.record.task_run_id is None:
            return _logger()
        return PrefectLogAdapter(get_logger("prefect.task_runs"), extra={
            "task_run_id": str(self.record.task_run_id), "flow_run_id": str(run.id),
            "task_run_name": self.step.id, "task_name": self.step.id,
            "flow_run_name": run.name, "flow_name": flow.flow.name if flow and flow.flow else "?"})

    def log_used(self) -> None:
        """Say in the step's log what it used, once it has finished."""
        if (used := self.used()) is not None:
            _logger().info("%s", used)


def _logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    """The task run's logger (its lines reach the Prefect UI), or a plain one outside Prefect."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("planrun.step")


@task(name="step", cache_policy=NO_CACHE, persist_result=False)
async def run_step(job: StepJob) -> Any:
    """The body of every step's task run: one attempt of ``job``.

    What a finished step used is in its log (docs/resources.md): the message of its
    ``Completed`` state, which Prefect logs ("Finished in state Completed('used …')")
    and the UI shows; a line of its own for any other end. A log line costs the run's
    loop ≈ 0.9 ms and the server one more request (BENCHMARKS.md).
    """
    context = TaskRunContext.get()
    number = context.task_run.run_count if context and context.task_run else 1
    if context is not None and context.task_run is not None:
        job.attach(context.task_run)
    try:
        if number == 1 and job.early is not None:
            output = await job.early  # began with the step (TaskRuns.run)
            if job.turn is not None:
                await job.turn.take_to_end()
        else:
            with one_policy():  # the operator's policy is looked for once an attempt
                output = await job.attempt(number)
    except asyncio.CancelledError:
        # Stopped on purpose (a critical failure elsewhere, the deadline, a person): end
        # the task run Cancelled rather than Crashed; the caller passes the cancel on.
        job.log_used()
        return Cancelled(message="cancelled while running")
    except BaseException:
        if job.next_delay is None:  # no retry follows: the step has finished
            job.log_used()
        raise
    return Completed(data=output, message=job.used())


@task(name="not-run", cache_policy=NO_CACHE, persist_result=False)
async def not_run_step(step_id: str, reason: str, failed: bool) -> State[Any]:
    """A task run that records, in the Prefect UI, a step that did not run and why: Skipped,
    or Failed when it could not even be decided (a ``when`` that cannot be evaluated)."""
    if failed:
        return Failed(message=reason)
    return Completed(name="Skipped", message=reason)


#: How long a handed-on task run's end waits for its step's driver (``Turn``).
CALLER_WAIT_S = 1.0


class Turn:
    """One engine's turns on its run's lock (``TaskRuns``): to start its task run, and to
    end it. Each is taken for a turn of the event loop of its own, also when no other
    engine waits: an engine's start or end is ≈ 2–3 ms of the loop without a pause, and a
    wide plan's engines all at once would keep every tool call, and every step that
    ends, waiting behind them. The end is taken once ``caller`` (the step's driver) is
    done with the step, so that the steps that needed it have started by then."""

    def __init__(self, turns: asyncio.Lock, caller: asyncio.Task[Any] | None) -> None:
        self._turns, self._caller, self._held = turns, caller, False

    async def take(self) -> None:
        await self._turns.acquire()
        self._held = True
        await asyncio.sleep(0)

    async def take_to_end(self) -> None:
        if self._caller is not None:  # (bounded: a caller that outlives its step holds no end)
            await asyncio.wait([self._caller], timeout=CALLER_WAIT_S)
        await self.take()

    def give(self) -> None:
        if self._held:
            self._held = False
            self._turns.release()


class TaskRuns:
    """Runs each step as a Prefect task run (its attempts as Prefect retries) and records
    each skip as one; each names the task runs of its needs as inputs (docs/prefect-ui.md).

    A step's first attempt starts at once, beside Prefect's engine starting its task run,
    whose body then awaits it; once it has succeeded, its output is handed on while the
    engine ends the task run (``job.tail``, awaited before the run ends or pauses). Prefect's
    bookkeeping of a task run (≈ 2 ms to start one, ≈ 3 ms to end one, on the run's event
    loop) thus neither delays a tool call nor the steps that need its output
    (docs/prefect-ui.md, BENCHMARKS.md). A failed first attempt, and every later one, runs
    as before: Prefect's retries, the step's end when its task run has ended."""

    def __init__(self) -> None:
        self._turns = asyncio.Lock()

    async def run(self, job: StepJob, upstream: list[UUID]) -> Any:
        """The step's output; raises when it failed, ``CancelledError`` when cancelled."""
        job.record.task_run_id = new_task_run_id()
        task = job.prefect_task()
        if asks_for_slots(task):  # an operator's Prefect tag limit: no call before its slot
            job.early = None
            return await self._ended(await call_after(task, upstream, job.record.task_run_id,
                                                      quote(job)))
        early = job.early = asyncio.ensure_future(job.first_attempt())
        engine = asyncio.ensure_future(self._engine(job, task, upstream,
                                                    asyncio.current_task()))
        try:
            await asyncio.wait((early, engine), return_when=asyncio.FIRST_COMPLETED)
            if early.done() and not early.cancelled() and early.exception() is None:
                job.tail = engine
                return early.result()
            output = await engine
        except asyncio.CancelledError:
            engine.cancel()
            early.cancel()
            await asyncio.gather(engine, early, return_exceptions=True)
            raise
        finally:
            if not early.done():  # the engine ended without running the body
                early.cancel()
                await asyncio.gather(early, return_exceptions=True)
        return await self._ended(output)

    @staticmethod
    async def _ended(output: Any) -> Any:
        """The step's output from what its task run returned."""
        if isinstance(output, State):  # what run_step returned, as returned
            if output.is_cancelled():
                raise asyncio.CancelledError  # the step's task run ended Cancelled
            return await output.aresult()  # Completed: the output is its data
        return output

    async def _engine(self, job: StepJob, task: Task[..., Any], upstream: list[UUID],
                      caller: asyncio.Task[Any] | None) -> Any:
        """Prefect's engine running the step's task run, taking its turns (``Turn``): the
        tool calls of the steps started in the same turn of the loop as this one begin
        before any of their engines does."""
        turn = job.turn = Turn(self._turns, caller)
        try:
            await turn.take()
            assert job.record.task_run_id is not None
            return await call_after(task, upstream, job.record.task_run_id, quote(job))
        finally:
            turn.give()

    async def skip(self, step: Step, record: StepRecord, upstream: list[UUID]) -> None:
        """Record, as a task run, that ``step`` did not run and why."""
        record.task_run_id = new_task_run_id()
        await call_after(task_with(not_run_step, name=step.id, task_run_name=step.id,
                                   tags=["planrun", f"tool:{step.tool}"]),
                         upstream, record.task_run_id,
                         step.id, record.reason or "", record.status == StepStatus.FAILED)
