"""What people ask of a running run from outside: pause, resume, cancel.

Every request is a state of the run's Prefect flow run, so planrun's API, the CLI and the
Prefect UI's own buttons all work the same way:

- **pause**: a ``Paused`` state (``POST /v1/runs/{id}/pause`` sets one; so does the
  Prefect UI's "change state"). Prefect itself ignores a Paused state set from outside; the
  engine watches for it (every ``POLL_S``), starts nothing new, says so on the flow run
  (the label ``planrun.pause-heard``, after which the bridge answers the pause), lets
  running steps finish, then suspends the flow run (``Suspended``: a pause that holds no
  process) and its process exits.
- **resume**: Prefect's resume of the suspended run (``POST .../resume``, the UI's Resume
  button) schedules it; a runner starts the flow again in a new process, which restores
  the finished steps from their checkpoints (``flows.checkpoints``) and goes on. A resume
  that arrives before the pause took effect takes the pause back.
- **cancel**: a ``Cancelling`` state; a runner passes it on as SIGTERM, which the engine
  turns into a clean cancel (commands killed, files rolled back), and the engine also
  notices the state itself. A paused run is cancelled by resuming it with the label
  ``planrun.control=cancel``: its new process rolls the files back and ends Cancelled.

A gate (docs/approvals.md) asks by suspending the flow run with a form, under a key with a
fresh nonce, and says in the run's log what is asked and how to answer. A run without a
runner to start it again (``planrun run`` on a terminal) waits at the gate in its own
process instead: the flow run is ``Paused`` with the same key and form, and the answer,
from the terminal or from anywhere else, is Prefect's resume of it, as for a suspension.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple
from uuid import UUID

from planrun.contract.control import (  # the names the bridge shares (docs/approvals.md)
    APPROVE,
    CONTROL_LABEL,
    PAUSE_HEARD_LABEL,
    REJECT,
    RETRY_LABEL,
    answer_form,
    asking_key,
    is_asking_of,
)
from planrun.contract.control import TIMED_OUT as TIMED_OUT  # flows.session still takes it here
from planrun.contract.events import RunProcess
from planrun.flows.checkpoints import Checkpoints
from planrun.flows.parts import GateAsker
from planrun.flows.scheduler import Scheduler

log = logging.getLogger("planrun.control")

POLL_S = 0.5
#: How often a running run says it is alive (``planrun.run.heartbeat``).
HEARTBEAT_S = 5.0


def answer_of(inputs: Iterable[Any], base_key: str) -> tuple[bool, str] | None:
    """The answer among a gate's flow-run inputs (``base_key``: ``suspended-`` and the
    asking's key), or None if there is none that counts.

    It counts only if it was written after the asking's form: both stamps are the Prefect
    server's, so no clock but one is compared.
    """
    from prefect.input.run_input import keyset_from_base_key

    keys = keyset_from_base_key(base_key)
    found = {item.key: item for item in inputs}
    form, response = found.get(keys["schema"]), found.get(keys["response"])
    if response is None:
        return None
    if form is None or form.created is None or response.created is None \
            or response.created < form.created:
        log.warning("an answer under %s older than its asking is ignored", base_key)
        return None
    try:
        data = json.loads(response.value)
    except ValueError:
        data = None
    approved = _approved(data)
    if approved is None:
        log.warning("an answer under %s is not an approval form's: ignored", base_key)
        return None
    assert isinstance(data, dict)
    return approved, str(data.get("comment") or "")


def _approved(data: Any) -> bool | None:
    """The form's decision: ``decision`` approve or reject; a gate asked by a planrun
    from before that field has ``approved`` true or false instead. None: not a form."""
    if not isinstance(data, dict):
        return None
    decision = data.get("decision")
    if decision in (APPROVE, REJECT):
        return bool(decision == APPROVE)
    if decision is None and isinstance(data.get("approved"), bool):
        return bool(data["approved"])
    return None


def approval_input() -> Any:
    """The form a person answers (the Prefect UI renders it from this model): the decision
    is a required choice without a default, so a form sent untouched answers nothing."""
    from prefect.input import RunInput
    from pydantic import Field

    class Approval(RunInput):
        decision: Literal["approve", "reject"] = Field(
            title="Decision", description="approve: the step runs; reject: it is skipped")
        comment: str = Field(default="", title="Comment",
                             description="why, for the run's report")

    return Approval


def asking_text(run_id: str, step_id: str, prompt: str, here: bool = False) -> str:
    """What the run's log says at a gate: what is asked and every way to answer it."""
    lines = [f"Waiting for approval of step {step_id!r}: {prompt}",
             "Answer it in one of these ways; the first answer counts:",
             "- here in the Prefect UI: Resume (top right), choose approve or reject, Submit",
             f"- on a command line: planrun approve {run_id} {step_id}   "
             "(--reject to skip the step, --comment to say why)"]
    bridge = os.environ.get("PLANRUN_BRIDGE_URL", "").rstrip("/")
    if bridge:
        lines.append(f"- on the run's live page: {bridge}/v1/runs/{run_id}/view")
    if here:
        lines.append("- in the terminal that runs it (planrun run)")
    return "\n".join(lines)


#: The state types of a run that goes on as it is: nobody asks anything of it.
GOING_ON = ("RUNNING", "PENDING", "SCHEDULED")
#: The most runs one read of ``FlowRunStates`` covers (the endpoint's own cap).
STATES_PAGE = 1000
#: The most runs one full read covers (the server's default cap on a filter).
FULL_PAGE = 200
#: How often ``FlowRunStates`` reads its runs in full, labels and all: which process
#: runs each one (``PROCESS_LABEL``), for ``RunControl``'s fence.
FULL_READ_S = 5.0
#: The state types a running run's flow run is in only once this process no longer runs
#: it: taken for dead (Crashed), scheduled again, claimed by a runner (Pending), or ended
#: by another process (docs/production.md, "Crash recovery").
TAKEN_OVER = ("CRASHED", "SCHEDULED", "PENDING", "COMPLETED", "FAILED")


class Seen(NamedTuple):
    """A flow run as a read saw it: its state, and its labels when the read had them."""

    state: Any
    labels: dict[str, Any] | None = None

    @classmethod
    def of(cls, flow_run: Any) -> Seen:
        """A flow run read in full."""
        return cls(flow_run.state, dict(flow_run.labels or {}))


class FlowRunStates:
    """The states of many flow runs, read in one request every ``poll_s`` while any is
    asked for: a process that executes many runs (``flows.worker``) asks the server once
    per poll, not once per run (200 runs polling on their own: 400 requests a second).

    One request reads only each run's state type (``/ui/flow_runs/history``: the
    Prefect UI's own, without the runs' parameters, which hold their plans). A run that
    goes on (``GOING_ON``) gets a bare state of its type, which is all ``RunControl``
    reads of it; only a run that was asked something (a pause, a cancel) is read in full.
    Every ``full_read_s`` all of them are read in full, in one request, for their labels.
    """

    def __init__(self, poll_s: float = POLL_S, full_read_s: float = FULL_READ_S) -> None:
        self.poll_s = poll_s
        self.full_read_s = full_read_s
        self._asked: dict[UUID, list[asyncio.Future[Seen | None]]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._last_full: float | None = None  # on the loop's clock

    async def next(self, run_id: UUID) -> Seen | None:
        """The run as the next read sees it, or None when it could not be read."""
        future: asyncio.Future[Seen | None] = asyncio.get_running_loop().create_future()
        self._asked.setdefault(run_id, []).append(future)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        return await future

    async def _poll(self) -> None:
        from prefect.client.orchestration import get_client

        loop = asyncio.get_running_loop()
        if self._last_full is None:
            self._last_full = loop.time()
        async with get_client() as client:
            while self._asked:
                asked, self._asked = self._asked, {}
                full = loop.time() - self._last_full >= self.full_read_s
                if full:
                    self._last_full = loop.time()
                states = await self._read(client, list(asked), full)
                for run_id, futures in asked.items():
                    for future in futures:
                        if not future.done():  # its reader was cancelled meanwhile
                            future.set_result(states.get(run_id))
                await asyncio.sleep(self.poll_s)

    async def _read(self, client: Any, run_ids: list[UUID], full: bool = False
                    ) -> dict[UUID, Seen]:
        """The runs as one read sees them: ``full``, with their labels."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.client.schemas.objects import StateType
        from prefect.states import State

        seen: dict[UUID, Seen] = {}
        size = FULL_PAGE if full else STATES_PAGE
        try:
            for start in range(0, len(run_ids), size):
                page = run_ids[start:start + size]
                if full:
                    for flow_run in await client.read_flow_runs(
                            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)),
                            limit=size):
                        seen[flow_run.id] = Seen.of(flow_run)
                    continue
                response = await client._client.post(  # noqa: SLF001 - no public call reads it
                    "/ui/flow_runs/history",
                    json={"flow_runs": {"id": {"any_": [str(run_id) for run_id in page]}},
                          "limit": STATES_PAGE})
                response.raise_for_status()
                for row in response.json():
                    kind = StateType(row["state_type"])
                    if kind.value in GOING_ON:
                        seen[UUID(row["id"])] = Seen(State(type=kind))
                    else:
                        flow_run = await client.read_flow_run(UUID(row["id"]))
                        seen[flow_run.id] = Seen.of(flow_run)
        except Exception as exc:  # noqa: BLE001 - the API may blink: ask again
            log.warning("cannot read the states of %d runs: %s", len(run_ids), exc)
        return seen


class RunControl:
    """Watches one run's flow-run state and tells its scheduler; with ``states``, reads
    it there (with the other runs of this process) instead of on its own."""

    def __init__(self, run_id: str, scheduler: Scheduler | None = None, poll_s: float = POLL_S,
                 beat: Callable[[], None] | None = None, asker: GateAsker | None = None,
                 waits_here: bool = False, states: FlowRunStates | None = None,
                 owner: RunProcess | None = None) -> None:
        self.run_id = UUID(run_id)
        self._scheduler = scheduler
        self.poll_s = poll_s
        self.states = states
        #: Gates wait in this process (a run no runner starts again: ``planrun run``)
        #: instead of suspending the run; ``asker`` asks a person here meanwhile.
        self.waits_here = waits_here
        self.asker = asker
        self.beat = beat  # a sign of life every HEARTBEAT_S, for the bridge's crash rule
        #: This process, as it named itself on the flow run of a deployment's run (which
        #: a runner may start again elsewhere): the run stops here once another runs it.
        self.owner = owner
        # Each gate's nonce is kept with the run's checkpoints, in Prefect's result storage
        # (under the data directory by default): outside the workspace, so no step can
        # write it, and not in the flow run, whose labels and states anything that reaches
        # the Prefect API can set. It outlives the process that suspends at the gate.
        self.gates = Checkpoints(run_id)
        self._heard: str | None = None  # the Paused state last acknowledged
        self._acks: set[asyncio.Future[None]] = set()

    def attach(self, scheduler: Scheduler, beat: Callable[[], None] | None = None) -> None:
        """Tell ``scheduler`` what people ask of the run; ``beat`` is called every
        ``HEARTBEAT_S`` while ``watch`` runs."""
        self._scheduler = scheduler
        self.beat = beat

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("RunControl.attach(scheduler) was not called")
        return self._scheduler

    async def news(self) -> None:
        """Nothing to read before a step starts: ``watch`` takes a pause in and says so on
        the flow run (``PAUSE_HEARD_LABEL``), and the bridge answers a pause only once it
        has (docs/http-api.md). A server round trip before every step would cost each step
        a read behind the server's backlog of events (BENCHMARKS.md, cost per step)."""

    async def _seen(self, client: Any) -> Seen | None:
        """The run's flow run, or None when it cannot be read: from ``states`` (whose
        next read is up to ``poll_s`` away), else read now."""
        if self.states is not None:
            return await self.states.next(self.run_id)
        try:
            flow_run = await client.read_flow_run(self.run_id)
        except Exception as exc:  # noqa: BLE001 - the API may blink: ask again
            log.warning("cannot read the state of run %s: %s", self.run_id, exc)
            return None
        return Seen.of(flow_run)

    async def _pause_polling(self) -> None:
        """Wait between two reads of the state (``states`` spaces its reads itself)."""
        if self.states is None:
            await asyncio.sleep(self.poll_s)

    async def cancel_requested(self) -> bool:
        """Whether the run was asked to end cancelled while it was paused."""
        return await self._label(CONTROL_LABEL) == "cancel"

    async def retry_request(self) -> str | None:
        """The request to retry the run (the ``planrun.retry`` label), if one was made."""
        return await self._label(RETRY_LABEL)

    async def _label(self, name: str) -> str | None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            flow_run = await client.read_flow_run(self.run_id)
        value = dict(flow_run.labels or {}).get(name)
        return str(value) if value is not None else None

    async def watch(self) -> None:
        """Poll the flow run's state until cancelled (by the engine, when the run ends)."""
        from prefect.client.orchestration import get_client

        loop = asyncio.get_running_loop()
        last_beat = loop.time()
        async with get_client() as client:
            while True:
                if self.beat is not None and loop.time() - last_beat >= HEARTBEAT_S:
                    self.beat()
                    last_beat = loop.time()
                seen = await self._seen(client)
                if seen is not None:
                    self._react(seen.state, seen.labels)
                await self._pause_polling()

    def _react(self, state: Any, labels: dict[str, Any] | None = None) -> None:
        kind = state.type.value
        scheduler = self.scheduler
        taken = self._taken_over(state, labels)
        if taken is not None:
            log.warning("run %s: %s; this process stops", self.run_id, taken)
            scheduler.supersede(taken)
        elif kind == "PAUSED":
            scheduler.pause(state.message or "paused by a person")
            self._hear(state)
        elif kind == "RUNNING" and scheduler.pause_reason is not None and scheduler.gate is None:
            scheduler.unpause()  # a person's pause taken back (a gate waits for its answer)
        elif kind in ("CANCELLING", "CANCELLED"):
            scheduler.stop("cancelled by a person", cancelled=True)

    def _taken_over(self, state: Any, labels: dict[str, Any] | None) -> str | None:
        """Why another process runs the run now, or None: its flow run is in a state a
        run this process runs is never in, or has left this process's Running state and
        names another process (a runner's new Running state, ``PROCESS_LABEL``). Only
        for a run with an ``owner``. While the flow run is still in this process's
        Running state, a label naming another is an earlier engine's, read before this
        one's own label was written."""
        if self.owner is None:
            return None
        kind = state.type.value
        if kind in TAKEN_OVER:
            return f"its flow run is {kind.lower()}: it was taken for dead"
        process = RunProcess.of_labels(labels)
        if process is not None and self.owner.state_id not in (process.state_id,
                                                                 str(state.id)):
            return f"it was started again (process {process.pid} runs it now)"
        return None

    def _hear(self, state: Any) -> None:
        """Say on the flow run that the pause ``state`` is taken in (once per state):
        written after the scheduler has stopped starting steps."""
        heard = str(state.id) if state.id is not None else None
        if heard is None or heard == self._heard or state.state_details.pause_key:
            return  # a gate's own pause is the engine's: nobody waits for it to be heard
        self._heard = heard
        ack = asyncio.ensure_future(self._label_as({PAUSE_HEARD_LABEL: heard}))
        self._acks.add(ack)
        ack.add_done_callback(self._acks.discard)

    async def _label_as(self, labels: dict[str, str]) -> None:
        from prefect.client.orchestration import get_client

        try:
            async with get_client() as client:
                await client.update_flow_run_labels(self.run_id, dict(labels))
        except Exception as exc:  # noqa: BLE001 - the pause holds; only its answer waits
            log.warning("cannot say run %s took its pause in: %s", self.run_id, exc)

    async def suspend(self, key: str, message: str, timeout_s: float | None = None) -> Any:
        """Make the paused flow run a suspended one (no process; a resume reschedules it)
        and return the state, for the flow to raise ``Pause`` with."""
        from prefect.states import Suspended

        return await self._set_state(Suspended(
            timeout_seconds=None if timeout_s is None else round(timeout_s), pause_key=key,
            message=message))

    async def forget_askings(self, step_ids: Iterable[str]) -> None:
        """Forget the gates' last askings (a retry): they are asked anew."""
        for step_id in step_ids:
            await self.gates.forget_asking(step_id)

    async def decision(self, step_id: str) -> tuple[bool, str] | None:
        """The answer given to the latest asking of the step's gate, or None while there
        is none: answers written before it was asked, under another key or to an earlier
        asking do not count (``answer_of``)."""
        from prefect.client.orchestration import get_client

        nonce = await self.gates.asking(step_id)
        if nonce is None:
            return None  # never asked
        base_key = f"suspended-{asking_key(step_id, nonce)}"
        async with get_client() as client:
            found = await client.filter_flow_run_input(self.run_id, base_key, limit=10,
                                                       exclude_keys=set())
        return answer_of(found, base_key)

    async def ask(self, step_id: str, prompt: str, timeout_s: float | None = None) -> None:
        """Ask at the step's gate under a new nonce, with a form for the answer, and say so
        in the run's log. The run is suspended (``Pause`` is raised: the process ends, and
        an answer resumes the run in a new one), or, when ``waits_here``, paused while this
        process waits for the answer (or ``timeout_s``, then it answers no itself). The
        form and the nonce are kept before the run waits, so any answer finds them."""
        from prefect.input.run_input import keyset_from_base_key
        from prefect.states import Paused, Suspended

        nonce = secrets.token_hex(16)
        await self.gates.save_asking(step_id, nonce)
        key = asking_key(step_id, nonce)
        keyset = keyset_from_base_key(f"suspended-{key}")  # where decision() reads
        await approval_input().with_initial_data(description=prompt).asave(
            keyset, flow_run_id=self.run_id)
        message = f"waiting for approval of {step_id}: {prompt}"
        if self.waits_here:
            state: Any = Paused(reschedule=False, pause_key=key, message=message)
        else:
            state = Suspended(pause_key=key, message=message)
        state.state_details.run_input_keyset = keyset
        _run_logger().info(asking_text(str(self.run_id), step_id, prompt, self.waits_here))
        asked = await self._set_state(state)
        if not self.waits_here:
            from prefect.exceptions import Pause

            raise Pause(state=asked)
        await self._wait_for_answer(step_id, prompt, timeout_s)

    async def _set_state(self, state: Any) -> Any:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            result = await client.set_flow_run_state(self.run_id, state, force=True)
        return result.state

    async def _wait_for_answer(self, step_id: str, prompt: str,
                               timeout_s: float | None) -> None:
        """Wait while the run is paused at the gate; ``asker`` asks meanwhile and is
        stopped once the gate is answered (by it or elsewhere), then told the answer."""
        asking = None if self.asker is None else asyncio.ensure_future(
            self.asker.ask(str(self.run_id), step_id, prompt))
        try:
            resumed = await self._until_resumed(step_id, timeout_s)
        except asyncio.CancelledError:  # the run is cancelled: it stops waiting
            from prefect.states import Running

            await self._set_state(Running(message=f"the gate of {step_id} no longer waits"))
            raise
        finally:
            if asking is not None:
                asking.cancel()
                await asyncio.gather(asking, return_exceptions=True)
        if self.asker is not None:  # not resumed: the run was cancelled meanwhile
            self.asker.settled(step_id, await self.decision(step_id) if resumed else None)

    async def _until_resumed(self, step_id: str, timeout_s: float | None) -> bool:
        """Wait until the flow run is no longer paused; whether it runs again (an answer
        resumed it) rather than being cancelled. No answer within ``timeout_s``: no."""
        from prefect.client.orchestration import get_client

        loop = asyncio.get_running_loop()
        started = last_beat = loop.time()
        async with get_client() as client:
            while True:
                seen = await self._seen(client)
                state = seen.state if seen is not None else None
                if state is not None and state.type.value != "PAUSED":
                    return bool(state.type.value == "RUNNING")
                if self.beat is not None and loop.time() - last_beat >= HEARTBEAT_S:
                    self.beat()
                    last_beat = loop.time()
                if timeout_s is not None and loop.time() - started >= timeout_s:
                    await answer_here(str(self.run_id), step_id, False, TIMED_OUT)
                    timeout_s = None  # answered, or someone answered first: read on
                await self._pause_polling()


async def answer_here(run_id: str, step_id: str, approved: bool, comment: str) -> bool:
    """Answer the gate of ``step_id`` that the run waits at now, through Prefect's resume
    (as the bridge does); False when it does not wait there (any more) or the resume was
    not taken: the gate was answered elsewhere first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus

    async with get_client() as client:
        state = (await client.read_flow_run(UUID(run_id))).state
        if state is None or state.type.value != "PAUSED" or not is_asking_of(
                state.state_details.pause_key, step_id):
            return False
        result = await client.resume_flow_run(UUID(run_id),
                                              run_input=answer_form(approved, comment))
    if result.status != SetStateStatus.ACCEPT:
        log.info("the answer to %s of run %s was not taken: %s", step_id, run_id,
                 result.details)
    return bool(result.status == SetStateStatus.ACCEPT)


def _run_logger() -> Any:
    """The flow run's logger (its lines show in the Prefect UI), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log
