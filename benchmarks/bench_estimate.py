"""How good are the time estimates? A 10-step plan with known step-duration distributions
runs 20 times; at every step change an observer asks ``progress_bridge.estimate`` for the
time left, with the durations of the previous runs read back from Prefect's history.

Reports the error of ``remaining_s`` at 25/50/75 % progress (steps finished) and how often
the true remainder fell inside ``low_s..high_s``, for early runs (little or no history) and
later ones, plus the cost of one estimate of a 50-step plan.

    .venv/bin/python benchmarks/bench_estimate.py [--runs 20] [--seed 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402

#: step id -> (needs, median seconds, log-sigma, the planner's hint as a multiple of the
#: median). Three branches after ``fetch`` join in ``merge``; max_parallel 2 makes them
#: compete for slots. Hints are off by 0.5x..2x, as a planner's guesses are.
STEPS: dict[str, tuple[list[str], float, float, float]] = {
    "fetch": ([], 0.20, 0.25, 1.0),
    "parse_a": (["fetch"], 0.25, 0.30, 2.0),
    "rank_a": (["parse_a"], 0.20, 0.40, 0.5),
    "parse_b": (["fetch"], 0.30, 0.35, 1.5),
    "check_b": (["parse_b"], 0.15, 0.50, 1.0),
    "score_b": (["check_b"], 0.25, 0.30, 0.6),
    "probe_c": (["fetch"], 0.35, 0.45, 0.7),
    "merge": (["rank_a", "score_b", "probe_c"], 0.15, 0.25, 2.0),
    "write": (["merge"], 0.30, 0.30, 1.0),
    "publish": (["write"], 0.10, 0.20, 1.5),
}
MAX_PARALLEL = 2
CHECKPOINTS = (25, 50, 75)


def plan(name: str) -> dict[str, Any]:
    """The plan: each step sleeps for ``inputs.<step id>`` seconds, hinted by ``estimate``."""
    steps = [{"id": sid, "tool": "core.sleep", "needs": needs,
              "estimate": f"{round(median * hint * 1000)}ms",
              "with": {"seconds": f"{{{{ inputs.{sid} }}}}"}}
             for sid, (needs, median, _, hint) in STEPS.items()]
    return {"version": 1, "name": name, "limits": {"max_parallel": MAX_PARALLEL},
            "inputs": {sid: {"type": "number"} for sid in STEPS}, "steps": steps}


def draw(rng: random.Random) -> dict[str, float]:
    """One run's step durations: lognormal, clipped to 0.05..0.9 s."""
    return {sid: round(min(0.9, max(0.05, rng.lognormvariate(math.log(m), s))), 3)
            for sid, (_, m, s, _) in STEPS.items()}


@dataclass
class Sample:
    now: float
    percent: float
    remaining_s: float
    low_s: float
    high_s: float


@dataclass
class Observer:
    """Calls ``estimate`` at every change of the run, as the bridge does."""

    durations: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    record: Any = None
    cost_s: list[float] = field(default_factory=list)

    def changed(self, run: Any, step: Any) -> None:
        from planrun.progress_bridge.estimate import estimate

        self.record = run
        if run.started_at is None:
            return
        t0 = time.perf_counter()
        now = time.time()
        found = estimate(run, MAX_PARALLEL, self.durations, now)
        self.cost_s.append(time.perf_counter() - t0)
        self.samples.append(Sample(now, run.progress().percent, found.remaining_s,
                                   found.low_s, found.high_s))


async def read_history(name: str, expect: int) -> dict[str, list[float]]:
    """Durations of the previous runs' steps from Prefect, once all ``expect`` of each step
    have arrived (task runs reach the database through events, seconds later)."""
    from prefect.client.orchestration import get_client

    from planrun.progress_bridge.history import step_history

    tools = {sid: "core.sleep" for sid in STEPS}
    deadline = time.monotonic() + 20
    async with get_client() as client:
        while True:
            found = await step_history(client, name, tools, by_tool=False)
            if all(len(found.get(s, [])) >= min(expect, 20) for s in STEPS) or \
                    time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)


def one_run(data: dict[str, Any], inputs: dict[str, float],
            durations: dict[str, Any]) -> tuple[Observer, float]:
    from planrun.runner import run_plan

    observer = Observer(durations)
    report = asyncio.run(run_plan(data, inputs, observer))
    if report["status"] != "completed":
        raise RuntimeError(f"run ended {report['status']}: {report['reason']}")
    run = observer.record
    end = max(s.ended_at for s in run.steps.values())
    return observer, end


def at_checkpoints(observer: Observer, end: float) -> dict[str, dict[str, float]]:
    """The estimate made when the run first reached each checkpoint, against the truth."""
    out: dict[str, dict[str, float]] = {}
    for point in (0, *CHECKPOINTS):
        sample = next(s for s in observer.samples if s.percent >= point)
        truth = end - sample.now
        out[str(point)] = {"truth": truth, "remaining": sample.remaining_s,
                           "inside": float(sample.low_s <= truth <= sample.high_s),
                           "width": sample.high_s - sample.low_s}
    return out


def cost_of_50_steps(repeat: int = 200) -> tuple[float, float]:
    """Median and p95 ms of one estimate of a random 50-step DAG, 4 slots, 3 running."""
    from planrun.contract.status import RunStatus, StepStatus
    from planrun.progress_bridge.estimate import durations_from, estimate
    from planrun.report import RunRecord, StepRecord

    rng = random.Random(1)
    steps = {}
    for i in range(50):
        needs = [f"s{j}" for j in rng.sample(range(i), min(i, 2))]
        steps[f"s{i}"] = StepRecord(id=f"s{i}", tool="core.sleep", needs=needs,
                                    estimate_s=rng.uniform(0.5, 3))
    run = RunRecord(run_id="r", plan="p", steps=steps, status=RunStatus.RUNNING, started_at=0.0)
    for i in range(3):
        run.steps[f"s{i}"].status, run.steps[f"s{i}"].started_at = StepStatus.RUNNING, 0.0
    durations = durations_from({f"s{i}": [rng.uniform(0.5, 3) for _ in range(20)]
                                for i in range(0, 50, 2)})
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        estimate(run, 4, durations, 1.0)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * statistics.median(times), 1000 * times[int(0.95 * len(times))]


def summarise(results: list[dict[str, Any]], groups: list[tuple[int, int]]) -> str:
    rows = []
    for lo, hi in groups:
        chosen = [r for r in results if lo <= r["run"] <= hi]
        for point in ("0", *map(str, CHECKPOINTS)):
            cells = [r["checkpoints"][point] for r in chosen]
            errors = [abs(c["remaining"] - c["truth"]) for c in cells]
            percent = [100 * e / c["truth"] for e, c in zip(errors, cells, strict=True)]
            signed = statistics.mean(c["remaining"] - c["truth"] for c in cells)
            truth = statistics.mean(c["truth"] for c in cells)
            rows.append([f"{lo}–{hi}", f"{point} %", f"{truth:.2f}",
                         f"{statistics.mean(errors):.3f}", f"{statistics.mean(percent):.1f} %",
                         f"{signed:+.3f}",
                         f"{100 * statistics.mean(c['inside'] for c in cells):.0f} %",
                         f"{statistics.mean(c['width'] for c in cells):.2f}"])
    return _common.table(["runs", "progress", "true remaining s", "MAE s", "MAE % of true",
                          "mean error s", "inside low..high", "interval width s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    server = _common.setup()
    from planrun.progress_bridge.estimate import durations_from

    name = f"est-bench-{uuid.uuid4().hex[:6]}"
    data = _common.plan_data(plan(name))
    rng = random.Random(args.seed)
    results: list[dict[str, Any]] = []
    costs: list[float] = []
    started = time.monotonic()
    for number in range(1, args.runs + 1):
        history = asyncio.run(read_history(name, number - 1)) if number > 1 else {}
        inputs = draw(rng)
        observer, end = one_run(data, inputs, durations_from(history))
        costs.extend(observer.cost_s)
        checkpoints = at_checkpoints(observer, end)
        results.append({"run": number, "history_per_step": min(map(len, history.values()))
                        if len(history) == len(STEPS) else 0,
                        "inputs": inputs, "checkpoints": checkpoints})
        print(f"run {number:2d}: history {results[-1]['history_per_step']:2d}/step, "
              + ", ".join(f"{p}%: est {c['remaining']:.2f} true {c['truth']:.2f}"
                          f"{'' if c['inside'] else ' (outside)'}"
                          for p, c in checkpoints.items()), flush=True)
        _common.wait_idle(server, min_s=0.2, max_s=10)
    cost_median, cost_p95 = cost_of_50_steps()
    half = args.runs // 4
    groups = [(1, half), (half + 1, args.runs), (1, args.runs)]
    print()
    print(summarise(results, groups))
    print()
    costs.sort()
    print(f"estimate() per change in these runs: median {1000 * statistics.median(costs):.2f} ms,"
          f" max {1000 * costs[-1]:.2f} ms; 50-step plan: median {cost_median:.2f} ms, "
          f"p95 {cost_p95:.2f} ms")
    print(f"wall time {time.monotonic() - started:.0f} s; machine {_common.machine()}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "cost_50_ms": [cost_median,
                                                                           cost_p95]}, indent=1))


if __name__ == "__main__":
    main()
