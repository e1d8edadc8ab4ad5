"""Shared set-up of the benchmarks: one local Prefect server, pauses until it is idle,
plan construction, medians, percentiles and tables, and the small helpers of the progress
bridge's stream (run-end types, ``ts``, a free port). The bridge in a subprocess of its own
is in ``_bridge.py``, the warm plan-running subprocess in ``_plan_runner.py``.

``setup()`` must run before anything imports Prefect: it points the process at the server
(``PREFECT_API_URL`` if set, else planrun's local server under ``PLANRUN_HOME``, by default
``/tmp/bench-home``) and quiets Prefect's console log.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
DEFAULT_HOME = "/tmp/bench-home"

#: The bridge token the benchmarks start their bridges with (docs/http-api.md); their client
#: processes inherit it through the environment.
TOKEN = os.environ.setdefault("PLANRUN_BENCH_TOKEN", secrets.token_urlsafe(16))
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Server:
    url: str
    pid: int | None  # None: a server we did not find locally (no idle detection)


def setup() -> Server:
    """Point this process (and the subprocesses it starts) at one Prefect server."""
    os.environ.setdefault("PLANRUN_HOME", DEFAULT_HOME)
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    from planrun import server

    preset = os.environ.get("PREFECT_API_URL")
    url = server.ensure_server()
    info = server.running()
    pid = info.pid if info and (not preset or info.url == preset) else None
    return Server(url=url, pid=pid)


def wait_idle(srv: Server, *, min_s: float = 0.5, max_s: float = 30.0,
              threshold: float = 8.0) -> float:
    """Pause until the server has digested the last run's events: its CPU use stays below
    ``threshold`` % for two 0.25 s windows in a row (at least ``min_s``, at most ``max_s``).
    Without a local server process to watch, pause ``min_s`` + 2 s. Returns the pause."""
    start = time.monotonic()
    time.sleep(min_s)
    if srv.pid is None:
        time.sleep(2.0)
        return time.monotonic() - start
    import psutil

    try:
        proc = psutil.Process(srv.pid)
        proc.cpu_percent(None)
        quiet = 0
        while time.monotonic() - start < max_s and quiet < 2:
            time.sleep(0.25)
            quiet = quiet + 1 if proc.cpu_percent(None) < threshold else 0
    except psutil.Error:
        time.sleep(2.0)
    return time.monotonic() - start


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import prefect

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "memory": mem,
            "python": platform.python_version(), "prefect": prefect.__version__,
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def other_prefect_servers(srv: Server) -> int:
    """How many other Prefect server processes share this machine (they compete for CPU)."""
    import psutil

    count = 0
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "prefect server start" in cmd and proc.info["pid"] != srv.pid:
            count += 1
    return count


def plan_data(plan: dict[str, Any]) -> dict[str, Any]:
    """Validate a plan (as ``planrun run`` does) and return the data the flow takes."""
    from planrun.validate import validate_text

    valid = validate_text(json.dumps(plan), "bench.yaml")
    return valid.plan.model_dump(mode="json", by_alias=True, exclude_none=True)


def run_planrun(data: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Run validated plan data through ``planrun.runner.run_plan`` in this process, in a new
    event loop as ``planrun run`` does; return (wall seconds, run report)."""
    from planrun.runner import run_plan

    t0 = time.perf_counter()
    report = asyncio.run(run_plan(data, {}))
    elapsed = time.perf_counter() - t0
    if report["status"] != "completed":
        raise RuntimeError(f"plan {data['name']} ended {report['status']}: {report['reason']}")
    return elapsed, report


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


# The progress bridge's stream (bench_latency.py, bench_fanout.py, ...) ---------------------

#: Message types that end a run's stream (docs/stream.md).
RUN_END_TYPES = frozenset({"run.completed", "run.completed_with_errors", "run.failed",
                           "run.cancelled"})


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ts_epoch(stamp: str) -> float:
    """A docs/stream.md ``ts`` (ISO-8601, UTC, ``Z``) as seconds since the epoch."""
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

