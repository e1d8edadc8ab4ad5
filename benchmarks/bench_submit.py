"""Submit to first step: how long a run submitted to ``planrun up`` takes to start its
first step, and the CPU the machine spends per run, with run processes spawned (Prefect's
default: a new interpreter imports Prefect and planrun for each run), forked from the
runner's fork server (planrun's default, flows/serve.py), and with the runs in the
runner's own process (``planrun up --in-process``, flows/loop_runner.py). All in one
session, against one Prefect server, alternating, so the ratios are fair.

    .venv/bin/python benchmarks/bench_submit.py [--runs 8] [--rounds 2]
        [--modes spawn,fork,in-process]

Each run is a one-step plan (``core.echo``) submitted with ``POST /v1/runs`` after the last
one ended; "to first step" is from the request to the step's ``started_at`` in the report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import httpx
import psutil

PLAN = "version: 1\nname: submit-bench\nsteps:\n  - {id: s1, tool: core.echo, with: {value: hi}}\n"
ENDS = {"completed", "completed_with_errors", "failed", "cancelled"}


def up(mode: str, home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PLANRUN_HOME": str(home), "PLANRUN_TOKEN": _common.TOKEN,
           "PLANRUN_SPAWN_RUNS": "1" if mode == "spawn" else "0"}
    out = (home / "up.out").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "planrun.cli", "up", "--port", str(port),
                                *(["--in-process"] if mode == "in-process" else [])],
                               env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "planrun is up" not in (home / "up.out").read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((home / "up.out").read_text(errors="replace"))
        time.sleep(0.2)
    return process


def one_run(bridge: str) -> float:
    """Seconds from the submit request to the step's start."""
    sent = time.time()
    answer = httpx.post(f"{bridge}/v1/runs", json={"plan": PLAN}, headers=_common.AUTH,
                        timeout=30)
    answer.raise_for_status()
    run_id = answer.json()["run_id"]
    deadline = time.monotonic() + 120
    while True:
        report = httpx.get(f"{bridge}/v1/runs/{run_id}", headers=_common.AUTH,
                           timeout=30).json()
        if report["status"] in ENDS:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"run {run_id} did not end: {report['status']}")
        time.sleep(0.05)
    return _common.ts_epoch(report["steps"]["s1"]["started_at"]) - sent


def measure(mode: str, runs: int, srv: _common.Server) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory(prefix=f"bench-submit-{mode}-") as tmp:
        home = Path(tmp)
        port = _common.free_port()
        process = up(mode, home, port)
        bridge = f"http://127.0.0.1:{port}"
        try:
            one_run(bridge)  # the first run registers the flow and warms the server
            _common.wait_idle(srv)
            cpu = sum(psutil.cpu_times()[:3])
            waits = [one_run(bridge) for _ in range(runs)]
            cpu = (sum(psutil.cpu_times()[:3]) - cpu) / runs
        finally:
            process.terminate()
            process.wait(60)
    return waits, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="spawn,fork,in-process")
    args = parser.parse_args()
    srv = _common.setup()
    modes = args.modes.split(",")
    found: dict[str, tuple[list[float], list[float]]] = {mode: ([], []) for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            waits, cpu = measure(mode, args.runs, srv)
            found[mode][0].extend(waits)
            found[mode][1].append(cpu)
    print(f"{args.rounds} rounds x {args.runs} runs of a one-step plan, sequential")
    print(_common.table(
        ["run processes", "submit to first step, p50", "p90", "CPU per run (machine)"],
        [[mode, f"{_common.percentile(waits, 50):.2f} s", f"{_common.percentile(waits, 90):.2f} s",
          f"{_common.median(cpus):.2f} s"] for mode, (waits, cpus) in found.items()]))


if __name__ == "__main__":
    main()
