"""The result cache of ``search.web``: one SQLite file in planrun's data directory, shared
by every run and process of the machine (docs/agent-tools.md).

A result list is keyed by the provider, its endpoint and the normalised query (NFKC,
case-folded, spaces collapsed), and kept for the configured TTL. It remembers how many
results were asked for, so a later call asking for more than were fetched goes to the
provider (unless the provider had no more to give).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import unicodedata
from contextlib import closing
from pathlib import Path
from typing import Any

from planrun.home import data_dir, machine_db

FILE_NAME = "search-cache.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    asked INTEGER NOT NULL,        -- max_results of the call that fetched them
    results TEXT NOT NULL,         -- the normalised results, JSON
    stored_at REAL NOT NULL        -- unix time
)"""


def normalised_query(query: str) -> str:
    """``query`` as the cache keys it: ``"  Prefect   PRICING"`` and ``"prefect pricing"``
    are the same search."""
    return " ".join(unicodedata.normalize("NFKC", query).casefold().split())


def cache_key(provider: str, endpoint: str, query: str) -> str:
    text = json.dumps([provider, endpoint, normalised_query(query)])
    return hashlib.sha256(text.encode()).hexdigest()


class SearchCache:
    """Result lists by key, each valid for ``ttl_s`` seconds after it was stored."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / FILE_NAME

    def _connect(self) -> sqlite3.Connection:
        return machine_db(self.path, SCHEMA)

    def get(self, key: str, wanted: int, ttl_s: float) -> list[dict[str, Any]] | None:
        """The stored results for ``key`` if fresh and enough for ``wanted``; else None."""
        if ttl_s <= 0:
            return None
        with closing(self._connect()) as db:
            row = db.execute("SELECT asked, results, stored_at FROM results WHERE key = ?",
                             (key,)).fetchone()
        if row is None or time.time() - row[2] > ttl_s:
            return None
        asked, results = row[0], json.loads(row[1])
        if asked < wanted and len(results) >= asked:
            return None  # fetched fewer than wanted, and the provider may have more
        return list(results[:wanted])

    def put(self, key: str, asked: int, results: list[dict[str, Any]]) -> None:
        """Store ``results`` (fetched asking for ``asked``), replacing older ones; rows
        older than a day past any TTL are dropped on the way."""
        with closing(self._connect()) as db:
            db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                       (key, asked, json.dumps(results), time.time()))
            db.execute("DELETE FROM results WHERE stored_at < ?", (time.time() - 31 * 86400,))

