"""Run control without HTTP: the control service's domain errors over in-memory flow
runs, and the bridge's deadlines acting through it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import pytest

from planrun.contract.control import RETRY_LABEL, TIMED_OUT, answer_form, asking_key
from planrun.contract.events import RunProcess
from planrun.contract.status import RunStatus
from planrun.errors import Conflict, NotFound
from planrun.progress_bridge.flow_runs import FakeFlowRuns, FlowRun
from planrun.progress_bridge.runs import RunView
from planrun.progress_bridge.saved_view import Gate, PauseDeadline
from planrun.progress_bridge.service import ControlService
from planrun.progress_bridge.timers import Deadlines, Later

from .events import exited_process, this_process

NONCE = "0123456789abcdef0123456789abcdef"


def service(*runs: FlowRun) -> tuple[ControlService, FakeFlowRuns]:
    flow_runs = FakeFlowRuns({run.id: run for run in runs})
    return ControlService(flow_runs), flow_runs


CONFLICTS = [
    ("pause", FlowRun("r", "PAUSED"), "run r is already paused"),
    ("pause", FlowRun("r", "COMPLETED", "Completed"),
     "run r is completed: only a running run can be paused"),
    ("resume", FlowRun("r", "RUNNING"), "run r is running: only a paused or crashed run"),
    ("resume", FlowRun("r", "PAUSED", waits_for_input=True),
     "run r is waiting for an approval: approve or reject the step"),
    ("cancel", FlowRun("r", "FAILED", "Failed"), r"run r has already ended \(failed\)"),
    ("retry", FlowRun("r", "RUNNING", "Running"),
     "run r is running: only a run that has ended can be retried"),
    ("retry", FlowRun("r", "PAUSED", "Suspended"), "run r is suspended: only a run that"),
    ("retry", FlowRun("r", "COMPLETED", "Completed"),
     "run r completed: it has no failed, skipped or cancelled step to run again"),
    ("retry", FlowRun("r", "FAILED", "Failed", deployed=False),
     "run r ran in the process of `planrun run`: retry it from a terminal with "
     "`planrun retry r`"),
    ("retry", FlowRun("r", "FAILED", "Failed", secret_inputs=True),
     "run r had secret inputs, which were forgotten when it ended: run the plan again"),
]


@pytest.mark.parametrize(("action", "flow_run", "reason"), CONFLICTS,
                         ids=[f"{c[0]} {c[1].kind.lower()}" for c in CONFLICTS])
def test_a_control_the_state_does_not_allow_is_a_conflict_with_the_reason(
        action: str, flow_run: FlowRun, reason: str) -> None:
    control, flow_runs = service(flow_run)
    with pytest.raises(Conflict, match=reason):
        asyncio.run(getattr(control, action)("r"))
    assert flow_runs.calls == []  # nothing was changed


@pytest.mark.parametrize("flow_run", [
    FlowRun("r", "FAILED", "Failed"), FlowRun("r", "CANCELLED", "Cancelled"),
    FlowRun("r", "CRASHED", "Crashed"), FlowRun("r", "COMPLETED", "Completed with errors")],
    ids=["failed", "cancelled", "crashed", "completed with errors"])
def test_a_run_that_ended_with_steps_to_run_again_is_retried_by_scheduling_it(
        flow_run: FlowRun) -> None:
    control, flow_runs = service(flow_run)
    asyncio.run(control.retry("r"))
    flow_runs.runs["r"] = flow_run  # it ended again
    asyncio.run(control.retry("r"))  # each retry is a new request, taken once
    labels = [call[2][RETRY_LABEL] for call in flow_runs.calls if call[0] == "label"]
    assert len(labels) == 2 and labels[0] != labels[1]
    assert flow_runs.calls[1] == ("set_state", "r", "SCHEDULED", "retried by a person")


def test_an_answer_to_a_gate_the_run_does_not_wait_at_is_a_conflict() -> None:
    waiting = FlowRun("r", "PAUSED", waits_for_input=True, pause_key=asking_key("b", NONCE))
    control, flow_runs = service(waiting)
    with pytest.raises(Conflict, match="run r is not waiting for an approval of a"):
        asyncio.run(control.answer("r", "a", approved=True, comment=""))
    asyncio.run(control.answer("r", "b", approved=True, comment="ok"))
    assert flow_runs.calls == [("resume", "r", answer_form(True, "ok"))]
    assert answer_form(True, "ok")["decision"] == "approve"


def test_an_unknown_run_is_not_found() -> None:
    control, _ = service()
    with pytest.raises(NotFound, match="no run nope"):
        asyncio.run(control.pause("nope"))


def test_a_run_waiting_at_a_gate_is_cancelled_with_its_form_filled_in() -> None:
    """Prefect resumes a run that waits for input only with a valid form; the answer is
    moot, the run ends cancelled."""
    control, flow_runs = service(FlowRun("r", "PAUSED", waits_for_input=True,
                                         pause_key=asking_key("b", NONCE)))
    asyncio.run(control.cancel("r"))
    assert flow_runs.calls == [("label", "r", {"planrun.control": "cancel"}),
                               ("resume", "r", answer_form(False, "cancelled"))]


def test_allowed_controls_become_flow_run_states() -> None:
    control, flow_runs = service(FlowRun("a", "RUNNING"), FlowRun("b", "PAUSED"),
                                 FlowRun("c", "SCHEDULED"), FlowRun("d", "CRASHED"))

    async def main() -> None:
        await control.pause("a")
        await control.cancel("b")
        await control.cancel("c")
        await control.resume("d")

    asyncio.run(main())
    assert flow_runs.calls == [
        ("set_state", "a", "PAUSED", "paused by a person"),
        ("label", "b", {"planrun.control": "cancel"}), ("resume", "b", None),
        ("set_state", "c", "CANCELLED", "cancelled by a person before it started"),
        ("set_state", "d", "SCHEDULED", "resumed by a person after a crash")]


def paused_view(action: Literal["cancel", "resume"]) -> RunView:
    """A paused run whose pause timed out a second ago."""
    view = RunView.unstarted("r")
    view.record.status = RunStatus.PAUSED
    view.pause_deadline = PauseDeadline(deadline=time.time() - 1, action=action)
    return view


def test_a_pause_that_timed_out_acts_through_the_service_and_a_conflict_is_only_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    control, flow_runs = service(FlowRun("r", "PAUSED"))
    views = {"r": paused_view("resume")}
    deadlines = Deadlines(views, control, Later(), dead_after_s=60)
    asyncio.run(deadlines.pause_timed_out("r"))
    assert flow_runs.calls == [("resume", "r", None)]

    views["r"] = paused_view("cancel")  # the run ran on meanwhile: the control conflicts
    flow_runs.runs["r"] = FlowRun("r", "COMPLETED", "Completed")
    with caplog.at_level(logging.INFO, logger="planrun.bridge"):
        asyncio.run(deadlines.pause_timed_out("r"))
    assert "no cancel after its deadline: run r has already ended (completed)" in caplog.text


def test_a_gate_no_one_answered_in_time_is_rejected_through_the_service() -> None:
    control, flow_runs = service(FlowRun("r", "PAUSED", waits_for_input=True,
                                         pause_key=asking_key("b", NONCE)))
    view = RunView.unstarted("r")
    view.gate = Gate(step_id="b", deadline=time.time() - 1)
    deadlines = Deadlines({"r": view}, control, Later(), dead_after_s=60)
    asyncio.run(deadlines.gate_timed_out("r", "b"))
    assert flow_runs.calls == [("resume", "r", answer_form(False, TIMED_OUT))]


def test_a_running_run_silent_too_long_is_declared_crashed() -> None:
    control, flow_runs = service(FlowRun("r", "RUNNING"))
    view = RunView.unstarted("r")

    async def main() -> None:
        later = Later()
        deadlines = Deadlines({"r": view}, control, later, dead_after_s=5)
        deadlines.seen_alive("r", 100.0)
        deadlines.check_alive("r", view, 104.0)  # not yet
        deadlines.check_alive("r", view, 106.0)
        await asyncio.sleep(0.05)
        await later.close()

    asyncio.run(main())
    assert flow_runs.calls == [("set_state", "r", "CRASHED", "no sign of life for 6s")]


def test_a_silent_run_whose_events_or_state_in_prefect_show_it_alive_is_left_alone() -> None:
    """The stream lost its heartbeats (a loaded server drops events for a subscriber that
    falls behind): reading the run's events from Prefect's API finds them; or its state
    changed since it was last heard from."""
    def checked(heard_at: float | None, state_since: float | None = None,
                process: RunProcess | None = None
                ) -> tuple[list[tuple[object, ...]], list[str]]:
        control, flow_runs = service(FlowRun("r", "RUNNING", since=state_since,
                                             process=process))
        view, recalled = RunView.unstarted("r"), []

        async def main() -> None:
            later = Later()

            async def recall(run_id: str) -> int:
                recalled.append(run_id)
                if heard_at is not None:
                    deadlines.seen_alive(run_id, heard_at)  # as a delivered heartbeat does
                return int(heard_at is not None)

            deadlines = Deadlines({"r": view}, control, later, dead_after_s=5, recall=recall)
            deadlines.seen_alive("r", 100.0)
            deadlines.check_alive("r", view, 106.0)
            deadlines.check_alive("r", view, 106.5)  # while its events are read: once
            await asyncio.sleep(0.05)
            await later.close()

        asyncio.run(main())
        return flow_runs.calls, recalled

    assert checked(heard_at=104.0) == ([], ["r"])
    # Nothing in Prefect's events yet (a loaded server ingests them late), but the run
    # entered its state after it was last heard from: alive too.
    assert checked(heard_at=None, state_since=103.0) == ([], ["r"])
    # Or the process its flow run names runs here (this test's own process).
    assert checked(heard_at=None, state_since=90.0, process=this_process()) == ([], ["r"])
    calls, _ = checked(heard_at=None, state_since=90.0, process=exited_process())
    assert [call[:3] for call in calls] == [("set_state", "r", "CRASHED")]
    calls, recalled = checked(heard_at=None, state_since=90.0)
    assert recalled == ["r"]
    assert len(calls) == 1 and calls[0][:3] == ("set_state", "r", "CRASHED")
    assert str(calls[0][3]).startswith("no sign of life for ")


def _running(run_id: str = "r") -> RunView:
    view = RunView.unstarted(run_id)
    view.record.status = RunStatus.RUNNING
    return view


def _checked(deadlines_at: Callable[[Deadlines], None], *runs: FlowRun,
             views: dict[str, RunView]) -> list[tuple[object, ...]]:
    """What the control service was asked to do after ``deadlines_at`` looked."""
    control, flow_runs = service(*runs)

    async def main() -> None:
        later = Later()
        deadlines_at(Deadlines(views, control, later, dead_after_s=60))
        await asyncio.sleep(0.05)
        await later.close()

    asyncio.run(main())
    return flow_runs.calls


def test_a_running_run_whose_process_here_has_exited_is_declared_crashed_at_once() -> None:
    """No waiting out ``dead_after_s`` (60 s here): the process is gone, so is the run's
    engine. Looked at once a second, acted on once."""
    gone, view = exited_process(), _running()

    def look(deadlines: Deadlines) -> None:
        deadlines.seen_alive("r", 100.0, gone)
        deadlines.check_alive("r", view, 100.5)
        deadlines.check_alive("r", view, 100.6)  # looked already, then forgotten
        deadlines.seen_alive("r", 101.0, gone)  # a late heartbeat of it: old news
        deadlines.check_alive("r", view, 102.0)

    calls = _checked(look, FlowRun("r", "RUNNING", state_id="s1"), views={"r": view})
    assert calls == [("set_state", "r", "CRASHED", f"its process {gone.pid} has exited")]


def test_a_process_that_runs_elsewhere_or_still_runs_or_is_an_old_attempt_is_left_alone(
        ) -> None:
    """Only the silence rule decides for a process of another machine (its pid means
    nothing here); a live process is alive; a dead one whose Running state is no longer
    the run's was an earlier attempt (the run goes on in a new process)."""
    gone = exited_process()
    views = {run: _running(run) for run in ("elsewhere", "live", "old")}
    live = this_process()

    def look(deadlines: Deadlines) -> None:
        deadlines.seen_alive("elsewhere", 100.0, gone.model_copy(update={"place": "far/away"}))
        deadlines.seen_alive("live", 100.0, live)
        deadlines.seen_alive("old", 100.0, gone)
        for run, view in views.items():
            deadlines.check_alive(run, view, 101.0)

    calls = _checked(look, FlowRun("elsewhere", "RUNNING", state_id="s1"),
                     FlowRun("live", "RUNNING"), FlowRun("old", "RUNNING", state_id="s2"),
                     views=views)
    assert calls == []


def test_a_suspended_run_forgets_its_process_and_its_next_one_is_judged_alone() -> None:
    """A pause ends the run's process: that is no crash, and the process the run goes on
    in after the resume is the one looked at."""
    gone, view = exited_process(), _running()
    next_one = this_process(state_id="s2")

    def look(deadlines: Deadlines) -> None:
        deadlines.seen_alive("r", 100.0, gone)
        view.record.status = RunStatus.PAUSED
        deadlines.check_alive("r", view, 101.0)
        view.record.status = RunStatus.RUNNING
        deadlines.check_alive("r", view, 102.0)  # resumed, its new process not heard yet
        deadlines.seen_alive("r", 103.0, next_one)
        deadlines.check_alive("r", view, 104.0)

    assert _checked(look, FlowRun("r", "RUNNING", state_id="s2"), views={"r": view}) == []


def test_an_answer_to_an_announced_gate_waits_for_the_run_to_be_suspended_at_it() -> None:
    """The run says it waits at ``b``'s gate, then suspends: an answer in between is kept
    until the suspension and then given, not refused."""
    control, flow_runs = service(FlowRun("r", "RUNNING"))

    async def suspend_soon() -> None:
        await asyncio.sleep(0.3)
        flow_runs.runs["r"] = FlowRun("r", "PAUSED", waits_for_input=True,
                                      pause_key=asking_key("b", NONCE))

    async def answer_early() -> None:
        suspending = asyncio.create_task(suspend_soon())
        await control.answer("r", "b", approved=False, comment="no", announced=True)
        await suspending

    asyncio.run(answer_early())
    assert flow_runs.calls == [("resume", "r", answer_form(False, "no"))]


def test_an_answer_to_a_gate_not_announced_or_never_reached_is_refused() -> None:
    control, flow_runs = service(FlowRun("r", "RUNNING"))
    control.suspend_wait_s = 0.2
    with pytest.raises(Conflict, match=r"not waiting for an approval of b \(it is running\)"):
        asyncio.run(control.answer("r", "b", approved=True, comment=""))  # at once
    started = time.monotonic()
    with pytest.raises(Conflict, match=r"not waiting for an approval of b \(it is running\)"):
        asyncio.run(control.answer("r", "b", approved=True, comment="", announced=True))
    assert time.monotonic() - started >= 0.2  # it waited for the suspension, in vain
    assert flow_runs.calls == []


def test_a_retry_of_a_run_its_stream_says_ended_waits_for_its_flow_run_to_end() -> None:
    """The run says it failed, then its process rolls back and its flow run ends: a retry
    in between (the live page's button, as the message arrives) is taken, not refused."""
    control, flow_runs = service(FlowRun("r", "RUNNING", "Running"))

    async def end_soon() -> None:
        await asyncio.sleep(0.3)
        flow_runs.runs["r"] = FlowRun("r", "FAILED", "Failed")

    async def retry_early() -> None:
        ending = asyncio.create_task(end_soon())
        await control.retry("r", announced=True)
        await ending

    asyncio.run(retry_early())
    assert [call[0] for call in flow_runs.calls] == ["label", "set_state"]
    assert flow_runs.calls[-1] == ("set_state", "r", "SCHEDULED", "retried by a person")
    control, flow_runs = service(FlowRun("r", "RUNNING", "Running"))
    control.suspend_wait_s = 0.2
    with pytest.raises(Conflict, match="run r is running: only a run that has ended"):
        asyncio.run(control.retry("r", announced=True))  # it never ended: refused in the end
    assert flow_runs.calls == []


def test_a_pause_is_answered_once_the_runs_engine_has_heard_it() -> None:
    async def go() -> tuple[float, float]:
        control, flow_runs = service(FlowRun("r", "RUNNING"))
        flow_runs.engines_hear = False
        started = time.monotonic()
        heard_at: list[float] = []

        async def engine() -> None:  # it reads the state a little later, then says so
            while flow_runs.runs["r"].kind != "PAUSED":
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            paused = flow_runs.runs["r"]
            flow_runs.runs["r"] = replace(paused, pause_heard=paused.state_id)
            heard_at.append(time.monotonic())

        hearing = asyncio.ensure_future(engine())
        await control.pause("r")
        answered = time.monotonic()
        await hearing
        return heard_at[0] - started, answered - heard_at[0]

    heard, after = asyncio.run(go())
    assert heard >= 0.3 and after >= 0  # not answered before the engine heard it


def test_a_pause_no_engine_hears_is_answered_after_the_wait() -> None:
    async def go() -> FlowRun:
        flow_runs = FakeFlowRuns({"r": FlowRun("r", "RUNNING")}, engines_hear=False)
        control = ControlService(flow_runs, heard_wait_s=0.2)
        await control.pause("r")
        return flow_runs.runs["r"]

    left = asyncio.run(go())
    assert left.kind == "PAUSED" and left.pause_heard is None
