"""DAG efficiency: how close planrun's span comes to a plan's critical path.

    .venv/bin/python benchmarks/bench_dag.py [--repeats 3] [--width 200] [--json out.json]

Each shape is a plan of ``core.sleep`` steps run through ``planrun.runner.run_plan`` in
this process, against one Prefect server (``PREFECT_API_URL``, else planrun's local server
under ``PLANRUN_HOME``, by default /tmp/bench-home). From each run report:

- span: first step's ``started_at`` to last step's ``ended_at``;
- critical path: the longest sum of sleeps along a path of ``needs`` (from the plan);
- ready latency: ``started_at`` of a step minus the latest ``ended_at`` of its needs; the
  join's, and the worst of any step with needs;
- waves: what a level-by-level scheduler would need at best (sum over levels of the longest
  sleep of the level), for comparison.

Report timestamps have millisecond resolution. Medians of ``--repeats`` runs, each after a
pause until the server has digested the previous run's events.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from _common import machine, median, other_prefect_servers, plan_data, run_planrun, setup, table
from _common import wait_idle as pause

TARGET_RATIO = 1.1
TARGET_WIDE_S = 2.0
TARGET_WIDE_RATIO = 1.3


def step(sid: str, seconds: float, needs: list[str] | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"id": sid, "tool": "core.sleep", "with": {"seconds": seconds}}
    if needs:
        s["needs"] = needs
    return s


def plan(name: str, steps: list[dict[str, Any]], max_parallel: int | None = None
         ) -> dict[str, Any]:
    p: dict[str, Any] = {"version": 1, "name": name, "steps": steps}
    if max_parallel is not None:
        p["limits"] = {"max_parallel": max_parallel}
    return p


def search_fan_out() -> dict[str, Any]:
    """4 searches of unequal length, each followed by a computation of complementary
    length, then a join: a level-by-level scheduler waits for the slowest of each level."""
    searches = {"a": 0.2, "b": 0.6, "c": 0.4, "d": 0.8}
    computes = {"a": 0.8, "b": 0.2, "c": 0.5, "d": 0.1}
    steps = [step(f"search_{k}", v) for k, v in searches.items()]
    steps += [step(f"compute_{k}", v, [f"search_{k}"]) for k, v in computes.items()]
    steps.append(step("join", 0.1, [f"compute_{k}" for k in computes]))
    return plan("bench-search-fan-out", steps)


def diamond() -> dict[str, Any]:
    """A root, three branches, two overlapping fan-ins, a final join."""
    return plan("bench-diamond", [
        step("root", 0.1),
        step("a", 0.5, ["root"]), step("b", 0.1, ["root"]), step("c", 0.3, ["root"]),
        step("join_ab", 0.1, ["a", "b"]), step("join_bc", 0.6, ["b", "c"]),
        step("join", 0.1, ["join_ab", "join_bc"]),
    ])


def wide(n: int = 20, longest_first: bool = False) -> dict[str, Any]:
    """``n`` parallel steps of 0.05 … n×0.05 s (listed shortest first, or longest first),
    then a join."""
    order = range(n - 1, -1, -1) if longest_first else range(n)
    steps = [step(f"w{i:02d}", round(0.05 * (i + 1), 2)) for i in order]
    steps.append(step("join", 0.1, [f"w{i:02d}" for i in range(n)]))
    return plan(f"bench-wide-{n}{'-longest-first' if longest_first else ''}", steps,
                max_parallel=n)


def independent(n: int = 200, seconds: float = 0.5) -> dict[str, Any]:
    return plan(f"bench-independent-{n}", [step(f"i{i:03d}", seconds) for i in range(n)],
                max_parallel=n)


def chain(n: int = 10, seconds: float = 0.1) -> dict[str, Any]:
    return plan(f"bench-chain-{n}", [step(f"c{i}", seconds, [f"c{i - 1}"] if i else None)
                                     for i in range(n)])


def shapes(width: int) -> dict[str, Callable[[], dict[str, Any]]]:
    """The shapes measured; ``width`` independent steps for the wide one."""
    return {
        "search fan-out 4×(search→compute)→join": search_fan_out,
        "diamond, two-level fan-in": diamond,
        "wide 20→join": wide,
        "wide 20→join, longest listed first": lambda: wide(longest_first=True),
        wide_name(width): lambda: independent(width),
        "chain 10 × 0.1 s": chain,
    }


def wide_name(width: int) -> str:
    return f"{width} independent × 0.5 s, max_parallel {width}"


def handwritten_independent(n: int = 200, seconds: float = 0.5) -> dict[str, float]:
    """Reference: a hand-written async Prefect flow gathering ``n`` sleeping async tasks.
    Start is taken in the task body and end after the task call returns, as planrun's
    ``started_at`` / ``ended_at`` are."""
    import asyncio

    from prefect import flow, task

    @task
    async def nap(s: float) -> float:
        started = time.time()
        await asyncio.sleep(s)
        return started

    @flow(name="handwritten-independent")
    async def independent_flow() -> list[tuple[float, float]]:
        async def one() -> tuple[float, float]:
            started = await nap(seconds)
            return started, time.time()

        return await asyncio.gather(*(one() for _ in range(n)))

    t0 = time.perf_counter()
    times = asyncio.run(independent_flow())
    wall = time.perf_counter() - t0
    starts, ends = [t[0] for t in times], [t[1] for t in times]
    return {"span_s": max(ends) - min(starts), "start_spread_s": max(starts) - min(starts),
            "wall_s": wall}


def critical_path(p: dict[str, Any]) -> tuple[float, float]:
    """(longest path of sleeps, best level-by-level time) of plan ``p``."""
    steps = {s["id"]: s for s in p["steps"]}
    finish: dict[str, float] = {}
    level: dict[str, int] = {}

    def visit(sid: str) -> float:
        if sid not in finish:
            needs = steps[sid].get("needs", [])
            finish[sid] = max((visit(n) for n in needs), default=0.0) + steps[sid]["with"][
                "seconds"]
            level[sid] = max((level[n] + 1 for n in needs), default=0)
        return finish[sid]

    cp = max(visit(sid) for sid in steps)
    waves: dict[int, float] = {}
    for sid, lv in level.items():
        waves[lv] = max(waves.get(lv, 0.0), steps[sid]["with"]["seconds"])
    return cp, sum(waves.values())


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def measure(p: dict[str, Any], report: dict[str, Any]) -> dict[str, float]:
    rows = report["steps"]
    start = {sid: ts(r["started_at"]) for sid, r in rows.items()}
    end = {sid: ts(r["ended_at"]) for sid, r in rows.items()}
    latency: dict[str, float] = {}
    for s in p["steps"]:
        if s.get("needs"):
            latency[s["id"]] = start[s["id"]] - max(end[n] for n in s["needs"])
    last = p["steps"][-1]["id"]
    return {
        "span_s": max(end.values()) - min(start.values()),
        "start_spread_s": max(start.values()) - min(start.values()),
        "join_latency_ms": latency[last] * 1e3 if last in latency else float("nan"),
        "worst_ready_latency_ms": max(latency.values()) * 1e3 if latency else float("nan"),
        "run_duration_s": float(report["duration_s"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--width", type=int, default=200,
                        help="independent steps of the wide shape (issue 13 names 256)")
    args = parser.parse_args()
    width = args.width

    started = time.monotonic()
    srv = setup()
    info = machine()
    info["other_prefect_servers"] = other_prefect_servers(srv)
    print(f"server {srv.url} (pid {srv.pid}); machine {info}", flush=True)

    plans = {name: make() for name, make in shapes(width).items()}
    data = {name: plan_data(p) for name, p in plans.items()}
    print("warm-up (not counted) ...", flush=True)
    run_planrun(plan_data(chain(2, 0.01)))
    pause(srv)

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in plans}
    reference: list[dict[str, float]] = []
    for rep in range(args.repeats):
        for name, p in plans.items():
            wall, report = run_planrun(data[name])
            m = measure(p, report)
            m["wall_s"] = wall
            runs[name].append(m)
            pause(srv)
        reference.append(handwritten_independent(width))
        pause(srv)
        print(f"  repetition {rep + 1}/{args.repeats}: " + ", ".join(
            f"{runs[n][-1]['span_s']:.3f}s" for n in plans)
            + f", hand-written {width}: {reference[-1]['span_s']:.3f}s", flush=True)

    results: dict[str, Any] = {}
    rows = []
    for name, p in plans.items():
        cp, waves = critical_path(p)
        med = {k: median([r[k] for r in runs[name]]) for k in runs[name][0]}
        ratios = [r["span_s"] / cp for r in runs[name]]
        med["ratio"] = median(ratios)
        results[name] = {"critical_path_s": cp, "waves_s": waves, "median": med, "runs": runs[name]}
        rows.append([name, len(p["steps"]), f"{cp:.2f}", f"{waves:.2f}", f"{med['span_s']:.3f}",
                     f"{med['ratio']:.3f}", f"{max(ratios):.3f}",
                     f"{med['join_latency_ms']:.0f}", f"{med['worst_ready_latency_ms']:.0f}",
                     f"{med['wall_s']:.2f}"])
    ref = {k: median([r[k] for r in reference]) for k in reference[0]}
    results[f"reference: hand-written Prefect, {width} async tasks gathered"] = {
        "critical_path_s": 0.5, "median": ref, "runs": reference}
    rows.append([f"reference: hand-written Prefect flow, {width} × 0.5 s async tasks gathered",
                 width, "0.50", "0.50", f"{ref['span_s']:.3f}", f"{ref['span_s'] / 0.5:.3f}",
                 f"{max(r['span_s'] for r in reference) / 0.5:.3f}", "", "",
                 f"{ref['wall_s']:.2f}"])
    print()
    print(f"DAG shapes through planrun (core.sleep steps); medians of {args.repeats} runs")
    print(table(["shape", "steps", "critical path s", "waves s", "span s", "span / CP",
                 "worst span / CP", "join latency ms", "worst ready latency ms",
                 "run_plan wall s"], rows))
    print()
    fan_in = [n for n in plans if n != wide_name(width)]
    within = [n for n in fan_in if results[n]["median"]["ratio"] <= TARGET_RATIO]
    print(f"span within {TARGET_RATIO}× of the critical path (median), shapes with fan-in or "
          f"chains: {len(within)}/{len(fan_in)}"
          + "".join(f"\n  {'MET   ' if n in within else 'MISSED'} {n}: "
                    f"{results[n]['median']['ratio']:.3f}×" for n in fan_in))
    w = results[wide_name(width)]["median"]
    verdict = "MET" if w["ratio"] <= TARGET_WIDE_RATIO else "MISSED"
    print(f"{width} × 0.5 s: {verdict} {w['ratio']:.3f}× its critical path (issue 13: within "
          f"{TARGET_WIDE_RATIO}×; hand-written Prefect {ref['span_s'] / 0.5:.3f}×)")
    print(f"{width} × 0.5 s: span {w['span_s']:.2f} s, run_plan wall {w['wall_s']:.2f} s, starts "
          f"spread over {w['start_spread_s'] * 1e3:.0f} ms: "
          f"{'under' if w['span_s'] < TARGET_WIDE_S else 'NOT under'} {TARGET_WIDE_S:.0f} s "
          f"(target: well under); hand-written Prefect: span {ref['span_s']:.2f} s, wall "
          f"{ref['wall_s']:.2f} s, starts spread over {ref['start_spread_s'] * 1e3:.0f} ms")
    print(f"benchmark took {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "shapes": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
