"""browser.open against real Chromium and real pages served on 127.0.0.1 (docs/browser.md)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from planrun.adapters.base import StepContext
from planrun.adapters.browser import BrowserOpen, SharedBrowser, chromium_path
from planrun.adapters.chromium import ProcessMeter
from planrun.errors import StepError
from planrun.policy import LevelPolicy, Trust, trusted_as

PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(chromium_path() is None,
                                reason="no Chromium: `scripts/install` installs Debian's chromium")

ARTICLE = """<!doctype html><html><head><title>Planrun test page</title></head><body>
<nav>Home | About</nav><article><h1>The quiet harbour</h1>
<p>The harbour was quiet that morning. Fishing boats rocked at their moorings while the
gulls argued over scraps on the pier, and the old lighthouse keeper counted the hulls.</p>
<p>By noon the wind had turned, and the first of the ferries came round the headland,
bringing the post, three crates of oranges and a schoolteacher from the mainland.</p>
</article><div id="late"></div></body></html>"""

PAGES = {
    "/": ARTICLE,
    "/throws": "<html><head><title>Throws</title></head><body><p>Content before the error "
               "is still here.</p><script>throw new Error('boom from the page')</script>"
               "</body></html>",
    "/never-settles": "<html><head><title>Busy</title></head><body><p>Always polling.</p>"
                      "<script>setInterval(() => fetch('/hang?' + Math.random()), 100)"
                      "</script></body></html>",
    "/hog": "<html><head><title>Hog</title></head><body><script>window.keep = [];"
            "for (let i = 0; i < 24; i++) { const a = new Float64Array(1 << 20); a.fill(i);"
            " window.keep.push(a) }</script><p>Heavy.</p></body></html>",
    "/late": "<html><head><title>Late</title></head><body><script>setTimeout(() => {"
             "const d = document.createElement('div'); d.id = 'ready'; d.textContent = "
             "'Ready now'; document.body.appendChild(d)}, 300)</script></body></html>",
}


class Site(ThreadingHTTPServer):
    """A local site: the pages above, a slow one, one that hangs, a redirect; every request
    it receives is logged."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[str] = []
        self.release = threading.Event()
        self.redirect_to = ""
        self.cookies = ""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Site

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        self.server.requests.append(self.path)
        path = self.path.split("?")[0]
        if path in ("/slow", "/hang"):
            self.server.release.wait(30)  # until the test is over
            return self._send(200, "<html><title>late</title></html>")
        if path == "/away":
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/embeds":
            return self._send(200, "<html><head><title>Embeds</title></head><body><p>A "
                                   f"picture:</p><img src='{self.server.redirect_to}'></body>"
                                   "</html>")
        if path == "/socket":
            return self._send(200, "<html><head><title>Socket</title></head><body><script>"
                                   f"new WebSocket('{self.server.redirect_to}')</script>"
                                   "</body></html>")
        if path == "/gzip":
            body = gzip.compress(ARTICLE.replace(
                "</body>", "<script>fetch('/cookies')</script></body>").encode())
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Set-Cookie", "a=1; Path=/")
            self.send_header("Set-Cookie", "b=2; Path=/")
            self.end_headers()
            self.wfile.write(body)
            return None
        if path == "/cookies":
            self.server.cookies = self.headers.get("Cookie", "")
            return self._send(200, "<html><title>Cookies</title></html>")
        if path == "/gone":
            return self._send(404, "<html><title>Not here</title><body>nothing</body></html>")
        return self._send(200, PAGES.get(path, "<html><title>x</title></html>"))

    def _send(self, status: int, html: str) -> None:
        body = html.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve() -> Iterator[Site]:
    site = Site()
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield site
    site.release.set()
    site.shutdown()
    site.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    yield from _serve()


@pytest.fixture
def other_site() -> Iterator[Site]:
    yield from _serve()


@pytest.fixture(scope="module")
def chromium() -> Iterator[SharedBrowser]:
    """One browser for the module's tests, as a process has one."""
    browser = SharedBrowser()
    yield browser
    browser.close_now()


class Published:
    """A fake publisher: the artifacts the adapter would attach to the Prefect run."""

    def __init__(self) -> None:
        self.artifacts: list[tuple[str, str]] = []

    async def __call__(self, markdown: str, description: str, task_run_id: Any) -> None:
        self.artifacts.append((markdown, description))


@pytest.fixture
def published() -> Published:
    return Published()


@pytest.fixture
def tool(chromium: SharedBrowser, published: Published) -> BrowserOpen:
    return BrowserOpen(browser=chromium, publish=published)


@pytest.fixture
def local(make_ctx: Callable[..., StepContext]) -> StepContext:
    """A step of a local plan: loopback allowed, nothing checked."""
    return make_ctx(step_id="page", trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True))


def open_page(tool: BrowserOpen, ctx: StepContext, timeout: float = 60, **params: Any) -> Any:
    return asyncio.run(tool.run(params, ctx, timeout))


def failure(tool: BrowserOpen, ctx: StepContext, **params: Any) -> StepError:
    with pytest.raises(StepError) as caught:
        open_page(tool, ctx, **params)
    return caught.value


def test_a_page_gives_its_title_text_status_and_a_png_screenshot(
        tool: BrowserOpen, local: StepContext, site: Site, published: Published) -> None:
    out = open_page(tool, local, url=site.url("/"))
    assert (out["title"], out["status"], out["final_url"]) == \
        ("Planrun test page", 200, site.url("/"))
    assert "harbour was quiet" in out["text"] and "crates of oranges" in out["text"]
    assert out["text_source"] == "readable" and "Home | About" not in out["text"]
    assert out["screenshot"] == "screenshots/page.png" and out["settled"] is True
    png = local.workspace.resolve("screenshots/page.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 1000
    assert local.usage.written_bytes == len(png)  # the screenshot is the step's write
    [(markdown, description)] = published.artifacts
    assert "screenshots/page.png" in markdown and "Planrun test page" in markdown
    where = local.workspace.resolve("screenshots/page.png")
    assert f"`{where}`" in markdown and "file://" not in markdown  # the UI cannot follow it
    assert description.startswith("page: screenshot of ")
    image = markdown.split("](data:image/jpeg;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(image).startswith(b"\xff\xd8\xff")  # a JPEG the UI shows


def test_the_browsers_processes_are_the_steps_resource_use(
        tool: BrowserOpen, local: StepContext, site: Site) -> None:
    open_page(tool, local, url=site.url("/"), screenshot=False)
    used = local.usage.programs
    assert used is not None
    assert used.peak_memory_bytes > 20 * 1024 * 1024  # Chromium's processes, not nothing
    assert used.cpu_s > 0
    assert tool.browser.processes(), "the browser stays up for the next step"


def test_steps_at_once_share_the_one_browser_each_in_its_own_context(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site) -> None:
    open_page(tool, make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True)),
              url=site.url("/"), screenshot=False)
    launches = tool.browser.launches
    contexts = [make_ctx(step_id=f"s{i}", trust=Trust.LOCAL,
                         policy=LevelPolicy(allow_private=True)) for i in range(4)]

    async def together() -> list[Any]:
        return await asyncio.gather(*(tool.run({"url": site.url("/")}, ctx, 60)
                                      for ctx in contexts))

    outs = asyncio.run(together())
    assert [o["screenshot"] for o in outs] == [f"screenshots/s{i}.png" for i in range(4)]
    assert all(o["title"] == "Planrun test page" for o in outs)
    assert tool.browser.launches == launches  # no browser of their own


def test_a_page_that_grows_the_browser_past_the_steps_memory_limit_fails_as_resource(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site) -> None:
    ctx = make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True), memory_mb=64)
    error = failure(tool, ctx, url=site.url("/hog"), screenshot=False)  # 192 MiB of arrays
    assert error.category == "resource" and "memory limit of 64 MiB" in error.message
    assert ctx.usage.programs is not None
    assert ctx.usage.programs.peak_memory_bytes > 64 * 1024 * 1024
    light = make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True), memory_mb=1024)
    assert open_page(tool, light, url=site.url("/"), screenshot=False)["status"] == 200


def test_a_page_over_its_limit_at_its_end_fails_though_no_sample_saw_it_grow(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The samples every 0.2 s can fall before and after a page's growth (a loaded machine):
    the look at the page's end, before its context closes, still catches it."""
    async def never(*args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(ProcessMeter, "sampling", never)
    ctx = make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True), memory_mb=64)
    error = failure(tool, ctx, url=site.url("/hog"), screenshot=False)  # 192 MiB of arrays
    assert error.category == "resource" and "memory limit of 64 MiB" in error.message


def test_a_screenshot_goes_where_the_step_says_and_nowhere_when_it_says_false(
        tool: BrowserOpen, local: StepContext, site: Site, published: Published) -> None:
    out = open_page(tool, local, url=site.url("/"), screenshot="shots/front.png",
                    full_page=True)
    assert out["screenshot"] == "shots/front.png"
    assert local.workspace.resolve("shots/front.png").read_bytes().startswith(PNG)
    out = open_page(tool, local, url=site.url("/"), screenshot=False)
    assert out["screenshot"] is None and len(published.artifacts) == 1


def test_a_screenshot_path_out_of_the_workspace_is_refused_before_the_page_opens(
        tool: BrowserOpen, local: StepContext, site: Site) -> None:
    error = failure(tool, local, url=site.url("/"), screenshot="../out.png")
    assert error.category == "configuration"
    assert site.requests == []


def test_a_slow_page_times_out_as_transient(tool: BrowserOpen, local: StepContext,
                                            site: Site) -> None:
    error = failure(tool, local, url=site.url("/slow"), load_timeout=1)
    assert error.category == "transient"
    assert "did not load within 1s" in error.message and "load_timeout" in error.hint


def test_a_step_stopped_by_its_timeout_closes_its_context_and_the_browser_serves_on(
        tool: BrowserOpen, local: StepContext, site: Site,
        wait_until: Callable[..., None]) -> None:
    with pytest.raises(StepError) as caught:
        open_page(tool, local, timeout=1.5, url=site.url("/slow"))
    assert caught.value.category == "transient" and "timeout of 1.5s" in caught.value.message

    async def contexts(browser: Any) -> int:
        return len(browser.contexts)

    wait_until(lambda: asyncio.run(tool.browser.call(contexts)) == 0, within=10,
               what="the stopped step's context to close")
    assert open_page(tool, local, url=site.url("/"), screenshot=False)["status"] == 200


def test_a_missing_element_is_a_logic_error_naming_the_selector(
        tool: BrowserOpen, local: StepContext, site: Site) -> None:
    error = failure(tool, local, url=site.url("/"), wait_for="#results .item", wait_timeout=1)
    assert error.category == "logic"
    assert "'#results .item'" in error.message and "within 1s" in error.message


def test_an_element_that_appears_later_is_waited_for(tool: BrowserOpen, local: StepContext,
                                                     site: Site) -> None:
    out = open_page(tool, local, url=site.url("/late"), wait_for="#ready", wait_timeout=10)
    assert "Ready now" in out["text"] and out["settled"] is True


def test_a_page_whose_script_throws_still_returns_its_content(
        tool: BrowserOpen, local: StepContext, site: Site) -> None:
    out = open_page(tool, local, url=site.url("/throws"))
    assert out["title"] == "Throws" and "still here" in out["text"]
    assert any("boom from the page" in e for e in out["page_errors"])


def test_a_page_that_never_settles_is_taken_as_it_is_after_idle_timeout(
        tool: BrowserOpen, local: StepContext, site: Site) -> None:
    out = open_page(tool, local, url=site.url("/never-settles"), idle_timeout=1)
    assert out["settled"] is False
    assert out["title"] == "Busy" and "Always polling" in out["text"]
    assert any(r.startswith("/hang") for r in site.requests)  # it really kept the network busy


def test_an_error_status_fails_by_its_category_unless_allowed(
        tool: BrowserOpen, local: StepContext, site: Site) -> None:
    error = failure(tool, local, url=site.url("/gone"))
    assert error.category == "configuration" and "HTTP 404" in error.message
    out = open_page(tool, local, url=site.url("/gone"), allow_error_status=True)
    assert out["status"] == 404 and out["title"] == "Not here"


def test_a_refused_connection_is_transient(tool: BrowserOpen, local: StepContext) -> None:
    with socket_without_listener() as port:
        error = failure(tool, local, url=f"http://127.0.0.1:{port}/")
    assert error.category == "transient" and "refused" in error.message


def test_a_host_that_does_not_resolve_is_transient(tool: BrowserOpen,
                                                   local: StepContext) -> None:
    error = failure(tool, local, url="http://no-such-host.invalid/", load_timeout=20)
    assert error.category == "transient" and "cannot resolve" in error.message


def test_a_redirect_to_a_denied_host_is_blocked_before_any_request_reaches_it(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site,
        other_site: Site) -> None:
    site.redirect_to = other_site.url("/secret")
    ctx = make_ctx(trust=Trust.SUBMITTED,
                   policy=LevelPolicy(allow_private=True, hosts=[site.host]))
    error = failure(tool, ctx, url=site.url("/away"))
    assert error.category == "configuration"
    assert "blocked by policy" in error.message and other_site.host in error.message
    assert site.requests == ["/away"] and other_site.requests == []


def test_a_subresource_on_a_denied_host_is_blocked_and_fails_the_step(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site,
        other_site: Site) -> None:
    site.redirect_to = other_site.url("/pixel.png")
    ctx = make_ctx(trust=Trust.SUBMITTED,
                   policy=LevelPolicy(allow_private=True, hosts=[site.host]))
    error = failure(tool, ctx, url=site.url("/embeds"))
    assert error.category == "configuration" and other_site.host in error.message
    assert "/embeds" in site.requests and other_site.requests == []


def test_a_websocket_to_a_denied_host_is_blocked_and_fails_the_step(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site,
        other_site: Site) -> None:
    site.redirect_to = f"ws://{other_site.host}/live"
    ctx = make_ctx(trust=Trust.SUBMITTED,
                   policy=LevelPolicy(allow_private=True, hosts=[site.host]))
    error = failure(tool, ctx, url=site.url("/socket"))
    assert error.category == "configuration" and other_site.host in error.message
    assert other_site.requests == []


def test_the_runs_secrets_are_masked_in_the_artifact(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site,
        published: Published) -> None:
    from planrun.redact import Redactor

    ctx = make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True),
                   redactor=Redactor(["hunter2-secret"]))
    open_page(tool, ctx, url=site.url("/?account=hunter2-secret"))
    [(markdown, description)] = published.artifacts
    assert "hunter2-secret" not in markdown + description and "***" in markdown


def test_a_redirect_to_an_allowed_host_that_refuses_is_transient_and_the_browser_lives_on(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site) -> None:
    with socket_without_listener() as port:
        site.redirect_to = f"http://127.0.0.1:{port}/"
        ctx = make_ctx(trust=Trust.SUBMITTED, policy=LevelPolicy(
            allow_private=True, hosts=[site.host, f"127.0.0.1:{port}"]))
        error = failure(tool, ctx, url=site.url("/away"))
    assert error.category == "transient" and "refused" in error.message
    launches = tool.browser.launches
    assert open_page(tool, ctx, url=site.url("/"))["status"] == 200
    assert tool.browser.launches == launches


def test_a_submitted_plan_reaches_allowed_hosts_through_the_guard(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site) -> None:
    ctx = make_ctx(step_id="guarded", trust=Trust.SUBMITTED,
                   policy=LevelPolicy(allow_private=True, hosts=[site.host]))
    out = open_page(tool, ctx, url=site.url("/"))
    assert out["title"] == "Planrun test page" and out["status"] == 200


def test_through_the_guard_a_compressed_page_reads_and_its_cookies_stay_in_the_context(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site) -> None:
    ctx = make_ctx(trust=Trust.SUBMITTED,
                   policy=LevelPolicy(allow_private=True, hosts=[site.host]))
    out = open_page(tool, ctx, url=site.url("/gzip"), screenshot=False)
    assert out["title"] == "Planrun test page" and "harbour was quiet" in out["text"]
    assert site.cookies == "a=1; b=2"  # both Set-Cookie headers reached the page's fetch
    open_page(tool, ctx, url=site.url("/cookies"), screenshot=False)
    assert site.cookies == ""  # a fresh context per step: the last step's cookies are gone


def test_a_submitted_plan_cannot_open_a_loopback_page_by_default(
        tool: BrowserOpen, make_ctx: Callable[..., StepContext], site: Site) -> None:
    ctx = make_ctx(trust=Trust.SUBMITTED, policy=LevelPolicy())
    error = failure(tool, ctx, url=site.url("/"))
    assert error.category == "configuration" and "loopback" in error.message
    assert site.requests == []


def test_a_crashed_browser_is_started_again_on_the_next_step(
        tool: BrowserOpen, local: StepContext, site: Site,
        wait_until: Callable[..., None]) -> None:
    open_page(tool, local, url=site.url("/"), screenshot=False)
    main = tool.browser.main_process()
    assert main is not None
    launches = tool.browser.launches
    main.kill()
    main.wait(10)
    out = open_page(tool, local, url=site.url("/"), screenshot=False)
    assert out["title"] == "Planrun test page"
    assert tool.browser.launches == launches + 1
    assert tool.browser.main_process() not in (None, main)


def test_health_says_chromium_starts(tool: BrowserOpen) -> None:
    health = asyncio.run(tool.health())
    assert health.ok and health.detail.startswith("Chromium ")


def test_health_is_unhealthy_when_chromium_does_not_start(tmp_path: Path) -> None:
    broken = tmp_path / "chromium"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    browser = SharedBrowser(executable=str(broken))
    try:
        health = asyncio.run(BrowserOpen(browser=browser).health())
    finally:
        browser.close_now()
    assert not health.ok and "does not start" in health.detail


def test_a_run_in_a_flow_attaches_the_screenshot_as_an_artifact(
        site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from planrun.adapters.browser import shared_browser
    from tests.helpers import run_yaml

    monkeypatch.setenv("PLANRUN_WORKSPACE", str(tmp_path / "ws"))
    try:
        with trusted_as(Trust.LOCAL):
            report = run_yaml(f"""
                version: 1
                name: browse
                steps:
                  - {{id: front, tool: browser.open, with: {{url: "{site.url('/')}"}}}}
            """)
    finally:
        shared_browser().close_now()
    step = report["steps"]["front"]
    assert step["status"] == "completed", step
    assert step["output"]["screenshot"] == "screenshots/front.png"
    assert (tmp_path / "ws/screenshots/front.png").read_bytes().startswith(PNG)
    assert step["resources"]["peak_memory_bytes"] > 20 * 1024 * 1024

    async def artifacts() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(report["run_id"])])))

    found = [a for a in asyncio.run(artifacts()) if a.type == "markdown"]
    assert len(found) == 1 and "screenshots/front.png" in str(found[0].data)
    assert "](data:image/jpeg;base64," in str(found[0].data)
    assert found[0].task_run_id is not None  # on the step's task run
    json.dumps(report)


class socket_without_listener:  # noqa: N801 - used as a context manager
    """A port on 127.0.0.1 that nothing listens on (bound, never listening)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_a_submitted_plan_naming_a_denied_page_fails_validation_at_its_url(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from planrun.errors import PlanInvalid
    from planrun.policy import POLICY_ENV
    from planrun.validate import validate_text

    monkeypatch.delenv(POLICY_ENV, raising=False)
    plan = ("version: 1\nname: peek\nsteps:\n"
            "  - {id: a, tool: browser.open, with: {url: \"http://169.254.169.254/x\"}}\n")
    with trusted_as(Trust.SUBMITTED), pytest.raises(PlanInvalid) as caught:
        validate_text(plan, "plan.yaml")
    assert [str(p) for p in caught.value.problems] == [
        "plan.yaml:4:45: steps[0].with.url: browser.open is blocked by policy: "
        "169.254.169.254 is a link-local (cloud metadata) address: the 'submitted' policy "
        "denies link-local (cloud metadata) addresses (docs/policy.md)"]
    with trusted_as(Trust.LOCAL):
        validate_text(plan, "plan.yaml")
