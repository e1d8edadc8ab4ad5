"""Asking a person at an approval gate on the terminal (``planrun run``, ``planrun watch``).

The terminal is one of several places that answer the same gate: the Prefect UI's form,
``planrun approve``, the live page. Every one of them resumes the run's flow run with the
gate's form (docs/approvals.md), and Prefect takes only the first resume: when another
answer comes first, the question here is withdrawn and the terminal says what was decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from planrun.console import _printable  # no escape sequences from a plan's prompt
from planrun.contract.control import TIMED_OUT
from planrun.contract.status import RunStatus, StepStatus
from planrun.report import RunObserver, RunRecord, StepRecord

#: Hands an answer on: (run id, step id, approved, comment); whether it was taken (False:
#: the gate no longer waits, it was answered elsewhere first).
Give = Callable[[str, str, bool, str], Awaitable[bool]]


def on_a_terminal() -> bool:
    """Whether a person can be asked here: stdin and stderr are both a terminal."""
    return sys.stdin.isatty() and sys.stderr.isatty()


class TerminalAsker:
    """Asks at a gate on this terminal: the prompt, ``approve? [y/N]``, then an optional
    comment, and hands the answer to ``give``. ``display`` (a ``LiveDisplay``) stops
    redrawing while a person types."""

    def __init__(self, give: Give, display: Any = None, fd: int | None = None) -> None:
        self.give = give
        self.display = display
        self.fd = sys.stdin.fileno() if fd is None else fd
        self._given: dict[str, tuple[bool, str]] = {}  # step id -> the answer taken here

    async def ask(self, run_id: str, step_id: str, prompt: str) -> None:
        """Ask until the person answers, then give the answer; cancelled (the question is
        withdrawn) when the gate was answered elsewhere first."""
        self._given.pop(step_id, None)
        with self._display_paused():
            _say(f"\nrun {run_id} waits for approval of step {step_id}: {_printable(prompt)}\n"
                 f"  It can also be answered in the Prefect UI, on the run's live page or with\n"
                 f"  `planrun approve {run_id} {step_id} [--reject]`; the first answer counts.")
            lines = _Lines(self.fd)
            try:
                yes = await _yes_or_no(lines)
                comment = (await lines.read("comment (optional, Enter for none): ")).strip()
            except EOFError:
                _say("\nno answer from this terminal: answer it elsewhere")
                await asyncio.Event().wait()  # until it is answered elsewhere
                return
            except asyncio.CancelledError:
                _say("")  # the question is withdrawn: what follows starts on a new line
                raise
            finally:
                lines.close()
            if await self.give(run_id, step_id, yes, comment):
                self._given[step_id] = (yes, comment)

    def settled(self, step_id: str, answer: tuple[bool, str] | None) -> None:
        """Say how the gate was answered: here, or elsewhere first."""
        mine = self._given.pop(step_id, None)
        if answer is None:
            _say(f"the gate of {step_id} no longer waits, unanswered (the run was stopped, "
                 "or an answer did not count and it is asked again)")
        elif answer == (False, TIMED_OUT):
            _say(f"no answer in time: step {step_id} skipped ({TIMED_OUT})")
        elif mine is not None:  # taken: Prefect takes only the first resume
            _say(f"step {step_id} {'approved' if answer[0] else 'rejected'}")
        else:
            decided = "approved" if answer[0] else "rejected"
            why = f" ({_printable(answer[1])})" if answer[1] else ""
            _say(f"answered elsewhere: step {step_id} {decided}{why}")

    @contextlib.contextmanager
    def _display_paused(self) -> Iterator[None]:
        paused = getattr(self.display, "paused", None)
        with paused() if paused is not None else contextlib.nullcontext():
            yield


async def _yes_or_no(lines: _Lines) -> bool:
    """``y``/``yes`` or ``n``/``no``/Enter (no), asked again after anything else: a typo
    decides nothing."""
    while True:
        typed = (await lines.read("approve? [y/N] ")).strip().lower()
        if typed in ("y", "yes", "n", "no", ""):
            return typed in ("y", "yes")
        _say("please answer y or n")


class GateWatch:
    """A RunObserver for ``planrun watch`` on a terminal: passes every change on to
    ``observer`` and, while the followed run waits at a gate, asks ``asker`` there; the
    question is withdrawn once the stream shows the gate answered, and the terminal then
    says how (the step runs: approved; it is skipped: rejected)."""

    def __init__(self, observer: RunObserver, asker: TerminalAsker) -> None:
        self.observer = observer
        self.asker = asker
        self._asking: tuple[str, asyncio.Future[None]] | None = None
        self._answered: str | None = None  # a gate answered, its outcome not yet seen

    def changed(self, run: RunRecord, step: StepRecord | None) -> None:
        self.observer.changed(run, step)
        gate = next((s for s in run.steps.values()
                     if s.status == StepStatus.AWAITING_APPROVAL), None)
        if run.status == RunStatus.AWAITING_APPROVAL and gate is not None:
            if self._asking is None:
                self._asking = (gate.id, asyncio.ensure_future(
                    self.asker.ask(run.run_id, gate.id, run.reason or "")))
            return
        if self._asking is not None:
            self._answered, asking = self._asking
            self._asking = None
            asking.cancel()
        self._settle(run)

    def _settle(self, run: RunRecord) -> None:
        record = run.steps.get(self._answered or "")
        if record is None or record.status in (StepStatus.PENDING,
                                               StepStatus.AWAITING_APPROVAL):
            return
        self._answered = None
        if record.status == StepStatus.SKIPPED and (record.reason or "").startswith("rejected"):
            comment = (record.reason or "").removeprefix("rejected").lstrip(": ")
            self.asker.settled(record.id, (False, comment))
        elif record.status != StepStatus.SKIPPED:
            self.asker.settled(record.id, (True, ""))

    async def close(self) -> None:
        """Withdraw a question still open (the run ended)."""
        if self._asking is not None:
            self._asking[1].cancel()
            await asyncio.gather(self._asking[1], return_exceptions=True)


class _Lines:
    """Lines typed on the terminal ``fd``, read without blocking the event loop (the run
    goes on, and the question can be withdrawn, while a person types)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    async def read(self, prompt: str) -> str:
        """Print ``prompt`` and return the next line typed (EOFError: the input ended)."""
        print(prompt, end="", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        while b"\n" not in self.buffer:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.fd, _set_once, ready)
            try:
                await ready
            finally:
                loop.remove_reader(self.fd)
            chunk = os.read(self.fd, 1024)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace")

    def close(self) -> None:
        """Drop what was typed but not read: it answers nothing later."""
        with contextlib.suppress(termios.error, OSError):
            termios.tcflush(self.fd, termios.TCIFLUSH)


def _set_once(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
