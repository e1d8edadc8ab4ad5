"""What a failure will skip, as planrun's step events announce it."""

from __future__ import annotations

import asyncio
from typing import Any

from planrun.adapters.registry import default_registry
from planrun.contract.events import Impact
from planrun.contract.status import StepStatus
from planrun.flows.events import RUNNING_AFTER_S, RunEvents
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


class Sent(RunEvents):
    """The events the engine would emit, by name and step."""

    def __init__(self) -> None:
        emitter = events()
        super().__init__(emitter.plan, emitter.run)
        self.sent: list[tuple[str, str | None]] = []

    def _emit(self, event: str, payload: Any) -> None:
        self.sent.append((event, getattr(payload, "step_id", None)))


def test_an_attempt_that_ends_at_once_sends_its_end_alone_and_a_longer_one_its_running_first(
        ) -> None:
    async def main() -> list[tuple[str, str | None]]:
        emitter = Sent()
        quick, slow = emitter.run.steps["a"], emitter.run.steps["other"]
        for record in (quick, slow):
            record.status, record.attempts, record.started_at = StepStatus.RUNNING, 1, 1.0
            emitter.changed(record)
        quick.status = StepStatus.COMPLETED
        emitter.changed(quick)
        await asyncio.sleep(RUNNING_AFTER_S * 4)
        slow.status = StepStatus.COMPLETED
        emitter.changed(slow)
        return emitter.sent

    assert asyncio.run(main()) == [("planrun.step.completed", "a"),
                                   ("planrun.step.running", "other"),
                                   ("planrun.step.completed", "other")]
