"""The flow runs behind planrun's runs, as the control service reads and changes them: one
small interface, Prefect's API behind it (:class:`PrefectFlowRuns`), and an in-memory fake
beside it (:class:`FakeFlowRuns`) for tests that need no Prefect server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol
from uuid import UUID

from planrun.contract.control import PAUSE_HEARD_LABEL, RUN_TAG
from planrun.contract.events import RunProcess
from planrun.errors import NotFound
from planrun.secrets import reference_of

#: The states the bridge sets: Paused, Scheduled (start again), Cancelled, Cancelling,
#: Crashed.
Target = Literal["PAUSED", "SCHEDULED", "CANCELLED", "CANCELLING", "CRASHED"]
FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


@dataclass(frozen=True)
class FlowRun:
    """What the control service needs of a flow run: its state's type (``RUNNING``...)
    and name, and, when it is suspended, whether it waits for input and under which key."""

    id: str
    kind: str
    name: str | None = None
    waits_for_input: bool = False
    pause_key: str | None = None
    #: Run by the deployment's runner (submitted); else by ``planrun run`` in its process.
    deployed: bool = True
    #: It had secret inputs (held or stored for it only until it ended).
    secret_inputs: bool = False
    #: The id of its current state, and of the last pause its engine said it took in.
    state_id: str | None = None
    pause_heard: str | None = None
    #: When it entered its current state (epoch s, the server's clock).
    since: float | None = None
    #: The process its engine said runs it (``PROCESS_LABEL``).
    process: RunProcess | None = None

    @property
    def final(self) -> bool:
        return self.kind in FINAL

    @property
    def state(self) -> str:
        """The state as a person reads it: ``paused``, ``completed``..."""
        return str(self.name or self.kind).lower()


class FlowRuns(Protocol):
    async def read(self, run_id: str) -> FlowRun:
        """The run's flow run; :class:`~planrun.errors.NotFound` when there is none, or
        it is not a planrun run."""
        ...

    async def set_state(self, run_id: str, target: Target, message: str) -> str | None:
        """Set the state; the new state's id."""
        ...

    async def resume(self, run_id: str, answer: dict[str, Any] | None = None) -> None:
        """Resume a suspended flow run, with ``answer`` as its input when it waits for one."""
        ...

    async def label(self, run_id: str, labels: dict[str, Any]) -> None: ...


class PrefectFlowRuns:
    """The flow runs of the Prefect server at ``PREFECT_API_URL``."""

    async def read(self, run_id: str) -> FlowRun:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            flow_run_id = UUID(run_id)
        except ValueError:
            raise NotFound(f"no run {run_id}: run ids are UUIDs") from None
        async with get_client() as client:
            try:
                found = await client.read_flow_run(flow_run_id)
            except ObjectNotFound:
                raise NotFound(f"no run {run_id}") from None
        if RUN_TAG not in (found.tags or []):
            raise NotFound(f"flow run {run_id} is not a planrun run")
        state = found.state
        deployed = found.deployment_id is not None
        inputs = (found.parameters or {}).get("inputs")
        secret_inputs = isinstance(inputs, dict) and any(
            reference_of(value) is not None for value in inputs.values())
        if state is None:
            return FlowRun(run_id, "SCHEDULED", deployed=deployed, secret_inputs=secret_inputs)
        details = state.state_details
        heard = (found.labels or {}).get(PAUSE_HEARD_LABEL)
        return FlowRun(run_id, state.type.value, state.name,
                       waits_for_input=bool(details.run_input_keyset),
                       pause_key=details.pause_key, deployed=deployed,
                       secret_inputs=secret_inputs, state_id=str(state.id),
                       pause_heard=None if heard is None else str(heard),
                       since=state.timestamp.timestamp() if state.timestamp else None,
                       process=RunProcess.of_labels(found.labels))

    async def set_state(self, run_id: str, target: Target, message: str) -> str | None:
        from prefect import states
        from prefect.client.orchestration import get_client

        makers: dict[str, Callable[..., Any]] = {
            "PAUSED": states.Paused, "SCHEDULED": states.Scheduled,
            "CANCELLED": states.Cancelled, "CANCELLING": states.Cancelling,
            "CRASHED": states.Crashed}
        make = makers[target]
        async with get_client() as client:
            result = await client.set_flow_run_state(UUID(run_id), make(message=message),
                                                     force=True)
        return str(result.state.id) if result.state is not None else None

    async def resume(self, run_id: str, answer: dict[str, Any] | None = None) -> None:
        from prefect.flow_runs import aresume_flow_run

        await aresume_flow_run(UUID(run_id), run_input=answer)

    async def label(self, run_id: str, labels: dict[str, Any]) -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            await client.update_flow_run_labels(UUID(run_id), dict(labels))


@dataclass
class FakeFlowRuns:
    """Flow runs in memory: ``runs`` by id; every change is recorded in ``calls``. A
    pause is heard at once, as by a running engine, unless ``engines_hear`` is False."""

    runs: dict[str, FlowRun] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    engines_hear: bool = True

    async def read(self, run_id: str) -> FlowRun:
        if run_id not in self.runs:
            raise NotFound(f"no run {run_id}")
        return self.runs[run_id]

    async def set_state(self, run_id: str, target: Target, message: str) -> str | None:
        self.calls.append(("set_state", run_id, target, message))
        state_id = f"state-{len(self.calls)}"
        heard = state_id if target == "PAUSED" and self.engines_hear else None
        run = self.runs.get(run_id) or FlowRun(run_id, target)  # a new state, the same run
        self.runs[run_id] = FlowRun(run_id, target, state_id=state_id, pause_heard=heard,
                                    deployed=run.deployed, secret_inputs=run.secret_inputs)
        return state_id

    async def resume(self, run_id: str, answer: dict[str, Any] | None = None) -> None:
        self.calls.append(("resume", run_id, answer))
        self.runs[run_id] = replace(self.runs[run_id], kind="RUNNING", waits_for_input=False,
                                    pause_key=None)

    async def label(self, run_id: str, labels: dict[str, Any]) -> None:
        self.calls.append(("label", run_id, labels))

