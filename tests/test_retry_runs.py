"""Retrying ended runs for real: ``planrun retry`` of a ``planrun run`` run, and
``POST /v1/runs/{id}/retry`` and ``planrun retry`` of runs of the stack. The plan fails while
the workspace has no ``ready.txt`` (a service that is down), after writing a file that its
failure rolls back; the retry must put that file back, run only what did not complete,
and go on with the same run's stream."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests.helpers import cli, cli_json, wait_for
from tests.stack import Stack

PLAN = """
    version: 1
    name: retried
    steps:
      - {id: write, tool: file.write, with: {path: notes.txt, content: from write}}
      - {id: check, tool: file.read, needs: [write], with: {path: ready.txt}}
      - {id: read, tool: file.read, needs: [check], with: {path: notes.txt}}
    """


def plan_file(tmp_path: Path) -> str:
    path = tmp_path / "retried.yaml"
    path.write_text(textwrap.dedent(PLAN))
    return str(path)


def check_retried(first: dict[str, Any], second: dict[str, Any], workspace: Path) -> None:
    """``first`` failed at ``check``; ``second`` is its retry after ready.txt appeared."""
    assert first["status"] == "failed"
    assert [first["steps"][s]["status"] for s in ("write", "check", "read")] == [
        "completed", "failed", "skipped"]
    assert second["run_id"] == first["run_id"]
    assert second["status"] == "completed"
    write = second["steps"]["write"]
    assert write["started_at"] == first["steps"]["write"]["started_at"]  # not run again
    assert second["steps"]["check"]["output"]["content"] == "yes"
    assert second["steps"]["read"]["output"]["content"] == "from write"  # put back
    assert (workspace / "notes.txt").read_text() == "from write"  # and kept


def test_planrun_retry_runs_a_local_run_again_from_where_it_failed(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    env = {"PLANRUN_WORKSPACE": str(workspace)}
    code, first = cli_json("run", plan_file(tmp_path), env=env)
    assert code == 1
    assert not (workspace / "notes.txt").exists()  # rolled back

    (workspace / "ready.txt").write_text("yes")  # the service is back
    code, second = cli_json("retry", first["run_id"], env=env)
    assert code == 0
    check_retried(first, second, workspace)

    again = cli("retry", first["run_id"], env=env)
    assert again.returncode == 1
    assert f"run {first['run_id']} completed: it has no failed, skipped or cancelled step " \
        "to run again" in again.stderr
    assert "Traceback" not in again.stderr


def test_a_retry_in_another_workspace_is_refused_and_the_run_can_be_retried_in_its_own(
        tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    code, first = cli_json("run", plan_file(tmp_path), env={"PLANRUN_WORKSPACE": str(workspace)})
    assert code == 1
    (workspace / "ready.txt").write_text("yes")

    code, wrong = cli_json("retry", first["run_id"], "--workspace", str(tmp_path / "other"))
    assert code == 1
    assert f"rolled back in the workspace {workspace.resolve()}" in wrong["reason"]
    code, second = cli_json("retry", first["run_id"], "--workspace", str(workspace))
    assert code == 0
    check_retried(first, second, workspace)


def submit_failing(stack: Stack, tmp_path: Path) -> dict[str, Any]:
    submitted = stack.cli("submit", plan_file(tmp_path))
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    return wait_for(lambda: (r := stack.report(run_id))["status"] == "failed" and r, 90,
                    "the run to fail")


async def messages(stack: Stack, run_id: str, until: str) -> list[dict[str, Any]]:
    """The run's messages from the start until one of type ``until`` after a retry."""
    got: list[dict[str, Any]] = []
    url = stack.url.replace("http", "ws", 1) + f"/v1/runs/{run_id}/ws?after=0"
    async with connect(url, additional_headers=stack.auth, proxy=None) as ws:
        async with asyncio.timeout(90):
            async for frame in ws:
                message = json.loads(frame)
                if message["type"] != "heartbeat":
                    got.append(message)
                retried = any(m["type"] == "run.resumed" for m in got)
                if retried and message["type"] == until:
                    return got
    raise AssertionError("the stream closed")


def test_the_bridge_retries_a_run_of_the_stack_and_its_stream_goes_on(
        stack: Stack, tmp_path: Path) -> None:
    workspace = Path(stack.env["PLANRUN_WORKSPACE"])
    (workspace / "ready.txt").unlink(missing_ok=True)
    first = submit_failing(stack, tmp_path)
    run_id = first["run_id"]
    last_seq = first["last_seq"]
    (workspace / "ready.txt").write_text("yes")

    answer = httpx.post(f"{stack.url}/v1/runs/{run_id}/retry", headers=stack.auth, timeout=30)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"run_id": run_id, "status": "retrying",
                             "retry": ["check", "read"], "after": last_seq}

    got = asyncio.run(messages(stack, run_id, until="run.completed"))
    assert [m["seq"] for m in got] == list(range(1, len(got) + 1))  # no gap, one stream
    resumed = next(m for m in got if m["type"] == "run.resumed")
    assert resumed["seq"] == last_seq + 1
    assert resumed["summary"] == "retry 1: 2 step(s) run again, 1 finished step(s) kept"
    after = got[resumed["seq"]:]
    assert sorted(m["step_id"] for m in after if m["type"] == "step.completed") == [
        "check", "read"]
    check_retried(first, stack.report(run_id), workspace)

    again = httpx.post(f"{stack.url}/v1/runs/{run_id}/retry", headers=stack.auth, timeout=30)
    assert again.status_code == 409
    assert "completed: it has no failed, skipped or cancelled step" in again.json()["detail"]


def test_planrun_retry_of_a_run_of_the_stack_follows_it_to_its_end(
        stack: Stack, tmp_path: Path) -> None:
    workspace = Path(stack.env["PLANRUN_WORKSPACE"])
    (workspace / "ready.txt").unlink(missing_ok=True)
    first = submit_failing(stack, tmp_path)
    (workspace / "ready.txt").write_text("yes")

    retried = stack.cli("retry", first["run_id"])
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip().endswith(f"run {first['run_id']} completed")
    check_retried(first, stack.report(first["run_id"]), workspace)
