"""The stream message (docs/stream.md): its keys, its types, and one serialisation."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from planrun.contract.stream import (
    MESSAGE_TYPES,
    Draft,
    ErrorInfo,
    Estimate,
    Impact,
    Message,
    PlanStep,
    Progress,
)

SPEC_KEYS = {"seq", "run_id", "type", "ts", "step_id", "status", "attempt", "duration_s",
             "summary", "error", "progress", "estimate"}


def test_every_stream_type_is_known() -> None:
    """docs/stream.md's sixteen types, and the four of guardrails (docs/limits.md)."""
    assert len(MESSAGE_TYPES) == 20
    assert {"run.started", "step.failed", "progress", "heartbeat", "step.waiting",
            "tool.circuit_opened", "tool.circuit_half_open", "tool.circuit_closed"
            } <= set(MESSAGE_TYPES)


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown message type 'step.exploded'"):
        Draft(type="step.exploded")


def test_a_message_has_the_stream_keys_and_a_millisecond_utc_timestamp() -> None:
    message = Draft(
        type="step.failed", step_id="search", status="failed", attempt=2, duration_s=1.23,
        error=ErrorInfo(category="transient", message="timed out", hint="try again"),
        progress=Progress.of(3, 8),
        estimate=Estimate(remaining_s=12.0, low_s=9.0, high_s=18.0,
                          finish_at="2026-01-01T00:00:12.000Z"),
        impact=Impact(skipped=("summarise",), run_fails=True),
    ).numbered("r1", 17)
    body = json.loads(message.wire)
    assert set(body) == SPEC_KEYS | {"impact"}
    assert body["seq"] == 17 and body["run_id"] == "r1"
    assert body["progress"] == {"done": 3, "total": 8, "percent": 37.5}
    assert body["error"] == {"category": "transient", "message": "timed out", "hint": "try again"}
    assert body["impact"] == {"skipped": ["summarise"], "run_fails": True}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["ts"])


def test_run_started_carries_the_whole_plan_and_round_trips() -> None:
    plan = (PlanStep(id="fetch", tool="http.request", name="Fetch", estimate_s=1.5),
            PlanStep(id="sum", tool="core.echo", needs=("fetch",), critical=False,
                     estimate_s=0.1))
    message = Draft(type="run.started", status="running", plan=plan,
                    progress=Progress.of(0, 2)).numbered("r1", 1)
    again = Message.from_json(message.wire)
    assert again == message
    assert json.loads(again.wire)["plan"][1]["needs"] == ["fetch"]


def test_the_wire_text_is_built_once() -> None:
    message = Draft(type="progress", progress=Progress.of(1, 2)).numbered("r1", 3)
    assert message.wire is message.wire
    parsed = Message.from_json(message.wire)
    assert parsed.wire is message.wire


def test_the_wire_form_is_what_the_model_dumps() -> None:
    message = Draft(type="step.running", step_id="a", status="running").numbered("r1", 2)
    assert json.loads(message.wire) == message.model_dump(mode="json")
