"""In-memory parts for a run session (``flows.parts``), as ``adapters/fake.py`` is for tools.

With them a session runs a plan without a Prefect server, in milliseconds: checkpoints in
a dict (one may be made unreadable), a control source the test tells what people ask, a
workspace that only counts, events kept in a list, and steps executed directly (their
retries awaited here rather than by Prefect).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from prefect.exceptions import Pause

from planrun.errors import CheckpointUnreadable, StepError
from planrun.flows.checkpoints import Checkpoints, key
from planrun.flows.limits import Ask, OnWait, Waiting
from planrun.flows.parts import RunParts
from planrun.flows.scheduler import Scheduler
from planrun.flows.step import StepJob
from planrun.plan_schemas.model import Step
from planrun.report import RunRecord, StepRecord


@dataclass
class MemoryEvents:
    """Keeps each event as ``(name, data)``; ``bind`` is the part's factory."""

    events: list[tuple[str, Any]] = field(default_factory=list)
    run: RunRecord | None = None

    def bind(self, run: RunRecord, segment: int) -> MemoryEvents:
        self.run = run
        return self

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def started(self) -> None:
        self.events.append(("run.started", None))

    def resumed(self, restored: list[str], retry: int | None = None) -> None:
        self.events.append(("run.resumed", list(restored)))
        if retry is not None:
            self.events.append(("run.retry", retry))

    def changed(self, step: StepRecord) -> None:
        self.events.append((f"step.{step.status}", step.id))

    def waiting(self, step: StepRecord, why: Literal["slot", "rate", "load"]) -> None:
        self.events.append(("step.waiting", (step.id, why, step.note)))

    def heartbeat(self) -> None:
        self.events.append(("run.heartbeat", None))

    def paused(self, reason: str, timeout_s: float | None = None,
               on_timeout: Literal["cancel", "resume"] = "cancel") -> None:
        self.events.append(("run.paused", (reason, timeout_s, on_timeout)))

    def awaiting_approval(self, step_id: str, prompt: str, timeout_s: float | None) -> None:
        self.events.append(("run.awaiting_approval", (step_id, prompt, timeout_s)))

    def ended(self) -> None:
        self.events.append((f"run.{self.run.status if self.run else 'ended'}", None))


class NoArtifacts:
    """Artifacts that go nowhere."""

    def __init__(self, run: RunRecord | None = None) -> None:
        self.run = run

    def start(self) -> None:
        pass

    def changed(self) -> None:
        pass

    async def finish(self) -> None:
        pass


class MemoryCheckpoints(Checkpoints):
    """The real checkpoint store (what is kept, how it is written and read back) with its
    storage in a dict that outlives a session. ``broken`` maps a step id to the read error
    its checkpoint raises, as a failing storage would."""

    def __init__(self, run_id: str = "run-1") -> None:
        super().__init__(run_id)
        self.stored: dict[str, str] = {}
        self.broken: dict[str, str] = {}

    def kept(self) -> list[str]:
        """The steps that have a checkpoint."""
        prefix = key(self.run_id, "")
        return [name.removeprefix(prefix) for name in self.stored if name.startswith(prefix)]

    async def _write(self, name: str, data: dict[str, Any]) -> None:
        self.stored[name] = json.dumps(data, default=str)

    async def _read(self, name: str) -> dict[str, Any] | None:
        for step_id, why in self.broken.items():
            if name == key(self.run_id, step_id):
                raise CheckpointUnreadable(why)
        found = self.stored.get(name)
        return json.loads(found) if found is not None else None


@dataclass
class MemoryControl:
    """What people ask, as the test says: ``request("pause")`` / ``request("cancel")`` are
    taken in at once while the run watches, else at the next step boundary; ``answers``
    are the gates' answers by step id, read once the gate was asked."""

    requests: list[str] = field(default_factory=list)
    answers: dict[str, tuple[bool, str]] = field(default_factory=dict)
    cancelled_while_suspended: bool = False
    #: Gates wait in the run's process (``planrun run`` on a terminal): ``ask`` returns.
    waits_here: bool = False
    #: The current retry request (a new value: retry the run once it has ended).
    retry: str | None = None
    asked: list[str] = field(default_factory=list)
    suspended: list[str] = field(default_factory=list)
    scheduler: Scheduler | None = None
    _arrived: asyncio.Event | None = None

    def attach(self, scheduler: Scheduler, beat: Callable[[], None] | None = None) -> None:
        self.scheduler = scheduler

    def request(self, kind: str) -> None:
        """A person asks ``pause`` or ``cancel``."""
        self.requests.append(kind)
        if self._arrived is not None:
            self._arrived.set()

    async def news(self) -> None:
        await asyncio.sleep(0)
        while self.requests and self.scheduler is not None:
            request = self.requests.pop(0)
            if request == "pause":
                self.scheduler.pause("paused by a person")
            elif request == "cancel":
                self.scheduler.stop("cancelled by a person", cancelled=True)

    async def watch(self) -> None:
        self._arrived = asyncio.Event()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            await self.news()

    async def cancel_requested(self) -> bool:
        return self.cancelled_while_suspended

    async def retry_request(self) -> str | None:
        return self.retry

    async def decision(self, step_id: str) -> tuple[bool, str] | None:
        return self.answers.get(step_id) if step_id in self.asked else None

    async def forget_askings(self, step_ids: Iterable[str]) -> None:
        for step_id in step_ids:
            self.answers.pop(step_id, None)
            self.asked = [asked for asked in self.asked if asked != step_id]

    async def ask(self, step_id: str, prompt: str, timeout_s: float | None = None) -> None:
        self.asked.append(step_id)
        if not self.waits_here:
            raise Pause(state=None)

    async def suspend(self, key: str, message: str) -> Any:
        self.suspended.append(key)
        return None


@dataclass
class MemoryWorkspace:
    """Counts the files a test says were changed; rolls them back or keeps them."""

    changed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    committed: bool = False

    def commit(self) -> None:
        self.committed = True
        self.changed.clear()

    def rollback(self) -> list[str]:
        self.rolled_back, self.changed = list(self.changed), []
        return self.rolled_back

    def redo(self) -> list[str]:
        self.changed, self.rolled_back = list(self.rolled_back), []
        return self.changed

    def left_note(self) -> str | None:
        return None


@dataclass
class DirectSteps:
    """Executes each attempt of a step in this task, waiting out its retry delays."""

    skipped: list[str] = field(default_factory=list)

    async def run(self, job: StepJob, upstream: list[UUID]) -> Any:
        number = 1
        while True:
            try:
                return await job.attempt(number)
            except StepError:
                if job.next_delay is None:
                    raise
                await asyncio.sleep(job.next_delay)
                number += 1

    async def skip(self, step: Step, record: StepRecord, upstream: list[UUID]) -> None:
        self.skipped.append(step.id)


@dataclass
class MemoryLimits:
    """Limits as the test says (``flows.limits.StepLimits``). A tool in ``blocked`` keeps
    each call waiting: it reports every ``Waiting`` listed, in turn, then waits until the
    test calls ``unblock(tool)``. ``under`` is the load pressure ``pressure()`` answers.
    ``held`` counts the calls holding leave now, ``most`` the most at once, ``asks`` every
    ask in order."""

    blocked: dict[str, list[Waiting]] = field(default_factory=dict)
    under: str | None = None
    held: int = 0
    most: int = 0
    asks: list[Ask] = field(default_factory=list)
    _gates: dict[str, asyncio.Event] = field(default_factory=dict)

    def block(self, tool: str, *waits: Waiting) -> None:
        self.blocked[tool] = list(waits)

    def unblock(self, tool: str) -> None:
        self.blocked.pop(tool, None)
        self._gates.setdefault(tool, asyncio.Event()).set()

    def pressure(self) -> str | None:
        return self.under

    @asynccontextmanager
    async def hold(self, ask: Ask, waiting: OnWait) -> AsyncIterator[None]:
        self.asks.append(ask)
        if ask.tool in self.blocked:
            for wait in self.blocked[ask.tool]:
                waiting(wait)
            gate = self._gates.setdefault(ask.tool, asyncio.Event())
            gate.clear()
            await gate.wait()
        self.held += 1
        self.most = max(self.most, self.held)
        try:
            yield
        finally:
            self.held -= 1


@dataclass
class MemoryParts:
    """One of each in-memory part, kept across sessions of the same run."""

    checkpoints: MemoryCheckpoints = field(default_factory=MemoryCheckpoints)
    control: MemoryControl = field(default_factory=MemoryControl)
    workspace: MemoryWorkspace = field(default_factory=MemoryWorkspace)
    steps: DirectSteps = field(default_factory=DirectSteps)
    events: MemoryEvents = field(default_factory=MemoryEvents)
    limits: MemoryLimits = field(default_factory=MemoryLimits)

    def parts(self) -> RunParts:
        return RunParts(checkpoints=self.checkpoints, control=self.control,
                        workspace=self.workspace, steps=self.steps, events=self.events.bind,
                        artifacts=NoArtifacts, limits=self.limits)
