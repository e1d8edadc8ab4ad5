"""Retrying a run that ended, with in-memory parts (flows.fakes): a new session of the same
run after its end, under a new retry request, restores the completed steps and runs the
others again; without one, it ends again as it had."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from prefect.exceptions import Pause
from pydantic import Field

from planrun.adapters.base import Adapter, Params, StepContext
from planrun.adapters.core import Echo
from planrun.adapters.registry import Registry
from planrun.errors import step_error
from planrun.flows.fakes import MemoryParts
from planrun.flows.graph import compile_plan
from planrun.flows.session import RunSession
from planrun.validate import validate_text
from tests.flows.test_session import fast


class SwitchParams(Params):
    label: str = Field(description="Which switch decides the call.")


class Switches:
    """A tool whose call fails while its label is in ``broken``; counts its calls."""

    def __init__(self, *broken: str) -> None:
        self.broken = set(broken)
        self.calls: list[str] = []

    def adapter(self) -> type[Adapter[SwitchParams]]:
        switches = self

        class Switch(Adapter[SwitchParams]):
            name = "test.switch"
            Params = SwitchParams
            summary = "fails while the test says so"

            async def execute(self, params: SwitchParams, ctx: StepContext) -> Any:
                switches.calls.append(params.label)
                if params.label in switches.broken:
                    raise step_error("logic", f"{params.label} is down")
                return {"label": params.label}

        return Switch


PLAN = """
    version: 1
    name: retried
    steps:
      - {id: fetch, tool: test.switch, with: {label: fetch}}
      - {id: call, tool: test.switch, needs: [fetch], critical: false, with: {label: call}}
      - {id: use, tool: core.echo, needs: [call], with: {value: "{{ steps.call.output.label }}"}}
      - {id: other, tool: test.switch, critical: false, with: {label: other}}
    """


class Retried:
    """One plan, its tools, and in-memory parts shared by every session of run-1."""

    def __init__(self, text: str = PLAN, *broken: str, can_ask: bool = False) -> None:
        self.switches = Switches(*broken)
        registry = Registry([Echo, self.switches.adapter()])
        plan = validate_text(textwrap.dedent(text), "retry.yaml", registry).plan
        self.graph = compile_plan(plan, registry)
        self.memory = MemoryParts()
        self.can_ask = can_ask
        self.requests = 0

    async def run(self) -> dict[str, Any]:
        session = RunSession(self.graph, "run-1", self.memory.parts(), can_ask=self.can_ask)
        return await session.run_to_end()

    async def retry(self) -> dict[str, Any]:
        """A person asks for a retry (a new request), and the run starts again."""
        self.requests += 1
        self.memory.control.retry = f"request-{self.requests}"
        return await self.run()


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {sid: step["status"] for sid, step in report["steps"].items()}


@fast
async def test_a_retry_runs_the_failed_and_skipped_steps_and_keeps_the_completed() -> None:
    run = Retried(PLAN, "call")
    run.memory.workspace.changed.append("notes.md")
    first = await run.run()
    assert first["status"] == "completed_with_errors"
    assert statuses(first) == {"fetch": "completed", "call": "failed", "use": "skipped",
                               "other": "completed"}
    assert run.memory.workspace.committed  # completed_with_errors keeps its files

    run.switches.broken.clear()  # the service has recovered
    run.switches.calls.clear()
    second = await run.retry()
    assert second["status"] == "completed"
    assert run.switches.calls == ["call"]  # fetch and other kept their outputs
    assert second["steps"]["use"]["output"] == {"value": "call"}
    assert second["steps"]["fetch"]["output"] == {"label": "fetch"}
    events = run.memory.events.events
    assert ("run.resumed", ["fetch", "other"]) in events
    assert ("run.retry", 1) in events
    assert events[-1] == ("run.completed", None)


@fast
async def test_a_retry_of_a_failed_run_puts_its_rolled_back_files_back_first() -> None:
    run = Retried(PLAN.replace("critical: false, ", ""), "call")
    run.memory.workspace.changed.append("fetched.json")
    first = await run.run()
    assert first["status"] == "failed"
    assert run.memory.workspace.rolled_back == ["fetched.json"]

    run.switches.broken.clear()
    second = await run.retry()
    assert second["status"] == "completed"
    # redo put the file back before any step ran; the completed run kept it
    assert run.memory.workspace.committed and run.memory.workspace.rolled_back == []


@fast
async def test_within_a_retry_a_recovery_keeps_what_failed_in_that_retry() -> None:
    run = Retried(PLAN, "call", "other")
    await run.run()  # call and other fail; use skipped
    run.switches.broken = {"other"}  # call recovers, other does not
    run.switches.calls.clear()
    second = await run.retry()
    assert statuses(second) == {"fetch": "completed", "call": "completed",
                                "use": "completed", "other": "failed"}
    assert sorted(run.switches.calls) == ["call", "other"]

    # A second retry runs `other` again, and only it.
    run.switches.broken.clear()
    run.switches.calls.clear()
    third = await run.retry()
    assert third["status"] == "completed"
    assert run.switches.calls == ["other"]
    assert ("run.retry", 2) in run.memory.events.events


GATED = """
    version: 1
    name: gated
    steps:
      - {id: call, tool: test.switch, critical: false, with: {label: call}}
      - id: ship
        tool: test.switch
        needs: [call]
        approval: {prompt: "Ship it?"}
        with: {label: ship}
      - {id: other, tool: test.switch, critical: false, with: {label: other}}
    """


@fast
async def test_a_retry_that_pauses_at_a_gate_keeps_its_own_failures_when_resumed() -> None:
    run = Retried(GATED, "call", "other", can_ask=True)
    first = await run.run()  # call fails, so ship is skipped without asking
    assert statuses(first) == {"call": "failed", "ship": "skipped", "other": "failed"}

    run.switches.broken = {"other"}
    run.switches.calls.clear()
    with pytest.raises(Pause):
        await run.retry()  # call completes, other fails again, ship asks
    assert sorted(run.switches.calls) == ["call", "other"]
    assert run.memory.control.asked == ["ship"]

    run.memory.control.answers["ship"] = (True, "")
    run.switches.calls.clear()
    resumed = await run.run()  # the same retry, resumed: other failed in it, and stays so
    assert run.switches.calls == ["ship"]
    assert statuses(resumed) == {"call": "completed", "ship": "completed", "other": "failed"}
    assert ("run.retry", 1) in run.memory.events.events
    assert ("run.retry", 2) not in run.memory.events.events


@fast
async def test_a_start_after_the_end_without_a_new_request_ends_as_it_had() -> None:
    run = Retried(PLAN, "call")
    first = await run.run()
    run.switches.broken.clear()
    run.switches.calls.clear()
    again = await run.run()  # recovered after a crash just after its end: not a retry
    assert run.switches.calls == []
    assert again["status"] == first["status"] == "completed_with_errors"
    assert statuses(again) == statuses(first)
    assert ("run.retry", 1) not in run.memory.events.events

    second = await run.retry()
    assert second["status"] == "completed" and run.switches.calls == ["call"]
    run.switches.calls.clear()
    third = await run.run()  # the same request again: taken already, nothing runs
    assert third["status"] == "completed" and run.switches.calls == []


@fast
async def test_a_retry_asks_again_at_a_gate_that_was_rejected() -> None:
    run = Retried(GATED, "other", can_ask=True)
    with pytest.raises(Pause):
        await run.run()  # call completes, other fails, ship asks
    run.memory.control.answers["ship"] = (False, "not today")
    first = await run.run()
    assert statuses(first) == {"call": "completed", "ship": "skipped", "other": "failed"}
    assert first["steps"]["ship"]["reason"] == "rejected: not today"

    run.switches.broken.clear()
    with pytest.raises(Pause):
        await run.retry()  # the old "no" does not count: ship is asked again
    assert run.memory.control.asked == ["ship"]
    run.memory.control.answers["ship"] = (True, "")
    retried = await run.run()
    assert statuses(retried) == {"call": "completed", "ship": "completed",
                                 "other": "completed"}
