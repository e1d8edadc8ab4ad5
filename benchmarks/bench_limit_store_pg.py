"""The PostgreSQL limits store's cost: opening it (connect, tables, the clock offset) with
its first ``reserve``, and one ``reserve`` after that, against PostgreSQL at ``--url``.
``--compare-with FILE`` loads another version of ``flows/limit_store_pg.py`` beside it
(``git show REV:flows/limit_store_pg.py > FILE``) and alternates the two.

    .venv/bin/python benchmarks/bench_limit_store_pg.py --compare-with /tmp/old_pg.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from types import ModuleType

from planrun.flows import limit_store_pg
from planrun.flows.limits import Rate

RATE = {"tool:bench": Rate(per_s=1e6, burst=1_000_000)}  # never waits


def measure(module: ModuleType, url: str, calls: int) -> tuple[float, float]:
    """(ms to open and first reserve, median ms of a reserve)."""
    began = time.perf_counter()
    store = module.PostgresLimitStore(url)
    store.reserve(RATE)
    first = time.perf_counter() - began
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        store.reserve(RATE)
        times.append(time.perf_counter() - began)
    store.close()
    return first * 1000, statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--compare-with", metavar="FILE")
    args = parser.parse_args()
    versions: list[tuple[str, ModuleType]] = []
    if args.compare_with:
        spec = importlib.util.spec_from_file_location("planrun.flows._other_pg", args.compare_with)
        assert spec is not None and spec.loader is not None
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        versions.append((args.compare_with, other))
    versions.append(("this checkout", limit_store_pg))
    for round_ in range(args.rounds):
        for name, module in versions:
            first, each = measure(module, args.url, args.calls)
            print(f"round {round_} {name}: open + first reserve {first:.1f} ms, "
                  f"reserve median {each:.3f} ms")


if __name__ == "__main__":
    main()
