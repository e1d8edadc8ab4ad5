"""Where a command's CPU goes, by kind of process: runs the command and samples every
process of the machine once a second (psutil), then sums each process's last-seen CPU time
by what it is (a Prefect server, a run host or its forks, ``planrun run``, a bridge,
Chromium, pytest's workers, the rest of the machine).

    python benchmarks/suite_cpu.py -- scripts/test -q

A process that lives less than a second may be missed, and one's last second is; the
machine's other processes (a CPU hog beside the command, services) are listed too, so the
command's share can be read against them (BENCHMARKS.md, "The test suite").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import defaultdict

import psutil

#: (kind, words that all appear in the command line), the first that matches wins.
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("prefect server", ("prefect", "server", "start")),
    ("run host and its forks", ("planrun.run_host",)),
    ("progress bridge", ("planrun.progress_bridge",)),
    ("runner (flows.serve)", ("planrun.flows.serve",)),
    ("run fork server", ("multiprocessing.forkserver",)),
    ("chromium", ("chromium",)),
    ("playwright driver", ("playwright", "node")),
    ("pytest workers", ("import sys;exec(eval(sys.stdin.readline()))",)),
    ("pytest", ("pytest",)),
    ("pip (install)", ("pip", "install")),
]


def kind(cmdline: list[str]) -> str:
    if "planrun.cli" in cmdline[:3]:  # python -m planrun.cli COMMAND ...
        after = cmdline[cmdline.index("planrun.cli") + 1:]
        return f"planrun {after[0] if after else ''}".strip()
    text = " ".join(cmdline)
    for name, words in KINDS:
        if all(word in text for word in words):
            return name
    return f"other: {text[:70]}" if text else "other: (no command line)"


def sample(seen: dict[tuple[int, float], tuple[str, float, float]], since: float) -> None:
    """Each process's kind, CPU seconds when first seen (0 if it started after ``since``,
    an epoch time) and now."""
    for process in psutil.process_iter(["pid", "cmdline", "cpu_times", "create_time"]):
        info = process.info
        if info["cpu_times"] is None:
            continue
        key = (info["pid"], info["create_time"])
        cpu = info["cpu_times"].user + info["cpu_times"].system
        earlier = seen.get(key)
        if earlier is None:
            first = cpu if info["create_time"] < since else 0.0
            earlier = (kind(info["cmdline"] or []), first, cpu)
        seen[key] = (earlier[0], earlier[1], cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    seen: dict[tuple[int, float], tuple[str, float, float]] = {}
    began, since = time.monotonic(), time.time()
    sample(seen, since)
    child = subprocess.Popen(command)
    while child.poll() is None:
        sample(seen, since)
        time.sleep(1.0)
    wall = time.monotonic() - began
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, first, last in seen.values():
        if last > first:
            totals[name][0] += 1
            totals[name][1] += last - first
    everything = sum(cpu for _, cpu in totals.values())
    print(f"\n{command!r}: exit {child.returncode}, {wall:.0f} s wall, "
          f"{everything:.0f} CPU-s used on the machine meanwhile", file=sys.stderr)
    for name, (count, cpu) in sorted(totals.items(), key=lambda item: -item[1][1])[:25]:
        print(f"{cpu:8.1f} s {100 * cpu / everything:5.1f} % {int(count):5d} processes  {name}",
              file=sys.stderr)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
