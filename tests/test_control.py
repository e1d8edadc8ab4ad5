"""Pause, resume and cancel on the real stack (``planrun up``: Prefect server, runner,
bridge), from the CLI, the API and Prefect's own API (what the Prefect UI's buttons call).
Steps append a line to a file, so a step that runs twice is seen."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from planrun.contract.control import PAUSE_HEARD_LABEL
from tests.helpers import ended, unique_digits, wait_for
from tests.stack import Stack, messages


def counting(name: str, steps: int, seconds: float) -> str:
    """A chain of steps that each append their id to ``<name>.txt``, then sleep."""
    lines = [f"version: 1\nname: {name}\nsteps:"]
    for i in range(1, steps + 1):
        needs = f", needs: [s{i - 1}]" if i > 1 else ""
        lines.append(f'  - {{id: s{i}, tool: shell.run{needs}, with: {{argv: [sh, -c, '
                     f'"echo s{i} >> {name}.txt; sleep {seconds}"]}}}}')
    return "\n".join(lines) + "\n"


def held(name: str, steps: int, holding: Iterable[int] | None = None) -> str:
    """A chain of steps that each append their id to ``<name>.txt``; those in ``holding``
    (default: all) then wait for the file ``<name>.go``, so the test decides when a running
    step ends (``release``, ``hold``) instead of racing a sleep."""
    holds = set(range(1, steps + 1) if holding is None else holding)
    lines = [f"version: 1\nname: {name}\nsteps:"]
    for i in range(1, steps + 1):
        needs = f", needs: [s{i - 1}]" if i > 1 else ""
        wait = f"; until [ -e {name}.go ]; do sleep 0.05; done" if i in holds else ""
        lines.append(f'  - {{id: s{i}, tool: shell.run{needs}, with: {{argv: [sh, -c, '
                     f'"echo s{i} >> {name}.txt{wait}"]}}}}')
    return "\n".join(lines) + "\n"


def release(stack: Stack, name: str) -> None:
    (Path(stack.env["PLANRUN_WORKSPACE"]) / f"{name}.go").touch()


def hold(stack: Stack, name: str) -> None:
    (Path(stack.env["PLANRUN_WORKSPACE"]) / f"{name}.go").unlink()


def submit(stack: Stack, tmp_path: Path, text: str) -> str:
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    submitted = stack.cli("submit", str(plan))
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


def report(stack: Stack, run_id: str) -> dict[str, Any]:
    return stack.report(run_id)


def wait_status(stack: Stack, run_id: str, status: str, timeout: float = 60) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(report(stack, run_id))
        return bool(found["status"] == status)

    wait_for(reached, timeout, f"run {run_id} to be {status}")
    return found


def step_started(stack: Stack, run_id: str, step_id: str) -> bool:
    step = report(stack, run_id)["steps"].get(step_id)  # none before the run starts
    return step is not None and step["status"] != "pending"


def lines(stack: Stack, name: str) -> list[str]:
    path = Path(stack.env["PLANRUN_WORKSPACE"]) / f"{name}.txt"
    return path.read_text().split() if path.exists() else []


def commands_of(process: psutil.Process, name: str) -> list[psutil.Process]:
    """The commands of ``held(name, …)`` running under ``process``."""
    found = []
    for child in process.children(recursive=True):
        try:
            if f"{name}.go" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def take_for_dead(run_id: str) -> None:
    """Mark the run's flow run Crashed, as the bridge's crash rule does when it takes a
    live run for dead (a loaded server delivers its events late); the bridge then
    schedules it again, and a runner starts it in a new engine."""
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    async def crash() -> None:
        async with get_client() as client:
            await client.set_flow_run_state(UUID(run_id), Crashed(
                message="no sign of life (the test takes it for dead)"), force=True)

    asyncio.run(crash())


def states_of(run_id: str) -> list[str]:
    """The types of every state the run's flow run has been in, oldest first."""
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client

    async def read() -> list[str]:
        async with get_client() as client:
            return [state.type.value for state in
                    await client.read_flow_run_states(UUID(run_id))]

    return asyncio.run(read())


def a_run_taken_for_dead_while_alive_goes_on_once(stack: Stack, tmp_path: Path,
                                                  name: str) -> None:
    """A run marked crashed while its engine still runs it is started again; the first
    engine, which sees that on its flow run, kills its command and stops without a word,
    so no step runs on in two processes and the run ends once."""
    run_id = submit(stack, tmp_path, held(name, 3, holding=[2]))
    wait_for(lambda: lines(stack, name) == ["s1", "s2"], 120, "s2 to run")
    first = wait_for(lambda: [c for runner in stack.runners() for c in commands_of(runner, name)],
                     60, "s2's command to run")
    take_for_dead(run_id)
    # The first engine stops: its command is killed, though the test never releases it.
    wait_for(lambda: all(map(ended, first)), 60, "the first engine's command to be killed")
    wait_for(lambda: lines(stack, name) == ["s1", "s2", "s2"], 120,
             "the run's new engine to run s2 again")
    release(stack, name)
    final = wait_status(stack, run_id, "completed", timeout=120)
    assert lines(stack, name) == ["s1", "s2", "s2", "s3"]  # s1 kept; s3 run once
    assert [final["steps"][s]["status"] for s in ("s1", "s2", "s3")] == ["completed"] * 3
    states = wait_for(lambda: (found := states_of(run_id))[-1] == "COMPLETED" and found, 60,
                      "the flow run to be completed")
    assert states.count("COMPLETED") == 1, states


def a_submitted_run_starts_without_waiting_for_the_poll(stack: Stack, tmp_path: Path,
                                                        poll_s: float) -> None:
    """For a stack whose runner polls every ``poll_s``, longer than the wait here: a run
    starts because the server said it was scheduled (flows/scheduled.py)."""
    assert stack.runner().environ()["PREFECT_RUNNER_POLL_FREQUENCY"] == str(poll_s)
    run_id = submit(stack, tmp_path, held("woken", 1, holding=[]))
    wait_status(stack, run_id, "completed", timeout=poll_s / 4)
    assert lines(stack, "woken") == ["s1"]


def test_a_run_taken_for_dead_while_alive_goes_on_in_one_process_only(
        stack: Stack, tmp_path: Path) -> None:
    a_run_taken_for_dead_while_alive_goes_on_once(stack, tmp_path, "fenced")


def test_a_paused_run_holds_no_process_and_resumes_without_running_a_step_twice(
        stack: Stack, tmp_path: Path) -> None:
    others = set(stack.run_processes())  # the shared stack's earlier runs may be exiting
    run_id = submit(stack, tmp_path, held("twice", 6))
    wait_for(lambda: step_started(stack, run_id, "s1"), 60, "s1 to start")
    assert len(set(stack.run_processes()) - others) == 1

    paused = stack.cli("pause", run_id)  # while s1 runs: it finishes, nothing new starts
    assert paused.returncode == 0 and "pausing" in paused.stdout
    release(stack, "twice")
    first = wait_status(stack, run_id, "paused")
    assert first["steps"]["s1"]["status"] == "completed"  # the running step finished
    assert first["steps"]["s2"]["status"] == "pending"
    wait_for(lambda: not set(stack.run_processes()) - others, 20,
             "the paused run's process to exit")
    done_before = lines(stack, "twice")
    assert done_before == ["s1"]

    hold(stack, "twice")
    assert stack.cli("resume", run_id).returncode == 0
    wait_for(lambda: step_started(stack, run_id, "s2"), 60, "the run to go on with s2")
    assert stack.cli("pause", run_id).returncode == 0  # a second cycle
    release(stack, "twice")
    second = wait_status(stack, run_id, "paused")
    assert second["steps"]["s3"]["status"] == "pending"
    assert stack.cli("resume", run_id).returncode == 0
    final = wait_status(stack, run_id, "completed")

    assert lines(stack, "twice") == [f"s{i}" for i in range(1, 7)]  # each step just once
    assert done_before == lines(stack, "twice")[:len(done_before)]
    assert all(step["attempts"] == 1 for step in final["steps"].values())
    watched = stack.cli("watch", run_id)  # the whole stream replays, pauses included
    assert watched.returncode == 0
    assert watched.stderr.count("run twice paused") == 2, watched.stderr
    assert watched.stderr.count("s3 completed attempt 1") == 1


def test_control_requests_the_state_does_not_allow_answer_409_with_the_reason(
        stack: Stack, tmp_path: Path) -> None:
    run_id = submit(stack, tmp_path, counting("conflicts", 1, 0.1))
    wait_status(stack, run_id, "completed")
    for action, words in (("pause", "only a running run can be paused"),
                          ("resume", "only a paused or crashed run can be resumed"),
                          ("cancel", "has already ended")):
        answer = stack.post(f"/v1/runs/{run_id}/{action}")
        assert answer.status_code == 409
        assert words in answer.json()["detail"]
    assert stack.post("/v1/runs/not-a-uuid/pause").status_code == 404
    refused = stack.cli("resume", run_id)
    assert refused.returncode == 1 and "409" in refused.stderr


def test_prefects_own_pause_and_resume_work_the_same(stack: Stack, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import aresume_flow_run
    from prefect.states import Paused

    run_id = submit(stack, tmp_path, held("ui", 3))
    wait_for(lambda: step_started(stack, run_id, "s1"), 60, "s1 to start")

    async def pause_like_the_ui() -> str:  # the UI's "change state" forces a Paused state
        async with get_client() as client:
            result = await client.set_flow_run_state(run_id, Paused(), force=True)
        assert result.state is not None
        return str(result.state.id)

    async def heard() -> str | None:
        async with get_client() as client:
            labels = (await client.read_flow_run(run_id)).labels or {}
        return labels.get(PAUSE_HEARD_LABEL)

    import asyncio
    paused = asyncio.run(pause_like_the_ui())
    # The engine takes it in at its next read of the run's state (every 0.5 s) and says so
    # on the flow run; the Prefect UI shows that label. From then on nothing new starts.
    wait_for(lambda: asyncio.run(heard()) == paused, 30, "the engine to hear the pause")
    release(stack, "ui")
    wait_status(stack, run_id, "paused")
    assert lines(stack, "ui") == ["s1"]
    asyncio.run(aresume_flow_run(run_id))  # the UI's Resume button
    wait_status(stack, run_id, "completed")
    assert lines(stack, "ui") == ["s1", "s2", "s3"]


def test_pauses_racing_with_step_ends_lose_and_repeat_nothing(stack: Stack,
                                                            tmp_path: Path) -> None:
    run_id = submit(stack, tmp_path, counting("race", 12, 0.05))
    wait_for(lambda: step_started(stack, run_id, "s1"), 60, "s1 to start")
    for _ in range(3):
        if report(stack, run_id)["status"] != "running":
            break
        stack.post(f"/v1/runs/{run_id}/pause")  # 409 if it just ended: fine
        status = wait_for(lambda: report(stack, run_id)["status"] in ("paused", "completed")
                          and report(stack, run_id)["status"], 30, "the pause or the end")
        if status == "paused":
            assert stack.post(f"/v1/runs/{run_id}/resume").status_code == 202
            wait_for(lambda: report(stack, run_id)["status"] != "paused", 30, "the resume")
    wait_status(stack, run_id, "completed")
    assert lines(stack, "race") == [f"s{i}" for i in range(1, 13)]


def test_cancel_kills_the_running_command_and_rolls_the_files_back(
        stack: Stack, tmp_path: Path) -> None:
    seconds = f"60.{unique_digits()}"  # no other suite's sleep on this machine looks the same
    text = f"""version: 1
name: cancel-me
steps:
  - {{id: write, tool: file.write, with: {{path: cancel-me.out, content: written}}}}
  - id: long
    tool: shell.run
    needs: [write]
    with: {{argv: [sleep, "{seconds}"]}}
"""
    run_id = submit(stack, tmp_path, text)
    workspace = Path(stack.env["PLANRUN_WORKSPACE"])
    # The command may run in the sandbox's PID namespace: find it on the host by its argv.
    found = wait_for(lambda: [p for p in psutil.process_iter(["cmdline"])
                              if p.info["cmdline"] == ["sleep", seconds]], 60,
                     "the long command to start")
    pid = found[0].pid
    assert (workspace / "cancel-me.out").read_text() == "written"

    cancelled = stack.cli("cancel", run_id)
    assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout
    final = wait_status(stack, run_id, "cancelled")
    assert final["steps"]["long"]["status"] == "cancelled"
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status()
             == psutil.STATUS_ZOMBIE, 10, "the command to be killed")
    assert not (workspace / "cancel-me.out").exists()  # rolled back


def test_cancelling_a_paused_run_rolls_its_files_back(stack: Stack, tmp_path: Path) -> None:
    text = """version: 1
name: paused-cancel
steps:
  - {id: write, tool: file.write, with: {path: paused-cancel.out, content: written}}
  - id: wait
    tool: shell.run
    needs: [write]
    with: {argv: [sh, -c, "until [ -e paused-cancel.go ]; do sleep 0.05; done"]}
  - {id: after, tool: core.echo, needs: [wait], with: {value: never}}
"""
    run_id = submit(stack, tmp_path, text)
    wait_for(lambda: step_started(stack, run_id, "wait"), 60, "the wait to start")
    assert stack.cli("pause", run_id).returncode == 0
    release(stack, "paused-cancel")  # the running step ends after the pause was asked
    wait_status(stack, run_id, "paused")
    assert (Path(stack.env["PLANRUN_WORKSPACE"]) / "paused-cancel.out").exists()

    assert stack.cli("cancel", run_id).returncode == 0
    final = wait_status(stack, run_id, "cancelled", timeout=40)
    assert final["steps"]["after"]["status"] == "skipped"
    assert not (Path(stack.env["PLANRUN_WORKSPACE"]) / "paused-cancel.out").exists()
    assert os.path.exists(stack.env["PLANRUN_WORKSPACE"])


GATES = """version: 1
name: gates
steps:
  - {id: start, tool: shell.run, with: {argv: [sh, -c, "echo start >> gates.txt"]}}
  - id: approve_me
    tool: shell.run
    needs: [start]
    approval: {prompt: "Run approve_me?"}
    with: {argv: [sh, -c, "echo approve_me >> gates.txt"]}
  - id: reject_me
    tool: shell.run
    needs: [start]
    approval: {prompt: "Run reject_me?"}
    with: {argv: [sh, -c, "echo reject_me >> gates.txt"]}
  - id: late
    tool: shell.run
    needs: [start]
    approval: {prompt: "Run late?", timeout: 2s}
    with: {argv: [sh, -c, "echo late >> gates.txt"]}
  - {id: broken, tool: core.fail, critical: false, needs: [start], with: {category: logic}}
  - id: never_asked
    tool: shell.run
    needs: [broken]
    approval: {prompt: "Never asked"}
    with: {argv: [sh, -c, "echo never >> gates.txt"]}
"""


def test_gates_are_asked_one_by_one_and_approve_reject_and_timeout_decide(
        stack: Stack, tmp_path: Path) -> None:
    run_id = submit(stack, tmp_path, GATES)
    answers = {"approve_me": (), "reject_me": ("--reject", "--comment", "not now")}

    def answer_a_gate_or_end() -> bool:
        """Answer the gate the run waits at, if it is one of ours (``late`` times out)."""
        seen = report(stack, run_id)
        gate = (seen.get("awaiting_approval") or {}).get("step_id")
        if seen["status"] == "awaiting_approval" and gate in answers:
            assert seen["awaiting_approval"]["prompt"] == f"Run {gate}?"
            answered = stack.cli("approve", run_id, gate, *answers.pop(gate))
            assert answered.returncode == 0, answered.stderr
        return bool(seen["status"] in ("completed_with_errors", "failed"))

    wait_for(answer_a_gate_or_end, 120, "the run to pass its gates and end")
    final = wait_status(stack, run_id, "completed_with_errors")
    asked = [m["step_id"] for m in messages(stack, run_id)
             if m["type"] == "run.awaiting_approval"]
    assert sorted(asked) == ["approve_me", "late", "reject_me"]  # each asked, once
    steps = final["steps"]
    assert steps["approve_me"]["status"] == "completed"
    assert (steps["reject_me"]["status"], steps["reject_me"]["reason"]) == (
        "skipped", "rejected: not now")
    assert (steps["late"]["status"], steps["late"]["reason"]) == ("skipped",
                                                                  "approval timed out")
    assert steps["never_asked"]["reason"] == "upstream broken failed"
    assert sorted(lines(stack, "gates")) == ["approve_me", "start"]
    refused = stack.post(f"/v1/runs/{run_id}/steps/approve_me/approve")
    assert refused.status_code == 409 and "not waiting for an approval" in refused.text


def test_a_gate_answered_the_moment_it_is_announced_is_taken(stack: Stack,
                                                             tmp_path: Path) -> None:
    """The run says it waits at a gate a moment before it is suspended there: an answer
    sent as the message arrives is taken (202), not refused, and the step runs."""
    run_id = submit(stack, tmp_path, """version: 1
name: at-once
steps:
  - id: go
    tool: shell.run
    approval: {prompt: "Go?"}
    with: {argv: [sh, -c, "echo go >> at-once.txt"]}
""")
    answers: list[httpx.Response] = []

    def answer(message: dict[str, Any]) -> None:
        if message["type"] == "run.awaiting_approval":
            answers.append(stack.post(
                f"/v1/runs/{run_id}/steps/{message['step_id']}/approve",
                json={"comment": "at once"}))

    stream = messages(stack, run_id, timeout=120, on=answer)
    assert [a.status_code for a in answers] == [202], [a.text for a in answers]
    assert stream[-1]["type"] == "run.completed"
    assert lines(stack, "at-once") == ["go"]


def test_a_run_waiting_at_a_gate_is_cancelled(stack: Stack, tmp_path: Path) -> None:
    """Prefect resumes a run that waits for its gate's form only with the form filled in:
    the cancel gives one, and the run ends cancelled with its gated step skipped."""
    run_id = submit(stack, tmp_path, """version: 1
name: cancel-at-gate
steps:
  - id: gated
    tool: shell.run
    approval: {prompt: "Go?"}
    with: {argv: [sh, -c, "echo gated >> cancel-at-gate.txt"]}
""")
    wait_status(stack, run_id, "awaiting_approval")
    cancelled = stack.cli("cancel", run_id)
    assert cancelled.returncode == 0, cancelled.stderr
    final = wait_status(stack, run_id, "cancelled", timeout=60)
    assert final["steps"]["gated"]["status"] == "skipped"
    assert not (Path(stack.env["PLANRUN_WORKSPACE"]) / "cancel-at-gate.txt").exists()


@pytest.mark.parametrize(("action", "ends"), [("resume", "completed"), ("cancel", "cancelled")])
def test_a_pause_that_times_out_resumes_or_cancels_the_run(
        stack: Stack, tmp_path: Path, action: str, ends: str) -> None:
    name = f"timeout-{action}"
    text = held(name, 3).replace(
        "steps:", f"limits: {{pause_timeout: 2s, on_pause_timeout: {action}}}\nsteps:", 1)
    run_id = submit(stack, tmp_path, text)
    wait_for(lambda: step_started(stack, run_id, "s1"), 60, "s1 to start")
    assert stack.cli("pause", run_id).returncode == 0
    release(stack, name)
    wait_status(stack, run_id, "paused")
    final = wait_status(stack, run_id, ends, timeout=40)  # no one resumes it
    if action == "resume":
        assert lines(stack, name) == ["s1", "s2", "s3"]
    else:
        assert final["steps"]["s3"]["status"] == "skipped"
        assert "s3" not in lines(stack, name)


def test_resume_starts_a_crashed_run_again(stack: Stack) -> None:
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    @flow(name="planrun-crash-stand-in")
    def stand_in() -> None:  # never runs: the flow run is only created
        return None

    async def crashed_run() -> str:
        async with get_client() as client:
            flow_run = await client.create_flow_run(stand_in, tags=["planrun"])
            await client.set_flow_run_state(flow_run.id, Crashed(message="killed"), force=True)
            return str(flow_run.id)

    async def state_of(run_id: str) -> str:
        async with get_client() as client:
            return str((await client.read_flow_run(run_id)).state.type.value)  # type: ignore[arg-type,union-attr]

    run_id = asyncio.run(crashed_run())
    answer = stack.post(f"/v1/runs/{run_id}/resume")
    assert answer.status_code == 202 and answer.json()["status"] == "resuming"
    assert asyncio.run(state_of(run_id)) == "SCHEDULED"  # a runner takes it from here
