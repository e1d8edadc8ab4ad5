"""Whether the in-process runner keeps memory run after run: batches of runs through one
``planrun up --in-process`` stack on PostgreSQL, the runner's resident set after each.
Flat after the first batch: nothing kept per run; growing: a leak.

    .venv/bin/python benchmarks/bench_runner_memory.py [--batches 6] [--runs 50]
        [--postgres postgresql://postgres@127.0.0.1:5432/test]

Each batch is one ``bench_load.py`` round (runs of 10 0-s steps, submitted at once); the
resident set is read 5 s after the batch's last run ended.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import bench_load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    database = bench_load.fresh_database(args.postgres)
    stack = bench_load.Stack(database, 1, in_process=True)
    try:
        def rss_mb() -> list[int]:
            return [round(p.memory_info().rss / 2**20) for p in stack.runners()]

        print(f"idle: runner RSS MB {rss_mb()}", flush=True)
        for batch in range(1, args.batches + 1):
            row = asyncio.run(bench_load.one_round(stack, args.runs, 10, 0.0))
            time.sleep(5)
            print(f"after batch {batch} of {args.runs} runs: runner RSS MB {rss_mb()}, "
                  f"completed {args.runs - row['not_completed']}", flush=True)
    finally:
        stack.stop()
        bench_load.drop_database(args.postgres, database)
    return 0


if __name__ == "__main__":
    sys.exit(main())
