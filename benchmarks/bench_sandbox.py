"""What the sandbox costs per ``shell.run`` step, against the unconfined path.

    .venv/bin/python benchmarks/bench_sandbox.py [--runs 200] [--json out.json]

Each row is one way of running a program through ``ShellRun().run`` in this process
(no Prefect, no engine: the adapter's own cost): unconfined without limits (a direct
exec), unconfined with a memory limit (through the setrlimit wrapper), and sandboxed
(wrapper, pids cgroup, bubblewrap, namespaces). The programs are ``true`` and
``echo hello``. Runs are interleaved (round after round, in a shuffled order each round)
so that the machine's load falls on every row alike. Also timed: the executables check
of the policy alone (resolving argv[0] and matching the rules), per step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import percentile, table  # noqa: E402

from planrun.adapters.base import StepContext  # noqa: E402
from planrun.adapters.executables import allowed_argv  # noqa: E402
from planrun.adapters.sandbox import sandbox_problem  # noqa: E402
from planrun.adapters.shell import ShellRun  # noqa: E402
from planrun.adapters.workspace import Workspace  # noqa: E402
from planrun.policy import LevelPolicy, Trust  # noqa: E402

MODES: dict[str, tuple[LevelPolicy, int | None]] = {
    "unconfined": (LevelPolicy(sandbox="off"), None),
    "unconfined + memory limit": (LevelPolicy(sandbox="off"), 512),
    "sandboxed": (LevelPolicy(sandbox="required"), None),
}
PROGRAMS = {"true": ["true"], "echo": ["echo", "hello"]}


async def _time_step(adapter: ShellRun, ctx: StepContext, argv: list[str]) -> float:
    started = time.perf_counter()
    await adapter.run({"argv": argv}, ctx, timeout=30)
    return time.perf_counter() - started


async def measure(runs: int, workspace: Workspace) -> dict[tuple[str, str], list[float]]:
    adapter = ShellRun()
    contexts = {mode: StepContext(run_id="bench", step_id="s", workspace=workspace,
                                  trust=Trust.SUBMITTED, policy=policy, memory_mb=memory)
                for mode, (policy, memory) in MODES.items()}
    cases = [(mode, program) for mode in MODES for program in PROGRAMS]
    samples: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for case in cases:  # warm up: the probe, imports, the page cache
        await _time_step(adapter, contexts[case[0]], PROGRAMS[case[1]])
    for _ in range(runs):
        random.shuffle(cases)
        for mode, program in cases:
            samples[(mode, program)].append(
                await _time_step(adapter, contexts[mode], PROGRAMS[program]))
    return samples


def policy_check_us(rounds: int = 2000) -> float:
    """Microseconds per executables check (resolve on PATH, match three rules)."""
    rules = ["git", "python3*", "/opt/tools/*", "echo"]
    started = time.perf_counter()
    for _ in range(rounds):
        allowed_argv(["echo", "hello"], "/", "/usr/local/bin:/usr/bin:/bin", rules)
    return (time.perf_counter() - started) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    problem = sandbox_problem()
    if problem is not None:
        sys.exit(f"bench_sandbox: the sandbox cannot start here: {problem}")
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace(Path(tmp) / "ws", backup_dir=Path(tmp) / "backups")
        samples = asyncio.run(measure(args.runs, workspace))
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    for (mode, program), values in sorted(samples.items()):
        p50, p95 = percentile(values, 50) * 1e3, percentile(values, 95) * 1e3
        rows.append([program, mode, len(values), f"{p50:.1f}", f"{p95:.1f}"])
        results[f"{program} / {mode}"] = {"runs": len(values), "p50_ms": p50, "p95_ms": p95}
    check = policy_check_us()
    results["executables check"] = {"us_per_step": check}
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min), "
          f"{os.cpu_count()} CPUs")
    print(table(["program", "mode", "runs", "p50 ms", "p95 ms"], rows))
    print(f"\nexecutables check (resolve argv[0] on PATH, 4 rules): {check:.1f} µs per step")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
