"""The hand-written reference of ``bench_load.py``: a flow of chained tasks, each an
awaited ``asyncio.sleep``, served as planrun's runner serves plans (each run a fork of a
fork server that has imported Prefect, flows/serve.py).

    PREFECT_API_URL=… .venv/bin/python benchmarks/handwritten_load.py   # serves it

bench_load.py starts it against the stack's server and submits runs of
``handwritten-load/load`` with ``run_deployment``.
"""

from __future__ import annotations

import asyncio

from prefect import flow, task

DEPLOYMENT_PATH = "handwritten-load/load"


@task
async def sleep_step(seconds: float, after: int | None = None) -> int:
    await asyncio.sleep(seconds)
    return (after or 0) + 1


@flow(name="handwritten-load")
async def chain(steps: int = 10, seconds: float = 0.0) -> int:
    done: int | None = None
    for i in range(1, steps + 1):
        done = await sleep_step.with_options(name=f"s{i}")(seconds, done)
    return done or 0


if __name__ == "__main__":
    from planrun.flows.serve import fork_runs

    fork_runs()
    chain.serve(name="load", print_starting_message=False)
