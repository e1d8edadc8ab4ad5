"""Crash drill: runs of a 10-step plan with the runner killed (SIGKILL, its runs with it)
at a random moment, then recovered by ``planrun up`` (runner started again) and the
bridge (runs whose process has exited, or that fell silent for ``--dead-after`` seconds,
marked crashed, then scheduled again from their checkpoints).

Reports runs lost (goal 0), completed steps executed twice (goal 0: a step announced
completed before the kill must not run again; only the steps in flight may) and the time
from the kill to each run moving again (its ``run.resumed`` message).

    .venv/bin/python benchmarks/drill_crash.py [--batches 5] [--runs 10] [--dead-after 60]

Its own stack: a Prefect server under /tmp/drill-home, a bridge on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
PLANRUN = [sys.executable, "-m", "planrun.cli"]
HOME = Path("/tmp/drill-home")
ENDS = {"completed", "completed_with_errors", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plan(name: str, steps: int = 10, seconds: float = 0.4) -> str:
    lines = [f"version: 1\nname: {name}\nsteps:"]
    for i in range(1, steps + 1):
        needs = f", needs: [s{i - 1}]" if i > 1 else ""
        lines.append(f'  - {{id: s{i}, tool: shell.run{needs}, with: {{argv: [sh, -c, '
                     f'"echo s{i} >> {name}.txt; sleep {seconds}"]}}}}')
    return "\n".join(lines) + "\n"


def token() -> str:
    """The token ``planrun up`` made for its bridge (docs/http-api.md)."""
    return (HOME / "bridge.token").read_text().strip()  # this process has no PLANRUN_HOME


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def stream(url: str, run_id: str) -> list[dict[str, Any]]:
    from websockets.asyncio.client import connect

    got: list[dict[str, Any]] = []
    address = f"{url.replace('http', 'ws', 1)}/v1/runs/{run_id}/ws?after=0&token={token()}"
    async with connect(address, proxy=None) as ws, asyncio.timeout(30):
        while not got or got[-1]["type"] not in {f"run.{e}" for e in ENDS}:
            message = json.loads(await ws.recv())
            if message["type"] != "heartbeat":
                got.append(message)
    return got


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10, help="runs per batch")
    parser.add_argument("--dead-after", type=float, default=60.0)  # the default's
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    random.seed(args.seed)
    shutil.rmtree(HOME, ignore_errors=True)
    workspace = HOME / "workspace"
    workspace.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PLANRUN_HOME=str(HOME), PLANRUN_SERVER_PORT=str(free_port()),
               PLANRUN_WORKSPACE=str(workspace), PLANRUN_BRIDGE_URL=url,
               PLANRUN_DEAD_AFTER_S=str(args.dead_after))
    out = (HOME / "up.out").open("wb")
    up = subprocess.Popen([*PLANRUN, "up", "--port", str(port)], env=env, stdout=out,
                          stderr=subprocess.STDOUT, cwd=HOME)
    deadline = time.monotonic() + 120
    while "planrun is up" not in (HOME / "up.out").read_text():
        assert up.poll() is None and time.monotonic() < deadline, "planrun up did not start"
        time.sleep(0.2)
    results: list[dict[str, Any]] = []
    try:
        for batch in range(args.batches):
            runs: dict[str, str] = {}
            for i in range(args.runs):
                name = f"drill-{batch}-{i}"
                path = HOME / f"{name}.yaml"
                path.write_text(plan(name))
                done = subprocess.run([*PLANRUN, "submit", str(path)], env=env,
                                      capture_output=True, text=True, check=True)
                runs[done.stdout.strip()] = name
                time.sleep(0.3)
            time.sleep(random.uniform(0.5, 3.0))
            runner = next(c for c in psutil.Process(up.pid).children()
                          if "planrun.flows.serve" in " ".join(c.cmdline()))
            killed_at = time.time()
            os.killpg(runner.pid, signal.SIGKILL)  # the runner and every run it started
            for run_id, name in runs.items():
                results.append(follow(url, run_id, name, workspace, killed_at))
            print(f"batch {batch}: {sum(r['lost'] for r in results[-args.runs:])} lost",
                  flush=True)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    report(results, args)


def follow(url: str, run_id: str, name: str, workspace: Path,
           killed_at: float) -> dict[str, Any]:
    end = time.monotonic() + 300
    status = None
    while time.monotonic() < end:
        status = httpx.get(f"{url}/v1/runs/{run_id}", timeout=10,
                           headers={"Authorization": f"Bearer {token()}"}).json().get("status")
        if status in ENDS:
            break
        time.sleep(0.5)
    messages = asyncio.run(stream(url, run_id)) if status in ENDS else []
    done_before = {m["step_id"] for m in messages
                   if m["type"] == "step.completed" and epoch(m["ts"]) < killed_at}
    marks = (workspace / f"{name}.txt").read_text().split() \
        if (workspace / f"{name}.txt").exists() else []
    twice = sorted(s for s in done_before if marks.count(s) > 1)
    resumed = [epoch(m["ts"]) for m in messages if m["type"] == "run.resumed"]
    return {"run_id": run_id, "status": status, "lost": status != "completed",
            "completed_twice": twice, "reran": sorted({s for s in marks if marks.count(s) > 1}),
            "interrupted": bool(resumed),
            "moving_again_s": round(resumed[0] - killed_at, 2) if resumed else None,
            "seqs_ok": [m["seq"] for m in messages] == list(range(1, len(messages) + 1))}


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    waits = sorted(r["moving_again_s"] for r in results if r["moving_again_s"] is not None)
    summary = {
        "runs": len(results), "lost": sum(r["lost"] for r in results),
        "completed_steps_run_twice": sum(len(r["completed_twice"]) for r in results),
        "runs_interrupted_mid_run": sum(r["interrupted"] for r in results),
        "steps_in_flight_run_again": sum(len(r["reran"]) for r in results),
        "streams_gap_free": all(r["seqs_ok"] for r in results if not r["lost"]),
        "kill_to_moving_again_s": {
            "median": waits[len(waits) // 2] if waits else None,
            "max": waits[-1] if waits else None},
        "dead_after_s": args.dead_after,
    }
    print(json.dumps(summary, indent=2))
    bad = [r for r in results if r["lost"] or r["completed_twice"]]
    if bad:
        print("problems:", json.dumps(bad, indent=2))


if __name__ == "__main__":
    main()
