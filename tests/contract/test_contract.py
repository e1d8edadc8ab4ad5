"""The contract's models: each written and read back unchanged (as JSON, as every layer
sends it), statuses' predicates, and data of an unknown version refused with a clear error."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest
from pydantic import BaseModel

from planrun.contract import CONTRACT_VERSION
from planrun.contract.checkpoint import GateCheckpoint, RunCheckpoint, StepCheckpoint
from planrun.contract.estimate import Estimate
from planrun.contract.events import (
    Heartbeat,
    Impact,
    PlanStep,
    RunAwaitingApproval,
    RunEnded,
    RunPaused,
    RunResumed,
    RunStarted,
    StepChanged,
    payload_model,
    read_payload,
)
from planrun.contract.records import ErrorInfo, Progress, RunReport, StepReport
from planrun.contract.status import RunStatus, StepStatus
from planrun.contract.stream import Draft, Message
from planrun.contract.version import Versioned
from planrun.errors import ContractError

ERROR = ErrorInfo(category="transient", message="503", hint="wait", details={"status": 503})
PROGRESS = Progress.of(1, 3)
ESTIMATE = Estimate(remaining_s=4.0, low_s=3.0, high_s=6.5, finish_at="2026-01-01T00:00:04.000Z",
                    early_by_s=1.0)
STEP_REPORT = StepReport(status=StepStatus.FAILED, tool="http.request", attempts=2,
                         started_at="2026-01-01T00:00:00.000Z", duration_s=1.5,
                         input={"url": "http://x"}, error=ERROR, reason="gave up")
HEAD: dict[str, Any] = {"run_id": "r", "n": 7}

MODELS: list[BaseModel] = [
    ERROR, PROGRESS, ESTIMATE, STEP_REPORT,
    RunReport(run_id="r", plan="p", status=RunStatus.FAILED, progress=PROGRESS,
              steps={"a": STEP_REPORT}, rolled_back=["out.txt"]),
    PlanStep(id="a", tool="core.echo", needs=("b",), critical=False, estimate_s=0.5),
    Impact(skipped=("b", "c"), run_fails=True),
    RunStarted(**HEAD, plan="p", max_parallel=3, steps=[PlanStep(id="a", tool="core.echo")]),
    RunResumed(**HEAD, restored=["a"], progress=PROGRESS),
    RunPaused(**HEAD, reason="asked", timeout_s=60.0, on_timeout="resume", progress=PROGRESS),
    RunAwaitingApproval(**HEAD, step_id="deploy", prompt="go?", timeout_s=30.0),
    Heartbeat(**HEAD),
    StepChanged(**HEAD, step_id="a", status=StepStatus.FAILED, attempt=2, error=ERROR,
                output={"x": 1}, impact=Impact(skipped=("b",))),
    RunEnded(**HEAD, status=RunStatus.COMPLETED_WITH_ERRORS, rolled_back=["f"],
             progress=PROGRESS),
    StepCheckpoint(status=StepStatus.COMPLETED, attempts=1, output=[1, 2], error=None,
                   error_caused_skip=True, task_run_id=uuid4()),
    RunCheckpoint(segment=3),
    GateCheckpoint(nonce="ab" * 16),
    Draft(type="step.failed", step_id="a", status="failed", error=ERROR.model_copy(
        update={"details": None}), progress=PROGRESS, estimate=ESTIMATE),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_every_model_reads_back_what_it_wrote(model: BaseModel) -> None:
    again = type(model).model_validate_json(model.model_dump_json())
    assert again == model


def test_a_message_reads_back_from_its_wire_text() -> None:
    message = Draft(type="run.started", plan=(PlanStep(id="a", tool="t"),),
                    progress=PROGRESS).numbered("r", 1)
    assert Message.from_json(message.wire) == message


VERSIONED = [m for m in MODELS if isinstance(m, Versioned)]


@pytest.mark.parametrize("model", VERSIONED, ids=lambda m: type(m).__name__)
def test_versioned_data_carries_v_and_an_unknown_v_is_refused_naming_both_versions(
        model: Versioned) -> None:
    data = model.model_dump(mode="json")
    assert data["v"] == CONTRACT_VERSION
    with pytest.raises(ContractError, match=(
            rf"{type(model).__name__} of contract version 2 cannot be read: this planrun "
            rf"reads version {CONTRACT_VERSION}")):
        type(model).read({**data, "v": 2})


def test_data_written_before_versions_is_read_as_version_1() -> None:
    kept = StepCheckpoint.read({"status": "completed", "attempts": 1})
    assert (kept.v, kept.status) == (CONTRACT_VERSION, StepStatus.COMPLETED)


def test_a_payload_that_does_not_validate_names_the_field() -> None:
    with pytest.raises(ContractError, match="not a valid StepChanged: status: Input should be"):
        read_payload("planrun.step.completed", {**HEAD, "step_id": "a", "status": "exploded"})


def test_each_event_name_has_its_payload_model_and_others_none() -> None:
    assert payload_model("planrun.run.started") is RunStarted
    assert payload_model("planrun.step.retrying") is StepChanged
    assert payload_model("planrun.run.cancelled") is RunEnded
    assert payload_model("planrun.step.pending") is None
    assert read_payload("prefect.flow-run.Running", {}) is None


def test_statuses_say_what_they_mean() -> None:
    assert {s for s in StepStatus if s.finished} == {"completed", "failed", "skipped",
                                                      "cancelled"}
    assert {s for s in StepStatus if s.kept} == {"completed", "failed", "skipped"}
    assert {s for s in RunStatus if s.ended} == {"completed", "completed_with_errors",
                                                 "failed", "cancelled"}
    assert [RunStatus(s).exit_code for s in ("completed", "completed_with_errors", "failed",
                                             "cancelled")] == [0, 3, 1, 4]


def test_progress_is_computed_in_one_place() -> None:
    assert Progress.of(1, 3).percent == 33.3
    assert Progress.of(0, 0).percent == 100.0
