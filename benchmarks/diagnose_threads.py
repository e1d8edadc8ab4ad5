"""Where a chain's time goes by thread: planrun against hand-written Prefect.

    .venv/bin/python benchmarks/diagnose_threads.py [--repeats 3]

Against one Prefect server (as ``bench_engine.py``): a chain of N ``core.echo`` steps through
``planrun.runner.run_plan`` and bench_engine's hand-written flow of N awaited async tasks,
N = 5 and 300, round-robin. For each, per step ((N=300 - N=5) / 295, medians):

- wall time;
- CPU of each thread of this process (psutil): the event loop (``MainThread``), Prefect's
  ``GlobalEventLoopThread`` (its HTTP and WebSocket clients), ``EventsWorkerThread``,
  ``APILogWorkerThread``; every thread holds the GIL while it runs Python;
- the event loop's time in ``select`` calls that asked for no wait at all (timeout 0) and
  found nothing: the call itself costs microseconds, the rest is the loop's thread waiting to
  take the GIL back from another thread after giving it up in the call.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import psutil
from _common import plan_data, setup, table, wait_idle
from bench_engine import chain_plan, handwritten_flows

N_SMALL, N_LARGE = 5, 300
THREADS = ("MainThread", "GlobalEventLoopThread", "EventsWorkerThread", "APILogWorkerThread")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each named thread of this process (others summed as "other")."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    found: dict[str, float] = {}
    for t in psutil.Process().threads():
        name = names.get(t.id, "other")
        name = name if name in THREADS else "other"
        found[name] = found.get(name, 0.0) + t.user_time + t.system_time
    return found


def timed(make: Callable[[], Coroutine[Any, Any, Any]]) -> dict[str, float]:
    """Wall, CPU by thread, and the loop's zero-timeout select time of one run."""
    blocked = [0.0]

    async def main() -> None:
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        select = selector.select

        def timed_select(timeout: float | None = None) -> Any:
            t0 = time.perf_counter()
            ready = select(timeout)
            if timeout == 0 and not ready:
                blocked[0] += time.perf_counter() - t0
            return ready

        selector.select = timed_select
        await make()

    before = thread_cpu()
    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    after = thread_cpu()
    out = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in (*THREADS, "other")}
    return out | {"wall": wall, "gil wait in select(0)": blocked[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    srv = setup()
    from planrun.runner import run_plan

    flow = handwritten_flows()["hand-written"]
    variants: dict[str, Callable[[int], Callable[[], Coroutine[Any, Any, Any]]]] = {
        "planrun": lambda n: (lambda: run_plan(plan_data(chain_plan(n)), {})),
        "hand-written": lambda n: (lambda: flow(n)),
    }
    for make in variants.values():  # warm up: imports, the flows' first registration
        timed(make(N_SMALL))
    marginal: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, make in variants.items():
            wait_idle(srv)
            small = timed(make(N_SMALL))
            wait_idle(srv)
            large = timed(make(N_LARGE))
            marginal[name].append({k: (large[k] - small[k]) / (N_LARGE - N_SMALL) * 1e3
                                   for k in large})
    keys = ["wall", *THREADS, "other", "gil wait in select(0)"]
    rows = [[name, *(f"{statistics.median(m[k] for m in runs):.2f}" for k in keys)]
            for name, runs in marginal.items()]
    print(f"Per step, ms (medians of {args.repeats}; (N={N_LARGE} - N={N_SMALL}) / "
          f"{N_LARGE - N_SMALL})")
    print(table(["variant", *keys], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
