"""What ``message.send`` delivered, by idempotency key: one SQLite file in planrun's data
directory (docs/agent-tools.md).

The key names one message of one step of one run (the run, the step, the channel, the
recipients and the content): every attempt of the step, and the step run again by a
resumed or retried run, has the same key. A delivery is recorded as soon as the server
confirmed it, so an attempt that comes after a delivered one (the step timed out or its
process died after the server said yes) returns the recorded confirmation instead of
sending the message again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from planrun.home import data_dir, machine_db

FILE_NAME = "messages.sqlite3"
#: Deliveries older than this are forgotten.
KEEP_S = 30 * 86400
SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    key TEXT PRIMARY KEY,
    confirmation TEXT NOT NULL,    -- the step's output, JSON
    delivered_at REAL NOT NULL     -- unix time
)"""


def idempotency_key(run_id: str, step_id: str, channel: str, to: list[str], subject: str,
                    body: str) -> str:
    """The key of one message of one step of one run."""
    text = json.dumps([run_id, step_id, channel, to, subject, body])
    return hashlib.sha256(text.encode()).hexdigest()


class DeliveryLog:
    """Confirmations by idempotency key."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or data_dir() / FILE_NAME

    def _connect(self) -> sqlite3.Connection:
        return machine_db(self.path, SCHEMA)

    def delivered(self, key: str) -> dict[str, Any] | None:
        """The confirmation recorded for ``key``, or None when it was never delivered."""
        with closing(self._connect()) as db:
            row = db.execute("SELECT confirmation FROM deliveries WHERE key = ?",
                             (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def record(self, key: str, confirmation: dict[str, Any]) -> None:
        """Remember that ``key`` was delivered with ``confirmation``."""
        with closing(self._connect()) as db:
            db.execute("INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?)",
                       (key, json.dumps(confirmation), time.time()))
            db.execute("DELETE FROM deliveries WHERE delivered_at < ?", (time.time() - KEEP_S,))
