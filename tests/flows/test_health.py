"""Tool health before a run (flows/health.py) and the file tools' own check."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

import pytest

from planrun.adapters import sandbox
from planrun.adapters.base import Adapter, Health, Params, StepContext
from planrun.adapters.files import workspace_health
from planrun.adapters.shell import ShellRun
from planrun.flows.health import HealthChecks
from planrun.policy import Trust, trusted_as


class Counted(Adapter[Params]):
    """A tool whose health is ``verdict`` and which counts its checks."""

    name = "test.counted"
    Params = Params
    checks: ClassVar[int] = 0
    verdict: ClassVar[Health] = Health(ok=False, detail="the service is down")

    async def execute(self, params: Params, ctx: StepContext) -> Any:
        return None

    async def health(self) -> Health:
        type(self).checks += 1
        return self.verdict


class Hangs(Counted):
    name = "test.hangs"

    async def health(self) -> Health:
        await asyncio.sleep(60)
        return Health(ok=True)


def test_an_unhealthy_tool_is_named_with_why_and_checked_once_per_ttl() -> None:
    now = [0.0]
    checks = HealthChecks(ttl_s=30, clock=lambda: now[0])
    Counted.checks = 0
    assert asyncio.run(checks.unhealthy_tools([Counted(), Counted()])) == \
        {"test.counted": "the service is down"}
    asyncio.run(checks.unhealthy_tools([Counted()]))
    assert Counted.checks == 1
    now[0] = 31
    asyncio.run(checks.unhealthy_tools([Counted()]))
    assert Counted.checks == 2


def test_a_health_check_that_hangs_is_unhealthy_after_its_timeout() -> None:
    from planrun.flows import health

    async def go() -> Health:
        return await health.check(Hangs(), timeout_s=0.05)

    assert asyncio.run(go()) == Health(ok=False,
                                       detail="its health check did not answer in 0.05 s")


def test_the_file_tools_are_unhealthy_when_the_workspace_root_cannot_be_a_directory(
        tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    assert not workspace_health(tmp_path / "a-file" / "ws").ok
    healthy = workspace_health(tmp_path / "new" / "ws")
    assert healthy.ok and "MiB free" in healthy.detail


def test_without_the_sandbox_shell_run_is_unhealthy_only_where_the_policy_requires_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sandbox.BWRAP_ENV, "/nonexistent/bwrap")
    assert not asyncio.run(ShellRun().health()).ok  # submitted: sandbox required
    with trusted_as(Trust.LOCAL):  # local: if_available
        health = asyncio.run(ShellRun().health())
    assert health.ok and "local runs are unconfined" in health.detail
