"""Time estimates: the critical path under max_parallel, the 80 % interval, early finishes,
and step durations read back from Prefect's own history."""

from __future__ import annotations

import asyncio
import math
import uuid

import pytest

from planrun.contract.estimate import Estimate
from planrun.contract.status import RunStatus, StepStatus
from planrun.contract.times import iso
from planrun.progress_bridge.estimate import (
    PRIOR_SIGMA,
    StepDurations,
    durations_from,
    estimate,
)
from planrun.report import RunRecord, StepRecord
from tests.helpers import run_yaml, wait_for

T0 = 1_800_000_000.0
#: A step's expected duration with no history, per second of its first estimate.
MEAN = math.exp(PRIOR_SIGMA**2 / 2)


def run_of(*specs: tuple[str, list[str], float]) -> RunRecord:
    """A run started at T0 with every step pending: (id, needs, first estimate)."""
    steps = {sid: StepRecord(id=sid, tool="core.sleep", needs=needs, estimate_s=est)
             for sid, needs, est in specs}
    return RunRecord(run_id="r", plan="p", steps=steps, status=RunStatus.RUNNING,
                     started_at=T0)


def finish(run: RunRecord, sid: str, started: float, ended: float) -> None:
    step = run.steps[sid]
    step.status, step.started_at, step.ended_at = StepStatus.COMPLETED, started, ended


def start(run: RunRecord, sid: str, started: float) -> None:
    step = run.steps[sid]
    step.status, step.started_at = StepStatus.RUNNING, started


def at_start(run: RunRecord, max_parallel: int = 16,
             durations: dict[str, StepDurations] | None = None) -> Estimate:
    return estimate(run, max_parallel, durations or {}, T0)


def test_a_chain_sums_its_steps() -> None:
    run = run_of(("a", [], 1.0), ("b", ["a"], 2.0), ("c", ["b"], 3.0))
    assert at_start(run).remaining_s == pytest.approx(6.0 * MEAN, abs=0.002)


def test_parallel_branches_take_the_longest() -> None:
    run = run_of(("a", [], 1.0), ("b", ["a"], 3.0), ("c", ["a"], 1.0), ("d", ["b", "c"], 1.0))
    assert at_start(run).remaining_s == pytest.approx(5.0 * MEAN, abs=0.002)


def test_max_parallel_one_serialises_and_two_packs() -> None:
    run = run_of(("a", [], 3.0), ("b", [], 2.0), ("c", [], 1.0))
    assert at_start(run, max_parallel=1).remaining_s == pytest.approx(6.0 * MEAN, abs=0.002)
    assert at_start(run, max_parallel=2).remaining_s == pytest.approx(3.0 * MEAN, abs=0.002)
    assert at_start(run, max_parallel=3).remaining_s == pytest.approx(3.0 * MEAN, abs=0.002)


def test_running_steps_hold_their_slots() -> None:
    run = run_of(("a", [], 4.0), ("b", [], 1.0))
    start(run, "a", T0)
    serial = estimate(run, 1, {}, T0)
    assert serial.remaining_s > estimate(run, 2, {}, T0).remaining_s
    assert serial.remaining_s == pytest.approx(5.0 * MEAN, rel=0.01)


def test_a_step_seen_running_before_its_need_was_seen_to_end_is_estimated() -> None:
    """Events can come out of order (a reconnect, a reconciliation): the view may have a
    step running before it has seen the step it needs start or end. That raised IndexError
    in the draws, and ``GET /v1/runs/{id}`` answered 500, under 50 runs at once on
    PostgreSQL (bench_load.py)."""
    run = run_of(("a", [], 1.0), ("b", ["a"], 2.0), ("c", ["b"], 3.0))
    start(run, "b", T0)  # a: not seen to start yet
    left = estimate(run, 4, {}, T0)
    assert 0 < left.low_s <= left.remaining_s <= left.high_s
    # b has run since T0 (so a is done): b, then c.
    assert left.remaining_s == pytest.approx((2.0 + 3.0) * MEAN, rel=0.01)


def test_elapsed_time_reduces_what_a_running_step_has_left() -> None:
    run = run_of(("a", [], 10.0))
    start(run, "a", T0)
    lefts = [estimate(run, 4, {}, T0 + elapsed).remaining_s for elapsed in (0, 4, 8)]
    assert lefts[0] > lefts[1] > lefts[2] > 0
    assert lefts[0] == pytest.approx(10.0 * MEAN, rel=0.01)
    for elapsed in (25, 1000):  # past most draws, past all of them: never below 0
        late = estimate(run, 4, {}, T0 + elapsed)
        assert 0 < late.low_s <= late.remaining_s <= late.high_s < elapsed


def test_a_finished_run_has_nothing_left() -> None:
    run = run_of(("a", [], 10.0), ("b", ["a"], 1.0))
    finish(run, "a", T0, T0 + 3)
    run.steps["b"].status = StepStatus.SKIPPED
    done = estimate(run, 4, {}, T0 + 5)
    assert (done.remaining_s, done.low_s, done.high_s) == (0.0, 0.0, 0.0)
    assert done.finish_at == iso(T0 + 5)
    run.status, run.ended_at = RunStatus.COMPLETED, T0 + 3.5
    assert estimate(run, 4, {}, T0 + 9).finish_at == iso(T0 + 3.5)


def test_the_finish_time_is_now_plus_the_remainder() -> None:
    run = run_of(("a", [], 2.0))
    found = estimate(run, 4, {}, T0 + 1)
    assert found.finish_at == iso(T0 + 1 + found.remaining_s)


def test_the_interval_holds_the_estimate_and_widens_with_variance() -> None:
    run = run_of(("a", [], 1.0), ("b", ["a"], 1.0), ("c", ["a"], 1.0), ("d", ["b", "c"], 1.0))
    steady = durations_from({sid: [1.0, 1.02, 0.98, 1.0, 1.01, 0.99] for sid in "abcd"})
    noisy = durations_from({sid: [0.4, 2.5, 1.0, 0.6, 1.7, 1.0] for sid in "abcd"})
    narrow, wide = at_start(run, durations=steady), at_start(run, durations=noisy)
    for found in (narrow, wide, at_start(run)):
        assert found.low_s <= found.remaining_s <= found.high_s
    assert narrow.high_s - narrow.low_s < 1.0
    assert wide.high_s - wide.low_s > 2 * (narrow.high_s - narrow.low_s)


def test_the_same_inputs_give_the_same_estimate() -> None:
    run = run_of(*((f"s{i}", [f"s{i - 1}"] if i else [], 1.0 + i % 3) for i in range(12)))
    start(run, "s0", T0)
    assert estimate(run, 2, {}, T0 + 0.5) == estimate(run, 2, {}, T0 + 0.5)


def test_an_early_finish_is_reported() -> None:
    run = run_of(("a", [], 10.0), ("b", ["a"], 10.0))
    assert at_start(run).early_by_s is None
    finish(run, "a", T0, T0 + 1)
    start(run, "b", T0 + 1)
    heading = estimate(run, 4, {}, T0 + 2)
    assert heading.early_by_s == pytest.approx(20.0 * MEAN - 2 - heading.remaining_s, abs=0.01)
    finish(run, "b", T0 + 1, T0 + 3)
    run.status, run.ended_at = RunStatus.COMPLETED, T0 + 3
    assert estimate(run, 4, {}, T0 + 4).early_by_s == pytest.approx(20.0 * MEAN - 3, abs=0.01)


def test_a_late_run_reports_no_early_finish() -> None:
    run = run_of(("a", [], 1.0), ("b", ["a"], 1.0))
    finish(run, "a", T0, T0 + 5)
    assert estimate(run, 4, {}, T0 + 5).early_by_s is None


def test_a_run_at_a_gate_says_since_when_and_the_work_left_after_it() -> None:
    """The issue's "about 0 s left" at a gate: the gated step counted as running for as
    long as it waited. Now its work is still all to do, and there is no finish time."""
    run = run_of(("a", [], 1.0), ("gate", ["a"], 10.0))
    finish(run, "a", T0, T0 + 1)
    run.steps["gate"].status, run.steps["gate"].started_at = StepStatus.AWAITING_APPROVAL, T0 + 1
    run.status = RunStatus.AWAITING_APPROVAL
    for waited in (0, 60, 600):
        found = estimate(run, 4, {}, T0 + 1 + waited, waiting_since=T0 + 1)
        assert found.remaining_s == pytest.approx(10.0 * MEAN, rel=0.01)
        assert found.low_s < found.remaining_s < found.high_s
        assert (found.waiting_since, found.finish_at, found.early_by_s) == (iso(T0 + 1), None,
                                                                             None)
        assert found.later(30) == found  # a wait does not run the estimate down


def test_a_paused_run_waits_and_a_running_one_does_not() -> None:
    run = run_of(("a", [], 2.0), ("b", ["a"], 3.0))
    finish(run, "a", T0, T0 + 2)
    run.status = RunStatus.PAUSED
    paused = estimate(run, 4, {}, T0 + 50)  # since: now, unless told
    assert paused.waiting_since == iso(T0 + 50) and paused.finish_at is None
    assert paused.remaining_s == pytest.approx(3.0 * MEAN, rel=0.01)
    run.status = RunStatus.RUNNING
    going = estimate(run, 4, {}, T0 + 50, waiting_since=T0 + 3)
    assert going.waiting_since is None and going.finish_at is not None
    assert going.later(1).remaining_s == pytest.approx(going.remaining_s - 1, abs=0.002)


def test_history_is_preferred_over_the_prior() -> None:
    run = run_of(("a", [], 10.0))
    found = at_start(run, durations=durations_from({"a": [1.0, 1.1, 0.9, 1.0, 1.05]}))
    assert 0.9 < found.remaining_s < 1.6
    assert found.high_s < 3.0
    one = at_start(run, durations=durations_from({"a": [1.0]})).remaining_s
    assert one < 10.0 * MEAN / 2  # a single past run already outweighs the prior


def skipped_task_runs(plan: str, step_id: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterTags

    async def go() -> int:
        async with get_client() as client:
            runs = await client.read_task_runs(task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(any_=[step_id]),
                tags=TaskRunFilterTags(all_=[f"plan:{plan}"])))
        return sum(1 for r in runs if r.state is not None and r.state.name == "Skipped")

    return int(asyncio.run(go()))


@pytest.mark.slow
def test_history_reads_completed_durations_from_prefect() -> None:
    from prefect.client.orchestration import get_client

    from planrun.progress_bridge.history import step_history

    plan = f"est-history-{uuid.uuid4().hex[:8]}"
    text = f"""
        version: 1
        name: {plan}
        steps:
          - {{id: short, tool: core.sleep, with: {{seconds: 0.2}}}}
          - {{id: long, tool: core.sleep, needs: [short], with: {{seconds: 0.5}}}}
          - {{id: never, tool: core.fail, needs: [long], with: {{times: 9}}, retry: {{max_attempts: 1}}}}
          - {{id: after, tool: core.echo, needs: [never]}}
        """
    for _ in range(2):
        assert run_yaml(text)["steps"]["after"]["status"] == "skipped"

    def read(tools: dict[str, str], by_tool: bool = False) -> dict[str, list[float]]:
        async def go() -> dict[str, list[float]]:
            async with get_client() as client:
                return await step_history(client, plan, tools, by_tool=by_tool)

        return asyncio.run(go())

    def both_runs() -> dict[str, list[float]] | None:
        found = read({"short": "core.sleep", "long": "core.sleep", "never": "core.fail"})
        return found if len(found.get("short", [])) == len(found.get("long", [])) == 2 else None

    found = wait_for(both_runs, what="both runs' task runs in Prefect")
    # A task run's times are Prefect's engine's: it starts the task run beside the step's
    # tool call, once the run's other engines let it, and ends it after the call has
    # returned and the step's driver is done with it (up to CALLER_WAIT_S, 1 s: flows/
    # step.py; docs/prefect-ui.md). On an idle machine that is milliseconds off the call's
    # own times; under the suite's load the bounds of 0.4-1.5 s for a 0.5 s step failed
    # once in six runs of this directory. The durations read are those task runs'.
    assert all(0.0 < d < 2.5 for d in found["short"]), found
    assert all(0.0 < d < 2.5 for d in found["long"]), found
    assert "never" not in found  # a failed task run is no history
    # A skipped step's task run is Completed(name="Skipped"): not a duration of the step.
    wait_for(lambda: skipped_task_runs(plan, "after") == 2, what="the skipped task runs")
    assert "after" not in read({"after": "core.echo"})
    # A step without history of its own borrows its tool's past durations, from any plan.
    assert read({"renamed": "core.sleep"}) == {}
    borrowed = read({"renamed": "core.sleep"}, by_tool=True)["renamed"]
    assert borrowed and all(d >= 0 for d in borrowed)


def test_an_unreachable_prefect_is_a_planrun_error() -> None:
    from prefect.client.orchestration import PrefectClient

    from planrun.errors import PlanrunError
    from planrun.progress_bridge.history import step_history

    async def go() -> dict[str, list[float]]:
        async with PrefectClient(api="http://127.0.0.1:9/api") as client:
            return await step_history(client, "p", {"a": "core.sleep"})

    with pytest.raises(PlanrunError, match="cannot read the step history of plan p"):
        asyncio.run(go())
