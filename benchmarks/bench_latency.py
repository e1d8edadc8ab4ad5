"""Latency from a step's state change to a WebSocket client of the progress bridge, beside
Prefect's own events subscriber in the same run.

    .venv/bin/python benchmarks/bench_latency.py [--runs 6] [--shape 4x10 --shape 20x2]
        [--trace] [--json out.json]

Against one Prefect server (``PREFECT_API_URL``, else planrun's local server under
``PLANRUN_HOME``, by default /tmp/bench-home, started if needed):

- the bridge, ``python -m planrun.progress_bridge``, runs as a subprocess with a new message log;
- a warm plan-running subprocess runs each plan through ``planrun.runner.run_plan``
  (``_plan_runner.serve_runs``). Two shapes of 40 ``core.sleep`` steps of 0.05-0.2 s, run
  round-robin: 4x10 (4 parallel chains of 10: the changes are spread out) and 20x2 (20
  chains of 2, ``max_parallel`` 20: 20 steps start together, then finish in bursts);
- this process holds only the receivers, on one event loop, each stamping the wall-clock
  time (``time.time()``) it gets a message:
  (a) a raw Prefect subscriber: ``get_events_subscriber`` with
      ``EventFilter(event=EventNameFilter(prefix=["prefect.task-run."]))``,
      ``reconnection_attempts=0``;
  (b) a WebSocket client of the bridge on ``/v1/runs/{run_id}/ws?after=0``, connected as
      soon as the runner reports the run id: the runner then holds its engine (before the
      first step) until the client is connected;
  (c) for the breakdown only, a second raw subscriber to planrun's own events
      (``prefix=["planrun."]``), which are what the bridge follows.
  The receivers are in ``_latency_receivers.py``.

For every step change (running, completed), t0 = ``occurred`` of Prefect's task-run state
event (``prefect.task-run.Running`` / ``.Completed`` of the task run named by the step id,
related to the flow run ``prefect.flow-run.<run_id>``); latency_prefect = (a)'s receive
time - t0; latency_bridge = (b)'s receive time of the matching ``step.running`` /
``step.completed`` - t0. p50/p95/p99 over every change of every measured run of a shape
(one warm-up run of each is not counted), and of the per-change difference (what the
bridge adds). Runs are separated by a pause until the Prefect server is idle.

Breakdown of latency_bridge: engine = ``occurred`` of planrun's ``planrun.step.<status>``
event - t0 (the engine emits it after Prefect's state change); Prefect = (c)'s receive time
- that ``occurred``; bridge = (b)'s receive time - (c)'s receive time (the bridge's own
subscription, view, estimate, SQLite commit and send). ``--trace`` runs the bridge through
``_bridge.traced_bridge`` and splits that last part further.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

from _bridge import Bridge, start_bridge
from _common import (
    Server,
    machine,
    median,
    other_prefect_servers,
    percentile,
    plan_data,
    setup,
    table,
    wait_idle,
)
from _latency_receivers import Receivers, WsClient
from _plan_runner import PlanRunner

SLEEPS = (0.05, 0.2, 0.1, 0.15)
KINDS = (("running", "Running", "step.running"), ("completed", "Completed", "step.completed"))
GOAL_MS = 10.0  # the bridge's added latency at p50 over Prefect's own subscriber


def latency_plan(chains: int, per: int) -> dict[str, Any]:
    """``chains`` parallel chains of ``per`` ``core.sleep`` steps (0.05-0.2 s, staggered)."""
    out: list[dict[str, Any]] = []
    for c in range(chains):
        for i in range(per):
            step: dict[str, Any] = {"id": f"c{c}s{i}", "tool": "core.sleep",
                                    "with": {"seconds": SLEEPS[(i + c) % len(SLEEPS)]}}
            if i:
                step["needs"] = [f"c{c}s{i - 1}"]
            out.append(step)
    return {"version": 1, "name": f"bench-latency-{chains}x{per}",
            "limits": {"max_parallel": chains},
            "steps": out}


async def one_run(runner: PlanRunner, bridge: Bridge, receivers: Receivers,
                  data: dict[str, Any]) -> dict[str, Any]:
    run_id = await runner.start_run(data, hold=True)
    client = WsClient(bridge, run_id)
    await client.connect()
    await runner.go()
    done = await runner.finished()
    if done["done"] != "completed":
        raise RuntimeError(f"the run ended {done['done']}: {done.get('reason')}")
    step_ids = [s["id"] for s in data["steps"]]
    await asyncio.wait_for(client.ended.wait(), 60)
    wanted = {(run_id, s, state) for s in step_ids for _, state, _ in KINDS}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not wanted <= receivers.task_runs.keys():
        await asyncio.sleep(0.05)

    samples: list[dict[str, Any]] = []
    missing: dict[str, int] = defaultdict(int)
    for step in step_ids:
        for kind, state, msg_type in KINDS:
            prefect = receivers.task_runs.get((run_id, step, state))
            ws = client.first.get((step, msg_type))
            planrun = receivers.planrun.get((run_id, step, kind))
            if prefect is None:
                missing["prefect task-run event"] += 1
            if ws is None:
                missing["bridge message"] += 1
            if prefect is None or ws is None:
                continue
            t0, prefect_received = prefect
            sample = {"step": step, "kind": kind, "prefect_ms": (prefect_received - t0) * 1e3,
                      "bridge_ms": (ws - t0) * 1e3}
            sample["added_ms"] = sample["bridge_ms"] - sample["prefect_ms"]
            sample["ws_received"] = ws
            if planrun is not None:
                occurred, received = planrun
                sample["planrun_received"] = received
                sample["engine_ms"] = (occurred - t0) * 1e3
                sample["planrun_prefect_ms"] = (received - occurred) * 1e3
                sample["bridge_own_ms"] = (ws - received) * 1e3
            else:
                missing["planrun event (breakdown)"] += 1
            samples.append(sample)
    return {"run_id": run_id, "samples": samples, "missing": dict(missing),
            "ws": client.check(), "wall_s": done["t1"] - done["t0"]}


def trace_breakdown(records: list[dict[str, Any]],
                    runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Split the bridge's part with the trace of its upstream: when its own subscription
    handed it planrun's event (against this process's subscriber), how long ``handle`` took
    (estimate, view JSON, SQLite commit within it), and from its end to the WebSocket."""
    by_key = {(r["run_id"], r["step_id"], r["status"]): r for r in records
              if r["new"] and r["event"].startswith("planrun.step.")}
    parts: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for s in run["samples"]:
            r = by_key.get((run["run_id"], s["step"], s["kind"]))
            if r is None or "planrun_received" not in s:
                continue
            parts["bridge's subscription got the event - occurred"].append(
                (r["enter"] - r["occurred"]) * 1e3)
            parts["  (this process's subscriber: received - occurred)"].append(
                s["planrun_prefect_ms"])
            parts["handle(): the event -> message committed and queued"].append(
                (r["exit"] - r["enter"]) * 1e3)
            parts["  of which RunView.estimate"].append(r.get("estimate_ms", 0.0))
            parts["  of which RunView.to_json"].append(r.get("to_json_ms", 0.0))
            parts["  of which MessageStore.commit"].append(r.get("commit_ms", 0.0))
            parts["end of handle() -> WebSocket client received"].append(
                (s["ws_received"] - r["exit"]) * 1e3)
    return {k: stats(v) for k, v in parts.items()}


def stats(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": max(values, default=float("nan")),
            "n": len(values)}


def parse_shape(text: str) -> tuple[int, int]:
    chains, _, length = text.partition("x")
    return int(chains), int(length)


async def measure(srv: Server, bridge: Bridge, args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    plans = {shape: plan_data(latency_plan(*parse_shape(shape))) for shape in args.shape}
    receivers = Receivers()
    receivers.start()
    await receivers.wait_ready()
    runner = PlanRunner()
    await runner.start()
    runs: dict[str, list[dict[str, Any]]] = {shape: [] for shape in args.shape}
    busy: list[float] = []
    try:
        for rep in range(-args.warmup, args.runs):
            for shape, data in plans.items():  # round-robin: the load falls on every shape
                psutil.cpu_percent(None)
                result = await one_run(runner, bridge, receivers, data)
                result["busy_pct"] = psutil.cpu_percent(None)
                label = f"run {rep + 1}/{args.runs}" if rep >= 0 else "warm-up"
                pick = result["samples"]
                print(f"  {shape} {label}: {len(pick)} changes, run {result['wall_s']:.2f} s, "
                      f"Prefect p50 {percentile([x['prefect_ms'] for x in pick], 50):.1f} ms, "
                      f"bridge p50 {percentile([x['bridge_ms'] for x in pick], 50):.1f} ms, "
                      f"added p50 {percentile([x['added_ms'] for x in pick], 50):.1f} ms; "
                      f"CPU busy {result['busy_pct']:.0f} %; ws {result['ws']}; "
                      f"unmatched {result['missing'] or 'none'}", flush=True)
                if rep >= 0:
                    runs[shape].append(result)
                    busy.append(result["busy_pct"])
                await asyncio.to_thread(wait_idle, srv)
    finally:
        receivers.stop()
        await runner.close()
    return {"runs": runs, "busy": busy, "subscriber_duplicates": receivers.duplicates}


ROWS = (
    ("Prefect subscriber: task-run event received - occurred", "prefect_ms"),
    ("bridge WebSocket: step message received - task-run event occurred", "bridge_ms"),
    ("added by the bridge path, per change (bridge - Prefect subscriber)", "added_ms"),
    ("  1 engine: planrun event occurred - task-run event occurred", "engine_ms"),
    ("  2 Prefect: planrun event received by a subscriber here - occurred",
     "planrun_prefect_ms"),
    ("  3 bridge: WebSocket received - planrun event received here", "bridge_own_ms"),
)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [s for run in runs for s in run["samples"]]
    summary: dict[str, Any] = {key: stats([s[key] for s in samples if key in s])
                               for _, key in ROWS}
    summary["by_kind"] = {kind: {key: stats([s[key] for s in samples
                                             if s["kind"] == kind and key in s])
                                 for _, key in ROWS} for kind, _, _ in KINDS}
    summary["added_p50_per_run"] = [percentile([s["added_ms"] for s in r["samples"]], 50)
                                    for r in runs]
    summary["prefect_p50_per_run"] = [percentile([s["prefect_ms"] for s in r["samples"]], 50)
                                      for r in runs]
    summary["bridge_p50_per_run"] = [percentile([s["bridge_ms"] for s in r["samples"]], 50)
                                     for r in runs]
    summary["ws_duplicates"] = sum(r["ws"]["duplicates"] for r in runs)
    summary["ws_gaps"] = sum(r["ws"]["missing"] for r in runs)
    missing: dict[str, int] = defaultdict(int)
    for r in runs:
        for k, v in r["missing"].items():
            missing[k] += v
    summary["unmatched"] = dict(missing)
    summary["changes"] = len(samples)
    summary["busy_pct_median"] = median([r["busy_pct"] for r in runs]) if runs else None
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=6, help="measured runs of each shape")
    parser.add_argument("--warmup", type=int, default=1, help="runs of each shape not counted")
    parser.add_argument("--shape", action="append", metavar="CHAINSxLENGTH",
                        help="parallel chains x steps per chain (repeatable); default 4x10 "
                             "(changes spread out) and 20x2 (20 steps change together)")
    parser.add_argument("--port", type=int, help="the bridge's port (default: a free one)")
    parser.add_argument("--trace", action="store_true",
                        help="time the bridge's upstream (_bridge.traced_bridge) and split "
                             "its part of the latency")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    args.shape = args.shape or ["4x10", "20x2"]

    started = time.monotonic()
    srv = setup()
    info = machine()
    info["other_prefect_servers"] = other_prefect_servers(srv)
    print(f"server {srv.url} (pid {srv.pid}); machine {info}", flush=True)
    bridge = start_bridge(srv, port=args.port, trace=args.trace)
    print(f"bridge {bridge.url} (pid {bridge.pid}, log {bridge.log})", flush=True)
    try:
        result = asyncio.run(measure(srv, bridge, args))
        bridge_metrics = bridge.metrics()
    finally:
        bridge.stop()
    records = bridge.trace()
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    line: dict[str, Any] = {"benchmark": "latency", "runs": args.runs, "shapes": {}}
    summaries: dict[str, Any] = {}
    for shape, runs in result["runs"].items():
        chains, length = parse_shape(shape)
        summary = summaries[shape] = summarize(runs)
        if records:
            summary["trace"] = trace_breakdown(records, runs)
        print()
        print(f"Shape {shape}: {chains} parallel chains x {length} core.sleep steps "
              f"(0.05-0.2 s), max_parallel {chains}; {len(runs)} runs, "
              f"{summary['changes']} changes (running + completed); ms; CPU busy "
              f"{summary['busy_pct_median']:.0f} % (median)")
        print(table(["measure", "p50", "p95", "p99", "max", "n"],
                    [[label, f"{summary[key]['p50']:.1f}", f"{summary[key]['p95']:.1f}",
                      f"{summary[key]['p99']:.1f}", f"{summary[key]['max']:.1f}",
                      summary[key]["n"]] for label, key in ROWS]))
        print(table(["change", "Prefect p50", "bridge p50", "added p50", "added p95",
                     "1 engine p50", "2 Prefect p50", "3 bridge p50"],
                    [[kind, *(f"{v[key]['p50']:.1f}" for key in ("prefect_ms", "bridge_ms",
                                                                 "added_ms")),
                      f"{v['added_ms']['p95']:.1f}",
                      *(f"{v[key]['p50']:.1f}" for key in ("engine_ms", "planrun_prefect_ms",
                                                           "bridge_own_ms"))]
                     for kind, v in summary["by_kind"].items()]))
        if records:
            print(table(["inside the bridge (--trace)", "p50", "p95", "p99", "max", "n"],
                        [[label, f"{v['p50']:.2f}", f"{v['p95']:.2f}", f"{v['p99']:.2f}",
                          f"{v['max']:.2f}", v["n"]] for label, v in summary["trace"].items()]))
        added = summary["added_ms"]["p50"]
        print(f"added by the bridge at p50: {added:.1f} ms (per run: "
              f"{' '.join(f'{x:.1f}' for x in summary['added_p50_per_run'])}); goal < "
              f"{GOAL_MS:.0f} ms: {'MET' if added < GOAL_MS else 'MISSED'}. WebSocket: "
              f"duplicates {summary['ws_duplicates']}, gaps {summary['ws_gaps']}; unmatched "
              f"changes: {summary['unmatched'] or 'none'}")
        line["shapes"][shape] = {
            "changes": summary["changes"],
            **{f"{key}_{p}": round(summary[key][p], 2) for _, key in ROWS
               for p in ("p50", "p95", "p99")},
            "added_p50_per_run_ms": [round(x, 2) for x in summary["added_p50_per_run"]],
            "ws_duplicates": summary["ws_duplicates"], "ws_gaps": summary["ws_gaps"],
            "unmatched": summary["unmatched"], "busy_pct": summary["busy_pct_median"]}
        if records:
            line["shapes"][shape]["trace_p50_ms"] = {k.strip(): round(v["p50"], 2)
                                                     for k, v in summary["trace"].items()}
    print()
    print(f"subscriber duplicates {result['subscriber_duplicates']}; bridge dropped "
          f"{bridge_metrics.get('planrun_bridge_messages_dropped_total', 0):.0f}, slow "
          f"disconnects {bridge_metrics.get('planrun_bridge_slow_disconnects_total', 0):.0f}; "
          f"benchmark took {time.monotonic() - started:.0f} s; load average at end "
          f"{info['loadavg_end']}")
    line["loadavg_end"] = info["loadavg_end"]
    print(json.dumps(line))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "summaries": summaries, "runs": result["runs"],
                       "bridge_metrics": bridge_metrics}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
