"""The embedded default: without PREFECT_API_URL, planrun starts one local Prefect server
under its data directory and reuses it for later invocations."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import psutil

from planrun import prefect_template
from tests.helpers import PLANRUN


def _env(home: Path, cache: Path | None = None) -> dict[str, str]:
    """A new data directory's environment; ``cache``: where the database template is kept
    (by default beside ``home``, empty: the first start migrates)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PLANRUN_HOME": str(home), "PLANRUN_SERVER_PORT": "0",
            "XDG_CACHE_HOME": str(cache or home.parent / "cache")}


def _tables(db: Path) -> set[str]:
    return {str(name) for (name,) in _query(db, "SELECT name FROM sqlite_master")}


def _query(db: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


def _server(action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PLANRUN, "server", action], capture_output=True, text=True,
                          env=env, timeout=180)


def _bad_template(cache: Path) -> Path:
    """A template no server starts from: its migration is not one of Prefect's."""
    (cache / "planrun").mkdir(parents=True)
    template = prefect_template.template_path({"XDG_CACHE_HOME": str(cache)})
    with closing(sqlite3.connect(template)) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.execute("INSERT INTO alembic_version VALUES ('0000deadbeef')")
        conn.commit()
    return template


def test_first_run_starts_a_local_server_and_later_runs_reuse_it(tmp_path: Path) -> None:
    """One database migration for the whole story (it costs tens of seconds): the first
    run's server cannot start from the template in the cache, throws it away, migrates a
    new database and keeps it as the template; later runs reuse the server; a new data
    directory's server starts from the template."""
    home = tmp_path / "home"
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nname: embedded\nsteps: [{id: a, tool: core.echo, with: {value: 1}}]\n")
    template = _bad_template(tmp_path / "cache")
    env = _env(home)
    try:
        first = subprocess.run([*PLANRUN, "run", str(plan), "--json"], capture_output=True,
                               text=True, env=env, timeout=180)
        assert first.returncode == 0, first.stderr
        # Said at once, through a pipe too: a migration takes tens of seconds.
        assert first.stderr.startswith("planrun: starting the local Prefect server"), first.stderr
        assert (f"could not start from a copy of the database template ({template}): the "
                "template is thrown away and a new database created") in first.stderr
        assert "planrun: the Prefect server is up at http://127.0.0.1:" in first.stderr
        state = json.loads((home / "server.json").read_text())
        assert (home / "prefect" / "prefect.db").exists(), "SQLite under the data directory"
        (revision,), = _query(template, "SELECT version_num FROM alembic_version")
        assert revision != "0000deadbeef", "the migrated database is kept as the template"
        assert json.loads(first.stdout)["prefect_url"].startswith(state["url"].removesuffix("/api"))

        second = subprocess.run([*PLANRUN, "run", str(plan), "--json"], capture_output=True,
                                text=True, env=env, timeout=180)
        assert second.returncode == 0, second.stderr
        assert "starting the local Prefect server" not in second.stderr
        assert json.loads((home / "server.json").read_text()) == state, "same server reused"
        assert psutil.pid_exists(state["pid"])

        status = subprocess.run([*PLANRUN, "server", "status"], capture_output=True, text=True,
                                env=env, timeout=60)
        assert status.returncode == 0 and state["url"] in status.stdout
    finally:
        stop = subprocess.run([*PLANRUN, "server", "stop"], capture_output=True, text=True,
                              env=env, timeout=60)
    assert stop.stdout.strip() == "stopped"
    assert not psutil.pid_exists(state["pid"]) or \
        psutil.Process(state["pid"]).status() == psutil.STATUS_ZOMBIE

    with closing(sqlite3.connect(template)) as conn:
        conn.execute("CREATE TABLE planrun_marker (x)")  # to tell a copy by
        conn.commit()
    env = _env(tmp_path / "second")
    try:
        new_home = _server("start", env)
        assert new_home.returncode == 0, new_home.stderr
        assert "database" not in new_home.stderr, "no migration, no template thrown away"
    finally:
        _server("stop", env)
    assert "planrun_marker" in _tables(tmp_path / "second" / "prefect" / "prefect.db")


def test_a_port_left_in_time_wait_by_a_stopped_server_is_taken_again() -> None:
    """`planrun server stop` then start: the port the old server's connections left in
    TIME_WAIT is free for the new one (it binds with SO_REUSEADDR), so it keeps 4200 and
    the examples' URLs keep working; a port something listens on is still refused."""
    from planrun.server import free_port

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert free_port(port) != port  # listening: taken
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    waiting = [c for c in psutil.net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_TIME_WAIT]
    assert waiting, "the test made no TIME_WAIT connection"
    assert free_port(port) == port
