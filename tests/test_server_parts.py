"""Parts of the local Prefect server's bookkeeping (planrun/server.py) that need no new
server: a stale record, processes that are gone or not ours. (tests/test_server.py starts
and stops real servers.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planrun import prefect_template, server


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    return proc.pid


def test_the_ui_address_is_the_api_address_without_api() -> None:
    info = server.ServerInfo(url="http://127.0.0.1:4200/api", pid=1)
    assert info.ui_url == "http://127.0.0.1:4200"


def test_a_prefect_process_inherits_the_environment_but_not_coverage_tracing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVERAGE_PROCESS_CONFIG", "{}")
    monkeypatch.setenv("COVERAGE_PROCESS_START", "pyproject.toml")
    monkeypatch.setenv("PLANRUN_TEST_KEPT", "1")
    env = server.prefect_env(PREFECT_HOME="/srv/prefect")
    assert not set(server.COVERAGE_VARS) & set(env)
    assert env["PLANRUN_TEST_KEPT"] == "1" and env["PREFECT_HOME"] == "/srv/prefect"
    assert env["DO_NOT_TRACK"] == "1", "quiet, as every Prefect process planrun starts"


def test_a_record_of_a_server_that_died_is_neither_running_nor_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_HOME", str(tmp_path))
    (tmp_path / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9/api",
                                                      "pid": _dead_pid()}))
    assert server.running() is None
    assert server.stop() is False


def test_a_garbled_record_counts_as_no_server(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_HOME", str(tmp_path))
    (tmp_path / "server.json").write_text('{"url": 42}')
    assert server.running() is None


def test_a_process_that_is_gone_listens_nowhere_and_reaps_as_gone() -> None:
    pid = _dead_pid()
    assert not server._listens(pid, 4200)
    assert server._reap(pid) == -1


def test_a_live_process_that_is_not_our_child_is_not_reaped() -> None:
    assert server._reap(os.getpid()) is None
    assert server.alive(os.getpid())


def test_the_first_start_on_a_machine_says_it_creates_the_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With neither a database nor a template, the person is told at once why the start
    takes tens of seconds; with a template, not. (The start is faked here:
    tests/test_server.py migrates a real database.)"""
    monkeypatch.setenv("PLANRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(server, "start", lambda: server.ServerInfo(
        url="http://127.0.0.1:4999/api", pid=1))
    server._start_telling()
    told = capsys.readouterr().err
    assert told.startswith("planrun: starting the local Prefect server (its first start "
                           "creates the database: ≈ 30 s); log: "), told
    assert "planrun: the Prefect server is up at http://127.0.0.1:4999 (0 s)" in told

    template = prefect_template.template_path()
    template.parent.mkdir(parents=True)
    template.touch()
    server._start_telling()
    assert "creates the database" not in capsys.readouterr().err
