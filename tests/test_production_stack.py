"""``planrun up --database … --redis … --workers 2`` end to end, on the real PostgreSQL and
Redis (tests/databases.py: skipped, saying why, where they are absent): runs submitted
through the bridge's HTTP API run on both workers and complete; a worker killed with
SIGKILL in the middle of a run (the runner, its fork server, the run's process and its
command: a host that died) costs nothing: the bridge, on the same machine, sees the run's
process gone and marks it crashed at once; it is scheduled again and finished by another
worker process, and no step that had completed runs again. A step's
limits live in the stack's database (docs/limits.md): its turn is a row there while it
runs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from planrun.contract.stream import RUN_ENDED
from planrun.progress_bridge.replica import LOCK_NAME
from tests.databases import postgres_database, redis_database
from tests.helpers import ended, wait_for
from tests.stack import Stack, free_port, free_ports
from tests.test_control import held, release

#: A run silent this long is marked crashed, then recovered (the heartbeat rule): longer
#: than any wait here, so that a run of the killed worker is recovered because its process
#: has exited (docs/production.md, "A worker that dies"), not because it fell silent.
DEAD_AFTER_S = 600
#: Runs each worker executes at once: four held runs must use both workers.
PER_WORKER = 2


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, database: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("production")
    with redis_database() as redis:
        env = {"PLANRUN_HOME": str(tmp / "home"), "PLANRUN_SERVER_PORT": str(free_port()),
               "PLANRUN_DEAD_AFTER_S": str(DEAD_AFTER_S),
               "PREFECT_RUNNER_PROCESS_LIMIT": str(PER_WORKER)}
        running = Stack(tmp, env=env, drop=("PREFECT_API_URL",), timeout=240,
                        port=free_ports(2),
                        args=("--database", database, "--redis", redis, "--workers", "2",
                              "--bridges", "2"))
        try:
            yield running
        finally:
            running.stop()


def submit(stack: Stack, text: str) -> str:
    """POST the plan to the bridge; the run's id."""
    answer = httpx.post(f"{stack.url}/v1/runs", json={"plan": text}, headers=stack.auth,
                        timeout=60)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["run_id"])


def step_status(stack: Stack, run_id: str, step: str) -> str | None:
    return stack.report(run_id)["steps"].get(step, {}).get("status")


def ran(stack: Stack, name: str) -> list[str]:
    """The steps of ``held(name, …)`` that ran, in order, as they wrote them."""
    path = Path(stack.env["PLANRUN_WORKSPACE"]) / f"{name}.txt"
    return path.read_text().split() if path.exists() else []


def runner_of(stack: Stack, name: str) -> psutil.Process | None:
    """The runner whose run is executing the command of ``held(name, …)`` now."""
    for runner, runs in stack.runners().items():
        for run in runs:
            with contextlib.suppress(psutil.Error):
                if any(f"{name}.go" in " ".join(p.cmdline()) for p in run.children(True)):
                    return runner
    return None


def holding(stack: Stack) -> dict[int, int]:
    """How many runs each runner (by process id) executes now."""
    return {runner.pid: len(runs) for runner, runs in stack.runners().items()}


def test_up_says_where_the_server_keeps_its_state_and_how_many_runners_serve(
        stack: Stack) -> None:
    text = stack.output()
    assert "  database    postgresql+asyncpg://postgres@" in text
    assert "  messaging   redis://" in text
    assert "  runners     2 serving planrun/plan-runner, a process per run" in text
    assert (f"  bridges     {stack.url}, http://127.0.0.1:{stack.port + 1} (one message log: "
            "any of them serves any run)") in text
    assert len(stack.runners()) == 2


def test_runs_submitted_through_the_api_run_on_both_workers_and_complete(
        stack: Stack) -> None:
    names = [f"spread{i}" for i in range(2 * PER_WORKER)]
    runs = {name: submit(stack, held(name, 2, holding=[1])) for name in names}
    wait_for(lambda: all(step_status(stack, run_id, "s1") == "running"
                         for run_id in runs.values()), 120, "every run's first step to run")
    # Each worker takes at most PER_WORKER runs: the four in flight are two on each.
    assert sorted(holding(stack).values()) == [PER_WORKER, PER_WORKER]
    for name in names:
        release(stack, name)
    wait_for(lambda: all(stack.report(run_id)["status"] == "completed"
                         for run_id in runs.values()), 120, "every run to complete")
    assert all(ran(stack, name) == ["s1", "s2"] for name in names)


def turns(database: str) -> list[tuple[str, bool]]:
    """The limits' turns in the stack's database: each one's run/step, and whether granted."""
    with psycopg.connect(database) as connection:
        rows = connection.execute("SELECT label, granted FROM planrun_turns ORDER BY ticket")
        return [(str(label), bool(granted)) for label, granted in rows]


def test_a_running_step_holds_its_slot_in_the_stacks_database(stack: Stack,
                                                                database: str) -> None:
    # shell.run is held to twice the cores by default: every call of it takes a turn.
    run_id = submit(stack, held("slot", 1))
    wait_for(lambda: step_status(stack, run_id, "s1") == "running", 120, "s1 to run")
    assert (f"{run_id}/s1", True) in turns(database)
    release(stack, "slot")
    wait_for(lambda: stack.report(run_id)["status"] == "completed", 120, "the run to complete")
    assert [turn for turn in turns(database) if turn[0].startswith(run_id)] == []


def _python(process: psutil.Process) -> bool:
    """Whether ``process`` runs Python (False once gone: the held command's ``sleep 0.05``
    came and went between the listing and this look, and failed a CI run)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return Path(process.exe()).name.startswith("python")
    return False


def test_a_worker_killed_mid_run_costs_no_run_and_no_completed_step_runs_twice(
        stack: Stack) -> None:
    run_id = submit(stack, held("crash", 3, holding=[2]))
    wait_for(lambda: step_status(stack, run_id, "s2") == "running", 120, "s2 to run")
    # Its command has started, not only its task (under load the program starts later).
    wait_for(lambda: ran(stack, "crash") == ["s1", "s2"], 60, "s2's command to write")
    worker = wait_for(lambda: runner_of(stack, "crash"), 30, "the runner of the run")
    tree = [worker, *worker.children(recursive=True)]  # the runner, its run, the command
    # The runner and its run die; the command's launcher sees it and kills the command.
    killed = [process for process in tree if _python(process)]
    command = [process for process in tree if process not in killed]
    for process in killed:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:  # a child that died with the runner before its turn
            pass
    psutil.wait_procs(killed, timeout=10)
    wait_for(lambda: all(map(ended, command)), 10, "the killed run's command to end")

    wait_for(lambda: ran(stack, "crash") == ["s1", "s2", "s2"], 120,
             "the run to be found without its process, recovered and its s2 to run again")
    again = wait_for(lambda: runner_of(stack, "crash"), 30, "the runner of the run")
    assert again.pid != worker.pid
    release(stack, "crash")
    wait_for(lambda: stack.report(run_id)["status"] == "completed", 120,
             "the recovered run to complete")
    # s1 had completed before the kill: kept; s2 was in flight: it ran again.
    assert ran(stack, "crash") == ["s1", "s2", "s2", "s3"]
    report = stack.report(run_id)
    assert [report["steps"][s]["status"] for s in ("s1", "s2", "s3")] == ["completed"] * 3


def committing_bridge(database: str) -> int:
    """The process id of the bridge that commits (0: none yet): it names the connection
    that holds the lock (progress_bridge/replica.py)."""
    with psycopg.connect(database) as connection:
        rows = connection.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
            "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted").fetchall()
    names = [str(name) for (name,) in rows if str(name).startswith(LOCK_NAME)]
    return int(names[0].rsplit(" ", 1)[1]) if names else 0


async def watch(stack: Stack, run_id: str, ports: list[int], got: list[dict[str, Any]]) -> None:
    """Follow the run on the first bridge of ``ports``; when the connection drops, resume
    with ``?after=`` on the next one, as a client of Agent Mode does; until the run ends."""
    for port in itertools.cycle(ports):
        after = got[-1]["seq"] if got else 0
        url = f"ws://127.0.0.1:{port}/v1/runs/{run_id}/ws?after={after}&token={stack.token}"
        with contextlib.suppress(ConnectionClosed, OSError):
            async with connect(url, proxy=None, open_timeout=10) as ws:
                async for text in ws:
                    message = json.loads(text)
                    if message["type"] != "heartbeat":
                        got.append(message)
                    if message["type"] in RUN_ENDED:
                        return


def test_a_bridge_killed_while_clients_watch_costs_them_no_message(stack: Stack,
                                                                   database: str) -> None:
    run_id = submit(stack, held("watched", 3, holding=[2]))
    wait_for(lambda: step_status(stack, run_id, "s2") == "running", 120, "s2 to run")
    pid = wait_for(lambda: committing_bridge(database), 30, "a bridge to hold the lock")
    killed = next(port for port in (stack.port, stack.port + 1)
                  if str(port) in psutil.Process(pid).cmdline())
    other = stack.port + 1 if killed == stack.port else stack.port

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        on_killed: list[dict[str, Any]] = []
        on_other: list[dict[str, Any]] = []
        watchers = asyncio.gather(watch(stack, run_id, [killed, other], on_killed),
                                  watch(stack, run_id, [other, killed], on_other))
        async with asyncio.timeout(30):
            while not (on_killed and on_other):  # both are watching
                await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)  # the bridge that commits, while its clients watch
        release(stack, "watched")
        async with asyncio.timeout(180):
            await watchers
        return on_killed, on_other

    on_killed, on_other = asyncio.run(main())
    seqs = [message["seq"] for message in on_other]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # no gap, nothing twice
    assert on_killed == on_other  # the client that moved missed nothing either
    assert on_other[-1]["type"] == "run.completed"
    steps = {(m["step_id"], m["type"]) for m in on_other if m["type"].startswith("step.")}
    assert {(f"s{i}", "step.completed") for i in (1, 2, 3)} <= steps
    new = wait_for(lambda: committing_bridge(database), 30, "a bridge to hold the lock")
    assert new not in (0, pid)
