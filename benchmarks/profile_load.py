"""Where the CPU goes under load: one ``bench_load.py`` round, with py-spy sampling the
Prefect server, the bridge and the runner of its stack, then each one's busiest functions.

    .venv/bin/pip install py-spy        # not a dependency of planrun: a profiler
    .venv/bin/python benchmarks/profile_load.py [--runs 50] [--mode in-process]
        [--postgres postgresql://postgres@127.0.0.1:5432/test] [--out /tmp/profile-load]

py-spy samples each process ``--rate`` times a second without stopping it; a function's
share is the share of samples with it on the stack (idle threads left out). The samplers
take some CPU of their own: compare the shares within one profile, and the round's figures
only with rounds profiled the same way. The raw stacks stay in ``--out`` (collapsed
format: flamegraph.pl or speedscope read them).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
#: The processes sampled: a name and what its command line holds.
PARTS = {"server": "prefect server start", "bridge": "progress_bridge",
         "runner": "planrun.flows.serve"}
#: The frames counted for each part: the code that part runs (not the event loop's own).
FRAMES = {"server": r"prefect/server/(api|services|events|models|orchestration)/",
          "bridge": r"(progress_bridge|planrun)/", "runner": r"(planrun|prefect)/"}


def busiest(path: Path, frames: str, top: int) -> tuple[int, list[tuple[str, int]]]:
    """The samples in ``path`` and the ``top`` functions matching ``frames`` by the samples
    they are on the stack of (each function once per stack)."""
    pattern, total, on = re.compile(frames), 0, Counter[str]()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():  # a frame's text may hold a line break
            continue
        total += int(count)
        seen = {re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")
                if pattern.search(frame)}
        for frame in seen:
            on[frame] += int(count)
    return total, on.most_common(top)


def find(pattern: str, after: float) -> psutil.Process | None:
    for process in psutil.process_iter(["cmdline", "create_time"]):
        if process.info["create_time"] >= after and pattern in " ".join(
                process.info["cmdline"] or []):
            return process
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="50")
    parser.add_argument("--mode", default="in-process", choices=["process", "in-process"])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rate", type=int, default=40)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="/tmp/profile-load")
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    bench = subprocess.Popen(
        [sys.executable, str(BENCH / "bench_load.py"), "--runs", args.runs, "--step-s", "0",
         "--modes", args.mode, "--only-postgres", "--postgres", args.postgres,
         "--workers", "1", "--json", str(out / "round.json")],
        stdout=(out / "round.txt").open("w"), stderr=subprocess.STDOUT)
    found: dict[str, psutil.Process] = {}
    deadline = time.monotonic() + 300
    while len(found) < len(PARTS) and bench.poll() is None and time.monotonic() < deadline:
        for part, pattern in PARTS.items():
            if part not in found and (process := find(pattern, began)) is not None:
                found[part] = process
        time.sleep(0.2)
    samplers = [subprocess.Popen([spy, "record", "--pid", str(process.pid), "--rate",
                                  str(args.rate), "--nonblocking", "--format", "raw",
                                  "-o", str(out / f"{part}.txt")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for part, process in found.items()]
    bench.wait()
    for sampler in samplers:  # each ends when its process does: the round stopped them
        sampler.wait(60)
    print("\n".join((out / "round.txt").read_text().strip().splitlines()[-3:]))
    for part in found:
        path = out / f"{part}.txt"
        if not path.exists():
            print(f"\n{part}: no samples")
            continue
        total, top = busiest(path, FRAMES[part], args.top)
        print(f"\n{part}: {total} samples")
        for frame, count in top:
            print(f"{count:7d} {100 * count / max(total, 1):5.1f}%  {frame[:140]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
