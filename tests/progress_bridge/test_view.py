"""The live page ``GET /v1/runs/{id}/view``: served over HTTP, and driven in headless
Chromium against a real bridge under uvicorn while messages are published to it.

The browser is Debian's ``/usr/bin/chromium`` (``scripts/install --test`` installs it);
without it the browser tests are skipped. ``scripts/screenshot-live-page`` runs
:func:`test_a_mid_run_page_for_a_person` to refresh ``docs/live-page.png``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, expect

from planrun.contract.records import Resources
from planrun.contract.stream import (
    Draft,
    ErrorInfo,
    Estimate,
    Impact,
    Message,
    PlanStep,
    Progress,
)
from planrun.contract.times import iso
from planrun.progress_bridge.view import render

from .conftest import BridgeFactory, ServedBridge

SCREENSHOT_ENV = "PLANRUN_LIVE_PAGE_PNG"  # where test_a_mid_run_page_for_a_person saves one
HOSTILE = '<img src=x onerror="window.pwned=1">'

expect.set_options(timeout=10_000)


DIAMOND = (
    PlanStep(id="fetch", tool="http.request", name="Fetch prices", estimate_s=2.0),
    PlanStep(id="parse", tool="core.echo", needs=("fetch",)),
    PlanStep(id="notify", tool="shell.run", needs=("fetch",), critical=False),
    PlanStep(id="report", tool="file.write", needs=("parse", "notify")),
)


def emit(bridge: ServedBridge, run_id: str, draft: Draft) -> Message:
    """Commit ``draft`` through the bridge's commit path; returns once it is stored and
    fanned out."""
    future = asyncio.run_coroutine_threadsafe(bridge.commit(run_id, draft), bridge.loop)
    return future.result(10)


def step(type_: str, step_id: str, attempt: int = 1, **fields: Any) -> Draft:
    """A step message whose status is the type's last word."""
    return Draft(type=type_, step_id=step_id, status=type_.removeprefix("step."),
                 attempt=attempt, **fields)


def box(page: Page, step_id: str) -> Locator:
    return page.locator(f'[data-step="{step_id}"]')


def field(page: Page, step_id: str, name: str) -> Locator:
    return page.locator(f'[data-step="{step_id}"] [data-field="{name}"]')


def open_view(page: Page, bridge: ServedBridge, run_id: str, token: str | None = None) -> None:
    """Load the run's page (with the bridge's token unless ``token`` is given) and wait
    until its WebSocket is live."""
    query = f"?token={quote(token or bridge.token)}"
    response = page.goto(f"{bridge.http}/v1/runs/{quote(run_id, safe='')}/view{query}")
    assert response is not None and response.status == 200
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")


# ---- served over HTTP ---------------------------------------------------------------------

def test_the_page_is_html_with_the_run_id_escaped_and_a_nonce_policy(bridge: ServedBridge) -> None:
    run_id = '"><script>alert(1)'
    response = httpx.get(f"{bridge.http}/v1/runs/{quote(run_id, safe='')}/view", timeout=10,
                         headers=bridge.auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '"><script>alert' not in response.text
    assert 'data-run-id="&quot;\\&quot;&gt;&lt;script&gt;alert(1)&quot;"' in response.text
    nonce = re.search(r"script-src 'nonce-([^']+)'", response.headers["content-security-policy"])
    assert nonce is not None
    assert response.text.count(f'nonce="{nonce[1]}"') == 2  # the page's <style> and <script>
    assert response.headers["referrer-policy"] == "no-referrer"


def test_a_run_id_that_looks_like_a_slot_is_not_filled() -> None:
    page = render("__NONCE__", "n0nce")
    assert 'data-run-id="&quot;__NONCE__&quot;"' in page
    assert "__RUN_ID__" not in page


def test_the_page_needs_the_token(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(token="s3cret")
    url = f"{bridge.http}/v1/runs/r/view"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, params={"token": "wrong"}, timeout=10).status_code == 401
    assert httpx.get(url, params={"token": "s3cret"}, timeout=10).status_code == 200
    bearer = {"Authorization": "Bearer s3cret"}
    assert httpx.get(url, headers=bearer, timeout=10).status_code == 200


# ---- in a browser -------------------------------------------------------------------------

def test_the_page_follows_a_run_step_by_step(bridge: ServedBridge, page: Page) -> None:
    open_view(page, bridge, "r1")
    expect(page.locator("#run-status")).to_have_text("waiting for the run to start")

    emit(bridge, "r1", Draft(type="run.started", plan=DIAMOND, progress=Progress.of(0, 4),
                             estimate=Estimate(remaining_s=12.0, low_s=9.0, high_s=18.0)))
    expect(page.locator("[data-step]")).to_have_count(4)
    for step_id, depth in (("fetch", "1"), ("parse", "2"), ("notify", "2"), ("report", "3")):
        expect(box(page, step_id)).to_have_attribute("data-status", "pending")
        expect(box(page, step_id)).to_have_attribute("data-depth", depth)
    expect(page.locator("#edges path")).to_have_count(4)
    expect(page.locator("#run-status")).to_have_attribute("data-status", "running")
    expect(page.locator("#progress")).to_have_text("0 of 4 steps · 0 %")
    expect(page.locator("#estimate")).to_contain_text("about 12 s left (9–18 s)")
    expect(box(page, "fetch")).to_contain_text("Fetch prices")
    expect(field(page, "fetch", "time")).to_have_text("est. 2 s")

    emit(bridge, "r1", step("step.running", "fetch"))
    expect(box(page, "fetch")).to_have_attribute("data-status", "running")
    expect(field(page, "fetch", "status")).to_have_text("running")

    emit(bridge, "r1", step("step.completed", "fetch", duration_s=1.23, summary="5 prices",
                            progress=Progress.of(1, 4), estimate=Estimate(remaining_s=8.0, low_s=6.0, high_s=11.0)))
    expect(box(page, "fetch")).to_have_attribute("data-status", "completed")
    expect(field(page, "fetch", "summary")).to_have_text("5 prices")
    expect(field(page, "fetch", "time")).to_have_text("took 1.2 s")
    expect(page.locator("#progress")).to_have_text("1 of 4 steps · 25 %")
    expect(page.locator("#estimate")).to_contain_text("about 8 s left (6–11 s)")
    expect(page.locator('#edges path[data-from="fetch"][data-status="completed"]')).to_have_count(2)

    emit(bridge, "r1", step("step.running", "parse"))
    emit(bridge, "r1", step("step.running", "notify"))
    emit(bridge, "r1", Draft(type="progress", progress=Progress.of(1, 4),
                             estimate=Estimate(remaining_s=75.0, low_s=50.0, high_s=130.0)))
    expect(page.locator("#estimate")).to_contain_text("about 1 min 15 s left (50 s – 2 min 10 s)")
    emit(bridge, "r1", step("step.retrying", "notify", duration_s=0.4,
                            error=ErrorInfo(category="transient", message="exit status 75", hint=None)))
    expect(box(page, "notify")).to_have_attribute("data-status", "retrying")
    expect(field(page, "notify", "note")).to_have_text("will try again")
    emit(bridge, "r1", step("step.running", "notify", attempt=2))
    expect(box(page, "notify")).to_have_attribute("data-attempt", "2")
    expect(field(page, "notify", "error")).to_be_hidden()

    emit(bridge, "r1", step(
        "step.failed", "notify", attempt=2, duration_s=0.5, progress=Progress.of(2, 4),
        error=ErrorInfo(category="configuration", message="mail: command not found", hint="Install mailutils."),
        impact=Impact(skipped=("report",), run_fails=False)))
    expect(box(page, "notify")).to_have_attribute("data-status", "failed")
    expect(field(page, "notify", "category")).to_have_text("configuration")
    expect(field(page, "notify", "message")).to_have_text("mail: command not found")
    expect(field(page, "notify", "hint")).to_be_visible()
    expect(field(page, "notify", "hint")).to_have_text("Install mailutils.")
    expect(field(page, "notify", "attempt")).to_have_text("attempt 2")
    expect(field(page, "notify", "note")).to_have_text("skips report · the run goes on")
    expect(field(page, "report", "note")).to_have_text("will be skipped: notify failed")

    emit(bridge, "r1", step("step.completed", "parse", progress=Progress.of(3, 4)))
    emit(bridge, "r1", step("step.skipped", "report", attempt=0, progress=Progress.of(4, 4)))
    expect(box(page, "report")).to_have_attribute("data-status", "skipped")
    expect(field(page, "report", "note")).to_have_text("skipped: notify failed")
    expect(page.locator("#progress")).to_have_text("4 of 4 steps · 100 %")

    last = emit(bridge, "r1", Draft(type="run.completed_with_errors", status="completed_with_errors",
                                    progress=Progress.of(4, 4),
                                    estimate=Estimate(remaining_s=0.0, low_s=0.0, high_s=0.0, early_by_s=3.0)))
    expect(page.locator("#run-status")).to_have_text("completed with errors")
    expect(page.locator("#estimate")).to_contain_text("finished in")
    expect(page.locator("#estimate")).to_contain_text("3 s earlier than first estimated")
    expect(page.locator("body")).to_have_attribute("data-applied", str(last.seq))
    expect(page.locator("body")).to_have_attribute("data-ignored", "0")


def test_skipped_and_cancelled_steps_show_why(bridge: ServedBridge, page: Page) -> None:
    open_view(page, bridge, "r2")
    emit(bridge, "r2", Draft(type="run.started", plan=DIAMOND))
    emit(bridge, "r2", step("step.skipped", "parse", attempt=0,
                            summary="when: inputs.parse was false"))
    expect(field(page, "parse", "note")).to_have_text("skipped: when: inputs.parse was false")
    expect(field(page, "parse", "summary")).to_be_hidden()
    # docs/stream.md: there is no step.cancelled; the status field says it.
    emit(bridge, "r2", Draft(type="step.failed", step_id="fetch", status="cancelled",
                             summary="the run was cancelled"))
    expect(box(page, "fetch")).to_have_attribute("data-status", "cancelled")
    expect(field(page, "fetch", "note")).to_have_text("cancelled: the run was cancelled")
    emit(bridge, "r2", Draft(type="run.cancelled", status="cancelled",
                             summary="cancelled by the user"))
    expect(page.locator("#run-status")).to_have_text("cancelled")
    expect(page.locator("#run-note")).to_have_text("cancelled by the user")
    expect(page.locator("#estimate")).to_contain_text("cancelled after")


def test_a_page_opened_late_replays_the_run(bridge: ServedBridge, page: Page) -> None:
    emit(bridge, "r4", Draft(type="run.started", plan=DIAMOND[:2], progress=Progress.of(0, 2)))
    emit(bridge, "r4", step("step.completed", "fetch", progress=Progress.of(1, 2)))
    emit(bridge, "r4", step("step.completed", "parse", progress=Progress.of(2, 2)))
    last = emit(bridge, "r4", Draft(type="run.completed", status="completed",
                                    progress=Progress.of(2, 2)))
    open_view(page, bridge, "r4")
    expect(page.locator("#run-status")).to_have_text("completed")
    expect(page.locator('[data-step][data-status="completed"]')).to_have_count(2)
    expect(page.locator("#progress")).to_have_text("2 of 2 steps · 100 %")
    expect(page.locator("body")).to_have_attribute("data-applied", str(last.seq))


def test_the_page_reconnects_and_catches_up_without_duplicates(
        bridge: ServedBridge, context: BrowserContext, page: Page) -> None:
    open_view(page, bridge, "r3")
    emit(bridge, "r3", Draft(type="run.started", plan=DIAMOND, progress=Progress.of(0, 4)))
    emit(bridge, "r3", step("step.running", "fetch"))
    expect(box(page, "fetch")).to_have_attribute("data-status", "running")

    # Offline, the page's reconnects fail, so what follows is surely sent while it is away.
    context.set_offline(True)
    bridge.loop.call_soon_threadsafe(bridge.hub.close_all, "cut off by the test")
    expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
    expect(page.locator("#connection")).to_have_text("reconnecting…")
    emit(bridge, "r3", step("step.completed", "fetch", progress=Progress.of(1, 4)))
    emit(bridge, "r3", step("step.running", "parse"))
    emit(bridge, "r3", step("step.retrying", "parse", error=ErrorInfo(category="transient", message="503")))
    emit(bridge, "r3", step("step.running", "parse", attempt=2))

    context.set_offline(False)
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=15_000)
    expect(page.locator("#connection")).to_have_text("live")
    expect(box(page, "fetch")).to_have_attribute("data-status", "completed")
    expect(box(page, "parse")).to_have_attribute("data-attempt", "2")
    expect(box(page, "parse")).to_have_attribute("data-status", "running")
    expect(page.locator("#progress")).to_have_text("1 of 4 steps · 25 %")
    body = page.locator("body")
    expect(body).to_have_attribute("data-connections", "2")
    expect(body).to_have_attribute("data-seq", "6")
    expect(body).to_have_attribute("data-applied", "6")
    expect(body).to_have_attribute("data-ignored", "0")

    emit(bridge, "r3", step("step.completed", "parse", attempt=2))
    expect(box(page, "parse")).to_have_attribute("data-status", "completed")
    expect(body).to_have_attribute("data-applied", "7")


def test_hostile_run_id_and_plan_text_are_shown_as_text(bridge: ServedBridge, page: Page) -> None:
    run_id = '"><img src=x onerror=window.pwned=1>'
    open_view(page, bridge, run_id)
    expect(page.locator("#run-id")).to_have_text(run_id)
    plan = (PlanStep(id="x", tool="core.echo", name=HOSTILE),
            PlanStep(id="<b>y</b>", tool="<i>tool</i>", needs=("x",)))
    emit(bridge, run_id, Draft(type="run.started", plan=plan))
    emit(bridge, run_id, step("step.failed", "x", summary="<script>window.pwned=2</script>",
                              error=ErrorInfo(category="logic", message=HOSTILE, hint=HOSTILE),
                              impact=Impact(skipped=("<b>y</b>",), run_fails=True)))
    expect(box(page, "x")).to_have_attribute("data-status", "failed")
    expect(box(page, "x").locator(".step-title")).to_have_text(HOSTILE)
    expect(field(page, "x", "summary")).to_have_text("<script>window.pwned=2</script>")
    expect(field(page, "x", "hint")).to_have_text(HOSTILE)
    expect(page.locator("[data-step]").nth(1)).to_contain_text("<b>y</b>")
    expect(page.locator("[data-step]").nth(1)).to_contain_text("<i>tool</i>")
    assert page.locator("img, b, i, [data-step] script").count() == 0
    assert page.evaluate("window.pwned") is None


def test_the_page_passes_its_token_to_the_socket(bridge_factory: BridgeFactory,
                                                       page: Page) -> None:
    bridge = bridge_factory(token="s3 cret&x")
    response = page.goto(f"{bridge.http}/v1/runs/r/view")
    assert response is not None and response.status == 401
    open_view(page, bridge, "r", token="s3 cret&x")
    emit(bridge, "r", Draft(type="run.started", plan=DIAMOND[:1]))
    expect(box(page, "fetch")).to_have_attribute("data-status", "pending")


def test_a_mid_run_page_for_a_person(bridge: ServedBridge, page: Page, tmp_path: Path) -> None:
    """A realistic run, half done; saved where $PLANRUN_LIVE_PAGE_PNG says, if set."""
    now = time.time()
    plan = (
        PlanStep(id="sources", tool="http.request", name="Fetch the source list", estimate_s=1.5),
        PlanStep(id="notes", tool="file.read", name="Read local notes", estimate_s=0.3),
        PlanStep(id="search", tool="http.request", name="Search each source", needs=("sources",),
                 estimate_s=4.0),
        PlanStep(id="summarize", tool="core.echo", name="Summarize findings",
                 needs=("search", "notes"), estimate_s=9.0),
        PlanStep(id="translate", tool="http.request", name="Translate the summary",
                 needs=("search",), critical=False, estimate_s=3.0),
        PlanStep(id="publish-fr", tool="file.write", name="Publish the French brief",
                 needs=("translate",), critical=False, estimate_s=0.2),
        PlanStep(id="report", tool="file.write", name="Write the brief", needs=("summarize",),
                 estimate_s=0.5),
        PlanStep(id="notify", tool="shell.run", name="Notify the team", needs=("report",),
                 critical=False, estimate_s=1.0),
    )
    messages = [
        Draft(type="run.started", plan=plan, progress=Progress.of(0, 8), summary="market-brief",
              estimate=Estimate(remaining_s=16.0, low_s=11.0, high_s=27.0), ts=_ago(now, 21)),
        step("step.completed", "sources", duration_s=1.4, summary="HTTP 200 · 12 sources",
             progress=Progress.of(1, 8)),
        step("step.completed", "notes", duration_s=0.2, summary="3 files, 14 KB",
             progress=Progress.of(2, 8)),
        step("step.completed", "search", duration_s=6.1, summary="12 responses, 41 results",
             progress=Progress.of(3, 8)),
        step("step.running", "summarize", ts=_ago(now, 7)),
        step("step.failed", "translate", attempt=3, duration_s=2.8,
             error=ErrorInfo(category="transient",
                             message="HTTP 503 from translate.example.org, 3 attempts",
                             hint="The service is down; the run goes on without a translation "
                             "(this step is not critical)."),
             impact=Impact(skipped=("publish-fr",), run_fails=False),
             progress=Progress.of(4, 8)),
        step("step.skipped", "publish-fr", attempt=0, summary="needs translate, which failed",
             progress=Progress.of(5, 8)),
        Draft(type="progress", progress=Progress.of(5, 8),
              estimate=Estimate(remaining_s=9.0, low_s=6.5, high_s=15.0, finish_at=iso(now + 9))),
    ]
    open_view(page, bridge, "7f3a9c2e")
    for message in messages:
        emit(bridge, "7f3a9c2e", message)
    expect(page.locator("body")).to_have_attribute("data-applied", str(len(messages)))
    expect(box(page, "summarize")).to_have_attribute("data-status", "running")
    expect(field(page, "translate", "hint")).to_be_visible()
    expect(box(page, "notify")).to_have_attribute("data-status", "pending")
    expect(page.locator("#progress")).to_have_text("5 of 8 steps · 62.5 %")
    expect(page.locator("#estimate")).to_contain_text("about 9 s left (6.5–15 s)")
    expect(page.locator("#edges path")).to_have_count(7)
    for path in [tmp_path / "live-page.png", *_wanted_screenshot()]:
        page.screenshot(path=path, animations="disabled")
    graph = page.locator("#graph .columns").bounding_box()
    assert graph is not None and graph["x"] + graph["width"] <= 1280, "the graph overflows"


def _ago(now: float, seconds: float) -> str:
    stamp = iso(now - seconds)
    assert stamp is not None
    return stamp


def _wanted_screenshot(name: str | None = None) -> list[Path]:
    """Where $PLANRUN_LIVE_PAGE_PNG says (another ``name`` beside it, for a second page)."""
    wanted = os.environ.get(SCREENSHOT_ENV)
    if not wanted:
        return []
    return [Path(wanted) if name is None else Path(wanted).with_name(f"{name}.png")]


def test_waits_breakers_and_resources_are_hints_a_person_reads(
        bridge: ServedBridge, page: Page, tmp_path: Path) -> None:
    """docs/stream.md: a waiting step's note under its box, a line per open breaker that
    goes when it closes, and what a finished step used; saved as guardrails.png."""
    plan = (
        PlanStep(id="sources", tool="http.request", name="Fetch the source list", estimate_s=1.5),
        PlanStep(id="search", tool="search.web", name="Search the web", needs=("sources",),
                 estimate_s=4.0),
        PlanStep(id="build", tool="shell.run", name="Build the charts", needs=("sources",),
                 estimate_s=3.0),
        PlanStep(id="report", tool="file.write", name="Write the brief",
                 needs=("search", "build"), estimate_s=0.5),
    )
    failing = ("search.web is failing in every run (5 in 60 s); the next try is at 14:02:10")
    messages = [
        Draft(type="run.started", plan=plan, progress=Progress.of(0, 4), summary="market-brief",
              estimate=Estimate(remaining_s=9.0, low_s=6.0, high_s=15.0)),
        step("step.completed", "sources", duration_s=1.4, summary="HTTP 200 · 12 sources",
             progress=Progress.of(1, 4),
             resources=Resources(peak_memory_bytes=44_040_192, cpu_s=0.3, written_bytes=12_288)),
        Draft(type="tool.circuit_opened", status="open", tool="search.web", note=failing),
        step("step.running", "search"),
        Draft(type="step.waiting", step_id="build", status="pending",
              note="waiting for a shell.run slot, 3 ahead"),
    ]
    open_view(page, bridge, "9c1d")
    for message in messages:
        emit(bridge, "9c1d", message)
    expect(page.locator("body")).to_have_attribute("data-applied", str(len(messages)))
    expect(field(page, "build", "wait")).to_have_text("waiting for a shell.run slot, 3 ahead")
    expect(box(page, "build")).to_have_attribute("data-status", "pending")
    expect(field(page, "sources", "resources")).to_have_text(  # no break inside a part
        "42\u00a0MiB\u00a0peak · 0.3\u00a0s\u00a0CPU · 12\u00a0KiB\u00a0written")
    breaker = page.locator('#breakers [data-breaker="search.web"]')
    expect(breaker).to_have_attribute("data-state", "open")
    expect(breaker).to_have_text(f"calls stopped{failing}")
    for path in [tmp_path / "guardrails.png", *_wanted_screenshot("guardrails")]:
        page.screenshot(path=path, animations="disabled")

    emit(bridge, "9c1d", Draft(type="tool.circuit_half_open", status="half_open",
                               tool="search.web", note="search.web: one trial call goes through"))
    expect(breaker).to_have_attribute("data-state", "half_open")
    emit(bridge, "9c1d", Draft(type="tool.circuit_closed", status="closed", tool="search.web",
                               note="search.web works again"))
    expect(page.locator("#breakers .breaker")).to_have_count(0)
    emit(bridge, "9c1d", step("step.running", "build"))
    expect(field(page, "build", "wait")).to_be_hidden()
    expect(field(page, "search", "resources")).to_be_hidden()  # nothing measured yet


def test_hostile_notes_and_tools_are_shown_as_text(bridge: ServedBridge, page: Page) -> None:
    open_view(page, bridge, "r5")
    emit(bridge, "r5", Draft(type="run.started", plan=DIAMOND))
    emit(bridge, "r5", Draft(type="step.waiting", step_id="parse", status="pending",
                             note=HOSTILE))
    emit(bridge, "r5", Draft(type="tool.circuit_opened", status="open", tool=HOSTILE,
                             note=f"<script>window.pwned=3</script>{HOSTILE}"))
    expect(field(page, "parse", "wait")).to_have_text(HOSTILE)
    expect(page.locator("#breakers .breaker")).to_contain_text(HOSTILE)
    assert page.locator("img, #breakers script").count() == 0
    assert page.evaluate("window.pwned") is None


def test_waiting_says_since_when_in_the_viewers_time_and_the_estimate_resumes_after(
        bridge: ServedBridge, browser: Browser) -> None:
    """At a gate: "waiting for your approval since 7:15 PM" (17:15 UTC, from Paris in June),
    the bar filled to its percentage; paused: "paused since …"; after, the time left."""
    context = browser.new_context(locale="en-US", timezone_id="Europe/Paris")
    page = context.new_page()
    try:
        plan = DIAMOND[:2]
        emit(bridge, "w1", Draft(type="run.started", plan=plan, progress=Progress.of(0, 2)))
        emit(bridge, "w1", step("step.completed", "fetch", progress=Progress.of(1, 2)))
        gate = "2026-06-01T17:15:00.000Z"
        waiting = Estimate(remaining_s=4.0, low_s=3.0, high_s=6.0, waiting_since=gate)
        emit(bridge, "w1", step("step.awaiting_approval", "parse", summary="Parse them?",
                                progress=Progress.of(1, 2), estimate=waiting, ts=gate))
        emit(bridge, "w1", Draft(type="run.awaiting_approval", status="awaiting_approval",
                                 step_id="parse", summary="Parse them?", ts=gate,
                                 progress=Progress.of(1, 2), estimate=waiting))
        open_view(page, bridge, "w1")  # opened late: the whole run replays at once
        expect(page.locator("#estimate")).to_have_text(
            "waiting for your approval since 7:15 PM · then about 4 s of work left (3–6 s)")
        expect(page.locator("#progress-text")).to_have_text("1 of 2 steps · 50 %")
        assert _fill_share(page) == pytest.approx(0.5, abs=0.01)  # at once, not 0.3 s later

        emit(bridge, "w1", Draft(type="run.resumed", status="running", progress=Progress.of(1, 2),
                                 estimate=Estimate(remaining_s=4.0, low_s=3.0, high_s=6.0)))
        expect(page.locator("#estimate-left")).to_have_text("about 4 s left (3–6 s)")
        paused = "2026-06-01T17:20:00.000Z"
        emit(bridge, "w1", Draft(type="run.paused", status="paused", ts=paused,
                                 summary="paused by a person", progress=Progress.of(1, 2),
                                 estimate=Estimate(remaining_s=4.0, low_s=3.0, high_s=6.0,
                                                   waiting_since=paused)))
        expect(page.locator("#estimate-left")).to_have_text("paused since 7:20 PM")
        emit(bridge, "w1", step("step.completed", "parse", progress=Progress.of(2, 2)))
        emit(bridge, "w1", Draft(type="run.completed", status="completed",
                                 progress=Progress.of(2, 2)))
        expect(page.locator("#estimate-left")).to_contain_text("finished in")
        assert _fill_share(page) == pytest.approx(1.0, abs=0.01)
    finally:
        context.close()


def _fill_share(page: Page) -> float:
    """How much of the progress bar its fill covers, as drawn now (0..1)."""
    share: float = page.evaluate("""() => {
        const bar = document.querySelector('.bar').getBoundingClientRect();
        return document.querySelector('.bar .fill').getBoundingClientRect().width / bar.width;
    }""")
    return share
