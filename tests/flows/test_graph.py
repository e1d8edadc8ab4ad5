"""The compiler: a checked plan becomes a frozen run graph once (flows.graph)."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from planrun.adapters.registry import default_registry
from planrun.flows.graph import RunGraph, compile_plan
from planrun.policy import Ceilings
from planrun.validate import validate_text

PLAN = """
    version: 1
    name: compiled
    defaults:
      timeout: 30s
      critical: false
      retry: {max_attempts: 3, initial_delay: 250ms}
    limits: {max_parallel: 8, deadline: 1h, pause_timeout: 5m, memory_mb: 512}
    steps:
      - {id: fetch, tool: core.sleep, with: {seconds: 2}}
      - {id: parse, tool: core.echo, needs: [fetch], timeout: 1.5, estimate: 2m,
         critical: true, retry: {max_delay: 10s, jitter: 0}}
      - {id: report, tool: core.echo, needs: [fetch, parse], with: {value: 1},
         fallback: {tool: core.echo, with: {value: 0}, timeout: 500ms},
         approval: {prompt: "Send it?", timeout: 90s}}
      - {id: notify, tool: core.echo, needs: [report], approval: {prompt: "Tell them?"}}
    """


def compiled(ceilings: Ceilings | None = None) -> RunGraph:
    plan = validate_text(textwrap.dedent(PLAN), "compiled.yaml").plan
    return compile_plan(plan, default_registry(), ceilings)


def test_durations_are_seconds() -> None:
    graph = compiled()
    steps = graph.steps
    assert (graph.limits.deadline_s, graph.limits.pause_timeout_s) == (3600.0, 300.0)
    assert steps["parse"].timeout_s == 1.5 and steps["parse"].estimate_s == 120.0
    assert steps["fetch"].estimate_s == 2.0  # the tool's estimate of its parameters
    assert steps["report"].fallback is not None and steps["report"].fallback.timeout_s == 0.5
    assert steps["report"].approval is not None and steps["report"].approval.timeout_s == 90.0


def test_defaults_are_merged_into_each_step() -> None:
    steps = compiled().steps
    assert steps["fetch"].timeout_s == 30.0
    assert (steps["fetch"].critical, steps["parse"].critical) == (False, True)
    assert steps["fetch"].retry.max_attempts == 3
    assert steps["fetch"].retry.initial_delay_s == 0.25
    parse = steps["parse"].retry
    assert (parse.max_attempts, parse.initial_delay_s, parse.max_delay_s, parse.jitter) \
        == (3, 0.25, 10.0, 0)
    notify = steps["notify"].approval
    assert notify is not None and notify.timeout_s == 300.0  # the run's pause_timeout


def test_ceilings_lower_the_plans_limits() -> None:
    graph = compiled(Ceilings.model_validate({"max_parallel": 2, "step_timeout_s": 5,
                                              "memory_mb": 256}))
    assert graph.limits.max_parallel == 2 and graph.limits.memory_mb == 256
    assert graph.steps["fetch"].timeout_s == 5.0  # 30s asked
    assert graph.steps["parse"].timeout_s == 1.5  # already under it
    unbounded = compiled()
    assert unbounded.limits.max_parallel == 8 and unbounded.limits.memory_mb == 512


def test_needs_are_resolved_both_ways_and_tools_bound() -> None:
    steps = compiled().steps
    assert list(steps) == ["fetch", "parse", "report", "notify"]
    assert steps["report"].needs == ("fetch", "parse")
    assert steps["fetch"].dependents == ("parse", "report")
    assert steps["notify"].dependents == ()
    assert steps["fetch"].adapter.name == "core.sleep"
    fallback = steps["report"].fallback
    assert fallback is not None and fallback.adapter.name == "core.echo"


def test_the_graph_is_frozen() -> None:
    graph = compiled()
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.steps["fetch"].timeout_s = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        graph.steps["x"] = graph.steps["fetch"]  # type: ignore[index]


def test_a_new_record_starts_every_step_pending_with_its_estimate() -> None:
    record = compiled().new_record("r")
    assert record.plan == "compiled"
    assert {sid: s.estimate_s for sid, s in record.steps.items()}["parse"] == 120.0
    assert record.steps["report"].needs == ["fetch", "parse"]
