"""A run session's side of the shared limits, with in-memory parts (flows.fakes) and a fake
limiter: a step waiting for a limit is pending with a note, heard once per reason, and
holds neither its run's slot nor (during a retry's delay) the tool's; under load a
``degrade: skip`` step is skipped."""

from __future__ import annotations

import asyncio

from planrun.contract.status import StepStatus
from planrun.flows.limits import Waiting
from tests.flows.test_session import Scenario, fast, until

SLOT = Waiting("slot", "waiting for a test.held slot (limit 1), 3 ahead", "tool:test.held")
CLOSER = Waiting("slot", "waiting for a test.held slot (limit 1), next in line",
                 "tool:test.held")
RATE = Waiting("rate", "waiting for the test.held rate limit (1/s, burst 1): starts in 0.50 s",
               "tool:test.held")

TWO = """
    version: 1
    name: two
    limits: {max_parallel: 1, tools: {test.held: {concurrency: 1}}}
    steps:
      - {id: waits, tool: test.held, with: {label: w}}
      - {id: other, tool: core.echo, with: {value: 1}}
    """


@fast
async def test_a_waiting_step_is_pending_with_its_note_heard_once_per_reason() -> None:
    scenario = Scenario(TWO)
    limits = scenario.memory.limits
    limits.block("test.held", SLOT, CLOSER, RATE)
    session = scenario.session()
    running = asyncio.ensure_future(session.run_to_end())
    record = session.run.steps["waits"]
    await until(lambda: record.note == RATE.note)
    assert record.status == StepStatus.PENDING
    assert session.run.to_report()["steps"]["waits"]["note"] == RATE.note
    waits = [data for name, data in scenario.memory.events.events if name == "step.waiting"]
    assert waits == [("waits", "slot", SLOT.note), ("waits", "rate", RATE.note)]
    limits.unblock("test.held")
    await until(lambda: scenario.held.calls == ["w"])
    assert record.status == StepStatus.RUNNING and record.note is None
    scenario.held.release("w")
    report = await running
    assert report["steps"]["waits"].get("note") is None
    assert limits.asks[0].run_limits["test.held"].concurrency == 1  # the plan's own limit


@fast
async def test_a_waiting_step_lends_its_run_slot_to_the_next_step() -> None:
    scenario = Scenario(TWO)
    scenario.memory.limits.block("test.held", SLOT)
    session = scenario.session()
    running = asyncio.ensure_future(session.run_to_end())
    # max_parallel is 1, and the waiting step does not hold it: the other one runs
    await until(lambda: session.run.steps["other"].status == StepStatus.COMPLETED)
    assert session.run.steps["waits"].status == StepStatus.PENDING
    scenario.memory.limits.unblock("test.held")
    scenario.held.release("w")
    report = await running
    assert report["status"] == "completed"
    events = [name for name, _ in scenario.memory.events.events]
    assert events.index("step.waiting") < events.index("step.running")


@fast
async def test_a_retry_delay_holds_no_slot() -> None:
    scenario = Scenario("""
        version: 1
        name: retried
        steps:
          - {id: flaky, tool: core.fail, with: {times: 1},
             retry: {initial_delay: 200ms, jitter: 0}}
        """)
    limits = scenario.memory.limits
    session = scenario.session()
    running = asyncio.ensure_future(session.run_to_end())
    record = session.run.steps["flaky"]
    await until(lambda: record.status == StepStatus.RETRYING)
    assert limits.held == 0  # given back as the first attempt failed
    report = await running
    assert report["steps"]["flaky"]["status"] == "completed"
    assert [ask.tool for ask in limits.asks] == ["core.fail", "core.fail"]


@fast
async def test_under_load_a_degrade_skip_step_is_skipped_and_the_run_completes() -> None:
    scenario = Scenario("""
        version: 1
        name: optional
        steps:
          - {id: needed, tool: core.echo, with: {value: 1}}
          - {id: nice, tool: core.echo, with: {value: 2}, degrade: skip}
        """)
    scenario.memory.limits.under = "memory in use 95 % ≥ 90 %"
    report = await scenario.session().run_to_end()
    assert report["status"] == "completed"
    assert report["steps"]["needed"]["status"] == "completed"
    assert report["steps"]["nice"]["status"] == "skipped"
    assert report["steps"]["nice"]["reason"] == "skipped under load: memory in use 95 % ≥ 90 %"
    assert scenario.memory.steps.skipped == ["nice"]


@fast
async def test_without_load_a_degrade_skip_step_runs() -> None:
    scenario = Scenario("""
        version: 1
        name: optional
        steps:
          - {id: nice, tool: core.echo, with: {value: 2}, degrade: skip}
        """)
    report = await scenario.session().run_to_end()
    assert report["steps"]["nice"]["status"] == "completed"


@fast
async def test_a_step_cancelled_while_it_waits_keeps_no_note() -> None:
    scenario = Scenario(TWO)
    scenario.memory.limits.block("test.held", SLOT)
    session = scenario.session()
    running = asyncio.ensure_future(session.run_to_end())
    await until(lambda: session.run.steps["waits"].note is not None)
    scenario.memory.control.request("cancel")
    report = await running
    assert report["status"] == "cancelled"
    assert report["steps"]["waits"]["status"] == "cancelled"
    assert report["steps"]["waits"].get("note") is None
