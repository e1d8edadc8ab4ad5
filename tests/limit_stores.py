"""The limits' two stores for the tests, each opened the same way in the test and in
processes of their own: the SQLite file, and the PostgreSQL database (a fresh one from
tests/databases.py: skipped, saying why, where PostgreSQL is absent)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planrun.flows.limit_store import LEASE_S, LimitStore, SqliteLimitStore
from planrun.flows.limit_store_pg import PostgresLimitStore
from tests.databases import postgres_database

KINDS = ("sqlite", "postgres")


@dataclass
class Stores:
    """Opens stores of one ``kind`` on one shared place (``where``: the file or the URL)."""

    kind: str
    where: str
    opened: list[SqliteLimitStore | PostgresLimitStore] = field(default_factory=list)

    @property
    def precision(self) -> float:
        """How exactly a reserved moment comes back on this host's clock: Postgres's is
        the database's clock, moved onto ours by an offset measured on connecting (within
        half the shortest of five round trips)."""
        return 1e-6 if self.kind == "sqlite" else 0.02

    def open(self, lease_s: float = LEASE_S) -> LimitStore:
        """A store, as another process would have it."""
        store: SqliteLimitStore | PostgresLimitStore = (
            SqliteLimitStore(Path(self.where), lease_s=lease_s) if self.kind == "sqlite"
            else PostgresLimitStore(self.where, lease_s=lease_s))
        self.opened.append(store)
        return store

    def opening(self) -> str:
        """Python lines that open the store as ``store``, for a script."""
        if self.kind == "sqlite":
            return ("from pathlib import Path\n"
                    "from planrun.flows.limit_store import SqliteLimitStore\n"
                    f"store = SqliteLimitStore(Path({self.where!r}))\n")
        return ("from planrun.flows.limit_store_pg import PostgresLimitStore\n"
                f"store = PostgresLimitStore({self.where!r})\n")

    def script(self, body: str) -> list[str]:
        """The command line of a Python process that opens the store, then runs ``body``."""
        return [sys.executable, "-c", self.opening() + textwrap.dedent(body)]

    def spawn(self, body: str) -> subprocess.Popen[str]:
        """``script(body)`` started, its stdin and stdout pipes of text."""
        return subprocess.Popen(self.script(body), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)

    def execute(self, store: LimitStore, sql: str, *params: Any) -> None:
        """Change the store's tables behind its back (``?`` placeholders; ``turns``)."""
        if isinstance(store, SqliteLimitStore):
            store._connect().execute(sql, params)
        else:
            assert isinstance(store, PostgresLimitStore)
            store._connect().execute(sql.replace("?", "%s").replace("turns", "planrun_turns"),
                                     params)


@contextlib.contextmanager
def stores(kind: str, tmp: Path) -> Iterator[Stores]:
    """Stores of ``kind`` on a new file or database, closed afterwards."""
    with contextlib.ExitStack() as stack:
        where = (str(tmp / "limits.sqlite3") if kind == "sqlite" else
                 stack.enter_context(postgres_database()))
        made = Stores(kind, where)
        try:
            yield made
        finally:
            for store in made.opened:
                store.close()
