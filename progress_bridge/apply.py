"""The pure step of the bridge: a run's view and one event in, the new view and the
messages it makes out.

:func:`apply` changes nothing it is given and reads no clock (``now`` is passed in): the
caller swaps the new view in only once its messages are committed, so an event whose
commit failed is applied again to the old view when it comes again (docs/stream.md).
Each message is dated when its change happened (the event's ``occurred``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from planrun.contract.breakers import BreakerChange
from planrun.contract.events import (
    Heartbeat,
    Payload,
    RunAwaitingApproval,
    RunEnded,
    RunPaused,
    RunResumed,
    RunStarted,
    StepChanged,
    StepWaiting,
)
from planrun.contract.stream import Draft
from planrun.contract.times import iso
from planrun.progress_bridge.runs import RunView


@dataclass(frozen=True)
class RunEvent:
    """One planrun event as the bridge reads it: its id, name, run, time and payload."""

    id: str
    name: str
    run_id: str
    occurred: float
    payload: Payload


@dataclass(frozen=True)
class FlowRunEnded:
    """Prefect ended a planrun flow run (``state``: CRASHED, FAILED, CANCELLED, COMPLETED)."""

    id: str
    run_id: str
    occurred: float
    state: str
    message: str | None = None


@dataclass(frozen=True)
class BreakerChanged:
    """A tool's circuit breaker changed (``planrun.tool.circuit_*``): every active run
    whose plan uses the tool hears of it."""

    id: str
    occurred: float
    change: BreakerChange


@dataclass(frozen=True)
class Applied:
    """What applying an event gives: the view to commit (None: the event is not for a
    run the bridge knows yet) and the messages to commit with it."""

    view: RunView | None
    drafts: list[Draft]


_ON: dict[type[Payload], Callable[[RunView, Any, float], list[Draft]]] = {
    StepChanged: RunView.on_step,
    StepWaiting: RunView.on_waiting,
    RunEnded: RunView.on_ended,
    RunPaused: RunView.on_paused,
    RunAwaitingApproval: RunView.on_awaiting_approval,
    RunResumed: RunView.on_resumed,
}


def apply(view: RunView | None, event: RunEvent, now: float) -> Applied:
    """The run's view after ``event`` and the messages it makes; ``view`` is left as it
    was. A start creates the view (unless the run started already); any other event
    needs one (a run seen before its start: the start is reconciled first)."""
    payload = event.payload
    if isinstance(payload, RunStarted):
        if view is not None and not view.pending:
            return Applied(view, [])
        new, drafts = RunView.started(event.run_id, payload, now)
    elif view is None or isinstance(payload, Heartbeat):
        return Applied(None, [])
    else:
        new = view.copy()
        drafts = _ON[type(payload)](new, payload, now)
    return Applied(new, _dated(drafts, event.occurred))


def end_by_flow_run(view: RunView, ended: FlowRunEnded, now: float) -> Applied:
    """The run's view once Prefect ended its flow run without planrun's end event."""
    new = view.copy()
    return Applied(new, new.on_flow_run_ended(ended.state, ended.message, now))


def breaker_changed(view: RunView, changed: BreakerChanged, now: float) -> Applied:
    """The run's ``tool.circuit_*`` message, if its plan uses the breaker's tool."""
    new = view.copy()
    return Applied(new, _dated(new.on_breaker(changed.change, now), changed.occurred))


def told_of_breakers(applied: Applied, breakers: list[BreakerChange], occurred: float,
                     now: float) -> Applied:
    """A run that starts while breakers of its tools are open or half-open is told so
    right after ``run.started``, in the same commit."""
    if applied.view is None or not applied.drafts:
        return applied
    told = [d for change in breakers if change.state != "closed"
            for d in applied.view.on_breaker(change, now)]
    return Applied(applied.view, applied.drafts + _dated(told, occurred))


def tick(view: RunView, now: float) -> Applied:
    """A ``progress`` message with a fresh estimate, while a step runs."""
    new = view.copy()
    return Applied(new, new.tick(now))


def _dated(drafts: list[Draft], occurred: float) -> list[Draft]:
    stamp = iso(occurred)
    return [d.model_copy(update={"ts": stamp}) for d in drafts]
