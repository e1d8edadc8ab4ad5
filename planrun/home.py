"""planrun's data directory, and where a run keeps what it needs outside the workspace."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path


def data_dir() -> Path:
    """planrun's data directory (made if missing): see :func:`data_root`."""
    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def data_root(env: Mapping[str, str] | None = None) -> Path:
    """Where planrun's data directory is (for a process with the environment ``env``, by
    default this one's): ``PLANRUN_HOME``, else ``$XDG_DATA_HOME/planrun``. Not made: for a
    look that must not cost a ``mkdir`` (the policy file is looked for several times a step)."""
    env = os.environ if env is None else env
    if env.get("PLANRUN_HOME"):
        return Path(env["PLANRUN_HOME"])
    home = env.get("HOME") or str(Path.home())
    base = env.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    return Path(base) / "planrun"


def backup_dir(run_id: str) -> Path:
    """Where the run ``run_id`` keeps the originals of the files it changes (its rollback
    journal), from one process of the run to the next."""
    return data_dir() / "runs" / run_id / "backup"


def machine_db(path: Path, schema: str) -> sqlite3.Connection:
    """A SQLite file the processes of the machine share (in WAL mode, autocommit, waiting
    up to 10 s for another's write), with ``schema`` (``CREATE TABLE IF NOT EXISTS``) run."""
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(schema)
    return db
