"""Where planrun departs from a Prefect default, in one place, each with its reason.

Task options per step: ``Task.with_options`` runs ``Task.__init__``, which reads and hashes
the function's source each time (≈ 0.3 ms a step). ``task_with`` copies the task and sets
the few options a step changes instead; none of them feeds a derived attribute.

Tag concurrency: Prefect 3 asks the server for concurrency slots of every tag of every
task run (one HTTP round trip per step; on SQLite a locked database answers 503 and the
client waits ≈ 2 s). planrun tags each step ``planrun``, ``plan:<name>`` and
``tool:<tool>`` so runs can be found in the Prefect UI, not to limit them: those tags are
left out of the slot request. Any other tag (an operator's own limit) still goes to the
server. Set ``PLANRUN_PREFECT_TAG_LIMITS=1`` to send planrun's tags too.

Upstream steps as task inputs: Prefect's run graph draws an edge into a task run only from
its ``task_inputs``, which ``Task.__call__`` fills from futures and states passed to it
(and resolves them on the way: an upstream that did not complete fails the call). planrun
awaits each step directly and knows its upstream steps by task run id, so ``call_after``
calls Prefect's ``run_task`` with those ids as ``dependencies`` (docs/prefect-ui.md).

A step's tool call before its task run: Prefect's engine calls a task's function only
after it has started the task run (≈ 2 ms of the event loop, in one slice), and its caller
hears the result only after the engine has ended it. planrun starts a step's first attempt
beside the engine and hands a successful one's output on at once (flows/step.py,
``TaskRuns``). Not for a step whose tags Prefect limits (``asks_for_slots``): its call
waits for the engine's slot, as before.

A step that waits for a shared limit: its task run is running (Prefect's task engine is in
its function), yet it does not run. ``TaskRunShown`` records a ``Pending`` state named
``Waiting`` (its message says what for) while it waits and ``Running`` again when it starts,
as the engine records its own states: a state-change event, which the server's task run
recorder keeps when it is the newest. The engine's own record is not touched, and its next
state (``Completed``, ``Failed``) is newer and wins.

A suspension from outside: for every run of a deployment, Prefect's flow engine starts a
thread with an event loop, an API client and a subscription to the server's event stream
(with a poll every 10 s besides), to notice a ``Suspended`` state set from outside the run.
planrun's engine watches its flow run's state itself (flows/control.py: a pause, a
suspension, a cancel) and suspends itself at the next step boundary, so the ``planrun``
flow goes without that observer: at 50 runs in one runner it was a third of the runner's
CPU, and each subscription made the server match every event against one more filter
(BENCHMARKS.md, "Where the CPU went"). Other flows keep it.

The server's default result storage: Prefect reads it from the server at every flow run's
start (a new synchronous client and a blocking request on the event loop, for the run's
result store) and again for every checkpoint store. It is the server's configuration:
planrun reads it at most once a minute (``STORAGE_READ_S``); a failed read is not kept.

A suspended run is no error: Prefect's async flow engine logs the end of every flow run that
did not complete at ERROR (``Finished in state Suspended(...)``), a run suspended to wait for
a person too. ``SuspendedIsNoError`` logs that line at INFO and says what it means; the
run's own line before it says what it waits for (docs/prefect-ui.md).

A busy server's 503: Prefect's client waits 2 s before it asks again (4, 8, 16 after),
and on SQLite a run's create and its label update meet another write's lock often. The
bridge and the engine make those two calls through ``planrun/prefect_calls.py``
(``soon_again``): there the client leaves a 503 to planrun, which asks again after 50 ms.
That departure lives there, not here, because the bridge imports no flow engine.

Taking a scheduled run: Prefect's runner only polls for its deployment's scheduled runs.
Both of planrun's runners also ask when the server's event says one was scheduled
(``flows/scheduled.py``); the process-per-run one (``flows/serve.py``) asks through the
runner's private ``_get_and_submit_flow_runs``, the call its own poll loop makes.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any
from uuid import UUID

import httpx
import prefect.flow_engine as _flow_engine
import prefect.results as _results
import prefect.task_engine as _engine
from prefect._flow_run_suspension import (
    FlowRunSuspensionRequest,
    register_flow_run_suspension_request,
)
from prefect._internal.uuid7 import uuid7
from prefect.client.schemas.objects import RunInput, TaskRun, TaskRunResult
from prefect.context import TagsContext
from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import Pending, Running, State
from prefect.utilities.annotations import quote
from prefect.utilities.callables import get_call_parameters
from prefect.utilities.engine import emit_task_run_state_change_event

#: The name of planrun's Prefect flow (flows/plan_flow.py).
FLOW_NAME = "planrun"
_OWN_PREFIXES = ("tag:planrun", "tag:plan:", "tag:tool:")
_prefect_concurrency = _engine._aconcurrency
_prefect_suspension = _flow_engine.BaseFlowRunEngine.setup_flow_run_suspension_request


def own_tag(limit_name: str) -> bool:
    """Whether ``limit_name`` (``tag:<tag>``) is one of the tags planrun puts on steps."""
    return limit_name == "tag:planrun" or limit_name.startswith(_OWN_PREFIXES[1:])


@asynccontextmanager
async def _concurrency(names: str | list[str], *args: Any, **kwargs: Any) -> AsyncIterator[None]:
    listed = [names] if isinstance(names, str) else list(names)
    kept = [n for n in listed if not own_tag(n)]
    async with _prefect_concurrency(kept, *args, **kwargs):
        yield


def asks_for_slots(task: Any) -> bool:
    """Whether Prefect's engine asks the server for concurrency slots before it runs
    ``task``: it has a tag, its own or from a ``tags`` context, that is not planrun's (or
    ``PLANRUN_PREFECT_TAG_LIMITS=1`` sends planrun's too)."""
    named = set(task.tags) | set(TagsContext.get().current_tags)
    if _engine._aconcurrency is _concurrency:
        named = {tag for tag in named if not own_tag(f"tag:{tag}")}
    return bool(named)


#: The options ``task_with`` may set: plain attributes that ``Task.__init__`` stores as given.
TASK_OPTIONS = frozenset({"name", "task_run_name", "tags", "retries", "retry_delay_seconds",
                          "retry_condition_fn"})


def task_with(task: Any, **options: Any) -> Any:
    """A copy of ``task`` with ``options`` (a subset of TASK_OPTIONS) set."""
    unknown = set(options) - TASK_OPTIONS
    if unknown:
        raise TypeError(f"task_with cannot set {', '.join(sorted(unknown))}")
    clone = copy.copy(task)
    for key, value in options.items():
        setattr(clone, key, set(value) if key == "tags" else value)
    return clone


def new_task_run_id() -> UUID:
    """An id for a task run about to be created, as Prefect makes them (time-ordered)."""
    return uuid7()


def call_after(task: Any, upstream: Iterable[UUID], task_run_id: UUID, *args: Any,
               **kwargs: Any) -> Any:
    """What ``task(*args, **kwargs)`` returns (awaitable for an async task), run as the task
    run ``task_run_id`` whose ``task_inputs["wait_for"]`` names the task runs ``upstream``.

    Prefect joins ``dependencies`` only into input keys it made itself: the same inputs,
    quoted, passed as ``wait_for`` make the ``wait_for`` key and wait for nothing (Prefect
    neither collects nor resolves what is quoted: a constant ≈ 15 µs, where unquoted inputs
    cost ≈ 55 µs each to walk).
    """
    after: set[RunInput] = {TaskRunResult(id=run_id) for run_id in upstream}
    return _engine.run_task(task=task, task_run_id=task_run_id,
                            parameters=get_call_parameters(task.fn, args, kwargs),
                            wait_for=quote(list(after)) if after else None,
                            dependencies={"wait_for": after} if after else None,
                            return_type="result")


class TaskRunShown:
    """What the Prefect UI shows of a step's task run while the step waits for a limit.

    A step's first attempt starts before its task run does (flows/step.py): then the task
    run is ``attach``-ed once Prefect's engine has started it, and a wait still going on is
    shown from then on. A no-op for a task run never known."""

    def __init__(self, task_run: TaskRun | None) -> None:
        self._task_run = task_run
        self._shown: State[Any] | None = None
        self._message: str | None = None  # what it waits for, not shown yet

    def attach(self, task_run: TaskRun) -> None:
        """The task run is known now: show the wait, if the step still waits."""
        if self._task_run is None:
            self._task_run = task_run
            if self._message is not None:
                self.waiting(self._message)

    def waiting(self, message: str) -> None:
        """The task run is ``Pending``, named ``Waiting``, with ``message``."""
        self._message = message
        self._show(Pending(name="Waiting", message=message))

    def running(self) -> None:
        """The task run runs again, if it was shown waiting."""
        self._message = None
        if self._shown is not None:
            self._show(Running())
            self._shown = None

    def _show(self, state: State[Any]) -> None:
        run = self._task_run
        if run is None:
            return
        state.state_details.task_run_id, state.state_details.flow_run_id = run.id, run.flow_run_id
        emit_task_run_state_change_event(task_run=run.model_copy(update={"state": state}),
                                         initial_state=self._shown or run.state,
                                         validated_state=state)
        self._shown = state


class SuspendedIsNoError(logging.Filter):
    """Logs Prefect's ``Finished in state Suspended(...)`` (or ``Paused``) at INFO, saying
    that the run waits; every other record passes as it is."""

    ENDS = ("Finished in state Suspended", "Finished in state Paused")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and isinstance(record.msg, str) and \
                record.msg.startswith(self.ENDS):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = (f"{record.getMessage()}: the run waits, holding no process, and "
                          "goes on in a new one once it is answered or resumed")
            record.args = ()
        return True


#: How long the server's default result storage, once read, is taken as it was.
STORAGE_READ_S = 60.0
#: What a read of the server's default result storage may fail with (Prefect's own list).
_STORAGE_READ_FAILS = (PrefectHTTPStatusError, httpx.HTTPError, RuntimeError, ValueError)


class _ServerStorage:
    """The server's default result-storage block, as last read and when."""

    read_at: float | None = None
    block_id: UUID | None = None

    @classmethod
    def fresh(cls) -> bool:
        return cls.read_at is not None and time.monotonic() - cls.read_at < STORAGE_READ_S

    @classmethod
    def keep(cls, block_id: UUID | None) -> UUID | None:
        cls.read_at, cls.block_id = time.monotonic(), block_id
        return block_id


def _read_storage_block_id() -> UUID | None:
    """Prefect's ``_read_server_default_result_storage_block_id``, read once a minute."""
    from prefect.client.orchestration import get_client

    if _ServerStorage.fresh():
        return _ServerStorage.block_id
    try:
        configuration = get_client(sync_client=True).read_server_default_result_storage()
    except _STORAGE_READ_FAILS:
        return None  # local storage for now, as Prefect falls back; read again next time
    return _ServerStorage.keep(configuration.default_result_storage_block_id)


async def _aread_storage_block_id() -> UUID | None:
    """Prefect's ``_aread_server_default_result_storage_block_id``, read once a minute."""
    from prefect.client.orchestration import get_client

    if _ServerStorage.fresh():
        return _ServerStorage.block_id
    try:
        configuration = await get_client().read_server_default_result_storage()
    except _STORAGE_READ_FAILS:
        return None
    return _ServerStorage.keep(configuration.default_result_storage_block_id)


@contextmanager
def _suspension_request(engine: Any) -> Iterator[FlowRunSuspensionRequest]:
    """Prefect's ``setup_flow_run_suspension_request``, without its observer for planrun's
    flow: the request is kept where the engine's own ``Pause`` path looks for it."""
    if engine.flow.name != FLOW_NAME or engine.flow_run is None:
        with _prefect_suspension(engine) as request:
            yield request
        return
    request = engine._get_flow_run_suspension_request()
    with register_flow_run_suspension_request(engine.flow_run.id, request):
        request.raise_if_requested()
        yield request


def install() -> None:
    """Apply the departures above (idempotent)."""
    if os.environ.get("PLANRUN_PREFECT_TAG_LIMITS") != "1":
        _engine._aconcurrency = _concurrency  # type: ignore[assignment]
    flows: Any = _flow_engine.BaseFlowRunEngine
    flows.setup_flow_run_suspension_request = _suspension_request
    results: Any = _results
    results._read_server_default_result_storage_block_id = _read_storage_block_id
    results._aread_server_default_result_storage_block_id = _aread_storage_block_id
    flow_runs = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, SuspendedIsNoError) for f in flow_runs.filters):
        flow_runs.addFilter(SuspendedIsNoError())


def installed() -> bool:
    wrapper: AbstractAsyncContextManager[None] | Any = _engine._aconcurrency
    return wrapper is _concurrency
