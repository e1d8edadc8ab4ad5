"""What the terminal shows: tool output cannot smuggle escape sequences into it."""

from __future__ import annotations

import io

from rich.console import Console

from planrun.console import LineDisplay, LiveDisplay
from planrun.contract.status import RunStatus, StepStatus
from planrun.errors import LogicError, TransientError
from planrun.report import RunRecord, StepRecord


def test_escape_sequences_in_tool_errors_are_not_written_to_the_terminal() -> None:
    step = StepRecord(id="a", tool="shell.run", status=StepStatus.FAILED, attempts=1,
                      error=LogicError("\x1b]0;owned\x07bad\x1b[2J input"))
    run = RunRecord(run_id="r", plan="p", steps={"a": step})
    out = io.StringIO()
    LineDisplay(out).changed(run, step)
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert "bad" in out.getvalue() and "input" in out.getvalue()


def _run(status: RunStatus = RunStatus.RUNNING, **run: object) -> RunRecord:
    steps = {
        "fetch": StepRecord(id="fetch", tool="http.request", status=StepStatus.COMPLETED,
                            attempts=1, started_at=10.0, ended_at=12.5),
        "build": StepRecord(id="build", tool="shell.run", status=StepStatus.RETRYING,
                            attempts=2, retry_delay_s=3.0,
                            error=TransientError("connection reset")),
        "test": StepRecord(id="test", tool="shell.run", status=StepStatus.FAILED, attempts=3,
                           error=LogicError("exit 1", hint="read the test log")),
        "lint": StepRecord(id="lint", tool="shell.run", status=StepStatus.SKIPPED,
                           reason="needs test, which failed"),
        "ship": StepRecord(id="ship", tool="core.approve", name="Ship it?",
                           status=StepStatus.AWAITING_APPROVAL),
        "docs": StepRecord(id="docs", tool="shell.run", status=StepStatus.COMPLETED,
                           attempts=1, fallback_used=True),
        "tidy": StepRecord(id="tidy", tool="shell.run", status=StepStatus.RUNNING, attempts=1,
                           started_at=11.0),
    }
    return RunRecord(run_id="r1", plan="release", steps=steps, status=status,
                     started_at=10.0, **run)  # type: ignore[arg-type]


def _live_screen(run: RunRecord | None, footer: str = "") -> str:
    out = io.StringIO()
    display = LiveDisplay(out)
    display.console = Console(file=out, force_terminal=True, width=160, color_system=None)
    if footer:
        display.footer = lambda: footer
    with display:
        if run is not None:
            display.changed(run, None)
    return out.getvalue()


def _row(screen: str, step_id: str) -> list[str]:
    """The words of the table row of ``step_id``."""
    return next(line.split() for line in screen.splitlines() if f" {step_id} " in line)


def test_the_live_table_shows_each_step_with_its_mark_status_tries_and_note() -> None:
    screen = _live_screen(_run(status=RunStatus.PAUSED, ended_at=None))
    assert "release paused  4/7 steps" in screen
    assert _row(screen, "fetch") == ["✓", "fetch", "http.request", "completed", "1", "2.5s"]
    assert _row(screen, "build")[:5] == ["↻", "build", "shell.run", "retrying", "2"]
    assert "transient: connection reset, next try in 3.0s" in screen
    assert _row(screen, "test")[:4] == ["✗", "test", "shell.run", "failed"]
    assert "logic: exit 1 — read the test log" in screen
    assert _row(screen, "lint")[:4] == ["–", "lint", "shell.run", "skipped"]
    assert "needs test, which failed" in screen
    assert _row(screen, "ship") == ["?", "ship", "core.approve", "awaiting_approval", "Ship", "it?"]
    assert _row(screen, "docs")[-4:] == ["completed", "by", "its", "fallback"]
    assert _row(screen, "tidy")[:5] == ["▶", "tidy", "shell.run", "running", "1"]


def test_the_live_display_shows_the_final_reason_the_prefect_link_and_a_full_bar() -> None:
    run = _run(status=RunStatus.FAILED, ended_at=20.0, reason="step test failed",
               flow_run_url="http://127.0.0.1:4200/runs/flow-run/abc")
    for step in run.steps.values():
        step.status = StepStatus.COMPLETED if step.id != "test" else StepStatus.FAILED
    screen = _live_screen(run, footer="about 5s left")
    assert "release failed  7/7 steps  10.0s" in screen
    assert "━" * 40 + " 100%" in screen
    assert "about 5s left" in screen
    assert "step test failed" in screen
    assert "Prefect UI: http://127.0.0.1:4200/runs/flow-run/abc" in screen


def test_the_live_display_says_it_is_starting_before_the_first_change() -> None:
    assert "starting…" in _live_screen(None)


def test_a_running_run_does_not_show_a_reason_yet() -> None:
    screen = _live_screen(_run(reason="not yet"))
    assert "release running" in screen and "not yet" not in screen


def test_the_progress_bar_of_an_empty_plan_is_full() -> None:
    run = RunRecord(run_id="r", plan="empty", steps={}, status=RunStatus.COMPLETED)
    screen = _live_screen(run)
    assert "empty completed  0/0 steps" in screen and " 100%" in screen


def test_line_display_writes_one_line_per_step_change_and_the_run_outcome() -> None:
    run = _run(status=RunStatus.FAILED, reason="step test failed")
    out = io.StringIO()
    with LineDisplay(out) as display:
        display.changed(run, run.steps["build"])
        display.changed(run, run.steps["fetch"])
        display.changed(run, None)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(
        "build retrying attempt 2: transient: connection reset, next try in 3.0s")
    assert lines[1].endswith("fetch completed attempt 1")
    assert lines[2].endswith("run release failed (4/7): step test failed")
    assert all(line.startswith("[") and "s]" in line for line in lines)


def test_line_display_leaves_the_reason_off_while_the_run_goes_on() -> None:
    out = io.StringIO()
    LineDisplay(out).changed(_run(reason="later"), None)
    assert out.getvalue().rstrip().endswith("run release running (4/7)")
