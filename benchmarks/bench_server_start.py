"""A new local Prefect server's first start: migrating a new database, against starting from
the migrated template (planrun/prefect_template.py), alternated in one run.

    .venv/bin/python benchmarks/bench_server_start.py [--repeats 3]

Each start is ``planrun server start`` in a new data directory (and ``server stop`` after),
timed from the command's start to its exit (the server answers its health check then).
"With the template": ``XDG_CACHE_HOME`` holds a template made once before the runs
(``python -m planrun.prefect_template``); "migrating": an empty ``XDG_CACHE_HOME`` (the
server then saves a template there, removed before the next start).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import median, table

PLANRUN = [sys.executable, "-m", "planrun.cli"]


def start_once(root: Path, cache: Path) -> float:
    home = Path(tempfile.mkdtemp(prefix="home-", dir=root))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PLANRUN_HOME=str(home), PLANRUN_SERVER_PORT="0", XDG_CACHE_HOME=str(cache))
    t0 = time.perf_counter()
    started = subprocess.run([*PLANRUN, "server", "start"], env=env, capture_output=True,
                             text=True)
    elapsed = time.perf_counter() - t0
    subprocess.run([*PLANRUN, "server", "stop"], env=env, capture_output=True, check=True)
    if started.returncode != 0:
        raise RuntimeError(f"server start failed: {started.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-server-start-"))
    try:
        warm, cold = root / "warm-cache", root / "cold-cache"
        subprocess.run([sys.executable, "-m", "planrun.prefect_template"], check=True,
                       env={**os.environ, "XDG_CACHE_HOME": str(warm)}, capture_output=True)
        times: dict[str, list[float]] = {"migrating a new database": [],
                                         "from the template": []}
        for rep in range(args.repeats):
            shutil.rmtree(cold, ignore_errors=True)
            times["migrating a new database"].append(start_once(root, cold))
            times["from the template"].append(start_once(root, warm))
            print(f"  repetition {rep + 1}/{args.repeats}: "
                  + ", ".join(f"{ts[-1]:.1f} s" for ts in times.values()), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [[name, f"{median(ts):.1f}", " ".join(f"{t:.1f}" for t in ts)]
            for name, ts in times.items()]
    print(table(["first start of a new server", "median s", "runs s"], rows))
    ratio = median(times["from the template"]) / median(times["migrating a new database"])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"from the template / migrating: {ratio:.2f}; load average at end {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
