"""Where planrun's extra cost per step goes: hand-written flows that add planrun's ways of
calling a task one at a time, and planrun with two of its per-step costs stubbed out.

    .venv/bin/python benchmarks/diagnose_step_cost.py [--repeats 3]

Every variant is a chain of N async tasks / core.echo steps, N = 1 and 300; reported per
step ((t300 - t1) / 299, median over repetitions): wall time, and CPU time of the main
thread (the event loop; Prefect's event and log workers run in other threads).

- hand-written, NO_CACHE: ``await echo(i)`` with planrun's task options;
- + with_options per step: a new Task per step, as ``StepJob.prefect_task`` makes
  (``Task.__init__`` reads the function's source with ``inspect.getsource`` and hashes it);
- + own asyncio task per step: each call awaited through ``asyncio.ensure_future``, as the
  scheduler runs each step;
- planrun: ``run_plan``;
- planrun, stubbed: ``inspect.getsource`` in ``prefect.tasks`` returns "" and
  ``StepRecord.template_view`` returns None (the template context is rebuilt from every
  step's record on every step, O(N)). An estimate of what removing those costs would gain;
  not a working configuration;
- planrun, step logs stubbed: ``flows.step._logger`` returns a disabled logger (each
  attempt otherwise sends two lines to the Prefect API through the run logger).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import median, plan_data, run_planrun, setup, table, wait_idle
from bench_engine import N_LARGE, N_SMALL, chain_plan


class _NoSource:
    """``inspect`` for prefect.tasks, with a getsource that costs nothing."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    @staticmethod
    def getsource(fn: Any) -> str:
        return ""


def variants() -> dict[str, Callable[[int], Any]]:
    import prefect.tasks
    from prefect import flow, tags, task
    from prefect.cache_policies import NO_CACHE

    import planrun.flows.plan_flow  # noqa: F401 - installs planrun's Prefect departures, as run_plan does
    from planrun import report

    @task(cache_policy=NO_CACHE, persist_result=False)
    async def echo(value: int) -> dict[str, int]:
        return {"value": value}

    def never(task: Any, task_run: Any, state: Any) -> bool:
        return False

    def planrun_like(i: int) -> Any:
        return echo.with_options(name=f"s{i}", task_run_name=f"s{i}",
                                 tags=["planrun", "tool:core.echo"], retries=0,
                                 retry_delay_seconds=0, retry_jitter_factor=None,
                                 retry_condition_fn=never)

    @flow(name="diagnose-plain")
    async def plain(n: int) -> None:
        for i in range(n):
            await echo(i)

    @flow(name="diagnose-with-options")
    async def with_options(n: int) -> None:
        for i in range(n):
            await planrun_like(i)(i)

    @flow(name="diagnose-own-task")
    async def own_task(n: int) -> None:
        for i in range(n):
            await asyncio.ensure_future(planrun_like(i)(i))

    def run_flow(fn: Any) -> Callable[[int], Any]:
        def run(n: int) -> None:
            with tags("planrun", "plan:diagnose"):
                asyncio.run(fn(n))
        return run

    data = {n: plan_data(chain_plan(n)) for n in (N_SMALL, N_LARGE)}
    real_view = report.StepRecord.template_view

    def planrun(n: int) -> None:
        run_planrun(data[n])

    def stubbed(n: int) -> None:
        prefect.tasks.inspect = _NoSource()  # type: ignore[assignment]
        report.StepRecord.template_view = lambda self: None  # type: ignore[assignment,method-assign,return-value]
        try:
            run_planrun(data[n])
        finally:
            prefect.tasks.inspect = inspect
            report.StepRecord.template_view = real_view  # type: ignore[method-assign]

    from planrun.flows import step as step_module

    real_logger = step_module._logger
    silent = logging.getLogger("planrun.bench.silent")
    silent.disabled = True

    def no_logs(n: int) -> None:
        step_module._logger = lambda: silent  # type: ignore[assignment,return-value]
        try:
            run_planrun(data[n])
        finally:
            step_module._logger = real_logger

    return {"hand-written, NO_CACHE": run_flow(plain),
            "+ with_options per step": run_flow(with_options),
            "+ own asyncio task per step": run_flow(own_task),
            "planrun": planrun,
            "planrun, getsource and template_view stubbed": stubbed,
            "planrun, step logs stubbed": no_logs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = time.monotonic()
    srv = setup()
    runs = variants()
    for run in runs.values():
        run(N_SMALL)
    wait_idle(srv)
    wall: dict[str, dict[int, list[float]]] = {k: {N_SMALL: [], N_LARGE: []} for k in runs}
    cpu: dict[str, dict[int, list[float]]] = {k: {N_SMALL: [], N_LARGE: []} for k in runs}
    for rep in range(args.repeats):
        for name, run in runs.items():
            for n in (N_SMALL, N_LARGE):
                t0, c0 = time.perf_counter(), time.thread_time()
                run(n)
                wall[name][n].append(time.perf_counter() - t0)
                cpu[name][n].append(time.thread_time() - c0)
                wait_idle(srv)
        print(f"  repetition {rep + 1}/{args.repeats}", flush=True)

    def per_step(d: dict[int, list[float]]) -> float:
        return median([(b - a) / (N_LARGE - N_SMALL)
                       for a, b in zip(d[N_SMALL], d[N_LARGE], strict=True)]) * 1e3

    rows = [[name, f"{per_step(wall[name]):.2f}", f"{per_step(cpu[name]):.2f}"] for name in runs]
    print()
    print(f"Per step, chain of N = {N_SMALL} vs {N_LARGE}; medians of {args.repeats}")
    print(table(["variant", "wall ms", "main-thread CPU ms"], rows))
    print(f"took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
