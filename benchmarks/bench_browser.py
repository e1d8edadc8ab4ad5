"""What ``browser.open`` costs per page, cold and warm, and the browser's memory with 1 and 8
steps at once.

    .venv/bin/python benchmarks/bench_browser.py [--pages 20] [--cold 5] [--json out.json]

In this process, no Prefect: the adapter's ``run`` with a step context of a local plan, on
a page served on 127.0.0.1 by a thread of this process (docs/browser.md):

- cold: a new browser for each page (``SharedBrowser`` started, the page opened, closed);
  what the first ``browser.open`` step of a process pays;
- warm: the same browser for every page (a fresh context per page, as steps get);
- warm, guarded: the same with the policy's guard on every request (a ``submitted`` plan
  whose policy lets it reach 127.0.0.1): what routing every request through planrun costs;
- memory: the browser's processes at the peak of 1 and of 8 steps at once (each step's
  ``peak_memory_bytes``, which is the whole browser's: docs/browser.md, "Resources").

Each page is opened with ``screenshot: true`` and the default waits (network idle).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import percentile, table  # noqa: E402

from planrun.adapters.base import StepContext  # noqa: E402
from planrun.adapters.browser import BrowserOpen, SharedBrowser  # noqa: E402
from planrun.adapters.workspace import Workspace  # noqa: E402
from planrun.policy import LevelPolicy, Trust  # noqa: E402

MIB = 1024 * 1024
PAGE = ("<!doctype html><html><head><title>Bench page</title></head><body><article>"
        "<h1>A page</h1>" + "<p>Some sentences of text for the extractor to find. " * 40 +
        "</article></body></html>").encode()


class Page(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)


def context(ws: Workspace, step: str, guarded: bool, host: str) -> StepContext:
    if guarded:
        return StepContext(run_id="bench", step_id=step, workspace=ws, trust=Trust.SUBMITTED,
                           policy=LevelPolicy(allow_private=True, hosts=[host]))
    return StepContext(run_id="bench", step_id=step, workspace=ws, trust=Trust.LOCAL,
                       policy=LevelPolicy(allow_private=True))


async def nothing(markdown: str, description: str) -> None:
    """No Prefect here: the artifact is not published."""


async def one_page(tool: BrowserOpen, ctx: StepContext, url: str) -> tuple[float, int]:
    started = time.perf_counter()
    await tool.run({"url": url}, ctx, 120)
    used = ctx.usage.programs
    return time.perf_counter() - started, used.peak_memory_bytes if used else 0


async def measure(url: str, host: str, ws: Workspace, pages: int, cold: int
                  ) -> dict[str, Any]:
    found: dict[str, Any] = {"cold": [], "warm": [], "warm, guarded": []}
    for _ in range(cold):
        browser = SharedBrowser()
        try:
            found["cold"].append((await one_page(BrowserOpen(browser, nothing),
                                                 context(ws, "cold", False, host), url))[0])
        finally:
            await asyncio.to_thread(browser.close_now)
    browser = SharedBrowser()
    tool = BrowserOpen(browser, nothing)
    try:
        await one_page(tool, context(ws, "start", False, host), url)
        for i in range(pages):
            for name, guarded in (("warm", False), ("warm, guarded", True)):
                ctx = context(ws, f"p{i}", guarded, host)
                found[name].append((await one_page(tool, ctx, url))[0])
        for parallel in (1, 8):
            steps = await asyncio.gather(*(
                one_page(tool, context(ws, f"par{parallel}_{i}", False, host), url)
                for i in range(parallel)))
            found[f"memory, {parallel} at once"] = max(peak for _, peak in steps)
    finally:
        await asyncio.to_thread(browser.close_now)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    site = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{site.server_address[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws", backup_dir=Path(tmp) / "backups")
        found = asyncio.run(measure(f"http://{host}/", host, ws, args.pages, args.cold))
    site.shutdown()
    rows, results = [], {}
    for name in ("cold", "warm", "warm, guarded"):
        values = found[name]
        p50, p95 = percentile(values, 50), percentile(values, 95)
        rows.append([name, len(values), f"{p50:.3f}", f"{p95:.3f}"])
        results[name] = {"pages": len(values), "p50_s": p50, "p95_s": p95}
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    print(table(["browser.open per page", "pages", "p50 s", "p95 s"], rows))
    print()
    memory = [[f"{n} step(s) at once", f"{found[f'memory, {n} at once'] / MIB:.0f}"]
              for n in (1, 8)]
    print(table(["the browser's processes", "peak MiB"], memory))
    for n in (1, 8):
        results[f"memory, {n} at once"] = {"peak_mib": found[f"memory, {n} at once"] / MIB}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
