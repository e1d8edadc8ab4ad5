"""This process's Chromium, driven by Playwright, and what its processes use
(docs/browser.md, "One browser per process" and "Resources").

``SharedBrowser`` starts the browser on first use and again after it crashed; it lives in a
thread of its own with its own event loop, so that every run of the process (each with its
own loop) can use it. ``ProcessMeter`` measures its processes while one step runs.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import psutil

__all__ = ["CHROMIUM_ENV", "CHROMIUM_NAMES", "ProcessMeter", "SharedBrowser", "chromium_path",
           "shared_browser"]

T = TypeVar("T")
#: Overrides which Chromium is started (else Debian's ``chromium`` or Google's on PATH).
CHROMIUM_ENV = "PLANRUN_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: How often the browser's processes are measured while a step runs.
SAMPLE_INTERVAL_S = 0.2
#: How long a start of the browser may take before it fails.
LAUNCH_TIMEOUT_S = 60.0


def chromium_path() -> str | None:
    """The Chromium the tool starts: ``$PLANRUN_CHROMIUM``, else the first of Debian's and
    Google's names on PATH; None when there is none (Playwright's own download is then
    tried)."""
    configured = os.environ.get(CHROMIUM_ENV, "").strip()
    if configured:
        return configured
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


async def version_problem(executable: str, timeout_s: float) -> str | None:
    """Why ``executable --version`` fails (it cannot be run, or exits non-zero): a start
    through Playwright would fail too, but only once Playwright's own driver has started,
    seconds on a loaded machine. None when it answers, or is still going after
    ``timeout_s`` (slow is not broken)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            executable, "--version", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        said, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    if proc.returncode == 0:
        return None
    last = said.decode("utf-8", "replace").strip().splitlines()[-1:] or ["(nothing)"]
    return f"`--version` exited with {proc.returncode}: {last[0]}"


# -- the shared browser ------------------------------------------------------------------------

class SharedBrowser:
    """This process's Chromium, driven by Playwright in a thread with its own event loop.

    ``call(factory)`` runs ``factory(browser)`` there and waits for it from any loop;
    cancelling the wait cancels the work. The browser is started on first use and again
    when it has crashed or been closed. ``marker`` is a command-line switch given to
    Chromium, by which its processes are found (``processes``).
    """

    def __init__(self, executable: str | None = None) -> None:
        self.executable = executable
        self.marker = f"--planrun-browser={uuid.uuid4().hex}"
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Lock | None = None
        self._launching: asyncio.Future[None] | None = None
        self._playwright: Any = None
        self._browser: Any = None
        self._main: psutil.Process | None = None
        #: How many times the browser was started (a crash makes one more).
        self.launches = 0

    @property
    def started(self) -> bool:
        """Whether this process has started a browser (it may have crashed since)."""
        return self._browser is not None

    # - the thread --------------------------------------------------------------------------

    def _thread_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True,
                                 name="planrun-browser").start()
                self._loop = loop
                atexit.register(self.close_now)
            return self._loop

    async def call(self, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """``work(browser)`` on the browser's thread; its result or its exception."""
        async def run() -> T:
            return await work(await self.browser())

        future = asyncio.run_coroutine_threadsafe(run(), self._thread_loop())
        return await asyncio.wrap_future(future)

    # - the browser (on its thread) ----------------------------------------------------------

    async def browser(self) -> Any:
        """The running browser, started (again) when there is none. A start goes on when
        the step that asked for it is cancelled: the next step uses it."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:  # one check and at most one start at a time
            alive = self._browser is not None and self._browser.is_connected() and \
                await asyncio.to_thread(self.main_process) is not None  # not crashed
            if not alive and (self._launching is None or self._launching.done()):
                self._launching = asyncio.ensure_future(self._launch())
            launching = self._launching
        if launching is not None:
            await asyncio.shield(launching)  # a start that failed raises its error
        return self._browser

    async def _launch(self) -> None:
        from playwright.async_api import async_playwright

        await self._stop()
        self._playwright = await async_playwright().start()
        executable = self.executable if self.executable is not None else chromium_path()
        self._browser = await self._playwright.chromium.launch(
            executable_path=executable, headless=True, timeout=LAUNCH_TIMEOUT_S * 1000,
            args=[self.marker, "--disable-dev-shm-usage", "--disable-background-networking",
                  "--no-first-run", "--no-default-browser-check"])
        self.launches += 1

    async def _stop(self) -> None:
        browser, playwright = self._browser, self._playwright
        self._browser = self._playwright = None
        if browser is not None:
            with contextlib.suppress(Exception):
                await browser.close()
        if playwright is not None:
            with contextlib.suppress(Exception):
                await playwright.stop()

    def close_now(self, timeout: float = 10.0) -> None:
        """Close the browser (at exit, or when a test is done with it)."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running() or \
                os.getpid() != self._pid:  # a forked child: the thread stayed in its parent
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), loop).result(timeout)

    # - its processes -------------------------------------------------------------------------

    def main_process(self) -> psutil.Process | None:
        """Chromium's browser process (the one without ``--type=``), if it runs."""
        known = self._main
        with contextlib.suppress(psutil.Error):
            if known is not None and known.is_running() and \
                    known.status() != psutil.STATUS_ZOMBIE:
                return known
        self._main = None
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmdline = proc.cmdline()
                if self.marker in cmdline and not any(a.startswith("--type=") for a in cmdline):
                    self._main = proc
                    return proc
        return None

    def processes(self) -> list[psutil.Process]:
        """The browser process and all its descendants (renderers, GPU, utilities)."""
        main = self.main_process()
        if main is None:
            return []
        with contextlib.suppress(psutil.Error):
            return [main, *main.children(recursive=True)]
        return [main]


_SHARED: dict[int, SharedBrowser] = {}
_SHARED_LOCK = threading.Lock()


def shared_browser() -> SharedBrowser:
    """This process's browser (a forked child gets its own: threads do not survive a fork)."""
    with _SHARED_LOCK:
        browser = _SHARED.get(os.getpid())
        if browser is None:
            browser = _SHARED[os.getpid()] = SharedBrowser()
        return browser


# -- what the browser's processes use ----------------------------------------------------------

class ProcessMeter:
    """The browser's processes measured while one step runs: the highest total memory seen
    (proportional set size where the kernel gives it: a page shared by N processes counts
    1/N; else the resident set) and the CPU time they used meanwhile."""

    def __init__(self, browser: SharedBrowser) -> None:
        self.browser = browser
        self.peak = 0
        self._lock = threading.Lock()  # a sample in a thread may outlive its cancelled task
        self._sampled = False
        #: The memory at the first sample: growth is measured from there.
        self.baseline = 0
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}

    def sample(self) -> None:
        """Read the browser's processes once: their memory together, and each one's CPU
        time (those running at the first sample count from there, later ones whole)."""
        with self._lock:
            first, self._sampled = not self._sampled, True
            total = 0
            for proc in self.browser.processes():
                try:
                    total += _memory(proc)
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                cpu = times.user + times.system
                self._cpu_first.setdefault(proc.pid, cpu if first else 0.0)
                self._cpu_last[proc.pid] = cpu
            self.peak = max(self.peak, total)
            if first:
                self.baseline = total

    @property
    def cpu_s(self) -> float:
        with self._lock:
            return sum(last - self._cpu_first.get(pid, 0.0)
                       for pid, last in self._cpu_last.items())

    @property
    def growth(self) -> int:
        """How much more the processes held at their peak than at the first sample."""
        return max(self.peak - self.baseline, 0)

    def beyond(self, limit_bytes: int | None) -> bool:
        """Whether the processes have grown by more than ``limit_bytes`` (None: no limit)."""
        return limit_bytes is not None and self.growth > limit_bytes

    async def sampling(self, limit_bytes: int | None = None,
                       over: Callable[[], object] | None = None,
                       interval: float = SAMPLE_INTERVAL_S) -> None:
        """Sample every ``interval`` seconds until cancelled; call ``over`` once the
        growth passes ``limit_bytes``."""
        while True:
            await asyncio.to_thread(self.sample)
            if over is not None and self.beyond(limit_bytes):
                over()
                return
            await asyncio.sleep(interval)


def _memory(proc: psutil.Process) -> int:
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(proc.memory_info().rss)
