"""A first `planrun run` with planrun's server up and no run host: through the host the
command starts (the default) against the command's own process (`PLANRUN_RUN_HOST=0`),
interleaved, five of each. Wall is the command's; CPU is the command's and the host's (not
the host's fork, which exits unaccounted). Run from the repository's root with a local
server started (`planrun server start`); it kills the user's run hosts between runs.

    .venv/bin/python benchmarks/bench_first_run.py
"""

import os
import resource
import statistics
import subprocess
import time

import psutil

PLAN = "benchmarks/one_step.yaml"


def hosts() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if "planrun.run_host" in (p.info["cmdline"] or [])]


def once(host_on: bool) -> tuple[float, float]:
    running = hosts()
    for host in running:
        host.kill()
    psutil.wait_procs(running, timeout=10)
    env = {**os.environ, "PLANRUN_RUN_HOST": "1" if host_on else "0"}
    r0, began = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    done = subprocess.run([".venv/bin/python", "-m", "planrun.cli", "run", PLAN], env=env,
                          capture_output=True)
    wall, r1 = time.monotonic() - began, resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stderr
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    for h in hosts():  # the host's imports (its forks have exited)
        cpu += sum(h.cpu_times()[:2])
    return wall, cpu


def main() -> None:
    rows: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(5):
        for on in (True, False):
            rows[on].append(once(on))
    print("| command | median wall s | median CPU s | runs, wall s |\n|---|---|---|---|")
    for on, name in ((True, "first run through a new host"),
                     (False, "own process (PLANRUN_RUN_HOST=0)")):
        walls, cpus = [w for w, _ in rows[on]], [c for _, c in rows[on]]
        print(f"| {name} | {statistics.median(walls):.2f} | {statistics.median(cpus):.2f} | "
              + " ".join(f"{w:.2f}" for w in walls) + " |")


if __name__ == "__main__":
    main()
