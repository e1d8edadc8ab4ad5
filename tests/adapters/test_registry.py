"""The tool registry: entry points, duplicates refused, unknown names list the known ones."""

from __future__ import annotations

import pytest

from planrun.adapters.core import Echo, Sleep
from planrun.adapters.fake import fake_tool
from planrun.adapters.registry import Registry, load_registry
from planrun.errors import DuplicateTool, UnknownTool

CORE_TOOLS = ["browser.open", "core.echo", "core.fail", "core.sleep", "file.delete", "file.list",
              "file.read", "file.write", "http.request", "message.send", "search.web",
              "shell.run"]


def test_the_installed_entry_points_provide_every_core_tool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLANRUN_ALLOWED_TOOLS", raising=False)
    assert load_registry().names() == CORE_TOOLS


def test_a_second_adapter_with_the_same_name_is_refused() -> None:
    clone, _ = fake_tool("core.echo")
    registry = Registry([Echo])
    with pytest.raises(DuplicateTool, match="'core.echo' is registered twice"):
        registry.register(clone)


def test_an_unknown_tool_names_the_known_ones() -> None:
    registry = Registry([Echo, Sleep])
    with pytest.raises(UnknownTool) as caught:
        registry.get("core.ech")
    assert caught.value.known == ["core.echo", "core.sleep"]
    assert "known tools: core.echo, core.sleep" in str(caught.value)


def test_the_operator_can_allow_only_some_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_ALLOWED_TOOLS", "core.*, http.request")
    registry = load_registry()
    assert registry.names() == ["core.echo", "core.fail", "core.sleep", "http.request"]
    assert "shell.run" not in registry
    with pytest.raises(UnknownTool):
        registry.get("shell.run")


def test_each_adapter_publishes_a_closed_parameter_schema() -> None:
    for adapter in load_registry().adapters():
        schema = adapter.parameter_schema()
        assert schema["type"] == "object", adapter.name
        assert schema["additionalProperties"] is False, adapter.name


def test_a_tool_with_a_default_timeout_applies_it_when_the_plan_sets_none() -> None:
    import asyncio
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from planrun.adapters.base import StepContext
    from planrun.adapters.workspace import Workspace
    from planrun.errors import TransientError

    slow, _ = fake_tool("fake.slow", 5.0)
    slow.default_timeout_s = 0.2
    with TemporaryDirectory() as tmp:
        ctx = StepContext(run_id="r", step_id="s", workspace=Workspace(Path(tmp)))
        with pytest.raises(TransientError, match="timeout of 0.2s"):
            asyncio.run(slow().run({}, ctx, None))
