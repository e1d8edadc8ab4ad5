"""What the operator's policy costs per step, beside what validating a plan costs anyway.

    .venv/bin/python benchmarks/bench_policy.py [--steps 1000] [--rounds 20]

Three costs, each against its baseline in the same run, rounds interleaved:
- the policy pass of validation (``policy_problems``) over a plan of ``--steps`` steps
  (``shell.run`` and ``http.request`` with literal programs and URLs), beside the whole
  ``validate_text`` of the same plan;
- the network guard's check of one connection (``check_connection``, after resolution);
- the executables check of one ``shell.run`` argv (``allowed_argv``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import percentile, table  # noqa: E402

from planrun.adapters.executables import allowed_argv  # noqa: E402
from planrun.adapters.netguard import check_connection  # noqa: E402
from planrun.loader import load  # noqa: E402
from planrun.policy import LevelPolicy, Trust  # noqa: E402
from planrun.policy_check import policy_problems  # noqa: E402
from planrun.validate import validate_text  # noqa: E402

LEVEL = LevelPolicy(executables=["echo", "sh", "/usr/bin/*"],
                    hosts=["api.example.com", "*.example.org:443", "93.184.0.0/16"])


def plan(steps: int) -> str:
    lines = ["version: 1", "name: policy-bench", "limits: {max_parallel: 4}", "steps:"]
    for i in range(steps):
        if i % 2:
            lines.append(f"  - {{id: s{i}, tool: shell.run, timeout: 5s, "
                         f"with: {{argv: [echo, '{i}']}}}}")
        else:
            lines.append(f"  - {{id: s{i}, tool: http.request, "
                         f"with: {{method: GET, url: 'https://api.example.com/{i}'}}}}")
    return "\n".join(lines) + "\n"


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    text = plan(args.steps)
    source, problems = load(text, "bench.yaml")
    assert not problems, problems
    address = [ipaddress.ip_address("93.184.216.34")]
    path = os.environ.get("PATH", "/usr/bin:/bin")
    samples: dict[str, list[float]] = {k: [] for k in (
        "validate_text (whole plan)", "policy_problems (whole plan)",
        "check_connection (one)", "allowed_argv (one)")}
    for _ in range(args.rounds):
        samples["validate_text (whole plan)"].append(timed(lambda: validate_text(
            text, "bench.yaml")))
        samples["policy_problems (whole plan)"].append(timed(lambda: list(policy_problems(
            source, LEVEL, Trust.SUBMITTED))))
        samples["check_connection (one)"].append(timed(lambda: check_connection(
            "api.example.com", 443, address, LEVEL, Trust.SUBMITTED), 1000))
        samples["allowed_argv (one)"].append(timed(lambda: allowed_argv(
            ["echo", "hi"], "/tmp", path, LEVEL.executables), 1000))
    rows = []
    for name, values in samples.items():
        per_step = args.steps if "whole plan" in name else 1
        rows.append([name, f"{percentile(values, 50) * 1e6 / per_step:.1f}",
                     f"{percentile(values, 95) * 1e6 / per_step:.1f}"])
    print(f"{args.steps}-step plan, {args.rounds} rounds; µs per step (or per call)")
    print(table(["what", "p50 µs", "p95 µs"], rows))


if __name__ == "__main__":
    main()
