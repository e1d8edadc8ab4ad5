"""Where concurrency and rate limits keep their shared state: one SQLite file (docs/limits.md).

Every process that uses planrun's data directory (and so the same local Prefect server)
opens ``limits.sqlite3`` there, in WAL mode; each operation is one short transaction
(``BEGIN IMMEDIATE``: writers take turns, readers never wait).

**Concurrency** is a queue of *turns*: a row per step attempt that waits for, or holds,
slots of one or more keys (``tool:shell.run``, ``host:api.example.org``, ``all``), each
with the limit its process asked for. Turns are granted in arrival order: a waiting turn
is granted as soon as every one of its keys has fewer holders than its limit (a turn
blocked on one key does not hold back later turns that do not need that key). Every
change passes over the queue once and grants what it can, so a release wakes the next
turn in the same transaction. A turn is leased to its process: a turn whose process has
died (its pid gone, or reused: the start time differs) is reclaimed at the next pass, and
one whose lease was not renewed for ``LEASE_S`` (a process in another PID namespace or
host, which cannot be checked) too.

**Rate** is GCRA: per key, the theoretical arrival time of the next call. A reservation
reads it, says when the call may go (now, or the exact moment it conforms: no polling)
and moves it on by one emission interval, in one transaction for all the call's keys; a
call that must wait is counted only by the keys that make it wait, and asks the others
again when its moment comes.

``LimitStore`` is the interface the limiter uses; ``PostgresLimitStore``
(``flows.limit_store_pg``) implements it for a stack of several machines. What a store
decides is pure and shared by both: ``grant_pass`` (one pass over the queue) and
``conform`` (GCRA over several keys); a store only reads and writes the rows.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from planrun.errors import LimitStoreUnusable
from planrun.processes import alive, started, this_place

#: The file, in planrun's data directory.
FILE_NAME = "limits.sqlite3"
#: What a store raises when it cannot be used (a full disk, a file it may not write, a
#: database that is down).
STORE_ERRORS = (sqlite3.Error, OSError, LimitStoreUnusable)
#: A turn whose process has not renewed it for this long is taken back.
LEASE_S = 60.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    ticket INTEGER PRIMARY KEY AUTOINCREMENT,
    keys TEXT NOT NULL,          -- {"tool:shell.run": 4, ...}: each key with its limit
    owner TEXT NOT NULL,         -- the store (one per process) that asked
    pid INTEGER NOT NULL,
    pid_start REAL NOT NULL,     -- the process's start time: a reused pid is not it
    place TEXT NOT NULL,         -- host and PID namespace, where the pid means something
    label TEXT NOT NULL,         -- run and step, for a person reading the file
    granted INTEGER NOT NULL DEFAULT 0,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_owner ON turns (owner, granted);
CREATE TABLE IF NOT EXISTS rates (key TEXT PRIMARY KEY, tat REAL NOT NULL);
"""


@dataclass(frozen=True)
class Rate:
    """``per_s`` calls a second, ``burst`` of them at once."""

    per_s: float
    burst: int = 1


@dataclass(frozen=True)
class Place:
    """Where a waiting turn stands: the first key it cannot have yet, that key's limit,
    and how many turns that want the key arrived before it and wait too."""

    key: str
    limit: int
    ahead: int


@dataclass
class Queue:
    """This store's turns after a pass: those granted, and where the others wait."""

    granted: set[int] = field(default_factory=set)
    waiting: dict[int, Place] = field(default_factory=dict)


class Turn(NamedTuple):
    """One row of the queue, as every store keeps it."""

    ticket: int
    keys: Mapping[str, int]  # each key with the limit its process asked for
    owner: str  # the store (one per process) that asked
    pid: int
    pid_start: float  # the process's start time: a reused pid is not it
    place: str  # host and PID namespace, where the pid means something
    granted: bool
    expires: float


@dataclass
class Pass:
    """What one pass over the queue decided: the turns to take back, those to grant now,
    and what it means for one store's turns."""

    gone: set[int]
    newly: list[int]
    queue: Queue


class LimitStore(Protocol):
    """Shared concurrency queues and rate clocks (``SqliteLimitStore``,
    ``PostgresLimitStore``)."""

    def join(self, keys: Mapping[str, int], label: str) -> tuple[int, Queue]:
        """Queue a turn for ``keys`` (each with its limit): its ticket, and the queue."""
        ...

    def leave(self, tickets: Iterable[int]) -> Queue:
        """Give turns up (held or waiting); the next ones are granted at once."""
        ...

    def granted(self) -> set[int]:
        """This store's granted turns: one read, for however many wait."""
        ...

    def sweep(self) -> Queue:
        """Take back the turns of dead processes and grant what can be; renew ours."""
        ...

    def reserve(self, rates: Mapping[str, Rate]) -> tuple[float, dict[str, Rate]]:
        """When (``time.time()``) a call limited by ``rates`` may go, counted then by the
        keys that allow it last; and the keys it must ask again at that moment."""
        ...


class Asker:
    """What a store's turns say of the process that asked: ``owner`` (one per store), its
    pid, start time and place (taken as the store connects, and again after a fork); and
    when it last renewed their leases."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.owner = uuid.uuid4().hex
        self._pid = -1
        self._started = 0.0
        self._here = ""
        self._renewed = 0.0  # on the store's clock

    def _forked(self) -> bool:
        """Whether this process is not the one the store connected in."""
        return self._pid != os.getpid()

    def _connected(self) -> None:
        self._pid, self._started, self._here = (os.getpid(), started(), this_place())

    def _asking(self, keys: object, label: str, now: float) -> tuple[object, ...]:
        """A new turn's row from ``keys`` on: keys, owner, pid, pid_start, place, label,
        expires."""
        return keys, self.owner, self._pid, self._started, self._here, label, now + self.lease_s

    def _renewal_due(self, now: float) -> bool:
        """Whether our leases are due for renewal at ``now`` (then taken as renewed)."""
        if now - self._renewed <= self.lease_s / 4:
            return False
        self._renewed = now
        return True


class SqliteLimitStore(Asker):
    """The limits' state in the SQLite file ``path``, as seen by this process."""

    def __init__(self, path: Path, *, lease_s: float = LEASE_S) -> None:
        super().__init__(lease_s)
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._keys: dict[int, dict[str, int]] = {}  # parsed ``keys`` by ticket

    # -- the interface ---------------------------------------------------------------------

    def join(self, keys: Mapping[str, int], label: str) -> tuple[int, Queue]:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO turns (keys, owner, pid, pid_start, place, label, expires) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                self._asking(json.dumps(dict(keys)), label, time.time()))
            ticket = int(cursor.lastrowid or 0)
            return ticket, self._pass(db)

    def leave(self, tickets: Iterable[int]) -> Queue:
        tickets = list(tickets)
        with self._write() as db:
            db.executemany("DELETE FROM turns WHERE ticket = ?", [(t,) for t in tickets])
            return self._pass(db)

    def granted(self) -> set[int]:
        rows = self._connect().execute(
            "SELECT ticket FROM turns WHERE owner = ? AND granted = 1", (self.owner,))
        return {int(ticket) for ticket, in rows}

    def sweep(self) -> Queue:
        with self._write() as db:
            now = time.time()
            if self._renewal_due(now):
                db.execute("UPDATE turns SET expires = ? WHERE owner = ?",
                           (now + self.lease_s, self.owner))
            return self._pass(db)

    def reserve(self, rates: Mapping[str, Rate]) -> tuple[float, dict[str, Rate]]:
        with self._write() as db:
            now = time.time()
            marks = ",".join("?" * len(rates))
            tats = {key: float(tat) for key, tat in db.execute(
                f"SELECT key, tat FROM rates WHERE key IN ({marks})", list(rates))}
            go, counted, rest = conform(rates, tats, now)
            db.executemany("INSERT OR REPLACE INTO rates (key, tat) VALUES (?, ?)",
                           counted.items())
            return go, rest

    # -- one pass over the queue -----------------------------------------------------------

    def _pass(self, db: sqlite3.Connection) -> Queue:
        """Reclaim dead turns, then grant in ticket order; what it means for ours."""
        rows = db.execute("SELECT ticket, keys, owner, pid, pid_start, place, granted, expires "
                          "FROM turns ORDER BY ticket").fetchall()
        turns = [Turn(ticket, self._parsed(ticket, keys), *rest)
                 for ticket, keys, *rest in rows]
        decided = grant_pass(turns, self.owner, self._here, time.time())
        if decided.gone:
            db.executemany("DELETE FROM turns WHERE ticket = ?", [(t,) for t in decided.gone])
            self._keys = {t: k for t, k in self._keys.items() if t not in decided.gone}
        if decided.newly:
            db.executemany("UPDATE turns SET granted = 1 WHERE ticket = ?",
                           [(t,) for t in decided.newly])
        return decided.queue

    def _parsed(self, ticket: int, keys: str) -> dict[str, int]:
        found = self._keys.get(ticket)
        if found is None:
            found = self._keys[ticket] = {str(k): int(v) for k, v in json.loads(keys).items()}
        return found

    # -- the connection --------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._db is None or self._forked():  # never share one across a fork
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30,
                                 check_same_thread=False)
            # Switching to WAL and creating the tables is not covered by SQLite's busy
            # timeout when two processes do it at once ("database is locked" at once): one
            # at a time, under a lock file beside the database.
            with self.path.with_suffix(".lock").open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(SCHEMA)
            self._db = db
            self._connected()
        return self._db

    def _write(self) -> _Transaction:
        return _Transaction(self._connect())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on an error)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")


def grant_pass(turns: list[Turn], owner: str, here: str, now: float) -> Pass:
    """One pass over ``turns`` (in ticket order) at ``now``: take back those whose lease
    ran out and those of ``here`` whose process has died, then grant in arrival order every
    waiting turn whose keys all have fewer holders than its limits; what that means for
    ``owner``'s turns (granted, or where each waits)."""
    dead = {(pid, start) for pid, start in {(t.pid, t.pid_start) for t in turns
                                            if t.place == here} if not alive(pid, start)}
    gone = {t.ticket for t in turns if t.expires < now or (t.pid, t.pid_start) in dead}
    live = [t for t in turns if t.ticket not in gone]
    held: Counter[str] = Counter()
    for turn in live:
        if turn.granted:
            held.update(turn.keys.keys())
    queue = Queue(granted={t.ticket for t in live if t.owner == owner and t.granted})
    newly: list[int] = []
    ahead: Counter[str] = Counter()
    for turn in live:
        if turn.granted:
            continue
        full = [key for key, limit in turn.keys.items() if held[key] >= limit]
        if not full:
            newly.append(turn.ticket)
            held.update(turn.keys.keys())
            if turn.owner == owner:
                queue.granted.add(turn.ticket)
            continue
        if turn.owner == owner:
            queue.waiting[turn.ticket] = Place(full[0], turn.keys[full[0]], ahead[full[0]])
        ahead.update(turn.keys.keys())
    return Pass(gone, newly, queue)


def conform(rates: Mapping[str, Rate], tats: Mapping[str, float],
            now: float) -> tuple[float, dict[str, float], dict[str, Rate]]:
    """GCRA over every key of ``rates`` (``tats``: the theoretical arrival times stored,
    by key): when the call may go, the new clocks of the keys that count it, and the keys
    it must ask again at that moment.

    When the call conforms to every key now, it is counted in each and goes now. Otherwise
    only the keys that hold it back longest count it, at the moment they allow; the others
    are left to ask again then (counting the call now on a key that would let it go now
    would hold back that key's other calls, of other hosts, behind this one's wait)."""
    clocks = {key: max(tats.get(key, now), now) for key in rates}
    allowed = {k: clocks[k] - (r.burst - 1) / r.per_s for k, r in rates.items()}
    go = max([now, *allowed.values()])
    counted = {k: max(clocks[k], go) + 1 / r.per_s for k, r in rates.items()
               if go <= now or allowed[k] >= go}
    return go, counted, {k: r for k, r in rates.items() if k not in counted}
