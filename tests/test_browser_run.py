"""browser.open end to end: ``planrun run`` of the example plan against a page served on
127.0.0.1, its report, its screenshot and the artifact in Prefect (docs/browser.md)."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from planrun.adapters.browser import chromium_path
from tests.helpers import ROOT, cli_json

EXAMPLE = ROOT / "examples" / "browser"
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(chromium_path() is None,
                                reason="no Chromium: `scripts/install` installs Debian's chromium")


class LoggedSite(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[str]


class Handler(SimpleHTTPRequestHandler):
    server: LoggedSite

    def log_message(self, format: str, *args: Any) -> None:
        self.server.requests.append(self.path)


@pytest.fixture
def site() -> Iterator[str]:
    handler = functools.partial(Handler, directory=str(EXAMPLE / "site"))
    server = LoggedSite(("127.0.0.1", 0), handler)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_planrun_run_opens_the_page_and_keeps_its_text_and_screenshot(
        site: str, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    code, report = cli_json("run", str(EXAMPLE / "plan.yaml"), "--input", f"url={site}",
                            env={"PLANRUN_WORKSPACE": str(ws)}, timeout=240)
    assert (code, report["status"]) == (0, "completed"), report
    step = report["steps"]["open_page"]
    out = step["output"]
    assert (out["title"], out["status"], out["final_url"]) == ("Harbour weather", 200, site)
    assert "the ferry sails at 07:40" in out["text"]  # added by the page's script: waited for
    assert out["screenshot"] == "screenshots/open_page.png"
    assert (ws / "screenshots/open_page.png").read_bytes().startswith(PNG)
    assert step["resources"]["peak_memory_bytes"] > 20 * 1024 * 1024
    assert step["resources"]["written_bytes"] == (ws / "screenshots/open_page.png").stat().st_size
    assert (ws / "browser-demo/page.md").read_text().startswith("# Harbour weather\n")

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def markdown() -> list[Any]:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(report["run_id"])])))
        return [a for a in found if a.type == "markdown"]

    [artifact] = asyncio.run(markdown())
    assert "screenshots/open_page.png" in str(artifact.data)
    assert "Harbour weather" in str(artifact.data)
    assert "](data:image/jpeg;base64," in str(artifact.data)  # the image the UI shows


def test_a_selector_that_never_appears_fails_the_run_naming_it(site: str,
                                                               tmp_path: Path) -> None:
    plan = tmp_path / "missing.yaml"
    plan.write_text(f"""
version: 1
name: browser-missing
steps:
  - id: look
    tool: browser.open
    with: {{url: "{site}", wait_for: "#no-such-thing", wait_timeout: 1}}
""")
    code, report = cli_json("run", str(plan), env={"PLANRUN_WORKSPACE": str(tmp_path / "ws")},
                            timeout=240)
    step = report["steps"]["look"]
    assert (code, report["status"], step["attempts"]) == (1, "failed", 1), report
    assert step["error"]["category"] == "logic"
    assert "'#no-such-thing'" in step["error"]["message"]
    assert not (tmp_path / "ws/screenshots/look.png").exists()
