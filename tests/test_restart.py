"""Restart safety: every planrun process and the Prefect server killed with SIGKILL, then
``planrun up`` again. A paused run stays paused and resumes; a running run is noticed as
crashed (its heartbeats stopped) and recovered from its checkpoints. This stack runs its
own Prefect server (not the test session's), as the default ``planrun up`` does."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import psutil

from tests.helpers import wait_for
from tests.stack import Stack, free_port, messages
from tests.test_control import held, release, report


def status_is(stack: Stack, run_id: str, status: str) -> bool:
    return bool(report(stack, run_id)["status"] == status)


def _is_runner(process: psutil.Process) -> bool:
    try:
        return "planrun.flows.serve" in " ".join(process.cmdline())
    except psutil.Error:  # a short-lived child, gone since it was listed
        return False


def test_a_paused_run_stays_paused_and_a_running_one_is_recovered_after_sigkill_of_all(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"PLANRUN_HOME": str(home), "PLANRUN_SERVER_PORT": str(free_port()),
           "PLANRUN_DEAD_AFTER_S": "12"}
    stack = Stack(tmp_path, env=env, drop=("PREFECT_API_URL",), timeout=240)
    try:
        (tmp_path / "paused.yaml").write_text(held("paused", 4))
        # s2 of this one waits for running.go: it is in flight when everything dies.
        (tmp_path / "running.yaml").write_text(held("running", 3, holding=[2]))
        paused = stack.cli("submit", str(tmp_path / "paused.yaml")).stdout.strip()
        wait_for(lambda: report(stack, paused)["steps"].get("s1", {}).get("status")
                 == "running", 60, "s1 of the first run to run")
        assert stack.cli("pause", paused).returncode == 0
        release(stack, "paused")
        wait_for(lambda: status_is(stack, paused, "paused"), 30, "the pause")
        running = stack.cli("submit", str(tmp_path / "running.yaml")).stdout.strip()
        wait_for(lambda: report(stack, running)["steps"].get("s2", {}).get("status")
                 == "running", 60, "s2 of the second run to run")
        # Its command has started, not only its task (under load the process starts later).
        wait_for(lambda: (tmp_path / "workspace" / "running.txt").read_text().split()
                 == ["s1", "s2"], 60, "s2's command to write")

        stack.kill()  # planrun up, its runner, bridge and runs, and the Prefect server
        stack = Stack(tmp_path, env=env, drop=("PREFECT_API_URL",), port=stack.port,
                      timeout=240)

        assert status_is(stack, paused, "paused")  # still paused, from the bridge's records
        wait_for(lambda: (tmp_path / "workspace" / "running.txt").read_text().split()
                 == ["s1", "s2", "s2"], 120, "the running run to be recovered: s2 again")
        release(stack, "running")
        wait_for(lambda: status_is(stack, running, "completed"), 60,
                 "the recovered run to complete")
        assert stack.cli("resume", paused).returncode == 0
        wait_for(lambda: status_is(stack, paused, "completed"), 60, "the paused run to end")
        stream = messages(stack, running)  # gap-free across the kill and the restart
        assert [m["seq"] for m in stream] == list(range(1, len(stream) + 1))
        kinds = [m["type"] for m in stream]
        assert kinds.count("run.started") == 1 and "run.resumed" in kinds
    finally:
        stack.stop()
        from planrun import server

        info = json.loads((home / "server.json").read_text()) if (
            home / "server.json").exists() else None
        if info:
            server.stop_pid(info["pid"])

    workspace = tmp_path / "workspace"
    assert (workspace / "paused.txt").read_text().split() == ["s1", "s2", "s3", "s4"]
    # s1 had finished: kept; s2 was in flight when everything died: it ran again.
    assert (workspace / "running.txt").read_text().split() == ["s1", "s2", "s2", "s3"]


def test_a_sigkill_of_planrun_up_alone_costs_no_run_and_up_starts_again_at_once(
        tmp_path: Path) -> None:
    """The OOM killer takes ``planrun up`` only: the run in flight goes on (its later steps
    run), and a new ``planrun up`` binds the port the dead bridge's connections still hold."""
    stack = Stack(tmp_path)
    try:
        (tmp_path / "survivor.yaml").write_text(held("survivor", 5, holding=[3]))
        run_id = stack.cli("submit", str(tmp_path / "survivor.yaml")).stdout.strip()
        wait_for(lambda: report(stack, run_id)["steps"].get("s3", {}).get("status")
                 == "running", 60, "s3 to run")
        runner = [p for p in stack.children() if _is_runner(p)]
        assert len(runner) == 1
        with httpx.Client(headers=stack.auth) as kept:  # a client connected through the kill
            assert kept.get(f"{stack.url}/healthz").status_code == 200
            stack.process.send_signal(signal.SIGKILL)
            stack.process.wait(10)
            wait_for(lambda: not runner[0].is_running() or runner[0].status()
                     == psutil.STATUS_ZOMBIE, 10, "the runner to die with planrun up")
            stack = Stack(tmp_path, port=stack.port)  # at once: no "already in use"
        release(stack, "survivor")
        wait_for(lambda: status_is(stack, run_id, "completed"), 90, "the run to complete")
        ran = (tmp_path / "workspace" / "survivor.txt").read_text().split()
        assert ran[-2:] == ["s4", "s5"] and ran.count("s3") >= 1
    finally:
        stack.stop()
