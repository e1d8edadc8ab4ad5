"""Many runs at once (issue 12): N concurrent runs of a 10-step chain submitted to
``planrun up`` through ``POST /v1/runs``, on the local SQLite server and on PostgreSQL,
process-per-run (planrun's runner: each run a fork of its fork server) and many runs per
process (``planrun up --in-process``: each runner executes its runs on its own loop).

    .venv/bin/python benchmarks/bench_load.py [--runs 10,50] [--step-s 0,1] [--workers 2]
        [--modes process,in-process] [--postgres postgresql://postgres@127.0.0.1:5432/test]
        [--baseline] [--json out.json]

For each backend and mode a new stack (``planrun up``, a new ``PLANRUN_HOME``; with
PostgreSQL a new database, dropped afterwards, and ``--database``), then for each N and
step length:
the N runs are submitted at once, each run's report is read until every run ended.
Reported per round:

- runs/min: N over the time from the first submit to the last run's end;
- steps/s: the steps completed over that time;
- submit → first step (p50, p99): the submit request to ``s1``'s ``started_at``;
- step start after its need (p50, p99): ``s<i>``'s ``started_at`` − ``s<i-1>``'s ``ended_at``;
- submits: how long ``POST /v1/runs`` took to answer (p50, p99); errors: submits not
  answered 201 (503s and no answer within 120 s counted apart), runs not ``completed``;
- memory per in-flight run: the runners' process trees' PSS (runners, fork servers, run
  processes), sampled every second; at the sample with the most runs in flight, what it
  grew by since before the round, over those runs (with 1 s steps, a run in flight mostly
  waits);
- CPU s per run: the machine's busy CPU time over the round (every process: the server,
  runners, runs, bridge and this script) over N; and that of the server, the runners
  (with their run processes) and the bridges apart.

``--baseline`` adds, after each round of the first mode and against the same server, the
same round of the
hand-written flow of ``handwritten_load.py`` (served the same way, submitted with
``run_deployment``): Prefect's own ceiling on this machine, so that planrun's figures are
a ratio to it.

The machine should have nothing else to do (BENCHMARKS.md says how loaded it was).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import _common
import httpx
import psutil

ENDS = {"completed", "completed_with_errors", "failed", "cancelled"}
#: A round stops waiting once its runs have not moved (no step started or ended, no run
#: ended) for this long; the runs it left are counted as ``stalled``.
STALL_S = 300.0


def chain(steps: int, seconds: float) -> str:
    lines = ["version: 1", "name: load-bench", "steps:"]
    for i in range(1, steps + 1):
        needs = f", needs: [s{i - 1}]" if i > 1 else ""
        lines.append(f"  - {{id: s{i}, tool: core.sleep{needs}, with: {{seconds: {seconds}}}}}")
    return "\n".join(lines) + "\n"


class Stack:
    """``planrun up`` in a new home; ``database``: its Prefect server's PostgreSQL."""

    def __init__(self, database: str | None, workers: int, in_process: bool,
                 redis: str | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="bench-load-"))
        self.port = _common.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PLANRUN_HOME": str(self.home), "PLANRUN_TOKEN": _common.TOKEN,
               "PLANRUN_SERVER_PORT": str(_common.free_port()),
               "PLANRUN_WORKSPACE": str(self.home / "workspace"),
               "PLANRUN_MAX_QUEUED": "100000",
               # One client address sends every submit and poll: no per-address limit.
               "PLANRUN_RATE_PER_S": "0"}
        env.pop("PREFECT_API_URL", None)
        args = ["--port", str(self.port), "--workers", str(workers),
                *(["--in-process"] if in_process else [])]
        if database:
            args += ["--database", database, *(["--redis", redis] if redis else [])]
        self.out = self.home / "up.out"
        with self.out.open("ab") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", "planrun.cli", "up", *args],
                                            env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while "planrun is up" not in self.out.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(self.out.read_text(errors="replace"))
            time.sleep(0.2)

    def api(self) -> str:
        """The stack's Prefect API, as ``planrun up`` printed it."""
        for line in self.out.read_text(errors="replace").splitlines():
            if line.strip().startswith("Prefect UI"):
                return line.split()[-1].rstrip("/") + "/api"
        raise SystemExit("planrun up printed no Prefect UI address")

    def runners(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.process.pid).children()
                if "planrun.flows.serve" in " ".join(p.cmdline())]

    def pss_mb(self) -> float:
        total = 0
        for runner in self.runners():
            for process in [runner, *runner.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss
                except psutil.Error:
                    pass
        return total / 2**20

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the stack's parts: the Prefect server, the runners (with
        their run processes, those that exited included) and the bridges."""
        parts: dict[str, list[psutil.Process]] = {"server": [], "runners": [], "bridges": []}
        for child in psutil.Process(self.process.pid).children():
            line = " ".join(child.cmdline())
            part = ("runners" if "planrun.flows.serve" in line else
                    "bridges" if "planrun.progress_bridge" in line else "server")
            parts[part].append(child)
        info = self.home / "server.json"  # the local server, when not the stack's child
        if info.exists() and not parts["server"]:
            parts["server"].append(psutil.Process(json.loads(info.read_text())["pid"]))
        return {part: sum(_cpu_s(p) for p in processes) for part, processes in parts.items()}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _cpu_s(process: psutil.Process) -> float:
    """The CPU seconds of ``process`` and its descendants, the exited ones it waited for
    included."""
    total = 0.0
    for one in [process, *process.children(recursive=True)]:
        try:
            times = one.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def busy_s() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


async def one_round(stack: Stack, n: int, steps: int, seconds: float) -> dict[str, Any]:
    plan = chain(steps, seconds)
    idle_mb = await asyncio.to_thread(stack.pss_mb)
    parts0 = stack.cpu_s()
    cpu0, started = busy_s(), time.time()
    async with httpx.AsyncClient(base_url=stack.url, headers=_common.AUTH, timeout=120) as http:
        async def submit() -> tuple[float, int, str | None, float]:
            sent = time.time()
            try:
                answer = await http.post("/v1/runs", json={"plan": plan})
            except httpx.TimeoutException:
                return sent, 0, None, time.time() - sent  # 0: no answer within the timeout
            run_id = answer.json().get("run_id") if answer.status_code == 201 else None
            return sent, answer.status_code, run_id, time.time() - sent

        submitted = await asyncio.gather(*(submit() for _ in range(n)))
        runs = {run_id: sent for sent, _, run_id, _ in submitted if run_id}
        reports: dict[str, dict[str, Any]] = {}
        memory: list[tuple[int, float]] = []  # (runs in flight, PSS MB)
        report_errors = 0  # GET /v1/runs/{id} not answered 200
        deadline = time.monotonic() + 600 + n * steps * (seconds + 1)
        # A round stops waiting once no step has started or ended for STALL_S: a run left
        # Running that nothing will end (once kept a round waiting toward its deadline).
        last_change, moved = time.monotonic(), None
        while len(reports) < len(runs) and time.monotonic() < deadline \
                and time.monotonic() - last_change < STALL_S:
            in_flight, progress = 0, 0
            for run_id in [r for r in runs if r not in reports]:
                answer = await http.get(f"/v1/runs/{run_id}")
                if answer.status_code != 200:
                    report_errors += 1
                    continue
                report = answer.json()
                progress += sum(1 for step in report.get("steps", {}).values()
                                if step.get("status") != "pending")
                progress += sum(1 for step in report.get("steps", {}).values()
                                if step.get("ended_at"))
                if report.get("status") in ENDS:
                    reports[run_id] = report
                elif report.get("status") == "running":
                    in_flight += 1
            if (len(reports), progress) != moved:
                moved, last_change = (len(reports), progress), time.monotonic()
            if in_flight:
                memory.append((in_flight, await asyncio.to_thread(stack.pss_mb)))
            await asyncio.sleep(1.0)
    cpu = busy_s() - cpu0
    parts = {part: (spent - parts0.get(part, 0.0)) / n for part, spent in stack.cpu_s().items()}
    first_step, after_need, ends = [], [], []
    completed = 0
    for run_id, report in reports.items():
        completed += report.get("status") == "completed"
        ends.append(_common.ts_epoch(report["ended_at"]))
        s = report["steps"]
        if s.get("s1", {}).get("started_at"):
            first_step.append((_common.ts_epoch(s["s1"]["started_at"]) - runs[run_id]) * 1e3)
        for i in range(2, steps + 1):
            here, need = s.get(f"s{i}", {}), s.get(f"s{i - 1}", {})
            if here.get("started_at") and need.get("ended_at"):
                after_need.append((_common.ts_epoch(here["started_at"])
                                   - _common.ts_epoch(need["ended_at"])) * 1e3)
    span = (max(ends) - started) if ends else float("nan")
    peak = max(memory, default=(0, 0.0))
    # How the runs that did not complete ended: their status and reason, and their steps'
    # errors (the three most frequent of each).
    statuses = Counter(f"{r.get('status')}: {r.get('reason')}" for r in reports.values()
                       if r.get("status") != "completed")
    errors = Counter(str(step["error"].get("message"))[:160] for r in reports.values()
                     for step in r.get("steps", {}).values() if step.get("error"))
    codes = [code for _, code, _, _ in submitted]
    answered = [took * 1e3 for _, code, _, took in submitted if code]
    return {"n": n, "step_s": seconds, "span_s": span,
            "runs_per_min": len(ends) / span * 60 if ends else 0.0,
            "steps_per_s": completed * steps / span if ends else 0.0,
            "first_step_ms": _dist(first_step), "after_need_ms": _dist(after_need),
            "submit_errors": sum(1 for c in codes if c != 201),
            "submit_503": sum(1 for c in codes if c == 503),
            "submit_timeouts": sum(1 for c in codes if c == 0),
            "submit_codes": {str(c): codes.count(c) for c in sorted(set(codes))},
            "submit_answer_ms": _dist(answered),
            "not_completed": n - completed, "report_errors": report_errors,
            "stalled": len(runs) - len(reports),
            "peak_in_flight": peak[0],
            "mb_per_run": (peak[1] - idle_mb) / peak[0] if peak[0] else float("nan"),
            "idle_mb": idle_mb,
            "cpu_s_per_run": cpu / n, "cpu_s_per_run_by_part": parts,
            "not_completed_as": dict(statuses.most_common(3)),
            "not_completed_ids": [run_id for run_id, r in reports.items()
                                  if r.get("status") != "completed"][:20],
            "step_errors": dict(errors.most_common(3))}


async def baseline_round(api: str, n: int, steps: int, seconds: float) -> dict[str, Any]:
    """The same round for ``handwritten_load.py``'s flow, through Prefect alone."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        return await _baseline_round(n, steps, seconds)


async def _baseline_round(n: int, steps: int, seconds: float) -> dict[str, Any]:
    from handwritten_load import DEPLOYMENT_PATH
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    cpu0, started = busy_s(), time.time()
    sent: dict[Any, float] = {}
    refused: list[int] = []  # the server's status, 0: no answer

    async def submit() -> None:
        at = time.time()
        try:
            flow_run = await run_deployment(DEPLOYMENT_PATH, timeout=0, as_subflow=False,
                                            parameters={"steps": steps, "seconds": seconds})
        except PrefectHTTPStatusError as exc:
            refused.append(exc.response.status_code)
            return
        except httpx.TimeoutException:
            refused.append(0)
            return
        sent[flow_run.id] = at

    await asyncio.gather(*(submit() for _ in range(n)))
    ended: dict[Any, Any] = {}
    deadline = time.monotonic() + 600 + n * steps * (seconds + 1)
    async with get_client() as client:
        while len(ended) < len(sent) and time.monotonic() < deadline:
            flow_runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=list(sent))), limit=n)
            for flow_run in flow_runs:
                if flow_run.state is not None and flow_run.state.is_final():
                    ended[flow_run.id] = flow_run
            await asyncio.sleep(1.0)
    cpu = busy_s() - cpu0
    ends = [f.end_time.timestamp() for f in ended.values() if f.end_time]
    starts = [(f.start_time.timestamp() - sent[f.id]) * 1e3 for f in ended.values()
              if f.start_time]
    completed = sum(1 for f in ended.values() if f.state and f.state.is_completed())
    span = (max(ends) - started) if ends else float("nan")
    return {"n": n, "step_s": seconds, "span_s": span, "backend": "",
            "runs_per_min": len(ends) / span * 60 if ends else 0.0,
            "steps_per_s": completed * steps / span if ends else 0.0,
            "first_step_ms": _dist(starts), "after_need_ms": _dist([]),
            "submit_errors": len(refused), "submit_503": refused.count(503),
            "submit_timeouts": refused.count(0),
            "submit_answer_ms": _dist([]), "not_completed": n - completed,
            "peak_in_flight": 0, "mb_per_run": float("nan"), "cpu_s_per_run": cpu / n}


def serve_baseline(api: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PREFECT_API_URL": api}
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name(
        "handwritten_load.py"))], env=env, cwd=Path(__file__).parent,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while httpx.get(f"{api}/deployments/name/handwritten-load/load",
                    timeout=10).status_code != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the hand-written flow's runner did not start")
        time.sleep(0.5)
    return process


def _dist(values: list[float]) -> dict[str, float]:
    return {"p50": _common.percentile(values, 50), "p99": _common.percentile(values, 99),
            "n": len(values)}


def fresh_database(base: str) -> str:
    import psycopg

    name = f"planrun_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(base)._replace(path=f"/{name}"))


def drop_database(base: str, url: str) -> None:
    import psycopg

    name = urlsplit(url).path.strip("/")
    with psycopg.connect(base, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def load_rounds(args: argparse.Namespace, label: str, base: str | None, in_process: bool,
                baseline: bool) -> list[dict[str, Any]]:
    """Every round on a new stack (on a new database made on ``base``, if given); with
    ``baseline``, each followed by the hand-written flow's round on the same server."""
    results = []
    database = fresh_database(base) if base else None
    try:
        stack = Stack(database, args.workers, in_process, args.redis if base else None)
        api = stack.api()
        reference = serve_baseline(api) if baseline else None
        try:
            for seconds in [float(s) for s in args.step_s.split(",")]:
                for n in [int(r) for r in args.runs.split(",")]:
                    row = asyncio.run(one_round(stack, n, args.steps, seconds))
                    row["backend"] = label
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    if reference is None:
                        continue
                    row = asyncio.run(baseline_round(api, n, args.steps, seconds))
                    row["backend"] = f"{label.split(',')[0]}, hand-written Prefect"
                    results.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            if reference is not None:
                reference.terminate()
                reference.wait(30)
            stack.stop()
    finally:
        if base and database:
            drop_database(base, database)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="10,50")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-s", default="0,1")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="process,in-process",
                        help="process: a process per run; in-process: runs on the runner's loop")
    parser.add_argument("--postgres", help="also on PostgreSQL: a server URL (a database is "
                        "made and dropped on it)")
    parser.add_argument("--only-postgres", action="store_true")
    parser.add_argument("--redis", help="with --postgres: the stack's Prefect server uses "
                        "Redis messaging (planrun up --redis URL), e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--baseline", action="store_true",
                        help="after each round of the first mode, the same round of "
                        "handwritten_load.py's flow")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    backends: list[tuple[str, str | None]] = [] if args.only_postgres else [("sqlite", None)]
    if args.postgres:
        backends.append(("postgresql + redis" if args.redis else "postgresql", args.postgres))
    print(f"machine {_common.machine()}", flush=True)
    results = []
    modes = args.modes.split(",")
    for name, base in backends:
        for mode in modes:
            baseline = args.baseline and mode == modes[0]
            results += load_rounds(args, f"{name}, {mode}", base, mode == "in-process",
                                   baseline)
    print(_common.table(
        ["backend", "N", "step s", "runs/min", "steps/s", "submit answered p50 / p99 ms",
         "submit→s1 p50 / p99 ms", "after need p50 / p99 ms", "errors (503, timeouts)",
         "not completed (stalled)", "MB / run in flight (runs)",
         "CPU s / run (server, runners, bridges)"],
        [[r["backend"], r["n"], r["step_s"], f"{r['runs_per_min']:.0f}",
          f"{r['steps_per_s']:.1f}",
          f"{r['submit_answer_ms']['p50']:.0f} / {r['submit_answer_ms']['p99']:.0f}",
          f"{r['first_step_ms']['p50']:.0f} / {r['first_step_ms']['p99']:.0f}",
          f"{r['after_need_ms']['p50']:.0f} / {r['after_need_ms']['p99']:.0f}",
          f"{r['submit_errors']} ({r['submit_503']}, {r['submit_timeouts']})",
          f"{r['not_completed']} ({r.get('stalled', 0)})",
          f"{r['mb_per_run']:.0f} ({r['peak_in_flight']})",
          f"{r['cpu_s_per_run']:.1f}" + ("" if "cpu_s_per_run_by_part" not in r else
                                         " ({server:.2f}, {runners:.2f}, {bridges:.2f})".format(
                                             **r["cpu_s_per_run_by_part"]))]
         for r in results]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
