"""What a person sees in the terminal while a run goes: a live step table and a bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from planrun.contract.status import StepStatus
from planrun.durations import format_duration
from planrun.report import RunRecord, StepRecord

STYLES = {
    StepStatus.PENDING: ("·", "dim"), StepStatus.RUNNING: ("▶", "cyan"),
    StepStatus.RETRYING: ("↻", "yellow"), StepStatus.AWAITING_APPROVAL: ("?", "magenta"),
    StepStatus.COMPLETED: ("✓", "green"), StepStatus.FAILED: ("✗", "red"),
    StepStatus.SKIPPED: ("–", "dim"), StepStatus.CANCELLED: ("■", "red"),
}
RUN_STYLES = {"completed": "green", "completed_with_errors": "yellow", "failed": "red",
              "cancelled": "red", "running": "cyan"}


_CONTROL = dict.fromkeys(c for c in range(32) if c not in (9, 10)) | {127: None}


def _printable(text: str) -> str:
    """Tool output shown to a person: no escape sequences that could rewrite the terminal."""
    return text.translate(_CONTROL)


def _note(step: StepRecord) -> str:
    return _printable(_raw_note(step))


def _raw_note(step: StepRecord) -> str:
    if step.status == StepStatus.PENDING and step.note:
        return step.note  # waiting for a limit (docs/limits.md)
    if step.status == StepStatus.RETRYING and step.error:
        wait = f", next try in {step.retry_delay_s:.1f}s" if step.retry_delay_s else ""
        return f"{step.error.category}: {step.error.message}{wait}"
    if step.error and step.status == StepStatus.FAILED:
        return f"{step.error.category}: {step.error.message} — {step.error.hint}"
    if step.fallback_used:
        return "completed by its fallback"
    if step.note and not step.status.finished:  # why it waits (a slot, a rate limit, load)
        return step.note
    return step.reason or ""


class LiveDisplay:
    """A RunObserver that redraws a rich table of the run on every change."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.console = Console(file=stream or sys.stderr)
        self.live: Live | None = None
        self.run: RunRecord | None = None
        self.waiting = "starting…"
        #: A line under the progress bar (``planrun watch``: the estimate), if it says anything.
        self.footer: Callable[[], str] | None = None

    def __enter__(self) -> LiveDisplay:
        self.live = Live(console=self.console, refresh_per_second=8,
                         get_renderable=self._render, transient=False)
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.live.refresh()
            self.live.__exit__(*exc)

    def changed(self, run: RunRecord, step: StepRecord | None) -> None:
        self.run = run

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop redrawing while a person types (a gate's question), then go on below."""
        live = self.live
        if live is None or not live.is_started:
            yield
            return
        live.stop()
        try:
            yield
        finally:
            live.start()

    def _render(self) -> Any:
        run = self.run
        if run is None:
            return Text(self.waiting, style="dim")
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        for name in ("", "step", "tool", "status", "tries", "time", ""):
            table.add_column(name, no_wrap=name != "")
        for step in run.steps.values():
            mark, style = STYLES[step.status]
            time_s = step.duration_s
            table.add_row(Text(mark, style=style), step.id, Text(step.tool, style="dim"),
                          Text(str(step.status), style=style),
                          str(step.attempts or ""),
                          format_duration(time_s) if time_s is not None else "",
                          Text(_note(step) or step.name or "",
                               style="red" if step.status == StepStatus.FAILED else "dim",
                               overflow="fold"))
        progress = run.progress()
        status = str(run.status)
        elapsed = format_duration(run.duration_s or 0.0)
        head = Text.assemble((f"{run.plan} ", "bold"), (status, RUN_STYLES.get(status, "")),
                             f"  {progress.done}/{progress.total} steps  {elapsed}")
        parts: list[Any] = [head, _bar(progress.done, progress.total)]
        footer = self.footer() if self.footer else ""
        if footer:
            parts.append(Text(footer, style="cyan"))
        parts.append(table)
        if run.reason and run.status.value not in ("running", "pending"):
            parts.append(Text(run.reason, style=RUN_STYLES.get(status, "")))
        if run.flow_run_url:
            parts.append(Text(f"Prefect UI: {run.flow_run_url}", style="dim"))
        return Group(*parts)


def _bar(done: int, total: int, width: int = 40) -> Text:
    filled = round(width * done / total) if total else width
    percent = 100 * done / total if total else 100.0
    return Text.assemble(("━" * filled, "green"), ("━" * (width - filled), "grey30"),
                         f" {percent:3.0f}%")


class LineDisplay:
    """A RunObserver for logs and pipes: one plain line per step change."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.waiting = ""

    def __enter__(self) -> LineDisplay:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def changed(self, run: RunRecord, step: StepRecord | None) -> None:
        stamp = f"[{time.monotonic() - self.started:7.2f}s]"
        if step is None:
            progress = run.progress()
            line = f"{stamp} run {run.plan} {run.status} ({progress.done}/{progress.total})"
            if run.reason and run.status.value not in ("running", "pending"):
                line += f": {run.reason}"
        else:
            note = _note(step)
            line = f"{stamp} {step.id} {step.status} attempt {step.attempts}" + \
                   (f": {note}" if note else "")
        print(line, file=self.stream, flush=True)
