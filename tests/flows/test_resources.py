"""What each step used, as the engine measures it (flows/resources.py): the CPU split and
the peak of in-process steps with an injected clock, a run session with in-memory parts
that records ``resources`` on every finished step, the memory watchdog stopping a real
allocation at its next await, and where the numbers go (event, checkpoint, table)."""

from __future__ import annotations

import asyncio
import textwrap
from typing import Any

import psutil
import pytest
from pydantic import Field

from planrun.adapters.base import Adapter, Params, StepContext
from planrun.adapters.core import Echo
from planrun.adapters.registry import Registry, default_registry
from planrun.adapters.usage import StepUsage
from planrun.contract.checkpoint import StepCheckpoint
from planrun.contract.events import StepChanged
from planrun.contract.records import Resources
from planrun.contract.status import StepStatus
from planrun.flows.artifacts import step_rows
from planrun.flows.events import RunEvents
from planrun.flows.fakes import MemoryParts
from planrun.flows.graph import compile_plan
from planrun.flows.resources import Metering, Resident
from planrun.flows.session import RunSession
from planrun.plan_schemas.model import Plan
from planrun.policy import Ceilings
from planrun.report import StepRecord
from planrun.sizes import describe, format_bytes
from planrun.validate import validate_text

MIB = 1024 * 1024


class Clock:
    """A CPU clock and a resident set the test moves by hand."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.rss = 100 * MIB

    def metering(self) -> Metering:
        return Metering(interval_s=0.01, clock=lambda: self.cpu, resident=lambda: self.rss)


def test_the_cpu_of_the_process_is_split_between_the_in_process_steps_running_at_once(
) -> None:
    clock = Clock()
    metering = clock.metering()
    first = metering.meter(in_process=True)
    second = metering.meter(in_process=True)
    program = metering.meter(in_process=False)  # measured by its tool: not in the split
    metering.started(first)
    metering.started(program)
    clock.cpu += 1.0  # first alone
    metering.started(second)
    clock.cpu += 2.0  # both
    metering.stopped(first)
    clock.cpu += 0.5  # second alone
    metering.stopped(second)
    metering.stopped(program)
    assert (first.cpu_s, second.cpu_s, program.cpu_s) == (2.0, 1.5, 0.0)
    assert first.cpu_s + second.cpu_s == clock.cpu


def test_the_peak_is_the_highest_resident_set_seen_while_the_step_ran() -> None:
    clock = Clock()
    metering = clock.metering()
    meter = metering.meter(in_process=True)
    metering.started(meter)
    clock.rss = 300 * MIB
    meter.sampled(clock.rss)
    clock.rss = 150 * MIB
    metering.stopped(meter)
    assert meter.peak == 300 * MIB


def test_a_tool_that_ran_a_program_reports_the_programs_tree_and_what_it_wrote() -> None:
    clock = Clock()
    meter = clock.metering().meter(in_process=False)
    usage = StepUsage()
    usage.ran(Resources(peak_memory_bytes=7 * MIB, cpu_s=0.5, written_bytes=10))
    usage.wrote(5)
    assert meter.resources(usage) == Resources(peak_memory_bytes=7 * MIB, cpu_s=0.5,
                                               written_bytes=15)


def test_the_resident_set_read_from_proc_is_what_psutil_says() -> None:
    resident = Resident()
    first = resident()
    assert abs(first - psutil.Process().memory_info().rss) < 8 * MIB
    block = bytearray(b"x") * (64 * MIB)
    assert resident() >= first + 60 * MIB
    del block


def test_sizes_read_as_a_person_reads_them() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1536, 42 * MIB, 150 * MIB)] == \
        ["0 B", "1023 B", "1.5 KiB", "42.0 MiB", "150 MiB"]
    assert describe(Resources(peak_memory_bytes=42 * MIB, cpu_s=0.31,
                              written_bytes=int(1.2 * MIB))) == \
        "used 42.0 MiB peak, 0.31 s CPU, 1.2 MiB written"


# -- a session with in-memory parts -----------------------------------------------------------

class GrowParams(Params):
    mib: int = Field(description="How much memory to take, in MiB, 8 MiB per await.")


class Grow(Adapter[GrowParams]):
    """Takes memory 8 MiB at a time, awaiting between: what the watchdog can stop."""

    name = "test.grow"
    Params = GrowParams

    async def execute(self, params: GrowParams, ctx: StepContext) -> Any:
        held = []
        for _ in range(params.mib // 8):
            held.append(bytearray(b"x") * (8 * MIB))  # touched: resident, not just reserved
            await asyncio.sleep(0.01)
        return {"held_mib": 8 * len(held)}


def session(text: str) -> RunSession:
    registry = Registry([Echo, Grow])
    plan = validate_text(textwrap.dedent(text), "resources.yaml", registry).plan
    return RunSession(compile_plan(plan, registry), "run-1", MemoryParts().parts())


def test_every_finished_step_records_what_it_used() -> None:
    run = session("""
        version: 1
        name: used
        steps:
          - {id: a, tool: core.echo, with: {value: 1}}
          - {id: b, tool: core.echo, needs: [a], with: {value: 2}}
        """)
    report = asyncio.run(run.run_to_end())
    for step in report["steps"].values():
        used = step["resources"]
        assert used["peak_memory_bytes"] > 0  # the process's resident set
        assert used["cpu_s"] >= 0 and used["written_bytes"] == 0


def test_an_in_process_step_over_its_memory_is_stopped_at_its_next_await() -> None:
    run = session("""
        version: 1
        name: watched
        steps:
          - {id: greedy, tool: test.grow, memory_mb: 32, retry: {max_attempts: 1},
             with: {mib: 2000}}
        """)
    report = asyncio.run(run.run_to_end())
    greedy = report["steps"]["greedy"]
    assert greedy["status"] == "failed"
    assert greedy["error"]["category"] == "resource"
    assert "memory limit of 32 MiB" in greedy["error"]["message"]
    assert greedy["resources"]["peak_memory_bytes"] < 1000 * MIB  # stopped well before 2 GB


def test_an_in_process_step_under_its_memory_finishes() -> None:
    run = session("""
        version: 1
        name: modest
        steps:
          - {id: modest, tool: test.grow, memory_mb: 512, with: {mib: 16}}
        """)
    report = asyncio.run(run.run_to_end())
    assert report["steps"]["modest"]["status"] == "completed"


# -- where the numbers go -------------------------------------------------------------------

USED = Resources(peak_memory_bytes=42 * MIB, cpu_s=0.31, written_bytes=1024)


def test_the_checkpoint_keeps_the_resources() -> None:
    record = StepRecord(id="a", tool="core.echo", status=StepStatus.COMPLETED, attempts=1,
                        started_at=1.0, ended_at=2.0, resources=USED)
    kept = StepCheckpoint.model_validate_json(record.to_checkpoint().model_dump_json())
    restored = StepRecord(id="a", tool="core.echo")
    restored.restore(kept)
    assert restored.resources == USED


def test_the_end_event_of_a_step_carries_its_resources_and_a_start_does_not() -> None:
    sent: list[dict[str, Any]] = []
    plan: Plan = validate_text("version: 1\nname: ev\nsteps:\n"
                               "  - {id: a, tool: core.echo, with: {value: 1}}\n").plan
    emitter = RunEvents(plan, compile_plan(plan, default_registry()).new_record("r"))
    emitter._emit = lambda name, payload: sent.append(payload.model_dump(mode="json"))  # type: ignore[method-assign]
    step = emitter.run.steps["a"]
    step.status, step.attempts, step.resources = StepStatus.RUNNING, 1, USED
    emitter.changed(step)
    step.status = StepStatus.COMPLETED
    emitter.changed(step)
    assert sent[0]["resources"] is None
    assert StepChanged.model_validate(sent[1]).resources == USED


def test_the_runs_table_has_memory_cpu_and_written_columns() -> None:
    plan = validate_text("version: 1\nname: tbl\nsteps:\n"
                         "  - {id: a, tool: core.echo, with: {value: 1}}\n"
                         "  - {id: b, tool: core.echo, with: {value: 1}}\n").plan
    run = compile_plan(plan, default_registry()).new_record("r")
    run.steps["a"].resources = USED
    rows = step_rows(run)
    assert (rows[0]["memory"], rows[0]["cpu"], rows[0]["written"]) == \
        ("42.0 MiB", "0.31 s", "1.0 KiB")
    assert (rows[1]["memory"], rows[1]["cpu"], rows[1]["written"]) == ("", "", "")


@pytest.mark.parametrize(("plan_mb", "step_mb", "ceiling", "expected"), [
    (None, None, None, None), (512, None, None, 512), (512, 2048, None, 2048),
    (None, 2048, 1024, 1024), (None, None, 1024, 1024), (512, 256, 1024, 256)])
def test_a_steps_memory_limit_is_its_own_else_the_plans_under_the_ceiling(
        plan_mb: int | None, step_mb: int | None, ceiling: int | None,
        expected: int | None) -> None:
    limits = f"limits: {{memory_mb: {plan_mb}}}\n" if plan_mb else ""
    own = f", memory_mb: {step_mb}" if step_mb else ""
    plan = validate_text(f"version: 1\nname: mem\n{limits}steps:\n"
                         f"  - {{id: a, tool: core.echo{own}, with: {{value: 1}}}}\n").plan
    graph = compile_plan(plan, default_registry(), Ceilings(memory_mb=ceiling))
    assert graph.steps["a"].memory_mb == expected


def test_what_each_step_used_is_in_its_task_runs_log_in_prefect() -> None:
    """docs/resources.md: a completed step says it as its Completed state's message
    (Prefect logs "Finished in state Completed('used …')" and shows the message); a step
    that failed says it in a line of its own."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    from tests.helpers import run_yaml, wait_for

    report = run_yaml("""
        version: 1
        name: used-in-the-log
        steps:
          - {id: ok, tool: shell.run, with: {argv: ["true"]}}
          - {id: bad, tool: shell.run, critical: false, retry: {max_attempts: 1},
             with: {argv: ["false"]}}
    """)
    run_id = UUID(report["run_id"])

    async def read() -> tuple[dict[str, Any], list[tuple[str, str]]]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[run_id])))
            found = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[run_id])))
        names = {run.id: run.name for run in runs}
        return ({run.name: run.state for run in runs},
                [(names.get(line.task_run_id, ""), line.message) for line in found])

    def logged() -> tuple[dict[str, Any], list[tuple[str, str]]] | None:
        states, lines = asyncio.run(read())  # the log worker sends them in batches
        wanted = {"ok", "bad"} <= {name for name, message in lines if "used " in message}
        return (states, lines) if wanted else None

    states, lines = wait_for(logged, 30, "both steps' usage in their task runs' logs")
    assert states["ok"].is_completed() and states["ok"].message.startswith("used ")
    assert " peak, " in states["ok"].message and " s CPU, " in states["ok"].message
    ok = [message for name, message in lines if name == "ok"]
    assert any(m.startswith("Finished in state Completed('used ") for m in ok), ok
    assert not any(m.startswith("used ") for m in ok), ok  # not twice
    assert any(m.startswith("used ") for name, m in lines if name == "bad"), lines
