"""The migrated Prefect database a new local server starts from (planrun/prefect_template.py);
the servers themselves are in tests/test_server.py."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from planrun import prefect_template


@pytest.fixture
def template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return prefect_template.template_path()


def rows(db: Path) -> list[tuple[int]]:
    with closing(sqlite3.connect(db)) as conn:
        return list(conn.execute("SELECT x FROM t ORDER BY x"))


def test_the_template_is_a_whole_copy_of_a_database_in_use(tmp_path: Path,
                                                            template: Path) -> None:
    live = tmp_path / "live.db"
    writer = sqlite3.connect(live)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")  # the rows stay in the WAL file
    writer.execute("CREATE TABLE t (x)")
    writer.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(100)])
    writer.commit()
    prefect_template.save(live)  # the server still has it open
    writer.close()
    assert template.parent == tmp_path / "cache" / "planrun"
    assert rows(template) == [(i,) for i in range(100)]
    assert [p.name for p in template.parent.iterdir()] == [template.name]  # no partial left


def test_a_new_home_gets_a_copy_and_a_home_with_a_database_keeps_its_own(
        tmp_path: Path, template: Path) -> None:
    assert not prefect_template.seed(tmp_path / "none")  # no template yet
    source = tmp_path / "source.db"
    with closing(sqlite3.connect(source)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
    prefect_template.save(source)
    assert prefect_template.seed(tmp_path / "new")
    assert rows(tmp_path / "new" / "prefect.db") == [(1,)]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "prefect.db").write_bytes(b"its own")
    assert not prefect_template.seed(tmp_path / "old")
    assert (tmp_path / "old" / "prefect.db").read_bytes() == b"its own"
    prefect_template.discard(tmp_path / "new")
    assert not template.exists() and not (tmp_path / "new" / "prefect.db").exists()


def test_a_template_that_is_not_a_database_is_dropped(tmp_path: Path, template: Path) -> None:
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database at all, but long enough to look like a header")
    assert not prefect_template.seed(tmp_path / "new")
    assert not template.exists()
    assert not (tmp_path / "new" / "prefect.db").exists()
