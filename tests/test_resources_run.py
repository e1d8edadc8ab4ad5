"""What each step used, end to end (docs/resources.md): `planrun run --json` reports a real
program's tree in the sandbox, a file tool's bytes and a step killed at its memory limit;
Prefect shows it in the step's log and the run's table."""

from __future__ import annotations

import asyncio
import json
import shutil
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from planrun.adapters import sandbox
from tests.helpers import cli_json, run_yaml, wait_for

MIB = 1024 * 1024
PY = shutil.which("python3", path=sandbox.DEFAULT_PATH) or "python3"

WORKLOAD = (
    "import time\n"
    "block = bytearray(b'x') * (100 * 2**20)\n"
    "open('written.bin', 'wb').write(bytes(2**20))\n"
    "started = time.process_time()\n"
    "while time.process_time() - started < 0.5:\n"
    "    pass\n")


def test_the_report_says_what_every_step_used(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(textwrap.dedent(f"""
        version: 1
        name: resources-e2e
        steps:
          - id: work
            tool: shell.run
            with: {{argv: ["{PY}", "-c", {WORKLOAD!r}]}}
          - id: note
            tool: file.write
            with: {{path: note.txt, content: "{'x' * 3000}"}}
          - id: greedy
            tool: shell.run
            memory_mb: 64
            critical: false
            retry: {{max_attempts: 1}}
            with: {{argv: ["{PY}", "-c", "block = bytearray(b'x') * (400 * 2**20)"]}}
    """))
    code, report = cli_json("run", str(plan), env={"PLANRUN_WORKSPACE": str(tmp_path / "ws")})
    assert report["status"] == "completed_with_errors", report
    assert code == 3
    work = report["steps"]["work"]["resources"]
    assert work["peak_memory_bytes"] >= 100 * MIB
    assert work["cpu_s"] >= 0.4
    assert work["written_bytes"] >= MIB
    assert report["steps"]["note"]["resources"]["written_bytes"] == 3000
    greedy = report["steps"]["greedy"]
    assert greedy["error"]["category"] == "resource"
    assert "memory limit of 64 MiB" in greedy["error"]["message"]
    assert greedy["resources"]["peak_memory_bytes"] <= 64 * MIB + MIB


def test_prefect_shows_what_each_step_used_in_its_log_and_the_runs_table() -> None:
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    report = run_yaml("""
        version: 1
        name: resources-in-prefect
        steps:
          - {id: fetch, tool: core.echo, with: {value: 1}}
    """)
    run_id = [UUID(report["run_id"])]

    def used_line() -> list[str] | None:
        logs = ask(lambda c: c.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=run_id))))
        # docs/resources.md: a completed step's usage is its Completed state's message
        found = [log.message for log in logs
                 if log.message.startswith("Finished in state Completed('used ")]
        return found or None

    line = wait_for(used_line, what="the step's 'used ...' line in Prefect")[0]
    assert " peak, " in line and " s CPU, " in line and line.endswith(" written')")
    artifacts = ask(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=run_id))))
    table = next(a for a in artifacts if a.type == "table")
    row = json.loads(table.data)[0]
    assert row["memory"].endswith("iB") and row["cpu"].endswith(" s") and row["written"] == "0 B"


def ask(call: Callable[[Any], Awaitable[Any]]) -> Any:
    """``call(client)`` with a Prefect client of the test server."""
    from prefect.client.orchestration import get_client

    async def run() -> Any:
        async with get_client() as client:
            return await call(client)

    return asyncio.run(run())
