"""A step's tool call does not wait for Prefect's engine: its first attempt starts as the
step starts, and its output is handed on while the engine ends its task run; the run
ends only once every task run has been ended (flows/step.py, ``TaskRuns``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import UUID

import pytest

from planrun.flows import step as step_module
from planrun.flows.step import StepJob, TaskRuns
from tests.flows.test_prefect_visibility import _task_runs, ask
from tests.helpers import run_yaml, wait_for

HELD_S = 0.3  # how long each engine is held back, at its start and after its end


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """Prefect's engine of every step held back until the step's first attempt has ended
    (at most 10 s) and for HELD_S after it has ended the task run; what each saw."""
    seen: dict[str, dict[str, Any]] = {}
    original = TaskRuns._engine

    async def held(self: TaskRuns, job: StepJob, *args: Any) -> Any:
        mine = seen.setdefault(job.step.id, {})
        assert job.early is not None
        done, _ = await asyncio.wait([job.early], timeout=10)
        mine["attempt_ended_first"] = bool(done)
        try:
            return await original(self, job, *args)
        finally:
            await asyncio.sleep(HELD_S)
            mine["engine_ended"] = time.time()

    monkeypatch.setattr(step_module.TaskRuns, "_engine", held)
    return seen


def test_a_step_calls_its_tool_before_prefect_starts_its_task_run(
        engines: dict[str, dict[str, Any]]) -> None:
    report = run_yaml("""
        version: 1
        name: early
        steps:
          - {id: first, tool: core.echo, with: {value: 1}}
          - {id: second, tool: core.echo, needs: [first], with: {value: 2}}
    """)
    assert report["status"] == "completed"
    assert report["steps"]["second"]["output"] == {"value": 2}
    assert {sid: seen["attempt_ended_first"] for sid, seen in engines.items()} == {
        "first": True, "second": True}

    def completed() -> list[Any] | None:
        runs = _task_runs(report["run_id"])
        return runs if len(runs) == 2 and all(r.state.is_completed() for r in runs) else None

    runs = {r.name: r for r in wait_for(completed, what="both task runs completed")}
    assert [i.id for i in runs["second"].task_inputs["wait_for"]] == [runs["first"].id]


def test_the_run_ends_after_prefect_has_ended_every_task_run(
        engines: dict[str, dict[str, Any]]) -> None:
    report = run_yaml("""
        version: 1
        name: settled
        steps:
          - {id: a, tool: core.echo, with: {value: 1}}
          - {id: b, tool: core.echo, with: {value: 2}}
    """)
    assert report["status"] == "completed"
    ended = report["ended_at"]
    ended_at = ended if isinstance(ended, float) else _epoch(ended)
    for sid in ("a", "b"):
        assert engines[sid]["engine_ended"] <= ended_at + 0.001, sid


def test_a_first_attempts_log_lines_are_on_its_task_run(
        engines: dict[str, dict[str, Any]]) -> None:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    report = run_yaml("""
        version: 1
        name: logged-early
        steps:
          - id: flaky
            tool: core.fail
            retry: {initial_delay: 10ms}
            with: {category: transient, message: connection reset, times: 1}
    """)
    assert report["steps"]["flaky"]["attempts"] == 2
    only = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(report["run_id"])]))

    def first_failure() -> Any:
        logs = ask(lambda client: client.read_logs(log_filter=only))
        return next((log for log in logs if "attempt 1 failed (transient)" in log.message),
                    None)

    line = wait_for(first_failure, what="the first attempt's log line in Prefect")
    [task_run] = _task_runs(report["run_id"])
    assert line.task_run_id == task_run.id


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_a_wide_plans_tool_calls_start_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect's engines take turns: the tool calls of 40 independent steps all start
    before the second engine has started its task run."""
    started: list[float] = []
    attached: list[float] = []
    attach, first = StepJob.attach, StepJob.first_attempt

    async def first_attempt(self: StepJob) -> Any:
        started.append(time.monotonic())
        return await first(self)

    def attached_now(self: StepJob, task_run: Any) -> None:
        attached.append(time.monotonic())
        attach(self, task_run)

    monkeypatch.setattr(StepJob, "first_attempt", first_attempt)
    monkeypatch.setattr(StepJob, "attach", attached_now)
    steps = "\n".join(f"  - {{id: s{i}, tool: core.echo, with: {{value: {i}}}}}"
                      for i in range(40))
    report = run_yaml(f"version: 1\nname: wide\nlimits: {{max_parallel: 40}}\nsteps:\n{steps}\n")
    assert report["status"] == "completed"
    assert len(started) == 40 and len(attached) == 40
    assert max(started) < sorted(attached)[1]


def test_no_tool_call_goes_before_an_operators_prefect_tag_limit(
        engines: dict[str, dict[str, Any]]) -> None:
    """A step under a tag Prefect limits (an operator's ``tags`` context) is called only
    once Prefect's engine has its slot: the engine runs first, as before."""
    from prefect import tags

    from planrun.flows.prefect_compat import asks_for_slots
    from planrun.flows.step import run_step

    assert not asks_for_slots(run_step.with_options(tags=["planrun", "plan:x", "tool:core.echo"]))
    with tags("ops"):
        assert asks_for_slots(run_step)
        report = run_yaml("""
            version: 1
            name: tagged
            steps:
              - {id: only, tool: core.echo, with: {value: 1}}
        """)
    assert report["steps"]["only"]["output"] == {"value": 1}
    assert engines == {}  # no first attempt started beside the engine


def test_a_step_ends_when_its_last_attempt_did_not_when_prefect_has_recorded_it(
        engines: dict[str, dict[str, Any]]) -> None:
    """A retried step's attempts run in Prefect's engine, which the fixture holds HELD_S
    after it has ended the task run: the step's end is its last attempt's, before that."""
    report = run_yaml("""
        version: 1
        name: retried-end
        steps:
          - {id: flaky, tool: core.fail, retry: {initial_delay: 10ms}, with: {category: transient, times: 1}}
    """)
    step = report["steps"]["flaky"]
    assert step["status"] == "completed" and step["attempts"] == 2
    assert _epoch(step["ended_at"]) < engines["flaky"]["engine_ended"] - HELD_S + 0.05
