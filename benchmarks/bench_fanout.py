"""Fan-out: 1,000 WebSocket clients of one progress bridge following one 200-step run.

    .venv/bin/python benchmarks/bench_fanout.py [--clients 1000] [--client-procs 2]
        [--steps 200] [--max-parallel 20] [--step-seconds 0.05 0.3] [--runs 2]
        [--no-compression] [--trace]
        [--client-kind raw|websockets] [--json out.json]

Against one Prefect server (``PREFECT_API_URL``, else planrun's local server under
``PLANRUN_HOME``, by default /tmp/bench-home, started if needed):

- the bridge, ``python -m planrun.progress_bridge``, runs as a subprocess with a new message log;
- a warm plan-running subprocess (``_plan_runner.serve_runs``) runs a plan of ``--steps``
  independent ``core.sleep`` steps of 0.05-0.3 s (``--step-seconds``, each drawn
  uniformly, seeded) with ``max_parallel: --max-parallel`` through
  ``planrun.runner.run_plan``. The default run offers ≈ 150k deliveries/s to 1,000
  clients, above what a plain broadcast sustains on 2 cores (≈ 90k/s, MEASURED.md);
  ``--step-seconds 0.3 1.0`` paces the same 200 steps as an LLM's tools would (≈ 7 s);
- ``--client-procs`` client processes hold ``--clients`` WebSocket clients in all,
  permessage-deflate offered as browsers do unless ``--no-compression``. By default
  (``--client-kind raw``) each is a bare asyncio connection that parses frames and inflates
  by hand, light as a browser's native client is; ``websockets`` uses that library's client
  (``proxy=None``, no pings), as the measurements before 2026-12-05 did. On 2 cores the
  clients' CPU is taken from the bridge, so the lighter clients leave it more.

Order, for each run: the runner starts the run and reports its id as soon as it is known
(after ``planrun.run.started`` is emitted, before the first step) and holds its engine;
every client then connects to ``/v1/runs/{id}/ws?after=0`` (so ``run.started`` comes from
the replay); only when all are connected does the run go on. Every message after
``run.started`` is therefore delivered live.

Each client reads until the run-end message and checks that it got seq 1..N with no gap
and no duplicate (heartbeats left out). Reported: deliveries per second (all clients'
messages from the go to the last client's run end, and the busiest second), latency =
client receive time (``time.time()``) - the message's ``ts`` (the time of the change: the
``occurred`` of planrun's event, millisecond resolution; ``run.started`` left out), the
bridge's RSS (psutil) before the clients connect, with them connected (``run.started``
replayed to each), at its peak during the run and after they left, its CPU, and the
``/metrics`` counters (dropped messages and slow disconnects must stay 0). Also: which
steps never got a ``step.running`` / end message, and the gaps in Prefect's stream the
bridge logged ("events a..b of run R are missing; reconciling").

Before the first run, the same clients connect to a run id with no messages and leave
again: the bridge's RSS then is the cost of idle connections. ``--trace`` runs the bridge
through ``_bridge.traced_bridge`` and adds how far its upstream fell behind Prefect's
stream, what handling each event cost, and the time from a message's commit to the first,
median and last client.

The client processes are in ``_fanout_clients.py``, what the parent watches beside them
(planrun's events, the bridge's RSS, CPU and counters) in ``_fanout_probes.py``, and the
trace breakdown, tables and JSON in ``_fanout_report.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from typing import Any

from _bridge import Bridge, start_bridge
from _common import (
    RUN_END_TYPES,
    Server,
    machine,
    other_prefect_servers,
    percentile,
    plan_data,
    setup,
    ts_epoch,
    wait_idle,
)
from _fanout_clients import Worker, client_worker
from _fanout_probes import PlanrunEvents, Sampler, counters, cpu_of
from _fanout_report import print_report, receipt_summary, trace_breakdown
from _plan_runner import PlanRunner

BIN_S = 0.1  # throughput histogram bin


def fanout_plan(steps: int, max_parallel: int, seconds: tuple[float, float] = (0.05, 0.3),
                seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    return {"version": 1, "name": "bench-fanout", "limits": {"max_parallel": max_parallel},
            "steps": [{"id": f"s{i:03d}", "tool": "core.sleep",
                       "with": {"seconds": round(rng.uniform(*seconds), 3)}}
                      for i in range(steps)]}


async def one_run(srv: Server, bridge: Bridge, runner: PlanRunner, data: dict[str, Any],
                  args: argparse.Namespace, subscriber: PlanrunEvents) -> dict[str, Any]:
    sizes = [args.clients // args.client_procs + (1 if i < args.clients % args.client_procs
                                                  else 0) for i in range(args.client_procs)]
    workers = [Worker(n, bridge.port, not args.no_compression, args.concurrency,
                      args.client_kind)
               for n in sizes]
    await asyncio.gather(*(w.start() for w in workers))
    before = await asyncio.to_thread(counters, bridge)
    rss_idle = await asyncio.to_thread(bridge.rss)

    run_id = await runner.start_run(data, hold=True)
    t_id = time.time()
    for w in workers:
        await w.send(run_id)
    connected = await asyncio.wait_for(asyncio.gather(*(w.answer("connected") for w in workers)),
                                       300)
    t_connected = time.time()
    n_connected = sum(c["connected"] for c in connected)
    await asyncio.sleep(1.0)
    health = await asyncio.to_thread(bridge.healthz)
    rss_connected = await asyncio.to_thread(bridge.rss)

    cpu0 = {"bridge": bridge.cpu_s(), "server": cpu_of(srv.pid),
            **{f"clients{i}": cpu_of(w.proc.pid) for i, w in enumerate(workers)}}
    import psutil

    psutil.cpu_percent(None)
    with Sampler(bridge) as sampler:
        t_go = time.time()
        await runner.go()
        done = await runner.finished()
        t_run_end = time.time()
        try:
            await asyncio.wait_for(asyncio.gather(*(w.answer("done") for w in workers)),
                                   args.drain_timeout)
        except TimeoutError:
            print(f"  clients still reading {args.drain_timeout:.0f} s after the run: "
                  "stopping them", flush=True)
            for w in workers:
                await w.send("stop")
            await asyncio.wait_for(asyncio.gather(*(w.answer("done") for w in workers)), 120)
        t_all = time.time()
        busy = psutil.cpu_percent(None)
        cpu1 = {"bridge": bridge.cpu_s(), "server": cpu_of(srv.pid),
                **{f"clients{i}": cpu_of(w.proc.pid) for i, w in enumerate(workers)}}
    results = [w.result() for w in workers]
    await asyncio.gather(*(w.close() for w in workers))
    await asyncio.sleep(1.0)
    after = await asyncio.to_thread(counters, bridge)
    rss_after = await asyncio.to_thread(bridge.rss)
    health_after = await asyncio.to_thread(bridge.healthz)

    clients = [c for r in results for c in r["clients"]]
    messages: dict[int, tuple[str, float, str | None]] = {}  # seq -> (type, ts, step id)
    for r in results:
        for seq, (kind, stamp, sid) in r["messages"].items():
            messages[int(seq)] = (kind, ts_epoch(stamp), sid)
    # When this process's subscriber got the planrun event behind each message (what the
    # bridge could have got it at, at best): for the upstream / fan-out breakdown.
    upstream_at: dict[int, tuple[float, float]] = {}  # seq -> (occurred, received)
    for seq, (kind, _, sid) in messages.items():
        if kind.startswith("step.") and sid is not None:
            got = subscriber.planrun.get((run_id, sid, kind.removeprefix("step.")))
        elif kind in RUN_END_TYPES:
            got = subscriber.planrun.get((run_id, None, kind.removeprefix("run.")))
        else:
            got = None
        if got is not None:
            upstream_at[seq] = got
    connected_at = max(r["connected_at"] for r in results)
    latencies: list[float] = []
    fanout: list[float] = []
    bins: dict[int, int] = {}
    last_receive = 0.0
    replayed = 0
    for r in results:
        for seq, received in zip(r["seqs"], r["times"], strict=True):
            key = int(received / BIN_S)
            bins[key] = bins.get(key, 0) + 1
            last_receive = max(last_receive, received)
            stamp = messages[seq][1]
            if stamp < connected_at:  # produced before every client was in: replayed
                replayed += 1
                continue
            latencies.append((received - stamp) * 1e3)
            if seq in upstream_at:
                fanout.append((received - upstream_at[seq][1]) * 1e3)
    upstream = [(got - occurred) * 1e3 for occurred, got in upstream_at.values()
                if occurred >= connected_at]
    last_seqs = sorted({c["last_seq"] for c in clients})
    n_messages = max(last_seqs, default=0)
    deliveries = sum(c["messages"] for c in clients)
    live = len(latencies)
    per_second = [sum(bins.get(k + j, 0) for j in range(int(1 / BIN_S)))
                  for k in sorted(bins)]
    end_seq = max((s for s, v in messages.items() if v[0] in RUN_END_TYPES), default=0)
    step_ts = [v[1] for v in messages.values() if v[0].startswith("step.")]
    kinds: dict[str, int] = {}
    for v in messages.values():
        kinds[v[0]] = kinds.get(v[0], 0) + 1
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    window = t_all - t_go
    step_ids = [step["id"] for step in data["steps"]]
    told = {(v[2], v[0]) for v in messages.values()}
    no_running = [sid for sid in step_ids if (sid, "step.running") not in told]
    no_end = [sid for sid in step_ids
              if not any((sid, k) in told for k in ("step.completed", "step.failed"))]
    # The bridge's own account of gaps in Prefect's stream during this run.
    gap_lines = [line.strip() for line in bridge.log.read_text().splitlines()
                 if run_id in line and "missing" in line]
    reconciled = [line.strip() for line in bridge.log.read_text().splitlines()
                  if "reconciled" in line]

    def dist(values: list[float]) -> dict[str, float]:
        return {"p50": percentile(values, 50), "p95": percentile(values, 95),
                "p99": percentile(values, 99), "max": max(values, default=float("nan")),
                "n": len(values)}

    return {
        "run_id": run_id, "status": done["done"], "clients": len(clients),
        "connected": n_connected, "connect_s": t_connected - t_id,
        "healthz_clients": health.get("clients"), "healthz_clients_after": health_after.get(
            "clients"),
        "messages": n_messages, "kinds": kinds,
        "clients_complete": sum(1 for c in clients if c["ended"] and c["missing"] == 0
                                and c["duplicates"] == 0 and c["last_seq"] == n_messages
                                and c["in_order"]),
        "clients_with_gaps": sum(1 for c in clients if c["missing"]),
        "clients_with_duplicates": sum(1 for c in clients if c["duplicates"]),
        "clients_out_of_order": sum(1 for c in clients if not c["in_order"]),
        "clients_not_ended": sum(1 for c in clients if not c["ended"]),
        "client_errors": sorted({str(c["error"] or c["closed"]) for c in clients
                                 if c["error"] or c["closed"]})[:5],
        "last_seqs": last_seqs[:5], "end_seq": end_seq,
        "deliveries": deliveries, "expected_deliveries": n_messages * len(clients),
        "replayed": replayed, "live": live,
        "run_wall_s": t_run_end - t_go,
        "step_span_s": (max(step_ts) - min(step_ts)) if step_ts else float("nan"),
        "drain_after_run_s": last_receive - t_run_end,
        "deliveries_per_s": live / (last_receive - t_go),
        "offered_per_s": (n_messages - 1) * len(clients) / (t_run_end - t_go),
        "peak_deliveries_per_s": max(per_second, default=0),
        "latency_ms": dist(latencies),
        # Prefect: planrun event received by this process's subscriber - occurred;
        # fan-out: client received - this process's subscriber received (step and run-end
        # messages).
        "upstream_ms": dist(upstream), "fanout_ms": dist(fanout),
        "rss_mb": {"idle": rss_idle / 2**20, "connected": rss_connected / 2**20,
                   "peak": sampler.peak / 2**20, "after": rss_after / 2**20},
        "cpu_s": cpu, "window_s": window, "machine_busy_pct": busy,
        "metrics_delta": {k: after[k] - before[k] for k in after},
        "metrics_after": after,
        "steps_without_running": no_running, "steps_without_end": no_end,
        "bridge_gap_warnings": gap_lines, "bridge_reconciled_lines": reconciled[-3:],
        "message_index": {seq: [v[0], v[2], v[1]] for seq, v in messages.items()},
        "t_go": t_go,
        "client_receipts": receipt_summary(results, messages),
    }


async def idle_probe(bridge: Bridge, args: argparse.Namespace) -> dict[str, float]:
    """The bridge's RSS with every client connected to a run that has no messages (nothing
    replayed, nothing sent): the cost of an idle connection."""
    sizes = [args.clients // args.client_procs + (1 if i < args.clients % args.client_procs
                                                  else 0) for i in range(args.client_procs)]
    workers = [Worker(n, bridge.port, not args.no_compression, args.concurrency,
                      args.client_kind)
               for n in sizes]
    await asyncio.gather(*(w.start() for w in workers))
    before = await asyncio.to_thread(bridge.rss)
    for w in workers:
        await w.send(f"idle-probe-{os.getpid()}")
    connected = await asyncio.wait_for(asyncio.gather(*(w.answer("connected") for w in workers)),
                                       300)
    await asyncio.sleep(2.0)
    during = await asyncio.to_thread(bridge.rss)
    for w in workers:
        await w.send("stop")
    await asyncio.wait_for(asyncio.gather(*(w.answer("done") for w in workers)), 120)
    for w in workers:
        w.result()
    await asyncio.gather(*(w.close() for w in workers))
    await asyncio.sleep(2.0)
    after = await asyncio.to_thread(bridge.rss)
    n = sum(c["connected"] for c in connected)
    return {"clients": n, "before_mb": before / 2**20, "connected_mb": during / 2**20,
            "after_mb": after / 2**20, "per_client_kb": (during - before) / max(n, 1) / 1024}


async def measure(srv: Server, bridge: Bridge,
                  args: argparse.Namespace) -> tuple[dict[str, float], list[dict[str, Any]]]:
    data = plan_data(fanout_plan(args.steps, args.max_parallel, tuple(args.step_seconds)))
    probe = await idle_probe(bridge, args)
    print(f"  idle clients: {probe['clients']} connected to a run with no messages: bridge RSS "
          f"{probe['before_mb']:.0f} -> {probe['connected_mb']:.0f} MB "
          f"({probe['per_client_kb']:.0f} KB a client); {probe['after_mb']:.0f} MB after they "
          "left", flush=True)
    subscriber = PlanrunEvents()
    await subscriber.start()
    runner = PlanRunner()
    await runner.start()
    results = []
    try:
        for i in range(args.runs):
            r = await one_run(srv, bridge, runner, data, args, subscriber)
            print(f"  run {i + 1}/{args.runs}: {r['status']}, {r['messages']} messages x "
                  f"{r['clients']} clients; complete {r['clients_complete']}; "
                  f"{r['deliveries_per_s']:.0f} deliveries/s; latency p50 "
                  f"{r['latency_ms']['p50']:.0f} ms p99 {r['latency_ms']['p99']:.0f} ms; "
                  f"dropped {r['metrics_delta']['dropped']:.0f}, slow "
                  f"{r['metrics_delta']['slow']:.0f}", flush=True)
            results.append(r)
            await asyncio.to_thread(wait_idle, srv)
    finally:
        subscriber.stop()
        await runner.close()
    return probe, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-parallel", type=int, default=20)
    parser.add_argument("--step-seconds", type=float, nargs=2, default=[0.05, 0.3],
                        metavar=("LO", "HI"), help="each step sleeps a uniform draw in [LO, HI]")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100,
                        help="handshakes in flight per client process")
    parser.add_argument("--no-compression", action="store_true",
                        help="clients do not offer permessage-deflate")
    parser.add_argument("--client-kind", choices=["raw", "websockets"], default="raw",
                        help="raw: frames parsed and inflated by hand on bare asyncio "
                             "connections (light, as a browser's C++ client); websockets: "
                             "the websockets library's client (≈ 3× the CPU a message)")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--port", type=int, help="the bridge's port (default: a free one)")
    parser.add_argument("--trace", action="store_true",
                        help="time the bridge's upstream (_bridge.traced_bridge)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(client_worker(args.worker, args.port, args.out, not args.no_compression,
                                  args.concurrency, args.client_kind))
        return 0

    started = time.monotonic()
    srv = setup()
    info = machine()
    info["other_prefect_servers"] = other_prefect_servers(srv)
    print(f"server {srv.url} (pid {srv.pid}); machine {info}", flush=True)
    bridge = start_bridge(srv, port=args.port, trace=args.trace)
    print(f"bridge {bridge.url} (pid {bridge.pid}, log {bridge.log}); RSS idle "
          f"{bridge.rss() / 2**20:.1f} MB", flush=True)
    try:
        probe, runs = asyncio.run(measure(srv, bridge, args))
    finally:
        bridge.stop()
    records = bridge.trace()
    for r in runs:
        if records:
            r["trace"] = trace_breakdown(records, r)
        del r["message_index"], r["client_receipts"]
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    print_report(args, info, probe, runs, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
