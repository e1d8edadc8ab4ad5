"""A run session end to end with in-memory parts (flows.fakes): no Prefect server, each
test in milliseconds. Steps of the ``test.held`` tool end when the test releases them."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prefect.exceptions import Abort, Pause
from pydantic import Field

from planrun.adapters.base import Adapter, Params, StepContext
from planrun.adapters.core import Echo, Fail
from planrun.adapters.registry import Registry
from planrun.contract.status import RunStatus, StepStatus
from planrun.flows.checkpoints import key
from planrun.flows.fakes import MemoryCheckpoints, MemoryParts
from planrun.flows.graph import compile_plan
from planrun.flows.session import RunSession, Sessions
from planrun.report import StepRecord
from planrun.validate import validate_text


class HeldParams(Params):
    label: str = Field(description="Which release the step waits for.")


class Held:
    """A tool whose steps wait until the test releases their label; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.released: dict[str, asyncio.Event] = {}

    def release(self, label: str) -> None:
        self.event(label).set()

    def event(self, label: str) -> asyncio.Event:
        return self.released.setdefault(label, asyncio.Event())

    def adapter(self) -> type[Adapter[HeldParams]]:
        held = self

        class HeldTool(Adapter[HeldParams]):
            name = "test.held"
            Params = HeldParams
            summary = "waits for the test"

            async def execute(self, params: HeldParams, ctx: StepContext) -> Any:
                held.calls.append(params.label)
                await held.event(params.label).wait()
                return {"label": params.label}

        return HeldTool


class Scenario:
    """One plan, its tools and one set of in-memory parts shared by its sessions."""

    def __init__(self, text: str, can_ask: bool = False) -> None:
        self.held = Held()
        self.registry = Registry([Echo, Fail, self.held.adapter()])
        plan = validate_text(textwrap.dedent(text), "session.yaml", self.registry).plan
        self.graph = compile_plan(plan, self.registry)
        self.memory = MemoryParts()
        self.can_ask = can_ask

    def session(self) -> RunSession:
        return RunSession(self.graph, "run-1", self.memory.parts(), can_ask=self.can_ask)


def fast(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh loop, within a second."""
    def run() -> None:
        async def bounded() -> None:
            async with asyncio.timeout(1):
                await test()
        asyncio.run(bounded())

    run.__name__ = test.__name__
    return run


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)


CHAIN = """
    version: 1
    name: chain
    steps:
      - {id: a, tool: test.held, with: {label: a}}
      - {id: b, tool: test.held, needs: [a], with: {label: b}}
    """


@fast
async def test_a_run_completes_and_keeps_its_files() -> None:
    scenario = Scenario(CHAIN)
    scenario.held.release("a")
    scenario.held.release("b")
    report = await scenario.session().run_to_end()
    assert report["status"] == "completed"
    assert [s["status"] for s in report["steps"].values()] == ["completed", "completed"]
    assert scenario.memory.workspace.committed
    assert scenario.memory.checkpoints.kept() == ["a", "b"]
    names = scenario.memory.events.names()
    assert names[0] == "run.started" and names[-1] == "run.completed"


@fast
async def test_a_critical_failure_stops_the_run_and_rolls_its_files_back() -> None:
    scenario = Scenario("""
        version: 1
        name: failing
        steps:
          - {id: long, tool: test.held, with: {label: long}}
          - {id: bad, tool: core.fail, with: {category: logic}}
          - {id: after, tool: core.echo, needs: [bad], with: {value: 1}}
        """)
    scenario.memory.workspace.changed.append("notes.md")
    report = await scenario.session().run_to_end()
    assert report["status"] == "failed"
    assert report["reason"] == "critical step bad failed"
    statuses = {sid: s["status"] for sid, s in report["steps"].items()}
    assert statuses == {"long": "cancelled", "bad": "failed", "after": "skipped"}
    assert scenario.memory.workspace.rolled_back == ["notes.md"]


@fast
async def test_a_pause_suspends_and_the_next_session_goes_on_without_rerunning_a_step() -> None:
    scenario = Scenario(CHAIN)
    first = scenario.session()
    running = asyncio.ensure_future(first.run_to_end())
    await until(lambda: scenario.held.calls == ["a"])
    scenario.memory.control.request("pause")
    await until(lambda: first.scheduler.pause_reason is not None)
    scenario.held.release("a")
    with pytest.raises(Pause):
        await running
    assert first.run.status == RunStatus.PAUSED
    assert first.run.steps["b"].status == StepStatus.PENDING
    assert scenario.memory.control.suspended == ["pause-1"]
    assert not scenario.memory.workspace.committed  # the files stay as they are

    scenario.held.release("b")
    report = await scenario.session().run_to_end()
    assert report["status"] == "completed"
    assert scenario.held.calls == ["a", "b"]  # a was restored, not run again
    assert ("run.resumed", ["a"]) in scenario.memory.events.events


async def chain_in_a(scenario: Scenario) -> tuple[RunSession, asyncio.Future[Any]]:
    """The chain's session, started with a changed file, once its step a runs."""
    scenario.memory.workspace.changed.append("out.txt")
    session = scenario.session()
    running = asyncio.ensure_future(session.run_to_end())
    await until(lambda: scenario.held.calls == ["a"])
    return session, running


@fast
async def test_a_cancel_rolls_the_workspace_back() -> None:
    scenario = Scenario(CHAIN)
    _, running = await chain_in_a(scenario)
    scenario.memory.control.request("cancel")
    report = await running
    assert report["status"] == "cancelled"
    assert report["rolled_back"] == ["out.txt"]
    assert report["steps"]["a"]["status"] == "cancelled"
    assert report["steps"]["b"]["status"] == "skipped"


@fast
async def test_a_superseded_run_stops_without_a_word_and_leaves_its_files() -> None:
    scenario = Scenario(CHAIN)
    session, running = await chain_in_a(scenario)
    told = len(scenario.memory.events.names())
    session.scheduler.supersede("it was started again")
    with pytest.raises(Abort, match="it was started again"):
        await running
    # The step in flight was cancelled; b neither ran nor was skipped; nothing was said
    # (no step change, no end), kept (no checkpoint) or undone (the files are the other
    # process's now).
    assert scenario.held.calls == ["a"]
    assert scenario.memory.events.names()[told:] == []
    assert scenario.memory.checkpoints.kept() == []
    assert scenario.memory.workspace.changed == ["out.txt"]
    assert not scenario.memory.workspace.committed
    assert session.run.steps["b"].status == StepStatus.PENDING


@fast
async def test_the_sessions_registry_cancels_every_run_of_the_process() -> None:
    scenario = Scenario(CHAIN)
    sessions = Sessions()
    session = scenario.session()
    with sessions.running(session):
        running = asyncio.ensure_future(session.run_to_end())
        await until(lambda: scenario.held.calls == ["a"])
        sessions.cancel_all()
        report = await running
    assert report["status"] == "cancelled" and len(sessions) == 0


GATED = """
    version: 1
    name: gated
    limits: {pause_timeout: 2m}
    steps:
      - {id: a, tool: core.echo, with: {value: 1}}
      - {id: deploy, tool: core.echo, needs: [a], with: {value: 2},
         approval: {prompt: "Ship it?"}}
    """


@fast
async def test_a_gate_suspends_the_run_and_an_answer_lets_its_step_run() -> None:
    scenario = Scenario(GATED, can_ask=True)
    first = scenario.session()
    with pytest.raises(Pause):
        await first.run_to_end()
    assert first.run.status == RunStatus.AWAITING_APPROVAL
    assert scenario.memory.control.asked == ["deploy"]
    assert ("run.awaiting_approval", ("deploy", "Ship it?", 120.0)) \
        in scenario.memory.events.events

    scenario.memory.control.answers["deploy"] = (True, "")
    report = await scenario.session().run_to_end()
    assert report["status"] == "completed"
    assert report["steps"]["deploy"]["output"] == {"value": 2}


@fast
async def test_a_rejected_gate_skips_its_step_as_an_error() -> None:
    scenario = Scenario(GATED, can_ask=True)
    with pytest.raises(Pause):
        await scenario.session().run_to_end()
    scenario.memory.control.answers["deploy"] = (False, "not today")
    report = await scenario.session().run_to_end()
    assert report["status"] == "completed_with_errors"
    assert report["steps"]["deploy"]["reason"] == "rejected: not today"


GATED_TWICE = """
    version: 1
    name: gated
    steps:
      - {id: a, tool: test.held, with: {label: a}}
      - {id: deploy, tool: core.echo, needs: [a], with: {value: 2},
         approval: {prompt: "Ship it?"}}
      - {id: announce, tool: core.echo, needs: [deploy], with: {value: 3},
         approval: {prompt: "Tell them?"}}
    """


@fast
async def test_gates_answered_while_the_run_waits_in_its_process_let_it_go_on_there() -> None:
    """``planrun run`` on a terminal: no suspension, no new process; each gate is asked in
    turn, and the run goes on from there as a resumed run would."""
    scenario = Scenario(GATED_TWICE, can_ask=True)
    control = scenario.memory.control
    control.waits_here = True
    control.answers.update(deploy=(True, ""), announce=(False, "not yet"))
    scenario.held.release("a")
    report = await scenario.session().run_to_end()
    assert control.asked == ["deploy", "announce"]
    assert report["status"] == "completed_with_errors"
    assert report["steps"]["deploy"]["output"] == {"value": 2}
    assert report["steps"]["announce"]["reason"] == "rejected: not yet"
    assert scenario.held.calls == ["a"]  # the step before the gates ran once
    names = [name for name, _ in scenario.memory.events.events]
    assert names.count("run.awaiting_approval") == 2 and names.count("run.resumed") == 2
    assert names[-1] == "run.completed_with_errors"


@fast
async def test_a_run_cancelled_while_it_waits_at_a_gate_in_its_process_ends_cancelled() -> None:
    scenario = Scenario(GATED_TWICE, can_ask=True)
    control = scenario.memory.control
    control.waits_here = True
    waiting = asyncio.Event()

    async def ask_forever(step_id: str, prompt: str, timeout_s: float | None = None) -> None:
        control.asked.append(step_id)
        waiting.set()
        await asyncio.Event().wait()  # no one answers

    control.ask = ask_forever  # type: ignore[method-assign]
    scenario.held.release("a")
    session = scenario.session()
    running = asyncio.ensure_future(session.run_to_end())
    await waiting.wait()
    session.cancel()
    report = await running
    assert report["status"] == "cancelled"
    assert report["steps"]["deploy"]["status"] == "skipped"


@fast
async def test_an_unreadable_checkpoint_stops_the_run_instead_of_running_its_step_again() -> None:
    scenario = Scenario(CHAIN)
    await scenario.memory.checkpoints.begin(scenario.memory.control.retry_request)  # a first
    # process ran; this one resumes
    await scenario.memory.checkpoints.save(StepRecord(id="a", tool="test.held",
                                                      status=StepStatus.COMPLETED))
    scenario.memory.checkpoints.broken["a"] = "OSError: [Errno 5] Input/output error"
    scenario.memory.workspace.changed.append("a.txt")
    report = await scenario.session().run_to_end()
    assert report["status"] == "failed"
    assert report["reason"] == (
        "cannot read the checkpoint of step a: OSError: [Errno 5] Input/output error; "
        "the run stops so that a completed step is not run twice")
    assert scenario.held.calls == []
    assert {s["status"] for s in report["steps"].values()} == {"skipped"}
    assert scenario.memory.steps.skipped == ["a", "b"]
    assert scenario.memory.checkpoints.kept() == ["a"]  # a stopping run's skips are not kept


class SlowCheckpoints(MemoryCheckpoints):
    """Checkpoints whose write of step ``a`` waits until the test lets it go on."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = asyncio.Event()
        self.go_on = asyncio.Event()

    async def _write(self, name: str, data: dict[str, Any]) -> None:
        if name == key(self.run_id, "a"):
            self.writing.set()
            await self.go_on.wait()
        await super()._write(name, data)


@fast
async def test_a_cancel_while_a_completed_steps_checkpoint_is_written_lets_it_finish() -> None:
    scenario = Scenario(CHAIN)
    slow = scenario.memory.checkpoints = SlowCheckpoints()
    scenario.held.release("a")
    session = scenario.session()
    running = asyncio.ensure_future(session.run_to_end())
    await slow.writing.wait()
    session.cancel()  # a person cancels: the step's task is cancelled while it saves
    await asyncio.sleep(0)
    slow.go_on.set()
    report = await running
    assert report["status"] == "cancelled"
    assert report["steps"]["a"]["status"] == "completed"
    assert slow.kept() == ["a"]  # its checkpoint is whole: a later start will not run it
    restored = {"a": StepRecord(id="a", tool="test.held"), "b": StepRecord(id="b", tool="t")}
    assert await slow.load(restored) == ["a"]
