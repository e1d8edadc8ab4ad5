"""The bridge's view of a run: events in, docs/stream.md drafts out (no Prefect, no server)."""

from __future__ import annotations

import time
from typing import Any

from progress_bridge.runs import RunView

STARTED = {"run_id": "r", "n": 1, "plan": "p", "max_parallel": 2,
           "started_at": "2026-01-01T00:00:00.000Z", "prefect_url": None,
           "steps": [{"id": "a", "name": "A", "tool": "core.sleep", "needs": [],
                      "critical": True, "estimate_s": 1.0},
                     {"id": "b", "name": None, "tool": "core.echo", "needs": ["a"],
                      "critical": False, "estimate_s": 2.0}]}


def step(n: int, step_id: str, status: str, **fields: Any) -> dict[str, Any]:
    return {"run_id": "r", "n": n, "step_id": step_id, "status": status, "attempt": 1,
            "started_at": "2026-01-01T00:00:01.000Z", **fields}


def test_run_started_announces_every_step_with_its_needs_and_first_estimate() -> None:
    view, drafts = RunView.started("r", STARTED)
    (first,) = drafts
    assert first.type == "run.started" and first.status == "running"
    assert first.plan is not None
    assert [(s.id, s.needs, s.critical, s.estimate_s) for s in first.plan] == [
        ("a", (), True, 1.0), ("b", ("a",), False, 2.0)]
    assert first.progress is not None and first.progress.total == 2
    assert first.estimate is not None and first.estimate.remaining_s > 0


def test_an_event_older_than_what_a_step_shows_is_dropped() -> None:
    view, _ = RunView.started("r", STARTED)
    done = view.step_event(step(3, "a", "completed", ended_at="2026-01-01T00:00:02.000Z",
                                duration_s=1.0, summary="slept", output={"slept_s": 1}))
    assert [d.type for d in done] == ["step.completed"]
    assert view.step_event(step(2, "a", "running")) == []  # arrived late: not a step back
    assert view.record.steps["a"].status == "completed"
    assert view.step_event(step(3, "a", "completed")) == []  # the same event again
    assert done[0].progress is not None and done[0].progress.done == 1


def test_a_failure_carries_its_error_and_impact_and_a_cancelled_step_is_a_failed_message(
        ) -> None:
    view, _ = RunView.started("r", STARTED)
    (failed,) = view.step_event(step(
        2, "a", "failed", error={"category": "resource", "message": "full", "hint": "wait"},
        impact={"skipped": ["b"], "run_fails": True}))
    assert failed.error is not None
    assert (failed.error.category, failed.error.hint) == ("resource", "wait")
    assert failed.impact is not None and failed.impact.skipped == ("b",)
    (cancelled,) = view.step_event(step(3, "b", "cancelled", reason="stopped"))
    assert (cancelled.type, cancelled.status, cancelled.error) == ("step.failed", "cancelled",
                                                                   None)


def test_a_run_ended_by_prefect_cancels_what_runs_and_skips_what_waits() -> None:
    view, _ = RunView.started("r", STARTED)
    view.step_event(step(2, "a", "running"))
    drafts = view.flow_run_ended("CRASHED", "process died")
    assert [(d.type, d.step_id, d.status) for d in drafts] == [
        ("step.failed", "a", "cancelled"), ("step.skipped", "b", "skipped"),
        ("run.failed", None, "failed")]
    assert drafts[-1].summary == "the run's flow run ended crashed: process died"
    assert drafts[-1].progress is not None and drafts[-1].progress.percent == 100.0
    assert view.flow_run_ended("CRASHED", None) == []  # ended once
    assert view.run_ended({"status": "completed"}) == []


def test_the_view_survives_saving_and_loading() -> None:
    view, _ = RunView.started("r", STARTED)
    view.step_event(step(2, "a", "failed", error={"category": "logic", "message": "m",
                                                  "hint": "h"}, input={"seconds": 1}))
    again = RunView.from_json(view.to_json())
    now = time.time()  # the run is still going: both reports as of one instant
    assert again.report(now) | {"estimate": None} == view.report(now) | {"estimate": None}
    assert again.step_n == {"a": 2}
    assert again.step_event(step(2, "a", "running")) == []
