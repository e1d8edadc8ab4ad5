"""Gates asked on the terminal (docs/approvals.md): ``planrun run`` and ``planrun watch`` on
a real pseudo-terminal, against a real stack, whose bridge and CLI can answer the same
gate; the first answer counts."""

from __future__ import annotations

import re
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from tests.helpers import PLANRUN, cli_json
from tests.stack import Stack
from tests.terminal import Terminal

PLAN = """
    version: 1
    name: terminal-gate
    steps:
      - {id: prepare, tool: core.echo, with: {value: 1}}
      - id: ship
        tool: file.write
        needs: [prepare]
        approval: {prompt: "Ship it?"}
        with: {path: shipped.txt, content: shipped}
    """
ASKED = r"run ([0-9a-f-]{36}) waits for approval of step ship: Ship it\?"


@pytest.fixture
def plan(tmp_path: Path) -> Path:
    path = tmp_path / "terminal-gate.yaml"
    path.write_text(textwrap.dedent(PLAN))
    return path


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


def on_terminal(stack: Stack, terminals: list[Terminal], tmp_path: Path,
                *args: str) -> Terminal:
    """``planrun ARGS`` on a pseudo-terminal, a client of ``stack``, in ``tmp_path``."""
    env = {**stack.env, "PLANRUN_WORKSPACE": str(tmp_path / "workspace")}
    terminal = Terminal([*PLANRUN, *args], env, tmp_path)
    terminals.append(terminal)
    return terminal


def flow_run_state(run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(run_id)).state
    return state.type.value if state is not None else "none"


def test_planrun_run_asks_at_a_gate_on_its_terminal_and_a_yes_runs_the_step(
        stack: Stack, plan: Path, tmp_path: Path, terminals: list[Terminal]) -> None:
    terminal = on_terminal(stack, terminals, tmp_path, "run", str(plan))
    terminal.expect(ASKED)
    terminal.expect(r"approve\? \[y/N\] $")
    terminal.type("maybe")  # a typo decides nothing
    terminal.expect(r"please answer y or n\napprove\? \[y/N\] $")
    terminal.type("y")
    terminal.expect(r"comment \(optional, Enter for none\): $")
    terminal.type("looks good")
    terminal.expect("step ship approved")
    assert terminal.wait() == 0, terminal.text()  # completed: every step ran
    assert (tmp_path / "workspace" / "shipped.txt").read_text() == "shipped"
    assert re.search(r"run [0-9a-f-]{36} completed", terminal.text())


def test_an_answer_given_elsewhere_first_withdraws_the_terminals_question(
        stack: Stack, plan: Path, tmp_path: Path, terminals: list[Terminal]) -> None:
    terminal = on_terminal(stack, terminals, tmp_path, "run", str(plan))
    run_id = terminal.expect(ASKED).group(1)
    terminal.expect(r"approve\? \[y/N\] $")
    approved = stack.cli("approve", run_id, "ship", "--comment", "from the CLI")
    assert approved.returncode == 0, approved.stderr
    terminal.expect(r"answered elsewhere: step ship approved \(from the CLI\)")
    assert terminal.wait() == 0, terminal.text()
    assert (tmp_path / "workspace" / "shipped.txt").read_text() == "shipped"


def test_no_answer_in_time_skips_the_step_and_ctrl_c_cancels_a_run_waiting_at_a_gate(
        stack: Stack, tmp_path: Path, terminals: list[Terminal]) -> None:
    plan = tmp_path / "timeout.yaml"
    plan.write_text(textwrap.dedent(PLAN).replace(
        'approval: {prompt: "Ship it?"}', 'approval: {prompt: "Ship it?", timeout: 2s}'))
    terminal = on_terminal(stack, terminals, tmp_path, "run", str(plan))
    terminal.expect(r"approve\? \[y/N\] $")
    terminal.expect(r"no answer in time: step ship skipped \(approval timed out\)", 30)
    assert terminal.wait() == 3, terminal.text()  # completed_with_errors
    assert not (tmp_path / "workspace" / "shipped.txt").exists()

    waiting = tmp_path / "waiting.yaml"  # no timeout: it waits until Ctrl-C
    waiting.write_text(textwrap.dedent(PLAN))
    interrupted = on_terminal(stack, terminals, tmp_path, "run", str(waiting))
    interrupted.expect(r"approve\? \[y/N\] $")
    interrupted.process.send_signal(signal.SIGINT)
    assert interrupted.wait() == 4, interrupted.text()  # cancelled
    run_id = re.findall(ASKED, interrupted.text())[0]
    assert re.search(rf"run {run_id} cancelled", interrupted.text())
    assert flow_run_state(run_id) == "CANCELLED"  # not left paused at the gate



def test_without_a_terminal_planrun_run_skips_a_gated_step_as_before(
        stack: Stack, plan: Path, tmp_path: Path) -> None:
    code, report = cli_json("run", str(plan), cwd=tmp_path,
                            env={"PLANRUN_WORKSPACE": str(tmp_path / "workspace")})
    assert code == 3, report  # completed_with_errors
    assert report["steps"]["ship"]["status"] == "skipped"
    assert report["steps"]["ship"]["reason"].startswith(
        "rejected: no one can be asked in this run")
    assert not (tmp_path / "workspace" / "shipped.txt").exists()


def test_planrun_watch_asks_at_a_gate_of_a_run_of_the_stack(
        stack: Stack, plan: Path, tmp_path: Path, terminals: list[Terminal]) -> None:
    submitted = stack.cli("submit", str(plan))
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    terminal = on_terminal(stack, terminals, tmp_path, "watch", run_id)
    terminal.expect(ASKED.replace("([0-9a-f-]{36})", run_id))
    terminal.expect(r"approve\? \[y/N\] $")
    terminal.type("n")
    terminal.expect(r"comment \(optional, Enter for none\): $")
    terminal.type("not today")
    terminal.expect("step ship rejected")
    assert terminal.wait() == 3, terminal.text()  # completed_with_errors: rejected
    report = stack.report(run_id)
    assert report["steps"]["ship"]["status"] == "skipped"
    assert report["steps"]["ship"]["reason"] == "rejected: not today"


def test_planrun_watch_withdraws_its_question_when_the_gate_is_answered_elsewhere(
        stack: Stack, plan: Path, tmp_path: Path, terminals: list[Terminal]) -> None:
    submitted = stack.cli("submit", str(plan))
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    terminal = on_terminal(stack, terminals, tmp_path, "watch", run_id)
    terminal.expect(r"approve\? \[y/N\] $")
    approved = stack.cli("approve", run_id, "ship")
    assert approved.returncode == 0, approved.stderr
    terminal.expect("answered elsewhere: step ship approved")
    assert terminal.wait() == 0, terminal.text()
    assert stack.report(run_id)["steps"]["ship"]["status"] == "completed"
