"""The progress message of docs/stream.md: one JSON object per change of a run.

A :class:`Draft` is what the upstream knows about a change; the store gives it the run's
next ``seq`` and makes it a :class:`Message`, whose JSON text is built once and then sent
as is to every client, replayed from the store, and parsed back by :meth:`Message.from_json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from planrun.report import iso


class MessageType(StrEnum):
    """Every message type of docs/stream.md."""

    RUN_STARTED = "run.started"
    RUN_PAUSED = "run.paused"
    RUN_RESUMED = "run.resumed"
    RUN_AWAITING_APPROVAL = "run.awaiting_approval"
    RUN_COMPLETED = "run.completed"
    RUN_COMPLETED_WITH_ERRORS = "run.completed_with_errors"
    RUN_FAILED = "run.failed"
    RUN_CANCELLED = "run.cancelled"
    STEP_RUNNING = "step.running"
    STEP_RETRYING = "step.retrying"
    STEP_COMPLETED = "step.completed"
    STEP_FAILED = "step.failed"
    STEP_SKIPPED = "step.skipped"
    STEP_AWAITING_APPROVAL = "step.awaiting_approval"
    PROGRESS = "progress"
    HEARTBEAT = "heartbeat"


MESSAGE_TYPES: tuple[str, ...] = tuple(t.value for t in MessageType)
RUN_ENDED = frozenset({MessageType.RUN_COMPLETED, MessageType.RUN_COMPLETED_WITH_ERRORS,
                       MessageType.RUN_FAILED, MessageType.RUN_CANCELLED})


@dataclass(frozen=True)
class ErrorInfo:
    """Why a step failed: the planrun error category, the message and a hint."""

    category: str
    message: str
    hint: str | None = None


@dataclass(frozen=True)
class Progress:
    """``done`` counts steps finished in any state, so a finished run is at 100 %."""

    done: int
    total: int
    percent: float

    @classmethod
    def of(cls, done: int, total: int) -> Progress:
        """Progress with ``percent`` computed as planrun's run report does."""
        return cls(done, total, round(100.0 * done / total, 1) if total else 100.0)


@dataclass(frozen=True)
class Estimate:
    """Time left: ``low_s``..``high_s`` is an 80 % interval; ``finish_at`` is ISO-8601;
    ``early_by_s`` how much earlier than first estimated the run ends, if it does."""

    remaining_s: float
    low_s: float
    high_s: float
    finish_at: str | None = None
    #: How much earlier than first estimated the run is heading to end (or ended).
    early_by_s: float | None = None


@dataclass(frozen=True)
class PlanStep:
    """One step of the plan as ``run.started`` announces it, pending steps included."""

    id: str
    tool: str
    name: str | None = None
    needs: tuple[str, ...] = ()
    critical: bool = True
    estimate_s: float | None = None


@dataclass(frozen=True)
class Impact:
    """What a ``step.failed`` means: the steps that will now be skipped, and whether the
    run fails."""

    skipped: tuple[str, ...] = ()
    run_fails: bool = False


def now_iso() -> str:
    """The current time as docs/stream.md writes it: UTC, milliseconds, ``Z``."""
    stamp = iso(time.time())
    assert stamp is not None
    return stamp


@dataclass(frozen=True)
class Draft:
    """A message before the store numbers it; what the upstream builds.

    ``type`` must be one of :data:`MESSAGE_TYPES`; ``ts`` defaults to now.
    """

    type: str
    step_id: str | None = None
    status: str | None = None
    attempt: int | None = None
    duration_s: float | None = None
    summary: str | None = None
    error: ErrorInfo | None = None
    progress: Progress | None = None
    estimate: Estimate | None = None
    plan: tuple[PlanStep, ...] | None = None
    impact: Impact | None = None
    ts: str = field(default_factory=now_iso)

    def __post_init__(self) -> None:
        if self.type not in MESSAGE_TYPES:
            raise ValueError(f"unknown message type {self.type!r}; known: {MESSAGE_TYPES}")

    def numbered(self, run_id: str, seq: int) -> Message:
        """This draft as message ``seq`` of run ``run_id``."""
        return Message(seq=seq, run_id=run_id, **_fields(self))


@dataclass(frozen=True)
class Message(Draft):
    """One numbered message; ``json`` is its wire form, built on first use and kept.

    The keys of docs/stream.md are always present (null when unknown); ``plan`` and ``impact``
    only on the messages that carry them.
    """

    seq: int = 0
    run_id: str = ""

    @cached_property
    def json(self) -> str:
        """The wire form: compact JSON, built once."""
        body: dict[str, Any] = {"seq": self.seq, "run_id": self.run_id, "type": self.type,
                                "ts": self.ts, **_fields(self, nested=True)}
        for optional in ("plan", "impact"):
            if body[optional] is None:
                del body[optional]
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Message:
        """Parse a message's wire form (as stored or as sent); the text is kept as ``json``."""
        data = json.loads(text)
        message = cls(
            seq=data["seq"], run_id=data["run_id"], type=data["type"], ts=data["ts"],
            step_id=data.get("step_id"), status=data.get("status"),
            attempt=data.get("attempt"), duration_s=data.get("duration_s"),
            summary=data.get("summary"),
            error=_maybe(ErrorInfo, data.get("error")),
            progress=_maybe(Progress, data.get("progress")),
            estimate=_maybe(Estimate, data.get("estimate")),
            plan=_plan(data.get("plan")),
            impact=_impact(data.get("impact")),
        )
        message.__dict__["json"] = text  # cached_property's slot: no second serialisation
        return message


def heartbeat(run_id: str, last_seq: int) -> Message:
    """A heartbeat: never stored or replayed; ``seq`` is the last seq the client was sent."""
    return Draft(type=MessageType.HEARTBEAT).numbered(run_id, last_seq)


_DRAFT_FIELDS = ("type", "step_id", "status", "attempt", "duration_s", "summary", "error",
                 "progress", "estimate", "plan", "impact", "ts")


def _fields(draft: Draft, *, nested: bool = False) -> dict[str, Any]:
    out = {name: getattr(draft, name) for name in _DRAFT_FIELDS}
    if nested:
        for name in ("error", "progress", "estimate", "impact"):
            if out[name] is not None:
                out[name] = asdict(out[name])
        if out["plan"] is not None:
            out["plan"] = [asdict(step) for step in out["plan"]]
        del out["type"], out["ts"]
    return out


def _maybe(cls: Any, data: dict[str, Any] | None) -> Any:
    return None if data is None else cls(**data)


def _plan(data: list[dict[str, Any]] | None) -> tuple[PlanStep, ...] | None:
    if data is None:
        return None
    return tuple(PlanStep(**{**step, "needs": tuple(step.get("needs", ()))}) for step in data)


def _impact(data: dict[str, Any] | None) -> Impact | None:
    if data is None:
        return None
    return Impact(skipped=tuple(data.get("skipped", ())), run_fails=data.get("run_fails", False))
