"""A hand-written one-task Prefect flow: the whole-process reference of ``planrun run``.

    .venv/bin/python benchmarks/handwritten_one_task.py async   # an async flow and task
    .venv/bin/python benchmarks/handwritten_one_task.py sync    # a sync flow and task

Run it with ``PREFECT_API_URL`` pointing at a running server (bench_engine.py does).
"""

from __future__ import annotations

import asyncio
import sys

from prefect import flow, task


@task
async def echo_async(value: object) -> object:
    return {"value": value}


@flow(name="handwritten-one-task-async")
async def one_task_async() -> object:
    return await echo_async("hello")


@task
def echo_sync(value: object) -> object:
    return {"value": value}


@flow(name="handwritten-one-task-sync")
def one_task_sync() -> object:
    return echo_sync("hello")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "async"
    if mode == "async":
        result = asyncio.run(one_task_async())
    elif mode == "sync":
        result = one_task_sync()
    else:
        sys.exit(f"usage: {sys.argv[0]} [async|sync]")
    print(result)
