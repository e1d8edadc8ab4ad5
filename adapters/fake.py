"""A scripted adapter for tests: each attempt takes the next outcome from a script.

Like httpx's ``MockTransport``, it lets a test drive the engine through real retries,
fallbacks and cancellations without patching internals.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from planrun.adapters.base import Adapter, Params, StepContext
from planrun.errors import StepError


class FakeParams(Params):
    label: str = Field(default="", description="Free text, echoed in the output.")


@dataclass
class Call:
    """What one attempt saw."""

    attempt: int
    reduce_usage: bool
    label: str


@dataclass
class Script:
    """Outcomes in order: a StepError is raised, a float sleeps that long, anything else
    is returned. The last outcome repeats."""

    outcomes: list[Any]
    calls: list[Call] = field(default_factory=list)
    refreshes: int = 0

    def next(self) -> Any:
        index = min(len(self.calls) - 1, len(self.outcomes) - 1)
        return self.outcomes[index]


def fake_tool(name: str, *outcomes: Any) -> tuple[type[Adapter[FakeParams]], Script]:
    """A new adapter class named ``name`` that follows ``outcomes``, and its script."""
    script = Script(list(outcomes) or [{"ok": True}])

    class Fake(Adapter[FakeParams]):
        Params = FakeParams
        summary = "a scripted tool for tests"

        async def execute(self, params: FakeParams, ctx: StepContext) -> Any:
            script.calls.append(Call(ctx.attempt, ctx.reduce_usage, params.label))
            outcome = script.next()
            if isinstance(outcome, StepError):
                raise outcome
            if isinstance(outcome, float):
                await asyncio.sleep(outcome)
                return {"slept": outcome}
            return outcome

        async def refresh_credentials(self) -> None:
            script.refreshes += 1

    Fake.name = name
    return Fake, script
