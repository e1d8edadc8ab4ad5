"""Two runs sharing a workspace never undo each other's files (issue 8, item 7).

Each run is its own ``planrun run`` process, as a user (or two planners) would start them:
a run's rollback puts a file back only while it is still what that run wrote there.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.helpers import PLANRUN, ROOT, cli_json, wait_for

WRITER = """version: 1
name: {name}
steps:
  - {{id: write, tool: file.write, with: {{path: shared/x.txt, content: "from {name}"}}}}
"""

#: Writes x, waits for the test's go-ahead (a file), then fails: its rollback runs last.
FAILING = """version: 1
name: failing
steps:
  - {id: write, tool: file.write, with: {path: shared/x.txt, content: "from failing"}}
  - id: wait
    tool: shell.run
    needs: [write]
    with: {argv: [sh, -c, "until [ -e failing.go ]; do sleep 0.05; done"]}
  - {id: fail, tool: core.fail, needs: [wait], with: {category: logic}}
"""


def plan(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def start_failing_run(tmp_path: Path, workspace: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PLANRUN, "run", str(plan(tmp_path, "failing", FAILING)), "--json",
         "--workspace", str(workspace)],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def finish(process: subprocess.Popen[str], workspace: Path) -> tuple[int, dict[str, Any]]:
    (workspace / "failing.go").touch()
    out, err = process.communicate(timeout=120)
    assert "Traceback" not in err, err
    return process.returncode, json.loads(out)


def test_a_failed_runs_rollback_leaves_the_file_a_completed_run_wrote_after_it(
        tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    x = workspace / "shared" / "x.txt"
    failing = start_failing_run(tmp_path, workspace)
    try:
        wait_for(lambda: x.exists() and x.read_text() == "from failing", 60,
                 "the failing run to write x")
        code, completed = cli_json("run", str(plan(tmp_path, "other", WRITER.format(
            name="other"))), "--workspace", str(workspace))
        assert (code, completed["status"]) == (0, "completed")
        assert x.read_text() == "from other"
    finally:
        code, failed = finish(failing, workspace)

    assert (code, failed["status"]) == (1, "failed")
    assert x.read_text() == "from other"  # the completed run's file is kept
    assert "shared/x.txt" not in failed["rolled_back"]
    assert "rollback left shared/x.txt: another run changed it" in failed["reason"]


def test_a_failed_run_that_wrote_after_a_completed_run_puts_its_file_back(
        tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    x = workspace / "shared" / "x.txt"
    code, completed = cli_json("run", str(plan(tmp_path, "first", WRITER.format(
        name="first"))), "--workspace", str(workspace))
    assert (code, completed["status"]) == (0, "completed")

    failing = start_failing_run(tmp_path, workspace)
    try:
        wait_for(lambda: x.read_text() == "from failing", 60, "the failing run to write x")
    finally:
        code, failed = finish(failing, workspace)

    assert (code, failed["status"]) == (1, "failed")
    assert x.read_text() == "from first"  # its own change undone, the earlier file back
    assert failed["rolled_back"] == ["shared/x.txt"]
    assert "rollback left" not in (failed["reason"] or "")


def test_the_same_bytes_written_by_another_run_are_still_its_file(tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    x = workspace / "shared" / "x.txt"
    failing = start_failing_run(tmp_path, workspace)
    try:
        wait_for(lambda: x.exists(), 60, "the failing run to write x")
        same = WRITER.format(name="failing").replace("name: failing", "name: twin")
        code, completed = cli_json("run", str(plan(tmp_path, "twin", same)),
                                   "--workspace", str(workspace))
        assert (code, completed["status"]) == (0, "completed")
    finally:
        code, failed = finish(failing, workspace)

    assert (code, failed["status"]) == (1, "failed")
    assert x.read_text() == "from failing"  # the twin's file, not deleted
    assert "rollback left shared/x.txt" in failed["reason"]
