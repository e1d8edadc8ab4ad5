"""A gate in the Prefect UI (docs/prefect-ui.md): the run's log says what is asked and how
to answer, and the form behind Resume shows the prompt and a decision that must be chosen,
so Resume → Submit cannot reject by accident. Clicked through in a real browser against a
real stack (its runner starts the run again once answered). With ``PLANRUN_SCREENSHOTS=1``
the test also refreshes ``docs/prefect-ui-gate-form.png``.
"""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path
from typing import Any
from uuid import UUID

from playwright.sync_api import Page, expect

from planrun.contract.control import is_asking_of
from tests.helpers import ROOT, wait_for
from tests.stack import Stack

SCREENSHOT = ROOT / "docs" / "prefect-ui-gate-form.png"
PLAN = """
    version: 1
    name: ui-gate
    steps:
      - {id: prepare, tool: core.echo, with: {value: 1}}
      - id: ship
        tool: core.echo
        needs: [prepare]
        approval: {prompt: "Ship version 2 to production?"}
        with: {value: shipped}
    """


def flow_run(run_id: str) -> Any:
    """The flow run from Prefect's API (a sync client: Playwright's loop runs here)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(run_id))


def asked(run_id: str) -> bool:
    """Whether the run is suspended at the gate of ``ship``, waiting for its form."""
    state = flow_run(run_id).state
    return state is not None and state.type.value == "PAUSED" and \
        bool(state.state_details.run_input_keyset) and \
        is_asking_of(state.state_details.pause_key, "ship")


def logs(run_id: str) -> list[tuple[int, str]]:
    """The flow run's own log lines in the Prefect UI (not its task runs'): (level,
    message)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)])))
    return [(line.level, line.message) for line in found if line.task_run_id is None]


def test_a_gate_says_in_the_runs_log_what_is_asked_and_its_form_needs_a_decision(
        stack: Stack, prefect_ui_page: Page, tmp_path: Path) -> None:
    page = prefect_ui_page
    plan = tmp_path / "ui-gate.yaml"
    plan.write_text(textwrap.dedent(PLAN))
    submitted = stack.cli("submit", str(plan))
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    wait_for(lambda: asked(run_id), 90, "the run to be suspended at the gate")

    # The run's log: what is asked and how to answer, and the suspension is no error.
    ended = wait_for(lambda: [m for _, m in logs(run_id) if "Finished in state" in m], 30,
                     "the run's process to log its end")
    lines = logs(run_id)
    asking = [(level, m) for level, m in lines if m.startswith("Waiting for approval")]
    assert len(asking) == 1 and asking[0][0] == logging.INFO, lines
    text = asking[0][1]
    assert "step 'ship': Ship version 2 to production?" in text
    assert "Resume" in text and f"planrun approve {run_id} ship " in text and "--reject" in text
    assert text.endswith(f"{stack.url}/v1/runs/{run_id}/view")  # nothing glued to the link
    assert all(level == logging.INFO for level, m in lines if "Finished in state" in m), lines
    assert "the run waits" in ended[0], lines

    # The form behind Resume: the prompt, and a decision with no default.
    report = stack.report(run_id)
    page.set_viewport_size({"width": 1280, "height": 1100})  # the log line below the form
    page.goto(report["prefect_url"])
    page.get_by_role("button", name="Resume").click()
    form = page.get_by_role("dialog")
    expect(form).to_contain_text("Ship version 2 to production?")
    expect(form).to_contain_text("Decision")
    form.get_by_role("button", name="Submit").click()
    expect(form).to_contain_text("required")  # refused: nothing was chosen
    assert asked(run_id)  # still waiting
    form.get_by_role("button", name="Close").click()  # a fresh form: no error left over
    expect(form).to_be_hidden()
    page.get_by_role("button", name="Resume").click()
    expect(form).not_to_contain_text("required")

    # In headless Chromium a mouse click on Prefect's select inside the modal leaves its
    # list closed; the keyboard opens it (as a person without a mouse would), then the
    # option is clicked.
    form.locator(".p-select-button__control").focus()
    page.keyboard.press("Space")
    page.get_by_role("option", name="approve", exact=True).click()
    expect(form.locator(".p-select-button__value")).to_have_text("approve")
    form.locator("textarea").fill("checked the release notes")
    if os.environ.get("PLANRUN_SCREENSHOTS") == "1":
        page.screenshot(path=str(SCREENSHOT))
    resumes: list[str] = []  # what the UI's resume request got, for a failure's message
    page.on("response", lambda r: resumes.append(f"{r.request.method} {r.url} {r.status}")
            if "/resume" in r.url else None)
    for _ in range(3):  # a 503 is SQLite refusing a raced write: submit again, as a person
        with page.expect_response(lambda r: "/resume" in r.url, timeout=60_000) as answer:
            form.get_by_role("button", name="Submit").click()
        if answer.value.status != 503:  # (docs/prefect-ui.md, "Submit again")
            break
    try:
        expect(form).to_be_hidden(timeout=60_000)  # taken: the form closes
        final = wait_for(lambda: (r := stack.report(run_id))["status"] == "completed" and r, 90,
                         "the approved run to complete")
    except AssertionError as error:  # what the run was doing, for whoever reads the failure
        shown = form.inner_text() if form.is_visible() else "(closed)"
        raise AssertionError(f"{error}: the form shows {shown!r}, the UI's resume requests "
                             f"{resumes}, Prefect says {flow_run(run_id).state!r}, the bridge "
                             f"{stack.report(run_id)}") from None
    assert final["steps"]["ship"]["output"] == {"value": "shipped"}
