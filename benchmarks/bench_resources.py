"""What resource accounting costs per step, against the same step without it.

    .venv/bin/python benchmarks/bench_resources.py [--runs 300] [--json out.json]

In this process, no Prefect, rounds interleaved (each round runs every row once, in a
shuffled order) so that the machine's load falls on every row alike:

- an in-process step (``core.echo``): the engine's metered call (``StepJob._metered``:
  the meter, the CPU split, the resident reads, the step's resources) against the bare
  ``adapter.run`` with the same context; the difference is the accounting (goal < 1 ms);
- a ``shell.run`` of ``true``, unconfined: the adapter as it runs now (launcher, control
  groups, the watch, the report) against a bare exec of the same program read the same
  way (``adapters/process.communicate``): what measuring a program's tree costs. The
  launcher for the next step starts once this one's program has ended
  (``adapters/warm.py``); a start still under way when the call returns is waited for
  outside any case's time, so that it does not land in the next case's. So two rows show
  what that start costs when it cannot be hidden: two steps back to back (the second
  waits for the launcher the first one started), against two bare execs, and the same
  step with no launcher ahead (it starts its own, the path before the launcher ahead).
  A program that runs 20 ms (``sleep 0.02``) is the pair after;
- the control groups alone: making a step's groups and removing them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import percentile, table  # noqa: E402

from planrun.adapters import warm  # noqa: E402
from planrun.adapters.cgroups import make_step_group  # noqa: E402
from planrun.adapters.process import communicate, spawn  # noqa: E402
from planrun.adapters.registry import default_registry  # noqa: E402
from planrun.adapters.shell import ShellRun  # noqa: E402
from planrun.adapters.workspace import Workspace  # noqa: E402
from planrun.flows.fakes import MemoryParts  # noqa: E402
from planrun.flows.graph import compile_plan  # noqa: E402
from planrun.flows.session import RunSession  # noqa: E402
from planrun.flows.step import StepJob  # noqa: E402
from planrun.policy import LevelPolicy, Trust  # noqa: E402
from planrun.validate import validate_text  # noqa: E402

PLAN = "version: 1\nname: bench-resources\nsteps:\n  - {id: a, tool: core.echo, with: {value: 1}}\n"
LOG = logging.getLogger("bench")


def echo_job(workspace: Workspace) -> StepJob:
    plan = validate_text(PLAN).plan
    session = RunSession(compile_plan(plan, default_registry()), "bench", MemoryParts().parts())
    job = session.jobs["a"]
    job.workspace = workspace
    return job


async def _timed(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def _bare(*argv: str) -> None:
    program = shutil.which(argv[0])
    assert program is not None, f"{argv[0]} is not on PATH"
    await communicate(spawn([program, *argv[1:]], dict(os.environ)), None, 1024)


async def _groups() -> None:
    group = await asyncio.to_thread(make_step_group, 512 * 1024 * 1024, 256)
    if group is not None:
        await asyncio.to_thread(group.remove)


def cases(workspace: Workspace) -> dict[str, Callable[[], Awaitable[Any]]]:
    job = echo_job(workspace)
    params = {"value": 1}
    shell_run, ctx_policy = ShellRun(), LevelPolicy(allow_private=True, sandbox="off")

    async def shell(*argv: str) -> None:
        ctx = job._context(1, LOG)
        ctx.policy, ctx.trust = ctx_policy, Trust.LOCAL
        await shell_run.run({"argv": list(argv)}, ctx, 30)

    async def shell_true() -> None:
        await shell("true")

    async def shell_true_cold() -> None:
        async def none(sandboxed: bool) -> None:
            return None

        with mock.patch.object(warm, "take", none), \
                mock.patch.object(warm, "keep", lambda sandboxed: None):
            await shell_true()

    async def shell_true_twice() -> None:
        await shell_true()
        await shell_true()

    async def bare_true_twice() -> None:
        await _bare("true")
        await _bare("true")

    return {
        "core.echo / bare": lambda: job.adapter.run(params, job._context(1, LOG), None),
        "core.echo / metered": lambda: job._metered(job.adapter, params, 1, LOG, None),
        "true / bare exec": lambda: _bare("true"),
        "true / shell.run measured": shell_true,
        "true / shell.run, no launcher ahead": shell_true_cold,
        "true x2 back to back / bare exec": bare_true_twice,
        "true x2 back to back / shell.run": shell_true_twice,
        "sleep 0.02 / bare exec": lambda: _bare("sleep", "0.02"),
        "sleep 0.02 / shell.run measured": lambda: shell("sleep", "0.02"),
        "control groups / make + remove": _groups,
    }


async def _launcher_ahead() -> None:
    """Until the launcher started ahead of the next shell.run step is ready."""
    while warm._STARTING:
        await asyncio.sleep(0)


async def measure(runs: int, workspace: Workspace) -> dict[str, list[float]]:
    calls = cases(workspace)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for name in names:  # warm up: imports, the page cache, the sampler thread
        await _timed(calls[name])
        await _launcher_ahead()
    for _ in range(runs):
        random.shuffle(names)
        for name in names:
            samples[name].append(await _timed(calls[name]))
            await _launcher_ahead()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace(Path(tmp) / "ws", backup_dir=Path(tmp) / "backups")
        samples = asyncio.run(measure(args.runs, workspace))
    rows, results = [], {}
    for name, values in samples.items():
        p50, p95 = percentile(values, 50) * 1e3, percentile(values, 95) * 1e3
        rows.append([name, len(values), f"{p50:.3f}", f"{p95:.3f}"])
        results[name] = {"runs": len(values), "p50_ms": p50, "p95_ms": p95}
    overhead = {
        "in-process step (core.echo)": ("core.echo / metered", "core.echo / bare"),
        "shell.run true (unconfined)": ("true / shell.run measured", "true / bare exec"),
        "shell.run true, no launcher ahead": ("true / shell.run, no launcher ahead",
                                              "true / bare exec"),
        "shell.run true x2 back to back (per pair)": ("true x2 back to back / shell.run",
                                                      "true x2 back to back / bare exec"),
        "shell.run sleep 0.02 (unconfined)": ("sleep 0.02 / shell.run measured",
                                              "sleep 0.02 / bare exec"),
    }
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    print(table(["case", "runs", "p50 ms", "p95 ms"], rows))
    print()
    for label, (measured, bare) in overhead.items():
        extra = results[measured]["p50_ms"] - results[bare]["p50_ms"]
        ratio = results[measured]["p50_ms"] / results[bare]["p50_ms"]
        results[f"overhead: {label}"] = {"p50_ms": extra, "ratio": ratio}
        print(f"accounting overhead, {label}: {extra:+.3f} ms p50 ({ratio:.2f}x)")
    probe = make_step_group()
    if probe is None:
        print("(no control groups here: the groups row measured nothing)")
    else:
        probe.remove()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
