"""``planrun`` commands that need no run: usage errors, ``server``, ``schema``, Ctrl-C;
run in this process through ``main`` (the exit code is its return value)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from planrun import client, server
from planrun.cli import main
from tests.helpers import PLANRUN


def test_an_unknown_flag_prints_the_usage_and_exits_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["status", "r1", "--colour"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: planrun ")
    assert "planrun: error: unrecognized arguments: --colour" in err


def test_a_missing_command_prints_the_usage_and_exits_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "the following arguments are required: command" in capsys.readouterr().err


def test_ctrl_c_during_a_command_says_interrupted_and_exits_4(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(run_id: str) -> dict[str, object]:
        raise KeyboardInterrupt

    monkeypatch.setattr(client, "status", interrupted)
    assert main(["status", "r1"]) == 4
    assert capsys.readouterr().err == "planrun: interrupted\n"


def test_schema_prints_the_plan_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "steps" in schema["properties"] and "version" in schema["required"]


def test_server_status_names_the_running_server_and_its_pid(
        capsys: pytest.CaptureFixture[str]) -> None:
    info = server.running()  # the test session's own server, under its PLANRUN_HOME
    assert info is not None
    assert main(["server", "status"]) == 0
    assert capsys.readouterr().out == f"running: {info.url} (pid {info.pid})\n"


def test_server_start_reuses_the_server_in_use_and_prints_its_api_and_ui(
        capsys: pytest.CaptureFixture[str]) -> None:
    url = os.environ["PREFECT_API_URL"]
    assert main(["server", "start"]) == 0
    assert capsys.readouterr().out == f"Prefect API {url}  UI {url.removesuffix('/api')}\n"


def test_without_a_local_server_status_exits_1_and_stop_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PLANRUN_HOME", str(tmp_path))
    assert main(["server", "status"]) == 1
    assert main(["server", "stop"]) == 0
    assert capsys.readouterr().out.splitlines() == ["not running",
                                                    "no local server was running"]


def test_submitting_a_plan_file_that_is_not_there_exits_2_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["submit", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"{missing}:0:0: plan: cannot read the file: No such file or directory"


def test_a_reader_that_stops_reading_gets_no_traceback() -> None:
    """``planrun schema | head -1``: stdout's pipe is closed before the command writes."""
    proc = subprocess.Popen([*PLANRUN, "schema"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert (proc.wait(60), err) == (1, "")


def test_planrun_tools_checks_every_tools_health_at_once(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Two health checks that each wait for the other to have started: run one after the
    other, the first would wait out its 5 s and be reported unhealthy."""
    import asyncio

    from planrun.adapters import registry
    from planrun.adapters.base import Health
    from planrun.adapters.fake import fake_tool

    started: list[str] = []

    def waiting(name: str) -> type:
        cls, _ = fake_tool(name)

        async def health(self: object) -> Health:
            started.append(name)
            while len(started) < 2:
                await asyncio.sleep(0.01)
            return Health(ok=True, detail="the other check has started")

        cls.health = health  # type: ignore[method-assign]
        return cls

    tools = registry.Registry([waiting("slow.one"), waiting("slow.two")])
    monkeypatch.setattr(registry, "default_registry", lambda: tools)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PLANRUN_HOME", str(Path(os.environ["PLANRUN_HOME"]) / "no-server"))
    assert main(["tools", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["tool"], row["healthy"]) for row in rows] == [("slow.one", True),
                                                               ("slow.two", True)]


def test_planrun_tools_says_an_unhealthy_tools_problem_on_a_line_of_its_own(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from planrun.adapters import registry
    from planrun.adapters.base import Health
    from planrun.adapters.fake import fake_tool

    sick, _ = fake_tool("sick.tool")

    async def health(self: object) -> Health:
        return Health(ok=False, detail="its service does not answer")

    sick.health = health  # type: ignore[method-assign]
    well, _ = fake_tool("well.tool")
    tools = registry.Registry([sick, well])
    monkeypatch.setattr(registry, "default_registry", lambda: tools)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PLANRUN_HOME", str(Path(os.environ["PLANRUN_HOME"]) / "no-server"))
    assert main(["tools"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "sick.tool      UNHEALTHY a scripted tool for tests",
        "                   its service does not answer",
        "                   with: label?",
        "well.tool      ok   a scripted tool for tests",
        "                   with: label?"]
