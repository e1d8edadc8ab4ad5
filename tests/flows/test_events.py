"""What a failure will skip, as planrun's step events announce it."""

from __future__ import annotations

from planrun.adapters.registry import default_registry
from planrun.contract.events import Impact
from planrun.contract.status import StepStatus
from planrun.flows.events import RunEvents
from planrun.flows.graph import compile_plan
from planrun.validate import validate_text

PLAN = """version: 1
name: impact
steps:
  - {id: a, tool: core.echo, critical: false, with: {value: 1}}
  - {id: d, tool: core.echo, needs: [c], with: {value: 1}}
  - {id: c, tool: core.echo, needs: [b], with: {value: 1}}
  - {id: b, tool: core.echo, needs: [a], with: {value: 1}}
  - {id: handler, tool: core.echo, needs: [a], when: "steps.a.status == 'failed'", with: {value: 1}}
  - {id: other, tool: core.echo, with: {value: 1}}
"""


def events() -> RunEvents:
    plan = validate_text(PLAN).plan
    return RunEvents(plan, compile_plan(plan, default_registry()).new_record("r"))


def test_a_non_critical_failure_skips_what_needs_it_downstream_but_not_a_when() -> None:
    emitter = events()
    failed = emitter.run.steps["a"]
    failed.status = StepStatus.FAILED
    # d is listed before the steps it needs: the walk does not depend on plan order.
    assert emitter.impact(failed) == Impact(skipped=("d", "c", "b"), run_fails=False)


def test_a_critical_failure_skips_everything_not_started_and_fails_the_run() -> None:
    emitter = events()
    emitter.run.steps["other"].status = StepStatus.RUNNING
    failed = emitter.run.steps["b"]
    failed.critical, failed.status = True, StepStatus.FAILED
    assert emitter.impact(failed) == Impact(skipped=("a", "d", "c", "handler"),
                                              run_fails=True)
