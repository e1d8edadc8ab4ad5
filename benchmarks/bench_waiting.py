"""What a waiting run costs (issue 12): N runs that each wait in one long step, held by
``planrun up`` with a process per run and with ``--in-process``, side by side.

    .venv/bin/python benchmarks/bench_waiting.py [--runs 50,200] [--workers 2]
        [--postgres postgresql://postgres@127.0.0.1:5432/test] [--json out.json]

For each mode a new stack (``bench_load.Stack``: a new ``PLANRUN_HOME``; with
``--postgres`` a new database, dropped afterwards), then for each N: N runs of one
``core.sleep`` of 10 minutes are submitted at once; once every one reports its step
running, the runners' process trees are measured (PSS and RSS: the runners, their fork
servers and run processes, summed), and the runs are cancelled. Reported: MB per waiting
run (the PSS's growth over the idle stack's, over N), the processes the runners hold,
and how long it took until every run waited. The machine should have nothing else to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import _common
import httpx
import psutil
from bench_load import Stack, drop_database, fresh_database

WAIT = """version: 1
name: waiting
steps:
  - {id: wait, tool: core.sleep, with: {seconds: 600}}
"""
ENDS = {"completed", "completed_with_errors", "failed", "cancelled"}


def memory(stack: Stack) -> tuple[float, float, int]:
    """The runners' trees: PSS MB, RSS MB (summed, so shared pages count once per
    process) and how many processes."""
    pss = rss = 0
    count = 0
    for runner in stack.runners():
        for process in [runner, *runner.children(recursive=True)]:
            try:
                info = process.memory_full_info()
            except psutil.Error:
                continue
            pss, rss, count = pss + info.pss, rss + info.rss, count + 1
    return pss / 2**20, rss / 2**20, count


async def one_round(stack: Stack, n: int) -> dict[str, Any]:
    idle_pss, idle_rss, idle_count = await asyncio.to_thread(memory, stack)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=stack.url, headers=_common.AUTH, timeout=120) as http:
        answers = await asyncio.gather(*(http.post("/v1/runs", json={"plan": WAIT})
                                         for _ in range(n)))
        runs = [a.json()["run_id"] for a in answers if a.status_code == 201]
        waiting: set[str] = set()
        deadline = time.monotonic() + 300 + 2 * n
        while len(waiting) < len(runs) and time.monotonic() < deadline:
            for run_id in [r for r in runs if r not in waiting]:
                report = (await http.get(f"/v1/runs/{run_id}")).json()
                if report.get("steps", {}).get("wait", {}).get("status") == "running":
                    waiting.add(run_id)
            await asyncio.sleep(1.0)
        took = time.monotonic() - started
        await asyncio.sleep(5)  # what starting them left behind settles
        pss, rss, count = await asyncio.to_thread(memory, stack)
        for run_id in runs:
            await http.post(f"/v1/runs/{run_id}/cancel")
        ended = 0
        deadline = time.monotonic() + 300
        while ended < len(runs) and time.monotonic() < deadline:
            ended = sum([(await http.get(f"/v1/runs/{r}")).json().get("status") in ENDS
                         for r in runs])
            await asyncio.sleep(2.0)
    return {"n": n, "submitted": len(runs), "waiting": len(waiting),
            "seconds_until_all_wait": took, "idle_pss_mb": idle_pss,
            "pss_mb": pss, "rss_sum_mb": rss, "processes": count - idle_count,
            "mb_per_waiting_run": (pss - idle_pss) / max(len(waiting), 1),
            "rss_mb_per_waiting_run": (rss - idle_rss) / max(len(waiting), 1),
            "cancelled_in_time": ended == len(runs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="50,200")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="process,in-process")
    parser.add_argument("--postgres")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    print(f"machine {_common.machine()}", flush=True)
    results = []
    for mode in args.modes.split(","):
        database = fresh_database(args.postgres) if args.postgres else None
        try:
            stack = Stack(database, args.workers, mode == "in-process")
            try:
                for n in [int(r) for r in args.runs.split(",")]:
                    row = asyncio.run(one_round(stack, n))
                    row["mode"] = mode
                    results.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                stack.stop()
        finally:
            if args.postgres and database:
                drop_database(args.postgres, database)
    print(_common.table(
        ["mode", "N", "waiting", "PSS MB / waiting run", "RSS MB / waiting run (summed)",
         "processes held", "s until all wait", "cancelled"],
        [[r["mode"], r["n"], r["waiting"], f"{r['mb_per_waiting_run']:.2f}",
          f"{r['rss_mb_per_waiting_run']:.1f}", r["processes"],
          f"{r['seconds_until_all_wait']:.0f}", r["cancelled_in_time"]] for r in results]),
          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
