"""A migrated Prefect database that a new local server starts from.

A local server's first start creates its SQLite database and runs every one of Prefect's
migrations: ≈ 20–30 s on a 2-core machine, against ≈ 5 s for a start on a database that
has them (BENCHMARKS.md, "A new server from the template"). The migrated database is the
same for every new data directory, so one copy is kept per user and Prefect version in
``$XDG_CACHE_HOME/planrun`` (``~/.cache/planrun``): ``scripts/install`` makes it
(``python -m planrun.prefect_template``), and a server that had to migrate a new database
saves its own. A new data directory's server then starts from a copy. A copy a server
cannot start from is thrown away with the template, and the server migrates as before.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from contextlib import closing, suppress
from importlib.metadata import version
from pathlib import Path

#: The database file under a server's ``PREFECT_HOME``.
DB_NAME = "prefect.db"


def template_path(env: Mapping[str, str] | None = None) -> Path:
    """Where this user's template for the installed Prefect is (it may not exist), for a
    process with the environment ``env`` (by default this one's)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "planrun" / f"prefect-{version('prefect')}.db"


def seed(prefect_home: Path) -> bool:
    """Give a server home without a database a copy of the template; whether it did."""
    db, template = prefect_home / DB_NAME, template_path()
    if db.exists() or not template.exists():
        return False
    prefect_home.mkdir(parents=True, exist_ok=True)
    try:
        _copy(template, db)
    except sqlite3.Error:  # not a database: no template
        template.unlink(missing_ok=True)
        return False
    return True


def save(db: Path) -> None:
    """Keep a consistent copy of ``db`` (a server may be writing it) as the template."""
    target = template_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    _copy(db, target)


def discard(prefect_home: Path) -> None:
    """Throw away a copy a server could not start from, and the template it came from."""
    for path in (template_path(), *(prefect_home / f"{DB_NAME}{end}"
                                    for end in ("", "-wal", "-shm"))):
        path.unlink(missing_ok=True)


def build() -> Path:
    """Make the template if there is none: migrate a new database with Prefect's own
    command (``prefect server database upgrade``), as a server's first start would."""
    from planrun.server import prefect_env

    target = template_path()
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="planrun-template-") as home:
        env = prefect_env(PREFECT_HOME=home)
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # the SQLite file under home
        subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        save(Path(home) / DB_NAME)
    return target


def _copy(source: Path, target: Path) -> None:
    """SQLite's online backup of ``source`` into ``target``, which appears whole or not at
    all (written beside it, then renamed)."""
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(partial)) as dst:
            src.backup(dst)
        os.replace(partial, target)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(partial)


if __name__ == "__main__":
    print(f"planrun: Prefect's database template is {build()}")
