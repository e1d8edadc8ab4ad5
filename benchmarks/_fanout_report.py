"""bench_fanout.py's results: the clients' receipts per message and the breakdown of
``--trace`` (:func:`receipt_summary`, :func:`trace_breakdown`), and the printed tables, the
JSON line and the ``--json`` file (:func:`print_report`).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from _common import median, percentile, table


def receipt_summary(results: list[dict[str, Any]],
                    messages: dict[int, tuple[str, float, str | None]]) -> dict[int, list[float]]:
    """Per seq: the first, median and last receipt time over every client (for the trace)."""
    by_seq: dict[int, list[float]] = {}
    for r in results:
        for seq, received in zip(r["seqs"], r["times"], strict=True):
            by_seq.setdefault(seq, []).append(received)
    out = {}
    for seq, times in by_seq.items():
        times.sort()
        out[seq] = [times[0], times[len(times) // 2], times[-1]]
    return out


def trace_breakdown(records: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """From the trace of the bridge's upstream: how late it took each of the run's events
    (its subscription's backlog), what ``handle`` cost, and from the message's commit to
    the first, median and last client."""
    mine = [r for r in records if r["run_id"] == run["run_id"] and r["new"]
            and r["event"].startswith("planrun.")]
    by_key = {(r["step_id"], r["status"]): r for r in mine}
    after_commit: dict[str, list[float]] = {"first": [], "median": [], "last": []}
    for seq, (kind, step, _) in run["message_index"].items():
        if not kind.startswith("step."):
            continue
        r = by_key.get((step, kind.removeprefix("step.")))
        got = run["client_receipts"].get(seq)
        if r is None or got is None:
            continue
        for name, t in zip(("first", "median", "last"), got, strict=True):
            after_commit[name].append((t - r["exit"]) * 1e3)

    def dist(values: list[float]) -> dict[str, float]:
        return {"p50": percentile(values, 50), "p99": percentile(values, 99),
                "max": max(values, default=float("nan")), "n": len(values)}

    live = [r for r in mine if r["occurred"] >= run["t_go"] - 1]
    return {
        "upstream_lag_ms": dist([(r["enter"] - r["occurred"]) * 1e3 for r in live]),
        "handle_ms": dist([(r["exit"] - r["enter"]) * 1e3 for r in live]),
        "handle_cpu_ms_total": sum(r["cpu_ms"] for r in live),
        "estimate_ms": dist([r.get("estimate_ms", 0.0) for r in live]),
        "estimate_ms_total": sum(r.get("estimate_ms", 0.0) for r in live),
        "commit_to_first_client_ms": dist(after_commit["first"]),
        "commit_to_median_client_ms": dist(after_commit["median"]),
        "commit_to_last_client_ms": dist(after_commit["last"]),
    }


def print_report(args: argparse.Namespace, info: dict[str, Any], probe: dict[str, float],
                 runs: list[dict[str, Any]], started: float) -> None:
    """Print the tables and the JSON line of the runs; with ``--json``, also write it all."""
    rows = []
    for i, r in enumerate(runs, 1):
        lat, rss, d = r["latency_ms"], r["rss_mb"], r["metrics_delta"]
        rows.append([
            i, f"{r['clients_complete']} / {r['clients']}", r["messages"],
            f"{r['deliveries']} / {r['expected_deliveries']}",
            f"{r['run_wall_s']:.1f}", f"{r['drain_after_run_s']:.2f}",
            f"{r['deliveries_per_s'] / 1e3:.1f}k", f"{r['peak_deliveries_per_s'] / 1e3:.1f}k",
            f"{lat['p50']:.0f}", f"{lat['p95']:.0f}", f"{lat['p99']:.0f}", f"{lat['max']:.0f}",
            f"{rss['idle']:.0f} / {rss['connected']:.0f} / {rss['peak']:.0f}",
            f"{r['cpu_s']['bridge']:.1f} of {r['window_s']:.1f}",
            f"{d['dropped']:.0f} / {d['slow']:.0f}"])
    lo, hi = args.step_seconds
    print()
    print(f"Fan-out: {args.clients} WebSocket clients in {args.client_procs} processes, one run "
          f"of {args.steps} core.sleep steps ({lo:g}-{hi:g} s, max_parallel {args.max_parallel}); "
          f"compression {'off' if args.no_compression else 'permessage-deflate'}")
    print(table(["run", "clients complete", "messages", "deliveries", "run s",
                 "last delivery after run end s", "deliveries/s", "busiest 1 s",
                 "latency p50 ms", "p95", "p99", "max",
                 "bridge RSS MB before / 1,000 connected / peak",
                 "bridge CPU s", "dropped / slow"], rows))
    print()
    print("Where the latency goes (ms): Prefect = planrun's event received by a subscriber "
          "in the benchmark's parent process - occurred; fan-out = client received - that "
          "subscriber received (step and run-end messages)")
    print(table(["run", "latency p50", "p99", "Prefect p50", "Prefect p99", "fan-out p50",
                 "fan-out p99", "fan-out max"],
                [[i, f"{r['latency_ms']['p50']:.0f}", f"{r['latency_ms']['p99']:.0f}",
                  f"{r['upstream_ms']['p50']:.0f}", f"{r['upstream_ms']['p99']:.0f}",
                  f"{r['fanout_ms']['p50']:.0f}", f"{r['fanout_ms']['p99']:.0f}",
                  f"{r['fanout_ms']['max']:.0f}"] for i, r in enumerate(runs, 1)]))
    for i, r in enumerate(runs, 1):
        print(f"run {i}: kinds {r['kinds']}; step span {r['step_span_s']:.2f} s; offered "
              f"{r['offered_per_s'] / 1e3:.1f}k deliveries/s while the run ran; CPU s "
              f"{ {k: round(v, 1) for k, v in r['cpu_s'].items()} } (machine busy "
              f"{r['machine_busy_pct']:.0f} %); healthz clients "
              f"{r['healthz_clients']} (after {r['healthz_clients_after']}); ws sent "
              f"{r['metrics_delta']['sent_ws']:.0f}; bad frames "
              f"{r['metrics_delta']['bad_frames']:.0f}; RSS after clients left "
              f"{r['rss_mb']['after']:.0f} MB; gaps {r['clients_with_gaps']}, duplicates "
              f"{r['clients_with_duplicates']}, out of order {r['clients_out_of_order']}, "
              f"not ended {r['clients_not_ended']}, errors {r['client_errors'] or 'none'}")
        print(f"       steps without a step.running message: "
              f"{r['steps_without_running'] or 'none'}; without an end message: "
              f"{r['steps_without_end'] or 'none'}; the bridge's gap warnings: "
              f"{r['bridge_gap_warnings'] or 'none'}")
        if "trace" in r:
            t = r["trace"]
            print(f"       trace: upstream lag (handle entered - occurred) p50 "
                  f"{t['upstream_lag_ms']['p50']:.0f} ms, p99 {t['upstream_lag_ms']['p99']:.0f}"
                  f" ms; handle p50 {t['handle_ms']['p50']:.1f} ms (estimate p50 "
                  f"{t['estimate_ms']['p50']:.1f} ms, {t['estimate_ms_total'] / 1e3:.1f} s in "
                  f"all; handle CPU {t['handle_cpu_ms_total'] / 1e3:.1f} s); commit -> first "
                  f"client p50 {t['commit_to_first_client_ms']['p50']:.0f} ms, -> median "
                  f"client p50 {t['commit_to_median_client_ms']['p50']:.0f} ms, -> last client "
                  f"p50 {t['commit_to_last_client_ms']['p50']:.0f} ms p99 "
                  f"{t['commit_to_last_client_ms']['p99']:.0f} ms")
    print(f"benchmark took {time.monotonic() - started:.0f} s; load average at end "
          f"{info['loadavg_end']}")
    line = {"benchmark": "fanout", "clients": args.clients, "steps": args.steps,
            "compression": not args.no_compression,
            "idle_rss_mb": [round(probe["before_mb"], 1), round(probe["connected_mb"], 1)],
            "idle_kb_per_client": round(probe["per_client_kb"], 1),
            "runs": [{"messages": r["messages"], "clients_complete": r["clients_complete"],
                      "deliveries": r["deliveries"],
                      "expected_deliveries": r["expected_deliveries"],
                      "deliveries_per_s": round(r["deliveries_per_s"]),
                      "peak_deliveries_per_s": r["peak_deliveries_per_s"],
                      "latency_p50_ms": round(r["latency_ms"]["p50"], 1),
                      "latency_p99_ms": round(r["latency_ms"]["p99"], 1),
                      "prefect_p50_ms": round(r["upstream_ms"]["p50"], 1),
                      "fanout_p50_ms": round(r["fanout_ms"]["p50"], 1),
                      "fanout_p99_ms": round(r["fanout_ms"]["p99"], 1),
                      "rss_idle_mb": round(r["rss_mb"]["idle"], 1),
                      "rss_connected_mb": round(r["rss_mb"]["connected"], 1),
                      "rss_peak_mb": round(r["rss_mb"]["peak"], 1),
                      "dropped": r["metrics_delta"]["dropped"],
                      "slow_disconnects": r["metrics_delta"]["slow"],
                      "steps_without_running": len(r["steps_without_running"]),
                      "bridge_gap_warnings": len(r["bridge_gap_warnings"])} for r in runs],
            "median_deliveries_per_s": round(median([r["deliveries_per_s"] for r in runs])),
            "median_latency_p50_ms": round(median([r["latency_ms"]["p50"] for r in runs]), 1),
            "median_latency_p99_ms": round(median([r["latency_ms"]["p99"] for r in runs]), 1),
            "loadavg_end": info["loadavg_end"]}
    print(json.dumps(line))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "idle_probe": probe, "runs": runs}, fh, indent=2)
