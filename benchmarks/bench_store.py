"""What committing one stream message costs the bridge's event loop (``MessageStore.commit``).

    .venv/bin/python benchmarks/bench_store.py [--messages 5000] [--rounds 5]

Commits run on the event loop (see ``progress_bridge/store.py``), so their cost is the loop's
stall. Baseline in the same run, rounds interleaved: a bare one-row ``INSERT`` + ``COMMIT`` of
the same wire bytes into a WAL database with ``synchronous=NORMAL`` (the cheapest durable
write SQLite offers). The store adds numbering, the contract model and its wire form.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import percentile, table  # noqa: E402

from planrun.contract.stream import Draft, Progress  # noqa: E402
from planrun.progress_bridge.store import MessageStore  # noqa: E402


def draft(i: int) -> Draft:
    """A ``step.completed`` draft with a 300-byte summary, as the bridge sends them."""
    return Draft(type="step.completed", step_id=f"s{i}", status="completed", attempt=1,
                 duration_s=0.01, summary=os.urandom(150).hex(),
                 progress=Progress.of(i % 1000, 1000))


def store_round(directory: Path, messages: int) -> list[float]:
    store = MessageStore(directory)
    took = []
    try:
        for i in range(messages):
            message = draft(i)
            before = time.perf_counter()
            store.commit(f"run-{i % 5}", [message])
            took.append(time.perf_counter() - before)
    finally:
        store.close()
    return took


def bare_round(directory: Path, messages: int) -> list[float]:
    db = sqlite3.connect(directory / "bare.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE m (run_id TEXT, seq INTEGER, body TEXT, PRIMARY KEY (run_id, seq))"
               " WITHOUT ROWID")
    took = []
    try:
        for i in range(messages):
            body = draft(i).model_dump_json()
            before = time.perf_counter()
            db.execute("BEGIN")
            db.execute("INSERT INTO m VALUES (?, ?, ?)", (f"run-{i % 5}", i, body))
            db.execute("COMMIT")
            took.append(time.perf_counter() - before)
    finally:
        db.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    store: list[float] = []
    bare: list[float] = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            store += store_round(Path(a), args.messages)
            bare += bare_round(Path(b), args.messages)
    rows = []
    for name, values in (("MessageStore.commit", store), ("bare INSERT + COMMIT", bare)):
        rows.append([name, *(f"{percentile(values, q) * 1e3:.3f}" for q in (50, 99)),
                     f"{max(values) * 1e3:.1f}"])
    ratio = percentile(store, 50) / percentile(bare, 50)
    print(table(["one commit", "p50 ms", "p99 ms", "max ms"], rows))
    print(f"\nstore / bare at the median: {ratio:.2f}x "
          f"({args.rounds} rounds x {args.messages} messages, load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
