"""The embedded default: without PREFECT_API_URL, planrun starts one local Prefect server
under its data directory and reuses it for later invocations."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil

from tests.helpers import PLANRUN


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PLANRUN_HOME": str(home), "PLANRUN_SERVER_PORT": "0"}


def test_first_run_starts_a_local_server_and_later_runs_reuse_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nname: embedded\nsteps: [{id: a, tool: core.echo, with: {value: 1}}]\n")
    env = _env(home)
    try:
        first = subprocess.run([*PLANRUN, "run", str(plan), "--json"], capture_output=True,
                               text=True, env=env, timeout=180)
        assert first.returncode == 0, first.stderr
        # Said at once, through a pipe too: the first start takes tens of seconds.
        assert first.stderr.startswith("planrun: starting the local Prefect server (its first "
                                       "start creates the database"), first.stderr
        assert "planrun: the Prefect server is up at http://127.0.0.1:" in first.stderr
        state = json.loads((home / "server.json").read_text())
        assert (home / "prefect" / "prefect.db").exists(), "SQLite under the data directory"
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
