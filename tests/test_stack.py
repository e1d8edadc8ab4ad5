"""``planrun up`` end to end: the real runner and bridge as processes against the test's
Prefect server; ``submit``, ``watch`` and ``status`` as a person would type them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest
from playwright.sync_api import Page, expect

from tests.helpers import PLANRUN, ROOT, cli, ended, wait_for
from tests.stack import Stack, messages

#: ``second`` is in flight until the test has killed the run's process: it waits for
#: ``crash.go`` in the workspace (a fixed sleep could end first on a loaded machine).
CRASHING = """
version: 1
name: crashing
steps:
  - {id: first, tool: shell.run, with: {argv: [sh, -c, "echo first >> crash.txt"]}}
  - id: second
    tool: shell.run
    needs: [first]
    with: {argv: [sh, -c, "echo second >> crash.txt; until [ -e crash.go ]; do sleep 0.05; done"]}
  - {id: third, tool: shell.run, needs: [second], with: {argv: [sh, -c, "echo third >> crash.txt"]}}
"""
#: ``second`` runs until the test has seen it running (the page may open late on a loaded
#: machine): it waits for ``three-steps.go`` in the workspace.
THREE_STEPS = """
version: 1
name: three-steps
steps:
  - {id: first, tool: core.sleep, with: {seconds: 1}}
  - id: second
    tool: shell.run
    needs: [first]
    with: {argv: [sh, -c, "until [ -e three-steps.go ]; do sleep 0.05; done"]}
  - {id: third, tool: core.echo, needs: [second], with: {value: done}}
"""


def test_up_prints_where_the_bridge_the_docs_and_the_prefect_ui_are(stack: Stack) -> None:
    text = stack.output()
    assert f"bridge      {stack.url}" in text
    assert f"API docs    {stack.url}/docs?token={stack.token}" in text
    assert f"Prefect UI  {os.environ['PREFECT_API_URL'].removesuffix('/api')}" in text
    assert httpx.get(f"{stack.url}/docs?token={stack.token}").status_code == 200
    assert httpx.get(f"{stack.url}/healthz").json()["status"] == "ok"


def test_up_makes_a_private_token_prints_it_and_the_cli_uses_it_without_flags(
        stack: Stack) -> None:
    token_file = Path(stack.env["PLANRUN_HOME"]) / "bridge.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert len(stack.token) >= 32
    text = stack.output()
    assert f"token       {stack.token}  (kept in {token_file}, which the CLI reads)" in text
    assert f"live page   {stack.url}/v1/runs/RUN/view?token={stack.token}" in text
    assert httpx.get(f"{stack.url}/v1/runs/x").status_code == 401
    assert stack.cli("status", "no-such-run").stderr.count("404") == 1  # past the token
    wrong = cli("status", "no-such-run", env={"PLANRUN_BRIDGE_URL": stack.url,
                                              "PLANRUN_TOKEN": "not-the-token"})
    assert wrong.returncode == 1
    assert "refused the token (PLANRUN_TOKEN is not its token)" in wrong.stderr


def test_submit_watch_and_status_follow_a_run_of_the_stack(stack: Stack) -> None:
    submitted = stack.cli("submit", str(ROOT / "examples" / "shell-pipeline.yaml"))
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    assert f"planrun watch {run_id}" in submitted.stderr

    watched = stack.cli("watch", run_id)
    assert watched.returncode == 3, watched.stderr  # completed_with_errors, as `run` says
    lines = watched.stderr
    assert "lint failed attempt 1" in lines and "save completed attempt 1" in lines
    assert watched.stdout.strip() == f"run {run_id} completed_with_errors"

    shown = stack.cli("status", run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["run_id"] == run_id and report["plan"] == "shell-pipeline"
    assert report["status"] == "completed_with_errors"
    assert report["steps"]["lint"]["error"]["category"] == "configuration"
    assert report["steps"]["save"]["output"]["bytes"] > 0
    assert report["progress"]["percent"] == 100.0
    assert (Path(stack.env["PLANRUN_WORKSPACE"]) / "numbers.txt").exists()

    human = stack.cli("status", run_id)
    assert "completed_with_errors, 6/6 steps" in human.stdout
    assert httpx.get(f"{stack.url}/v1/runs/{run_id}/view", headers=stack.auth).status_code == 200


def test_submit_refuses_an_invalid_plan_before_it_reaches_the_stack(
        stack: Stack, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: bad\nsteps:\n  - {id: a, tool: no.such}\n")
    refused = stack.cli("submit", str(bad))
    assert refused.returncode == 2
    assert "bad.yaml:4" in refused.stderr and "no.such" in refused.stderr
    assert stack.cli("watch", "no-such-run").returncode == 1


def test_a_run_whose_process_is_killed_is_recovered_and_only_the_step_in_flight_runs_again(
        stack: Stack, tmp_path: Path) -> None:
    plan = tmp_path / "crash.yaml"
    plan.write_text(CRASHING)
    others = set(stack.run_processes())  # the shared stack's earlier runs may be exiting
    run_id = stack.cli("submit", str(plan)).stdout.strip()
    marks = Path(stack.env["PLANRUN_WORKSPACE"]) / "crash.txt"

    wait_for(lambda: marks.exists() and marks.read_text().split() == ["first", "second"], 60,
             "the second step to be in flight")
    # The runner starts each run in a process of its own (a fork of its fork server).
    engine = wait_for(lambda: list(set(stack.run_processes()) - others), 10,
                      "the run's process")
    assert len(engine) == 1
    started = engine[0].children(recursive=True)  # the step's launcher and its `sleep`
    engine[0].kill()
    # The launchers see their run's process gone and kill what they started.
    wait_for(lambda: all(map(ended, started)), 10, "the killed run's programs to end")
    marks.with_name("crash.go").touch()  # the step, run again, now ends

    watched = stack.cli("watch", run_id, timeout=120)
    assert watched.returncode == 0, watched.stderr
    kinds = [m["type"] for m in messages(stack, run_id)]
    assert "run.resumed" in kinds and "run.failed" not in kinds
    assert [m["seq"] for m in messages(stack, run_id)] == list(range(1, len(kinds) + 1))
    report = json.loads(stack.cli("status", run_id, "--json").stdout)
    assert report["status"] == "completed"
    # The step that had finished ran once; the one in flight ran again; the rest once.
    assert marks.read_text().split() == ["first", "second", "second", "third"]
    marks.unlink()


def test_a_submitted_run_shows_on_the_live_page_in_the_terminal_and_in_prefect(
        stack: Stack, page: Page, tmp_path: Path) -> None:
    plan = tmp_path / "steps.yaml"
    plan.write_text(THREE_STEPS)
    run_id = stack.cli("submit", str(plan)).stdout.strip()
    watcher = subprocess.Popen([*PLANRUN, "watch", run_id], env={**os.environ,
                               "PLANRUN_BRIDGE_URL": stack.url}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        page.goto(f"{stack.url}/v1/runs/{run_id}/view?token={stack.token}")
        expect(page.locator("#title")).to_have_text("three-steps", timeout=30_000)
        expect(page.locator("[data-step]")).to_have_count(3)
        expect(page.locator('[data-step="second"]')).to_have_attribute(
            "data-status", "running", timeout=60_000)  # the run's process starts first
        expect(page.locator('[data-step="first"]')).to_have_attribute("data-status",
                                                                      "completed")
        expect(page.locator('[data-step="third"]')).to_have_attribute("data-status", "pending")
        expect(page.locator("#estimate")).to_contain_text("left")
        (Path(stack.env["PLANRUN_WORKSPACE"]) / "three-steps.go").touch()
        expect(page.locator("#run-status")).to_have_attribute("data-status", "completed",
                                                              timeout=60_000)
        expect(page.locator("#progress")).to_have_text("3 of 3 steps · 100 %")
    except BaseException:  # not left running, its pipes open, to fail a later test
        watcher.kill()
        watcher.communicate()
        raise
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    assert "second completed attempt 1" in err and out.strip().endswith("completed")
    # Prefect sets the flow run's final state once the flow returns, after planrun's own
    # run.completed: the two agree a moment later, not at the same instant.
    flow_run = wait_for(lambda: (r := httpx.get(
        f"{os.environ['PREFECT_API_URL']}/flow_runs/{run_id}").json())["state"]["type"]
        == "COMPLETED" and r, 30, "Prefect's flow run to be Completed")
    assert {"planrun", "plan:three-steps"} <= set(flow_run["tags"])
    artifacts = httpx.post(f"{os.environ['PREFECT_API_URL']}/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    assert {a["type"] for a in artifacts} >= {"progress", "table"}


def test_ctrl_c_stops_the_runner_and_the_bridge(stack: Stack) -> None:
    """The shared stack: the next test that asks for it starts it again."""
    children = stack.children()
    assert children
    assert stack.stop() == 0
    gone = wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                    for c in children), 20, "the stack's processes to exit")
    assert gone
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stack.url}/healthz")
    assert "stopping" in stack.output()



def test_up_on_a_port_in_use_says_so_and_starts_nothing() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = cli("up", "--port", str(port), timeout=60)
    assert refused.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in refused.stderr
    assert "Traceback" not in refused.stderr
