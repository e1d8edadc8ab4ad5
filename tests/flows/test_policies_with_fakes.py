"""Retry policies that need a tool's cooperation, driven through the real engine and a
real Prefect flow run with scripted tools (adapters.fake)."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

from planrun.adapters.core import Echo
from planrun.adapters.fake import Script, fake_tool
from planrun.adapters.registry import Registry
from planrun.adapters.workspace import Workspace
from planrun.errors import AccessError, ResourceError, TransientError


def run_with(tools: Registry, text: str, tmp_path: Path) -> dict[str, Any]:
    from prefect import flow

    from planrun.flows.plan_flow import execute_plan
    from planrun.validate import validate_text

    plan = validate_text(textwrap.dedent(text), "fake.yaml", tools).plan

    @flow(name="planrun-fake-test", persist_result=False)
    async def run() -> dict[str, Any]:
        return await execute_plan(plan, {}, "fake-run", registry=tools,
                                  workspace=Workspace(tmp_path / "ws", tmp_path / "backup"))

    return asyncio.run(run())


def one_step(tool: str, extra: str = "") -> str:
    return f"""
        version: 1
        name: fake
        defaults: {{retry: {{initial_delay: 10ms}}}}
        steps:
          - {{id: s, tool: {tool}, with: {{label: x}}{extra}}}
    """


def test_a_permission_error_refreshes_credentials_before_its_one_retry(tmp_path: Path) -> None:
    tool, script = fake_tool("fake.auth", AccessError("token expired"), {"ok": True})
    report = run_with(Registry([tool]), one_step("fake.auth"), tmp_path)
    assert report["steps"]["s"]["status"] == "completed"
    assert [c.attempt for c in script.calls] == [1, 2]
    assert script.refreshes == 1


def test_a_resource_error_tells_the_next_attempt_to_use_less(tmp_path: Path) -> None:
    tool, script = fake_tool("fake.big", ResourceError("out of memory"), {"ok": True})
    report = run_with(Registry([tool]), one_step("fake.big"), tmp_path)
    assert report["steps"]["s"]["attempts"] == 2
    assert [c.reduce_usage for c in script.calls] == [False, True]


def test_retry_after_is_honoured_over_a_shorter_backoff(tmp_path: Path) -> None:
    tool, script = fake_tool("fake.limited", ResourceError("slow down", retry_after=0.8),
                             {"ok": True})
    report = run_with(Registry([tool]), one_step("fake.limited"), tmp_path)
    step = report["steps"]["s"]
    assert step["status"] == "completed" and step["attempts"] == 2
    assert step["duration_s"] >= 0.8


def test_the_fallback_is_tried_only_after_the_last_attempt(tmp_path: Path) -> None:
    tool, script = fake_tool("fake.down", TransientError("503"))
    extra = ", retry: {max_attempts: 3}, fallback: {tool: core.echo, with: {value: cached}}"
    report = run_with(Registry([tool, Echo]), one_step("fake.down", extra), tmp_path)
    step = report["steps"]["s"]
    assert len(script.calls) == 3
    assert step["fallback_used"] is True and step["output"] == {"value": "cached"}


def test_cancelled_steps_stop_at_once_when_a_critical_step_fails(tmp_path: Path) -> None:
    slow, slow_script = fake_tool("fake.slow", 30.0)
    broken, _ = fake_tool("fake.broken", TransientError("down"))
    report = run_with(Registry([slow, broken]), """
        version: 1
        name: fake
        steps:
          - {id: slow, tool: fake.slow}
          - {id: broken, tool: fake.broken, retry: {max_attempts: 1}}
    """, tmp_path)
    assert report["status"] == "failed"
    assert report["steps"]["slow"]["status"] == "cancelled"
    assert report["duration_s"] < 10
    assert isinstance(slow_script, Script) and len(slow_script.calls) == 1


def test_each_step_looks_for_the_operator_policy_once(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's context, limits, breaker and tool each ask for the policy; the attempt
    looks for the file once (flows/step.py, planrun/policy.one_policy)."""
    from planrun import policy

    looks: list[object] = []
    real = policy.policy_file
    monkeypatch.setattr(policy, "policy_file", lambda: looks.append(1) or real())

    def looks_for(steps: int) -> int:
        looks.clear()
        chain = "".join(f"\n          - {{id: s{i}, tool: core.echo, with: {{value: {i}}}"
                        + (f", needs: [s{i - 1}]}}" if i else "}")
                        for i in range(steps))
        report = run_with(Registry([Echo]), "version: 1\nname: fake\nsteps:" + chain,
                          tmp_path)
        assert [s["status"] for s in report["steps"].values()] == ["completed"] * steps
        return len(looks)

    assert looks_for(3) - looks_for(1) == 2
