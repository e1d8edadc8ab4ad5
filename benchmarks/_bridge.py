"""The progress bridge for the bridge benchmarks (bench_latency.py, bench_fanout.py,
bench_bridge_start.py): ``python -m planrun.progress_bridge`` in a subprocess of its own
(:class:`Bridge`, :func:`start_bridge`), optionally with its upstream timed
(:func:`traced_bridge`, the ``--trace`` option).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import AUTH, BENCH, ROOT, TOKEN, Server, free_port, wait_idle


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
        # A RunEvent (planrun's own events), FlowRunEnded or BreakerChanged.
        payload = getattr(event, "payload", None)
        status = getattr(payload, "status", None) or getattr(event, "state", None)
        records.append({"event": getattr(event, "name", type(event).__name__),
                        "run_id": getattr(event, "run_id", None),
                        "step_id": getattr(payload, "step_id", None),
                        "status": getattr(status, "value", status),
                        "occurred": getattr(event, "occurred", enter), "enter": enter,
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
        command = ["-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); import _bridge; "
                         f"_bridge.traced_bridge({str(trace_path)!r})"]
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

