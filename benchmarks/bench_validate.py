"""How long ``planrun validate`` takes on a large plan (the goal: 1,000 steps in well under a
second). A measurement, not a test: prints the median of several runs.

    .venv/bin/python benchmarks/bench_validate.py [--steps 1000] [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planrun.validate import validate_text  # noqa: E402

GROUP = 10  # steps per group: a chain of 8, a fan-out pair, then a fan-in


def _step(sid: str, tool: str, needs: list[str], with_: str, extra: str = "") -> str:
    needs_text = f"\n    needs: [{', '.join(needs)}]" if needs else ""
    return f"  - id: {sid}\n    tool: {tool}{needs_text}\n    with: {with_}\n{extra}"


def plan_text(steps: int) -> str:
    """A plan of ``steps`` steps: chains, fan-out and fan-in, templates in every ``with:``."""
    parts = ["version: 1\nname: bench\ninputs:\n  topic: {type: string, default: prefect}\n"
             "  n: {type: integer, default: 3}\n"
             "defaults: {timeout: 30s, retry: {max_attempts: 3, backoff: exponential}}\n"
             "limits: {max_parallel: 8, deadline: 1h}\nsteps:\n"]
    previous_tip: str | None = None
    for g in range(steps // GROUP):
        names = [f"g{g}_s{i}" for i in range(GROUP)]
        for i in range(8):
            needs = [names[i - 1]] if i else ([previous_tip] if previous_tip else [])
            source = f"steps.{needs[0]}.output.value" if needs else "inputs.topic"
            parts.append(_step(names[i], "core.echo", needs,
                               f'{{value: "{{{{ {source} }}}} / {i}"}}',
                               "    timeout: 5s\n" if i % 2 else ""))
        parts.append(_step(names[8], "file.write", [names[7]],
                           f'{{path: "out/{{{{ inputs.topic }}}}-{g}.txt", '
                           f'content: "{{{{ steps.{names[7]}.output.value }}}}"}}'))
        parts.append(_step(names[9], "http.request", [names[3], names[8]],
                           f'{{method: POST, url: "https://example.org/{g}", '
                           f'json: {{a: "{{{{ steps.{names[3]}.output }}}}", '
                           f'b: "{{{{ steps.{names[8]}.status }}}}", n: "{{{{ inputs.n }}}}"}}}}',
                           f"    when: \"{{{{ steps.{names[8]}.status == 'completed' }}}}\"\n"
                           "    critical: false\n    retry: {max_attempts: 2}\n"))
        previous_tip = names[9]
    return "".join(parts)


def measure(text: str, runs: int) -> tuple[float, float]:
    """(first run, median of the following ``runs``) in seconds."""
    start = time.perf_counter()
    validate_text(text, "bench.yaml")
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        validate_text(text, "bench.yaml")
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    text = plan_text(args.steps)
    first, median = measure(text, args.runs)
    print(f"validate {args.steps} steps: median {median:.3f} s "
          f"(first run {first:.3f} s, {len(text) / 1024:.0f} KiB, {args.runs} runs)")


if __name__ == "__main__":
    main()
