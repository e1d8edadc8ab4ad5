"""Concurrency and rate limits (flows/limits.py) beside Prefect's global concurrency limits.

    .venv/bin/python benchmarks/bench_limits.py [--rounds 5] [--seconds 30] [--rate 20]
                                                [--burst 5]

- contended concurrency: 6 tasks of 0.5 s at a limit of 2 (the ideal span is 1.5 s), with
  planrun's limiter (its SQLite store in a fresh file) and with Prefect's global
  concurrency limit (``prefect.concurrency.asyncio.concurrency`` on the local server), in
  one process and shared by two processes (3 tasks each, started at the same moment);
  rounds interleaved; the median span / ideal is reported (goal ≤ 1.2×);
- rate fidelity: 30 callers in a loop through a rate limit of ``--rate`` calls a second
  with a burst of ``--burst``, for ``--seconds``: the observed rate after the first burst
  (goal within ±10 % of the configured one), and the most calls in any window shorter than
  one interval (goal never above the burst), from the moments the calls were made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import median, setup, table  # noqa: E402

TASKS, LIMIT, HOLD_S = 6, 2, 0.5
IDEAL_S = TASKS / LIMIT * HOLD_S
TOOL = "bench.tool"


def limiter(path: Path, rate: float | None = None, burst: int = 1) -> Any:
    from planrun.flows.limit_store import SqliteLimitStore
    from planrun.flows.limits import Limiter
    from planrun.policy_limits import OperatorLimits

    tool: dict[str, Any] = {"concurrency": LIMIT} if rate is None else \
        {"rate": rate, "burst": burst}
    settings = OperatorLimits.model_validate({"tools": {TOOL: tool}, "load": {
        "memory_percent": None}})
    return Limiter(lambda: SqliteLimitStore(path), lambda: settings)


def planrun_slot(path: Path) -> Callable[[], Any]:
    from planrun.flows.limits import Ask

    lim = limiter(path)
    return lambda: lim.hold(Ask(TOOL), lambda waiting: None)


def prefect_slot(name: str) -> Callable[[], Any]:
    from prefect.concurrency.asyncio import concurrency

    return lambda: concurrency(name, occupy=1)


async def spans(slot: Callable[[], Any], tasks: int, start_at: float) -> list[float]:
    """Run ``tasks`` holds of HOLD_S from ``start_at`` (wall clock); each one's end."""
    await asyncio.sleep(max(start_at - time.time(), 0))

    async def one() -> float:
        async with slot():
            await asyncio.sleep(HOLD_S)
        return time.time()

    return list(await asyncio.gather(*(one() for _ in range(tasks))))


async def prefect_limit(name: str, limit: int) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit))


async def drop_prefect_limit(name: str) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        await client.delete_global_concurrency_limit_by_name(name)


def one_process(kind: str, where: str) -> float:
    """The span of TASKS holds in this process, from their common start."""
    slot = planrun_slot(Path(where)) if kind == "planrun" else prefect_slot(where)
    start = time.time() + 0.05
    ends = asyncio.run(spans(slot, TASKS, start))
    return max(ends) - start


def two_processes(kind: str, where: str) -> float:
    """The span of TASKS holds shared by two child processes started at the same moment."""
    children = [subprocess.Popen([sys.executable, __file__, "--child", kind, where],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    start = time.time() + 0.2
    for child in children:  # both hear the start before either is waited for
        assert child.stdin is not None
        child.stdin.write(f"{start}\n")
        child.stdin.close()
    ends: list[float] = []
    for child in children:
        assert child.stdout is not None
        ends += json.loads(child.stdout.read())
        child.wait(120)
    return max(ends) - start


def child(kind: str, where: str) -> None:
    slot = planrun_slot(Path(where)) if kind == "planrun" else prefect_slot(where)
    if kind == "prefect":
        import prefect.concurrency.asyncio  # noqa: F401 - imported before the start
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    print(json.dumps(asyncio.run(spans(slot, TASKS // 2, start))), flush=True)


def contended(rounds: int, tmp: Path) -> dict[str, list[float]]:
    name = f"bench-limits-{uuid.uuid4().hex[:8]}"
    asyncio.run(prefect_limit(name, LIMIT))
    cases: dict[str, Callable[[], float]] = {
        "planrun, one process": lambda: one_process("planrun", str(tmp / f"{uuid.uuid4()}.db")),
        "Prefect global limit, one process": lambda: one_process("prefect", name),
        "planrun, two processes": lambda: two_processes("planrun",
                                                        str(tmp / f"{uuid.uuid4()}.db")),
        "Prefect global limit, two processes": lambda: two_processes("prefect", name),
    }
    found: dict[str, list[float]] = {case: [] for case in cases}
    try:
        for _ in range(rounds):
            for case, measure in cases.items():
                found[case].append(measure())
                time.sleep(0.3)
    finally:
        asyncio.run(drop_prefect_limit(name))
    return found


async def rate_fidelity(path: Path, rate: float, burst: int, seconds: float,
                        callers: int = 30) -> list[float]:
    """The moments calls were made through the rate limit, for ``seconds``."""
    from planrun.flows.limits import Ask

    lim = limiter(path, rate, burst)
    made: list[float] = []
    deadline = time.time() + seconds

    async def caller() -> None:
        while time.time() < deadline:
            async with lim.hold(Ask(TOOL), lambda waiting: None):
                if time.time() < deadline:
                    made.append(time.time())

    await asyncio.gather(*(caller() for _ in range(callers)))
    return sorted(made)


def most_in_window(times: list[float], width: float) -> int:
    """The most of ``times`` in any half-open window ``[t, t + width)``."""
    most, first = 0, 0
    for last, at in enumerate(times):
        while times[first] <= at - width:
            first += 1
        most = max(most, last - first + 1)
    return most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    srv = setup()
    tmp = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    load = os.getloadavg()
    found = contended(args.rounds, tmp)
    times = asyncio.run(rate_fidelity(tmp / "rate.db", args.rate, args.burst, args.seconds))
    after = times[args.burst:]
    observed = (len(after) - 1) / (after[-1] - after[0]) if len(after) > 1 else float("nan")
    print(f"Prefect server {srv.url}; load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} on {os.cpu_count()} cores; {args.rounds} rounds")
    print(table([f"{TASKS} × {HOLD_S} s at a limit of {LIMIT} (ideal {IDEAL_S:g} s)",
                 "median span s", "span / ideal", "worst span s"], [
        [case, f"{median(v):.3f}", f"{median(v) / IDEAL_S:.2f}×", f"{max(v):.3f}"]
        for case, v in found.items()]))
    print(table(["rate limit", "calls", "observed rate after the burst",
                 "off by", "most in a window of 0.99 / rate"], [
        [f"{args.rate:g}/s, burst {args.burst}, {args.seconds:g} s", len(times),
         f"{observed:.2f}/s", f"{(observed / args.rate - 1) * 100:+.1f} %",
         f"{most_in_window(times, 0.99 / args.rate)} (burst {args.burst})"]]))


if __name__ == "__main__":
    main()
