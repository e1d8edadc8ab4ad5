"""The ``browser.open`` tool: a page opened in headless Chromium through Playwright
(docs/browser.md).

One browser per process (``adapters/chromium.py``), a fresh browser context per step
(no cookies or storage from another step), closed when the step ends. Where the step's
policy checks connections (``netguard.needs_guard``), every request of the page goes
through ``RequestGuard`` (``adapters/pageguard.py``); the page's own redirects are opened
here one by one, each checked. Failures become planrun's errors in
``adapters/browser_errors.py``.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import Field

from planrun.adapters.base import Adapter, Health, Params, StepContext
from planrun.adapters.browser_errors import (
    MIB,
    browser_error,
    invalid_selector,
    load_timeout,
    navigation_error,
    over_memory,
    raise_blocked,
    selector_missing,
    status_error,
)
from planrun.adapters.chromium import (
    CHROMIUM_ENV,
    CHROMIUM_NAMES,
    ProcessMeter,
    SharedBrowser,
    chromium_path,
    shared_browser,
    version_problem,
)
from planrun.adapters.files import write_workspace_file
from planrun.adapters.http import HttpUrlText
from planrun.adapters.netguard import needs_guard
from planrun.adapters.pageguard import RequestGuard, quietly
from planrun.adapters.workspace import RelativePath
from planrun.contract.records import Resources
from planrun.errors import ConfigurationError, StepError
from planrun.redact import redact_url

__all__ = ["BrowserOpen", "BrowserParams", "SharedBrowser", "chromium_path", "shared_browser"]

VIEWPORT = {"width": 1280, "height": 800}
#: How long ``health()`` waits for a start (under the health check's own 5 s).
HEALTH_WAIT_S = 4.0
PAGE_ERRORS_KEPT = 5
MAX_REDIRECTS = 20
#: The image in the Prefect artifact: the viewport as a JPEG of this quality, left out when
#: larger than ``THUMBNAIL_MAX_BYTES`` (it is stored in Prefect's database).
THUMBNAIL_QUALITY = 45
THUMBNAIL_MAX_BYTES = 256 * 1024


class BrowserParams(Params):
    url: HttpUrlText = Field(description="The http:// or https:// page to open.")
    wait_for: str | None = Field(
        default=None, min_length=1,
        description="A CSS selector to wait for once the page has loaded (missing: the step "
                    "fails, category logic). Absent: wait for the network to be idle, at "
                    "most `idle_timeout` seconds, then take the page as it is.")
    screenshot: bool | RelativePath = Field(
        default=True,
        description="Where to store a PNG screenshot, relative to the workspace root; true: "
                    "screenshots/<step id>.png; false: none.")
    full_page: bool = Field(default=False,
                            description="Screenshot the whole page, not only the viewport.")
    load_timeout: float = Field(default=30.0, gt=0, le=600,
                                description="Seconds the page may take to load (transient "
                                            "error after that).")
    wait_timeout: float = Field(default=10.0, gt=0, le=600,
                                description="Seconds to wait for the `wait_for` selector.")
    idle_timeout: float = Field(default=5.0, ge=0, le=600,
                                description="Seconds to wait for network idle when there is "
                                            "no `wait_for` (settled: false after that).")
    max_text_chars: int = Field(default=100_000, ge=0, le=10_000_000,
                                description="Keep at most this many characters of the "
                                            "page's text (text_truncated: true).")
    allow_error_status: bool = Field(
        default=False,
        description="Return pages answered with HTTP 4xx/5xx instead of failing the step.")


# -- one visit ---------------------------------------------------------------------------------

@dataclass
class Visit:
    """What one step saw of its page."""

    title: str
    final_url: str
    status: int | None
    html: str
    inner_text: str
    settled: bool
    page_errors: list[str]
    png: bytes | None
    #: The viewport as a small JPEG, for the Prefect UI (None without a screenshot).
    thumbnail: bytes | None = None


async def visit(browser: Any, params: BrowserParams, guard: RequestGuard | None,
                before_close: Callable[[], Awaitable[object]] | None = None) -> Visit:
    """Open ``params.url`` in a fresh context of ``browser``, closed when done (after
    ``before_close``, while the page still holds what it loaded)."""
    context = await browser.new_context(viewport=VIEWPORT, service_workers="block",
                                        accept_downloads=False)
    try:
        if guard is not None:
            await guard.install(context)
        seen = await _in_page(await context.new_page(), params, guard)
        if before_close is not None:
            await before_close()
        return seen
    finally:
        await quietly(context.close())
        if guard is not None:
            await guard.close()


async def _in_page(page: Any, params: BrowserParams, guard: RequestGuard | None) -> Visit:
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        response = await _navigate(page, params, guard)
    except PlaywrightTimeout as exc:
        raise_blocked(guard)
        raise load_timeout(params.url, params.load_timeout) from exc
    except StepError:
        raise
    except Exception as exc:
        raise_blocked(guard)
        raise navigation_error(params.url, exc, guard) from exc
    settled = await _waited(page, params)
    raise_blocked(guard)
    png = thumbnail = None
    if params.screenshot is not False:
        png = await page.screenshot(type="png", full_page=params.full_page,
                                    timeout=params.load_timeout * 1000)
        thumbnail = await page.screenshot(type="jpeg", quality=THUMBNAIL_QUALITY,
                                          timeout=params.load_timeout * 1000)
    inner = await page.evaluate("() => document.body ? document.body.innerText : ''")
    return Visit(title=await page.title(), final_url=page.url,
                 status=response.status if response is not None else None,
                 html=await page.content(), inner_text=inner or "", settled=settled,
                 page_errors=errors[:PAGE_ERRORS_KEPT], png=png, thumbnail=thumbnail)


async def _navigate(page: Any, params: BrowserParams, guard: RequestGuard | None) -> Any:
    """``page.goto`` the step's URL within ``load_timeout``; under the guard, each redirect
    it checked is opened in turn, up to ``MAX_REDIRECTS``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + params.load_timeout
    url = params.url
    for _ in range(MAX_REDIRECTS + 1):
        left_ms = max(deadline - loop.time(), 0.001) * 1000
        if guard is None:
            return await page.goto(url, wait_until="load", timeout=left_ms)
        guard.expect_page()
        try:
            return await page.goto(url, wait_until="load", timeout=left_ms)
        except Exception:
            if guard.redirect_to is None or guard.blocked:
                raise
            url = guard.redirect_to
    raise ConfigurationError(f"browser.open: {redact_url(params.url)} redirects more than "
                             f"{MAX_REDIRECTS} times",
                             hint="the URL redirects in a loop; check it")


async def _waited(page: Any, params: BrowserParams) -> bool:
    """Wait for the selector (a logic error when it never appears), or for network idle
    (False when it is not reached in ``idle_timeout``: the page is taken as it is)."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    if params.wait_for is not None:
        try:
            await page.wait_for_selector(params.wait_for, state="attached",
                                         timeout=params.wait_timeout * 1000)
        except PlaywrightTimeout as exc:
            raise selector_missing(params.wait_for, page.url, params.wait_timeout) from exc
        except Exception as exc:
            invalid = invalid_selector(params.wait_for, exc)
            if invalid is not None:
                raise invalid from exc
            raise
        return True
    if params.idle_timeout == 0:
        return False
    try:
        await page.wait_for_load_state("networkidle", timeout=params.idle_timeout * 1000)
    except PlaywrightTimeout:
        return False
    return True


# -- text --------------------------------------------------------------------------------------

def readable_text(html: str, inner_text: str) -> tuple[str, str]:
    """The page's main text (trafilatura: no menus, footers, scripts) and where it came
    from; the page's whole visible text (``innerText``) when trafilatura finds none."""
    try:
        import trafilatura
    except ImportError:  # an install without it
        return inner_text.strip(), "inner_text"
    extracted = trafilatura.extract(html, include_comments=False, favor_recall=True) \
        if html else None
    if extracted and extracted.strip():
        return extracted.strip(), "readable"
    return inner_text.strip(), "inner_text"


# -- the Prefect artifact ----------------------------------------------------------------------

#: Publishes a markdown artifact: ``(markdown, description, task_run_id)``.
Publisher = Callable[[str, str, UUID | None], Awaitable[None]]


async def prefect_markdown(markdown: str, description: str, task_run_id: UUID | None) -> None:
    """A markdown artifact on the step's task run ``task_run_id`` (named, since a step's
    first attempt may begin before Prefect has started its task run: docs/prefect-ui.md);
    nothing outside a run."""
    from prefect.artifacts import MarkdownArtifact
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return
    await MarkdownArtifact(markdown=markdown, description=description,
                           task_run_id=task_run_id).acreate()


def screenshot_markdown(output: dict[str, Any], where: Path,
                        thumbnail: bytes | None = None) -> str:
    """The artifact: what was opened, where its screenshot is (a path, not a link), and
    the viewport as an image the Prefect UI shows (a data URI: the UI cannot reach the
    workspace), unless it is larger than ``THUMBNAIL_MAX_BYTES``."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    page = f"[{cell(output['title'] or output['final_url'])}]({cell(output['final_url'])})"
    rows = [("status", cell(output["status"])),
            ("screenshot", f"`{cell(output['screenshot'])}`")]
    # The table is narrow in the UI and a path does not wrap: the full path below it, as
    # text (a browser does not follow a file:// link from a web page).
    markdown = f"### browser.open\n\n| page | {page} |\n|---|---|\n" + \
        "\n".join(f"| {name} | {value} |" for name, value in rows) + \
        f"\n\nIn the workspace: `{where}`\n"
    if thumbnail is not None and len(thumbnail) <= THUMBNAIL_MAX_BYTES:
        image = base64.b64encode(thumbnail).decode("ascii")
        markdown += f"\n![the page as the step saw it](data:image/jpeg;base64,{image})\n"
    return markdown


# -- the adapter -------------------------------------------------------------------------------

class BrowserOpen(Adapter[BrowserParams]):
    """Opens a page: ``{"url", "final_url", "status", "title", "text", "text_source",
    "text_truncated", "settled", "page_errors", "screenshot"}``.

    ``browser`` is the shared browser to use (this process's by default) and ``publish``
    what attaches the screenshot to the Prefect run; tests inject their own.
    """

    name = "browser.open"
    Params = BrowserParams
    summary = "open a web page in headless Chromium: text, title, screenshot"
    default_estimate_s = 3.0
    default_timeout_s = 120.0
    in_process = False  # the work is the browser's processes, which the tool measures

    def __init__(self, browser: SharedBrowser | None = None,
                 publish: Publisher | None = None) -> None:
        self._browser = browser
        self._publish = publish or prefect_markdown

    @property
    def browser(self) -> SharedBrowser:
        return self._browser or shared_browser()

    async def execute(self, params: BrowserParams, ctx: StepContext) -> dict[str, Any]:
        target = self._screenshot_path(params, ctx)
        guard = RequestGuard(ctx.policy, ctx.trust, params.load_timeout) \
            if needs_guard(ctx.policy, ctx.trust) else None
        meter = ProcessMeter(self.browser)
        limit = ctx.memory_mb * MIB if ctx.memory_mb else None

        looked = False  # a sample costs ≈ 30 ms (smaps of every browser process): one at the end

        async def last_look() -> None:
            """The page at its end, before its context closes: a page that still holds
            more than the limit fails even if it grew between two samples."""
            nonlocal looked
            await asyncio.to_thread(meter.sample)
            looked = True
            if meter.beyond(limit):
                raise over_memory(ctx.memory_mb or 0, meter.growth)

        async def work(browser: Any) -> Visit:
            task, stopped = asyncio.current_task(), False
            assert task is not None

            def over() -> None:
                nonlocal stopped
                stopped = True
                task.cancel("over its memory limit")

            await asyncio.to_thread(meter.sample)  # the baseline, before the step's context
            sampler = asyncio.ensure_future(meter.sampling(limit, over))
            try:
                return await visit(browser, params, guard, last_look)
            except asyncio.CancelledError:
                if not stopped:
                    raise
                task.uncancel()
                raise over_memory(ctx.memory_mb or 0, meter.growth) from None
            finally:
                sampler.cancel()
                if not looked:  # the page failed before its end: the last reading is here
                    await asyncio.to_thread(meter.sample)

        started = time.monotonic()
        try:
            seen = await self.browser.call(work)
        finally:
            ctx.usage.ran(Resources(peak_memory_bytes=meter.peak, cpu_s=round(meter.cpu_s, 3),
                                    written_bytes=0))
        if seen.status is not None and seen.status >= 400 and not params.allow_error_status:
            raise status_error(seen.final_url, seen.status)
        text, source = await asyncio.to_thread(readable_text, seen.html, seen.inner_text)
        output: dict[str, Any] = {
            "url": redact_url(params.url), "final_url": redact_url(seen.final_url),
            "status": seen.status, "title": seen.title,
            "text": text[:params.max_text_chars], "text_source": source,
            "text_truncated": len(text) > params.max_text_chars, "settled": seen.settled,
            "page_errors": seen.page_errors, "screenshot": None,
            "duration_s": round(time.monotonic() - started, 3)}
        if target is not None and seen.png is not None:
            rel, path = target
            await write_workspace_file(ctx, "browser.open", path, seen.png)
            output["screenshot"] = rel
            await self._attach(output, path, seen.thumbnail, ctx)
        return output

    def _screenshot_path(self, params: BrowserParams, ctx: StepContext
                         ) -> tuple[str, Path] | None:
        if params.screenshot is False:
            return None
        rel = f"screenshots/{ctx.step_id}.png" if params.screenshot is True \
            else params.screenshot
        return rel, ctx.workspace.resolve(rel)  # refused before the page is opened

    async def _attach(self, output: dict[str, Any], path: Path, thumbnail: bytes | None,
                      ctx: StepContext) -> None:
        markdown = ctx.redactor.text(screenshot_markdown(output, path, thumbnail))
        try:
            await self._publish(markdown, ctx.redactor.text(
                f"{ctx.step_id}: screenshot of {output['final_url']}"), ctx.task_run_id)
        except Exception as exc:  # noqa: BLE001 - the artifact is a view; the step succeeded
            ctx.logger.warning("could not attach the screenshot artifact: %s", exc)

    def classify(self, exc: Exception) -> StepError:
        found = browser_error(exc)
        return found if found is not None else super().classify(exc)

    async def health(self) -> Health:
        """Chromium starts (or already runs) and answers."""
        executable = self.browser.executable or chromium_path()
        if executable is None:
            return Health(ok=False, detail=f"no Chromium found ({', '.join(CHROMIUM_NAMES)} "
                                           f"on PATH, or {CHROMIUM_ENV})")

        problem = None if self.browser.started else await version_problem(executable, HEALTH_WAIT_S)
        if problem is not None:
            return Health(ok=False, detail=f"Chromium ({executable}) does not start: {problem}")

        async def version(browser: Any) -> str:
            return str(browser.version)

        try:
            # The start goes on past the wait: on a loaded machine it may take longer than
            # a health check may (flows/health.py), and a slow start is not a broken one.
            found = await asyncio.wait_for(asyncio.shield(self.browser.call(version)),
                                           HEALTH_WAIT_S)
        except TimeoutError:
            return Health(ok=True, detail=f"Chromium ({executable}) is starting")
        except Exception as exc:  # noqa: BLE001 - reported as the health it is
            return Health(ok=False, detail=f"Chromium ({executable}) does not start: "
                                           f"{str(exc).splitlines()[0]}")
        return Health(ok=True, detail=f"Chromium {found} ({executable})")
