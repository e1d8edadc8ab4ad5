"""What the terminal shows: tool output cannot smuggle escape sequences into it."""

from __future__ import annotations

import io

from planrun.console import LineDisplay
from planrun.errors import LogicError
from planrun.report import RunRecord, StepRecord, StepStatus


def test_escape_sequences_in_tool_errors_are_not_written_to_the_terminal() -> None:
    step = StepRecord(id="a", tool="shell.run", status=StepStatus.FAILED, attempts=1,
                      error=LogicError("\x1b]0;owned\x07bad\x1b[2J input"))
    run = RunRecord(run_id="r", plan="p", steps={"a": step})
    out = io.StringIO()
    LineDisplay(out).changed(run, step)
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert "bad" in out.getvalue() and "input" in out.getvalue()
