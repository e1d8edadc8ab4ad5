"""The bridge's message log in PostgreSQL, for several bridges serving the same runs
(``progress_bridge/replica.py``, docs/production.md): the same tables as the SQLite log,
prefixed ``planrun_`` (they share a database with Prefect's), and every commit announced
on :data:`CHANNEL` to the bridges that only serve. Imported only when a bridge is given a
PostgreSQL URL: psycopg's import costs ≈ 0.1 s of every bridge's start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from planrun.progress_bridge.store import MessageStore, StoreError

#: The same tables in PostgreSQL, prefixed: they share a database with Prefect's.
_PG_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS planrun_messages (
        run_id TEXT NOT NULL, seq BIGINT NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY (run_id, seq))""",
    """CREATE TABLE IF NOT EXISTS planrun_runs (run_id TEXT PRIMARY KEY, state TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS planrun_seen (
        event_id TEXT PRIMARY KEY, occurred DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS planrun_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
)
#: The advisory lock taken while the tables are made ("planrun" in ASCII, plus one).
SCHEMA_LOCK = 0x706C616E72756E + 1
#: The channel a PostgreSQL store's commits are announced on: ``<run id> <last seq>``.
CHANNEL = "planrun_messages"


class PgMessageStore(MessageStore):
    """The message log in PostgreSQL (``dsn``: a ``postgresql://`` URL), shared by several
    bridges: each commit is announced on :data:`CHANNEL`."""

    _SCHEMA = _PG_SCHEMA
    _PREFIX = "planrun_"
    _ERRORS = (psycopg.Error,)

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.path = Path(urlsplit(dsn).path)  # for messages only: the database's name
        try:
            self._open()
        except psycopg.Error as exc:
            for opened in (self.__dict__.get("_writer"), self.__dict__.get("_reader")):
                if opened is not None:
                    opened.close()
            raise StoreError(f"cannot use the message store in PostgreSQL: {exc}") from exc

    def _connect(self) -> Any:
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)

    def _create_tables(self, db: Any) -> None:
        # Bridges starting together would race on CREATE TABLE IF NOT EXISTS (PostgreSQL
        # checks the name, then fails on the duplicate type): one at a time.
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            super()._create_tables(db)

    def _sql(self, text: str) -> str:
        return super()._sql(text).replace("?", "%s")

    def _announce(self, db: Any, run_id: str, seq: int) -> None:
        db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{run_id} {seq}"))
