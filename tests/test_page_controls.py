"""The live page's controls on the real stack (``planrun up``: Prefect server, runner,
bridge), driven in Chromium as a person would: Approve and Reject at a gate, Pause, Resume
and Cancel, each button disabled with its reason while the run's state does not allow it,
and what happens said on the page and in its ARIA live region.

``scripts/screenshot-live-page`` runs :func:`test_approve_at_a_waiting_gate_and_the_run_completes`
with ``$PLANRUN_LIVE_PAGE_PNG`` set, to refresh ``docs/live-page-gate.png``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser, BrowserContext, Expect, Locator, Page

from tests.helpers import wait_for
from tests.stack import Stack
from tests.test_control import held, hold, lines, release, submit, wait_status

#: This module's own ``expect`` (``set_options`` would change every module's): a run's
#: process starts, suspends and resumes in seconds, more under load.
expect = Expect()
expect.set_options(timeout=60_000)

SCREENSHOT_ENV = "PLANRUN_LIVE_PAGE_PNG"  # docs/live-page-gate.png is saved beside it

#: A release whose third step asks first; 2 of 4 steps are done while it waits.
RELEASE = """version: 1
name: release-2-4
steps:
  - {id: build, name: Build the site, tool: shell.run, with: {argv: [sh, -c, "echo build >> release.txt"]}}
  - {id: check, name: Check the links, tool: shell.run, needs: [build], with: {argv: [sh, -c, "echo check >> release.txt"]}}
  - id: publish
    name: Publish to the website
    tool: shell.run
    needs: [check]
    approval: {prompt: "Publish release 2.4 to the website?"}
    with: {argv: [sh, -c, "echo publish >> release.txt"]}
  - {id: announce, name: Announce the release, tool: shell.run, needs: [publish], critical: false, with: {argv: [sh, -c, "echo announce >> release.txt"]}}
"""

GATED = """version: 1
name: gated
steps:
  - {id: prepare, tool: shell.run, with: {argv: [sh, -c, "echo prepare >> gated.txt"]}}
  - id: ship
    tool: shell.run
    needs: [prepare]
    approval: {prompt: "Ship it?"}
    with: {argv: [sh, -c, "echo ship >> gated.txt"]}
"""


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A viewer in Paris who reads English: the page's times are in their own zone."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US",
                                  timezone_id="Europe/Paris")
    yield context
    context.close()


def open_page(page: Page, stack: Stack, run_id: str) -> None:
    response = page.goto(f"{stack.url}/v1/runs/{quote(run_id, safe='')}/view"
                         f"?token={quote(stack.token)}")
    assert response is not None and response.status == 200
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")


def button(page: Page, name: str) -> Locator:
    return page.get_by_role("button", name=name, exact=True)


def status(page: Page) -> Locator:
    return page.locator("#run-status")


def box(page: Page, step_id: str) -> Locator:
    return page.locator(f'[data-step="{step_id}"]')


def fill_share(page: Page) -> float:
    """How much of the progress bar its fill covers, as drawn now (0..1)."""
    share: float = page.evaluate("""() => {
        const bar = document.querySelector('.bar').getBoundingClientRect();
        return document.querySelector('.bar .fill').getBoundingClientRect().width / bar.width;
    }""")
    return share


def paris_time(iso: str, page: Page) -> str:
    """``iso`` as the page's viewer reads a time: "5:15 PM", in their zone and locale."""
    text: str = page.evaluate("""(iso) => new Date(Date.parse(iso)).toLocaleTimeString(
        [], {hour: 'numeric', minute: '2-digit'})""", iso)
    return text


def test_approve_at_a_waiting_gate_and_the_run_completes(stack: Stack, page: Page,
                                                         tmp_path: Path) -> None:
    run_id = submit(stack, tmp_path, RELEASE)
    open_page(page, stack, run_id)
    expect(status(page)).to_have_text("awaiting approval")
    gate = page.locator("#gate")
    expect(gate).to_be_visible()
    expect(gate).to_contain_text("Waiting for your approval: Publish to the website")
    expect(page.locator("#gate-prompt")).to_have_text("Publish release 2.4 to the website?")
    expect(page.locator("#announcer")).to_have_text(
        "Waiting for your approval of Publish to the website: "
        "Publish release 2.4 to the website?")

    # Waiting looks like waiting: since when, in the viewer's time; the bar at its percentage.
    asked = stack.report(run_id)["estimate"]["waiting_since"]  # the report says the same
    assert asked is not None
    expect(page.locator("#estimate-left")).to_have_text(
        f"waiting for your approval since {paris_time(asked, page)}")
    expect(page.locator("#estimate")).not_to_contain_text("done around")
    expect(page.locator("#progress-text")).to_have_text("2 of 4 steps · 50 %")
    assert fill_share(page) == pytest.approx(0.5, abs=0.01)
    expect(page.locator(".bar")).to_have_attribute("aria-valuenow", "50")

    # What cannot be done now is disabled, with the reason on hover.
    for name, why in (("Pause", "the run waits for an approval: approve or reject the step"),
                      ("Resume", "the run waits for an approval: approve or reject the step"),
                      ("Retry", "only a run that has ended can be retried")):
        expect(button(page, name)).to_be_disabled()
        expect(button(page, name)).to_have_attribute("title", f"Not now: {why}")
    expect(button(page, "Cancel run")).to_be_enabled()
    for path in [tmp_path / "live-page-gate.png", *_wanted("live-page-gate")]:
        page.screenshot(path=path, animations="disabled")

    # By keyboard: from the comment field, Tab reaches Approve, with a visible focus ring.
    page.locator("#gate-comment").fill("links checked")
    page.locator("#gate-comment").press("Tab")
    approve = button(page, "Approve")
    expect(approve).to_be_focused()
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    expect(page.locator("#control-result")).to_have_text(
        "Approved Publish to the website: the run goes on.")
    expect(page.locator("#control-result")).to_have_attribute("data-kind", "ok")
    expect(page.locator("#control-result")).to_be_focused()  # not lost to the page's top

    expect(status(page)).to_have_text("completed")
    expect(page.locator("#gate")).to_be_hidden()
    expect(page.locator("#announcer")).to_have_text("The run completed.")
    expect(page.locator("#estimate-left")).to_contain_text("finished in")
    expect(page.locator("#progress-text")).to_have_text("4 of 4 steps · 100 %")
    assert fill_share(page) == pytest.approx(1.0, abs=0.01)
    assert stack.report(run_id)["steps"]["publish"]["status"] == "completed"
    assert lines(stack, "release") == ["build", "check", "publish", "announce"]
    for name in ("Pause", "Resume", "Cancel run"):
        expect(button(page, name)).to_have_attribute("title",
                                                     "Not now: the run has ended (completed)")
    expect(button(page, "Retry")).to_have_attribute(
        "title", "Not now: the run completed: there is nothing to retry")


def test_reject_with_a_comment_and_the_comment_is_the_steps_reason(stack: Stack, page: Page,
                                                                  tmp_path: Path) -> None:
    run_id = submit(stack, tmp_path, GATED)
    open_page(page, stack, run_id)
    expect(page.locator("#gate-prompt")).to_have_text("Ship it?")
    page.locator("#gate-comment").fill("not on a Friday")
    button(page, "Reject").click()
    expect(page.locator("#control-result")).to_have_text("Rejected ship: the step will be skipped.")
    expect(status(page)).to_have_text("completed with errors")
    expect(box(page, "ship")).to_have_attribute("data-status", "skipped")
    expect(box(page, "ship").locator('[data-field="note"]')).to_have_text(
        "skipped: rejected: not on a Friday")
    final = wait_status(stack, run_id, "completed_with_errors")
    assert (final["steps"]["ship"]["status"], final["steps"]["ship"]["reason"]) == (
        "skipped", "rejected: not on a Friday")
    assert lines(stack, "gated") == ["prepare"]
    expect(button(page, "Retry")).to_be_enabled()  # a skipped step can run again


def test_pause_then_resume_then_cancel_from_the_page(stack: Stack, page: Page,
                                                     tmp_path: Path) -> None:
    run_id = submit(stack, tmp_path, held("steered", 3))
    open_page(page, stack, run_id)
    expect(box(page, "s1")).to_have_attribute("data-status", "running")
    expect(button(page, "Resume")).to_have_attribute("title", "Not now: the run is not paused")

    button(page, "Pause").click()
    expect(page.locator("#control-result")).to_have_text(
        "Pause asked: the steps that are running finish, then the run pauses.")
    expect(button(page, "Pause")).to_be_disabled()  # asked once: until the run pauses
    expect(button(page, "Pause")).to_have_attribute(
        "title", "Not now: pause asked: the steps that are running finish first")
    release(stack, "steered")  # s1 may end now; nothing new starts
    expect(status(page)).to_have_text("paused")
    expect(page.locator("#announcer")).to_have_text("The run is paused: paused by a person")
    expect(page.locator("#estimate-left")).to_contain_text("paused since ")
    expect(box(page, "s2")).to_have_attribute("data-status", "pending")
    expect(button(page, "Pause")).to_have_attribute("title", "Not now: the run is paused already")
    assert wait_status(stack, run_id, "paused")["steps"]["s1"]["status"] == "completed"

    hold(stack, "steered")  # s2 will hold until released again
    button(page, "Resume").click()
    expect(page.locator("#control-result")).to_have_text(
        "Resume asked: the run goes on in a moment.")
    expect(status(page)).to_have_text("running")
    expect(page.locator("#announcer")).to_have_text("The run goes on: 1 finished step(s) kept")
    expect(box(page, "s2")).to_have_attribute("data-status", "running")
    expect(page.locator("#estimate-left")).to_contain_text("left")  # counting down again

    button(page, "Cancel run").click()
    expect(page.locator("#control-result")).to_have_text(
        "Cancel asked: running commands are stopped and the run's file changes rolled back.")
    expect(status(page)).to_have_text("cancelled")
    expect(page.locator("#announcer")).to_have_text("The run was cancelled: cancelled by a person")
    expect(box(page, "s2")).to_have_attribute("data-status", "cancelled")
    for name in ("Pause", "Resume", "Cancel run"):
        expect(button(page, name)).to_be_disabled()
        expect(button(page, name)).to_have_attribute("title",
                                                     "Not now: the run has ended (cancelled)")
    expect(button(page, "Retry")).to_be_enabled()
    assert lines(stack, "steered") == ["s1", "s2"]


def test_an_answer_the_bridge_refuses_shows_its_reason(stack: Stack, page: Page,
                                                     tmp_path: Path) -> None:
    """Prefect's own API (what the Prefect UI's "change state" calls) replaces the gate's
    suspension behind the stream's back: the page still offers the gate, the bridge answers
    409, and the page shows its reason instead of pretending."""
    import asyncio
    from collections.abc import Callable, Coroutine
    from concurrent.futures import ThreadPoolExecutor
    from typing import Any
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Suspended

    async def suspended_at_the_gate() -> bool:
        async with get_client() as client:
            state = (await client.read_flow_run(UUID(run_id))).state
        key = state.state_details.pause_key if state is not None else None
        return state is not None and state.name == "Suspended" and bool(key) and \
            str(key).startswith("approval-")

    async def tamper() -> None:
        async with get_client() as client:
            await client.set_flow_run_state(UUID(run_id), Suspended(pause_key="someone-else"),
                                            force=True)

    def run(call: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """``call()`` on a loop of its own: Playwright's runs in this thread."""
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(asyncio.run, call()).result()

    run_id = submit(stack, tmp_path, GATED.replace("gated", "tampered"))
    open_page(page, stack, run_id)
    expect(page.locator("#gate-prompt")).to_have_text("Ship it?")
    wait_for(lambda: run(suspended_at_the_gate), 60, "the run to suspend at its gate")
    run(tamper)

    button(page, "Approve").click()
    result = page.locator("#control-result")
    expect(result).to_have_text(f"Could not approve (409): run {run_id} is not waiting for an "
                                "approval of ship (it is suspended)")
    expect(result).to_have_attribute("data-kind", "error")
    expect(button(page, "Approve")).to_be_enabled()  # refused: it may be tried again
    assert "Traceback" not in page.content()

    button(page, "Cancel run").click()  # a suspended run is resumed to be cancelled
    expect(status(page)).to_have_text("cancelled")
    assert lines(stack, "tampered") == ["prepare"]


def test_retry_runs_the_failed_step_again_once_its_service_has_recovered(
        stack: Stack, page: Page, tmp_path: Path) -> None:
    run_id = submit(stack, tmp_path, """version: 1
name: retried
steps:
  - {id: first, tool: shell.run, with: {argv: [sh, -c, "echo first >> retried.txt"]}}
  - id: flaky
    tool: shell.run
    needs: [first]
    retry: {max_attempts: 1}
    with: {argv: [sh, -c, "echo flaky >> retried.txt; test -e retried.ok"]}
  - {id: after, tool: shell.run, needs: [flaky], with: {argv: [sh, -c, "echo after >> retried.txt"]}}
""")
    open_page(page, stack, run_id)
    expect(status(page)).to_have_text("failed")
    expect(box(page, "after")).to_have_attribute("data-status", "skipped")
    (Path(stack.env["PLANRUN_WORKSPACE"]) / "retried.ok").touch()  # the service recovered

    button(page, "Retry").click()
    expect(page.locator("#control-result")).to_have_text(
        "Retry started: flaky, after will run again.")
    expect(status(page)).to_have_text("completed")
    expect(page.locator("#announcer")).to_have_text("The run completed.")
    expect(box(page, "flaky")).to_have_attribute("data-status", "completed")
    assert lines(stack, "retried") == ["first", "flaky", "flaky", "after"]
    expect(button(page, "Retry")).to_have_attribute(
        "title", "Not now: the run completed: there is nothing to retry")


def _wanted(name: str) -> list[Path]:
    """``name``.png beside $PLANRUN_LIVE_PAGE_PNG, if it is set."""
    wanted = os.environ.get(SCREENSHOT_ENV)
    return [Path(wanted).with_name(f"{name}.png")] if wanted else []
