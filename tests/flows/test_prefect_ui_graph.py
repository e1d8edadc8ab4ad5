"""The Prefect UI draws a plan run as the plan's DAG (docs/prefect-ui.md): the flow run's
page in a real browser, against the test session's Prefect server, which serves the UI.

The graph is drawn on a canvas, so its edges are read where the page reads them: the
flow run's ``graph-v2`` from Prefect's API. With ``PLANRUN_SCREENSHOTS=1`` the test also
refreshes ``docs/prefect-ui-graph.png``.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.flows.test_prefect_visibility import DIAMOND, DIAMOND_NEEDS, graph_parents
from tests.helpers import ROOT, cli_json, wait_for

SCREENSHOT = ROOT / "docs" / "prefect-ui-graph.png"


def drawn(page: Page) -> bytes:
    """The run graph once it has stopped changing: two pictures of it in a row the same
    (it is laid out, then animated into place)."""
    graph = page.locator(".run-graph")
    last: list[bytes] = [b""]

    def still() -> bytes | None:
        picture = graph.screenshot()
        same = picture == last[0]
        last[0] = picture
        return picture if same else None

    picture: bytes = wait_for(still, 30, "the run graph to be drawn")
    return picture


def test_the_prefect_ui_draws_a_run_as_the_plans_dag(page: Page, tmp_path: Path) -> None:
    plan = tmp_path / "diamond.yaml"
    plan.write_text(textwrap.dedent(DIAMOND))
    code, report = cli_json("run", str(plan))
    assert code == 0, report
    run_id = report["run_id"]
    # The task runs reach Prefect's database through events, a moment after the run.
    parents, roots = wait_for(lambda: (found := graph_parents(run_id)) and
                              len(found[0]) == len(DIAMOND_NEEDS) and found, 30,
                              "the five task runs in the flow run's graph")
    assert parents == DIAMOND_NEEDS and roots == {"a"}

    page.set_viewport_size({"width": 1500, "height": 1100})
    with page.expect_response(lambda r: f"/flow_runs/{run_id}/graph-v2" in r.url) as graph:
        page.goto(report["prefect_url"])
    assert graph.value.ok
    options = page.get_by_role("button", name="Run Graph Options")
    options.click()
    page.get_by_label("Dependency grid").check()  # the DAG by its edges, not by time
    options.click()
    expect(page.get_by_label("Dependency grid")).to_be_hidden()
    drawn(page)
    if os.environ.get("PLANRUN_SCREENSHOTS") == "1":
        page.screenshot(path=str(SCREENSHOT))
