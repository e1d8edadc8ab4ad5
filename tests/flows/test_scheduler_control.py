"""The scheduler's pause, stop, gate and cancel logic with in-memory fakes: no Prefect, no
server, each test in milliseconds. Steps end when the test releases them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from planrun.contract.status import StepStatus
from planrun.flows.scheduler import Scheduler
from planrun.plan_schemas.model import Step
from planrun.report import RunRecord, StepRecord


class FakeRun:
    """A run of ``specs`` (id, needs, extra step fields) whose steps wait for ``release``."""

    def __init__(self, *specs: tuple[str, list[str], dict[str, Any]], max_parallel: int = 4,
                 decide: Callable[[Step], Awaitable[tuple[str, bool] | None]] | None = None
                 ) -> None:
        self.steps = [Step.model_validate({"id": sid, "tool": "core.echo", "needs": needs,
                                           **extra}) for sid, needs, extra in specs]
        records = {s.id: StepRecord(id=s.id, tool=s.tool, needs=list(s.needs),
                                    critical=s.critical is not False) for s in self.steps}
        self.run = RunRecord(run_id="r", plan="p", steps=records)
        self.started: list[str] = []
        self.gates: dict[str, asyncio.Event] = {s.id: asyncio.Event() for s in self.steps}
        self.failing: set[str] = set()
        self.requests: list[str] = []  # what the fake control source will report next
        self.scheduler = Scheduler(self.run, self.steps, max_parallel=max_parallel,
                                   execute=self.execute, skip=self.skip, notify=lambda _: None,
                                   context=lambda: {"inputs": {}, "steps": {}},
                                   decide=decide, news=self.news)

    async def execute(self, step: Step) -> None:
        record = self.run.steps[step.id]
        self.started.append(step.id)
        record.status = StepStatus.RUNNING
        await self.gates[step.id].wait()
        record.status = StepStatus.FAILED if step.id in self.failing else StepStatus.COMPLETED

    async def skip(self, step: Step) -> None:
        await asyncio.sleep(0)

    async def news(self) -> None:
        """The control source: what people asked since the last look."""
        await asyncio.sleep(0)
        while self.requests:
            request = self.requests.pop(0)
            if request == "pause":
                self.scheduler.pause("paused by a person")
            elif request == "cancel":
                self.scheduler.stop("cancelled by a person", cancelled=True)

    def release(self, step_id: str) -> None:
        self.gates[step_id].set()

    def status(self, step_id: str) -> StepStatus:
        return self.run.steps[step_id].status


def synchronously(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop (pytest calls plain functions)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))  # type: ignore[arg-type]

    return run


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0)


CHAIN = (("a", [], {}), ("b", ["a"], {}), ("c", ["b"], {}))


@synchronously
async def test_a_pause_asked_while_a_step_runs_lets_it_finish_and_starts_nothing_new() -> None:
    fake = FakeRun(*CHAIN)
    running = asyncio.ensure_future(fake.scheduler.run_all())
    await until(lambda: fake.started == ["a"])
    fake.scheduler.pause("paused by a person")
    fake.release("a")
    await running
    assert fake.scheduler.suspended
    assert (fake.status("a"), fake.status("b")) == (StepStatus.COMPLETED, StepStatus.PENDING)
    assert fake.started == ["a"]


@synchronously
async def test_a_pause_seen_only_at_the_step_boundary_holds_the_next_step_back() -> None:
    fake = FakeRun(*CHAIN)
    running = asyncio.ensure_future(fake.scheduler.run_all())
    await until(lambda: fake.started == ["a"])
    fake.requests.append("pause")  # accepted by the API; the poll has not seen it yet
    fake.release("a")
    await running
    assert fake.scheduler.suspended and fake.started == ["a"]


@synchronously
async def test_a_pause_taken_back_before_it_took_effect_lets_the_run_go_on() -> None:
    fake = FakeRun(*CHAIN)
    running = asyncio.ensure_future(fake.scheduler.run_all())
    await until(lambda: fake.started == ["a"])
    fake.scheduler.pause("paused by a person")
    fake.scheduler.unpause()
    for step_id in ("a", "b", "c"):
        fake.release(step_id)
    await running
    assert not fake.scheduler.suspended and fake.started == ["a", "b", "c"]


@synchronously
async def test_a_cancel_cancels_running_steps_and_skips_the_rest() -> None:
    fake = FakeRun(("a", [], {}), ("b", [], {}), ("c", ["a", "b"], {}))
    running = asyncio.ensure_future(fake.scheduler.run_all())
    await until(lambda: sorted(fake.started) == ["a", "b"])
    fake.scheduler.stop("cancelled by a person", cancelled=True)
    await running
    assert fake.scheduler.cancelled
    assert fake.status("a") == fake.status("b") == StepStatus.CANCELLED
    assert fake.run.steps["a"].reason == "cancelled by a person"
    assert fake.status("c") == StepStatus.SKIPPED
    assert fake.run.steps["c"].reason == "not started: cancelled by a person"


@synchronously
async def test_a_cancel_seen_at_a_boundary_starts_nothing_new() -> None:
    fake = FakeRun(*CHAIN)
    running = asyncio.ensure_future(fake.scheduler.run_all())
    await until(lambda: fake.started == ["a"])
    fake.requests.append("cancel")
    fake.release("a")
    await running
    assert fake.started == ["a"] and fake.scheduler.cancelled
    assert fake.status("b") == StepStatus.SKIPPED


@synchronously
async def test_a_critical_failure_stops_the_run_and_a_non_critical_one_does_not() -> None:
    fake = FakeRun(("a", [], {"critical": False}), ("b", ["a"], {"when": "true"}),
                   ("c", ["b"], {}), ("d", [], {}))
    fake.failing = {"a", "c"}
    running = asyncio.ensure_future(fake.scheduler.run_all())
    await until(lambda: sorted(fake.started) == ["a", "d"])
    fake.release("a")  # non-critical: b (with its own `when`) still runs
    await until(lambda: "b" in fake.started)
    fake.release("b")
    await until(lambda: "c" in fake.started)
    fake.release("c")  # critical: the run stops, d is cancelled
    await running
    assert fake.scheduler.stop_reason == "critical step c failed"
    assert fake.status("d") == StepStatus.CANCELLED and not fake.scheduler.cancelled


@synchronously
async def test_the_deadline_stops_the_run_and_says_so() -> None:
    # "a" starts at once and waits to be released, which never comes: the deadline ends
    # it. (At 0.01 s a loaded CI machine reached the deadline before "a" had started.)
    fake = FakeRun(*CHAIN)
    await fake.scheduler.run_all(deadline_s=1.0)
    assert fake.scheduler.deadline_passed
    assert fake.started == ["a"]
    assert fake.status("a") == StepStatus.CANCELLED
    assert fake.run.steps["b"].reason == "not started: the run deadline of 1s passed"


@synchronously
async def test_a_gate_without_an_answer_pauses_the_run_at_that_step() -> None:
    fake_ref: list[FakeRun] = []

    async def ask(step: Step) -> tuple[str, bool] | None:
        fake_ref[0].scheduler.pause(f"awaiting approval of {step.id}", gate=step.id)
        await asyncio.Event().wait()  # no answer yet: the run suspends here
        return None

    fake = FakeRun(("a", [], {}), ("gated", ["a"], {"approval": {"prompt": "Go?"}}),
                   decide=ask)
    fake_ref.append(fake)
    running = asyncio.ensure_future(fake.scheduler.run_all())
    await until(lambda: fake.started == ["a"])
    fake.release("a")
    await running
    assert fake.scheduler.suspended and fake.scheduler.gate == "gated"
    assert fake.started == ["a"]


@pytest.mark.parametrize(("answer", "ran", "reason"), [
    (None, True, None), (("rejected: not now", True), False, "rejected: not now")])
@synchronously
async def test_an_answered_gate_runs_or_skips_its_step(
        answer: tuple[str, bool] | None, ran: bool, reason: str | None) -> None:
    async def answered(step: Step) -> tuple[str, bool] | None:
        return answer

    fake = FakeRun(("gated", [], {"approval": {"prompt": "Go?"}}), decide=answered)
    fake.release("gated")
    await fake.scheduler.run_all()
    assert ("gated" in fake.started) == ran
    assert fake.run.steps["gated"].reason == reason
    if not ran:
        assert fake.status("gated") == StepStatus.SKIPPED
        assert fake.run.steps["gated"].error_caused_skip
