"""The launch order: when many steps are ready, the longest remaining path starts first."""

from __future__ import annotations

from planrun.flows.scheduler import longest_path_first
from planrun.plan_schemas.model import Step
from planrun.report import RunRecord, StepRecord


def plan(*specs: tuple[str, list[str], float]) -> tuple[list[Step], RunRecord]:
    steps = [Step.model_validate({"id": sid, "tool": "core.echo", "needs": needs})
             for sid, needs, _ in specs]
    records = {sid: StepRecord(id=sid, tool="core.echo", needs=needs, estimate_s=est)
               for sid, needs, est in specs}
    return steps, RunRecord(run_id="r", plan="p", steps=records)


def test_the_branch_with_the_longest_remaining_path_comes_first() -> None:
    steps, run = plan(("short", [], 0.1), ("long_a", [], 0.2), ("long_b", ["long_a"], 5.0),
                      ("join", ["short", "long_b"], 0.1))
    assert [s.id for s in longest_path_first(steps, run)] == ["long_a", "long_b", "short", "join"]


def test_a_chain_of_thousands_of_steps_is_ordered_without_recursion() -> None:
    specs = [("s0", [], 1.0)] + [(f"s{i}", [f"s{i - 1}"], 1.0) for i in range(1, 5000)]
    steps, run = plan(*specs)
    ordered = longest_path_first(steps, run)
    assert [s.id for s in ordered[:3]] == ["s0", "s1", "s2"] and len(ordered) == 5000
