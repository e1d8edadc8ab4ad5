"""The bridge's stream message: one JSON object per change of a run (docs/stream.md).

A :class:`Draft` is a message before the bridge's store numbers it; :class:`Message` is
one numbered message, whose wire text is built once and then sent as is to every client,
replayed from the store, and parsed back by :meth:`Message.from_json`. Every key is always
present (null when unknown), but ``plan``, ``impact``, ``note``, ``tool`` and ``resources``
only on the messages that carry them; an ``error`` carries no ``details`` (those are in the
run report).
"""

from __future__ import annotations

from enum import StrEnum
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from planrun.contract.estimate import Estimate
from planrun.contract.events import Impact, PlanStep
from planrun.contract.records import ErrorInfo, Progress, Resources, absent
from planrun.contract.times import now_iso


class MessageType(StrEnum):
    """Every message type of the stream."""

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
    STEP_WAITING = "step.waiting"
    TOOL_CIRCUIT_OPENED = "tool.circuit_opened"
    TOOL_CIRCUIT_HALF_OPEN = "tool.circuit_half_open"
    TOOL_CIRCUIT_CLOSED = "tool.circuit_closed"
    PROGRESS = "progress"
    HEARTBEAT = "heartbeat"

    @property
    def ends_run(self) -> bool:
        return self in RUN_ENDED


MESSAGE_TYPES: tuple[str, ...] = tuple(t.value for t in MessageType)
RUN_ENDED = frozenset({MessageType.RUN_COMPLETED, MessageType.RUN_COMPLETED_WITH_ERRORS,
                       MessageType.RUN_FAILED, MessageType.RUN_CANCELLED})


class Draft(BaseModel):
    """A message before the store numbers it; ``ts`` defaults to now."""

    model_config = ConfigDict(frozen=True)

    type: MessageType
    step_id: str | None = None
    status: str | None = None
    attempt: int | None = None
    duration_s: float | None = None
    summary: str | None = None
    error: ErrorInfo | None = None
    progress: Progress | None = None
    estimate: Estimate | None = None
    plan: tuple[PlanStep, ...] | None = Field(default=None, exclude_if=absent)
    impact: Impact | None = Field(default=None, exclude_if=absent)
    #: ``step.waiting`` and ``tool.circuit_*``: what a person reads (the live page's hint).
    note: str | None = Field(default=None, exclude_if=absent)
    #: ``tool.circuit_*``: the breaker's tool (``tool@host`` for a host's breaker).
    tool: str | None = Field(default=None, exclude_if=absent)
    #: A finished step's ``step.*`` message: what it used.
    resources: Resources | None = Field(default=None, exclude_if=absent)
    ts: str = Field(default_factory=now_iso)

    @field_validator("type", mode="before")
    @classmethod
    def _known_type(cls, value: Any) -> Any:
        if value not in MESSAGE_TYPES:
            raise ValueError(f"unknown message type {value!r}; known: {MESSAGE_TYPES}")
        return value

    def numbered(self, run_id: str, seq: int) -> Message:
        """This draft as message ``seq`` of run ``run_id`` (validated already)."""
        return Message.model_construct(seq=seq, run_id=run_id, **dict(self))


class Message(Draft):
    """One numbered message; ``wire`` is its JSON text, built on first use and kept."""

    seq: int = 0
    run_id: str = ""

    @cached_property
    def wire(self) -> str:
        """The wire form: compact JSON, built once."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> Message:
        """Parse a message's wire form (as stored or as sent); the text is kept as ``wire``."""
        message = cls.model_validate_json(text)
        message.__dict__["wire"] = text  # cached_property's slot: no second serialisation
        return message


def heartbeat(run_id: str, last_seq: int) -> Message:
    """A heartbeat: never stored or replayed; ``seq`` is the last seq the client was sent."""
    return Draft(type=MessageType.HEARTBEAT).numbered(run_id, last_seq)
