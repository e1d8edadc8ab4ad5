"""Prefect is the system of record: one flow run per plan run, one task run per step,
named by the step id and tagged, with retries visible as Prefect retries."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from tests.helpers import run_yaml, wait_for


def ask(call: Callable[[Any], Awaitable[Any]]) -> Any:
    """``call(client)`` with a Prefect client of the test server, from synchronous code."""
    from prefect.client.orchestration import get_client

    async def run() -> Any:
        async with get_client() as client:
            return await call(client)

    return asyncio.run(run())


def _task_runs(flow_run_id: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    only = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
    runs: list[Any] = ask(lambda client: client.read_task_runs(flow_run_filter=only))
    return runs


def _flow_run(flow_run_id: str) -> Any:
    return ask(lambda client: client.read_flow_run(UUID(flow_run_id)))


def _states(task_run_id: Any) -> list[str]:
    states = ask(lambda client: client.read_task_run_states(task_run_id))
    return [s.name for s in states]


def test_a_run_is_one_flow_run_with_one_named_tagged_task_run_per_step() -> None:
    report = run_yaml("""
        version: 1
        name: visible
        steps:
          - {id: first, tool: core.echo, with: {value: 1}}
          - {id: second, tool: core.fail, needs: [first], critical: false, with: {category: logic}}
          - {id: third, tool: core.echo, needs: [second], with: {value: 3}}
    """)
    flow_run = _flow_run(report["run_id"])
    assert flow_run.name == "visible"
    assert {"planrun", "plan:visible"} <= set(flow_run.tags)
    assert report["prefect_url"].endswith(f"/runs/flow-run/{report['run_id']}")

    def settled() -> list[Any] | None:
        runs = _task_runs(report["run_id"])
        done = [r for r in runs if r.state and r.state.is_final()]
        return runs if len(done) == 3 else None

    runs = {r.name: r for r in wait_for(settled, what="three final task runs")}
    assert set(runs) == {"first", "second", "third"}
    assert {"planrun", "plan:visible", "tool:core.echo"} <= set(runs["first"].tags)
    assert runs["first"].state.is_completed()
    assert runs["second"].state.is_failed()
    assert runs["third"].state.name == "Skipped"
    assert runs["third"].state.message == "upstream second failed"


def test_each_attempt_is_a_prefect_retry() -> None:
    report = run_yaml("""
        version: 1
        name: retried
        steps:
          - {id: flaky, tool: core.fail, retry: {initial_delay: 50ms}, with: {category: transient, times: 2}}
    """)
    assert report["steps"]["flaky"]["attempts"] == 3

    def finished() -> Any:
        runs = _task_runs(report["run_id"])
        return runs[0] if runs and runs[0].state and runs[0].state.is_completed() else None

    run = wait_for(finished, what="the task run to complete")
    assert run.run_count == 3
    assert _states(run.id).count("AwaitingRetry") == 2


def test_task_with_sets_the_same_options_as_with_options() -> None:
    from planrun.flows.prefect_compat import task_with
    from planrun.flows.step import run_step

    def never(task: Any, task_run: Any, state: Any) -> bool:
        return False

    options = {"name": "s", "task_run_name": "s", "tags": ["planrun", "tool:x"], "retries": 3,
               "retry_delay_seconds": 0, "retry_condition_fn": never}
    fast, slow = task_with(run_step, **options), run_step.with_options(**options)
    for key in options:
        assert getattr(fast, key) == getattr(slow, key), key
    assert fast.task_key == slow.task_key and fast.fn is slow.fn
    assert run_step.name == "step" and run_step.tags == set(), "the template task is unchanged"


def test_planrun_tags_skip_prefects_slot_request_but_other_tags_do_not() -> None:
    from planrun.flows import plan_flow, prefect_compat  # noqa: F401 - importing installs the shim

    assert prefect_compat.installed()
    assert prefect_compat.own_tag("tag:planrun")
    assert prefect_compat.own_tag("tag:plan:market-brief")
    assert prefect_compat.own_tag("tag:tool:shell.run")
    assert not prefect_compat.own_tag("tag:browser")
    assert not prefect_compat.own_tag("tag:planrunner")


def test_each_attempt_logs_to_the_prefect_run() -> None:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    report = run_yaml("""
        version: 1
        name: logged
        steps:
          - id: flaky
            tool: core.fail
            retry: {initial_delay: 10ms}
            with: {category: transient, message: connection reset, times: 1}
    """)

    only = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(report["run_id"])]))

    def both() -> list[str] | None:
        messages = [log.message for log in ask(lambda c: c.read_logs(log_filter=only))]
        text = "\n".join(messages)
        return messages if "attempt 1 failed (transient)" in text and \
            "core.fail: attempt 2 with" in text else None

    messages = wait_for(both, what="the step's attempt logs in Prefect")
    assert any("core.fail: attempt 2 with {'category': 'transient'" in m for m in messages)


def test_a_step_stopped_by_a_critical_failure_shows_cancelled_in_prefect() -> None:
    report = run_yaml("""
        version: 1
        name: stopped
        steps:
          - {id: long, tool: core.sleep, with: {seconds: 30}}
          - {id: boom, tool: core.fail, with: {category: logic}}
    """)
    assert report["steps"]["long"]["status"] == "cancelled"

    def final() -> dict[str, Any] | None:
        runs = {r.name: r for r in _task_runs(report["run_id"])}
        done = all(r.state and r.state.is_final() for r in runs.values())
        return runs if len(runs) == 2 and done else None

    runs = wait_for(final, what="both task runs to be final")
    assert runs["long"].state.is_cancelled()
    assert runs["boom"].state.is_failed()
    assert _flow_run(report["run_id"]).state.is_failed()


def test_a_run_leaves_a_progress_artifact_and_a_table_of_its_steps() -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    report = run_yaml("""
        version: 1
        name: with_artifacts
        steps:
          - {id: fetch, tool: core.echo, with: {value: 1}}
          - {id: broken, tool: core.fail, critical: false, with: {category: logic, message: bad input}}
          - {id: after, tool: core.echo, needs: [broken], with: {value: 2}}
    """)

    only = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(report["run_id"])]))
    artifacts = {a.type: a for a in ask(lambda c: c.read_artifacts(artifact_filter=only))}
    assert artifacts["progress"].data == 100.0
    table = artifacts["table"]
    assert table.key == "planrun-with-artifacts"
    rows = {row["step"]: row for row in json.loads(table.data)}
    assert rows["fetch"]["status"] == "completed"
    assert rows["broken"]["error"] == "logic: bad input" and rows["broken"]["hint"]
    assert rows["after"]["note"] == "upstream broken failed"


def test_a_run_with_errors_is_named_so_in_prefect() -> None:
    report = run_yaml("""
        version: 1
        name: with-errors
        steps: [{id: a, tool: core.fail, critical: false, with: {category: logic}}]
    """)
    state = _flow_run(report["run_id"]).state
    assert report["status"] == "completed_with_errors"
    assert state.is_completed() and state.name == "Completed with errors"


DIAMOND = """
    version: 1
    name: diamond
    steps:
      - {id: a, tool: core.echo, with: {value: 1}}
      - {id: b, tool: core.echo, needs: [a], with: {value: 2}}
      - {id: c, tool: core.echo, needs: [a], with: {value: 3}}
      - {id: d, tool: core.echo, needs: [b, c], with: {value: 4}}
      - {id: e, tool: core.echo, needs: [d], when: false, with: {value: 5}}
"""
DIAMOND_NEEDS = {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b", "c"}, "e": {"d"}}


def final_task_runs(flow_run_id: str, count: int) -> dict[str, Any]:
    """The flow run's task runs by name, once ``count`` of them are final (they reach the
    database through events, a moment after the run)."""
    def settled() -> dict[str, Any] | None:
        runs = {r.name: r for r in _task_runs(flow_run_id)}
        done = [r for r in runs.values() if r.state and r.state.is_final()]
        return runs if len(done) == count else None

    found: dict[str, Any] = wait_for(settled, what=f"{count} final task runs")
    return found


def upstream_names(runs: dict[str, Any]) -> dict[str, set[str]]:
    """Each task run's inputs, by the names of the task runs they name."""
    names = {run.id: name for name, run in runs.items()}
    return {name: {names.get(i.id, str(i.id)) for key, inputs in run.task_inputs.items()
                   if key != "__parents__" for i in inputs}
            for name, run in runs.items()}


def test_each_task_run_names_the_task_runs_of_its_needs_as_inputs() -> None:
    report = run_yaml(DIAMOND)
    assert report["steps"]["e"]["status"] == "skipped"
    runs = final_task_runs(report["run_id"], 5)
    assert upstream_names(runs) == DIAMOND_NEEDS
    assert set(runs["d"].task_inputs) == {"job", "wait_for"}, "ordering edges, as Prefect's"
    assert runs["e"].state.name == "Skipped"


def graph_parents(flow_run_id: str) -> tuple[dict[str, set[str]], set[str]]:
    """The edges of the flow run's graph as the Prefect UI draws it (``graph-v2``): each
    node's parents, by label; and the labels of its roots."""
    import httpx

    url = f"{os.environ['PREFECT_API_URL']}/flow_runs/{flow_run_id}/graph-v2"
    graph = httpx.get(url).raise_for_status().json()
    labels = {node["id"]: node["label"] for _, node in graph["nodes"]}
    parents = {node["label"]: {labels[edge["id"]] for edge in node["parents"]}
               for _, node in graph["nodes"]}
    return parents, {labels[i] for i in graph["root_node_ids"]}


def test_the_run_graph_draws_the_plans_edges() -> None:
    report = run_yaml(DIAMOND)
    final_task_runs(report["run_id"], 5)
    assert graph_parents(report["run_id"]) == (DIAMOND_NEEDS, {"a"})


def test_a_step_after_a_resume_names_the_task_run_of_its_restored_need() -> None:
    """The earlier segment's task run of a restored step is kept in its checkpoint."""
    from prefect import flow
    from prefect.context import FlowRunContext

    from planrun.flows.plan_flow import execute_plan
    from planrun.validate import validate_text

    def plan(second: str) -> Any:
        return validate_text(textwrap.dedent(f"""
            version: 1
            name: resumed
            limits: {{deadline: 1s}}
            steps:
              - {{id: first, tool: core.echo, with: {{value: 1}}}}
              - {{id: second, needs: [first], {second}}}
        """), "resumed.yaml").plan

    @flow(name="planrun-resumed", persist_result=False)
    async def two_segments() -> tuple[str, dict[str, Any], dict[str, Any]]:
        context = FlowRunContext.get()
        assert context is not None and context.flow_run is not None
        run_id = str(context.flow_run.id)
        # The first segment ends at the deadline with second in flight: second's cancelled
        # run is not kept; first's is, and is restored by the second segment.
        cut = await execute_plan(plan("tool: core.sleep, with: {seconds: 30}"), {}, run_id)
        whole = await execute_plan(plan("tool: core.echo, with: {value: 2}"), {}, run_id)
        return run_id, cut, whole

    run_id, cut, whole = asyncio.run(two_segments())
    assert cut["steps"]["second"]["status"] == "cancelled"
    assert whole["steps"]["second"]["status"] == "completed"

    def three() -> list[Any] | None:  # first; second cancelled, then completed
        found = _task_runs(run_id)
        final = len(found) == 3 and all(r.state and r.state.is_final() for r in found)
        return found if final else None

    runs = {(r.name, r.state.type.value): r for r in wait_for(three, what="3 task runs")}
    first, cancelled = runs[("first", "COMPLETED")], runs[("second", "CANCELLED")]
    again = runs[("second", "COMPLETED")]
    assert {i.id for i in cancelled.task_inputs["wait_for"]} == {first.id}
    assert {i.id for i in again.task_inputs["wait_for"]} == {first.id}


WAITED = ["Pending", "Running", "Waiting", "Running", "Completed"]


def test_a_step_waiting_for_a_limit_shows_waiting_in_prefect_then_running() -> None:
    report = run_yaml("""
        version: 1
        name: waits
        limits: {tools: {core.sleep: {concurrency: 1}}}
        steps:
          - {id: first, tool: core.sleep, with: {seconds: 0.5}}
          - {id: second, tool: core.sleep, with: {seconds: 0.1}}
    """)
    assert report["status"] == "completed"

    def histories() -> dict[str, list[Any]] | None:
        """Each task run's states, once both completed and one of them shows its wait
        (the server records the events behind them in its own time)."""
        runs = _task_runs(report["run_id"])
        if len(runs) != 2 or not all(r.state.is_completed() for r in runs):
            return None
        found = {r.name: ask(lambda client, r=r: client.read_task_run_states(r.id))
                 for r in runs}
        return found if any(WAITED == [s.name for s in h] for h in found.values()) else None

    found = wait_for(histories, what="a task run that waited, in Prefect")
    waited = [name for name, states in found.items() if [s.name for s in states] == WAITED]
    assert len(waited) == 1, {n: [s.name for s in h] for n, h in found.items()}
    waiting = next(s for s in found[waited[0]] if s.name == "Waiting")
    assert waiting.type.value == "PENDING"
    assert waiting.message == "waiting for a core.sleep slot of this run (limit 1), next in line"
