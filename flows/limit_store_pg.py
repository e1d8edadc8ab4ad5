"""The limits' state in PostgreSQL, shared by the processes of every machine of a stack
(docs/limits.md, docs/production.md).

The same queue of turns and the same rate clocks as the SQLite store (``flows.limit_store``
says how they work; the pass over the queue and the GCRA are its pure functions, shared),
in the tables ``planrun_turns`` and ``planrun_rates`` of the stack's own database, beside
Prefect's. Writers take turns the way SQLite's ``BEGIN IMMEDIATE`` makes them: each write
transaction first takes one advisory lock (``pg_advisory_xact_lock``, released by its
commit or rollback); readers never wait.

Times are the database server's clock, read in the same statement that takes the lock:
hosts whose clocks differ still agree on when a lease ran out and on each rate's clock. A
reservation's moment comes back on this host's clock: this clock's offset is measured as the
lock's answer arrives (so the moment is late by that answer's latency, never early).

psycopg's errors become ``LimitStoreUnusable`` here, naming the server, never the password.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.types.json import Jsonb

from planrun.errors import LimitStoreUnusable
from planrun.flows.limit_store import LEASE_S, Asker, Queue, Rate, Turn, conform, grant_pass
from planrun.production import libpq_url, where

#: How long opening the connection may take before the call goes ahead unlimited.
CONNECT_TIMEOUT_S = 5
#: The writers' advisory lock, in the two-key space (apart from the one-key locks other
#: users of the database take): "plan", "lim".
LOCK = (0x706C616E, 0x6C696D)
#: The first statement of every write: takes the lock, and says the database's time.
BEGIN = "SELECT pg_advisory_xact_lock(%s, %s), extract(epoch FROM clock_timestamp())::float8"
SCHEMA = """
CREATE TABLE IF NOT EXISTS planrun_turns (
    ticket BIGSERIAL PRIMARY KEY,
    keys JSONB NOT NULL,
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start DOUBLE PRECISION NOT NULL,
    place TEXT NOT NULL,
    label TEXT NOT NULL,
    granted BOOLEAN NOT NULL DEFAULT false,
    expires DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS planrun_turns_owner ON planrun_turns (owner, granted);
CREATE TABLE IF NOT EXISTS planrun_rates (key TEXT PRIMARY KEY, tat DOUBLE PRECISION NOT NULL);
"""
Connection = psycopg.Connection[tuple[Any, ...]]


class PostgresLimitStore(Asker):
    """The limits' state in the PostgreSQL database ``url`` (``postgresql://`` or
    ``postgresql+asyncpg://``), as seen by this process. Opened on first use."""

    def __init__(self, url: str, *, lease_s: float = LEASE_S) -> None:
        super().__init__(lease_s)
        self.url = url
        self._ahead = 0.0  # how far this host's clock is ahead of the database's
        self._db: Connection | None = None

    # -- the interface ---------------------------------------------------------------------

    def join(self, keys: Mapping[str, int], label: str) -> tuple[int, Queue]:
        with self._write() as (db, now):
            row = db.execute(
                "INSERT INTO planrun_turns (keys, owner, pid, pid_start, place, label, expires)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING ticket",
                self._asking(Jsonb(dict(keys)), label, now)).fetchone()
            assert row is not None
            return int(row[0]), self._pass(db, now)

    def leave(self, tickets: Iterable[int]) -> Queue:
        with self._write() as (db, now):
            db.execute("DELETE FROM planrun_turns WHERE ticket = ANY(%s)", (list(tickets),))
            return self._pass(db, now)

    def granted(self) -> set[int]:
        with self._edge():
            rows = self._connect().execute(
                "SELECT ticket FROM planrun_turns WHERE owner = %s AND granted", (self.owner,))
            return {int(ticket) for ticket, in rows}

    def sweep(self) -> Queue:
        with self._write() as (db, now):
            if self._renewal_due(now):
                db.execute("UPDATE planrun_turns SET expires = %s WHERE owner = %s",
                           (now + self.lease_s, self.owner))
            return self._pass(db, now)

    def reserve(self, rates: Mapping[str, Rate]) -> tuple[float, dict[str, Rate]]:
        with self._write() as (db, now):
            tats = {str(key): float(tat) for key, tat in db.execute(
                "SELECT key, tat FROM planrun_rates WHERE key = ANY(%s)", (list(rates),))}
            go, counted, rest = conform(rates, tats, now)
            db.cursor().executemany("INSERT INTO planrun_rates (key, tat) VALUES (%s, %s) "
                                    "ON CONFLICT (key) DO UPDATE SET tat = excluded.tat",
                                    list(counted.items()))
        return go + self._ahead, rest

    # -- one pass over the queue -----------------------------------------------------------

    def _pass(self, db: Connection, now: float) -> Queue:
        """Reclaim dead turns, then grant in ticket order; what it means for ours."""
        rows = db.execute("SELECT ticket, keys, owner, pid, pid_start, place, granted, expires "
                          "FROM planrun_turns ORDER BY ticket").fetchall()
        decided = grant_pass([Turn(*row) for row in rows], self.owner, self._here, now)
        if decided.gone:
            db.execute("DELETE FROM planrun_turns WHERE ticket = ANY(%s)",
                       (list(decided.gone),))
        if decided.newly:
            db.execute("UPDATE planrun_turns SET granted = true WHERE ticket = ANY(%s)",
                       (decided.newly,))
        return decided.queue

    # -- the connection --------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[Connection, float]]:
        """One write transaction under the writers' lock, and the database's time."""
        with self._edge():
            db = self._connect()
            with db.transaction():
                row = db.execute(BEGIN, LOCK).fetchone()
                assert row is not None
                yield db, float(row[1])

    @contextlib.contextmanager
    def _edge(self) -> Iterator[None]:
        """psycopg's errors as ``LimitStoreUnusable``; a connection that broke is opened
        again by the next call."""
        try:
            yield
        except psycopg.Error as exc:
            if self._db is not None and self._db.broken:
                self.close()
            raise LimitStoreUnusable(f"PostgreSQL at {where(self.url)}: "
                                     f"{_without_password(str(exc), self.url)}") from exc

    def _connect(self) -> Connection:
        if self._db is not None and self._forked():
            # Inherited across a fork: never share it, nor close it (close() would end the
            # parent's session on their shared socket). Dropped, psycopg lets it be: it
            # ends only connections made in the process that collects them.
            self._db = None
        if self._db is None:
            db = psycopg.connect(libpq_url(self.url), autocommit=True,
                                 connect_timeout=CONNECT_TIMEOUT_S)
            try:
                with db.transaction():  # tables made by two processes at once: one at a time
                    db.execute(BEGIN, LOCK)
                    db.execute(SCHEMA)
            except BaseException:
                db.close()
                raise
            self._ahead = _clock_offset(db)
            self._db = db
            self._connected()
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _clock_offset(db: Connection, samples: int = 5) -> float:
    """How far this host's clock is ahead of the database's: from the read of the
    database's clock that took the shortest round trip, its middle. Taken once per
    connection, not from each call: on a loaded machine a call's answer can come late, and
    a reserved moment moved by that lateness would space the calls unevenly."""
    best = (float("inf"), 0.0)
    for _ in range(samples):
        before = time.time()
        row = db.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        after = time.time()
        assert row is not None
        best = min(best, (after - before, (before + after) / 2 - float(row[0])))
    return best[1]


def _without_password(text: str, url: str) -> str:
    """``text`` on one line, with ``url``'s password (as typed, and decoded) as ``***``."""
    text = " ".join(text.split())
    password = urlsplit(url).password
    for form in {password, unquote(password)} if password else ():
        text = text.replace(form, "***")
    return text
