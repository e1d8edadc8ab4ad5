"""`planrun run` through the real command line: exit codes, the report, messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from planrun import run_host
from tests.helpers import PLANRUN, cli, cli_json, wait_for


def unique_seconds() -> str:
    """A sleep length no other test run on this machine uses, to find its processes by."""
    return f"60.{os.getpid()}{time.monotonic_ns() % 10_000:04d}"


def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize(
    ("steps", "code", "status"),
    [
        ("- {id: a, tool: core.echo, with: {value: 1}}", 0, "completed"),
        ("- {id: a, tool: core.fail, critical: false, with: {category: logic}}", 3,
         "completed_with_errors"),
        ("- {id: a, tool: core.fail, with: {category: logic}}", 1, "failed"),
    ],
)
def test_exit_code_follows_the_run_status(tmp_path: Path, steps: str, code: int,
                                          status: str) -> None:
    plan = write(tmp_path, f"version: 1\nname: exit-codes\nsteps:\n  {steps}\n")
    exit_code, report = cli_json("run", plan)
    assert (exit_code, report["status"]) == (code, status)


def test_json_puts_only_the_report_on_stdout_and_progress_nowhere_else(tmp_path: Path) -> None:
    plan = write(tmp_path, """
        version: 1
        name: json-only
        steps:
          - {id: a, tool: core.echo, with: {value: [1, 2]}}
    """)
    proc = cli("run", plan, "--json")
    report = json.loads(proc.stdout)
    assert report["steps"]["a"]["output"] == {"value": [1, 2]}
    assert proc.stderr.strip() == ""


def test_without_json_a_pipe_gets_one_progress_line_per_change(tmp_path: Path) -> None:
    plan = write(tmp_path, """
        version: 1
        name: lines
        steps:
          - {id: first, tool: core.echo, with: {value: 1}}
          - {id: second, tool: core.fail, needs: [first], with: {category: configuration, message: no key}}
    """)
    proc = cli("run", plan)
    assert proc.returncode == 1
    assert "first completed attempt 1" in proc.stderr
    assert "second failed attempt 1: configuration: no key" in proc.stderr
    assert "run lines failed" in proc.stderr and "critical step second failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "failed" in proc.stdout and "/runs/flow-run/" in proc.stdout


def test_inputs_are_typed_by_the_plan(tmp_path: Path) -> None:
    plan = write(tmp_path, """
        version: 1
        name: typed-inputs
        inputs:
          n: {type: integer}
          ratio: {type: number, default: 0.5}
          flag: {type: boolean, default: false}
          tags: {type: array, default: []}
          word: {type: string}
        steps:
          - {id: a, tool: core.echo, with: {value: {n: "{{ inputs.n }}", ratio: "{{ inputs.ratio }}",
             flag: "{{ inputs.flag }}", tags: "{{ inputs.tags }}", word: "{{ inputs.word }}"}}}
    """)
    code, report = cli_json("run", plan, "--input", "n=42", "--input", "flag=true",
                            "--input", 'tags=["x", "y"]', "--input", "word=007")
    assert code == 0
    assert report["steps"]["a"]["output"]["value"] == {
        "n": 42, "ratio": 0.5, "flag": True, "tags": ["x", "y"], "word": "007"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "n=many"], "input 'n': 'many' is not integer"),
        (["--input", "nope=1", "--input", "n=1"], "unknown input nope"),
        ([], "input 'n' is required: pass --input n=VALUE"),
        (["--input", "n"], "write NAME=VALUE"),
    ],
)
def test_bad_inputs_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    plan = write(tmp_path, """
        version: 1
        name: needs-input
        inputs: {n: {type: integer}}
        steps: [{id: a, tool: core.echo, with: {value: "{{ inputs.n }}"}}]
    """)
    proc = cli("run", plan, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_invalid_plan_is_exit_2_with_located_errors(tmp_path: Path) -> None:
    plan = write(tmp_path, "version: 1\nname: bad\nsteps:\n  - {id: a, tool: no.such}\n")
    proc = cli("run", plan)
    assert proc.returncode == 2
    assert f"{plan}:4:" in proc.stderr and "unknown tool 'no.such'" in proc.stderr


def test_a_missing_plan_file_is_exit_2(tmp_path: Path) -> None:
    proc = cli("run", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2
    assert "cannot read the file" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_arguments_are_exit_2() -> None:
    proc = cli("run")
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_cancels_the_run_kills_its_command_and_exits_4(
        tmp_path: Path, sig: signal.Signals) -> None:
    marker = tmp_path / "ws" / "started"  # in the workspace: shell.run may be sandboxed
    seconds = unique_seconds()
    plan = write(tmp_path, f"""
        version: 1
        name: interrupted
        steps:
          - id: long
            tool: shell.run
            with: {{argv: [sh, -c, "touch {marker}; exec sleep {seconds}"]}}
          - {{id: after, tool: core.echo, needs: [long], with: {{value: 1}}}}
    """)
    workspace = tmp_path / "ws"
    proc = subprocess.Popen([*PLANRUN, "run", plan, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PLANRUN_WORKSPACE": str(workspace)})
    try:
        wait_for(marker.exists, timeout=60, what="the command to start")
        # The marker is made just before the shell execs sleep: wait for the exec.
        sleepers = wait_for(lambda: [p for p in psutil.process_iter(["cmdline"])
                                     if p.info["cmdline"] == ["sleep", seconds]],
                            timeout=30, what="the shell to exec sleep")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # a failed wait above: leave no command behind
            proc.kill()
            proc.communicate()
    assert proc.returncode == 4, err
    report = json.loads(out)
    assert report["status"] == "cancelled"
    assert report["steps"]["long"]["status"] == "cancelled"
    assert report["steps"]["after"]["status"] == "skipped"
    for sleeper in sleepers:
        assert not sleeper.is_running() or sleeper.status() == psutil.STATUS_ZOMBIE


def test_a_failed_run_rolls_back_the_files_it_changed(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "keep.txt").write_text("original")
    (workspace / "gone.txt").write_text("still here")
    plan = write(tmp_path, """
        version: 1
        name: rollback
        steps:
          - {id: edit, tool: file.write, with: {path: keep.txt, content: changed}}
          - {id: create, tool: file.write, with: {path: new/made.txt, content: new}}
          - {id: remove, tool: file.delete, with: {path: gone.txt}}
          - {id: boom, tool: core.fail, needs: [edit, create, remove], with: {category: logic}}
    """)
    code, report = cli_json("run", plan, env={"PLANRUN_WORKSPACE": str(workspace)})
    assert code == 1
    assert report["steps"]["edit"]["status"] == "completed"
    assert (workspace / "keep.txt").read_text() == "original"
    assert (workspace / "gone.txt").read_text() == "still here"
    assert not (workspace / "new").exists(), "the directory the run created is removed too"
    assert sorted(report["rolled_back"]) == ["gone.txt", "keep.txt", "new", "new/made.txt"]


def test_a_completed_run_keeps_its_files(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    plan = write(tmp_path, """
        version: 1
        name: keep-files
        steps:
          - {id: edit, tool: file.write, with: {path: out.txt, content: kept}}
          - {id: optional, tool: core.fail, critical: false, with: {category: logic}}
    """)
    code, _ = cli_json("run", plan, env={"PLANRUN_WORKSPACE": str(workspace)})
    assert code == 3
    assert (workspace / "out.txt").read_text() == "kept"


def test_a_critical_failure_kills_a_running_command(tmp_path: Path) -> None:
    pid_file = tmp_path / "ws" / "pid"  # in the workspace: shell.run may be sandboxed
    seconds = unique_seconds()
    plan = write(tmp_path, f"""
        version: 1
        name: kill-on-failure
        steps:
          - id: long
            tool: shell.run
            with: {{argv: [sh, -c, "echo $$ > {pid_file}; sleep {seconds} & wait"]}}
          - {{id: wait, tool: core.sleep, with: {{seconds: 0.5}}}}
          - {{id: boom, tool: core.fail, needs: [wait], with: {{category: logic}}}}
    """)
    code, report = cli_json("run", plan, env={"PLANRUN_WORKSPACE": str(tmp_path / "ws")})
    assert code == 1
    assert report["steps"]["long"]["status"] == "cancelled"
    assert pid_file.read_text().strip()  # it ran (its PID may be a sandbox's: not checked)
    shells = [p for p in psutil.process_iter(["cmdline", "status"])
              if p.info["cmdline"] and p.info["cmdline"][-1].startswith(f"echo $$ > {pid_file}")
              and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert shells == []
    orphans = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]]
    assert orphans == []


def test_the_workspace_flag_confines_file_tools_to_that_directory(tmp_path: Path) -> None:
    plan = write(tmp_path, """
        version: 1
        name: workspace-flag
        steps:
          - {id: w, tool: file.write, with: {path: out/note.txt, content: hello}}
    """)
    code, _ = cli_json("run", plan, "--workspace", str(tmp_path / "chosen"))
    assert code == 0
    assert (tmp_path / "chosen" / "out" / "note.txt").read_text() == "hello"


def test_the_json_report_is_strict_json_even_when_a_step_returns_nan(tmp_path: Path) -> None:
    plan = write(tmp_path, """
        version: 1
        name: nan-output
        inputs: {x: {type: string, default: nan}}
        steps:
          - {id: a, tool: core.echo, with: {value: "{{ inputs.x | float }}"}}
    """)
    proc = cli("run", plan, "--json")
    assert "NaN" not in proc.stdout
    assert json.loads(proc.stdout)["steps"]["a"]["output"] == {"value": None}
    bad = cli("run", write(tmp_path, "version: 1\nname: n\ninputs: {x: {type: number}}\n"
                          "steps: [{id: a, tool: core.echo, with: {value: '{{ inputs.x }}'}}]\n",
                          "n.yaml"), "--input", "x=nan")
    assert bad.returncode == 2 and "'nan' is not number" in bad.stderr


def test_a_failed_command_reports_its_exit_code_and_stderr_in_the_error_details(
        tmp_path: Path) -> None:
    plan = write(tmp_path, """
        version: 1
        name: details
        steps:
          - {id: a, tool: shell.run, with: {argv: [sh, -c, "echo broken input >&2; exit 3"]}}
    """)
    code, report = cli_json("run", plan, env={"PLANRUN_WORKSPACE": str(tmp_path / "ws")})
    error = report["steps"]["a"]["error"]
    assert code == 1 and error["category"] == "logic"
    assert error["details"]["exit_code"] == 3
    assert "broken input" in error["details"]["stderr_tail"]


def test_an_unreachable_prefect_api_is_a_clear_error(tmp_path: Path) -> None:
    plan = write(tmp_path, "version: 1\nname: x\nsteps: [{id: a, tool: core.echo}]\n")
    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api", "PLANRUN_HOME": str(tmp_path / "home")}
    proc = cli("run", plan, env=env)
    assert proc.returncode == 1
    assert "cannot reach the Prefect API at http://127.0.0.1:9/api" in proc.stderr
    assert "Traceback" not in proc.stderr
    host = run_host.address({**os.environ, **env})
    assert host is not None and not host.with_suffix(".lock").exists(), \
        "a run host was started for a server that does not answer"
