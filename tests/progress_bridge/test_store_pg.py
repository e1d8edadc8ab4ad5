"""The message log in the real PostgreSQL (skipped, saying why, where there is none): the
same numbering, replay and persistence as the SQLite log, and each commit announced to the
bridges that share it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest

from planrun.progress_bridge.store import StoreError
from planrun.progress_bridge.store_pg import CHANNEL, PgMessageStore

from ..databases import postgres_database
from .clients import draft


@pytest.fixture
def dsn() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def test_seq_has_no_gaps_and_numbering_survives_reopening(dsn: str) -> None:
    store = PgMessageStore(dsn)
    try:
        assert [store.commit("a", [draft(i)])[0].seq for i in range(1, 6)] == [1, 2, 3, 4, 5]
        assert [m.seq for m in store.commit("b", [draft(1), draft(2)])] == [1, 2]
    finally:
        store.close()
    again = PgMessageStore(dsn)
    try:
        assert again.last_seq("a") == 5 and again.runs() == ["a", "b"]
        assert again.commit("a", [draft(6)])[0].seq == 6
        replay = asyncio.run(again.after("a", 3))
        assert [m.seq for m in replay] == [4, 5, 6]
    finally:
        again.close()


def test_state_seen_events_and_cursor_are_kept_and_reloaded(dsn: str) -> None:
    writer, other = PgMessageStore(dsn), PgMessageStore(dsn)
    try:
        writer.commit("r", [draft(1)], '{"s": 1}', event_id="e1", occurred=100.0)
        writer.commit("r", [draft(2)], '{"s": 2}', event_id="e2", occurred=90.0)
        assert writer.run_state("r") == '{"s": 2}' and writer.cursor == 100.0
        # A bridge that takes over committing reads what the first one wrote.
        assert not other.seen("e1") and other.last_seq("r") == 0
        other.reload()
        assert other.seen("e1") and other.seen("e2") and other.cursor == 100.0
        assert other.last_seq("r") == 2 and other.run_states() == {"r": '{"s": 2}'}
        assert other.commit("r", [draft(3)])[0].seq == 3
    finally:
        writer.close()
        other.close()


def test_a_commit_is_announced_to_listeners_once_it_is_visible(dsn: str) -> None:
    store = PgMessageStore(dsn)
    listener = psycopg.connect(dsn, autocommit=True)
    try:
        listener.execute(f"LISTEN {CHANNEL}")
        store.commit("r", [draft(1), draft(2), draft(3)])
        note = next(listener.notifies(timeout=10, stop_after=1))
        assert note.payload == "r 3"
        assert [m.seq for m in asyncio.run(store.after("r", 0))] == [1, 2, 3]
    finally:
        listener.close()
        store.close()


def test_a_failed_write_uses_no_seq_and_announces_nothing(dsn: str) -> None:
    store = PgMessageStore(dsn)
    blocker = psycopg.connect(dsn)
    listener = psycopg.connect(dsn, autocommit=True)
    try:
        listener.execute(f"LISTEN {CHANNEL}")
        store.commit("r", [draft(1)])
        assert next(listener.notifies(timeout=10, stop_after=1)).payload == "r 1"
        blocker.execute("LOCK TABLE planrun_messages IN EXCLUSIVE MODE")
        store._writer.execute("SET lock_timeout = '100ms'")  # noqa: SLF001
        with pytest.raises(StoreError, match="messages of run r"):
            store.commit("r", [draft(2)])
        blocker.rollback()
        assert list(listener.notifies(timeout=0.3)) == []
        assert store.commit("r", [draft(2)])[0].seq == 2
    finally:
        for connection in (blocker, listener):
            connection.close()
        store.close()


def test_an_unusable_database_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="cannot use the message store in PostgreSQL"):
        PgMessageStore("postgresql://nobody@127.0.0.1:1/none")


def test_bridges_that_open_a_new_store_together_all_open_it(dsn: str) -> None:
    """They would race on creating the tables (a duplicate type error in PostgreSQL)."""
    async def open_one() -> PgMessageStore:
        return await asyncio.to_thread(PgMessageStore, dsn)

    async def main() -> list[PgMessageStore]:
        return list(await asyncio.gather(*(open_one() for _ in range(6))))

    stores = asyncio.run(main())
    try:
        assert [store.commit("r", [draft(1)])[0].seq for store in stores[:1]] == [1]
    finally:
        for store in stores:
            store.close()
