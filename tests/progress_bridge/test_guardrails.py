"""Guardrails in the bridge's pure parts (no server, no clock): a waiting step's note, a
finished step's resources, a breaker's change told to the runs that use its tool, what
``/metrics`` says of them, and when a submission must wait (docs/stream.md,
docs/http-api.md)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from planrun.contract.breakers import BreakerChange
from planrun.contract.events import RunEnded, RunStarted, StepChanged, StepWaiting, step_event
from planrun.contract.records import Resources
from planrun.contract.status import RunStatus
from planrun.progress_bridge.admission import MEMORY_RETRY_S, Admission
from planrun.progress_bridge.apply import (
    BreakerChanged,
    RunEvent,
    apply,
    breaker_changed,
    told_of_breakers,
)
from planrun.progress_bridge.breakers import BreakerBoard
from planrun.progress_bridge.flow_runs import FakeFlowRuns
from planrun.progress_bridge.hub import Hub
from planrun.progress_bridge.metrics import Metrics
from planrun.progress_bridge.runs import RunView
from planrun.progress_bridge.service import ControlService
from planrun.progress_bridge.state import BridgeState, Settings
from planrun.progress_bridge.store import MessageStore

NOW = 1_767_225_605.0  # 2026-01-01T00:00:05Z
STARTED = RunStarted.read({
    "run_id": "r", "n": 1, "plan": "p", "started_at": "2026-01-01T00:00:00.000Z",
    "steps": [{"id": "find", "tool": "search.web", "needs": []},
              {"id": "fetch", "tool": "http.request", "needs": []},
              {"id": "build", "tool": "shell.run", "needs": ["find"]}]})
OPEN = BreakerChange(key="search.web", state="open", epoch=1, failures=5, window_s=60.0,
                     probe_at=NOW + 30, opened_total=1,
                     message="search.web is failing in every run (5 in 60 s); "
                             "the next try is at 14:02:10")


def started() -> RunView:
    applied = apply(None, RunEvent("e1", "planrun.run.started", "r", NOW - 5, STARTED), NOW)
    assert applied.view is not None
    return applied.view


def waiting(n: int, step_id: str, note: str, why: str = "slot") -> RunEvent:
    payload = StepWaiting.read({"run_id": "r", "n": n, "step_id": step_id, "why": why,
                                "note": note})
    return RunEvent(f"e{n}", "planrun.step.waiting", "r", NOW - 1, payload)


def changed(n: int, step_id: str, status: str, **fields: Any) -> RunEvent:
    payload = StepChanged.read({"run_id": "r", "n": n, "step_id": step_id, "status": status,
                                "attempt": 1, **fields})
    return RunEvent(f"e{n}", step_event(payload.status), "r", NOW - 1, payload)


def breaker(change: BreakerChange, event_id: str = "b1") -> BreakerChanged:
    return BreakerChanged(event_id, NOW - 2, change)


# ---- a waiting step ---------------------------------------------------------------------

def test_a_waiting_step_is_pending_with_its_note_until_it_starts() -> None:
    view = started()
    applied = apply(view, waiting(2, "build", "waiting for a shell.run slot, 3 ahead"), NOW)
    assert [(d.type, d.step_id, d.status, d.note) for d in applied.drafts] == [
        ("step.waiting", "build", "pending", "waiting for a shell.run slot, 3 ahead")]
    assert applied.drafts[0].ts == "2026-01-01T00:00:04.000Z"
    assert view.record.steps["build"].note is None  # pure: the view given is unchanged
    assert applied.view is not None
    report = applied.view.report(NOW)["steps"]["build"]
    assert (report["status"], report["note"]) == ("pending", "waiting for a shell.run slot, 3 ahead")
    assert applied.view.waiting == {"build": "slot"}

    same = apply(applied.view, waiting(3, "build", "waiting for a shell.run slot, 3 ahead"), NOW)
    assert same.drafts == []  # the same reason again tells nobody anything
    closer = apply(same.view, waiting(4, "build", "waiting for a shell.run slot, 1 ahead"), NOW)
    assert [d.note for d in closer.drafts] == ["waiting for a shell.run slot, 1 ahead"]

    assert closer.view is not None
    running = apply(closer.view, changed(5, "build", "running"), NOW).view
    assert running is not None
    assert "note" not in running.report(NOW)["steps"]["build"]
    assert running.waiting == {}
    late = apply(running, waiting(4, "build", "waiting for a shell.run slot, 1 ahead"), NOW)
    assert late.drafts == []  # older than what the step shows: dropped


def test_a_wait_of_a_finished_step_or_an_unknown_one_makes_no_message() -> None:
    done = apply(started(), changed(2, "build", "completed"), NOW).view
    assert done is not None
    assert apply(done, waiting(3, "build", "waiting for load"), NOW).drafts == []
    assert apply(done, waiting(3, "nope", "waiting for load"), NOW).drafts == []


def test_the_run_ending_ends_every_wait() -> None:
    view = apply(started(), waiting(2, "build", "waiting: the machine is busy", "load"), NOW).view
    assert view is not None and view.waiting == {"build": "load"}
    ended = apply(view, RunEvent("e3", "planrun.run.cancelled", "r", NOW,
                                 RunEnded(run_id="r", n=3, status=RunStatus.CANCELLED)), NOW).view
    assert ended is not None and ended.waiting == {}
    assert ended.record.steps["build"].note is None


# ---- resources ----------------------------------------------------------------------------

def test_a_finished_step_carries_what_it_used_in_its_message_and_report() -> None:
    used = {"peak_memory_bytes": 44_040_192, "cpu_s": 0.3, "written_bytes": 12_288}
    applied = apply(started(), changed(2, "build", "completed", resources=used), NOW)
    assert applied.drafts[0].resources == Resources.model_validate(used)
    assert applied.view is not None
    assert applied.view.report(NOW)["steps"]["build"]["resources"] == used
    running = apply(started(), changed(2, "build", "running", resources=used), NOW)
    assert running.drafts[0].resources is None  # only a finished step has used anything


def test_notes_resources_and_what_a_run_was_told_survive_saving_and_loading() -> None:
    view = apply(started(), waiting(2, "build", "waiting for a shell.run slot"), NOW).view
    assert view is not None
    view = apply(view, changed(3, "find", "completed",
                               resources={"peak_memory_bytes": 1, "cpu_s": 0.5}), NOW).view
    assert view is not None
    view = breaker_changed(view, breaker(OPEN), NOW).view
    assert view is not None
    again = RunView.from_json(view.to_json())
    assert again.report(NOW)["steps"] == view.report(NOW)["steps"]
    assert again.report(NOW)["steps"]["build"]["note"] == "waiting for a shell.run slot"
    assert (again.waiting, again.told) == ({"build": "slot"}, {"search.web": (1, 0)})
    assert breaker_changed(again, breaker(OPEN, "b2"), NOW).drafts == []


# ---- breakers --------------------------------------------------------------------------------

def test_a_breaker_of_a_tool_the_plan_uses_makes_a_circuit_message() -> None:
    applied = breaker_changed(started(), breaker(OPEN), NOW)
    assert [(d.type, d.status, d.tool, d.note, d.step_id) for d in applied.drafts] == [
        ("tool.circuit_opened", "open", "search.web", OPEN.message, None)]
    assert applied.drafts[0].progress is not None
    host = OPEN.model_copy(update={"key": "http.request@api.example.org", "message": None})
    assert [d.tool for d in breaker_changed(started(), breaker(host), NOW).drafts] == [
        "http.request@api.example.org"]
    other = OPEN.model_copy(update={"key": "browser.open"})
    assert breaker_changed(started(), breaker(other), NOW).drafts == []


def test_a_late_or_repeated_breaker_change_tells_a_run_nothing_new() -> None:
    closed = OPEN.model_copy(update={"state": "closed", "message": "search.web works again"})
    view = breaker_changed(started(), breaker(closed), NOW).view
    assert view is not None
    assert breaker_changed(view, breaker(OPEN, "late"), NOW).drafts == []  # closed is newer
    reopened = OPEN.model_copy(update={"epoch": 2})
    assert [d.type for d in breaker_changed(view, breaker(reopened), NOW).drafts] == [
        "tool.circuit_opened"]


def test_a_run_that_starts_while_a_breaker_is_open_is_told_after_run_started() -> None:
    half = BreakerChange(key="http.request@h", state="half_open", epoch=3)
    applied = apply(None, RunEvent("e1", "planrun.run.started", "r", NOW - 5, STARTED), NOW)
    told = told_of_breakers(applied, [OPEN, half], NOW - 5, NOW)
    assert [(d.type, d.tool) for d in told.drafts] == [
        ("run.started", None), ("tool.circuit_opened", "search.web"),
        ("tool.circuit_half_open", "http.request@h")]
    assert told.drafts[2].note == "http.request@h: one trial call goes through"
    assert {d.ts for d in told.drafts} == {"2026-01-01T00:00:00.000Z"}


def test_a_breaker_past_its_cool_down_says_its_next_call_is_a_trial() -> None:
    assert OPEN.note(NOW) == OPEN.message
    assert OPEN.note(NOW + 31) == ("search.web is failing in every run (5 in 60 s); its "
                                   "next call is a trial")
    stored = OPEN.model_copy(update={"message": None, "probe_at": time.time() + 60})
    assert stored.note(time.time()).startswith("search.web is failing in every run (5 in 60 s);"
                                               " the next try is at ")


def test_the_board_keeps_the_latest_change_of_each_breaker_whatever_the_order() -> None:
    board = BreakerBoard()
    closed = OPEN.model_copy(update={"state": "closed", "message": None})
    assert board.update(closed)
    assert not board.update(OPEN)  # epoch 1 opened before it closed
    assert board.latest["search.web"].state == "closed"
    assert board.update(closed.model_copy(update={"message": "search.web works again"}))
    assert board.latest["search.web"].message == "search.web works again"
    assert board.update(OPEN.model_copy(update={"epoch": 2}))
    assert [c.key for c in board.not_closed()] == ["search.web"]


# ---- /metrics ---------------------------------------------------------------------------------

def test_metrics_show_each_breakers_state_its_openings_and_the_waiting_steps(tmp_path: Any) -> None:
    store = MessageStore(tmp_path)
    metrics = Metrics()
    state = BridgeState(store, Hub(), metrics, ControlService(FakeFlowRuns()), Settings(token="t"))
    metrics.follow(state)
    state.breakers.update(OPEN.model_copy(update={"opened_total": 3}))
    state.breakers.update(BreakerChange(key="http.request@h", state="half_open", epoch=1,
                                        opened_total=1))
    state.breakers.update(BreakerChange(key="message.send", state="closed", epoch=2,
                                        opened_total=2))
    view = apply(started(), waiting(2, "build", "waiting for a shell.run slot"), NOW).view
    assert view is not None
    view = apply(view, waiting(3, "find", "waiting: search.web allows 1 call a second", "rate"),
                 NOW).view
    assert view is not None
    state.views.update({"r": view, "queued": RunView.unstarted("queued")})
    text = metrics.render().decode()
    store.close()
    for line in ('planrun_breaker_state{breaker="search.web"} 2.0',
                 'planrun_breaker_state{breaker="http.request@h"} 1.0',
                 'planrun_breaker_state{breaker="message.send"} 0.0',
                 'planrun_breaker_opened_total{breaker="search.web"} 3.0',
                 'planrun_breaker_opened_total{breaker="message.send"} 2.0',
                 'planrun_steps_waiting{why="slot"} 1.0',
                 'planrun_steps_waiting{why="rate"} 1.0',
                 'planrun_steps_waiting{why="load"} 0.0',
                 "planrun_runs_queued 1.0",
                 "# TYPE planrun_breaker_opened_total counter"):
        assert line in text, line


# ---- admission ----------------------------------------------------------------------------------

def test_a_full_queue_waits_as_long_as_the_runs_ahead_take_to_start() -> None:
    clock = [NOW]
    admission = Admission(max_queued=4, memory_percent=lambda: 10.0, clock=lambda: clock[0])
    assert admission.refusal(3) is None
    nobody_started = admission.refusal(4)
    assert nobody_started is not None and nobody_started.retry_after_s == 60  # no pace yet
    for i in range(12):  # 12 starts in the last minute: one every 5 s
        admission.started(NOW - 55 + 5 * i)
    refusal = admission.refusal(6)  # 3 must start before there is room
    assert refusal is not None
    assert (refusal.reason, refusal.retry_after_s) == ("queue_full", 15)
    assert refusal.detail == ("the queue is full: 6 run(s) wait to start (the limit is 4); "
                              "try again in 15 s")
    clock[0] = NOW + 120  # the pace is measured over the last minute only
    stale = admission.refusal(4)
    assert stale is not None and stale.retry_after_s == 60


def test_a_machine_short_of_memory_refuses_even_an_empty_queue() -> None:
    readings = iter([95.0, 20.0])
    admission = Admission(max_memory_percent=90, memory_percent=lambda: next(readings))
    refusal = admission.refusal(0)
    assert refusal is not None
    assert (refusal.reason, refusal.retry_after_s) == ("memory", MEMORY_RETRY_S)
    assert "95 % in use (the limit is 90 %)" in refusal.detail
    assert admission.refusal(0) is not None  # read once a second, not per request


def test_the_limits_come_from_the_environment_and_bad_values_say_which(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_MAX_QUEUED", "7")
    monkeypatch.setenv("PLANRUN_MAX_MEMORY_PERCENT", "80.5")
    admission = Admission.from_env()
    assert (admission.max_queued, admission.max_memory_percent) == (7, 80.5)
    monkeypatch.setenv("PLANRUN_MAX_QUEUED", "lots")
    with pytest.raises(ValueError, match=r"PLANRUN_MAX_QUEUED='lots' is not a number"):
        Admission.from_env()
