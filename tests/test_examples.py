"""The examples run offline on a fresh machine and end as their comments promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli_json


@pytest.mark.parametrize(
    ("example", "code", "status"),
    [("research-brief", 0, "completed"), ("flaky-api", 0, "completed"),
     ("shell-pipeline", 3, "completed_with_errors")],
)
def test_example_runs(tmp_path: Path, example: str, code: int, status: str) -> None:
    args = ["run", str(ROOT / "examples" / f"{example}.yaml")]
    if example == "research-brief":
        args += ["--input", f"api={os.environ['PREFECT_API_URL']}"]
    exit_code, report = cli_json(*args, env={"PLANRUN_WORKSPACE": str(tmp_path / "ws")})
    assert (exit_code, report["status"]) == (code, status), report
    if example == "research-brief":
        assert "Prefect REST API" in (tmp_path / "ws" / "brief.md").read_text()
    if example == "flaky-api":
        assert report["steps"]["prices"]["fallback_used"] is True
        assert report["steps"]["warm_up"]["attempts"] == 3
    if example == "shell-pipeline":
        assert report["steps"]["lint"]["error"]["category"] == "configuration"
        assert report["steps"]["note_lint"]["status"] == "completed"
        numbers = (tmp_path / "ws" / "numbers.txt").read_text().split()
        assert numbers == sorted(numbers, key=int) and len(numbers) == 20


def test_the_agent_tools_example_searches_mails_and_posts_offline(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "agent-tools" / "run.py"), "--json"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
        env={**os.environ, "PLANRUN_WORKSPACE": str(tmp_path / "ws")})
    report = json.loads(proc.stdout)
    assert (proc.returncode, report["status"]) == (0, "completed"), proc.stderr
    results = report["steps"]["search"]["output"]["results"]
    assert [r["url"] for r in results][:2] == ["https://www.prefect.io/pricing",
                                               "https://docs.prefect.io/v3/get-started"]
    assert "javascript:" not in proc.stdout and "<script>" not in json.dumps(results)
    assert "Pricing | Prefect" in (tmp_path / "ws" / "brief.md").read_text()
    assert "mail to team@example.org" in proc.stderr
    assert "chat: *Brief ready*\nprefect pricing: mailed to team@example.org" in proc.stderr


def test_the_browser_example_serves_its_page_and_runs_against_it(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from planrun.adapters.browser import chromium_path

    if chromium_path() is None:
        pytest.skip("no Chromium: `scripts/install` installs Debian's chromium")
    proc = subprocess.run([sys.executable, str(ROOT / "examples/browser/run.py"), "--json"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "PLANRUN_WORKSPACE": str(tmp_path / "ws")})
    report = json.loads(proc.stdout)
    assert (proc.returncode, report["status"]) == (0, "completed"), proc.stderr
    assert report["steps"]["open_page"]["output"]["title"] == "Harbour weather"
    assert (tmp_path / "ws/screenshots/open_page.png").stat().st_size > 1000
