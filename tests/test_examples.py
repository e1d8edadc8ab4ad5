"""The examples run offline on a fresh machine and end as their comments promise."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email import message_from_bytes
from email.policy import default as email_policy
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from playwright.sync_api import Page, expect

from tests.helpers import ROOT, cli_json, wait_for


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


@dataclass
class AgentModeRun:
    """examples/agent-mode/run.py, run once: its exit code, report, stderr, workspace."""

    code: int
    report: dict[str, Any]
    stderr: str
    ws: Path


@pytest.fixture(scope="module")
def agent_mode(tmp_path_factory: pytest.TempPathFactory) -> AgentModeRun:
    from planrun.adapters.browser import chromium_path

    if chromium_path() is None:
        pytest.skip("no Chromium: `scripts/install` installs Debian's chromium")
    ws = tmp_path_factory.mktemp("agent-mode") / "ws"
    proc = subprocess.run([sys.executable, str(ROOT / "examples/agent-mode/run.py"), "--json",
                           "--workspace", str(ws)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert "Traceback" not in proc.stderr, proc.stderr
    return AgentModeRun(proc.returncode, json.loads(proc.stdout), proc.stderr, ws)


def test_the_agent_mode_example_searches_opens_the_top_result_and_mails_a_summary(
        agent_mode: AgentModeRun) -> None:
    report, steps = agent_mode.report, agent_mode.report["steps"]
    assert (agent_mode.code, report["status"]) == (0, "completed"), agent_mode.stderr
    # The search: SearXNG's JSON from the example's server, its markup removed.
    results = steps["search"]["output"]["results"]
    page = results[0]["url"]
    assert page.startswith("http://127.0.0.1:") and page.endswith("/ferry.html")
    assert [r["title"] for r in results] == ["Harbour ferry: today's sailings",
                                             "Ferry timetables", "Harbour weather"]
    assert "search(es) ['harbour ferry sailings today']" in agent_mode.stderr
    # The top result, opened in Chromium: the part its script adds was waited for.
    opened = steps["read_top"]["output"]
    assert (opened["final_url"], opened["status"]) == (page, 200)
    assert opened["title"] == "Harbour ferry: today's sailings"
    assert "The first ferry sails at 07:40" in opened["text"]
    assert f"web page {page}: " in agent_mode.stderr
    shot = agent_mode.ws / "screenshots/read_top.png"
    assert opened["screenshot"] == "screenshots/read_top.png"
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 1000
    assert f"screenshot: {shot}" in agent_mode.stderr
    # The mail, as the SMTP server received it (saved by the script).
    assert steps["mail"]["output"]["accepted"] == ["skipper@example.org"]
    [saved] = (agent_mode.ws / "received-mail").glob(f"{report['run_id']}-*.eml")
    mail = message_from_bytes(saved.read_bytes(), policy=email_policy)
    assert (mail["Subject"], mail["To"]) == ("Harbour ferry: today's sailings",
                                             "skipper@example.org")
    body = mail.get_content().replace("\r\n", "\n")  # as sent: SMTP lines end CRLF
    assert body.startswith("You asked: harbour ferry sailings today\n")
    assert page in body and "The first ferry sails at 07:40" in body
    assert f"subject \"Harbour ferry: today's sailings\", saved as {saved}" in agent_mode.stderr
    assert f"the run in the Prefect UI: {report['prefect_url']}" in agent_mode.stderr


def screenshot_artifacts(run_id: UUID) -> tuple[list[Any], Any]:
    """The markdown artifacts of flow run ``run_id`` (Prefect's API), and the task run of
    the first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> tuple[list[Any], Any]:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            shots = [a for a in found if a.type == "markdown"]
            task = await client.read_task_run(shots[0].task_run_id) if shots else None
        return shots, task

    # In a thread of its own: Playwright's sync API runs an event loop in this one.
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, read()).result()


def test_the_agent_mode_run_has_its_screenshot_as_an_artifact_in_prefect(
        agent_mode: AgentModeRun) -> None:
    report = agent_mode.report
    run_id = UUID(report["run_id"])
    shots, task_run = screenshot_artifacts(run_id)
    assert len(shots) == 1, shots
    [artifact] = shots
    page = report["steps"]["read_top"]["output"]["final_url"]
    assert artifact.description == f"read_top: screenshot of {page}"
    assert task_run is not None and task_run.name.startswith("read_top")
    assert task_run.flow_run_id == run_id
    data = str(artifact.data)
    assert f"[Harbour ferry: today's sailings]({page})" in data  # links the page
    assert f"`{agent_mode.ws / 'screenshots/read_top.png'}`" in data  # names the file
    image = data.split("](data:image/jpeg;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(image).startswith(b"\xff\xd8\xff")  # embeds the page as a JPEG
    assert report["prefect_url"].endswith(f"/runs/flow-run/{run_id}")


def test_the_prefect_ui_shows_the_agent_mode_screenshot(agent_mode: AgentModeRun,
                                                        page: Page) -> None:
    """The artifact's page in the Prefect UI, in Chromium: the image is drawn. With
    ``PLANRUN_SCREENSHOTS=1`` it also refreshes ``docs/prefect-ui-agent-tools.png``."""
    [artifact], _ = screenshot_artifacts(UUID(agent_mode.report["run_id"]))
    ui = agent_mode.report["prefect_url"].split("/runs/flow-run/")[0]
    page.set_viewport_size({"width": 1280, "height": 860})
    page.goto(f"{ui}/artifacts/artifact/{artifact.id}")
    image = page.get_by_role("img", name="the page as the step saw it")
    expect(image).to_be_visible(timeout=60_000)
    expect(page.get_by_role("link", name="Harbour ferry: today's sailings")).to_be_visible()
    expect(page.get_by_text("In the workspace:")).to_be_visible()
    drawn = wait_for(lambda: image.evaluate("i => i.complete && i.naturalWidth"), 30,
                     "the screenshot to be decoded")
    assert drawn == 1280  # the step's viewport, as the browser drew it
    if os.environ.get("PLANRUN_SCREENSHOTS") == "1":
        page.screenshot(path=str(ROOT / "docs" / "prefect-ui-agent-tools.png"))
