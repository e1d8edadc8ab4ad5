"""The ``core.*`` tools: echo, sleep and fail, for plans, drills and tests."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field

from planrun.adapters.base import Adapter, Params, StepContext
from planrun.errors import Category, step_error


class EchoParams(Params):
    value: Any = Field(default=None, description="Any value; returned as {value}.")


class Echo(Adapter[EchoParams]):
    """Returns its ``value`` unchanged: ``{"value": ...}``."""

    name = "core.echo"
    Params = EchoParams
    summary = "return the given value"
    default_estimate_s = 0.01

    async def execute(self, params: EchoParams, ctx: StepContext) -> dict[str, Any]:
        return {"value": params.value}


class SleepParams(Params):
    seconds: float = Field(ge=0, le=86400, description="How long to sleep, in seconds.")


class Sleep(Adapter[SleepParams]):
    """Sleeps for ``seconds``; cancellable at any moment."""

    name = "core.sleep"
    Params = SleepParams
    summary = "wait for a number of seconds"

    def estimate(self, params: SleepParams) -> float:
        return params.seconds

    async def execute(self, params: SleepParams, ctx: StepContext) -> dict[str, Any]:
        await asyncio.sleep(params.seconds)
        return {"slept_s": params.seconds}


class FailParams(Params):
    category: Category = Field(default=Category.TRANSIENT, description="Category of the failure.")
    message: str = Field(default="failed on purpose", description="The error message.")
    times: int | None = Field(
        default=None, ge=0,
        description="Fail the first `times` attempts, then succeed; absent: fail every attempt.",
    )


class Fail(Adapter[FailParams]):
    """Fails with the given category for the first ``times`` attempts, for drills."""

    name = "core.fail"
    Params = FailParams
    summary = "fail on purpose (the first `times` attempts, or always)"
    default_estimate_s = 0.01

    async def execute(self, params: FailParams, ctx: StepContext) -> dict[str, Any]:
        if params.times is None or ctx.attempt <= params.times:
            raise step_error(params.category, params.message,
                             hint=f"core.fail failed on purpose (attempt {ctx.attempt})")
        return {"attempt": ctx.attempt, "failed_before": params.times}
