"""The message of docs/stream.md: its keys, its types, and one serialisation."""

from __future__ import annotations

import json
import re

import pytest

from progress_bridge.messages import (
    MESSAGE_TYPES,
    Draft,
    ErrorInfo,
    Estimate,
    Impact,
    Message,
    PlanStep,
    Progress,
)

DOCUMENTED_KEYS = {"seq", "run_id", "type", "ts", "step_id", "status", "attempt", "duration_s",
             "summary", "error", "progress", "estimate"}


def test_every_spec_type_is_known() -> None:
    assert len(MESSAGE_TYPES) == 16
    assert {"run.started", "step.failed", "progress", "heartbeat"} <= set(MESSAGE_TYPES)


def test_an_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown message type 'step.exploded'"):
        Draft(type="step.exploded")


def test_a_message_has_the_spec_keys_and_a_millisecond_utc_timestamp() -> None:
    message = Draft(
        type="step.failed", step_id="search", status="failed", attempt=2, duration_s=1.23,
        error=ErrorInfo("transient", "timed out", "try again"),
        progress=Progress.of(3, 8), estimate=Estimate(12.0, 9.0, 18.0, "2026-01-01T00:00:12.000Z"),
        impact=Impact(skipped=("summarise",), run_fails=True),
    ).numbered("r1", 17)
    body = json.loads(message.json)
    assert set(body) == DOCUMENTED_KEYS | {"impact"}
    assert body["seq"] == 17 and body["run_id"] == "r1"
    assert body["progress"] == {"done": 3, "total": 8, "percent": 37.5}
    assert body["error"] == {"category": "transient", "message": "timed out", "hint": "try again"}
    assert body["impact"] == {"skipped": ["summarise"], "run_fails": True}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["ts"])


def test_run_started_carries_the_whole_plan_and_round_trips() -> None:
    plan = (PlanStep("fetch", "http.request", "Fetch", (), True, 1.5),
            PlanStep("sum", "core.echo", None, ("fetch",), False, 0.1))
    message = Draft(type="run.started", status="running", plan=plan,
                    progress=Progress.of(0, 2)).numbered("r1", 1)
    again = Message.from_json(message.json)
    assert again == message
    assert again.json is not None and json.loads(again.json)["plan"][1]["needs"] == ["fetch"]


def test_the_json_text_is_built_once() -> None:
    message = Draft(type="progress", progress=Progress.of(1, 2)).numbered("r1", 3)
    assert message.json is message.json
    parsed = Message.from_json(message.json)
    assert parsed.json is message.json
