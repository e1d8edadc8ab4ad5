"""The message log: gap-free numbering per run, replay and persistence (the cost of a write:
``benchmarks/bench_store.py``)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from planrun.progress_bridge import store as store_module
from planrun.progress_bridge.store import MessageStore, StoreError

from .clients import draft


def test_seq_starts_at_one_per_run_and_has_no_gaps(tmp_path: Path) -> None:
    store = MessageStore(tmp_path)
    try:
        a = [store.commit("a", [draft(i)])[0] for i in range(1, 101)]
        b = [store.commit("b", [draft(i)])[0] for i in range(1, 4)]
        assert [m.seq for m in a] == list(range(1, 101))
        assert [m.seq for m in b] == [1, 2, 3]
        assert store.last_seq("a") == 100 and store.last_seq("nobody") == 0
        replay = asyncio.run(store.after("a", 97))
        assert [m.seq for m in replay] == [98, 99, 100]
        assert replay[0].wire == a[97].wire
        assert store.runs() == ["a", "b"]
    finally:
        store.close()


def test_numbering_and_replay_survive_reopening(tmp_path: Path) -> None:
    def write(n: int) -> list[int]:
        store = MessageStore(tmp_path)
        try:
            return [store.commit("r", [draft(i)])[0].seq for i in range(n)]
        finally:
            store.close()

    assert write(5) == [1, 2, 3, 4, 5]
    assert write(2) == [6, 7]
    store = MessageStore(tmp_path)
    try:
        assert store.path == tmp_path / "bridge.sqlite3"
        assert [m.seq for m in asyncio.run(store.after("r", 0))] == [1, 2, 3, 4, 5, 6, 7]
        assert store._writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        store.close()


def test_a_failed_write_uses_no_seq(tmp_path: Path) -> None:
    store = MessageStore(tmp_path)
    try:
        store.commit("r", [draft(1)])[0]
        blocker = sqlite3.connect(store.path, timeout=0)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        store._writer.execute("PRAGMA busy_timeout=0")
        with pytest.raises(StoreError, match="messages of run r"):
            store.commit("r", [draft(2)])[0]
        blocker.rollback()
        blocker.close()
        assert store.commit("r", [draft(2)])[0].seq == 2
    finally:
        store.close()


def test_a_closed_store_refuses_appends(tmp_path: Path) -> None:
    store = MessageStore(tmp_path)
    store.commit("r", [draft(1)])
    store.close()
    store.close()  # twice is harmless
    with pytest.raises(StoreError, match="closed"):
        store.commit("r", [draft(2)])[0]


def test_replays_share_one_parsed_message_and_the_cache_is_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 clients replaying a large ``run.started`` hold one copy, not 1,000."""
    monkeypatch.setattr(store_module, "PARSED_KEEP", 3)
    store = MessageStore(tmp_path)
    try:
        store.commit("r", [draft(i) for i in range(1, 6)])
        first = asyncio.run(store.after("r", 0))
        again = asyncio.run(store.after("r", 2))
        assert [m.seq for m in again] == [3, 4, 5]
        assert all(a is b for a, b in zip(first[2:], again, strict=True))
        assert [m.wire for m in first] == [m.wire for m in asyncio.run(store.after("r", 0))]
        assert len(store._parsed) == 3  # noqa: SLF001 - the bound is the point
    finally:
        store.close()
