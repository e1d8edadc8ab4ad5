"""A launcher started ahead of the next ``shell.run`` step, already in that step's control
groups, so that the step's program starts with a write to a pipe.

The first move of a process into a cgroup v1 group waits for an RCU grace period: 3–20 ms
on a 2-core machine, most of what measuring a program cost a step (BENCHMARKS.md,
"Resources per step"). A launcher (``adapters/launcher.py``) whose child has made that
move, in a new empty group, waits for its program instead: ``take`` hands it to a step
(waiting for one still starting: sooner than starting another), and ``keep`` starts the
next one while that step's program runs, once it has run ``AHEAD_AFTER_S``, or when it
ends if sooner: a start (≈ 1 ms, a fork on the event loop) during a program that ends
at once delayed its step's end by ≈ 0.6 ms (BENCHMARKS.md, "Resources per step").
One is kept per event loop and sandbox mode, by a task; the one not taken is dismissed
(its go pipe closed, so its child exits without running anything, and its group
removed) when the loop shuts down and cancels its tasks, or when the process exits. A
forked child does not take its parent's.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
from collections.abc import Coroutine
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from planrun.adapters import cgroups
from planrun.adapters.cgroups import StepGroup
from planrun.adapters.launcher import Launched, start_launcher

log = logging.getLogger(__name__)
#: How long a dismissed launcher may take to exit before it is killed.
DISMISS_S = 2.0
#: How long a step's program runs before the next step's launcher starts beside it.
AHEAD_AFTER_S = 0.002


@dataclass
class _Kept:
    launched: Launched
    group: StepGroup | None
    loop: asyncio.AbstractEventLoop
    #: The process and control-group root it was made for (``cgroups.ROOT_ENV``).
    where: tuple[int, str]
    #: Set when a step takes it: True if it was alive and is the step's now.
    taken: asyncio.Future[bool]

    def matches(self, loop: asyncio.AbstractEventLoop, sandboxed: bool) -> bool:
        return self.loop is loop and self.launched.sandboxed == sandboxed and \
            self.where == _where()


_KEPT: list[_Kept] = []
#: Launchers being started, by loop and mode: done once each is kept (or failed).
_STARTING: dict[tuple[asyncio.AbstractEventLoop, bool], asyncio.Future[None]] = {}
_TASKS: set[asyncio.Task[None]] = set()


async def take(sandboxed: bool) -> tuple[Launched, StepGroup | None] | None:
    """The launcher kept for this loop and mode, with its group, once one still starting
    is ready; None if there is none. Taken without a pause after the wait, so that a
    cancel cannot lose one."""
    loop = asyncio.get_running_loop()
    starting = _STARTING.get((loop, sandboxed))
    if starting is not None:
        await asyncio.shield(starting)
    for kept in [kept for kept in _KEPT if kept.matches(loop, sandboxed)]:
        _KEPT.remove(kept)
        alive = kept.launched.proc.returncode is None
        kept.taken.set_result(alive)  # its task dismisses a dead one
        if alive:
            return kept.launched, kept.group
    return None


def keep(sandboxed: bool) -> None:
    """Start the next launcher in the background, unless one is kept or starting."""
    loop = asyncio.get_running_loop()
    key = (loop, sandboxed)
    if key in _STARTING or any(kept.matches(loop, sandboxed) for kept in _KEPT):
        return
    _STARTING[key] = loop.create_future()
    # Also when the task is cancelled before it runs (its loop shutting down): a step
    # waiting in ``take`` then starts its own.
    _background(_keep(loop, sandboxed)).add_done_callback(lambda _: _started(key))


def _started(key: tuple[asyncio.AbstractEventLoop, bool]) -> None:
    """The launcher of ``key`` is kept, or could not be started: a ``take`` may go on."""
    started = _STARTING.pop(key, None)
    if started is not None and not started.done():
        started.set_result(None)


async def _keep(loop: asyncio.AbstractEventLoop, sandboxed: bool) -> None:
    group = cgroups.make_step_group()
    try:
        launched = start_launcher(group.procs_files() if group else [], sandboxed)
    except Exception as exc:  # the step that takes none starts its own, and says why
        log.debug("could not start a launcher ahead: %s", exc)
        if group is not None:
            await asyncio.to_thread(group.remove)
        return
    kept = _Kept(launched, group, loop, _where(), loop.create_future())
    _KEPT.append(kept)
    _started((loop, sandboxed))
    taken = False
    try:
        taken = await kept.taken
    finally:
        if not taken:
            with suppress(ValueError):
                _KEPT.remove(kept)
            await _dismiss(kept.launched, kept.group)


def dismiss(launched: Launched, group: StepGroup | None) -> None:
    """Dismiss a launcher taken but not used, in the background."""
    _background(_dismiss(launched, group))


def _background(job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run ``job`` as a task of the running loop, referenced until it is done."""
    task = asyncio.get_running_loop().create_task(job)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return task


async def _dismiss(launched: Launched, group: StepGroup | None) -> None:
    """Close its go pipe (its child exits, then it does), reap it, remove its group."""
    with suppress(OSError):
        os.close(launched.go)
    try:
        await asyncio.wait_for(launched.proc.wait(), DISMISS_S)
    except TimeoutError:
        launched.proc.kill()
        await launched.proc.wait()
    finally:
        launched.proc.let_go()
        with suppress(OSError):
            os.close(launched.status)
        if group is not None:
            await asyncio.to_thread(group.remove)


@atexit.register
def _dismiss_at_exit() -> None:
    """The process exits with launchers kept: their children are told to go (EOF on the
    go pipe) and their groups removed, killing what is left."""
    for kept in [kept for kept in _KEPT if kept.where[0] == os.getpid()]:
        with suppress(OSError):
            os.close(kept.launched.go)
        if kept.group is not None:
            kept.group.remove(within=DISMISS_S)
    _KEPT.clear()


def _where() -> tuple[int, str]:
    return os.getpid(), os.environ.get(cgroups.ROOT_ENV, "")
