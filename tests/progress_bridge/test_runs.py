"""The bridge's pure apply step: a run's view and one event in, the new view and its
messages out (no Prefect, no server, no clock); and the view saved and loaded."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from planrun.contract.events import (
    RunAwaitingApproval,
    RunEnded,
    RunPaused,
    RunProcess,
    RunResumed,
    RunStarted,
    StepChanged,
    StepWaiting,
    step_event,
)
from planrun.contract.status import RunStatus, StepStatus
from planrun.errors import ContractError
from planrun.progress_bridge.apply import FlowRunEnded, RunEvent, apply, end_by_flow_run
from planrun.progress_bridge.runs import RunView
from planrun.progress_bridge.saved_view import SavedView, StepsSaved
from planrun.report import StepRecord

NOW = 1_767_225_605.0  # 2026-01-01T00:00:05Z
STARTED = RunStarted.read({
    "run_id": "r", "n": 1, "plan": "p", "max_parallel": 2,
    "started_at": "2026-01-01T00:00:00.000Z",
    "steps": [{"id": "a", "name": "A", "tool": "core.sleep", "needs": [], "estimate_s": 1.0},
              {"id": "b", "tool": "core.echo", "needs": ["a"], "critical": False,
               "estimate_s": 2.0}]})


def event(payload: Any, name: str | None = None, occurred: float = NOW - 1) -> RunEvent:
    if name is None:
        name = step_event(payload.status) if isinstance(payload, StepChanged) else ""
    return RunEvent(f"e{payload.n}", name, "r", occurred, payload)


def step(n: int, step_id: str, status: str, **fields: Any) -> StepChanged:
    return StepChanged.read({"run_id": "r", "n": n, "step_id": step_id, "status": status,
                             "attempt": 1, "started_at": "2026-01-01T00:00:01.000Z",
                             **fields})


def started_view() -> RunView:
    applied = apply(None, event(STARTED, "planrun.run.started"), NOW)
    assert applied.view is not None
    return applied.view


# One row per kind of event: the payload, and the messages it makes (type, step, status).
CASES = [
    ("a step starts", step(2, "a", "running"), [("step.running", "a", "running")]),
    # An attempt whose running event the engine left out (it ended at once) gets its
    # step.running first.
    ("a step completes", step(2, "a", "completed", output={"slept_s": 1}),
     [("step.running", "a", "running"), ("step.completed", "a", "completed")]),
    ("a step will retry", step(2, "a", "retrying",
                               error={"category": "transient", "message": "503"}),
     [("step.running", "a", "running"), ("step.retrying", "a", "retrying")]),
    ("a cancelled step is a failed message", step(2, "b", "cancelled", reason="stopped"),
     [("step.running", "b", "running"), ("step.failed", "b", "cancelled")]),
    ("a skipped step", step(2, "b", "skipped", attempt=0, started_at=None, reason="no"),
     [("step.skipped", "b", "skipped")]),
    ("a step of no such plan makes none", step(2, "zzz", "running"), []),
    ("the run pauses", RunPaused(run_id="r", n=2, reason="asked", timeout_s=60),
     [("run.paused", None, "paused")]),
    ("the run waits at a gate", RunAwaitingApproval(run_id="r", n=2, step_id="b",
                                                    prompt="go?", timeout_s=30),
     [("run.awaiting_approval", "b", "awaiting_approval")]),
    ("the run resumes", RunResumed(run_id="r", n=2, restored=["a"]),
     [("run.resumed", None, "running")]),
    ("the run ends", RunEnded(run_id="r", n=2, status=RunStatus.COMPLETED_WITH_ERRORS),
     [("run.completed_with_errors", None, "completed_with_errors")]),
]


@pytest.mark.parametrize(("payload", "expected"), [(c[1], c[2]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_an_event_makes_its_messages_and_leaves_the_old_view_as_it_was(
        payload: Any, expected: list[tuple[str, str | None, str]]) -> None:
    view = started_view()
    before = view.to_json()
    applied = apply(view, event(payload), NOW)
    assert [(d.type, d.step_id, d.status) for d in applied.drafts] == expected
    assert view.to_json() == before  # pure: the view given is not changed
    assert all(d.ts == "2026-01-01T00:00:04.000Z" for d in applied.drafts)  # when it happened
    assert all(d.progress is not None and d.estimate is not None for d in applied.drafts)


def test_an_event_older_than_what_a_step_shows_is_dropped() -> None:
    view = started_view()
    done = apply(view, event(step(3, "a", "completed", ended_at="2026-01-01T00:00:02.000Z",
                                  summary="slept")), NOW)
    assert done.view is not None
    assert [d.type for d in done.drafts] == ["step.running", "step.completed"]
    late = apply(done.view, event(step(2, "a", "running")), NOW)  # not a step back
    assert late.drafts == [] and late.view is not None
    assert late.view.record.steps["a"].status == StepStatus.COMPLETED
    assert [d.progress.done for d in done.drafts if d.progress is not None] == [0, 1]


def test_an_attempt_seen_running_ends_in_one_message_and_a_retry_wait_is_not_running() -> None:
    view = started_view()
    messages = []
    for payload in (step(2, "a", "running"), step(3, "a", "completed"),
                    step(4, "b", "retrying", error={"category": "transient", "message": "503"}),
                    step(5, "b", "running", attempt=2),
                    step(6, "b", "retrying", attempt=2,
                         error={"category": "transient", "message": "503"}),
                    step(7, "b", "cancelled", attempt=2, reason="stopped")):
        applied = apply(view, event(payload), NOW)
        assert applied.view is not None
        view = applied.view
        messages.append([(d.type, d.step_id, d.attempt) for d in applied.drafts])
    assert messages == [[("step.running", "a", 1)], [("step.completed", "a", 1)],
                        [("step.running", "b", 1), ("step.retrying", "b", 1)],
                        [("step.running", "b", 2)], [("step.retrying", "b", 2)],
                        [("step.failed", "b", 2)]]  # cancelled while it waited to retry


def test_a_failure_carries_its_error_and_impact() -> None:
    failed = apply(started_view(), event(step(
        2, "a", "failed", error={"category": "resource", "message": "full", "hint": "wait"},
        impact={"skipped": ["b"], "run_fails": True})), NOW).drafts[-1]
    assert failed.error is not None
    assert (failed.error.category, failed.error.hint) == ("resource", "wait")
    assert failed.impact is not None and failed.impact.skipped == ("b",)


def test_events_before_the_start_and_a_second_start_change_nothing() -> None:
    assert apply(None, event(step(2, "a", "running")), NOW).view is None
    view = started_view()
    again = apply(view, event(STARTED, "planrun.run.started"), NOW)
    assert again.view is view and again.drafts == []


def test_a_pause_and_a_gate_are_timed_from_now() -> None:
    paused = apply(started_view(), event(RunPaused(run_id="r", n=2, timeout_s=60,
                                                   on_timeout="resume")), NOW).view
    assert paused is not None and paused.pause_deadline is not None
    assert (paused.pause_deadline.deadline, paused.pause_deadline.action) == (NOW + 60,
                                                                              "resume")
    gated = apply(started_view(), event(RunAwaitingApproval(run_id="r", n=2, step_id="b",
                                                            timeout_s=30)), NOW).view
    assert gated is not None and gated.gate is not None and gated.gate.deadline == NOW + 30


def test_a_wait_for_a_person_is_in_the_estimate_until_the_run_goes_on() -> None:
    done = apply(started_view(), event(step(2, "a", "completed")), NOW).view
    assert done is not None
    for wait in (RunPaused(run_id="r", n=3, reason="asked"),
                 RunAwaitingApproval(run_id="r", n=3, step_id="b", prompt="go?")):
        waiting = apply(done, event(wait), NOW)
        assert waiting.view is not None and waiting.view.waiting_since == NOW
        estimate = waiting.drafts[0].estimate
        assert estimate is not None and estimate.finish_at is None
        assert estimate.waiting_since == "2026-01-01T00:00:05.000Z"
        later = waiting.view.report(NOW + 100)["estimate"]
        assert later["waiting_since"] == estimate.waiting_since
        assert later["remaining_s"] == estimate.remaining_s  # nothing ran meanwhile
        kept = RunView.from_json(waiting.view.to_json())
        assert kept.waiting_since == NOW
        resumed = apply(kept, event(RunResumed(run_id="r", n=4, restored=["a"])), NOW + 100)
        assert resumed.view is not None and resumed.view.waiting_since is None
        going = resumed.drafts[0].estimate
        assert going is not None and going.waiting_since is None
        assert going.finish_at is not None and going.finish_at > "2026-01-01T00:01:45"


def test_a_run_ended_by_prefect_cancels_what_runs_and_skips_what_waits() -> None:
    running = apply(started_view(), event(step(2, "a", "running")), NOW).view
    assert running is not None
    ended = end_by_flow_run(running, FlowRunEnded("f", "r", NOW, "CRASHED", "process died"),
                            NOW)
    assert [(d.type, d.step_id, d.status) for d in ended.drafts] == [
        ("step.failed", "a", "cancelled"), ("step.skipped", "b", "skipped"),
        ("run.failed", None, "failed")]
    assert ended.drafts[-1].summary == "the run's flow run ended crashed: process died"
    assert ended.drafts[-1].progress is not None and ended.drafts[-1].progress.percent == 100.0
    assert ended.view is not None
    assert end_by_flow_run(ended.view, FlowRunEnded("g", "r", NOW, "CRASHED"), NOW).drafts == []
    assert running.record.status == RunStatus.RUNNING  # the view given is unchanged


def test_the_view_survives_saving_and_loading() -> None:
    view = apply(started_view(), event(step(
        2, "a", "failed", error={"category": "logic", "message": "m", "hint": "h"},
        input={"seconds": 1})), NOW).view
    assert view is not None
    again = RunView.from_json(view.to_json())
    assert again.report(NOW) | {"estimate": None} == view.report(NOW) | {"estimate": None}
    assert again.step_n == {"a": 2}
    assert apply(again, event(step(2, "a", "running")), NOW).drafts == []


def test_the_process_a_run_named_is_kept_saved_and_replaced_on_resume() -> None:
    first = RunProcess(place="host/pid:[1]", pid=42, started=1.5, state_id="s1")
    view = RunView.started("r", STARTED.model_copy(update={"process": first}), NOW)[0]
    assert RunView.from_json(view.to_json()).process == first
    then = first.model_copy(update={"pid": 43, "state_id": "s2"})
    resumed = RunResumed.read({"run_id": "r", "n": 2, "restored": []})
    view.on_resumed(resumed.model_copy(update={"process": then}), NOW)
    assert view.process == then


def test_a_saved_view_of_an_unknown_version_is_refused_clearly() -> None:
    text = started_view().to_json().replace('"v":1', '"v":99', 1)
    with pytest.raises(ContractError, match="SavedView of contract version 99 cannot be read"):
        RunView.from_json(text)


def test_a_retry_goes_on_with_an_ended_run_and_an_old_retry_event_changes_nothing() -> None:
    view: RunView | None = started_view()
    for payload in (step(2, "a", "completed", output={"n": 1}),
                    step(3, "b", "failed", error={"category": "logic", "message": "down"}),
                    RunEnded(run_id="r", n=4, status=RunStatus.COMPLETED_WITH_ERRORS,
                             rolled_back=["x.txt"])):
        assert view is not None
        view = apply(view, event(payload), NOW).view
    assert view is not None and view.ended
    assert apply(view, event(RunResumed(run_id="r", n=5, restored=["a"])), NOW).drafts == []

    retried = apply(view, event(RunResumed(run_id="r", n=2_000_001, restored=["a"],
                                           retry=1)), NOW)
    assert [(d.type, d.status, d.summary) for d in retried.drafts] == [
        ("run.resumed", "running", "retry 1: 1 step(s) run again, 1 finished step(s) kept")]
    again = retried.view
    assert again is not None and not again.ended and again.retries == 1
    assert again.record.steps["a"].output == {"n": 1}
    b = again.record.steps["b"]
    assert (b.status, b.error, b.attempts) == (StepStatus.PENDING, None, 0)
    assert again.record.ended_at is None and again.record.rolled_back == []
    assert retried.drafts[0].progress is not None and retried.drafts[0].progress.done == 1
    assert RunView.from_json(again.to_json()).retries == 1  # kept when saved

    ended_again = apply(again, event(RunEnded(run_id="r", n=2_000_003,
                                              status=RunStatus.COMPLETED)), NOW).view
    assert ended_again is not None
    late = apply(ended_again, event(RunResumed(run_id="r", n=2_000_001, restored=["a"],
                                               retry=1)), NOW)  # read again after a restart
    assert late.drafts == [] and late.view is not None and late.view.ended


def saved_afresh(view: RunView) -> str:
    """The view saved with no step's JSON kept from before: every step made now."""
    return replace(view, saved_steps=StepsSaved()).to_json()


def test_a_saved_view_reuses_only_what_did_not_change() -> None:
    view: RunView | None = started_view()
    seen = []
    for payload in (step(2, "a", "running"), step(3, "a", "completed", output={"n": 1}),
                    step(4, "b", "retrying", error={"category": "transient", "message": "503"}),
                    RunPaused(run_id="r", n=5, reason="asked"),
                    RunResumed(run_id="r", n=6, restored=["a"]),
                    step(7, "b", "failed", error={"category": "logic", "message": "down"}),
                    RunEnded(run_id="r", n=8, status=RunStatus.COMPLETED_WITH_ERRORS),
                    RunResumed(run_id="r", n=2_000_001, restored=["a"], retry=1)):
        assert view is not None
        before = view.to_json()
        view = apply(view, event(payload), NOW).view
        assert view is not None
        text = view.to_json()
        assert text == saved_afresh(view)  # nothing stale: the same as made whole
        # ... and exactly what the contract's model writes for what it reads back
        assert SavedView.model_validate_json(text).model_dump_json(fallback=str) == text
        seen.append(text != before)
        assert (len(view.saved_steps) == 0) == view.ended  # an ended run keeps no JSON
    assert all(seen)  # every event above changed what is saved


def wide_view(steps: int) -> RunView:
    """A started run of ``steps`` independent steps."""
    plan = [{"id": f"s{i}", "tool": "core.echo", "needs": []} for i in range(steps)]
    return RunView.started("r", RunStarted.read({**STARTED.model_dump(mode="json"),
                                                 "steps": plan}), NOW)[0]


def test_saving_a_view_again_makes_the_json_of_the_changed_steps_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    view = wide_view(200)
    view.to_json()
    made: list[str] = []
    checkpoint = StepRecord.to_checkpoint
    monkeypatch.setattr(StepRecord, "to_checkpoint",
                        lambda self: made.append(self.id) or checkpoint(self))
    changed = apply(view, event(step(2, "s7", "completed", output={"n": 7})), NOW).view
    assert changed is not None
    assert '"output":{"n":7}' in changed.to_json()
    assert made == ["s7"]
    made.clear()
    assert view.to_json() == saved_afresh(view)  # the view before the event, as it was
    assert made == ["s7", *(f"s{i}" for i in range(200))]  # s7 again, then afresh


@pytest.mark.parametrize(("steps", "every_s"), [(2, 0.25), (200, 0.25), (1000, 1.0)])
def test_an_estimate_is_made_afresh_at_most_every_quarter_second_or_ms_per_step(
        steps: int, every_s: float) -> None:
    view, at = wide_view(steps), NOW + 10  # its start made the first estimate, at NOW
    view.estimate(at)
    assert not view.estimate_stale and not view.estimate_due(at + every_s - 0.01)
    reused = view.estimate(at + every_s - 0.01)
    assert view.estimate_stale and reused is not None  # the last one, the time taken off
    assert view.estimate_due(at + every_s)
    view.estimate(at + every_s)
    assert not view.estimate_stale


def test_a_view_changed_again_after_it_was_saved_saves_the_change() -> None:
    """A saved step's JSON is kept with the step: a view that changes a step after saving
    it (as the tests' views do, without a copy) changes a copy of the step, not the step
    whose JSON is kept."""
    view = started_view()
    first = view.to_json()
    view.on_step(step(2, "a", "running"), NOW)
    second = view.to_json()
    view.on_step(step(3, "a", "completed", output={"n": 1}), NOW)
    view.on_waiting(StepWaiting(run_id="r", n=4, step_id="b", why="slot", note="a slot"),
                    NOW)
    third = view.to_json()
    assert len({first, second, third}) == 3
    assert third == saved_afresh(view)
    assert '"output":{"n":1}' in third and '"note":"a slot"' in third


def test_a_copy_keeps_its_steps_when_the_view_it_was_copied_from_changes() -> None:
    view = started_view()
    view.on_step(step(2, "a", "running"), NOW)  # a step the view has made its own
    copied = view.copy()
    view.on_step(step(3, "a", "completed", output={"n": 1}), NOW)
    assert copied.record.steps["a"].status == StepStatus.RUNNING
    assert copied.record.steps["a"].output is None
    assert view.record.steps["a"].status == StepStatus.COMPLETED
