"""Shared set-up of the benchmarks: one local Prefect server, pauses until it is idle,
plan construction, medians and tables.

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


# The progress bridge (bench_latency.py, bench_fanout.py) ---------------------------------

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


def _raise_nofile() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Bridge:
    """A progress bridge (``python -m planrun.progress_bridge``) in a subprocess of its own."""

    port: int
    proc: Any  # subprocess.Popen
    data: Path
    log: Path
    trace_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def ws_url(self, run_id: str, after: int = 0) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/runs/{run_id}/ws?after={after}&token={TOKEN}"

    def rss(self) -> int:
        """The bridge process's resident memory in bytes."""
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the bridge process has used."""
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def metrics(self) -> dict[str, float]:
        """``GET /metrics`` as {"name{labels}": value} (samples only, no comments)."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=10, headers=AUTH).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def healthz(self) -> dict[str, Any]:
        import httpx

        data: dict[str, Any] = httpx.get(f"{self.url}/healthz", timeout=10).json()
        return data

    def stop(self) -> None:
        """SIGTERM the bridge (ours only), SIGKILL after 10 s; remove its data directory."""
        import shutil
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.data, ignore_errors=True)

    def trace(self) -> list[dict[str, Any]]:
        """What :func:`traced_bridge` recorded (after :meth:`stop`); [] without a trace."""
        if self.trace_path is None or not self.trace_path.exists():
            return []
        with open(self.trace_path) as fh:
            return [json.loads(line) for line in fh]


def traced_bridge(path: str) -> None:
    """``python -m planrun.progress_bridge`` with its upstream timed, for the ``--trace`` option of
    the bridge benchmarks: for each Prefect event ``PrefectUpstream.handle`` takes, one
    record (event, run, step, status, ``occurred``, wall-clock ``enter`` and ``exit``, CPU,
    and the milliseconds spent in ``RunView.estimate``, ``RunView.to_json`` and
    ``MessageStore.commit`` within it), written to ``path`` as JSON lines when the bridge
    gets SIGTERM. The wrappers cost a few microseconds a call; the bridge is not changed."""
    import signal
    import sys

    from planrun.progress_bridge import __main__ as bridge_main
    from planrun.progress_bridge import runs, store, upstream

    records: list[dict[str, Any]] = []
    parts: dict[str, float] = {}

    def timed(cls: Any, name: str) -> None:
        original = getattr(cls, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                parts[name] = parts.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

        setattr(cls, name, wrapper)

    timed(runs.RunView, "estimate")
    timed(runs.RunView, "to_json")
    timed(store.MessageStore, "commit")
    handle = upstream.PrefectUpstream.handle

    def traced_handle(self: Any, event: Any) -> bool:
        parts.clear()
        enter, cpu = time.time(), time.thread_time()
        new = handle(self, event)
        payload = event.payload if isinstance(event.payload, dict) else {}
        records.append({"event": event.event, "run_id": payload.get("run_id"),
                        "step_id": payload.get("step_id"), "status": payload.get("status"),
                        "occurred": event.occurred.timestamp(), "enter": enter,
                        "exit": time.time(), "cpu_ms": (time.thread_time() - cpu) * 1e3,
                        "new": new, **{f"{k}_ms": v for k, v in parts.items()}})
        return new

    upstream.PrefectUpstream.handle = traced_handle  # type: ignore[method-assign]

    def dump(*_: Any) -> None:
        with open(path, "w") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
        os._exit(0)

    # uvicorn restores this handler after its own shutdown and raises SIGTERM again.
    signal.signal(signal.SIGTERM, dump)
    bridge_main.main(sys.argv[1:])


def start_bridge(srv: Server, *, port: int | None = None, settle_s: float = 7.0,
                 trace: bool = False) -> Bridge:
    """Start ``python -m planrun.progress_bridge`` against ``srv`` with a new, empty message log;
    return once ``/healthz`` answers and the upstream's first two reconciliations are done
    (the second comes 6 s after the first: ``settle_s``), its CPU quiet after each.
    The bridge's log goes to ``/tmp/bench-bridge-<port>.log``. ``trace``: run it through
    :func:`traced_bridge` (read the trace with :meth:`Bridge.trace` after :meth:`Bridge.stop`)."""
    import subprocess
    import sys
    import tempfile

    import httpx

    port = port or free_port()
    data = Path(tempfile.mkdtemp(prefix="bench-bridge-"))
    log = Path(f"/tmp/bench-bridge-{port}.log")
    trace_path = Path(f"/tmp/bench-bridge-{port}.trace.jsonl")
    trace_path.unlink(missing_ok=True)
    command = ["-m", "planrun.progress_bridge"]
    if trace:
        command = ["-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); import _common; "
                         f"_common.traced_bridge({str(trace_path)!r})"]
    # Many clients from one address: the bridge's per-client request rate is off here.
    env = {**os.environ, "PREFECT_API_URL": srv.url, "PLANRUN_TOKEN": TOKEN,
           "PLANRUN_RATE_PER_S": "0"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, *command, "--host", "127.0.0.1", "--port",
             str(port), "--data", str(data)],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, preexec_fn=_raise_nofile)
    bridge = Bridge(port=port, proc=proc, data=data, log=log,
                    trace_path=trace_path if trace else None)
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the bridge exited {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{bridge.url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > 60:
            bridge.stop()
            raise RuntimeError(f"the bridge did not answer /healthz within 60 s; see {log}")
        time.sleep(0.2)
    # The upstream reads the runs in flight once connected, and again settle_s after that
    # read ends (docs/architecture.md, "The bridge's first start"): wait for both.
    watch = Server(url=bridge.url, pid=bridge.pid)
    wait_idle(watch, min_s=1.0, max_s=60.0, threshold=3.0)
    time.sleep(settle_s)
    wait_idle(watch, min_s=0.5, max_s=60.0, threshold=3.0)
    return bridge


def serve_runs() -> None:
    """A plan-running process for the bridge benchmarks; the parent (``PlanRunner``) talks
    to it with one JSON object per line, and it answers on stdout with lines starting ``@@ ``.

    ``{"plan": <plan data>, "hold": true}`` runs the plan through ``planrun.runner.run_plan``.
    As soon as the run's id is known (the observer's first call, after the engine has
    emitted ``planrun.run.started`` and before any step starts) it says ``{"run_id": ...}``
    and, with ``hold``, waits for a line (``go``) on stdin: the engine's event loop is
    blocked meanwhile, so the parent can connect its clients before the first step. Then
    ``{"done": status, ...}``. ``{"quit": true}`` ends the process.
    """
    import sys

    setup()
    from planrun.runner import run_plan

    def say(**fields: Any) -> None:
        sys.stdout.write("@@ " + json.dumps(fields) + "\n")
        sys.stdout.flush()

    class Hold:
        def __init__(self, hold: bool) -> None:
            self.hold = hold
            self.announced = False

        def changed(self, run: Any, step: Any) -> None:
            if self.announced:
                return
            self.announced = True
            say(run_id=run.run_id, t=time.time())
            if self.hold:
                sys.stdin.readline()

    say(ready=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        request = json.loads(line)
        if request.get("quit"):
            return
        t0 = time.time()
        try:
            report = asyncio.run(run_plan(request["plan"], {}, Hold(request.get("hold", True))))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            say(error=f"{type(exc).__name__}: {exc}")
            continue
        say(done=report["status"], reason=report.get("reason"), steps=len(report["steps"]),
            t0=t0, t1=time.time())


class PlanRunner:
    """The parent's side of :func:`serve_runs`: one warm plan-running subprocess."""

    def __init__(self) -> None:
        self.proc: Any = None  # asyncio.subprocess.Process

    async def start(self) -> None:
        import sys

        code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); "
                "import _common; _common.serve_runs()")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, cwd=ROOT, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=1 << 24)
        await self._answer("ready")

    async def _send(self, obj: Any) -> None:
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)).encode()
                              + b"\n")
        await self.proc.stdin.drain()

    async def _answer(self, key: str) -> dict[str, Any]:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the plan runner exited")
            if line.startswith(b"@@ "):
                answer: dict[str, Any] = json.loads(line[3:])
                if "error" in answer:
                    raise RuntimeError(f"the plan runner failed: {answer['error']}")
                if key in answer:
                    return answer

    async def start_run(self, data: dict[str, Any], hold: bool = True) -> str:
        """Start a run of ``data``; its run id (the run then waits for :meth:`go`)."""
        await self._send({"plan": data, "hold": hold})
        return str((await self._answer("run_id"))["run_id"])

    async def go(self) -> None:
        await self._send("go")

    async def finished(self) -> dict[str, Any]:
        return await self._answer("done")

    async def close(self) -> None:
        import contextlib

        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self._send({"quit": True})
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
