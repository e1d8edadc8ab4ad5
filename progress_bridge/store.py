"""The per-run message log: numbers messages and keeps them in SQLite for replay.

``seq`` starts at 1 per run and has no gaps. The counters are read from the database
when the store opens, so numbering and replay survive a bridge restart. One bridge
process owns the file.

Why commits are synchronous, on the event loop: in WAL mode with ``synchronous=NORMAL`` a
one-row commit does not fsync and costs ≈ 0.05 ms at the median, ≈ 0.2 ms at p99 and a few
ms at the rare WAL checkpoint (``benchmarks/bench_store.py``, BENCHMARKS.md). A writer
thread was tried first: it kept the loop free but, on a loop busy sending to 200 clients,
each commit waited for the GIL (5 ms switch interval), which capped one run at ≈ 30
messages/s. A synchronous commit also means a message is committed before anyone can see it,
with nothing in between that could reorder or lose it. Replay reads run in a thread, on a
connection of their own.

:class:`~progress_bridge.store_pg.PgMessageStore` keeps the same log in PostgreSQL,
for several bridges serving the same runs (``progress_bridge/replica.py``,
docs/production.md): one of them commits, each commit notifies the others, and all of
them replay from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from planrun.contract.stream import Draft, Message

FILENAME = "bridge.sqlite3"
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        run_id TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)) WITHOUT ROWID""",
    # The upstream's view of each run, so a restarted bridge goes on where it stopped.
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY, state TEXT NOT NULL) WITHOUT ROWID""",
    # Prefect events already turned into messages, so none is applied twice.
    """CREATE TABLE IF NOT EXISTS seen (
        event_id TEXT PRIMARY KEY, occurred REAL NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
)
#: How long a seen event id is kept: far longer than any reconciliation looks back.
SEEN_KEEP_S = 24 * 3600.0
#: Parsed messages kept for replays (a few runs' worth).
PARSED_KEEP = 4096


class StoreError(RuntimeError):
    """The message log cannot be written: it is closed, or SQLite failed."""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode loses at most the last commits on power loss, never corrupts.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class MessageStore:
    """Append-only message log per run, persisted to ``<directory>/bridge.sqlite3``."""

    _SCHEMA: tuple[str, ...] = _SCHEMA
    _PREFIX = ""  # of the table names
    _ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, directory: Path | str, *, filename: str = FILENAME) -> None:
        self.path = Path(directory) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        self._writer: Any = self._connect()
        self._create_tables(self._writer)
        self._reader: Any = self._connect()
        # Separate locks: a long replay read must not hold up commits on the event loop.
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        # Messages read lately, parsed, shared by every client that replays them: 1,000
        # clients of one run then hold one ``run.started``, not 1,000 (held under _read_lock).
        self._parsed: OrderedDict[tuple[str, int], Message] = OrderedDict()
        self._closed = False
        self.reload()

    def _connect(self) -> Any:
        return _connect(self.path)

    def _create_tables(self, db: Any) -> None:
        for statement in self._SCHEMA:
            db.execute(statement)

    def _sql(self, text: str) -> str:
        """``text`` with ``{p}`` the table prefix and ``?`` this backend's placeholder."""
        return text.format(p=self._PREFIX)

    def reload(self) -> None:
        """Read the counters, the cursor and the seen events from the database again (a
        bridge that takes over committing from another, on a shared store)."""
        with self._write_lock:
            db = self._writer
            self._last: dict[str, int] = dict(db.execute(self._sql(
                "SELECT run_id, MAX(seq) FROM {p}messages GROUP BY run_id")))
            cursor = db.execute(self._sql(
                "SELECT value FROM {p}meta WHERE key = 'cursor'")).fetchone()
            self.cursor: float | None = float(cursor[0]) if cursor else None
            if self.cursor is not None:
                db.execute(self._sql("DELETE FROM {p}seen WHERE occurred < ?"),
                           (self.cursor - SEEN_KEEP_S,))
            self._seen: set[str] = {row[0] for row in db.execute(self._sql(
                "SELECT event_id FROM {p}seen"))}

    def last_seq(self, run_id: str) -> int:
        """The seq of the run's last message, 0 when it has none."""
        return self._last.get(run_id, 0)

    def commit(self, run_id: str, drafts: list[Draft], state: str | None = None, *,
               event_id: str | None = None, occurred: float | None = None) -> list[Message]:
        """Number ``drafts`` as the run's next messages and commit them in one transaction
        with the run's new ``state`` and, for a Prefect event, its id (as seen) and time
        (the reconciliation cursor): a crash leaves all of it or none.

        Raises :class:`StoreError` if the store is closed or the write fails; nothing is
        then numbered, so the log keeps no gap.
        """
        first = self._last.get(run_id, 0) + 1
        messages = [draft.numbered(run_id, seq) for seq, draft in enumerate(drafts, first)]
        sql = self._sql
        with self._write_lock:
            if self._closed:
                raise StoreError("the message store is closed")
            db = self._writer
            try:
                db.execute("BEGIN")
                rows = db.cursor()
                rows.executemany(sql("INSERT INTO {p}messages (run_id, seq, body) "
                                     "VALUES (?, ?, ?)"),
                                 [(run_id, m.seq, m.wire) for m in messages])
                rows.close()
                if state is not None:
                    db.execute(sql("INSERT INTO {p}runs (run_id, state) VALUES (?, ?) "
                                   "ON CONFLICT (run_id) DO UPDATE SET state = excluded.state"),
                               (run_id, state))
                if event_id is not None and occurred is not None:
                    db.execute(sql("INSERT INTO {p}seen (event_id, occurred) VALUES (?, ?) "
                                   "ON CONFLICT DO NOTHING"), (event_id, occurred))
                    if self.cursor is None or occurred > self.cursor:
                        db.execute(sql("INSERT INTO {p}meta (key, value) VALUES ('cursor', ?) "
                                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
                                   (repr(occurred),))
                if messages:
                    self._announce(db, run_id, messages[-1].seq)
                db.execute("COMMIT")
            except self._ERRORS as exc:
                with contextlib.suppress(*self._ERRORS):
                    db.execute("ROLLBACK")
                raise StoreError(f"writing messages of run {run_id} failed: {exc}") from exc
        if messages:
            self._last[run_id] = messages[-1].seq
        if event_id is not None and occurred is not None:
            self._seen.add(event_id)
            self.cursor = max(occurred, self.cursor or occurred)
        return messages

    def _announce(self, db: Any, run_id: str, seq: int) -> None:
        """Within a commit: tell whoever shares the store (nobody shares a SQLite file)."""

    def noted(self, run_id: str, seq: int) -> None:
        """Another bridge committed the run's messages up to ``seq``."""
        if seq > self._last.get(run_id, 0):
            self._last[run_id] = seq

    def seen(self, event_id: str) -> bool:
        """Whether the Prefect event ``event_id`` was already committed."""
        return event_id in self._seen

    def run_state(self, run_id: str) -> str | None:
        """The run's stored state, or None."""
        with self._write_lock:
            row = self._writer.execute(self._sql("SELECT state FROM {p}runs WHERE run_id = ?"),
                                       (run_id,)).fetchone()
        return row[0] if row else None

    def run_states(self) -> dict[str, str]:
        """Every run's stored state, by run id."""
        with self._write_lock:
            return dict(self._writer.execute(self._sql("SELECT run_id, state FROM {p}runs")))

    async def after(self, run_id: str, seq: int) -> list[Message]:
        """Every message of the run with a seq above ``seq``, in order."""
        return await asyncio.to_thread(self._read_after, run_id, seq)

    def runs(self) -> list[str]:
        """Every run with at least one message."""
        return sorted(self._last)

    def close(self) -> None:
        """Close the database; later commits raise :class:`StoreError`."""
        with self._write_lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
            self._reader.close()

    def _read_after(self, run_id: str, seq: int) -> list[Message]:
        with self._read_lock:
            if self._closed:
                raise StoreError("the message store is closed")
            try:
                rows = self._reader.execute(self._sql(
                    "SELECT seq, body FROM {p}messages WHERE run_id = ? AND seq > ? "
                    "ORDER BY seq"), (run_id, seq)).fetchall()
            except self._ERRORS as exc:
                raise StoreError(f"reading messages of run {run_id} failed: {exc}") from exc
            return [self._parse(run_id, number, body) for number, body in rows]

    def _parse(self, run_id: str, seq: int, body: str) -> Message:
        key = (run_id, seq)
        message = self._parsed.get(key)
        if message is None:
            message = self._parsed[key] = Message.from_json(body)
            if len(self._parsed) > PARSED_KEEP:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(key)
        return message
